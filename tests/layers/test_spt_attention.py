"""SPT's sparse MHA: PQ code matches pick the keys, exact clamped attention on them."""

import pytest
import torch
import torch.nn.functional as F

from zoo.layers.spt_attention import (
    PQSparseAttention,
    build_codebook,
    codebook_loss,
    pq_encode,
    pq_sparse_attention,
    pq_sparse_attention_reference,
)


def _qkv(B=2, H=4, Hkv=2, N=33, D=16, scale=1.0):
    return (
        scale * torch.randn(B, H, N, D, dtype=torch.float64),
        scale * torch.randn(B, Hkv, N, D, dtype=torch.float64),
        torch.randn(B, Hkv, N, D, dtype=torch.float64),
    )


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("causal", [True, False])
def test_top_k_equal_to_n_is_dense_attention_with_gqa(causal):
    q, k, v = _qkv(scale=0.5)  # logits well inside [-10, 10]
    out = pq_sparse_attention(q, k, v, top_k=33, causal=causal)
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=causal
    )
    assert _rel(out, ref) < 1e-12


def test_logits_are_clamped_to_plus_minus_ten():
    q, k, v = _qkv(scale=4.0)  # large logits
    out = pq_sparse_attention(q, k, v, top_k=33, causal=True)
    keep = torch.ones(33, 33, dtype=torch.bool).tril().expand(2, 4, 33, 33)
    assert _rel(out, pq_sparse_attention_reference(q, k, v, keep)) < 1e-12
    unclamped = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
    )
    assert _rel(out, unclamped) > 1e-3


def _brute_force_codes(z, codebook):
    S, C, dc = codebook.shape
    zp = F.pad(z, (0, S * dc - z.shape[-1])).unflatten(-1, (S, dc))
    codes = torch.empty(zp.shape[:-1], dtype=torch.long)
    for s in range(S):
        dist = (zp[..., s, None, :] - codebook[s]).abs().sum(-1)
        codes[..., s] = dist.argmin(-1)
    return codes


@pytest.mark.parametrize("causal", [True, False])
def test_kept_keys_are_those_with_most_matching_codes(causal):
    q, k, v = _qkv(H=2, Hkv=1, D=20)  # head dim not a multiple of 8: 3 subspaces, zero padded
    codebook = build_codebook(q, k, generator=torch.Generator().manual_seed(0))
    assert codebook.shape == (3, 16, 8)
    out, idx, valid = pq_sparse_attention(
        q, k, v, top_k=6, causal=causal, codebook=codebook, return_indices=True
    )
    cq, ck = _brute_force_codes(q, codebook), _brute_force_codes(k, codebook)
    assert torch.equal(pq_encode(q, codebook), cq)
    matches = (cq.unsqueeze(-2) == ck.unsqueeze(-3)).sum(-1)  # (B, H, N, N)
    n = 33
    visible = torch.ones(n, n, dtype=torch.bool)
    if causal:
        visible = visible.tril()
    keep = torch.zeros(2, 2, n, n, dtype=torch.bool).scatter_(-1, idx, valid)
    assert torch.equal(keep.sum(-1), visible.sum(-1).clamp(max=6).expand(2, 2, n))
    assert not (keep & ~visible).any()
    worst_kept = matches.masked_fill(~keep, 99).amin(-1)
    best_dropped = matches.masked_fill(keep | ~visible, -1).amax(-1)
    assert (worst_kept >= best_dropped).all()
    assert _rel(out, pq_sparse_attention_reference(q, k, v, keep)) < 1e-12


def test_default_budget_is_one_eighth_of_the_keys():
    q, k, v = _qkv(N=64)
    _, idx, valid = pq_sparse_attention(q, k, v, causal=False, return_indices=True)
    assert idx.shape[-1] == 8 and valid.all()


def test_codebook_loss_by_hand():
    codebook = torch.tensor([[[0.0, 0.0], [2.0, 2.0]]])  # one subspace, two codewords of 2 dims
    z = torch.tensor([[0.5, 0.0]])  # L1 distances 0.5 and 3.5 -> hard centroid (0, 0)
    w = torch.softmax(-torch.log(torch.tensor([0.5, 3.5])), 0)  # = (1/0.5, 1/3.5) normalised
    soft = w[1] * torch.tensor([2.0, 2.0])
    expected = ((z - 0) ** 2).mean() + (soft**2).mean()
    assert torch.allclose(codebook_loss(z, codebook), expected)


def test_module_trains_codebook_and_projections():
    torch.manual_seed(0)
    m = PQSparseAttention(32, num_heads=2, num_kv_heads=1, causal=True)
    x = torch.randn(2, 24, 32)
    m.fit_codebook(x)
    y = m(x)
    assert m.aux_loss is not None and m.aux_loss.item() > 0
    (y.square().mean() + m.aux_loss).backward()
    assert m.codebook.grad is not None and m.codebook.grad.abs().sum() > 0
    assert m.q_proj.weight.grad.abs().sum() > 0 and m.kv_proj.weight.grad.abs().sum() > 0
    m.eval()
    x2 = x.clone()
    x2[:, 20:] += 1.0
    with torch.no_grad():
        assert torch.allclose(m(x)[:, :20], m(x2)[:, :20], atol=1e-6)


def test_bad_inputs_raise_one_clear_error():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="top_k"):
        pq_sparse_attention(q, k, v, top_k=0)
    with pytest.raises(ValueError, match="codebook must be"):
        pq_sparse_attention(q, k, v, codebook=torch.randn(1, 16, 8))
    with pytest.raises(ValueError, match="k and v must agree"):
        pq_sparse_attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="logit_clamp"):
        pq_sparse_attention(q, k, v, logit_clamp=-1.0)
    with pytest.raises(ValueError, match="num_kv_heads"):
        PQSparseAttention(32, num_heads=4, num_kv_heads=3)
