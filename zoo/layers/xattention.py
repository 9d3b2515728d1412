"""XAttention: block-sparse prefill chosen by antidiagonal scores.

"XAttention: Block Sparse Attention with Antidiagonal Scoring" (Xu, Guo, Han et al.,
arXiv 2503.16428).

Algorithm:

1. Score every (query block, key block) pair by the softmax attention mass on the antidiagonals
   of its ``S x S`` cells (stride ``S``, 8 by default, 16 supported): queries taken in reversed
   strided order and keys in strided order, concatenated along features, so one matmul sums each
   cell's antidiagonal; scale ``1/sqrt(D)/S``; causal mask; softmax over keys; sum into blocks
   (:mod:`zoo.kernels.antidiagonal`, a Triton kernel chunked over queries).
2. Keep, per query block, the fewest key blocks whose scores reach a fraction ``tau`` of the
   row (``threshold``, 0.9 by default; a tensor ``[H]`` gives one tau per head). The first key
   block and the diagonal block are always kept; a head with ``tau >= 1`` keeps every reachable
   block. On the device, with no host synchronisation (:meth:`XAttention.select`,
   :mod:`zoo.kernels.threshold_select`): on CUDA one Triton program per row finds the cut by
   bisection over the fp32 bit patterns; elsewhere one sort per row and a cumulative sum.
3. Run block-sparse attention on the kept blocks (:func:`zoo.kernels.block_sparse_attention`).

Beyond the upstream code: batch > 1, grouped-query attention without repeated K/V, block sizes
64 and 128 (any multiple of the stride), non-causal attention, queries that are the last ``N`` of
``M`` positions (chunked prefill), and any GPU that runs Triton. Not in the paper, off by default:
``local_blocks`` also forces the key blocks just before each diagonal block. A block's score is
summed over all its queries, so the previous key block, which holds the recent context of the
block's first queries, can be dropped; on small LMs that is where most of the perplexity goes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["XAttention", "check_attention_inputs"]


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor | None = None) -> None:
    """Validate ``q [B, H, N, D]``, ``k/v [B, Hkv, M, D]`` with ``H % Hkv == 0`` and ``N <= M``.

    Raises ``ValueError`` naming the argument, what was expected and what came.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.dim() != 4 or not t.is_floating_point():
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a float tensor [B, H, N, D], got {got}")
    b, h, n, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k: expected [B={b}, Hkv, M, D={d}], got {tuple(k.shape)}")
    if k.shape[1] < 1 or h % k.shape[1]:
        raise ValueError(f"k: expected a number of heads dividing q's H={h}, got Hkv={k.shape[1]}")
    if n < 1 or n > k.shape[2]:
        raise ValueError(f"q: expected 1 <= N <= M={k.shape[2]} queries (the last N positions), got N={n}")
    if v is not None and tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(f"v: expected [B, Hkv, M] = {tuple(k.shape[:3])} like k, got {tuple(v.shape)}")
    if k.device != q.device or (v is not None and v.device != q.device):
        raise ValueError(f"k/v: expected device {q.device} like q, got {k.device}")


def _check_threshold(threshold: float | Tensor) -> float | Tensor:
    if isinstance(threshold, Tensor):
        if threshold.dim() != 1 or not threshold.is_floating_point():
            raise ValueError(
                f"threshold: expected a float or a float tensor [H], got {threshold.dtype} {tuple(threshold.shape)}"
            )
        if bool(((threshold < 0) | (threshold > 1)).any()):
            raise ValueError(f"threshold: expected values in [0, 1], got {threshold.tolist()}")
        return threshold.detach().float()
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not 0.0 <= float(threshold) <= 1.0
    ):
        raise ValueError(f"threshold: expected a float in [0, 1] or a tensor [H], got {threshold!r}")
    return float(threshold)


class XAttention(nn.Module):
    """XAttention sparse prefill: antidiagonal block scoring + cumulative-threshold selection.

    Parameters
    ----------
    block_size:
        Query and key block size (64 or 128 are the kernel's natural sizes; any multiple of
        ``stride`` works).
    stride:
        Antidiagonal stride ``S`` (8 by default; 16 supported).
    threshold:
        Cumulative attention-mass fraction ``tau`` in ``[0, 1]``, or a tensor ``[H]`` (one per
        query head). ``tau >= 1`` keeps every reachable block (dense attention).
    backend:
        ``"auto"`` (Triton on CUDA, PyTorch on CPU), ``"triton"`` or ``"torch"``; used for the
        scoring and for the attention kernel.
    chunk_elements:
        Memory bound of the scoring (elements of partial sums per query chunk).
    local_blocks:
        With causal attention, also force the ``local_blocks`` key blocks before each diagonal
        block (0, the paper's rule, by default; see the module docstring).
    """

    def __init__(
        self,
        block_size: int = 128,
        stride: int = 8,
        threshold: float | Tensor = 0.9,
        *,
        backend: str = "auto",
        chunk_elements: int = 1 << 26,
        local_blocks: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1 or block_size % stride:
            raise ValueError(
                f"stride: expected a positive int dividing block_size={block_size}, got {stride!r}"
            )
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
        if isinstance(local_blocks, bool) or not isinstance(local_blocks, int) or local_blocks < 0:
            raise ValueError(f"local_blocks: expected an int >= 0, got {local_blocks!r}")
        self.local_blocks = local_blocks
        self.block_size = block_size
        self.stride = stride
        self.threshold = _check_threshold(threshold)
        self.backend = backend
        self.chunk_elements = int(chunk_elements)
        self._tau_cache: dict[tuple[str, int], Tensor] = {}

    def extra_repr(self) -> str:
        tau = self.threshold if isinstance(self.threshold, float) else f"tensor{tuple(self.threshold.shape)}"
        local = f", local_blocks={self.local_blocks}" if self.local_blocks else ""
        return f"block_size={self.block_size}, stride={self.stride}, threshold={tau}{local}"

    def block_scores(self, q: Tensor, k: Tensor, causal: bool = True) -> Tensor:
        """Antidiagonal block scores ``[B, H, Qb, Kb]`` (each query block's row sums to its strided query count)."""
        from zoo.kernels.antidiagonal import antidiagonal_block_scores

        check_attention_inputs(q, k)
        return antidiagonal_block_scores(
            q,
            k,
            self.block_size,
            self.stride,
            causal=causal,
            backend=self.backend,
            chunk_elements=self.chunk_elements,
        )

    def _threshold_on(self, device: torch.device, heads: int) -> Tensor:
        """``tau`` as fp32 ``[1, H or 1, 1, 1]`` on ``device``, copied there once (no sync per call)."""
        tau = self.threshold
        if isinstance(tau, Tensor) and tau.shape[0] != heads:
            raise ValueError(f"threshold: expected one value per query head, H={heads}, got {tau.shape[0]}")
        key = (str(device), heads)
        cached = self._tau_cache.get(key)
        if cached is None:
            value = tau if isinstance(tau, Tensor) else torch.tensor([tau])
            cached = value.float().view(1, -1, 1, 1).to(device)
            self._tau_cache[key] = cached
        return cached

    def select(self, scores: Tensor, q_len: int, kv_len: int, causal: bool = True):
        """Cumulative-threshold selection over block scores ``[B, H, Qb, Kb]``, on the device.

        Per row: forced blocks (with ``causal``: the first key block, the diagonal blocks and the
        ``local_blocks`` before them) rank first, then the others by score, descending (ties by block id); keep the fewest
        leading blocks whose scores reach ``tau`` times the row's total over the reachable
        blocks (at least one); ``tau >= 1`` keeps every reachable block. Runs
        :func:`~zoo.kernels.threshold_select.threshold_select` (rule ``"xattention"``; Triton on
        CUDA unless ``backend="torch"``). No Python loop over rows and no host synchronisation:
        the index lists are ``Kb`` wide, ``kv_num_blocks`` says how many entries are valid.
        """
        from zoo.kernels import BlockSparseMask
        from zoo.kernels.block_mask import _diagonal_blocks, causal_reachable_blocks
        from zoo.kernels.threshold_select import threshold_select

        batch, heads, num_q_blocks, num_k_blocks = scores.shape
        bs = self.block_size
        device = scores.device
        scores = scores.float()
        if causal:
            allowed = causal_reachable_blocks(q_len, kv_len, bs, bs, device)
            diagonal = _diagonal_blocks(q_len, kv_len, bs, bs, device)
            forced = diagonal.clone()
            for shift in range(1, min(self.local_blocks, num_k_blocks - 1) + 1):
                forced[:, :-shift] |= diagonal[:, shift:]
            forced &= allowed
            forced[:, 0] = allowed[:, 0]
        else:
            allowed = torch.ones(num_q_blocks, num_k_blocks, dtype=torch.bool, device=device)
            forced = torch.zeros_like(allowed)
        tau = self.threshold
        if isinstance(tau, Tensor):
            tau = self._threshold_on(device, heads).view(1, heads, 1)
        counts, indices = threshold_select(
            scores,
            allowed,
            forced,
            tau,
            rule="xattention",
            backend="torch" if self.backend == "torch" else "auto",
        )
        return BlockSparseMask(bs, bs, q_len, kv_len, counts, indices)

    def estimate(self, q: Tensor, k: Tensor, causal: bool = True):
        """The kept blocks as a :class:`~zoo.kernels.BlockSparseMask` (``[B, H, Qb, Kb]`` lists)."""
        if isinstance(self.threshold, Tensor) and self.threshold.shape[0] != q.shape[1]:
            raise ValueError(
                f"threshold: expected one value per query head, H={q.shape[1]}, got {self.threshold.shape[0]}"
            )
        scores = self.block_scores(q, k, causal)
        return self.select(scores, q.shape[2], k.shape[2], causal)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None
    ) -> Tensor:
        """Sparse attention ``[B, H, N, D]`` over the estimated blocks."""
        from zoo.kernels import block_sparse_attention

        check_attention_inputs(q, k, v)
        mask = self.estimate(q, k, causal)
        return block_sparse_attention(q, k, v, mask, causal=causal, scale=scale, backend=self.backend)
