"""Scatterbrain: sparse + low-rank attention with an exact correction on the sparse support.

Paper: Beidi Chen, Tri Dao, Eric Winsor, Zhao Song, Atri Rudra, Christopher Ré,
"Scatterbrain: Unifying Sparse and Low-rank Attention Approximation", NeurIPS 2021,
arXiv 2110.15343.

Algorithm (per head, softmax scale ``s = D ** -0.5``)::

    phi(x)   random features with E[phi(q) . phi(k)] = exp(s q . k), x' = x * sqrt(s), rows w_r of an
             orthogonal Gaussian projection, m features (m = d ln d by default):
             "cosh" (default, as upstream): m/2 rows, each giving the pair
                 exp(+w_r . x' - |x'|^2 / 2) / sqrt(m),  exp(-w_r . x' - |x'|^2 / 2) / sqrt(m)
             "positive" (Performer FAVOR+): m rows, phi(x)_r = exp(w_r . x' - |x'|^2 / 2) / sqrt(m)
             Both are unbiased; the +-w pair is an antithetic sample, so at equal m the cosh
             estimate of one entry has variance (1 - exp(-|q' + k'|^2)) times that of the
             positive one (independent rows).
    L        = phi(Q) phi(K)^T                                   (low-rank, never formed)
    M        sparse support: a local band |i - j| < window, or LSH buckets (balanced clusters of
             queries and keys sorted along a random projection of the asymmetric XBOX+ transform,
             n_hashes rounds, union of the rounds)
    S        = M * (exp(s Q K^T) - L)                            (computed only on M)
    out      = [L V + S V] / [L 1 + S 1]

so every entry of the implied attention matrix is exact on the support and low-rank elsewhere.
Everything is evaluated in log space: per query a shift ``z_i = max(row max of the exact scores
on the support, log-scale of the low-rank term)`` keeps all exponentials <= 1. The low-rank
terms cost O(N m D) (causal: chunked prefix sums), the correction O(|M| (D + m)).

``mode="sparse"`` and ``mode="lowrank"`` give the two parts alone (exact attention on the support;
Performer attention), which is what the paper compares against at equal budget.

GQA: ``k, v`` may have fewer heads; features, contexts and key buckets are built once per KV head.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.layers.checks import check_qkv

__all__ = [
    "ScatterbrainAttention",
    "default_num_features",
    "draw_feature_projection",
    "draw_hash_vectors",
    "orthogonal_gaussian_projection",
    "performer_log_features",
    "projection_rows",
    "performer_attention",
    "scatterbrain_attention",
    "scatterbrain_attention_reference",
    "scatterbrain_support_mask",
]

SparseKind = Literal["lsh", "local"]
Mode = Literal["scatterbrain", "sparse", "lowrank"]
FeatureMap = Literal["positive", "cosh"]
FEATURE_MAPS = ("positive", "cosh")


def _without_autocast(fn):
    """Run ``fn`` with CPU and CUDA autocast off: it picks its own working precision (fp32 / fp64),
    which autocast would override for the matmuls (bf16 scores overflow the masked fill)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    return wrapped


# ----------------------------------------------------------------------------- grouped heads
def _group(q: Tensor, hkv: int) -> Tensor:
    """(B, H, N, D) -> (B, Hkv, G, N, D) view: query heads grouped under their KV head."""
    B, H, N, D = q.shape
    return q.reshape(B, hkv, H // hkv, N, D)


# ----------------------------------------------------------------------------- Performer features
def default_num_features(head_dim: int) -> int:
    """m = d ln d (the paper's default), at least 1."""
    return max(1, int(round(head_dim * math.log(max(head_dim, 2)))))


def orthogonal_gaussian_projection(
    num_features: int,
    dim: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(num_features, dim) matrix: stacked orthogonal blocks, rows rescaled to Gaussian norms."""
    if num_features < 1 or dim < 1:
        raise ValueError(
            f"orthogonal_gaussian_projection: need num_features, dim >= 1, got {num_features}, {dim}"
        )
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        gauss = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        ortho, r = torch.linalg.qr(gauss)
        ortho = ortho * torch.sign(torch.diagonal(r)).unsqueeze(0)  # Haar-distributed
        blocks.append(ortho.T)
    rows = torch.cat(blocks, 0)[:num_features]
    norms = torch.randn(num_features, dim, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (rows * norms).to(device=device, dtype=dtype)


def _check_feature_map(feature_map: str, fn: str) -> None:
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"{fn}: feature_map must be 'positive' or 'cosh', got {feature_map!r}")


def projection_rows(num_features: int, feature_map: FeatureMap = "cosh") -> int:
    """Rows of the projection behind m features: m ("positive") or m // 2 ("cosh", two features a row)."""
    _check_feature_map(feature_map, "projection_rows")
    need = 2 if feature_map == "cosh" else 1
    if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < need:
        raise ValueError(
            f"projection_rows: num_features must be an int >= {need} for feature_map={feature_map!r}, "
            f"got {num_features!r}"
        )
    return num_features // 2 if feature_map == "cosh" else num_features


def draw_feature_projection(
    num_features: int,
    dim: int,
    feature_map: FeatureMap = "cosh",
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The orthogonal Gaussian projection behind ``num_features`` features of ``feature_map``.

    (m, dim) for "positive", (m // 2, dim) for "cosh" (an odd m gives m - 1 features, as upstream).
    """
    rows = projection_rows(num_features, feature_map)
    return orthogonal_gaussian_projection(rows, dim, generator=generator, device=device, dtype=dtype)


def performer_log_features(
    x: Tensor, projection: Tensor, scale: float, feature_map: FeatureMap = "positive"
) -> Tensor:
    """log phi(x): (..., N, D) -> (..., N, m), with phi(q) . phi(k) an unbiased estimate of exp(scale q.k).

    ``projection`` is (r, D); m = r ("positive") or m = 2 r ("cosh": features of +w_r then of -w_r).
    """
    _check_feature_map(feature_map, "performer_log_features")
    x = x * math.sqrt(scale)
    proj = x @ projection.to(x.dtype).T
    if feature_map == "cosh":
        proj = torch.cat([proj, -proj], -1)
    m = proj.shape[-1]
    return proj - 0.5 * (x * x).sum(-1, keepdim=True) - 0.5 * math.log(m)


def _lowrank_terms(log_fq: Tensor, log_fk: Tensor, v_ext: Tensor, causal: bool, chunk: int = 128):
    """sum_j phi(q_i).phi(k_j) v_ext_j  as  (exp(shift_i) * out_i): returns (out, shift).

    log_fq (.., Nq, m), log_fk (.., N, m), v_ext (.., N, Dv). Shifts are detached constants so the
    gradient is that of the unshifted expression.
    """
    a = log_fq.detach().amax(-1, keepdim=True)
    b = log_fk.detach().amax(dim=(-1, -2), keepdim=True)
    fq = torch.exp(log_fq - a)
    fk = torch.exp(log_fk - b)
    if not causal:
        context = fk.transpose(-1, -2) @ v_ext
        return fq @ context, a + b
    N = fq.shape[-2]
    chunk = max(1, min(chunk, N))
    pad = (-N) % chunk
    if pad:
        fq = F.pad(fq, (0, 0, 0, pad))
        fk = F.pad(fk, (0, 0, 0, pad))
        v_ext = F.pad(v_ext, (0, 0, 0, pad))
    nc = fq.shape[-2] // chunk
    fq_c = fq.unflatten(-2, (nc, chunk))
    fk_c = fk.unflatten(-2, (nc, chunk))
    v_c = v_ext.unflatten(-2, (nc, chunk))
    states = fk_c.transpose(-1, -2) @ v_c  # (.., nc, m, Dv)
    prefix = torch.cumsum(states, dim=-3)
    prefix = torch.cat([torch.zeros_like(prefix[..., :1, :, :]), prefix[..., :-1, :, :]], dim=-3)
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=fq.device).tril()
    intra = ((fq_c @ fk_c.transpose(-1, -2)) * tril) @ v_c
    out = (fq_c @ prefix + intra).flatten(-3, -2)[..., :N, :]
    return out, a + b


@_without_autocast
def performer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    chunk: int = 128,
    feature_map: FeatureMap = "positive",
) -> Tensor:
    """FAVOR+ (Performer) attention, GQA aware: the low-rank part of Scatterbrain on its own.

    ``feature_map`` says how ``projection`` (r, D) becomes features: "positive" (FAVOR+, the
    default here: m = r) or "cosh" (Scatterbrain's default: m = 2 r).
    Rows go in chunks of ``chunk`` with a running key summary (m, Dv + 1) per head, so the
    features exist for one chunk at a time: memory O(chunk m + m Dv) per head beside q, k, v.
    """
    H, Hkv, N = check_qkv(q, k, v, "performer_attention")
    _check_feature_map(feature_map, "performer_attention")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"performer_attention: chunk must be a positive int, got {chunk!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out_dtype = q.dtype
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    projection = projection.to(work)
    qg = _group(q, Hkv)  # (B, Hkv, G, N, D)
    kf, vf = k.unsqueeze(2), v.unsqueeze(2)  # (B, Hkv, 1, N, D)
    chunk = min(chunk, N)
    spans = [(s, min(N, s + chunk)) for s in range(0, N, chunk)]

    def key_features(s: int, e: int) -> Tensor:
        return performer_log_features(kf[..., s:e, :].to(work), projection, scale, feature_map)

    # one shift for all keys of a head (a detached constant: it cancels in the normalisation)
    with torch.no_grad():
        key_shift = torch.stack([key_features(s, e).amax(dim=(-1, -2)) for s, e in spans], 0).amax(0)
    key_shift = key_shift[..., None, None]
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril() if causal else None
    state = None  # sum over keys so far of phi(k) [v, 1]^T: (B, Hkv, 1, m, Dv + 1)
    if not causal:
        for s, e in spans:
            fk = torch.exp(key_features(s, e) - key_shift)
            v_ext = F.pad(vf[..., s:e, :].to(work), (0, 1), value=1.0)
            part = fk.transpose(-1, -2) @ v_ext
            state = part if state is None else state + part
    outs = []
    for s, e in spans:
        log_fq = performer_log_features(qg[..., s:e, :].to(work), projection, scale, feature_map)
        fq = torch.exp(log_fq - log_fq.detach().amax(-1, keepdim=True))
        if causal:
            fk = torch.exp(key_features(s, e) - key_shift)
            v_ext = F.pad(vf[..., s:e, :].to(work), (0, 1), value=1.0)
            terms = ((fq @ fk.transpose(-1, -2)) * tril[: e - s, : e - s]) @ v_ext
            if state is not None:
                terms = terms + fq @ state
            part = fk.transpose(-1, -2) @ v_ext
            state = part if state is None else state + part
        else:
            terms = fq @ state
        outs.append(terms[..., :-1] / terms[..., -1:].clamp_min(torch.finfo(work).tiny))
    out = torch.cat(outs, -2) if len(outs) > 1 else outs[0]
    return out.flatten(1, 2).to(out_dtype)


# ----------------------------------------------------------------------------- sparse support
def draw_hash_vectors(
    n_hashes: int, head_dim: int, *, generator: torch.Generator | None = None, device=None
) -> Tensor:
    """(n_hashes, head_dim + 2) Gaussian directions for the asymmetric-MIPS LSH."""
    return torch.randn(n_hashes, head_dim + 2, generator=generator, dtype=torch.float32).to(device)


def _lsh_hash(x: Tensor, hash_vectors: Tensor, is_query: bool, top_sq: Tensor) -> Tensor:
    """Scalar hashes (R, .., N): x is mapped by the asymmetric XBOX+ transform, then projected.

    With M^2 = max |q|^2 + max |k|^2 (per head, ``top_sq``), queries become [q, 0, sqrt(M^2 - |q|^2)]
    and keys [k, sqrt(M^2 - |k|^2), 0]: both have norm M, so |Q(q) - K(k)|^2 = 2 M^2 - 2 q.k and
    nearby projections mean large inner products (SMYRF's transform, used by Scatterbrain).
    """
    x = x.float()
    sq = (x * x).sum(-1, keepdim=True)
    extra = (top_sq - sq).clamp_min(0).sqrt()
    zero = torch.zeros_like(extra)
    aug = torch.cat([x, zero, extra] if is_query else [x, extra, zero], -1)
    return torch.einsum("...nd,rd->r...n", aug, hash_vectors.to(aug.device, aug.dtype))


def _sorted_clusters(hashes: Tensor, n: int, bucket: int) -> tuple[Tensor, Tensor]:
    """Balanced clusters: (positions (.., nb, bucket) with -1 for padding, cluster id per position (.., n))."""
    nb = math.ceil(n / bucket)
    pad = nb * bucket - n
    if pad:
        hashes = F.pad(hashes, (0, pad), value=float("inf"))
    order = torch.argsort(hashes, dim=-1, stable=True)
    positions = torch.where(order < n, order, torch.full_like(order, -1))
    cluster_of_slot = torch.arange(nb * bucket, device=hashes.device) // bucket
    cluster = torch.empty_like(order).scatter_(-1, order, cluster_of_slot.expand_as(order))
    return positions.unflatten(-1, (nb, bucket)), cluster[..., :n]


def _support_blocks(
    qg: Tensor, k: Tensor, sparse: str, window: int, n_hashes: int, hash_vectors: Tensor | None
) -> list[tuple[Tensor, Tensor, Tensor | None]]:
    """Per round: (query positions (.., nb, bq), key positions (.., nb, bk), extra keep mask or None).

    Positions are -1 where a slot is padding. qg is (B, Hkv, G, N, D), k (B, Hkv, N, D).
    """
    N = qg.shape[-2]
    dev = qg.device
    if sparse == "local":
        nb = math.ceil(N / window)
        q_pos = torch.arange(nb * window, device=dev).view(nb, window)
        starts = (torch.arange(nb, device=dev) - 1).clamp_min(0) * window
        k_pos = starts[:, None] + torch.arange(3 * window, device=dev)[None, :]
        q_pos = torch.where(q_pos < N, q_pos, -1)
        k_pos = torch.where(k_pos < N, k_pos, -1)
        return [(q_pos, k_pos, None)]
    q_top = qg.float().square().sum(-1, keepdim=True).amax(dim=(-3, -2), keepdim=True)  # per KV head
    k_top = k.unsqueeze(2).float().square().sum(-1, keepdim=True).amax(dim=-2, keepdim=True)
    top_sq = q_top + k_top
    hq = _lsh_hash(qg, hash_vectors, True, top_sq)  # (R, B, Hkv, G, N)
    hk = _lsh_hash(k.unsqueeze(2), hash_vectors, False, top_sq)  # (R, B, Hkv, 1, N)
    rounds = []
    q_clusters: list[Tensor] = []
    k_clusters: list[Tensor] = []
    for r in range(n_hashes):
        q_pos, q_cl = _sorted_clusters(hq[r], N, window)
        k_pos, k_cl = _sorted_clusters(hk[r], N, window)
        extra = None
        for qc_prev, kc_prev in zip(q_clusters, k_clusters):
            same = _gather_scalar(qc_prev, q_pos).unsqueeze(-1) == _gather_scalar(kc_prev, k_pos).unsqueeze(
                -2
            )
            extra = ~same if extra is None else extra & ~same
        q_clusters.append(q_cl)
        k_clusters.append(k_cl)
        rounds.append((q_pos, k_pos, extra))
    return rounds


def _gather_pos(x: Tensor, pos: Tensor) -> Tensor:
    """Rows of x (.., N, C) at pos (.., nb, s) -> (.., nb, s, C); padding (-1) reads row 0."""
    idx = pos.clamp_min(0)
    lead = torch.broadcast_shapes(x.shape[:-2], idx.shape[:-2])
    flat = idx.expand(*lead, *idx.shape[-2:]).flatten(-2)
    C = x.shape[-1]
    out = torch.gather(x.expand(*lead, *x.shape[-2:]), -2, flat.unsqueeze(-1).expand(*flat.shape, C))
    return out.view(*lead, *idx.shape[-2:], C)


def _gather_scalar(x: Tensor, pos: Tensor) -> Tensor:
    """Entries of x (.., N) at pos (.., nb, s) -> (.., nb, s)."""
    return _gather_pos(x.unsqueeze(-1), pos).squeeze(-1)


def _block_keep(q_pos: Tensor, k_pos: Tensor, extra: Tensor | None, sparse: str, window: int, causal: bool):
    qp = q_pos.unsqueeze(-1)
    kp = k_pos.unsqueeze(-2)
    keep = (qp >= 0) & (kp >= 0)
    if sparse == "local":
        keep = keep & ((qp - kp).abs() < window)
    if causal:
        keep = keep & (kp <= qp)
    if extra is not None:
        keep = keep & extra
    return keep


def scatterbrain_support_mask(
    q: Tensor,
    k: Tensor,
    *,
    sparse: SparseKind = "lsh",
    window: int = 64,
    n_hashes: int = 1,
    causal: bool = False,
    hash_vectors: Tensor | None = None,
) -> Tensor:
    """The dense boolean support M, (B, H, N, N), exactly as the fast path builds it (small N only)."""
    H, Hkv, N = check_qkv(q, k, k, "scatterbrain_support_mask")
    B = q.shape[0]
    qg = _group(q, Hkv)
    mask = torch.zeros(B, Hkv, H // Hkv, N + 1, N + 1, dtype=torch.bool, device=q.device)
    for q_pos, k_pos, extra in _support_blocks(qg, k, sparse, window, n_hashes, hash_vectors):
        keep = _block_keep(q_pos, k_pos, extra, sparse, window, causal)
        qi = torch.where(q_pos >= 0, q_pos, N).unsqueeze(-1)
        kj = torch.where(k_pos >= 0, k_pos, N).unsqueeze(-2)
        lead = mask.shape[:3]
        qi, kj, keep = torch.broadcast_tensors(qi, kj, keep.expand(*lead, *keep.shape[-3:]))
        flat = (qi * (N + 1) + kj).reshape(*lead, -1)
        view = mask.view(*lead, -1)
        view.scatter_(-1, flat, keep.reshape(*lead, -1) | view.gather(-1, flat))
    return mask[..., :N, :N].flatten(1, 2)


# ----------------------------------------------------------------------------- the attention
def _validate_options(
    sparse: str, window: int, n_hashes: int, mode: str, fn: str, feature_map: str = "cosh"
) -> None:
    if sparse not in ("lsh", "local"):
        raise ValueError(f"{fn}: sparse must be 'lsh' or 'local', got {sparse!r}")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"{fn}: window must be a positive int, got {window!r}")
    if not isinstance(n_hashes, int) or n_hashes < 1:
        raise ValueError(f"{fn}: n_hashes must be a positive int, got {n_hashes!r}")
    if mode not in ("scatterbrain", "sparse", "lowrank"):
        raise ValueError(f"{fn}: mode must be 'scatterbrain', 'sparse' or 'lowrank', got {mode!r}")
    _check_feature_map(feature_map, fn)


@_without_autocast
def scatterbrain_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    num_features: int | None = None,
    sparse: SparseKind = "lsh",
    window: int = 64,
    causal: bool = False,
    *,
    n_hashes: int = 1,
    scale: float | None = None,
    mode: Mode = "scatterbrain",
    projection: Tensor | None = None,
    hash_vectors: Tensor | None = None,
    generator: torch.Generator | None = None,
    return_log_normalizer: bool = False,
    feature_map: FeatureMap = "cosh",
) -> Tensor | tuple[Tensor, Tensor]:
    """Scatterbrain attention on (B, H, N, D) q and (B, Hkv, N, D) k, v.

    Parameters
    ----------
    num_features: random features m (default d ln d); ignored when ``projection`` is given.
    feature_map: ``"cosh"`` (default, as upstream: m / 2 projections w, features at +w and -w) or
        ``"positive"`` (Performer FAVOR+: m projections).
    sparse, window, n_hashes: the support: ``"local"`` band |i - j| < window, or ``"lsh"`` clusters of
        ``window`` queries and keys, ``n_hashes`` rounds.
    mode: ``"scatterbrain"`` (default), ``"sparse"`` (exact attention on the support only) or
        ``"lowrank"`` (Performer only).
    projection, hash_vectors: fixed randomness (m, D) ("positive") or (m / 2, D) ("cosh"), and
        (n_hashes, D + 2); drawn from ``generator`` when absent (see ``draw_feature_projection``).
    return_log_normalizer: also return log of the row sums of the implied (unnormalised) matrix,
        (B, H, N) fp32 (fp64 for fp64 inputs), like an lse.

    Returns (B, H, N, Dv) in q's dtype; rows without any visible key are 0.
    """
    fn = "scatterbrain_attention"
    H, Hkv, N = check_qkv(q, k, v, fn)
    _validate_options(sparse, window, n_hashes, mode, fn, feature_map)
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else float(scale)
    if projection is None and mode != "sparse":
        m = default_num_features(D) if num_features is None else num_features
        need = 2 if feature_map == "cosh" else 1
        if not isinstance(m, int) or isinstance(m, bool) or m < need:
            raise ValueError(
                f"{fn}: num_features must be an int >= {need} for feature_map={feature_map!r}, "
                f"got {num_features!r}"
            )
        projection = draw_feature_projection(m, D, feature_map, generator=generator, device=q.device)
    if projection is not None and (projection.dim() != 2 or projection.shape[1] != D):
        raise ValueError(f"{fn}: projection must be (m, {D}), got {tuple(projection.shape)}")
    if sparse == "lsh" and mode != "lowrank":
        if hash_vectors is None:
            hash_vectors = draw_hash_vectors(n_hashes, D, generator=generator, device=q.device)
        if hash_vectors.shape != (n_hashes, D + 2):
            raise ValueError(
                f"{fn}: hash_vectors must be ({n_hashes}, {D + 2}), got {tuple(hash_vectors.shape)}"
            )

    out_dtype = q.dtype
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = _group(q.to(work), Hkv)  # (B, Hkv, G, N, D)
    kf = k.to(work)
    vf = v.to(work)
    v_ext = torch.cat([vf, torch.ones_like(vf[..., :1])], -1).unsqueeze(2)  # (B, Hkv, 1, N, Dv+1)
    B, _, G = qg.shape[:3]
    Dv1 = v_ext.shape[-1]

    if mode != "sparse":
        log_fq = performer_log_features(qg, projection.to(work), scale, feature_map)
        log_fk = performer_log_features(kf.unsqueeze(2), projection.to(work), scale, feature_map)
        low, low_shift = _lowrank_terms(log_fq, log_fk, v_ext, causal)  # (B,Hkv,G,N,Dv+1), (B,Hkv,G,N,1)
    if mode == "lowrank":
        num, shift = low, low_shift.squeeze(-1)
    else:
        rounds = _support_blocks(qg, kf, sparse, window, n_hashes, hash_vectors)
        neg = torch.finfo(work).min
        # pass 1: exact scores on the support and their row max per query
        scored = []
        row_max = torch.full((B, Hkv, G, N + 1), float("-inf"), dtype=work, device=q.device)
        for q_pos, k_pos, extra in rounds:
            keep = _block_keep(q_pos, k_pos, extra, sparse, window, causal)
            qb = _gather_pos(qg, q_pos)  # (B,Hkv,G,nb,bq,D)
            kb = _gather_pos(kf.unsqueeze(2), k_pos)  # (B,Hkv,1,nb,bk,D)
            scores = (qb @ kb.transpose(-1, -2)) * scale
            scores = scores.masked_fill(~keep, neg)
            slot = torch.where(q_pos >= 0, q_pos, N)
            slot = slot.expand(*scores.shape[:-1]).flatten(-2)
            row_max.scatter_reduce_(-1, slot, scores.amax(-1).flatten(-2), reduce="amax")
            scored.append((q_pos, k_pos, keep, scores, slot))
        row_max = row_max[..., :N]
        if mode == "sparse":
            shift = row_max
        else:
            shift = torch.maximum(row_max, low_shift.squeeze(-1))
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift)).detach()
        shift_pad = F.pad(shift, (0, 1))
        num = torch.zeros(B, Hkv, G, N + 1, Dv1, dtype=work, device=q.device)
        if mode == "scatterbrain":
            key_shift = log_fk.detach().amax(dim=(-1, -2), keepdim=True).unsqueeze(-1)
        for q_pos, k_pos, keep, scores, slot in scored:
            z = _gather_scalar(shift_pad, torch.where(q_pos >= 0, q_pos, N)).unsqueeze(-1)
            weight = torch.exp(scores - z) * keep
            if mode == "scatterbrain":
                lq = _gather_pos(log_fq, q_pos)
                lk = _gather_pos(log_fk, k_pos)
                a = lq.detach().amax(-1, keepdim=True)
                fk_shifted = torch.exp(lk - key_shift)
                lowrank_entries = torch.exp(a + key_shift - z) * (
                    torch.exp(lq - a) @ fk_shifted.transpose(-1, -2)
                )
                weight = weight - lowrank_entries * keep
            vb = _gather_pos(v_ext, k_pos)  # (B,Hkv,1,nb,bk,Dv+1)
            contrib = (weight @ vb).flatten(-3, -2)  # (B,Hkv,G,nb*bq,Dv+1)
            num = num.scatter_add(3, slot.unsqueeze(-1).expand_as(contrib), contrib)
        num = num[..., :N, :]
        if mode == "scatterbrain":
            num = num + torch.exp(low_shift - shift.unsqueeze(-1)) * low
    den = num[..., -1:]
    tiny = torch.finfo(work).tiny
    out = torch.where(den > tiny, num[..., :-1] / den.clamp_min(tiny), torch.zeros_like(num[..., :-1]))
    out = out.flatten(1, 2).to(out_dtype)
    if return_log_normalizer:
        lognorm = (torch.log(den.squeeze(-1).clamp_min(tiny)) + shift).masked_fill(
            den.squeeze(-1) <= tiny, float("-inf")
        )
        return out, lognorm.flatten(1, 2)
    return out


def scatterbrain_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    support: Tensor,
    projection: Tensor | None,
    *,
    causal: bool = False,
    scale: float | None = None,
    mode: Mode = "scatterbrain",
    return_matrix: bool = False,
    feature_map: FeatureMap = "cosh",
) -> Tensor | tuple[Tensor, Tensor]:
    """Dense fp64 Scatterbrain: forms exp(sQK^T), phi(Q)phi(K)^T and the support (B, H, N, N) explicitly.

    The low-rank entries are built pairwise, not from features: with z = sqrt(s) (q_i + k_j) and
    c = exp(-s (|q_i|^2 + |k_j|^2) / 2), entry (i, j) is c mean_r exp(w_r . z) ("positive") or
    c mean_r cosh(w_r . z) ("cosh"), over the r rows of ``projection``.
    """
    H, Hkv, N = check_qkv(q, k, v, "scatterbrain_attention_reference")
    _check_feature_map(feature_map, "scatterbrain_attention_reference")
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    q64 = q.double()
    k64 = k.double().repeat_interleave(H // Hkv, 1)
    v64 = v.double().repeat_interleave(H // Hkv, 1)
    exact = torch.exp(scale * q64 @ k64.transpose(-1, -2))
    visible = torch.ones(N, N, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril()
    support = support.bool() & visible
    if mode != "sparse":
        p = projection.double()
        qs, ks = q64 * math.sqrt(scale), k64 * math.sqrt(scale)
        z = qs.unsqueeze(-2) + ks.unsqueeze(-3)  # (B, H, N, N, D)
        proj = z @ p.T  # (B, H, N, N, r)
        kernel = torch.cosh(proj) if feature_map == "cosh" else torch.exp(proj)
        norms = (qs * qs).sum(-1).unsqueeze(-1) + (ks * ks).sum(-1).unsqueeze(-2)
        lowrank = kernel.mean(-1) * torch.exp(-0.5 * norms)
    if mode == "scatterbrain":
        matrix = torch.where(support, exact, lowrank) * visible
    elif mode == "sparse":
        matrix = exact * support
    else:
        matrix = lowrank * visible
    den = matrix.sum(-1, keepdim=True)
    out = torch.where(den > 0, (matrix @ v64) / den.clamp_min(1e-300), torch.zeros_like(v64[..., :1]))
    return (out, matrix) if return_matrix else out


# ----------------------------------------------------------------------------- module
class ScatterbrainAttention(nn.Module):
    """Self-attention on (B, N, C) with Scatterbrain in place of softmax attention.

    The random feature projection ((m, head_dim) for ``feature_map="positive"``, (m // 2, head_dim)
    for ``"cosh"``, the default) and LSH directions are buffers drawn at
    construction; ``redraw()`` draws new ones (the paper redraws features during training).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_kv_heads: int | None = None,
        num_features: int | None = None,
        sparse: SparseKind = "lsh",
        window: int = 64,
        n_hashes: int = 1,
        causal: bool = False,
        qkv_bias: bool = True,
        mode: Mode = "scatterbrain",
        feature_map: FeatureMap = "cosh",
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if dim % num_heads != 0:
            raise ValueError(
                f"ScatterbrainAttention: dim ({dim}) must be divisible by num_heads ({num_heads})"
            )
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(
                f"ScatterbrainAttention: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        _validate_options(sparse, window, n_hashes, mode, "ScatterbrainAttention", feature_map)
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.num_features = default_num_features(self.head_dim) if num_features is None else num_features
        self.feature_map = feature_map
        rows = projection_rows(self.num_features, feature_map)
        self.sparse, self.window, self.n_hashes, self.causal, self.mode = (
            sparse,
            window,
            n_hashes,
            causal,
            mode,
        )
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv_proj = nn.Linear(dim, 2 * num_kv_heads * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("projection", torch.empty(rows, self.head_dim))
        self.register_buffer("hash_vectors", torch.empty(n_hashes, self.head_dim + 2))
        self.redraw()

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw a fresh feature projection and fresh LSH directions."""
        dev = self.projection.device
        self.projection.copy_(
            draw_feature_projection(self.num_features, self.head_dim, self.feature_map, generator=generator)
        )
        self.hash_vectors.copy_(
            draw_hash_vectors(self.n_hashes, self.head_dim, generator=generator, device=dev)
        )

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The functional core on (B, H, N, D) q and (B, Hkv, N, D) k, v with this module's randomness."""
        return scatterbrain_attention(
            q,
            k,
            v,
            sparse=self.sparse,
            window=self.window,
            causal=self.causal,
            n_hashes=self.n_hashes,
            mode=self.mode,
            feature_map=self.feature_map,
            projection=self.projection,
            hash_vectors=self.hash_vectors,
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.q_proj.in_features:
            raise ValueError(
                f"ScatterbrainAttention: x must be (B, N, {self.q_proj.in_features}), got {tuple(x.shape)}"
            )
        B, N, C = x.shape
        q = self.q_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(x).view(B, N, 2, self.num_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = self.attend(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))
