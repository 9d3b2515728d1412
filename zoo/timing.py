"""Timing helpers shared by the benchmarks.

``median_ms(fn, warmup, reps)``: the median of ``reps`` timings after ``warmup`` calls, by
CUDA events on the GPU (host clock on the CPU). ``first_call_s(fn)``: the latency of one call,
device synchronised before and after (a first call includes autotuning and compilation).
``capture_graph(fn, device)``: ``fn`` captured in a CUDA graph, returned as its replay.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

__all__ = ["capture_graph", "first_call_s", "median_ms"]


def median_ms(fn: Callable[[], Any], warmup: int, reps: int) -> float:
    """Median of ``reps`` timings in milliseconds after ``warmup`` calls (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def first_call_s(fn: Callable[[], Any]) -> float:
    """Seconds of one call of ``fn``, synchronised before and after on the GPU."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def capture_graph(fn: Callable[[], Any], device: torch.device, warmup: int = 3) -> Callable[[], None]:
    """Run ``fn`` a few times on a side stream, capture one call in a CUDA graph, return its replay."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay
