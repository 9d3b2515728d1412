"""GIN-attention and Sparse-GIN (arXiv 2501.02393, upstream lamm-mit/Graph-Aware-Transformers)."""

import math

import pytest
import torch
import torch.nn.functional as F

from zoo.layers import GINAttention, SparseGINAdapter
from zoo.layers.gin_attention import gin_aggregate, gin_attention_reference, sparse_gin_adjacency


def _randomise(module):
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in ("alpha", "scale"):
                continue
            p.add_(0.3 * torch.randn_like(p))
    return module


def gin_attention_fp64(m, x):
    """Independent per-head computation: softmax(alpha q k^T / sqrt d) then eps x + A x -> MLP."""
    b, n, c = x.shape
    d = m.head_dim
    q = x @ m.q_proj.weight.t()
    k = x @ m.k_proj.weight.t()
    heads = []
    for h in range(m.num_heads):
        s = slice(h * d, (h + 1) * d)
        scores = m.alpha * torch.einsum("bid,bjd->bij", q[..., s], k[..., s]) / math.sqrt(d)
        if m.causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        a = torch.exp(scores - scores.amax(-1, keepdim=True))
        a = a / a.sum(-1, keepdim=True)
        z = m.eps[h] * x[..., s] + torch.einsum("bij,bjd->bid", a, x[..., s])
        if m.use_mlp:
            z = z @ m.mlp_w1[h] + m.mlp_b1[h]
            z = z / torch.sqrt((z * z).mean(-1, keepdim=True) + m.norm_eps) * m.mlp_norm[h]
            z = z * torch.sigmoid(z)
            z = z @ m.mlp_w2[h] + m.mlp_b2[h]
        heads.append(z)
    out = torch.cat(heads, -1)
    if m.out_proj is not None:
        out = out @ m.out_proj.weight.t() + m.out_proj.bias
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_identity_mlp_and_zero_eps_is_softmax_attention_with_identity_values(causal, alpha):
    m = GINAttention(16, 4, causal=causal, use_mlp=False, out_proj=False).double()
    with torch.no_grad():
        m.alpha.fill_(alpha)
    assert torch.equal(m.eps, torch.zeros(4, dtype=torch.float64))
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    split = lambda t: t.view(2, 7, 4, 4).transpose(1, 2)
    expected = F.scaled_dot_product_attention(
        split(m.q_proj(x)), split(m.k_proj(x)), split(x), is_causal=causal, scale=alpha / 2.0
    )
    expected = expected.transpose(1, 2).reshape(2, 7, 16)
    torch.testing.assert_close(m(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("out_proj", [True, False])
def test_matches_independent_fp64_reference(out_proj):
    m = _randomise(GINAttention(12, 3, mlp_ratio=2.0, out_proj=out_proj, qkv_bias=False).double().eval())
    with torch.no_grad():
        m.alpha.fill_(1.7)
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    expected = gin_attention_fp64(m, x)
    torch.testing.assert_close(m(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gin_attention_reference(m, x), expected, rtol=1e-12, atol=1e-12)
    out, probs = m(x, return_attn=True)
    assert probs.shape == (2, 3, 6, 6) and probs.triu(1).abs().max() == 0


def test_causal_outputs_ignore_future_tokens():
    m = _randomise(GINAttention(8, 2).double().eval())
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 4:] += 1.0
    torch.testing.assert_close(m(x2)[:, :4], m(x)[:, :4], rtol=0, atol=0)


def test_gradients_match_reference_and_reach_every_parameter():
    m = _randomise(GINAttention(8, 2).double().eval())
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 5, 8, dtype=torch.float64)
    params = [p for _, p in m.named_parameters()]
    grads = torch.autograd.grad((m(x) * w).sum(), [x] + params)
    ref = torch.autograd.grad((gin_attention_fp64(m, x) * w).sum(), [x] + params)
    for (name, _), g, r in zip([("x", None)] + list(m.named_parameters()), grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-11)
        assert g.abs().sum() > 0, name


def test_sparse_gin_adjacency_follows_its_formula():
    probs = torch.softmax(torch.randn(2, 3, 6, 6, dtype=torch.float64) * 2, -1)
    adj = sparse_gin_adjacency(probs, threshold=0.1, sharpness=10.0, edge_threshold=0.6)
    for b in range(2):
        for i in range(6):
            for j in range(6):
                a = min(probs[b, :, i, j].sum().item(), 1.0)
                s = 1.0 / (1.0 + math.exp(-10.0 * (a - 0.1)))
                want = s if (s > 0.6 and j <= i) else 0.0
                assert adj[b, i, j].item() == pytest.approx(want, abs=1e-12)
    assert (adj == 0).any() and (adj > 0).any()
    no_loops = sparse_gin_adjacency(probs, self_loops=False)
    assert torch.equal(torch.diagonal(no_loops, dim1=-2, dim2=-1), torch.zeros(2, 6, dtype=torch.float64))


def test_sparse_gin_aggregates_all_past_tokens():
    # one head attending uniformly to its past: summed attention 1, 1/2, 1/3 -> every past edge survives
    attn = torch.tensor([[1, 0, 0], [1 / 2, 1 / 2, 0], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)[
        None, None
    ]
    adj = sparse_gin_adjacency(attn)
    lower = torch.ones(3, 3, dtype=torch.bool).tril()
    assert (adj[0][lower] > 0).all() and adj[0][~lower].abs().max() == 0
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    eps = 0.25
    out = gin_aggregate(x, adj, eps)
    w = adj[0]
    expected_last = eps * x[0, 2] + w[2, 0] * x[0, 0] + w[2, 1] * x[0, 1] + w[2, 2] * x[0, 2]
    torch.testing.assert_close(out[0, 2], expected_last, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[0, 0], eps * x[0, 0] + w[0, 0] * x[0, 0], rtol=1e-12, atol=1e-12)
    # through the whole adapter: the last token's output depends on both earlier tokens, the first on none
    adapter = _randomise(SparseGINAdapter(4, gnn_dim=6, init_scale=1.0, dropout=0.0).double())
    hidden = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(adapter(hidden, attn)[0, 2].sum(), hidden)
    assert grad[0, 0].abs().sum() > 0 and grad[0, 1].abs().sum() > 0
    (grad,) = torch.autograd.grad(adapter(hidden, attn)[0, 0].sum(), hidden)
    assert grad[0, 1:].abs().max() == 0


def test_zero_scale_reproduces_the_frozen_model_exactly():
    torch.manual_seed(0)
    frozen_attention = GINAttention(16, 4, use_mlp=False).eval()
    adapter = _randomise(SparseGINAdapter(16, gnn_dim=8, init_scale=0.0))
    x = torch.randn(2, 9, 16)
    attn_out, probs = frozen_attention(x, return_attn=True)
    hidden = x + attn_out  # the frozen layer's residual stream after attention
    out = adapter(hidden, probs)
    assert torch.equal(out, hidden)
    # and the scale is trainable from zero
    out.sum().backward()
    assert adapter.scale.grad.abs() > 0
    with torch.no_grad():
        adapter.scale.fill_(0.5)
    assert not torch.allclose(adapter(hidden, probs), hidden)


def test_adapter_matches_fp64_formula():
    adapter = _randomise(SparseGINAdapter(6, gnn_dim=4, mlp_ratio=1.5, init_scale=0.7, dropout=0.0).double())
    hidden = torch.randn(2, 5, 6, dtype=torch.float64)
    probs = torch.softmax(
        torch.randn(2, 2, 5, 5, dtype=torch.float64).masked_fill(
            torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf")
        ),
        -1,
    )
    adj = sparse_gin_adjacency(probs)
    prelu = lambda t, a: torch.where(t >= 0, t, a * t)
    x = hidden @ adapter.in_proj.weight.t() + adapter.in_proj.bias
    agg = adapter.eps * x + adj @ x
    mlp = prelu(agg @ adapter.gin_fc1.weight.t() + adapter.gin_fc1.bias, adapter.gin_act.weight)
    g = prelu(agg + mlp @ adapter.gin_fc2.weight.t() + adapter.gin_fc2.bias, adapter.act.weight)
    g = g @ adapter.out_proj.weight.t() + adapter.out_proj.bias
    g = g / torch.sqrt((g * g).mean(-1, keepdim=True) + adapter.norm_eps) * adapter.norm_weight
    torch.testing.assert_close(adapter(hidden, probs), hidden + adapter.scale * g, rtol=1e-12, atol=1e-12)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="num_heads: expected a positive divisor of dim=10, got 4"):
        GINAttention(10, 4)
    with pytest.raises(ValueError, match=r"x: expected \[B, N, 8\], got \[2, 8\]"):
        GINAttention(8, 2)(torch.randn(2, 8))
    adapter = SparseGINAdapter(8)
    with pytest.raises(ValueError, match=r"attn_probs: expected \[2, H, 3, 3\], got \[2, 3, 3\]"):
        adapter(torch.randn(2, 3, 8), torch.rand(2, 3, 3))
    with pytest.raises(ValueError, match=r"hidden: expected \[B, N, 8\], got \[2, 3, 4\]"):
        adapter(torch.randn(2, 3, 4), torch.rand(2, 1, 3, 3))
    with pytest.raises(ValueError, match=r"attn_probs: expected \[B, H, N, N\]"):
        sparse_gin_adjacency(torch.rand(2, 3, 4))


def test_gin_adapter_command_runs_end_to_end(tmp_path):
    import json
    import shutil
    from pathlib import Path

    from zoo.cli import main

    if shutil.which("bible") is None or not Path("/usr/share/dictd/gcide.dict.dz").exists():
        pytest.skip("needs Debian bible-kjv and dict-gcide")
    argv = (
        "train gin-adapter --dim 16 --depth 2 --heads 2 --seq-len 16 --batch 2 --pretrain-steps 3 --steps 3"
    )
    argv += f" --gnn-dim 8 --eval-windows 2 --eval-every 3 --gcide-bytes 400000 --out {tmp_path}"
    assert main(argv.split()) == 0
    result = json.loads((tmp_path / "routing_gin_adapter.json").read_text())["results"]
    gin, lora = result["sparse-gin"], result["lora"]
    assert abs(gin["trainable_params"] - lora["trainable_params"]) <= 0.25 * gin["trainable_params"]
    assert math.isfinite(gin["gcide_val"]["ppl"]) and math.isfinite(lora["gcide_val"]["ppl"])
    # LoRA's up-projection starts at zero, so before training it is the base model
    assert lora["gcide_val_before"] == result["base"]["gcide_val"]
