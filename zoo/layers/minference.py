"""MInference: dynamic sparse prefill with per-head attention patterns.

"MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention"
(Jiang et al., arXiv 2407.02490).

Long-context attention heads follow one of three shapes; each head gets the shape (and budget)
found offline, and the exact positions are estimated online from the input:

- ``"a_shape"``: attention sinks plus a local window (``n_init`` first keys, ``n_local`` recent
  keys; 128 and 3968 by default).
- ``"vertical_slash"``: the last ``last_q`` queries (64) estimate the attention; the top
  ``vertical_size`` key columns (1000) and the top ``slash_size`` diagonals (6096) are kept, with
  the first 30 columns and the last 100 diagonals always kept.
- ``"block_sparse"``: mean-pooled queries and keys score the blocks; the top ``topk`` key blocks
  (100) of each query block are kept.

Every pattern is expressed in the library's one mask format, a :class:`~zoo.kernels.BlockSparseMask`
(64 x 64 blocks by default), and runs on the one block-sparse kernel: a block is kept when it
holds a kept column, crosses a kept diagonal, or lies in the sink/window. Columns and diagonals
are thus rounded up to whole blocks (the upstream kernel handles columns element by element).

A per-head configuration (a list of ``{"pattern": ..., parameters}`` dicts, one per query head,
as written by the offline search of :mod:`zoo.llm.pattern_search`, the paper's Algorithm 1)
mixes patterns inside one layer: ``MInference(pattern=[...])``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from zoo.layers.xattention import check_attention_inputs

__all__ = ["MINFERENCE_PATTERNS", "MInference"]

MINFERENCE_PATTERNS = ("a_shape", "vertical_slash", "block_sparse")
# parameters each pattern reads, with their defaults
PATTERN_DEFAULTS: dict[str, dict[str, int]] = {
    "a_shape": {"n_init": 128, "n_local": 3968},
    "vertical_slash": {"vertical_size": 1000, "slash_size": 6096, "last_q": 64},
    "block_sparse": {"topk": 100},
}
FORCED_COLUMNS = 30
FORCED_DIAGONALS = 100


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _acc(t: Tensor) -> Tensor:
    """fp32 accumulation (fp64 for fp64 inputs)."""
    return t.double() if t.dtype == torch.float64 else t.float()


def _query_block_positions(n: int, m: int, block: int, device: Any) -> tuple[Tensor, Tensor]:
    q_block = torch.arange(_ceil_div(n, block), device=device)
    first = (m - n) + q_block * block
    last = (m - n) + torch.clamp((q_block + 1) * block, max=n) - 1
    return first, last


def _reachable(n: int, m: int, block: int, device: Any) -> Tensor:
    _, last = _query_block_positions(n, m, block, device)
    first_key = torch.arange(_ceil_div(m, block), device=device) * block
    return first_key[None, :] <= last[:, None]


def _check_pattern_config(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(cfg, dict) or cfg.get("pattern") not in MINFERENCE_PATTERNS:
        got = cfg.get("pattern") if isinstance(cfg, dict) else type(cfg).__name__
        raise ValueError(f"{where}: expected a dict with 'pattern' in {MINFERENCE_PATTERNS}, got {got!r}")
    name = cfg["pattern"]
    out: dict[str, Any] = {"pattern": name}
    for key, default in PATTERN_DEFAULTS[name].items():
        value = cfg.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where}: {name} parameter {key} must be a non-negative int, got {value!r}")
        out[key] = value
    if name == "vertical_slash" and out["last_q"] < 1:
        raise ValueError(f"{where}: vertical_slash parameter last_q must be >= 1, got {out['last_q']}")
    return out


def a_shape_blocks(n: int, m: int, block: int, n_init: int, n_local: int, device: Any) -> Tensor:
    """bool ``[Qb, Kb]``: sink blocks (first ``n_init`` keys) and the local window of ``n_local`` keys."""
    first, last = _query_block_positions(n, m, block, device)
    key_first = torch.arange(_ceil_div(m, block), device=device) * block
    key_last = key_first + block - 1
    sink = key_first < n_init
    window = (key_first[None, :] <= last[:, None]) & (key_last[None, :] >= (first - n_local + 1)[:, None])
    return (sink[None, :] | window) & _reachable(n, m, block, device)


def vertical_slash_indices(
    q: Tensor, k: Tensor, vertical_size: int, slash_size: int, last_q: int = 64
) -> tuple[Tensor, Tensor]:
    """Top columns and diagonals from the attention of the last ``last_q`` queries (causal).

    Returns ``(columns [B, H, V], offsets [B, H, S])`` (int64): key indices and diagonal offsets
    ``query position - key position``; the first 30 columns and the last 100 diagonals
    (offsets 0..99) rank first. Heads share key heads by ``h // (H // Hkv)``.
    """
    batch, heads, n, dim = q.shape
    kv_heads, m = k.shape[1], k.shape[2]
    group = heads // kv_heads
    last = min(last_q, n)
    query_pos = (m - n) + torch.arange(n - last, n, device=q.device)
    key_pos = torch.arange(m, device=q.device)
    n_vertical = min(m, max(vertical_size, FORCED_COLUMNS))
    n_slash = min(m, max(slash_size, 50))
    columns = torch.empty(batch, heads, n_vertical, dtype=torch.long, device=q.device)
    offsets = torch.empty(batch, heads, n_slash, dtype=torch.long, device=q.device)
    # offset o of query i addresses key query_pos[i] - o
    diag_key = query_pos[:, None] - torch.arange(m, device=q.device)[None, :]
    diag_valid = diag_key >= 0
    diag_key = diag_key.clamp(min=0)
    for hk in range(kv_heads):
        hs = slice(hk * group, (hk + 1) * group)
        q_last = _acc(q[:, hs, n - last :])
        logits = torch.matmul(q_last, _acc(k[:, hk : hk + 1]).transpose(-1, -2)) * dim**-0.5
        logits = logits.masked_fill(
            key_pos[None, None, None, :] > query_pos[None, None, :, None], float("-inf")
        )
        probs = torch.softmax(logits, dim=-1)  # [B, g, last, M]
        vertical = probs.sum(dim=2)
        vertical[..., :FORCED_COLUMNS] = float("inf")
        columns[:, hs] = torch.topk(vertical, n_vertical, dim=-1).indices
        per_offset = torch.gather(probs, -1, diag_key.expand(batch, group, last, m)) * diag_valid
        slash = per_offset.sum(dim=2)
        slash[..., :FORCED_DIAGONALS] = float("inf")
        offsets[:, hs] = torch.topk(slash, n_slash, dim=-1).indices
    return columns, offsets


def vertical_slash_blocks(columns: Tensor, offsets: Tensor, n: int, m: int, block: int) -> Tensor:
    """bool ``[B, H, Qb, Kb]``: blocks holding a kept column or crossed by a kept diagonal (causal)."""
    batch, heads = columns.shape[:2]
    device = columns.device
    num_k_blocks = _ceil_div(m, block)
    # earliest kept column of each key block: the block serves query blocks that reach it
    earliest_column = torch.full((batch, heads, num_k_blocks), m, dtype=torch.long, device=device)
    earliest_column.scatter_reduce_(-1, columns // block, columns, reduce="amin")
    # block (qb, kb) meets diagonal o iff o lies in [first_q - last_k, last_q - first_k]
    kept_offsets = torch.zeros(batch, heads, m, dtype=torch.int32, device=device)
    kept_offsets.scatter_(-1, offsets, 1)
    prefix = torch.nn.functional.pad(torch.cumsum(kept_offsets, dim=-1, dtype=torch.int32), (1, 0))
    first, last = _query_block_positions(n, m, block, device)
    key_first = torch.arange(num_k_blocks, device=device) * block
    key_last = torch.clamp(key_first + block - 1, max=m - 1)
    lo = (first[:, None] - key_last[None, :]).clamp(0, m)
    hi = (last[:, None] - key_first[None, :] + 1).clamp(0, m)
    blocks = torch.empty(batch, heads, first.shape[0], num_k_blocks, dtype=torch.bool, device=device)
    for h in range(heads):  # one head at a time bounds the [Qb, Kb] gathers
        crossed = prefix[:, h, hi] - prefix[:, h, lo] > 0
        blocks[:, h] = crossed | (earliest_column[:, h, None, :] <= last[None, :, None])
    return blocks & _reachable(n, m, block, device)


def block_sparse_scores(q: Tensor, k: Tensor, block: int) -> Tensor:
    """Mean-pooled query block . mean-pooled key block, ``[B, H, Qb, Kb]`` fp32 (GQA grouped)."""
    batch, heads, n, dim = q.shape
    kv_heads, m = k.shape[1], k.shape[2]
    num_q_blocks, num_k_blocks = _ceil_div(n, block), _ceil_div(m, block)
    q_counts = torch.clamp(n - torch.arange(num_q_blocks, device=q.device) * block, max=block).float()
    k_counts = torch.clamp(m - torch.arange(num_k_blocks, device=q.device) * block, max=block).float()
    q_pad = torch.nn.functional.pad(_acc(q), (0, 0, 0, num_q_blocks * block - n))
    k_pad = torch.nn.functional.pad(_acc(k), (0, 0, 0, num_k_blocks * block - m))
    pooled_q = q_pad.reshape(batch, heads, num_q_blocks, block, dim).sum(3) / q_counts[:, None]
    pooled_k = k_pad.reshape(batch, kv_heads, num_k_blocks, block, dim).sum(3) / k_counts[:, None]
    group = heads // kv_heads
    scores = torch.matmul(
        pooled_q.reshape(batch, kv_heads, group, num_q_blocks, dim), pooled_k[:, :, None].transpose(-1, -2)
    )
    return scores.reshape(batch, heads, num_q_blocks, num_k_blocks)


class MInference(nn.Module):
    """MInference sparse prefill with one pattern for all heads or one pattern per head.

    Parameters
    ----------
    pattern:
        ``"a_shape"``, ``"vertical_slash"`` or ``"block_sparse"``; or a list of per-head dicts
        ``{"pattern": name, **parameters}`` (one per query head).
    block_size:
        Block size of the mask (64 by default, as the upstream kernels).
    vertical_size, slash_size, last_q:
        Vertical-Slash budget: kept columns (1000), kept diagonals (6096), estimating queries (64).
    n_init, n_local:
        A-shape: sink keys (128) and local window (3968).
    topk:
        Block-Sparse: kept key blocks per query block (100).
    backend:
        Attention kernel backend: ``"auto"``, ``"triton"`` or ``"torch"``.
    """

    def __init__(
        self,
        pattern: str | list[dict[str, Any]] = "vertical_slash",
        *,
        block_size: int = 64,
        vertical_size: int = 1000,
        slash_size: int = 6096,
        last_q: int = 64,
        n_init: int = 128,
        n_local: int = 3968,
        topk: int = 100,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
        shared = {
            "vertical_size": vertical_size,
            "slash_size": slash_size,
            "last_q": last_q,
            "n_init": n_init,
            "n_local": n_local,
            "topk": topk,
        }
        if isinstance(pattern, str):
            if pattern not in MINFERENCE_PATTERNS:
                raise ValueError(
                    f"pattern: expected one of {MINFERENCE_PATTERNS} or a per-head list, got {pattern!r}"
                )
            self.head_configs: list[dict[str, Any]] | None = None
            self.config = _check_pattern_config({"pattern": pattern, **shared}, "pattern")
        elif isinstance(pattern, (list, tuple)) and pattern:
            self.head_configs = [
                _check_pattern_config(dict(c), f"pattern[{i}]") for i, c in enumerate(pattern)
            ]
            self.config = None
        else:
            raise ValueError(
                f"pattern: expected a pattern name or a non-empty list of per-head dicts, got {pattern!r}"
            )
        self.block_size = block_size
        self.backend = backend

    @property
    def pattern(self) -> str | list[str]:
        if self.head_configs is None:
            return self.config["pattern"]
        return [c["pattern"] for c in self.head_configs]

    def extra_repr(self) -> str:
        if self.head_configs is None:
            params = ", ".join(f"{k}={v}" for k, v in self.config.items() if k != "pattern")
            return f"pattern={self.config['pattern']!r}, block_size={self.block_size}, {params}"
        counts = {p: self.pattern.count(p) for p in MINFERENCE_PATTERNS if p in self.pattern}
        return f"per-head patterns {counts}, block_size={self.block_size}"

    def _pattern_blocks(self, cfg: dict[str, Any], q: Tensor, k: Tensor, causal: bool) -> Tensor:
        """bool ``[B or 1, H or 1, Qb, Kb]`` for one pattern over the heads of ``q``."""
        n, m, block = q.shape[2], k.shape[2], self.block_size
        name = cfg["pattern"]
        if name != "block_sparse" and not causal:
            raise ValueError(f"causal: the {name} pattern is defined for causal prefill, got causal=False")
        if name == "a_shape":
            return a_shape_blocks(n, m, block, cfg["n_init"], cfg["n_local"], q.device)[None, None]
        if name == "vertical_slash":
            columns, offsets = vertical_slash_indices(
                q, k, cfg["vertical_size"], cfg["slash_size"], cfg["last_q"]
            )
            return vertical_slash_blocks(columns, offsets, n, m, block)
        from zoo.kernels import BlockSparseMask

        scores = block_sparse_scores(q, k, block)
        return BlockSparseMask.from_scores(scores, block, n, m, topk=cfg["topk"], causal=causal).to_dense()

    def estimate(self, q: Tensor, k: Tensor, causal: bool = True):
        """The kept blocks as a :class:`~zoo.kernels.BlockSparseMask`."""
        from zoo.kernels import BlockSparseMask

        check_attention_inputs(q, k)
        batch, heads, n, _ = q.shape
        kv_heads, m = k.shape[1], k.shape[2]
        if self.head_configs is None:
            blocks = self._pattern_blocks(self.config, q, k, causal)
            return BlockSparseMask.from_dense(blocks, self.block_size, n, m)
        if len(self.head_configs) != heads:
            raise ValueError(
                f"pattern: expected one config per query head (H={heads}), got {len(self.head_configs)}"
            )
        group = heads // kv_heads
        blocks = torch.zeros(
            batch,
            heads,
            _ceil_div(n, self.block_size),
            _ceil_div(m, self.block_size),
            dtype=torch.bool,
            device=q.device,
        )
        groups: dict[tuple, list[int]] = {}
        for h, cfg in enumerate(self.head_configs):
            groups.setdefault(tuple(sorted(cfg.items())), []).append(h)
        for key, heads_of_cfg in groups.items():
            cfg = dict(key)
            for hk in sorted({h // group for h in heads_of_cfg}):  # heads sharing one key head run together
                hs = [h for h in heads_of_cfg if h // group == hk]
                sub = self._pattern_blocks(cfg, q[:, hs], k[:, hk : hk + 1], causal)
                blocks[:, hs] = sub.expand(batch, len(hs), -1, -1)
        return BlockSparseMask.from_dense(blocks, self.block_size, n, m)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None
    ) -> Tensor:
        """Sparse attention ``[B, H, N, D]`` over the estimated blocks."""
        from zoo.kernels import block_sparse_attention

        check_attention_inputs(q, k, v)
        mask = self.estimate(q, k, causal)
        return block_sparse_attention(q, k, v, mask, causal=causal, scale=scale, backend=self.backend)
