"""The pipeline's components: where they are loaded from, when (memory modes), and where they run."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
from pathlib import Path
from typing import Any, Iterator

import torch

from .compile import compile_model
from .configs import SchedulerConfig, TransformerConfig, VAEConfig, read_json
from .hardware import available_device
from .models.transformer import PixArtTransformer2DModel
from .models.vae import AutoencoderKL
from .samplers import SAMPLERS
from .weights.files import lazy_tensors, weight_files, weight_names

logger = logging.getLogger("pixart")

COMPONENTS = ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")
MODELS = ("text_encoder", "transformer", "vae")
# full: all resident; staged: only the running model is in memory (loaded from disk when needed, released after);
# offload: all in CPU memory, each on the GPU only while it runs; auto: staged when full would not fit.
MEMORY_MODES = ("auto", "full", "staged", "offload")


class Component:
    """A pipeline attribute holding a model, loaded on first use when the pipeline has a loader for it."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, pipe: Any, owner: type | None = None) -> Any:
        if pipe is None:
            return self
        module = pipe._loaded.get(self.name)
        if module is None and self.name in pipe._loaders:
            logger.info("loading %s", self.name)
            module = pipe._loaders[self.name]()
            if self.name in MODELS:  # placed as earlier .to() calls asked
                target = pipe._execution_target if pipe.memory != "offload" else None
                pipe._place(self.name, module, target, pipe._target_dtype)
                if self.name == "transformer" and pipe.lora.layers:
                    pipe.lora.apply(module)
            pipe._loaded[self.name] = module
        return module

    def __set__(self, pipe: Any, value: Any) -> None:
        pipe._loaded[self.name] = adopt(self.name, value)
        pipe._loaders.pop(self.name, None)  # the user's object replaces what we would load
        if self.name in ("tokenizer", "text_encoder"):
            pipe._encoder_id = None  # cached embeddings belong to the files we loaded, not to this object

    def __delete__(self, pipe: Any) -> None:
        self.__set__(pipe, None)


def adopt(name: str, module: Any) -> Any:
    """A component the user passes, as the pipeline runs it: diffusers' PixArtTransformer2DModel becomes pixart's,
    sharing its weights (the parameter names are the same: nothing is copied), since the samplers, LoRA, reuse and
    compile need pixart's; anything else as it is (diffusers' VAE, transformers' T5 and tokenizer run as they are)."""
    if name != "transformer" or not type(module).__module__.startswith("diffusers."):
        return module
    if type(module).__name__ != "PixArtTransformer2DModel":
        raise TypeError(f"transformer must be a PixArtTransformer2DModel (pixart's or diffusers'), got diffusers' "
                        f"{type(module).__name__}")
    with torch.device("meta"):
        ours = PixArtTransformer2DModel.from_config(dict(module.config))
    ours.load_state_dict(module.state_dict(), assign=True)
    logger.info("diffusers' transformer runs as pixart's PixArtTransformer2DModel, on the same weights")
    return ours.train(module.training)


def is_available(pipe: Any, name: str) -> bool:
    """Loaded, or loadable, without loading it."""
    return pipe._loaded.get(name) is not None or name in pipe._loaders


def release(pipe: Any, name: str) -> None:
    """Drop a model we can load again (staged mode), so its memory goes back before the next stage."""
    if name in pipe._loaders and pipe._loaded.get(name) is not None:
        pipe._loaded[name] = None
        gc.collect()
        return_freed_memory()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim): a released stage's memory, freed in
    many blocks, otherwise stays in the process (measured: 1.2 GB kept after the 1024² denoising stage, counted in
    the decoding stage's peak). A no-op where the C library has no malloc_trim."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


@contextlib.contextmanager
def running(pipe: Any, name: str) -> Iterator[Any]:
    """The model `name`, on the execution device while the block runs; offloaded or released after it."""
    module = getattr(pipe, name)
    offload = pipe.memory == "offload" and module is not None and pipe._execution_target.type != "cpu"
    if offload:
        module.to(pipe._execution_target)
    try:
        yield module
    finally:
        if offload:
            module.to("cpu")
            torch.cuda.empty_cache()
        del module  # the caller's references are gone: release() can free it
        if pipe.memory == "staged":
            release(pipe, name)


class Held:
    """A model entered into `running` on first use and held until `stack` closes (one load per stage)."""

    def __init__(self, pipe: Any, name: str, stack: contextlib.ExitStack):
        self.pipe, self.name, self.stack, self.module = pipe, name, stack, None

    def get(self) -> Any:
        if self.module is None:
            self.module = self.stack.enter_context(running(self.pipe, self.name))
        return self.module


def component_folders(folder: Path, wanted: list[str]) -> dict[str, Path]:
    """The subfolder of each component to load, checked to exist."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    index = folder / "model_index.json"
    names = read_json(index, {})
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


def read_config(name: str, folder: Path) -> Any:
    """The config of a model component, read without loading its weights."""
    if name == "transformer":
        return TransformerConfig.from_json(folder / "config.json")
    if name == "vae":
        return VAEConfig.from_json(folder / "config.json")
    return None


def component_variant(name: str, folder: Path, variant: str | None) -> str | None:
    """The variant to load component `name` in: `variant` where its folder has it; else (as diffusers) its default
    weights, with a warning; a pipeline without that variant anywhere is the model loader's error."""
    if variant is None or any((folder / n).is_file() for n in weight_names(variant)):
        return variant
    if not any((folder / n).is_file() for n in weight_names()):
        return variant  # neither: the loader names what the folder holds
    logger.warning("%s has no %r variant: loading its default weights (as diffusers does)", name, variant)
    return None


def load_vae(folder: Path, dtype: torch.dtype | None, device: torch.device,
             variant: str | None = None) -> AutoencoderKL:
    """The VAE in `dtype`, except fp16 when its config asks for upcasting (fp16 decoding overflows to NaN)."""
    vae = AutoencoderKL.from_pretrained(folder, torch_dtype=None if dtype == torch.float16 else dtype, device=device,
                                        variant=variant)
    if dtype == torch.float16 and not vae.config.force_upcast:
        vae = vae.to(dtype)
    return vae


def load_scheduler(folder: Path) -> SchedulerConfig:
    config = SchedulerConfig.from_json(folder / "scheduler_config.json")
    if config.class_name not in SAMPLERS:
        logger.warning("scheduler %s is not implemented by pixart; using DPM-Solver++ 2M with the same noise "
                       "schedule (supported: %s)", config.class_name, ", ".join(SAMPLERS))
        config = config.replace(class_name="DPMSolverMultistepScheduler")
    return config


def weights_bytes(folder: Path, dtype: torch.dtype) -> int:
    """Bytes the weights of a model folder take in `dtype`, from the file headers (nothing is read)."""
    tensors = lazy_tensors(weight_files(folder))
    numel = sum(_numel(lazy.shape) if lazy.shape is not None else 0 for lazy in tensors.values())
    return numel * torch.tensor([], dtype=dtype).element_size()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def available_bytes(device: torch.device) -> int | None:
    """Free memory where the models will live: the GPU's, or the machine's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def component_dtypes(torch_dtype: Any) -> dict[str, torch.dtype | None]:
    """One dtype for every model, or diffusers' per-component dict ({"transformer": torch.bfloat16, "default": ...};
    a model it does not name takes "default", else fp32)."""
    if torch_dtype is None or isinstance(torch_dtype, torch.dtype):
        return dict.fromkeys(("default", *MODELS), torch_dtype)
    if not isinstance(torch_dtype, dict) or not all(isinstance(v, torch.dtype) for v in torch_dtype.values()):
        raise TypeError(f"torch_dtype must be a torch.dtype or a dict of them by component, got {torch_dtype!r}")
    unknown = sorted(set(torch_dtype) - {"default", *MODELS})
    if unknown:
        raise ValueError(f"torch_dtype names unknown components {unknown}: use {', '.join(MODELS)} or default")
    default = torch_dtype.get("default")
    return {"default": default, **{name: torch_dtype.get(name, default) for name in MODELS}}


def choose_memory(mode: str, folders: dict[str, Path], dtype: torch.dtype, device: torch.device) -> str:
    """Resolve `auto`: staged when the models together would not fit in 80% of the available memory."""
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {', '.join(MEMORY_MODES)}, got {mode!r}")
    if mode == "offload" and device.type != "cuda":
        raise ValueError("memory='offload' moves each model to the GPU while it runs: it needs a CUDA device; "
                         "on the CPU use memory='staged'")
    if mode != "auto":
        return mode
    free = available_bytes(device)
    need = sum(weights_bytes(folders[n], dtype) for n in MODELS if n in folders)
    return "staged" if free is not None and need > 0.8 * free else "full"


def module_device(module: Any) -> torch.device:
    """Where a model (ours or a transformers one) lives."""
    device = getattr(module, "device", None)
    return torch.device(device) if device is not None else next(module.parameters()).device


def module_dtype(module: Any) -> torch.dtype:
    """The dtype a model (ours or a transformers one) computes in."""
    dtype = getattr(module, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(module.parameters()).dtype


class ModelPlacement:
    """The pipeline's models: where they run and in which dtype (`to`, offloading, compile), whether loaded yet or not.

    A subclass keeps `_loaded` (name -> model or None), `memory`, `_execution_target`, `_target_dtype`, `_load_dtype`,
    `_load_dtypes` (name -> the dtype a staged model loads in) and `scheduler`."""

    def to(self, *args: Any, **kwargs: Any) -> "ModelPlacement":
        """Move (and optionally cast) the models: `.to("cuda")`, `.to(torch.bfloat16)`, `.to(device, dtype)`.

        Models not loaded yet (staged) are placed the same way when they load."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        if kwargs:
            raise TypeError(f"to() got unexpected keyword arguments: {', '.join(kwargs)}")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        if device is not None:
            device = self._execution_target = available_device(device)  # checked first: a failed move changes nothing
        if dtype is not None:
            self._target_dtype = dtype
        for name in MODELS:
            if self._loaded.get(name) is not None:
                self._place(name, self._loaded[name], device if self.memory != "offload" else None, dtype)
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device = "cuda") -> None:
        """Keep the models in CPU memory and move each to the GPU only while it runs (memory="offload")."""
        target = torch.device(device) if gpu_id is None else torch.device(torch.device(device).type, gpu_id)
        if target.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"model offloading moves models to a GPU while they run; {target} is not an available "
                             "CUDA device (on the CPU, load with memory='staged')")
        for name in MODELS:
            if self._loaded.get(name) is not None:
                self._loaded[name].to("cpu")
        self.memory, self._execution_target = "offload", target

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device = "cuda") -> None:
        """diffusers' layer-by-layer offloading is not implemented: whole models are offloaded instead (a warning
        says so), so the GPU must hold the largest model (T5-XXL: 9.5 GB in bf16, ~5 GB quantized to int8)."""
        logger.warning("pixart offloads whole models, not layers: enable_sequential_cpu_offload() does what "
                       "enable_model_cpu_offload() does; on a small GPU load with text_encoder_quantization='int8'")
        self.enable_model_cpu_offload(gpu_id, device)

    def enable_attention_slicing(self, slice_size: str | int | None = "auto") -> None:
        """Accepted for diffusers code, and not needed: pixart's attention (PyTorch's fused
        scaled_dot_product_attention) never holds a whole attention matrix of the image."""
        logger.info("enable_attention_slicing: pixart's fused attention needs no slicing; nothing changed")

    def disable_attention_slicing(self) -> None:
        """Accepted for diffusers code (see enable_attention_slicing)."""

    def enable_xformers_memory_efficient_attention(self, attention_op: Any = None) -> None:
        """Accepted for diffusers code, and not needed: PyTorch's fused attention (flash / memory-efficient / cuDNN
        kernels) gives what xformers gives, without the package."""
        logger.info("enable_xformers_memory_efficient_attention: pixart uses PyTorch's fused attention; nothing "
                    "changed")

    def disable_xformers_memory_efficient_attention(self) -> None:
        """Accepted for diffusers code (see enable_xformers_memory_efficient_attention)."""

    def compile(self, mode: str | None = None, vae: bool | None = None) -> "ModelPlacement":
        """torch.compile the transformer's blocks (and the VAE decoder, see `vae`) in place, for the run device.

        vae=None (the default) compiles the decoder too on a GPU, where it takes seconds and decodes a 1024² image
        2.7× faster (88 → 33 ms on an H200, bench/profile_cuda.py), and not on a CPU, where it takes minutes.
        The first call at each image size and batch compiles (minutes on a CPU); later ones reuse it. mode:
        torch.compile's ("max-autotune"; "reduce-overhead" adds CUDA graphs). On CPU the weights are frozen into the
        graph: compile after loading LoRAs. The compiled models stay resident, also in memory="staged" (reloading
        them would compile them again)."""
        if vae is None:
            vae = self.device.type == "cuda" and self.vae is not None
        for name in ("transformer", "vae") if vae else ("transformer",):
            module = getattr(self, name)
            if module is None:
                raise ValueError(f"this pipeline has no {name} to compile")
            if self.memory == "staged":
                logger.info("compile keeps the %s resident: memory='staged' would reload and recompile it", name)
            setattr(self, name, module)  # ours now: staged mode no longer releases it
            if name == "vae":
                compile_model(module.decoder, self.device, mode)
            else:  # the blocks are 97% of the work, and step caching calls them without forward
                compile_model(module, self.device, mode, "run_blocks" if hasattr(module, "run_blocks") else "forward")
        return self

    def _place(self, name: str, module: Any, device: torch.device | None, dtype: torch.dtype | None) -> None:
        """Move and cast one model; the VAE stays fp32 when fp16 would overflow, T5 keeps its fp32 layers."""
        if name == "vae" and dtype == torch.float16 and module.config.force_upcast:
            dtype = torch.float32  # fp16 VAE decoding overflows to NaN: the config asks for fp32
        if hasattr(module, "cast") and dtype is not None:
            module.cast(dtype)  # our models keep their fp16-unsafe layers in fp32
            dtype = None
        module.to(device=device, dtype=dtype)

    def _loaded_main_module(self) -> Any:
        """The loaded model that tells the pipeline's dtype and device: transformer, else text encoder, else VAE."""
        modules = (self._loaded.get(name) for name in ("transformer", "text_encoder", "vae"))
        return next((m for m in modules if m is not None), None)

    @property
    def device(self) -> torch.device:
        """Where the models run (with offloading: the GPU, though they rest in CPU memory)."""
        if self._execution_target is not None:
            return self._execution_target
        module = self._loaded_main_module()
        return module_device(module) if module is not None else torch.device("cpu")

    _execution_device = device

    @property
    def dtype(self) -> torch.dtype:
        module = self._loaded_main_module()
        if module is not None:
            return module_dtype(module)
        return self._target_dtype or self._load_dtype

    def model_dtype(self, name: str) -> torch.dtype:
        """The dtype model `name` computes in: its own once loaded, else the one it will load in (a per-component
        torch_dtype, or the pipeline's; `to(dtype)` overrides both)."""
        module = self._loaded.get(name)
        if module is not None:
            return module_dtype(module)
        return self._target_dtype or self._load_dtypes.get(name) or self._load_dtype

    @property
    def components(self) -> dict[str, Any]:
        """Every component, as diffusers' `pipe.components` (for `OtherPipeline(**pipe.components)`): models a
        staged pipeline has not loaded are loaded now, and stay loaded; None only where the pipeline has none."""
        return {name: getattr(self, name) for name in COMPONENTS[:-1]} | {"scheduler": self.scheduler}
