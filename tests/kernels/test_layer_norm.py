"""Row-blocked LayerNorm kernels (``zoo.kernels.layer_norm``) against the fp64 reference.

On the CPU the kernels run through the Triton interpreter in a separate process (this file run
as a script with TRITON_INTERPRET=1 prints one JSON line per check); on a GPU (marker ``gpu``)
compiled, at FaViT's sizes.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if __name__ == "__main__":
    sys.path.insert(0, ROOT)

from zoo.kernels.layer_norm import layer_norm, layer_norm_reference  # noqa: E402

# name: (shape, dtype): rows not a multiple of the row block, widths below / above a power of
# two, one row, one feature (normalised to zero: the output is the bias)
CASES = {
    "tokens_fp32": ((2, 37, 32), torch.float32),
    "ragged_width_fp32": ((45, 24), torch.float32),
    "one_row_fp32": ((1, 70), torch.float32),
    "one_feature_fp32": ((9, 1), torch.float32),
    "bfloat16": ((3, 19, 64), torch.bfloat16),
}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.detach().double()
    return float((got.detach().double() - want).norm() / want.norm().clamp_min(1e-30))


def compare(shape, dtype: torch.dtype, device: str = "cpu", seed: int = 0, eps: float = 1e-6) -> dict:
    """Output and gradients of the kernels vs fp64 on the same (rounded) values; fp32 parameters."""
    gen = torch.Generator(device=device).manual_seed(seed)
    C = shape[-1]
    x = (torch.randn(shape, generator=gen, device=device) * 3 + 1).to(dtype)
    weight = 1 + 0.3 * torch.randn(C, generator=gen, device=device)
    bias = 0.3 * torch.randn(C, generator=gen, device=device)
    grad_y = torch.randn(shape, generator=gen, device=device, dtype=torch.float64)
    ours = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
    out = layer_norm(*ours, eps=eps)
    grads = torch.autograd.grad(out, ours, grad_y.to(dtype))
    exact = [t.double().requires_grad_(True) for t in (x, weight, bias)]
    expected = layer_norm_reference(*exact, eps=eps)
    expected_grads = torch.autograd.grad(expected, exact, grad_y)
    row = {"dtype": str(out.dtype).replace("torch.", ""), "shape": list(out.shape)}
    for key, got, want in zip(("out", "dx", "dweight", "dbias"), (out, *grads), (expected, *expected_grads)):
        # one feature: x - mean is zero, and so is dx (up to the reference's rounding)
        row[key] = rel_error(got, want) if want.norm() > 1e-9 else float((got.double() - want).abs().max())
    row["param_grad_dtypes"] = [str(g.dtype) for g in grads[1:]]
    with torch.no_grad():  # the inference launch (no statistics stored) gives the same output
        row["no_grad_equal"] = rel_error(layer_norm(x, weight, bias, eps=eps), out) < 1e-6
    return row


def main() -> None:
    from interpreter import print_check_rows

    print_check_rows({name: (lambda case=case: compare(*case)) for name, case in CASES.items()})


@pytest.fixture(scope="module")
def interpreted() -> dict:
    from .interpreter import run_interpreted

    return run_interpreted(os.path.abspath(__file__))


@pytest.mark.parametrize("case", list(CASES))
def test_interpreted_kernels_match_fp64_reference(interpreted, case):
    from .interpreter import assert_fp64_row

    shape, dtype = CASES[case]
    assert_fp64_row(
        interpreted.get(case), case, shape, dtype, ("out", "dx", "dweight", "dbias"), TOLERANCE[dtype]
    )


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, weight, bias = torch.randn(4, 6, 10), torch.randn(10), torch.randn(10)
    assert torch.equal(layer_norm(x, weight, bias, 1e-6), layer_norm_reference(x, weight, bias, 1e-6))


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.ones(3, 4, dtype=torch.long), torch.randn(4), torch.randn(4)), r"x: expected a float tensor"),
        ((torch.randn(3, 4), torch.randn(5), torch.randn(4)), r"weight: expected shape \(4,\)"),
        ((torch.randn(3, 4), torch.randn(4), None), r"bias: expected shape \(4,\)"),
    ],
)
def test_bad_inputs_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        layer_norm(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 3136, 64), (64, 196, 256), (16, 49, 512), (5, 33, 100), (7, 2048)])
def test_gpu_kernels_match_fp64(dtype, shape):
    row = compare(shape, dtype, device="cuda")
    for key in ("out", "dx", "dweight", "dbias"):
        assert row[key] < TOLERANCE[dtype], (key, row)
    assert row["no_grad_equal"]


if __name__ == "__main__":
    main()
