"""Where a 1024² generation's GPU time goes: pixart's transformer step and VAE decode on CUDA, one JSON line each.

Real-size random weights (bench/core.py's cache), bf16 (--dtype), batch 2 (one guided step). Milliseconds between
CUDA events, the median of --runs after warm-ups:
- `attention`: one self-attention call (B 2, 16 heads, 4096 tokens of 72) and one cross-attention call (120 caption
  tokens with a padding bias) per SDPA backend, as `sdpa_kernel` picks it first (the others as fallbacks);
- `step`: the transformer eager with pixart's backend order (`eager_ms`: cuDNN first, pixart.models.layers), with
  PyTorch's own order and with each backend first, and compiled (inductor, default mode; `compile_s` is its first
  call);
- `kernels`: the eager step's GPU time by kernel family (matrix products, attention, the rest) from torch.profiler,
  and its largest kernels;
- `decode`: the VAE decoder at 1024², eager, channels_last, and compiled.

    python bench/profile_cuda.py
    python bench/profile_cuda.py --size 512 --runs 10
    python bench/profile_cuda.py --size 256 --runs 1 --dtype fp32      # on a CPU: a smoke test of the script
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core import CACHE, build_cache  # noqa: E402

from pixart.models import layers  # noqa: E402
from pixart.models.transformer import PixArtTransformer2DModel  # noqa: E402
from pixart.models.vae import AutoencoderKL  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def first(name: str):
    """SDPA with backend `name` tried first and the others after it (a backend that refuses the inputs falls back)."""
    order = [BACKENDS[name]] + [b for n, b in BACKENDS.items() if n != name]
    return sdpa_kernel(order, set_priority=True)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_ms(fn, runs: int, warmup: int = 3) -> float:
    """Median milliseconds of one call between CUDA events (on a CPU, the wall clock's: a smoke test of this script)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if not torch.cuda.is_available():
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return round(statistics.median(times), 3)


def attempt(fn):
    """fn()'s value, or its error as a string: one failing configuration does not end the run."""
    try:
        return fn()
    except Exception as error:  # CUDA, SDPA and compiler errors share no type
        return f"error: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def family(name: str) -> str:
    low = name.lower()
    if any(s in low for s in ("flash", "fmha", "attention", "cudnn_generated", "sdpa")):
        return "attention"
    if any(s in low for s in ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "matmul")):
        return "matmul"
    return "other"


def kernel_families(step) -> dict:
    """GPU milliseconds of one call of `step` by kernel family, and its largest kernels (torch.profiler)."""
    activities = torch.profiler.ProfilerActivity
    with torch.profiler.profile(activities=[activities.CUDA if torch.cuda.is_available() else activities.CPU]) as prof:
        for _ in range(3):
            step()
        synchronize()
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_time_total > 0:
            kernels[event.key] = kernels.get(event.key, 0.0) + event.device_time_total / 3 / 1000
    families: dict[str, float] = {}
    for name, ms in kernels.items():
        families[family(name)] = families.get(family(name), 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    return {"ms_by_family": {k: round(v, 2) for k, v in families.items()},
            "top_ms": [[name[:90], round(ms, 3)] for name, ms in top]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, choices=[256, 512, 1024])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    args = parser.parse_args()
    build_cache()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    g = torch.Generator().manual_seed(0)
    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else "none (a CPU smoke test)"
    common = {"gpu": gpu, "torch": torch.__version__, "size": args.size, "dtype": args.dtype}
    torch.inference_mode().__enter__()

    q, k, v = (torch.randn(2, 16, (args.size // 16) ** 2, 72, generator=g).to(dev, dtype) for _ in range(3))
    kc, vc = (torch.randn(2, 16, 120, 72, generator=g).to(dev, dtype) for _ in range(2))
    bias = torch.zeros(2, 1, 1, 120, device=dev, dtype=dtype)
    bias[..., 20:] = -10000.0
    for name in BACKENDS:
        def self_attn():
            with first(name):
                return F.scaled_dot_product_attention(q, k, v)

        def cross_attn():
            with first(name):
                return F.scaled_dot_product_attention(q, kc, vc, attn_mask=bias)
        print(json.dumps({"part": "attention", "backend_first": name, **common,
                          "self_ms": attempt(lambda: cuda_ms(self_attn, args.runs)),
                          "cross_ms": attempt(lambda: cuda_ms(cross_attn, args.runs))}), flush=True)

    latent = args.size // 8
    model = PixArtTransformer2DModel.from_pretrained(CACHE / f"transformer-{args.size}", torch_dtype=dtype,
                                                     device=dev)
    x = torch.randn(2, 4, latent, latent, generator=g).to(dev, dtype)
    y = torch.randn(2, 120, 4096, generator=g).to(dev, dtype)
    mask = torch.ones(2, 120, dtype=torch.long, device=dev)
    mask[:, 20:] = 0
    t = torch.tensor([999, 999], device=dev)
    conds = {"resolution": torch.tensor([[args.size] * 2] * 2, dtype=dtype, device=dev),
             "aspect_ratio": torch.ones(2, 1, dtype=dtype, device=dev)} if model.config.micro_conditions else {}
    step = lambda: model(x, t, y, mask, **conds)  # noqa: E731
    row = {"part": "step", **common, "eager_ms": cuda_ms(step, args.runs)}  # pixart's order (layers.CUDA_ORDER)
    ours, layers.CUDA_ORDER = layers.CUDA_ORDER, None  # from here the order set around the step rules
    row["pytorch_order_ms"] = cuda_ms(step, args.runs)
    for name in ("flash", "efficient", "cudnn"):
        def backend_step():
            with first(name):
                return step()
        row[f"{name}_first_ms"] = attempt(lambda: cuda_ms(backend_step, args.runs))
    layers.CUDA_ORDER = ours
    print(json.dumps(row), flush=True)

    report = attempt(lambda: kernel_families(step))
    print(json.dumps({"part": "kernels", **common, **(report if isinstance(report, dict) else {"error": report})}),
          flush=True)

    compiled = torch.compile(model.run_blocks, dynamic=False)
    original = model.run_blocks
    model.run_blocks = compiled
    start = time.perf_counter()
    row = {"part": "step-compiled", **common}
    row["compile_s"] = attempt(lambda: (step(), synchronize(), round(time.perf_counter() - start, 1))[2])
    row["compiled_ms"] = attempt(lambda: cuda_ms(step, args.runs))
    row["eager_ms"] = (setattr(model, "run_blocks", original), cuda_ms(step, args.runs))[1]
    print(json.dumps(row), flush=True)
    del model, compiled

    vae = AutoencoderKL.from_pretrained(CACHE / "vae", torch_dtype=dtype).to(dev).eval()
    z = torch.randn(1, 4, latent, latent, generator=g).to(dev, dtype)
    decode = lambda: vae.decode(z, return_dict=False)[0]  # noqa: E731
    row = {"part": "decode", **common, "eager_ms": cuda_ms(decode, 5, warmup=2)}
    vae.to(memory_format=torch.channels_last)
    row["channels_last_ms"] = attempt(lambda: cuda_ms(decode, 5, warmup=2))
    vae.to(memory_format=torch.contiguous_format)
    vae.decoder = torch.compile(vae.decoder, dynamic=False)
    start = time.perf_counter()
    row["compile_s"] = attempt(lambda: (decode(), synchronize(), round(time.perf_counter() - start, 1))[2])
    row["compiled_ms"] = attempt(lambda: cuda_ms(decode, 5, warmup=2))
    if dev.type == "cuda":
        row["peak_vram_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
