"""Dynamic int8 / fp8 transformer against float, and torch.compile, at PixArt-XL-2's real size (random weights).

One JSON line per configuration, medians after a warm-up call; the models being compared take turns, call by call,
so that the load of a shared machine falls on each alike:
- `linear`: one 2048×1152 → 4608 layer (a 512² CFG step's MLP up-projection) per kernel: float, oneDNN int8,
  `torch._int_mm`, fbgemm's dynamic linear (CPU), `_scaled_mm` fp8 (CUDA from sm_89), with TOP/s;
- `step`: one transformer call (batch 2 = one classifier-free-guidance step) per size, float vs each quantization:
  seconds, speedup, and the output's cosine similarity to the float model's (random weights: the real model's
  activations differ, so quote it as such);
- `compile`: per model, compile time (its first compiled call) and the speedup of the compiled calls over eager.
No network: the model is built in memory. A configuration that fails prints its error and the run goes on.

    python bench/quant.py                                   # CPU: 512² steps, 256² compile (≈8 min on 2 cores)
    python bench/quant.py --device cuda --sizes 512 1024 --compile-sizes 1024
"""
from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import time
import traceback
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F

from core import cpu_name
from pixart.compile import COMPILE_MODES, compile_model
from pixart.cli import DTYPES
from pixart.configs import PRESETS, TransformerConfig
from pixart.hardware import cpu_flags, default_dtype, set_threads
from pixart.models.transformer import PixArtTransformer2DModel
from pixart.quant_dynamic import DynamicSpec, dynamic_kernel, weight_max
from pixart.weights.files import Lazy

CONFIG = PRESETS["PixArt-XL-2-1024-MS"]


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    if device.type == "cuda":
        return {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    isa = sorted((cpu_flags() or set()) & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16"})
    return {"device": cpu_name(), "isa": isa, "threads": torch.get_num_threads(), "torch": torch.__version__}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def once(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, output) of one call."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def take_turns(models: dict[str, Callable[[], Any]], rounds: int,
               device: torch.device) -> dict[str, tuple[list[float], Any] | Exception]:
    """Call the models in turn, `rounds` times, so that a shared machine's load falls on all alike.

    label -> (the seconds of each call, the last output), or the error its first failing call raised."""
    out: dict[str, Any] = {label: ([], None) for label in models}
    for _ in range(rounds):
        for label, fn in models.items():
            if isinstance(out[label], Exception):
                continue
            try:
                seconds, output = once(fn, device)
            except Exception as e:  # reported in its row
                out[label] = e
                continue
            out[label] = (out[label][0] + [seconds], output)
    return out


def result(turn: tuple[list[float], Any] | Exception) -> tuple[list[float], Any]:
    """A take_turns entry, or its error raised."""
    if isinstance(turn, Exception):
        raise turn
    return turn


def emit(row: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Print `row` completed by fn(), or by the error it raised."""
    try:
        row.update(fn())
    except Exception as e:  # one failing configuration (a missing kernel, memory) must not end the run
        row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        traceback.print_exc()
    print(json.dumps(row), flush=True)
    return row


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def linear_kernels(device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """kernel name -> y = f(x) for one XL-sized MLP layer."""
    torch.manual_seed(0)
    w, b = torch.randn(4608, 1152, device=device) * 0.02, torch.randn(4608, device=device)
    wd, bd = w.to(dtype), b.to(dtype)
    kernels: dict[str, Callable] = {f"float ({str(dtype).split('.')[1]})": lambda x: F.linear(x, wd, bd)}

    def dynamic(format: str, kernel: str) -> Callable:
        spec = DynamicSpec(format, 63.0 if kernel == "onednn" else None)
        layer = spec.linear(1152, 4608, bias=True).to(device)
        for key, t in {**layer.quantize(w, torch.float32), "bias": b}.items():
            setattr(layer, key, torch.nn.Parameter(t.to(device), requires_grad=False))
        layer.kernel = kernel
        return layer

    if device.type == "cpu":
        kernels["int8 oneDNN (7-bit weights)"] = dynamic("int8", "onednn")
        kernels["int8 _int_mm"] = dynamic("int8", "int_mm")
        with warnings.catch_warnings():  # its quantized-tensor API is deprecated: measured for reference only
            warnings.simplefilter("ignore")
            fbgemm = torch.ao.nn.quantized.dynamic.Linear(1152, 4608)
            fbgemm.set_weight_bias(torch.quantize_per_channel(w, w.abs().amax(1).double() / 127,
                                                              torch.zeros(4608, dtype=torch.long), 0, torch.qint8), b)
        kernels["int8 fbgemm dynamic (deprecated)"] = fbgemm
    else:
        kernels["int8 _int_mm"] = dynamic("int8", "int_mm")
        kernels["fp8 _scaled_mm"] = dynamic("fp8", "scaled_mm")
    return kernels


def bench_linear(device: torch.device, dtype: torch.dtype, repeats: int, info: dict) -> None:
    M, K, N = 2048, 1152, 4608
    x = torch.randn(M, K, device=device).to(dtype)
    kernels = linear_kernels(device, dtype)
    reference = next(iter(kernels.values()))(x)
    # without VNNI `_int_mm` has no fast CPU kernel, and without AVX512-BF16 bf16 is emulated: seconds per call,
    # so those are timed apart, twice
    no_int8_dot = dynamic_kernel("int8", device) != "int_mm"
    slow = {name for name in kernels if device.type == "cpu" and (
        ("_int_mm" in name and no_int8_dot) or (dtype == torch.bfloat16 and "float" in name))}
    turns = take_turns({n: functools.partial(fn, x) for n, fn in kernels.items() if n not in slow}, repeats + 1, device)
    turns.update(take_turns({n: functools.partial(kernels[n], x) for n in slow}, 2, device))
    for name in kernels:
        def run(name=name):
            times, out = result(turns[name])
            seconds = statistics.median(times[1:])
            return {"ms": round(seconds * 1e3, 2), "tops": round(2 * M * K * N / seconds / 1e12, 4),
                    "cosine": round(cosine(out, reference), 7)}

        emit({"bench": "linear", "kernel": name, "shape": [M, K, N], **info}, run)


def model_inputs(size: int, device: torch.device, dtype: torch.dtype) -> tuple:
    g = torch.Generator().manual_seed(0)
    side = size // 8
    x = torch.randn(2, 4, side, side, generator=g).to(device, dtype)
    y = torch.randn(2, 120, 4096, generator=g).to(device, dtype)
    mask = torch.ones(2, 120, device=device)
    mask[:, 20:] = 0
    t = torch.tensor([500.0, 500.0], device=device)
    res = torch.tensor([[size, size]], device=device, dtype=dtype).expand(2, 2)
    ar = torch.ones(2, 1, device=device, dtype=dtype)
    return x, t, y, mask, res, ar


def build(config: TransformerConfig, device: torch.device,
          dtype: torch.dtype) -> tuple[PixArtTransformer2DModel, dict[str, torch.Tensor]]:
    """The float model (torch's default initialisation) and its fp32 state on the CPU."""
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(config).eval()
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return model.to(device, dtype), state


def quantized(config: TransformerConfig, state: dict[str, torch.Tensor], name: str, device: torch.device,
              dtype: torch.dtype) -> PixArtTransformer2DModel:
    """The same weights quantized while loading, as from a file."""
    tensors = {k: Lazy(lambda v=v: v, v.shape) for k, v in state.items()}
    return PixArtTransformer2DModel.from_state(config, tensors, "random XL", dtype, device, quantization=name)


def model_bytes(model: torch.nn.Module) -> float:
    return round(sum(t.nbytes for t in model.state_dict().values()) / 2**30, 3)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="the float baseline (default: pixart's for the device; bf16 where it is native)")
    parser.add_argument("--layers", type=int, default=CONFIG.num_layers, help="fewer blocks for a quick try")
    parser.add_argument("--sizes", type=int, nargs="*", default=[512])
    parser.add_argument("--compile-sizes", type=int, nargs="*", default=[256])
    parser.add_argument("--quantizations", nargs="+", default=None, help="default: int8 (CPU); int8 fp8 (CUDA)")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default=None, help="e.g. max-autotune (CUDA)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-linear", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        set_threads()
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    config = CONFIG.replace(num_layers=args.layers)
    names = args.quantizations or (["int8", "fp8"] if device.type == "cuda" else ["int8"])
    info = machine(device)
    info["kernels"] = {n: dynamic_kernel(n, device) for n in names}
    if not args.no_linear:
        bench_linear(device, dtype, max(args.repeats, 3), info)

    model, state = build(config, device, dtype)
    models = {"float": model}
    for name in names:
        def load(name=name, state=state):
            start = time.perf_counter()
            models[name] = quantized(config, state, name, device, dtype)
            return {"load_s": round(time.perf_counter() - start, 2), "weight_max": weight_max(name, device)}

        emit({"bench": "load", "config": name, **info}, load)
    del state
    float_label = f"float {str(dtype).split('.')[1]}"
    for size in args.sizes:
        inputs = model_inputs(size, device, dtype)
        turns = take_turns({label: functools.partial(m, *inputs) for label, m in models.items()}, args.repeats + 1,
                           device)
        for label, m in models.items():
            def step(label=label, m=m):
                times, out = result(turns[label])
                row = {"seconds": round(statistics.median(times[1:]), 3), "weights_gb": model_bytes(m)}
                if label != "float":
                    float_times, float_out = result(turns["float"])
                    row.update(speedup=round(statistics.median(float_times[1:]) / row["seconds"], 3),
                               cosine=round(cosine(out, float_out), 7))
                return row

            emit({"bench": "step", "size": size, "config": label if label != "float" else float_label, **info}, step)

    for size in args.compile_sizes:
        inputs = model_inputs(size, device, dtype)
        calls = {label: functools.partial(m, *inputs) for label, m in models.items()}
        eager = take_turns(calls, args.repeats + 1, device)
        first: dict[str, Any] = {}
        for label, m in models.items():
            if "forward" not in vars(m):
                compile_model(m, device, args.compile_mode)
            first[label] = take_turns({label: calls[label]}, 1, device)[label]  # compiles
        compiled = take_turns(calls, args.repeats, device)
        for label in models:
            def row(label=label):
                (eager_times, eager_out), (times, out) = result(eager[label]), result(compiled[label])
                eager_s, seconds = statistics.median(eager_times[1:]), statistics.median(times)
                return {"compile_s": round(result(first[label])[0][0] - seconds, 1), "eager_s": round(eager_s, 3),
                        "compiled_s": round(seconds, 3), "speedup": round(eager_s / seconds, 3),
                        "cosine_to_eager": round(cosine(out, eager_out), 7)}

            emit({"bench": "compile", "size": size, "config": label if label != "float" else float_label,
                  "mode": args.compile_mode, **info}, row)
    peak = {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if device.type == "cuda":
        peak["peak_vram_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps({"bench": "peak", **peak, **info}), flush=True)


if __name__ == "__main__":
    main()
