"""XAttention's per-head threshold profiling and its JSON config."""

from __future__ import annotations

import json

import pytest
import torch

from zoo.layers import XAttention
from zoo.llm import sparse_prefill
from zoo.llm.threshold_profile import (
    _row_cut_thresholds,
    dense_block_mass,
    head_thresholds,
    load_threshold_config,
    profile_model_thresholds,
    save_threshold_config,
)


def reference_block_mass(q, k, block_size, causal=True):
    """fp64 softmax attention summed into blocks, from the full matrix (queries = last N of M)."""
    batch, heads, n, dim = q.shape
    m = k.shape[2]
    kr = k.double().repeat_interleave(heads // k.shape[1], dim=1)
    logits = q.double() @ kr.transpose(-1, -2) / dim**0.5
    if causal:
        allowed = torch.arange(m)[None, :] <= (m - n + torch.arange(n))[:, None]
        logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, -1)
    qb, kb = -(-n // block_size), -(-m // block_size)
    out = torch.zeros(batch, heads, qb, kb, dtype=torch.float64)
    for i in range(n):
        for j in range(kb):
            out[:, :, i // block_size, j] += probs[:, :, i, j * block_size : (j + 1) * block_size].sum(-1)
    return out


def reference_row_cut(true_mass, scores, coverage):
    """Loop version of the rule: per row, the needed blocks by true mass, their lowest score, kept share."""
    batch, heads, rows, _ = true_mass.shape
    out = torch.zeros(batch, heads, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            kept, total = 0.0, 0.0
            for r in range(rows):
                t, s = true_mass[b, h, r].tolist(), scores[b, h, r].tolist()
                order = sorted(range(len(t)), key=lambda j: -t[j])
                need, acc = [], 0.0
                for j in order:
                    need.append(j)
                    acc += t[j]
                    if acc >= coverage * sum(t):
                        break
                cut = min(s[j] for j in need)
                kept += sum(x for x in s if x >= cut)
                total += sum(s)
            out[b, h] = kept / total
    return out


@pytest.mark.parametrize("n,m,block", [(96, 96, 16), (70, 100, 16), (64, 64, 32)])
def test_dense_block_mass_matches_the_full_matrix(n, m, block):
    g = torch.Generator().manual_seed(n + m)
    q = torch.randn(2, 4, n, 8, generator=g)
    k = torch.randn(2, 2, m, 8, generator=g)
    got = dense_block_mass(q, k, block)
    ref = reference_block_mass(q, k, block)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    rows = torch.tensor([min(block, n - i * block) for i in range(got.shape[2])], dtype=torch.float32)
    torch.testing.assert_close(got.sum(-1), rows.expand_as(got.sum(-1)))


def test_row_cut_rule_matches_a_loop_reference():
    g = torch.Generator().manual_seed(1)
    true_mass = torch.rand(2, 3, 5, 6, generator=g) ** 3
    scores = torch.rand(2, 3, 5, 6, generator=g)
    for coverage in (0.5, 0.9, 1.0):
        got = _row_cut_thresholds(true_mass.double(), scores.double(), coverage)
        torch.testing.assert_close(got, reference_row_cut(true_mass, scores, coverage))


def test_head_thresholds_limits_and_monotonicity():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 3, 128, 16, generator=g)
    k = torch.randn(1, 3, 128, 16, generator=g)
    low = head_thresholds(q, k, block_size=16, stride=4, coverage=0.5)
    mid = head_thresholds(q, k, block_size=16, stride=4, coverage=0.9)
    full = head_thresholds(q, k, block_size=16, stride=4, coverage=1.0)
    assert low.shape == (3,) and bool((low <= mid + 1e-6).all()) and bool((mid <= full + 1e-6).all())
    # every reachable block carries true mass, so full coverage needs every block: tau = 1
    torch.testing.assert_close(full, torch.ones(3))
    # when the estimate ranks blocks as the true attention does, the profiled tau keeps the needed blocks
    true_mass = dense_block_mass(q, k, 16)
    tau = _row_cut_thresholds(true_mass, true_mass, 0.9)[0]
    assert bool((tau >= 0.9 - 1e-6).all())


def test_profiled_thresholds_select_at_least_the_rows_needed_blocks_on_average():
    """With the profiled tau the kept blocks hold, averaged over rows, the coverage asked of true attention."""
    g = torch.Generator().manual_seed(3)
    pos = torch.arange(256, dtype=torch.float32)
    code = torch.cat(
        [torch.cos(pos[:, None] * torch.linspace(0.01, 0.2, 8)), torch.sin(pos[:, None] * 0.05)], -1
    )
    q = torch.randn(1, 2, 256, 16, generator=g) * 0.5
    k = torch.randn(1, 2, 256, 16, generator=g) * 0.5
    q[..., :9] += 2 * code
    k[..., :9] += 2 * code
    tau = head_thresholds(q, k, block_size=32, stride=8, coverage=0.9)
    mask = XAttention(block_size=32, stride=8, threshold=tau).estimate(q, k)
    kept = mask.to_dense()
    true_mass = dense_block_mass(q, k, 32)
    coverage = (true_mass * kept).sum((-1, -2)) / true_mass.sum((-1, -2))
    assert bool((coverage >= 0.85).all()), coverage


def test_bad_arguments_are_refused():
    q = torch.randn(1, 2, 64, 8)
    with pytest.raises(ValueError, match="coverage"):
        head_thresholds(q, q, block_size=16, stride=4, coverage=0.0)
    with pytest.raises(ValueError, match="block_size"):
        dense_block_mass(q, q, 0)


def test_model_profile_writes_a_config_that_sparse_prefill_applies(tiny_llama, tmp_path):
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(3, 300, (1, 128), generator=g) for _ in range(2)]
    config = profile_model_thresholds(
        tiny_llama, seqs, block_size=16, stride=4, model_name="tiny", show_progress=False
    )
    assert config["num_layers"] == 2 and config["num_heads"] == 4 and config["sequences"] == 2
    table = torch.tensor(config["thresholds"])
    assert bool(((table > 0) & (table <= 1)).all())
    # the table is the maximum over sequences
    single = profile_model_thresholds(tiny_llama, seqs[:1], block_size=16, stride=4, show_progress=False)
    assert bool((torch.tensor(single["thresholds"]) <= table + 1e-6).all())
    path = save_threshold_config(config, tmp_path / "tau.json")
    assert load_threshold_config(path)["thresholds"] == config["thresholds"]
    with torch.no_grad(), sparse_prefill(tiny_llama, "xattention", config_path=path) as handle:
        for idx, layer in handle.layers.items():
            assert (layer.block_size, layer.stride) == (16, 4)
            torch.testing.assert_close(layer.threshold, table[idx])
        tiny_llama(input_ids=seqs[0])
    with pytest.raises(ValueError, match="profiled with block_size=16"):
        sparse_prefill(tiny_llama, "xattention", config_path=path, block_size=32)
    with pytest.raises(ValueError, match="one or the other"):
        sparse_prefill(tiny_llama, "xattention", config_path=path, threshold=0.9)
    with pytest.raises(ValueError, match="expected more than block_size"):
        profile_model_thresholds(tiny_llama, [seqs[0][:, :16]], block_size=16, stride=4)


def test_bad_configs_are_refused(tmp_path, tiny_llama):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "zoo.llm.minference_config"}))
    with pytest.raises(ValueError, match="XAttention threshold config"):
        load_threshold_config(bad)
    good = {"kind": "zoo.llm.xattention_thresholds", "block_size": 16, "stride": 4}
    bad.write_text(json.dumps({**good, "thresholds": [[0.9, 1.2]]}))
    with pytest.raises(ValueError, match=r"numbers in \[0, 1\]"):
        load_threshold_config(bad)
    bad.write_text(json.dumps({**good, "thresholds": [[0.9, 0.9], [0.9]]}))
    with pytest.raises(ValueError, match="equal-length"):
        load_threshold_config(bad)
    bad.write_text(json.dumps({**good, "thresholds": [[0.9] * 4]}))
    with pytest.raises(ValueError, match="has 1 layers, the model has 2"):
        sparse_prefill(tiny_llama, "xattention", config_path=bad)
    with pytest.raises(FileNotFoundError):
        load_threshold_config(tmp_path / "missing.json")
