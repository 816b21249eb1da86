"""`pixart extract`: T5 captions and VAE posteriors of an image dataset, bucketed, sharded over torchrun ranks, resumable.

The folder it writes is described in pixart/train/data.py. Two stages keep one model in memory at a time:
T5 encodes every caption this rank still needs into staging/ files (one per future shard), is released, and then
the VAE encodes the images shard by shard, each shard written whole before its items are listed.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from .. import dist
from ..bins import classify_height_width_bin, resolution_bin_table
from ..components import component_folders, read_config
from ..configs import T5Config
from ..hardware import cpu_has_fast_bf16, default_device
from ..images import resize_and_crop_tensor
from ..pipeline import PixArtAlphaPipeline
from ..prompt_cache import fingerprint
from ..weights.hub import resolve
from .data import FORMAT, INDEX_KEYS, VERSION, read_items, read_jsonl, save_atomic
from .output import writable_folder

logger = logging.getLogger("pixart")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
LISTED = 5  # file names an error about many files shows


@dataclass(frozen=True)
class Source:
    """One image of the dataset: its stable id, where it is, its caption."""
    id: str
    path: Path
    prompt: str


def _listing(paths: list[str]) -> str:
    more = f" and {len(paths) - LISTED} more" if len(paths) > LISTED else ""
    return ", ".join(paths[:LISTED]) + more


def read_dataset(path: str | Path, skip_missing_captions: bool = False) -> list[Source]:
    """The images and captions, sorted by id: a folder of images with same-name .txt files, or a data_info.json."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        sources = _data_info(path)
    elif path.is_dir():
        sources = _image_folder(path, skip_missing_captions)
    else:
        raise FileNotFoundError(f"dataset {path} is neither a folder of images nor a data_info.json file")
    if not sources:
        raise ValueError(f"dataset {path} holds no captioned images ({', '.join(IMAGE_EXTENSIONS)}, searched "
                         "recursively); for the PixArt repository's layout pass its data_info.json itself")
    return sorted(sources, key=lambda s: s.id)


def _image_folder(root: Path, skip_missing_captions: bool) -> list[Source]:
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(root).parts))
    sources, missing = [], []
    for image in images:
        caption = image.with_suffix(".txt")
        if caption.is_file():
            sources.append(Source(image.relative_to(root).as_posix(), image, caption.read_text(encoding="utf-8").strip()))
        else:
            missing.append(image.relative_to(root).as_posix())
    if missing and not skip_missing_captions:
        raise ValueError(f"{len(missing)} image(s) in {root} have no caption (a .txt file of the same name): "
                         f"{_listing(missing)}; write them, or pass --skip-missing-captions to leave these images out")
    if missing:
        logger.warning("leaving out %d image(s) without a caption: %s", len(missing), _listing(missing))
    return sources


def _data_info(path: Path) -> list[Source]:
    """The original repository's list of {path, prompt, height, width, ratio}; images next to the json, or in the
    InternImgs/ folder beside its InternData/ (InternData/data_info.json or InternData/partition/data_info.json)."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}): fix or regenerate it") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path} must hold a list of {{\"path\", \"prompt\", ...}} entries, got {type(entries).__name__}")
    roots = [path.parent] + [a.parent / "InternImgs" for a in (path.parent, path.parent.parent) if a.name == "InternData"]
    sources, missing = [], []
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not isinstance(entry.get("prompt"), str):
            raise ValueError(f"{path}: entry {number} needs a \"path\" and a \"prompt\" string, got {entry!r:.200}")
        found = next((r / entry["path"] for r in roots if (r / entry["path"]).is_file()), None)
        if found is None:
            missing.append(entry["path"])
        else:
            sources.append(Source(entry["path"], found, entry["prompt"].strip()))
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in {path} are not found (looked in "
                                f"{' and '.join(str(r) for r in roots)}): {_listing(missing)}")
    return sources


def load_image(path: Path, height: int, width: int) -> torch.Tensor:
    """(3, height, width) in [-1, 1]: RGB, resized to cover the bucket (antialiased) and centre-cropped."""
    with Image.open(path) as image:
        pixels = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
        w, h = image.size
    x = pixels.reshape(1, h, w, 3).permute(0, 3, 1, 2).float() / 255
    return resize_and_crop_tensor(x, width, height, antialias=True)[0].clamp(0, 1) * 2 - 1


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the image's header; an unreadable file raises naming it."""
    with Image.open(path) as image:
        return image.height, image.width


@dataclass(frozen=True)
class Options:
    """How to extract: the knobs of `pixart extract`."""
    resolution: int | None = None
    batch_size: int = 8
    shard_size: int = 128
    max_length: int = 120
    clean_caption: bool = True
    dtype: torch.dtype = torch.bfloat16
    device: str | None = None
    skip_missing_captions: bool = False
    skip_bad_images: bool = False
    quiet: bool = False


def make_index(model: str, options: Options) -> tuple[dict, int]:
    """index.json of features of `model` made with `options`, and the px multiple of its buckets (read from the
    model's config files; nothing is loaded)."""
    folder = resolve(model, components=["tokenizer", "text_encoder", "vae", "transformer"])
    subs = component_folders(folder, ["tokenizer", "text_encoder", "vae", "transformer"])
    transformer, vae = read_config("transformer", subs["transformer"]), read_config("vae", subs["vae"])
    vae_scale_factor = 2 ** (len(vae.block_out_channels) - 1)
    resolution = transformer.sample_size * vae_scale_factor if options.resolution is None else options.resolution
    multiple = vae_scale_factor * transformer.patch_size
    if resolution % multiple:
        raise ValueError(f"--resolution {resolution} must be a multiple of {multiple} px (VAE factor "
                         f"{vae_scale_factor} x patch size {transformer.patch_size})")
    encoder = fingerprint(subs["text_encoder"], subs["tokenizer"], extra={
        "max_length": options.max_length, "clean_caption": options.clean_caption, "dtype": str(options.dtype)})
    return {"format": FORMAT, "version": VERSION, "max_length": options.max_length,
            "caption_dim": T5Config.from_json(subs["text_encoder"] / "config.json").d_model,
            "latent_channels": vae.latent_channels, "vae_scale_factor": vae_scale_factor,
            "scaling_factor": vae.scaling_factor, "resolution": resolution,
            "model": str(Path(model).resolve()) if Path(model).exists() else str(model), "encoder": encoder}, multiple


def check_index(out: Path, index: dict) -> None:
    """Refuse to add features to a folder that holds another model's, encoder's or resolution's."""
    path = out / "index.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    differ = [k for k in INDEX_KEYS if old.get(k) != index[k]]
    if differ or old.get("format") != FORMAT:
        detail = "; ".join(f"{k}: {old.get(k)!r} there, {index[k]!r} now" for k in differ) or "not a features folder"
        raise ValueError(f"{out} holds features made differently ({detail}): extract into a new folder, "
                         "or delete this one to start over")


@contextlib.contextmanager
def truncations_counted() -> Iterator[list[int]]:
    """Count, instead of logging one by one, the captions T5's max_length cuts short."""
    count = [0]

    def drop(record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("The following part of your input was truncated"):
            count[0] += 1
            return False
        return True

    logger.addFilter(drop)
    try:
        yield count
    finally:
        logger.removeFilter(drop)


def extract(dataset: str | Path, model: str, out: str | Path, options: Options = Options()) -> int:
    """Extract this process's share of `dataset` into `out` (under torchrun, each rank its own); returns how many."""
    for name in ("resolution", "batch_size", "shard_size", "max_length"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    out = Path(out)
    sources = read_dataset(dataset, options.skip_missing_captions)
    index, multiple = make_index(model, options)
    writable_folder(out)
    check_index(out, index)
    with dist.session():
        rank, world = dist.rank(), dist.world_size()
        if rank == 0:
            for sub in ("shards", "items", "staging"):
                (out / sub).mkdir(parents=True, exist_ok=True)
            _clean(out, world)
            _write_json(out / "index.json", index)
        dist.barrier()
        done = {item["id"] for item in read_items(out)}
        mine = [s for s in sources[rank::world] if s.id not in done]
        device = torch.device(options.device) if options.device else default_device()
        table = resolution_bin_table(index["resolution"], multiple)
        mine = _check_images(mine, options.skip_bad_images)
        write_null = rank == 0 and not (out / "null.safetensors").is_file()
        staged = _encode_captions(model, out, rank, mine, options, device, write_null)
        written = _encode_images(model, out, rank, mine, staged, table, options, device)
        total = dist.all_sum(written)
        dist.print0(f"extracted {total} item(s) into {out} ({len(done)} were already there)",
                    file=sys.stderr)
    return written


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def _clean(out: Path, world: int) -> None:
    """Before any rank starts: delete temp files, shards no item lists, and staging files no rank will read."""
    for tmp in [*out.glob("*/*.tmp"), *out.glob("*.tmp")]:
        tmp.unlink()
    listed = {item["shard"] for item in read_items(out)}
    for shard in (out / "shards").glob("*.safetensors"):
        if f"shards/{shard.name}" not in listed:
            shard.unlink()
    for staged in (out / "staging").glob("rank*-*.safetensors"):
        if int(staged.name[4:].split("-")[0]) >= world:
            staged.unlink()
    for jsonl in (out / "items").glob("*.jsonl"):
        _, torn = read_jsonl(jsonl)
        if torn:  # a line cut short by a kill: drop it, its item is extracted again
            text = jsonl.read_text(encoding="utf-8")
            jsonl.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")


def _check_images(mine: list[Source], skip_bad: bool) -> list[Source]:
    """Fail (or, with --skip-bad-images, warn and leave out) before any encoding on files that are not images.

    Every rank fails together when one finds a bad file, so that none waits forever for the others."""
    good, bad = [], []
    for source in mine:
        try:
            image_size(source.path)
            good.append(source)
        except (OSError, SyntaxError, ValueError) as e:
            bad.append(f"{source.path} ({e})")
    bad_anywhere = dist.all_sum(len(bad))
    if bad_anywhere and not skip_bad:
        listing = _listing(bad) if bad else "see the error of the other process(es)"
        raise ValueError(f"{bad_anywhere} image(s) cannot be read: {listing}; fix or remove them, "
                         "or pass --skip-bad-images to leave them out")
    if bad:
        logger.warning("leaving out %d unreadable image(s): %s", len(bad), _listing(bad))
    return good


def _staged_ids(path: Path) -> list[str] | None:
    try:
        with safe_open(path, "pt") as f:
            return json.loads(f.metadata()["ids"])
    except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError):
        return None


def _encode_captions(model: str, out: Path, rank: int, mine: list[Source], options: Options,
                     device: torch.device, write_null: bool) -> list[Path]:
    """Stage 1: T5 embeddings (unmasked tokens) of the captions not staged yet, one staging file per future shard."""
    wanted = {s.id for s in mine}
    staged, captioned = [], set()
    for path in sorted((out / "staging").glob(f"rank{rank}-*.safetensors")):
        ids = _staged_ids(path)
        if ids is None or not set(ids) <= wanted:  # unreadable, or another assignment of items to ranks
            path.unlink()
            continue
        staged.append(path)
        captioned |= set(ids)
    todo = [s for s in mine if s.id not in captioned]
    if not todo and not write_null:
        return staged
    compute = torch.float32 if device.type == "cpu" and not cpu_has_fast_bf16() else options.dtype
    pipe = PixArtAlphaPipeline.from_pretrained(model, torch_dtype=compute, device=device, transformer=None, vae=None,
                                               memory="full")

    def encode(texts: list[str]) -> list[torch.Tensor]:
        embeds, mask, _, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False, device=device,
                                                clean_caption=options.clean_caption,
                                                max_sequence_length=options.max_length)
        return [e[: int(m.sum())].to(options.dtype) for e, m in zip(embeds, mask)]

    if write_null:
        null = encode([""])[0]
        save_atomic({"caption": null, "mask": torch.ones(null.shape[0], dtype=torch.int64)}, out / "null.safetensors")
    number = 1 + max((int(p.stem.split("-")[1]) for p in staged), default=-1)
    bar = tqdm(total=len(todo), unit="caption", desc="T5", disable=options.quiet or rank != 0)
    with truncations_counted() as truncated:
        for start in range(0, len(todo), options.shard_size):
            chunk = todo[start:start + options.shard_size]
            tensors = {}
            for k in range(0, len(chunk), options.batch_size):
                batch = chunk[k:k + options.batch_size]
                tensors |= {f"{s.id}/caption": c for s, c in zip(batch, encode([s.prompt for s in batch]))}
                bar.update(len(batch))
            path = out / "staging" / f"rank{rank}-{number:05d}.safetensors"
            save_atomic(tensors, path, metadata={"ids": json.dumps([s.id for s in chunk])})
            staged.append(path)
            number += 1
    bar.close()
    if truncated[0]:
        logger.warning("%d caption(s) were longer than %d T5 tokens and were cut (raise --max-length to keep more)",
                       truncated[0], options.max_length)
    del pipe  # T5 leaves memory before the VAE comes in
    return staged


def _encode_images(model: str, out: Path, rank: int, mine: list[Source], staged: list[Path], table: dict,
                   options: Options, device: torch.device) -> int:
    """Stage 2: VAE posterior mean and std of each staged item's image; one shard per staging file."""
    if not staged:
        return 0
    by_id = {s.id: s for s in mine}
    pipe = PixArtAlphaPipeline.from_pretrained(model, torch_dtype=torch.float32, device=device, transformer=None,
                                               text_encoder=None, tokenizer=None, memory="full")
    shards = [int(p.stem.split("-")[1]) for p in (out / "shards").glob(f"rank{rank}-*.safetensors")]
    number = 1 + max(shards, default=-1)
    written = 0
    bar = tqdm(total=sum(len(_staged_ids(p) or []) for p in staged), unit="image", desc="VAE",
               disable=options.quiet or rank != 0)
    for path in staged:
        with safe_open(path, "pt") as f:
            ids = json.loads(f.metadata()["ids"])
            captions = {i: f.get_tensor(f"{i}/caption") for i in ids if i in by_id}
        tensors, lines = {}, []
        for group in _by_bucket([by_id[i] for i in captions], table).values():
            for k in range(0, len(group), options.batch_size):
                batch, images = [], []
                for source, (h, w), size in group[k:k + options.batch_size]:
                    try:
                        images.append(load_image(source.path, h, w))
                        batch.append((source, (h, w), size))
                    except (OSError, SyntaxError, ValueError) as e:
                        if not options.skip_bad_images:
                            raise ValueError(f"image {source.path} cannot be read ({e}): fix or remove it, "
                                             "or pass --skip-bad-images to leave it out") from None
                        logger.warning("leaving out unreadable image %s (%s)", source.path, e)
                if images:
                    with torch.no_grad():
                        posterior = pipe.vae.encode(torch.stack(images).to(device)).latent_dist
                for j, (source, bucket, (height, width)) in enumerate(batch):
                    caption = captions[source.id]
                    tensors |= {f"{source.id}/caption": caption, f"{source.id}/mean": posterior.mean[j].float(),
                                f"{source.id}/std": posterior.std[j].float()}
                    lines.append({"id": source.id, "prompt": source.prompt, "height": height, "width": width,
                                  "bucket": list(bucket), "shard": f"shards/rank{rank}-{number:05d}.safetensors",
                                  "tokens": caption.shape[0]})
                bar.update(len(group[k:k + options.batch_size]))
        if lines:
            save_atomic(tensors, out / lines[0]["shard"])
            with open(out / "items" / f"rank{rank}.jsonl", "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(line) + "\n" for line in lines))
                f.flush()
                os.fsync(f.fileno())
            number += 1
            written += len(lines)
        path.unlink()
    bar.close()
    return written


def _by_bucket(sources: list[Source], table: dict) -> dict[tuple[int, int], list]:
    """bucket -> [(source, bucket, (height, width))], in the given order."""
    out: dict[tuple[int, int], list] = {}
    for source in sources:
        size = image_size(source.path)
        bucket = classify_height_width_bin(*size, table)
        out.setdefault(bucket, []).append((source, bucket, size))
    return out
