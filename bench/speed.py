"""Seconds per part and per image, pixart against diffusers in the same run, one JSON line per configuration.

Real-size random weights (bench/folders.py; the same files for both engines), each measurement in a fresh process,
a warm-up call excluded, the median of --repeats. Parts: "text" (T5-XXL encoding a prompt and the empty negative
prompt), "step" and "decode" (one batch-2 transformer call and one VAE decode, by bench/core.py), and "image": a
whole generation of --steps from T5 embeddings (add the text row for the end-to-end time), once per option:
default, guidance interval, step caching at three settings, int8 (and fp8 on CUDA) transformers alone and with
both, and `steps-N` (plain sampling with N steps, to compare with a cache's work). Image rows give the PSNR to
pixart's default image (the default row: to diffusers' image) and, with caching, how many steps ran the blocks.
Options are pixart's alone: their speedup is against diffusers' default.
`--model demo` measures the options on the demo model instead: the 54 captions with `--demo-seeds` seeds (6 by
default, 324 images: with tests/test_demo.py's 2 seeds, a perturbation of the int8 model by 1e-7 moved int8 + cache
fast from 29.7 to 29.3 dB and its score by 2 images), with the demo classifier's score (random weights say nothing
about image quality); `--model FOLDER` any pipeline
folder (the step and decode rows always time the random real-size models).

    python bench/speed.py                                              # 512² and 1024², 20 steps: hours on a CPU
    python bench/speed.py --sizes 256 --steps 4 --parts image          # minutes
    python bench/speed.py --sizes 512 --parts step decode
    python bench/speed.py --device cuda --sizes 1024 --compile         # diffusers fp16 in the same run
    python bench/speed.py --model demo --steps 14
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import pixart
from core import DTYPES, cpu_name, timed
from folders import pipeline_folder
from pixart.compile import COMPILE_MODES
from pixart.demo import MODEL as DEMO_MODEL
from pixart.demo.shapes import SIZE as DEMO_SIZE
from pixart.demo.shapes import generate_all, labels, score
from pixart.hardware import default_dtype, set_threads
from pixart.quant_dynamic import DYNAMIC_QUANTIZATIONS

INTERVAL = (0.28, 5.42)  # Kynkäänniemi et al.'s SD-XL guidance interval, on σ
# the one window the demo model's images keep (bench/int8_budget.py): no guidance at the first step only (σ ≈ 157)
FIRST_STEP_UNGUIDED = (0.0, 100.0)
# option -> (from_pretrained keywords, __call__ keywords)
OPTIONS = {
    "default": ({}, {}),
    "guidance-interval": ({}, {"guidance_interval": INTERVAL}),
    "cache-fast": ({}, {"cache": "fast"}),
    "cache-faster": ({}, {"cache": "faster"}),
    "cache-fastest": ({}, {"cache": "fastest"}),
}


def device_options(device: str) -> dict[str, tuple[dict, dict]]:
    """int8 (and fp8 on CUDA) transformers, alone, with caching, and with the guidance interval and caching; on CUDA
    the offloaded pipeline (each model on the GPU only while it runs) and CUDA graphs (default and quantized)."""
    rows = {"memory-offload": ({"memory": "offload"}, {}), "cuda-graphs": ({}, {"cuda_graphs": True})} \
        if device.startswith("cuda") else {}
    for q in DYNAMIC_QUANTIZATIONS:
        if q == "int8" or device.startswith("cuda"):
            rows[q] = ({"transformer_quantization": q}, {})
            rows[f"{q}+cache-fast"] = ({"transformer_quantization": q}, {"cache": "fast"})
            if device.startswith("cuda"):
                rows[f"{q}+cuda-graphs"] = ({"transformer_quantization": q}, {"cuda_graphs": True})
            rows[f"{q}+interval+cache-fast"] = ({"transformer_quantization": q},
                                                {"guidance_interval": INTERVAL, "cache": "fast"})
            rows[f"{q}+guidance-first+cache-fast"] = ({"transformer_quantization": q},
                                                      {"guidance_interval": FIRST_STEP_UNGUIDED, "cache": "fast"})
    return rows


def plain_steps(option: str) -> int | None:
    """N for the option "steps-N": the default sampling with N steps instead of --steps (the same work as a cache
    that runs the blocks N times: is reuse better than simply fewer steps?)."""
    prefix, _, n = option.partition("-")
    return int(n) if prefix == "steps" and n.isdigit() and int(n) > 0 else None


def load(engine: str, folder: Path, dtype: torch.dtype, device: str, load_kwargs: dict, part: str, demo: bool):
    """The pipeline of `engine` on `device` with the models `part` needs (the demo model: all of them)."""
    skip = {} if demo else {"transformer": None, "vae": None} if part == "text" else {"text_encoder": None,
                                                                                      "tokenizer": None}
    if engine == "pixart":
        pipe = pixart.PixArtAlphaPipeline.from_pretrained(folder, torch_dtype=dtype, device=device,
                                                          **skip, **{"memory": "full", **load_kwargs})
    else:
        from diffusers import PixArtAlphaPipeline

        pipe = PixArtAlphaPipeline.from_pretrained(folder, torch_dtype=dtype, **skip).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeddings(folder: Path, device: str, dtype: torch.dtype) -> dict:
    """Random T5 embeddings of a 20-token prompt and the empty negative prompt (1 token), as wide as the model reads."""
    width = json.loads((folder / "transformer" / "config.json").read_text())["caption_channels"]
    g = torch.Generator().manual_seed(0)
    out = {}
    for prefix, tokens in (("", 20), ("negative_", 1)):
        mask = torch.zeros(1, 120, dtype=torch.long)
        mask[:, :tokens] = 1
        out[f"{prefix}prompt_embeds"] = (torch.randn(1, 120, width, generator=g) * 0.2).to(device, dtype)
        out[f"{prefix}prompt_attention_mask"] = mask.to(device)
    return out


def worker(spec: dict) -> dict:
    """One engine and option in this fresh process: time it, save its images to spec["out"] (.npy)."""
    set_threads(spec["threads"])
    device, dtype = spec["device"], DTYPES[spec["dtype"]]
    plain = plain_steps(spec["option"])
    steps = plain or spec["steps"]
    load_kwargs, call_kwargs = ({}, {}) if plain else \
        OPTIONS.get(spec["option"]) or device_options(device)[spec["option"]]
    demo = spec["folder"] == str(DEMO_MODEL)
    if spec["engine"] != "pixart":
        # diffusers has no resolution bins for the demo's 128 px (its sample size 16 raises "Invalid sample size")
        call_kwargs = {"use_resolution_binning": False} if demo else {}
    start = time.perf_counter()
    pipe = load(spec["engine"], Path(spec["folder"]), dtype, device, load_kwargs, spec["part"], demo)
    result = {"load_s": time.perf_counter() - start}
    if spec["compile"] and spec["engine"] == "pixart":
        pipe.compile(spec.get("compile_mode"), vae={"on": True, "off": False}.get(spec.get("compile_vae")))
    evaluations = []
    if spec["engine"] == "pixart" and spec["part"] == "image":
        blocks = pipe.transformer.run_blocks
        pipe.transformer.run_blocks = lambda *a: (evaluations.append(1), blocks(*a))[1]  # counts full evaluations

    with torch.inference_mode():
        if spec["part"] == "text":
            times, out = timed(lambda warm: pipe.encode_prompt("A small cactus with a happy face in the Sahara "
                                                                 "desert.", device=device)[0], spec["repeats"], device)
            images = out.float().cpu().numpy()
        elif demo:
            def call(warm):
                evaluations.clear()  # this run's count only
                return generate_all(pipe, seeds=tuple(range(spec["demo_seeds"])),
                                    num_inference_steps=2 if warm else steps, output_type="np", **call_kwargs)

            times, (images, image_labels) = timed(call, spec["repeats"], device)
            result["score"] = score(list(images), image_labels)
        else:
            size, embeds = spec["size"], embeddings(Path(spec["folder"]), device, dtype)

            # the warm-up takes 2 steps: diffusers fails with 1, and with the guidance interval both batch sizes run
            def call(warm):
                evaluations.clear()  # this run's count only
                return pipe(negative_prompt=None, num_inference_steps=2 if warm else steps, height=size,
                            width=size, output_type="np", generator=torch.Generator().manual_seed(0), **embeds,
                            **call_kwargs).images

            times, images = timed(call, spec["repeats"], device)
    np.save(spec["out"], np.asarray(images, dtype=np.float32))
    result.update(**times, peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    if evaluations:
        result["block_evaluations"] = len(evaluations)
    if device.startswith("cuda"):
        result["peak_vram_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def run(spec: dict) -> dict:
    """`worker(spec)` in a fresh process; its result, or the error it ended with."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        return {"error": lines[-1][:300] if lines else f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.splitlines()[-1])


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """dB between images in [0, 1]; None (JSON null) for identical images."""
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return round(10 * np.log10(1 / mse), 2) if mse > 0 else None


def part_rows(args: argparse.Namespace, size: int, part: str) -> dict:
    """step / decode: bench/core.py's workers, pixart in --dtype and diffusers in the baseline dtype."""
    row = {}
    for engine, dtype in (("diffusers", args.baseline_dtype), ("pixart", args.dtype)):
        cmd = [sys.executable, str(Path(__file__).with_name("core.py")), "--worker", engine, part, str(size), "--dtype",
               dtype, "--repeats", str(args.repeats), "--threads", str(args.threads), "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
        out = json.loads(proc.stdout.splitlines()[-1])
        row.update({f"{engine}_{k}": round(v, 3) for k, v in out.items()})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], choices=[256, 512, 1024])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--parts", nargs="+", default=["text", "step", "decode", "image"],
                        choices=["text", "step", "decode", "image"])
    parser.add_argument("--options", nargs="+", default=None, help="image rows to run (default: all available)")
    parser.add_argument("--model", default="random", help="random (real-size random weights, the default), demo (the "
                        "demo model: image quality), or a diffusers pipeline folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="pixart's dtype (default: bf16 where the device runs it natively, else fp32)")
    parser.add_argument("--baseline-dtype", choices=list(DTYPES), default=None,
                        help="diffusers' dtype (default: fp16 on CUDA, as its documentation runs it; else --dtype)")
    parser.add_argument("--demo-seeds", type=int, default=6, help="with --model demo: seeds per caption (54 captions)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--compile", action="store_true", help="pipe.compile() the pixart rows (warm-up compiles)")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default=None, help="torch.compile's mode (with "
                        "--compile)")
    parser.add_argument("--compile-vae", choices=["auto", "on", "off"], default="auto", help="with --compile: the "
                        "VAE decoder too (auto: pipe.compile()'s default, on GPUs only)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    names = {v: k for k, v in DTYPES.items()}
    args.dtype = args.dtype or names[default_dtype(args.device)]
    args.baseline_dtype = args.baseline_dtype or ("fp16" if args.device.startswith("cuda") else args.dtype)
    available = {**OPTIONS, **device_options(args.device)}
    options = args.options or list(available)
    unknown = [o for o in options if o not in available and not plain_steps(o)]
    if unknown:
        parser.error(f"unknown or unavailable options {unknown}: choose from {', '.join(available)}, or steps-N "
                     "(N plain steps)")
    if args.demo_seeds < 1:
        parser.error(f"--demo-seeds must be at least 1, got {args.demo_seeds}")
    if args.model == "demo":
        if not (DEMO_MODEL / "model_index.json").is_file():
            parser.error(f"the demo model is not built ({DEMO_MODEL}): python scripts/build_demo.py")
        args.sizes, args.parts = [DEMO_SIZE], ["image"]
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    common = {"machine": machine, "device": args.device, "dtype": args.dtype, "baseline_dtype": args.baseline_dtype,
              "threads": args.threads, "model": args.model}
    if args.compile:
        common.update(compile=args.compile_mode or "default", compile_vae=args.compile_vae)
    if args.model == "demo":
        common["demo_images"] = len(labels()) * args.demo_seeds
    tmp = Path(tempfile.mkdtemp(prefix="pixart-speed-"))
    for size in args.sizes:
        folder = ({"demo": DEMO_MODEL, "random": None}.get(args.model, Path(args.model))
                  or pipeline_folder(size, text_encoder="text" in args.parts))
        for part in args.parts:
            row = {"part": part, "size": f"{size}x{size}", **common}
            if part in ("step", "decode"):
                row.update(part_rows(args, size, part))
                row.update(speedups(row.get("diffusers_seconds"), row.get("pixart_seconds"),
                                    row.get("diffusers_cpu_seconds"), row.get("pixart_cpu_seconds")))
                print(json.dumps(row), flush=True)
                continue
            spec = {"part": part, "size": size, "steps": args.steps, "folder": str(folder), "device": args.device,
                    "repeats": args.repeats, "threads": args.threads, "compile": args.compile,
                    "compile_mode": args.compile_mode, "compile_vae": args.compile_vae, "demo_seeds": args.demo_seeds}
            base = run({**spec, "engine": "diffusers", "option": "default", "dtype": args.baseline_dtype,
                        "out": str(tmp / "diffusers.npy")})
            for option in options if part == "image" else ["default"]:
                out = run({**spec, "engine": "pixart", "option": option, "dtype": args.dtype,
                           "out": str(tmp / f"{option}.npy")})
                steps = (plain_steps(option) or args.steps) if part == "image" else None
                line = {**row, "option": option, "steps": steps,
                        **{f"pixart_{k}": _round(v) for k, v in out.items()},
                        **{f"diffusers_{k}": _round(v) for k, v in base.items() if k != "block_evaluations"}}
                if "seconds" in out and "seconds" in base:
                    line.update(speedups(base["seconds"], out["seconds"], base["cpu_seconds"], out["cpu_seconds"]))
                reference = "diffusers" if option == "default" else "default"
                if "seconds" in out and (tmp / f"{reference}.npy").is_file() and part == "image":
                    line[f"psnr_db_vs_{reference}"] = psnr(np.load(tmp / f"{option}.npy"),
                                                           np.load(tmp / f"{reference}.npy"))
                print(json.dumps(line), flush=True)


def speedups(base: float | None, ours: float | None, base_cpu: float | None, ours_cpu: float | None) -> dict:
    """diffusers ÷ pixart in wall seconds and in CPU seconds (steadier when other processes share the cores)."""
    if base is None or ours is None:
        return {}
    return {"speedup": round(base / ours, 3), "cpu_speedup": round(base_cpu / ours_cpu, 3)}


def _round(value):
    return round(value, 3) if isinstance(value, float) else value


if __name__ == "__main__":
    main()
