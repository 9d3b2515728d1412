"""MInference's offline per-head pattern search (Algorithm 1) and its JSON config."""

from __future__ import annotations

import json

import pytest
import torch

from zoo.kernels import block_sparse_attention, dense_attention_reference
from zoo.layers import MInference
from zoo.llm import sparse_prefill
from zoo.llm.pattern_search import (
    default_candidates,
    load_pattern_config,
    save_pattern_config,
    search_head_patterns,
    search_model_patterns,
)

CANDIDATES = [
    {"pattern": "a_shape", "n_init": 16, "n_local": 48},
    {"pattern": "vertical_slash", "vertical_size": 40, "slash_size": 100, "last_q": 32},
    {"pattern": "block_sparse", "topk": 5},
]


def heads_with_known_structure(n=384, dim=32, seed=0):
    """Head 0: sink + local band only. Head 1: a few far-away key columns dominate (vertical lines)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, n, dim, generator=g) * 0.3
    k = torch.randn(1, 2, n, dim, generator=g) * 0.3
    v = torch.randn(1, 2, n, dim, generator=g)
    pos = torch.arange(n, dtype=torch.float32)
    freqs = torch.linspace(0.002, 0.05, 8)
    code = torch.cat([torch.cos(pos[:, None] * freqs), torch.sin(pos[:, None] * freqs)], -1)
    q[0, 0, :, :16] += 3.0 * code
    k[0, 0, :, :16] += 3.0 * code
    k[0, 0, 0, 16] = 12.0
    q[0, 0, :, 16] = 1.0
    columns = torch.tensor([70, 150, 230, 290]) * n // 384
    q[0, 1, :, 20] = 3.0
    k[0, 1, columns, 20] = 10.0
    return q, k, v


def test_each_head_gets_the_closest_candidate_within_budget():
    q, k, v = heads_with_known_structure()
    budget = 0.8
    chosen = search_head_patterns(q, k, v, CANDIDATES, budget=budget, block_size=16)
    dense = dense_attention_reference(q, k, v, causal=True)
    errors, densities = [], []
    for cand in CANDIDATES:
        mask = MInference(block_size=16, **cand).estimate(q, k)
        out = block_sparse_attention(q, k, v, mask, causal=True)
        errors.append(
            [float((out[0, h] - dense[0, h]).abs().sum() / dense[0, h].abs().sum()) for h in range(2)]
        )
        densities.append(MInference(block_size=16, **cand).estimate(q, k).to_dense().expand(1, 2, -1, -1))
    for h in range(2):
        within = [i for i, d in enumerate(densities) if float(mask_density(d[0, h])) <= budget]
        best = min(within, key=lambda i: errors[i][h])
        assert chosen[h]["pattern"] == CANDIDATES[best]["pattern"]
        assert chosen[h]["rel_l1"] == pytest.approx(errors[best][h], abs=1e-4)
    # the far-away columns cannot be reached by a sink + local window: the vertical head avoids A-shape
    assert chosen[1]["pattern"] != "a_shape"
    assert chosen[1]["coverage"] > 0.8


def mask_density(blocks: torch.Tensor) -> torch.Tensor:
    reach = torch.tril(torch.ones_like(blocks))
    return (blocks & reach).sum() / reach.sum()


def test_over_budget_heads_get_the_cheapest_candidate():
    q, k, v = heads_with_known_structure(n=128)
    chosen = search_head_patterns(q, k, v, CANDIDATES, budget=0.01, block_size=16)
    for h in range(2):
        densities = [
            float(
                mask_density(
                    MInference(block_size=16, **c).estimate(q, k).to_dense().expand(1, 2, -1, -1)[0, h]
                )
            )
            for c in CANDIDATES
        ]
        assert chosen[h]["density"] == pytest.approx(min(densities), abs=1e-5)
    with pytest.raises(ValueError, match="budget"):
        search_head_patterns(q, k, v, CANDIDATES, budget=0.0)


def test_model_search_writes_a_config_that_sparse_prefill_applies(tiny_llama, tmp_path):
    ids = torch.randint(3, 300, (1, 128), generator=torch.Generator().manual_seed(3))
    config = search_model_patterns(tiny_llama, ids, budget=0.5, block_size=16, model_name="tiny")
    assert config["num_layers"] == 2 and config["num_heads"] == 4 and config["seq_len"] == 128
    path = save_pattern_config(config, tmp_path / "tiny.json")
    loaded = load_pattern_config(path)
    assert loaded["layers"] == json.loads(path.read_text())["layers"]
    with torch.no_grad(), sparse_prefill(tiny_llama, "minference", config_path=path) as handle:
        for idx, layer in handle.layers.items():
            assert layer.pattern == [h["pattern"] for h in config["layers"][idx]]
        tiny_llama(input_ids=ids)
    assert len(default_candidates(8192)) == 12


def test_bad_configs_are_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(ValueError, match="MInference pattern config"):
        load_pattern_config(bad)
    bad.write_text(json.dumps({"kind": "zoo.llm.minference_config", "layers": [[{"pattern": "dilated"}]]}))
    with pytest.raises(ValueError, match="layer 0"):
        load_pattern_config(bad)
    with pytest.raises(FileNotFoundError):
        load_pattern_config(tmp_path / "missing.json")
