"""XAttention (arXiv 2503.16428): antidiagonal scoring, threshold selection, block-sparse attention."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from zoo.kernels import BlockSparseMask, dense_attention_reference
from zoo.kernels.antidiagonal import (
    antidiagonal_block_scores,
    antidiagonal_block_scores_reference,
    antidiagonal_block_scores_triton,
)
from zoo.layers import XAttention


def explicit_antidiagonal_scores(q, k, block_q, block_k, stride, causal):
    """Block scores by explicit loops in fp64: every cell's antidiagonal, softmax per query group."""
    batch, heads, n, dim = q.shape
    kv_heads, m = k.shape[1], k.shape[2]
    group = heads // kv_heads
    qb, kb = -(-n // block_q), -(-m // block_k)
    rows, cols = qb * block_q // stride, kb * block_k // stride
    out = torch.zeros(batch, heads, qb, kb, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for r in range(rows):
                if r * stride >= n:
                    continue
                logits = []
                for c in range(cols):
                    last_query_pos = (m - n) + r * stride + stride - 1
                    if c * stride >= m or (causal and c * stride > last_query_pos):
                        logits.append(float("-inf"))
                        continue
                    total = 0.0
                    for i in range(stride):
                        qi, ki = r * stride + stride - 1 - i, c * stride + i
                        if qi < n and ki < m:
                            total += float(q[b, h, qi].double() @ k[b, h // group, ki].double())
                    logits.append(total / math.sqrt(dim) / stride)
                probs = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
                for c in range(cols):
                    out[b, h, r * stride // block_q, c * stride // block_k] += probs[c]
    return out


def explicit_selection(scores, taus, n, m, block, causal):
    """Cumulative-threshold selection, one row at a time: forced blocks first, then best-first."""
    batch, heads, qb, kb = scores.shape
    keep = torch.zeros(batch, heads, qb, kb, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            tau = float(taus[h])
            for i in range(qb):
                first_pos = (m - n) + i * block
                last_pos = (m - n) + min((i + 1) * block, n) - 1
                reach = [j * block <= last_pos for j in range(kb)] if causal else [True] * kb
                forced = set()
                if causal:
                    forced = {
                        j for j in range(kb) if first_pos // block <= j <= last_pos // block and reach[j]
                    }
                    forced.add(0)
                row = [float(scores[b, h, i, j]) if reach[j] else 0.0 for j in range(kb)]
                total = sum(row)
                if tau >= 1.0:
                    chosen = {j for j in range(kb) if reach[j]}
                else:
                    chosen = set(forced)
                    acc = sum(row[j] for j in forced)
                    rest = sorted(
                        (j for j in range(kb) if reach[j] and j not in forced), key=lambda j: -row[j]
                    )
                    for j in rest:
                        if acc < tau * total or not chosen:
                            chosen.add(j)
                            acc += row[j]
                        else:
                            break
                for j in chosen:
                    keep[b, h, i, j] = True
    return keep


def element_mask(mask: BlockSparseMask, heads: int, causal: bool) -> torch.Tensor:
    """bool ``[B, H, N, M]`` on original key positions: kept blocks, intersected with causality."""
    n, m = mask.q_len, mask.kv_len
    blocks = mask.to_dense()
    blocks = blocks.expand(blocks.shape[0], heads, -1, -1)
    elements = blocks.repeat_interleave(mask.block_q, 2).repeat_interleave(mask.block_k, 3)[..., :n, :m]
    if causal:
        elements = elements & (torch.arange(m)[None, :] <= (m - n + torch.arange(n))[:, None])
    return elements


def structured_qk(batch, heads, kv_heads, n, m, dim, dtype=torch.float64, seed=0):
    """Random q/k with a few strong key columns so that the scores are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, dim, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, m, dim, generator=g, dtype=dtype)
    direction = torch.randn(dim, generator=g, dtype=dtype)
    q = q + 1.5 * direction
    hot = torch.randperm(m, generator=g)[: max(2, m // 16)]
    k[:, :, hot] += 2.0 * direction
    return q, k


SCORE_CASES = [
    # (N, M, block_q, block_k, stride, causal, H, Hkv)
    (40, 40, 8, 8, 4, True, 2, 1),
    (37, 53, 8, 16, 4, True, 4, 2),
    (30, 30, 8, 8, 2, False, 2, 2),
    (128, 128, 64, 64, 16, True, 1, 1),
    (200, 256, 128, 128, 16, True, 2, 1),
]


@pytest.mark.parametrize("n,m,bq,bk,stride,causal,heads,kv_heads", SCORE_CASES)
def test_antidiagonal_scores_match_explicit_loops(n, m, bq, bk, stride, causal, heads, kv_heads):
    q = torch.randn(2, heads, n, 8, dtype=torch.float64)
    k = torch.randn(2, kv_heads, m, 8, dtype=torch.float64)
    expected = explicit_antidiagonal_scores(q, k, bq, bk, stride, causal)
    got = antidiagonal_block_scores_reference(q, k, (bq, bk), stride, causal=causal, chunk_elements=64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    # each query block's row sums to its number of unpadded query groups
    groups = torch.tensor([len(range(i * bq, min((i + 1) * bq, n), stride)) for i in range(-(-n // bq))])
    torch.testing.assert_close(got.sum(-1), groups.double().expand_as(got.sum(-1)), rtol=0, atol=1e-10)


INTERPRETER_SCRIPT = """
import torch
from zoo.kernels.antidiagonal import antidiagonal_block_scores_reference, antidiagonal_block_scores_triton
torch.manual_seed(0)
cases = [  # (N, M, block_q, block_k, stride, causal, H, Hkv, D, tile, feature_chunk, chunk_elements)
    (64, 64, 32, 32, 2, True, 2, 1, 16, 16, 16, 1 << 20),
    (70, 100, 32, 64, 4, True, 2, 2, 24, 16, 16, 1 << 20),  # N != M, ragged blocks, D not a power of 2
    (48, 48, 32, 32, 2, False, 1, 1, 16, 16, 16, 1 << 20),
    (300, 300, 64, 64, 8, True, 4, 1, 32, 16, 16, 200),  # stride 8, GQA 4:1, several query chunks
    (200, 520, 128, 128, 16, True, 4, 2, 16, 16, 16, 1 << 20),  # stride 16, queries the last N of M
    (200, 520, 128, 128, 16, False, 2, 2, 16, 16, 16, 1 << 20),
    (260, 400, 64, 64, 2, True, 2, 1, 32, 32, 32, 2000),  # 32x32 tiles, chunks with a diagonal offset
    (256, 256, 32, 32, 2, True, 2, 1, 16, 16, 16, 1 << 20),  # no partial tile: the unmasked loads
]
for n, m, bq, bk, stride, causal, heads, kv_heads, dim, tile, feat, chunk in cases:
    q, k = torch.randn(1, heads, n, dim), torch.randn(1, kv_heads, m, dim)
    expected = antidiagonal_block_scores_reference(q.double(), k.double(), (bq, bk), stride, causal=causal)
    got = antidiagonal_block_scores_triton(
        q, k, (bq, bk), stride, causal=causal, tile=tile, feature_chunk=feat, chunk_elements=chunk
    )
    print((got.double() - expected).abs().max().item())
# batch 2 with GQA 3:1: programs of the heads sharing a key head are decoded from one grid axis
q, k = torch.randn(2, 6, 90, 16), torch.randn(2, 2, 90, 16)
expected = antidiagonal_block_scores_reference(q.double(), k.double(), 32, 4)
got = antidiagonal_block_scores_triton(q, k, 32, 4, tile=16, feature_chunk=16)
print((got.double() - expected).abs().max().item())
"""


def test_triton_scores_match_reference_under_interpreter():
    """The Triton kernels themselves, run on the CPU by Triton's interpreter (set before Triton loads)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, "-c", INTERPRETER_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    errors = [float(line) for line in run.stdout.split()]
    assert len(errors) == 9 and max(errors) < 2e-5, errors


def test_lower_triangle_tile_map_covers_exactly_the_visible_tiles():
    """The closed-form tile map of the scoring kernel, replayed in Python against brute force."""
    from zoo.kernels.antidiagonal import _tile_count

    for rows, cols, stride, tile, offset in [
        (100, 130, 8, 16, 0),
        (257, 300, 2, 64, 1000),
        (64, 300, 16, 16, 5000),
        (5, 7, 1, 16, 3),
        (256, 256, 8, 128, 0),
    ]:
        row_tiles, col_tiles = -(-rows // tile), -(-cols // tile)
        expected = {
            (i, c)
            for i in range(row_tiles)
            for c in range(col_tiles)
            if c * tile * stride <= offset + (i + 1) * tile * stride - 1
        }
        first = -(-offset // (tile * stride))
        tri = min(row_tiles, max(col_tiles - first - 1, 0))
        a = 2 * first + 1
        tri_tiles = tri * (tri + a) // 2
        got = []
        for pid in range(_tile_count(rows, cols, offset, stride, tile, True)):
            guess = min(max(int((math.sqrt(float(a * a + 8 * pid)) - a) * 0.5), 0), max(tri - 1, 0))
            for _ in range(2):
                guess = guess + 1 if (guess + 1) * (guess + 1 + a) // 2 <= pid else guess
                guess = guess - 1 if guess * (guess + a) // 2 > pid else guess
            rest = pid - tri_tiles
            if pid < tri_tiles:
                got.append((guess, pid - guess * (guess + a) // 2))
            else:
                got.append((tri + rest // col_tiles, rest % col_tiles))
        assert len(got) == len(set(got)) and set(got) == expected


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block,stride", [(64, 8), (128, 8), (128, 16)])
def test_triton_scores_on_gpu(dtype, block, stride):
    q = torch.randn(2, 8, 1000, 128, device="cuda", dtype=dtype)
    k = torch.randn(2, 2, 1500, 128, device="cuda", dtype=dtype)
    expected = antidiagonal_block_scores_reference(q.float(), k.float(), block, stride)
    if dtype == torch.bfloat16 and block == 128:  # autotuned (the benchmark's keys)
        got = antidiagonal_block_scores(q, k, block, stride, chunk_elements=1 << 14)
    else:  # fixed tiles keep the number of compilations small
        got = antidiagonal_block_scores_triton(q, k, block, stride, chunk_elements=1 << 14, tile=64)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert ((got - expected).norm() / expected.norm()).item() < tol


@pytest.mark.gpu
@pytest.mark.parametrize("stride", [8, 16])
@pytest.mark.parametrize("causal", [True, False])
def test_triton_scores_on_gpu_long_ragged_gqa(stride, causal):
    """bf16 at a few thousand tokens: ragged N != M, GQA 4:1, fixed and autotuned tiles."""
    q = torch.randn(1, 8, 3000, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 4100, 128, device="cuda", dtype=torch.bfloat16)
    k[:, :, ::97] += 2.0 * q[0, 0].mean(0)  # strong key columns: scores far from uniform
    expected = antidiagonal_block_scores_reference(q.float(), k.float(), 128, stride, causal=causal)
    configs = [{"tile": 64, "feature_chunk": 128}, {"tile": 128, "feature_chunk": 64}]
    for kwargs in configs + ([{}] if causal else []):  # {}: autotuned
        got = antidiagonal_block_scores_triton(q, k, 128, stride, causal=causal, **kwargs)
        assert ((got - expected).norm() / expected.norm()).item() < 2e-2
        torch.testing.assert_close(got.sum(-1), expected.sum(-1), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("causal", [True, False])
def test_estimate_matches_explicit_selection(causal):
    n, m, block, stride = 60, 90, 16, 4
    q, k = structured_qk(2, 4, 2, n, m, 8)
    taus = torch.tensor([0.3, 0.6, 0.9, 1.0])
    layer = XAttention(block_size=block, stride=stride, threshold=taus)
    mask = layer.estimate(q, k, causal=causal)
    scores = explicit_antidiagonal_scores(q, k, block, block, stride, causal)
    expected = explicit_selection(scores, taus, n, m, block, causal)
    assert torch.equal(mask.to_dense(), expected)
    assert 0.0 < mask.density(causal=causal) < 1.0
    # a scalar threshold is the per-head one repeated
    scalar = (
        XAttention(block_size=block, stride=stride, threshold=0.6).estimate(q, k, causal=causal).to_dense()
    )
    assert torch.equal(scalar, explicit_selection(scores, [0.6] * 4, n, m, block, causal))


@pytest.mark.parametrize(
    "n,m,heads,kv_heads,causal", [(100, 100, 4, 2, True), (64, 150, 2, 1, True), (77, 77, 2, 2, False)]
)
def test_threshold_one_equals_dense_attention(n, m, heads, kv_heads, causal):
    q = torch.randn(2, heads, n, 16, dtype=torch.float64)
    k = torch.randn(2, kv_heads, m, 16, dtype=torch.float64)
    v = torch.randn(2, kv_heads, m, 16, dtype=torch.float64)
    out = XAttention(block_size=16, stride=4, threshold=1.0)(q, k, v, causal=causal)
    torch.testing.assert_close(out, dense_attention_reference(q, k, v, causal=causal), rtol=0, atol=1e-10)


def test_causal_invariants_first_and_diagonal_blocks_kept_nothing_above_diagonal():
    n, m, block = 96, 160, 16
    q, k = structured_qk(1, 2, 1, n, m, 8, seed=3)
    blocks = XAttention(block_size=block, stride=4, threshold=0.05).estimate(q, k).to_dense()
    for i in range(blocks.shape[2]):
        first_pos, last_pos = (m - n) + i * block, (m - n) + min((i + 1) * block, n) - 1
        assert blocks[..., i, 0].all()
        assert blocks[..., i, first_pos // block : last_pos // block + 1].all()
        assert not blocks[..., i, last_pos // block + 1 :].any()
    # a low threshold actually drops blocks
    assert blocks.float().mean() < 0.6


@pytest.mark.parametrize("local_blocks", [1, 2])
def test_local_blocks_force_the_key_blocks_before_the_diagonal(local_blocks):
    n, m, block = 96, 160, 16
    q, k = structured_qk(1, 2, 1, n, m, 8, seed=3)
    paper = XAttention(block_size=block, stride=4, threshold=0.0).estimate(q, k).to_dense()
    local = XAttention(block_size=block, stride=4, threshold=0.0, local_blocks=local_blocks).estimate(q, k)
    local = local.to_dense()
    for i in range(local.shape[2]):
        first_pos, last_pos = (m - n) + i * block, (m - n) + min((i + 1) * block, n) - 1
        lo, hi = first_pos // block, last_pos // block
        expected = torch.zeros(local.shape[-1], dtype=torch.bool)
        expected[0] = True
        expected[max(lo - local_blocks, 0) : hi + 1] = True
        assert torch.equal(local[0, :, i], expected.expand(2, -1)), i  # tau 0: the forced blocks alone
        assert (local[0, :, i] >= paper[0, :, i]).all()
    assert local.sum() > paper.sum()
    # more than one block at a threshold: the extra forced blocks count towards tau
    dense = XAttention(block_size=block, stride=4, threshold=1.0, local_blocks=local_blocks).estimate(q, k)
    assert torch.equal(
        dense.to_dense(), XAttention(block_size=block, stride=4, threshold=1.0).estimate(q, k).to_dense()
    )


def test_grouped_query_attention_equals_repeated_kv():
    q, k = structured_qk(2, 6, 2, 80, 80, 8, seed=1)
    v = torch.randn_like(k)
    layer = XAttention(block_size=16, stride=4, threshold=0.7)
    grouped = layer.estimate(q, k).to_dense()
    repeated = layer.estimate(q, k.repeat_interleave(3, 1)).to_dense()
    assert torch.equal(grouped, repeated)
    torch.testing.assert_close(layer(q, k, v), layer(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)))


def test_gradients_equal_dense_attention_restricted_to_kept_blocks():
    q, k = structured_qk(1, 4, 2, 72, 72, 8, seed=2)
    v = torch.randn_like(k)
    layer = XAttention(block_size=16, stride=4, threshold=0.6)
    mask = layer.estimate(q, k)
    assert mask.density(causal=True) < 1.0
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    reference = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = layer(*inputs)
    expected = dense_attention_reference(*reference, causal=True, attn_mask=element_mask(mask, 4, True))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for got, want in zip(inputs, reference):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=1e-10)


def test_bad_inputs_raise_clear_errors():
    q, k = torch.randn(1, 4, 32, 8), torch.randn(1, 2, 32, 8)
    with pytest.raises(ValueError, match="stride"):
        XAttention(block_size=100, stride=8)
    with pytest.raises(ValueError, match="threshold"):
        XAttention(threshold=1.5)
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match=r"local_blocks: expected an int >= 0, got"):
            XAttention(local_blocks=bad)
    with pytest.raises(ValueError, match="threshold"):
        XAttention(block_size=16, stride=4, threshold=torch.tensor([0.5, 0.9])).estimate(q, k)
    with pytest.raises(ValueError, match="q: expected a float tensor"):
        XAttention(block_size=16, stride=4).estimate(q[0], k)
    with pytest.raises(ValueError, match="heads dividing"):
        XAttention(block_size=16, stride=4).estimate(q, torch.randn(1, 3, 32, 8))
    with pytest.raises(ValueError, match="N <= M"):
        XAttention(block_size=16, stride=4).estimate(torch.randn(1, 4, 40, 8), k)
    with pytest.raises(ValueError, match="backend"):
        antidiagonal_block_scores(q, k, 16, 4, backend="cuda")
    with pytest.raises(ValueError, match="CUDA"):
        antidiagonal_block_scores_triton(q, k, 16, 4)
    with pytest.raises(ValueError, match="power of two"):
        antidiagonal_block_scores_triton(q, k, 24, 4)


def test_non_contiguous_inputs_give_the_contiguous_result():
    """Hugging Face passes q/k/v as transposed views of [B, N, H, D] projections."""
    from zoo.layers import MInference, PBSAttention

    q = torch.randn(1, 64, 4, 8, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(1, 64, 2, 8, dtype=torch.float64).transpose(1, 2)
    v = torch.randn(1, 64, 2, 8, dtype=torch.float64).transpose(1, 2)
    assert not q.is_contiguous()
    for layer in (
        XAttention(block_size=16, stride=4, threshold=0.5),
        PBSAttention(block_size=16, segment_size=32, threshold=0.5),
        MInference("block_sparse", block_size=16, topk=2),
    ):
        torch.testing.assert_close(layer(q, k, v), layer(q.contiguous(), k.contiguous(), v.contiguous()))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,m", [(96, 96), (70, 130)])
def test_vectorised_selection_equals_explicit_rule_on_random_scores(causal, n, m):
    """``select`` (one sort, cumsum, compare) against the row-by-row rule, with tied and zero scores."""
    g = torch.Generator().manual_seed(5)
    block, heads = 16, 4
    qb, kb = -(-n // block), -(-m // block)
    scores = torch.rand(2, heads, qb, kb, generator=g)
    scores[..., ::3] = 0.25  # ties, broken by block id
    scores[scores < 0.1] = 0.0
    taus = torch.tensor([0.0, 0.5, 0.95, 1.0])
    mask = XAttention(block_size=block, stride=4, threshold=taus).select(scores, n, m, causal)
    assert mask.kv_indices.shape[-1] == kb and mask.kv_indices.dtype == torch.int32
    assert torch.equal(mask.to_dense(), explicit_selection(scores, taus, n, m, block, causal))
    valid = torch.arange(kb) < mask.kv_num_blocks[..., None]
    listed = torch.where(valid, mask.kv_indices, kb)
    assert torch.equal(listed, listed.sort(-1).values)  # ascending lists


@pytest.mark.gpu
@pytest.mark.parametrize("stride,local_blocks", [(8, 0), (16, 0), (8, 1)])
def test_estimate_on_gpu_bf16_matches_cpu_selection(stride, local_blocks):
    torch.manual_seed(0)
    q, k = structured_qk(1, 8, 2, 2048, 2048, 64, dtype=torch.float32)
    layer = XAttention(block_size=128, stride=stride, threshold=0.9, local_blocks=local_blocks)
    cpu = layer.estimate(q, k).to_dense()
    gpu = layer.estimate(q.cuda().bfloat16(), k.cuda().bfloat16()).to_dense().cpu()
    assert (cpu != gpu).float().mean() < 0.02
    assert gpu[..., 0].all()  # first key block always kept
    rows = torch.arange(1, gpu.shape[2])
    for shift in range(local_blocks + 1):  # the diagonal and the local blocks before it, on the GPU too
        assert gpu[..., rows, (rows - shift).clamp_min(0)].all()
