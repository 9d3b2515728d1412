"""Accuracy harness: statistics against explicit computations, planted synthetic attention, LM eval."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.kernels import BlockSparseMask, block_sparse_attention
from zoo.layers import PBSAttention
from zoo.llm.harness import (
    _continue,
    attention_stats,
    continuation_nll,
    evaluate_lm,
    evaluate_synthetic,
    needle_prompts,
    nll_increase_by_block_row,
    planted_elements,
    synthetic_qkv,
    targets,
)


def explicit_stats(q, k, v, mask, out):
    """Per head: density, coverage, rel L1, cosine by dense element masks (original key order)."""
    _, heads, n, dim = q.shape
    m = k.shape[2]
    group = heads // k.shape[1]
    blocks = mask.to_dense().expand(1, heads, -1, -1)[0]
    causal = torch.arange(m)[None, :] <= (m - n + torch.arange(n))[:, None]
    reach = torch.zeros_like(blocks[0])
    for i in range(reach.shape[0]):
        for j in range(reach.shape[1]):
            reach[i, j] = causal[
                i * mask.block_q : (i + 1) * mask.block_q, j * mask.block_k : (j + 1) * mask.block_k
            ].any()
    rows = {"density": [], "coverage": [], "rel_l1": [], "cosine": []}
    for h in range(heads):
        slots = blocks[h].repeat_interleave(mask.block_q, 0).repeat_interleave(mask.block_k, 1)[:n, :m]
        kept = torch.zeros_like(slots)
        perm = mask.key_perm[0, h // group] if mask.key_perm is not None else torch.arange(m)
        kept[:, perm] = slots
        logits = (q[0, h].double() @ k[0, h // group].double().T) * dim**-0.5
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
        dense = probs @ v[0, h // group].double()
        sparse = out[0, h].double()
        rows["density"].append(float((blocks[h] & reach).sum() / reach.sum()))
        rows["coverage"].append(float((probs * kept).sum(-1).mean()))
        rows["rel_l1"].append(float((sparse - dense).abs().sum() / dense.abs().sum()))
        rows["cosine"].append(float(torch.nn.functional.cosine_similarity(sparse, dense, dim=-1).mean()))
    return rows


@pytest.mark.parametrize("permuted", [False, True])
def test_attention_stats_match_explicit_computation(permuted):
    g = torch.Generator().manual_seed(0)
    n, heads, kv_heads, dim = 96, 4, 2, 16
    q = torch.randn(1, heads, n, dim, generator=g)
    k = torch.randn(1, kv_heads, n, dim, generator=g)
    v = torch.randn(1, kv_heads, n, dim, generator=g)
    if permuted:
        mask = PBSAttention(block_size=16, segment_size=32, threshold=0.4).estimate(q, k)
        assert mask.key_perm is not None
    else:
        blocks = torch.rand(1, heads, 6, 6, generator=g) < 0.5
        blocks |= torch.eye(6, dtype=torch.bool)
        mask = BlockSparseMask.from_dense(blocks, 16, n, n)
    out = block_sparse_attention(q, k, v, mask, causal=True)
    got = attention_stats(q, k, v, mask, out, causal=True, chunk=40)
    want = explicit_stats(q, k, v, mask, out)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-5), key
    assert min(got["coverage"]) < 0.999  # the mask really drops attention mass


def test_synthetic_planted_pairs_hold_most_of_the_attention():
    n, heads, kv_heads, dim = 512, 4, 2, 64
    q, k, _, spec = synthetic_qkv(n, heads, kv_heads, dim, seed=3)
    planted = planted_elements(spec, n)
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    for h in range(heads):
        logits = (q[0, h] @ k[0, h // 2].T) * dim**-0.5
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
        assert float((probs * planted[h]).sum(-1).mean()) > 0.8
        # each planted kind is boosted by a good part of ln(n) over the typical pair
        typical = float(logits[causal].median())
        rows = torch.arange(300, n)
        for offset in spec.slashes[h]:
            assert float(logits[rows, rows - offset].mean()) - typical > 0.5 * math.log(n)
        for col in spec.verticals[h]:
            assert float(logits[col + 1 :, col].mean()) - typical > 0.5 * math.log(n)
        assert float(logits[1:, 0].mean()) - typical > math.log(n)
    assert planted.sum() < 0.2 * causal.sum() * heads  # and the planted pairs are a small share


def test_evaluate_synthetic_full_budget_is_exact_and_sparse_budget_is_not():
    methods = {
        "full": ("xattention", dict(block_size=32, stride=8, threshold=1.0)),
        "sparse": ("minference", dict(pattern="a_shape", block_size=32, n_init=32, n_local=64)),
    }
    result = evaluate_synthetic(methods, n=512, heads=2, kv_heads=1, dim=32)
    full, sparse = result["methods"]["full"], result["methods"]["sparse"]
    assert full["density"] == 1.0 and full["planted_recall"] == 1.0
    assert full["coverage"] == pytest.approx(1.0, abs=1e-6) and full["rel_l1"] < 1e-5
    assert sparse["density"] < 0.5 and sparse["planted_recall"] < 1.0 and sparse["coverage"] < 1.0


def test_needle_prompts_place_the_needle_and_end_with_the_question(tiny_corpus):
    from zoo.llm.corpus import load_tokenizer, needle_tokens

    tokenizer = load_tokenizer(tiny_corpus[0] / "tokenizer.json")
    haystack = list(range(3, 203))
    prompts = needle_prompts(tokenizer, haystack, 150, depths=[0.0, 0.5], numbers=[12345])
    needle, question, _ = needle_tokens(tokenizer, 12345)
    assert len(prompts) == 2
    for ids, number, depth in prompts:
        assert len(ids) == 150 and number == 12345 and ids[-len(question) :] == question
        room = 150 - len(needle) - len(question) - 1
        at = 1 + int(room * depth)
        assert ids[at : at + len(needle)] == needle
    assert tokenizer.decode(needle).strip() == "The secret number is 12345."


def test_evaluate_lm_reports_every_layer_head_and_perplexity(tiny_llama, tiny_corpus):
    from zoo.llm.corpus import load_tokenizer

    tokenizer = load_tokenizer(tiny_corpus[0] / "tokenizer.json")
    ids = torch.randint(3, 300, (1, 128), generator=torch.Generator().manual_seed(2))
    methods = {
        "full": ("xattention", dict(block_size=16, stride=4, threshold=1.0)),
        "sparse": ("xattention", dict(block_size=16, stride=4, threshold=0.3)),
    }
    result = evaluate_lm(
        tiny_llama, ids, methods, tokenizer=tokenizer, needle_haystack=list(range(3, 300)), needle_length=96,
        needle_depths=(0.5,), needle_numbers=(11111,),
    )  # fmt: skip
    full, sparse = result["methods"]["full"], result["methods"]["sparse"]
    assert full["ppl_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert full["mean_coverage"] == pytest.approx(1.0, abs=1e-6) and full["mean_density"] == 1.0
    assert sparse["mean_density"] < 1.0 and sparse["ppl_ratio"] != pytest.approx(1.0, abs=1e-6)
    assert len(sparse["layers"]) == 2 and all(len(layer["coverage"]) == 4 for layer in sparse["layers"])
    assert full["needle"]["accuracy"] == result["dense"]["needle"]["accuracy"]
    assert full["needle"]["trials"][0]["answer"] == result["dense"]["needle"]["trials"][0]["answer"]
    assert result["continuation_tokens"] == 16
    assert set(sparse["nll_increase_by_block_row"]) == {"0-8", "8-16"}  # block_size 16 of the config
    assert full["nll_increase_by_block_row"] == pytest.approx({"0-8": 0.0, "8-16": 0.0}, abs=1e-5)
    assert full["continuation_ppl_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert sparse["continuation_ppl_ratio"] != pytest.approx(1.0, abs=1e-6)
    checks = targets(result)
    assert checks["full"]["coverage>=0.9"] and checks["full"]["ppl_within_2pct"]
    assert checks["full"]["continuation_ppl_within_2pct"]
    assert tiny_llama.config._attn_implementation == "sdpa"


def test_continuation_nll_prefills_with_the_method_and_decodes_densely(tiny_llama):
    from zoo.llm.patch import sparse_prefill

    ids = torch.randint(3, 300, (2, 96), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = tiny_llama(input_ids=ids).logits.double()
    # dense prefill: the last 24 tokens' NLL of one full forward pass
    expected = torch.nn.functional.cross_entropy(
        logits[:, -25:-1].reshape(-1, logits.shape[-1]), ids[:, -24:].reshape(-1), reduction="sum"
    )
    nll, count = continuation_nll(tiny_llama, ids, 24)
    assert count == 48 and nll == pytest.approx(float(expected), rel=1e-5)
    # sparse prefill: the method sees the 72 prompt queries only; the continuation runs densely
    seen = []
    sparse = dict(block_size=16, stride=4, threshold=0.3)

    def prefill():
        return sparse_prefill(
            tiny_llama, "xattention", recorder=lambda i, q, *rest: seen.append(q.shape[2]), **sparse
        )

    s_nll, _ = continuation_nll(tiny_llama, ids, 24, prefill)
    assert seen and set(seen) == {72} and s_nll != pytest.approx(nll, rel=1e-6)
    assert tiny_llama.config._attn_implementation == "sdpa"  # unpatched afterwards
    with torch.no_grad():
        with sparse_prefill(tiny_llama, "xattention", **sparse):  # the same prompt prefill, by hand
            out = tiny_llama(input_ids=ids[:, :72], use_cache=True)
        rest = _continue(tiny_llama, out, ids[:, 72:])  # unpatched: dense
    by_hand = torch.cat([out.logits[:, -1:], rest.logits[:, :-1]], 1).double()
    ref = torch.nn.functional.cross_entropy(
        by_hand.reshape(-1, by_hand.shape[-1]), ids[:, 72:].reshape(-1), reduction="sum"
    )
    assert s_nll == pytest.approx(float(ref), rel=1e-5)
    for bad in (0, 96):
        with pytest.raises(ValueError, match=r"continuation: expected 1 to 95 tokens"):
            continuation_nll(tiny_llama, ids, bad)


def test_nll_increase_by_block_row_bins_positions_inside_their_block():
    increase = torch.zeros(2, 63)
    pos = torch.arange(63)
    increase[:, (pos % 16) < 4] = 1.0  # the first 4 rows of every block of 16
    increase[:, :16] = 5.0  # the first block is left out
    got = nll_increase_by_block_row(increase, 16, edges=(0, 4, 8))
    assert got == pytest.approx({"0-4": 1.0, "4-8": 0.0, "8-16": 0.0})
    assert list(nll_increase_by_block_row(increase, 4)) == ["0-4"]  # edges past the block are dropped
