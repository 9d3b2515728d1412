"""MInference's offline per-head pattern search, and the JSON config it writes.

"MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention"
(Jiang et al., arXiv 2407.02490), Algorithm 1 (kernel-aware sparse pattern search): for every
attention head, each candidate pattern (A-shape, Vertical-Slash, Block-Sparse, each at a few
budgets) is run on a calibration input; the head gets the candidate whose output is closest to
dense attention among those whose cost fits the budget. Cost is what our kernel pays: the
fraction of causally reachable blocks the pattern keeps (its density). Closeness is the relative
L1 error of the head's output.

``search_head_patterns`` does one layer from its queries, keys and values;
``search_model_patterns`` captures every layer of a transformers causal LM on one sequence and
searches them all; ``save_pattern_config`` / ``load_pattern_config`` write and read the JSON that
``zoo.llm.sparse_prefill(model, "minference", config_path=...)`` applies.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from zoo.llm.configs import read_json_config, write_json_config
from zoo.progress import get_logger

__all__ = [
    "default_candidates",
    "load_pattern_config",
    "save_pattern_config",
    "search_head_patterns",
    "search_model_patterns",
]

CONFIG_KIND = "zoo.llm.minference_config"
log = get_logger("zoo.llm.pattern_search")


def default_candidates(seq_len: int, block_size: int = 64) -> list[dict[str, Any]]:
    """Each pattern at four budgets scaled to ``seq_len`` (1/32 to 1/4 of the keys or blocks)."""
    if seq_len < 1:
        raise ValueError(f"seq_len: expected a positive length, got {seq_len}")
    num_blocks = math.ceil(seq_len / block_size)
    candidates: list[dict[str, Any]] = []
    for frac in (1 / 32, 1 / 16, 1 / 8, 1 / 4):
        local = max(block_size, int(seq_len * frac))
        candidates.append({"pattern": "a_shape", "n_init": min(128, local), "n_local": local})
    for frac in (1 / 32, 1 / 16, 1 / 8, 1 / 4):
        candidates.append(
            {
                "pattern": "vertical_slash",
                "vertical_size": max(30, int(seq_len * frac / 2)),
                "slash_size": max(100, int(seq_len * frac)),
                "last_q": 64,
            }
        )
    for frac in (1 / 32, 1 / 16, 1 / 8, 1 / 4):
        candidates.append({"pattern": "block_sparse", "topk": max(2, int(num_blocks * frac))})
    return candidates


@torch.no_grad()
def search_head_patterns(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    candidates: list[dict[str, Any]],
    budget: float,
    block_size: int = 64,
    scale: float | None = None,
) -> list[dict[str, Any]]:
    """The best candidate of every query head (causal attention).

    Each returned dict is the candidate's pattern and parameters plus its measured ``density``,
    ``rel_l1`` and ``coverage`` for that head. A head whose candidates all exceed ``budget`` gets
    the cheapest one.
    """
    from zoo.kernels import block_sparse_attention
    from zoo.layers import MInference
    from zoo.llm.harness import attention_stats

    if not candidates:
        raise ValueError("candidates: expected at least one pattern")
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget: expected a density in (0, 1], got {budget}")
    heads = q.shape[1]
    measured = []
    for cand in candidates:
        layer = MInference(block_size=block_size, **cand)
        mask = layer.estimate(q, k, causal=True)
        out = block_sparse_attention(q, k, v, mask, causal=True, scale=scale, backend=layer.backend)
        measured.append(attention_stats(q, k, v, mask, out, causal=True, scale=scale))
    chosen = []
    for h in range(heads):
        rows = [(m["rel_l1"][h], m["density"][h], i) for i, m in enumerate(measured)]
        within = [r for r in rows if r[1] <= budget]
        err, density, best = min(within) if within else min(rows, key=lambda r: (r[1], r[0]))
        chosen.append(
            {
                **candidates[best],
                "density": round(density, 5),
                "rel_l1": round(err, 5),
                "coverage": round(measured[best]["coverage"][h], 5),
            }
        )
    return chosen


def search_model_patterns(
    model: nn.Module,
    input_ids: Tensor,
    *,
    budget: float = 0.3,
    block_size: int = 64,
    candidates: list[dict[str, Any]] | None = None,
    model_name: str = "",
) -> dict[str, Any]:
    """Capture every layer's q, k, v on ``input_ids [1, T]`` (dense model) and search each layer."""
    from zoo.llm.patch import capture_attention_inputs

    seq_len = int(input_ids.shape[1])
    candidates = default_candidates(seq_len, block_size) if candidates is None else candidates
    captured: dict[int, tuple[Tensor, Tensor, Tensor, float | None]] = {}

    def capture(layer_idx, q, k, v, scale):
        captured[layer_idx] = (q.detach(), k.detach(), v.detach(), scale)

    capture_attention_inputs(model, input_ids, capture)
    layers = []
    for idx in sorted(captured):
        q, k, v, scale = captured.pop(idx)
        layers.append(search_head_patterns(q, k, v, candidates, budget, block_size, scale))
        counts = {}
        for head in layers[-1]:
            counts[head["pattern"]] = counts.get(head["pattern"], 0) + 1
        log.info("layer %d: %s", idx, counts)
    return {
        "kind": CONFIG_KIND,
        "model": model_name,
        "seq_len": seq_len,
        "block_size": block_size,
        "budget": budget,
        "num_layers": len(layers),
        "num_heads": len(layers[0]) if layers else 0,
        "candidates": candidates,
        "layers": layers,
    }


def save_pattern_config(config: dict[str, Any], path: str | Path) -> Path:
    return write_json_config(config, path)


def load_pattern_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a config written by :func:`save_pattern_config` (one list of heads per layer)."""
    from zoo.layers import MInference

    config = read_json_config(path, CONFIG_KIND, "a MInference pattern config")
    layers = config.get("layers")
    if (
        not isinstance(layers, list)
        or not layers
        or not all(isinstance(layer, list) and layer for layer in layers)
    ):
        raise ValueError(f"config_path: expected 'layers' as a non-empty list of per-head lists in {path}")
    for i, layer in enumerate(layers):
        try:
            MInference(pattern=layer, block_size=int(config.get("block_size", 64)))
        except ValueError as err:
            raise ValueError(f"config_path: layer {i} of {path}: {err}") from None
    return config
