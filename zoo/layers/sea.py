"""SEA: sparse linear attention with an estimated attention mask.

Paper: Heejun Lee, Jina Kim, Jeffrey Willette, Sung Ju Hwang, "SEA: Sparse Linear Attention with
Estimated Attention Mask", ICLR 2024, arXiv 2310.01777. Reference code: gmlwns2000/sea-attention.

Algorithm (per layer, H heads of size d, compressed width T = ``compressed_len``: 128 for
encoders, 256 for causal LMs):

1. Performer (FAVOR+) attention of q, k over the values [position code ; v] (an interpolated
   identity for encoders, a learned code for causal models): a linear-cost summary per query.
2. Predictor: [performer output ; v] -> Linear + LayerNorm + GELU -> Linear to 2 x T/4 per head,
   then a small CNN over the (query x compressed column) image, heads as channels (dilated 3x3
   convolutions, causal along queries for causal models, upsampling to T columns, LayerNorm):
   estimated compressed attention scores (N, T) per head; softmax over T.
3. Grouped top-k: per query, the budget of k keys becomes k' = round(k T / len) compressed columns
   per head (len = N, or i + 1 for causal row i), and the H k' best columns are chosen jointly
   over the heads of that query (heads compete for the budget).
4. Nearest-neighbour resize: compressed column c of a row of visible length len covers keys
   [round(c len / T), round((c + 1) len / T)); the chosen columns give the row's key set.
5. Exact attention on that key set (sparse, O(N k d)).
6. Output: sigmoid(g0) * sparse + averaged context mixed by sigmoid(g1) (the running mean of v for
   causal models; v weighted by the column-mean of the estimated attention otherwise), both gates
   predicted per query; optionally ``LayerNorm(ctx) + ctx`` over the merged heads.

Training (``sea_distillation_loss``): distillation from a dense teacher, 0.1 x KL + MSE between
the estimated attention and the teacher's attention mass per compressed column, the same between
the student's own full attention and the teacher's, MSE to the teacher's context, plus the task
loss. The interpretable N x N attention matrix is returned on request (small N).

Differences from the reference code, on purpose: columns whose key range is empty are never
chosen; the averaged context of encoders is a weighted *mean*; the estimation loss compares
column masses (the teacher summed over each column's keys) rather than a resized score map.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from zoo.layers.scatterbrain import default_num_features, orthogonal_gaussian_projection, performer_attention

__all__ = [
    "SEAAttention",
    "SEAOutput",
    "column_ranges",
    "compressed_column_of_key",
    "sea_distillation_loss",
    "sparse_attention_on_columns",
]


class SEAOutput(NamedTuple):
    """Everything ``SEAAttention.attend(..., return_details=True)`` computes, per head."""

    output: Tensor  # (B, H, N, d) after the gates
    sparse_output: Tensor  # (B, H, N, d) exact attention on the chosen keys (before gates)
    estimated_scores: Tensor  # (B, H, N, T)
    estimated_probs: Tensor  # (B, H, N, T)
    selected_columns: Tensor  # (B, H, N, T) bool
    kept_keys: Tensor  # (B, H, N) number of keys attended exactly
    gates: Tensor  # (B, H, N, 2): sigmoid(g0) scales the sparse part, sigmoid(g1) mixes it with the average
    average_weights: Tensor  # (B, H, N) or (B, H, 1, N): weights of the averaged context over keys
    attention: Tensor | None  # (B, H, N, N) interpretable matrix when requested


# ----------------------------------------------------------------------------- compressed columns
def column_ranges(lengths: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """(start, end) of every compressed column for rows of the given visible lengths: (R, T) each."""
    c = torch.arange(width + 1, device=lengths.device, dtype=torch.float64)
    edges = torch.floor(c[None, :] * lengths.double()[:, None] / width + 0.5).long()
    return edges[:, :-1], edges[:, 1:]


def compressed_column_of_key(n: int, width: int, causal: bool, device=None) -> Tensor:
    """(N, N) long: the compressed column holding key j in row i (-1 where j is not visible)."""
    lengths = torch.arange(1, n + 1, device=device) if causal else torch.full((n,), n, device=device)
    start, _ = column_ranges(lengths, width)
    keys = torch.arange(n, device=device).expand(n, n).contiguous()
    col = torch.searchsorted(start.contiguous(), keys, right=True) - 1
    if causal:
        col = col.masked_fill(keys >= lengths[:, None], -1)
    return col


def _column_of_keys(lengths: Tensor, n: int, width: int) -> Tensor:
    """(R, N) long: compressed column of key j for rows of the given lengths (exact integer form of
    ``column_ranges``: the largest c with round(c len / T) <= j); keys j >= len get -1."""
    j = torch.arange(n, device=lengths.device)[None, :]
    two_len = 2 * lengths[:, None]
    col = ((2 * j + 1) * width + two_len - 1) // two_len - 1
    return torch.where(j < lengths[:, None], col, torch.full_like(col, -1))


def _sparse_rows(
    qg: Tensor,
    kg: Tensor,
    vg: Tensor,
    selected: Tensor,
    start: Tensor,
    end: Tensor,
    lengths: Tensor,
    scale: float,
    path: str,
) -> Tensor:
    """Exact attention of one chunk of c queries over the keys of their chosen columns.

    qg (B, Hkv, G, c, d) in the working dtype; kg, vg (B, Hkv, 1, N, d); selected (B, H, c, T);
    start, end, lengths: the chunk's column ranges (c, T) and visible lengths (c,). Returns (B, H, c, dv).
    """
    B, Hkv, G, c, D = qg.shape
    N, Dv = kg.shape[-2], vg.shape[-1]
    H, T = selected.shape[1], selected.shape[-1]
    size = end - start  # (c, T)
    count = selected.sum(-1)  # (B, H, c) chosen columns per query
    kept = (selected * size).sum(-1)
    width = int(kept.max().item()) if kept.numel() else 0
    if width == 0:
        return qg.new_zeros(B, H, c, Dv)
    # gathering reads 2 d floats per kept key; scoring all keys reads N scores and K, V once per chunk
    use_gather = path == "gather" or (path == "auto" and 2 * width * D < N * (1 + 2 * D / c))
    if use_gather:
        # key lists straight from the chosen columns' ranges (sorting T columns, never N keys)
        cmax = int(count.max().item())
        cols = torch.sort(selected.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :cmax]
        st = torch.gather(start.expand(B, H, -1, -1), -1, cols)
        en = torch.gather(end.expand(B, H, -1, -1), -1, cols)
        span = int((en - st).max().item())
        keys = st.unsqueeze(-1) + torch.arange(span, device=qg.device)  # (B, H, c, cmax, span)
        col_ok = torch.arange(cmax, device=qg.device) < count.unsqueeze(-1)
        ok = ((keys < en.unsqueeze(-1)) & col_ok.unsqueeze(-1)).flatten(-2).view(B, Hkv, G, c, -1)
        idx = torch.where(ok, keys.flatten(-2).view(B, Hkv, G, c, -1), 0)
        width = idx.shape[-1]
        flat = idx.flatten(-2)
        kb = torch.gather(kg.expand(-1, -1, G, -1, -1), -2, flat.unsqueeze(-1).expand(*flat.shape, D))
        vb = torch.gather(vg.expand(-1, -1, G, -1, -1), -2, flat.unsqueeze(-1).expand(*flat.shape, Dv))
        kb = kb.view(B, Hkv, G, c, width, D)
        vb = vb.view(B, Hkv, G, c, width, Dv)
        logits = ((scale * qg).unsqueeze(-2) @ kb.transpose(-1, -2)).squeeze(-2)
    else:
        col = _column_of_keys(lengths, N, T)  # (c, N)
        ok = torch.gather(selected, -1, col.clamp_min(0).expand(B, H, -1, -1)) & (col >= 0)
        ok = ok.view(B, Hkv, G, c, N)
        logits = (scale * qg) @ kg.transpose(-1, -2)
    w = torch.softmax(logits.masked_fill_(~ok, float("-inf")), -1)
    if bool((kept == 0).any()):  # a query without keys returns 0
        w = w.nan_to_num_(nan=0.0) if not _needs_grad(w) else torch.nan_to_num(w, nan=0.0)
    res = (w.unsqueeze(-2) @ vb).squeeze(-2) if use_gather else w @ vg
    return res.reshape(B, H, c, Dv)


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _sparse_rows_saving_memory(qg, kg, vg, selected, start, end, lengths, scale, path) -> Tensor:
    """``_sparse_rows``; under autograd the chunk is recomputed in the backward instead of keeping its
    (c x N) probabilities, so training holds one chunk's scores at a time, never all N x N."""
    if _needs_grad(qg, kg, vg):
        return checkpoint(
            _sparse_rows, qg, kg, vg, selected, start, end, lengths, scale, path, use_reentrant=False
        )
    return _sparse_rows(qg, kg, vg, selected, start, end, lengths, scale, path)


def _query_chunk(batch_heads: int, n: int, per_query: int) -> int:
    """Rows per chunk so that a chunk's (B, H, c, per_query) scores stay near 2^21 elements."""
    return max(1, min(n, (1 << 21) // max(batch_heads * per_query, 1)))


def sparse_attention_on_columns(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selected: Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    query_chunk: int | None = None,
    path: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Exact attention of each query over the keys of its chosen compressed columns.

    q (B, H, N, d); k, v (B, Hkv, N, d); selected (B, H, N, T) bool. Returns the output
    (B, H, N, d) and the number of keys each query attended (B, H, N). Rows with no key give 0.
    Queries go in chunks, never as one N x N matrix; under autograd each chunk is recomputed in the
    backward (activation checkpointing), so no more than one chunk's scores are ever kept.
    ``path``: ``"gather"`` collects each query's kept keys (O(kept d) per query, best when
    kept d < N), ``"dense"`` scores the chunk against all keys and masks (O(N) per query, best for
    short sequences), ``"auto"`` picks the cheaper per chunk.
    """
    if path not in ("auto", "gather", "dense"):
        raise ValueError(
            f"sparse_attention_on_columns: path must be 'auto', 'gather' or 'dense', got {path!r}"
        )
    B, H, N, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    T = selected.shape[-1]
    scale = D**-0.5 if scale is None else scale
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    lengths = torch.arange(1, N + 1, device=q.device) if causal else torch.full((N,), N, device=q.device)
    start, end = column_ranges(lengths, T)  # (N, T)
    chunk = query_chunk or _query_chunk(B * H, N, max(N, T))
    qg = q.to(work).reshape(B, Hkv, G, N, D)
    kg, vg = k.to(work).unsqueeze(2), v.to(work).unsqueeze(2)  # (B, Hkv, 1, N, d)
    outs, kept = [], []
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        sel = selected[:, :, s:e]
        kept.append((sel * (end[s:e] - start[s:e])).sum(-1))
        outs.append(
            _sparse_rows_saving_memory(
                qg[:, :, :, s:e], kg, vg, sel, start[s:e], end[s:e], lengths[s:e], scale, path
            )
        )
    return torch.cat(outs, 2).to(q.dtype), torch.cat(kept, -1)


def _grouped_topk_columns(probs: Tensor, lengths: Tensor, budget: int, group_heads: bool) -> Tensor:
    """Boolean (B, H, N, T): per query, round(budget T / len) columns per head, chosen jointly over heads."""
    B, H, N, T = probs.shape
    start, end = column_ranges(lengths, T)
    nonempty = end > start  # (N, T)
    per_head = torch.clamp(torch.round(budget * T / lengths.double()), 1, T).long()  # (N,)
    scores = probs.detach().masked_fill(~nonempty, -1.0)
    if group_heads:
        flat = scores.permute(0, 2, 1, 3).reshape(B, N, H * T)
        want = (per_head * H).view(1, N, 1)
    else:
        flat = scores
        want = per_head.view(1, 1, N, 1)
    kmax = int(want.max().item())
    values, idx = flat.topk(min(kmax, flat.shape[-1]), dim=-1)
    rank = torch.arange(idx.shape[-1], device=probs.device)
    take = (rank < want) & (values >= 0)
    chosen = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, take)
    if group_heads:
        chosen = chosen.view(B, N, H, T).permute(0, 2, 1, 3)
    return chosen


def _position_code(n: int, dim: int, device, dtype) -> Tensor:
    """Interpolated identity (N, dim): token t sits at t (dim - 1) / (N - 1) on the identity rows."""
    if n == 1:
        code = torch.zeros(1, dim, device=device, dtype=dtype)
        code[0, 0] = 1
        return code
    where = torch.arange(n, device=device, dtype=dtype)[:, None] * (dim - 1) / (n - 1)
    return (1 - (where - torch.arange(dim, device=device, dtype=dtype)[None, :]).abs()).clamp_min(0)


class _CompressedAttentionCNN(nn.Module):
    """(B, 2H, N, T/4) row features -> (B, H, N, T) estimated scores; causal along rows if asked."""

    def __init__(self, heads: int, width: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.width, self.causal = heads, width, causal
        ch = 2 * heads
        self.norm_in = nn.LayerNorm(width // 4)
        self.conv1 = nn.Conv2d(ch, ch, 3, dilation=2)
        self.conv2 = nn.Conv2d(ch, ch, 3, dilation=2)
        self.conv_out = nn.Conv2d(ch, heads, 1)
        self.norm_out = nn.LayerNorm(width)

    def _pad(self, x: Tensor) -> Tensor:
        # dilation 2, kernel 3: 4 rows of context; causal models see only earlier queries
        return F.pad(x, (2, 2, 4, 0) if self.causal else (2, 2, 2, 2))

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm_in(x)
        B, _, N, W = x.shape
        residual = x.view(B, self.heads, 2, N, W).mean(2).repeat_interleave(4, -1)
        y = F.relu(self.conv1(self._pad(x)))
        y = F.relu(self.conv2(self._pad(y)))
        y = self.conv_out(y).repeat_interleave(4, -1)  # a 1x1 convolution commutes with the upsampling
        return self.norm_out(y + residual)


class SEAAttention(nn.Module):
    """SEA self-attention on (B, N, C) hidden states; ``attend`` is the functional core on q, k, v.

    Parameters
    ----------
    k: the budget of keys per query (per head, on average over the heads of a query).
    compressed_len: T, the width of the estimated attention (default 256 causal, 128 otherwise).
    num_features: Performer features (default d ln d).
    max_len: longest sequence for the learned causal position code.
    group_heads: heads of one query share the budget (grouped top-k) instead of k each.
    output_norm: ``LayerNorm(ctx) + ctx`` after merging heads (the reference code's default).
    fixed_gates: gates fixed at 1 (output = exact attention on the chosen keys).
    gate_init: initial bias of both gate logits (large = start from the sparse attention).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_kv_heads: int | None = None,
        causal: bool = False,
        k: int = 64,
        compressed_len: int | None = None,
        num_features: int | None = None,
        max_len: int = 2048,
        qkv_bias: bool = True,
        group_heads: bool = True,
        output_norm: bool = True,
        fixed_gates: bool = False,
        gate_init: float = 0.0,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if dim % num_heads != 0:
            raise ValueError(f"SEAAttention: dim ({dim}) must be divisible by num_heads ({num_heads})")
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(
                f"SEAAttention: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        compressed_len = (256 if causal else 128) if compressed_len is None else compressed_len
        if not isinstance(compressed_len, int) or compressed_len < 4 or compressed_len % 4:
            raise ValueError(
                f"SEAAttention: compressed_len must be a multiple of 4 and >= 4, got {compressed_len!r}"
            )
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"SEAAttention: k must be a positive int, got {k!r}")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hd = dim // num_heads
        self.causal, self.k, self.compressed_len, self.max_len = causal, k, compressed_len, max_len
        self.group_heads, self.fixed_gates = group_heads, fixed_gates
        self.num_features = default_num_features(hd) if num_features is None else num_features
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv_proj = nn.Linear(dim, 2 * num_kv_heads * hd, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.output_norm = nn.LayerNorm(dim) if output_norm else None
        if causal:
            self.position_code = nn.Parameter(0.1 * torch.randn(max_len, hd))
        else:
            self.register_parameter("position_code", None)
        self.register_buffer("projection", orthogonal_gaussian_projection(self.num_features, hd))
        self.predictor_enc = nn.Sequential(nn.Linear(3 * hd, 2 * hd), nn.LayerNorm(2 * hd), nn.GELU())
        self.predictor_rows = nn.Linear(2 * hd, 2 * (compressed_len // 4))
        self.predictor_cnn = _CompressedAttentionCNN(num_heads, compressed_len, causal)
        self.gate_head = nn.Linear(2 * hd, 2)
        nn.init.zeros_(self.gate_head.weight)
        nn.init.constant_(self.gate_head.bias, gate_init)

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """New Performer projection (the reference code redraws it every 1000 steps in training)."""
        self.projection.copy_(
            orthogonal_gaussian_projection(self.num_features, self.head_dim, generator=generator)
        )

    def load_dense_projections(self, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias) -> None:
        """Copy a dense teacher's projections (student initialised from the teacher)."""
        with torch.no_grad():
            for p, w in (
                (self.q_proj.weight, q_weight),
                (self.kv_proj.weight, kv_weight),
                (self.proj.weight, proj_weight),
            ):
                p.copy_(w)
            for p, b in (
                (self.q_proj.bias, q_bias),
                (self.kv_proj.bias, kv_bias),
                (self.proj.bias, proj_bias),
            ):
                if p is not None and b is not None:
                    p.copy_(b)

    # ------------------------------------------------------------------ core
    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Heads of ``x`` (B, N, C): q (B, H, N, hd), k and v (B, Hkv, N, hd)."""
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(x).view(B, N, 2, self.num_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def predictor_features(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Per-query predictor features (B, H, N, 2d): Performer summary and value, encoded."""
        B, H, N, hd = q.shape
        if self.causal:
            if N > self.max_len:
                raise ValueError(f"SEAAttention: sequence length {N} exceeds max_len {self.max_len}")
            code = self.position_code[:N]
        else:
            code = _position_code(N, hd, q.device, v.dtype)
        code = code.to(v.dtype).expand(*v.shape[:2], N, hd)
        performer_out = performer_attention(
            q.float(), k.float(), torch.cat([code, v], -1).float(), self.projection, causal=self.causal
        ).to(v.dtype)
        v_heads = v.unsqueeze(2).expand(-1, -1, H // k.shape[1], -1, -1).reshape(B, H, N, hd)
        return self.predictor_enc(torch.cat([performer_out, v_heads], -1))

    def estimate_rows(self, features: Tensor, start: int, end: int) -> Tensor:
        """Estimated compressed scores (B, H, end - start, T) of queries [start, end).

        The CNN sees only a few neighbouring rows (two dilated 3 x 3 convolutions: 4 rows each
        side, or 8 earlier rows when causal), so the rows are computed from that halo alone and
        equal those of the whole image.
        """
        B, H, N, _ = features.shape
        before, after = (8, 0) if self.causal else (4, 4)
        lo, hi = max(0, start - before), min(N, end + after)
        w4 = self.compressed_len // 4
        rows = self.predictor_rows(features[:, :, lo:hi]).view(B, H, hi - lo, 2, w4)
        rows = rows.permute(0, 1, 3, 2, 4).reshape(B, 2 * H, hi - lo, w4)
        return self.predictor_cnn(rows)[:, :, start - lo : end - lo]

    def estimate(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Estimated compressed attention scores (B, H, N, T) and predictor features (B, H, N, 2d)."""
        features = self.predictor_features(q, k, v)
        return self.estimate_rows(features, 0, q.shape[2]), features

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        return_details: bool = False,
        return_attention: bool = False,
        budget: int | None = None,
    ) -> Tensor | SEAOutput:
        """SEA on (B, H, N, d) q and (B, Hkv, N, d) k, v; ``budget`` overrides ``k`` for this call."""
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 4:
                raise ValueError(
                    f"SEAAttention.attend: {name} must be (B, H, N, d), got shape {tuple(t.shape)}"
                )
        if q.shape[1] != self.num_heads or q.shape[-1] != self.head_dim:
            raise ValueError(
                f"SEAAttention.attend: q must have {self.num_heads} heads of size {self.head_dim}, got {tuple(q.shape)}"
            )
        if (
            k.shape != v.shape
            or k.shape[1] != self.num_kv_heads
            or k.shape[2] != q.shape[2]
            or k.shape[0] != q.shape[0]
        ):
            raise ValueError(
                f"SEAAttention.attend: k and v must be (B, {self.num_kv_heads}, N, {self.head_dim}) matching q "
                f"{tuple(q.shape)}, got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        B, H, N, hd = q.shape
        budget = self.k if budget is None else budget
        details = return_details or return_attention
        features = self.predictor_features(q, k, v)
        wd = torch.float64 if q.dtype == torch.float64 else torch.float32
        gates = torch.sigmoid(self.gate_head(features).to(wd))
        if self.fixed_gates:
            gates = torch.ones_like(gates)
        T, Hkv = self.compressed_len, k.shape[1]
        G = H // Hkv
        lengths = (
            torch.arange(1, N + 1, device=q.device) if self.causal else torch.full((N,), N, device=q.device)
        )
        start, end = column_ranges(lengths, T)
        qg = q.to(wd).reshape(B, Hkv, G, N, hd)
        kg, vg = k.to(wd).unsqueeze(2), v.to(wd).unsqueeze(2)
        # queries in chunks: estimate, select and attend one chunk at a time, so the N x T estimate
        # and the chunk's scores against the keys exist for one chunk only
        chunk = _query_chunk(B * H, N, max(N, T))
        sparse_parts, kept_parts, score_parts, prob_parts, selected_parts = [], [], [], [], []
        column_mass = None
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            scores = self.estimate_rows(features, s, e)
            probs = torch.softmax(scores.to(wd), -1)
            selected = _grouped_topk_columns(probs, lengths[s:e], budget, self.group_heads)
            kept_parts.append((selected * (end[s:e] - start[s:e])).sum(-1))
            sparse_parts.append(
                _sparse_rows_saving_memory(
                    qg[:, :, :, s:e], kg, vg, selected, start[s:e], end[s:e], lengths[s:e], hd**-0.5, "auto"
                )
            )
            if not self.causal:
                mass = probs.sum(-2)
                column_mass = mass if column_mass is None else column_mass + mass
            if details:
                score_parts.append(scores)
                prob_parts.append(probs)
                selected_parts.append(selected)
        sparse = torch.cat(sparse_parts, 2)
        kept = torch.cat(kept_parts, -1)
        vf = v.to(wd).unsqueeze(2).expand(-1, -1, G, -1, -1).reshape(B, H, N, hd)
        if self.causal:
            average = vf.cumsum(-2) / torch.arange(1, N + 1, device=q.device, dtype=vf.dtype)[:, None]
            avg_weights = torch.ones(B, H, N, device=q.device, dtype=wd)  # uniform over the prefix
        else:
            col = torch.searchsorted(start[0].contiguous(), torch.arange(N, device=q.device), right=True) - 1
            size = (end - start)[0].clamp_min(1).to(wd)
            col_mass = column_mass / N  # (B, H, T): the estimate's mean over queries
            avg_weights = (col_mass / size)[..., col]  # (B, H, N): per key
            avg_weights = avg_weights / avg_weights.sum(-1, keepdim=True)
            average = (avg_weights.unsqueeze(-2) @ vf).expand(B, H, N, hd)
            avg_weights = avg_weights.unsqueeze(-2)
        g0, g1 = gates[..., :1], gates[..., 1:]
        out = g1 * (g0 * sparse) + (1 - g1) * average
        out = out.to(q.dtype)
        if not details:
            return out
        scores, probs, selected = (torch.cat(x, 2) for x in (score_parts, prob_parts, selected_parts))
        attention = None
        if return_attention:
            attention = self._dense_attention(q, k, selected, gates, avg_weights)
        return SEAOutput(
            out, sparse.to(q.dtype), scores, probs, selected, kept, gates, avg_weights, attention
        )

    def _dense_attention(self, q, k, selected, gates, avg_weights) -> Tensor:
        """The effective N x N attention: gated sparse probabilities plus the averaging weights."""
        B, H, N, hd = q.shape
        col = compressed_column_of_key(N, self.compressed_len, self.causal, q.device)  # (N, N)
        keep = torch.gather(selected, -1, col.clamp_min(0).expand(B, H, N, N)) & (col >= 0)
        wd = gates.dtype
        kf = k.to(wd).repeat_interleave(H // k.shape[1], 1)
        logits = (q.to(wd) @ kf.transpose(-1, -2)) * hd**-0.5
        p = torch.nan_to_num(torch.softmax(logits.masked_fill(~keep, float("-inf")), -1))
        g0, g1 = gates[..., :1], gates[..., 1:]
        if self.causal:
            uniform = torch.ones(N, N, device=q.device, dtype=wd).tril()
            avg = uniform / uniform.sum(-1, keepdim=True)
        else:
            avg = avg_weights.expand(B, H, N, N)
        return g1 * g0 * p + (1 - g1) * avg

    def forward(self, x: Tensor, return_details: bool = False) -> Tensor | tuple[Tensor, SEAOutput]:
        if x.dim() != 3 or x.shape[-1] != self.q_proj.in_features:
            raise ValueError(
                f"SEAAttention: x must be (B, N, {self.q_proj.in_features}), got {tuple(x.shape)}"
            )
        B, N, C = x.shape
        q, k, v = self.project_qkv(x)
        details = self.attend(q, k, v, return_details=True) if return_details else None
        out = details.output if details is not None else self.attend(q, k, v)
        ctx = out.transpose(1, 2).reshape(B, N, C)
        if self.output_norm is not None:
            ctx = self.output_norm(ctx) + ctx
        y = self.proj(ctx)
        return (y, details) if return_details else y


def sea_distillation_loss(
    details: SEAOutput,
    teacher_probs: Tensor,
    *,
    causal: bool,
    student_logits: Tensor | None = None,
    context: Tensor | None = None,
    teacher_context: Tensor | None = None,
) -> dict[str, Tensor]:
    """The SEA distillation terms (sum them, plus the task loss).

    ``estimation``: 0.1 KL(teacher || estimate) + MSE, on the teacher's attention mass per
    compressed column; ``attention``: the same between the student's full attention (softmax of
    ``student_logits``, (B, H, N, N), already masked) and the teacher's; ``context``: MSE between
    contexts. teacher_probs is (B, H, N, N).
    """
    B, H, N, T = details.estimated_probs.shape
    if teacher_probs.shape != (B, H, N, N):
        raise ValueError(
            f"sea_distillation_loss: teacher_probs must be {(B, H, N, N)}, got {tuple(teacher_probs.shape)}"
        )
    col = compressed_column_of_key(N, T, causal, teacher_probs.device)
    target = torch.zeros(B, H, N, T + 1, device=teacher_probs.device, dtype=torch.float32)
    target.scatter_add_(-1, torch.where(col >= 0, col, T).expand(B, H, N, N), teacher_probs.float())
    target = target[..., :T]
    est = details.estimated_probs.float()
    rows = B * H * N
    terms = {
        "estimation": 0.1
        * F.kl_div(torch.log(est.clamp_min(1e-12)).view(rows, T), target.view(rows, T), reduction="batchmean")
        + F.mse_loss(est, target)
    }
    if student_logits is not None:
        logp = torch.log_softmax(student_logits.float(), -1).clamp_min(-1e4)
        terms["attention"] = 0.1 * F.kl_div(
            logp.view(rows, N), teacher_probs.float().view(rows, N), reduction="batchmean"
        ) + F.mse_loss(logp.exp(), teacher_probs.float())
    if context is not None and teacher_context is not None:
        terms["context"] = F.mse_loss(context.float(), teacher_context.float())
    return terms
