"""BlockSparseMask: index lists, conversions, density and the selection rules of from_scores."""

import pytest
import torch

from zoo.kernels import BlockSparseMask
from zoo.kernels.block_mask import causal_reachable_blocks


def test_from_dense_lists_kept_blocks_ascending_and_round_trips():
    blocks = torch.rand(2, 3, 5, 7) < 0.4
    blocks[0, 1, 2] = False  # an empty row
    mask = BlockSparseMask.from_dense(blocks, (16, 32), q_len=70, kv_len=200)
    assert mask.kv_num_blocks.dtype == torch.int32 and mask.kv_indices.dtype == torch.int32
    assert torch.equal(mask.kv_num_blocks, blocks.sum(-1).int())
    assert mask.kv_indices.shape[-1] == int(blocks.sum(-1).max())
    for b in range(2):
        for h in range(3):
            for i in range(5):
                n = int(mask.kv_num_blocks[b, h, i])
                expected = torch.nonzero(blocks[b, h, i]).flatten().int()
                assert torch.equal(mask.kv_indices[b, h, i, :n], expected)
    assert torch.equal(mask.to_dense(), blocks)


def test_all_empty_mask_keeps_one_column():
    mask = BlockSparseMask.from_dense(torch.zeros(1, 1, 2, 3, dtype=torch.bool), 16, 32, 48)
    assert mask.kv_indices.shape == (1, 1, 2, 1) and int(mask.kv_num_blocks.sum()) == 0
    assert not mask.to_dense().any() and mask.density() == 0.0


def test_density_counts_causally_reachable_blocks():
    # N = M = 64, blocks 16: 4 x 4, causally reachable = lower triangle incl. diagonal = 10
    blocks = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    blocks[0, 0, :, 0] = True  # 4 kept, all reachable
    blocks[0, 1, 0, 3] = True  # above the diagonal: not reachable
    blocks[0, 1, 3, 3] = True
    mask = BlockSparseMask.from_dense(blocks, 16, 64, 64)
    assert mask.density() == pytest.approx(6 / 32)
    assert mask.density(causal=True) == pytest.approx(5 / 20)


def test_causal_reachability_with_queries_at_the_end():
    # N = 20 queries at positions 44..63 of M = 64, blocks 16 x 16: query block 0 covers
    # positions 44..59 (keys 0..59 -> key blocks 0..3), block 1 covers 60..63 (all 4 blocks)
    reach = causal_reachable_blocks(20, 64, 16, 16)
    assert reach.tolist() == [[True] * 4, [True] * 4]
    reach = causal_reachable_blocks(64, 64, 32, 16)  # query blocks 0..31, 32..63
    assert reach.tolist() == [[True, True, False, False], [True] * 4]


def test_from_scores_topk_keeps_the_best_blocks():
    scores = torch.rand(2, 2, 3, 6)
    mask = BlockSparseMask.from_scores(scores, 8, 24, 48, topk=2)
    expected = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(2, dim=-1).indices, True)
    assert torch.equal(mask.to_dense(), expected)


def test_from_scores_threshold_keeps_the_fewest_blocks_reaching_tau():
    scores = torch.rand(1, 3, 4, 8)
    tau = torch.tensor([0.3, 0.6, 0.95])
    dense = BlockSparseMask.from_scores(scores, 16, 64, 128, threshold=tau).to_dense()
    for h in range(3):
        for i in range(4):
            row, kept = scores[0, h, i], dense[0, h, i]
            assert row[kept].sum() >= tau[h] * row.sum()
            # fewest: dropping the weakest kept block falls below tau, and every kept block
            # scores at least as high as every dropped one
            weakest = row[kept].min()
            assert row[kept].sum() - weakest < tau[h] * row.sum()
            if (~kept).any():
                assert row[kept].min() >= row[~kept].max()


def test_from_scores_causal_forces_sink_and_diagonal_and_never_looks_ahead():
    q_len, kv_len, bq, bk = 48, 80, 16, 16  # queries at positions 32..79
    scores = torch.rand(1, 2, 3, 5)
    scores[..., 1] = 100.0  # a heavy block that is in the future for query block 0? (keys 16..31: no)
    scores[..., 4] = 50.0  # keys 64..79: future for query block 0 (positions 32..47)
    for kwargs in (dict(topk=1), dict(threshold=0.5), dict(topk=4)):
        dense = BlockSparseMask.from_scores(scores, (bq, bk), q_len, kv_len, causal=True, **kwargs).to_dense()
        reach = causal_reachable_blocks(q_len, kv_len, bq, bk)
        assert not (dense & ~reach).any(), kwargs
        assert dense[..., 0].all(), kwargs  # sink
        for i in range(3):
            diag = (kv_len - q_len + i * bq) // bk
            assert dense[..., i, diag].all(), kwargs
    dense = BlockSparseMask.from_scores(scores, (bq, bk), q_len, kv_len, causal=True, topk=3).to_dense()
    assert dense[..., 0, 1].all()  # forced sink + diagonal, then the heaviest visible block
    assert not dense[..., 0, 4].any()


def test_flex_round_trip_and_causal_flex_mask_matches_flex_own():
    from torch.nn.attention.flex_attention import create_block_mask

    blocks = torch.rand(2, 2, 3, 4) < 0.5
    mask = BlockSparseMask.from_dense(blocks, (16, 32), 40, 100)
    back = BlockSparseMask.from_flex(mask.to_flex())
    assert torch.equal(back.to_dense(), blocks)

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    flex = create_block_mask(causal, 1, 1, 64, 64, device="cpu", BLOCK_SIZE=16)
    ours = BlockSparseMask.from_flex(flex)
    assert torch.equal(ours.to_dense()[0, 0], causal_reachable_blocks(64, 64, 16, 16))
    assert int(ours.full_kv_num_blocks.sum()) == 6  # strictly below the diagonal
    again = BlockSparseMask.from_dense(ours.to_dense(), 16, 64, 64).to_flex(causal=True)
    assert torch.equal(again.to_dense(), flex.to_dense())
    assert torch.equal(again.full_kv_num_blocks, flex.full_kv_num_blocks)


def test_to_keeps_everything():
    perm = torch.randperm(48).view(1, 1, 48)
    mask = BlockSparseMask.from_dense(torch.rand(1, 1, 2, 3) < 0.5, 16, 32, 48, key_perm=perm)
    moved = mask.to("cpu")
    assert torch.equal(moved.to_dense(), mask.to_dense()) and torch.equal(moved.key_perm, perm)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: BlockSparseMask.from_dense(torch.ones(1, 1, 3, 3, dtype=torch.bool), 16, 32, 48), "blocks"),
        (lambda: BlockSparseMask.from_dense(torch.ones(3, 3, dtype=torch.bool), 16, 48, 48), "blocks"),
        (
            lambda: BlockSparseMask.from_dense(torch.ones(1, 1, 3, 3, dtype=torch.bool), 0, 48, 48),
            "block_size",
        ),
        (lambda: BlockSparseMask.from_scores(torch.rand(1, 1, 2, 2), 16, 32, 32), "topk/threshold"),
        (
            lambda: BlockSparseMask.from_scores(torch.rand(1, 1, 2, 2), 16, 32, 32, topk=1, threshold=0.5),
            "topk",
        ),
        (lambda: BlockSparseMask.from_scores(torch.rand(1, 1, 2, 2), 16, 32, 32, threshold=1.5), "threshold"),
        (
            lambda: BlockSparseMask.from_scores(torch.rand(1, 2, 2, 2), 16, 32, 32, threshold=torch.ones(3)),
            "threshold",
        ),
        (lambda: BlockSparseMask.from_scores(torch.rand(1, 1, 2, 3), 16, 32, 32, topk=1), "scores"),
        (
            lambda: BlockSparseMask(
                16, 16, 32, 32, torch.zeros(1, 1, 2), torch.zeros(1, 1, 2, 1, dtype=torch.int32)
            ),
            "kv_num_blocks",
        ),
        (
            lambda: BlockSparseMask(
                16,
                16,
                32,
                32,
                torch.zeros(1, 1, 3, dtype=torch.int32),
                torch.zeros(1, 1, 3, 1, dtype=torch.int32),
            ),
            "Qb",
        ),
        (
            lambda: BlockSparseMask.from_dense(
                torch.ones(1, 1, 2, 2, dtype=torch.bool), 16, 32, 32, key_perm=torch.arange(31).view(1, 1, 31)
            ),
            "key_perm",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
