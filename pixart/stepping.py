"""diffusers' stateful scheduler interface on a SchedulerConfig: `set_timesteps`, `step`, `scale_model_input`,
`init_noise_sigma`, `add_noise`, for users who write their own denoising loop:

    pipe.scheduler.set_timesteps(20)
    latents = latents * pipe.scheduler.init_noise_sigma
    for t in pipe.scheduler.timesteps:
        x_in = pipe.scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise = ...  # the transformer's ε (its first 4 channels), guided
        latents = pipe.scheduler.step(noise, t, latents).prev_sample

The update is pixart.steppers' Stepper, the same one `pipe(...)` samples with, so such a loop gives the pipeline's
images. The run's state lives beside the config, outside its fields: equality, hashing and saving ignore it.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

# the Euler samplers: they scale the model's input by 1 / sqrt(σ² + 1) and the initial noise by σ_max
EULER = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")


class SchedulerOutput(NamedTuple):
    """What `step` returns: diffusers' SchedulerOutput (`prev_sample`), with the x_0 estimate where its class has one
    (`pred_original_sample`; LCM's `denoised`). `return_dict=False` gives the same as a tuple."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None

    @property
    def denoised(self) -> torch.Tensor | None:
        return self.pred_original_sample


# the options of diffusers' step methods (DDIM's, Euler's) and their defaults, the only values pixart implements
# (DDIM's eta excepted)
STEP_OPTIONS = {"eta": 0.0, "use_clipped_model_output": False, "variance_noise": None, "s_churn": 0.0,
                "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}


class _Run(NamedTuple):
    stepper: Any  # samplers.Stepper
    device: torch.device | None


class SchedulerSteps:
    """Mixin for SchedulerConfig: the diffusers scheduler methods that drive one sampling run."""

    @property
    def order(self) -> int:
        """Model evaluations per step, as diffusers reports it (DPM-Solver's solver_order; 1 for the others)."""
        return self.solver_order if self.class_name == "DPMSolverMultistepScheduler" else 1

    @property
    def timesteps(self) -> torch.Tensor:
        """The run's timesteps after set_timesteps; before it, every training timestep, noisiest first (diffusers)."""
        run = self.__dict__.get("_run")
        if run is None:
            return torch.arange(self.num_train_timesteps - 1, -1, -1)
        return run.stepper.timesteps.to(run.device) if run.device is not None else run.stepper.timesteps

    @property
    def num_inference_steps(self) -> int | None:
        run = self.__dict__.get("_run")
        return None if run is None else len(run.stepper.timesteps)

    @property
    def sigmas(self) -> torch.Tensor | None:
        """The run's noise levels and the final one (DPM-Solver, Euler), None for DDIM and LCM or before a run."""
        run = self.__dict__.get("_run")
        return getattr(run.stepper, "sigmas", None) if run is not None else None

    @property
    def init_noise_sigma(self) -> torch.Tensor | float:
        """The scale of the initial noise (Euler's largest σ, before set_timesteps over every training timestep as
        diffusers; 1 for the others)."""
        run = self.__dict__.get("_run")
        if run is not None:
            return run.stepper.init_noise_sigma
        if self.class_name not in EULER:
            return 1.0
        from .steppers import Euler

        return Euler(self, self.timesteps.float()).init_noise_sigma

    @property
    def step_index(self) -> int | None:
        """The index in `timesteps` of the next `step`, None before the first one."""
        return self.__dict__.get("_step")

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None, **options: Any) -> None:
        """Start a run of `num_inference_steps` steps (or the given `timesteps`), as diffusers' set_timesteps."""
        from .samplers import check_config, make_timesteps
        from .steppers import STEPPERS

        unsupported = {k: v for k, v in options.items() if v is not None}
        if unsupported:
            raise TypeError(f"{self.class_name}.set_timesteps: pixart does not take {', '.join(unsupported)}; pass "
                            "num_inference_steps or timesteps")
        check_config(self)
        steps = make_timesteps(self, num_inference_steps, timesteps)
        self.__dict__["_run"] = _Run(STEPPERS[self.class_name](self, steps), None if device is None else
                                     torch.device(device))
        self.__dict__["_step"] = None

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """What the model sees at `timestep`: Euler divides by sqrt(σ² + 1); the others leave `sample` as it is."""
        run = self._started("scale_model_input")
        if self.class_name not in EULER:
            return sample
        return run.stepper.model_input(sample, self._index(timestep, advance=False))

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None, return_dict: bool = True,
             **options: Any) -> SchedulerOutput | tuple:
        """One update from `sample` at `timestep` given the model's prediction: the next, less noisy sample."""
        unknown = sorted(set(options) - set(STEP_OPTIONS))
        if unknown:
            raise TypeError(f"{self.class_name}.step got unexpected keyword arguments {', '.join(unknown)}")
        unsupported = [k for k, v in options.items() if v != STEP_OPTIONS[k] and not (
            k == "eta" and self.class_name == "DDIMScheduler")]
        if unsupported:
            raise ValueError(f"{self.class_name}.step: pixart implements only the default "
                             f"{', '.join(f'{k}={STEP_OPTIONS[k]!r}' for k in unsupported)}")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample {tuple(sample.shape)}: "
                             "PixArt-α's transformer also predicts the variance (twice the latent channels); pass "
                             "the noise half, noise_pred.chunk(2, dim=1)[0], as diffusers' pipeline does")
        run = self._started("step")
        i = self._index(timestep, advance=True)
        stepper = run.stepper
        if self.class_name == "DDIMScheduler":
            stepper.eta = float(options.get("eta") or 0.0)
        prev = stepper.step(i, model_output, sample, generator)
        if self.class_name == "DPMSolverMultistepScheduler":  # diffusers' DPM-Solver output has no x_0 field
            out = SchedulerOutput(prev)
            return out if return_dict else (prev,)
        out = SchedulerOutput(prev, stepper.x0)
        return out if return_dict else tuple(out)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t for clean samples x_0 at (integer) `timesteps`: sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε (Euler: x_0 + σ_t·ε)."""
        from .samplers import noise_levels, noise_schedule

        t = torch.as_tensor(timesteps).reshape(-1).cpu()
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        if self.class_name in EULER:
            sigma = noise_levels(self, t).to(original_samples.device, original_samples.dtype).reshape(shape)
            return original_samples + sigma * noise
        ac = noise_schedule(self)[t.long()].to(original_samples.device, original_samples.dtype).reshape(shape)
        return ac.sqrt() * original_samples + (1 - ac).sqrt() * noise

    def _started(self, what: str) -> _Run:
        run = self.__dict__.get("_run")
        if run is None:
            raise RuntimeError(f"call {self.class_name}.set_timesteps(num_inference_steps) before {what}")
        return run

    def _index(self, timestep: Any, advance: bool) -> int:
        """The step index of `timestep`: counted on from the first step, which finds it in `timesteps` (diffusers)."""
        i = self.__dict__.get("_step")
        steps = self.__dict__["_run"].stepper.timesteps
        if i is None:
            t = float(torch.as_tensor(timestep).reshape(-1)[0])
            matches = (steps.float() == t).nonzero().flatten().tolist()
            if not matches:
                raise ValueError(f"timestep {t:g} is not one of this run's timesteps {steps.tolist()}: pass the "
                                 "values of scheduler.timesteps, in order")
            i = matches[1] if len(matches) > 1 else matches[0]  # diffusers: the second of equal ones (img2img)
        if i >= len(steps):
            raise RuntimeError(f"all {len(steps)} steps of this run are done: call set_timesteps again for another")
        if advance:
            self.__dict__["_step"] = i + 1
        return i
