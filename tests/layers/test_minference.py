"""MInference (arXiv 2407.02490): A-shape, Vertical-Slash and Block-Sparse patterns as block masks."""

from __future__ import annotations

import pytest
import torch

from zoo.kernels import BlockSparseMask, dense_attention_reference
from zoo.layers import MInference
from zoo.layers.minference import (
    a_shape_blocks,
    block_sparse_scores,
    vertical_slash_blocks,
    vertical_slash_indices,
)


def qkv(batch, heads, kv_heads, n, m, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, m, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, m, dim, generator=g, dtype=torch.float64)
    direction = torch.randn(dim, generator=g, dtype=torch.float64)
    k[:, :, torch.randperm(m, generator=g)[: m // 10]] += 2.0 * direction
    return q + direction, k, v


def blocks_of(elements: torch.Tensor, block: int) -> torch.Tensor:
    """bool ``[..., Qb, Kb]``: a block is kept when any of its elements is."""
    n, m = elements.shape[-2:]
    qb, kb = -(-n // block), -(-m // block)
    padded = torch.zeros(*elements.shape[:-2], qb * block, kb * block, dtype=torch.bool)
    padded[..., :n, :m] = elements
    return padded.view(*elements.shape[:-2], qb, block, kb, block).any(-1).any(-2)


def causal_elements(n, m):
    return torch.arange(m)[None, :] <= (m - n + torch.arange(n))[:, None]


def element_mask(mask: BlockSparseMask, heads: int) -> torch.Tensor:
    n, m = mask.q_len, mask.kv_len
    blocks = mask.to_dense()
    blocks = blocks.expand(blocks.shape[0], heads, -1, -1)
    elements = blocks.repeat_interleave(mask.block_q, 2).repeat_interleave(mask.block_k, 3)[..., :n, :m]
    return elements & causal_elements(n, m)


def test_vertical_slash_estimate_matches_explicit_sums():
    n, m, last = 90, 130, 16
    q, k, _ = qkv(1, 4, 2, n, m, 8)
    columns, offsets = vertical_slash_indices(q, k, vertical_size=40, slash_size=60, last_q=last)
    assert columns.shape == (1, 4, 40) and offsets.shape == (1, 4, 60)
    for h in range(4):
        probs = []
        for i in range(n - last, n):
            pos = (m - n) + i
            logits = (k[0, h // 2] @ q[0, h, i]) * 8**-0.5
            logits[pos + 1 :] = float("-inf")
            probs.append(torch.softmax(logits, 0))
        vertical = torch.stack(probs).sum(0)
        want_cols = set(range(30)) | set((torch.argsort(vertical[30:], descending=True)[:10] + 30).tolist())
        assert set(columns[0, h].tolist()) == want_cols
        # fewer diagonals than the 100 forced ones: all of them come from the forced set
        assert len(set(offsets[0, h].tolist())) == 60 and set(offsets[0, h].tolist()) <= set(range(100))


def test_vertical_slash_slashes_beyond_forced_follow_diagonal_sums():
    n = m = 300
    last = 32
    q, k, _ = qkv(1, 1, 1, n, m, 8, seed=2)
    _, offsets = vertical_slash_indices(q, k, vertical_size=30, slash_size=110, last_q=last)
    probs = torch.softmax(
        ((q[0, 0, n - last :] @ k[0, 0].T) * 8**-0.5).masked_fill(
            ~causal_elements(n, m)[n - last :], float("-inf")
        ),
        -1,
    )
    slash = torch.zeros(m, dtype=torch.float64)
    for t in range(last):
        pos = n - last + t
        for j in range(pos + 1):
            slash[pos - j] += probs[t, j]
    best_rest = torch.argsort(slash[100:], descending=True)[:10] + 100
    assert set(offsets[0, 0].tolist()) == set(range(100)) | set(best_rest.tolist())


def test_vertical_slash_blocks_match_element_construction():
    n, m, block = 70, 110, 16
    g = torch.Generator().manual_seed(5)
    columns = torch.randint(0, m, (2, 3, 7), generator=g)
    offsets = torch.randint(0, m, (2, 3, 9), generator=g)
    got = vertical_slash_blocks(columns, offsets, n, m, block)
    pos = (m - n) + torch.arange(n)
    expected = torch.zeros(2, 3, n, m, dtype=torch.bool)
    for b in range(2):
        for h in range(3):
            expected[b, h][:, columns[b, h]] = True
            for o in offsets[b, h].tolist():
                j = pos - o
                ok = j >= 0
                expected[b, h, torch.arange(n)[ok], j[ok]] = True
    expected &= causal_elements(n, m)
    assert torch.equal(got, blocks_of(expected, block))


def test_a_shape_blocks_match_element_construction():
    n, m, block = 75, 120, 16
    got = a_shape_blocks(n, m, block, n_init=20, n_local=30, device="cpu")
    pos = (m - n) + torch.arange(n)[:, None]
    key = torch.arange(m)[None, :]
    elements = ((key < 20) | ((key > pos - 30) & (key <= pos))) & causal_elements(n, m)
    assert torch.equal(got, blocks_of(elements, block))


def test_block_sparse_keeps_topk_of_mean_pooled_scores():
    n, m, block, topk = 64, 96, 16, 3
    q, k, _ = qkv(1, 2, 1, n, m, 8, seed=3)
    mask = MInference("block_sparse", block_size=block, topk=topk).estimate(q, k)
    got = mask.to_dense()
    scores = block_sparse_scores(q, k, block)
    for h in range(2):
        for i in range(n // block):
            pooled_q = q[0, h, i * block : (i + 1) * block].mean(0)
            last_pos = (m - n) + (i + 1) * block - 1
            reach = [j for j in range(m // block) if j * block <= last_pos]
            row = {j: float(pooled_q @ k[0, 0, j * block : (j + 1) * block].mean(0)) for j in reach}
            for j in reach:
                assert abs(row[j] - float(scores[0, h, i, j])) < 1e-10
            forced = {0} | {j for j in reach if j >= ((m - n) + i * block) // block}
            rest = sorted((j for j in reach if j not in forced), key=lambda j: -row[j])
            chosen = forced | set(rest[: max(0, topk - len(forced))])
            assert set(got[0, h, i].nonzero().flatten().tolist()) == chosen


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(pattern="a_shape", n_init=4, n_local=10_000),
        dict(pattern="vertical_slash", vertical_size=500, slash_size=500),
        dict(pattern="block_sparse", topk=100),
        dict(
            pattern=[{"pattern": "a_shape", "n_local": 10_000}, {"pattern": "block_sparse", "topk": 50}] * 2
        ),
    ],
)
def test_full_budget_equals_dense_attention(kwargs):
    q, k, v = qkv(2, 4, 2, 150, 200, 16)
    out = MInference(block_size=16, **kwargs)(q, k, v)
    torch.testing.assert_close(out, dense_attention_reference(q, k, v, causal=True), rtol=0, atol=1e-10)


def test_per_head_patterns_equal_the_single_pattern_masks():
    q, k, _ = qkv(2, 4, 2, 128, 160, 8, seed=4)
    configs = [
        {"pattern": "a_shape", "n_init": 16, "n_local": 32},
        {"pattern": "vertical_slash", "vertical_size": 35, "slash_size": 60, "last_q": 16},
        {"pattern": "block_sparse", "topk": 3},
        {"pattern": "vertical_slash", "vertical_size": 35, "slash_size": 60, "last_q": 16},
    ]
    mixed = MInference(configs, block_size=16).estimate(q, k).to_dense()
    for h, cfg in enumerate(configs):
        single = MInference(block_size=16, **cfg).estimate(q, k).to_dense()
        single = single.expand(2, 4, -1, -1)[:, h]
        assert torch.equal(mixed[:, h], single), cfg
    assert MInference(configs, block_size=16).pattern == [c["pattern"] for c in configs]


@pytest.mark.parametrize("pattern", ["a_shape", "vertical_slash", "block_sparse"])
def test_causal_invariants_and_sparsity(pattern):
    n = m = 512
    q, k, _ = qkv(1, 2, 1, n, m, 8, seed=6)
    small = dict(n_init=8, n_local=24, vertical_size=30, slash_size=50, last_q=16, topk=3)
    mask = MInference(pattern, block_size=16, **small).estimate(q, k)
    blocks = mask.to_dense().expand(1, 2, -1, -1)
    reach = blocks_of(causal_elements(n, m), 16)
    assert not (blocks & ~reach).any()
    assert blocks[..., :, 0].all()
    assert torch.diagonal(blocks, dim1=-2, dim2=-1).all()
    assert mask.density(causal=True) < 0.7


def test_gradients_equal_dense_attention_restricted_to_kept_blocks():
    q, k, v = qkv(1, 4, 2, 96, 96, 8, seed=7)
    layer = MInference("block_sparse", block_size=16, topk=2)
    mask = layer.estimate(q, k)
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    reference = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = layer(*inputs)
    expected = dense_attention_reference(*reference, causal=True, attn_mask=element_mask(mask, 4))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for got, want in zip(inputs, reference):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=1e-10)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="pattern"):
        MInference("dilated")
    with pytest.raises(ValueError, match="topk"):
        MInference("block_sparse", topk=-1)
    with pytest.raises(ValueError, match=r"pattern\[1\]"):
        MInference([{"pattern": "a_shape"}, {"pattern": "nope"}])
    q, k = torch.randn(1, 4, 64, 8), torch.randn(1, 2, 64, 8)
    with pytest.raises(ValueError, match="one config per query head"):
        MInference([{"pattern": "a_shape"}] * 3, block_size=16).estimate(q, k)
    with pytest.raises(ValueError, match="causal"):
        MInference("vertical_slash", block_size=16).estimate(q, k, causal=False)
    with pytest.raises(ValueError, match="heads dividing"):
        MInference("a_shape", block_size=16).estimate(q, torch.randn(1, 3, 64, 8))
