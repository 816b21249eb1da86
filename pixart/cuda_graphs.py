"""CUDA graphs of the transformer for one sampling run: the first call of each input signature runs eagerly (it also
warms up lazy state: cuBLAS handles, Triton and inductor kernels), the second captures a graph, and later calls
replay it, copying their inputs into the graph's own. An eager transformer call issues hundreds of kernels and is
bound by the host's time to launch them (an H100 waits on Python at 1024²); a replay launches them all at once.

The graphs live for one pipeline call only, so nothing outlives the weights they read: a staged or offloaded model,
a LoRA loaded between calls or a callback that changes the inputs' values cannot replay a stale graph.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

logger = logging.getLogger("pixart")


def signature(args: tuple, kwargs: dict) -> tuple:
    """What a graph is made for: each tensor's shape, dtype and device, every other argument's value."""
    items = list(args) + [kwargs[k] for k in sorted(kwargs)]
    return tuple(sorted(kwargs)), tuple(
        (tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else ("value", a) for a in items)


class GraphedForward:
    """Calls `forward` like itself, through a CUDA graph per input signature from the second call on.

    Runs eagerly where a graph cannot serve: inputs not on a GPU, autograd enabled, or a capture that failed (logged
    once; the run goes on eagerly)."""

    def __init__(self, forward: Callable[..., torch.Tensor]):
        self.forward = forward
        self.seen: set[tuple] = set()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list, dict, torch.Tensor]] = {}
        self.failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.failed or torch.is_grad_enabled() or not self.graphable(args, kwargs):
            return self.forward(*args, **kwargs)
        key = signature(args, kwargs)
        if key not in self.graphs:
            if key not in self.seen:  # the first call of a signature: eager, and the warm-up of the capture
                self.seen.add(key)
                return self.forward(*args, **kwargs)
            try:
                self.graphs[key] = self.capture(args, kwargs)
            except Exception as error:  # a capture fails with CUDA's or the compiler's errors, which share no type
                logger.warning("pixart: capturing a CUDA graph of the transformer failed (%s); running eagerly", error)
                self.failed = True
                return self.forward(*args, **kwargs)
        graph, static_args, static_kwargs, out = self.graphs[key]
        statics = [*zip(static_args, args), *((static_kwargs[k], v) for k, v in kwargs.items())]  # by name
        for static, value in statics:
            if isinstance(static, torch.Tensor):
                static.copy_(value)
        graph.replay()
        return out.clone()  # the graph overwrites its output at the next replay

    @staticmethod
    def graphable(args: tuple, kwargs: dict) -> bool:
        """Whether a graph can serve these inputs: all tensors on a GPU."""
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        return bool(tensors) and all(t.is_cuda for t in tensors)

    def capture(self, args: tuple, kwargs: dict) -> tuple[torch.cuda.CUDAGraph, list, dict, torch.Tensor]:
        """A graph of forward on copies of the inputs (its own, which each replay refills)."""
        copy = lambda a: a.clone() if isinstance(a, torch.Tensor) else a  # noqa: E731
        static_args, static_kwargs = [copy(a) for a in args], {k: copy(v) for k, v in kwargs.items()}
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # captures run off the default stream
            with torch.cuda.graph(graph, stream=stream):
                out = self.forward(*static_args, **static_kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        return graph, static_args, static_kwargs, out
