"""Checks shared by the kernels: grouped-query ``q [B, H, N, D]`` against ``k [B, Hkv, M, D]``, and
whether Triton runs interpreted (``TRITON_INTERPRET=1``, kernels on CPU tensors)."""

from __future__ import annotations

import os

from torch import Tensor

__all__ = ["check_grouped_query_key", "triton_interpreting", "triton_runs_on"]


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is set (to anything but ``0``): Triton kernels run in the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_runs_on(tensor: Tensor) -> bool:
    """Whether Triton kernels can take ``tensor``: a CUDA tensor, or a CPU one under the interpreter."""
    return tensor.is_cuda or (triton_interpreting() and tensor.device.type == "cpu")


def check_grouped_query_key(q: Tensor, k: Tensor) -> None:
    """Float 4-D ``q`` and ``k`` with equal batch and head dim, and ``Hkv`` dividing ``H``; else ``ValueError``."""
    if not isinstance(q, Tensor) or q.dim() != 4 or not q.is_floating_point():
        got = f"{q.dtype} {tuple(q.shape)}" if isinstance(q, Tensor) else type(q).__name__
        raise ValueError(f"q: expected a float tensor [B, H, N, D], got {got}")
    if not isinstance(k, Tensor) or k.dim() != 4 or not k.is_floating_point():
        got = f"{k.dtype} {tuple(k.shape)}" if isinstance(k, Tensor) else type(k).__name__
        raise ValueError(f"k: expected a float tensor [B, Hkv, M, D], got {got}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"k: expected batch {q.shape[0]} and head dim {q.shape[3]} like q, got shape {tuple(k.shape)}"
        )
    if k.shape[1] < 1 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"k: expected a number of heads dividing q's {q.shape[1]}, got {k.shape[1]}")
