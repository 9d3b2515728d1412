"""Scatterbrain (arXiv 2110.15343): exact on the support, low-rank elsewhere, unbiased overall."""

import math

import pytest
import torch
import torch.nn.functional as F

from zoo.layers.scatterbrain import (
    ScatterbrainAttention,
    draw_feature_projection,
    draw_hash_vectors,
    orthogonal_gaussian_projection,
    performer_attention,
    performer_log_features,
    projection_rows,
    scatterbrain_attention,
    scatterbrain_attention_reference,
    scatterbrain_support_mask,
)


def _qkv(B=2, H=4, Hkv=2, N=37, D=8, Dv=None, scale=1.0):
    q = scale * torch.randn(B, H, N, D, dtype=torch.float64)
    k = scale * torch.randn(B, Hkv, N, D, dtype=torch.float64)
    v = torch.randn(B, Hkv, N, Dv or D, dtype=torch.float64)
    return q, k, v


def _phi(x, proj, scale, feature_map="positive"):
    xs = x * math.sqrt(scale)
    damp = torch.exp(-0.5 * (xs * xs).sum(-1, keepdim=True))
    if feature_map == "positive":
        return torch.exp(xs @ proj.T) * damp / math.sqrt(proj.shape[0])
    # cosh: exp(+w.x) and exp(-w.x) per row w, 2 r features in all
    return (
        torch.cat([torch.exp(xs @ proj.T), torch.exp(-xs @ proj.T)], -1) * damp / math.sqrt(2 * proj.shape[0])
    )


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("sparse", ["local", "lsh"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "mode,feature_map",
    [("scatterbrain", "cosh"), ("scatterbrain", "positive"), ("sparse", "cosh"), ("lowrank", "cosh"),
     ("lowrank", "positive")],
)  # fmt: skip
def test_fast_path_equals_dense_fp64_reference_with_gqa(sparse, causal, mode, feature_map):
    q, k, v = _qkv()
    proj = draw_feature_projection(24, 8, feature_map, dtype=torch.float64)
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
        feature_map=feature_map,
    )
    support = scatterbrain_support_mask(
        q, k, sparse=sparse, window=8, n_hashes=2, causal=causal, hash_vectors=hv
    )
    ref = scatterbrain_attention_reference(
        q, k, v, support, proj, causal=causal, mode=mode, feature_map=feature_map
    )
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


@pytest.mark.parametrize("feature_map", ["cosh", "positive"])
def test_on_support_entries_exact_off_support_low_rank(feature_map):
    N, D, scale = 12, 6, 6**-0.5
    q, k, _ = _qkv(B=1, H=1, Hkv=1, N=N, D=D)
    eye = torch.eye(N, dtype=torch.float64).view(1, 1, N, N)  # v = I exposes the attention matrix
    proj = draw_feature_projection(32, D, feature_map, dtype=torch.float64)
    out, lognorm = scatterbrain_attention(
        q,
        k,
        eye,
        sparse="local",
        window=3,
        projection=proj,
        return_log_normalizer=True,
        feature_map=feature_map,
    )
    matrix = out * lognorm.exp().unsqueeze(-1)
    exact = torch.exp(scale * q @ k.transpose(-1, -2))
    lowrank = _phi(q, proj, scale, feature_map) @ _phi(k, proj, scale, feature_map).transpose(-1, -2)
    i = torch.arange(N)
    band = (i[:, None] - i[None, :]).abs() < 3
    assert torch.allclose(matrix[..., band], exact[..., band], rtol=1e-10, atol=0)
    assert torch.allclose(matrix[..., ~band], lowrank[..., ~band], rtol=1e-10, atol=0)
    assert not torch.allclose(lowrank[..., ~band], exact[..., ~band], rtol=1e-2)


@pytest.mark.parametrize("feature_map", ["cosh", "positive"])
def test_averaging_feature_redraws_converges_to_exact_attention(feature_map):
    N, D = 16, 4
    q, k, v = _qkv(B=1, H=1, Hkv=1, N=N, D=D, scale=0.5)
    eye = torch.eye(N, dtype=torch.float64).view(1, 1, N, N)
    exact = torch.exp(D**-0.5 * q @ k.transpose(-1, -2))
    gen = torch.Generator().manual_seed(1)
    matrices = []
    for _ in range(60):
        proj = draw_feature_projection(32, D, feature_map, generator=gen, dtype=torch.float64)
        out, lognorm = scatterbrain_attention(
            q,
            k,
            eye,
            sparse="local",
            window=2,
            projection=proj,
            return_log_normalizer=True,
            feature_map=feature_map,
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


@pytest.mark.parametrize("feature_map", ["cosh", "positive"])
def test_lowrank_mode_is_performer_attention(feature_map):
    q, k, v = _qkv()
    proj = draw_feature_projection(16, 8, feature_map, dtype=torch.float64)
    for causal in (False, True):
        a = scatterbrain_attention(
            q, k, v, mode="lowrank", projection=proj, causal=causal, feature_map=feature_map
        )
        b = performer_attention(q, k, v, proj, causal=causal, chunk=8, feature_map=feature_map)
        assert _rel(a, b) < 1e-12


@pytest.mark.parametrize("feature_map", ["cosh", "positive"])
def test_gradcheck_local_fp64(feature_map):
    q, k, v = _qkv(B=1, H=1, Hkv=1, N=5, D=2)
    proj = orthogonal_gaussian_projection(3, 2, dtype=torch.float64)
    for t in (q, k, v):
        t.requires_grad_(True)
    fn = lambda a, b, c: scatterbrain_attention(
        a, b, c, sparse="local", window=2, causal=True, projection=proj, feature_map=feature_map
    )
    assert torch.autograd.gradcheck(fn, (q, k, v))
    perf = lambda a, b, c: performer_attention(a, b, c, proj, causal=True, chunk=2, feature_map=feature_map)
    assert torch.autograd.gradcheck(perf, (q, k, v))


@pytest.mark.parametrize(
    "sparse,causal,feature_map",
    [("lsh", False, "cosh"), ("local", False, "cosh"), ("lsh", True, "cosh"), ("lsh", True, "positive")],
)
def test_gradients_match_reference_autograd(sparse, causal, feature_map):
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
            out = scatterbrain_attention_reference(
                a, b, c, support, proj, causal=causal, feature_map=feature_map
            )
        else:
            out = scatterbrain_attention(
                a, b, c, sparse=sparse, window=4, n_hashes=2, causal=causal, projection=proj, hash_vectors=hv,
                feature_map=feature_map,
            )  # fmt: skip
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


@pytest.mark.parametrize("sparse,causal", [("lsh", False), ("local", True)])
def test_bf16_autocast_computes_in_fp32_like_without_autocast(sparse, causal):
    # autocast would run the score matmuls in bf16, where the masked-score fill overflows
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=gen).bfloat16() for _ in range(3))
    proj = draw_feature_projection(16, 8, "cosh", generator=gen)
    hv = draw_hash_vectors(1, 8)
    kw = dict(sparse=sparse, window=8, causal=causal, projection=proj, hash_vectors=hv)
    plain = scatterbrain_attention(q, k, v, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = scatterbrain_attention(q, k, v, **kw)
        performer = performer_attention(q, k, v, proj, causal=causal, feature_map="cosh")
    assert under_autocast.dtype == torch.bfloat16
    assert torch.equal(under_autocast, plain)
    assert torch.equal(performer, performer_attention(q, k, v, proj, causal=causal, feature_map="cosh"))


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


def _kernel_estimates(q, k, projections, feature_map, scale):
    """phi(q) phi(k)^T for each projection: (R, Nq, Nk), through the library's feature code."""
    return torch.stack(
        [
            (
                performer_log_features(q, p, scale, feature_map).unsqueeze(-2)
                + performer_log_features(k, p, scale, feature_map).unsqueeze(-3)
            )
            .exp()
            .sum(-1)
            for p in projections
        ]
    )


def _controlled_inputs(n, d, scale, lo, hi, gen):
    """q, k with s |q + k|^2 spread over [lo, hi] (moderate, so sample variances are reliable)."""
    q = torch.randn(n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(n, d, generator=gen, dtype=torch.float64)
    q = (
        q
        / q.norm(dim=-1, keepdim=True)
        * torch.linspace(lo, hi, n, dtype=torch.float64)[:, None]
        / math.sqrt(scale)
    )
    k = (
        k
        / k.norm(dim=-1, keepdim=True)
        * torch.linspace(hi, lo, n, dtype=torch.float64)[:, None]
        / math.sqrt(scale)
    )
    return q, k


def test_cosh_estimator_is_unbiased_with_the_predicted_lower_variance():
    # independent Gaussian rows: per entry, with z = sqrt(s)(q + k) and m features,
    #   positive: Var = exp(2 s q.k) (exp(|z|^2) - 1) / m
    #   cosh:     Var = exp(2 s q.k) (exp(|z|^2) - 1)^2 exp(-|z|^2) / m   (ratio 1 - exp(-|z|^2))
    D, m, R, scale = 4, 8, 4000, 0.5
    gen = torch.Generator().manual_seed(3)
    q, k = _controlled_inputs(6, D, scale, 0.15, 0.45, gen)
    exact = torch.exp(scale * q @ k.T)
    z2 = scale * ((q[:, None, :] + k[None, :, :]) ** 2).sum(-1)
    predicted = {
        "positive": exact**2 * torch.expm1(z2) / m,
        "cosh": exact**2 * torch.expm1(z2) ** 2 * torch.exp(-z2) / m,
    }
    var = {}
    for feature_map in ("positive", "cosh"):
        rows = projection_rows(m, feature_map)
        projections = torch.randn(R, rows, D, generator=gen, dtype=torch.float64)
        est = _kernel_estimates(q, k, projections, feature_map, scale)
        # unbiased: every entry's mean over R redraws within 4.5 standard errors of exp(s q.k)
        z_scores = (est.mean(0) - exact) / (predicted[feature_map] / R).sqrt()
        assert z_scores.abs().max() < 4.5, feature_map
        var[feature_map] = est.var(0)
        assert 0.85 < (var[feature_map] / predicted[feature_map]).mean() < 1.15, feature_map
    ratio = var["cosh"] / var["positive"]
    assert torch.allclose(ratio.mean(), (-torch.expm1(-z2)).mean(), rtol=0.15)
    assert (ratio.mean() < 0.6) and (var["cosh"].sum() < 0.6 * var["positive"].sum())


def test_cosh_orthogonal_features_converge_with_lower_variance_than_positive():
    D, m, R, scale = 8, 16, 600, 8**-0.5
    gen = torch.Generator().manual_seed(4)
    q, k = _controlled_inputs(8, D, scale, 0.1, 0.7, gen)
    exact = torch.exp(scale * q @ k.T)
    var = {}
    for feature_map in ("positive", "cosh"):
        projections = [
            draw_feature_projection(m, D, feature_map, generator=gen, dtype=torch.float64) for _ in range(R)
        ]
        assert projections[0].shape == (projection_rows(m, feature_map), D)
        est = _kernel_estimates(q, k, projections, feature_map, scale)
        var[feature_map] = est.var(0)
        stderr = (var[feature_map] / R).sqrt()
        assert ((est.mean(0) - exact).abs() / stderr).max() < 4.5, feature_map
        assert _rel(est.mean(0), exact) < 0.02
    assert var["cosh"].sum() < 0.7 * var["positive"].sum()
    # and the full estimate of attention is closer with cosh on average over redraws
    errs = {}
    N = 32
    qa, ka, va = _qkv(B=1, H=1, Hkv=1, N=N, D=D, scale=0.6)
    ref = F.scaled_dot_product_attention(qa, ka, va)
    for feature_map in ("positive", "cosh"):
        g = torch.Generator().manual_seed(5)
        errs[feature_map] = sum(
            _rel(
                scatterbrain_attention(qa, ka, va, m, mode="lowrank", feature_map=feature_map, generator=g),
                ref,
            )
            for _ in range(20)
        )
    assert errs["cosh"] < 0.9 * errs["positive"]


def test_module_feature_map_sets_the_projection_and_matches_the_function():
    for feature_map, rows in (("cosh", 8), ("positive", 16)):
        m = ScatterbrainAttention(
            16, num_heads=2, num_features=16, sparse="local", window=4, feature_map=feature_map
        )
        assert m.projection.shape == (rows, 8)
        q, k, v = (torch.randn(1, 2, 11, 8) for _ in range(3))
        ref = scatterbrain_attention(
            q, k, v, sparse="local", window=4, projection=m.projection, feature_map=feature_map
        )
        assert torch.equal(m.attend(q, k, v), ref)
    assert ScatterbrainAttention(16, num_heads=2).feature_map == "cosh"
    assert projection_rows(7, "cosh") == 3 and projection_rows(7, "positive") == 7


def test_bad_feature_map_inputs_raise_one_clear_error():
    q, k, v = _qkv()
    proj = orthogonal_gaussian_projection(4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="feature_map must be 'positive' or 'cosh', got 'relu'"):
        scatterbrain_attention(q, k, v, feature_map="relu")
    with pytest.raises(ValueError, match="feature_map must be"):
        performer_attention(q, k, v, proj, feature_map="relu")
    with pytest.raises(ValueError, match="feature_map must be"):
        scatterbrain_attention_reference(q, k, v, torch.ones(37, 37), proj, feature_map="exp")
    with pytest.raises(ValueError, match="feature_map must be"):
        ScatterbrainAttention(16, num_heads=2, feature_map="COSH")
    with pytest.raises(ValueError, match="num_features must be an int >= 2 for feature_map='cosh', got 1"):
        scatterbrain_attention(q, k, v, num_features=1)
    with pytest.raises(ValueError, match="num_features must be an int >= 2"):
        draw_feature_projection(1, 8, "cosh")
    with pytest.raises(ValueError, match="num_features must be an int >= 1 for feature_map='positive'"):
        projection_rows(0, "positive")
    with pytest.raises(ValueError, match="num_features"):
        ScatterbrainAttention(16, num_heads=2, num_features=1)
    # one feature per row is fine for positive features
    assert scatterbrain_attention(q, k, v, num_features=1, feature_map="positive").shape == (2, 4, 37, 8)
