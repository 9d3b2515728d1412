"""Sources of real q/k/v for the approximation harness, per-head errors, and Scatterbrain's XBOX+ hashing."""

import json

import numpy as np
import torch

from zoo.layers.approx_eval import (
    AttentionSample,
    capture_sdpa_qkv,
    equal_budget_scatterbrain,
    model_samples,
    read_token_file,
)
from zoo.layers.scatterbrain import _lsh_hash
from zoo.layers.sea_distill import ByteLM, LMConfig


def test_model_samples_take_every_layer_on_evenly_spaced_windows():
    torch.manual_seed(0)
    lm = ByteLM(LMConfig(dim=32, depth=2, num_heads=4, num_kv_heads=2, max_len=64)).eval()
    tokens = torch.randint(0, 256, (400,))
    evals, trains = model_samples(lm, tokens, length=24, windows=3, label="byte", device="cpu")
    assert [s.name for s in evals] == ["byte.blocks.0.attn", "byte.blocks.1.attn"]
    assert len(trains) == 4 and all(s.q.shape == (1, 4, 24, 8) and s.k.shape == (1, 2, 24, 8) for s in evals)
    # the evaluated window is the last one: (400 - 24) // 3 * 2 = 250
    with torch.no_grad(), capture_sdpa_qkv(lm) as found:
        lm(tokens[250:274][None])
    assert torch.equal(found[1].q, evals[1].q) and torch.equal(found[1].v, evals[1].v)


def test_token_file_dtype_comes_from_meta(tmp_path):
    np.arange(70000, 70010, dtype=np.uint32).tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint32"}))
    assert torch.equal(read_token_file(tmp_path / "val.bin"), torch.arange(70000, 70010))


def test_equal_budget_rows_report_each_head():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 64, 8), torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    rows = equal_budget_scatterbrain(
        [AttentionSample("s", q, k, v, True)], num_features=4, window=8, trials=1
    )
    for r in rows:
        per_head = r["rel_error_per_head"]
        assert all(len(x) == 4 for x in per_head.values()) and r["heads"] == 4
        best = sum(
            a < min(b, c)
            for a, b, c in zip(*(per_head[n] for n in ("scatterbrain", "sparse_only", "lowrank_only")))
        )
        assert r["scatterbrain_best_heads"] == best
        # the error of the head stack lies between the best and the worst head
        for name, heads in per_head.items():
            assert min(heads) - 1e-9 <= r["rel_error"][name] <= max(heads) + 1e-9


def test_xbox_plus_maps_inner_products_to_distances():
    torch.manual_seed(0)
    q, k = torch.randn(2, 9, 6) * 3, torch.randn(2, 11, 6)
    top = q.square().sum(-1, keepdim=True).amax(-2, keepdim=True) + k.square().sum(-1, keepdim=True).amax(
        -2, keepdim=True
    )
    eye = torch.eye(8)  # hashing on the unit directions returns the transformed vectors themselves
    tq = _lsh_hash(q, eye, True, top).permute(1, 2, 0)  # (2, 9, 8)
    tk = _lsh_hash(k, eye, False, top).permute(1, 2, 0)
    assert torch.allclose(tq.norm(dim=-1) ** 2, top.squeeze(-1).expand(2, 9), rtol=1e-5)
    assert torch.allclose(tk.norm(dim=-1) ** 2, top.squeeze(-1).expand(2, 11), rtol=1e-5)
    dist = torch.cdist(tq, tk) ** 2
    assert torch.allclose(dist, 2 * top - 2 * q @ k.transpose(-1, -2), rtol=1e-4, atol=1e-3)
