"""The Triton kernels, run by Triton's interpreter on CPU tensors, against the PyTorch functions they replace."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pixart import triton_kernels
from pixart.quant_dynamic import DynamicSpec, quantize_rows

pytest.importorskip("triton")

# K = 100: a chunk of the row masked; (300, 4608) left out: 3 s in the interpreter for what (7, 4608) and (300, 1152)
# already cover
SHAPES = [(M, K) for M in (1, 7, 300) for K in (1152, 4608, 100) if (M, K) != (300, 4608)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMATS = ("int8", "fp8")
# rows whose scale is exactly 1 (amax = qmax), holding ties of each format's grid: (input, torch's result)
INT8_TIES = ([127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 125.5, -126.5, 0.0, -0.0],
             [127, 0, 2, 2, 0, -2, -2, 126, -126, 0, 0])
FP8_TIES = ([448, 8.5, 9.5, 15.5, 17, 19, 432, 440, 3 * 2**-10, 2**-10, -2**-10, -0.0, -448],
            [448, 8, 10, 16, 16, 20, 448, 448, 2**-8, 0.0, -0.0, -0.0, -448])  # e4m3: steps 1, 2, 32; 2**-9 at 0

# runs in a fresh process: TRITON_INTERPRET must be set before triton is first imported
INTERPRETED = """
import sys
import torch
from pixart import triton_kernels
assert triton_kernels.available("cpu")
cases = torch.load(sys.argv[1])
torch.save({name: triton_kernels.quantize_rows(x, format) for name, (x, format) in cases.items()}, sys.argv[2])
"""


def random_rows(M, K, dtype, seed=0):
    """Activations with outliers: rows of different magnitudes, a few loud channels and one loud token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 4
    x[:, torch.randint(0, K, (max(1, K // 100),), generator=g)] *= 50
    x[M // 2] *= 20
    return x.to(dtype)


def cases():
    """name -> (input rows, format) for every kernel call the tests check."""
    out = {f"{format}-{name}-{M}x{K}": (random_rows(M, K, dtype), format)
           for format in FORMATS for name, dtype in DTYPES.items() for M, K in SHAPES}
    out["int8-ties"] = (torch.tensor([INT8_TIES[0], [0.0] * len(INT8_TIES[0])]), "int8")  # with a zero row
    out["fp8-ties"] = (torch.tensor([FP8_TIES[0], [0.0] * len(FP8_TIES[0])]), "fp8")
    wide = random_rows(40, 1200, torch.float16)
    for format in FORMATS:
        out[f"{format}-fp16-strided"] = (wide[:, :1152], format)  # rows 1200 apart
    return out


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Each case's input, the kernel's output under the interpreter, and torch's (quant_dynamic.quantize_rows)."""
    folder = tmp_path_factory.mktemp("triton")
    inputs = cases()
    torch.save(inputs, folder / "in.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", INTERPRETED, str(folder / "in.pt"), str(folder / "out.pt")], env=env,
                         cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    outputs = torch.load(folder / "out.pt")
    return {name: (x, outputs[name], quantize_rows(x, format)) for name, (x, format) in inputs.items()}


def assert_same_quantization(got, expected):
    """Values equal to the bit (fp8 compared as bytes, so -0 and +0 differ) and fp32 scales equal."""
    (q, scale), (q_ref, scale_ref) = got, expected
    assert q.dtype == q_ref.dtype and q.shape == q_ref.shape and scale.shape == scale_ref.shape == (q.shape[0], 1)
    as_ints = (lambda t: t.view(torch.uint8)) if q.dtype == torch.float8_e4m3fn else (lambda t: t)
    mismatch = (as_ints(q) != as_ints(q_ref)).nonzero()
    assert len(mismatch) == 0, f"{len(mismatch)} values differ, first at {mismatch[0].tolist()}"
    assert torch.equal(scale, scale_ref)


@pytest.mark.parametrize("M, K", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("format", FORMATS)
def test_kernel_quantizes_rows_exactly_as_torch(interpreted, format, dtype, M, K):
    # exact, not within a step: the kernel divides with IEEE rounding (div_rn) as torch does, rounds half to even,
    # and computes the scale as amax * fp32(1/qmax), the formula quantize_rows and CUDA's `amax / qmax` share
    _, got, expected = interpreted[f"{format}-{dtype}-{M}x{K}"]
    assert_same_quantization(got, expected)


@pytest.mark.parametrize("format, ties", [("int8", INT8_TIES), ("fp8", FP8_TIES)])
def test_ties_round_half_to_even_zeros_keep_their_sign_and_a_zero_row_quantizes_to_zeros(interpreted, format, ties):
    x, got, expected = interpreted[f"{format}-ties"]
    assert x[0, 0] * (1 / (127.0 if format == "int8" else 448.0)) == 1  # scale 1: the ties are exact
    values = torch.tensor([ties[1], [0.0] * len(ties[1])]).to(got[0].dtype)
    assert_same_quantization(expected, (values, expected[1]))  # torch's own rounding is the table above
    assert_same_quantization(got, expected)
    assert expected[1][1].item() == pytest.approx(1e-12 / (127.0 if format == "int8" else 448.0))


@pytest.mark.parametrize("format", FORMATS)
def test_fp16_rows_with_a_stride_quantize_as_torch(interpreted, format):
    x, got, expected = interpreted[f"{format}-fp16-strided"]
    assert x.stride(0) == 1200  # the saved view kept its layout
    assert_same_quantization(got, expected)


def test_available_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert triton_kernels.available("cuda") and triton_kernels.available(torch.device("cuda", 0))
    assert not triton_kernels.available("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_kernels.available("cpu")


def test_fp8_layer_casts_its_bias_to_bf16_once_and_again_after_a_move_or_new_weights():
    torch.manual_seed(0)
    layer = DynamicSpec("fp8").linear(64, 48, bias=True)
    for key, t in {**layer.quantize(torch.randn(48, 64) * 0.05, torch.float32), "bias": torch.randn(48)}.items():
        setattr(layer, key, torch.nn.Parameter(t, requires_grad=False))
    layer.kernel = "scaled_mm"  # `_scaled_mm` has a CPU implementation
    x = torch.randn(20, 64)
    q, sx = quantize_rows(x, "fp8")
    expected = (q.float() * sx) @ layer.dequantize().t() + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-2, atol=1e-2)  # bf16 output and bias
    cast = layer.bf16_bias()
    assert cast.dtype == torch.bfloat16 and layer.bf16_bias() is cast
    layer(x)
    assert layer.bf16_bias() is cast  # not per call
    layer.bias.data = layer.bias.data.half()  # as PretrainedModel.cast does
    assert layer.bf16_bias() is not cast
    cast = layer.bf16_bias()
    layer.load_state_dict({**layer.state_dict(), "bias": torch.zeros(48, dtype=torch.float16)})  # copied in place
    assert torch.equal(layer.bf16_bias(), torch.zeros(48, dtype=torch.bfloat16))
    layer.bias.data = layer.bias.data.to(torch.bfloat16)
    assert layer.bf16_bias() is layer.bias  # a bf16 model's bias goes in as it is
