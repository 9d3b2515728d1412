"""Scatterbrain (arXiv 2110.15343): exact on the support, low-rank elsewhere, unbiased overall."""

import math

import pytest
import torch
import torch.nn.functional as F

from zoo.layers.scatterbrain import (
    ScatterbrainAttention,
    draw_hash_vectors,
    orthogonal_gaussian_projection,
    performer_attention,
    scatterbrain_attention,
    scatterbrain_attention_reference,
    scatterbrain_support_mask,
)


def _qkv(B=2, H=4, Hkv=2, N=37, D=8, Dv=None, scale=1.0):
    q = scale * torch.randn(B, H, N, D, dtype=torch.float64)
    k = scale * torch.randn(B, Hkv, N, D, dtype=torch.float64)
    v = torch.randn(B, Hkv, N, Dv or D, dtype=torch.float64)
    return q, k, v


def _phi(x, proj, scale):
    xs = x * math.sqrt(scale)
    return torch.exp(xs @ proj.T - 0.5 * (xs * xs).sum(-1, keepdim=True)) / math.sqrt(proj.shape[0])


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("sparse", ["local", "lsh"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["scatterbrain", "sparse", "lowrank"])
def test_fast_path_equals_dense_fp64_reference_with_gqa(sparse, causal, mode):
    q, k, v = _qkv()
    proj = orthogonal_gaussian_projection(24, 8, dtype=torch.float64)
    hv = draw_hash_vectors(2, 8)
    out = scatterbrain_attention(
        q,
        k,
        v,
        sparse=sparse,
        window=8,
        causal=causal,
        n_hashes=2,
        mode=mode,
        projection=proj,
        hash_vectors=hv,
    )
    support = scatterbrain_support_mask(
        q, k, sparse=sparse, window=8, n_hashes=2, causal=causal, hash_vectors=hv
    )
    ref = scatterbrain_attention_reference(q, k, v, support, proj, causal=causal, mode=mode)
    assert out.shape == (2, 4, 37, 8)
    assert _rel(out, ref) < 1e-12


def test_local_support_is_the_band():
    q, k, _ = _qkv(B=1, H=2, Hkv=1, N=23)
    i = torch.arange(23)
    for causal in (False, True):
        band = (i[:, None] - i[None, :]).abs() < 5
        if causal:
            band &= i[None, :] <= i[:, None]
        mask = scatterbrain_support_mask(q, k, sparse="local", window=5, causal=causal)
        assert torch.equal(mask, band.expand(1, 2, 23, 23))


def test_lsh_support_is_balanced_and_finds_large_inner_products():
    N, D, window = 64, 16, 8
    centers = 3 * torch.randn(8, D, dtype=torch.float64)
    assign = torch.arange(N) % 8
    k = (centers[assign] + 0.3 * torch.randn(N, D, dtype=torch.float64)).view(1, 1, N, D)
    q = (centers[assign[torch.randperm(N)]] + 0.3 * torch.randn(N, D, dtype=torch.float64)).view(1, 1, N, D)
    mask = scatterbrain_support_mask(
        q, k, sparse="lsh", window=window, n_hashes=1, hash_vectors=draw_hash_vectors(1, D)
    )
    # balanced clusters: every query sees exactly `window` keys, every key is seen by `window` queries
    assert (mask.sum(-1) == window).all() and (mask.sum(-2) == window).all()
    # rows of one cluster share one key set
    rows = {tuple(r.tolist()) for r in mask[0, 0].int()}
    assert len(rows) == N // window
    # the best key of a query lands in its support far more often than the support's density
    best = (q @ k.transpose(-1, -2)).argmax(-1)[0, 0, :, None]
    for n_hashes in (1, 4):
        mask = scatterbrain_support_mask(
            q, k, sparse="lsh", window=window, n_hashes=n_hashes, hash_vectors=draw_hash_vectors(n_hashes, D)
        )
        recall = mask[0, 0].gather(-1, best).double().mean().item()
        assert recall > 2 * mask.double().mean().item()


def test_on_support_entries_exact_off_support_low_rank():
    N, D, scale = 12, 6, 6**-0.5
    q, k, _ = _qkv(B=1, H=1, Hkv=1, N=N, D=D)
    eye = torch.eye(N, dtype=torch.float64).view(1, 1, N, N)  # v = I exposes the attention matrix
    proj = orthogonal_gaussian_projection(32, D, dtype=torch.float64)
    out, lognorm = scatterbrain_attention(
        q, k, eye, sparse="local", window=3, projection=proj, return_log_normalizer=True
    )
    matrix = out * lognorm.exp().unsqueeze(-1)
    exact = torch.exp(scale * q @ k.transpose(-1, -2))
    lowrank = _phi(q, proj, scale) @ _phi(k, proj, scale).transpose(-1, -2)
    i = torch.arange(N)
    band = (i[:, None] - i[None, :]).abs() < 3
    assert torch.allclose(matrix[..., band], exact[..., band], rtol=1e-10, atol=0)
    assert torch.allclose(matrix[..., ~band], lowrank[..., ~band], rtol=1e-10, atol=0)
    assert not torch.allclose(lowrank[..., ~band], exact[..., ~band], rtol=1e-2)


def test_averaging_feature_redraws_converges_to_exact_attention():
    N, D = 16, 4
    q, k, v = _qkv(B=1, H=1, Hkv=1, N=N, D=D, scale=0.5)
    eye = torch.eye(N, dtype=torch.float64).view(1, 1, N, N)
    exact = torch.exp(D**-0.5 * q @ k.transpose(-1, -2))
    gen = torch.Generator().manual_seed(1)
    matrices = []
    for _ in range(60):
        proj = orthogonal_gaussian_projection(32, D, generator=gen, dtype=torch.float64)
        out, lognorm = scatterbrain_attention(
            q, k, eye, sparse="local", window=2, projection=proj, return_log_normalizer=True
        )
        matrices.append(out * lognorm.exp().unsqueeze(-1))
    stack = torch.stack(matrices)
    err_one = _rel(stack[0], exact)
    err_few = _rel(stack[:6].mean(0), exact)
    err_all = _rel(stack.mean(0), exact)
    # the error of the average shrinks like 1 / sqrt(redraws)
    assert err_all < 0.1 and err_all < err_few / 1.7 and err_few < err_one
    # the normalised output converges too
    num = (stack @ v).mean(0)
    den = stack.sum(-1, keepdim=True).mean(0)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert _rel(num / den, ref) < 0.06 < _rel(stack[0] @ v / stack[0].sum(-1, keepdim=True), ref)


@pytest.mark.parametrize("causal", [False, True])
def test_support_covering_everything_is_exact_softmax_attention(causal):
    q, k, v = _qkv(N=20)
    out = scatterbrain_attention(q, k, v, num_features=5, sparse="local", window=20, causal=causal)
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=causal
    )
    assert _rel(out, ref) < 1e-12
    sparse_only = scatterbrain_attention(q, k, v, sparse="lsh", window=64, causal=causal, mode="sparse")
    assert _rel(sparse_only, ref) < 1e-12


def test_lowrank_mode_is_performer_attention():
    q, k, v = _qkv()
    proj = orthogonal_gaussian_projection(16, 8, dtype=torch.float64)
    for causal in (False, True):
        a = scatterbrain_attention(q, k, v, mode="lowrank", projection=proj, causal=causal)
        b = performer_attention(q, k, v, proj, causal=causal)
        assert _rel(a, b) < 1e-12


def test_gradcheck_local_fp64():
    q, k, v = _qkv(B=1, H=1, Hkv=1, N=5, D=2)
    proj = orthogonal_gaussian_projection(3, 2, dtype=torch.float64)
    for t in (q, k, v):
        t.requires_grad_(True)
    fn = lambda a, b, c: scatterbrain_attention(
        a, b, c, sparse="local", window=2, causal=True, projection=proj
    )
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("sparse,causal", [("lsh", False), ("local", False), ("lsh", True)])
def test_gradients_match_reference_autograd(sparse, causal):
    q, k, v = _qkv(N=19)
    proj = orthogonal_gaussian_projection(12, 8, dtype=torch.float64)
    hv = draw_hash_vectors(2, 8)
    support = scatterbrain_support_mask(
        q, k, sparse=sparse, window=4, n_hashes=2, causal=causal, hash_vectors=hv
    )
    grads = []
    for use_ref in (False, True):
        a, b, c = (t.clone().requires_grad_(True) for t in (q, k, v))
        if use_ref:
            out = scatterbrain_attention_reference(a, b, c, support, proj, causal=causal)
        else:
            out = scatterbrain_attention(
                a, b, c, sparse=sparse, window=4, n_hashes=2, causal=causal, projection=proj, hash_vectors=hv
            )
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append([a.grad, b.grad, c.grad])
    for g_fast, g_ref in zip(*grads):
        assert _rel(g_fast, g_ref) < 1e-10


def test_module_trains_with_gqa_and_local_causal_module_is_causal():
    torch.manual_seed(0)
    m = ScatterbrainAttention(32, num_heads=4, num_kv_heads=2, sparse="local", window=4, causal=True).double()
    x = torch.randn(2, 13, 32, dtype=torch.float64, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    x2 = x.detach().clone()
    x2[:, 9:] += torch.randn_like(x2[:, 9:])
    assert torch.allclose(m(x2)[:, :9], y[:, :9], atol=1e-12, rtol=0)
    lsh = ScatterbrainAttention(32, num_heads=4, sparse="lsh", window=4, n_hashes=2).float()
    assert lsh(torch.randn(1, 17, 32)).shape == (1, 17, 32)


def test_bad_inputs_raise_one_clear_error():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="q must be"):
        scatterbrain_attention(q[0], k, v)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        scatterbrain_attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="sparse must be"):
        scatterbrain_attention(q, k, v, sparse="random")
    with pytest.raises(ValueError, match="window"):
        scatterbrain_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="mode"):
        scatterbrain_attention(q, k, v, mode="dense")
    with pytest.raises(ValueError, match="projection must be"):
        scatterbrain_attention(q, k, v, projection=torch.randn(4, 5))
    with pytest.raises(ValueError, match="num_heads"):
        ScatterbrainAttention(30, num_heads=4)
