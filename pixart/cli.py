"""Command line: `pixart generate "a prompt" --model PATH_OR_ID -o out.png`, or `--prompts FILE --outdir DIR`."""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import torch

from . import dist
from .compile import COMPILE_MODES
from .components import MEMORY_MODES
from .hardware import available_device, default_device, default_dtype, set_threads
from .prompt_cache import PromptCache
from .quant_dynamic import DYNAMIC_QUANTIZATIONS
from .reuse import PRESETS, cache_setting
from .schedulers import SAMPLER_NAMES, sampler_by_name
from .weights.files import WeightsError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_BATCH = 4  # images of one prompt per pipeline call: -n 1000 must not ask for 1000 images' memory at once
MAX_SIDE = 4096  # pixels a side: 4× the largest trained size; beyond, one image's latents and resize outgrow RAM
LINE_KEYS = {"prompt": str, "negative_prompt": str, "seed": int, "steps": int, "guidance": (int, float),
             "width": int, "height": int, "n": int, "sampler": str}


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


def device_option(value: str) -> str:
    """--device: a device torch knows and this machine has (argparse type)."""
    try:
        available_device(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _whole_in(value: str, low: int, high: int, kind: str, out_of_range: str) -> int:
    """An argparse value as a whole number from `low` to `high`: else "VALUE is not {kind}", or
    "NUMBER {out_of_range}"."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not {kind}") from None
    if not low <= number <= high:
        raise argparse.ArgumentTypeError(f"{number} {out_of_range}")
    return number


def side_option(value: str) -> int:
    """--width/--height: whole pixels from 8 to MAX_SIDE (argparse type)."""
    return _whole_in(value, 8, MAX_SIDE, "a whole number of pixels",
                     f"pixels: give 8 to {MAX_SIDE} (leave it out for the model's size)")


def port_option(value: str) -> int:
    """--port: 1 to 65535 (argparse type)."""
    return _whole_in(value, 1, 65535, "a port number", "is not a TCP port: give 1 to 65535")


def add_load_options(parser: argparse.ArgumentParser) -> None:
    """The options that choose and load the pipeline, shared by every command that generates."""
    parser.add_argument("--model", required=True, help="diffusers PixArt-α folder or Hub id "
                        "(e.g. PixArt-alpha/PixArt-XL-2-1024-MS)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="compute dtype (auto: bf16 on GPUs and CPUs with native bf16, else fp32)")
    parser.add_argument("--device", type=device_option, default=None,
                        help="cpu, cuda, cuda:1 ... (default: cuda when available)")
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
                             "(faster on CPUs), fp8 (GPUs from Ada/Hopper on); on GPUs both save memory, not time")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer (on a GPU the VAE "
                        "decoder too): the first image of each size compiles (minutes on a CPU), later ones run faster")
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
                     "(default or -1: a random one, printed; 0 with --prompts)")
    gen.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    gen.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance scale (default 4.5)")
    gen.add_argument("--width", type=side_option, default=None, help="pixels (default: the model's size)")
    gen.add_argument("--height", type=side_option, default=None, help="pixels (default: the model's size)")
    gen.add_argument("-n", "--n", "--num-images", dest="num_images", type=int, default=1,
                     help="images per prompt (default 1)")
    gen.add_argument("--batch-size", type=int, default=None, help="images per pipeline call, among those with the "
                     f"same steps, guidance, size and sampler (default: up to {DEFAULT_BATCH} of one prompt's -n; 1 "
                     "with --prompts)")
    gen.add_argument("--overwrite", action="store_true", help="replace existing images at -o (without it, an "
                     "existing file stops the run before anything is generated)")
    gen.add_argument("--no-binning", action="store_true", help="generate at exactly --width x --height "
                     "(multiples of 16) instead of the nearest trained aspect-ratio bin")
    gen.add_argument("--no-clean-caption", action="store_true", help="skip the caption cleaning diffusers does")
    gen.add_argument("--max-sequence-length", type=int, default=120, help="T5 tokens (default 120)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.add_argument("--sampler", type=_sampler_option, default=None, metavar="NAME",
                     help="sample the model's noise schedule with another sampler: "
                          f"{', '.join(SAMPLER_NAMES.values())}, DPM++ 2M Karras or Euler Karras (Karras noise "
                          "levels), any case (default: the model's own, DPM++ 2M for PixArt-alpha)")
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
    ext.add_argument("--device", type=device_option, default=None, help="cpu, cuda, ... (default: cuda when "
                     "available)")
    ext.add_argument("--skip-missing-captions", action="store_true", help="leave out images without a .txt")
    ext.add_argument("--skip-bad-images", action="store_true", help="leave out unreadable images, with a warning")
    ext.add_argument("--quiet", action="store_true", help="no progress bar")

    srv = sub.add_parser("serve", help="HTTP server: OpenAI Images API, AUTOMATIC1111 txt2img, a web page")
    add_load_options(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    srv.add_argument("--port", type=port_option, default=8000, help="port (default 8000)")
    srv.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every route but /health")
    srv.add_argument("--max-queue", type=int, default=32, help="waiting jobs before 429 (default 32)")
    srv.add_argument("--max-batch", type=int, default=4, help="compatible jobs run as one batch (default 4)")

    add_train_options(sub.add_parser("train", help="fine-tune the transformer (full or LoRA) on features from "
                                     "`pixart extract`, on one process or many (torchrun)"))
    return parser


def add_train_options(p: argparse.ArgumentParser) -> None:
    """`pixart train`'s options; the defaults are TrainOptions' (the paper's recipe)."""
    from dataclasses import fields

    from .train.options import MIXED_PRECISION, TrainOptions

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
    p.add_argument("--device", type=device_option, default=None, help="cpu, cuda ... (default: this rank's GPU "
                   "when there is one)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores, shared among "
                   "the torchrun processes of this machine)")
    p.add_argument("--log-every", type=int, default=d["log_every"], help="steps between log lines (default %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=d["checkpoint_every"], help="steps between checkpoints (0: none)")
    p.add_argument("--keep-checkpoints", type=int, default=d["keep_checkpoints"], help="how many recent checkpoints "
                   "to keep, 0: all (default %(default)s)")
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


def _sampler_option(value: str) -> tuple[str, bool]:
    """--sampler: (the sampler's class name, Karras noise levels)."""
    try:
        return sampler_by_name(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            from .generate import generate

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
            from .train.loop import train
            from .train.options import TrainOptions

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
