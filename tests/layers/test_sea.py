"""SEA (arXiv 2310.01777): estimated mask, exact sparse attention, dense in its limit."""

import pytest
import torch
import torch.nn.functional as F

from zoo.layers.sea import (
    SEAAttention,
    column_ranges,
    compressed_column_of_key,
    sea_distillation_loss,
    sparse_attention_on_columns,
)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _qkv(B=2, H=4, Hkv=2, N=37, D=8):
    return (
        torch.randn(B, H, N, D, dtype=torch.float64),
        torch.randn(B, Hkv, N, D, dtype=torch.float64),
        torch.randn(B, Hkv, N, D, dtype=torch.float64),
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [37, 5])  # more and fewer tokens than compressed columns
def test_budget_covering_every_column_with_fixed_gates_is_dense_attention(causal, n):
    m = SEAAttention(
        32, 4, num_kv_heads=2, causal=causal, k=10**6, compressed_len=16, fixed_gates=True
    ).double()
    q, k, v = _qkv(N=n)
    details = m.attend(q, k, v, return_details=True)
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=causal
    )
    assert _rel(details.output, ref) < 1e-12
    visible = torch.arange(1, n + 1) if causal else torch.full((n,), n)
    assert torch.equal(details.kept_keys, visible.expand(2, 4, n))


@pytest.mark.parametrize("causal", [False, True])
def test_compressed_columns_partition_each_row(causal):
    n, width = 29, 8
    col = compressed_column_of_key(n, width, causal)
    lengths = torch.arange(1, n + 1) if causal else torch.full((n,), n)
    start, end = column_ranges(lengths, width)
    assert (
        (start[:, 0] == 0).all() and torch.equal(end[:, -1], lengths) and (start[:, 1:] == end[:, :-1]).all()
    )
    for i in range(n):
        for j in range(n):
            c = col[i, j].item()
            if j >= lengths[i]:
                assert c == -1
            else:
                assert start[i, c] <= j < end[i, c]
    # nearest resize: a column of a full row covers ~N / T keys
    assert ((end - start)[-1] - n / width).abs().max() <= 1


def test_sparse_step_equals_masked_dense_attention():
    q, k, v = _qkv(N=21)
    for causal in (False, True):
        selected = torch.rand(2, 4, 21, 6) < 0.4
        col = compressed_column_of_key(21, 6, causal)
        keep = torch.gather(selected, -1, col.clamp_min(0).expand(2, 4, 21, 21)) & (col >= 0)
        logits = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 8**-0.5
        p = torch.nan_to_num(torch.softmax(logits.masked_fill(~keep, float("-inf")), -1))
        for path in ("gather", "dense"):
            out, kept = sparse_attention_on_columns(
                q, k, v, selected, causal=causal, query_chunk=5, path=path
            )
            assert _rel(out, p @ v.repeat_interleave(2, 1)) < 1e-12
            assert torch.equal(kept, keep.sum(-1))


def test_grouped_top_k_shares_the_budget_across_heads():
    n, width, budget = 64, 16, 8  # k' = round(8 * 16 / 64) = 2 columns per head
    for group_heads in (True, False):
        m = SEAAttention(
            32, 4, 2, causal=False, k=budget, compressed_len=width, group_heads=group_heads
        ).double()
        d = m.attend(*_qkv(N=n), return_details=True)
        per_head = d.selected_columns.sum(-1)
        if group_heads:
            assert torch.equal(per_head.sum(1), torch.full((2, n), 8))
            assert (per_head != 2).any()  # heads compete: not an even split everywhere
        else:
            assert torch.equal(per_head, torch.full((2, 4, n), 2))
        # the chosen columns are the best estimated ones
        est = d.estimated_probs
        worst_kept = est.masked_fill(~d.selected_columns, 2.0)
        best_dropped = est.masked_fill(d.selected_columns, -1.0)
        if group_heads:
            assert (worst_kept.amin(dim=(1, 3)) >= best_dropped.amax(dim=(1, 3))).all()
        else:
            assert (worst_kept.amin(-1) >= best_dropped.amax(-1)).all()


def test_returned_attention_matrix_reproduces_the_output():
    for causal in (False, True):
        m = SEAAttention(32, 4, num_kv_heads=2, causal=causal, k=6, compressed_len=8, gate_init=0.3).double()
        q, k, v = _qkv(N=30)
        d = m.attend(q, k, v, return_details=True, return_attention=True)
        assert _rel(d.attention @ v.repeat_interleave(2, 1), d.output) < 1e-12
        g0, g1 = d.gates.unbind(-1)
        # g0 scales the sparse part; a head that won no column of the shared budget has none
        assert torch.allclose(d.attention.sum(-1), g1 * g0 * (d.kept_keys > 0) + 1 - g1, atol=1e-12)
        if causal:
            assert (d.attention.triu(1) == 0).all()


def test_causal_module_never_reads_future_tokens():
    torch.manual_seed(0)
    m = SEAAttention(32, 4, causal=True, k=4, compressed_len=8).double()
    x = torch.randn(1, 24, 32, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 15:] += torch.randn_like(x2[:, 15:])
    assert torch.allclose(m(x)[:, :15], m(x2)[:, :15], atol=1e-12, rtol=0)


def test_gradients_reach_projections_gates_and_predictor():
    torch.manual_seed(0)
    m = SEAAttention(32, 4, causal=True, k=4, compressed_len=8)
    x = torch.randn(2, 20, 32)
    y, d = m(x, return_details=True)
    teacher = torch.softmax(
        torch.randn(2, 4, 20, 20).masked_fill(torch.ones(20, 20).triu(1).bool(), -1e9), -1
    )
    terms = sea_distillation_loss(d, teacher, causal=True)
    (y.square().mean() + sum(terms.values())).backward()
    for name in (
        "q_proj.weight",
        "kv_proj.weight",
        "gate_head.bias",
        "predictor_rows.weight",
        "predictor_cnn.conv1.weight",
    ):
        assert m.get_parameter(name).grad.abs().sum() > 0, name


def test_estimation_target_is_teacher_mass_per_column():
    m = SEAAttention(16, 2, causal=False, k=4, compressed_len=4).double()
    d = m.attend(*_qkv(B=1, H=2, Hkv=2, N=8, D=8), return_details=True)
    # a teacher that puts all mass on key 5 -> column 2 of 4 (keys 4, 5)
    teacher = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    teacher[..., 5] = 1
    perfect = d._replace(estimated_probs=F.one_hot(torch.tensor(2), 4).double().expand(1, 2, 8, 4))
    assert sea_distillation_loss(perfect, teacher, causal=False)["estimation"].item() < 1e-9
    assert sea_distillation_loss(d, teacher, causal=False)["estimation"].item() > 1e-3


def test_bad_inputs_raise_one_clear_error():
    with pytest.raises(ValueError, match="compressed_len"):
        SEAAttention(32, 4, compressed_len=10)
    with pytest.raises(ValueError, match="k must be"):
        SEAAttention(32, 4, k=0)
    m = SEAAttention(32, 4, causal=True, max_len=16)
    with pytest.raises(ValueError, match="max_len"):
        m(torch.randn(1, 17, 32))
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(17, 32))
    with pytest.raises(ValueError, match="k and v must be"):
        m.attend(torch.randn(1, 4, 5, 8), torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8))
