"""Routed FFN of SPT: the feed-forward hidden units in blocks, a sigmoid router keeps the top-k.

Paper: "SPT: Fine-Tuning Transformer-based Language Models Efficiently with Sparsification",
Y. Gui, X. Yan, P. Yin, H. Yang, J. Cheng, arXiv 2312.10365; upstream code ytgui/SPT-proto
(``naive_gpt/layers/sparse/feedforward.py``, ``naive_gpt/layers/tuning/lora_ffn.py``).

Algorithm. The ``hidden`` units of a two-layer FFN are split into ``num_blocks`` contiguous
blocks. A router ``p = sigmoid(W_r x + b_r)`` scores the blocks of each token and keeps the
``top_k`` (upstream: half of the blocks for OPT-style FFNs, a quarter for LLaMA-style
gated FFNs). Kept block ``b`` contributes with the coefficient ``c_b = 2 * p_b``, so the
router is trained through the output (top-k itself has no gradient) and ``p_b = 1/2`` means
unit scale. Following upstream's trained variant (``LoRARoutedFFN``), ``c_b`` multiplies
both the block's pre-activation and its output:

- OPT style:   ``y = b_2 + sum_{b kept} c_b * act(c_b * (x W_1[b]^T + b_1[b])) W_2[:, b]^T``
- LLaMA style: ``y = sum_{b kept} c_b * (act(c_b x G[b]^T) * (c_b x U[b]^T)) D[:, b]^T``

(The issue summary says "outputs of kept blocks scaled by 2 sigmoid(p)"; ``scale_input=False``
gives that output-only variant.) With every block kept and unit scale the layer is the dense
FFN exactly.

Dispatch ("tokens batched by the blocks they use"): every (token, block) assignment gets a
slot in a ``[num_blocks, max_load, dim]`` buffer, both matmuls run as one batched matmul
over the blocks, outputs are scattered back with ``index_add``; no Python loop over tokens
or blocks. ``routed_ffn_reference`` (all blocks computed, unkept ones masked) is the plain
path beside it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RoutedFFN", "block_dispatch", "routed_ffn_reference"]

STYLES = ("opt", "llama")
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def block_dispatch(block_index: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, int]:
    """Slot of every (token, block) assignment in its block's buffer, and the buffer length.

    ``block_index [T, k]`` -> ``slot [T, k]`` (tokens in order within each block), ``max_load``.
    """
    t, k = block_index.shape
    flat = block_index.reshape(-1)
    one_hot = F.one_hot(flat, num_blocks)
    slot = one_hot.cumsum(dim=0).gather(1, flat[:, None]).squeeze(1) - 1
    max_load = int(one_hot.sum(dim=0).max().item()) if flat.numel() else 1
    return slot.view(t, k), max(max_load, 1)


def routed_ffn_reference(
    x: torch.Tensor,
    block_index: torch.Tensor,
    coeff: torch.Tensor,
    weights: dict[str, torch.Tensor],
    num_blocks: int,
    style: str,
    activation: str,
    scale_input: bool = True,
) -> torch.Tensor:
    """Plain path: compute every hidden unit, zero the blocks a token did not keep.

    ``x [T, C]``, ``block_index/coeff [T, k]``; ``weights`` holds ``w1 [H, C], b1 [H], w2 [C, H],
    b2 [C]`` (OPT) or ``gate, up [H, C], down [C, H]`` (LLaMA).
    """
    t = x.shape[0]
    act = _ACTIVATIONS[activation]
    scale = x.new_zeros(t, num_blocks).scatter(1, block_index, coeff.to(x.dtype))
    if style == "opt":
        h_per_block = weights["w1"].shape[0] // num_blocks
        unit = scale.repeat_interleave(h_per_block, dim=1)
        pre = F.linear(x, weights["w1"], weights["b1"])
        hidden = act(pre * unit if scale_input else pre) * unit
        return F.linear(hidden, weights["w2"], weights["b2"])
    h_per_block = weights["gate"].shape[0] // num_blocks
    unit = scale.repeat_interleave(h_per_block, dim=1)
    g = F.linear(x, weights["gate"])
    u = F.linear(x, weights["up"])
    if scale_input:
        g, u = g * unit, u * unit
    hidden = act(g) * u * unit
    return F.linear(hidden, weights["down"])


class RoutedFFN(nn.Module):
    """SPT routed feed-forward layer.

    Parameters
    ----------
    dim: token width ``C``.
    hidden: FFN hidden width ``H`` (divisible by ``num_blocks``).
    num_blocks: number of hidden-unit blocks.
    top_k: blocks kept per token (default ``num_blocks // 2`` for ``style="opt"``,
        ``num_blocks // 4`` for ``"llama"``, at least 1).
    style: ``"opt"`` (``fc1 -> act -> fc2`` with biases) or ``"llama"`` (gated, no biases).
    activation: ``"relu"`` (OPT default), ``"silu"`` (LLaMA default) or ``"gelu"``.
    scale_input: apply ``2 sigmoid(p)`` to the pre-activation too (upstream); False scales the
        block outputs only.
    dispatch: ``"grouped"`` (tokens batched per block) or ``"masked"`` (reference).

    ``forward(x [..., C])`` returns ``[..., C]``; ``dense_forward`` is the ordinary FFN with the
    same weights (no routing), the equal-width baseline.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_blocks: int,
        top_k: Optional[int] = None,
        style: str = "opt",
        activation: Optional[str] = None,
        scale_input: bool = True,
        dispatch: str = "grouped",
    ) -> None:
        super().__init__()
        if style not in STYLES:
            raise ValueError(f"style: expected one of {STYLES}, got {style!r}")
        if dim <= 0 or hidden <= 0:
            raise ValueError(f"dim, hidden: expected positive ints, got dim={dim}, hidden={hidden}")
        if num_blocks <= 0 or hidden % num_blocks:
            raise ValueError(f"num_blocks: expected a positive divisor of hidden={hidden}, got {num_blocks}")
        if top_k is None:
            top_k = max(1, num_blocks // (2 if style == "opt" else 4))
        if not 1 <= top_k <= num_blocks:
            raise ValueError(f"top_k: expected 1 <= top_k <= num_blocks={num_blocks}, got {top_k}")
        activation = activation or ("relu" if style == "opt" else "silu")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation: expected one of {tuple(_ACTIVATIONS)}, got {activation!r}")
        if dispatch not in ("grouped", "masked"):
            raise ValueError(f"dispatch: expected 'grouped' or 'masked', got {dispatch!r}")
        self.dim, self.hidden, self.num_blocks, self.top_k = dim, hidden, num_blocks, top_k
        self.block_size = hidden // num_blocks
        self.style, self.activation, self.scale_input, self.dispatch = (
            style,
            activation,
            scale_input,
            dispatch,
        )
        if style == "opt":
            self.fc1 = nn.Linear(dim, hidden)
            self.fc2 = nn.Linear(hidden, dim)
        else:
            self.gate = nn.Linear(dim, hidden, bias=False)
            self.up = nn.Linear(dim, hidden, bias=False)
            self.down = nn.Linear(hidden, dim, bias=False)
        self.router = nn.Linear(dim, num_blocks)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden={self.hidden}, num_blocks={self.num_blocks}, top_k={self.top_k}, "
            f"style={self.style!r}, activation={self.activation!r}, scale_input={self.scale_input}"
        )

    def _weights(self) -> dict[str, torch.Tensor]:
        if self.style == "opt":
            return {"w1": self.fc1.weight, "b1": self.fc1.bias, "w2": self.fc2.weight, "b2": self.fc2.bias}
        return {"gate": self.gate.weight, "up": self.up.weight, "down": self.down.weight}

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept blocks ``[T, k]`` and their coefficients ``2 sigmoid(p)`` for ``x [T, C]``."""
        scores = torch.sigmoid(self.router(x))
        kept_scores, block_index = scores.topk(self.top_k, dim=-1)
        return block_index, 2.0 * kept_scores

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ordinary FFN with these weights: every block, unit scale, no router."""
        act = _ACTIVATIONS[self.activation]
        if self.style == "opt":
            return self.fc2(act(self.fc1(x)))
        return self.down(act(self.gate(x)) * self.up(x))

    def _grouped(self, x: torch.Tensor, block_index: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
        t, c = x.shape
        nb, bs, k = self.num_blocks, self.block_size, self.top_k
        act = _ACTIVATIONS[self.activation]
        slot, max_load = block_dispatch(block_index, nb)
        flat_block = block_index.reshape(-1)
        flat_slot = slot.reshape(-1)
        flat_token = torch.arange(t, device=x.device).repeat_interleave(k)
        flat_coeff = coeff.reshape(-1).to(x.dtype)
        buffer = x.new_zeros(nb, max_load, c)
        buffer[flat_block, flat_slot] = x[flat_token]
        scale = x.new_zeros(nb, max_load, 1)
        scale[flat_block, flat_slot, 0] = flat_coeff
        in_scale = scale if self.scale_input else 1.0
        if self.style == "opt":
            w1 = self.fc1.weight.view(nb, bs, c).transpose(1, 2)  # [nb, C, bs]
            b1 = self.fc1.bias.view(nb, 1, bs)
            hidden = act(torch.baddbmm(b1, buffer, w1) * in_scale) * scale
            w2 = self.fc2.weight.view(c, nb, bs).permute(1, 2, 0)  # [nb, bs, C]
            bias_out = self.fc2.bias
        else:
            g = torch.bmm(buffer, self.gate.weight.view(nb, bs, c).transpose(1, 2)) * in_scale
            u = torch.bmm(buffer, self.up.weight.view(nb, bs, c).transpose(1, 2)) * in_scale
            hidden = act(g) * u * scale
            w2 = self.down.weight.view(c, nb, bs).permute(1, 2, 0)
            bias_out = None
        out = torch.bmm(hidden, w2)  # [nb, max_load, C]
        y = x.new_zeros(t, c).index_add(0, flat_token, out[flat_block, flat_slot].to(x.dtype))
        return y if bias_out is None else y + bias_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected [..., {self.dim}], got {list(x.shape)}")
        shape = x.shape
        flat = x.reshape(-1, self.dim)
        block_index, coeff = self.route(flat)
        if self.dispatch == "grouped":
            y = self._grouped(flat, block_index, coeff)
        else:
            y = routed_ffn_reference(
                flat,
                block_index,
                coeff,
                self._weights(),
                self.num_blocks,
                self.style,
                self.activation,
                self.scale_input,
            )
        return y.view(shape)

    @classmethod
    def from_dense(
        cls,
        layers: tuple[nn.Linear, ...],
        num_blocks: int,
        top_k: Optional[int] = None,
        activation: Optional[str] = None,
        **kwargs,
    ) -> RoutedFFN:
        """Wrap a pretrained FFN: ``(fc1, fc2)`` (OPT style) or ``(gate, up, down)`` (LLaMA style).

        The router starts at zero weights and bias, i.e. every block scored ``p = 1/2`` (unit
        scale); it has to be trained before the top-k means anything.
        """
        style = "opt" if len(layers) == 2 else "llama"
        if len(layers) not in (2, 3):
            raise ValueError(f"layers: expected (fc1, fc2) or (gate, up, down), got {len(layers)} layers")
        dim, hidden = layers[0].in_features, layers[0].out_features
        module = cls(dim, hidden, num_blocks, top_k, style=style, activation=activation, **kwargs)
        targets = (module.fc1, module.fc2) if style == "opt" else (module.gate, module.up, module.down)
        with torch.no_grad():
            for dst, src in zip(targets, layers):
                if dst.weight.shape != src.weight.shape:
                    raise ValueError(
                        f"layers: expected weight {tuple(dst.weight.shape)}, got {tuple(src.weight.shape)}"
                    )
                dst.weight.copy_(src.weight)
                if dst.bias is not None:
                    if src.bias is None:
                        raise ValueError(
                            "layers: OPT-style FFN layers need biases, got a Linear without bias"
                        )
                    dst.bias.copy_(src.bias)
            nn.init.zeros_(module.router.weight)
            nn.init.zeros_(module.router.bias)
        return module.to(layers[0].weight.device, layers[0].weight.dtype)
