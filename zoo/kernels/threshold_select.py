"""Cumulative-threshold block selection (XAttention, PBS-Attn) as one Triton program per row.

"XAttention: Block Sparse Attention with Antidiagonal Scoring" (Xu, Guo, Han et al., arXiv
2503.16428) and "Sparser Block-Sparse Attention via Token Permutation" (Wang et al., arXiv
2510.21270) both keep, per query block, the fewest key blocks whose scores reach a fraction
``tau`` of the row: rank the candidates by score (descending, lower block id first on ties) and
keep a candidate while the mass ranked before it is below ``tau * total``.

- ``threshold_select_reference`` is the plain PyTorch rule of each layer: one sort per row, a
  gather, a cumulative sum, a compare, and the kept ids listed in ascending order.
- ``threshold_select_triton`` holds a row in registers and sorts nothing. The kept candidates are
  "all with value > t, plus the first ties at t in id order". Non-negative fp32 values order like
  their int32 bit patterns, so ``t`` is found by bisection over the bits: 31 steps, each one
  masked row sum ``base + sum(v[bits(v) > x])`` compared with ``tau * total``. Ties at ``t`` are
  kept through an exclusive cumulative sum over the tie mask, and the kept ids are written in
  ascending order at the slots given by an inclusive cumulative sum of the keep mask.

Two rules (``rule``):

- ``"xattention"``: forced blocks rank first and their mass counts in the mass ranked before
  every other block; candidates are the allowed, non-forced blocks (zero scores included); a row
  with no forced block keeps its best candidate whatever ``tau``.
- ``"pbs"``: candidates are the allowed blocks with a positive score; forced blocks are added
  afterwards and their mass does not count.

In both, only allowed or forced blocks are kept, and ``tau >= 1`` keeps every allowed or forced
block. Scores must be non-negative (softmax masses).

Rounding: the Triton path sums the masses in another order than the reference's sorted cumulative
sum, so a row whose cut falls within fp32 rounding of ``tau * total`` may keep one block more or
one fewer than the reference. Integer-valued or well-separated scores give the same lists.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from zoo.kernels.checks import triton_interpreting

__all__ = ["kept_lists", "threshold_select", "threshold_select_reference", "threshold_select_triton"]

try:  # Triton is optional on machines without it; the reference stays available
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    triton = None
    tl = None

RULES = ("xattention", "pbs")
MAX_TRITON_BLOCKS = 8192  # widest row held in registers; wider rows run the reference
_ROW_DIMS = 4  # row dimensions the kernel decomposes a row index into


# ----------------------------------------------------------------------------- input checks
def _check_inputs(
    scores: Tensor, allowed: Tensor, forced: Tensor, tau: float | Tensor, rule: str
) -> float | Tensor:
    if (
        not isinstance(scores, Tensor)
        or scores.dim() < 1
        or scores.dtype not in (torch.float32, torch.float64)
    ):
        got = f"{scores.dtype} {tuple(scores.shape)}" if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores: expected a float32 or float64 tensor [..., Kb], got {got}")
    if scores.shape[-1] < 1:
        raise ValueError(f"scores: expected at least one key block, got shape {tuple(scores.shape)}")
    for name, mask in (("allowed", allowed), ("forced", forced)):
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(
                f"{name}: expected a bool tensor broadcastable to {tuple(scores.shape)}, got {got}"
            )
        try:
            shape = torch.broadcast_shapes(mask.shape, scores.shape)
        except RuntimeError:
            shape = None
        if shape != scores.shape:
            raise ValueError(
                f"{name}: expected a bool tensor broadcastable to {tuple(scores.shape)}, got {tuple(mask.shape)}"
            )
        if mask.device != scores.device:
            raise ValueError(f"{name}: expected device {scores.device} like scores, got {mask.device}")
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    rows = scores.shape[:-1]
    if isinstance(tau, Tensor):
        try:
            shape = torch.broadcast_shapes(tau.shape, rows)
        except RuntimeError:
            shape = None
        if not tau.is_floating_point() or shape != rows:
            raise ValueError(
                f"tau: expected a float or a float tensor broadcastable to {tuple(rows)}, "
                f"got {tau.dtype} {tuple(tau.shape)}"
            )
        if tau.device != scores.device:
            raise ValueError(f"tau: expected device {scores.device} like scores, got {tau.device}")
        if tau.device.type == "cpu" and bool(((tau < 0) | (tau > 1)).any()):  # no host sync on devices
            raise ValueError(f"tau: expected values in [0, 1], got {tau.tolist()}")
        return tau.detach()
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= float(tau) <= 1.0:
        raise ValueError(f"tau: expected a float in [0, 1] or a tensor of them, got {tau!r}")
    return float(tau)


# -------------------------------------------------------------------------------- reference
def kept_lists(keep: Tensor) -> tuple[Tensor, Tensor]:
    """bool ``[..., Kb]`` -> (int32 counts ``[...]``, int32 ascending ids ``[..., Kb]`` padded with ``Kb``).

    No sort and no host sync: a running count gives each kept block its slot; unkept blocks are
    written to a spare column that is cut off.
    """
    num_k_blocks = keep.shape[-1]
    slot = torch.cumsum(keep, dim=-1, dtype=torch.int32)
    counts = slot[..., -1].clone()
    target = slot.sub_(1).masked_fill_(~keep, num_k_blocks).long()
    ids = torch.arange(num_k_blocks, device=keep.device, dtype=torch.int32).expand_as(keep)
    listed = torch.full(
        (*keep.shape[:-1], num_k_blocks + 1), num_k_blocks, dtype=torch.int32, device=keep.device
    )
    listed.scatter_(-1, target, ids)
    return counts, listed[..., :num_k_blocks].contiguous()


def _select_xattention(scores: Tensor, allowed: Tensor, forced: Tensor, tau: float | Tensor):
    """Forced blocks first (their mass counts), then best-first; at least max(1, #forced) kept."""
    num_k_blocks = scores.shape[-1]
    if isinstance(tau, Tensor):
        tau = tau.to(scores.dtype)[..., None]
    masked = torch.where(allowed, scores, 0.0)
    # forced first (+inf), not allowed last (-1 < any score)
    priority = torch.where(forced, float("inf"), torch.where(allowed, masked, -1.0))
    sorted_priority, order = torch.sort(priority, dim=-1, descending=True, stable=True)
    sorted_scores = torch.gather(masked, -1, order)
    before = torch.cumsum(sorted_scores, dim=-1) - sorted_scores  # mass ranked before each block
    row_sum = sorted_scores.sum(-1, keepdim=True)
    position = torch.arange(num_k_blocks, device=scores.device)
    num_forced = forced.sum(-1, dtype=torch.int64, keepdim=True)
    keep_sorted = (before < tau * row_sum) | (position <= num_forced.clamp_min(1) - 1)
    keep_sorted = keep_sorted | (tau >= 1.0)
    keep_sorted = keep_sorted & (sorted_priority >= 0)
    counts = keep_sorted.sum(-1, dtype=torch.int32)
    indices = torch.sort(torch.where(keep_sorted, order, num_k_blocks), dim=-1).values
    return counts, indices.to(torch.int32)


def _select_pbs(scores: Tensor, allowed: Tensor, forced: Tensor, tau: float | Tensor):
    """Fewest positive allowed blocks, best first, reaching ``tau`` of the row; forced ones OR-ed in."""
    masked = torch.where(allowed, scores, 0.0)
    sorted_scores, order = torch.sort(masked, dim=-1, descending=True, stable=True)
    row_sum = sorted_scores.sum(dim=-1, keepdim=True)
    before = torch.cumsum(sorted_scores, dim=-1).sub_(sorted_scores)
    limit = tau.to(scores.dtype)[..., None] * row_sum if isinstance(tau, Tensor) else tau * row_sum
    keep_sorted = (before < limit) & (sorted_scores > 0)
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted) | forced
    if isinstance(tau, Tensor):
        keep = torch.where((tau >= 1.0)[..., None], allowed | forced, keep)
    elif tau >= 1.0:
        keep = allowed | forced
    return kept_lists(keep)


def threshold_select_reference(
    scores: Tensor, allowed: Tensor, forced: Tensor, tau: float | Tensor, *, rule: str
) -> tuple[Tensor, Tensor]:
    """Kept blocks per row by sorting: ``(counts int32 [...], ids int32 [..., Kb])``, see :func:`threshold_select`.

    Computes in the dtype of ``scores`` (float32 or float64).
    """
    tau = _check_inputs(scores, allowed, forced, tau, rule)
    allowed = allowed.expand(scores.shape)
    forced = forced.expand(scores.shape)
    if rule == "xattention":
        return _select_xattention(scores, allowed, forced, tau)
    return _select_pbs(scores, allowed, forced, tau)


# ----------------------------------------------------------------------------------- triton
def _threshold_select_kernel(
    SCORES,
    ALLOWED,
    FORCED,
    TAU,
    COUNTS,
    IDS,
    tau_value,
    size1,
    size2,
    size3,
    s_stride0,
    s_stride1,
    s_stride2,
    s_stride3,
    s_stride_k,
    a_stride0,
    a_stride1,
    a_stride2,
    a_stride3,
    a_stride_k,
    f_stride0,
    f_stride1,
    f_stride2,
    f_stride3,
    f_stride_k,
    t_stride0,
    t_stride1,
    t_stride2,
    t_stride3,
    num_k_blocks,
    XATTENTION_RULE: tl.constexpr,
    TAU_PER_ROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row: kept-block count and ascending ids (padded with ``num_k_blocks``)."""
    row = tl.program_id(0)
    # row index -> (i0, i1, i2, i3) over the broadcast row dimensions; masks and tau are read
    # through their own (possibly zero) strides, never expanded in memory
    i3 = (row % size3).to(tl.int64)
    rest = row // size3
    i2 = (rest % size2).to(tl.int64)
    rest = rest // size2
    i1 = (rest % size1).to(tl.int64)
    i0 = (rest // size1).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    in_row = offs < num_k_blocks
    s = tl.load(
        SCORES + i0 * s_stride0 + i1 * s_stride1 + i2 * s_stride2 + i3 * s_stride3 + offs * s_stride_k,
        mask=in_row,
        other=0.0,
    )
    allowed = (
        tl.load(
            ALLOWED + i0 * a_stride0 + i1 * a_stride1 + i2 * a_stride2 + i3 * a_stride3 + offs * a_stride_k,
            mask=in_row,
            other=0,
        )
        != 0
    )
    forced = (
        tl.load(
            FORCED + i0 * f_stride0 + i1 * f_stride1 + i2 * f_stride2 + i3 * f_stride3 + offs * f_stride_k,
            mask=in_row,
            other=0,
        )
        != 0
    )
    if TAU_PER_ROW:
        tau = tl.load(TAU + i0 * t_stride0 + i1 * t_stride1 + i2 * t_stride2 + i3 * t_stride3)
    else:
        tau = tau_value
    masked = tl.where(allowed, s, 0.0)
    target = tau * tl.sum(masked, 0)
    if XATTENTION_RULE:
        candidate = allowed & (forced == 0)
        base = tl.sum(tl.where(forced, masked, 0.0), 0)  # forced blocks rank first
    else:
        candidate = allowed & (masked > 0.0)
        base = 0.0
    values = tl.where(candidate, masked, 0.0)
    bits = values.to(tl.int32, bitcast=True)  # non-negative floats order like their bits
    # smallest bit pattern x with base + (mass of candidates above x) < target; the mass only
    # shrinks as x grows. hi starts above +inf (mass = base), lo below 0.
    lo = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), 0) - 1
    hi = lo + 0x7F800002
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        above = base + tl.sum(tl.where(bits > mid, values, 0.0), 0)
        open_gap = hi - lo > 1
        fits = above < target
        hi = tl.where(open_gap & fits, mid, hi)
        lo = tl.where(open_gap & (fits == 0), mid, lo)
    # candidates above the cut value are kept; ties at it in id order while the mass before fits
    above = base + tl.sum(tl.where(bits > hi, values, 0.0), 0)
    tie = candidate & (bits == hi)
    tie_values = tl.where(tie, values, 0.0)
    tie_before = tl.cumsum(tie_values, 0) - tie_values
    keep = (candidate & (bits > hi)) | (tie & (above + tie_before < target))
    if XATTENTION_RULE:  # a row with no forced block keeps at least its best candidate
        num_forced = tl.sum(forced.to(tl.int32), 0)
        best = tl.max(tl.where(candidate, values, -1.0), 0)
        first_best = tl.min(tl.where(candidate & (values == best), offs, BLOCK), 0)
        keep = keep | ((offs == first_best) & (num_forced == 0))
    keep = keep | forced
    keep = tl.where(tau >= 1.0, allowed | forced, keep) & in_row
    keep_int = keep.to(tl.int32)
    count = tl.sum(keep_int, 0)
    slot = tl.cumsum(keep_int, 0) - 1
    ids_row = IDS + row.to(tl.int64) * num_k_blocks
    tl.store(ids_row + offs, tl.full([BLOCK], 0, tl.int32) + num_k_blocks, mask=in_row & (offs >= count))
    tl.store(ids_row + slot, offs, mask=keep)
    tl.store(COUNTS + row, count)


_KERNELS: dict[bool, Any] = {}


def _kernel() -> Any:
    interpret = triton_interpreting()
    if interpret not in _KERNELS:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            _KERNELS[interpret] = InterpretedFunction(_threshold_select_kernel)
        else:
            from triton.runtime.jit import JITFunction

            _KERNELS[interpret] = JITFunction(_threshold_select_kernel)
    return _KERNELS[interpret]


def threshold_select_triton(
    scores: Tensor, allowed: Tensor, forced: Tensor, tau: float | Tensor, *, rule: str
) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`threshold_select_reference`, one Triton program per row.

    ``scores`` must be a float32 CUDA tensor (or any device under ``TRITON_INTERPRET=1``) with at
    most :data:`MAX_TRITON_BLOCKS` key blocks; masks and ``tau`` are read through their broadcast
    strides (no copies).
    """
    if triton is None:
        raise RuntimeError("threshold_select_triton: Triton is not installed")
    tau = _check_inputs(scores, allowed, forced, tau, rule)
    if not scores.is_cuda and not triton_interpreting():
        raise ValueError(
            f"scores: the Triton kernel needs a CUDA tensor (or TRITON_INTERPRET=1), got {scores.device}"
        )
    if scores.dtype != torch.float32:
        raise ValueError(f"scores: the Triton kernel needs float32, got {scores.dtype}")
    num_k_blocks = scores.shape[-1]
    if num_k_blocks > MAX_TRITON_BLOCKS:
        raise ValueError(
            f"scores: the Triton kernel holds at most {MAX_TRITON_BLOCKS} key blocks, got {num_k_blocks}"
        )
    rows = scores.shape[:-1]
    if len(rows) > _ROW_DIMS:  # fold the leading row dims (copies only where strides forbid a view)
        lead = (-1, *rows[len(rows) - _ROW_DIMS + 1 :], num_k_blocks)
        scores = scores.reshape(lead)
        allowed = allowed.expand(rows + (num_k_blocks,)).reshape(lead)
        forced = forced.expand(rows + (num_k_blocks,)).reshape(lead)
        if isinstance(tau, Tensor):
            tau = tau.expand(rows).reshape(lead[:-1])
    shape5 = torch.Size((1,) * (_ROW_DIMS + 1 - scores.dim()) + tuple(scores.shape))
    scores5 = scores.expand(shape5)  # leading dims of size 1 added as views
    allowed5 = allowed.view(torch.uint8).expand(shape5)
    forced5 = forced.view(torch.uint8).expand(shape5)
    if isinstance(tau, Tensor):
        tau_rows, tau_value, per_row = tau.float().expand(shape5[:-1]), 0.0, True
    else:
        tau_rows, tau_value, per_row = scores5[..., 0], tau, False
    num_rows = shape5[:-1].numel()
    counts = torch.empty(rows, dtype=torch.int32, device=scores.device)
    ids = torch.empty(*rows, num_k_blocks, dtype=torch.int32, device=scores.device)
    if num_rows == 0:
        return counts, ids
    block = max(16, triton.next_power_of_2(num_k_blocks))
    launch: dict[str, Any] = {} if triton_interpreting() else {"num_warps": max(1, min(16, block // 256))}
    _kernel()[(num_rows,)](
        scores5,
        allowed5,
        forced5,
        tau_rows,
        counts,
        ids,
        tau_value,
        shape5[1],
        shape5[2],
        shape5[3],
        *scores5.stride(),
        *allowed5.stride(),
        *forced5.stride(),
        *tau_rows.stride(),
        num_k_blocks,
        XATTENTION_RULE=rule == "xattention",
        TAU_PER_ROW=per_row,
        BLOCK=block,
        **launch,
    )
    return counts, ids


# --------------------------------------------------------------------------------- dispatch
def threshold_select(
    scores: Tensor,
    allowed: Tensor,
    forced: Tensor,
    tau: float | Tensor,
    *,
    rule: str,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Cumulative-threshold block selection per row: ``(counts int32 [...], ids int32 [..., Kb])``.

    Parameters
    ----------
    scores:
        Non-negative block scores, float32 (float64 on the PyTorch path) ``[..., Kb]``; every
        dimension but the last is a row.
    allowed, forced:
        bool, broadcastable to ``scores``: blocks open to selection, blocks always kept.
    tau:
        Mass fraction in ``[0, 1]``: a float, or a float tensor broadcastable to ``scores.shape[:-1]``
        (e.g. one value per head). Tensor values are range-checked only on the CPU (no host sync).
    rule:
        ``"xattention"`` or ``"pbs"`` (see the module docstring).
    backend:
        ``"auto"`` (Triton for float32 CUDA scores when Triton is importable, else PyTorch),
        ``"triton"`` or ``"torch"``. Rows wider than :data:`MAX_TRITON_BLOCKS` always run PyTorch.

    Returns
    -------
    ``counts`` (how many blocks each row keeps) and ``ids`` (the kept block ids in ascending
    order, padded with ``Kb``): the list format of :class:`~zoo.kernels.BlockSparseMask`.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
    if isinstance(scores, Tensor) and scores.dim() >= 1 and scores.shape[-1] > MAX_TRITON_BLOCKS:
        backend = "torch"
    if backend == "auto":
        usable = triton is not None and isinstance(scores, Tensor) and scores.dtype == torch.float32
        backend = "triton" if usable and scores.is_cuda else "torch"
    if backend == "triton":
        return threshold_select_triton(scores, allowed, forced, tau, rule=rule)
    return threshold_select_reference(scores, allowed, forced, tau, rule=rule)
