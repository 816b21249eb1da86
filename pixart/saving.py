"""A pipeline saved as a diffusers folder: one folder per component, then model_index.json.

What is written is what the pipeline holds (its dtype, a fused LoRA merged into the transformer), in the layout that
diffusers' and pixart's `from_pretrained` read. Each file is replaced whole or not at all, and the checks that can
fail (an unfused LoRA, a quantized transformer, the free disk space) run before anything is written.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .components import COMPONENTS, MODELS, is_available, release, weights_bytes
from .configs import read_json, write_json

logger = logging.getLogger("pixart")

# component -> (library, class) as diffusers' model_index.json names them
LIBRARIES = {"tokenizer": ("transformers", "T5Tokenizer"), "text_encoder": ("transformers", "T5EncoderModel"),
             "vae": ("diffusers", "AutoencoderKL"), "transformer": ("diffusers", "PixArtTransformer2DModel")}
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release whose layout this writes (diffusers reads the key)
SAVE_ORDER = ("transformer", "vae", "text_encoder", "tokenizer")  # the transformer, likeliest to refuse, first


def save_pipeline(pipe: Any, folder: str | os.PathLike) -> None:
    """Write `pipe`'s components under `folder` and model_index.json last (a folder without it is incomplete)."""
    folder = check_folder(folder)
    present = [name for name in SAVE_ORDER if is_available(pipe, name)]
    if pipe.lora.weights and pipe.lora.fused is None:
        raise ValueError("the transformer has LoRA adapters that are not fused: pipe.fuse_lora() to save them merged "
                         "into its weights, or pipe.unload_lora_weights() to save the model without them")
    transformer = pipe._loaded.get("transformer")
    if getattr(transformer, "quantization", None) is not None:
        raise ValueError("a transformer quantized while loading is not saved: load the pipeline without "
                         "transformer_quantization to save it, and quantize when loading the saved folder")
    check_space(pipe, folder, present)
    index = {"_class_name": "PixArtAlphaPipeline", "_diffusers_version": DIFFUSERS_VERSION,
             "scheduler": ["diffusers", pipe.scheduler.class_name]}
    index |= {name: [None, None] for name in LIBRARIES}
    written: list[str] = []
    try:
        for name in present:
            was_loaded = pipe._loaded.get(name) is not None
            module = getattr(pipe, name)  # a staged model loads here (with its LoRA), and is released after
            try:
                module.save_pretrained(folder / name)
                index[name] = index_entry(pipe, name, module)
            finally:
                del module
                if not was_loaded:
                    release(pipe, name)
            written.append(f"{name}/")
        pipe.scheduler.save_pretrained(folder / "scheduler")
        write_json(folder / "model_index.json", dict(sorted(index.items())))
    except OSError as e:
        done = f"replaced whole: {', '.join(written)}; the rest is as it was" if written else "nothing was written"
        raise OSError(e.errno, f"saving the pipeline in {folder} failed ({e.strerror or e}: {e.filename or ''}): "
                               f"{done}; fix that and save again") from e


def check_folder(folder: str | os.PathLike) -> Path:
    """The folder to save in, refused when it cannot be: empty, a file, under a file, or not writable."""
    if not str(folder).strip():
        raise ValueError("save_pretrained needs a folder to write to, got an empty path")
    folder = Path(folder)
    existing = nearest_existing(folder)
    if not existing.is_dir():
        where = "is" if existing == folder else f"is under {existing}, which is"
        raise FileExistsError(f"{folder} {where} a file: save_pretrained writes a folder, choose another path")
    writable = [existing, *(p for p in existing.iterdir() if p.name in COMPONENTS and p.is_dir())] \
        if existing == folder else [existing]
    for path in writable:
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write in {path}: save the pipeline elsewhere, or make it writable; "
                                  "nothing was written")
    return folder


def pipeline_index(pipe: Any) -> dict[str, Any]:
    """diffusers' `pipe.config`: [library, class] of each component (as save_pretrained would write them, without
    loading a staged model; None for one left out) and `_name_or_path`."""
    entries = {name: tuple(index_entry(pipe, name, pipe._loaded.get(name))) if is_available(pipe, name)
               else (None, None) for name in LIBRARIES}
    return {**entries, "scheduler": ("diffusers", pipe.scheduler.class_name), "_name_or_path": pipe.name_or_path}


def nearest_existing(folder: Path) -> Path:
    """The folder, or its nearest ancestor that exists (what a save would create folders under)."""
    return next(p for p in (folder, *folder.parents) if p.exists())


def index_entry(pipe: Any, name: str, module: Any) -> list[str]:
    """model_index.json's [library, class] of a component: a transformers object's own class; a tokenizer read from
    files keeps its source folder's entry (a T5 sentencepiece tokenizer, or a PreTrainedTokenizerFast one); a
    quantized T5 is named as pixart's, which diffusers refuses to load (transformers would read its integer weights
    as floats, without an error)."""
    if type(module).__module__.startswith("transformers."):
        return ["transformers", type(module).__name__]
    if name == "text_encoder" and getattr(module, "quantization", None) is not None:
        logger.warning("the text encoder is saved quantized: pixart loads the folder, diffusers and transformers do not")
        return ["pixart", "T5EncoderModel"]
    source = read_index(pipe._sources[name].parent) if name in pipe._sources else {}
    return list(source[name]) if name == "tokenizer" and source.get(name) else list(LIBRARIES[name])


def read_index(folder: Path) -> dict[str, Any]:
    return read_json(folder / "model_index.json", {})


def absent_components(folder: Path) -> set[str]:
    """The components a folder's model_index.json marks as left out ([null, null]: saved without them)."""
    names = read_index(folder)
    return {name for name in COMPONENTS if name in names and names[name] in (None, [None, None])}


def check_space(pipe: Any, folder: Path, present: list[str]) -> None:
    """OSError naming the sizes unless the free space takes the weights to write (those they replace counted back,
    the largest file twice: it is written beside the one it replaces)."""
    new = [model_bytes(pipe, name) for name in present if name in MODELS]
    old = [sum(f.stat().st_size for f in (folder / name).glob("*.safetensors")) for name in present
           if (folder / name).is_dir()]
    need = sum(new) - sum(old) + (max(new) if old and new else 0)
    free = shutil.disk_usage(nearest_existing(folder)).free
    if need > free:
        raise OSError(f"not enough disk space to save the pipeline in {folder}: it needs {need / 1e9:.2f} GB, "
                      f"{free / 1e9:.2f} GB are free: free some space or choose another disk; nothing was written")


def model_bytes(pipe: Any, name: str) -> int:
    """The bytes of a model's weights: its tensors when loaded, else its folder's weights in the pipeline's dtype."""
    module = pipe._loaded.get(name)
    if module is not None:
        return sum(t.numel() * t.element_size() for t in module.state_dict().values())
    return weights_bytes(pipe._sources[name], pipe.dtype)
