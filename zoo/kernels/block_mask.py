"""Block-sparse attention masks: the one mask type of the library.

The layout follows FlexAttention's ``BlockMask`` ("FlexAttention: A Programming Model for
Generating Optimized Attention Kernels", arXiv 2412.05496): block sparsity is data, a list of
kept key blocks per query block. The attention matrix ``[N, M]`` is cut into blocks of
``block_q x block_k``; for each (batch row, head, query block) ``kv_indices`` lists the kept key
blocks in ascending order and ``kv_num_blocks`` says how many entries of that list are valid.
Batch and head dimensions of size 1 broadcast.

``from_scores`` implements the two selection rules used by the sparse-prefill methods:
top-k per row, and the cumulative threshold of XAttention ("XAttention: Block Sparse Attention
with Antidiagonal Scoring", arXiv 2503.16428): keep the fewest blocks whose scores reach a
fraction ``threshold`` of the row sum. ``key_perm`` carries the per-(batch, kv head) key
permutation of PBS-Attn ("Permuted Block-Sparse Attention", arXiv 2510.21270): key slot ``s``
holds original key ``key_perm[..., s]``; the kernels read K and V through it and decide
causality on original positions.

Queries are the last ``q_len`` of the ``kv_len`` positions (query ``i`` sits at position
``kv_len - q_len + i``), as in chunked prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

__all__ = ["BlockSparseMask", "causal_reachable_blocks"]


def _pair(block_size: int | tuple[int, int] | list[int], name: str = "block_size") -> tuple[int, int]:
    if isinstance(block_size, int):
        pair = (block_size, block_size)
    elif isinstance(block_size, (tuple, list)) and len(block_size) == 2:
        pair = (int(block_size[0]), int(block_size[1]))
    else:
        raise ValueError(f"{name}: expected an int or a pair (block_q, block_k), got {block_size!r}")
    if pair[0] < 1 or pair[1] < 1:
        raise ValueError(f"{name}: expected positive block sizes, got {pair}")
    return pair


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def causal_reachable_blocks(
    q_len: int, kv_len: int, block_q: int, block_k: int, device: torch.device | str | None = None
) -> Tensor:
    """bool ``[Qb, Kb]``: True where some query of the block sees some key of the block causally.

    Query ``i`` sits at position ``kv_len - q_len + i`` and sees keys ``j <= kv_len - q_len + i``.
    """
    num_q_blocks, num_k_blocks = _ceil_div(q_len, block_q), _ceil_div(kv_len, block_k)
    q_block = torch.arange(num_q_blocks, device=device)
    last_query_pos = kv_len - q_len + torch.clamp((q_block + 1) * block_q, max=q_len) - 1
    first_key_pos = torch.arange(num_k_blocks, device=device) * block_k
    return first_key_pos[None, :] <= last_query_pos[:, None]


def _diagonal_blocks(q_len: int, kv_len: int, block_q: int, block_k: int, device: Any) -> Tensor:
    """bool ``[Qb, Kb]``: key blocks that hold the own position of some query of the block."""
    num_q_blocks, num_k_blocks = _ceil_div(q_len, block_q), _ceil_div(kv_len, block_k)
    q_block = torch.arange(num_q_blocks, device=device)
    first_pos = kv_len - q_len + q_block * block_q
    last_pos = kv_len - q_len + torch.clamp((q_block + 1) * block_q, max=q_len) - 1
    k_block = torch.arange(num_k_blocks, device=device)
    lo = torch.div(first_pos, block_k, rounding_mode="floor")
    hi = torch.div(last_pos, block_k, rounding_mode="floor")
    return (k_block[None, :] >= lo[:, None]) & (k_block[None, :] <= hi[:, None])


def _dense_to_lists(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """bool ``[B, H, Qb, Kb]`` -> (int32 counts ``[B, H, Qb]``, int32 ascending ids ``[B, H, Qb, Kmax]``)."""
    counts = blocks.sum(-1, dtype=torch.int32)
    width = max(1, int(counts.max())) if counts.numel() else 1
    num_k_blocks = blocks.shape[-1]
    slot = torch.cumsum(blocks.to(torch.int32), -1) - 1
    slot = torch.where(blocks, slot, torch.full_like(slot, width))  # unkept -> a spare column
    ids = torch.arange(num_k_blocks, device=blocks.device, dtype=torch.int32).expand_as(slot)
    indices = torch.zeros(*blocks.shape[:-1], width + 1, dtype=torch.int32, device=blocks.device)
    indices.scatter_(-1, slot.long(), ids)
    return counts, indices[..., :width].contiguous()


def _lists_to_dense(num_blocks: Tensor, indices: Tensor, num_k_blocks: int) -> Tensor:
    valid = torch.arange(indices.shape[-1], device=indices.device) < num_blocks[..., None].long()
    target = torch.where(valid, indices.long(), torch.full_like(indices, num_k_blocks, dtype=torch.long))
    dense = torch.zeros(*indices.shape[:-1], num_k_blocks + 1, dtype=torch.bool, device=indices.device)
    dense.scatter_(-1, target, True)
    return dense[..., :num_k_blocks]


@dataclass
class BlockSparseMask:
    """Kept (query block, key block) pairs as per-row index lists.

    Attributes
    ----------
    block_q, block_k:
        Block sizes along queries and keys.
    q_len, kv_len:
        N (queries) and M (keys). The last blocks may be ragged.
    kv_num_blocks:
        int32 ``[B, H, Qb]``; ``B`` and ``H`` may be 1 (broadcast).
    kv_indices:
        int32 ``[B, H, Qb, Kmax]``; the first ``kv_num_blocks`` entries of each row are ALL the
        kept key-block ids of that query block, ascending. Later entries are unspecified.
    full_kv_num_blocks, full_kv_indices:
        Optional subset of the kept blocks known to need no element mask (as FlexAttention's
        ``full_*`` lists). Informational: the kernels decide element masks themselves from the
        positions (causal diagonal, ragged edges, key permutation), so these may be None.
    key_perm:
        Optional int ``[B, Hkv, M]``: key slot ``s`` holds original key ``key_perm[..., s]``.

    A mask is treated as immutable once used: the kernels cache index lists derived from it
    (blocks needing no element mask, the transposed lists of the backward) on the instance.
    """

    block_q: int
    block_k: int
    q_len: int
    kv_len: int
    kv_num_blocks: Tensor
    kv_indices: Tensor
    full_kv_num_blocks: Tensor | None = None
    full_kv_indices: Tensor | None = None
    key_perm: Tensor | None = None
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.block_q, self.block_k = _pair((self.block_q, self.block_k), "block_q/block_k")
        if self.q_len < 1 or self.kv_len < 1:
            raise ValueError(f"q_len/kv_len: expected positive lengths, got {self.q_len}, {self.kv_len}")
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, Tensor) or value.dtype != torch.int32:
                got = value.dtype if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{name}: expected an int32 tensor, got {got}")
        if self.kv_num_blocks.dim() != 3:
            raise ValueError(
                f"kv_num_blocks: expected shape [B, H, Qb], got {tuple(self.kv_num_blocks.shape)}"
            )
        if self.kv_indices.dim() != 4 or self.kv_indices.shape[:3] != self.kv_num_blocks.shape:
            raise ValueError(
                f"kv_indices: expected shape [B, H, Qb, Kmax] = {tuple(self.kv_num_blocks.shape)} + [Kmax], "
                f"got {tuple(self.kv_indices.shape)}"
            )
        if self.kv_num_blocks.shape[2] != self.num_q_blocks:
            raise ValueError(
                f"kv_num_blocks: expected Qb = ceil(q_len / block_q) = {self.num_q_blocks} query blocks, "
                f"got {self.kv_num_blocks.shape[2]}"
            )
        if self.kv_indices.shape[3] < 1:
            raise ValueError("kv_indices: expected Kmax >= 1 (use kv_num_blocks = 0 for empty rows)")
        if (self.full_kv_num_blocks is None) != (self.full_kv_indices is None):
            raise ValueError("full_kv_num_blocks/full_kv_indices: expected both or neither")
        if self.key_perm is not None:
            perm = self.key_perm
            if (
                perm.dtype not in (torch.int32, torch.int64)
                or perm.dim() != 3
                or perm.shape[2] != self.kv_len
            ):
                raise ValueError(
                    f"key_perm: expected an int32/int64 tensor [B, Hkv, kv_len={self.kv_len}], "
                    f"got {perm.dtype} {tuple(perm.shape)}"
                )

    # ------------------------------------------------------------------ sizes
    @property
    def num_q_blocks(self) -> int:
        return _ceil_div(self.q_len, self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return _ceil_div(self.kv_len, self.block_k)

    @property
    def block_size(self) -> tuple[int, int]:
        return (self.block_q, self.block_k)

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def __repr__(self) -> str:
        b, h, qb = self.kv_num_blocks.shape
        perm = "" if self.key_perm is None else f", key_perm={tuple(self.key_perm.shape)}"
        return (
            f"BlockSparseMask(B={b}, H={h}, q_len={self.q_len}, kv_len={self.kv_len}, "
            f"block=({self.block_q}, {self.block_k}), blocks={qb}x{self.num_k_blocks}, "
            f"Kmax={self.kv_indices.shape[-1]}{perm})"
        )

    # ------------------------------------------------------------ conversions
    @classmethod
    def from_dense(
        cls,
        blocks: Tensor,
        block_size: int | tuple[int, int],
        q_len: int,
        kv_len: int,
        key_perm: Tensor | None = None,
    ) -> BlockSparseMask:
        """From a bool block matrix ``[B, H, Qb, Kb]`` (True = keep)."""
        block_q, block_k = _pair(block_size)
        if not isinstance(blocks, Tensor) or blocks.dim() != 4:
            got = tuple(blocks.shape) if isinstance(blocks, Tensor) else type(blocks).__name__
            raise ValueError(f"blocks: expected a bool tensor [B, H, Qb, Kb], got {got}")
        expected = (_ceil_div(q_len, block_q), _ceil_div(kv_len, block_k))
        if tuple(blocks.shape[2:]) != expected:
            raise ValueError(
                f"blocks: expected [B, H, Qb, Kb] with (Qb, Kb) = {expected} for q_len={q_len}, "
                f"kv_len={kv_len}, block_size={(block_q, block_k)}, got {tuple(blocks.shape)}"
            )
        counts, indices = _dense_to_lists(blocks.bool())
        return cls(block_q, block_k, q_len, kv_len, counts, indices, key_perm=key_perm)

    def to_dense(self) -> Tensor:
        """bool ``[B, H, Qb, Kb]``, True where the block is kept (``full_*`` lists included)."""
        dense = _lists_to_dense(self.kv_num_blocks, self.kv_indices, self.num_k_blocks)
        if self.full_kv_num_blocks is not None:
            dense = dense | _lists_to_dense(self.full_kv_num_blocks, self.full_kv_indices, self.num_k_blocks)
        return dense

    def density(self, causal: bool = False) -> float:
        """Kept blocks over all blocks, or over the causally reachable blocks with ``causal=True``.

        With a key permutation, reachability is counted on block positions, not on the
        permuted keys.
        """
        dense = self.to_dense()
        if causal:
            reach = causal_reachable_blocks(self.q_len, self.kv_len, self.block_q, self.block_k, dense.device)
            total = int(reach.sum()) * dense.shape[0] * dense.shape[1]
            kept = int((dense & reach).sum())
        else:
            total = dense.numel()
            kept = int(dense.sum())
        return kept / max(total, 1)

    @classmethod
    def from_flex(cls, block_mask: Any) -> BlockSparseMask:
        """From ``torch.nn.attention.flex_attention.BlockMask``: its partial and full blocks are kept.

        An element-wise ``mask_mod`` is not carried over; pass ``causal=True`` to the attention
        call for a causal mask.
        """
        block_q, block_k = _pair(tuple(block_mask.BLOCK_SIZE), "block_mask.BLOCK_SIZE")
        q_len, kv_len = (int(x) for x in block_mask.seq_lengths)
        num_k_blocks = _ceil_div(kv_len, block_k)
        num_q_blocks = _ceil_div(q_len, block_q)

        def lists(num: Tensor, idx: Tensor) -> Tensor:
            num, idx = num[..., :num_q_blocks], idx[..., :num_q_blocks, :]
            return _lists_to_dense(num.to(torch.int32), idx.to(torch.int32), max(num_k_blocks, idx.shape[-1]))

        dense = lists(block_mask.kv_num_blocks, block_mask.kv_indices)
        full = None
        if block_mask.full_kv_num_blocks is not None:
            full = lists(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
            dense = dense | full
        dense = dense[..., :num_k_blocks]
        mask = cls.from_dense(dense, (block_q, block_k), q_len, kv_len)
        if full is not None:
            mask.full_kv_num_blocks, mask.full_kv_indices = _dense_to_lists(full[..., :num_k_blocks])
        return mask

    def to_flex(self, causal: bool = False) -> Any:
        """As ``torch.nn.attention.flex_attention.BlockMask`` over the same blocks.

        With ``causal=True`` the mask_mod is the causal rule for queries at the last ``q_len``
        positions; blocks strictly below the diagonal become FlexAttention full blocks. A key
        permutation cannot be expressed: permute K and V yourself and build the mask without it.
        """
        from torch.nn.attention.flex_attention import BlockMask

        if self.key_perm is not None:
            raise ValueError(
                "key_perm: FlexAttention has no key permutation; expected a mask without key_perm"
            )
        dense = self.to_dense()
        offset = self.kv_len - self.q_len
        if causal:
            q_block = torch.arange(self.num_q_blocks, device=dense.device)
            first_query_pos = offset + q_block * self.block_q
            last_key_pos = (
                torch.arange(self.num_k_blocks, device=dense.device) * self.block_k + self.block_k - 1
            )
            below = last_key_pos[None, :] <= first_query_pos[:, None]
            reach = causal_reachable_blocks(self.q_len, self.kv_len, self.block_q, self.block_k, dense.device)
            full = dense & below
            partial = dense & reach & ~below

            def mask_mod(b, h, q_idx, kv_idx):
                return kv_idx <= q_idx + offset
        else:
            full, partial = dense, torch.zeros_like(dense)
            mask_mod = None
        num, idx = _dense_to_lists(partial)
        full_num, full_idx = _dense_to_lists(full)
        pad = self.num_k_blocks - idx.shape[-1]
        idx = torch.nn.functional.pad(idx, (0, pad))
        full_idx = torch.nn.functional.pad(full_idx, (0, self.num_k_blocks - full_idx.shape[-1]))
        kwargs = {} if mask_mod is None else {"mask_mod": mask_mod}
        return BlockMask.from_kv_blocks(
            num,
            idx,
            full_num,
            full_idx,
            BLOCK_SIZE=(self.block_q, self.block_k),
            seq_lengths=(self.q_len, self.kv_len),
            **kwargs,
        )

    @classmethod
    def from_scores(
        cls,
        scores: Tensor,
        block_size: int | tuple[int, int],
        q_len: int,
        kv_len: int,
        *,
        topk: int | None = None,
        threshold: float | Tensor | None = None,
        causal: bool = False,
        key_perm: Tensor | None = None,
    ) -> BlockSparseMask:
        """Select blocks per row from block scores ``[B, H, Qb, Kb]`` (higher = more important).

        ``topk``: keep the ``topk`` best blocks of each row. ``threshold`` (a float, or a tensor
        ``[H]`` per head): keep the fewest blocks, best first, whose scores sum to at least
        ``threshold`` times the row sum (scores should be non-negative, e.g. attention mass).
        With ``causal=True``, blocks no query of the row can see are never kept, and the first
        key block and the diagonal blocks (holding the queries' own positions) are always kept;
        they are ranked first and count towards ``topk`` and the threshold sum.
        """
        block_q, block_k = _pair(block_size)
        if (topk is None) == (threshold is None):
            raise ValueError(
                f"topk/threshold: expected exactly one of them, got topk={topk}, threshold={threshold}"
            )
        if not isinstance(scores, Tensor) or scores.dim() != 4 or not scores.is_floating_point():
            got = (
                f"{scores.dtype} {tuple(scores.shape)}"
                if isinstance(scores, Tensor)
                else type(scores).__name__
            )
            raise ValueError(f"scores: expected a float tensor [B, H, Qb, Kb], got {got}")
        expected = (_ceil_div(q_len, block_q), _ceil_div(kv_len, block_k))
        if tuple(scores.shape[2:]) != expected:
            raise ValueError(
                f"scores: expected [B, H, Qb, Kb] with (Qb, Kb) = {expected} for q_len={q_len}, "
                f"kv_len={kv_len}, block_size={(block_q, block_k)}, got {tuple(scores.shape)}"
            )
        device = scores.device
        scores = scores.float()
        shape = scores.shape
        if causal:
            reach = causal_reachable_blocks(q_len, kv_len, block_q, block_k, device)
            forced = _diagonal_blocks(q_len, kv_len, block_q, block_k, device) & reach
            forced[:, 0] = reach[:, 0]
            allowed, forced = reach.expand(shape), forced.expand(shape)
        else:
            allowed = torch.ones(shape, dtype=torch.bool, device=device)
            forced = torch.zeros(shape, dtype=torch.bool, device=device)
        # rank: forced blocks first, then by score; never-allowed blocks last
        priority = torch.where(forced, torch.full_like(scores, float("inf")), scores)
        priority = torch.where(allowed, priority, torch.full_like(scores, float("-inf")))
        order = torch.sort(priority, dim=-1, descending=True, stable=True).indices
        rank_allowed = torch.gather(allowed, -1, order)
        if topk is not None:
            if int(topk) < 0:
                raise ValueError(f"topk: expected a non-negative int, got {topk}")
            position = torch.arange(shape[-1], device=device)
            keep_sorted = position < int(topk)
            num_forced = forced.sum(-1, keepdim=True)
            keep_sorted = keep_sorted | (position < num_forced)
        else:
            tau = torch.as_tensor(threshold, dtype=torch.float32, device=device)
            if tau.dim() == 1:
                if tau.shape[0] != shape[1]:
                    raise ValueError(
                        f"threshold: expected a float or a tensor [H={shape[1]}], got {tuple(tau.shape)}"
                    )
                tau = tau.view(1, -1, 1, 1)
            elif tau.dim() != 0:
                raise ValueError(f"threshold: expected a float or a tensor [H], got shape {tuple(tau.shape)}")
            if bool(((tau < 0) | (tau > 1)).any()):
                raise ValueError(f"threshold: expected values in [0, 1], got {threshold}")
            sorted_scores = torch.gather(torch.where(allowed, scores, torch.zeros_like(scores)), -1, order)
            before = torch.cumsum(sorted_scores, -1) - sorted_scores  # mass of the blocks ranked before
            row_sum = sorted_scores.sum(-1, keepdim=True)
            keep_sorted = before < tau * row_sum
            keep_sorted[..., 0] = True  # at least one block per row
            num_forced = forced.sum(-1, keepdim=True)
            keep_sorted = keep_sorted | (torch.arange(shape[-1], device=device) < num_forced)
        keep_sorted = keep_sorted & rank_allowed
        blocks = torch.zeros(shape, dtype=torch.bool, device=device).scatter_(-1, order, keep_sorted)
        return cls.from_dense(blocks, (block_q, block_k), q_len, kv_len, key_perm=key_perm)

    def to(self, device: torch.device | str) -> BlockSparseMask:
        moved = {
            f.name: (
                getattr(self, f.name).to(device)
                if isinstance(getattr(self, f.name), Tensor)
                else getattr(self, f.name)
            )
            for f in fields(self)
            if f.init
        }
        return BlockSparseMask(**moved)
