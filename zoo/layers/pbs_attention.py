"""PBS-Attn: permuted block-sparse attention for long-context prefill.

"Sparser Block-Sparse Attention via Token Permutation" (Wang et al., arXiv 2510.21270).

Important keys are scattered along the sequence ("vertical lines"), so a block mask needs many
blocks to cover them. Permuting keys so that important ones share blocks makes the mask sparser.
Permuting only *inside segments* keeps causality easy: a query sees every key of the segments
before its own, whatever their order, and the keys of its own segment are decided element by
element on their original positions.

Algorithm (per batch row and key/value head):

1. Key importance: the mean softmax attention that the last block of queries gives each key
   (causal; averaged over the query heads sharing the key head).
2. Permutation: inside each segment of ``segment_size`` keys (256 by default), sort the keys by
   importance, descending. ``key_perm[s]`` is the original key held by slot ``s``.
3. Block scores: mean-pooled queries against mean-pooled permuted keys, softmax over the key
   blocks a query block may select: blocks of earlier segments (causal). Blocks of the query
   block's own segment(s) are excluded from scoring and always kept, as is the block holding
   the first key; blocks whose keys all come after the query block are dropped.
4. Keep the fewest scored blocks whose mass reaches ``threshold`` (0.9 by default).
5. Run block-sparse attention through the key permutation: the kernel reads K and V through
   ``key_perm`` (no permuted copy) and applies the causal mask on original positions.

Step 1 never holds the ``[group * block, M]`` logits: on CUDA it runs as two Triton kernels
(row log-sum-exp over the keys, then per-key sums of probabilities;
:mod:`zoo.kernels.pbs_importance`), elsewhere as the same two passes over key chunks in PyTorch.
Steps 3-4 are sync-free: the threshold selection is one Triton program per row on CUDA
(bisection over the fp32 bit patterns, :mod:`zoo.kernels.threshold_select`), elsewhere one sort
per row; kept lists by a running count.

Sequences no longer than one segment fall back to dense attention. Beyond the upstream code:
grouped-query attention (one permutation per key head), gradients (the attention kernel's
backward), batch > 1, non-causal attention and queries that are the last ``N`` of ``M`` positions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from zoo.kernels.pbs_importance import key_importance
from zoo.kernels.threshold_select import kept_lists as _kept_lists
from zoo.kernels.threshold_select import threshold_select
from zoo.layers.xattention import check_attention_inputs

__all__ = ["PBSAttention"]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _acc(t: Tensor) -> Tensor:
    """fp32 accumulation (fp64 for fp64 inputs)."""
    return t.double() if t.dtype == torch.float64 else t.float()


class PBSAttention(nn.Module):
    """Permuted block-sparse attention (PBS-Attn) for causal prefill.

    Parameters
    ----------
    block_size:
        Query and key block size.
    segment_size:
        Keys are permuted only inside segments of this many tokens (a multiple of ``block_size``).
    threshold:
        Cumulative mass fraction in ``[0, 1]`` of the pooled block scores to keep;
        ``1.0`` keeps every block a query block can see (dense attention).
    force_first_block:
        Always keep the key block that holds the first token (the attention sink).
    backend:
        Attention kernel backend: ``"auto"``, ``"triton"`` or ``"torch"``.
    """

    def __init__(
        self,
        block_size: int = 128,
        segment_size: int = 256,
        threshold: float = 0.9,
        *,
        force_first_block: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
        if (
            isinstance(segment_size, bool)
            or not isinstance(segment_size, int)
            or segment_size < block_size
            or segment_size % block_size
        ):
            raise ValueError(
                f"segment_size: expected a positive multiple of block_size={block_size}, got {segment_size!r}"
            )
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not 0.0 <= threshold <= 1.0
        ):
            raise ValueError(f"threshold: expected a float in [0, 1], got {threshold!r}")
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
        self.block_size = block_size
        self.segment_size = segment_size
        self.threshold = float(threshold)
        self.force_first_block = bool(force_first_block)
        self.backend = backend

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, segment_size={self.segment_size}, threshold={self.threshold}"

    # ------------------------------------------------------------------ steps
    def key_permutation(self, q: Tensor, k: Tensor, causal: bool = True) -> Tensor:
        """``key_perm [B, Hkv, M]`` (int64): keys sorted by last-block importance inside each segment."""
        check_attention_inputs(q, k)
        batch, _, n, _ = q.shape
        kv_heads, m = k.shape[1], k.shape[2]
        seg = self.segment_size
        importance = key_importance(q, k, min(self.block_size, n), causal, backend=self.backend)
        num_segments = _ceil_div(m, seg)
        padded = torch.full(
            (batch, kv_heads, num_segments * seg), -1.0, dtype=importance.dtype, device=q.device
        )
        padded[..., :m] = importance  # padding ranks last inside the last segment
        order = torch.sort(
            padded.view(batch, kv_heads, num_segments, seg), dim=-1, descending=True, stable=True
        )
        offsets = torch.arange(num_segments, device=q.device).view(1, 1, -1, 1) * seg
        return (order.indices + offsets).reshape(batch, kv_heads, num_segments * seg)[..., :m].contiguous()

    def block_scores(self, q: Tensor, k: Tensor, key_perm: Tensor) -> Tensor:
        """Softmax-free pooled logits ``[B, H, Qb, Kb]``: mean query block . mean permuted key block / sqrt(D)."""
        batch, heads, n, dim = q.shape
        kv_heads, m = k.shape[1], k.shape[2]
        group = heads // kv_heads
        bs = self.block_size
        num_q_blocks, num_k_blocks = _ceil_div(n, bs), _ceil_div(m, bs)
        acc = _acc(q[..., :1, :1]).dtype
        full = n // bs  # whole blocks are summed in place (fp32 accumulation, no fp32 copy of Q)
        pooled_q = q[:, :, : full * bs].reshape(batch, heads, full, bs, dim).sum(3, dtype=acc)
        if n > full * bs:
            tail = q[:, :, full * bs :].sum(2, keepdim=True, dtype=acc)
            pooled_q = torch.cat([pooled_q, tail], dim=2)
        q_counts = torch.clamp(n - torch.arange(num_q_blocks, device=q.device) * bs, max=bs).to(acc)
        pooled_q = pooled_q / q_counts[:, None]
        # slot of each original key -> its block inside its segment; pool keys with a one-hot
        # matmul per segment (K is read once, never permuted)
        seg = self.segment_size
        per_seg = seg // bs
        num_segments = _ceil_div(m, seg)
        inverse = torch.empty_like(key_perm)
        inverse.scatter_(-1, key_perm, torch.arange(m, device=q.device).expand_as(key_perm))
        local_block = (inverse % seg) // bs
        compute = k.dtype if k.dtype in (torch.bfloat16, torch.float16) else pooled_q.dtype
        pad = num_segments * seg - m
        k_seg = k.to(compute)
        if pad:
            k_seg = torch.nn.functional.pad(k_seg, (0, 0, 0, pad))
            local_block = torch.nn.functional.pad(local_block, (0, pad), value=per_seg)
        onehot = local_block.view(batch, kv_heads, num_segments, 1, seg) == torch.arange(
            per_seg, device=q.device
        ).view(1, 1, 1, per_seg, 1)
        pooled_k = torch.matmul(
            onehot.to(compute), k_seg.view(batch, kv_heads, num_segments, seg, dim)
        ).reshape(batch, kv_heads, num_segments * per_seg, dim)[:, :, :num_k_blocks]
        k_counts = torch.clamp(m - torch.arange(num_k_blocks, device=q.device) * bs, max=bs)
        pooled_k = pooled_k.to(pooled_q.dtype) / k_counts[:, None].to(pooled_q.dtype)
        logits = torch.matmul(
            pooled_q.reshape(batch, kv_heads, group, num_q_blocks, dim),
            pooled_k[:, :, None].transpose(-1, -2),
        )
        return (logits * dim**-0.5).reshape(batch, heads, num_q_blocks, num_k_blocks)

    def block_structure(self, n: int, m: int, key_perm: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
        """``(allowed, forced)`` bool ``[B, Hkv, Qb, Kb]``: blocks open to selection, blocks always kept."""
        bs, seg = self.block_size, self.segment_size
        device = key_perm.device
        num_q_blocks, num_k_blocks = _ceil_div(n, bs), _ceil_div(m, bs)
        q_block = torch.arange(num_q_blocks, device=device)
        first_pos = (m - n) + q_block * bs
        last_pos = (m - n) + torch.clamp((q_block + 1) * bs, max=n) - 1
        k_segment = torch.arange(num_k_blocks, device=device) * bs // seg
        own = (k_segment[None, :] >= (first_pos // seg)[:, None]) & (
            k_segment[None, :] <= (last_pos // seg)[:, None]
        )
        if causal:
            allowed = k_segment[None, :] < (first_pos // seg)[:, None]
        else:
            allowed = ~own
        forced = own[None, None].expand(*key_perm.shape[:2], -1, -1)
        if causal:  # own-segment blocks whose keys all come after the query block are never needed
            pad = num_k_blocks * bs - m
            perm_pad = torch.nn.functional.pad(key_perm, (0, pad), value=m)
            earliest = perm_pad.reshape(*key_perm.shape[:2], num_k_blocks, bs).amin(-1)
            forced = forced & (earliest[:, :, None, :] <= last_pos[None, None, :, None])
        if self.force_first_block:
            first_block = (key_perm == 0).reshape(*key_perm.shape[:2], -1)
            first_block = torch.nn.functional.pad(first_block, (0, num_k_blocks * bs - m))
            first_block = first_block.view(*key_perm.shape[:2], num_k_blocks, bs).any(-1)
            forced = forced | first_block[:, :, None, :]
        allowed = allowed[None, None].expand_as(forced) & ~forced
        return allowed, forced

    # ----------------------------------------------------------------- public
    def estimate(self, q: Tensor, k: Tensor, causal: bool = True):
        """The kept blocks with their key permutation, as a :class:`~zoo.kernels.BlockSparseMask`."""
        from zoo.kernels import BlockSparseMask

        check_attention_inputs(q, k)
        batch, heads, n, _ = q.shape
        kv_heads, m = k.shape[1], k.shape[2]
        group = heads // kv_heads
        bs = self.block_size
        num_q_blocks, num_k_blocks = _ceil_div(n, bs), _ceil_div(m, bs)
        if m <= self.segment_size:  # one segment: nothing to permute, attend densely
            blocks = torch.ones(1, 1, num_q_blocks, num_k_blocks, dtype=torch.bool, device=q.device)
            if causal:
                first_key = torch.arange(num_k_blocks, device=q.device) * bs
                last_pos = (
                    (m - n) + torch.clamp((torch.arange(num_q_blocks, device=q.device) + 1) * bs, max=n) - 1
                )
                blocks = blocks & (first_key[None, :] <= last_pos[:, None])
            return BlockSparseMask.from_dense(blocks, bs, n, m)
        key_perm = self.key_permutation(q, k, causal)
        allowed, forced = self.block_structure(n, m, key_perm, causal)  # [B, Hkv, Qb, Kb]
        allowed, forced = allowed[:, :, None], forced[:, :, None]  # broadcast over the head group
        if self.threshold >= 1.0:
            counts, indices = _kept_lists(
                (allowed | forced).expand(-1, -1, group, -1, -1).reshape(batch, heads, num_q_blocks, -1)
            )
        else:  # softmax over the allowed blocks; rows with none give NaN, then 0
            logits = self.block_scores(q, k, key_perm)
            logits = logits.view(batch, kv_heads, group, num_q_blocks, num_k_blocks)
            scores = torch.softmax(logits.masked_fill_(~allowed, float("-inf")), dim=-1)
            scores = scores.masked_fill_(~allowed.any(-1, keepdim=True), 0.0)
            counts, indices = threshold_select(
                scores,
                allowed,
                forced,
                self.threshold,
                rule="pbs",
                backend="torch" if self.backend == "torch" else "auto",
            )
            counts = counts.view(batch, heads, num_q_blocks)
            indices = indices.view(batch, heads, num_q_blocks, num_k_blocks)
        return BlockSparseMask(bs, bs, n, m, counts, indices, key_perm=key_perm)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None
    ) -> Tensor:
        """Sparse attention ``[B, H, N, D]`` through the key permutation."""
        from zoo.kernels import block_sparse_attention

        check_attention_inputs(q, k, v)
        mask = self.estimate(q, k, causal)
        return block_sparse_attention(q, k, v, mask, causal=causal, scale=scale, backend=self.backend)
