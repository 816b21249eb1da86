"""PixArt-α text-to-image: encode → latents → timesteps → denoise → decode → postprocess (diffusers' API)."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .bins import BINS_BY_SAMPLE_SIZE, classify_height_width_bin
from .configs import SchedulerConfig
from .images import OUTPUT_TYPES, ImageProcessor, resize_and_crop_tensor
from .models.t5 import T5EncoderModel
from .models.transformer import PixArtTransformer2DModel
from .models.vae import AutoencoderKL
from .samplers import SAMPLERS, make_timesteps, randn_tensor, sample
from .tokenizer import T5Tokenizer, preprocess_prompt, warn_truncated
from .weights.hub import resolve

logger = logging.getLogger("pixart")

COMPONENTS = ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")
_LOAD = object()  # from_pretrained's "load this component from the folder" default
_HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token")
_IGNORED_KWARGS = ("use_safetensors", "low_cpu_mem_usage", "device_map_kwargs")


@dataclass
class ImagePipelineOutput:
    """What `pipe(...)` returns: `.images` (PIL list, NHWC array, NCHW tensor or latents)."""

    images: Any


def _module_device(module: Any) -> torch.device:
    device = getattr(module, "device", None)
    return torch.device(device) if device is not None else next(module.parameters()).device


def _module_dtype(module: Any) -> torch.dtype:
    dtype = getattr(module, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(module.parameters()).dtype


def _as_scheduler_config(scheduler: Any) -> SchedulerConfig:
    """Our config, or one read from a diffusers scheduler object (duck typing on `.config`)."""
    if isinstance(scheduler, SchedulerConfig):
        return scheduler
    config = getattr(scheduler, "config", scheduler)
    if isinstance(config, dict) or hasattr(config, "items"):
        d = dict(config.items())
        d.setdefault("_class_name", type(scheduler).__name__)
        return SchedulerConfig.from_dict(d)
    raise TypeError(f"scheduler must be a pixart SchedulerConfig or a diffusers scheduler, got {type(scheduler)}")


class PixArtAlphaPipeline:
    """Drop-in for diffusers' PixArtAlphaPipeline, in plain PyTorch."""

    def __init__(
        self,
        tokenizer: T5Tokenizer | None = None,
        text_encoder: Any = None,
        vae: AutoencoderKL | None = None,
        transformer: PixArtTransformer2DModel | None = None,
        scheduler: Any = None,
    ):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.vae = vae
        self.transformer = transformer
        self.scheduler = _as_scheduler_config(scheduler if scheduler is not None else SchedulerConfig())
        scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.vae_scale_factor = scale
        self.image_processor = ImageProcessor(vae_scale_factor=scale)
        self._progress_bar_config: dict[str, Any] = {}

    # Loading and placement

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        *,
        tokenizer: Any = _LOAD,
        text_encoder: Any = _LOAD,
        vae: Any = _LOAD,
        transformer: Any = _LOAD,
        scheduler: Any = _LOAD,
        device: str | torch.device | None = None,
        device_map: str | None = None,
        variant: str | None = None,
        **kwargs: Any,
    ) -> "PixArtAlphaPipeline":
        """Load a diffusers PixArt-α folder or Hub id; a component passed as None is not loaded."""
        unknown = sorted(set(kwargs) - set(_HUB_KWARGS) - set(_IGNORED_KWARGS))
        if unknown:
            raise TypeError(f"from_pretrained() got unexpected keyword arguments: {', '.join(unknown)}")
        given = {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae,
                 "transformer": transformer, "scheduler": scheduler}
        wanted = [name for name, value in given.items() if value is _LOAD]
        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        folder = resolve(pretrained_model_name_or_path, components=wanted, **hub_kwargs)
        device = _device_from(device, device_map)
        subfolders = _component_folders(folder, wanted)

        loaders: dict[str, Callable[[Path], Any]] = {
            "tokenizer": T5Tokenizer.from_pretrained,
            "text_encoder": lambda p: T5EncoderModel.from_pretrained(p, torch_dtype=torch_dtype, device=device,
                                                                     variant=variant),
            "vae": lambda p: _load_vae(p, torch_dtype, device, variant),
            "transformer": lambda p: PixArtTransformer2DModel.from_pretrained(p, torch_dtype=torch_dtype,
                                                                              device=device, variant=variant),
            "scheduler": _load_scheduler,
        }
        parts = {name: (loaders[name](subfolders[name]) if value is _LOAD else value) for name, value in given.items()}
        return cls(**parts)

    def to(self, *args: Any, **kwargs: Any) -> "PixArtAlphaPipeline":
        """Move (and optionally cast) every loaded model: `.to("cuda")`, `.to(torch.bfloat16)`, `.to(device, dtype)`."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        if kwargs:
            raise TypeError(f"to() got unexpected keyword arguments: {', '.join(kwargs)}")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        for name in ("text_encoder", "transformer", "vae"):
            module = getattr(self, name, None)
            if module is None:
                continue
            target = dtype
            if name == "vae" and dtype == torch.float16 and module.config.force_upcast:
                target = torch.float32  # fp16 VAE decoding overflows to NaN: the config asks for fp32
            if hasattr(module, "cast") and target is not None:
                module.cast(target)  # our models keep their fp16-unsafe layers in fp32
                target = None
            module.to(device=device, dtype=target)
        return self

    def _main_module(self) -> Any:
        """The model that decides the pipeline's device and dtype: transformer, else text encoder, else VAE."""
        modules = (getattr(self, name, None) for name in ("transformer", "text_encoder", "vae"))
        return next((m for m in modules if m is not None), None)

    @property
    def device(self) -> torch.device:
        module = self._main_module()
        return _module_device(module) if module is not None else torch.device("cpu")

    _execution_device = device

    @property
    def dtype(self) -> torch.dtype:
        module = self._main_module()
        return _module_dtype(module) if module is not None else torch.float32

    @property
    def components(self) -> dict[str, Any]:
        return {name: getattr(self, name, None) for name in COMPONENTS}

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options for the tqdm progress bar of the denoising loop (e.g. disable=True)."""
        self._progress_bar_config = kwargs

    def progress_bar(self, iterable=None, total: int | None = None):
        return tqdm(iterable, total=total, **self._progress_bar_config)

    # 1. Encode

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = "",
        num_images_per_prompt: int = 1,
        device: torch.device | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        clean_caption: bool = False,
        max_sequence_length: int = 120,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """T5 embeddings and masks of the prompts and (with guidance) the negative prompts, one row per image."""
        kwargs.pop("mask_feature", None)  # deprecated in diffusers, without effect
        if kwargs:
            raise TypeError(f"encode_prompt() got unexpected keyword arguments: {', '.join(kwargs)}")
        device = torch.device(device) if device is not None else self.device
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds, prompt_attention_mask = self._encode(prompts, clean_caption, max_sequence_length, device)
        elif prompt_attention_mask is None:
            raise ValueError("prompt_embeds needs its prompt_attention_mask (the second output of encode_prompt)")
        dtype = self._embedding_dtype(prompt_embeds)
        n_prompts = prompt_embeds.shape[0]
        prompt_embeds = _per_image(prompt_embeds.to(device=device, dtype=dtype), num_images_per_prompt)
        prompt_attention_mask = _per_image(prompt_attention_mask.to(device), num_images_per_prompt)
        if not do_classifier_free_guidance:
            return prompt_embeds, prompt_attention_mask, None, None
        if negative_prompt_embeds is None:
            negatives = [negative_prompt or ""] * n_prompts if not isinstance(negative_prompt, list) else negative_prompt
            if len(negatives) != n_prompts:
                raise ValueError(f"{len(negatives)} negative prompts for {n_prompts} prompts: give one per prompt")
            negative_prompt_embeds, negative_prompt_attention_mask = self._encode(
                negatives, clean_caption, prompt_embeds.shape[1], device, truncation_warning=False
            )
        elif negative_prompt_attention_mask is None:
            raise ValueError("negative_prompt_embeds needs its negative_prompt_attention_mask")
        negative_prompt_embeds = _per_image(negative_prompt_embeds.to(device=device, dtype=dtype), num_images_per_prompt)
        negative_prompt_attention_mask = _per_image(negative_prompt_attention_mask.to(device), num_images_per_prompt)
        return prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask

    def _encode(self, texts: list[str], clean_caption: bool, max_length: int, device: torch.device,
                truncation_warning: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) T5 states and (B, L) mask of already-split texts."""
        for name in ("tokenizer", "text_encoder"):
            if getattr(self, name, None) is None:
                raise ValueError(
                    f"this pipeline has no {name} (it was loaded with {name}=None), so it cannot encode text: "
                    "pass prompt_embeds / negative_prompt_embeds with their masks, or load the pipeline with a text encoder"
                )
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_sequence_length must be a positive integer, got {max_length!r}")
        texts = [preprocess_prompt(t, clean_caption) for t in texts]
        if truncation_warning:
            warn_truncated(self.tokenizer, texts, max_length)
        tokens = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        te_device = _module_device(self.text_encoder)
        mask = tokens.attention_mask.to(te_device)
        embeds = self.text_encoder(tokens.input_ids.to(te_device), attention_mask=mask)[0]
        return embeds.to(device), mask.to(device)

    def _embedding_dtype(self, prompt_embeds: torch.Tensor) -> torch.dtype:
        """The dtype the transformer computes in (else the text encoder's, else the embeddings' own)."""
        for name in ("transformer", "text_encoder"):
            module = getattr(self, name, None)
            if module is not None:
                return _module_dtype(module)
        return prompt_embeds.dtype

    # The whole generation

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = "",
        num_inference_steps: int = 20,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 4.5,
        num_images_per_prompt: int | None = 1,
        height: int | None = None,
        width: int | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        callback_steps: int = 1,
        clean_caption: bool = True,
        use_resolution_binning: bool = True,
        max_sequence_length: int = 120,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
        **kwargs: Any,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for `prompt` (or for precomputed `prompt_embeds`)."""
        kwargs.pop("mask_feature", None)
        if kwargs:
            raise TypeError(f"PixArtAlphaPipeline() got unexpected keyword arguments: {', '.join(kwargs)}")
        transformer = getattr(self, "transformer", None)
        if transformer is None:
            raise ValueError("this pipeline was loaded with transformer=None: it can encode prompts but not generate; "
                             "load it with a transformer to call it")
        if sigmas is not None:
            raise ValueError("custom sigmas are not supported by pixart's samplers: pass timesteps instead")
        num_images_per_prompt = num_images_per_prompt or 1
        output_type = output_type or "pil"
        _check_call(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, output_type, callback_steps,
                    num_images_per_prompt, callback_on_step_end_tensor_inputs)
        cfg = transformer.config
        height = height or cfg.sample_size * self.vae_scale_factor
        width = width or cfg.sample_size * self.vae_scale_factor
        orig_height, orig_width = height, width
        height, width = self._generation_size(height, width, use_resolution_binning)

        # 1. Encode the prompts; guidance puts the negative half first: [uncond, cond]
        guidance = guidance_scale > 1.0
        if negative_prompt_embeds is not None and isinstance(negative_prompt, str) and negative_prompt == "":
            negative_prompt = None  # the default negative prompt does not conflict with given embeddings
        embeds, mask, neg_embeds, neg_mask = self.encode_prompt(
            prompt, guidance, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
            device=self.device, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            prompt_attention_mask=prompt_attention_mask, negative_prompt_attention_mask=negative_prompt_attention_mask,
            clean_caption=clean_caption, max_sequence_length=max_sequence_length,
        )
        if guidance:
            embeds, mask = torch.cat([neg_embeds, embeds]), torch.cat([neg_mask, mask])
        batch = embeds.shape[0] // (2 if guidance else 1)

        # 2. Timesteps
        steps = make_timesteps(self.scheduler, num_inference_steps if timesteps is None else None, timesteps)

        # 3. Latents (B, C, H/8, W/8), drawn from the generator(s) as diffusers draws them
        device, dtype = _module_device(transformer), _module_dtype(transformer)
        shape = (batch, cfg.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for {batch} images: pass one per image or a single one")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape} for {batch} images of "
                             f"{height}x{width} (after resolution binning)")
        latents = latents.to(device=device, dtype=dtype)

        # 4. Denoise
        conditions = self._micro_conditions(height, width, embeds.shape[0], device, dtype)
        state = {"prompt_embeds": embeds.to(device=device, dtype=dtype), "prompt_attention_mask": mask.to(device)}

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_in = torch.cat([x, x]) if guidance else x
            out = transformer(x_in, t.reshape(-1).expand(x_in.shape[0]).to(device), state["prompt_embeds"],
                              state["prompt_attention_mask"], **conditions)
            if guidance:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)  # on all 8 channels, as the reference
            return out[:, : cfg.in_channels] if cfg.learned_sigma else out  # keep ε, drop the variance

        with self.progress_bar(total=len(steps)) as bar:
            def on_step(i: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
                bar.update()
                if callback is not None and i % callback_steps == 0:
                    callback(i, t, x)
                if callback_on_step_end is None:
                    return None
                inputs = {"latents": x, **state}
                out = callback_on_step_end(self, i, t, {k: inputs[k] for k in callback_on_step_end_tensor_inputs}) or {}
                state.update({k: v for k, v in out.items() if k in state})
                return out.get("latents")

            latents = sample(self.scheduler, model_fn, latents, steps, generator=generator, eta=eta, callback=on_step)

        # 5. Decode and 6. postprocess
        if output_type == "latent":
            images = latents
        else:
            images = self.decode_latents(latents)
            if use_resolution_binning and (height, width) != (orig_height, orig_width):
                images = resize_and_crop_tensor(images, orig_width, orig_height)
            images = self.image_processor.postprocess(images, output_type=output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _generation_size(self, height: int, width: int, binning: bool) -> tuple[int, int]:
        """The size the model generates at: the nearest aspect-ratio bin, or the request (multiples of 16)."""
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < 8:
                raise ValueError(f"{name} must be an integer number of pixels >= 8, got {value!r}")
        table = BINS_BY_SAMPLE_SIZE.get(self.transformer.config.sample_size) if binning else None
        if table is not None:
            return classify_height_width_bin(height, width, table)
        multiple = self.vae_scale_factor * self.transformer.config.patch_size
        if height % multiple or width % multiple:
            fix_h, fix_w = (round(v / multiple) * multiple or multiple for v in (height, width))
            raise ValueError(
                f"height and width must be multiples of {multiple} pixels (VAE factor {self.vae_scale_factor} × "
                f"patch size {self.transformer.config.patch_size}) without resolution binning, got {height}x{width}: "
                f"use {fix_h}x{fix_w}, or use_resolution_binning=True"
            )
        return height, width

    def _micro_conditions(self, height: int, width: int, batch: int, device, dtype) -> dict[str, torch.Tensor]:
        """Resolution [h, w] of the generated size and its aspect ratio, for the 1024-px models only."""
        if not self.transformer.config.micro_conditions:
            return {}
        resolution = torch.tensor([[height, width]], dtype=dtype, device=device).repeat(batch, 1)
        aspect = torch.tensor([[float(height / width)]], dtype=dtype, device=device).repeat(batch, 1)
        return {"resolution": resolution, "aspect_ratio": aspect}

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1], in the VAE's dtype (latents are cast: diffusers forgets to)."""
        vae = getattr(self, "vae", None)
        if vae is None:
            raise ValueError("this pipeline has no VAE (loaded with vae=None): use output_type='latent'")
        z = latents.to(device=_module_device(vae), dtype=_module_dtype(vae)) / vae.config.scaling_factor
        if vae.config.shift_factor is not None:
            z = z + vae.config.shift_factor
        return vae.decode(z, return_dict=False)[0]


def _per_image(t: torch.Tensor, n: int) -> torch.Tensor:
    """Repeat each prompt's rows n times, keeping the images of one prompt contiguous."""
    return t.repeat_interleave(n, dim=0) if n > 1 else t


def _check_call(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, output_type, callback_steps,
                num_images_per_prompt, tensor_inputs) -> None:
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("pass exactly one of prompt and prompt_embeds")
    if prompt is not None and not isinstance(prompt, (str, list)):
        raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
    if isinstance(prompt, list) and (not prompt or not all(isinstance(p, str) for p in prompt)):
        raise ValueError("prompt must be a non-empty list of strings")
    if negative_prompt_embeds is not None and negative_prompt:
        raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
    if prompt_embeds is not None and negative_prompt_embeds is not None:
        if prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                             f"{tuple(negative_prompt_embeds.shape)} must have the same shape")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if not isinstance(callback_steps, int) or callback_steps <= 0:
        raise ValueError(f"callback_steps must be a positive integer, got {callback_steps!r}")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
    bad = [k for k in tensor_inputs if k not in ("latents", "prompt_embeds", "prompt_attention_mask")]
    if bad:
        raise ValueError(f"callback_on_step_end_tensor_inputs {bad} are not available; choose from latents, "
                         "prompt_embeds, prompt_attention_mask")


def _device_from(device: str | torch.device | None, device_map: str | None) -> torch.device:
    """`device`, or diffusers' device_map ("auto"/"balanced" mean the GPU when there is one)."""
    if device is not None:
        return torch.device(device)
    if device_map in ("auto", "balanced", "cuda"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device_map not in (None, "cpu"):
        raise ValueError(f"device_map {device_map!r} is not supported: use 'auto', 'cpu', 'cuda' or device=...")
    return torch.device("cpu")


def _component_folders(folder: Path, wanted: list[str]) -> dict[str, Path]:
    """The subfolder of each component to load, checked to exist."""
    index = folder / "model_index.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    names = json.loads(index.read_text()) if index.is_file() else {}
    if not names and not any((folder / c).is_dir() for c in COMPONENTS):
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json, no component "
                                "subfolders); for a single transformer file use PixArtTransformer2DModel.from_single_file")
    out = {}
    for name in wanted:
        sub = folder / name
        if not sub.is_dir():
            raise FileNotFoundError(f"{folder} has no {name}/ folder: download it, pass {name}=<an object> to use "
                                    f"your own, or {name}=None to go without")
        out[name] = sub
    return out


def _load_vae(folder: Path, dtype: torch.dtype | None, device: torch.device, variant: str | None) -> AutoencoderKL:
    """The VAE in `dtype`, except fp16 when its config asks for upcasting (fp16 decoding overflows to NaN)."""
    vae = AutoencoderKL.from_pretrained(folder, torch_dtype=None if dtype == torch.float16 else dtype, device=device,
                                        variant=variant)
    if dtype == torch.float16 and not vae.config.force_upcast:
        vae = vae.to(dtype)
    return vae


def _load_scheduler(folder: Path) -> SchedulerConfig:
    config = SchedulerConfig.from_json(folder / "scheduler_config.json")
    if config.class_name not in SAMPLERS:
        logger.warning("scheduler %s is not implemented by pixart; using DPM-Solver++ 2M with the same noise "
                       "schedule (supported: %s)", config.class_name, ", ".join(SAMPLERS))
        config = config.replace(class_name="DPMSolverMultistepScheduler")
    return config
