"""The samplers' update rules, numerically equal to diffusers' schedulers' `step`.

A sampler is a Stepper: made for one run's timesteps, its `step(i, model_output, x)` is the next x, as diffusers'
`scheduler.step` after `set_timesteps`. `sample(config, model_fn, x, timesteps)` runs the whole loop, calling
`model_fn(x_in, t)` for the model's prediction (of `config.prediction_type`) at each timestep. Every scalar is
computed with the same operations and dtypes as the diffusers scheduler of `config.class_name` (0-dim float32
tensors, float64 where it uses numpy), so results match it in fp32 and bf16 alike.
"""
from __future__ import annotations

import torch

from .configs import SchedulerConfig
from .samplers import Callback, ModelFn, check_config, noise_schedule, randn_tensor, run_sigmas


def _to_x0(config: SchedulerConfig, out: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor,
           sigma: torch.Tensor) -> torch.Tensor:
    """The model's prediction of x_0 for x = α·x_0 + σ·ε (ε-, v- or x_0-prediction)."""
    if config.prediction_type == "epsilon":
        return (x - sigma * out) / alpha
    if config.prediction_type == "v_prediction":
        return alpha * x - sigma * out
    return out


def _clip(config: SchedulerConfig, x0: torch.Tensor) -> torch.Tensor:
    r = config.clip_sample_range
    return x0.clamp(-r, r) if config.clip_sample else x0


def _after_step(callback: Callback | None, i: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Run the step callback; a tensor it returns replaces the latents."""
    out = callback(i, t, x) if callback is not None else None
    return x if out is None else out


def _log_snr(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(α_t, σ_t, λ_t = log α_t - log σ_t) of the VP process at noise level σ = σ_t / α_t."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    sigma_t = sigma * alpha
    return alpha, sigma_t, torch.log(alpha) - torch.log(sigma_t)


class Stepper:
    """One sampling run's update rule, as a diffusers scheduler's `step` after `set_timesteps`: the initial noise is
    scaled by `init_noise_sigma`, the model sees `model_input(x, i)`, and `step(i, out, x)` is the next x."""

    init_noise_sigma: torch.Tensor | float = 1.0
    x0: torch.Tensor | None = None  # the last step's estimate of the clean latents

    def __init__(self, config: SchedulerConfig, timesteps: torch.Tensor, eta: float = 0.0):
        self.config, self.timesteps = config, timesteps

    def model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x

    def step(self, i: int, out: torch.Tensor, x: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        raise NotImplementedError


class DPMSolverPP2M(Stepper):
    """DPM-Solver++(2M), multistep with data prediction (Lu et al. 2022, arXiv 2211.01095, Algorithm 2)."""

    def __init__(self, config: SchedulerConfig, timesteps: torch.Tensor, eta: float = 0.0):
        super().__init__(config, timesteps)
        self.sigmas = run_sigmas(config, timesteps)
        n = len(timesteps)
        # diffusers takes a first-order last step for stability at few steps, and always when the final σ is 0
        self.first_order_last = (config.euler_at_final or (config.lower_order_final and n < 15)
                                 or config.final_sigmas_type == "zero")
        self.previous: tuple[torch.Tensor, torch.Tensor] | None = None  # the last step's (x_0, λ)

    def step(self, i, out, x, generator=None):
        config = self.config
        alpha_s, sigma_s, lambda_s = _log_snr(self.sigmas[i])
        alpha_t, sigma_t, lambda_t = _log_snr(self.sigmas[i + 1])
        x0 = _to_x0(config, out, x, alpha_s, sigma_s)  # in the latents' dtype, as diffusers
        sample = x.float()  # the update runs in float32
        h = lambda_t - lambda_s
        if config.solver_order == 1 or self.previous is None or (i == len(self.timesteps) - 1 and self.first_order_last):
            x_next = (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            prev_x0, prev_lambda = self.previous
            r0 = (lambda_s - prev_lambda) / h
            d1 = (1.0 / r0) * (x0 - prev_x0)
            if config.solver_type == "midpoint":
                x_next = ((sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0
                          - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1)
            else:  # heun
                x_next = ((sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0
                          + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1)
        self.x0, self.previous = x0, (x0, lambda_s)
        return x_next.to(x0.dtype)


class DDIM(Stepper):
    """DDIM (Song et al. 2020, arXiv 2010.02502, eq. 12); eta > 0 adds the noise σ_t(η) of eq. 16."""

    def __init__(self, config: SchedulerConfig, timesteps: torch.Tensor, eta: float = 0.0):
        super().__init__(config, timesteps)
        self.eta, self.ac = eta, noise_schedule(config)
        self.final_ac = torch.tensor(1.0) if config.set_alpha_to_one else self.ac[0]
        self.stride = config.num_train_timesteps // len(timesteps)  # diffusers' previous timestep, whatever the spacing

    def step(self, i, out, x, generator=None):
        config, t = self.config, int(self.timesteps[i])
        prev = t - self.stride
        a_t, a_prev = self.ac[t], (self.ac[prev] if prev >= 0 else self.final_ac)
        b_t = 1 - a_t
        if config.prediction_type == "epsilon":
            x0, eps = (x - b_t ** (0.5) * out) / a_t ** (0.5), out
        elif config.prediction_type == "sample":
            x0 = out
            eps = (x - a_t ** (0.5) * x0) / b_t ** (0.5)
        else:  # v_prediction
            x0 = (a_t**0.5) * x - (b_t**0.5) * out
            eps = (a_t**0.5) * out + (b_t**0.5) * x
        x0 = self.x0 = _clip(config, x0)
        variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)
        std = self.eta * variance ** (0.5)
        x_next = a_prev ** (0.5) * x0 + (1 - a_prev - std**2) ** (0.5) * eps
        if self.eta > 0:
            x_next = x_next + std * randn_tensor(out.shape, generator, out.device, out.dtype)
        return x_next


class Euler(Stepper):
    """Euler's method on the probability-flow ODE in σ (Karras et al. 2022, arXiv 2206.00364, Algorithm 2, no churn)."""

    def __init__(self, config: SchedulerConfig, timesteps: torch.Tensor, eta: float = 0.0):
        super().__init__(config, timesteps)
        self.sigmas = sigmas = run_sigmas(config, timesteps)
        self.init_noise_sigma = sigmas.max() if config.timestep_spacing != "leading" else (sigmas.max() ** 2 + 1) ** 0.5

    def model_input(self, x, i):
        return x / ((self.sigmas[i] ** 2 + 1) ** 0.5)  # the model sees unit-variance input

    def denoise(self, out: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x_0 from the model's prediction at σ, for the float32 sample x = x_0 + σ·ε; kept as `self.x0`."""
        if self.config.prediction_type == "epsilon":
            x0 = sample - sigma * out
        elif self.config.prediction_type == "v_prediction":
            x0 = out * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        else:
            x0 = out
        self.x0 = x0
        return x0

    def step(self, i, out, x, generator=None):
        sigma, sample = self.sigmas[i], x.float()
        derivative = (sample - self.denoise(out, sample, sigma)) / sigma
        return (sample + derivative * (self.sigmas[i + 1] - sigma)).to(out.dtype)


class EulerAncestral(Euler):
    """Euler with ancestral sampling (k-diffusion's `sample_euler_ancestral`; AUTOMATIC1111's "Euler a"): each step
    goes down to σ_down by Euler and adds fresh noise of σ_up, with σ_down² + σ_up² = σ_next² (η = 1)."""

    def step(self, i, out, x, generator=None):
        sigma, sigma_next, sample = self.sigmas[i], self.sigmas[i + 1], x.float()
        x0 = self.denoise(out, sample, sigma)  # (check_config refuses "sample" prediction here, as diffusers does)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x_next = sample + (sample - x0) / sigma * (sigma_down - sigma)
        noise = randn_tensor(out.shape, generator, out.device, out.dtype)
        return (x_next + noise * sigma_up).to(out.dtype)


class LCM(Stepper):
    """Latent Consistency Model multistep sampling (Luo et al. 2023, arXiv 2310.04378, Algorithm 1)."""

    def __init__(self, config: SchedulerConfig, timesteps: torch.Tensor, eta: float = 0.0):
        super().__init__(config, timesteps)
        self.ac = noise_schedule(config)
        self.final_ac = torch.tensor(1.0) if config.set_alpha_to_one else self.ac[0]

    def step(self, i, out, x, generator=None):
        config, timesteps = self.config, self.timesteps
        t = timesteps[i]
        last = i + 1 == len(timesteps)
        prev = t if last else timesteps[i + 1]
        a_t, a_prev = self.ac[int(t)], (self.ac[int(prev)] if prev >= 0 else self.final_ac)
        # consistency-model boundary condition c_skip(0) = 1, c_out(0) = 0, with σ_data = 0.5
        scaled = t.cpu() * config.timestep_scaling
        c_skip = 0.5**2 / (scaled**2 + 0.5**2)
        c_out = scaled / (scaled**2 + 0.5**2) ** 0.5
        x0 = _clip(config, _to_x0(config, out, x, a_t.sqrt(), (1 - a_t).sqrt()))
        denoised = self.x0 = c_out * x0 + c_skip * x
        if last:
            return denoised
        noise = randn_tensor(out.shape, generator, out.device, denoised.dtype)
        return a_prev.sqrt() * denoised + (1 - a_prev).sqrt() * noise


STEPPERS: dict[str, type[Stepper]] = {
    "DPMSolverMultistepScheduler": DPMSolverPP2M,
    "DDIMScheduler": DDIM,
    "EulerDiscreteScheduler": Euler,
    "EulerAncestralDiscreteScheduler": EulerAncestral,
    "LCMScheduler": LCM,
}


def sample(config: SchedulerConfig, model_fn: ModelFn, x: torch.Tensor, timesteps: torch.Tensor, *,
           generator: torch.Generator | list[torch.Generator] | None = None, eta: float = 0.0,
           callback: Callback | None = None, denoised: list | None = None) -> torch.Tensor:
    """Denoise unit-variance noise `x` over `timesteps` with the sampler of `config.class_name` (as diffusers, only
    DDIM uses eta). `denoised`: a list whose one item is set to each step's estimate of the clean latents before
    the callback runs (what a preview or an interrupted run decodes)."""
    check_config(config)
    stepper = STEPPERS[config.class_name](config, timesteps, eta=eta)
    x = x * stepper.init_noise_sigma
    for i, t in enumerate(timesteps):
        out = model_fn(stepper.model_input(x, i), t)
        x = stepper.step(i, out, x, generator)
        if denoised is not None:
            denoised[:] = [stepper.x0]
        x = _after_step(callback, i, t, x)
    return x
