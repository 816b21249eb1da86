"""`pixart train`'s options (the paper's recipe as defaults) and the check that each can work, run before anything
is loaded: an error names the command-line flag and the fix."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from .. import dist
from ..hardware import available_device

MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# the numeric options by what they accept (None, where an option allows it, means its default)
AT_LEAST_1 = ("batch_size", "gradient_accumulation_steps", "max_steps", "epochs", "log_every", "sample_steps",
              "sample_size", "threads")
AT_LEAST_0 = ("warmup_steps", "checkpoint_every", "keep_checkpoints", "sample_every", "lora_rank")  # 0: off / all
POSITIVE = ("lr", "adam_eps", "lora_alpha")
NOT_NEGATIVE = ("weight_decay", "grad_clip")  # 0: off


@dataclass(frozen=True)
class TrainOptions:
    """Everything `pixart train` takes; the defaults are the paper's (AdamW 2e-5, wd 0.03, clip 0.01, EMA 0.9999)."""

    features: str
    output: str
    model: str | None = None  # a pipeline folder: its transformer is fine-tuned, its other components copied
    config: str | None = None  # a transformer config.json: train from scratch (with --model: its other parts)
    batch_size: int = 8  # global, split over the processes
    gradient_accumulation_steps: int = 1  # micro-batches each process splits its share into (less memory, same step)
    max_steps: int | None = None
    epochs: int | None = None
    max_time: float | None = None  # seconds of training in this process: then a checkpoint, the model, and stop
    seed: int = 0
    lr: float = 2e-5
    weight_decay: float = 0.03
    adam_eps: float = 1e-10
    warmup_steps: int = 1000
    grad_clip: float = 0.01
    ema_decay: float | None = None  # None: 0.9999 for a full fine-tune, off (0) for LoRA
    caption_dropout: float = 0.1
    mixed_precision: str | None = None  # None: bf16 / fp16 where the device runs it natively, else no
    gradient_checkpointing: bool = False
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the processes (FSDP2) instead of DDP
    device: str | None = None
    threads: int | None = None  # None: torch's default, or this rank's share of the cores under torchrun
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: str | None = None  # "auto" or a checkpoint folder
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 20
    sample_guidance: float = 4.5
    sample_size: int | None = None
    sample_seed: int = 0
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] | None = None

    @classmethod
    def from_args(cls, args: Any) -> TrainOptions:
        """From the CLI's namespace: the fields of the same names, lists as tuples."""
        values = {f.name: getattr(args, f.name) for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _flag(name: str) -> str:
    """The command-line flag of a TrainOptions field."""
    return "--" + name.replace("_", "-")


def check_options(o: TrainOptions) -> None:
    """Raise a ValueError naming the first option that cannot work, and how to fix it."""
    if o.model is None and o.config is None:
        raise ValueError("give --model PIPELINE_FOLDER to fine-tune, or --config CONFIG.json to train from scratch")
    if o.max_steps is None and o.epochs is None and o.max_time is None:
        raise ValueError("give --max-steps N, --epochs N or --max-time DURATION: how long to train")
    if o.max_time is not None and not o.max_time > 0:
        raise ValueError(f"--max-time must be a positive duration (90s, 30m, 2h), got {o.max_time} seconds")
    for names, least in ((AT_LEAST_1, 1), (AT_LEAST_0, 0)):
        for name, value in ((n, getattr(o, n)) for n in names):
            if value is not None and value < least:
                raise ValueError(f"{_flag(name)} must be at least {least}, got {value}")
    for name, value in ((n, getattr(o, n)) for n in POSITIVE):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{_flag(name)} must be a positive number, got {value}")
    for name, value in ((n, getattr(o, n)) for n in NOT_NEGATIVE):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{_flag(name)} must be 0 (off) or a positive number, got {value}")
    if not math.isfinite(o.sample_guidance):
        raise ValueError(f"--sample-guidance must be a finite number, got {o.sample_guidance}")
    if not 0 <= o.caption_dropout <= 1:
        raise ValueError(f"--caption-dropout is a probability in [0, 1], got {o.caption_dropout}")
    if o.ema_decay is not None and not 0 <= o.ema_decay < 1:
        raise ValueError(f"--ema-decay must be in [0, 1) (0 turns EMA off), got {o.ema_decay}")
    if o.mixed_precision not in (None, *MIXED_PRECISION):
        raise ValueError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, got {o.mixed_precision!r}")
    if o.device is not None:
        try:
            available_device(o.device)
        except ValueError as e:
            raise ValueError(f"--device {o.device!r} is not a device this machine has: {e}") from None
    if o.sample_every and not o.sample_prompts:
        raise ValueError("--sample-every needs --sample-prompts 'a prompt' ...")
    if o.sample_every and o.model is None:
        raise ValueError("sample images need a text encoder and a VAE: give --model PIPELINE_FOLDER with --sample-every")
    if o.batch_size < dist.world_size():
        raise ValueError(f"--batch-size {o.batch_size} is the global batch, split over {dist.world_size()} "
                         "processes: make it at least the number of processes")
    share = o.batch_size // dist.world_size()
    if o.gradient_accumulation_steps > share:
        raise ValueError(f"--gradient-accumulation-steps {o.gradient_accumulation_steps} splits each process's share "
                         f"of the batch ({share} of --batch-size {o.batch_size}) into micro-batches: make it at most "
                         f"{share}")
