"""Find and read weight files lazily: safetensors (single or sharded), `.bin`, `.pth`."""
from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open



class Lazy:
    """One tensor not read yet: call it to read; `shape` is known up front where the file format allows."""

    def __init__(self, read: Callable[[], torch.Tensor], shape: tuple[int, ...] | None = None):
        self.read, self.shape = read, shape

    def __call__(self) -> torch.Tensor:
        return self.read()

# Names diffusers and transformers give single-file weights, in the order we prefer them.
WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")


class WeightsError(ValueError):
    """A weight file is missing, corrupted, or does not fit the model."""


def weight_files(folder: str | Path, variant: str | None = None) -> list[Path]:
    """The weight files of a model folder: sharded or single safetensors first, then `.bin`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"model folder {folder} does not exist")
    suffix = f".{variant}" if variant else ""
    for ext in (".safetensors", ".bin"):
        for name in WEIGHT_NAMES:
            index = folder / f"{name}{suffix}{ext}.index.json"
            if index.is_file():
                return _shards(index)
            single = folder / f"{name}{suffix}{ext}"
            if single.is_file():
                return [single]
    others = sorted(folder.glob(f"*{suffix}.safetensors")) or sorted(folder.glob("*.pth")) + sorted(folder.glob("*.pt"))
    if len(others) == 1:
        return others
    listing = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    raise WeightsError(
        f"no weights found in {folder} (it holds: {listing}); expected diffusion_pytorch_model.safetensors, "
        "model.safetensors, a *.safetensors.index.json with its shards, or a .bin: download the model again"
    )


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise WeightsError(f"shard index {index} is corrupted ({e!r}): download it again") from None
    shards = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise WeightsError(f"shard index {index} names files that are missing: {missing}; download them again")
    return shards


def lazy_tensors(files: list[Path], use_ema: bool = False) -> dict[str, Lazy]:
    """key -> a function that reads that one tensor, so a model can be loaded (and cast) tensor by tensor."""
    out: dict[str, Lazy] = {}
    for path in files:
        reader = _safetensors if path.suffix == ".safetensors" else _torch_file
        for key, fn in reader(path, use_ema).items():
            if key in out:
                raise WeightsError(f"key {key} appears in two weight files (second: {path})")
            out[key] = fn
    return out


def _safetensors(path: Path, use_ema: bool) -> dict[str, Lazy]:
    try:
        f = safe_open(str(path), framework="pt")
        keys = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path} is truncated or corrupted ({e}): delete it and download it again") from None
    size = path.stat().st_size

    def getter(key: str) -> Lazy:
        def read() -> torch.Tensor:
            try:
                return f.get_tensor(key)
            except (SafetensorError, OSError) as e:
                raise WeightsError(f"{path} ({size} bytes) cannot be read at {key} ({e}): download it again") from None

        return Lazy(read, tuple(f.get_slice(key).get_shape()))

    _check_safetensors_size(path, size)
    return {k: getter(k) for k in keys}


def _check_safetensors_size(path: Path, size: int) -> None:
    """A truncated file can still have a valid header: check the data it promises is all there."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise WeightsError(
            f"{path} is truncated: it holds {size} bytes but its header promises {8 + n + end}; download it again"
        )


def _torch_file(path: Path, use_ema: bool) -> dict[str, Lazy]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise WeightsError(f"{path} is truncated, corrupted or not a PyTorch checkpoint ({e}): download it again") from None
    if isinstance(obj, dict):
        for name in (("state_dict_ema", "state_dict") if use_ema else ("state_dict",)) + ("model", "module"):
            if isinstance(obj.get(name), dict):
                obj = obj[name]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return {k: Lazy(lambda t=t: t, tuple(t.shape)) for k, t in obj.items()}
