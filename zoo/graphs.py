"""Replay a fixed-shape tensor function from CUDA graphs.

Small models on large GPUs are often bound by the host: each of a forward's hundreds of kernel
launches costs the CPU more than the GPU spends on it. A CUDA graph records the launches of one
call and replays them as one. ``GraphedCall(fn)`` does that per input signature (shapes, dtypes,
device): the first call with a new signature runs ``fn`` a few times on a side stream (so that
lazy work - autotuning, caches, allocations - happens outside the capture), captures one call
on static copies of the inputs, and every call then copies its inputs into those buffers,
replays, and returns a copy of the static output.

``fn`` must be a pure function of its tensor arguments with a fixed control flow for a given
signature (no ``.item()``, no host synchronisation, no data-dependent shapes). Graphs replay
inference only: calls with gradients enabled (outside ``torch.no_grad()`` /
``torch.inference_mode()``) and calls on CPU tensors run ``fn`` directly.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["GraphedCall"]


class GraphedCall:
    """``GraphedCall(fn)(*tensors)`` = ``fn(*tensors)``, replayed from one CUDA graph per input signature."""

    def __init__(self, fn: Callable[..., Tensor], warmup: int = 2) -> None:
        if not callable(fn):
            raise ValueError(f"fn: expected a callable, got {type(fn).__name__}")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(
                f"warmup: expected an integer >= 1 (lazy work must happen before capture), got {warmup!r}"
            )
        self.fn = fn
        self.warmup = warmup
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[Tensor], Tensor]] = {}

    def __call__(self, *tensors: Tensor) -> Tensor:
        if not tensors or not all(isinstance(t, Tensor) for t in tensors):
            raise ValueError(
                f"tensors: expected one or more tensors, got {[type(t).__name__ for t in tensors]}"
            )
        device = tensors[0].device
        if device.type != "cuda" or torch.is_grad_enabled():
            return self.fn(*tensors)
        if any(t.device != device for t in tensors):
            raise ValueError(f"tensors: expected all on {device}, got {[str(t.device) for t in tensors]}")
        key = tuple((tuple(t.shape), t.dtype) for t in tensors) + (device,)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(tensors)
        graph, static_inputs, static_output = entry
        for buffer, t in zip(static_inputs, tensors):
            buffer.copy_(t)
        graph.replay()
        return static_output.clone()

    def _capture(self, tensors: tuple[Tensor, ...]) -> tuple[torch.cuda.CUDAGraph, list[Tensor], Tensor]:
        static_inputs = [t.clone() for t in tensors]
        side = torch.cuda.Stream(tensors[0].device)
        side.wait_stream(torch.cuda.current_stream(tensors[0].device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*static_inputs)
        torch.cuda.current_stream(tensors[0].device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = self.fn(*static_inputs)
        if not isinstance(static_output, Tensor):
            raise ValueError(f"fn: expected a tensor result to replay, got {type(static_output).__name__}")
        return graph, static_inputs, static_output

    def clear(self) -> None:
        """Drop every captured graph (their memory pools go with them)."""
        self._graphs.clear()
