"""Sparse mixture of experts with graph-of-tokens routing.

Paper: "Improving Routing in Sparse Mixture of Experts with Graph of Tokens",
T. Nguyen, N. N. Tran, K. Nguyen, R. G. Baraniuk, arXiv 2505.00792 (2025). No upstream code.

Algorithm (tokens ``x_i``, experts ``f_e``, router logits ``W_g x_i + b_g``):

- standard router: ``P = softmax(W_g X + b_g)`` per token, each token keeps the ``top_k``
  largest entries of its row of ``P``;
- Similarity-Aware router (paper, section 2): tokens are nodes of a graph whose edge weights
  are ``S = row_softmax(X W_s X^T / tau)``; token ``i`` picks its expert through a neighbour
  ``j`` drawn from row ``i`` of ``S``, so its expert distribution is ``P~ = S P`` and the
  ``top_k`` is taken on ``P~``;
- Attention-Aware router (paper, section 3): in an attention + MoE block, the attention
  matrix ``A`` of the preceding attention layer already is such a token graph;
  ``P~ = A P`` with ``A`` averaged over heads. A causal ``A`` keeps causality.

The selected entries of ``P~`` are the gate values (renormalised over the ``top_k`` when
``normalize_gates``). With ``S = I`` every router reduces to the standard one exactly.

Provenance of these formulas: the paper's abstract and section titles (2: routing in SMoE
with a graph of tokens; 3: routing in an MoE-Transformer, attention as the graph; 4: entropy
analysis) fix the two routers' roles; the equations above (mixing applied to the softmax
probabilities, ``S`` a row-softmax of a bilinear ``X W_s X^T / tau``, ``A`` averaged over
heads, top-k taken on ``P~`` and its gates renormalised) follow the issue's statement of
them and are not checked against the paper's numbered equations or its section-5
hyperparameters. Choices of ours: ``W_s`` is a learnable ``dim x dim`` matrix initialised
to the identity, ``tau`` defaults to ``sqrt(dim)`` (dot-product-attention scaling), features
are not normalised before the similarity, and with ``causal=True`` the similarity graph is
masked to past tokens so a language model's routing never sees the future (the attention
router inherits causality from a causal ``A``).

Dispatch is batched (no Python loop over tokens): assignments get a slot in a
``[num_experts, capacity, dim]`` buffer through a cumulative count (top-1 choices first,
then top-2, ... as in GShard), assignments past ``capacity = ceil(capacity_factor *
tokens * top_k / num_experts)`` are dropped (their output is zero; the residual carries the
token), and the experts run as one batched matmul. ``capacity_factor=None`` drops nothing.
The Switch-Transformer load-balancing loss ``E * sum_e f_e * mean_i P~_ie`` is returned
in the routing record. ``dense_expert_mixture`` (every expert on every token) is the plain
reference beside the sparse path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MoE",
    "RoutingInfo",
    "dense_expert_mixture",
    "dispatch_slots",
    "expert_capacity",
    "graph_mixed_probs",
    "load_balancing_loss",
    "similarity_graph",
    "sparse_expert_mixture",
    "top_k_gates",
]

ROUTERS = ("softmax", "similarity", "attention")
_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


@dataclass
class RoutingInfo:
    """What the router decided for one forward pass.

    probs: ``[B, N, E]`` routing distribution used for top-k (``P~``, or ``P`` for softmax).
    expert_index, gates, kept: ``[B, N, k]`` chosen experts, their weights, and whether the
    assignment fitted within the expert's capacity.
    aux_loss: load-balancing loss (scalar, differentiable).
    expert_load: ``[E]`` share of kept assignments per expert (sums to 1).
    capacity: slots per expert used by the sparse dispatch.
    """

    probs: torch.Tensor
    expert_index: torch.Tensor
    gates: torch.Tensor
    kept: torch.Tensor
    aux_loss: torch.Tensor
    expert_load: torch.Tensor
    capacity: int

    @property
    def dropped_fraction(self) -> float:
        return 1.0 - self.kept.float().mean().item()


def similarity_graph(
    x: torch.Tensor, weight: torch.Tensor, temperature: float, causal: bool = False
) -> torch.Tensor:
    """``S = row_softmax(x W x^T / temperature)``, ``x [B, N, C]``, ``W [C, C]`` -> ``[B, N, N]``.

    With ``causal`` row ``i`` only sees columns ``j <= i``. Scores are computed in fp32 (or the
    input's dtype if wider).
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute)
    scores = (xc @ weight.to(compute)) @ xc.transpose(-1, -2) / temperature
    if causal:
        n = x.shape[-2]
        future = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1)


def graph_mixed_probs(probs: torch.Tensor, graph: torch.Tensor) -> torch.Tensor:
    """``P~ = G P``: each token's expert distribution mixed over its graph neighbours.

    ``probs [B, N, E]``; ``graph [B, N, N]`` (rows are distributions) or ``[B, H, N, N]``
    (averaged over heads first). Rows of ``P~`` are distributions when rows of ``G`` are.
    """
    if graph.dim() == 4:
        graph = graph.mean(dim=1)
    return graph.to(probs.dtype) @ probs


def top_k_gates(probs: torch.Tensor, k: int, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[..., k]`` of the ``k`` largest entries and their values (renormalised to sum 1)."""
    gates, index = probs.topk(k, dim=-1)
    if normalize:
        gates = gates / gates.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(gates.dtype).tiny)
    return index, gates


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: Optional[float]) -> int:
    """Slots per expert: ``ceil(capacity_factor * tokens * top_k / experts)``; all tokens if None."""
    if capacity_factor is None:
        return num_tokens
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def dispatch_slots(
    expert_index: torch.Tensor, num_experts: int, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot of every assignment in its expert's buffer and whether it fits.

    ``expert_index [T, k]``. Priority is choice-major: every token's first choice is placed
    before any second choice, tokens in order within a choice. Returns ``slot [T, k]`` (long)
    and ``kept [T, k]`` (bool, ``slot < capacity``).
    """
    t, k = expert_index.shape
    choice_major = expert_index.t().reshape(-1)  # [k*T]
    one_hot = F.one_hot(choice_major, num_experts)  # [k*T, E]
    position = one_hot.cumsum(dim=0).gather(1, choice_major[:, None]).squeeze(1) - 1
    slot = position.view(k, t).t()
    return slot, slot < capacity


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss ``E * sum_e f_e * p_e``.

    ``f_e``: share of the ``T * k`` assignments that chose expert ``e`` (no gradient);
    ``p_e``: mean routing probability of expert ``e``. Equals 1 for perfectly uniform routing.
    """
    probs = probs.reshape(-1, num_experts)
    counts = torch.bincount(expert_index.reshape(-1), minlength=num_experts).to(probs.dtype)
    share = counts / counts.sum()
    return num_experts * (share * probs.mean(dim=0)).sum()


def _expert_ffn(h: torch.Tensor, w_in, b_in, w_out, b_out, activation) -> torch.Tensor:
    """Batched two-layer FFN: ``h [E, S, C]`` with weights ``[E, C, H]``, ``[E, H, C]``."""
    hidden = activation(torch.baddbmm(b_in.unsqueeze(1), h, w_in))
    return torch.baddbmm(b_out.unsqueeze(1), hidden, w_out)


def sparse_expert_mixture(
    x: torch.Tensor,
    expert_index: torch.Tensor,
    gates: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor,
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    capacity: Optional[int] = None,
    activation: str = "gelu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Capacity-buffer dispatch: ``x [T, C]``, ``expert_index/gates [T, k]`` -> ``(y [T, C], kept)``.

    Every kept assignment's token is copied into ``buffer[expert, slot]``, the experts run as
    one batched matmul over ``[E, capacity, C]``, and outputs are scattered back weighted by
    their gates. ``capacity=None`` sizes the buffer to the busiest expert (nothing dropped).
    """
    t, c = x.shape
    e = w_in.shape[0]
    k = expert_index.shape[1]
    if capacity is None:
        slot, _ = dispatch_slots(expert_index, e, t)
        capacity = int(slot.max().item()) + 1 if slot.numel() else 1
    slot, kept = dispatch_slots(expert_index, e, capacity)
    token = torch.arange(t, device=x.device).unsqueeze(1).expand(t, k)
    flat_expert = expert_index[kept]
    flat_slot = slot[kept]
    flat_token = token[kept]
    buffer = x.new_zeros(e, capacity, c)
    buffer[flat_expert, flat_slot] = x[flat_token]
    out = _expert_ffn(buffer, w_in, b_in, w_out, b_out, _ACTIVATIONS[activation])
    weighted = out[flat_expert, flat_slot] * gates[kept].unsqueeze(-1).to(out.dtype)
    y = x.new_zeros(t, c).index_add(0, flat_token, weighted.to(x.dtype))
    return y, kept


def dense_expert_mixture(
    x: torch.Tensor,
    expert_index: torch.Tensor,
    gates: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor,
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    kept: Optional[torch.Tensor] = None,
    activation: str = "gelu",
) -> torch.Tensor:
    """Reference: every expert on every token, then the gate-weighted sum of the chosen ones.

    ``kept`` (``[T, k]`` bool) zeroes assignments the sparse path dropped. Costs ``E / k``
    times the sparse FLOPs; this is the "dense equivalent" the benchmark compares against.
    """
    t, _ = x.shape
    e = w_in.shape[0]
    all_out = _expert_ffn(
        x.unsqueeze(0).expand(e, -1, -1), w_in, b_in, w_out, b_out, _ACTIVATIONS[activation]
    )
    weights = gates if kept is None else gates * kept.to(gates.dtype)
    combine = x.new_zeros(t, e, dtype=weights.dtype).scatter_add(1, expert_index, weights)
    return torch.einsum("te,etc->tc", combine.to(all_out.dtype), all_out).to(x.dtype)


class MoE(nn.Module):
    """Sparse MoE feed-forward layer with a standard, similarity-aware or attention-aware router.

    Parameters
    ----------
    dim: token width ``C``.
    num_experts: ``E`` experts, each ``Linear(C, hidden) -> activation -> Linear(hidden, C)``.
    top_k: experts per token.
    router: ``"softmax"`` (standard), ``"similarity"`` (``P~ = S P``) or ``"attention"``
        (``P~ = mean_h(A) P``, ``attn`` required in ``forward``).
    hidden: expert hidden width (default ``4 * dim``).
    capacity_factor: slots per expert relative to a uniform split; ``None`` drops nothing.
    normalize_gates: renormalise the ``top_k`` gate values to sum to one.
    temperature: ``tau`` of the similarity router (default ``sqrt(dim)``).
    causal: mask the similarity graph to past tokens (use in causal language models).
    dispatch: ``"sparse"`` (capacity buffer) or ``"dense"`` (reference, all experts).

    ``forward(x [B, N, C], attn=None, return_routing=False)`` returns ``y [B, N, C]`` and,
    with ``return_routing``, a :class:`RoutingInfo`. The last routing is also kept in
    ``self.last_routing`` so a training loop can add ``aux_loss``.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 2,
        router: str = "softmax",
        hidden: Optional[int] = None,
        capacity_factor: Optional[float] = None,
        normalize_gates: bool = True,
        temperature: Optional[float] = None,
        causal: bool = False,
        activation: str = "gelu",
        dispatch: str = "sparse",
    ) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim: expected a positive int, got {dim}")
        if num_experts <= 0:
            raise ValueError(f"num_experts: expected a positive int, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k: expected 1 <= top_k <= num_experts={num_experts}, got {top_k}")
        if router not in ROUTERS:
            raise ValueError(f"router: expected one of {ROUTERS}, got {router!r}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor: expected None or > 0, got {capacity_factor}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation: expected one of {tuple(_ACTIVATIONS)}, got {activation!r}")
        if dispatch not in ("sparse", "dense"):
            raise ValueError(f"dispatch: expected 'sparse' or 'dense', got {dispatch!r}")
        hidden = 4 * dim if hidden is None else hidden
        if hidden <= 0:
            raise ValueError(f"hidden: expected a positive int, got {hidden}")
        self.dim, self.num_experts, self.top_k, self.hidden = dim, num_experts, top_k, hidden
        self.router, self.capacity_factor, self.normalize_gates = router, capacity_factor, normalize_gates
        self.temperature = math.sqrt(dim) if temperature is None else float(temperature)
        self.causal, self.activation, self.dispatch = causal, activation, dispatch

        self.gate = nn.Linear(dim, num_experts)
        if router == "similarity":
            self.similarity_weight = nn.Parameter(torch.eye(dim))
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b_in = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b_out = nn.Parameter(torch.zeros(num_experts, dim))
        self.reset_parameters()
        self.last_routing: Optional[RoutingInfo] = None

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_in, std=self.dim**-0.5)
        nn.init.normal_(self.w_out, std=self.hidden**-0.5)
        nn.init.zeros_(self.b_in)
        nn.init.zeros_(self.b_out)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, router={self.router!r}, "
            f"hidden={self.hidden}, capacity_factor={self.capacity_factor}, causal={self.causal}"
        )

    def _check_inputs(self, x: torch.Tensor, attn: Optional[torch.Tensor]) -> None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected [B, N, {self.dim}], got {list(x.shape)}")
        if self.router == "attention":
            b, n, _ = x.shape
            if attn is None:
                raise ValueError(
                    "attn: the attention router needs the block's attention [B, H, N, N], got None"
                )
            if attn.dim() != 4 or attn.shape[0] != b or attn.shape[2:] != (n, n):
                raise ValueError(f"attn: expected [{b}, H, {n}, {n}], got {list(attn.shape)}")
        elif attn is not None:
            raise ValueError(
                f"attn: only the 'attention' router takes it, this MoE uses router={self.router!r}"
            )

    def routing_probs(self, x: torch.Tensor, attn: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The distribution the top-k is taken on: ``P`` (softmax) or ``P~`` (graph routers)."""
        logits = self.gate(x)
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)
        if self.router == "similarity":
            graph = similarity_graph(x, self.similarity_weight, self.temperature, self.causal)
            probs = graph_mixed_probs(probs, graph)
        elif self.router == "attention":
            probs = graph_mixed_probs(probs, attn)
        return probs

    def forward(
        self, x: torch.Tensor, attn: Optional[torch.Tensor] = None, return_routing: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, RoutingInfo]:
        self._check_inputs(x, attn)
        b, n, c = x.shape
        probs = self.routing_probs(x, attn)
        expert_index, gates = top_k_gates(probs, self.top_k, self.normalize_gates)
        flat_x = x.reshape(b * n, c)
        flat_index = expert_index.reshape(b * n, self.top_k)
        flat_gates = gates.reshape(b * n, self.top_k)
        capacity = expert_capacity(b * n, self.num_experts, self.top_k, self.capacity_factor)
        params = (self.w_in, self.b_in, self.w_out, self.b_out)
        if self.dispatch == "sparse":
            cap = None if self.capacity_factor is None else capacity
            y, kept = sparse_expert_mixture(flat_x, flat_index, flat_gates, *params, cap, self.activation)
        else:
            _, kept = dispatch_slots(flat_index, self.num_experts, capacity)
            y = dense_expert_mixture(flat_x, flat_index, flat_gates, *params, kept, self.activation)
        counts = torch.bincount(flat_index[kept], minlength=self.num_experts).float()
        info = RoutingInfo(
            probs=probs,
            expert_index=expert_index,
            gates=gates,
            kept=kept.view(b, n, self.top_k),
            aux_loss=load_balancing_loss(probs, expert_index, self.num_experts),
            expert_load=counts / counts.sum().clamp_min(1.0),
            capacity=capacity,
        )
        self.last_routing = info
        y = y.view(b, n, c)
        return (y, info) if return_routing else y
