"""`pixart train`: fine-tune (or train from scratch) the transformer on extracted features, as PixArt-α trains (§2.3).

One process or many under torchrun: every rank draws the timesteps and noise of the whole global batch from one
seeded generator and keeps its share (batch[rank::world]), so a run is the same on any number of processes and
resumes exactly from a checkpoint.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from time import monotonic

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from .. import dist
from ..components import load_scheduler
from ..configs import SchedulerConfig
from ..hardware import default_device, default_dtype, set_threads
from ..inputs import micro_conditions
from ..lora import DEFAULT_TARGETS
from ..models.transformer import PixArtTransformer2DModel
from ..weights.hub import resolve
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .data import Features, epoch_batches
from .diffusion import Schedule, training_losses
from .log import RunLog
from .model import EMA, OTHER_COMPONENTS, averaged, build_model, save_trained
from .options import MIXED_PRECISION, TrainOptions, check_options
from .output import check_free_space, check_output
from .samples import SampleWriter

# options a resumed run must share with the run that saved the checkpoint, or it would not continue that run
RESUME_KEYS = ("batch_size", "seed", "caption_dropout", "lora_rank", "lora_alpha", "lora_targets")


def mixed_precision_dtype(o: TrainOptions, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: the option's, or by default bf16/fp16 where the device runs it natively."""
    if o.mixed_precision is not None:
        return MIXED_PRECISION[o.mixed_precision]
    dtype = default_dtype(device)
    return None if dtype == torch.float32 else dtype


@dataclass
class Progress:
    """Where the run is: optimizer steps done, and the next batch (epoch, index in that epoch's batch list)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


class Trainer:
    """The model, optimizer, EMA, data position and random generator of one training run."""

    def __init__(self, o: TrainOptions):
        self.o = o
        self.output = Path(o.output)
        self.device = torch.device(o.device) if o.device else default_device()
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (dist.init set it)
        self.autocast = mixed_precision_dtype(o, self.device)
        self.features = Features(o.features)
        self.null_tokens = int(self.features.null_caption()[1].sum())  # T5 of "": its unmasked positions
        # a Hub id becomes its local snapshot, with the components this run reads or copies
        wanted = ["transformer", "scheduler"] + (list(OTHER_COMPONENTS) if o.sample_every or not o.lora_rank else [])
        self.source = str(resolve(o.model, components=wanted)) if o.model else None
        check_output(self.output, self.source, o.resume)
        self.model = build_model(self.source, o.config, o.seed, o.lora_rank, o.lora_alpha, o.lora_targets)
        self._check_features()
        scheduler = Path(self.source) / "scheduler" if self.source else None
        config = load_scheduler(scheduler) if scheduler and scheduler.is_dir() else SchedulerConfig()
        if config.prediction_type != "epsilon":
            raise ValueError(f"the model's scheduler predicts {config.prediction_type!r}; training supports epsilon")
        self.schedule = Schedule.from_config(config)
        if o.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.model.to(self.device).train()
        self.sharded = o.fsdp and dist.world_size() > 1
        if self.sharded:
            for block in self.model.transformer_blocks:
                fully_shard(block)
            fully_shard(self.model)
        self._export: PixArtTransformer2DModel | None = None  # rank 0's whole copy of a sharded model
        self.params = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=o.lr, weight_decay=o.weight_decay,
                                           eps=o.adam_eps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast == torch.float16)
        decay = o.ema_decay if o.ema_decay is not None else (0.0 if o.lora_rank else 0.9999)
        self.ema = EMA(self.params, decay) if decay > 0 else None
        self._check_free_space()
        self.generator = torch.Generator().manual_seed(o.seed)
        self.progress = Progress()
        self._resume()
        self.net = self.model
        if dist.world_size() > 1 and not self.sharded:
            self.net = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.samples = None
        if o.sample_every and dist.rank() == 0:
            self.samples = SampleWriter(self.source, list(o.sample_prompts), self.device, self.features.max_length,
                                        o.sample_steps, o.sample_guidance, o.sample_seed, o.sample_size)

    def _check_features(self) -> None:
        """The features, and the sample images' size, fit the transformer."""
        index, config = self.features.index, self.model.config
        multiple = index["vae_scale_factor"] * config.patch_size
        if self.o.sample_every and self.o.sample_size and self.o.sample_size % multiple:
            raise ValueError(f"--sample-size {self.o.sample_size} must be a multiple of {multiple} px (VAE factor "
                             f"{index['vae_scale_factor']} x patch size {config.patch_size})")
        if index["caption_dim"] != config.caption_channels:
            raise ValueError(f"the features hold {index['caption_dim']}-wide captions but the transformer takes "
                             f"{config.caption_channels}: extract them with this model's text encoder")
        if index["latent_channels"] != config.in_channels:
            raise ValueError(f"the features hold {index['latent_channels']}-channel latents but the transformer takes "
                             f"{config.in_channels}: extract them with this model's VAE")

    def _check_free_space(self) -> None:
        """The output holds what the run writes: fp32 weights (and EMA), and a checkpoint (also Adam's 2 moments)."""
        count = sum(p.numel() for p in self.params.values())  # a DTensor's numel is the whole tensor's
        copies, what = (2, "the trained weights and their EMA") if self.ema else (1, "the trained weights")
        if self.o.checkpoint_every or self.o.max_time is not None:
            copies, what = copies + (4 if self.ema else 3), what + ", a checkpoint"
        check_free_space(self.output, 4 * count * copies, what)

    def _resume(self) -> None:
        if self.o.resume is None:  # check_output refused an output holding checkpoints
            return
        path = find_checkpoint(self.o.resume, self.output)
        if path is None:
            dist.print0(f"no checkpoint in {self.output}: starting from the beginning")
            return
        self.load_state_dict(load_checkpoint(path, self.device))
        dist.print0(f"resumed from {path} at step {self.progress.step}")

    def state_dict(self) -> dict:
        """The whole run, as full tensors keyed by parameter name (under FSDP a collective: every rank calls it)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {
            "progress": asdict(self.progress), "options": {k: getattr(self.o, k) for k in RESUME_KEYS},
            "model": {name: whole(p) for name, p in self.params.items()},
            "ema": {name: whole(t) for name, t in self.ema.shadow.items()} if self.ema else None,
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=options),
            "scaler": self.scaler.state_dict(), "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state["options"]
        changed = [k for k in RESUME_KEYS if saved.get(k) != getattr(self.o, k)]
        if changed:
            raise ValueError("the checkpoint was trained with other " + ", ".join(
                f"--{k.replace('_', '-')} ({saved.get(k)!r}, now {getattr(self.o, k)!r})" for k in changed)
                + ": resume with the same values, or start a new run in another --output")
        for name, p in self.params.items():
            assign(p, state["model"][name])
        if self.ema and state["ema"]:
            for name, t in self.ema.shadow.items():
                assign(t, state["ema"][name])
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        self.progress = Progress(**state["progress"])

    def next_batch(self) -> list[int] | None:
        """The next global batch of item indices, or None when the --epochs are done."""
        p, o = self.progress, self.o
        while True:
            if o.epochs is not None and p.epoch >= o.epochs:
                return None
            if getattr(self, "_batches_of", None) != p.epoch:
                self._batches, self._batches_of = epoch_batches(self.features, o.batch_size, o.seed, p.epoch), p.epoch
            if p.batch < len(self._batches):
                p.batch += 1
                return self._batches[p.batch - 1]
            p.epoch, p.batch = p.epoch + 1, 0

    def _inputs(self, batch: list[int]) -> dict[str, torch.Tensor]:
        """This rank's share of the batch: clean latents, noise, timesteps and captions (dropped to the null one)."""
        rank, world = dist.rank(), dist.world_size()
        mine = slice(rank, None, world)
        g = self.generator
        t = torch.randint(0, self.schedule.num_timesteps, (len(batch),), generator=g)
        drop = torch.rand(len(batch), generator=g) < self.o.caption_dropout
        # every caption is cut to the longest of the global batch: the rest is padding, masked out anyway
        length = max([self.null_tokens] + [self.features.items[i]["tokens"] for i in batch])
        items = self.features.batch(batch[mine], length, null=drop[mine].tolist())
        mean, std = items["mean"], items["std"]
        shape = (len(batch), *mean.shape[1:])
        # the whole global batch is drawn on every rank, in this order, so any process count draws the same
        latent_noise = torch.randn(shape, generator=g)
        noise = torch.randn(shape, generator=g)
        x0 = (mean + std * latent_noise[mine]) * self.features.index["scaling_factor"]  # (b, C, h, w)
        caption, mask = items["caption"], items["mask"]
        moved = {"x0": x0, "noise": noise[mine], "t": t[mine], "caption": caption, "mask": mask}
        return {k: v.to(self.device) for k, v in moved.items()}

    def step(self, batch: list[int]) -> dict[str, torch.Tensor]:
        """One optimizer step on a global batch; returns this rank's per-item losses.

        With --gradient-accumulation-steps N this rank's share runs as N micro-batches, their gradients summed before
        the ranks exchange them once: the same step as one pass up to float rounding, with 1/N of the activations."""
        o, inputs = self.o, self._inputs(batch)
        micro = [dict(zip(inputs, parts)) for parts in zip(*(v.tensor_split(o.gradient_accumulation_steps)
                                                             for v in inputs.values()))]
        per_item = []
        for k, part in enumerate(micro):
            with self._gradient_sync(k == len(micro) - 1):
                per_item.append(self._forward_backward(part, len(batch)))
        losses = {key: torch.cat([p[key] for p in per_item]) for key in per_item[0]}
        lr = o.lr * min(1.0, (self.progress.step + 1) / o.warmup_steps) if o.warmup_steps > 0 else o.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        if o.grad_clip > 0:
            losses["grad_norm"] = whole(torch.nn.utils.clip_grad_norm_(self.params.values(), o.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema:
            self.ema.update()
        self.progress.step += 1
        return {k: v.detach() for k, v in losses.items()}

    def _forward_backward(self, inputs: dict[str, torch.Tensor], global_batch: int) -> dict[str, torch.Tensor]:
        """Forward and backward of one (micro-)batch of this rank; its per-item losses."""
        x0, noise, t = inputs["x0"], inputs["noise"], inputs["t"]
        x_t = self.schedule.add_noise(x0, noise, t)
        bucket_h, bucket_w = (s * self.features.index["vae_scale_factor"] for s in x0.shape[-2:])
        conditions = micro_conditions(self.model.config, bucket_h, bucket_w, len(t), self.device, torch.float32)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            out = self.net(x_t, t, inputs["caption"], inputs["mask"], **conditions)
        losses = training_losses(self.schedule, out.float(), x0, noise, x_t, t)
        # DDP and FSDP average the ranks' gradients: scaling by world / B makes that the mean over the global batch
        loss = losses["loss"].sum() * (dist.world_size() / global_batch)
        self.scaler.scale(loss).backward()
        return losses

    def _gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Whether this backward exchanges gradients between the ranks (only the last micro-batch's does)."""
        if sync or dist.world_size() == 1:
            return contextlib.nullcontext()
        if self.sharded:
            self.model.set_requires_gradient_sync(False)
            return _restore_gradient_sync(self.model)
        return self.net.no_sync()

    def run(self) -> None:
        o, log = self.o, RunLog(self.output, self.device)
        mode = ("FSDP" if self.sharded else "DDP") if dist.world_size() > 1 else "1 process"
        count = sum(p.numel() for p in self.params.values())  # a DTensor's numel is the whole tensor's
        dist.print0(f"training {count / 1e6:.1f}M parameters ({mode}, {dist.world_size()} x {self.device}, "
                    f"{str(self.autocast or torch.float32).removeprefix('torch.')}) from step {self.progress.step}")
        start = monotonic()
        while o.max_steps is None or self.progress.step < o.max_steps:
            if o.max_time is not None and dist.all_sum(int(monotonic() - start >= o.max_time)):
                dist.print0(f"--max-time reached at step {self.progress.step}: a checkpoint, then the model")
                if not (o.checkpoint_every and self.progress.step % o.checkpoint_every == 0):
                    state = self.state_dict()
                    if dist.rank() == 0:
                        save_checkpoint(self.output, self.progress.step, state, o.keep_checkpoints)
                    dist.barrier()
                break
            batch = self.next_batch()
            if batch is None:
                break
            losses = self.step(batch)
            log.add(losses)
            step = self.progress.step
            if step % o.log_every == 0:
                log.write(step, self.optimizer.param_groups[0]["lr"], self.progress.epoch)
            if o.checkpoint_every and step % o.checkpoint_every == 0:
                state = self.state_dict()
                if dist.rank() == 0:
                    save_checkpoint(self.output, step, state, o.keep_checkpoints)
                dist.barrier()
            if o.sample_every and step % o.sample_every == 0:
                net, ema = self.exported()
                if self.samples is not None:
                    with averaged(ema):
                        self.samples.write(net, self.output / "samples", step)
        if log.pending:
            log.write(self.progress.step, self.optimizer.param_groups[0]["lr"], self.progress.epoch)
        net, ema = self.exported()
        if dist.rank() == 0:
            lora = (o.lora_rank, o.lora_alpha or o.lora_rank, o.lora_targets or DEFAULT_TARGETS) if o.lora_rank else None
            written = save_trained(net, ema, self.output, self.source, lora)
            print(f"saved {', '.join(str(p) for p in written)}", flush=True)
        dist.barrier()

    def exported(self) -> tuple[PixArtTransformer2DModel | None, EMA | None]:
        """The model and its EMA with whole tensors, on rank 0 (under FSDP gathered into a copy: a collective)."""
        if not self.sharded:
            return self.model, self.ema
        params = {name: whole(p) for name, p in self.params.items()}
        shadow = {name: whole(t) for name, t in self.ema.shadow.items()} if self.ema else None
        if dist.rank() != 0:
            return None, None
        if self._export is None:
            o = self.o
            self._export = build_model(self.source, o.config, o.seed, o.lora_rank, o.lora_alpha, o.lora_targets)
            self._export.to(self.device)
        trainable = {name: p for name, p in self._export.named_parameters() if p.requires_grad}
        for name, p in trainable.items():
            assign(p, params[name])
        ema = None
        if shadow is not None:
            ema = EMA(trainable, self.ema.decay)
            ema.shadow = shadow
        return self._export, ema


@contextlib.contextmanager
def _restore_gradient_sync(model: torch.nn.Module) -> Iterator[None]:
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def whole(t: torch.Tensor) -> torch.Tensor:
    """A parameter's (or its EMA's) whole tensor; gathering an FSDP shard is a collective."""
    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


@torch.no_grad()
def assign(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter, or into this rank's shard of it under FSDP."""
    if isinstance(target, DTensor):
        value = distribute_tensor(value.to(target.device), target.device_mesh, target.placements)
    target.copy_(value)


def train(o: TrainOptions) -> Path:
    """Run `pixart train`; returns the output folder."""
    with dist.session():
        check_options(o)
        if o.threads is not None:
            set_threads(o.threads)
        Trainer(o).run()
    return Path(o.output)
