"""Mixture-of-Transformers block: modality-specific weights, global self-attention.

Paper: "Mixture-of-Transformers: A Sparse and Scalable Architecture for Multi-Modal
Foundation Models", W. Liang, L. Yu, L. Luo, S. Iyer, N. Dong, C. Zhou, G. Ghosh, M. Lewis,
W. Yih, L. Zettlemoyer, X. V. Lin, arXiv 2411.04996 (TMLR 2025); upstream
facebookresearch/Mixture-of-Transformers (``src/simple_ModalityUntiedAttention.py``,
``src/simple_ModalityUntiedFeedForward.py``).

Algorithm. Every token carries a modality id ``m`` (text, image, ...). All non-embedding
weights are untied by modality and picked deterministically by that id: the q/k/v/o
projections, the optional per-head q/k RMSNorms, the norms and the SwiGLU feed-forward.
Self-attention itself is global: queries of every modality attend to keys of every
modality (causally here). Following upstream's layout (Chameleon's norm placement), the
modality norms act on the sub-layer outputs:

    h   = x + attn_norm_m( W_o,m  Attention(W_q,m x, W_k,m x, W_v,m x) )
    out = h + ffn_norm_m( W_2,m (silu(W_1,m h) * W_3,m h) )

Each token goes through exactly one set of weights, so FLOPs per token equal those of the
dense transformer of the same width while the parameters grow with the number of
modalities. With one modality, or identical weights in every modality, the block is that
dense transformer block exactly.

Dispatch: tokens are grouped by modality with one index-select per modality (a loop over
modalities, never over tokens); the attention runs through
``torch.nn.functional.scaled_dot_product_attention`` with the explicit softmax as the
reference path (``use_sdpa=False``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MoTBlock", "modality_linear"]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    compute = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute)
    return (xc * torch.rsqrt(xc.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.to(compute)).to(x.dtype)


def _modality_groups(modality: torch.Tensor, num_modalities: int) -> list[Optional[torch.Tensor]]:
    """Token indices of each modality in the flattened ``modality [T]`` (None when absent)."""
    if num_modalities == 1:
        return [None]
    order = torch.argsort(modality, stable=True)
    counts = torch.bincount(modality, minlength=num_modalities).tolist()
    return list(order.split(counts))


def modality_linear(
    x: torch.Tensor, groups: list[Optional[torch.Tensor]], weight: torch.Tensor, out_features: int
) -> torch.Tensor:
    """``y_t = W[m_t] x_t`` for ``x [T, in]``, ``weight [M, out, in]``; groups from the modality ids.

    A modality with no token touches none of its weights (its gradient stays zero).
    """
    if len(groups) == 1 and groups[0] is None:
        return F.linear(x, weight[0])
    parts = [
        (index, F.linear(x.index_select(0, index), weight[m]))
        for m, index in enumerate(groups)
        if index is not None and index.numel()
    ]
    y = parts[0][1].new_empty(x.shape[0], out_features)  # the dtype autocast chose for the products
    for index, part in parts:
        y = y.index_copy(0, index, part)
    return y


def _modality_rows(values: torch.Tensor, groups: list[Optional[torch.Tensor]], num_rows: int) -> torch.Tensor:
    """Per-token rows ``[T, D]`` of a per-modality table ``values [M, D]``."""
    if len(groups) == 1 and groups[0] is None:
        return values[0].expand(num_rows, -1)
    out = values.new_empty(num_rows, values.shape[1])
    for m, index in enumerate(groups):
        if index is not None and index.numel():
            out = out.index_copy(0, index, values[m].expand(index.numel(), -1))
    return out


class MoTBlock(nn.Module):
    """One Mixture-of-Transformers layer.

    Parameters
    ----------
    dim: width ``C``; num_heads: ``H`` (divides ``C``); num_modalities: ``M``.
    hidden: SwiGLU hidden width (default ``8 dim / 3`` rounded up to a multiple of 8,
        upstream's ``2/3 * 4 dim`` rule).
    causal: causal global attention.
    qk_norm: per-modality RMSNorm of each head's queries and keys (upstream option).
    dropout: attention dropout probability.
    use_sdpa: attention through ``scaled_dot_product_attention``; False uses the explicit
        softmax reference.

    ``forward(x [B, N, C], modality [B, N] long)`` -> ``[B, N, C]``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_modalities: int = 2,
        hidden: Optional[int] = None,
        causal: bool = True,
        qk_norm: bool = False,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
        use_sdpa: bool = True,
    ) -> None:
        super().__init__()
        if dim <= 0 or num_heads <= 0 or dim % num_heads:
            raise ValueError(f"num_heads: expected a positive divisor of dim={dim}, got {num_heads}")
        if num_modalities <= 0:
            raise ValueError(f"num_modalities: expected a positive int, got {num_modalities}")
        hidden = 8 * ((8 * dim // 3 + 7) // 8) if hidden is None else hidden
        if hidden <= 0:
            raise ValueError(f"hidden: expected a positive int, got {hidden}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.num_modalities, self.hidden = num_modalities, hidden
        self.causal, self.qk_norm, self.dropout, self.norm_eps, self.use_sdpa = (
            causal,
            qk_norm,
            dropout,
            norm_eps,
            use_sdpa,
        )
        m = num_modalities
        self.wq = nn.Parameter(torch.empty(m, dim, dim))
        self.wk = nn.Parameter(torch.empty(m, dim, dim))
        self.wv = nn.Parameter(torch.empty(m, dim, dim))
        self.wo = nn.Parameter(torch.empty(m, dim, dim))
        if qk_norm:
            self.q_norm = nn.Parameter(torch.ones(m, self.head_dim))
            self.k_norm = nn.Parameter(torch.ones(m, self.head_dim))
        self.attn_norm = nn.Parameter(torch.ones(m, dim))
        self.w1 = nn.Parameter(torch.empty(m, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(m, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(m, dim, hidden))
        self.ffn_norm = nn.Parameter(torch.ones(m, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.wq, self.wk, self.wv, self.wo, self.w1, self.w3):
            nn.init.normal_(w, std=self.dim**-0.5)
        nn.init.normal_(self.w2, std=self.hidden**-0.5)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_modalities={self.num_modalities}, "
            f"hidden={self.hidden}, causal={self.causal}, qk_norm={self.qk_norm}"
        )

    def _check(self, x: torch.Tensor, modality: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected [B, N, {self.dim}], got {list(x.shape)}")
        if modality.shape != x.shape[:2]:
            raise ValueError(f"modality: expected shape {list(x.shape[:2])}, got {list(modality.shape)}")
        if modality.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"modality: expected an integer (long) tensor, got {modality.dtype}")
        if modality.numel():
            low, high = int(modality.min()), int(modality.max())
            if low < 0 or high >= self.num_modalities:
                raise ValueError(
                    f"modality: expected ids in [0, {self.num_modalities - 1}], got values in [{low}, {high}]"
                )

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        if self.use_sdpa:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if self.causal:
            n = q.shape[-2]
            scores = scores.masked_fill(
                torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf")
            )
        compute = torch.promote_types(q.dtype, torch.float32)
        probs = F.dropout(scores.to(compute).softmax(dim=-1).to(q.dtype), p=p, training=self.training)
        return probs @ v

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        self._check(x, modality)
        b, n, c = x.shape
        h, d = self.num_heads, self.head_dim
        flat = x.reshape(b * n, c)
        groups = _modality_groups(modality.reshape(-1).long(), self.num_modalities)
        # q, k, v (and later the two SwiGLU inputs) in one gather/matmul/scatter per modality
        qkv = modality_linear(flat, groups, torch.cat([self.wq, self.wk, self.wv], dim=1), 3 * c)
        q, k, v = qkv.split(c, dim=-1)
        if self.qk_norm:
            q_w = _modality_rows(self.q_norm, groups, b * n).unsqueeze(1)
            k_w = _modality_rows(self.k_norm, groups, b * n).unsqueeze(1)
            q = _rms_norm(q.view(b * n, h, d), q_w, self.norm_eps).view(b * n, c)
            k = _rms_norm(k.view(b * n, h, d), k_w, self.norm_eps).view(b * n, c)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, h, d).transpose(1, 2)

        attended = self._attention(heads(q), heads(k), heads(v)).transpose(1, 2).reshape(b * n, c)
        attn_out = modality_linear(attended, groups, self.wo, c)
        hidden_states = flat + _rms_norm(
            attn_out, _modality_rows(self.attn_norm, groups, b * n), self.norm_eps
        )
        gate_up = modality_linear(
            hidden_states, groups, torch.cat([self.w1, self.w3], dim=1), 2 * self.hidden
        )
        gate, up = gate_up.split(self.hidden, dim=-1)
        ffn_out = modality_linear(F.silu(gate) * up, groups, self.w2, c)
        out = hidden_states + _rms_norm(ffn_out, _modality_rows(self.ffn_norm, groups, b * n), self.norm_eps)
        return out.view(b, n, c)
