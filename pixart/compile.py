"""torch.compile of the pipeline's models (inductor): one graph per input shape, reused by every later call."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .quant_dynamic import prepare_kernels

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_options(device: torch.device, mode: str | None) -> dict[str, Any]:
    """torch.compile's keyword arguments for a model that runs on `device`.

    On CPU the weights are frozen into the graph (inductor's `freezing`): it prepacks them for oneDNN and folds the
    weight side of quantized layers, which oneDNN's int8 kernel requires; later in-place changes to the weights are
    then not seen. torch.compile takes a mode or options, not both: on CPU the mode's options are spelled out."""
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}: choose one of {', '.join(COMPILE_MODES)} or None")
    if mode == "default":
        mode = None
    if device.type == "cpu":
        options = torch._inductor.list_mode_options(mode) if mode else {}
        options = {k: v for k, v in options.items() if k != "triton.cudagraphs"}  # no CUDA graphs on a CPU
        return {"dynamic": False, "options": {**options, "freezing": True}}
    return {"dynamic": False, "mode": mode}


def is_compiled(module: nn.Module) -> bool:
    """Whether `compile_model` compiled a method of `module` (its graphs are made per input shape)."""
    return bool(getattr(module, "compiled_methods", ()))


def compile_model(module: nn.Module, device: torch.device, mode: str | None = None,
                  method: str = "forward") -> nn.Module:
    """Compile `module.<method>` in place, for inference (parameter names stay as they are).

    It compiles on its first call per input shape; later calls of that shape reuse the graph."""
    if method in vars(module):
        raise ValueError(f"{type(module).__name__}.{method} is already compiled")
    module.compiled_methods = (*getattr(module, "compiled_methods", ()), method)
    prepare_kernels(module)  # what the quantized layers' kernels need, made eagerly: a traced graph cannot
    compiled = torch.compile(getattr(module, method), **compile_options(device, mode))
    if device.type != "cpu":
        setattr(module, method, compiled)
        return module

    def frozen(*args: Any, **kwargs: Any) -> Any:
        # dynamo reads `freezing` from the global config as it traces (compile's options reach only inductor),
        # and inductor freezes only without autograd
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            return compiled(*args, **kwargs)

    setattr(module, method, frozen)
    return module
