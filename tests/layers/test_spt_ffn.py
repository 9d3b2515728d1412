"""SPT routed FFN (arXiv 2312.10365, upstream ytgui/SPT-proto)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from zoo.layers import RoutedFFN

ACT = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu}


def _make(style, top_k=None, scale_input=True, dim=8, hidden=24, blocks=6, dispatch="grouped"):
    torch.manual_seed(3)
    ffn = RoutedFFN(
        dim, hidden, blocks, top_k, style=style, scale_input=scale_input, dispatch=dispatch
    ).double()
    with torch.no_grad():
        ffn.router.weight.mul_(4.0)  # spread the router scores so the top-k is well separated
    return ffn


def dense_ffn_fp64(ffn, x):
    act = ACT[ffn.activation]
    if ffn.style == "opt":
        return act(x @ ffn.fc1.weight.t() + ffn.fc1.bias) @ ffn.fc2.weight.t() + ffn.fc2.bias
    return (act(x @ ffn.gate.weight.t()) * (x @ ffn.up.weight.t())) @ ffn.down.weight.t()


def routed_fp64(ffn, x):
    """Token by token, block by block, from the formulas in the module docstring."""
    act = ACT[ffn.activation]
    bs = ffn.block_size
    out = []
    for t in range(x.shape[0]):
        p = torch.sigmoid(x[t] @ ffn.router.weight.t() + ffn.router.bias)
        kept = sorted(range(ffn.num_blocks), key=lambda b: -p[b].item())[: ffn.top_k]
        y = ffn.fc2.bias.clone() if ffn.style == "opt" else torch.zeros(ffn.dim, dtype=x.dtype)
        for b in kept:
            c = 2 * p[b]
            cin = c if ffn.scale_input else 1.0
            rows = slice(b * bs, (b + 1) * bs)
            if ffn.style == "opt":
                h = act(cin * (ffn.fc1.weight[rows] @ x[t] + ffn.fc1.bias[rows]))
                y = y + c * (ffn.fc2.weight[:, rows] @ h)
            else:
                h = act(cin * (ffn.gate.weight[rows] @ x[t])) * (cin * (ffn.up.weight[rows] @ x[t]))
                y = y + c * (ffn.down.weight[:, rows] @ h)
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("style", ["opt", "llama"])
@pytest.mark.parametrize("dispatch", ["grouped", "masked"])
def test_all_blocks_with_unit_scale_is_the_dense_ffn(style, dispatch):
    ffn = _make(style, top_k=6, dispatch=dispatch)
    with torch.no_grad():  # sigmoid(0) = 1/2 -> coefficient 2 * 1/2 = 1 for every block
        ffn.router.weight.zero_()
        ffn.router.bias.zero_()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    expected = dense_ffn_fp64(ffn, x)
    torch.testing.assert_close(ffn(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ffn.dense_forward(x), expected, rtol=1e-12, atol=1e-12)
    ffn32 = ffn.float()
    torch.testing.assert_close(ffn32(x.float()), expected.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", ["opt", "llama"])
@pytest.mark.parametrize("scale_input", [True, False])
def test_routed_matches_token_by_token_reference(style, scale_input):
    ffn = _make(style, top_k=2, scale_input=scale_input)
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    expected = routed_fp64(ffn, x.view(-1, 8)).view(3, 4, 8)
    torch.testing.assert_close(ffn(x), expected, rtol=1e-12, atol=1e-12)
    ffn.dispatch = "masked"
    torch.testing.assert_close(ffn(x), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(expected, dense_ffn_fp64(ffn, x))  # routing really drops blocks


def test_default_top_k_half_for_opt_quarter_for_llama():
    assert RoutedFFN(8, 64, 16).top_k == 8
    assert RoutedFFN(8, 64, 16, style="llama").top_k == 4
    assert RoutedFFN(8, 64, 2, style="llama").top_k == 1


@pytest.mark.parametrize("style", ["opt", "llama"])
def test_gradients_match_reference(style):
    ffn = _make(style, top_k=3)
    x = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 8, dtype=torch.float64)
    names = [n for n, _ in ffn.named_parameters()]
    params = [p for _, p in ffn.named_parameters()]
    grads = torch.autograd.grad((ffn(x) * w).sum(), [x] + params)
    ref = torch.autograd.grad((routed_fp64(ffn, x) * w).sum(), [x] + params)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-11)
    assert (
        grads[1 + names.index("router.weight")].abs().sum() > 0
    )  # the router is trained through 2 sigmoid(p)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_tokens_are_batched_by_block_without_python_loops():
    ffn = RoutedFFN(8, 32, 8, top_k=3)
    counts = []
    for n in (3, 96):
        with _CountOps() as mode:
            ffn(torch.randn(n, 8))
        counts.append(mode.calls)
    assert counts[0] == counts[1]


@pytest.mark.parametrize("style", ["opt", "llama"])
def test_from_dense_keeps_the_pretrained_ffn(style):
    torch.manual_seed(0)
    if style == "opt":
        layers = (nn.Linear(8, 32), nn.Linear(32, 8))
        dense = lambda x: layers[1](F.relu(layers[0](x)))
    else:
        layers = (nn.Linear(8, 32, bias=False), nn.Linear(8, 32, bias=False), nn.Linear(32, 8, bias=False))
        dense = lambda x: layers[2](F.silu(layers[0](x)) * layers[1](x))
    ffn = RoutedFFN.from_dense(layers, num_blocks=4, top_k=4)
    x = torch.randn(2, 6, 8)
    torch.testing.assert_close(ffn(x), dense(x), rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="num_blocks: expected a positive divisor of hidden=30, got 4"):
        RoutedFFN(8, 30, 4)
    with pytest.raises(ValueError, match="top_k: expected 1 <= top_k <= num_blocks=4, got 5"):
        RoutedFFN(8, 32, 4, top_k=5)
    with pytest.raises(ValueError, match="style: expected one of"):
        RoutedFFN(8, 32, 4, style="gpt")
    with pytest.raises(ValueError, match=r"x: expected \[\.\.\., 8\], got \[2, 7\]"):
        RoutedFFN(8, 32, 4)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="layers: expected"):
        RoutedFFN.from_dense((nn.Linear(8, 32),), num_blocks=4)


def test_routing_bench_runs_on_cpu(tmp_path):
    import json

    from zoo.cli import main

    argv = "bench routing --device cpu --dtype fp32 --reps 1 --warmup 0 --moe-tokens 64 --moe-seq-len 16"
    argv += f" --moe-dim 16 --expert-hidden 32 --ffn-tokens 64 --ffn-dim 16 --ffn-hidden 64 --out {tmp_path}"
    assert main(argv.split()) == 0
    rows = json.loads((tmp_path / "routing.json").read_text())["rows"]
    names = {(r["group"], r["name"], r["mode"]) for r in rows if "ms" in r}
    assert ("routed_ffn_opt", "routed_grouped", "forward_backward") in names
    assert ("moe_attention", "moe_sparse_cf1.25", "forward") in names
    assert ("moe_softmax", "dense_ffn_equal_active_flops", "forward") in names


@pytest.mark.parametrize("style", ["opt", "llama"])
def test_runs_under_bf16_autocast_close_to_fp32(style):
    torch.manual_seed(0)
    ffn = RoutedFFN(16, 64, 8, top_k=8, style=style)  # all blocks: bf16 rounding cannot flip the top-k
    x = torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = ffn(x)
    ref = ffn(x)
    assert (low.float() - ref).norm() / ref.norm() < 3e-2
