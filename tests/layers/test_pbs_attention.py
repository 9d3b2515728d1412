"""PBS-Attn (arXiv 2510.21270): segment-wise key permutation, permuted block selection, attention."""

from __future__ import annotations

import pytest
import torch

from zoo.kernels import BlockSparseMask, dense_attention_reference
from zoo.layers import PBSAttention


def structured_qkv(batch, heads, kv_heads, n, m, dim, seed=0):
    """Random q/k/v in fp64 with scattered strong keys (the "vertical lines" PBS gathers)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, m, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, m, dim, generator=g, dtype=torch.float64)
    direction = torch.randn(dim, generator=g, dtype=torch.float64)
    q = q + 1.5 * direction
    hot = torch.randperm(m, generator=g)[: max(2, m // 12)]
    k[:, :, hot] += 2.0 * direction
    return q, k, v


def explicit_importance(q, k, last, causal):
    """Mean softmax attention of the last ``last`` queries of every head of a group, per key."""
    batch, heads, n, dim = q.shape
    kv_heads, m = k.shape[1], k.shape[2]
    group = heads // kv_heads
    out = torch.zeros(batch, kv_heads, m, dtype=torch.float64)
    for b in range(batch):
        for hk in range(kv_heads):
            rows = []
            for h in range(hk * group, (hk + 1) * group):
                for i in range(n - last, n):
                    logits = (k[b, hk] @ q[b, h, i]) * dim**-0.5
                    if causal:
                        logits[torch.arange(m) > (m - n) + i] = float("-inf")
                    rows.append(torch.softmax(logits, 0))
            out[b, hk] = torch.stack(rows).mean(0)
    return out


def element_mask(mask: BlockSparseMask, heads: int, causal: bool) -> torch.Tensor:
    """bool ``[B, H, N, M]`` on ORIGINAL key positions: slot blocks mapped back through ``key_perm``."""
    n, m = mask.q_len, mask.kv_len
    blocks = mask.to_dense()
    blocks = blocks.expand(blocks.shape[0], heads, -1, -1)
    slots = blocks.repeat_interleave(mask.block_q, 2).repeat_interleave(mask.block_k, 3)[..., :n, :m]
    if mask.key_perm is None:
        original = slots
    else:
        perm = mask.key_perm.long().repeat_interleave(heads // mask.key_perm.shape[1], 1)
        original = torch.zeros_like(slots)
        original.scatter_(-1, perm[:, :, None, :].expand_as(slots), slots)
    if causal:
        original = original & (torch.arange(m)[None, :] <= (m - n + torch.arange(n))[:, None])
    return original


def test_permutation_stays_inside_segments_sorted_by_last_block_attention():
    n = m = 150
    block, seg = 16, 48
    q, k, _ = structured_qkv(2, 4, 2, n, m, 8)
    layer = PBSAttention(block_size=block, segment_size=seg)
    perm = layer.key_permutation(q, k)
    assert perm.shape == (2, 2, m)
    assert torch.equal(perm.sort(-1).values, torch.arange(m).expand(2, 2, m))  # a permutation
    slots = torch.arange(m)
    assert torch.equal(perm // seg, (slots // seg).expand(2, 2, m))  # never leaves its segment
    importance = explicit_importance(q, k, block, causal=True)
    for b in range(2):
        for hk in range(2):
            for start in range(0, m, seg):
                segment = torch.arange(start, min(start + seg, m))
                expected = segment[
                    torch.sort(importance[b, hk, segment], descending=True, stable=True).indices
                ]
                assert torch.equal(perm[b, hk, start : start + seg], expected)
    # the permutation moved something: the test data has structure
    assert not torch.equal(perm, slots.expand(2, 2, m))


def explicit_pbs_blocks(q, k, perm, block, seg, tau, n, m):
    """Pooled block scores, allowed/forced sets and cumulative selection, one row at a time."""
    batch, heads, _, dim = q.shape
    group = heads // k.shape[1]
    qb, kb = -(-n // block), -(-m // block)
    keep = torch.zeros(batch, heads, qb, kb, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            hk = h // group
            k_perm = k[b, hk, perm[b, hk]]
            pooled_k = torch.stack([k_perm[j * block : (j + 1) * block].mean(0) for j in range(kb)])
            earliest = [int(perm[b, hk, j * block : (j + 1) * block].min()) for j in range(kb)]
            first_block = int((perm[b, hk] == 0).nonzero()[0, 0]) // block
            for i in range(qb):
                first_pos, last_pos = (m - n) + i * block, (m - n) + min((i + 1) * block, n) - 1
                pooled_q = q[b, h, i * block : min((i + 1) * block, n)].mean(0)
                own = [first_pos // seg <= j * block // seg <= last_pos // seg for j in range(kb)]
                forced = {j for j in range(kb) if own[j] and earliest[j] <= last_pos} | {first_block}
                allowed = [j for j in range(kb) if j * block // seg < first_pos // seg and j not in forced]
                chosen = set(forced)
                if allowed:
                    logits = torch.stack([pooled_q @ pooled_k[j] for j in allowed]) * dim**-0.5
                    probs = torch.softmax(logits, 0)
                    order = sorted(range(len(allowed)), key=lambda t: -float(probs[t]))
                    acc = 0.0
                    for t in order:
                        if tau >= 1.0 or acc < tau:
                            chosen.add(allowed[t])
                            acc += float(probs[t])
                        else:
                            break
                keep[b, h, i, list(chosen)] = True
    return keep


@pytest.mark.parametrize("n,m,tau", [(160, 160, 0.7), (100, 176, 0.5), (160, 160, 1.0)])
def test_estimate_matches_explicit_permuted_selection(n, m, tau):
    block, seg = 16, 32
    q, k, _ = structured_qkv(1, 4, 2, n, m, 8, seed=1)
    layer = PBSAttention(block_size=block, segment_size=seg, threshold=tau)
    mask = layer.estimate(q, k)
    assert torch.equal(mask.key_perm, layer.key_permutation(q, k))
    expected = explicit_pbs_blocks(q, k, mask.key_perm, block, seg, tau, n, m)
    assert torch.equal(mask.to_dense(), expected)


def test_causal_invariants_on_original_positions():
    n = m = 192
    block, seg = 16, 64
    q, k, _ = structured_qkv(2, 2, 1, n, m, 8, seed=4)
    mask = PBSAttention(block_size=block, segment_size=seg, threshold=0.3).estimate(q, k)
    blocks, perm = mask.to_dense(), mask.key_perm
    assert mask.density(causal=True) < 0.8
    for b in range(2):
        earliest = perm[b, 0].view(-1, block).min(-1).values
        for i in range(blocks.shape[2]):
            last_pos = i * block + block - 1
            row = blocks[b, :, i]
            # nothing whose keys all come after the query block; the first token's block always
            assert not row[:, earliest > last_pos].any()
            assert row[:, int((perm[b, 0] == 0).nonzero()[0, 0]) // block].all()
            # every block of the own segment that holds a visible key is kept
            own = torch.arange(blocks.shape[3]) * block // seg == (i * block) // seg
            assert row[:, own & (earliest <= last_pos)].all()


@pytest.mark.parametrize("n,m,causal", [(200, 200, True), (120, 250, True), (130, 130, False)])
def test_threshold_one_equals_dense_attention(n, m, causal):
    q, k, v = structured_qkv(2, 4, 2, n, m, 16, seed=2)
    out = PBSAttention(block_size=16, segment_size=48, threshold=1.0)(q, k, v, causal=causal)
    torch.testing.assert_close(out, dense_attention_reference(q, k, v, causal=causal), rtol=0, atol=1e-10)


def test_forward_backward_equal_dense_restricted_to_permuted_blocks():
    q, k, v = structured_qkv(1, 4, 2, 128, 128, 8, seed=3)
    layer = PBSAttention(block_size=16, segment_size=32, threshold=0.5)
    mask = layer.estimate(q, k)
    assert mask.key_perm is not None and mask.density(causal=True) < 0.9
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    reference = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = layer(*inputs)
    expected = dense_attention_reference(*reference, causal=True, attn_mask=element_mask(mask, 4, True))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    # and it differs from dense attention: the permuted mask really drops keys
    assert (out - dense_attention_reference(q, k, v, causal=True)).abs().max() > 1e-3
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for got, want in zip(inputs, reference):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=1e-10)


def test_sequence_within_one_segment_falls_back_to_dense():
    q, k, v = structured_qkv(1, 2, 2, 60, 60, 8)
    layer = PBSAttention(block_size=16, segment_size=64, threshold=0.1)
    mask = layer.estimate(q, k)
    assert mask.key_perm is None and mask.density(causal=True) == 1.0
    torch.testing.assert_close(
        layer(q, k, v), dense_attention_reference(q, k, v, causal=True), rtol=0, atol=1e-10
    )


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="segment_size"):
        PBSAttention(block_size=64, segment_size=96)
    with pytest.raises(ValueError, match="threshold"):
        PBSAttention(threshold=-0.1)
    with pytest.raises(ValueError, match="block_size"):
        PBSAttention(block_size=0)
    layer = PBSAttention(block_size=16, segment_size=32)
    with pytest.raises(ValueError, match="heads dividing"):
        layer.estimate(torch.randn(1, 4, 64, 8), torch.randn(1, 3, 64, 8))
    with pytest.raises(ValueError, match="v: expected"):
        layer(torch.randn(1, 4, 64, 8), torch.randn(1, 2, 64, 8), torch.randn(1, 2, 50, 8))


def test_kept_lists_equal_dense_conversion():
    from zoo.layers.pbs_attention import _kept_lists

    keep = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)) < 0.4
    counts, indices = _kept_lists(keep)
    mask = BlockSparseMask(16, 16, 80, 112, counts, indices)
    assert torch.equal(mask.to_dense(), keep)
    assert torch.equal(counts, keep.sum(-1, dtype=torch.int32))


@pytest.mark.gpu
def test_estimate_on_gpu_bf16_matches_fp64_estimate():
    q, k, v = structured_qkv(1, 8, 2, 2048, 2048, 64, seed=4)
    layer = PBSAttention(block_size=128, segment_size=256, threshold=0.9)
    cpu = layer.estimate(q, k)
    gpu = layer.estimate(q.cuda().bfloat16(), k.cuda().bfloat16())
    same_perm = (gpu.key_perm.cpu() == cpu.key_perm).float().mean()
    assert same_perm > 0.8  # bf16 logits may swap near-equal keys inside a segment
    assert abs(gpu.density(causal=True) - cpu.density(causal=True)) < 0.05
    out = layer(q.cuda().bfloat16(), k.cuda().bfloat16(), v.cuda().bfloat16())
    assert torch.isfinite(out).all()
