"""Antidiagonal block scoring of XAttention, as a Triton kernel beside its PyTorch reference.

"XAttention: Block Sparse Attention with Antidiagonal Scoring" (Xu et al., arXiv 2503.16428).

The score of a (query block, key block) pair is the softmax attention mass that lands on the
antidiagonals of its ``S x S`` cells (``S`` = stride):

1. Cut queries and keys into groups of ``S`` consecutive tokens. Query group ``r`` is read in
   reversed order and key group ``c`` in order, so the feature-concatenated dot product
   ``sum_i q[r*S + S-1-i] . k[c*S + i]`` is the sum along the antidiagonal of cell ``(r, c)``.
   One matmul over ``D*S`` features scores every cell at once.
2. Scale by ``1/sqrt(D)/S``, mask cells whose first key comes after the last query of the
   group (causal), and take the softmax over the cells of each query group.
3. Sum the probabilities over the ``(block_q/S) x (block_k/S)`` cells of each block. A query
   block's row of block scores sums to its number of (unpadded) query groups.

Queries are the last ``N`` of the ``M`` positions (query ``i`` sits at ``M - N + i``). Keys may
have fewer heads than queries (grouped-query attention); they are never repeated.

``antidiagonal_block_scores_reference`` is the plain PyTorch version (fp32 accumulation). The
Triton kernel computes one tile of ``BLOCK_R`` query groups x ``BLOCK_C`` key groups per program
with its own tile maximum (no loop over the keys), writes the per-group, per-key-block partial sums
and the tile maxima, and a short PyTorch epilogue rescales them into softmax probabilities and
sums groups into blocks. Queries are processed in chunks so the partial sums stay bounded in
memory at 128k tokens and beyond. ``antidiagonal_block_scores`` dispatches: CUDA tensors run
Triton, CPU tensors the reference.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "antidiagonal_block_scores",
    "antidiagonal_block_scores_reference",
    "antidiagonal_block_scores_triton",
]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_inputs(q: Tensor, k: Tensor, block_size: int | tuple[int, int], stride: int) -> tuple[int, int]:
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
    if q.shape[2] < 1 or k.shape[2] < 1:
        raise ValueError(f"q/k: expected non-empty sequences, got N={q.shape[2]}, M={k.shape[2]}")
    if q.shape[2] > k.shape[2]:
        raise ValueError(
            f"q: expected at most M={k.shape[2]} queries (the last N positions), got N={q.shape[2]}"
        )
    if q.device != k.device:
        raise ValueError(f"k: expected device {q.device} like q, got {k.device}")
    if isinstance(block_size, int):
        block_q = block_k = block_size
    elif isinstance(block_size, (tuple, list)) and len(block_size) == 2:
        block_q, block_k = int(block_size[0]), int(block_size[1])
    else:
        raise ValueError(f"block_size: expected an int or a pair (block_q, block_k), got {block_size!r}")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride: expected a positive int, got {stride!r}")
    if block_q < 1 or block_k < 1 or block_q % stride or block_k % stride:
        raise ValueError(
            f"block_size: expected positive multiples of stride={stride}, got ({block_q}, {block_k})"
        )
    return block_q, block_k


def _group_rows_per_chunk(
    batch: int, heads: int, num_k_blocks: int, rows_per_block: int, max_elements: int
) -> int:
    """Query groups per chunk: a whole number of query blocks keeping the partial sums bounded."""
    per_block = batch * heads * rows_per_block * max(num_k_blocks, 1)
    blocks = max(1, max_elements // max(per_block, 1))
    return blocks * rows_per_block


def antidiagonal_block_scores_reference(
    q: Tensor,
    k: Tensor,
    block_size: int | tuple[int, int] = 128,
    stride: int = 8,
    *,
    causal: bool = True,
    chunk_elements: int = 1 << 26,
) -> Tensor:
    """Antidiagonal block scores ``[B, H, Qb, Kb]`` in plain PyTorch (fp32; fp64 for fp64 inputs).

    Parameters
    ----------
    q, k:
        ``[B, H, N, D]`` and ``[B, Hkv, M, D]`` with ``H % Hkv == 0`` and ``N <= M``.
    block_size:
        Block size (or ``(block_q, block_k)``), each a multiple of ``stride``.
    stride:
        Antidiagonal stride ``S``.
    causal:
        Mask cells whose first key comes after the last query of the query group.
    chunk_elements:
        Bound on the elements of the strided score matrix held at once (queries are chunked).
    """
    block_q, block_k = _check_inputs(q, k, block_size, stride)
    batch, heads, n, dim = q.shape
    kv_heads, m = k.shape[1], k.shape[2]
    group = heads // kv_heads
    s = stride
    num_q_blocks, num_k_blocks = _ceil_div(n, block_q), _ceil_div(m, block_k)
    rows_per_block, cols_per_block = block_q // s, block_k // s
    rows, cols = num_q_blocks * rows_per_block, num_k_blocks * cols_per_block

    compute = torch.float64 if torch.float64 in (q.dtype, k.dtype) else torch.float32
    qf = torch.nn.functional.pad(q.to(compute), (0, 0, 0, rows * s - n))
    kf = torch.nn.functional.pad(k.to(compute), (0, 0, 0, cols * s - m))
    # strided keys: group c holds k[c*S + i] at features [i*D, (i+1)*D)
    k_strided = kf.reshape(batch, kv_heads, cols, s * dim)
    # reversed strided queries: group r holds q[r*S + S-1-i] at features [i*D, (i+1)*D)
    q_strided = qf.reshape(batch, heads, rows, s, dim).flip(3).reshape(batch, kv_heads, group, rows, s * dim)

    scale = 1.0 / math.sqrt(dim) / s
    col = torch.arange(cols, device=q.device)
    col_valid = col * s < m
    out = torch.zeros(batch, heads, num_q_blocks, num_k_blocks, dtype=compute, device=q.device)
    chunk_rows = max(
        rows_per_block,
        (chunk_elements // max(batch * heads * cols, 1)) // rows_per_block * rows_per_block,
    )
    for r0 in range(0, rows, chunk_rows):
        r1 = min(rows, r0 + chunk_rows)
        logits = torch.matmul(q_strided[:, :, :, r0:r1], k_strided[:, :, None].transpose(-1, -2)) * scale
        row = torch.arange(r0, r1, device=q.device)
        visible = col_valid[None, :].expand(r1 - r0, cols)
        if causal:
            last_query_pos = (m - n) + row * s + s - 1
            visible = visible & (col[None, :] * s <= last_query_pos[:, None])
        logits = logits.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        probs = probs.masked_fill((row * s >= n)[:, None], 0.0)  # groups made only of padding
        probs = probs.reshape(
            batch, heads, (r1 - r0) // rows_per_block, rows_per_block, num_k_blocks, cols_per_block
        )
        b0 = r0 // rows_per_block
        out[:, :, b0 : b0 + probs.shape[2]] = probs.sum(dim=(3, 5))
    return out


try:  # Triton is optional on machines without it; the reference stays available
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    triton = None
    tl = None

# The raw kernel below becomes a Triton kernel at its first launch, compiled or interpreted as
# TRITON_INTERPRET says then (so tests can run it on the CPU in the same process).
_KERNELS: dict[bool, Any] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _tile_kernel() -> Any:
    interpret = _interpreting()
    if interpret not in _KERNELS:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction as wrap
        else:
            from triton.runtime.jit import JITFunction as wrap
        _KERNELS[interpret] = wrap(_antidiagonal_tile_kernel)
    return _KERNELS[interpret]


def _antidiagonal_tile_kernel(
    Q,
    K,
    PARTIAL,
    TILE_MAX,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_km,
    stride_kd,
    stride_pb,
    stride_ph,
    stride_pr,
    stride_pk,
    stride_tb,
    stride_th,
    stride_tr,
    stride_tt,
    num_heads,
    group,
    n,
    m,
    row_start,
    row_count,
    num_k_blocks,
    scale_log2,
    STRIDE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    COLS_PER_BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // group

    local_rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = row_start + local_rows
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if CAUSAL:
        # the whole tile lies after the last query of its last group: nothing to score
        last_pos = (m - n) + (row_start + pid_r * BLOCK_R + BLOCK_R - 1) * STRIDE + STRIDE - 1
        if pid_c * BLOCK_C * STRIDE > last_pos:
            return

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for i in tl.static_range(STRIDE):
        q_idx = rows * STRIDE + (STRIDE - 1 - i)
        k_idx = cols * STRIDE + i
        q_tile = tl.load(
            q_base + q_idx[:, None].to(tl.int64) * stride_qn + offs_d[None, :] * stride_qd,
            mask=(q_idx[:, None] < n) & d_ok[None, :],
            other=0.0,
        )
        k_tile = tl.load(
            k_base + k_idx[None, :].to(tl.int64) * stride_km + offs_d[:, None] * stride_kd,
            mask=(k_idx[None, :] < m) & d_ok[:, None],
            other=0.0,
        )
        if IEEE:
            acc += tl.dot(q_tile, k_tile, input_precision="ieee")
        else:
            acc += tl.dot(q_tile, k_tile)

    logits = acc * scale_log2
    visible = (cols[None, :] * STRIDE < m) & (local_rows[:, None] < row_count)
    if CAUSAL:
        visible = visible & (cols[None, :] * STRIDE <= (m - n) + rows[:, None] * STRIDE + STRIDE - 1)
    logits = tl.where(visible, logits, float("-inf"))
    tile_max = tl.max(logits, axis=1)
    shift = tl.where(tile_max == float("-inf"), 0.0, tile_max)
    p = tl.exp2(logits - shift[:, None])
    block_sums = tl.sum(tl.reshape(p, [BLOCK_R, BLOCK_C // COLS_PER_BLOCK, COLS_PER_BLOCK]), axis=2)

    kb = pid_c * (BLOCK_C // COLS_PER_BLOCK) + tl.arange(0, BLOCK_C // COLS_PER_BLOCK)
    row_ok = local_rows < row_count
    p_ptrs = (
        PARTIAL
        + b.to(tl.int64) * stride_pb
        + h.to(tl.int64) * stride_ph
        + local_rows[:, None].to(tl.int64) * stride_pr
        + kb[None, :] * stride_pk
    )
    tl.store(p_ptrs, block_sums, mask=row_ok[:, None] & (kb[None, :] < num_k_blocks))
    t_ptrs = (
        TILE_MAX
        + b.to(tl.int64) * stride_tb
        + h.to(tl.int64) * stride_th
        + local_rows.to(tl.int64) * stride_tr
        + pid_c * stride_tt
    )
    tl.store(t_ptrs, tile_max, mask=row_ok)


def antidiagonal_block_scores_triton(
    q: Tensor,
    k: Tensor,
    block_size: int | tuple[int, int] = 128,
    stride: int = 8,
    *,
    causal: bool = True,
    chunk_elements: int = 1 << 26,
    block_r: int = 64,
    block_c: int = 64,
    num_warps: int = 4,
) -> Tensor:
    """Antidiagonal block scores ``[B, H, Qb, Kb]`` (fp32) with the Triton tile kernel.

    Same contract as :func:`antidiagonal_block_scores_reference`. ``chunk_elements`` bounds the
    partial sums held per query chunk (``B * H * groups * Kb`` fp32 values). ``block_r`` and
    ``block_c`` are the tile sizes in query and key groups (powers of two, at least 16;
    ``block_c`` a multiple of ``block_k / stride``).
    """
    if triton is None:
        raise RuntimeError("antidiagonal_block_scores_triton: Triton is not installed")
    block_q, block_k = _check_inputs(q, k, block_size, stride)
    if not q.is_cuda and not _interpreting():
        raise ValueError(f"q: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    batch, heads, n, dim = q.shape
    kv_heads, m = k.shape[1], k.shape[2]
    s = stride
    num_q_blocks, num_k_blocks = _ceil_div(n, block_q), _ceil_div(m, block_k)
    rows_per_block, cols_per_block = block_q // s, block_k // s
    block_c = max(block_c, cols_per_block)
    if block_c & (block_c - 1) or block_r & (block_r - 1) or cols_per_block & (cols_per_block - 1):
        raise ValueError(
            f"block_c/block_r: expected powers of two with block_k/stride={cols_per_block} a power of two, "
            f"got block_c={block_c}, block_r={block_r}"
        )
    rows = num_q_blocks * rows_per_block
    cols = num_k_blocks * cols_per_block
    col_tiles = _ceil_div(cols, block_c)
    kb_per_tile = block_c // cols_per_block
    padded_k_blocks = col_tiles * kb_per_tile

    chunk_rows = _group_rows_per_chunk(batch, heads, padded_k_blocks, rows_per_block, chunk_elements)
    out = torch.empty(batch, heads, num_q_blocks, num_k_blocks, dtype=torch.float32, device=q.device)
    scale_log2 = (1.0 / math.sqrt(dim) / s) * 1.4426950408889634
    block_d = max(16, triton.next_power_of_2(dim))
    ieee = q.dtype == torch.float32 or k.dtype == torch.float32
    if q.dtype != k.dtype:
        q, k = q.float(), k.float()
    for r0 in range(0, rows, chunk_rows):
        r1 = min(rows, r0 + chunk_rows)
        count = r1 - r0
        partial = torch.zeros(batch, heads, count, padded_k_blocks, dtype=torch.float32, device=q.device)
        tile_max = torch.full(
            (batch, heads, count, col_tiles), float("-inf"), dtype=torch.float32, device=q.device
        )
        if causal:  # key tiles no group of the chunk can see are never launched
            last_pos = (m - n) + (r1 - 1) * s + s - 1
            launched_tiles = min(col_tiles, last_pos // (block_c * s) + 1)
        else:
            launched_tiles = col_tiles
        grid = (_ceil_div(count, block_r), launched_tiles, batch * heads)
        _tile_kernel()[grid](
            q,
            k,
            partial,
            tile_max,
            *q.stride(),
            *k.stride(),
            *partial.stride(),
            *tile_max.stride(),
            heads,
            heads // kv_heads,
            n,
            m,
            r0,
            count,
            num_k_blocks,
            scale_log2,
            STRIDE=s,
            HEAD_DIM=dim,
            BLOCK_D=block_d,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            COLS_PER_BLOCK=cols_per_block,
            CAUSAL=bool(causal),
            IEEE=ieee,
            num_warps=num_warps,
        )
        # epilogue: rescale each tile to the row maximum (log2 domain), normalise, sum groups into blocks
        row_max = tile_max.amax(dim=-1, keepdim=True)
        weight = torch.exp2(tile_max - torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max))
        scaled = partial.view(batch, heads, count, col_tiles, kb_per_tile) * weight[..., None]
        scaled = scaled.view(batch, heads, count, padded_k_blocks)[..., :num_k_blocks]
        total = scaled.sum(-1, keepdim=True)
        probs = torch.where(total > 0, scaled / total.clamp_min(1e-38), torch.zeros_like(scaled))
        group_ids = torch.arange(r0, r1, device=q.device)
        probs = probs.masked_fill((group_ids * s >= n)[:, None], 0.0)
        b0 = r0 // rows_per_block
        out[:, :, b0 : b0 + count // rows_per_block] = probs.view(
            batch, heads, count // rows_per_block, rows_per_block, num_k_blocks
        ).sum(3)
    return out


def antidiagonal_block_scores(
    q: Tensor,
    k: Tensor,
    block_size: int | tuple[int, int] = 128,
    stride: int = 8,
    *,
    causal: bool = True,
    backend: str = "auto",
    chunk_elements: int = 1 << 26,
) -> Tensor:
    """Antidiagonal block scores ``[B, H, Qb, Kb]``: Triton on CUDA, the reference on CPU.

    ``backend``: ``"auto"``, ``"triton"`` or ``"torch"``.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and q.is_cuda and triton is not None)
    if use_triton:
        return antidiagonal_block_scores_triton(
            q, k, block_size, stride, causal=causal, chunk_elements=chunk_elements
        )
    return antidiagonal_block_scores_reference(
        q, k, block_size, stride, causal=causal, chunk_elements=chunk_elements
    )
