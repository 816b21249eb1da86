"""diffusers' scheduler classes by name, and the short sampler names the CLI and the server take.

A diffusers user switches samplers with `pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)`;
with `from pixart import EulerDiscreteScheduler` that line runs unchanged. These classes hold no state: calling one,
or its `from_config` / `from_pretrained`, gives the SchedulerConfig of that class that the pipeline samples with.
"""
from __future__ import annotations

import os
import re
from typing import Any

from .configs import CLASS_FIELDS, COMMON_FIELDS, SchedulerConfig
from .samplers import SAMPLERS, check_config

# what AUTOMATIC1111 and the server call each sampler
SAMPLER_NAMES = {"DPMSolverMultistepScheduler": "DPM++ 2M", "DDIMScheduler": "DDIM",
                 "EulerDiscreteScheduler": "Euler", "EulerAncestralDiscreteScheduler": "Euler a", "LCMScheduler": "LCM"}
# lower-case name -> sampler: the class names, the display names, and the names A1111 and k-diffusion use
SAMPLER_ALIASES = {
    **{name.lower(): name for name in SAMPLERS},
    **{shown.lower(): name for name, shown in SAMPLER_NAMES.items() if name in SAMPLERS},
    "dpmpp_2m": "DPMSolverMultistepScheduler", "k_dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpm++": "DPMSolverMultistepScheduler", "dpm++2m": "DPMSolverMultistepScheduler",
    "k_euler": "EulerDiscreteScheduler", "k_ddim": "DDIMScheduler",
    **dict.fromkeys(("euler_a", "k_euler_a", "euler ancestral", "euler_ancestral", "euler-a"),
                    "EulerAncestralDiscreteScheduler"),
}
KARRAS = ("DPMSolverMultistepScheduler", "EulerDiscreteScheduler")  # the samplers with Karras noise levels


def sampler_by_name(name: str) -> tuple[str, bool]:
    """(the SAMPLERS key, Karras noise levels) of a sampler's name in any case: the class name, "DPM++ 2M", "ddim",
    "dpmpp_2m", and AUTOMATIC1111's "... Karras" (or "euler-karras", "euler_karras"); as in AUTOMATIC1111, a name
    without "Karras" means without them. ValueError names the choices."""
    base, karras = name.strip(), False
    parts = re.fullmatch(r"(.*?)[\s_-]+karras", base, flags=re.IGNORECASE)
    if parts:
        base, karras = parts[1], True
    if base.lower() not in SAMPLER_ALIASES:
        known = ", ".join(SAMPLER_NAMES.get(n, n) for n in SAMPLERS)
        raise ValueError(f"unknown scheduler {name!r}: choose one of {known}, or DPM++ 2M Karras or Euler Karras")
    key = SAMPLER_ALIASES[base.lower()]
    if karras:
        check_karras(key)
    return key, karras


def sampler_label(key: str, karras: bool | None = None) -> str:
    """A sampler as AUTOMATIC1111 names it: "DPM++ 2M", "DPM++ 2M Karras", ..."""
    return SAMPLER_NAMES.get(key, key) + (" Karras" if karras else "")


def with_sampler(config: SchedulerConfig, key: str, karras: bool | None = None) -> SchedulerConfig:
    """The model's noise schedule (`config`) sampled by `key` (a SAMPLERS key), with Karras noise levels if `karras`
    (None: as `config` says): what the CLI's --sampler and the server's sampler names select. Unlike diffusers'
    `from_config`, the other fields are kept as they are (DDIM does not switch to clipping the predicted latents)."""
    return config.replace(class_name=key, **({} if karras is None else {"use_karras_sigmas": karras}))


def check_karras(key: str) -> None:
    if key not in KARRAS:
        raise ValueError(f"{SAMPLER_NAMES.get(key, key)} has no Karras noise levels: they go with "
                         f"{' or '.join(SAMPLER_NAMES[k] for k in KARRAS)}")


def as_scheduler(scheduler: Any, check: bool = True) -> SchedulerConfig:
    """Our config from a SchedulerConfig, a diffusers scheduler object or a config dict (`scheduler.config`); `check`:
    a sampler or an option that pixart does not implement is a ValueError naming what it does (else when sampling)."""
    if not isinstance(scheduler, SchedulerConfig):
        config = getattr(scheduler, "config", scheduler)
        if not hasattr(config, "items"):
            raise TypeError(f"scheduler must be a pixart SchedulerConfig, a diffusers scheduler or its config dict, "
                            f"got {type(scheduler).__name__}")
        d = dict(config.items())
        if config is not scheduler:  # a scheduler object: its class (diffusers' from_config keeps the source's name)
            d["_class_name"] = type(scheduler).__name__
        scheduler = SchedulerConfig.from_dict(d)
    if check:
        check_config(scheduler)
    return scheduler


class _SchedulerClass(type):
    """`isinstance(pipe.scheduler, EulerDiscreteScheduler)` holds when the config's class_name is that class's."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, SchedulerConfig) and obj.class_name == cls.__name__


class _Scheduler(metaclass=_SchedulerClass):
    """A diffusers scheduler class by name: `X(**options)`, `X.from_config(config, **changes)` and
    `X.from_pretrained(path_or_id, subfolder="scheduler")` return a SchedulerConfig whose class_name is X's."""

    def __new__(cls, **options: Any) -> SchedulerConfig:  # type: ignore[misc]
        return cls.from_config({}, **options)

    @classmethod
    def from_config(cls, config: Any = None, **changes: Any) -> SchedulerConfig:
        """As diffusers: the config's values (a dict, `scheduler.config`, or a scheduler), then `changes`, and this
        class's own defaults for what neither gives; keys of other classes in the config are ignored."""
        name = cls.__name__
        own = set(COMMON_FIELDS) | set(CLASS_FIELDS[name])
        unknown = sorted(set(changes) - own)
        if unknown:
            raise TypeError(f"{name} has no option {', '.join(unknown)} in pixart "
                            f"(its options: {', '.join(sorted(own))})")
        if isinstance(config, SchedulerConfig):
            config = config.config  # with the keys it only defaulted
        config = getattr(config, "config", config) if config is not None else {}
        if not hasattr(config, "items"):
            raise TypeError(f"{name}.from_config takes a config dict (a scheduler's .config), "
                            f"got {type(config).__name__}")
        given = dict(config.items())
        used_defaults = set(given.pop("_use_default_values", ()))  # those take this class's defaults
        given = {k: v for k, v in given.items() if k in own and k not in used_defaults}
        return as_scheduler({**given, **changes, "_class_name": name})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        **hub_kwargs: Any) -> SchedulerConfig:
        """The scheduler_config.json of a folder or Hub id (`subfolder="scheduler"` for a pipeline's), as this class."""
        return cls.from_config(SchedulerConfig.from_pretrained(pretrained_model_name_or_path, subfolder, **hub_kwargs))


class DPMSolverMultistepScheduler(_Scheduler):
    """DPM-Solver++ 2M (Lu et al. 2022), PixArt-α's sampler."""


class DDIMScheduler(_Scheduler):
    """DDIM (Song et al. 2021)."""


class EulerDiscreteScheduler(_Scheduler):
    """Euler (Karras et al. 2022)."""


class EulerAncestralDiscreteScheduler(_Scheduler):
    """Euler ancestral (k-diffusion's; AUTOMATIC1111's "Euler a"): fresh noise at every step."""


class LCMScheduler(_Scheduler):
    """Latent consistency sampling (Luo et al. 2023), for PixArt-LCM."""


SCHEDULER_CLASSES = {c.__name__: c for c in (DPMSolverMultistepScheduler, DDIMScheduler, EulerDiscreteScheduler,
                                             EulerAncestralDiscreteScheduler, LCMScheduler)}
