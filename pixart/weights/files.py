"""Find and read weight files lazily: safetensors (single or sharded), `.bin`, `.pth`."""
from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Callable

import torch



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


# safetensors dtype names -> torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _safetensors(path: Path, use_ema: bool) -> dict[str, Lazy]:
    """Each tensor read on demand with one positioned read of its bytes (the header gives the offsets).

    Not mmap: every page of a mapped file that is touched counts in the process's RSS until unmapped, so reading a
    10 GB fp32 shard to cast it to bf16 would show 10 GB. A plain read leaves only the tensor itself in memory."""
    header, data_start = _safetensors_header(path)
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{path} has an unreadable header entry for {key} ({e!r}): download it again") from None
        out[key] = Lazy(_reader(path, data_start + begin, end - begin, dtype, shape), shape)
    return out


def _reader(path: Path, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]):
    def read() -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        buf = bytearray(nbytes)
        with open(path, "rb") as f:
            f.seek(offset)
            if f.readinto(buf) != nbytes:
                raise WeightsError(f"{path} ended early while reading a tensor: it is truncated; download it again")
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    return read


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset of the data); checks that the data it promises is all in the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in {size} bytes")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise WeightsError(f"{path} is truncated or corrupted ({e}): delete it and download it again") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise WeightsError(
            f"{path} is truncated: it holds {size} bytes but its header promises {8 + n + end}; download it again"
        )
    return header, 8 + n


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
