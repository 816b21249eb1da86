"""`pixart generate`'s run: the images a prompt or a prompts file asks for, batched, split among torchrun processes,
written as PNGs with their settings (and a manifest for a prompts file), resuming what a rerun finds done."""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from . import dist
from .cli import DEFAULT_BATCH, LINE_KEYS, MAX_SIDE, load_pipeline, speed_options
from .images import png_info
from .schedulers import sampler_by_name, sampler_label, with_sampler

SEED_MAX = 2**63 - 1  # as the server's: torch's generators take up to 2**64 - 1, but 2**63 - 1 fits every JSON reader


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
    sampler: tuple[str, bool] | None = None  # (SAMPLERS key, Karras); None: the model's own


def read_prompts(path: Path) -> list[dict]:
    """The prompts file as one dict per non-blank line: plain text is a prompt, a `{...}` line JSON settings."""
    if path.is_dir():
        raise ValueError(f"prompts file {path} is a folder: give the text or JSONL file of prompts")
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise ValueError(f"prompts file {path}, line {line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}): save "
                         "the file as UTF-8") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
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
    if not math.isfinite(entry.get("guidance", 0)):
        raise ValueError(f"{where}: guidance must be a finite number, got {entry['guidance']!r}")
    for key in ("steps", "n"):
        if entry.get(key, 1) < 1:
            raise ValueError(f"{where}: {key} must be at least 1, got {entry[key]}")
    for key in ("width", "height"):
        if not 8 <= entry.get(key, 8) <= MAX_SIDE:
            raise ValueError(f"{where}: {key} must be 8 to {MAX_SIDE} pixels (leave it out for the model's size), "
                             f"got {entry[key]}")
    if "sampler" in entry:
        try:
            entry["sampler"] = sampler_by_name(entry["sampler"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
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
                height=entry.get("height", args.height), sampler=entry.get("sampler", args.sampler),
            ))
            if not 0 <= jobs[-1].seed <= SEED_MAX:
                fix = "its line's \"seed\"" if "seed" in entry else "--seed (or -1 for a random one)"
                raise ValueError(f"image {len(jobs) - 1} would get seed {jobs[-1].seed}, outside 0 to 2**63 - 1 "
                                 f"(the image i of a run gets the first seed + i): change {fix}")
    return jobs


def batches(jobs: list[Job], size: int) -> list[list[Job]]:
    """Jobs that can share a pipeline call (same steps, guidance, size and sampler) in runs of at most `size`, in
    index order."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.steps, job.guidance, job.width, job.height, job.sampler), []).append(job)
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
        if from_file:
            _check_existing(jobs, paths, args.model, pipe.dtype, recorded_options(args))
        size = args.batch_size or (1 if from_file else min(args.num_images, DEFAULT_BATCH))
        mine = batches(jobs, size)[dist.rank()::dist.world_size()]
        # Resume: a batch is skipped only when all of it exists; rerunning a partial one keeps its images bit-identical
        mine = [b for b in mine if not (from_file and all(paths[j.index].exists() for j in b))]
        written = dist.all_sum(_generate_batches(pipe, mine, paths, args, skip_existing=from_file))
        dist.barrier()
        summary = f"generated {written} image(s)"
        if from_file:
            summary += f" ({len(jobs) - written} already there; manifest {args.outdir / 'manifest.jsonl'})"
            if dist.rank() == 0:
                _write_manifest(args.outdir / "manifest.jsonl", jobs, paths, args.model, pipe.dtype,
                                recorded_options(args))
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
    written, options, recorded, model_scheduler = 0, speed_options(args), recorded_options(args), pipe.scheduler
    for batch in mine:
        first = batch[0]
        pipe.scheduler = with_sampler(model_scheduler, *first.sampler) if first.sampler else model_scheduler
        images = pipe(
            [j.prompt for j in batch], negative_prompt=[j.negative_prompt for j in batch],
            num_inference_steps=first.steps, guidance_scale=first.guidance, height=first.height, width=first.width,
            generator=[torch.Generator("cpu").manual_seed(j.seed) for j in batch],
            clean_caption=not args.no_clean_caption, use_resolution_binning=not args.no_binning,
            max_sequence_length=args.max_sequence_length, **options,
        ).images
        for job, image in zip(batch, images):
            path = paths[job.index]
            if skip_existing and path.exists():
                continue
            _save_atomic(image, path, png_info(_settings(job, args.model, pipe.dtype, recorded)))
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
    if not math.isfinite(args.guidance):
        raise ValueError(f"--guidance must be a finite number (default 4.5; 1 or less turns guidance off), got "
                         f"{args.guidance}")
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
        if args.seed in (None, -1) and "WORLD_SIZE" in os.environ:
            raise ValueError("under torchrun, give --seed: each process would draw its own random one")
        seed = random.randrange(2**32) if args.seed in (None, -1) else args.seed
        jobs = plan([{"prompt": args.prompt}], args, seed)
        paths = [output] if len(jobs) == 1 else [output.with_name(f"{output.stem}-{i}.png") for i in range(len(jobs))]
        for path in paths:
            if path.is_dir():
                raise ValueError(f"{path} is a folder: give -o a .png file path")
        _check_exact_sizes(jobs, args)
        existing = [path for path in paths if path.exists()]
        if existing and not args.overwrite:
            names = ", ".join(map(str, existing[:3])) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
            verb = "exists" if len(existing) == 1 else "exist"
            raise ValueError(f"{names} already {verb}: choose another -o, or pass --overwrite to replace")
        return jobs, paths
    if args.outdir is None:
        raise ValueError("--prompts needs --outdir DIR for the images")
    if args.seed == -1:
        raise ValueError("--seed -1 (random) goes with one prompt; with --prompts the seeds start at --seed (default 0) "
                         "so that a run can be resumed")
    jobs = plan(read_prompts(args.prompts), args, args.seed or 0)
    _check_exact_sizes(jobs, args)
    try:
        args.outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create --outdir {args.outdir}: {e.strerror or e}") from None
    if not os.access(args.outdir, os.W_OK):
        raise OSError(f"cannot write to --outdir {args.outdir}: permission denied")
    return jobs, [args.outdir / f"{j.index:05d}-{_slug(j.prompt)}.png" for j in jobs]


def _check_exact_sizes(jobs: list[Job], args: argparse.Namespace) -> None:
    """With --no-binning the model generates at the size asked: a multiple of 16 px (VAE factor 8 × patch 2)."""
    if not args.no_binning:
        return
    for job in jobs:
        if (job.width or 16) % 16 or (job.height or 16) % 16:
            fix = "x".join(str(round((v or 16) / 16) * 16 or 16) for v in (job.width, job.height))
            raise ValueError(f"with --no-binning, --width and --height must be multiples of 16, got {job.width}x"
                             f"{job.height} (image {job.index}): use {fix}, or leave out --no-binning")


def _slug(prompt: str) -> str:
    """A file-name-safe start of the prompt."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower())[:40].strip("-") or "image"


def recorded_options(args: argparse.Namespace) -> dict:
    """Every option of the run that changes the pixels besides a job's own settings, as each PNG and the manifest
    record it (and a resumed run checks it): the speed options, and the load and text options that differ from
    their defaults (a LoRA and its weight, another transformer file, quantization, no binning, ...)."""
    options = {"transformer": str(args.transformer) if args.transformer else None,
               "lora": [[str(path), scale] for path, scale in args.lora] or None,
               "quantize_transformer": args.quantize_transformer, "quantize_text_encoder": args.quantize_text_encoder,
               "binning": False if args.no_binning else None, "clean_caption": False if args.no_clean_caption else None,
               "max_sequence_length": args.max_sequence_length if args.max_sequence_length != 120 else None}
    return {**speed_options(args), **{k: v for k, v in options.items() if v is not None}}


def _settings(job: Job, model: str, dtype: torch.dtype, options: dict) -> dict:
    """What the PNG's `parameters` chunk and the manifest record of an image (the sampler when one was named)."""
    sampler = {"sampler": sampler_label(*job.sampler)} if job.sampler else {}
    return {"prompt": job.prompt, "negative_prompt": job.negative_prompt, "seed": job.seed, "steps": job.steps,
            "guidance": job.guidance, "width": job.width, "height": job.height, "model": str(model),
            "dtype": str(dtype).removeprefix("torch."), **sampler, **options}


def _check_existing(jobs: list[Job], paths: list[Path], model: str, dtype: torch.dtype, options: dict) -> None:
    """Resuming: every image already in --outdir must hold this run's settings for it (the model's path aside),
    else the run stops before generating, naming the file and the settings that differ."""
    for job in jobs:
        path = paths[job.index]
        if not path.exists():
            continue
        want = json.loads(json.dumps(_settings(job, model, dtype, options)))  # as read back: lists, not tuples
        try:
            with Image.open(path) as image:
                have = json.loads(image.text.get("parameters", "null"))
        except (OSError, ValueError):
            have = None
        if not isinstance(have, dict):
            raise ValueError(f"{path} is in the way: it holds no settings of pixart generate (not one of its images, "
                             "or damaged): move it, or choose another --outdir")
        differ = sorted(k for k in want.keys() | have.keys() if k != "model" and want.get(k) != have.get(k))
        if differ:
            details = "; ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} now" for k in differ)
            raise ValueError(f"{path} was made with other settings ({details}): use another --outdir, or delete the "
                             "images to make again")


def _write_manifest(path: Path, jobs: list[Job], paths: list[Path], model: str, dtype: torch.dtype,
                    options: dict) -> None:
    """One JSON line per image, in index order, written whole (temp file + rename)."""
    lines = [json.dumps({"file": paths[j.index].name, "index": j.index, **_settings(j, model, dtype, options)})
             for j in jobs]
    _write_atomic(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8"),
                  "--outdir")


def _save_atomic(image, path: Path, info: PngInfo) -> None:
    """Write next to the target, then rename: a full disk never leaves a half-written PNG behind."""
    _write_atomic(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), "-o or --outdir")


def _write_atomic(path: Path, write, flag: str) -> None:
    """write(tmp) beside `path`, then rename over it; on failure, nothing of it is left and the error says why."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only file system refuses even that; there is nothing to remove then
            pass
        fix = {errno.ENOSPC: "free some disk space or choose another " + flag,
               errno.EDQUOT: "free some of your disk quota or choose another " + flag,
               errno.EROFS: "the file system is read-only: choose another " + flag,
               errno.EACCES: "permission denied: choose a folder you can write to with " + flag,
               errno.EISDIR: f"{path} is a folder: choose another " + flag}.get(e.errno, "choose another " + flag)
        raise OSError(f"could not write {path}: {e.strerror or e} ({fix})") from None
