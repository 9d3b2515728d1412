"""MoE with standard, similarity-aware and attention-aware routers (arXiv 2505.00792)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from zoo.layers import MoE
from zoo.layers.moe import graph_mixed_probs, load_balancing_loss, similarity_graph

ROUTERS = ["softmax", "similarity", "attention"]


def _random_attention(b, h, n, causal=False, dtype=torch.float64):
    scores = torch.randn(b, h, n, n, dtype=dtype)
    if causal:
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1)


def _make(router, dim=8, experts=4, top_k=2, **kw):
    torch.manual_seed(1)
    moe = MoE(dim, experts, top_k, router=router, hidden=12, **kw).double()
    with torch.no_grad():  # non-zero biases so a wrong bias path shows
        moe.b_in.normal_()
        moe.b_out.normal_()
        if router == "similarity":
            moe.similarity_weight.add_(0.3 * torch.randn(dim, dim, dtype=torch.float64))
    return moe


def reference_moe(moe, x, attn=None):
    """Token-by-token fp64 computation of the MoE output straight from the formulas."""
    b, n, c = x.shape
    e, k = moe.num_experts, moe.top_k
    rows = []
    for bi in range(b):
        logits = x[bi] @ moe.gate.weight.t() + moe.gate.bias
        p = torch.exp(logits - logits.max(-1, keepdim=True).values)
        p = p / p.sum(-1, keepdim=True)
        if moe.router == "softmax":
            rows.append(p)
            continue
        mixed = []
        for i in range(n):
            if moe.router == "similarity":
                js = range(i + 1) if moe.causal else range(n)
                w = torch.stack([x[bi, i] @ moe.similarity_weight @ x[bi, j] / moe.temperature for j in js])
                w = torch.exp(w - w.max())
                w = w / w.sum()
            else:
                js = range(n)
                w = attn[bi, :, i, :].mean(0)
            mixed.append(sum(w[jj] * p[j] for jj, j in enumerate(js)))
        rows.append(torch.stack(mixed))
    probs = torch.stack(rows).reshape(b * n, e)
    tokens = x.reshape(b * n, c)
    choices = []
    for t in range(b * n):
        order = sorted(range(e), key=lambda j: -probs[t, j].item())[:k]
        gate = torch.stack([probs[t, j] for j in order])
        if moe.normalize_gates:
            gate = gate / gate.sum()
        choices.append((order, gate))
    if moe.capacity_factor is None:
        capacity = b * n * k
    else:
        capacity = math.ceil(moe.capacity_factor * b * n * k / e)
    load = [0] * e
    kept = [[False] * k for _ in range(b * n)]
    for r in range(k):  # first choices of every token before any second choice
        for t in range(b * n):
            j = choices[t][0][r]
            if load[j] < capacity:
                load[j] += 1
                kept[t][r] = True
    out = []
    for t in range(b * n):
        y = torch.zeros(c, dtype=x.dtype)
        for r, j in enumerate(choices[t][0]):
            if kept[t][r]:
                hid = F.gelu(tokens[t] @ moe.w_in[j] + moe.b_in[j])
                y = y + choices[t][1][r] * (hid @ moe.w_out[j] + moe.b_out[j])
        out.append(y)
    return torch.stack(out).view(b, n, c), kept


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_matches_token_by_token_fp64_reference(router, capacity_factor):
    moe = _make(router, capacity_factor=capacity_factor)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    attn = _random_attention(2, 3, 6) if router == "attention" else None
    y, info = moe(x, attn, return_routing=True)
    ref, kept = reference_moe(moe, x, attn)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    assert info.kept.reshape(-1, 2).tolist() == kept
    if capacity_factor is not None:
        assert not info.kept.all()  # the capacity actually dropped something here


@pytest.mark.parametrize("router", ROUTERS)
def test_sparse_and_dense_dispatch_agree(router):
    moe = _make(router, capacity_factor=1.0)
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    attn = _random_attention(3, 2, 7) if router == "attention" else None
    y_sparse = moe(x, attn)
    moe.dispatch = "dense"
    torch.testing.assert_close(moe(x, attn), y_sparse, rtol=1e-12, atol=1e-12)


def test_identity_graph_gives_standard_router_exactly():
    torch.manual_seed(0)
    standard = MoE(8, 4, 2, router="softmax", hidden=12)
    x = torch.randn(2, 5, 8)
    eye = torch.eye(5).expand(2, 3, 5, 5)
    # attention router fed A = I
    attention = MoE(8, 4, 2, router="attention", hidden=12)
    attention.load_state_dict(standard.state_dict())
    y_std, info_std = standard(x, return_routing=True)
    y_att, info_att = attention(x, eye, return_routing=True)
    assert torch.equal(info_att.probs, info_std.probs)
    assert torch.equal(info_att.expert_index, info_std.expert_index)
    assert torch.equal(y_att, y_std)
    # similarity router whose graph is the identity: unit-norm tokens, tiny temperature
    xn = F.normalize(x, dim=-1)
    similarity = MoE(8, 4, 2, router="similarity", hidden=12, temperature=1e-4)
    similarity.load_state_dict(standard.state_dict(), strict=False)
    graph = similarity_graph(xn, similarity.similarity_weight, 1e-4)
    assert torch.equal(graph, torch.eye(5).expand(2, 5, 5))
    assert torch.equal(similarity(xn), standard(xn))
    assert torch.equal(graph_mixed_probs(info_std.probs, torch.eye(5).expand(2, 5, 5)), info_std.probs)


@pytest.mark.parametrize("causal", [False, True])
def test_mixed_router_rows_are_distributions(causal):
    x = torch.randn(3, 9, 8, dtype=torch.float64)
    moe = _make("similarity", causal=causal)
    graph = similarity_graph(x, moe.similarity_weight, moe.temperature, causal)
    torch.testing.assert_close(graph.sum(-1), torch.ones(3, 9, dtype=torch.float64), rtol=0, atol=1e-12)
    if causal:
        assert graph.triu(1).abs().max() == 0
    for router, attn in (("similarity", None), ("attention", _random_attention(3, 4, 9, causal))):
        probs = _make(router, causal=causal).routing_probs(x, attn)
        assert probs.min() >= 0
        torch.testing.assert_close(probs.sum(-1), torch.ones(3, 9, dtype=torch.float64), rtol=0, atol=1e-12)
    # and the mixing really mixes: P~ differs from P for a non-identity graph
    p = torch.softmax(torch.randn(3, 9, 4, dtype=torch.float64), -1)
    assert not torch.allclose(graph_mixed_probs(p, graph), p)


@pytest.mark.parametrize("router", ["similarity", "attention"])
def test_causal_routing_ignores_future_tokens(router):
    moe = _make(router, causal=True)
    x = torch.randn(1, 8, 8, dtype=torch.float64)
    attn = _random_attention(1, 2, 8, causal=True) if router == "attention" else None
    y = moe(x, attn)
    x2 = x.clone()
    x2[:, 5:] = torch.randn(1, 3, 8, dtype=torch.float64)
    attn2 = attn
    if attn is not None:  # only the rows of the changed tokens may change
        attn2 = attn.clone()
        attn2[:, :, 5:] = _random_attention(1, 2, 8, causal=True)[:, :, 5:]
    y2 = moe(x2, attn2)
    torch.testing.assert_close(y2[:, :5], y[:, :5], rtol=0, atol=0)
    if router == "similarity":  # the bidirectional graph does leak the future
        moe.causal = False
        assert not torch.allclose(moe(x2)[:, :5], moe(x)[:, :5])


def test_capacity_keeps_first_choices_in_token_order():
    moe = MoE(4, 4, 1, hidden=6, capacity_factor=1.0).double()
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))  # every token wants expert 0
    x = torch.randn(1, 8, 4, dtype=torch.float64)
    y, info = moe(x, return_routing=True)
    assert info.capacity == 2
    assert info.kept.view(-1).tolist() == [True, True] + [False] * 6
    assert torch.equal(y[0, 2:], torch.zeros(6, 4, dtype=torch.float64))
    assert y[0, :2].abs().min() > 0
    torch.testing.assert_close(info.expert_load, torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_load_balancing_loss_values_and_gradient():
    e = 4
    uniform = torch.full((8, e), 1.0 / e)
    balanced = torch.arange(8).remainder(e).view(8, 1)
    assert load_balancing_loss(uniform, balanced, e).item() == pytest.approx(1.0)
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]])
    index = torch.tensor([[0], [0], [3]])
    # f = (2/3, 0, 0, 1/3), p = (1.4/3, 0.4/3, 0.3/3, 0.9/3)
    expected = e * (2 / 3 * 1.4 / 3 + 1 / 3 * 0.9 / 3)
    assert load_balancing_loss(probs, index, e).item() == pytest.approx(expected)
    moe = MoE(8, e, 2, router="similarity", hidden=8)
    _, info = moe(torch.randn(2, 5, 8), return_routing=True)
    info.aux_loss.backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    assert moe.similarity_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("router", ROUTERS)
def test_gradients_match_reference(router):
    moe = _make(router, capacity_factor=1.0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    attn = _random_attention(2, 2, 5).requires_grad_() if router == "attention" else None
    weights = torch.randn(2, 5, 8, dtype=torch.float64)
    names = [name for name, _ in moe.named_parameters()]
    params = [p for _, p in moe.named_parameters()]
    inputs = [x] + ([attn] if attn is not None else [])
    grads = torch.autograd.grad((moe(x, attn) * weights).sum(), inputs + params)
    ref_out, _ = reference_moe(moe, x, attn)
    ref_grads = torch.autograd.grad((ref_out * weights).sum(), inputs + params)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)
    assert grads[len(inputs) + names.index("gate.weight")].abs().sum() > 0  # the router learns


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("router", ROUTERS)
def test_dispatch_has_no_per_token_python_loop(router):
    moe = MoE(8, 4, 2, router=router, hidden=8, capacity_factor=1.25)
    counts = []
    for n in (4, 64):
        x = torch.randn(2, n, 8)
        attn = _random_attention(2, 2, n, dtype=torch.float32) if router == "attention" else None
        with _CountOps() as mode:
            moe(x, attn)
        counts.append(mode.calls)
    assert counts[0] == counts[1]


def test_bad_inputs_raise_clear_errors():
    moe = MoE(8, 4, 2)
    with pytest.raises(ValueError, match=r"x: expected \[B, N, 8\]"):
        moe(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="attn: only the 'attention' router"):
        moe(torch.randn(2, 3, 8), torch.rand(2, 1, 3, 3))
    att = MoE(8, 4, 2, router="attention")
    with pytest.raises(ValueError, match="attn: the attention router needs"):
        att(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"attn: expected \[2, H, 3, 3\], got \[2, 3, 3\]"):
        att(torch.randn(2, 3, 8), torch.rand(2, 3, 3))
    with pytest.raises(ValueError, match="top_k: expected 1 <= top_k <= num_experts=4, got 5"):
        MoE(8, 4, 5)
    with pytest.raises(ValueError, match="router: expected one of"):
        MoE(8, 4, 2, router="hash")
    with pytest.raises(ValueError, match="capacity_factor: expected None or > 0, got 0"):
        MoE(8, 4, 2, capacity_factor=0)


def test_moe_lm_command_runs_end_to_end(tmp_path):
    import json
    import shutil

    from zoo.cli import main

    if shutil.which("bible") is None:
        pytest.skip("needs the 'bible' program (Debian bible-kjv) for the KJV text")
    argv = "train moe-lm --dim 16 --depth 1 --heads 2 --seq-len 16 --batch 2 --steps 4 --experts 4"
    argv += f" --expert-hidden 8 --eval-windows 2 --probe-windows 2 --probe-every 1 --eval-every 2 --out {tmp_path}"
    assert main(argv.split()) == 0
    result = json.loads((tmp_path / "routing_moe_lm.json").read_text())
    assert result["command"].startswith("zoo train moe-lm ") and "--expert-hidden 8" in result["command"]
    for router in ROUTERS:
        entry = result["results"][router]
        assert 0.0 <= entry["routing_fluctuation"] <= 1.0
        assert abs(sum(entry["expert_load_per_layer"][0]) - 1.0) < 1e-3
        assert math.isfinite(entry["val"]["ppl"])
