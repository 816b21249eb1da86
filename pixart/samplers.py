"""The samplers' options, noise schedules and timesteps, numerically equal to diffusers' schedulers (the update
rules are in pixart.steppers). Every scalar is computed with the same operations and dtypes as the diffusers
scheduler of `config.class_name` (0-dim float32 tensors, float64 where it uses numpy), so results match it in fp32
and bf16 alike.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .configs import CLASS_FIELDS, COMMON_FIELDS, SchedulerConfig
from .inputs import whole_number

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]

# Options of the diffusers schedulers that we implement → the values we support.
SUPPORTED_OPTIONS = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "timestep_spacing": ("linspace", "leading", "trailing"),
    "algorithm_type": ("dpmsolver++",),
    "solver_type": ("midpoint", "heun"),
    "solver_order": (1, 2),
    "final_sigmas_type": ("zero", "sigma_min"),
    "interpolation_type": ("linear",),
    "timestep_type": ("discrete",),
    "variance_type": (None,),
    "thresholding": (False,),
    "rescale_betas_zero_snr": (False,),
    "use_lu_lambdas": (False,),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_flow_sigmas": (False,),
}
F64 = torch.float64
# the diffusers scheduler classes pixart samples with (pixart.steppers.STEPPERS has an update rule for each)
SAMPLERS = ("DPMSolverMultistepScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
            "LCMScheduler")


def own_option(config: SchedulerConfig, name: str) -> Any:
    """The config's option `name` as its class reads it: the field's default where the class has no such option (a
    config switched to Euler ancestral from DPM-Solver keeps use_karras_sigmas, which Euler ancestral ignores)."""
    fields = CLASS_FIELDS.get(config.class_name)
    if fields is None or name in COMMON_FIELDS or name in fields:
        return getattr(config, name)
    return SchedulerConfig.__dataclass_fields__[name].default


def check_config(config: SchedulerConfig) -> None:
    """ValueError unless pixart samples with this class and these options (of the right types, in range), naming
    what it supports."""
    if config.class_name not in SAMPLERS:
        raise ValueError(f"scheduler {config.class_name!r} is not supported: use one of {', '.join(SAMPLERS)}")
    for name, kinds in FIELD_KINDS.items():
        value = getattr(config, name)
        if not any(_is_kind(value, kind) for kind in kinds):
            wanted = " or ".join(KIND_NAMES[kind] for kind in kinds)
            raise ValueError(f"{config.class_name} option {name}={value!r} is a {type(value).__name__}: it must be "
                             f"{wanted}")
    for name, values in SUPPORTED_OPTIONS.items():
        if getattr(config, name) not in values:
            raise ValueError(f"{config.class_name} option {name}={getattr(config, name)!r} is not supported "
                             f"by pixart's samplers (supported: {', '.join(map(repr, values))})")
    if config.class_name == "EulerAncestralDiscreteScheduler" and config.prediction_type == "sample":
        raise ValueError("EulerAncestralDiscreteScheduler option prediction_type='sample' is not supported (nor by "
                         "diffusers): use epsilon or v_prediction")
    _check_ranges(config)


def _check_ranges(config: SchedulerConfig) -> None:
    def need(ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise ValueError(f"{config.class_name} option {name}={getattr(config, name)!r}: {rule}")

    for name in ("num_train_timesteps", "original_inference_steps"):
        need(getattr(config, name) >= 1, name, "it must be at least 1")
    need(config.steps_offset >= 0, "steps_offset", "it must be 0 or more")
    for name in ("timestep_scaling", "clip_sample_range", "sigma_min", "sigma_max"):
        value = getattr(config, name)
        need(value is None or (math.isfinite(value) and value > 0), name, "it must be a positive number")
    if config.trained_betas is not None:
        betas = config.trained_betas
        need(len(betas) == config.num_train_timesteps and all(0 < b < 1 for b in betas), "trained_betas",
             f"it must hold num_train_timesteps = {config.num_train_timesteps} values between 0 and 1")
    elif config.beta_schedule in ("linear", "scaled_linear"):
        for name in ("beta_start", "beta_end"):
            need(0 < getattr(config, name) < 1, name, "a noise variance is between 0 and 1")
        need(config.beta_start <= config.beta_end, "beta_start", f"it must not exceed beta_end = {config.beta_end}")


def _is_kind(value: object, kind: object) -> bool:
    if kind is None:
        return value is None
    if kind == "betas":
        return isinstance(value, tuple) and all(_is_kind(b, float) for b in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


# SchedulerConfig field -> the kinds of value it takes, from its annotation ("float | None" -> (float, None))
_ANNOTATIONS = {"int": int, "float": float, "str": str, "bool": bool, "None": None, "tuple[float, ...]": "betas"}
FIELD_KINDS = {f.name: tuple(_ANNOTATIONS[part.strip()] for part in str(f.type).split("|"))
               for f in dataclasses.fields(SchedulerConfig) if f.compare}
KIND_NAMES = {float: "a number (not NaN)", int: "an integer", str: "a string", bool: "true or false", None: "None",
              "betas": "a list of numbers"}


def _cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the cosine schedule ᾱ(t) = cos²((t + 0.008) / 1.008 · π/2) (Nichol & Dhariwal 2021)."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


def train_betas(config: SchedulerConfig) -> torch.Tensor:
    """β_t, the (num_train_timesteps,) float32 noise variances of the training schedule, as diffusers computes them."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        return torch.tensor(config.trained_betas, dtype=torch.float32)
    if config.beta_schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    if config.beta_schedule == "scaled_linear":  # the latent-diffusion schedule, linear in sqrt(β)
        return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float32) ** 2
    if config.beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(n)
    raise ValueError(f"beta_schedule {config.beta_schedule!r} is not supported "
                     f"(supported: {', '.join(SUPPORTED_OPTIONS['beta_schedule'])})")


def noise_schedule(config: SchedulerConfig) -> torch.Tensor:
    """ᾱ_t, the (num_train_timesteps,) float32 cumulative product of 1 - β_t, as diffusers computes it."""
    return torch.cumprod(1.0 - train_betas(config), dim=0)


def _train_sigmas(config: SchedulerConfig) -> torch.Tensor:
    """σ_t = sqrt((1 - ᾱ_t) / ᾱ_t), float32, the noise level of each training timestep."""
    ac = noise_schedule(config)
    return ((1 - ac) / ac) ** 0.5


def randn_tensor(shape: Sequence[int], generator: torch.Generator | list[torch.Generator] | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Gaussian noise drawn as diffusers' randn_tensor draws it: on the generator's device, one draw per item for a list."""
    device = torch.device(device or "cpu")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    gen_device = (generator[0] if isinstance(generator, list) else generator).device if generator is not None else device
    if gen_device.type != device.type and gen_device.type != "cpu":
        raise ValueError(f"cannot draw a {device.type} tensor from a {gen_device.type} generator")
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}: pass one per item or a single one")
        item = (1, *shape[1:])
        noise = torch.cat([torch.randn(item, generator=g, device=gen_device, dtype=dtype) for g in generator])
    else:
        noise = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype)
    return noise.to(device)


def _linspace(start: float, stop: float, num: int, endpoint: bool = True) -> torch.Tensor:
    """float64 numpy.linspace, bit for bit: i·step + start, the endpoint set exactly."""
    div = num - 1 if endpoint else num
    y = torch.arange(num, dtype=F64)
    y = y * ((stop - start) / div) + start if div > 0 else y + start
    if endpoint and num > 1:
        y[-1] = stop
    return y


def _arange(start: float, stop: float, step: float) -> torch.Tensor:
    """float64 numpy.arange, bit for bit: start + i·((start + step) - start) after the first two values."""
    num = max(math.ceil((stop - start) / step), 0)
    y = start + torch.arange(num, dtype=F64) * ((start + step) - start)
    if num > 1:
        y[1] = start + step
    return y


def _interp(t: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """numpy.interp(t, arange(len(fp)), fp) in float64: linear between integer knots, clamped at the ends."""
    t, fp = t.to(F64), fp.to(F64)
    j = t.floor().clamp(0, len(fp) - 2).long()
    slope = fp[j + 1] - fp[j]
    y = torch.where(t == j, fp[j], slope * (t - j) + fp[j])
    return torch.where(t <= 0, fp[0], torch.where(t >= len(fp) - 1, fp[-1], y))


def _spaced(config: SchedulerConfig, num: int, last: int | None = None) -> torch.Tensor:
    """`num` descending float64 timesteps over [0, last), spaced as in Table 2 of arXiv 2305.08891 (linspace unrounded)."""
    last = config.num_train_timesteps if last is None else last
    if config.timestep_spacing == "linspace":
        return _linspace(0, last - 1, num).flip(0)
    if config.timestep_spacing == "leading":
        return (torch.arange(num, dtype=F64) * (last // num)).round().flip(0) + config.steps_offset
    # trailing: diffusers steps by num_train_timesteps / num even when `last` is clipped
    return _arange(last, 0, -config.num_train_timesteps / num).round() - 1


def _sigma_to_t(sigmas: torch.Tensor, train_sigmas: torch.Tensor) -> torch.Tensor:
    """float64 timesteps of noise levels `sigmas`, by interpolating log σ between the training timesteps."""
    log_train = train_sigmas.log().to(F64)  # (T,), float32 logs as diffusers' np.log of float32
    log_sigma = sigmas.to(F64).clamp(min=1e-10).log()
    low = ((log_sigma[None] - log_train[:, None]) >= 0).cumsum(0).argmax(0).clamp(max=len(log_train) - 2)
    w = ((log_train[low] - log_sigma) / (log_train[low] - log_train[low + 1])).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def _karras_sigmas(sigma_min: float, sigma_max: float, num: int) -> torch.Tensor:
    """float64 noise levels evenly spaced in σ^(1/ρ), ρ = 7 (Karras et al. 2022, arXiv 2206.00364, eq. 5)."""
    rho = 7.0
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + _linspace(0, 1, num) * (min_inv - max_inv)) ** rho


def _dpm_timesteps(config: SchedulerConfig, num: int) -> torch.Tensor:
    """DPMSolverMultistepScheduler.set_timesteps: num+1 points with t = 0 dropped (but trailing), int64."""
    train_sigmas = _train_sigmas(config)
    if own_option(config, "use_karras_sigmas"):
        t = _sigma_to_t(_karras_sigmas(train_sigmas[0].item(), train_sigmas[-1].item(), num), train_sigmas)
        return (t if config.beta_schedule == "squaredcos_cap_v2" else t.round()).long()
    # λ_min_clipped drops the last timesteps whose log-SNR is below it (for the cosine schedule)
    ac = noise_schedule(config)
    lambdas = torch.log(torch.sqrt(ac)) - torch.log(torch.sqrt(1 - ac))
    last = config.num_train_timesteps - int(torch.searchsorted(lambdas.flip(0), config.lambda_min_clipped))
    if config.timestep_spacing == "trailing":
        return _spaced(config, num, last).long()
    return _spaced(config, num + 1, last)[:-1].round().long()


def _euler_karras_sigmas(config: SchedulerConfig, num: int) -> torch.Tensor:
    """Euler's Karras noise levels: between the first and last σ of its spaced timesteps unless the config sets them."""
    base = _interp(_spaced(config, num).float(), _train_sigmas(config))
    sigma_min = config.sigma_min if config.sigma_min is not None else base[-1].item()
    sigma_max = config.sigma_max if config.sigma_max is not None else base[0].item()
    return _karras_sigmas(sigma_min, sigma_max, num)


def _euler_timesteps(config: SchedulerConfig, num: int) -> torch.Tensor:
    """EulerDiscreteScheduler.set_timesteps, float32 (linspace unrounded; Karras timesteps interpolated from σ)."""
    if own_option(config, "use_karras_sigmas"):
        return _sigma_to_t(_euler_karras_sigmas(config, num), _train_sigmas(config)).float()
    return _spaced(config, num).float()


def _ddim_timesteps(config: SchedulerConfig, num: int) -> torch.Tensor:
    """DDIMScheduler.set_timesteps, int64."""
    return _spaced(config, num).round().long()


def _lcm_timesteps(config: SchedulerConfig, num: int) -> torch.Tensor:
    """LCMScheduler.set_timesteps: `num` of the distillation timesteps, evenly by index; spacing options are ignored."""
    steps = config.original_inference_steps
    if not num <= steps <= config.num_train_timesteps:
        raise ValueError(f"LCMScheduler: need num_inference_steps {num} <= original_inference_steps {steps} "
                         f"<= num_train_timesteps {config.num_train_timesteps}")
    # the distillation's DDIM schedule: k·i - 1 for i = steps..1, k = num_train_timesteps // steps
    origin = (torch.arange(1, steps + 1) * (config.num_train_timesteps // steps) - 1).flip(0)
    return origin[_linspace(0, len(origin), num, endpoint=False).floor().long()]


def _custom_timesteps(config: SchedulerConfig, timesteps: Sequence[int]) -> torch.Tensor:
    """Validate and convert user timesteps as the scheduler's set_timesteps(timesteps=...) does."""
    name = config.class_name
    if name in ("DDIMScheduler", "EulerAncestralDiscreteScheduler"):
        raise ValueError(f"{name} does not support custom timesteps: pass num_inference_steps")
    if own_option(config, "use_karras_sigmas"):
        raise ValueError(f"{name} cannot use custom timesteps with use_karras_sigmas = True")
    try:
        t = torch.tensor([float(v) if name == "EulerDiscreteScheduler" else int(v) for v in timesteps])
    except (TypeError, ValueError):
        raise ValueError(f"timesteps must be numbers, got {list(timesteps)!r}") from None
    last = config.num_train_timesteps - 1
    if (t < 0).any() or (t > last).any() or (t[1:] >= t[:-1]).any():
        shown = t.tolist() if len(t) <= 8 else t[:8].tolist() + ["..."]
        raise ValueError(f"timesteps must be strictly decreasing whole numbers from at most {last} (the noisiest) "
                         f"down to at least 0, got {shown}")
    return t


_TIMESTEPS = {"DPMSolverMultistepScheduler": _dpm_timesteps, "DDIMScheduler": _ddim_timesteps,
              "EulerDiscreteScheduler": _euler_timesteps, "EulerAncestralDiscreteScheduler": _euler_timesteps,
              "LCMScheduler": _lcm_timesteps}


def make_timesteps(config: SchedulerConfig, num_inference_steps: int | None = None,
                   timesteps: Sequence[int] | None = None) -> torch.Tensor:
    """The timesteps diffusers' scheduler of `config.class_name` sets: int64, or float32 for Euler."""
    check_config(config)
    if (num_inference_steps is None) == (timesteps is None):
        raise ValueError("pass exactly one of num_inference_steps or timesteps")
    if timesteps is not None:
        if len(timesteps) == 0:
            raise ValueError("timesteps is empty")
        return _custom_timesteps(config, timesteps)
    steps = whole_number(num_inference_steps)
    if steps is None or not 1 <= steps <= config.num_train_timesteps:
        raise ValueError(f"num_inference_steps must be a whole number from 1 to num_train_timesteps "
                         f"({config.num_train_timesteps}), got {num_inference_steps!r}")
    return _TIMESTEPS[config.class_name](config, steps)


def noise_levels(config: SchedulerConfig, timesteps: torch.Tensor) -> torch.Tensor:
    """float64 σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) at (possibly fractional) timesteps: the noise-to-signal ratio of x_t."""
    return _interp(timesteps.cpu(), _train_sigmas(config))


def run_sigmas(config: SchedulerConfig, timesteps: torch.Tensor) -> torch.Tensor:
    """The (n+1,) float32 noise levels DPM-Solver and Euler pair with `timesteps`, ending at the final sigma."""
    train_sigmas = _train_sigmas(config)
    n = len(timesteps)
    if not own_option(config, "use_karras_sigmas"):
        sigmas = noise_levels(config, timesteps)
    elif config.class_name == "EulerDiscreteScheduler":
        sigmas = _euler_karras_sigmas(config, n)  # Karras sigmas are set by n: timesteps were made from them
    else:
        sigmas = _karras_sigmas(train_sigmas[0].item(), train_sigmas[-1].item(), n)
    last = train_sigmas[:1].to(F64) if own_option(config, "final_sigmas_type") == "sigma_min" else torch.zeros(1, dtype=F64)
    return torch.cat([sigmas, last]).float()
