"""Mix-FFN's fused depthwise 3x3 convolution + bias + GELU (``zoo.kernels.dwconv_gelu``) against fp64.

On the CPU the kernel runs through the Triton interpreter in a separate process (this file run
as a script with TRITON_INTERPRET=1 prints one JSON line per check); on a GPU (marker ``gpu``)
it runs compiled, in bfloat16 and fp32, at FaViT's sizes.
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

from zoo.kernels.dwconv_gelu import dwconv3x3_gelu, dwconv3x3_gelu_reference  # noqa: E402

# name: (B, H, W, C, dtype); sizes that leave partial pixel and channel tiles, a one-pixel-wide
# grid (every tap but the centre column falls outside), and a grid of one pixel
CASES = {
    "ragged_fp32": (2, 5, 7, 24, torch.float32),
    "wide_channels_fp32": (1, 9, 4, 70, torch.float32),
    "one_column_fp32": (2, 6, 1, 16, torch.float32),
    "one_pixel_fp32": (1, 1, 1, 8, torch.float32),
    "bfloat16": (2, 3, 5, 16, torch.bfloat16),
}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.detach().double()
    return float((got.detach().double() - want).norm() / want.norm().clamp_min(1e-30))


def compare(B: int, H: int, W: int, C: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> dict:
    """Output and the three gradients of the kernel vs the fp64 reference on the same (rounded) values."""
    gen = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(B, H, W, C, generator=gen, device=device).to(dtype)
    weight = torch.randn(C, 1, 3, 3, generator=gen, device=device) * 0.5
    bias = torch.randn(C, generator=gen, device=device)
    grad_y = torch.randn(B, H, W, C, generator=gen, device=device, dtype=torch.float64)
    ours = [t.clone().requires_grad_(True) for t in (h, weight, bias)]
    out = dwconv3x3_gelu(*ours)
    grads = torch.autograd.grad(out, ours, grad_y.to(dtype))
    exact = [t.double().requires_grad_(True) for t in (h, weight, bias)]
    expected = dwconv3x3_gelu_reference(*exact)
    expected_grads = torch.autograd.grad(expected, exact, grad_y)
    row = {"dtype": str(out.dtype).replace("torch.", ""), "shape": list(out.shape)}
    for key, got, want in zip(("out", "dh", "dweight", "dbias"), (out, *grads), (expected, *expected_grads)):
        row[key] = rel_error(got, want)
    row["param_grad_dtypes"] = [str(g.dtype) for g in grads[1:]]
    with torch.no_grad():  # the inference launch (no pre-activation stored) gives the same output
        row["no_grad_equal"] = rel_error(dwconv3x3_gelu(h, weight, bias), out) < 1e-6
    return row


# ------------------------------------------------------------------------- interpreted checks
def main() -> None:
    from interpreter import print_check_rows

    print_check_rows({name: (lambda case=case: compare(*case)) for name, case in CASES.items()})


@pytest.fixture(scope="module")
def interpreted() -> dict:
    from .interpreter import run_interpreted

    return run_interpreted(os.path.abspath(__file__))


@pytest.mark.parametrize("case", list(CASES))
def test_interpreted_kernel_matches_fp64_reference(interpreted, case):
    from .interpreter import assert_fp64_row

    *shape, dtype = CASES[case]
    assert_fp64_row(
        interpreted.get(case), case, shape, dtype, ("out", "dh", "dweight", "dbias"), TOLERANCE[dtype]
    )


def test_reference_is_conv_then_gelu():
    """The reference itself against a per-pixel sum over the nine taps (zero outside the grid)."""
    h, weight, bias = torch.randn(1, 3, 4, 2, dtype=torch.float64), torch.randn(2, 1, 3, 3), torch.randn(2)
    weight, bias = weight.double(), bias.double()
    padded = torch.nn.functional.pad(h, (0, 0, 1, 1, 1, 1))
    z = bias.expand(1, 3, 4, 2).clone()
    for di in range(3):
        for dj in range(3):
            z += padded[:, di : di + 3, dj : dj + 4] * weight[:, 0, di, dj]
    want = 0.5 * z * (1 + torch.erf(z / 2**0.5))
    assert rel_error(dwconv3x3_gelu_reference(h, weight, bias), want) < 1e-12


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    h, weight, bias = torch.randn(2, 4, 5, 6), torch.randn(6, 1, 3, 3), torch.randn(6)
    assert torch.equal(dwconv3x3_gelu(h, weight, bias), dwconv3x3_gelu_reference(h, weight, bias))


@pytest.mark.parametrize(
    "args, match",
    [
        (
            (torch.randn(2, 4, 6), torch.randn(6, 1, 3, 3), torch.randn(6)),
            r"h: expected a float tensor \(B, H, W, C\)",
        ),
        (
            (torch.randn(1, 4, 4, 6), torch.randn(6, 1, 5, 5), torch.randn(6)),
            r"weight: expected .* \(6, 1, 3, 3\)",
        ),
        ((torch.randn(1, 4, 4, 6), torch.randn(6, 1, 3, 3), torch.randn(5)), r"bias: expected shape \(6,\)"),
        (
            (torch.ones(1, 4, 4, 6, dtype=torch.long), torch.randn(6, 1, 3, 3), torch.randn(6)),
            "h: expected a float",
        ),
    ],
)
def test_bad_inputs_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        dwconv3x3_gelu(*args)


# ------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(8, 56, 56, 512), (4, 7, 7, 2048), (3, 13, 17, 200)])
def test_gpu_kernel_matches_fp64(dtype, shape):
    row = compare(*shape, dtype, device="cuda")
    for key in ("out", "dh", "dweight", "dbias"):
        assert row[key] < TOLERANCE[dtype], (key, row)
    assert row["no_grad_equal"]


if __name__ == "__main__":
    main()
