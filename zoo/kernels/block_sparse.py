"""Block-sparse flash attention: a pure-PyTorch reference and Triton forward/backward kernels.

FlashAttention-2 ("FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning", arXiv 2307.08691) restricted to the (query block, key block) pairs listed by a
:class:`~zoo.kernels.block_mask.BlockSparseMask`, as in FlexAttention (arXiv 2412.05496).

Forward, one program per (query tile, batch row, head): walk the kept key blocks of the query
block, keep a running row maximum ``m`` and normaliser ``l`` (online softmax in base 2, the
scale pre-multiplied by log2(e)), accumulate ``P V`` in fp32, and write ``O = acc / l`` and
``lse``. Kept blocks are split in two runs: blocks that need no element mask (fully visible and
not ragged; a prefix of the ascending list) and the rest (causal diagonal, ragged last key
block, permuted keys), which apply the element mask.

Backward as FlashAttention-2: ``delta = rowsum(dO * O)``; a dK/dV pass with one program per
(key tile, batch row, kv head) walking the query blocks that list this key block (the
transposed index lists, built from the mask) for every query head of the group, so grouped-
query attention never repeats K/V and needs no atomics; a separate dQ pass over the kept key
blocks of each query block.

Conventions: ``q [B, H, N, D]``, ``k, v [B, Hkv, M, D]``, ``H % Hkv == 0``. Queries are the
last ``N`` of the ``M`` positions: with ``causal=True`` query ``i`` sees key ``j`` iff
``j <= M - N + i`` (original positions when the mask carries a key permutation). A row with no
visible key returns 0 and ``lse = -inf``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from zoo.kernels.block_mask import BlockSparseMask
from zoo.kernels.checks import triton_interpreting

__all__ = [
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "dense_attention_reference",
]

BACKENDS = ("auto", "triton", "torch")


# ---------------------------------------------------------------------------------------------
# input checks shared by every backend
# ---------------------------------------------------------------------------------------------
def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, int, int, int, int]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a 4-d tensor [B, heads, length, D], got {got}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    batch, heads, q_len, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"k/v: expected the same shape [B, Hkv, M, D], got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k: expected [B={batch}, Hkv, M, D={head_dim}] to match q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"k: expected Hkv dividing H={heads} (grouped-query attention), got Hkv={kv_heads}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q/k/v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q/k/v: expected one device, got {q.device}, {k.device}, {v.device}")
    return batch, heads, kv_heads, q_len, kv_len, head_dim


def _check_mask(
    mask: BlockSparseMask, batch: int, heads: int, kv_heads: int, q_len: int, kv_len: int, device
) -> None:
    if not isinstance(mask, BlockSparseMask):
        raise ValueError(f"mask: expected a BlockSparseMask, got {type(mask).__name__}")
    if mask.q_len != q_len or mask.kv_len != kv_len:
        raise ValueError(
            f"mask: expected q_len={q_len}, kv_len={kv_len} (from q and k), got q_len={mask.q_len}, kv_len={mask.kv_len}"
        )
    mb, mh, _ = mask.kv_num_blocks.shape
    if mb not in (1, batch) or mh not in (1, heads):
        raise ValueError(f"mask: expected batch/head dims in (1, {batch}) x (1, {heads}), got {mb} x {mh}")
    if mask.kv_indices.device != device:
        raise ValueError(f"mask: expected tensors on {device} like q, got {mask.kv_indices.device}")
    if mask.key_perm is not None:
        pb, ph, _ = mask.key_perm.shape
        if pb not in (1, batch) or ph not in (1, kv_heads):
            raise ValueError(
                f"mask.key_perm: expected [1 or {batch}, 1 or {kv_heads}, M], got {tuple(mask.key_perm.shape)}"
            )
        if mask.key_perm.device != device:
            raise ValueError(
                f"mask.key_perm: expected a tensor on {device} like q, got {mask.key_perm.device}"
            )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _safe_softmax_weights(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(exp(logits - m), m) with ``m`` the row maximum, finite even on all -inf rows."""
    row_max = logits.detach().amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    return torch.exp(logits - row_max), row_max


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------
def dense_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Plain dense attention, grouped-query aware, fp32 (fp64 for fp64 inputs) accumulation.

    ``attn_mask`` is bool, broadcastable to ``[B, H, N, M]``, True = keep. Rows with no visible
    key give 0 (and ``lse = -inf``).
    """
    batch, heads, kv_heads, q_len, kv_len, head_dim = _check_qkv(q, k, v)
    scale = head_dim**-0.5 if scale is None else float(scale)
    dtype = _compute_dtype(q.dtype)
    group = heads // kv_heads
    qg = q.to(dtype).reshape(batch, kv_heads, group, q_len, head_dim)
    logits = torch.einsum("bkgnd,bkmd->bkgnm", qg, k.to(dtype)) * scale
    keep = torch.ones(1, 1, 1, q_len, kv_len, dtype=torch.bool, device=q.device)
    if causal:
        query_pos = torch.arange(q_len, device=q.device) + (kv_len - q_len)
        keep = keep & (torch.arange(kv_len, device=q.device)[None, :] <= query_pos[:, None])
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise ValueError(f"attn_mask: expected a bool tensor (True = keep), got {attn_mask.dtype}")
        try:
            full = attn_mask.expand(batch, heads, q_len, kv_len)
        except RuntimeError as err:
            raise ValueError(
                f"attn_mask: expected a shape broadcastable to {[batch, heads, q_len, kv_len]}, got {tuple(attn_mask.shape)}"
            ) from err
        keep = keep & full.reshape(batch, kv_heads, group, q_len, kv_len)
    logits = logits.masked_fill(~keep, float("-inf"))
    weights, row_max = _safe_softmax_weights(logits)
    norm = weights.sum(-1, keepdim=True)
    out = torch.einsum("bkgnm,bkmd->bkgnd", weights, v.to(dtype)) / torch.where(
        norm > 0, norm, torch.ones_like(norm)
    )
    out = out.reshape(batch, heads, q_len, head_dim).to(q.dtype)
    if not return_lse:
        return out
    lse = (row_max + torch.log(norm)).reshape(batch, heads, q_len)
    return out, lse.to(dtype)


def _permuted_kv(k: Tensor, v: Tensor, mask: BlockSparseMask) -> tuple[Tensor, Tensor, Tensor]:
    """K and V in slot order, and the original position of each slot ``[B or 1, Hkv or 1, M]``."""
    kv_len = k.shape[2]
    if mask.key_perm is None:
        return k, v, torch.arange(kv_len, device=k.device).view(1, 1, kv_len)
    perm = mask.key_perm.long()
    index = perm.expand(k.shape[0], k.shape[1], kv_len)[..., None].expand_as(k)
    return torch.gather(k, 2, index), torch.gather(v, 2, index), perm


def block_sparse_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: BlockSparseMask,
    *,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Block-sparse attention in plain PyTorch (differentiable), fp32 accumulation.

    Works one chunk of query blocks at a time: gathers the kept key blocks of each query block
    (through the key permutation), masks the causal diagonal and the ragged edges, and takes a
    softmax over the gathered keys only. Memory is ``O(B * H * chunk * Kmax * block_k)``.
    """
    batch, heads, kv_heads, q_len, kv_len, head_dim = _check_qkv(q, k, v)
    _check_mask(mask, batch, heads, kv_heads, q_len, kv_len, q.device)
    scale = head_dim**-0.5 if scale is None else float(scale)
    dtype = _compute_dtype(q.dtype)
    group = heads // kv_heads
    block_q, block_k = mask.block_q, mask.block_k
    num_q_blocks, num_k_blocks = mask.num_q_blocks, mask.num_k_blocks
    device = q.device

    k_slots, v_slots, key_pos = _permuted_kv(k, v, mask)
    pad_k = num_k_blocks * block_k - kv_len
    k_blocks = torch.nn.functional.pad(k_slots.to(dtype), (0, 0, 0, pad_k)).view(
        batch, kv_heads, num_k_blocks, block_k, head_dim
    )
    v_blocks = torch.nn.functional.pad(v_slots.to(dtype), (0, 0, 0, pad_k)).view(
        batch, kv_heads, num_k_blocks, block_k, head_dim
    )
    key_pos = key_pos.expand(batch, kv_heads, kv_len)
    slot_valid = torch.arange(num_k_blocks * block_k, device=device) < kv_len
    pos_blocks = torch.nn.functional.pad(key_pos, (0, pad_k)).view(batch, kv_heads, num_k_blocks, block_k)
    valid_blocks = slot_valid.view(num_k_blocks, block_k)

    num_kept = mask.kv_num_blocks.expand(batch, heads, num_q_blocks).long()
    kept = mask.kv_indices.expand(batch, heads, num_q_blocks, mask.kv_indices.shape[-1]).long()
    max_kept = kept.shape[-1]
    listed = torch.arange(max_kept, device=device) < num_kept[..., None]  # [B, H, Qb, Kmax]
    kept = torch.where(listed, kept, torch.zeros_like(kept))

    pad_q = num_q_blocks * block_q - q_len
    q_blocks = torch.nn.functional.pad(q.to(dtype), (0, 0, 0, pad_q)).view(
        batch, heads, num_q_blocks, block_q, head_dim
    )
    query_pos = (torch.arange(num_q_blocks * block_q, device=device) + (kv_len - q_len)).view(
        num_q_blocks, block_q
    )

    b_index = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    kv_head_index = (torch.arange(heads, device=device) // group).view(1, heads, 1, 1)
    per_block = batch * heads * max_kept * block_k * (block_q + 2 * head_dim)
    chunk = max(1, min(num_q_blocks, (1 << 25) // max(per_block, 1)))

    outs, lses = [], []
    for start in range(0, num_q_blocks, chunk):
        stop = min(start + chunk, num_q_blocks)
        ids = kept[:, :, start:stop]  # [B, H, c, Kmax]
        keys = k_blocks[b_index, kv_head_index, ids]  # [B, H, c, Kmax, bk, D]
        values = v_blocks[b_index, kv_head_index, ids]
        logits = torch.einsum("bhcqd,bhcjkd->bhcqjk", q_blocks[:, :, start:stop], keys) * scale
        keep = listed[:, :, start:stop, None, :, None] & valid_blocks[ids][:, :, :, None]
        if causal:
            pos = pos_blocks[b_index, kv_head_index, ids]  # [B, H, c, Kmax, bk]
            keep = keep & (pos[:, :, :, None] <= query_pos[start:stop].view(1, 1, -1, block_q, 1, 1))
        logits = logits.masked_fill(~keep, float("-inf")).flatten(-2)
        weights, row_max = _safe_softmax_weights(logits)
        norm = weights.sum(-1, keepdim=True)
        out = torch.einsum("bhcqn,bhcnd->bhcqd", weights, values.flatten(3, 4))
        outs.append(out / torch.where(norm > 0, norm, torch.ones_like(norm)))
        lses.append((row_max + torch.log(norm)).squeeze(-1))
    out = torch.cat(outs, 2).reshape(batch, heads, num_q_blocks * block_q, head_dim)[:, :, :q_len]
    out = out.to(q.dtype)
    if not return_lse:
        return out
    lse = torch.cat(lses, 2).reshape(batch, heads, num_q_blocks * block_q)[:, :, :q_len]
    return out, lse


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------
def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: BlockSparseMask,
    *,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over the (query block, key block) pairs kept by ``mask``.

    Parameters
    ----------
    q, k, v:
        ``q [B, H, N, D]``, ``k, v [B, Hkv, M, D]`` with ``H % Hkv == 0``; one dtype and device.
    mask:
        :class:`BlockSparseMask` with ``q_len = N``, ``kv_len = M``.
    causal:
        Query ``i`` (at position ``M - N + i``) sees key ``j`` iff ``j <= M - N + i``.
    scale:
        Softmax scale, default ``D ** -0.5``.
    return_lse:
        Also return the fp32 log-sum-exp ``[B, H, N]`` (natural log; ``-inf`` on empty rows).
    backend:
        ``"auto"`` (Triton on CUDA, the PyTorch reference on CPU), ``"triton"`` or ``"torch"``.

    Returns
    -------
    ``out [B, H, N, D]`` in the dtype of ``q``, and ``lse`` when ``return_lse``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    batch, heads, kv_heads, q_len, kv_len, head_dim = _check_qkv(q, k, v)
    _check_mask(mask, batch, heads, kv_heads, q_len, kv_len, q.device)
    if backend == "torch" or (backend == "auto" and not q.is_cuda):
        return block_sparse_attention_reference(
            q, k, v, mask, causal=causal, scale=scale, return_lse=return_lse
        )
    return _triton_attention(q, k, v, mask, causal=causal, scale=scale, return_lse=return_lse)


# ---------------------------------------------------------------------------------------------
# Triton kernels. The raw functions are turned into Triton kernels at the first launch (see
# ``_kernels``), so that whether they run compiled or through the interpreter
# (TRITON_INTERPRET=1) is decided when they are launched, not when this module is imported.
# Tiles: BLOCK_M queries x BLOCK_N keys, each dividing the mask's block_q x block_k.
# ---------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs without triton
    triton = None
    tl = None

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

if tl is not None:

    def _fwd_kernel(
        Q, K, V, Out, Lse,
        KvNum, KvIdx, KvInterior, Perm,
        stride_qb, stride_qh, stride_qn,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_on,
        stride_mb, stride_mh, stride_mq,
        stride_ib, stride_ih, stride_iq,
        stride_pb, stride_ph,
        q_len, kv_len, heads, group, scale_log2,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        MASK_BQ: tl.constexpr, MASK_BK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_PERM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        off_b = pid_bh // heads
        off_h = pid_bh % heads
        off_hkv = off_h // group
        offset = kv_len - q_len  # position of query 0
        q_block = (pid_m * BLOCK_M) // MASK_BQ
        SUBS: tl.constexpr = MASK_BK // BLOCK_N

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        d_ok = offs_d < HEAD_DIM
        q_ptrs = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        q = tl.load(
            q_ptrs + offs_m[:, None] * stride_qn + offs_d[None, :],
            mask=(offs_m[:, None] < q_len) & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:  # the interpreter multiplies bfloat16 as raw integers
            q = q.to(tl.float32)
        k_base = K + off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh
        v_base = V + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh
        perm_base = Perm + off_b.to(tl.int64) * stride_pb + off_hkv.to(tl.int64) * stride_ph

        row = off_b * stride_mb + off_h * stride_mh + q_block * stride_mq
        num_kept = tl.load(KvNum + row)
        num_interior = tl.load(KvInterior + row)
        idx_base = (
            KvIdx
            + off_b.to(tl.int64) * stride_ib
            + off_h.to(tl.int64) * stride_ih
            + q_block.to(tl.int64) * stride_iq
        )

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        query_pos = offset + offs_m

        # run 0: blocks that need no element mask; run 1: the rest
        for run in tl.static_range(2):
            if run == 0:
                lo = 0
                hi = num_interior * SUBS
            else:
                lo = num_interior * SUBS
                hi = num_kept * SUBS
            # the next block id is loaded one step ahead, so that the pipeliner sees K/V
            # addresses that do not wait on a load of the same iteration
            next_block = tl.load(idx_base + lo // SUBS, mask=lo < hi, other=0)
            for t in range(lo, hi):
                key_block = next_block
                next_block = tl.load(idx_base + (t + 1) // SUBS, mask=t + 1 < hi, other=0)
                slots = key_block * MASK_BK + (t % SUBS) * BLOCK_N + offs_n
                slot_ok = slots < kv_len
                if HAS_PERM:
                    rows = tl.load(perm_base + slots, mask=slot_ok, other=0)
                else:
                    rows = slots
                if run == 0:
                    k = tl.load(
                        k_base + rows[:, None] * stride_kn + offs_d[None, :], mask=d_ok[None, :], other=0.0
                    )
                    v = tl.load(
                        v_base + rows[:, None] * stride_vn + offs_d[None, :], mask=d_ok[None, :], other=0.0
                    )
                else:
                    kv_ok = slot_ok[:, None] & d_ok[None, :]
                    k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
                    v = tl.load(v_base + rows[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
                if UPCAST:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
                if run == 0:
                    m_new = tl.maximum(m_i, tl.max(qk, 1))
                    m_use = m_new
                else:
                    visible = slot_ok[None, :]
                    if CAUSAL:
                        visible = visible & (rows[None, :] <= query_pos[:, None])
                    qk = tl.where(visible, qk, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(qk, 1))
                    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.math.exp2(qk - m_use[:, None])
                alpha = tl.math.exp2(m_i - m_use)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
                m_i = m_new

        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        o_ptrs = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
        tl.store(
            o_ptrs + offs_m[:, None] * stride_on + offs_d[None, :],
            out.to(Out.dtype.element_ty),
            mask=(offs_m[:, None] < q_len) & d_ok[None, :],
        )
        lse = tl.where(
            empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453
        )
        tl.store(Lse + pid_bh.to(tl.int64) * q_len + offs_m, lse, mask=offs_m < q_len)

    def _bwd_delta_kernel(
        Out, DOut, Delta,
        stride_ob, stride_oh, stride_on,
        stride_db, stride_dh, stride_dn,
        q_len, heads,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        off_b = pid_bh // heads
        off_h = pid_bh % heads
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        ok = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
        o = tl.load(
            Out
            + off_b.to(tl.int64) * stride_ob
            + off_h.to(tl.int64) * stride_oh
            + offs_m[:, None] * stride_on
            + offs_d[None, :],
            mask=ok,
            other=0.0,
        )
        do = tl.load(
            DOut
            + off_b.to(tl.int64) * stride_db
            + off_h.to(tl.int64) * stride_dh
            + offs_m[:, None] * stride_dn
            + offs_d[None, :],
            mask=ok,
            other=0.0,
        )
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(Delta + pid_bh.to(tl.int64) * q_len + offs_m, delta, mask=offs_m < q_len)

    def _bwd_dq_kernel(
        Q, K, V, DOut, DQ, Lse, Delta,
        KvNum, KvIdx, KvInterior, Perm,
        stride_qb, stride_qh, stride_qn,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_db, stride_dh, stride_dn,
        stride_mb, stride_mh, stride_mq,
        stride_ib, stride_ih, stride_iq,
        stride_pb, stride_ph,
        q_len, kv_len, heads, group, scale_log2, scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        MASK_BQ: tl.constexpr, MASK_BK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_PERM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        # DQ has q's strides; DOut has its own (stride_d*)
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        off_b = pid_bh // heads
        off_h = pid_bh % heads
        off_hkv = off_h // group
        offset = kv_len - q_len
        q_block = (pid_m * BLOCK_M) // MASK_BQ
        SUBS: tl.constexpr = MASK_BK // BLOCK_N

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        d_ok = offs_d < HEAD_DIM
        row_ok = offs_m < q_len
        q_head = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        do_head = DOut + off_b.to(tl.int64) * stride_db + off_h.to(tl.int64) * stride_dh
        q = tl.load(
            q_head + offs_m[:, None] * stride_qn + offs_d[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        do = tl.load(
            do_head + offs_m[:, None] * stride_dn + offs_d[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(Lse + pid_bh.to(tl.int64) * q_len + offs_m, mask=row_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(Delta + pid_bh.to(tl.int64) * q_len + offs_m, mask=row_ok, other=0.0)
        k_base = K + off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh
        v_base = V + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh
        perm_base = Perm + off_b.to(tl.int64) * stride_pb + off_hkv.to(tl.int64) * stride_ph

        row = off_b * stride_mb + off_h * stride_mh + q_block * stride_mq
        num_kept = tl.load(KvNum + row)
        num_interior = tl.load(KvInterior + row)
        idx_base = (
            KvIdx
            + off_b.to(tl.int64) * stride_ib
            + off_h.to(tl.int64) * stride_ih
            + q_block.to(tl.int64) * stride_iq
        )
        query_pos = offset + offs_m
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        for run in tl.static_range(2):
            if run == 0:
                lo = 0
                hi = num_interior * SUBS
            else:
                lo = num_interior * SUBS
                hi = num_kept * SUBS
            # the next block id is loaded one step ahead, so that the pipeliner sees K/V
            # addresses that do not wait on a load of the same iteration
            next_block = tl.load(idx_base + lo // SUBS, mask=lo < hi, other=0)
            for t in range(lo, hi):
                key_block = next_block
                next_block = tl.load(idx_base + (t + 1) // SUBS, mask=t + 1 < hi, other=0)
                slots = key_block * MASK_BK + (t % SUBS) * BLOCK_N + offs_n
                slot_ok = slots < kv_len
                if HAS_PERM:
                    rows = tl.load(perm_base + slots, mask=slot_ok, other=0)
                else:
                    rows = slots
                if run == 0:
                    k = tl.load(
                        k_base + rows[:, None] * stride_kn + offs_d[None, :], mask=d_ok[None, :], other=0.0
                    )
                    v = tl.load(
                        v_base + rows[:, None] * stride_vn + offs_d[None, :], mask=d_ok[None, :], other=0.0
                    )
                else:
                    kv_ok = slot_ok[:, None] & d_ok[None, :]
                    k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
                    v = tl.load(v_base + rows[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
                if UPCAST:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
                if run == 1:
                    visible = slot_ok[None, :]
                    if CAUSAL:
                        visible = visible & (rows[None, :] <= query_pos[:, None])
                    qk = tl.where(visible, qk, float("-inf"))
                p = tl.math.exp2(qk - lse[:, None])
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

        dq_head = DQ + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < q_len
        tl.store(
            dq_head + offs_m[:, None] * stride_qn + offs_d[None, :],
            (dq * scale).to(DQ.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )

    def _bwd_dkdv_kernel(
        Q, K, V, DOut, DK, DV, Lse, Delta,
        QNum, QIdx, QMasked, Perm,
        stride_qb, stride_qh, stride_qn,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_db, stride_dh, stride_dn,
        stride_mb, stride_mh, stride_mk,
        stride_ib, stride_ih, stride_ik,
        stride_pb, stride_ph,
        q_len, kv_len, heads, kv_heads, group, scale_log2, scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        MASK_BQ: tl.constexpr, MASK_BK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_PERM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        # DK has k's strides and DV v's strides (both fresh contiguous buffers of the same shape)
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        off_b = pid_bh // kv_heads
        off_hkv = pid_bh % kv_heads
        offset = kv_len - q_len
        key_block = (pid_n * BLOCK_N) // MASK_BK
        SUBS: tl.constexpr = MASK_BQ // BLOCK_M

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_mt = tl.arange(0, BLOCK_M)
        d_ok = offs_d < HEAD_DIM
        slot_ok = offs_n < kv_len
        if HAS_PERM:
            perm_base = Perm + off_b.to(tl.int64) * stride_pb + off_hkv.to(tl.int64) * stride_ph
            rows = tl.load(perm_base + offs_n, mask=slot_ok, other=0)
        else:
            rows = offs_n
        kv_ok = slot_ok[:, None] & d_ok[None, :]
        k_head_off = off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh
        v_head_off = off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh
        k = tl.load(K + k_head_off + rows[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + v_head_off + rows[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

        for g in range(0, group):
            off_h = off_hkv * group + g
            row = off_b * stride_mb + off_h * stride_mh + key_block * stride_mk
            num_listed = tl.load(QNum + row)
            num_masked = tl.load(QMasked + row)
            idx_base = (
                QIdx
                + off_b.to(tl.int64) * stride_ib
                + off_h.to(tl.int64) * stride_ih
                + key_block.to(tl.int64) * stride_ik
            )
            q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
            do_base = DOut + off_b.to(tl.int64) * stride_db + off_h.to(tl.int64) * stride_dh
            stat_base = (off_b * heads + off_h).to(tl.int64) * q_len
            # run 0: query blocks that need the element mask (a prefix of the ascending list)
            for run in tl.static_range(2):
                if run == 0:
                    lo = 0
                    hi = num_masked * SUBS
                else:
                    lo = num_masked * SUBS
                    hi = num_listed * SUBS
                next_block = tl.load(idx_base + lo // SUBS, mask=lo < hi, other=0)
                for t in range(lo, hi):
                    q_block = next_block
                    next_block = tl.load(idx_base + (t + 1) // SUBS, mask=t + 1 < hi, other=0)
                    offs_m = q_block * MASK_BQ + (t % SUBS) * BLOCK_M + offs_mt
                    row_ok = offs_m < q_len
                    q = tl.load(
                        q_base + offs_m[:, None] * stride_qn + offs_d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :],
                        other=0.0,
                    )
                    do = tl.load(
                        do_base + offs_m[:, None] * stride_dn + offs_d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :],
                        other=0.0,
                    )
                    if UPCAST:
                        q = q.to(tl.float32)
                        do = do.to(tl.float32)
                    lse = tl.load(Lse + stat_base + offs_m, mask=row_ok, other=float("inf"))
                    lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
                    delta = tl.load(Delta + stat_base + offs_m, mask=row_ok, other=0.0)
                    qk_t = (
                        tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2
                    )  # [BLOCK_N, BLOCK_M]
                    if run == 0:
                        visible = slot_ok[:, None]
                        if CAUSAL:
                            visible = visible & (rows[:, None] <= (offset + offs_m)[None, :])
                        qk_t = tl.where(visible, qk_t, float("-inf"))
                    p_t = tl.math.exp2(qk_t - lse[None, :])
                    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
                    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                    ds_t = p_t * (dp_t - delta[None, :])
                    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

        # recomputed here rather than kept live through the loops
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        slot_ok = offs_n < kv_len
        if HAS_PERM:
            rows = tl.load(perm_base + offs_n, mask=slot_ok, other=0)
        else:
            rows = offs_n
        kv_ok = slot_ok[:, None] & d_ok[None, :]
        tl.store(
            DK + k_head_off + rows[:, None] * stride_kn + offs_d[None, :],
            (dk * scale).to(DK.dtype.element_ty),
            mask=kv_ok,
        )
        tl.store(
            DV + v_head_off + rows[:, None] * stride_vn + offs_d[None, :],
            dv.to(DV.dtype.element_ty),
            mask=kv_ok,
        )


_KERNEL_NAMES = ("_fwd_kernel", "_bwd_delta_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel")
_KERNELS: dict[bool, dict[str, Any]] = {}
_AUTOTUNED: dict[tuple, Any] = {}
_BEST: dict[tuple, Any] = {}

# (BLOCK_M, BLOCK_N, num_warps, num_stages); pruned to tiles dividing the mask blocks
_FWD_CONFIGS = [(128, 64, 8, 4), (128, 128, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3)]
_DQ_CONFIGS = [(128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3)]
_DKDV_CONFIGS = [(64, 128, 8, 3), (32, 128, 8, 3), (32, 64, 4, 3)]
# for mask blocks no listed tile divides (multiples of 16 that are not of 32 or 64)
_SMALL_CONFIGS = [(32, 32, 4, 3), (16, 16, 4, 2)]
_AUTOTUNE_KEY = ["HEAD_DIM", "MASK_BQ", "MASK_BK", "CAUSAL", "HAS_PERM"]


def _kernels() -> dict[str, Any]:
    """The Triton kernels, compiled or interpreted as TRITON_INTERPRET says at launch time."""
    interpret = triton_interpreting()
    if interpret not in _KERNELS:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction as wrap
        else:
            from triton.runtime.jit import JITFunction as wrap
        _KERNELS[interpret] = {name: wrap(globals()[name]) for name in _KERNEL_NAMES}
    return _KERNELS[interpret]


def _fitting(configs: list, block_q: int, block_k: int) -> list:
    fits = [c for c in configs if block_q % c[0] == 0 and block_k % c[1] == 0]
    return fits or [c for c in _SMALL_CONFIGS if block_q % c[0] == 0 and block_k % c[1] == 0]


def _tuned(name: str, configs: list, block_q: int, block_k: int) -> Any:
    """An autotuned launcher over the configs whose tiles divide the mask blocks."""
    key = (name, block_q, block_k)
    if key not in _AUTOTUNED:
        triton_configs = [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in _fitting(configs, block_q, block_k)
        ]
        _AUTOTUNED[key] = triton.autotune(configs=triton_configs, key=_AUTOTUNE_KEY)(_kernels()[name])
    return _AUTOTUNED[key]


def _launch(name: str, configs: list, grid_fn, args: tuple, meta: dict, block_q: int, block_k: int) -> None:
    """Interpreter: 16 x 16 tiles. ZOO_AUTOTUNE=0: the first listed config that fits in the
    chip's shared memory (quick tests). Otherwise: autotuned, once per key."""
    import os

    if triton_interpreting():
        tiles = {"BLOCK_M": min(16, block_q), "BLOCK_N": min(16, block_k)}
        _kernels()[name][grid_fn(tiles)](*args, **meta, **tiles)
    elif os.environ.get("ZOO_AUTOTUNE", "1") == "0":
        from triton.runtime.errors import OutOfResources

        fits = _fitting(configs, block_q, block_k) + _SMALL_CONFIGS
        for i, (m, n, warps, stages) in enumerate(fits):
            tiles = {"BLOCK_M": m, "BLOCK_N": n}
            try:
                _kernels()[name][grid_fn(tiles)](*args, **meta, **tiles, num_warps=warps, num_stages=stages)
                return
            except OutOfResources:
                if i == len(fits) - 1:
                    raise
    else:
        dtype = args[0].dtype
        key = (name, block_q, block_k, dtype, *sorted(meta.items()))
        best = _BEST.get(key)
        if best is None:
            tuner = _tuned(name, configs, block_q, block_k)
            tuner[grid_fn](*args, **meta)
            _BEST[key] = tuner.best_config
        else:  # launch the chosen config directly: no autotuner bookkeeping per call
            config = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
            _kernels()[name][grid_fn(best.kwargs)](*args, **meta, **config)


def _interior_counts(mask: BlockSparseMask, causal: bool) -> Tensor:
    """int32 ``[B, H, Qb]``: how many leading kept key blocks of each row need no element mask.

    A key block needs none when it is not the ragged last block and, with ``causal``, lies
    entirely at or before the first query of the query block (never, with a key permutation).
    The kept lists are ascending, so these blocks are a prefix of each list.
    """
    device = mask.kv_indices.device
    num_q_blocks = mask.num_q_blocks
    limit = torch.full((num_q_blocks,), mask.kv_len // mask.block_k, dtype=torch.int64, device=device)
    if causal:
        if mask.key_perm is not None:
            limit = torch.zeros_like(limit)
        else:
            first_query_pos = (
                mask.kv_len - mask.q_len + torch.arange(num_q_blocks, device=device) * mask.block_q
            )
            visible = torch.div(first_query_pos + 1, mask.block_k, rounding_mode="floor").clamp_min(0)
            limit = torch.minimum(limit, visible)
    listed = torch.arange(mask.kv_indices.shape[-1], device=device) < mask.kv_num_blocks[..., None]
    return (listed & (mask.kv_indices < limit[None, None, :, None])).sum(-1, dtype=torch.int32)


def _transposed_lists(mask: BlockSparseMask, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per key block: the query blocks that keep it (ascending), their count, and how many
    leading ones need an element mask (``[B, H, Kb]``, ``[B, H, Kb, Qmax]``, ``[B, H, Kb]``)."""
    from zoo.kernels.block_mask import _dense_to_lists, _lists_to_dense

    # from the lists the forward walks (not to_dense, which would add any full_* blocks)
    dense_t = _lists_to_dense(mask.kv_num_blocks, mask.kv_indices, mask.num_k_blocks).transpose(-1, -2)
    q_num, q_idx = _dense_to_lists(dense_t)
    device = q_idx.device
    num_k_blocks, num_q_blocks = mask.num_k_blocks, mask.num_q_blocks
    key_block = torch.arange(num_k_blocks, device=device)
    ragged = (key_block + 1) * mask.block_k > mask.kv_len  # [Kb]
    listed = torch.arange(q_idx.shape[-1], device=device) < q_num[..., None]
    if causal and mask.key_perm is not None:
        needs = torch.ones_like(listed)
    else:
        needs = ragged[None, None, :, None].expand_as(listed)
        if causal:
            first_query_pos = (
                mask.kv_len - mask.q_len + torch.arange(num_q_blocks, device=device) * mask.block_q
            )
            limit = torch.div(first_query_pos + 1, mask.block_k, rounding_mode="floor")  # [Qb]
            needs = needs | (key_block[None, None, :, None] >= limit[q_idx.long()])
    return q_num, q_idx, (listed & needs).sum(-1, dtype=torch.int32)


def _cached(mask: BlockSparseMask, derive, causal: bool):
    """``derive(mask, causal)``, computed once per mask (masks are immutable once used)."""
    key = (derive.__name__, bool(causal))
    if key not in mask._derived:
        mask._derived[key] = derive(mask, causal)
    return mask._derived[key]


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 or (triton_interpreting() and dtype == torch.bfloat16) else "tf32"


def _strides3(t: Tensor) -> tuple[int, int, int]:
    """Batch, head, row strides; size-1 (broadcast) dimensions get stride 0."""
    return tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(3))


def _row_major(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_triton_inputs(q: Tensor, mask: BlockSparseMask) -> None:
    if triton is None:
        raise ValueError("backend: 'triton' needs the triton package; use backend='torch'")
    if not q.is_cuda and not triton_interpreting():
        raise ValueError(f"backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q: the Triton kernels take float16, bfloat16 or float32, got {q.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"q: the Triton kernels take head dims up to 256, got {q.shape[-1]}")
    for name, size in (("block_q", mask.block_q), ("block_k", mask.block_k)):
        if size % 16:
            raise ValueError(f"mask.{name}: the Triton kernels need multiples of 16, got {size}")


def _mask_args(mask: BlockSparseMask, q: Tensor) -> tuple:
    perm = mask.key_perm
    if perm is None:
        perm_arg, perm_strides = mask.kv_indices, (0, 0)  # never read
    else:
        perm_arg = perm.to(torch.int32).contiguous()
        perm_strides = tuple(0 if perm_arg.shape[i] == 1 else perm_arg.stride(i) for i in range(2))
    return perm_arg, perm_strides


def _forward(q, k, v, mask, causal, scale):
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(batch, heads, q_len, dtype=torch.float32, device=q.device)
    interior = _cached(mask, _interior_counts, causal)
    kv_num, kv_idx = mask.kv_num_blocks, _row_major(mask.kv_indices)
    perm_arg, perm_strides = _mask_args(mask, q)
    args = (
        q, k, v, out, lse, kv_num, kv_idx, interior, perm_arg,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out),
        *_strides3(kv_num), *_strides3(kv_idx), *perm_strides,
        q_len, kv_len, heads, heads // kv_heads, scale * LOG2E,
    )  # fmt: skip
    meta = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        MASK_BQ=mask.block_q,
        MASK_BK=mask.block_k,
        CAUSAL=bool(causal),
        HAS_PERM=mask.key_perm is not None,
        PRECISION=_precision(q.dtype),
        UPCAST=triton_interpreting() and q.dtype == torch.bfloat16,
    )
    grid = lambda m: (triton.cdiv(q_len, m["BLOCK_M"]), batch * heads)
    _launch("_fwd_kernel", _FWD_CONFIGS, grid, args, meta, mask.block_q, mask.block_k)
    return out, lse


def _backward(grad_out, q, k, v, out, lse, mask, causal, scale):
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    grad_out = _row_major(grad_out)
    block_d = max(16, triton.next_power_of_2(head_dim))
    delta = torch.empty_like(lse)
    kernels = _kernels()
    delta_block = 64
    kernels["_bwd_delta_kernel"][(triton.cdiv(q_len, delta_block), batch * heads)](
        out, grad_out, delta, *_strides3(out), *_strides3(grad_out), q_len, heads,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=delta_block,
    )  # fmt: skip
    perm_arg, perm_strides = _mask_args(mask, q)
    meta = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        MASK_BQ=mask.block_q,
        MASK_BK=mask.block_k,
        CAUSAL=bool(causal),
        HAS_PERM=mask.key_perm is not None,
        PRECISION=_precision(q.dtype),
        UPCAST=triton_interpreting() and q.dtype == torch.bfloat16,
    )

    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    interior = _cached(mask, _interior_counts, causal)
    kv_num, kv_idx = mask.kv_num_blocks, _row_major(mask.kv_indices)
    if dq.stride() != q.stride():
        q = q.contiguous()
    args = (
        q, k, v, grad_out, dq, lse, delta, kv_num, kv_idx, interior, perm_arg,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(grad_out),
        *_strides3(kv_num), *_strides3(kv_idx), *perm_strides,
        q_len, kv_len, heads, heads // kv_heads, scale * LOG2E, scale,
    )  # fmt: skip
    grid = lambda m: (triton.cdiv(q_len, m["BLOCK_M"]), batch * heads)
    _launch("_bwd_dq_kernel", _DQ_CONFIGS, grid, args, meta, mask.block_q, mask.block_k)

    k, v = k.contiguous(), v.contiguous()
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    q_num, q_idx, q_masked = _cached(mask, _transposed_lists, causal)
    args = (
        q, k, v, grad_out, dk, dv, lse, delta, q_num, q_idx, q_masked, perm_arg,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(grad_out),
        *_strides3(q_num), *_strides3(q_idx), *perm_strides,
        q_len, kv_len, heads, kv_heads, heads // kv_heads, scale * LOG2E, scale,
    )  # fmt: skip
    grid = lambda m: (triton.cdiv(kv_len, m["BLOCK_N"]), batch * kv_heads)
    _launch("_bwd_dkdv_kernel", _DKDV_CONFIGS, grid, args, meta, mask.block_q, mask.block_k)
    return dq, dk, dv


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale):
        out, lse = _forward(q, k, v, mask, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.causal, ctx.scale = mask, causal, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(grad_out, q, k, v, out, lse, ctx.mask, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None


def _triton_attention(q, k, v, mask, *, causal, scale, return_lse) -> Any:
    _check_triton_inputs(q, mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = _row_major(q), _row_major(k), _row_major(v)
    out, lse = _BlockSparseAttention.apply(q, k, v, mask, bool(causal), scale)
    return (out, lse) if return_lse else out
