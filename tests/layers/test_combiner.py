"""Combiner (arXiv 2107.05768): full support at sub-quadratic cost, exact in its limits."""

import pytest
import torch
import torch.nn.functional as F

from zoo.layers.combiner import (
    CombinerAttention,
    combiner_attention,
    combiner_attention_reference,
    combiner_regions,
)

CASES = [("fixed", True), ("fixed", False), ("logsparse", True), ("logsparse", False), ("axial", True),
         ("axial", False), ("mixture", True)]  # fmt: skip


def _qkv(B=1, H=4, Hkv=2, N=23, D=8):
    return (
        torch.randn(B, H, N, D, dtype=torch.float64),
        torch.randn(B, Hkv, N, D, dtype=torch.float64),
        torch.randn(B, Hkv, N, D, dtype=torch.float64),
    )


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("variant,causal", CASES)
@pytest.mark.parametrize("n,segment_len", [(23, 5), (16, 4), (9, None)])
def test_vectorised_path_equals_per_query_reference_with_gqa(variant, causal, n, segment_len):
    q, k, v = _qkv(N=n)
    out = combiner_attention(q, k, v, variant, segment_len, causal)
    ref = combiner_attention_reference(q, k, v, variant, segment_len, causal)
    assert out.shape == (1, 4, n, 8)
    assert _rel(out, ref) < 1e-12


@pytest.mark.parametrize("variant,causal", CASES)
def test_regions_cover_every_visible_key(variant, causal):
    n = 19
    for i, (direct, regions) in enumerate(combiner_regions(n, variant, 4, causal)):
        keys = list(direct) + [j for block, _ in regions for j in block]
        visible = set(range(i + 1)) if causal else set(range(n))
        assert set(keys) == visible
        if variant != "mixture":  # a partition; the mixture overlaps on purpose
            assert len(keys) == len(visible)
        assert all(len(block) > 0 for block, _ in regions)
    if variant == "logsparse":  # O(log N) regions per query
        assert max(len(r) for _, r in combiner_regions(1024, "logsparse", None, causal)) <= 2 * 10


@pytest.mark.parametrize("causal", [True, False])
def test_fixed_with_one_segment_is_exact_attention(causal):
    q, k, v = _qkv(N=17)
    out = combiner_attention(q, k, v, "fixed", segment_len=17, causal=causal)
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=causal
    )
    assert _rel(out, ref) < 1e-12
    axial = combiner_attention(q, k, v, "axial", segment_len=32, causal=causal)
    assert _rel(axial, ref) < 1e-12


def test_single_token_regions_are_exact():
    # segments of one token: every region is one key, its summary is that key's value -> exact attention
    q, k, v = _qkv(N=11)
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
    )
    assert _rel(combiner_attention(q, k, v, "fixed", segment_len=1), ref) < 1e-12


@pytest.mark.parametrize("variant", ["fixed", "logsparse", "axial", "mixture"])
def test_causal_jacobian_is_full_lower_triangle(variant):
    torch.manual_seed(0)
    n, dim = 10, 8
    m = CombinerAttention(dim, num_heads=2, variant=variant, segment_len=3, causal=True).double()
    x = torch.randn(1, n, dim, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: m(t)[0], x)[:, :, 0]  # (n, dim, n, dim)
    size = jac.abs().sum(dim=(1, 3))  # dy_i / dx_j summed over features
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    assert (size[j <= i] > 1e-6).all()
    assert (size[j > i] == 0).all()


def test_module_trains_end_to_end_with_gqa():
    m = CombinerAttention(32, num_heads=4, num_kv_heads=2, variant="logsparse", causal=False)
    x = torch.randn(2, 20, 32, requires_grad=True)
    y = m(x)
    y.square().mean().backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_bad_inputs_raise_one_clear_error():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="variant must be one of"):
        combiner_attention(q, k, v, "strided")
    with pytest.raises(ValueError, match="segment_len"):
        combiner_attention(q, k, v, "fixed", segment_len=0)
    with pytest.raises(ValueError, match="causal=True only"):
        combiner_attention(q, k, v, "mixture", causal=False)
    with pytest.raises(ValueError, match="head dim"):
        combiner_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="x must be"):
        CombinerAttention(16, 2)(torch.randn(3, 16))


@pytest.mark.parametrize("variant", ["fixed", "axial"])
@pytest.mark.parametrize("causal", [True, False])
def test_segment_attention_through_the_block_sparse_kernel_matches(variant, causal):
    q, k, v = (t.float() for t in _qkv(B=2, N=40, D=16))  # 3 segments of 16, the last one ragged
    with torch.no_grad():
        fast = combiner_attention(q, k, v, variant, 16, causal, backend="kernel")
        plain = combiner_attention(q, k, v, variant, 16, causal, backend="torch")
    assert _rel(fast, plain) < 1e-5
    with pytest.raises(ValueError, match="backend"):
        combiner_attention(q, k, v, variant, 16, causal, backend="triton")
