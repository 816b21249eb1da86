"""Dynamic int8 / fp8 transformer: closeness to float, kernels, load memory, pipeline and CLI, torch.compile."""
from __future__ import annotations

import functools
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import pixart
import pixart.models.transformer as transformer_module
import pixart.weights.loading as loading_module
from pixart.cli import main
from pixart.compile import compile_model, compile_options
from pixart.configs import TransformerConfig
from pixart.models.transformer import PixArtTransformer2DModel
from pixart import quant_dynamic
from pixart.quant_dynamic import DynamicLinear, DynamicSpec, quantize_rows
from pixart.weights.files import Lazy

CONFIG = TransformerConfig(sample_size=16, num_layers=2, num_attention_heads=2, attention_head_dim=16, in_channels=4,
                           out_channels=8, caption_channels=32, cross_attention_dim=32, patch_size=2)
LINEARS_PER_BLOCK = 10  # to_q, to_k, to_v, to_out.0 of both attentions; ff up and down


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("transformer")
    torch.manual_seed(0)
    PixArtTransformer2DModel(CONFIG).save_pretrained(folder)  # default init: zero-free random weights
    return folder


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 10, 32, generator=g)
    mask = torch.ones(2, 10)
    mask[1, 6:] = 0
    return x.to(dtype), torch.tensor([999.0, 20.0]), y.to(dtype), mask


def cosine(a, b):
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def dynamic_layers(model):
    return [m for m in model.modules() if isinstance(m, DynamicLinear)]


@pytest.mark.parametrize("name, dtype", [("int8", torch.float32), ("int8", torch.bfloat16), ("fp8", torch.float32)])
def test_quantized_transformer_output_is_close_to_the_float_one(float_dir, name, dtype):
    # observed on this model: 1 - cosine 2.5e-6 (int8, 7-bit weights on AVX2), 1.5e-5 (fp8, 3 mantissa bits); the
    # bound 1e-3 is what we ask at real size (issue 6), and leaves room for other CPUs' int8 weight range
    reference = PixArtTransformer2DModel.from_pretrained(float_dir, torch_dtype=dtype)(*inputs(dtype))
    model = PixArtTransformer2DModel.from_pretrained(float_dir, torch_dtype=dtype, quantization=name)
    assert len(dynamic_layers(model)) == LINEARS_PER_BLOCK * CONFIG.num_layers
    assert isinstance(model.proj_out, torch.nn.Linear)  # the embedders and the final layer stay float
    out = model(*inputs(dtype))
    assert out.dtype == dtype
    assert 1 - 1e-3 <= cosine(out, reference) < 1 - 1e-7  # close, and really quantized


# fp32 rounding of the same integer products; `_scaled_mm` returns bf16 (8 bits of mantissa), as on a GPU
@pytest.mark.parametrize("format, kernels", [("int8", {"onednn": 1e-5, "int_mm": 1e-5}), ("fp8", {"scaled_mm": 1e-2})])
def test_every_kernel_computes_the_reference_formula(format, kernels):
    torch.manual_seed(0)
    layer = DynamicSpec(format, 63.0 if format == "int8" else None).linear(64, 48, bias=True)
    for key, t in {**layer.quantize(torch.randn(48, 64) * 0.05, torch.float32), "bias": torch.randn(48)}.items():
        setattr(layer, key, torch.nn.Parameter(t, requires_grad=False))
    assert layer.weight.abs().max() == 63 if format == "int8" else layer.weight.dtype == torch.uint8
    x = torch.randn(3, 5, 64)
    x[0, 0] *= 50  # one loud token: per-token scales keep it from drowning the others
    q, sx = quantize_rows(x.reshape(15, 64), format)
    expected = ((q.float() * sx) @ layer.dequantize().t() + layer.bias).view(3, 5, 48)
    layer.kernel = "reference"
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)  # fp32 rounding of the same products
    assert cosine(layer(x)[1:], F.linear(x[1:], layer.dequantize(), layer.bias)) > 0.999
    for kernel, tolerance in kernels.items():  # the CUDA kernels have CPU implementations too
        layer.kernel = kernel
        torch.testing.assert_close(layer(x), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("format", ["int8", "fp8"])
def test_quantize_rows_in_pieces_equals_whole_and_the_formula(format, monkeypatch):
    """A CPU tensor over CPU_CHUNK_BYTES is quantized a few rows at a time: the same values and scales."""
    torch.manual_seed(0)
    x = torch.randn(37, 96) * torch.logspace(-3, 2, 37)[:, None]  # rows of very different loudness
    x[5, 7], x[9, 3] = 1e3, -2e3  # the largest magnitude negative in one row
    whole = quantize_rows(x, format)
    monkeypatch.setattr(quant_dynamic, "CPU_CHUNK_BYTES", 4 * 96 * 5)  # 5 rows per piece, the last one shorter
    pieces = quantize_rows(x, format)
    (q_whole, s_whole), (q_pieces, s_pieces) = whole, pieces
    assert q_pieces.dtype == q_whole.dtype and torch.equal(q_pieces.view(torch.uint8), q_whole.view(torch.uint8))
    assert torch.equal(s_pieces, s_whole)
    qdtype, qmax = quant_dynamic.FORMATS[format]
    scale = x.abs().amax(-1, keepdim=True) * (1 / qmax)
    assert torch.equal(whole[1], scale)
    assert whole[0].float().abs().amax(-1).eq(qmax).all()  # each row's largest magnitude maps to ±qmax
    formula = (x / scale).round() if format == "int8" else (x / scale).to(qdtype).float()
    assert torch.equal(whole[0].float(), formula)
    if format == "int8":  # oneDNN's input: the same values shifted into 1..255 (zero point 128), also in pieces
        q_unsigned, s_unsigned = quantize_rows(x, format, unsigned=True)
        assert q_unsigned.dtype == torch.uint8 and torch.equal(s_unsigned, scale)
        assert torch.equal(q_unsigned.int() - 128, q_whole.int())


def test_onednn_kernel_without_vnni_refuses_full_range_weights():
    layer = DynamicSpec("int8", 127.0).linear(32, 16, bias=False)
    layer.weight = torch.nn.Parameter(torch.full((16, 32), 127, dtype=torch.int8), requires_grad=False)
    layer.scale = torch.nn.Parameter(torch.ones(16), requires_grad=False)
    layer.kernel = "onednn"
    with pytest.raises(ValueError, match="needs weights quantized to ±63"):
        layer(torch.randn(2, 32))


def test_loading_quantized_holds_one_float_block_weight_at_a_time(float_dir, monkeypatch):
    alive, peak, reads = set(), [0], []
    original = transformer_module.lazy_tensors

    def counting(files, **kwargs):
        def watched(key, lazy):
            def read():
                t = lazy()
                reads.append(key)
                alive.add(key)
                weakref.finalize(t, alive.discard, key)
                peak[0] = max(peak[0], len(alive))
                return t

            return Lazy(read, lazy.shape)

        tensors = original(files, **kwargs)
        return {k: watched(k, v) if k.startswith("transformer_blocks.") and k.endswith("weight") else v
                for k, v in tensors.items()}

    monkeypatch.setattr(transformer_module, "lazy_tensors", counting)
    monkeypatch.setattr(loading_module, "lazy_tensors", counting)  # the float load's path
    PixArtTransformer2DModel.from_pretrained(float_dir, quantization="int8")
    assert peak[0] == 1
    assert len(reads) == len(set(reads)) == LINEARS_PER_BLOCK * CONFIG.num_layers  # each read and quantized once
    reads.clear()
    PixArtTransformer2DModel.from_pretrained(float_dir)  # the counter does see a float load keeping every weight
    assert peak[0] == len(reads) == LINEARS_PER_BLOCK * CONFIG.num_layers


def test_fp16_keeps_the_weight_scales_in_fp32(float_dir):
    model = PixArtTransformer2DModel.from_pretrained(float_dir, torch_dtype=torch.float16, quantization="int8")
    layer = model.transformer_blocks[0].ff.net[2]
    assert layer.scale.dtype == torch.float32 and layer.bias.dtype == torch.float16
    model.cast(torch.bfloat16).cast(torch.float16)  # as the pipeline's .to(dtype) does
    assert layer.scale.dtype == torch.float32 and layer.weight.dtype == torch.int8


def test_quantization_errors_name_the_fix(float_dir, pipeline_dir_512, tmp_path):
    with pytest.raises(ValueError, match="unknown transformer quantization 'int4': choose one of int8, fp8"):
        PixArtTransformer2DModel.from_pretrained(float_dir, quantization="int4")
    model = PixArtTransformer2DModel.from_pretrained(float_dir, quantization="int8")
    with pytest.raises(ValueError, match="save the float model, and load it with quantization="):
        model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"from_pretrained\(\.\.\., quantization=\.\.\.\)"):
        pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, transformer=model, transformer_quantization="int8")


@pytest.mark.parametrize("memory", ["full", "staged"])
def test_pipeline_with_an_int8_transformer_is_close_to_the_float_pipeline(pipeline_dir_512, memory):
    def latents(**kwargs):
        pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, memory=memory, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a red circle", num_inference_steps=3, width=128, height=128, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
        return pipe, out

    _, reference = latents()
    pipe, out = latents(transformer_quantization="int8")
    assert cosine(out, reference) > 0.999  # 3 sampler steps of the bound above
    assert not torch.equal(out, reference)
    if memory == "full":
        assert len(dynamic_layers(pipe.transformer)) == LINEARS_PER_BLOCK * 2


def test_cli_quantize_transformer_gives_the_library_image(pipeline_dir_512, tmp_path, capsys):
    out = tmp_path / "img.png"
    code = main(["generate", "a red circle", "--model", str(pipeline_dir_512), "-o", str(out), "--seed", "7",
                 "--steps", "2", "--width", "128", "--height", "128", "--dtype", "fp32", "--quiet",
                 "--quantize-transformer", "int8"])
    assert code == 0, capsys.readouterr().err
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, transformer_quantization="int8")
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a red circle", num_inference_steps=2, width=128, height=128,
                    generator=[torch.Generator().manual_seed(7)]).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))


def test_compile_options_freeze_weights_on_cpu_and_check_the_mode():
    cpu = compile_options(torch.device("cpu"), "max-autotune")
    assert cpu["dynamic"] is False and cpu["options"]["freezing"] and cpu["options"]["max_autotune"]
    assert "triton.cudagraphs" not in cpu["options"]
    assert compile_options(torch.device("cuda"), "reduce-overhead") == {"dynamic": False, "mode": "reduce-overhead"}
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        compile_options(torch.device("cpu"), "fast")


def test_compiled_staged_pipeline_keeps_its_models_and_does_not_recompile(pipeline_dir_512, monkeypatch):
    """Dynamo's side (one graph per model, no graph break, no recompile, the models kept), with inductor swapped for
    the eager backend to keep the test fast; inductor's side is in the slow test below."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, memory="staged")
    pipe.set_progress_bar_config(disable=True)
    transformer, vae = pipe.compile(vae=True).transformer, pipe.vae
    with pytest.raises(ValueError, match="run_blocks is already compiled"):
        compile_model(transformer, torch.device("cpu"), method="run_blocks")
    counters = torch._dynamo.utils.counters
    counters.clear()
    run = functools.partial(pipe, num_inference_steps=2, width=128, height=128, output_type="pt")
    first = run("a red circle", generator=torch.Generator().manual_seed(0)).images
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]  # the blocks, the decoder
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = run("a red circle", generator=torch.Generator().manual_seed(0)).images
        run("a red circle", cache="fastest")  # step caching calls the same compiled blocks
        run("a big blue square on a gray background")  # a longer prompt: compiled, the captions keep their 120
    assert torch.equal(first, again)
    assert pipe.transformer is transformer and pipe.vae is vae  # staged mode did not release them


def test_compile_takes_the_vae_decoder_too_on_a_gpu_only_by_default(pipeline_dir_512, monkeypatch):
    """compile() compiles the VAE decoder where the pipeline runs on CUDA (seconds to compile, 2.7× faster decoding)
    and not on a CPU (minutes); vae=True/False decide either way. torch.compile is recorded, not run."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (compiled.append(fn), fn)[1])
    names = lambda: {type(getattr(f, "__self__", f)).__name__ for f in compiled}  # noqa: E731
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512)
    pipe.compile()
    assert names() == {"PixArtTransformer2DModel"}
    compiled.clear()
    pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512).compile(vae=True)
    assert names() == {"PixArtTransformer2DModel", "Decoder"}
    compiled.clear()
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512)
    monkeypatch.setattr(type(pipe), "device", property(lambda self: torch.device("cuda")))
    pipe.compile()
    assert names() == {"PixArtTransformer2DModel", "Decoder"}
    compiled.clear()
    pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512).compile(vae=False)
    assert names() == {"PixArtTransformer2DModel"}


@pytest.mark.slow
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_compiled_transformer_equals_eager_and_reuses_its_graph(float_dir, quantization):
    # inductor on 2 cores: ~20-60 s per model
    model = PixArtTransformer2DModel.from_pretrained(float_dir, quantization=quantization)
    with torch.no_grad():
        eager = [model(*inputs()), model(inputs()[0] * 0.5, *inputs()[1:])]
    compile_model(model, torch.device("cpu"))
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = model(*inputs())
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = model(inputs()[0] * 0.5, *inputs()[1:])
    assert counters["stats"]["unique_graphs"] == 1
    # fused kernels reorder fp32 sums: 1e-4 of outputs of size ~1
    torch.testing.assert_close(compiled, eager[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, eager[1], rtol=1e-4, atol=1e-4)


def test_fused_passes_compute_what_the_unfused_ones_do(monkeypatch):
    """The GPU path fuses the activations' quantization and the product's epilogue with inductor; compiled here on
    the CPU, they must give the unfused results: the same integers (a rounding tie may land one step away) and
    scales, and the same epilogue up to bf16 rounding."""
    monkeypatch.setattr(quant_dynamic, "FUSED", {})
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x[3] *= 40
    for format in ("int8", "fp8"):
        q, sx = quant_dynamic.fused(quantize_rows)(x, format)
        q_ref, sx_ref = quantize_rows(x, format)
        assert q.dtype == q_ref.dtype
        torch.testing.assert_close(sx, sx_ref, rtol=1e-6, atol=0)
        assert (q.float() - q_ref.float()).abs().max() <= (1 if format == "int8" else 32)  # one step of its grid
    acc = torch.randint(-2**20, 2**20, (40, 48), dtype=torch.int32)
    sw, bias = torch.rand(48) / 1000, torch.randn(48)
    out = quant_dynamic.fused(quant_dynamic.finish_int)(acc, sx_ref, sw, bias, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ((acc.double() * sx_ref * sw) + bias).to(torch.bfloat16), rtol=8e-3, atol=0)


def test_fused_falls_back_to_the_plain_function_when_compiling_fails(monkeypatch, caplog):
    monkeypatch.setattr(quant_dynamic, "FUSED", {})

    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no Triton here")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    acc = torch.arange(6, dtype=torch.int32).view(2, 3)
    with caplog.at_level("WARNING", logger="pixart"):
        out = quant_dynamic.fused(quant_dynamic.finish_int)(acc, torch.ones(2, 1), torch.ones(3), None, torch.float32)
    torch.testing.assert_close(out, acc.float())
    assert "fusing finish_int failed (no Triton here)" in caplog.text
    assert quant_dynamic.FUSED[quant_dynamic.finish_int] is quant_dynamic.finish_int  # not retried on every call
