"""XAttention's per-head threshold profiling, and the JSON config it writes.

"XAttention: Block Sparse Attention with Antidiagonal Scoring" (Xu, Guo, Han et al., arXiv
2503.16428), section "Threshold Prediction": one cumulative threshold for every head of every
layer, profiled on calibration text, instead of one global ``tau``. The authors' long-context
evaluations run such a profiled table (their RULER script passes no threshold and loads the
per-(layer, head) table of the model).

For one attention head on one calibration sequence:

1. dense causal attention gives the true mass of every (query block, key block) pair;
2. per query block, the fewest key blocks that hold ``coverage`` (0.9) of the row's true mass
   are what the head needs; the smallest antidiagonal score among them is the row's cut;
3. the head's threshold is the share of all antidiagonal mass (summed over rows) that lies in
   blocks scoring at least their row's cut: with that ``tau`` the cumulative selection of
   :class:`~zoo.layers.XAttention` reaches, on average over rows, as deep as the blocks that the
   true attention needs.

The model's table is the maximum over calibration sequences. ``profile_model_thresholds``
captures each layer of a transformers causal LM in a dense forward pass
(:func:`zoo.llm.patch.capture_attention_inputs`) and profiles it; ``save_threshold_config`` / ``load_threshold_config`` write and
read the JSON that ``zoo.llm.sparse_prefill(model, "xattention", config_path=...)`` applies.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from zoo.llm.configs import read_json_config, write_json_config
from zoo.progress import get_logger, progress

__all__ = [
    "dense_block_mass",
    "head_thresholds",
    "load_threshold_config",
    "profile_model_thresholds",
    "save_threshold_config",
]

CONFIG_KIND = "zoo.llm.xattention_thresholds"
log = get_logger("zoo.llm.threshold_profile")


@torch.no_grad()
def dense_block_mass(
    q: Tensor, k: Tensor, block_size: int, causal: bool = True, scale: float | None = None
) -> Tensor:
    """Softmax attention mass per (query block, key block): ``[B, H, Qb, Kb]`` in fp32.

    Each row sums to the number of queries in its block. Queries are the last ``N`` of ``M``
    positions; grouped-query attention is read without repeating K. Memory is one query block of
    logits per head at a time.
    """
    from zoo.layers.xattention import check_attention_inputs

    check_attention_inputs(q, k)
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
    batch, heads, n, dim = q.shape
    kv_heads, m = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = dim**-0.5 if scale is None else scale
    num_q_blocks, num_k_blocks = math.ceil(n / block_size), math.ceil(m / block_size)
    kf = k.float().repeat_interleave(group, dim=1)
    key_pos = torch.arange(m, device=q.device)
    key_block = key_pos // block_size
    out = torch.zeros(batch, heads, num_q_blocks, num_k_blocks, dtype=torch.float32, device=q.device)
    for qb in range(num_q_blocks):
        rows = torch.arange(qb * block_size, min((qb + 1) * block_size, n), device=q.device)
        logits = (q[:, :, rows].float() @ kf.transpose(-1, -2)) * scale
        if causal:
            logits = logits.masked_fill(key_pos > (m - n + rows)[:, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1).sum(dim=-2)  # [B, H, M]
        out[:, :, qb].index_add_(-1, key_block, probs)
    return out


def _row_cut_thresholds(true_mass: Tensor, scores: Tensor, coverage: float) -> Tensor:
    """Per head ``[B, H]``: the share of antidiagonal mass at or above each row's cut (see module doc)."""
    ranked, order = torch.sort(true_mass, dim=-1, descending=True)
    cumulative = ranked.cumsum(-1)
    need = (cumulative < coverage * cumulative[..., -1:]).sum(-1, keepdim=True) + 1
    needed_sorted = torch.arange(ranked.shape[-1], device=ranked.device) < need
    scores_sorted = scores.gather(-1, order)
    cut = scores_sorted.masked_fill(~needed_sorted, float("inf")).amin(-1, keepdim=True)
    kept = scores * (scores >= cut)
    return kept.sum((-1, -2)) / scores.sum((-1, -2)).clamp_min(1e-30)


@torch.no_grad()
def head_thresholds(
    q: Tensor,
    k: Tensor,
    block_size: int = 128,
    stride: int = 8,
    coverage: float = 0.9,
    scale: float | None = None,
) -> Tensor:
    """Profiled XAttention threshold of every query head ``[H]`` (max over the batch), causal."""
    from zoo.layers import XAttention

    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage: expected a fraction in (0, 1], got {coverage}")
    layer = XAttention(block_size=block_size, stride=stride, threshold=1.0)
    scores = layer.block_scores(q, k, causal=True).float()
    true_mass = dense_block_mass(q, k, block_size, causal=True, scale=scale)
    return _row_cut_thresholds(true_mass, scores, coverage).amax(0).clamp(0.0, 1.0)


def profile_model_thresholds(
    model: nn.Module,
    sequences: Sequence[Tensor],
    *,
    block_size: int = 128,
    stride: int = 8,
    coverage: float = 0.9,
    model_name: str = "",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run each calibration sequence ``[1, T]`` through the dense model and profile every layer.

    Returns the config dict (``thresholds``: one list of per-head values per layer, the maximum
    over sequences; ``per_sequence``: each sequence's mean threshold).
    """
    from zoo.layers import XAttention
    from zoo.llm.patch import capture_attention_inputs

    if not sequences:
        raise ValueError("sequences: expected at least one calibration sequence")
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage: expected a fraction in (0, 1], got {coverage}")
    XAttention(block_size=block_size, stride=stride)  # bad block sizes and strides fail here, before any pass
    table: Tensor | None = None
    per_sequence = []
    for input_ids in progress(
        sequences, desc="profiling thresholds", disable=None if show_progress else True
    ):
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"sequences: expected tensors [1, T], got {tuple(input_ids.shape)}")
        if input_ids.shape[1] <= block_size:
            raise ValueError(
                f"sequences: expected more than block_size={block_size} tokens, got {input_ids.shape[1]}"
            )
        found: dict[int, Tensor] = {}

        def record(layer_idx, q, k, v, scale, found=found):
            found[layer_idx] = head_thresholds(q, k, block_size, stride, coverage, scale).cpu()

        capture_attention_inputs(model, input_ids, record)
        this = torch.stack([found[i] for i in sorted(found)])
        per_sequence.append(round(float(this.mean()), 5))
        table = this if table is None else torch.maximum(table, this)
    assert table is not None
    log.info("profiled thresholds: mean %.3f, min %.3f, max %.3f", table.mean(), table.min(), table.max())
    return {
        "kind": CONFIG_KIND,
        "model": model_name,
        "seq_len": int(max(s.shape[1] for s in sequences)),
        "sequences": len(sequences),
        "block_size": block_size,
        "stride": stride,
        "coverage": coverage,
        "num_layers": int(table.shape[0]),
        "num_heads": int(table.shape[1]),
        "per_sequence_mean": per_sequence,
        "thresholds": [[round(float(t), 5) for t in row] for row in table],
    }


def save_threshold_config(config: dict[str, Any], path: str | Path) -> Path:
    return write_json_config(config, path)


def load_threshold_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a config written by :func:`save_threshold_config`."""
    config = read_json_config(path, CONFIG_KIND, "an XAttention threshold config")
    table = config.get("thresholds")
    if (
        not isinstance(table, list)
        or not table
        or not all(isinstance(row, list) and row and len(row) == len(table[0]) for row in table)
    ):
        raise ValueError(f"config_path: expected 'thresholds' as equal-length per-head lists in {path}")
    values = [t for row in table for t in row]
    if not all(isinstance(t, (int, float)) and 0.0 <= t <= 1.0 for t in values):
        raise ValueError(f"config_path: thresholds must be numbers in [0, 1] in {path}")
    for key in ("block_size", "stride"):
        if not isinstance(config.get(key), int):
            raise ValueError(f"config_path: expected an int {key!r} in {path}")
    return config
