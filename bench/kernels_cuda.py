"""The Triton row quantization (pixart/triton_kernels.py) and DynamicLinear with it, on a CUDA GPU, per linear size.

One JSON line per (M, K, N), bf16 activations with outlier channels:
- `agreement`: the kernel's values and scales against quant_dynamic.quantize_rows (int8: equal integers; fp8: equal
  bytes; scales: largest relative difference);
- `us`: µs per call between CUDA events, median of --runs after a warm-up, each call timed alone (a host-bound call
  counts its launches); `host_us`: host µs per call of --runs calls queued without synchronizing; `vs_bf16`: `us`
  over bf16 F.linear's. Calls: bf16 F.linear; int8 and fp8 DynamicLinear with the Triton kernel (`_triton`) and
  without it (`_old`: int8 quantizes with the torch.compile'd quantize_rows, fp8 with the eager one; both pass the
  bias to the GEMM alike); the quantization alone (Triton, eager, and int8's compiled one);
- `rel_err_vs_bf16`: ‖y - y_bf16‖ / ‖y_bf16‖ of each DynamicLinear output.
A call that fails reports its error in its place and the run goes on; past --deadline seconds the rest is skipped.
Runs from a checkout without installing the package:

    python bench/kernels_cuda.py                  # M 8192 (1024², batch 2) and 240 (a prompt's 120 tokens, batch 2)
    python bench/kernels_cuda.py --rows 2048 --runs 100
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pixart import quant_dynamic, triton_kernels  # noqa: E402
from pixart.quant_dynamic import DynamicSpec, fused, quantize_rows, unfused  # noqa: E402

SIZES = [(1152, 1152), (1152, 4608), (4608, 1152)]  # (K, N) of PixArt-XL-2: attention projections, MLP up, MLP down
WARMUP = 10


def device_us(fn, runs: int) -> float:
    """Median µs per call between CUDA events."""
    for _ in range(WARMUP):
        fn()
    events = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) * 1000 for start, end in events)


def host_us(fn, runs: int) -> float:
    """Host µs per call of `runs` calls queued without synchronizing."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / runs * 1e6


def without_triton():
    """DynamicLinear's path where triton is missing."""
    return mock.patch.object(quant_dynamic.triton_kernels, "available", lambda device: False)


def guarded(fn):
    """fn's value, or its error as a string: one failure must not hide the other measurements."""
    try:
        return fn()
    except Exception as error:  # reported in the JSON line, whatever its type
        return f"error: {type(error).__name__}: {error}"[:300]


def dynamic_linear(format: str, w: torch.Tensor, bias: torch.Tensor) -> quant_dynamic.DynamicLinear:
    layer = DynamicSpec(format).linear(w.shape[1], w.shape[0], bias=True)
    for key, t in {**layer.quantize(w, torch.bfloat16), "bias": bias}.items():
        setattr(layer, key, torch.nn.Parameter(t, requires_grad=False))
    return layer.cuda()


def agreement(x: torch.Tensor, format: str) -> dict:
    (q, scale), (q_ref, scale_ref) = triton_kernels.quantize_rows(x, format), quantize_rows(x, format)
    codes = (lambda t: t.view(torch.uint8).int()) if format == "fp8" else (lambda t: t.int())
    diff = (codes(q) - codes(q_ref)).abs()
    return {"values_differing": int((diff > 0).sum()), "max_code_diff": int(diff.max()),
            "scale_max_rel_diff": float(((scale - scale_ref).abs() / scale_ref).max())}


def configuration(M: int, K: int, N: int, runs: int, deadline: float) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g)
    x[:, torch.randint(0, K, (K // 100,), device="cuda", generator=g)] *= 20  # outlier channels, as in activations
    x = x.to(torch.bfloat16)
    w = (torch.randn(N, K, device="cuda", generator=g) * K**-0.5).to(torch.bfloat16)
    bias = (torch.randn(N, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    row = {"bench": "linear", "M": M, "K": K, "N": N,
           "agreement": {f: guarded(lambda: agreement(x, f)) for f in ("int8", "fp8")}}
    calls = {"bf16_linear": lambda: F.linear(x, w, bias)}
    for f in ("int8", "fp8"):
        layer = guarded(lambda: dynamic_linear(f, w, bias))
        if isinstance(layer, str):
            row[f"{f}_layer"] = layer
            continue
        calls[f"{f}_triton"] = calls[f"{f}_old"] = lambda layer=layer: layer(x)  # `_old` runs without triton
        calls[f"{f}_quantize_triton"] = lambda f=f: triton_kernels.quantize_rows(x, f)
        calls[f"{f}_quantize_eager"] = lambda f=f: unfused(quantize_rows)(x, f)
        if f == "int8":
            calls[f"{f}_quantize_compiled"] = lambda f=f: fused(quantize_rows)(x, f)
    reference = F.linear(x, w, bias).float()
    us, host, error = {}, {}, {}
    for name, fn in calls.items():
        if time.perf_counter() > deadline:
            us[name] = "skipped: past the deadline"
            continue
        with without_triton() if name.endswith("_old") else contextlib.nullcontext():
            us[name] = guarded(lambda: round(device_us(fn, runs), 1))
            host[name] = guarded(lambda: round(host_us(fn, runs), 1))
            if name.endswith(("_triton", "_old")) and "quantize" not in name:
                error[name] = guarded(lambda: float((fn().float() - reference).norm() / reference.norm()))
    row.update(us=us, host_us=host, rel_err_vs_bf16=error)
    if isinstance(us.get("bf16_linear"), float):
        row["vs_bf16"] = {k: round(v / us["bf16_linear"], 2) for k, v in us.items() if isinstance(v, float)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[8192, 240], help="token counts M")
    parser.add_argument("--runs", type=int, default=50, help="timed calls per measurement")
    parser.add_argument("--deadline", type=float, default=80, help="seconds after which measurements are skipped")
    args = parser.parse_args()
    start = time.perf_counter()
    print(json.dumps({"bench": "machine", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "triton": guarded(lambda: __import__("triton").__version__),
                      "triton_available": triton_kernels.available("cuda")}), flush=True)
    for M in args.rows:
        for K, N in SIZES:
            row = guarded(lambda: configuration(M, K, N, args.runs, start + args.deadline))
            print(json.dumps(row if isinstance(row, dict) else {"bench": "linear", "M": M, "K": K, "N": N,
                                                                "error": row}), flush=True)
    print(json.dumps({"bench": "total", "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
