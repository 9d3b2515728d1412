"""``zoo.layers.linear``: the linear layer whose bias gradient is ``G^T 1``, against fp64 ``F.linear``.

The layer's autograd function runs on every device (CPU here, cuBLAS under marker ``gpu``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.layers.linear import Linear, bias_grad, bias_grad_reference, linear

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.detach().double()
    return float((got.detach().double() - want).norm() / want.norm().clamp_min(1e-30))


def compare(shape, out_features: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> dict:
    """Output and the three gradients of ``Linear`` (fp32 parameters, ``dtype`` compute) vs fp64."""
    gen = torch.Generator(device=device).manual_seed(seed)
    layer = Linear(shape[-1], out_features, device=device)
    with torch.no_grad():  # a bias far from zero and a gradient with a common offset: a dropped
        layer.bias.normal_(generator=gen)  # or repeated row changes the bias gradient visibly
    x = torch.randn(*shape, generator=gen, device=device).to(dtype).requires_grad_(True)
    grad_y = torch.randn(*shape[:-1], out_features, generator=gen, device=device, dtype=torch.float64) + 2.0
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        out = layer(x)
    grads = torch.autograd.grad(out, (x, layer.weight, layer.bias), grad_y.to(out.dtype))
    exact = [t.detach().double().requires_grad_(True) for t in (x, layer.weight, layer.bias)]
    expected = F.linear(*exact)
    expected_grads = torch.autograd.grad(expected, exact, grad_y)
    row = {"dtype": out.dtype, "shape": tuple(out.shape), "grad_dtypes": [g.dtype for g in grads]}
    for key, got, want in zip(("out", "dx", "dweight", "dbias"), (out, *grads), (expected, *expected_grads)):
        row[key] = rel_error(got, want)
    return row


@pytest.mark.parametrize(
    "shape, out_features, dtype",
    [((2, 21, 12), 20, torch.float32), ((33, 8), 5, torch.float32), ((3, 11, 16), 24, torch.bfloat16)],
)
def test_matches_fp64_linear(shape, out_features, dtype):
    row = compare(shape, out_features, dtype)
    assert row["dtype"] == dtype and row["shape"] == (*shape[:-1], out_features)
    for key in ("out", "dx", "dweight", "dbias"):
        assert row[key] < TOLERANCE[dtype], (key, row)
    # the input keeps its dtype's gradient; fp32 parameters keep fp32 gradients under autocast
    assert row["grad_dtypes"] == [dtype, torch.float32, torch.float32]


def test_bias_grad_is_the_column_sum():
    grad = torch.randn(1000, 7, dtype=torch.float64) + 3.0
    assert rel_error(bias_grad(grad), grad.sum(0)) < 1e-12
    assert rel_error(bias_grad_reference(grad), grad.sum(0)) < 1e-7  # fp32 accumulation
    assert rel_error(bias_grad(grad.t().contiguous().t()), grad.sum(0)) < 1e-12  # strided input
    assert torch.equal(bias_grad(torch.zeros(0, 4)), torch.zeros(4))
    # the cached ones grow with the rows and are sliced: a short call after a long one is exact
    assert rel_error(bias_grad(grad[:3]), grad[:3].sum(0)) < 1e-12


def test_frozen_parts_get_no_gradient():
    layer = Linear(6, 4)
    layer.weight.requires_grad_(False)
    x = torch.randn(5, 6, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is not None and x.grad is not None
    assert rel_error(layer.bias.grad, torch.full((4,), 5.0)) < 1e-7


def test_same_module_and_keys_as_nn_linear():
    layer = Linear(6, 4)
    plain = torch.nn.Linear(6, 4)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5, 6)
    assert isinstance(layer, torch.nn.Linear) and set(plain.state_dict()) == set(layer.state_dict())
    assert torch.equal(layer(x), plain(x))


def test_without_bias_or_gradient_runs_f_linear():
    x, weight = torch.randn(4, 3), torch.randn(2, 3)
    assert torch.equal(linear(x, weight, None), F.linear(x, weight))
    with torch.no_grad():
        bias = torch.randn(2)
        assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))


@pytest.mark.parametrize(
    "grad, match",
    [
        (torch.randn(2, 3, 4), r"grad: expected a float matrix \(M, C\), got torch.float32 \(2, 3, 4\)"),
        (torch.ones(3, 4, dtype=torch.long), r"grad: expected a float matrix \(M, C\), got torch.int64"),
        ([1.0, 2.0], r"grad: expected a float matrix \(M, C\), got list"),
    ],
)
def test_bad_inputs_are_refused(grad, match):
    with pytest.raises(ValueError, match=match):
        bias_grad(grad)


# ------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", [((8, 3136, 64), 512), ((4, 196, 1024), 256), ((2, 49, 512), 7)])
def test_gpu_matches_fp64(dtype, case):
    shape, out_features = case
    row = compare(shape, out_features, dtype, device="cuda")
    for key in ("out", "dx", "dweight", "dbias"):
        assert row[key] < TOLERANCE[dtype], (key, row)
    assert row["grad_dtypes"] == [dtype, torch.float32, torch.float32]
