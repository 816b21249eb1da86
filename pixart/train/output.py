"""The output folder (-o) of `pixart extract` and `pixart train`, checked before any model is loaded or trained: it can
be created and written, has room for what the run writes, and (train) is apart from the model the run reads and
holds no finished run that saving would overwrite."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .checkpoint import list_checkpoints
from .model import LORA_FILE, OTHER_COMPONENTS, RAW_VARIANT

# what save_trained writes: a pipeline folder, or a LoRA
TRAINED = ("model_index.json", "transformer", *OTHER_COMPONENTS, LORA_FILE,
           LORA_FILE.replace(".safetensors", f".{RAW_VARIANT}.safetensors"))


def writable_folder(folder: Path) -> None:
    """Create `folder` (where missing) and write a file in it, or raise naming it and the fix."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"-o {folder} is a file, not a folder: give a folder (it is created where missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OSError(f"-o {folder} cannot be created or written ({e.strerror or e}): give a folder on a writable "
                      "file system, where this user may write") from None


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse a run whose files (`what`, about `needed` bytes) do not fit in the free space of `folder`."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(f"-o {folder} has {_size(free)} free, but the run writes about {_size(needed)} there ({what}): "
                      "free some space, or give an -o on another disk")


def check_output(output: Path, source: str | None, resume: str | None) -> None:
    """The checks of `pixart train`'s output folder, before the model loads: apart from the source model folder,
    no finished run in it unless this run resumes it, writable."""
    if source is not None:
        out, src = output.resolve(), Path(source).resolve()
        relation = ("is" if out == src else "is inside" if src in out.parents else "holds" if out in src.parents
                    else None)
        if relation:
            # saving there would overwrite the model being read: its transformer, and (hard-linked) its other parts
            raise ValueError(f"-o {output} {relation} the model folder of --model {source}: saving would overwrite "
                             "that model; give an -o outside that folder (and not one above it)")
    checkpoints = list_checkpoints(output)
    if checkpoints and resume is None:
        raise ValueError(f"{output} already holds checkpoints of a run: continue it with --resume auto, or give "
                         "another -o")
    trained = [name for name in TRAINED if (output / name).exists()]
    if trained and (resume is None or resume == "auto" and not checkpoints):
        unresumable = "; --resume auto finds no checkpoint there to continue" if resume == "auto" else ""
        raise ValueError(f"-o {output} already holds a trained model ({', '.join(trained)}), which this run would "
                         f"overwrite{unresumable}: give another -o, or delete that folder to train again")
    writable_folder(output)


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"
