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
Triton path is two kernels:

- ``_antidiagonal_lse_kernel``: a GEMM. Each program owns ``BLOCK_T`` strided query groups x
  ``BLOCK_T`` key groups and loops over the ``S * D`` features in chunks of ``BLOCK_K`` (chunk
  ``j`` of query group ``r`` is a slice of token row ``r*S + S-1 - j*BLOCK_K//D``, of key group
  ``c`` one of ``c*S + j*BLOCK_K//D``; no strided copy is made), ``tl.dot`` accumulating fp32,
  software-pipelined. Only tiles on or below the causal diagonal are launched (closed-form
  lower-triangle tile map). The epilogue, in registers, writes one number per (query group,
  key block): ``log2 sum exp2`` of the group's logits in that block.
- ``_block_sum_kernel``: one program per query block reads those numbers for its groups, takes
  the softmax over each group's visible key blocks (online max/sum, then a second pass) and
  sums the probabilities over the block's groups into ``[B, H, Qb, Kb]``.

The buffer between them holds ``groups x Kb`` fp32 values per head (``N/S x N/128``; 2 GiB at
128k tokens, stride 8 and 32 heads), so queries are processed in chunks bounded by
``chunk_elements``. Tile sizes, feature chunk, warps and pipeline stages are autotuned per
``(S, D)``. ``antidiagonal_block_scores`` dispatches: CUDA tensors run Triton, CPU tensors the
reference.

Cost: the strided matmul is ``2 * (N/S) * (M/S) * S*D = 2*N*M*D/S`` FLOPs per head, half of
it under a causal mask (``N^2*D/S``): ``1/(2S)`` of dense causal attention's ``2*N^2*D``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from zoo.kernels.checks import check_grouped_query_key, triton_interpreting

__all__ = [
    "antidiagonal_block_scores",
    "antidiagonal_block_scores_reference",
    "antidiagonal_block_scores_triton",
]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_inputs(q: Tensor, k: Tensor, block_size: int | tuple[int, int], stride: int) -> tuple[int, int]:
    check_grouped_query_key(q, k)
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

# The raw kernels below become Triton kernels at their first launch, compiled (and autotuned)
# or interpreted as TRITON_INTERPRET says then, so tests can run them on the CPU in one process.
_KERNELS: dict[tuple[str, bool], Any] = {}

# Hopper/Ampere GEMM tiles. Square tiles (BLOCK_T query groups x BLOCK_T key groups) keep the
# lower-triangle tile map in closed form; BLOCK_K is the feature chunk of one token row.
_AUTOTUNE_CONFIGS = [
    (128, 64, 8, 3),
    (128, 64, 4, 3),
    (128, 64, 8, 4),
    (128, 64, 4, 4),
    (128, 64, 8, 5),
    (128, 32, 4, 4),
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (64, 64, 4, 3),
    (64, 128, 4, 3),
    (64, 64, 4, 4),
]


def _prune_configs(configs: list, named_args: dict, **kwargs: Any) -> list:
    args = {**named_args, **kwargs}
    head_dim, cols_per_block = int(args["HEAD_DIM"]), int(args["COLS_PER_BLOCK"])
    max_k = max(16, 1 << (head_dim - 1).bit_length())
    kept = [c for c in configs if c.kwargs["BLOCK_K"] <= max_k and c.kwargs["BLOCK_T"] >= cols_per_block]
    return kept or configs[:1]


def _kernel(name: str) -> Any:
    interpret = triton_interpreting()
    if (name, interpret) not in _KERNELS:
        raw = {"scores": _antidiagonal_lse_kernel, "blocks": _block_sum_kernel}[name]
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            _KERNELS[(name, interpret)] = InterpretedFunction(raw)
        else:
            from triton.runtime.jit import JITFunction

            kernel = JITFunction(raw)
            if name == "scores":
                configs = [
                    triton.Config({"BLOCK_T": t, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                    for t, bk, w, s in _AUTOTUNE_CONFIGS
                ]
                kernel = triton.autotune(
                    configs,
                    key=["STRIDE", "HEAD_DIM", "COLS_PER_BLOCK", "CAUSAL", "IEEE", "EVEN"],
                    prune_configs_by={"early_config_prune": _prune_configs},
                )(kernel)
            _KERNELS[(name, interpret)] = kernel
    return _KERNELS[(name, interpret)]


def _triangle_rows(row_tiles: int, col_tiles: int, first_diag: int) -> int:
    """Row tiles whose visible key tiles ``0 .. i + first_diag`` stop before the last key tile."""
    return min(row_tiles, max(col_tiles - first_diag - 1, 0))


def _tile_count(rows: int, cols: int, offset: int, stride: int, tile: int, causal: bool) -> int:
    """Programs of the lower-triangle tile map (see ``_antidiagonal_lse_kernel``)."""
    row_tiles, col_tiles = -(-rows // tile), -(-cols // tile)
    if not causal:
        return row_tiles * col_tiles
    first_diag = -(-offset // (tile * stride))
    tri = _triangle_rows(row_tiles, col_tiles, first_diag)
    return tri * (tri + 2 * first_diag + 1) // 2 + (row_tiles - tri) * col_tiles


def _antidiagonal_lse_kernel(
    Q,
    K,
    LSE,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_km,
    stride_kd,
    stride_lb,
    stride_lh,
    stride_lr,
    stride_lk,
    num_heads,
    group,
    n,
    m,
    row_start,
    row_count,
    cols,
    num_k_blocks,
    scale_log2,
    STRIDE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    COLS_PER_BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
    EVEN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One ``BLOCK_T x BLOCK_T`` tile of strided logits -> log2-sum-exp2 per (query group, key block).

    Programs enumerate only the tiles on or below the causal diagonal: row tile ``i`` sees key
    tiles ``0 .. i + first_diag`` (capped at the last one), so the first ``tri`` row tiles form a
    trapezoid whose start offsets are ``i * (i + 2 * first_diag + 1) / 2`` (inverted with a square
    root and corrected by integer checks) and the remaining row tiles are full rows.
    """
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // group
    row_tiles = tl.cdiv(row_count, BLOCK_T)
    col_tiles = tl.cdiv(cols, BLOCK_T)
    if CAUSAL:
        offset = (m - n) + row_start * STRIDE
        first_diag = tl.cdiv(offset, BLOCK_T * STRIDE)
        tri = tl.minimum(row_tiles, tl.maximum(col_tiles - first_diag - 1, 0))
        a = 2 * first_diag + 1
        tri_tiles = tri * (tri + a) // 2
        guess = ((tl.sqrt((a * a + 8 * pid).to(tl.float32)) - a) * 0.5).to(tl.int32)
        guess = tl.minimum(tl.maximum(guess, 0), tl.maximum(tri - 1, 0))
        for _ in tl.static_range(2):  # float rounding moves the guess by at most one either way
            guess = tl.where((guess + 1) * (guess + 1 + a) // 2 <= pid, guess + 1, guess)
            guess = tl.where(guess * (guess + a) // 2 > pid, guess - 1, guess)
        rest = pid - tri_tiles
        tile_r = tl.where(pid < tri_tiles, guess, tri + rest // tl.maximum(col_tiles, 1))
        tile_c = tl.where(pid < tri_tiles, pid - guess * (guess + a) // 2, rest % tl.maximum(col_tiles, 1))
    else:
        tile_r = pid // col_tiles
        tile_c = pid % col_tiles

    local_rows = tile_r * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = row_start + local_rows
    group_cols = tile_c * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = local_rows < row_count
    # token row of feature chunk 0: query r*S + S-1 (reversed), key c*S
    q_rows = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q_rows = q_rows + (rows.to(tl.int64) * STRIDE + STRIDE - 1) * stride_qn
    k_rows = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    k_rows = k_rows + group_cols.to(tl.int64) * STRIDE * stride_km
    q_first = rows * STRIDE + STRIDE - 1
    k_first = group_cols * STRIDE
    CHUNKS: tl.constexpr = (HEAD_DIM + BLOCK_K - 1) // BLOCK_K
    acc = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
    for j in range(0, STRIDE * CHUNKS):
        token = j // CHUNKS
        feat = (j % CHUNKS) * BLOCK_K + offs_k
        q_ptrs = q_rows[:, None] - token * stride_qn + feat[None, :] * stride_qd
        k_ptrs = k_rows[:, None] + token * stride_km + feat[None, :] * stride_kd
        if EVEN and HEAD_DIM % BLOCK_K == 0:  # every row and feature in range: plain loads
            q_tile = tl.load(q_ptrs)
            k_tile = tl.load(k_ptrs)
        else:
            feat_ok = feat < HEAD_DIM
            q_tile = tl.load(
                q_ptrs, mask=row_ok[:, None] & (q_first[:, None] - token < n) & feat_ok[None, :], other=0.0
            )
            k_tile = tl.load(k_ptrs, mask=(k_first[:, None] + token < m) & feat_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(q_tile, tl.trans(k_tile), input_precision="ieee")
        else:
            acc += tl.dot(q_tile, tl.trans(k_tile))

    logits = acc * scale_log2
    visible = k_first[None, :] < m
    if CAUSAL:
        visible = visible & (k_first[None, :] <= (m - n) + q_first[:, None])
    logits = tl.where(visible, logits, float("-inf"))
    tile_max = tl.max(logits, axis=1)
    shift = tl.where(tile_max == float("-inf"), 0.0, tile_max)
    p = tl.exp2(logits - shift[:, None])
    KB_PER_TILE: tl.constexpr = BLOCK_T // COLS_PER_BLOCK
    block_sums = tl.sum(tl.reshape(p, [BLOCK_T, KB_PER_TILE, COLS_PER_BLOCK]), axis=2)
    lse = tl.log2(block_sums) + shift[:, None]
    kb = tile_c * KB_PER_TILE + tl.arange(0, KB_PER_TILE)
    ptrs = (
        LSE
        + b.to(tl.int64) * stride_lb
        + h.to(tl.int64) * stride_lh
        + local_rows[:, None].to(tl.int64) * stride_lr
        + kb[None, :] * stride_lk
    )
    tl.store(ptrs, lse, mask=row_ok[:, None] & (kb[None, :] < num_k_blocks))


def _block_sum_kernel(
    LSE,
    OUT,
    stride_lb,
    stride_lh,
    stride_lr,
    stride_lk,
    stride_ob,
    stride_oh,
    stride_oq,
    stride_ok,
    num_heads,
    n,
    m,
    row_start,
    row_count,
    num_k_blocks,
    block_k,
    STRIDE: tl.constexpr,
    ROWS_PER_BLOCK: tl.constexpr,
    ROWS_P2: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_KB: tl.constexpr,
):
    """One query block: softmax over each group's visible key blocks, summed over the block's groups."""
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    local = pid_q * ROWS_PER_BLOCK + tl.arange(0, ROWS_P2)
    rows = row_start + local
    row_ok = (tl.arange(0, ROWS_P2) < ROWS_PER_BLOCK) & (local < row_count)
    real_row = row_ok & (rows * STRIDE < n)
    if CAUSAL:
        last_kb = ((m - n) + rows * STRIDE + STRIDE - 1) // block_k
        block_end = tl.minimum(
            num_k_blocks,
            ((m - n) + (row_start + pid_q * ROWS_PER_BLOCK + ROWS_PER_BLOCK) * STRIDE - 1) // block_k + 1,
        )
    else:
        last_kb = rows * 0 + num_k_blocks - 1
        block_end = num_k_blocks
    base = (
        LSE
        + b.to(tl.int64) * stride_lb
        + h.to(tl.int64) * stride_lh
        + local[:, None].to(tl.int64) * stride_lr
    )
    offs = tl.arange(0, BLOCK_KB)
    row_max = tl.full([ROWS_P2], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([ROWS_P2], dtype=tl.float32)
    for kb0 in range(0, block_end, BLOCK_KB):
        kb = kb0 + offs
        ok = row_ok[:, None] & (kb[None, :] < num_k_blocks) & (kb[None, :] <= last_kb[:, None])
        lse = tl.load(base + kb[None, :] * stride_lk, mask=ok, other=float("-inf"))
        new_max = tl.maximum(row_max, tl.max(lse, axis=1))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp2(row_max - safe) + tl.sum(tl.exp2(lse - safe[:, None]), axis=1)
        row_max = new_max
    safe = tl.where(row_max == float("-inf"), 0.0, row_max)
    inv = tl.where(real_row & (row_sum > 0), 1.0 / tl.where(row_sum > 0, row_sum, 1.0), 0.0)
    out = OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + pid_q.to(tl.int64) * stride_oq
    for kb0 in range(0, block_end, BLOCK_KB):
        kb = kb0 + offs
        ok = row_ok[:, None] & (kb[None, :] < num_k_blocks) & (kb[None, :] <= last_kb[:, None])
        lse = tl.load(base + kb[None, :] * stride_lk, mask=ok, other=float("-inf"))
        probs = tl.exp2(lse - safe[:, None]) * inv[:, None]
        tl.store(out + kb * stride_ok, tl.sum(probs, axis=0), mask=kb < num_k_blocks)


def antidiagonal_block_scores_triton(
    q: Tensor,
    k: Tensor,
    block_size: int | tuple[int, int] = 128,
    stride: int = 8,
    *,
    causal: bool = True,
    chunk_elements: int = 1 << 28,
    tile: int | None = None,
    feature_chunk: int | None = None,
) -> Tensor:
    """Antidiagonal block scores ``[B, H, Qb, Kb]`` (fp32) with the Triton kernels.

    Same contract as :func:`antidiagonal_block_scores_reference`. ``chunk_elements`` bounds the
    per-(group, key block) buffer held per query chunk (``B * H * groups * Kb`` fp32 values).
    ``tile`` (query/key groups per tile, a power of two >= 16 and >= ``block_k / stride``) and
    ``feature_chunk`` (``BLOCK_K``) fix the GEMM tile; by default they are autotuned on CUDA.
    ``block_k / stride`` must be a power of two.
    """
    if triton is None:
        raise RuntimeError("antidiagonal_block_scores_triton: Triton is not installed")
    block_q, block_k = _check_inputs(q, k, block_size, stride)
    batch, heads, n, dim = q.shape
    kv_heads, m = k.shape[1], k.shape[2]
    s = stride
    num_q_blocks, num_k_blocks = _ceil_div(n, block_q), _ceil_div(m, block_k)
    rows_per_block, cols_per_block = block_q // s, block_k // s
    if cols_per_block & (cols_per_block - 1) or cols_per_block > 128:
        raise ValueError(
            f"block_size: the Triton kernel needs block_k/stride a power of two <= 128, got {cols_per_block}"
        )
    interpret = triton_interpreting()
    if not q.is_cuda and not interpret:
        raise ValueError(f"q: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    fixed = tile is not None or feature_chunk is not None or interpret
    if fixed:
        tile = tile or max(16, cols_per_block)
        feature_chunk = feature_chunk or (16 if interpret else 64)
        if tile < 16 or tile & (tile - 1) or tile < cols_per_block:
            raise ValueError(
                f"tile: expected a power of two >= 16 and >= block_k/stride={cols_per_block}, got {tile}"
            )
        if feature_chunk < 16 or feature_chunk & (feature_chunk - 1):
            raise ValueError(f"feature_chunk: expected a power of two >= 16, got {feature_chunk}")
    rows = num_q_blocks * rows_per_block
    cols = num_k_blocks * cols_per_block
    unit = rows_per_block * 128 // math.gcd(rows_per_block, 128)
    per_row = batch * heads * num_k_blocks
    budget_rows = max(1, chunk_elements // per_row)
    step = unit if budget_rows >= unit else rows_per_block
    chunk_rows = max(step, budget_rows // step * step)

    out = torch.zeros(batch, heads, num_q_blocks, num_k_blocks, dtype=torch.float32, device=q.device)
    scale_log2 = (1.0 / math.sqrt(dim) / s) * 1.4426950408889634
    ieee = q.dtype == torch.float32 or k.dtype == torch.float32
    # no partial tile anywhere (every autotuned BLOCK_T divides 128): loads without masks
    whole = max(128, tile or 0)
    even = n % block_q == 0 and m % block_k == 0 and cols % whole == 0
    if q.dtype != k.dtype:
        q, k = q.float(), k.float()
    lse = torch.empty(batch, heads, min(rows, chunk_rows), num_k_blocks, dtype=torch.float32, device=q.device)
    score_kernel, sum_kernel = _kernel("scores"), _kernel("blocks")
    if fixed and not interpret:  # fixed tiles: the JIT kernel under the autotuner
        score_kernel = score_kernel.fn
    for r0 in range(0, rows, chunk_rows):
        count = min(rows, r0 + chunk_rows) - r0
        offset = (m - n) + r0 * s

        def grid(meta: dict, count: int = count, offset: int = offset) -> tuple[int, int]:
            return (_tile_count(count, cols, offset, s, meta["BLOCK_T"], causal), batch * heads)

        meta: dict[str, Any] = {}
        if fixed:
            meta = {"BLOCK_T": tile, "BLOCK_K": feature_chunk}
            if not interpret:
                meta.update(num_warps=8 if tile >= 128 else 4, num_stages=3)
        score_kernel[grid](
            q,
            k,
            lse,
            *q.stride(),
            *k.stride(),
            *lse.stride(),
            heads,
            heads // kv_heads,
            n,
            m,
            r0,
            count,
            cols,
            num_k_blocks,
            scale_log2,
            STRIDE=s,
            HEAD_DIM=dim,
            COLS_PER_BLOCK=cols_per_block,
            CAUSAL=bool(causal),
            IEEE=ieee,
            EVEN=even and count % whole == 0,
            **meta,
        )
        blocks_here = count // rows_per_block
        chunk_out = out[:, :, r0 // rows_per_block : r0 // rows_per_block + blocks_here]
        sum_kernel[(blocks_here, batch * heads)](
            lse,
            chunk_out,
            *lse.stride(),
            *chunk_out.stride(),
            heads,
            n,
            m,
            r0,
            count,
            num_k_blocks,
            block_k,
            STRIDE=s,
            ROWS_PER_BLOCK=rows_per_block,
            ROWS_P2=max(1, 1 << (rows_per_block - 1).bit_length()),
            CAUSAL=bool(causal),
            BLOCK_KB=64 if interpret else 128,
            num_warps=4,
        )
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
