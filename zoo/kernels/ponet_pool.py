"""PoNet's pooling and fusion as Triton kernels, forward and backward.

"PoNet: Pooling Network for Efficient Token Mixing in Long Sequences" (Tan et al., ICLR 2022,
arXiv 2110.02442). On the projections ``q, k, o, local, segment`` (``B, N, C``, ``H`` heads of
``D`` channels) PoNet computes, per head, ``O_t = (g + S_t) * o_t + L_t`` with

- ``g = sum_n softmax_n(qbar . k_n / sqrt(D)) k_n``, ``qbar`` the mean of ``q`` over real tokens;
- ``S_t`` the max of ``segment`` over the real tokens of the segment of token ``t``;
- ``L_t`` the max of ``local`` over the window ``t - K//2 .. t + K//2`` (kernel ``K``, 3 in PoNet).

Pads output zero; [CLS]/[SEP] tokens (``special_mask``, upstream ``clsgsepg``) are left out of
the local windows and get zero ``S`` and ``L``. Excluded tokens are left out of every max
exactly (as ``-inf``), like ``zoo.layers.ponet.ponet_mixing_reference``.

The sequence is cut into tiles of ``BLOCK_N`` tokens; a program handles one tile of one head
of one batch row, so every pass reads each input once, in ``O(N C)`` time, nothing ``N x N``:

forward (one fill, five launches, no host synchronisation)
  1. ``_reduce_kernel``: per-tile sums of ``q`` and counts of real tokens (for ``qbar``) and the
     segment max: a segmented running max inside the tile (``tl.associative_scan``; segments
     are contiguous runs, numbered per row), then one ``atomic_max`` per piece of a segment
     into an fp32 table ``(B, num_segments, C)`` (the one fill: ``-inf``);
  2. ``_tile_sum_kernel``: ``qbar`` from the tile partials;
  3. ``_softmax_kernel``: per-tile online-softmax partials of ``qbar . k`` (tile max, sum of
     exponentials, exponential-weighted sum of ``k``);
  4. ``_softmax_merge_kernel``: one program per head merges them into ``g`` and the
     log-sum-exp;
  5. ``_output_kernel``: gathers ``S`` from the table, max-pools ``local`` over shifted loads,
     writes ``(g + S) * o + L``.

``qbar``, ``g``, the log-sum-exp and the token counts live in one small fp32 buffer that the
backward reuses with the segment max table; the tile partials share one scratch buffer.

backward (``G`` = gradient of the output; one zero fill, five launches)
  1. ``_pool_backward_kernel``: ``d o``, ``d local`` (the window max recomputed; the gradient
     goes to the first maximal position of each window, the tie rule of ``torch``'s max
     pooling), per-tile partials of ``dg = sum G * o``, per-segment sums of ``G * o`` (a
     running sum inside the tile, ``atomic_add`` per piece), and the first maximal position
     of each segment and channel (``atomic_max`` of ``N - position`` over the positions equal
     to the max; both tables share the one zero-filled buffer, 0 meaning "none");
  2. ``_tile_sum_kernel``: ``dg``;
  3. ``_global_backward_kernel``: ``d k`` through the softmax and partials of ``d qbar``;
  4. ``_tile_sum_kernel``: ``d qbar``;
  5. ``_scatter_kernel``: ``d segment`` (each segment's gradient sum at its first maximal
     position, zero elsewhere) and ``d q = d qbar / count`` at real tokens.

Ties: the whole gradient of a max goes to its first maximal position (lowest token index),
in the segment max as in the local max. (``ponet_mixing``'s PyTorch path splits it evenly
among ties, as ``torch.amax`` does; sums over each tie group agree.)

``ponet_pool_mixing`` runs the kernels on five tensors; ``ponet_pool_mixing_packed`` on one
``(B, N, 5C)`` tensor holding them side by side (one fused projection), whose gradient it
returns as one tensor. Inputs may be strided along tokens and batch (last dim contiguous).
The plain PyTorch reference is ``zoo.layers.ponet.ponet_mixing_reference``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from zoo.kernels.checks import triton_interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs without triton
    triton = None
    tl = None

__all__ = [
    "contiguous_segment_ranks",
    "ponet_pool_mixing",
    "ponet_pool_mixing_packed",
    "ponet_pool_supports",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- kernels

if tl is not None:
    # pads' logits: finite, so that a row without real tokens gives no NaN
    MASKED_LOGIT = tl.constexpr(-1.0e30)

    @triton.jit
    def _running_segment_max(v1, s1, v2, s2):
        return tl.where(s1 == s2, tl.maximum(v1, v2), v2), s2

    @triton.jit
    def _running_segment_sum(v1, s1, v2, s2):
        return tl.where(s1 == s2, v1 + v2, v2), s2

    @triton.jit
    def _token_flags(Real, Special, b, rows, N, stride_mb, HAS_REAL: tl.constexpr, HAS_SPECIAL: tl.constexpr):
        """(real, kept) per row: kept = real, not special; rows outside [0, N) are neither."""
        inside = (rows >= 0) & (rows < N)
        real = inside
        if HAS_REAL:
            real = real & (tl.load(Real + b * stride_mb + rows, mask=inside, other=0) != 0)
        kept = real
        if HAS_SPECIAL:
            kept = kept & (tl.load(Special + b * stride_mb + rows, mask=inside, other=0) == 0)
        return real, kept

    @triton.jit
    def _segment_rank(Rank, b, rows, N, stride_rb, segment_size, HAS_RANK: tl.constexpr):
        """Segment number of each row; rows past the end get a number above every real one."""
        if HAS_RANK:
            rank = tl.load(Rank + b * stride_rb + rows, mask=rows < N, other=2147483647)
        else:
            rank = rows // segment_size
        return rank

    @triton.jit
    def _reduce_kernel(
        Q, Seg, Real, Rank, QPart, CountPart, SegMax,
        stride_qb, stride_qn, stride_sb, stride_sn, stride_mb, stride_rb,
        N, C, D, num_tiles, num_segments, segment_size,
        HAS_REAL: tl.constexpr, HAS_RANK: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        tile, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b64 = b.to(tl.int64)
        lane = tl.arange(0, BLOCK_N)
        rows = tile * BLOCK_N + lane
        d = tl.arange(0, BLOCK_D)
        cols = h * D + d
        col_in = d < D
        real, _ = _token_flags(Real, Real, b64, rows, N, stride_mb, HAS_REAL, False)
        rows64 = rows.to(tl.int64)
        take = real[:, None] & col_in[None, :]

        q = tl.load(Q + b64 * stride_qb + rows64[:, None] * stride_qn + cols[None, :], mask=take, other=0.0)
        tl.store(QPart + (b64 * num_tiles + tile) * C + cols, tl.sum(q.to(tl.float32), 0), mask=col_in)
        if HAS_REAL:
            if h == 0:
                tl.store(CountPart + b64 * num_tiles + tile, tl.sum(real.to(tl.float32), 0))

        rank = _segment_rank(Rank, b64, rows, N, stride_rb, segment_size, HAS_RANK)
        x = tl.load(Seg + b64 * stride_sb + rows64[:, None] * stride_sn + cols[None, :], mask=take, other=0.0)
        x = tl.where(take, x.to(tl.float32), float("-inf"))
        rank2 = tl.broadcast_to(rank[:, None], (BLOCK_N, BLOCK_D))
        running, _ = tl.associative_scan((x, rank2), 0, _running_segment_max)
        next_rank = _segment_rank(Rank, b64, rows + 1, N, stride_rb, segment_size, HAS_RANK)
        piece_end = (rows < N) & ((next_rank != rank) | (rows + 1 >= N) | (lane == BLOCK_N - 1))
        slot = SegMax + (b64 * num_segments + rank[:, None]) * C + cols[None, :]
        tl.atomic_max(slot, running, mask=piece_end[:, None] & col_in[None, :] & (running > float("-inf")))

    @triton.jit
    def _softmax_kernel(
        K, Real, QMean, MaxPart, SumPart, GPart,
        stride_kb, stride_kn, stride_mb,
        N, C, D, H, num_tiles, scale,
        HAS_REAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        tile, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b64 = b.to(tl.int64)
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        d = tl.arange(0, BLOCK_D)
        cols = h * D + d
        col_in = d < D
        row_in = rows < N
        real, _ = _token_flags(Real, Real, b64, rows, N, stride_mb, HAS_REAL, False)
        take = row_in[:, None] & col_in[None, :]
        k = tl.load(
            K + b64 * stride_kb + rows.to(tl.int64)[:, None] * stride_kn + cols[None, :], mask=take, other=0.0
        )
        k = k.to(tl.float32)
        q_mean = tl.load(QMean + b64 * C + cols, mask=col_in, other=0.0)
        logits = tl.sum(k * q_mean[None, :], 1) * scale
        logits = tl.where(real, logits, MASKED_LOGIT)
        logits = tl.where(row_in, logits, float("-inf"))
        tile_max = tl.max(logits, 0)
        p = tl.exp(logits - tile_max)
        part = (b64 * num_tiles + tile) * H + h
        tl.store(MaxPart + part, tile_max)
        tl.store(SumPart + part, tl.sum(p, 0))
        tl.store(GPart + (b64 * num_tiles + tile) * C + cols, tl.sum(p[:, None] * k, 0), mask=col_in)

    @triton.jit
    def _tile_sum_kernel(
        Part, CountPart, Count, Out,
        num_tiles, C, count_all,
        COUNT_MODE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """``Out[b] = sum_t Part[b, t]`` (``Part``: ``(B, T, C)``), divided by a token count:
        ``COUNT_MODE`` 0 none, 1 ``max(sum_t CountPart[b, t], 1)`` (also stored to ``Count[b]``),
        2 ``count_all``, 3 the stored ``Count[b]``."""
        pid, b = tl.program_id(0), tl.program_id(1)
        b64 = b.to(tl.int64)
        cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        col_in = cols < C
        acc = tl.zeros((BLOCK_C,), tl.float32)
        counted = tl.zeros((BLOCK_T,), tl.float32)
        for start in range(0, num_tiles, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            t_in = t < num_tiles
            part = tl.load(
                Part + (b64 * num_tiles + t[:, None]) * C + cols[None, :],
                mask=t_in[:, None] & col_in[None, :],
                other=0.0,
            )
            acc += tl.sum(part, 0)
            if COUNT_MODE == 1:
                counted += tl.load(CountPart + b64 * num_tiles + t, mask=t_in, other=0.0)
        if COUNT_MODE == 1:
            count = tl.maximum(tl.sum(counted, 0), 1.0)
            if pid == 0:
                tl.store(Count + b64, count)
            acc = acc / count
        elif COUNT_MODE == 2:
            acc = acc / count_all
        elif COUNT_MODE == 3:
            acc = acc / tl.load(Count + b64)
        tl.store(Out + b64 * C + cols, acc, mask=col_in)

    @triton.jit
    def _softmax_merge_kernel(
        MaxPart, SumPart, GPart, G, Lse,
        num_tiles, C, D, H,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Merges the per-tile softmax partials of one head: ``g`` and the log-sum-exp."""
        h, b = tl.program_id(0), tl.program_id(1)
        b64 = b.to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        cols = h * D + d
        col_in = d < D
        running_max = tl.full((BLOCK_T,), float("-inf"), tl.float32)
        for start in range(0, num_tiles, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            tile_max = tl.load(
                MaxPart + (b64 * num_tiles + t) * H + h, mask=t < num_tiles, other=float("-inf")
            )
            running_max = tl.maximum(running_max, tile_max)
        top = tl.max(running_max, 0)
        total = tl.zeros((BLOCK_T,), tl.float32)
        g = tl.zeros((BLOCK_D,), tl.float32)
        for start in range(0, num_tiles, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            t_in = t < num_tiles
            part = (b64 * num_tiles + t) * H + h
            weight = tl.exp(tl.load(MaxPart + part, mask=t_in, other=float("-inf")) - top)
            total += weight * tl.load(SumPart + part, mask=t_in, other=0.0)
            g_part = tl.load(
                GPart + (b64 * num_tiles + t[:, None]) * C + cols[None, :],
                mask=t_in[:, None] & col_in[None, :],
                other=0.0,
            )
            g += tl.sum(weight[:, None] * g_part, 0)
        total_sum = tl.sum(total, 0)
        tl.store(G + b64 * C + cols, g / total_sum, mask=col_in)
        tl.store(Lse + b64 * H + h, top + tl.log(total_sum))

    @triton.jit
    def _output_kernel(
        O, Local, Real, Special, Rank, G, SegMax, Out,
        stride_ob, stride_on, stride_lb, stride_ln, stride_mb, stride_rb,
        N, C, D, num_segments, segment_size,
        HAS_REAL: tl.constexpr, HAS_SPECIAL: tl.constexpr, HAS_RANK: tl.constexpr,
        KERNEL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        tile, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b64 = b.to(tl.int64)
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        d = tl.arange(0, BLOCK_D)
        cols = h * D + d
        col_in = d < D
        row_in = rows < N
        real, kept = _token_flags(Real, Special, b64, rows, N, stride_mb, HAS_REAL, HAS_SPECIAL)
        take = row_in[:, None] & col_in[None, :]
        o = tl.load(
            O + b64 * stride_ob + rows.to(tl.int64)[:, None] * stride_on + cols[None, :], mask=take, other=0.0
        )
        rank = _segment_rank(Rank, b64, rows, N, stride_rb, segment_size, HAS_RANK)
        kept2 = kept[:, None] & col_in[None, :]
        seg = tl.load(
            SegMax + (b64 * num_segments + rank[:, None]) * C + cols[None, :], mask=kept2, other=0.0
        )
        loc = tl.full((BLOCK_N, BLOCK_D), float("-inf"), tl.float32)
        for j in tl.static_range(KERNEL):
            src = rows + (j - KERNEL // 2)
            _, src_kept = _token_flags(Real, Special, b64, src, N, stride_mb, HAS_REAL, HAS_SPECIAL)
            src_take = src_kept[:, None] & col_in[None, :]
            v = tl.load(
                Local + b64 * stride_lb + src.to(tl.int64)[:, None] * stride_ln + cols[None, :],
                mask=src_take,
                other=float("-inf"),
            )
            loc = tl.maximum(loc, v.to(tl.float32))
        loc = tl.where(kept2, loc, 0.0)
        g = tl.load(G + b64 * C + cols, mask=col_in, other=0.0)
        out = (g[None, :] + seg) * o.to(tl.float32) + loc
        out = tl.where(real[:, None], out, 0.0)
        tl.store(Out + (b64 * N + rows[:, None]) * C + cols[None, :], out.to(Out.dtype.element_ty), mask=take)

    @triton.jit
    def _pool_backward_kernel(
        Grad, O, Local, Seg, Real, Special, Rank, G, SegMax,
        DO, DLocal, DgPart, SegGradSum, SegFirst,
        stride_gb, stride_gn, stride_ob, stride_on, stride_lb, stride_ln, stride_sb, stride_sn,
        stride_db, stride_dn, stride_mb, stride_rb,
        N, C, D, num_tiles, num_segments, segment_size,
        HAS_REAL: tl.constexpr, HAS_SPECIAL: tl.constexpr, HAS_RANK: tl.constexpr,
        KERNEL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        tile, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b64 = b.to(tl.int64)
        lane = tl.arange(0, BLOCK_N)
        rows = tile * BLOCK_N + lane
        rows64 = rows.to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        cols = h * D + d
        col_in = d < D
        row_in = rows < N
        take = row_in[:, None] & col_in[None, :]
        real, kept = _token_flags(Real, Special, b64, rows, N, stride_mb, HAS_REAL, HAS_SPECIAL)
        real2 = real[:, None] & col_in[None, :]
        kept2 = kept[:, None] & col_in[None, :]

        grad = tl.load(
            Grad + b64 * stride_gb + rows64[:, None] * stride_gn + cols[None, :], mask=real2, other=0.0
        )
        grad = grad.to(tl.float32)
        o = tl.load(O + b64 * stride_ob + rows64[:, None] * stride_on + cols[None, :], mask=real2, other=0.0)
        o = o.to(tl.float32)
        rank = _segment_rank(Rank, b64, rows, N, stride_rb, segment_size, HAS_RANK)
        seg_slot = (b64 * num_segments + rank[:, None]) * C + cols[None, :]
        seg_max = tl.load(SegMax + seg_slot, mask=real2, other=0.0)
        g = tl.load(G + b64 * C + cols, mask=col_in, other=0.0)

        d_o = grad * (g[None, :] + tl.where(kept2, seg_max, 0.0))
        tl.store(
            DO + b64 * stride_db + rows64[:, None] * stride_dn + cols[None, :],
            d_o.to(DO.dtype.element_ty),
            mask=take,
        )
        grad_o = grad * o
        tl.store(DgPart + (b64 * num_tiles + tile) * C + cols, tl.sum(grad_o, 0), mask=col_in)

        # gradient sum per segment: running sum inside the tile, one atomic per piece
        rank2 = tl.broadcast_to(rank[:, None], (BLOCK_N, BLOCK_D))
        running, _ = tl.associative_scan((tl.where(kept2, grad_o, 0.0), rank2), 0, _running_segment_sum)
        next_rank = _segment_rank(Rank, b64, rows + 1, N, stride_rb, segment_size, HAS_RANK)
        piece_end = row_in & ((next_rank != rank) | (rows + 1 >= N) | (lane == BLOCK_N - 1))
        tl.atomic_add(SegGradSum + seg_slot, running, mask=piece_end[:, None] & col_in[None, :])

        # first maximal position of each segment and channel
        x = tl.load(
            Seg + b64 * stride_sb + rows64[:, None] * stride_sn + cols[None, :], mask=real2, other=0.0
        )
        at_max = real2 & (x.to(tl.float32) == seg_max)
        from_end = tl.broadcast_to(N - rows[:, None], (BLOCK_N, BLOCK_D))  # the first max: the largest
        tl.atomic_max(SegFirst + seg_slot, from_end, mask=at_max)

        # local max: row n takes the gradient of every window centre t whose first max it is
        value = tl.load(
            Local + b64 * stride_lb + rows64[:, None] * stride_ln + cols[None, :], mask=kept2, other=0.0
        )
        value = value.to(tl.float32)
        d_local = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for e in tl.static_range(KERNEL):
            centre = rows + (e - KERNEL // 2)
            _, centre_kept = _token_flags(Real, Special, b64, centre, N, stride_mb, HAS_REAL, HAS_SPECIAL)
            wins = kept2 & centre_kept[:, None]
            for j in tl.static_range(KERNEL):
                if j != KERNEL - 1 - e:  # j = KERNEL-1-e is row n itself in the window of centre
                    src = centre + (j - KERNEL // 2)
                    _, src_kept = _token_flags(Real, Special, b64, src, N, stride_mb, HAS_REAL, HAS_SPECIAL)
                    src_take = src_kept[:, None] & col_in[None, :]
                    other = tl.load(
                        Local + b64 * stride_lb + src.to(tl.int64)[:, None] * stride_ln + cols[None, :],
                        mask=src_take,
                        other=0.0,
                    ).to(tl.float32)
                    if j < KERNEL - 1 - e:
                        wins = wins & ~(src_take & (other >= value))
                    else:
                        wins = wins & ~(src_take & (other > value))
            centre_grad = tl.load(
                Grad + b64 * stride_gb + centre.to(tl.int64)[:, None] * stride_gn + cols[None, :],
                mask=wins,
                other=0.0,
            )
            d_local += centre_grad.to(tl.float32)
        tl.store(
            DLocal + b64 * stride_db + rows64[:, None] * stride_dn + cols[None, :],
            d_local.to(DLocal.dtype.element_ty),
            mask=take,
        )

    @triton.jit
    def _global_backward_kernel(
        K, Real, QMean, Lse, G, Dg, DK, DqPart,
        stride_kb, stride_kn, stride_db, stride_dn, stride_mb,
        N, C, D, H, num_tiles, scale,
        HAS_REAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        tile, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b64 = b.to(tl.int64)
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        rows64 = rows.to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        cols = h * D + d
        col_in = d < D
        row_in = rows < N
        take = row_in[:, None] & col_in[None, :]
        real, _ = _token_flags(Real, Real, b64, rows, N, stride_mb, HAS_REAL, False)
        k = tl.load(K + b64 * stride_kb + rows64[:, None] * stride_kn + cols[None, :], mask=take, other=0.0)
        k = k.to(tl.float32)
        q_mean = tl.load(QMean + b64 * C + cols, mask=col_in, other=0.0)
        g = tl.load(G + b64 * C + cols, mask=col_in, other=0.0)
        dg = tl.load(Dg + b64 * C + cols, mask=col_in, other=0.0)
        lse = tl.load(Lse + b64 * H + h)
        logits = tl.where(real, tl.sum(k * q_mean[None, :], 1) * scale, MASKED_LOGIT)
        attn = tl.where(row_in, tl.exp(logits - lse), 0.0)
        d_logits = attn * (tl.sum(k * dg[None, :], 1) - tl.sum(dg * g, 0))
        d_k = attn[:, None] * dg[None, :] + d_logits[:, None] * (q_mean * scale)[None, :]
        tl.store(
            DK + b64 * stride_db + rows64[:, None] * stride_dn + cols[None, :],
            d_k.to(DK.dtype.element_ty),
            mask=take,
        )
        tl.store(
            DqPart + (b64 * num_tiles + tile) * C + cols,
            tl.sum(d_logits[:, None] * k, 0) * scale,
            mask=col_in,
        )

    @triton.jit
    def _scatter_kernel(
        Real, Rank, SegGradSum, SegFirst, DqMean, DSeg, DQ,
        stride_db, stride_dn, stride_mb, stride_rb,
        N, C, D, num_segments, segment_size,
        HAS_REAL: tl.constexpr, HAS_RANK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        tile, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b64 = b.to(tl.int64)
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        rows64 = rows.to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        cols = h * D + d
        col_in = d < D
        row_in = rows < N
        take = row_in[:, None] & col_in[None, :]
        real, _ = _token_flags(Real, Real, b64, rows, N, stride_mb, HAS_REAL, False)
        real2 = real[:, None] & col_in[None, :]
        rank = _segment_rank(Rank, b64, rows, N, stride_rb, segment_size, HAS_RANK)
        seg_slot = (b64 * num_segments + rank[:, None]) * C + cols[None, :]
        first_from_end = tl.load(SegFirst + seg_slot, mask=real2, other=0)  # 0: no real token
        total = tl.load(SegGradSum + seg_slot, mask=real2, other=0.0)
        d_seg = tl.where(N - first_from_end == rows[:, None], total, 0.0)
        out = b64 * stride_db + rows64[:, None] * stride_dn + cols[None, :]
        tl.store(DSeg + out, d_seg.to(DSeg.dtype.element_ty), mask=take)
        dq_mean = tl.load(DqMean + b64 * C + cols, mask=col_in, other=0.0)
        d_q = tl.where(real2, dq_mean[None, :], 0.0)
        tl.store(DQ + out, d_q.to(DQ.dtype.element_ty), mask=take)


# ----------------------------------------------------------------------------- launcher


def contiguous_segment_ranks(
    segment_ids: Tensor, batch: int, check_range: bool = False
) -> tuple[Tensor, int] | None:
    """Segment ids as run numbers ``0, 1, ...`` per row, and the largest run count.

    ``None`` when some id occurs in more than one run of a row (segments that are not
    contiguous, which the kernels do not cover). ``check_range``: ``ValueError`` unless every
    id is in ``[0, N)``, checked in the same single device-to-host copy.
    """
    ids = segment_ids.expand(batch, -1) if segment_ids.dim() == 1 else segment_ids
    ids = ids.long()
    B, N = ids.shape
    starts = torch.ones(B, N, dtype=torch.int32, device=ids.device)
    starts[:, 1:] = (ids[:, 1:] != ids[:, :-1]).to(torch.int32)
    ranks = starts.cumsum(dim=1, dtype=torch.int32) - 1
    runs = ranks[:, -1] + 1
    ordered = ids.sort(dim=1).values
    distinct = 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1, dtype=torch.int32)
    summary = [(distinct == runs).all().long(), runs.max().long()]
    if check_range:
        summary += [ordered[:, 0].min(), ordered[:, -1].max()]
    contiguous, most, *extremes = torch.stack(summary).tolist()
    if extremes and (extremes[0] < 0 or extremes[1] >= N):
        raise ValueError(
            f"segment_ids: expected values in [0, {N - 1}] (at most one segment per token), "
            f"got [{extremes[0]}, {extremes[1]}]"
        )
    return (ranks.contiguous(), int(most)) if contiguous else None


def ponet_pool_supports(q: Tensor) -> str | None:
    """Why the kernels cannot take ``q`` (``None`` if they can)."""
    if triton is None:
        return "the triton package is not installed"
    if not q.is_cuda and not triton_interpreting():
        return f"the kernels need CUDA tensors (or TRITON_INTERPRET=1), got {q.device}"
    if q.dtype not in _DTYPES:
        return f"the kernels take float16, bfloat16 or float32, got {q.dtype}"
    if q.shape[-1] == 0 or q.shape[1] == 0:
        return "empty input"
    return None


class _Spec:
    """Everything about one call that is not a tensor to differentiate."""

    def __init__(
        self,
        shape: tuple[int, int, int],
        num_heads: int,
        padding_mask: Tensor | None,
        special_mask: Tensor | None,
        segment_ranks: Tensor | None,
        num_segments: int,
        segment_size: int,
        local_kernel: int,
    ) -> None:
        B, N, C = shape
        self.B, self.N, self.C, self.H = B, N, C, num_heads
        self.D = C // num_heads
        self.block_d = triton.next_power_of_2(self.D)
        self.block_n = 64 if self.block_d <= 64 else (32 if self.block_d <= 128 else 16)
        self.num_tiles = triton.cdiv(N, self.block_n)
        self.grid = (self.num_tiles, num_heads, B)
        self.sum_grid = (triton.cdiv(C, _SUM_BLOCK_C), B)
        self.scale = self.D**-0.5
        self.real = padding_mask.contiguous().view(torch.uint8) if padding_mask is not None else None
        self.special = special_mask.contiguous().view(torch.uint8) if special_mask is not None else None
        self.ranks = segment_ranks
        self.num_segments = num_segments
        self.segment_size = segment_size
        self.local_kernel = local_kernel

    def flags(self, like: Tensor) -> tuple[Tensor, Tensor, int]:
        """Mask pointers and row stride; an absent mask is never read (``like`` stands in)."""
        real = self.real if self.real is not None else like
        special = self.special if self.special is not None else like
        stride = self.N if (self.real is not None or self.special is not None) else 0
        return real, special, stride

    def rank_args(self, like: Tensor) -> tuple[Tensor, int]:
        if self.ranks is None:
            return like, 0
        return self.ranks, self.ranks.stride(0)


# tile-sum kernel: channels per program and tiles per step; softmax merge: tiles per step
_SUM_BLOCK_C, _SUM_BLOCK_T = 64, 64


def _carve(buffer: Tensor, *shapes: tuple[int, ...]) -> tuple[Tensor, ...]:
    """The 1-D ``buffer`` cut into consecutive pieces holding arrays of these shapes, row-major (the
    kernels take them as flat pointers)."""
    sizes = [math.prod(shape) for shape in shapes]
    return buffer.split(sizes)


def _stats_shapes(spec: _Spec) -> tuple[tuple[int, ...], ...]:
    """``q_mean, g (B, C)``, ``lse (B, H)``, ``count (B,)``: what the backward reuses."""
    return (spec.B, spec.C), (spec.B, spec.C), (spec.B, spec.H), (spec.B,)


def _forward(spec: _Spec, q: Tensor, k: Tensor, o: Tensor, local: Tensor, segment: Tensor):
    """The output and the saved statistics: one fill and five launches."""
    B, N, C, H, D = spec.B, spec.N, spec.C, spec.H, spec.D
    T, S = spec.num_tiles, spec.num_segments
    real, special, stride_m = spec.flags(q)
    ranks, stride_r = spec.rank_args(q)
    has_real = spec.real is not None
    common = dict(BLOCK_N=spec.block_n, BLOCK_D=spec.block_d)
    f32 = dict(device=q.device, dtype=torch.float32)

    part_shapes = ((B, T, C), (B, T, C), (B, T, H), (B, T, H), (B, T))
    q_part, g_part, max_part, sum_part, count_part = _carve(
        torch.empty(2 * B * T * C + 2 * B * T * H + B * T, **f32), *part_shapes
    )
    stats_shapes = _stats_shapes(spec)
    stats = torch.empty(2 * B * C + B * H + B, **f32)
    q_mean, g, lse, count = _carve(stats, *stats_shapes)
    seg_max = torch.full((B, S, C), float("-inf"), **f32)

    _reduce_kernel[spec.grid](
        q, segment, real, ranks, q_part, count_part, seg_max,
        q.stride(0), q.stride(1), segment.stride(0), segment.stride(1), stride_m, stride_r,
        N, C, D, T, S, spec.segment_size,
        HAS_REAL=has_real, HAS_RANK=spec.ranks is not None, **common,
    )  # fmt: skip
    _tile_sum_kernel[spec.sum_grid](
        q_part, count_part, count, q_mean, T, C, float(N),
        COUNT_MODE=1 if has_real else 2, BLOCK_T=_SUM_BLOCK_T, BLOCK_C=_SUM_BLOCK_C,
    )  # fmt: skip
    _softmax_kernel[spec.grid](
        k, real, q_mean, max_part, sum_part, g_part,
        k.stride(0), k.stride(1), stride_m,
        N, C, D, H, T, spec.scale,
        HAS_REAL=has_real, **common,
    )  # fmt: skip
    _softmax_merge_kernel[(H, B)](
        max_part, sum_part, g_part, g, lse, T, C, D, H, BLOCK_T=_SUM_BLOCK_T, BLOCK_D=spec.block_d
    )
    out = torch.empty(B, N, C, device=q.device, dtype=q.dtype)
    _output_kernel[spec.grid](
        o, local, real, special, ranks, g, seg_max, out,
        o.stride(0), o.stride(1), local.stride(0), local.stride(1), stride_m, stride_r,
        N, C, D, S, spec.segment_size,
        HAS_REAL=has_real, HAS_SPECIAL=spec.special is not None,
        HAS_RANK=spec.ranks is not None, KERNEL=spec.local_kernel, **common,
    )  # fmt: skip
    return out, stats, seg_max


def _backward(
    spec: _Spec, grad: Tensor, stats: Tensor, seg_max: Tensor, k, o, local, segment, dq, dk, do, dlocal, dseg
):
    """Fills the five gradients: one zero fill and five launches."""
    B, N, C, H, D = spec.B, spec.N, spec.C, spec.H, spec.D
    T, S = spec.num_tiles, spec.num_segments
    q_mean, g, lse, count = _carve(stats, *_stats_shapes(spec))
    real, special, stride_m = spec.flags(grad)
    ranks, stride_r = spec.rank_args(grad)
    has_real = spec.real is not None
    common = dict(BLOCK_N=spec.block_n, BLOCK_D=spec.block_d)
    f32 = dict(device=grad.device, dtype=torch.float32)
    if grad.stride(-1) != 1:
        grad = grad.contiguous()

    dg_part, dq_part, dg, dq_mean = _carve(
        torch.empty(2 * B * T * C + 2 * B * C, **f32), (B, T, C), (B, T, C), (B, C), (B, C)
    )
    # per segment and channel: the gradient sum (fp32) and N - the first maximal position (int32)
    seg_tables = torch.zeros(2 * B * S * C, device=grad.device, dtype=torch.int32)
    seg_grad = seg_tables[: B * S * C].view(torch.float32)
    seg_first = seg_tables[B * S * C :]
    _pool_backward_kernel[spec.grid](
        grad, o, local, segment, real, special, ranks, g, seg_max,
        do, dlocal, dg_part, seg_grad, seg_first,
        grad.stride(0), grad.stride(1), o.stride(0), o.stride(1), local.stride(0), local.stride(1),
        segment.stride(0), segment.stride(1), do.stride(0), do.stride(1), stride_m, stride_r,
        N, C, D, T, S, spec.segment_size,
        HAS_REAL=has_real, HAS_SPECIAL=spec.special is not None,
        HAS_RANK=spec.ranks is not None, KERNEL=spec.local_kernel, **common,
    )  # fmt: skip
    _tile_sum_kernel[spec.sum_grid](
        dg_part, dg_part, count, dg, T, C, 1.0, COUNT_MODE=0, BLOCK_T=_SUM_BLOCK_T, BLOCK_C=_SUM_BLOCK_C
    )
    _global_backward_kernel[spec.grid](
        k, real, q_mean, lse, g, dg, dk, dq_part,
        k.stride(0), k.stride(1), dk.stride(0), dk.stride(1), stride_m,
        N, C, D, H, T, spec.scale,
        HAS_REAL=has_real, **common,
    )  # fmt: skip
    _tile_sum_kernel[spec.sum_grid](
        dq_part, dq_part, count, dq_mean, T, C, float(N),
        COUNT_MODE=3 if has_real else 2, BLOCK_T=_SUM_BLOCK_T, BLOCK_C=_SUM_BLOCK_C,
    )  # fmt: skip
    _scatter_kernel[spec.grid](
        real, ranks, seg_grad, seg_first, dq_mean, dseg, dq,
        dseg.stride(0), dseg.stride(1), stride_m, stride_r,
        N, C, D, S, spec.segment_size,
        HAS_REAL=has_real, HAS_RANK=spec.ranks is not None, **common,
    )  # fmt: skip


def _row_major(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _PoNetPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: _Spec, q: Tensor, k: Tensor, o: Tensor, local: Tensor, segment: Tensor) -> Tensor:
        q, k, o, local, segment = (_row_major(t) for t in (q, k, o, local, segment))
        out, stats, seg_max = _forward(spec, q, k, o, local, segment)
        ctx.spec = spec
        ctx.save_for_backward(k, o, local, segment, stats, seg_max)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        k, o, local, segment, stats, seg_max = ctx.saved_tensors
        grads = torch.empty((5, *k.shape), dtype=k.dtype, device=k.device).unbind(0)  # dq dk do dlocal dseg
        _backward(ctx.spec, grad, stats, seg_max, k, o, local, segment, *grads)
        return None, *grads


class _PoNetPoolPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: _Spec, packed: Tensor) -> Tensor:
        packed = _row_major(packed)
        q, k, o, local, segment = packed.split(spec.C, dim=-1)
        out, stats, seg_max = _forward(spec, q, k, o, local, segment)
        ctx.spec = spec
        ctx.save_for_backward(packed, stats, seg_max)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        packed, stats, seg_max = ctx.saved_tensors
        _, k, o, local, segment = packed.split(ctx.spec.C, dim=-1)
        d_packed = torch.empty_like(packed)
        _backward(ctx.spec, grad, stats, seg_max, k, o, local, segment, *d_packed.split(ctx.spec.C, dim=-1))
        return None, d_packed


def _make_spec(
    shape: tuple[int, int, int],
    like: Tensor,
    num_heads: int,
    padding_mask: Tensor | None,
    segment_ids: Tensor | None,
    segment_size: int | None,
    special_mask: Tensor | None,
    local_kernel: int,
    segment_ranks: tuple[Tensor, int] | None,
) -> _Spec:
    reason = ponet_pool_supports(like)
    if reason is not None:
        raise ValueError(f"backend: 'triton' cannot run here: {reason}")
    B, N, C = shape
    if segment_ids is not None and segment_size is not None:
        raise ValueError("segment_ids and segment_size: give at most one of them")
    if local_kernel < 1 or local_kernel % 2 == 0:
        raise ValueError(f"local_kernel: expected an odd positive int, got {local_kernel}")
    ranks = None
    if segment_ranks is not None:
        ranks, num_segments = segment_ranks
        size = 1
    elif segment_ids is not None:
        found = contiguous_segment_ranks(segment_ids.to(like.device), B)
        if found is None:
            raise ValueError(
                "segment_ids: the Triton kernels need every segment to be one contiguous run of tokens; "
                "use backend='torch' for other ids"
            )
        ranks, num_segments = found
        size = 1
    else:
        size = segment_size if segment_size is not None else max(N, 1)
        num_segments = -(-N // size)
    return _Spec(shape, num_heads, padding_mask, special_mask, ranks, num_segments, size, local_kernel)


def ponet_pool_mixing(
    q: Tensor,
    k: Tensor,
    o: Tensor,
    local: Tensor,
    segment: Tensor,
    num_heads: int,
    padding_mask: Tensor | None = None,
    segment_ids: Tensor | None = None,
    segment_size: int | None = None,
    special_mask: Tensor | None = None,
    local_kernel: int = 3,
    segment_ranks: tuple[Tensor, int] | None = None,
) -> Tensor:
    """PoNet mixing through the Triton kernels; arguments as ``zoo.layers.ponet.ponet_mixing``.

    The shapes are not checked here (``ponet_mixing`` does). ``segment_ids`` must make
    contiguous runs (``ValueError`` otherwise); ``segment_ranks``, the result of
    ``contiguous_segment_ranks(segment_ids, B)``, may be given in their place.
    """
    spec = _make_spec(
        tuple(q.shape),
        q,
        num_heads,
        padding_mask,
        segment_ids,
        segment_size,
        special_mask,
        local_kernel,
        segment_ranks,
    )
    return _PoNetPool.apply(spec, q, k, o, local, segment)


def ponet_pool_mixing_packed(
    projected: Tensor,
    num_heads: int,
    padding_mask: Tensor | None = None,
    segment_ids: Tensor | None = None,
    segment_size: int | None = None,
    special_mask: Tensor | None = None,
    local_kernel: int = 3,
    segment_ranks: tuple[Tensor, int] | None = None,
) -> Tensor:
    """As ``ponet_pool_mixing`` on ``projected = cat([q, k, o, local, segment], -1)`` (``B, N, 5C``)."""
    if projected.dim() != 3 or projected.shape[-1] % 5:
        raise ValueError(f"projected: expected a (B, N, 5*C) tensor, got {tuple(projected.shape)}")
    B, N, C5 = projected.shape
    spec = _make_spec(
        (B, N, C5 // 5),
        projected,
        num_heads,
        padding_mask,
        segment_ids,
        segment_size,
        special_mask,
        local_kernel,
        segment_ranks,
    )
    return _PoNetPoolPacked.apply(spec, projected)
