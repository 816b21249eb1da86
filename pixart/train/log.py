"""Training progress: loss, learning rate, throughput and peak memory, on stdout and in <output>/log.jsonl."""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

from .. import dist


class RunLog:
    """Loss, learning rate, samples per second and peak memory: a line on stdout and in <output>/log.jsonl."""

    def __init__(self, output: Path, device: torch.device):
        self.path, self.device = output / "log.jsonl", device
        self.sums = torch.zeros(4, dtype=torch.float64)  # loss, mse, vb, items

        self.start, self.grad_norm = time.perf_counter(), None

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        """Count one step's per-item losses of this rank."""
        local = torch.stack([losses[k].sum().double().cpu() for k in ("loss", "mse", "vb")])
        self.sums += torch.cat([local, torch.tensor([len(losses["loss"])], dtype=torch.float64)])
        self.grad_norm = float(losses["grad_norm"]) if "grad_norm" in losses else None

    @property
    def pending(self) -> bool:
        """Steps were added since the last write."""
        return bool(self.sums[3])

    def write(self, step: int, lr: float, epoch: int) -> None:
        """Log the means over all ranks since the last write (a collective: every rank calls it)."""
        sums = self.sums.clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        elapsed = time.perf_counter() - self.start
        loss, mse, vb = (sums[:3] / sums[3]).tolist()
        record = {"step": step, "epoch": epoch, "loss": loss, "mse": mse, "vb": vb, "lr": lr,
                  "grad_norm": self.grad_norm, "samples_per_s": float(sums[3]) / elapsed,
                  "peak_memory_gb": peak_memory(self.device) / 2**30}
        self.sums.zero_()
        self.start = time.perf_counter()
        if dist.rank() != 0:
            return
        print(f"step {step}  loss {loss:.4f} (mse {mse:.4f}, vb {vb:.4f})  lr {lr:.2e}  "
              f"{record['samples_per_s']:.2f} samples/s  peak {record['peak_memory_gb']:.2f} GB", flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def peak_memory(device: torch.device) -> int:
    """Bytes: the CUDA allocator's peak on a GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
