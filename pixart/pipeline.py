"""PixArt-α text-to-image: encode → latents → timesteps → denoise → decode → postprocess (diffusers' API)."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .compile import is_compiled
from .components import (COMPONENTS, MODELS, Component, ModelPlacement, adopt, choose_memory, component_dtypes,
                         component_folders, component_variant, is_available, load_scheduler, load_vae, module_device,
                         module_dtype, read_config, running)
from .configs import ConfigDict, SchedulerConfig
from .cuda_graphs import GraphedForward
from .denoise import check_guidance_interval, guidance_window, model_function, noise_level
from .encoding import PromptEncoding
from .hardware import default_dtype, device_from, give_back_freed_memory, keep_freed_memory
from .images import ImageProcessor, numpy_to_pil, resize_and_crop_tensor
from .inputs import check_call, generation_size, micro_conditions, requested_pixels
from .lora import Adapters, LoraLoaderMixin
from .models.t5 import T5EncoderModel
from .models.transformer import PixArtTransformer2DModel
from .models.vae import AutoencoderKL
from .prompt_cache import PromptCache, fingerprint
from .reuse import StepCache, cache_setting
from .samplers import make_timesteps, randn_tensor
from .steppers import sample
from .saving import absent_components, pipeline_index, save_pipeline
from .schedulers import as_scheduler
from .tokenizer import T5Tokenizer
from .weights.hub import HUB_KWARGS, IGNORED_KWARGS, hub_options, resolve
from .weights.loading import dtype_keyword

logger = logging.getLogger("pixart")

TILE_ABOVE = 128 * 128  # latent pixels (a 1024² image) above which decoding is tiled
_LOAD = object()  # from_pretrained's "load this component from the folder" default
# keywords of Stable Diffusion pipelines that code copied from them passes (safety_checker=None): warned, ignored
STABLE_DIFFUSION_ONLY = frozenset({"safety_checker", "feature_extractor", "requires_safety_checker", "image_encoder"})


@dataclass
class ImagePipelineOutput:
    """What `pipe(...)` returns: `.images` (PIL list, NHWC array, NCHW tensor or latents); as diffusers' outputs, also
    `out[0]`, `out["images"]`, `out.to_tuple()` and `out.keys()`."""

    images: Any

    def __getitem__(self, key: int | str) -> Any:
        return self.to_tuple()[key] if isinstance(key, (int, slice)) else {"images": self.images}[key]

    def keys(self) -> list[str]:
        return ["images"]

    def to_tuple(self) -> tuple:
        return (self.images,)


class PixArtAlphaPipeline(ModelPlacement, PromptEncoding, LoraLoaderMixin):
    """Drop-in for diffusers' PixArtAlphaPipeline, in plain PyTorch."""

    tokenizer = Component()
    text_encoder = Component()
    vae = Component()
    transformer = Component()

    def __init__(
        self,
        tokenizer: T5Tokenizer | None = None,
        text_encoder: Any = None,
        vae: AutoencoderKL | None = None,
        transformer: PixArtTransformer2DModel | None = None,
        scheduler: Any = None,
        *,
        loaders: dict[str, Callable[[], Any]] | None = None,
        configs: dict[str, Any] | None = None,
        sources: dict[str, Path] | None = None,
        memory: str = "full",
        device: torch.device | None = None,
        load_dtype: torch.dtype | None = None,
    ):
        self._loaded: dict[str, Any] = {}
        self._loaders = dict(loaders or {})  # name -> load it again (staged mode releases after each use)
        self._configs = dict(configs or {})  # model configs known without loading the model
        self._sources = dict(sources or {})  # name -> the folder a component was read from
        self._name_or_path: str | None = None  # from_pretrained's source
        given = {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "transformer": transformer}
        self._loaded.update({name: adopt(name, module) for name, module in given.items() if name not in self._loaders})
        self.memory = memory
        self.prompt_cache: PromptCache | None = None
        self._encoder_id: str | None = None  # identity of the text encoder + tokenizer files, for the cache
        self._execution_target = torch.device(device) if device is not None else None
        self._load_dtype = load_dtype or torch.float32
        self._load_dtypes: dict[str, torch.dtype] = {}  # from_pretrained's per-component dtypes
        self._transformer_quantization: str | None = None  # what from_pretrained quantizes the transformer to
        self._target_dtype: torch.dtype | None = None
        # checked when sampling, so that a folder's unsupported scheduler can be replaced after loading
        self._scheduler = as_scheduler(scheduler if scheduler is not None else SchedulerConfig(), check=False)
        vae_config = self.model_config("vae")
        scale = 2 ** (len(vae_config.block_out_channels) - 1) if vae_config is not None else 8
        self.vae_scale_factor = scale
        self.image_processor = ImageProcessor(vae_scale_factor=scale)
        self._progress_bar_config: dict[str, Any] = {}
        self.lora = Adapters()  # re-applied to the transformer whenever it loads

    @property
    def config(self) -> ConfigDict:
        """diffusers' `pipe.config`: each component's (library, class) and `_name_or_path`."""
        return ConfigDict(pipeline_index(self))

    @property
    def name_or_path(self) -> str | None:
        """The folder or Hub id the pipeline was loaded from (None when built from objects)."""
        return self._name_or_path

    @property
    def scheduler(self) -> SchedulerConfig:
        """The sampler and its noise schedule (diffusers' scheduler classes' config)."""
        return self._scheduler

    @scheduler.setter
    def scheduler(self, scheduler: Any) -> None:
        """`pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)`, with pixart's classes or
        diffusers' (a class or option pixart does not implement is a ValueError naming what it does)."""
        self._scheduler = as_scheduler(scheduler)

    def model_config(self, name: str) -> Any:
        """The config of the transformer or the VAE, without loading the model (a staged pipeline may not have)."""
        module = self._loaded.get(name)
        return module.config if module is not None else self._configs.get(name)

    @property
    def default_size(self) -> int:
        """The model's native image side in pixels (sample_size × VAE factor)."""
        return self.model_config("transformer").sample_size * self.vae_scale_factor

    # Loading and placement

    @classmethod
    def from_pipe(cls, pipeline: "PixArtAlphaPipeline", **components: Any) -> "PixArtAlphaPipeline":
        """diffusers' from_pipe: a new pipeline on `pipeline`'s components, shared (nothing is loaded twice or
        copied); keyword arguments replace components (`scheduler=...`, `transformer=...`)."""
        unknown = sorted(set(components) - set(COMPONENTS))
        if unknown:
            raise TypeError(f"from_pipe() got unexpected keyword arguments: {', '.join(unknown)} (it takes the "
                            f"components: {', '.join(COMPONENTS)})")
        new = cls(**{**pipeline.components, **components})
        new._name_or_path, new._sources = pipeline._name_or_path, dict(pipeline._sources)
        return new

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
        memory: str = "auto",
        prompt_cache: PromptCache | str | os.PathLike | bool | None = None,
        text_encoder_quantization: str | None = None,
        transformer_quantization: str | None = None,
        **kwargs: Any,
    ) -> "PixArtAlphaPipeline":
        """Load a diffusers PixArt-α folder or Hub id; a component passed as None is not loaded.

        memory: "full" loads every model now; "staged" loads each from disk when it runs and frees it after;
        "offload" (CUDA) keeps them in CPU memory and moves each to the GPU while it runs; "auto" (default)
        is staged when the models would not fit in the available memory, else full.
        text_encoder_quantization: "int8" or "int4" quantizes T5's linear layers (weight-only) while loading it.
        transformer_quantization: "int8" (or "fp8" on GPUs from Ada on) quantizes the transformer's block linears
        while loading it, activations per token at each call: faster where the device has an int8/fp8 kernel.
        prompt_cache: True (the default folder), a folder or a PromptCache: T5 embeddings of prompts seen before
        are read from disk, and the text encoder is not loaded for them (off by default, as in diffusers).
        """
        device = device_from(device, device_map)  # checked first: a device this machine lacks is named at once
        torch_dtype = dtype_keyword(torch_dtype, kwargs)
        if isinstance(torch_dtype, str) and torch_dtype == "auto":  # the CLI's --dtype auto: bf16 where native
            torch_dtype = default_dtype(device)
        dtypes = component_dtypes(torch_dtype)
        torch_dtype = dtypes["default"]
        for name in STABLE_DIFFUSION_ONLY & kwargs.keys():
            logger.warning("%s=%r ignored: PixArt-α pipelines have no %s (a Stable Diffusion option)", name,
                           kwargs.pop(name), name)
        unknown = sorted(set(kwargs) - set(HUB_KWARGS) - set(IGNORED_KWARGS))
        if unknown:
            raise TypeError(f"from_pretrained() got unexpected keyword arguments: {', '.join(unknown)}")
        given = {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae,
                 "transformer": transformer, "scheduler": scheduler}
        if transformer_quantization is not None and transformer is not _LOAD:
            raise ValueError("transformer_quantization applies to the transformer loaded from the folder: quantize "
                             "yours as you load it, PixArtTransformer2DModel.from_pretrained(..., quantization=...)")
        wanted = [name for name, value in given.items() if value is _LOAD]
        hub_kwargs = hub_options(kwargs)
        folder = resolve(pretrained_model_name_or_path, components=wanted, **hub_kwargs)
        for name in absent_components(folder) & set(wanted):  # saved without it
            given[name] = None
            wanted.remove(name)
        subfolders = component_folders(folder, wanted)
        memory = choose_memory(memory, subfolders, torch_dtype or torch.float32, device)
        load_device = torch.device("cpu") if memory == "offload" else device

        variants = {name: component_variant(name, subfolders[name], variant) for name in MODELS if name in wanted}
        makers: dict[str, Callable[[Path], Any]] = {
            "tokenizer": T5Tokenizer.from_pretrained,
            "text_encoder": lambda p: T5EncoderModel.from_pretrained(p, torch_dtype=dtypes["text_encoder"],
                                                                     device=load_device,
                                                                     variant=variants["text_encoder"],
                                                                     quantization=text_encoder_quantization),
            "vae": lambda p: load_vae(p, dtypes["vae"], load_device, variants["vae"]),
            "transformer": lambda p: PixArtTransformer2DModel.from_pretrained(p, torch_dtype=dtypes["transformer"],
                                                                              device=load_device,
                                                                              variant=variants["transformer"],
                                                                              quantization=transformer_quantization),
            "scheduler": load_scheduler,
        }
        loaders = {name: (lambda name=name: makers[name](subfolders[name])) for name in wanted}
        configs = {name: read_config(name, subfolders[name]) for name in wanted if name in ("transformer", "vae")}
        parts = {name: value for name, value in given.items() if value is not _LOAD}
        for name in wanted:
            if name not in MODELS or memory != "staged":
                parts[name] = loaders.pop(name)()  # tokenizer and scheduler are small: always loaded now
        pipe = cls(**parts, loaders=loaders, configs=configs, sources=subfolders, memory=memory, device=device,
                   load_dtype=torch_dtype)
        pipe._name_or_path = str(pretrained_model_name_or_path)
        pipe._load_dtypes = {name: dtypes[name] for name in MODELS if dtypes[name] is not None}
        pipe._transformer_quantization = transformer_quantization
        if prompt_cache and "text_encoder" in wanted and "tokenizer" in wanted:
            pipe.prompt_cache = prompt_cache if isinstance(prompt_cache, PromptCache) else \
                PromptCache(None if prompt_cache is True else prompt_cache)
            pipe._encoder_id = fingerprint(subfolders["text_encoder"], subfolders["tokenizer"],
                                           extra={"quantization": text_encoder_quantization})
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        variant: str | None = None, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Write the pipeline as a diffusers folder that `from_pretrained` (pixart's and diffusers') loads: the models
        as they are now (dtype, a fused LoRA merged in), safetensors only. A quantized text encoder is saved
        quantized (pixart reloads it without quantizing again; transformers cannot read it)."""
        if not safe_serialization or variant is not None or push_to_hub or kwargs:
            raise ValueError("save_pretrained writes safetensors files without variant, locally: leave "
                             "safe_serialization, variant, push_to_hub and other options at their defaults "
                             "(upload the folder with `huggingface-cli upload`)")
        save_pipeline(self, save_directory)

    @staticmethod
    def numpy_to_pil(images: Any) -> list:
        """(B, H, W, C) floats in [0, 1] to PIL images, as diffusers' pipelines have it."""
        return numpy_to_pil(images)

    def maybe_free_model_hooks(self) -> None:
        """diffusers' end-of-call offload hook, for code written against it: pixart's memory modes need none."""

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options for the tqdm progress bar of the denoising loop (e.g. disable=True)."""
        self._progress_bar_config = kwargs

    def progress_bar(self, iterable=None, total: int | None = None):
        return tqdm(iterable, total=total, **self._progress_bar_config)

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
        guidance_interval: tuple[float, float] | None = None,
        cache: float | str | tuple[float, int | None] | None = None,
        cuda_graphs: bool = False,
        **kwargs: Any,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for `prompt` (or for precomputed `prompt_embeds`).

        Beyond diffusers: guidance_interval=(σ_lo, σ_hi) applies classifier-free guidance only at steps whose noise
        level σ lies in (σ_lo, σ_hi] and skips the unconditional half elsewhere (Kynkäänniemi et al. 2024; e.g.
        (0.28, 5.42)); cache="fast"/"faster"/"fastest", a threshold or (threshold, max_reuse) reuses the transformer's
        work between steps that change little (TeaCache, see pixart.reuse). Both are off by default.
        cuda_graphs=True replays the transformer's steps as CUDA graphs (pixart.cuda_graphs): the same images up to
        float rounding, without the host's launch time per kernel; for an eager transformer on a GPU, not with cache=.
        """
        kwargs.pop("mask_feature", None)
        if kwargs.pop("cross_attention_kwargs", None):  # Stable Diffusion's LoRA-scale idiom: no effect in diffusers'
            logger.warning("cross_attention_kwargs has no effect on PixArt-α (nor in diffusers): set a LoRA's "
                           "strength with pipe.set_adapters(names, weights) or fuse_lora(lora_scale=...)")
        if kwargs:
            raise TypeError(f"PixArtAlphaPipeline() got unexpected keyword arguments: {', '.join(kwargs)}")
        if not is_available(self, "transformer"):
            raise ValueError("this pipeline was loaded with transformer=None: it can encode prompts but not generate; "
                             "load it with a transformer to call it")
        if sigmas is not None:
            raise ValueError("custom sigmas are not supported by pixart's samplers: pass timesteps instead")
        interval, reuse = check_guidance_interval(guidance_interval), cache_setting(cache)
        if not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
        if cuda_graphs and reuse is not None:
            raise ValueError("cuda_graphs=True does not combine with cache=: the cache decides each step on the host "
                             "from the previous one; choose one of them")
        num_images_per_prompt = 1 if num_images_per_prompt is None else num_images_per_prompt
        output_type = "np" if output_type is None else output_type  # as diffusers' image processor
        check_call(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, output_type, callback_steps,
                    num_images_per_prompt, callback_on_step_end_tensor_inputs, guidance_scale)
        num_images_per_prompt, callback_steps = int(num_images_per_prompt), int(callback_steps)
        cfg = self.model_config("transformer")
        height, width = (requested_pixels(name, value or cfg.sample_size * self.vae_scale_factor)
                         for name, value in (("height", height), ("width", width)))
        orig_height, orig_width = height, width
        height, width = generation_size(cfg, self.vae_scale_factor, height, width, use_resolution_binning)

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
        device, dtype = self.device, self._embedding_dtype(embeds)
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
        conditions = micro_conditions(cfg, height, width, embeds.shape[0], device, dtype)
        state = {"prompt_embeds": embeds.to(device=device, dtype=dtype), "prompt_attention_mask": mask.to(device)}

        with self._computing("transformer") as transformer, self.progress_bar(total=len(steps)) as bar:
            sigma = functools.partial(noise_level, self.scheduler)
            forward = transformer if reuse is None else StepCache(transformer, reuse, len(steps), sigma)
            if cuda_graphs and not is_compiled(transformer):  # a compiled one has its own ("reduce-overhead")
                forward = GraphedForward(transformer)
            guided = guidance_window(self.scheduler, interval) if guidance else None
            model_fn = model_function(forward, state, conditions, guidance_scale, guided,
                                      cfg.in_channels if cfg.learned_sigma else None,
                                      trim_captions=not is_compiled(transformer))

            def on_step(i: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
                bar.update()
                if callback is not None and i % callback_steps == 0:
                    callback(i, t, x)
                if callback_on_step_end is None:
                    return None
                inputs = {"latents": x, **state, "denoised": denoised[0]}
                out = callback_on_step_end(self, i, t, {k: inputs[k] for k in callback_on_step_end_tensor_inputs}) or {}
                state.update({k: v for k, v in out.items() if k in state})
                return out.get("latents")

            denoised: list = [None]  # each step's x_0 estimate, for callback_on_step_end's "denoised"
            latents = sample(self.scheduler, model_fn, latents, steps, generator=generator, eta=eta, callback=on_step,
                             denoised=denoised)
            del transformer, forward, model_fn  # staged: the block's end frees the transformer, before the VAE loads

        # 5. Decode and 6. postprocess
        images = latents if output_type == "latent" else self.latents_to_images(latents, orig_height, orig_width,
                                                                                 output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def latents_to_images(self, latents: torch.Tensor, height: int, width: int, output_type: str = "pil") -> Any:
        """Decode latents and bring them to the requested height × width (resized and centre-cropped from the
        aspect-ratio bin they were made at), as `output_type` images."""
        images = self.decode_latents(latents)
        if images.shape[-2:] != (height, width):
            images = resize_and_crop_tensor(images, width, height)
        return self.image_processor.postprocess(images, output_type=output_type)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1], in the VAE's dtype (latents are cast: diffusers forgets to)."""
        if not is_available(self, "vae"):
            raise ValueError("this pipeline has no VAE (loaded with vae=None): use output_type='latent'")
        with self._computing("vae") as vae:
            z = latents.to(device=module_device(vae), dtype=module_dtype(vae)) / vae.config.scaling_factor
            if vae.config.shift_factor is not None:
                z = z + vae.config.shift_factor
            if not isinstance(vae, AutoencoderKL) or (vae.tiling is not None or z[0, 0].numel() <= TILE_ABOVE):
                return vae.decode(z, return_dict=False)[0]
            # past 1024² the decoder's activations dominate memory: decode in tiles, one image at a time
            vae.enable_tiling()
            try:
                return torch.cat([vae.decode(one, return_dict=False)[0] for one in z.split(1)])
            finally:
                vae.disable_tiling()

    @contextlib.contextmanager
    def _computing(self, name: str):
        """`running(self, name)` (staged: load, then free), and on a CPU, between the load and the free, freed large
        blocks kept in malloc's heap for the next ones (the steps' and the decoder's activations repeat; not fresh
        zero-filled pages each time); the freed model's pages, under the blocks that work left, go back after."""
        with running(self, name) as model:
            cpu = module_device(model).type == "cpu"
            with keep_freed_memory() if cpu else contextlib.nullcontext():
                yield model
        if cpu:
            give_back_freed_memory()
