"""The training objective: forward noising and IDDPM's hybrid loss, ε-MSE plus the variational bound (arXiv 2102.09672)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..configs import SchedulerConfig
from ..samplers import train_betas


@dataclass(frozen=True)
class Schedule:
    """Per-timestep float64 coefficients of q(x_t | x_0) and of the posterior q(x_{t-1} | x_t, x_0)."""

    alphas_cumprod: torch.Tensor
    log_betas: torch.Tensor
    posterior_log_variance: torch.Tensor  # clipped: step 0's (zero) variance replaced by step 1's
    posterior_mean_coef1: torch.Tensor  # of x_0
    posterior_mean_coef2: torch.Tensor  # of x_t

    @classmethod
    def from_config(cls, config: SchedulerConfig) -> "Schedule":
        betas = train_betas(config).double()
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        variance = betas * (1 - prev) / (1 - alphas_cumprod)
        return cls(
            alphas_cumprod=alphas_cumprod,
            log_betas=betas.log(),
            posterior_log_variance=torch.cat([variance[1:2], variance[1:]]).log(),
            posterior_mean_coef1=betas * prev.sqrt() / (1 - alphas_cumprod),
            posterior_mean_coef2=(1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        )

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Coefficient `name` at steps t (B,), as float32 broadcastable against `like` (B, ...)."""
        return getattr(self, name)[t.cpu()].float().to(like.device).view(-1, *[1] * (like.ndim - 1))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε."""
        ac = self.at("alphas_cumprod", t, x0)
        return ac.sqrt() * x0 + (1 - ac).sqrt() * noise


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + (logvar1 - logvar2).exp() + (mean1 - mean2) ** 2 * (-logvar2).exp())


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) by the tanh approximation IDDPM's decoder likelihood uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) of data in [-1, 1] quantized to 256 bins under N(mean, e^(2 log_scale)), elementwise (DDPM's L_0)."""
    centered = x - mean
    inv_std = (-log_scale).exp()
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1 / 255))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def variational_bound(schedule: Schedule, eps: torch.Tensor, var_values: torch.Tensor, x0: torch.Tensor,
                      x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The per-item (B,) term L_{t-1} of the bound in bits per dim: KL to the true posterior, or −log p(x_0) at t = 0.

    The model's variance is a log-space interpolation v ∈ [-1, 1] between the posterior variance β̃_t and β_t
    (IDDPM eq. 15); its mean comes from the predicted ε.
    """
    min_log = schedule.at("posterior_log_variance", t, x0)
    max_log = schedule.at("log_betas", t, x0)
    frac = (var_values + 1) / 2
    model_log_var = frac * max_log + (1 - frac) * min_log
    ac = schedule.at("alphas_cumprod", t, x0)
    pred_x0 = (x_t - (1 - ac).sqrt() * eps) / ac.sqrt()
    coef1, coef2 = schedule.at("posterior_mean_coef1", t, x0), schedule.at("posterior_mean_coef2", t, x0)
    model_mean = coef1 * pred_x0 + coef2 * x_t
    true_mean = coef1 * x0 + coef2 * x_t
    kl = normal_kl(true_mean, min_log, model_mean, model_log_var).flatten(1).mean(1) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).flatten(1).mean(1) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def training_losses(schedule: Schedule, output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                    x_t: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-item (B,) "loss", "mse" and "vb" for a model output of C (ε) or 2C (ε and the variance) channels.

    The bound term sees the predicted ε detached, so it trains only the variance channels (IDDPM §3.1).
    """
    C = x0.shape[1]
    eps = output[:, :C]
    mse = ((eps - noise) ** 2).flatten(1).mean(1)
    if output.shape[1] == C:
        return {"loss": mse, "mse": mse, "vb": torch.zeros_like(mse)}
    vb = variational_bound(schedule, eps.detach(), output[:, C:], x0, x_t, t)
    return {"loss": mse + vb, "mse": mse, "vb": vb}
