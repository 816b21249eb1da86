"""Command line: `pixart generate "a prompt" --model PATH_OR_ID -o out.png`."""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo

from .hardware import default_device, default_dtype
from .weights.files import WeightsError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixart", description="PixArt-α text-to-image in plain PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt", help="what to draw")
    add_load_options(gen)
    gen.add_argument("-o", "--output", default="out.png", help="PNG path; with -n > 1, -0, -1 ... are appended")
    gen.add_argument("--negative-prompt", default="", help="what to steer away from (default: none)")
    gen.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed)")
    gen.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    gen.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance scale (default 4.5)")
    gen.add_argument("--width", type=int, default=None, help="pixels (default: the model's size)")
    gen.add_argument("--height", type=int, default=None, help="pixels (default: the model's size)")
    gen.add_argument("-n", "--num-images", type=int, default=1, help="images to generate (default 1)")
    gen.add_argument("--no-binning", action="store_true", help="generate at exactly --width x --height "
                     "(multiples of 16) instead of the nearest trained aspect-ratio bin")
    gen.add_argument("--no-clean-caption", action="store_true", help="skip the caption cleaning diffusers does")
    gen.add_argument("--max-sequence-length", type=int, default=120, help="T5 tokens (default 120)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")

    srv = sub.add_parser("serve", help="HTTP server: OpenAI Images API, AUTOMATIC1111 txt2img, a web page")
    add_load_options(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    srv.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every route but /health")
    srv.add_argument("--max-queue", type=int, default=32, help="waiting jobs before 429 (default 32)")
    srv.add_argument("--max-batch", type=int, default=4, help="compatible jobs run as one batch (default 4)")
    return parser


def load_pipeline(args: argparse.Namespace):
    """The pipeline the load options ask for, on its device and in its dtype."""
    from .models.transformer import PixArtTransformer2DModel
    from .pipeline import PixArtAlphaPipeline

    device = torch.device(args.device) if args.device else default_device()
    dtype = default_dtype(device) if args.dtype == "auto" else DTYPES[args.dtype]
    kwargs = {}
    if args.transformer:
        config = Path(args.model) / "transformer" if Path(args.model).is_dir() else None
        kwargs["transformer"] = PixArtTransformer2DModel.from_single_file(args.transformer, config=config,
                                                                          torch_dtype=dtype, device=device)
    return PixArtAlphaPipeline.from_pretrained(args.model, torch_dtype=dtype, device=device, **kwargs)


def generate(args: argparse.Namespace) -> list[Path]:
    """Load the pipeline, generate, and write PNGs with their settings in a text chunk."""
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.num_images < 1:
        raise ValueError(f"-n/--num-images must be at least 1, got {args.num_images}")
    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise ValueError(f"--output must be a .png path, got {output}")
    if not output.parent.exists():
        raise FileNotFoundError(f"the folder of --output ({output.parent}) does not exist: create it first")
    seed = args.seed if args.seed is not None else random.randrange(2**32)

    started = time.perf_counter()
    pipe = load_pipeline(args)
    device, dtype = pipe.device, pipe.dtype
    pipe.set_progress_bar_config(disable=args.quiet)
    loaded = time.perf_counter()
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(args.num_images)]
    images = pipe(
        args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
        guidance_scale=args.guidance, height=args.height, width=args.width, num_images_per_prompt=args.num_images,
        generator=generators, clean_caption=not args.no_clean_caption,
        use_resolution_binning=not args.no_binning, max_sequence_length=args.max_sequence_length,
    ).images
    done = time.perf_counter()

    paths = [output] if len(images) == 1 else [output.with_name(f"{output.stem}-{i}.png") for i in range(len(images))]
    for i, (image, path) in enumerate(zip(images, paths)):
        settings = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": seed + i,
                    "steps": args.steps, "guidance_scale": args.guidance, "width": image.width,
                    "height": image.height, "model": str(args.model), "dtype": str(dtype).removeprefix("torch.")}
        info = PngInfo()
        info.add_text("parameters", json.dumps(settings))
        _save_atomic(image, path, info)
        print(f"wrote {path} (seed {seed + i})")
    print(f"loaded in {loaded - started:.1f} s, generated {len(images)} image(s) in {done - loaded:.1f} s "
          f"on {device} in {str(dtype).removeprefix('torch.')}", file=sys.stderr)
    return paths


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
        elif args.command == "serve":
            from .serve.app import serve

            serve(args)
    except (ValueError, FileNotFoundError, WeightsError, OSError) as e:
        print(f"pixart: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pixart: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
