"""GIN-attention and the Sparse-GIN fine-tuning adapter.

Paper: "Graph-Aware Isomorphic Attention for Adaptive Dynamics in Transformers",
M. J. Buehler, arXiv 2501.02393; upstream code lamm-mit/Graph-Aware-Transformers
(``src/xgpt/Attention_GNN.py`` ``LlamaAttentionGIN``/``GINLayer``, and
``src/xgpt/llama_decoder_layer_with_gnn.py`` + ``graph_neural_network.py`` for Sparse-GIN).

GIN-attention reads the attention matrix as the adjacency of a token graph and replaces
"probabilities times values" by a Graph Isomorphism Network update per head:

    A   = softmax(alpha * Q K^T / sqrt(d) + causal mask)        (alpha learnable, init 1)
    X_h = head h of the hidden states (no value projection)
    out_h = MLP_h(eps_h * X_h + A_h X_h)                         (eps_h learnable, init 0)
    MLP_h = Linear(d, r d) -> Dropout -> RMSNorm -> SiLU -> Linear(r d, d)

then the heads are concatenated and an optional output projection applied (upstream's
default multiplier is ``r = 2``). With ``MLP = identity`` and ``eps = 0`` it is softmax
attention with ``V = identity``.

Sparse-GIN adapts a frozen pretrained model: the frozen layer's attention probabilities
``P [B, H, N, N]`` give a sparse causal adjacency

    adj = sigmoid(sharpness * (min(sum_h P_h, 1) - threshold)),
    adj_ij = 0 where adj_ij <= edge_threshold or j > i,

and a GIN on the hidden states ``h`` after the attention residual adds
``h + scale * RMSNorm(out_proj(act(GIN(in_proj(h)))))`` with
``GIN(x)_i = x~_i + MLP(x~_i)``, ``x~_i = eps * x_i + sum_j adj_ij x_j``; ``scale`` is trainable
(upstream defaults: sharpness 10, threshold 0.1, edge threshold 0.6, one GIN layer, PReLU,
hidden multiplier 1, scale growing linearly from 0 in the first to 0.5 in the last layer).
With ``scale = 0`` the adapted model is the frozen model exactly.

Difference from upstream: upstream builds the edge list from the nonzeros ``(i, j)`` of the
lower-triangular adjacency and then keeps only edges with ``source <= target``, which for
those edges leaves self-loops alone, so no token aggregates its past. Here the aggregation
is the dense masked product ``adj @ x`` over all ``j <= i`` (no edge list), which is what
the paper describes; the test ``test_sparse_gin_aggregates_all_past_tokens`` checks it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GINAttention",
    "SparseGINAdapter",
    "gin_aggregate",
    "gin_attention_reference",
    "sparse_gin_adjacency",
]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    compute = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute)
    out = xc * torch.rsqrt(xc.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (out * weight.to(compute)).to(x.dtype)


def gin_aggregate(x: torch.Tensor, adjacency: torch.Tensor, eps: torch.Tensor | float) -> torch.Tensor:
    """GIN neighbourhood sum ``eps * x_i + sum_j adjacency_ij x_j``.

    ``x [..., N, D]``, ``adjacency [..., N, N]`` broadcastable; ``eps`` scalar or broadcastable
    to ``x`` (e.g. ``[H, 1, 1]`` per head).
    """
    return eps * x + adjacency.to(x.dtype) @ x


class GINAttention(nn.Module):
    """Multi-head GIN-attention on hidden states ``x [B, N, C]``.

    Parameters
    ----------
    dim: width ``C`` (``num_heads`` divides it; head ``h`` aggregates channels
        ``h*d:(h+1)*d`` of ``x``).
    num_heads: heads ``H``.
    causal: mask future keys.
    mlp_ratio: hidden width of each head's MLP relative to the head dim (upstream default 2).
    dropout: dropout inside the MLPs (upstream 0.1); ``attn_dropout`` on ``A``.
    out_proj: add the output projection ``Linear(C, C)`` after the heads.
    use_mlp: False replaces every head's MLP by the identity (the paper's limiting case).
    qkv_bias: biases on the query/key projections.

    ``forward(x, return_attn=False)`` -> ``y [B, N, C]`` (and ``A [B, H, N, N]``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        causal: bool = True,
        mlp_ratio: float = 2.0,
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
        out_proj: bool = True,
        use_mlp: bool = True,
        qkv_bias: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if num_heads <= 0 or dim <= 0 or dim % num_heads:
            raise ValueError(f"num_heads: expected a positive divisor of dim={dim}, got {num_heads}")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio: expected > 0, got {mlp_ratio}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.causal, self.use_mlp, self.norm_eps = causal, use_mlp, norm_eps
        self.mlp_hidden = max(1, int(mlp_ratio * self.head_dim))
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.alpha = nn.Parameter(torch.tensor(1.0))
        self.eps = nn.Parameter(torch.zeros(num_heads))
        h, d, m = num_heads, self.head_dim, self.mlp_hidden
        if use_mlp:
            self.mlp_w1 = nn.Parameter(torch.empty(h, d, m))
            self.mlp_b1 = nn.Parameter(torch.empty(h, m))
            self.mlp_norm = nn.Parameter(torch.ones(h, m))
            self.mlp_w2 = nn.Parameter(torch.empty(h, m, d))
            self.mlp_b2 = nn.Parameter(torch.empty(h, d))
            for w, b, fan_in in ((self.mlp_w1, self.mlp_b1, d), (self.mlp_w2, self.mlp_b2, m)):
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(w, -bound, bound)
                nn.init.uniform_(b, -bound, bound)
        self.mlp_dropout = nn.Dropout(dropout)
        self.attn_dropout = nn.Dropout(attn_dropout)
        self.out_proj = nn.Linear(dim, dim) if out_proj else None

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, causal={self.causal}, "
            f"mlp_hidden={self.mlp_hidden if self.use_mlp else None}"
        )

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """``A = softmax(alpha Q K^T / sqrt(d) + mask)`` in fp32 (or wider), ``[B, H, N, N]``."""
        b, n, _ = x.shape
        compute = torch.promote_types(x.dtype, torch.float32)
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2).to(compute)
        k = self.k_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2).to(compute)
        scores = (q @ k.transpose(-1, -2)) * (self.alpha.to(compute) / math.sqrt(self.head_dim))
        if self.causal:
            future = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        return scores.softmax(dim=-1)

    def head_mlp(self, h: torch.Tensor) -> torch.Tensor:
        """Per-head MLP on ``h [B, H, N, d]`` (batched over heads)."""
        if not self.use_mlp:
            return h
        z = torch.einsum("bhnd,hdm->bhnm", h, self.mlp_w1) + self.mlp_b1[:, None, :]
        z = self.mlp_dropout(z)
        z = F.silu(_rms_norm(z, self.mlp_norm[:, None, :], self.norm_eps))
        return torch.einsum("bhnm,hmd->bhnd", z, self.mlp_w2) + self.mlp_b2[:, None, :]

    def forward(
        self, x: torch.Tensor, return_attn: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected [B, N, {self.dim}], got {list(x.shape)}")
        b, n, c = x.shape
        probs = self.attention_probs(x)
        adjacency = self.attn_dropout(probs)
        heads = x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        aggregated = gin_aggregate(heads, adjacency, self.eps.to(x.dtype)[:, None, None])
        out = self.head_mlp(aggregated).transpose(1, 2).reshape(b, n, c)
        if self.out_proj is not None:
            out = self.out_proj(out)
        return (out, probs) if return_attn else out


def gin_attention_reference(module: GINAttention, x: torch.Tensor) -> torch.Tensor:
    """Plain path: one head at a time, explicit softmax, explicit MLP (eval mode, no dropout)."""
    b, n, c = x.shape
    d = module.head_dim
    q = F.linear(x, module.q_proj.weight, module.q_proj.bias)
    k = F.linear(x, module.k_proj.weight, module.k_proj.bias)
    outputs = []
    for h in range(module.num_heads):
        sl = slice(h * d, (h + 1) * d)
        scores = module.alpha * (q[..., sl] @ k[..., sl].transpose(-1, -2)) / math.sqrt(d)
        if module.causal:
            scores = scores + torch.full((n, n), float("-inf"), dtype=x.dtype, device=x.device).triu(1)
        a = torch.softmax(scores, dim=-1)
        agg = module.eps[h] * x[..., sl] + a @ x[..., sl]
        if module.use_mlp:
            z = agg @ module.mlp_w1[h] + module.mlp_b1[h]
            z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + module.norm_eps) * module.mlp_norm[h]
            agg = F.silu(z) @ module.mlp_w2[h] + module.mlp_b2[h]
        outputs.append(agg)
    out = torch.cat(outputs, dim=-1)
    if module.out_proj is not None:
        out = F.linear(out, module.out_proj.weight, module.out_proj.bias)
    return out


def sparse_gin_adjacency(
    attn_probs: torch.Tensor,
    threshold: float = 0.1,
    sharpness: float = 10.0,
    edge_threshold: float = 0.6,
    clamp_max: float = 1.0,
    causal: bool = True,
    self_loops: bool = True,
) -> torch.Tensor:
    """Sparse-GIN adjacency ``[B, N, N]`` from attention probabilities ``[B, H, N, N]``.

    Sum over heads, clamp at ``clamp_max``, sharpen with ``sigmoid(sharpness * (a - threshold))``,
    zero every entry ``<= edge_threshold``, keep ``j <= i`` when ``causal`` (``j < i`` without
    ``self_loops``).
    """
    if attn_probs.dim() != 4 or attn_probs.shape[-1] != attn_probs.shape[-2]:
        raise ValueError(f"attn_probs: expected [B, H, N, N], got {list(attn_probs.shape)}")
    adj = attn_probs.sum(dim=1).clamp(max=clamp_max)
    adj = torch.sigmoid(sharpness * (adj - threshold))
    adj = torch.where(adj > edge_threshold, adj, torch.zeros_like(adj))
    n = adj.shape[-1]
    if causal or not self_loops:
        keep = torch.ones(n, n, dtype=torch.bool, device=adj.device)
        keep = (
            keep.tril(0 if self_loops else -1)
            if causal
            else ~torch.eye(n, dtype=torch.bool, device=adj.device)
        )
        adj = adj.masked_fill(~keep, 0.0)
    return adj


class SparseGINAdapter(nn.Module):
    """Sparse-GIN fine-tuning adapter for one frozen transformer layer.

    Parameters
    ----------
    dim: hidden width ``C`` of the frozen model.
    gnn_dim: width the GIN works in (``in_proj``/``out_proj`` when it differs from ``dim``).
    mlp_ratio: GIN MLP hidden width relative to ``gnn_dim`` (upstream README: 1).
    threshold, sharpness, edge_threshold, clamp_max: adjacency processing, see
        :func:`sparse_gin_adjacency`.
    dropout: after the GIN activation.
    init_scale: initial value of the trainable residual scale.
    norm: RMSNorm on the adapter output (upstream ``use_layer_norm=True``).

    ``forward(hidden [B, N, C], attn_probs [B, H, N, N])`` ->
    ``hidden + scale * norm(out_proj(act(GIN(in_proj(hidden), adj))))``.
    """

    def __init__(
        self,
        dim: int,
        gnn_dim: Optional[int] = None,
        mlp_ratio: float = 1.0,
        threshold: float = 0.1,
        sharpness: float = 10.0,
        edge_threshold: float = 0.6,
        clamp_max: float = 1.0,
        dropout: float = 0.1,
        init_scale: float = 0.0,
        norm: bool = True,
        causal: bool = True,
        self_loops: bool = True,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim: expected a positive int, got {dim}")
        gnn_dim = dim if gnn_dim is None else gnn_dim
        if gnn_dim <= 0 or mlp_ratio <= 0:
            raise ValueError(
                f"gnn_dim, mlp_ratio: expected > 0, got gnn_dim={gnn_dim}, mlp_ratio={mlp_ratio}"
            )
        self.dim, self.gnn_dim = dim, gnn_dim
        self.threshold, self.sharpness, self.edge_threshold, self.clamp_max = (
            threshold,
            sharpness,
            edge_threshold,
            clamp_max,
        )
        self.causal, self.self_loops, self.norm_eps = causal, self_loops, norm_eps
        hidden = max(1, int(mlp_ratio * gnn_dim))
        self.in_proj = nn.Linear(dim, gnn_dim) if gnn_dim != dim else None
        self.eps = nn.Parameter(torch.zeros(()))
        self.gin_fc1 = nn.Linear(gnn_dim, hidden)
        self.gin_act = nn.PReLU()
        self.gin_fc2 = nn.Linear(hidden, gnn_dim)
        self.act = nn.PReLU()
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(gnn_dim, dim) if gnn_dim != dim else None
        self.norm_weight = nn.Parameter(torch.ones(dim)) if norm else None
        self.scale = nn.Parameter(torch.tensor(float(init_scale)))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, gnn_dim={self.gnn_dim}, threshold={self.threshold}, sharpness={self.sharpness}, "
            f"edge_threshold={self.edge_threshold}"
        )

    def adjacency(self, attn_probs: torch.Tensor) -> torch.Tensor:
        return sparse_gin_adjacency(
            attn_probs,
            self.threshold,
            self.sharpness,
            self.edge_threshold,
            self.clamp_max,
            self.causal,
            self.self_loops,
        )

    def graph_update(self, hidden: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        """``norm(out_proj(act(GIN(in_proj(hidden)))))``, the term the trainable scale multiplies."""
        x = hidden if self.in_proj is None else self.in_proj(hidden)
        aggregated = gin_aggregate(x, adjacency, self.eps.to(x.dtype))
        out = aggregated + self.gin_fc2(self.gin_act(self.gin_fc1(aggregated)))
        out = self.dropout(self.act(out))
        if self.out_proj is not None:
            out = self.out_proj(out)
        if self.norm_weight is not None:
            out = _rms_norm(out, self.norm_weight, self.norm_eps)
        return out

    def forward(self, hidden: torch.Tensor, attn_probs: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 3 or hidden.shape[-1] != self.dim:
            raise ValueError(f"hidden: expected [B, N, {self.dim}], got {list(hidden.shape)}")
        b, n, _ = hidden.shape
        if attn_probs.dim() != 4 or attn_probs.shape[0] != b or attn_probs.shape[2:] != (n, n):
            raise ValueError(f"attn_probs: expected [{b}, H, {n}, {n}], got {list(attn_probs.shape)}")
        update = self.graph_update(hidden, self.adjacency(attn_probs))
        return hidden + self.scale.to(hidden.dtype) * update
