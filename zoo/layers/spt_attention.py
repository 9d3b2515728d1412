"""SPT's sparse multi-head attention: top-k keys chosen by product-quantization code matches.

Paper: Yuntao Gui, Xiao Yan, Peiqi Yin, Han Yang, James Cheng, "SPT: Fine-Tuning Transformer-based
Language Models Efficiently with Sparsification", arXiv 2312.10365 (sparse MHA + routed FFN; the
routed FFN lives in ``spt_ffn.py``). Reference code: ytgui/SPT-proto.

Algorithm (per head, q and k share one codebook per layer):

1. Product quantization: the head dimension is cut into S = ceil(D / 8) subspaces of 8 dims
   (zero padded when D is not a multiple of 8); each subspace has 16 codewords; a vector's code is
   the index of its nearest codeword in L1 distance, per subspace.
2. The score of (i, j) is the number of subspaces where q_i and k_j got the same code.
3. Each query keeps the top-k keys of its causal prefix (k = N / 8 by default; all of them when the
   prefix is shorter; ties go to the more recent key).
4. Exact attention on the kept keys with logits ``clamp(scale q.k, -10, 10)``.

Training the codebook: ``MSE(z, hard centroid) + MSE(soft centroid, hard centroid)`` for z = q and
z = k, weighted 1e-2 and added to the task loss (``PQSparseAttention.aux_loss``); the soft centroid
weighs the codewords by softmax(-log L1 distance). The function builds a codebook from the inputs
(k-means with L1 assignment) when none is given.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.layers.checks import check_qkv

__all__ = [
    "PQSparseAttention",
    "build_codebook",
    "codebook_loss",
    "pq_encode",
    "pq_sparse_attention",
    "pq_sparse_attention_reference",
]


def _split_subspaces(z: Tensor, n_subspaces: int, d_codeword: int) -> Tensor:
    """(.., D) -> (.., S, d_codeword), zero padding the head dim up to S * d_codeword."""
    pad = n_subspaces * d_codeword - z.shape[-1]
    if pad < 0:
        raise ValueError(f"codebook covers {n_subspaces * d_codeword} dims but the head dim is {z.shape[-1]}")
    return F.pad(z, (0, pad)).unflatten(-1, (n_subspaces, d_codeword))


def _l1_distances(z: Tensor, codebook: Tensor) -> Tensor:
    """(.., S, dc) vs (S, C, dc) -> (.., S, C) L1 distances."""
    flat = z.reshape(-1, *z.shape[-2:]).transpose(0, 1)  # (S, M, dc)
    dist = torch.cdist(flat, codebook.to(flat.dtype), p=1.0)  # (S, M, C)
    return dist.transpose(0, 1).reshape(*z.shape[:-1], codebook.shape[1])


def pq_encode(z: Tensor, codebook: Tensor) -> Tensor:
    """Codes (.., S) int64: nearest codeword (L1) per subspace of z (.., D)."""
    S, _, dc = codebook.shape
    return _l1_distances(_split_subspaces(z, S, dc), codebook).argmin(-1)


def codebook_loss(z: Tensor, codebook: Tensor) -> Tensor:
    """MSE(z, hard centroid) + MSE(soft centroid, hard centroid), per subspace, averaged."""
    S, _, dc = codebook.shape
    zs = _split_subspaces(z, S, dc)
    dist = _l1_distances(zs, codebook)  # (.., S, C)
    codes = dist.argmin(-1)
    hard = codebook[torch.arange(S, device=z.device), codes]  # (.., S, dc)
    weights = torch.softmax(-torch.log(dist.clamp_min(1e-5)), -1)
    soft = torch.einsum("...sc,scd->...sd", weights, codebook.to(weights.dtype))
    return F.mse_loss(zs, hard) + F.mse_loss(soft, hard)


@torch.no_grad()
def build_codebook(
    q: Tensor,
    k: Tensor,
    *,
    d_codeword: int = 8,
    n_codewords: int = 16,
    iters: int = 10,
    max_points: int = 8192,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A (S, n_codewords, d_codeword) codebook fitted to q and k together: k-means, L1 assignment."""
    D = q.shape[-1]
    S = math.ceil(D / d_codeword)
    points = torch.cat([q.reshape(-1, D), k.reshape(-1, D)]).float()
    if points.shape[0] > max_points:
        pick = torch.randperm(points.shape[0], generator=generator)[:max_points].to(points.device)
        points = points[pick]
    zs = _split_subspaces(points, S, d_codeword).transpose(0, 1)  # (S, M, dc)
    M = zs.shape[1]
    init = torch.randint(0, M, (S, n_codewords), generator=generator).to(points.device)
    codebook = torch.gather(zs, 1, init.unsqueeze(-1).expand(S, n_codewords, d_codeword)).clone()
    codebook += 1e-4 * torch.randn(codebook.shape, generator=generator).to(codebook.device)
    for _ in range(iters):
        codes = torch.cdist(zs, codebook, p=1.0).argmin(-1)  # (S, M)
        onehot = F.one_hot(codes, n_codewords).to(zs.dtype)  # (S, M, C)
        counts = onehot.sum(1)  # (S, C)
        sums = onehot.transpose(1, 2) @ zs  # (S, C, dc)
        filled = counts > 0
        codebook = torch.where(filled.unsqueeze(-1), sums / counts.clamp_min(1).unsqueeze(-1), codebook)
    return codebook.to(q.dtype)


def _code_matches(code_q: Tensor, code_k: Tensor, n_codewords: int) -> Tensor:
    """Number of equal codes: (.., Nq, S) x (.., N, S) -> (.., Nq, N) float."""
    oq = F.one_hot(code_q, n_codewords).flatten(-2).float()
    ok = F.one_hot(code_k, n_codewords).flatten(-2).float()
    return oq @ ok.transpose(-1, -2)


def _check_options(top_k, logit_clamp, fn: str) -> None:
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{fn}: top_k must be a positive int or None, got {top_k!r}")
    if logit_clamp is not None and not (isinstance(logit_clamp, (int, float)) and logit_clamp > 0):
        raise ValueError(f"{fn}: logit_clamp must be a positive number or None, got {logit_clamp!r}")


def pq_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    top_k: int | None = None,
    causal: bool = True,
    *,
    codebook: Tensor | None = None,
    scale: float | None = None,
    logit_clamp: float | None = 10.0,
    d_codeword: int = 8,
    n_codewords: int = 16,
    query_chunk: int | None = None,
    return_indices: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """SPT sparse attention on (B, H, N, D) q and (B, Hkv, N, D) k, v.

    ``top_k`` keys per query (default N // 8, at least 1) among the visible ones; ``codebook``
    (S, C, dc) with S * dc >= D, built from q and k when None. Returns (B, H, N, Dv); with
    ``return_indices`` also the kept key positions (B, H, N, k') and their validity mask.
    """
    fn = "pq_sparse_attention"
    H, Hkv, N = check_qkv(q, k, v, fn)
    _check_options(top_k, logit_clamp, fn)
    D = q.shape[-1]
    if codebook is None:
        codebook = build_codebook(q.detach(), k.detach(), d_codeword=d_codeword, n_codewords=n_codewords)
    if codebook.dim() != 3 or codebook.shape[0] * codebook.shape[2] < D:
        raise ValueError(
            f"{fn}: codebook must be (S, C, dc) with S * dc >= head dim {D}, got {tuple(codebook.shape)}"
        )
    scale = D**-0.5 if scale is None else float(scale)
    kk = min(N, max(1, N // 8) if top_k is None else top_k)
    B = q.shape[0]
    G = H // Hkv
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(work).reshape(B, Hkv, G, N, D)
    kf, vf = k.to(work).unsqueeze(2), v.to(work).unsqueeze(2)  # (B, Hkv, 1, N, D)
    code_q = pq_encode(qg.detach(), codebook.detach())
    code_k = pq_encode(kf.detach(), codebook.detach())
    chunk = query_chunk or max(1, min(N, (1 << 22) // max(N * G, 1)))
    key_pos = torch.arange(N, device=q.device)
    outs, idx_all, valid_all = [], [], []
    for start in range(0, N, chunk):
        stop = min(N, start + chunk)
        qpos = key_pos[start:stop]
        with torch.no_grad():
            matches = _code_matches(code_q[..., start:stop, :], code_k, codebook.shape[1])  # (B,Hkv,G,c,N)
            rank = matches * N + key_pos.to(matches.dtype)  # ties: the more recent key first
            visible = (
                (key_pos[None, :] <= qpos[:, None])
                if causal
                else torch.ones(1, N, dtype=torch.bool, device=q.device)
            )
            rank = rank.masked_fill(~visible, -1.0)
            idx = rank.topk(kk, dim=-1).indices  # (B,Hkv,G,c,kk)
            valid = (idx <= qpos[:, None]) if causal else torch.ones_like(idx, dtype=torch.bool)
        flat = idx.flatten(-2)
        kb = torch.gather(kf.expand(-1, -1, G, -1, -1), -2, flat.unsqueeze(-1).expand(*flat.shape, D))
        vb = torch.gather(
            vf.expand(-1, -1, G, -1, -1), -2, flat.unsqueeze(-1).expand(*flat.shape, vf.shape[-1])
        )
        kb, vb = kb.unflatten(-2, idx.shape[-2:]), vb.unflatten(-2, idx.shape[-2:])
        logits = scale * (qg[..., start:stop, :].unsqueeze(-2) @ kb.transpose(-1, -2)).squeeze(-2)
        if logit_clamp is not None:
            logits = logits.clamp(-logit_clamp, logit_clamp)
        p = torch.softmax(logits.masked_fill(~valid, float("-inf")), -1)
        outs.append((p.unsqueeze(-2) @ vb).squeeze(-2))
        if return_indices:
            idx_all.append(idx)
            valid_all.append(valid)
    out = torch.cat(outs, -2).flatten(1, 2).to(q.dtype)
    if return_indices:
        return out, torch.cat(idx_all, -2).flatten(1, 2), torch.cat(valid_all, -2).flatten(1, 2)
    return out


def pq_sparse_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keep: Tensor,
    *,
    scale: float | None = None,
    logit_clamp: float | None = 10.0,
) -> Tensor:
    """Dense fp64 attention with clamped logits restricted to a boolean keep mask (B, H, N, N)."""
    H, Hkv, N = check_qkv(q, k, v, "pq_sparse_attention_reference")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k64 = k.double().repeat_interleave(H // Hkv, 1)
    v64 = v.double().repeat_interleave(H // Hkv, 1)
    logits = scale * q.double() @ k64.transpose(-1, -2)
    if logit_clamp is not None:
        logits = logits.clamp(-logit_clamp, logit_clamp)
    p = torch.softmax(logits.masked_fill(~keep, float("-inf")), -1)
    return torch.nan_to_num(p) @ v64


class PQSparseAttention(nn.Module):
    """Self-attention on (B, N, C) with SPT's PQ-selected sparse attention.

    One codebook per layer (S = ceil(head_dim / d_codeword) subspaces, ``n_codewords`` each) is
    shared by queries and keys. In training mode ``aux_loss`` holds ``codebook_loss_weight *``
    (codebook loss of q + codebook loss of k) after each forward; add it to the task loss.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_kv_heads: int | None = None,
        causal: bool = True,
        top_k: int | None = None,
        d_codeword: int = 8,
        n_codewords: int = 16,
        codebook_loss_weight: float = 1e-2,
        logit_clamp: float | None = 10.0,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if dim % num_heads != 0:
            raise ValueError(f"PQSparseAttention: dim ({dim}) must be divisible by num_heads ({num_heads})")
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(
                f"PQSparseAttention: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        if d_codeword < 1 or n_codewords < 2:
            raise ValueError(
                f"PQSparseAttention: need d_codeword >= 1 and n_codewords >= 2, got {d_codeword}, {n_codewords}"
            )
        _check_options(top_k, logit_clamp, "PQSparseAttention")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.causal, self.top_k, self.logit_clamp = causal, top_k, logit_clamp
        self.codebook_loss_weight = codebook_loss_weight
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv_proj = nn.Linear(dim, 2 * num_kv_heads * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        n_subspaces = math.ceil(self.head_dim / d_codeword)
        self.codebook = nn.Parameter(torch.randn(n_subspaces, n_codewords, d_codeword))
        self.aux_loss: Tensor | None = None

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.q_proj.in_features:
            raise ValueError(
                f"PQSparseAttention: x must be (B, N, {self.q_proj.in_features}), got {tuple(x.shape)}"
            )
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(x).view(B, N, 2, self.num_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    @torch.no_grad()
    def fit_codebook(self, x: Tensor, iters: int = 10) -> None:
        """Initialise the codebook by k-means on this layer's queries and keys for input x."""
        q, k, _ = self._qkv(x)
        S, C, dc = self.codebook.shape
        self.codebook.copy_(build_codebook(q, k, d_codeword=dc, n_codewords=C, iters=iters))

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled():
            self.aux_loss = self.codebook_loss_weight * (
                codebook_loss(q, self.codebook) + codebook_loss(k, self.codebook)
            )
        return pq_sparse_attention(
            q, k, v, self.top_k, self.causal, codebook=self.codebook, logit_clamp=self.logit_clamp
        )

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._qkv(x)
        B, N, C = x.shape
        return self.proj(self.attend(q, k, v).transpose(1, 2).reshape(B, N, C))
