"""Combiner: full attention support at sub-quadratic cost through structured factorization.

Paper: Hongyu Ren, Hanjun Dai, Zihang Dai, Mengjiao Yang, Jure Leskovec, Dale Schuurmans, Bo Dai,
"Combiner: Full Attention Transformer with Sparse Computation Cost", NeurIPS 2021, arXiv 2107.05768.

Algorithm. Each query i splits the keys it may see into a *direct* set, attended exactly, and a
few *regions*. A region r enters the softmax as one logit against a pooled key (the max-pool of
the region's keys) and contributes one value: the region's own attention summary, i.e. the
attention of the max-pooled query of the region over the region's keys and values, shared by
every query that sees the region. Direct and region logits share one softmax, so every visible
key gets probability (full support) while each query computes only |direct| + #regions logits.

Variants (L = ``segment_len``, default ~sqrt(N)):

- ``fixed``:     direct = own segment of L tokens (causal prefix); regions = every earlier
                 segment (all other segments when not causal). O(N sqrt N).
- ``logsparse``: direct = the token itself; regions = the binary (Fenwick) decomposition of the
                 prefix [0, i): for each level l with bit l of i set, the aligned block of 2^l
                 tokens just before; not causal: the same on the reversed sequence. O(N log N).
- ``axial``:     row-major grid of rows of L tokens; direct = own row (causal prefix); regions =
                 each earlier row r seen from the query's column c: its key and value are the
                 row-r attention summary computed by the query at (r, c) (weighted sums of the
                 row's keys and values; a short last row is summarised by its last query). O(N sqrt N).
- ``mixture``:   (causal) grid; direct = own row prefix and own column above; regions = every
                 other column above (column t, rows < s), and for each earlier row its parts
                 left and right of the query's column. Regions overlap: a mixture of two
                 factorizations in one softmax. O(N sqrt N).

``combiner_attention_reference`` builds the same direct sets and regions explicitly, one query
at a time, in fp64: the ground truth of the tests.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.layers.checks import check_qkv

__all__ = ["CombinerAttention", "combiner_attention", "combiner_attention_reference", "combiner_regions"]

Variant = Literal["fixed", "logsparse", "axial", "mixture"]
VARIANTS = ("fixed", "logsparse", "axial", "mixture")


def _check_options(variant: str, segment_len: int | None, causal: bool, fn: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"{fn}: variant must be one of {VARIANTS}, got {variant!r}")
    if segment_len is not None and (not isinstance(segment_len, int) or segment_len < 1):
        raise ValueError(f"{fn}: segment_len must be a positive int or None, got {segment_len!r}")
    if variant == "mixture" and not causal:
        raise ValueError(f"{fn}: variant 'mixture' is defined for causal=True only, got causal=False")


def default_segment_len(n: int) -> int:
    """~sqrt(N), at least 1."""
    return max(1, int(round(math.sqrt(n))))


# ----------------------------------------------------------------------------- reference
def combiner_regions(
    n: int, variant: Variant, segment_len: int | None = None, causal: bool = True
) -> list[tuple[list[int], list[tuple[list[int], int | None]]]]:
    """Per query: (direct key positions, regions), a region being (key positions, summary query).

    The summary query is ``None`` for a max-pooled query over the region, else the position whose
    query summarises the region (axial). Plain Python; the definition the tests compare against.
    """
    _check_options(variant, segment_len, causal, "combiner_regions")
    L = default_segment_len(n) if segment_len is None else segment_len
    out = []
    for i in range(n):
        direct: list[int] = []
        regions: list[tuple[list[int], int | None]] = []
        if variant == "fixed":
            seg = i // L
            direct = [j for j in range(seg * L, min(n, seg * L + L)) if (j <= i or not causal)]
            for s in range(math.ceil(n / L)):
                if s == seg or (causal and s > seg):
                    continue
                regions.append((list(range(s * L, min(n, s * L + L))), None))
        elif variant == "logsparse":
            direct = [i]
            for mirrored in (False, True) if not causal else (False,):
                pos = n - 1 - i if mirrored else i
                level = 0
                while (1 << level) <= pos:
                    b = pos >> level
                    if b % 2 == 1:
                        block = list(range((b - 1) << level, b << level))
                        if mirrored:
                            block = sorted(n - 1 - p for p in block)
                        regions.append((block, None))
                    level += 1
        elif variant == "axial":
            row, col = divmod(i, L)
            direct = [j for j in range(row * L, min(n, row * L + L)) if (j <= i or not causal)]
            for r in range(math.ceil(n / L)):
                if r == row or (causal and r > row):
                    continue
                p = min(r * L + col, n - 1)  # a short last row is seen through its last token
                regions.append((list(range(r * L, min(n, r * L + L))), p))
        else:  # mixture, causal
            s, c = divmod(i, L)
            direct = [s * L + t for t in range(c + 1)] + [r * L + c for r in range(s)]
            if s >= 1:
                for t in range(L):
                    if t != c:
                        regions.append(([r * L + t for r in range(s)], None))
                for r in range(s):
                    if c >= 1:
                        regions.append(([r * L + t for t in range(c)], None))
                    if c < L - 1:
                        regions.append(([r * L + t for t in range(c + 1, L)], None))
        out.append((direct, regions))
    return out


def combiner_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    variant: Variant = "fixed",
    segment_len: int | None = None,
    causal: bool = True,
    scale: float | None = None,
) -> Tensor:
    """One query at a time in fp64 from ``combiner_regions``; small N only."""
    H, Hkv, N = check_qkv(q, k, v, "combiner_attention_reference")
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    q64 = q.double()
    k64 = k.double().repeat_interleave(H // Hkv, 1)
    v64 = v.double().repeat_interleave(H // Hkv, 1)
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64, device=q.device)
    for i, (direct, regions) in enumerate(combiner_regions(N, variant, segment_len, causal)):
        qi = q64[:, :, i]  # (B, H, D)
        logits = [scale * (qi.unsqueeze(2) * k64[:, :, direct]).sum(-1)]
        values = [v64[:, :, direct]]
        for keys, summary_pos in regions:
            kr, vr = k64[:, :, keys], v64[:, :, keys]
            sq = q64[:, :, keys].amax(2) if summary_pos is None else q64[:, :, summary_pos]
            p = torch.softmax(scale * (sq.unsqueeze(2) * kr).sum(-1), -1).unsqueeze(-1)
            region_key = kr.amax(2) if summary_pos is None else (p * kr).sum(2)
            logits.append(scale * (qi * region_key).sum(-1, keepdim=True))
            values.append((p * vr).sum(2, keepdim=True))
        weights = torch.softmax(torch.cat(logits, -1), -1).unsqueeze(-1)
        out[:, :, i] = (weights * torch.cat(values, 2)).sum(2)
    return out


# ----------------------------------------------------------------------------- fast path helpers
def _masked_softmax(scores: Tensor, keep: Tensor) -> Tensor:
    """Softmax over the last dim restricted to ``keep``; all-masked rows give zeros."""
    scores = scores.masked_fill(~keep, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(scores - top) * keep
    return w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def _exclusive_cummax(x: Tensor, dim: int, reverse: bool = False) -> Tensor:
    """max over strictly earlier (later if reverse) entries along dim; the first entry gets 0 (masked by callers)."""
    if reverse:
        x = x.flip(dim)
    running = torch.cummax(x, dim=dim).values
    shifted = torch.cat(
        [torch.zeros_like(running.narrow(dim, 0, 1)), running.narrow(dim, 0, x.shape[dim] - 1)], dim
    )
    return shifted.flip(dim) if reverse else shifted


def _pad_to(x: Tensor, n: int) -> Tensor:
    return F.pad(x, (0, 0, 0, n - x.shape[-2])) if x.shape[-2] < n else x


def _joint(parts: list) -> Tensor:
    """One softmax across several (logits, keep, value-applier) groups; returns the summed output."""
    logits = torch.cat([lg.masked_fill(~kp, float("-inf")) for lg, kp, _ in parts], -1)
    top = logits.amax(-1, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(logits - top)
    w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    out = 0
    start = 0
    for lg, _, apply in parts:
        n = lg.shape[-1]
        out = out + apply(w[..., start : start + n])
        start += n
    return out


def _segment_attention_kernel(qg: Tensor, k: Tensor, v: Tensor, L: int, causal: bool, scale: float):
    """Attention inside each segment of L tokens through the block-sparse kernel (a block-diagonal
    mask): output and log-normaliser, shaped (.., S, L, D) and (.., S, L, 1) like the grouped layout."""
    from zoo.kernels import BlockSparseMask, block_sparse_attention

    B, Hkv, G, N, D = qg.shape
    S = math.ceil(N / L)
    blocks = torch.eye(S, dtype=torch.bool, device=qg.device).view(1, 1, S, S)
    mask = BlockSparseMask.from_dense(blocks, L, N, N)
    out, lse = block_sparse_attention(
        qg.reshape(B, Hkv * G, N, D),
        k.squeeze(2),
        v.squeeze(2),
        mask,
        causal=causal,
        scale=scale,
        return_lse=True,
    )
    out = _pad_to(out.to(qg.dtype).reshape(B, Hkv, G, N, -1), S * L).unflatten(-2, (S, L))
    lse = F.pad(lse.to(qg.dtype).reshape(B, Hkv, G, N), (0, S * L - N)).unflatten(-1, (S, L)).unsqueeze(-1)
    return out, lse


def _fixed(
    qg: Tensor, k: Tensor, v: Tensor, L: int, causal: bool, scale: float, kernel: bool = False
) -> Tensor:
    N = qg.shape[-2]
    S = math.ceil(N / L)
    valid = torch.arange(S * L, device=qg.device) < N
    qs = _pad_to(qg, S * L).unflatten(-2, (S, L))  # (.., S, L, D)
    ks = _pad_to(k, S * L).unflatten(-2, (S, L))
    vs = _pad_to(v, S * L).unflatten(-2, (S, L))
    vmask = valid.view(S, L)
    neg = torch.finfo(qs.dtype).min
    # pooled query and key per segment, and the segment's own summary value
    q_pool = qs.masked_fill(~vmask[:, :, None], neg).amax(-2)  # (.., S, D)
    k_pool = ks.masked_fill(~vmask[:, :, None], neg).amax(-2)
    p = _masked_softmax(scale * (q_pool.unsqueeze(-2) @ ks.transpose(-1, -2)).squeeze(-2), vmask)
    summary = (p.unsqueeze(-2) @ vs).squeeze(-2)  # (.., S, D)
    region = scale * qs @ k_pool.unsqueeze(-4).transpose(-1, -2)  # (.., S, L, S)
    seg = torch.arange(S, device=qg.device)
    region_keep = (seg[None, :] < seg[:, None]) if causal else (seg[None, :] != seg[:, None])
    region_keep = region_keep[:, None, :].expand(S, L, S)
    out = _joint([_direct_part(qs, ks, vs, vmask, qg, k, v, L, causal, scale, kernel),
                  (region, region_keep, lambda w: w @ summary.unsqueeze(-3))])  # fmt: skip
    return out.flatten(-3, -2)[..., :N, :]


def _direct_part(qs, ks, vs, vmask, qg, k, v, L: int, causal: bool, scale: float, kernel: bool):
    """The exact attention inside the query's own segment / row, as one ``_joint`` group.

    Torch: its L logits. Kernel (inference): one pseudo-logit, the segment's log-normaliser, whose
    weight multiplies the kernel's normalised segment output (the lse is not differentiable there).
    """
    S = qs.shape[-3]
    if kernel:
        out, lse = _segment_attention_kernel(qg, k, v, L, causal, scale)
        return (lse, torch.ones(S, L, 1, dtype=torch.bool, device=qs.device), lambda w: w * out)
    local = scale * qs @ ks.transpose(-1, -2)  # (.., S, L, L)
    pos = torch.arange(L, device=qs.device)
    keep = vmask[:, None, :].expand(S, L, L)
    if causal:
        keep = keep & (pos[None, :] <= pos[:, None])
    return (local, keep, lambda w: w @ vs)


def _logsparse_levels(qg: Tensor, k: Tensor, v: Tensor, scale: float, with_self: bool):
    """Causal binary decomposition: list of (logits (.., N, 1), keep (N, 1), values (.., N, D))."""
    N = qg.shape[-2]
    pos = torch.arange(N, device=qg.device)
    parts = []
    if with_self:
        parts.append(
            (
                (scale * (qg * k).sum(-1, keepdim=True)),
                torch.ones(N, 1, dtype=torch.bool, device=qg.device),
                v,
            )
        )
    level = 0
    while (1 << level) <= N - 1:
        size = 1 << level
        nb = N >> level
        qb = qg[..., : nb * size, :].unflatten(-2, (nb, size))
        kb = k[..., : nb * size, :].unflatten(-2, (nb, size))
        vb = v[..., : nb * size, :].unflatten(-2, (nb, size))
        q_pool, k_pool = qb.amax(-2), kb.amax(-2)  # (.., nb, D)
        p = torch.softmax(scale * (q_pool.unsqueeze(-2) @ kb.transpose(-1, -2)).squeeze(-2), -1)
        summary = (p.unsqueeze(-2) @ vb).squeeze(-2)
        block = pos >> level
        keep = (block % 2 == 1).unsqueeze(-1)
        idx = (block - 1).clamp(0, nb - 1)
        k_sel = k_pool.index_select(-2, idx)
        v_sel = summary.index_select(-2, idx)
        parts.append((scale * (qg * k_sel).sum(-1, keepdim=True), keep, v_sel))
        level += 1
    return parts


def _logsparse(qg: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tensor:
    parts = _logsparse_levels(qg, k, v, scale, with_self=True)
    if not causal:
        flipped = _logsparse_levels(qg.flip(-2), k.flip(-2), v.flip(-2), scale, with_self=False)
        parts += [(lg.flip(-2), kp.flip(0), vv.flip(-2)) for lg, kp, vv in flipped]
    logits = torch.cat(
        [lg.expand(*qg.shape[:-1], 1).masked_fill(~kp, float("-inf")) for lg, kp, _ in parts], -1
    )
    w = torch.softmax(logits, -1)
    values = torch.stack([vv.expand(*qg.shape[:-1], v.shape[-1]) for _, _, vv in parts], -2)  # (.., N, P, D)
    return (w.unsqueeze(-2) @ values).squeeze(-2)


def _axial(
    qg: Tensor, k: Tensor, v: Tensor, L: int, causal: bool, scale: float, kernel: bool = False
) -> Tensor:
    N = qg.shape[-2]
    S = math.ceil(N / L)
    vmask = (torch.arange(S * L, device=qg.device) < N).view(S, L)
    qs = _pad_to(qg, S * L).unflatten(-2, (S, L))
    ks = _pad_to(k, S * L).unflatten(-2, (S, L))
    vs = _pad_to(v, S * L).unflatten(-2, (S, L))
    # summaries of a short last row are taken by its last real query
    q_summary = torch.where(vmask.view(S * L, 1), _pad_to(qg, S * L), qg[..., N - 1 : N, :]).unflatten(
        -2, (S, L)
    )
    row_p = _masked_softmax(scale * q_summary @ ks.transpose(-1, -2), vmask[:, None, :].expand(S, L, L))
    key_summary = row_p @ ks  # (.., S, L, D): row r seen from column c
    val_summary = row_p @ vs
    # query (s, c) against region (r, c): einsum over the shared column
    glob = scale * torch.einsum("...scd,...rcd->...scr", qs, key_summary)
    rows = torch.arange(S, device=qg.device)
    row_keep = (rows[None, :] < rows[:, None]) if causal else (rows[None, :] != rows[:, None])
    glob_keep = row_keep[:, None, :].expand(S, L, S)
    out = _joint([_direct_part(qs, ks, vs, vmask, qg, k, v, L, causal, scale, kernel),
                  (glob, glob_keep, lambda w: torch.einsum("...scr,...rcd->...scd", w, val_summary))])  # fmt: skip
    return out.flatten(-3, -2)[..., :N, :]


def _mixture(qg: Tensor, k: Tensor, v: Tensor, L: int, scale: float) -> Tensor:
    N = qg.shape[-2]
    S = math.ceil(N / L)
    dev = qg.device
    qs = _pad_to(qg, S * L).unflatten(-2, (S, L))
    ks = _pad_to(k, S * L).unflatten(-2, (S, L))
    vs = _pad_to(v, S * L).unflatten(-2, (S, L))
    rows = torch.arange(S, device=dev)
    cols = torch.arange(L, device=dev)
    row_before = rows[None, :] < rows[:, None]  # (s, r): r < s
    col_upto = cols[None, :] <= cols[:, None]  # (c, t): t <= c
    # direct: own row prefix, own column above
    row_direct = scale * qs @ ks.transpose(-1, -2)  # (.., S, L(c), L(t))
    row_direct_keep = col_upto[None].expand(S, L, L)
    col_direct = scale * torch.einsum("...scd,...rcd->...scr", qs, ks)  # (.., S, L, S)
    col_direct_keep = row_before[:, None, :].expand(S, L, S)
    # (a) column t above row s: pooled over rows < s
    q_col = _exclusive_cummax(qs, dim=-3)  # (.., S, L, D) at (s, t)
    k_col = _exclusive_cummax(ks, dim=-3)
    col_scores = scale * torch.einsum("...std,...rtd->...str", q_col, ks)  # (.., S, L, S)
    col_p = _masked_softmax(col_scores, row_before[:, None, :].expand(S, L, S))
    col_summary = torch.einsum("...str,...rtd->...std", col_p, vs)
    col_region = scale * qs @ k_col.transpose(-1, -2)  # (.., S, L(c), L(t))
    col_region_keep = (rows >= 1)[:, None, None] & (cols[None, :] != cols[:, None])[None]
    # (b), (c) earlier rows, left / right of the query's column
    q_left, k_left = _exclusive_cummax(qs, dim=-2), _exclusive_cummax(ks, dim=-2)  # (.., S, L, D) at (r, c)
    q_right, k_right = (
        _exclusive_cummax(qs, dim=-2, reverse=True),
        _exclusive_cummax(ks, dim=-2, reverse=True),
    )
    left_p = _masked_softmax(
        scale * q_left @ ks.transpose(-1, -2), (cols[None, :] < cols[:, None])[None].expand(S, L, L)
    )
    right_p = _masked_softmax(
        scale * q_right @ ks.transpose(-1, -2), (cols[None, :] > cols[:, None])[None].expand(S, L, L)
    )
    left_summary, right_summary = left_p @ vs, right_p @ vs
    left_logits = scale * torch.einsum("...scd,...rcd->...scr", qs, k_left)
    right_logits = scale * torch.einsum("...scd,...rcd->...scr", qs, k_right)
    left_keep = row_before[:, None, :] & (cols >= 1)[None, :, None]
    right_keep = row_before[:, None, :] & (cols < L - 1)[None, :, None]
    out = _joint(
        [
            (row_direct, row_direct_keep, lambda w: w @ vs),
            (col_direct, col_direct_keep, lambda w: torch.einsum("...scr,...rcd->...scd", w, vs)),
            (col_region, col_region_keep, lambda w: w @ col_summary),
            (left_logits, left_keep, lambda w: torch.einsum("...scr,...rcd->...scd", w, left_summary)),
            (right_logits, right_keep, lambda w: torch.einsum("...scr,...rcd->...scd", w, right_summary)),
        ]
    )
    return out.flatten(-3, -2)[..., :N, :]


def combiner_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    variant: Variant = "fixed",
    segment_len: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Combiner attention on (B, H, N, D) q and (B, Hkv, N, D) k, v; returns (B, H, N, Dv) in q's dtype.

    ``backend``: the exact attention inside a segment (Fixed) or row (Axial) goes through the
    block-sparse kernel (``zoo.kernels.block_sparse_attention``, a block-diagonal mask) with
    ``"kernel"``, or as plain matrix products with ``"torch"``; ``"auto"`` takes the kernel on CUDA
    for inference (no gradient needed, segment length a multiple of 16), since the kernel's
    log-normaliser carries no gradient.
    """
    fn = "combiner_attention"
    H, Hkv, N = check_qkv(q, k, v, fn)
    _check_options(variant, segment_len, causal, fn)
    if backend not in ("auto", "kernel", "torch"):
        raise ValueError(f"{fn}: backend must be 'auto', 'kernel' or 'torch', got {backend!r}")
    L = default_segment_len(N) if segment_len is None else segment_len
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, _, _, D = q.shape
    qg = q.to(work).reshape(B, Hkv, H // Hkv, N, D)
    kg, vg = k.to(work).unsqueeze(2), v.to(work).unsqueeze(2)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    kernel = backend == "kernel" or (
        backend == "auto" and q.is_cuda and not needs_grad and L % 16 == 0 and q.dtype != torch.float64
    )
    if variant == "fixed":
        out = _fixed(qg, kg, vg, L, causal, scale, kernel)
    elif variant == "logsparse":
        out = _logsparse(qg, kg, vg, causal, scale)
    elif variant == "axial":
        out = _axial(qg, kg, vg, L, causal, scale, kernel)
    else:
        out = _mixture(qg, kg, vg, L, scale)
    return out.flatten(1, 2).to(q.dtype)


class CombinerAttention(nn.Module):
    """Self-attention on (B, N, C) with Combiner's factorized full attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_kv_heads: int | None = None,
        variant: Variant = "fixed",
        segment_len: int | None = None,
        causal: bool = True,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if dim % num_heads != 0:
            raise ValueError(f"CombinerAttention: dim ({dim}) must be divisible by num_heads ({num_heads})")
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(
                f"CombinerAttention: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        _check_options(variant, segment_len, causal, "CombinerAttention")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.variant, self.segment_len, self.causal = variant, segment_len, causal
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv_proj = nn.Linear(dim, 2 * num_kv_heads * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return combiner_attention(q, k, v, self.variant, self.segment_len, self.causal)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.q_proj.in_features:
            raise ValueError(
                f"CombinerAttention: x must be (B, N, {self.q_proj.in_features}), got {tuple(x.shape)}"
            )
        B, N, C = x.shape
        q = self.q_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(x).view(B, N, 2, self.num_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.proj(self.attend(q, k, v).transpose(1, 2).reshape(B, N, C))
