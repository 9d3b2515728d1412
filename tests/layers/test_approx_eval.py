"""The approximate-attention comparison harness: capture, files, budgets, evaluation, commands."""

import json

import pytest
import torch
import torch.nn.functional as F

from zoo.layers.approx_eval import (
    AttentionSample,
    _local_band_entries,
    _performer_flops,
    capture_sdpa_qkv,
    equal_budget_scatterbrain,
    evaluate,
    exact_attention,
    load_samples,
    plot,
    relative_error,
    save_samples,
)
from zoo.layers.sea_distill import ByteLM, LMConfig


def test_capture_records_the_qkv_each_layer_attends_with():
    torch.manual_seed(0)
    lm = ByteLM(LMConfig(dim=32, depth=2, num_heads=4, num_kv_heads=2, max_len=64)).eval()
    tokens = torch.randint(0, 256, (2, 20))
    with torch.no_grad(), capture_sdpa_qkv(lm) as found:
        lm(tokens)
    assert [s.name for s in found] == ["blocks.0.attn", "blocks.1.attn"]
    s = found[0]
    assert s.causal and s.q.shape == (2, 4, 20, 8) and s.k.shape == (2, 2, 20, 8)
    # the captured q/k/v reproduce the layer's attention output
    attn = lm.blocks[0].attn
    h = lm.blocks[0].norm1(lm.embed(tokens) + lm.pos[:20])
    with torch.no_grad():
        q = attn.q_proj(h).view(2, 20, 4, 8).transpose(1, 2)
        expected = F.scaled_dot_product_attention(
            q, s.k.repeat_interleave(2, 1), s.v.repeat_interleave(2, 1), is_causal=True
        )
    assert torch.allclose(s.q, q, atol=1e-6)
    assert relative_error(expected, exact_attention(s.q, s.k, s.v, True)) < 1e-5
    # F is restored afterwards
    assert F.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"


def test_capture_works_for_torch_multihead_attention():
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)  # training mode: not the fused fast path
    x = torch.randn(1, 9, 16)
    with capture_sdpa_qkv(mha) as found:
        mha(x, x, x, need_weights=False)
    assert len(found) == 1 and found[0].q.shape == (1, 2, 9, 8) and not found[0].causal


def test_samples_round_trip_and_plain_qkv_files(tmp_path):
    a = AttentionSample(
        "layer3", torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8), True
    )
    path = save_samples([a], tmp_path / "s.safetensors")
    (b,) = load_samples(path)
    assert b.name == "layer3" and b.causal and torch.equal(b.q, a.q) and torch.equal(b.v, a.v)
    from safetensors.torch import save_file

    save_file(
        {"q": a.q, "k": a.k, "v": a.v}, str(tmp_path / "plain.safetensors"), metadata={"causal": "false"}
    )
    (c,) = load_samples(tmp_path / "plain.safetensors")
    assert not c.causal and torch.equal(c.k, a.k)
    save_file({"x": a.q}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="neither"):
        load_samples(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="Hkv dividing H"):
        AttentionSample("x", torch.randn(1, 3, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), True)


def test_budget_counts_match_brute_force():
    for n, w in ((50, 7), (9, 20)):
        i = torch.arange(n)
        band = (i[:, None] - i[None, :]).abs() < w
        assert _local_band_entries(n, w, False) == band.sum().item()
        assert _local_band_entries(n, w, True) == (band & (i[None, :] <= i[:, None])).sum().item()
    assert _performer_flops(256, 32, 64, False) < _performer_flops(256, 32, 128, False)


def _structured_sample(n=128, d=16, causal=True):
    gen = torch.Generator().manual_seed(0)
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freqs = torch.exp(-torch.arange(d // 2, dtype=torch.float32) / 2)[None, :]
    rope = torch.cat([torch.sin(pos * freqs), torch.cos(pos * freqs)], -1)
    q = (2 * rope + 0.3 * torch.randn(2, n, d, generator=gen)).unsqueeze(0)
    k = (2 * rope + 0.3 * torch.randn(2, n, d, generator=gen)).unsqueeze(0)
    return AttentionSample("structured", q, k, torch.randn(1, 2, n, d, generator=gen), causal)


def test_evaluate_reports_errors_and_budgets():
    s = _structured_sample(causal=False)
    names = [
        "local w=32",
        "combiner-fixed",
        "spt top_k=N/4",
        "oracle top-1 blocks",
        "oracle top-2 blocks",
        "sea k=8",
    ]
    rows = {r["method"]: r for r in evaluate([s], sea_steps=3, sea_width=32, method_names=names)}
    assert set(rows) == set(names)
    for r in rows.values():
        assert 0 <= r["rel_error"] < 10 and r["flops_fraction"] > 0 and r["score_fraction"] >= 0
    # more kept blocks of the true attention mass -> smaller error, more budget
    assert rows["oracle top-2 blocks"]["rel_error"] < rows["oracle top-1 blocks"]["rel_error"]
    assert rows["oracle top-2 blocks"]["score_fraction"] > rows["oracle top-1 blocks"]["score_fraction"]
    assert rows["local w=32"]["score_fraction"] == pytest.approx(_local_band_entries(128, 32, False) / 128**2)


def test_equal_budget_parts_never_exceed_scatterbrain_flops():
    n, d = 96, 16
    rows = equal_budget_scatterbrain([_structured_sample(n=n, d=d)], num_features=8, window=8, trials=1)
    assert {(r["sparse"], r["budget"]) for r in rows} == {
        (a, b) for a in ("local", "lsh") for b in ("flops", "entries")
    }
    for r in rows:
        w, m, causal = r["sparse_only"]["window"], r["lowrank_only"]["num_features"], r["causal"]
        assert w > 8 and m > 8 and set(r["rel_error"]) == {"scatterbrain", "sparse_only", "lowrank_only"}
        if r["budget"] == "flops":
            budget = r["scatterbrain"]["flops"]
            assert _performer_flops(n, d, m, causal) <= budget < _performer_flops(n, d, m + 1, causal)
        else:
            budget = r["scatterbrain"]["entries"]
            assert m == budget // n
        if r["sparse"] == "local":
            cost = (4.0 * d if r["budget"] == "flops" else 1.0) * _local_band_entries(n, w, causal)
            more = (4.0 * d if r["budget"] == "flops" else 1.0) * _local_band_entries(n, w + 1, causal)
            assert cost <= budget < more or w == n


def test_plot_writes_a_png(tmp_path):
    result = {
        "rows": [
            {
                "family": "sea",
                "method": "sea k=8",
                "sample": "a",
                "N": 64,
                "rel_error": 0.1,
                "flops_fraction": 0.2,
            }
        ],
        "sweep": [
            {"method": "dense-sdpa", "N": 1024, "ms": 1.0},
            {"method": "dense-sdpa", "N": 2048, "ms": 3.0},
        ],
    }
    path = plot(result, tmp_path / "p.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_eval_command_end_to_end_on_a_qkv_file(tmp_path):
    from zoo.cli import main

    s = _structured_sample(n=64)
    qkv = save_samples([s], tmp_path / "qkv.safetensors")
    rc = main(["-q", "eval", "approx-attention", "--qkv", str(qkv), "--families", "combiner", "--out", str(tmp_path),
               "--name", "t", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    result = json.loads((tmp_path / "t.json").read_text())
    assert {r["family"] for r in result["rows"]} == {
        "combiner-fixed",
        "combiner-logsparse",
        "combiner-axial",
        "combiner-mixture",
    }
    assert len(result["scatterbrain_equal_budget"]) == 4 and (tmp_path / "t.png").exists()
    assert "qkv_sources" not in result  # no capture sidecar beside the file
    qkv.with_suffix(".json").write_text(
        json.dumps({"checkpoint": "c.safetensors", "model": "m", "labels": [1]})
    )
    assert main(["-q", "eval", "approx-attention", "--qkv", str(qkv), "--families", "combiner", "--out", str(tmp_path),
                 "--name", "t2", "--device", "cpu"]) == 0  # fmt: skip
    sources = json.loads((tmp_path / "t2.json").read_text())["qkv_sources"]
    assert sources == [{"qkv": str(qkv), "checkpoint": "c.safetensors", "model": "m"}]
    assert (
        main(
            [
                "eval",
                "approx-attention",
                "--qkv",
                str(tmp_path / "missing.safetensors"),
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )


def test_distill_command_end_to_end_tiny(tmp_path):
    from zoo.cli import main

    text = tmp_path / "t.txt"
    text.write_text("In the beginning was the word, and the word was with the text. " * 400)
    rc = main(["-q", "train", "distill-sea", "--text", str(text), "--out", str(tmp_path / "o"), "--dim", "16",
               "--depth", "1", "--heads", "2", "--max-len", "32", "--length", "32", "--batch", "2",
               "--teacher-steps", "2", "--student-steps", "2", "--student-batch", "2", "--k", "4",
               "--compressed-len", "8", "--eval-windows", "2", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    result = json.loads((tmp_path / "o" / "distill_sea.json").read_text())
    assert result["perplexity"]["teacher"] > 1 and result["student_training"]["steps"] == 2
    peaks = result["attention_peak_bytes"]  # measured on the CPU too
    assert [r["N"] for r in peaks] == [32, 64, 128, 256] and all(r["student_sea"] > 0 for r in peaks)
    assert 0 < result["attention_memory_elements_per_layer"]["ratio"] < 1.5
    assert (tmp_path / "o" / "teacher.safetensors").exists() and (
        tmp_path / "o" / "student_sea.safetensors"
    ).exists()
    assert main(["train", "distill-sea", "--compressed-len", "10", "--out", str(tmp_path)]) == 2


def test_scatterbrain_splits_stay_within_the_budget():
    """Other splits of Scatterbrain's budget cost no more than it; more share -> more features, fewer entries."""
    from zoo.layers.approx_eval import _scatterbrain_cost, _split_budget

    n, d = 96, 16
    rows = equal_budget_scatterbrain(
        [_structured_sample(n=n, d=d)], num_features=8, window=8, trials=1, feature_shares=(0.2, 0.8)
    )
    for r in rows:
        budget = r["scatterbrain"][r["budget"]]
        splits = r["splits"]
        assert splits[0] == {"num_features": 8, "window": 8, "rel_error": r["rel_error"]["scatterbrain"]}
        for x in splits:
            assert (
                _scatterbrain_cost(
                    n, d, r["causal"], r["sparse"], x["num_features"], x["window"], r["budget"]
                )
                <= budget
            )
        best = r["best_split"]
        assert best["rel_error"] == min(x["rel_error"] for x in splits)
        assert best["below_both"] == (
            best["rel_error"] < min(r["rel_error"]["sparse_only"], r["rel_error"]["lowrank_only"])
        )
    low, high = (_split_budget(n, d, False, "local", 4000.0, "entries", share) for share in (0.2, 0.8))
    assert low[0] < high[0] and low[1] > high[1]
    assert _scatterbrain_cost(n, d, False, "local", *high, "entries") <= 4000.0
