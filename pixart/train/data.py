"""Extracted training features: the on-disk format, its reader, and the deterministic bucketed batches.

`pixart extract` (pixart/train/extract.py) writes, and `pixart train` reads, a folder laid out as::

    <features>/
      index.json           {"format": "pixart-features", "version": 1, "max_length": 120, "caption_dim": D,
                            "latent_channels": C, "vae_scale_factor": 8, "scaling_factor": <VAE config>,
                            "resolution": <px of the bin table>, "model": "<model folder or Hub id>",
                            "encoder": "<fingerprint of tokenizer + T5 files + max_length + clean_caption + dtype>"}
      null.safetensors     "caption" (n, D), "mask" (n,): T5 of "" (the caption-dropout target), unmasked tokens
      shards/rank{r}-{k:05d}.safetensors
                           per item id X: "X/caption" (n_X, D) its unmasked T5 tokens (bf16, fp16 or fp32 as
                           extracted), "X/mean" and "X/std" (C, h/8, w/8) fp32 VAE posterior (not scaled)
      items/rank{r}.jsonl  one line per item, appended only once its shard is durably written:
                           {"id", "prompt", "height", "width", "bucket": [h, w], "shard", "tokens": n_X}

An item id is the image's path relative to the dataset root (or data_info.json's "path"), so ids are stable
across runs and process counts. Captions are right-padded by T5's tokenizer: the n_X stored tokens are the first
n_X positions, and the reader pads them back to max_length with zeros and a 0 mask.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..weights.files import Lazy, WeightsError, lazy_tensors

logger = logging.getLogger("pixart")

FORMAT, VERSION = "pixart-features", 1
INDEX_KEYS = ("max_length", "caption_dim", "latent_channels", "vae_scale_factor", "scaling_factor", "resolution",
              "model", "encoder")
OPEN_SHARDS = 256  # shard headers kept parsed by a reader (a random batch touches many; fewer re-parse a header per item)
CACHE_BYTES = 2 << 30  # items kept in memory once read (~0.5 ms each from disk): small datasets are read once


def read_jsonl(path: Path) -> tuple[list[dict], bool]:
    """The item lines of one items/*.jsonl, and whether it ends in a cut-off line (a run killed mid-append).

    A line counts once its newline is written: a last line without one is the cut-off rest of an append."""
    *lines, tail = path.read_text(encoding="utf-8").split("\n")
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}, line {number} is not valid JSON: the features folder is damaged; delete "
                             "this line (its item is extracted again by the next `pixart extract`)") from None
    return items, bool(tail)


def read_items(root: Path) -> list[dict]:
    """Every item of every items/*.jsonl, sorted by id; an id listed twice is an error."""
    items: dict[str, dict] = {}
    for path in sorted((root / "items").glob("*.jsonl")):
        lines, torn = read_jsonl(path)
        if torn:
            logger.warning("%s ends with a cut-off line (an interrupted extraction): ignoring it", path)
        for item in lines:
            if item["id"] in items:
                raise ValueError(f"item {item['id']!r} is listed twice in {root / 'items'} (two extractions ran at "
                                 f"once into one folder?): remove one of its lines, the second is in {path.name}")
            items[item["id"]] = item
    return [items[k] for k in sorted(items)]


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file durably: temp file, fsync, rename (a killed run never leaves half a file named)."""
    tmp = path.with_name(f"{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Features:
    """An extracted features folder: items sorted by id, each read from its shard on demand."""

    def __init__(self, root: str | Path, cache_bytes: int = CACHE_BYTES):
        self.root = Path(root)
        index_path = self.root / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.root} has no index.json: it is not a features folder; create one with "
                                    "`pixart extract DATASET --model MODEL -o FOLDER`")
        self.index: dict = json.loads(index_path.read_text())
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise ValueError(f"{index_path} is not a {FORMAT} version {VERSION} index (format "
                             f"{self.index.get('format')!r}, version {self.index.get('version')!r}): extract again")
        self.items: list[dict] = read_items(self.root)
        if not self.items:
            raise ValueError(f"{self.root} holds no extracted items (items/*.jsonl are empty or missing): "
                             "run `pixart extract` into it first")
        self.max_length = int(self.index["max_length"])
        self._shards: OrderedDict[str, dict[str, Lazy]] = OrderedDict()
        # the stored tensors of items already read, until `cache_bytes` are held (then later items are read each time)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._cache_left = cache_bytes
        self._null_caption: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.items)

    def buckets(self) -> dict[tuple[int, int], list[int]]:
        """(height, width) in pixels -> indices of the items of that aspect-ratio bucket."""
        out: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(self.items):
            out.setdefault(tuple(item["bucket"]), []).append(i)
        return out

    def _tensors(self, shard: str) -> dict[str, Lazy]:
        if shard not in self._shards:
            path = self.root / shard
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing, though items/*.jsonl lists items in it: the features "
                                        "folder is damaged; delete their lines and run `pixart extract` again")
            try:
                self._shards[shard] = lazy_tensors([path])
            except WeightsError as e:
                raise ValueError(f"shard {path} is unreadable ({e}); delete it and its items' lines, then run "
                                 "`pixart extract` again") from None
            if len(self._shards) > OPEN_SHARDS:
                self._shards.popitem(last=False)
        self._shards.move_to_end(shard)
        return self._shards[shard]

    def _stored(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Item i's (caption, mean, std) as stored, from memory or from its shard."""
        if i in self._cache:
            return self._cache[i]
        item = self.items[i]
        tensors = self._tensors(item["shard"])
        key = item["id"]
        if f"{key}/caption" not in tensors:
            raise ValueError(f"{self.root / item['shard']} has no tensors of item {key!r}: the features folder is "
                             "damaged; delete the item's line and run `pixart extract` again")
        stored = tuple(tensors[f"{key}/{name}"]() for name in ("caption", "mean", "std"))
        size = sum(t.numel() * t.element_size() for t in stored)
        if size <= self._cache_left:
            self._cache[i], self._cache_left = stored, self._cache_left - size
        return stored

    def __getitem__(self, i: int) -> dict:
        """Item i: "id", "prompt", and as `batch` gives them for one item, the caption padded to max_length."""
        one = {name: t[0] for name, t in self.batch([i], self.max_length).items()}
        return {"id": self.items[i]["id"], "prompt": self.items[i]["prompt"], **one}

    def batch(self, indices: list[int], length: int, null: list[bool] | None = None) -> dict[str, torch.Tensor]:
        """Items `indices` stacked: "caption" (B, length, D) float32 zero-padded (cut to `length`), "mask" (B, length)
        int64, "mean"/"std" (B, C, h, w) float32; where `null[k]` is true, item k's caption is the null one (T5's
        embedding of the empty prompt)."""
        stored = [self._stored(i) for i in indices]
        null = null or [False] * len(indices)
        caption, mask = padded([self._null() if drop else c for drop, (c, _, _) in zip(null, stored)], length)
        return {"caption": caption, "mask": mask, "mean": torch.stack([m for _, m, _ in stored]).float(),
                "std": torch.stack([s for _, _, s in stored]).float()}

    def null_caption(self) -> tuple[torch.Tensor, torch.Tensor]:
        """T5's embedding of "" (the caption-dropout target) as ((max_length, D) float32, (max_length,) int64)."""
        caption, mask = padded([self._null()], self.max_length)
        return caption[0], mask[0]

    def _null(self) -> torch.Tensor:
        if self._null_caption is None:
            path = self.root / "null.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: run `pixart extract` into {self.root} again to write it")
            self._null_caption = lazy_tensors([path])["caption"]()
        return self._null_caption


def padded(captions: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_k, D) unmasked tokens each -> ((B, length, D) float32 zero-padded and cut to `length`, (B, length) int64
    mask)."""
    caption = torch.zeros(len(captions), length, captions[0].shape[-1], dtype=torch.float32)
    mask = torch.zeros(len(captions), length, dtype=torch.int64)
    for k, c in enumerate(captions):
        n = min(c.shape[0], length)
        caption[k, :n], mask[k, :n] = c[:n], 1
    return caption, mask


def epoch_batches(features: Features, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Deterministic global batches of one epoch: each batch from one bucket, order shuffled by (seed, epoch).

    Each bucket is shuffled and cut into full batches; a bucket's last, incomplete batch is dropped (every batch
    splits evenly over the processes), and a different remainder is dropped each epoch."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    batches = []
    buckets = features.buckets()
    for bucket in sorted(buckets):
        indices = buckets[bucket]
        order = [indices[j] for j in torch.randperm(len(indices), generator=generator).tolist()]
        batches += [order[k:k + batch_size] for k in range(0, len(order) - batch_size + 1, batch_size)]
    if not batches:
        sizes = ", ".join(f"{h}x{w}: {len(v)}" for (h, w), v in sorted(buckets.items()))
        raise ValueError(f"batch size {batch_size} is larger than every aspect-ratio bucket ({sizes} items): "
                         "use a smaller batch size or more images")
    return [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]
