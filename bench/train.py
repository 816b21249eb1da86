"""Training throughput and peak memory at the real XL-2 size (random init), per precision and checkpointing.

Writes a features folder of random T5-sized captions and 4-channel latents once, then runs each configuration in a
fresh process: the real `Trainer` (AdamW, EMA, clipping, the hybrid loss), warm-up steps, then timed steps. Prints
one JSON line per configuration: samples/s and seconds per step (median of the timed steps), the process's peak
RSS (ru_maxrss, the figure /usr/bin/time -v reports) and on a GPU the CUDA allocator's peak.

    python bench/train.py                                   # 256², batch 2, fp32 / bf16 × checkpointing off / on
    python bench/train.py --batch-size 1 --steps 1 --warmup 0   # the quick CPU run (emulated bf16 is slow)
    python bench/train.py --device cuda --size 512 --batch-size 8 --steps 5
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIGS = {"fp32": ("no", False), "fp32-ckpt": ("no", True), "bf16": ("bf16", False), "bf16-ckpt": ("bf16", True)}


def write_inputs(folder: Path, items: int, size: int, tokens: int) -> None:
    """A features folder of `items` random size×size items with `tokens`-token captions, and an XL-2 config."""
    from pixart.configs import PRESETS

    (folder / "shards").mkdir(parents=True)
    (folder / "items").mkdir()
    latent = size // 8
    tensors, lines = {}, []
    for i in range(items):
        key = f"{i:04d}"
        tensors[f"{key}/caption"] = torch.randn(tokens, 4096, dtype=torch.bfloat16)
        tensors[f"{key}/mean"], tensors[f"{key}/std"] = torch.randn(4, latent, latent), torch.rand(4, latent, latent)
        lines.append({"id": key, "prompt": "random", "height": size, "width": size, "bucket": [size, size],
                      "shard": "shards/rank0-00000.safetensors", "tokens": tokens})
    save_file(tensors, folder / "shards" / "rank0-00000.safetensors")
    save_file({"caption": torch.randn(1, 4096), "mask": torch.ones(1, dtype=torch.int64)}, folder / "null.safetensors")
    (folder / "items" / "rank0.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / "index.json").write_text(json.dumps({
        "format": "pixart-features", "version": 1, "max_length": 120, "caption_dim": 4096, "latent_channels": 4,
        "vae_scale_factor": 8, "scaling_factor": 0.18215, "resolution": size, "model": "random", "encoder": "random"}))
    PRESETS["PixArt-XL-2-256x256"].replace(sample_size=latent).save(folder / "config.json")


def worker(args: argparse.Namespace) -> None:
    """Build the Trainer, run --warmup + --steps steps, print the timings as one JSON line."""
    from pixart.train.loop import TrainOptions, Trainer

    precision, checkpointing = CONFIGS[args.worker]
    started = time.perf_counter()
    trainer = Trainer(TrainOptions(
        features=str(args.folder), output=str(args.folder / f"out-{args.worker}"), config=str(args.folder / "config.json"),
        batch_size=args.batch_size, max_steps=args.warmup + args.steps, mixed_precision=precision,
        gradient_checkpointing=checkpointing, device=args.device))
    built = time.perf_counter() - started
    times = []
    for _ in range(args.warmup + args.steps):
        batch = trainer.next_batch()
        t0 = time.perf_counter()
        trainer.step(batch)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[args.warmup:])
    result = {"config": args.worker, "device": str(trainer.device), "size": args.size, "batch": args.batch_size,
              "threads": torch.get_num_threads(), "build_s": round(built, 1), "warmup_steps": args.warmup,
              "step_s": round(step_s, 3), "samples_per_s": round(args.batch_size / step_s, 3)}
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB on Linux
    if trainer.device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
        result["cuda_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256: 32×32 latents)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--tokens", type=int, default=20, help="caption tokens per item (default 20)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_inputs(folder, args.batch_size, args.size, args.tokens)
        for name in args.configs:
            cmd = [sys.executable, __file__, "--worker", name, "--folder", str(folder),
                   "--size", str(args.size), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                   "--warmup", str(args.warmup),
                   "--device", args.device]
            done = subprocess.run(cmd, capture_output=True, text=True)
            found = re.search(r"^RESULT (.*)$", done.stdout, re.M)
            if done.returncode or not found:
                print(json.dumps({"config": name, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}), flush=True)
                continue
            print(found.group(1), flush=True)


if __name__ == "__main__":
    main()
