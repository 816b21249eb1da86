"""Command line: `pixart generate "a prompt" --model PATH_OR_ID -o out.png`, or `--prompts FILE --outdir DIR`."""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from . import dist
from .compile import COMPILE_MODES
from .components import MEMORY_MODES
from .images import png_info
from .hardware import default_device, default_dtype, set_threads
from .prompt_cache import PromptCache
from .quant_dynamic import DYNAMIC_QUANTIZATIONS
from .reuse import PRESETS, cache_setting
from .weights.files import WeightsError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def duration(text: str) -> float:
    """'90', '90s', '45m', '2h', '1.5h' or '3h55m' -> seconds (argparse type)."""
    number = r"(\d+(?:\.\d*)?|\.\d+)"
    units = {"": 1, "s": 1, "m": 60, "h": 3600}
    if not re.fullmatch(rf"\s*({number}[hms]?)+\s*", text.lower()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: write 90s, 45m, 2h or 3h55m")
    seconds = sum(float(n) * units[u] for n, u in re.findall(rf"{number}([hms]?)", text.lower()))
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the duration must be positive")
    return seconds


def lora_option(value: str) -> tuple[str, float]:
    """`FILE[:SCALE]` -> (FILE, SCALE); a colon not followed by a number belongs to the path."""
    path, _, scale = value.rpartition(":")
    try:
        return (path, float(scale)) if path else (value, 1.0)
    except ValueError:
        return value, 1.0


def add_load_options(parser: argparse.ArgumentParser) -> None:
    """The options that choose and load the pipeline, shared by every command that generates."""
    parser.add_argument("--model", required=True, help="diffusers PixArt-α folder or Hub id "
                        "(e.g. PixArt-alpha/PixArt-XL-2-1024-MS)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="compute dtype (auto: bf16 on GPUs and CPUs with native bf16, else fp32)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--transformer", default=None, metavar="FILE",
                        help="transformer weights to use instead of the model's: an original PixArt-XL-2-*.pth or a "
                             "single .safetensors file")
    parser.add_argument("--memory", choices=MEMORY_MODES, default="auto",
                        help="full: all models resident; staged: each loaded when it runs and freed after; offload "
                             "(CUDA): each on the GPU only while it runs; auto (default): staged when full won't fit")
    parser.add_argument("--quantize-text-encoder", choices=["int8", "int4"], default=None,
                        help="weight-only quantization of T5 while it loads: int8 (~4.8 GB for T5-XXL) or int4")
    parser.add_argument("--lora", type=lora_option, action="append", default=[], metavar="FILE[:SCALE]",
                        help="apply a LoRA (file, folder or Hub id; diffusers, PEFT or kohya keys) with a weight "
                             "(default 1.0); repeat to combine several")
    parser.add_argument("--quantize-transformer", choices=list(DYNAMIC_QUANTIZATIONS), default=None,
                        help="quantize the transformer while it loads, activations per token at each step: int8 "
                             "(faster on CPUs and GPUs with int8 kernels), fp8 (GPUs from Ada/Hopper on)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer: the first image "
                        "of each size compiles (minutes on a CPU), later ones run faster")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                        help="with --compile: torch.compile's mode (reduce-overhead: CUDA graphs)")
    parser.add_argument("--no-prompt-cache", action="store_true",
                        help="do not read or write the on-disk cache of prompt embeddings")
    parser.add_argument("--prompt-cache-dir", default=None, help="where the prompt-embedding cache lives "
                        "(default: $PIXART_CACHE or ~/.cache/pixart, then prompt-embeddings/)")
    parser.add_argument("--prompt-cache-size", type=float, default=2.0, metavar="GB",
                        help="most disk the prompt cache may use, least recently used evicted first (default 2 GB)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the cores this "
                        "process may run on, divided among the torchrun processes of this machine)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixart", description="PixArt-α text-to-image in plain PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate images from a prompt, or from a file of prompts (torchrun-ready)")
    gen.add_argument("prompt", nargs="?", help="what to draw (or --prompts FILE)")
    add_load_options(gen)
    gen.add_argument("-o", "--output", default="out.png", help="PNG path; with -n > 1, -0, -1 ... are appended")
    gen.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                     help="many prompts: one per line, or JSONL lines with per-line settings (" + ", ".join(LINE_KEYS) + ")")
    gen.add_argument("--outdir", type=Path, default=None, metavar="DIR",
                     help="with --prompts: where the PNGs and manifest.jsonl go; existing PNGs are skipped (resume)")
    gen.add_argument("--negative-prompt", default="", help="what to steer away from (default: none)")
    gen.add_argument("--seed", type=int, default=None, help="seed of the first image, the next ones get seed+1, ... "
                     "(default: a random one, printed; 0 with --prompts)")
    gen.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    gen.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance scale (default 4.5)")
    gen.add_argument("--width", type=int, default=None, help="pixels (default: the model's size)")
    gen.add_argument("--height", type=int, default=None, help="pixels (default: the model's size)")
    gen.add_argument("-n", "--n", "--num-images", dest="num_images", type=int, default=1,
                     help="images per prompt (default 1)")
    gen.add_argument("--batch-size", type=int, default=None, help="images per pipeline call, among those with the "
                     "same steps, guidance and size (default: all -n of one prompt; 1 with --prompts)")
    gen.add_argument("--no-binning", action="store_true", help="generate at exactly --width x --height "
                     "(multiples of 16) instead of the nearest trained aspect-ratio bin")
    gen.add_argument("--no-clean-caption", action="store_true", help="skip the caption cleaning diffusers does")
    gen.add_argument("--max-sequence-length", type=int, default=120, help="T5 tokens (default 120)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                     help="guidance only at steps whose noise level sigma is in (LO, HI], the unconditional pass "
                          "skipped elsewhere (Kynkaanniemi et al. 2024; e.g. 0.28 5.42; default: every step)")
    gen.add_argument("--cache", type=_cache_option, default=None, metavar="PRESET|THRESHOLD",
                     help="reuse the transformer's work between steps that change little: "
                          f"{', '.join(PRESETS)} or a threshold such as 0.1 (default: off)")
    gen.add_argument("--cuda-graphs", action="store_true", help="replay the transformer's steps as CUDA graphs (a "
                     "GPU, an eager transformer; not with --cache): less host time per step")

    ext = sub.add_parser("extract", help="T5 captions and VAE latents of an image dataset, for `pixart train` "
                         "(torchrun-ready, resumable)")
    ext.add_argument("dataset", type=Path, help="a folder of images with same-name .txt captions (searched "
                     "recursively), or the PixArt repository's data_info.json")
    ext.add_argument("--model", required=True, help="the diffusers PixArt-α folder or Hub id to train")
    ext.add_argument("-o", "--output", type=Path, required=True, help="features folder (a rerun resumes it)")
    ext.add_argument("--resolution", type=int, default=None, help="px of the aspect-ratio bins (default: the "
                     "model's size; tables other than 256/512/1024 are the 1024 one scaled)")
    ext.add_argument("--batch-size", type=int, default=8, help="captions or images per model call (default 8)")
    ext.add_argument("--shard-size", type=int, default=128, help="items per shard file; a killed run loses at most "
                     "one unfinished shard per process (default 128)")
    ext.add_argument("--max-length", type=int, default=120, help="T5 tokens (default 120, as PixArt-α)")
    ext.add_argument("--no-clean-caption", action="store_true", help="skip diffusers' caption cleaning")
    ext.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="dtype of the stored captions and of T5 "
                     "(default bf16: the trainer's autocast dtype, and no fp16 overflow)")
    ext.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    ext.add_argument("--skip-missing-captions", action="store_true", help="leave out images without a .txt")
    ext.add_argument("--skip-bad-images", action="store_true", help="leave out unreadable images, with a warning")
    ext.add_argument("--quiet", action="store_true", help="no progress bar")

    srv = sub.add_parser("serve", help="HTTP server: OpenAI Images API, AUTOMATIC1111 txt2img, a web page")
    add_load_options(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    srv.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every route but /health")
    srv.add_argument("--max-queue", type=int, default=32, help="waiting jobs before 429 (default 32)")
    srv.add_argument("--max-batch", type=int, default=4, help="compatible jobs run as one batch (default 4)")

    add_train_options(sub.add_parser("train", help="fine-tune the transformer (full or LoRA) on features from "
                                     "`pixart extract`, on one process or many (torchrun)"))
    return parser


def add_train_options(p: argparse.ArgumentParser) -> None:
    """`pixart train`'s options; the defaults are TrainOptions' (the paper's recipe)."""
    from dataclasses import fields

    from .train.loop import MIXED_PRECISION, TrainOptions

    d = {f.name: f.default for f in fields(TrainOptions)}
    p.add_argument("features", help="features folder written by `pixart extract`")
    p.add_argument("-o", "--output", required=True, help="where the trained pipeline folder (or LoRA file), "
                   "checkpoints/, samples/ and log.jsonl go")
    p.add_argument("--model", default=None, help="pipeline folder: its transformer is fine-tuned and its other "
                   "components copied to the output")
    p.add_argument("--config", default=None, help="transformer config.json (or its folder): train a new transformer "
                   "from scratch (with --model, that folder still gives the text encoder and VAE for samples)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="global batch, split over the processes "
                   "(default %(default)s)")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1, metavar="N", help="run each process's share "
                   "of a batch as N micro-batches, one optimizer step after them (the same step; 1/N of the "
                   "activation memory)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps to train for")
    p.add_argument("--epochs", type=int, default=None, help="passes over the features (with --max-steps: whichever ends first)")
    p.add_argument("--max-time", type=duration, default=None, metavar="DURATION", help="stop after this much "
                   "training in this process (90s, 45m, 2h; with --max-steps/--epochs: whichever ends first), "
                   "writing a checkpoint that --resume auto continues: for jobs with a wall-clock limit")
    p.add_argument("--seed", type=int, default=d["seed"], help="seed of the data order, noise and initialisation")
    p.add_argument("--lr", type=float, default=d["lr"], help="AdamW learning rate (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="default %(default)s")
    p.add_argument("--adam-eps", type=float, default=d["adam_eps"], help="default %(default)s")
    p.add_argument("--warmup-steps", type=int, default=d["warmup_steps"],
                   help="linear learning-rate warm-up, then constant (default %(default)s)")
    p.add_argument("--grad-clip", type=float, default=d["grad_clip"], help="gradient norm clip, 0: off (default %(default)s)")
    p.add_argument("--ema-decay", type=float, default=None, help="EMA of the weights, saved as the model; 0: off "
                   "(default 0.9999 for a full fine-tune, off for LoRA)")
    p.add_argument("--caption-dropout", type=float, default=d["caption_dropout"],
                   help="probability of training on the empty caption (default %(default)s)")
    p.add_argument("--mixed-precision", choices=list(MIXED_PRECISION), default=None,
                   help="autocast dtype (default: bf16 on GPUs and CPUs with native bf16, else no)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory, ~30%% slower")
    p.add_argument("--fsdp", action="store_true", help="under torchrun, shard the weights, gradients and optimizer "
                   "state over the processes (FSDP2) instead of replicating them (DDP)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: this rank's GPU when there is one)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores, shared among "
                   "the torchrun processes of this machine)")
    p.add_argument("--log-every", type=int, default=d["log_every"], help="steps between log lines (default %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=d["checkpoint_every"], help="steps between checkpoints (0: none)")
    p.add_argument("--keep-checkpoints", type=int, default=d["keep_checkpoints"], help="how many recent checkpoints "
                   "to keep (default %(default)s)")
    p.add_argument("--resume", default=None, metavar="auto|PATH", help="continue from the newest checkpoint in the "
                   "output (auto) or from a checkpoint folder")
    p.add_argument("--sample-every", type=int, default=d["sample_every"], help="steps between sample images (0: none)")
    p.add_argument("--sample-prompts", nargs="+", default=list(d["sample_prompts"]), metavar="PROMPT")
    p.add_argument("--sample-steps", type=int, default=d["sample_steps"], help="default %(default)s")
    p.add_argument("--sample-guidance", type=float, default=d["sample_guidance"], help="default %(default)s")
    p.add_argument("--sample-size", type=int, default=None, help="sample image side in pixels (default: the model's)")
    p.add_argument("--sample-seed", type=int, default=d["sample_seed"], help="seed of the first sample image")
    p.add_argument("--lora-rank", type=int, default=d["lora_rank"], help="train a LoRA of this rank instead of all "
                   "weights (0: full fine-tune)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scaling numerator (default: the rank)")
    p.add_argument("--lora-targets", nargs="+", default=None, metavar="SUFFIX",
                   help="names of the linear layers to adapt (default: to_q to_k to_v to_out.0)")


def _cache_option(value: str) -> float | str:
    """--cache: a preset name or a threshold."""
    try:
        cache = float(value)
    except ValueError:
        cache = value
    try:
        cache_setting(cache)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return cache


def speed_options(args: argparse.Namespace) -> dict:
    """The opt-in speed settings of the run that change the image, as pipeline keywords (recorded when set)."""
    options = {"guidance_interval": args.guidance_interval, "cache": args.cache,
               "cuda_graphs": True if args.cuda_graphs else None}
    return {k: v for k, v in options.items() if v is not None}


def load_pipeline(args: argparse.Namespace):
    """The pipeline the load options ask for, on its device and in its dtype."""
    from .models.transformer import PixArtTransformer2DModel
    from .pipeline import PixArtAlphaPipeline

    set_threads(args.threads, dist.local_world_size())
    device = torch.device(args.device) if args.device else default_device()
    dtype = default_dtype(device) if args.dtype == "auto" else DTYPES[args.dtype]
    kwargs = {}
    if args.transformer:
        config = Path(args.model) / "transformer" if Path(args.model).is_dir() else None
        kwargs["transformer"] = PixArtTransformer2DModel.from_single_file(args.transformer, config=config,
                                                                          torch_dtype=dtype, device=device,
                                                                          quantization=args.quantize_transformer)
    else:
        kwargs["transformer_quantization"] = args.quantize_transformer
    if not args.no_prompt_cache:
        kwargs["prompt_cache"] = PromptCache(args.prompt_cache_dir and Path(args.prompt_cache_dir) / "prompt-embeddings",
                                             max_bytes=int(args.prompt_cache_size * 2**30))
    pipe = PixArtAlphaPipeline.from_pretrained(args.model, torch_dtype=dtype, device=device, memory=args.memory,
                                               text_encoder_quantization=args.quantize_text_encoder, **kwargs)
    if args.lora:
        names = [pipe.load_lora_weights(path, adapter_name=f"lora_{i}") for i, (path, _) in enumerate(args.lora)]
        pipe.set_adapters(names, [scale for _, scale in args.lora])
        if args.quantize_transformer is None:
            pipe.fuse_lora()  # merged once: no LoRA cost per step (integer weights cannot take it)
    return pipe.compile(args.compile_mode) if args.compile else pipe  # after LoRAs: compiling freezes the weights


LINE_KEYS = {"prompt": str, "negative_prompt": str, "seed": int, "steps": int, "guidance": (int, float),
             "width": int, "height": int, "n": int}


@dataclass(frozen=True)
class Job:
    """One image to generate: its place in the run and its settings."""
    index: int
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    width: int | None
    height: int | None


def read_prompts(path: Path) -> list[dict]:
    """The prompts file as one dict per non-blank line: plain text is a prompt, a `{...}` line JSON settings."""
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("{"):
            entries.append({"prompt": line})
        elif line:
            entries.append(_json_line(line, f"{path}, line {number}"))
    if not entries:
        raise ValueError(f"prompts file {path} has no prompts")
    return entries


def _json_line(line: str, where: str) -> dict:
    """One JSONL line of settings, checked key by key."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
    unknown = sorted(set(entry) - set(LINE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(LINE_KEYS)})")
    for key, value in entry.items():
        if not isinstance(value, LINE_KEYS[key]) or isinstance(value, bool):
            kind = {str: "a string", int: "an integer"}.get(LINE_KEYS[key], "a number")
            raise ValueError(f"{where}: {key} must be {kind}, got {value!r}")
    if not entry.get("prompt", "").strip():
        raise ValueError(f"{where}: needs a non-empty \"prompt\"")
    for key in ("steps", "n"):
        if entry.get(key, 1) < 1:
            raise ValueError(f"{where}: {key} must be at least 1, got {entry[key]}")
    return entry


def plan(entries: list[dict], args: argparse.Namespace, base_seed: int) -> list[Job]:
    """Every image of the run in order: image i gets seed base_seed + i, or seed + j of its line's own seed."""
    jobs = []
    for entry in entries:
        for j in range(entry.get("n", args.num_images)):
            jobs.append(Job(
                index=len(jobs), prompt=entry["prompt"], negative_prompt=entry.get("negative_prompt", args.negative_prompt),
                seed=entry["seed"] + j if "seed" in entry else base_seed + len(jobs), steps=entry.get("steps", args.steps),
                guidance=float(entry.get("guidance", args.guidance)), width=entry.get("width", args.width),
                height=entry.get("height", args.height),
            ))
    return jobs


def batches(jobs: list[Job], size: int) -> list[list[Job]]:
    """Jobs that can share a pipeline call (same steps, guidance and size) in runs of at most `size`, in index order."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.steps, job.guidance, job.width, job.height), []).append(job)
    return sorted((g[k:k + size] for g in groups.values() for k in range(0, len(g), size)), key=lambda b: b[0].index)


def generate(args: argparse.Namespace) -> list[Path]:
    """Load the pipeline, generate this rank's share of the images, and write PNGs with their settings in a text chunk.

    Batches are formed from the whole run before rank r takes batches r, r + world, ...: a batch holds the same
    images whatever the number of processes, so (at equal threads per process) every file comes out the same.
    """
    jobs, paths = _plan_run(args)
    from_file = args.prompts is not None
    with dist.session():
        started = time.perf_counter()
        pipe = load_pipeline(args)
        loaded = time.perf_counter()
        default_size = pipe.default_size
        jobs = [replace(j, width=j.width or default_size, height=j.height or default_size) for j in jobs]
        mine = batches(jobs, args.batch_size or (1 if from_file else args.num_images))[dist.rank()::dist.world_size()]
        # Resume: a batch is skipped only when all of it exists; rerunning a partial one keeps its images bit-identical
        mine = [b for b in mine if not (from_file and all(paths[j.index].exists() for j in b))]
        written = dist.all_sum(_generate_batches(pipe, mine, paths, args, skip_existing=from_file))
        dist.barrier()
        summary = f"generated {written} image(s)"
        if from_file:
            summary += f" ({len(jobs) - written} already there; manifest {args.outdir / 'manifest.jsonl'})"
            if dist.rank() == 0:
                _write_manifest(args.outdir / "manifest.jsonl", jobs, paths, args.model, pipe.dtype,
                                speed_options(args))
        processes = f" x {dist.world_size()} processes" if dist.world_size() > 1 else ""
        dist.print0(f"loaded in {loaded - started:.1f} s, {summary} in {time.perf_counter() - loaded:.1f} s on "
                    f"{pipe.device}{processes} in {str(pipe.dtype).removeprefix('torch.')}", file=sys.stderr)
    return paths


def _generate_batches(pipe, mine: list[list[Job]], paths: list[Path], args: argparse.Namespace,
                      skip_existing: bool) -> int:
    """Run each batch as one pipeline call with a CPU generator per image; write its PNGs; return how many."""
    quiet = args.quiet or dist.rank() != 0
    pipe.set_progress_bar_config(disable=quiet or skip_existing)  # many prompts: one bar over images, not steps
    bar = tqdm(total=sum(map(len, mine)), unit="image", disable=quiet or not skip_existing)
    written = 0
    for batch in mine:
        first = batch[0]
        images = pipe(
            [j.prompt for j in batch], negative_prompt=[j.negative_prompt for j in batch],
            num_inference_steps=first.steps, guidance_scale=first.guidance, height=first.height, width=first.width,
            generator=[torch.Generator("cpu").manual_seed(j.seed) for j in batch],
            clean_caption=not args.no_clean_caption, use_resolution_binning=not args.no_binning,
            max_sequence_length=args.max_sequence_length, **speed_options(args),
        ).images
        for job, image in zip(batch, images):
            path = paths[job.index]
            if skip_existing and path.exists():
                continue
            _save_atomic(image, path, png_info(_settings(job, args.model, pipe.dtype, speed_options(args))))
            written += 1
            if not skip_existing:
                print(f"wrote {path} (seed {job.seed})")
        bar.update(len(batch))
    bar.close()
    return written


def _plan_run(args: argparse.Namespace) -> tuple[list[Job], list[Path]]:
    """The run's images and their output paths, from the prompt or the prompts file; bad arguments raise here."""
    for flag, value in (("--steps", args.steps), ("-n/--n", args.num_images), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if (args.prompt is None) == (args.prompts is None):
        raise ValueError("give either a prompt or --prompts FILE" if args.prompt is None
                         else "give either a prompt or --prompts FILE, not both")
    if args.prompts is None:
        if args.outdir is not None:
            raise ValueError("--outdir goes with --prompts FILE; for one prompt, name the file with -o")
        output = Path(args.output)
        if output.suffix.lower() != ".png":
            raise ValueError(f"--output must be a .png path, got {output}")
        if not output.parent.exists():
            raise FileNotFoundError(f"the folder of --output ({output.parent}) does not exist: create it first")
        if args.seed is None and "WORLD_SIZE" in os.environ:
            raise ValueError("under torchrun, give --seed: each process would draw its own random one")
        jobs = plan([{"prompt": args.prompt}], args, args.seed if args.seed is not None else random.randrange(2**32))
        paths = [output] if len(jobs) == 1 else [output.with_name(f"{output.stem}-{i}.png") for i in range(len(jobs))]
        return jobs, paths
    if args.outdir is None:
        raise ValueError("--prompts needs --outdir DIR for the images")
    jobs = plan(read_prompts(args.prompts), args, args.seed or 0)
    try:
        args.outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create --outdir {args.outdir}: {e.strerror or e}") from None
    if not os.access(args.outdir, os.W_OK):
        raise OSError(f"cannot write to --outdir {args.outdir}: permission denied")
    return jobs, [args.outdir / f"{j.index:05d}-{_slug(j.prompt)}.png" for j in jobs]


def _slug(prompt: str) -> str:
    """A file-name-safe start of the prompt."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower())[:40].strip("-") or "image"


def _settings(job: Job, model: str, dtype: torch.dtype, options: dict) -> dict:
    """What the PNG's `parameters` chunk and the manifest record of an image."""
    return {"prompt": job.prompt, "negative_prompt": job.negative_prompt, "seed": job.seed, "steps": job.steps,
            "guidance": job.guidance, "width": job.width, "height": job.height, "model": str(model),
            "dtype": str(dtype).removeprefix("torch."), **options}


def _write_manifest(path: Path, jobs: list[Job], paths: list[Path], model: str, dtype: torch.dtype,
                    options: dict) -> None:
    """One JSON line per image, in index order, written whole (temp file + rename)."""
    lines = [json.dumps({"file": paths[j.index].name, "index": j.index, **_settings(j, model, dtype, options)})
             for j in jobs]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


def _save_atomic(image, path: Path, info: PngInfo) -> None:
    """Write next to the target, then rename: a full disk never leaves a half-written PNG behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"could not write {path}: {e.strerror or e} (free some disk space or choose another -o)") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            generate(args)
        elif args.command == "extract":
            from .train.extract import Options, extract

            extract(args.dataset, args.model, args.output, Options(
                resolution=args.resolution, batch_size=args.batch_size, shard_size=args.shard_size,
                max_length=args.max_length, clean_caption=not args.no_clean_caption, dtype=DTYPES[args.dtype],
                device=args.device, skip_missing_captions=args.skip_missing_captions,
                skip_bad_images=args.skip_bad_images, quiet=args.quiet))
        elif args.command == "serve":
            from .serve.app import serve

            serve(args)
        elif args.command == "train":
            from .train.loop import TrainOptions, train

            train(TrainOptions.from_args(args))
    except (ValueError, FileNotFoundError, WeightsError, OSError) as e:
        print(f"pixart: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pixart: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
