"""Find and read weight files lazily: safetensors (single or sharded), `.bin`, `.pth`."""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch


class Lazy:
    """One tensor not read yet: call it to read; `shape` is known up front where the file format allows."""

    def __init__(self, read: Callable[[], torch.Tensor], shape: tuple[int, ...] | None = None):
        self.read, self.shape = read, shape

    def __call__(self) -> torch.Tensor:
        return self.read()

# Names diffusers and transformers give weight files, in the order we prefer them.
WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")
# A variant's file names (diffusers' and transformers' `_add_variant`, and diffusers' deprecated shard index name),
# to tell which variants a folder holds: model.fp16.safetensors, model.safetensors.index.fp16.json,
# model.safetensors.fp16.index.json
VARIANT_FILE = re.compile("(?:" + "|".join(WEIGHT_NAMES) + r")\."
                          r"(?:(?P<single>[^.-]+)(?:-\d{5}-of-\d{5})?\.(?:safetensors|bin)"
                          r"|(?:safetensors|bin)\.index\.(?P<index>[^.]+)\.json"
                          r"|(?:safetensors|bin)\.(?P<legacy>[^.]+)\.index\.json)")


class WeightsError(ValueError):
    """A weight file is missing, corrupted, or does not fit the model."""


def with_variant(name: str, variant: str | None) -> str:
    """The variant goes before the last extension, as diffusers and transformers name it: model.fp16.safetensors,
    model.safetensors.index.fp16.json (the index names the shards: model.fp16-00001-of-00002.safetensors)."""
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def weight_names(variant: str | None = None) -> list[str]:
    """The file names diffusers and transformers load weights from, in the order we look for them: shard indexes
    before single files, safetensors before `.bin`."""
    names = []
    for ext in ("safetensors", "bin"):
        for name in WEIGHT_NAMES:
            names.append(with_variant(f"{name}.{ext}.index.json", variant))
            if variant:  # diffusers' name for a variant's index before 0.28 (it still loads it)
                names.append(f"{name}.{ext}.{variant}.index.json")
            names.append(with_variant(f"{name}.{ext}", variant))
    return names


def weight_files(folder: str | Path, variant: str | None = None) -> list[Path]:
    """The weight files of a model folder (of `variant`: fp16, ...): sharded or single safetensors first, then
    `.bin`. Without a variant, the default weights, else the one variant the folder holds (a pipeline saved with
    variant= names every component's files so), else its one `.safetensors` or `.pth` file of another name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"model folder {folder} does not exist")
    for name in weight_names(variant):
        path = folder / name
        if path.is_file():
            return _shards(path) if name.endswith(".json") else [path]
    held = sorted(p.name for p in folder.iterdir())
    variants = sorted({v for m in map(VARIANT_FILE.fullmatch, held) if m for v in m.groups() if v})
    if not variant and len(variants) == 1:
        return weight_files(folder, variants[0])
    if not variant and not variants:
        others = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.pth")) + sorted(folder.glob("*.pt"))
        if len(others) == 1:
            return others
    raise WeightsError(_no_weights_message(folder, variant, held, variants))


def _no_weights_message(folder: Path, variant: str | None, held: list[str], variants: list[str]) -> str:
    listing = ", ".join(held) or "nothing"
    if variant:
        fixes = [f"download the {variant} variant (`huggingface-cli download <repo id> --include '*{variant}*'`)"]
        if any(n in held for n in weight_names()):
            fixes.insert(0, f"drop variant={variant!r} to load the default weights it holds")
        fixes[:0] = [f"pass variant={v!r}" for v in variants]
        return (f"no {variant!r} variant of the weights in {folder} (it holds: {listing}); expected "
                f"{with_variant('diffusion_pytorch_model.safetensors', variant)} or "
                f"{with_variant('model.safetensors', variant)}, or a shard index such as "
                f"{with_variant('model.safetensors.index.json', variant)}. Fix: {', or '.join(fixes)}")
    if variants:
        return (f"no default weights in {folder}, only the {' and '.join(map(repr, variants))} variants "
                f"(it holds: {listing}). Fix: pass variant= one of them")
    return (f"no weights found in {folder} (it holds: {listing}); expected diffusion_pytorch_model.safetensors, "
            "model.safetensors, a *.safetensors.index.json with its shards, or a .bin: download the model again")


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


# NumPy scalars, arrays and dtypes are data, safe to unpickle: training checkpoints keep their epoch and loss as
# NumPy scalars next to the state dict. The functions by both names: numpy.core (NumPy 1) and numpy._core (NumPy 2).
NUMPY_GLOBALS = [np.ndarray, np.dtype, *(type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG")] + [
    (f, f"numpy.{core}.multiarray.{f.__name__}")
    for f in (np.float64(0).__reduce__()[0], np.zeros(0).__reduce__()[0])  # scalar, _reconstruct
    for core in ("core", "_core")
]
CONVERT = ("python -c \"import torch, safetensors.torch as st; "
           "sd = torch.load('{path}', map_location='cpu', weights_only=False); sd = sd.get('state_dict', sd); "
           "st.save_file({{k: v.clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}}, '{out}')\"")


def _torch_file(path: Path, use_ema: bool) -> dict[str, Lazy]:
    is_zip = zipfile.is_zipfile(path)  # torch.save's format since 1.6; mmap needs it, a legacy file is read whole
    with torch.serialization.safe_globals(NUMPY_GLOBALS):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
        except pickle.UnpicklingError as e:
            unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path)) if is_zip else []
            raise _refused(path, unsafe, e) from None
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
            raise WeightsError(f"{path} is truncated, corrupted or not a PyTorch checkpoint ({e}): "
                               "download it again") from None
    if isinstance(obj, dict):
        for name in (("state_dict_ema", "state_dict") if use_ema else ("state_dict",)) + ("model", "module"):
            if isinstance(obj.get(name), dict):
                obj = obj[name]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return {k: Lazy(lambda t=t: t, tuple(t.shape)) for k, t in obj.items()}


def _refused(path: Path, unsafe: list[str], e: Exception) -> WeightsError:
    """torch.load(weights_only=True) refused the file: for the Python objects it holds (named where the zip format
    lets us list them), or because a legacy file is cut short (the two read alike there)."""
    convert = ("if you trust where the file comes from, convert its weights to safetensors once and load that "
               f"file:\n    {CONVERT.format(path=path, out=path.with_suffix('.safetensors'))}")
    if unsafe:
        return WeightsError(f"{path} holds Python objects beyond tensors ({', '.join(unsafe)}), which torch refuses to "
                            f"unpickle for safety (torch.load(weights_only=True)). Fix: {convert}")
    reason = " ".join(str(e).partition("WeightsUnpickler error:")[2].partition("Check the documentation")[0].split())
    return WeightsError(f"{path} cannot be read safely ({reason[:200] or e}): it is truncated or corrupted, or it "
                        "holds Python objects beyond tensors, which torch refuses to unpickle for safety. Fix: download "
                        f"it again; or, {convert}")
