"""The PyTorch references: dense attention against SDPA and a naive loop, and block-sparse
attention against dense masked attention in fp64 over the option matrix (values, lse, grads)."""

import math

import pytest
import torch
import torch.nn.functional as F

from zoo.kernels import (
    BlockSparseMask,
    block_sparse_attention,
    block_sparse_attention_reference,
    dense_attention_reference,
)

from .attention_cases import OPTION_MATRIX, Case, make_case, rel_error


def naive_attention(q, k, v, keep, scale):
    """One query at a time, Python loops over heads: the textbook formula."""
    batch, heads, q_len, _ = q.shape
    group = heads // k.shape[1]
    out = torch.zeros_like(q)
    lse = torch.full((batch, heads, q_len), -math.inf, dtype=q.dtype)
    for b in range(batch):
        for h in range(heads):
            for i in range(q_len):
                visible = keep[b, h, i].nonzero().flatten()
                if len(visible) == 0:
                    continue
                s = (k[b, h // group, visible] @ q[b, h, i]) * scale
                lse[b, h, i] = torch.logsumexp(s, 0)
                out[b, h, i] = torch.softmax(s, 0) @ v[b, h // group, visible]
    return out, lse


@pytest.mark.parametrize("causal", [False, True])
def test_dense_reference_matches_a_naive_loop(causal):
    q = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 11, 8, dtype=torch.float64), torch.randn(2, 2, 11, 8, dtype=torch.float64)
    keep = torch.rand(2, 4, 7, 11) < 0.6
    keep[0, 1, 3] = False  # an empty row
    out, lse = dense_attention_reference(q, k, v, causal=causal, attn_mask=keep, scale=0.3, return_lse=True)
    full_keep = keep.clone()
    if causal:  # queries at the last 7 of 11 positions
        full_keep &= torch.arange(11)[None, :] <= torch.arange(7)[:, None] + 4
    expected, expected_lse = naive_attention(q, k, v, full_keep, 0.3)
    assert rel_error(out, expected) < 1e-12
    assert torch.equal(torch.isinf(lse), torch.isinf(expected_lse))
    finite = torch.isfinite(expected_lse)
    assert torch.allclose(lse[finite], expected_lse[finite])
    assert (out[0, 1, 3] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_dense_reference_equals_sdpa_with_gqa(causal):
    q = torch.randn(2, 6, 24, 16, dtype=torch.float64)
    k, v = torch.randn(2, 3, 24, 16, dtype=torch.float64), torch.randn(2, 3, 24, 16, dtype=torch.float64)
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=causal
    )
    assert rel_error(dense_attention_reference(q, k, v, causal=causal), expected) < 1e-12


@pytest.mark.parametrize("case", OPTION_MATRIX, ids=lambda c: c.name)
def test_block_sparse_reference_matches_dense_masked_fp64(case):
    q, k, v, mask, keep = make_case(case, seed=hash(case.name) % 1000)
    out, lse = block_sparse_attention_reference(q, k, v, mask, causal=case.causal, return_lse=True)
    expected, expected_lse = dense_attention_reference(
        q, k, v, causal=case.causal, attn_mask=keep, return_lse=True
    )
    assert out.dtype == torch.float64 and lse.shape == (case.batch, case.heads, case.q_len)
    assert rel_error(out, expected) < 1e-12
    assert torch.equal(torch.isinf(lse), torch.isinf(expected_lse))
    finite = torch.isfinite(lse)
    assert torch.allclose(lse[finite], expected_lse[finite], atol=1e-12)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    for name, got, want in zip("qkv", grads, expected_grads):
        assert torch.isfinite(got).all(), name
        assert rel_error(got, want) < 1e-12, name


def test_block_sparse_reference_is_not_dense_attention():
    # guards against a reference that ignores the mask
    q, k, v, mask, keep = make_case(Case("sparse", density=0.3, q_len=64, kv_len=64))
    assert not keep.all()
    out = block_sparse_attention_reference(q, k, v, mask)
    assert rel_error(out, dense_attention_reference(q, k, v)) > 0.1


def test_full_density_equals_sdpa():
    q = torch.randn(1, 4, 50, 32)
    k, v = torch.randn(1, 2, 50, 32), torch.randn(1, 2, 50, 32)
    mask = BlockSparseMask.from_dense(torch.ones(1, 1, 4, 4, dtype=torch.bool), 16, 50, 50)
    out = block_sparse_attention(q, k, v, mask, causal=True)
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
    )
    assert out.dtype == torch.float32
    assert rel_error(out, expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    case = Case("lowp", heads=4, kv_heads=2, q_len=40, kv_len=56, causal=True)
    q, k, v, mask, keep = make_case(case, dtype=dtype)
    out, lse = block_sparse_attention(q, k, v, mask, causal=True, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    expected = dense_attention_reference(*(t.double() for t in (q, k, v)), causal=True, attn_mask=keep)
    assert rel_error(out, expected) < (1e-2 if dtype != torch.float32 else 1e-5)


def test_empty_rows_give_zero_and_finite_grads():
    case = Case("empty", q_len=48, empty_rows=True, causal=True)
    q, k, v, mask, _ = make_case(case)
    out, lse = block_sparse_attention(q, k, v, mask, causal=True, return_lse=True)
    assert (out[:, :, :16] == 0).all() and torch.isneginf(lse[:, :, :16]).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (q.grad[:, :, :16] == 0).all()


def test_backend_torch_and_auto_on_cpu_agree():
    q, k, v, mask, _ = make_case(Case("auto", causal=True), dtype=torch.float32)
    a = block_sparse_attention(q, k, v, mask, causal=True)
    b = block_sparse_attention(q, k, v, mask, causal=True, backend="torch")
    assert torch.equal(a, b)


def _inputs():
    q = torch.randn(1, 4, 32, 16)
    k = torch.randn(1, 2, 32, 16)
    mask = BlockSparseMask.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool), 16, 32, 32)
    return q, k, mask


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda q, k, m: (q[0], k, k, m), "q"),
        (lambda q, k, m: (q, k, k[:, :, :31], m), "k/v"),
        (lambda q, k, m: (q, k[..., :8], k[..., :8], m), "k"),
        (lambda q, k, m: (q, torch.randn(1, 3, 32, 16), torch.randn(1, 3, 32, 16), m), "Hkv"),
        (lambda q, k, m: (q, k.double(), k.double(), m), "dtype"),
        (lambda q, k, m: (q.int(), k, k, m), "floating"),
        (lambda q, k, m: (q[:, :, :16], k, k, m), "q_len"),
        (lambda q, k, m: (q, k, k, "dense"), "BlockSparseMask"),
        (
            lambda q, k, m: (
                q,
                k,
                k,
                BlockSparseMask.from_dense(torch.ones(1, 3, 2, 2, dtype=torch.bool), 16, 32, 32),
            ),
            "head",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(make, match):
    q, k, mask = _inputs()
    args = make(q, k, mask)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(*args)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention_reference(*args)


def test_unknown_backend_is_rejected():
    q, k, mask = _inputs()
    with pytest.raises(ValueError, match="backend"):
        block_sparse_attention(q, k, k, mask, backend="cuda")
