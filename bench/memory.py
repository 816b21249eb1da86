"""Peak RSS and time of a whole generation at the real PixArt-α sizes (random weights), per memory configuration.

Builds once, on disk, a full-size pipeline folder with random weights (bench/folders.py). Then each
configuration runs one generation in a fresh process under /usr/bin/time -v (peak RSS counts every touched
page, file-backed ones included) and prints one JSON line.

    python bench/memory.py                                   # 1024², 2 steps, every configuration
    python bench/memory.py --size 256 --steps 1 --configs pixart-staged diffusers
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time

import torch

from folders import pipeline_folder

PROMPT = "A small cactus with a happy face in the Sahara desert."
CONFIGS = {  # name -> (engine, dtype, memory, text-encoder quantization)
    "pixart-full": ("pixart", "bf16", "full", None),
    "pixart-staged": ("pixart", "bf16", "staged", None),
    "pixart-int8-staged": ("pixart", "bf16", "staged", "int8"),
    "pixart-int4-staged": ("pixart", "bf16", "staged", "int4"),
    "diffusers": ("diffusers", "bf16", None, None),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class StagePeaks(logging.Handler):
    """Peak RSS per stage of one pixart generation: the stage changes when the pipeline logs that it loads the
    transformer (encoding done) and the VAE (denoising done); the kernel's peak (VmHWM) is reset at each change."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.stage, self.peaks = "encode", {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message in ("loading transformer", "loading vae"):
            self.switch("denoise" if message.endswith("transformer") else "decode")

    def switch(self, stage: str | None) -> None:
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        self.peaks[f"{self.stage}_stage_peak_rss_gb"] = round(int(status["VmHWM"].split()[0]) / 2**20, 2)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        self.stage = stage


def worker(config: str, size: int, steps: int, dtype_override: str | None) -> dict:
    """One generation with `config`, in this (fresh) process; returns the seconds it took and, staged, the peak RSS
    of each stage."""
    engine, dtype, memory, quant = CONFIGS[config]
    dtype = dtype_override or dtype
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    start = time.perf_counter()
    kwargs = dict(num_inference_steps=steps, height=size, width=size, output_type="np",
                  generator=torch.Generator().manual_seed(0))
    stages = StagePeaks()
    if engine == "pixart":
        import pixart

        if memory == "staged":  # full mode loads every model up front: no stages to tell apart
            logging.getLogger("pixart").addHandler(stages)
            logging.getLogger("pixart").setLevel(logging.INFO)

        extra = {"text_encoder_quantization": quant} if quant else {}
        pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_folder(), torch_dtype=DTYPES[dtype], memory=memory, **extra)
    else:
        from diffusers import PixArtAlphaPipeline

        pipe = PixArtAlphaPipeline.from_pretrained(pipeline_folder(), torch_dtype=DTYPES[dtype])
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPT, **kwargs).images
    assert image.shape == (1, size, size, 3)
    if memory == "staged":
        stages.switch(None)
    return {"seconds": round(time.perf_counter() - start, 1), "finite": bool((image == image).all()), **stages.peaks}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="compute dtype for every configuration (default: each one's own, bf16); fp32 where "
                             "the CPU has no native bf16 and bf16 would take hours")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.size, args.steps, args.dtype)))
        return
    pipeline_folder()
    for config in args.configs:
        cmd = ["/usr/bin/time", "-v", sys.executable, __file__, "--worker", config, "--size", str(args.size),
               "--steps", str(args.steps)] + (["--dtype", args.dtype] if args.dtype else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        result = {"config": config, "dtype": args.dtype or CONFIGS[config][1], "size": f"{args.size}x{args.size}",
                  "steps": args.steps, "rc": proc.returncode,
                  "peak_rss_gb": round(int(rss.group(1)) / 2**20, 2) if rss else None}
        lines = proc.stdout.strip().splitlines()
        if proc.returncode == 0 and lines:
            result.update(json.loads(lines[-1]))
            # the stage resets clear the peak /usr/bin/time reads as well: the whole run's is the highest stage's
            stage_peaks = [value for key, value in result.items() if key.endswith("_stage_peak_rss_gb")]
            result["peak_rss_gb"] = max([result["peak_rss_gb"] or 0, *stage_peaks])
        else:
            own = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("\t")]
            result["error"] = own[-1][:300] if own else "no output"  # the last line that is not /usr/bin/time's
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
