"""Key importance of PBS-Attn (last-block attention per key) as Triton kernels, beside a reference.

"Sparser Block-Sparse Attention via Token Permutation" (Wang et al., arXiv 2510.21270).

PBS-Attn permutes keys by their importance: the mean softmax attention that the last ``last``
queries give each key, averaged over the query heads sharing the key head (grouped-query
attention). Per batch row and key head there are ``R = group * last`` query rows (head ``hk *
group + g``, query ``N - last + i`` at position ``M - last + i``):

    importance[j] = (1 / R) * sum_r exp(q_r . k_j / sqrt(D) - lse_r),
    lse_r = log sum_{j visible to r} exp(q_r . k_j / sqrt(D)),

with key ``j`` visible to row ``r`` when ``j <= M - last + i`` (causal) or always. Neither path
holds the ``R x M`` matrix of logits or probabilities:

- ``key_importance_reference`` (plain PyTorch, fp32 or fp64 accumulation) walks the keys in
  chunks twice: a running log-sum-exp per row, then the per-key sums of probabilities.
- The Triton path is two kernels. ``_row_stats_kernel``: each program owns ``BLOCK_R`` rows and
  one split of the keys, and keeps an online max and sum of ``exp2`` (flash-attention style);
  the splits are merged on the host side into ``lse`` (``[B * Hkv, R]``, log2 domain).
  ``_key_sums_kernel``: each program owns ``BLOCK_N`` keys, loops over all rows in tiles of
  ``BLOCK_R`` and sums ``exp2(s - lse)`` over the rows. ``tl.dot`` accumulates in fp32.

Cost per key head: two ``R x M x D`` matmuls (``4 R M D`` FLOPs), K read twice, ``2 R M``
exponentials; the only buffers are ``[B * Hkv, splits, R]`` row statistics and the
``[B, Hkv, M]`` fp32 output. At 128k tokens (R = 512, D = 128, Hkv = 8) that is 275 GFLOP and
0.54 GB of K reads, against the ~1 GB of bf16 logits and ~2 GB of fp32 probabilities an
unfused softmax writes and reads back.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from zoo.kernels.checks import check_grouped_query_key, triton_interpreting

__all__ = ["key_importance", "key_importance_reference", "key_importance_triton"]

try:  # Triton is optional on machines without it; the reference stays available
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    triton = None
    tl = None

_LOG2E = 1.4426950408889634


def _check_inputs(q: Tensor, k: Tensor, last: int) -> None:
    check_grouped_query_key(q, k)
    if q.shape[2] < 1 or q.shape[2] > k.shape[2]:
        raise ValueError(f"q: expected 1 <= N <= M={k.shape[2]} queries, got N={q.shape[2]}")
    if isinstance(last, bool) or not isinstance(last, int) or not 1 <= last <= q.shape[2]:
        raise ValueError(f"last: expected an int in [1, N={q.shape[2]}], got {last!r}")


def _last_rows(q: Tensor, kv_heads: int, last: int) -> Tensor:
    """``[B, Hkv, group * last, D]``: the last ``last`` queries of every head of each group."""
    batch, heads, n, dim = q.shape
    return q[:, :, n - last :].reshape(batch, kv_heads, (heads // kv_heads) * last, dim)


def key_importance_reference(
    q: Tensor, k: Tensor, last: int, causal: bool = True, *, chunk_elements: int = 1 << 24
) -> Tensor:
    """Mean softmax attention of the last ``last`` queries to each key: ``[B, Hkv, M]``.

    fp64 for fp64 inputs, fp32 otherwise. Keys are processed in chunks of at most
    ``chunk_elements // (B * Hkv * R)`` so that no ``R x M`` matrix is held.
    """
    _check_inputs(q, k, last)
    batch, _, _, dim = q.shape
    kv_heads, m = k.shape[1], k.shape[2]
    acc = torch.float64 if torch.float64 in (q.dtype, k.dtype) else torch.float32
    rows = _last_rows(q, kv_heads, last).to(acc)
    num_rows = rows.shape[2]
    chunk = max(1, chunk_elements // (batch * kv_heads * num_rows))
    scale = dim**-0.5
    query_pos = (m - last + torch.arange(num_rows, device=q.device) % last)[:, None]

    def logits(start: int) -> Tensor:
        stop = min(m, start + chunk)
        out = torch.matmul(rows, k[:, :, start:stop].to(acc).transpose(-1, -2)) * scale
        if causal and stop > m - last:  # only the last ``last`` keys can be after a row's query
            key_pos = torch.arange(start, stop, device=q.device)[None, :]
            out = out.masked_fill(key_pos > query_pos, float("-inf"))
        return out

    lse = torch.full((batch, kv_heads, num_rows), float("-inf"), dtype=acc, device=q.device)
    for start in range(0, m, chunk):
        lse = torch.logaddexp(lse, torch.logsumexp(logits(start), dim=-1))
    out = torch.empty(batch, kv_heads, m, dtype=acc, device=q.device)
    for start in range(0, m, chunk):
        probs = torch.exp(logits(start) - lse[..., None])
        out[..., start : start + probs.shape[-1]] = probs.sum(dim=2) / num_rows
    return out


def _row_stats_kernel(
    Q,
    K,
    MAX,
    SUM,
    stride_qz,
    stride_qr,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_km,
    stride_kd,
    kv_heads,
    num_rows,
    last,
    m,
    keys_per_split,
    num_splits,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Online max / sum of ``exp2`` over one split of the keys for ``BLOCK_R`` rows (log2 domain)."""
    split = tl.program_id(0)
    z = tl.program_id(1)
    row_tile = tl.program_id(2)
    b = z // kv_heads
    hk = z % kv_heads
    offs_r = row_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_r < num_rows
    d_ok = offs_d < HEAD_DIM
    q = tl.load(
        Q + z * stride_qz + offs_r[:, None] * stride_qr + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST:  # the interpreter multiplies bfloat16 as raw integers
        q = q.to(tl.float32)
    query_pos = m - last + offs_r % last
    row_max = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    start = split * keys_per_split
    stop = tl.minimum(start + keys_per_split, m)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < stop
        k_tile = tl.load(
            k_base + offs_n[None, :].to(tl.int64) * stride_km + offs_d[:, None] * stride_kd,
            mask=d_ok[:, None] & key_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            k_tile = k_tile.to(tl.float32)
        if IEEE:
            s = tl.dot(q, k_tile, input_precision="ieee")
        else:
            s = tl.dot(q, k_tile)
        s = s * scale_log2
        visible = key_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= query_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp2(row_max - safe_max) + tl.sum(tl.exp2(s - safe_max[:, None]), 1)
        row_max = new_max
    out = z * num_splits * num_rows + split * num_rows + offs_r
    tl.store(MAX + out, row_max, mask=row_ok)
    tl.store(SUM + out, row_sum, mask=row_ok)


def _key_sums_kernel(
    Q,
    K,
    LSE,
    OUT,
    stride_qz,
    stride_qr,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_km,
    stride_kd,
    kv_heads,
    num_rows,
    last,
    m,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Mean over all rows of ``exp2(s - lse)`` for ``BLOCK_N`` keys."""
    key_tile = tl.program_id(0)
    z = tl.program_id(1)
    b = z // kv_heads
    hk = z % kv_heads
    offs_n = key_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_n < m
    d_ok = offs_d < HEAD_DIM
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    k_tile = tl.load(
        k_base + offs_n[None, :].to(tl.int64) * stride_km + offs_d[:, None] * stride_kd,
        mask=d_ok[:, None] & key_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        k_tile = k_tile.to(tl.float32)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, num_rows, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        row_ok = offs_r < num_rows
        q = tl.load(
            Q + z * stride_qz + offs_r[:, None] * stride_qr + offs_d[None, :] * stride_qd,
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        lse = tl.load(LSE + z * num_rows + offs_r, mask=row_ok, other=0.0)
        if IEEE:
            s = tl.dot(q, k_tile, input_precision="ieee")
        else:
            s = tl.dot(q, k_tile)
        visible = row_ok[:, None] & key_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= (m - last + offs_r % last)[:, None])
        p = tl.exp2(s * scale_log2 - lse[:, None])
        total += tl.sum(tl.where(visible, p, 0.0), 0)
    tl.store(OUT + z.to(tl.int64) * m + offs_n, total / num_rows, mask=key_ok)


_KERNELS: dict[tuple[str, bool], Any] = {}
# (BLOCK_R, BLOCK_N, num_warps, num_stages) tried on CUDA, per kernel
_CONFIGS = {
    "stats": [(128, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3), (128, 64, 8, 4)],
    "sums": [(128, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3), (64, 64, 4, 3)],
}


def _kernel(name: str) -> Any:
    interpret = triton_interpreting()
    if (name, interpret) not in _KERNELS:
        raw = {"stats": _row_stats_kernel, "sums": _key_sums_kernel}[name]
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            _KERNELS[(name, interpret)] = InterpretedFunction(raw)
        else:
            from triton.runtime.jit import JITFunction

            configs = [
                triton.Config({"BLOCK_R": r, "BLOCK_N": c}, num_warps=w, num_stages=s)
                for r, c, w, s in _CONFIGS[name]
            ]
            _KERNELS[(name, interpret)] = triton.autotune(
                configs, key=["HEAD_DIM", "CAUSAL", "IEEE", "UPCAST"]
            )(JITFunction(raw))
    return _KERNELS[(name, interpret)]


def key_importance_triton(
    q: Tensor, k: Tensor, last: int, causal: bool = True, *, keys_per_split: int | None = None
) -> Tensor:
    """Same contract as :func:`key_importance_reference` (fp32 output) with the Triton kernels.

    ``q``/``k`` must be float16, bfloat16 or float32 CUDA tensors (or any device under
    ``TRITON_INTERPRET=1``). ``keys_per_split``: keys per program of the row-statistics kernel
    (by default chosen to give a few programs per SM).
    """
    if triton is None:
        raise RuntimeError("key_importance_triton: Triton is not installed")
    _check_inputs(q, k, last)
    interpret = triton_interpreting()
    if not q.is_cuda and not interpret:
        raise ValueError(f"q: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    allowed = (torch.float16, torch.bfloat16, torch.float32)
    if q.dtype not in allowed or k.dtype not in allowed:
        raise ValueError(
            f"q/k: the Triton kernel needs float16, bfloat16 or float32, got {q.dtype}/{k.dtype}"
        )
    batch, _, _, dim = q.shape
    kv_heads, m = k.shape[1], k.shape[2]
    ieee = torch.float32 in (q.dtype, k.dtype)
    if q.dtype != k.dtype:
        q, k = q.float(), k.float()
    rows = _last_rows(q, kv_heads, last).reshape(batch * kv_heads, -1, dim).contiguous()
    num_rows, z = rows.shape[1], batch * kv_heads
    if keys_per_split is None:
        target = 4 * (torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1)
        per_row_tile = max(1, target // (z * math.ceil(num_rows / 128)))
        keys_per_split = max(512, math.ceil(m / per_row_tile / 256) * 256)
    if isinstance(keys_per_split, bool) or not isinstance(keys_per_split, int) or keys_per_split < 1:
        raise ValueError(f"keys_per_split: expected a positive int, got {keys_per_split!r}")
    num_splits = math.ceil(m / keys_per_split)
    row_max = torch.empty(z, num_splits, num_rows, dtype=torch.float32, device=q.device)
    row_sum = torch.empty_like(row_max)
    scale_log2 = dim**-0.5 * _LOG2E
    block_d = max(16, 1 << (dim - 1).bit_length())
    meta: dict[str, Any] = {"BLOCK_R": 16, "BLOCK_N": 16} if interpret else {}
    upcast = interpret and q.dtype == torch.bfloat16
    common = dict(
        HEAD_DIM=dim, BLOCK_D=block_d, CAUSAL=bool(causal), IEEE=ieee or upcast, UPCAST=upcast, **meta
    )
    _kernel("stats")[lambda meta: (num_splits, z, triton.cdiv(num_rows, meta["BLOCK_R"]))](
        rows,
        k,
        row_max,
        row_sum,
        *rows.stride(),
        *k.stride(),
        kv_heads,
        num_rows,
        last,
        m,
        keys_per_split,
        num_splits,
        scale_log2,
        **common,
    )
    top = row_max.amax(dim=1, keepdim=True)  # finite: every row sees key 0, which split 0 holds
    lse = (top.squeeze(1) + torch.log2((row_sum * torch.exp2(row_max - top)).sum(dim=1))).contiguous()
    out = torch.empty(batch, kv_heads, m, dtype=torch.float32, device=q.device)
    _kernel("sums")[lambda meta: (triton.cdiv(m, meta["BLOCK_N"]), z)](
        rows,
        k,
        lse,
        out,
        *rows.stride(),
        *k.stride(),
        kv_heads,
        num_rows,
        last,
        m,
        scale_log2,
        **common,
    )
    return out


def key_importance(q: Tensor, k: Tensor, last: int, causal: bool = True, *, backend: str = "auto") -> Tensor:
    """Last-block key importance ``[B, Hkv, M]``.

    ``backend``: ``"triton"`` runs the Triton kernels, ``"torch"`` the chunked two-pass PyTorch
    version (any device); ``"auto"`` the kernels on CUDA tensors where Triton is installed, else
    the PyTorch version.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "triton" or (backend == "auto" and q.is_cuda and triton is not None):
        return key_importance_triton(q, k, last, causal)
    return key_importance_reference(q, k, last, causal)
