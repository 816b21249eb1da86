"""On-disk cache of T5 prompt embeddings, so a repeated prompt never loads the text encoder."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

logger = logging.getLogger("pixart")

ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.safetensors")  # the sha256 of an entry's key: the only files evicted
DEFAULT_MAX_BYTES = 2 * 2**30  # ~1000 prompts of T5-XXL in bf16 at 120 tokens (0.94 MB each)


def default_cache_dir() -> Path:
    """$PIXART_CACHE, else $XDG_CACHE_HOME/pixart, else ~/.cache/pixart; embeddings live in its prompt-embeddings/."""
    root = os.environ.get("PIXART_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pixart"
    return Path(root) / "prompt-embeddings"


def fingerprint(*paths: Path, extra: dict | None = None) -> str:
    """Identity of a text encoder + tokenizer on disk: small files by content, large ones by name, size and mtime."""
    h = hashlib.sha256(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    for root in paths:
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            stat = path.stat()
            h.update(f"{path.relative_to(root)}:{stat.st_size}".encode())
            h.update(path.read_bytes() if stat.st_size < 2**24 else str(stat.st_mtime_ns).encode())
    return h.hexdigest()


class PromptCache:
    """One safetensors file per (encoder identity, text, max length, cleaning); least recently used evicted first."""

    def __init__(self, folder: str | os.PathLike | None = None, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes <= 0:
            raise ValueError(f"the prompt cache size must be positive, got {max_bytes} bytes")
        self.folder = Path(folder) if folder is not None else default_cache_dir()
        self.max_bytes = max_bytes

    def key(self, encoder_id: str, text: str, max_length: int, clean_caption: bool) -> str:
        blob = json.dumps([encoder_id, text, max_length, clean_caption], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(embeds (L, D), mask (L,)) or None; a corrupted entry is deleted and counts as a miss."""
        path = self.folder / f"{key}.safetensors"
        try:
            entry = load_file(path)
            embeds, mask = entry["embeds"], entry["mask"]
        except FileNotFoundError:
            return None
        except PermissionError as e:  # another user's cache: not ours to delete
            logger.warning("prompt cache entry %s cannot be read (%s): encoding the prompt", path, e)
            return None
        except (SafetensorError, OSError, KeyError) as e:
            logger.warning("prompt cache entry %s is unreadable (%s): deleting it", path, e)
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            return None
        with contextlib.suppress(OSError):  # recently used: evicted last (a read-only cache still serves)
            os.utime(path)
        return embeds, mask

    def put(self, key: str, embeds: torch.Tensor, mask: torch.Tensor) -> None:
        """Store one prompt's embedding; a full disk only costs the cache entry, never the generation."""
        path = self.folder / f"{key}.safetensors"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_file({"embeds": embeds.detach().cpu().contiguous(), "mask": mask.detach().cpu().contiguous()},
                      str(tmp))
            os.replace(tmp, path)
            self._evict()
        except (OSError, SafetensorError) as e:  # safetensors reports a write's I/O error as its own
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            logger.warning("could not write the prompt cache in %s (%s); continuing without it", self.folder, e)

    def _evict(self) -> None:
        """Delete least recently used entries until the cache fits its size (other processes may race us)."""
        entries = []
        for path in self.folder.glob("*.safetensors"):
            if not ENTRY_NAME.fullmatch(path.name):  # a file of the user's in a folder they chose: never ours
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
