"""Frozen model configs, read from (and written to) the diffusers / transformers `config.json` files."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .stepping import SchedulerSteps

C = TypeVar("C", bound="JsonConfig")


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write a JSON file through a temporary one beside it: an existing file is replaced whole or left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: str | Path, missing: Any = None) -> Any:
    """A JSON object file's contents, `missing` when there is no such file. A file that is not a JSON object is a
    ValueError naming it and the fix (a half-downloaded or hand-edited config), never a bare JSONDecodeError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return missing
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise ValueError(f"{path} is not a JSON text file ({e}): re-download or fix it") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): re-download or fix the file") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds a JSON {type(d).__name__}, not the object (mapping) it should: re-download or "
                         "fix the file")
    return d


class JsonConfig:
    """Mixin: build a frozen dataclass from a config dict, ignoring the keys it does not know."""

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        return cls(**kwargs)

    @classmethod
    def from_json(cls: type[C], path: str | Path) -> C:
        d = read_json(path)
        if d is None:
            raise FileNotFoundError(f"config file {path} is missing: a model folder needs its config.json")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
        class_name = getattr(self, "class_name", None)
        if class_name:
            d = {"_class_name": class_name, **d}
        return d

    def save(self, path: str | Path) -> None:
        """Write the config.json, replacing an existing one whole."""
        write_json(path, self.to_dict())

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)

    # diffusers' configs are dicts: config["scaling_factor"], config.get(...), keys(), items(), dict(config)
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def keys(self):
        return self.to_dict().keys()

    def items(self):
        return self.to_dict().items()

    def values(self):
        return self.to_dict().values()

    def __iter__(self):
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()


@dataclass(frozen=True)
class TransformerConfig(JsonConfig):
    """PixArt-α DiT (diffusers `PixArtTransformer2DModel` config.json)."""

    class_name = "PixArtTransformer2DModel"
    sample_size: int = 128  # latent size the model was trained at (1024 px / 8)
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int | None = 8  # 8 = ε + learned variance
    num_layers: int = 28
    patch_size: int = 2
    cross_attention_dim: int | None = 1152
    caption_channels: int | None = 4096
    norm_eps: float = 1e-6
    norm_elementwise_affine: bool = False
    attention_bias: bool = True
    activation_fn: str = "gelu-approximate"
    num_embeds_ada_norm: int | None = 1000
    norm_type: str = "ada_norm_single"
    interpolation_scale: float | None = None
    use_additional_conditions: bool | None = None

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def pe_interpolation(self) -> float:
        """diffusers: the config value, else max(sample_size // 64, 1)."""
        if self.interpolation_scale is not None:
            return self.interpolation_scale
        return max(self.sample_size // 64, 1)

    @property
    def micro_conditions(self) -> bool:
        """Resolution and aspect-ratio embeddings: on for sample_size 128 unless the config says."""
        if self.use_additional_conditions is not None:
            return self.use_additional_conditions
        return self.sample_size == 128

    @property
    def learned_sigma(self) -> bool:
        return (self.out_channels or self.in_channels) == 2 * self.in_channels


@dataclass(frozen=True)
class T5Config(JsonConfig):
    """T5 encoder (transformers `T5Config`; T5 v1.1 XXL by default)."""

    class_name = None
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    torch_dtype: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"architectures": ["T5EncoderModel"], "model_type": "t5", **super().to_dict()}

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """'gelu_new' (tanh GELU) for gated-gelu as transformers maps it, else the named function."""
        act = self.feed_forward_proj.split("-")[-1]
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act


@dataclass(frozen=True)
class VAEConfig(JsonConfig):
    """AutoencoderKL (diffusers config.json; sd-vae-ft-ema by default)."""

    class_name = "AutoencoderKL"
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True


@dataclass(frozen=True)
class SchedulerConfig(JsonConfig, SchedulerSteps):
    """Union of the fields of the diffusers schedulers we implement; `class_name` picks the sampler. It also drives a
    sampling run as a diffusers scheduler object does (`set_timesteps`, `step`: pixart.stepping)."""

    # diffusers' own defaults where a class differs from DPM-Solver's, for keys a config.json leaves out
    class_defaults = {
        "DDIMScheduler": {"clip_sample": True, "timestep_spacing": "leading"},
        "LCMScheduler": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                         "timestep_spacing": "leading"},
    }

    class_name: str = "DPMSolverMultistepScheduler"
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    thresholding: bool = False
    # DPM-Solver++
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    variance_type: str | None = None
    use_lu_lambdas: bool = False
    # DPM-Solver++ and Euler
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_flow_sigmas: bool = False
    # DDIM / LCM
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    # Euler
    interpolation_type: str = "linear"
    timestep_type: str = "discrete"
    sigma_min: float | None = None
    sigma_max: float | None = None
    # the fields given no value when this config was made (diffusers' `_use_default_values`): another class's
    # from_config takes its own defaults for them, as diffusers does
    defaulted: frozenset[str] = dataclasses.field(default=frozenset(), compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SchedulerConfig":
        class_name = d.get("_class_name", d.get("class_name", cls.class_name))
        used_defaults = set(d.get("_use_default_values", ()))
        d = {k: v for k, v in d.items() if k not in used_defaults}  # diffusers' rule: the class's own default
        cfg = super().from_dict({**cls.class_defaults.get(class_name, {}), **d})
        names = {f.name for f in dataclasses.fields(cls) if f.compare} - {"class_name"}
        return dataclasses.replace(cfg, class_name=class_name, defaulted=frozenset(names - set(d)))

    def to_dict(self) -> dict[str, Any]:
        """The fields `class_name` takes in diffusers (a config.json that diffusers loads without warnings)."""
        d = super().to_dict()
        name, _ = d.pop("class_name"), d.pop("defaulted")
        own = CLASS_FIELDS.get(name)
        return {"_class_name": name, **{k: v for k, v in d.items() if own is None or k in COMMON_FIELDS or k in own}}

    def replace(self, **changes: Any) -> "SchedulerConfig":
        return dataclasses.replace(self, defaulted=self.defaulted - changes.keys(), **changes)

    @property
    def config(self) -> "ConfigDict":
        """diffusers' `scheduler.config`: the dict a scheduler class's `from_config` takes (pixart's or diffusers'),
        with `_use_default_values`, the keys that took their defaults."""
        d = self.to_dict()
        return ConfigDict({**d, "_use_default_values": sorted(self.defaulted & d.keys())})

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write scheduler_config.json into the folder (created if needed), as diffusers' schedulers do."""
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        self.save(Path(save_directory) / "scheduler_config.json")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        **hub_kwargs: Any) -> "SchedulerConfig":
        """The scheduler_config.json of a folder or Hub id; `subfolder="scheduler"` for a pipeline's."""
        from .weights.hub import resolve

        path = resolve(pretrained_model_name_or_path, subfolder, **hub_kwargs) / "scheduler_config.json"
        if not path.is_file() and (path.parent / "scheduler" / path.name).is_file():
            raise FileNotFoundError(f"{path} is missing: {pretrained_model_name_or_path} is a pipeline, pass "
                                    "subfolder=\"scheduler\"")
        return cls.from_json(path)


class ConfigDict(dict):
    """A dict whose keys also read as attributes (`pipe.scheduler.config.num_train_timesteps`), as diffusers'
    FrozenDict and transformers' BatchEncoding; a copy: changing it changes nothing else."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no key {name!r}") from None


# The SchedulerConfig fields each diffusers class takes besides COMMON_FIELDS (tests/test_samplers.py checks them
# against diffusers' signatures)
COMMON_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                 "timestep_spacing", "steps_offset", "rescale_betas_zero_snr")
_SIGMAS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
CLASS_FIELDS = {
    "DPMSolverMultistepScheduler": ("thresholding", "solver_order", "algorithm_type", "solver_type",
                                    "lower_order_final", "euler_at_final", "final_sigmas_type", "lambda_min_clipped",
                                    "variance_type", "use_lu_lambdas", *_SIGMAS, "use_flow_sigmas"),
    "DDIMScheduler": ("thresholding", "clip_sample", "clip_sample_range", "set_alpha_to_one"),
    "EulerDiscreteScheduler": ("final_sigmas_type", *_SIGMAS, "interpolation_type", "timestep_type", "sigma_min",
                               "sigma_max"),
    "EulerAncestralDiscreteScheduler": (),
    "LCMScheduler": ("thresholding", "clip_sample", "clip_sample_range", "set_alpha_to_one", "original_inference_steps",
                     "timestep_scaling"),
}


# The published PixArt-α transformers (Hub ids under PixArt-alpha/); the 256 model sets its pe interpolation.
PRESETS: dict[str, TransformerConfig] = {
    "PixArt-XL-2-1024-MS": TransformerConfig(sample_size=128),
    "PixArt-XL-2-512x512": TransformerConfig(sample_size=64),
    "PixArt-XL-2-256x256": TransformerConfig(sample_size=32, interpolation_scale=0.5),
    "PixArt-LCM-XL-2-1024-MS": TransformerConfig(sample_size=128),
}
