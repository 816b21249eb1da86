"""Training checkpoints: one folder per step under <output>/checkpoints, written atomically, the last K kept."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
PREFIX = "step-"


def checkpoint_dir(output: Path) -> Path:
    return output / "checkpoints"


def list_checkpoints(output: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (a half-written one is still a hidden tmp folder)."""
    root = checkpoint_dir(output)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def save_checkpoint(output: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as checkpoints/step-N: into a tmp folder, fsynced, renamed; then drop all but the last `keep`."""
    root = checkpoint_dir(output)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)  # a checkpoint of this step from an earlier, abandoned attempt
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(output)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def find_checkpoint(resume: str, output: Path) -> Path | None:
    """The checkpoint `--resume` names: "auto" is the newest in the output folder (None when there is none yet)."""
    if resume == "auto":
        found = list_checkpoints(output)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {resume}: no {STATE_FILE} there; pass a folder such as "
                                f"{checkpoint_dir(output) / (PREFIX + '00001000')}, or --resume auto for the newest")
    return path


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """The state saved by save_checkpoint, its tensors on `device` (the generator state stays on the CPU)."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    for key in ("model", "ema"):
        if state.get(key) is not None:
            state[key] = {k: v.to(device) for k, v in state[key].items()}
    return state
