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

import math
from typing import Any

import torch
from torch import Tensor

from zoo.kernels.block_mask import BlockSparseMask

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


def _triton_attention(q, k, v, mask, *, causal, scale, return_lse) -> Any:
    raise NotImplementedError("the Triton kernels are not built yet; use backend='torch'")


_ = math  # used by the kernels below
