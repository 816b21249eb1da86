"""Transformer step and VAE decode at the real PixArt-XL-2 sizes (random weights): pixart vs diffusers.

One JSON line per configuration: median seconds over repeats (warm-up excluded), peak RSS of the process that
ran it, and the ratio diffusers / pixart measured in the same run. Each (engine, part, size) runs in a fresh
process so peak RSS is its own. The random-weight folders are built once under bench/_cache.

    python bench/core.py                                  # 256, 512, 1024 steps + 512 decode, machine default dtype
    python bench/core.py --dtype fp32 --sizes 256 512 --repeats 3
    python bench/core.py --sizes 512 --decode-sizes --interleaved   # both engines in one process, in turn
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

from pixart.cli import DTYPES
from pixart.hardware import keep_freed_memory

CACHE = Path(__file__).resolve().parent / "_cache"
SAMPLE_SIZE = {256: 32, 512: 64, 1024: 128}


def build_cache() -> None:
    """Random XL-2 transformers (1024-MS with micro-conditions, 512) and an sd-vae-sized VAE, saved by diffusers."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel

    for size in (1024, 512):
        folder = CACHE / f"transformer-{size}"
        if not (folder / "config.json").is_file():
            torch.manual_seed(0)
            PixArtTransformer2DModel(sample_size=SAMPLE_SIZE[size], caption_channels=4096).save_pretrained(folder)
    link = CACHE / "transformer-256"
    if not link.exists():
        link.mkdir(parents=True)
        cfg = json.loads((CACHE / "transformer-512" / "config.json").read_text())
        cfg.update(sample_size=32, interpolation_scale=0.5)
        (link / "config.json").write_text(json.dumps(cfg))
        (link / "diffusion_pytorch_model.safetensors").symlink_to(
            CACHE / "transformer-512" / "diffusion_pytorch_model.safetensors")
    vae = CACHE / "vae"
    if not (vae / "config.json").is_file():
        torch.manual_seed(0)
        AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=512).save_pretrained(vae)


def worker(engine: str, part: str, size: int, dtype_name: str, repeats: int, threads: int, device: str) -> dict:
    """Load one model from the cache with `engine` and time `repeats` calls after a warm-up."""
    torch.set_num_threads(threads)
    call = model_call(engine, part, size, DTYPES[dtype_name], device)
    # as pixart's pipeline runs its steps and decodes on a CPU: freed large blocks stay in the heap for the next ones
    kept = keep_freed_memory() if engine == "pixart" and device == "cpu" else nullcontext()
    with torch.inference_mode(), kept:
        times, out = timed(lambda warm_up: call(), repeats, device)
    assert torch.isfinite(out).all()
    peak = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.startswith("cuda"):
        peak["peak_vram_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return {**times, **peak}


def interleaved(part: str, size: int, dtype_name: str, repeats: int, threads: int, device: str) -> dict:
    """Both engines' models in this one process, called in turn (diffusers, pixart, diffusers, ...) after a warm-up
    each: the ratio of their medians is free of the drift between two processes run minutes apart. The models
    alone: without the allocator setting pixart's pipeline steps and decodes in (pixart.hardware.keep_freed_memory),
    which would speed both engines in one process."""
    torch.set_num_threads(threads)
    calls = {engine: model_call(engine, part, size, DTYPES[dtype_name], device) for engine in ("diffusers", "pixart")}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    wall: dict[str, list[float]] = {engine: [] for engine in calls}
    with torch.inference_mode():
        for call in calls.values():
            call()
        for _ in range(repeats):
            for engine, call in calls.items():
                sync()
                start = time.perf_counter()
                call()
                sync()
                wall[engine].append(time.perf_counter() - start)
    return {f"{engine}_seconds": statistics.median(times) for engine, times in wall.items()}


def model_call(engine: str, part: str, size: int, dtype: torch.dtype, device: str):
    """A no-argument call of one transformer step (batch 2) or VAE decode of `engine`'s cached model."""
    latent = size // 8
    g = torch.Generator().manual_seed(0)
    if part == "step":
        folder = CACHE / f"transformer-{size}"
        x = torch.randn(2, 4, latent, latent, generator=g, device="cpu").to(device, dtype)  # batch 2 = one CFG step
        y = torch.randn(2, 120, 4096, generator=g, device="cpu").to(device, dtype)
        mask = torch.ones(2, 120, dtype=torch.long, device=device)
        mask[:, 20:] = 0  # a 20-token prompt padded to 120
        t = torch.tensor([999, 999], device=device)
        res = torch.tensor([[size, size]] * 2, dtype=dtype, device=device)
        ar = torch.ones(2, 1, dtype=dtype, device=device)
        if engine == "pixart":
            from pixart.models.transformer import PixArtTransformer2DModel

            model = PixArtTransformer2DModel.from_pretrained(folder, torch_dtype=dtype, device=device)
            conds = {"resolution": res, "aspect_ratio": ar} if model.config.micro_conditions else {}
            call = lambda: model(x, t, y, mask, **conds)  # noqa: E731
        else:
            from diffusers import PixArtTransformer2DModel

            model = PixArtTransformer2DModel.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
            conds = {"resolution": res, "aspect_ratio": ar} if model.config.sample_size == 128 else {}
            call = lambda: model(x, encoder_hidden_states=y, encoder_attention_mask=mask, timestep=t,  # noqa: E731
                                 added_cond_kwargs=conds or {"resolution": None, "aspect_ratio": None},
                                 return_dict=False)[0]
    else:
        z = torch.randn(1, 4, latent, latent, generator=g, device="cpu").to(device, dtype)
        if engine == "pixart":
            from pixart.models.vae import AutoencoderKL
        else:
            from diffusers import AutoencoderKL
        model = AutoencoderKL.from_pretrained(CACHE / "vae", torch_dtype=dtype).to(device).eval()
        call = lambda: model.decode(z, return_dict=False)[0]  # noqa: E731
    return call


def timed(call, repeats: int, device: str) -> tuple[dict[str, float], object]:
    """Medians of `repeats` calls after a warm-up: wall seconds, and this process's CPU seconds (all its threads,
    which other processes on a busy machine do not inflate); the warm-up's seconds (compiling, if any); and the last
    call's result. call(warm_up: bool)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    start = time.perf_counter()
    out = call(True)
    sync()
    warm_up = time.perf_counter() - start
    wall, cpu = [], []
    for _ in range(repeats):
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        out = call(False)
        sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"seconds": statistics.median(wall), "cpu_seconds": statistics.median(cpu), "warmup_seconds": warm_up}, out


def main() -> None:
    parser = argparse.ArgumentParser()
    default_dtype = "bf16" if _native_bf16() else "fp32"
    parser.add_argument("--dtype", choices=list(DTYPES), default=default_dtype)
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 512, 1024], help="step sizes (none: no steps)")
    parser.add_argument("--decode-sizes", type=int, nargs="*", default=[512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--interleaved", action="store_true", help="both engines in one process, called in turn "
                        "(steadier ratios; no per-engine peak memory)")
    parser.add_argument("--worker", nargs=3, metavar=("ENGINE", "PART", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        engine, part, size = args.worker
        run = interleaved if engine == "both" else partial(worker, engine)
        print(json.dumps(run(part, int(size), args.dtype, args.repeats, args.threads, args.device)))
        return
    build_cache()
    jobs = [("step", s) for s in args.sizes] + [("decode", s) for s in args.decode_sizes]
    for part, size in jobs:
        result = {"part": part, "size": f"{size}x{size}", "dtype": args.dtype, "device": args.device,
                  "threads": args.threads,
                  "batch": 2 if part == "step" else 1}
        for engine in ("both",) if args.interleaved else ("diffusers", "pixart"):
            cmd = [sys.executable, __file__, "--worker", engine, part, str(size), "--dtype", args.dtype,
                   "--repeats", str(args.repeats), "--threads", str(args.threads), "--device", args.device]
            out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            if engine == "both":
                seconds = {f"{e}_s": round(out[f"{e}_seconds"], 3) for e in ("diffusers", "pixart")}
                result.update(interleaved=True, **seconds)
                continue
            result[f"{engine}_s"] = round(out["seconds"], 3)
            result.update({f"{engine}_{k}": round(v, 2) for k, v in out.items() if k != "seconds"})
        result["speedup"] = round(result["diffusers_s"] / result["pixart_s"], 3)
        print(json.dumps(result), flush=True)


def _native_bf16() -> bool:
    from pixart.hardware import cpu_has_fast_bf16

    return cpu_has_fast_bf16()


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), which the figures must be quoted with."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")


if __name__ == "__main__":
    main()
