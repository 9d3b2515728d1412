"""Window attention with bias and per-window masks (``zoo.kernels.window_attention``) against fp64.

On the CPU the kernel runs through the Triton interpreter in a separate process (this file run
as a script with TRITON_INTERPRET=1 prints one JSON line per check); on a GPU (marker ``gpu``)
it runs compiled at Adas's sizes.
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

from zoo.kernels.window_attention import window_attention, window_attention_reference  # noqa: E402

# name: (windows, heads, N, head_dim, windows per image with a mask slot or 0, dtype, strided)
CASES = {
    "plain_fp32": (6, 2, 64, 12, 0, torch.float32, False),
    "masked_fp32": (6, 2, 64, 12, 3, torch.float32, False),
    "ragged_tokens_fp32": (4, 3, 100, 16, 2, torch.float32, True),
    "small_window_fp32": (5, 1, 8, 5, 5, torch.float32, True),
    # the interpreter's bf16 matrix products are wrong (triton 3.8), so half precision is fp16 here
    # and bf16 is checked on the GPU
    "float16": (6, 2, 64, 12, 3, torch.float16, True),
}
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# name: (images, windows per image, heads, N, head_dim, masked, dtype): whole images read through a token order
ORDERED = {
    "ordered_fp32": (2, 3, 2, 100, 12, True, torch.float32),
    "ordered_plain_fp16": (3, 4, 2, 16, 8, False, torch.float16),
}


def exact(q, k, v, bias, scale, masks, mask_index):
    """fp64 attention with each window's mask looked up in a Python loop (independent of the reference)."""
    q, k, v, bias = (t.double() for t in (q, k, v, bias))
    out = torch.empty_like(q)
    for w in range(q.shape[0]):
        logits = scale * q[w] @ k[w].transpose(-2, -1) + bias
        if masks is not None and int(mask_index[w % mask_index.numel()]) >= 0:
            logits = logits + masks[int(mask_index[w % mask_index.numel()])].double()
        out[w] = logits.softmax(-1) @ v[w]
    return out


def make(windows, heads, N, d, per_image, dtype, strided, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    if strided:  # the layer's layout: (windows, N, heads, d) viewed as (windows, heads, N, d)
        q, k, v = (draw(windows, N, heads, d).to(dtype).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (draw(windows, heads, N, d).to(dtype) for _ in range(3))
    bias = draw(heads, N, N)
    masks = mask_index = None
    if per_image:
        masks = torch.where(draw(2, N, N) > 0, -100.0, 0.0)
        mask_index = torch.tensor([(-1, 0, 1)[i % 3] for i in range(per_image)], device=device)
    return q, k, v, bias, masks, mask_index


def compare(windows, heads, N, d, per_image, dtype, strided, device="cpu") -> dict:
    q, k, v, bias, masks, mask_index = make(windows, heads, N, d, per_image, dtype, strided, device)
    scale = d**-0.5
    want = exact(q, k, v, bias, scale, masks, mask_index)
    got = window_attention(q, k, v, bias, scale, masks, mask_index)
    ref = window_attention_reference(q, k, v, bias, scale, masks, mask_index)
    err = lambda t: float((t.double() - want).norm() / want.norm())  # noqa: E731
    return {"dtype": str(got.dtype), "shape": list(got.shape), "out": err(got), "reference": err(ref)}


def compare_ordered(images, per_image, heads, N, d, masked, dtype, device="cpu", seed=0) -> dict:
    """Whole images ``(images, heads, L, d)`` with windows given by a random token order, against a loop in fp64."""
    gen = torch.Generator(device=device).manual_seed(seed)
    L = per_image * N
    q, k, v = (
        torch.randn(images, L, heads, d, generator=gen, device=device).to(dtype).transpose(1, 2)
        for _ in range(3)
    )
    bias = torch.randn(heads, N, N, generator=gen, device=device)
    order = torch.randperm(L, generator=torch.Generator().manual_seed(seed)).to(device)
    masks = mask_index = None
    if masked:
        masks = torch.where(torch.randn(2, N, N, generator=gen, device=device) > 0, -100.0, 0.0)
        mask_index = torch.tensor([(-1, 0, 1)[w % 3] for w in range(per_image)], device=device)
    scale = d**-0.5
    want = torch.empty(images, heads, L, d, dtype=torch.float64, device=device)
    for b in range(images):
        for w in range(per_image):
            rows = order[w * N : (w + 1) * N]
            logits = scale * q[b][:, rows].double() @ k[b][:, rows].double().transpose(-2, -1) + bias.double()
            if masked and int(mask_index[w]) >= 0:
                logits = logits + masks[int(mask_index[w])].double()
            want[b][:, rows] = logits.softmax(-1) @ v[b][:, rows].double()
    got = window_attention(q, k, v, bias, scale, masks, mask_index, token_order=order)
    ref = window_attention_reference(q, k, v, bias, scale, masks, mask_index, token_order=order)
    err = lambda t: float((t.double() - want).norm() / want.norm())  # noqa: E731
    return {"dtype": str(got.dtype), "shape": list(got.shape), "out": err(got), "reference": err(ref)}


# ------------------------------------------------------------------------- interpreted checks
def main() -> None:
    from interpreter import print_check_rows

    checks = {name: (lambda case=case: compare(*case)) for name, case in CASES.items()}
    checks.update({name: (lambda case=case: compare_ordered(*case)) for name, case in ORDERED.items()})
    print_check_rows(checks)


@pytest.fixture(scope="module")
def interpreted() -> dict:
    from .interpreter import run_interpreted

    return run_interpreted(os.path.abspath(__file__))


@pytest.mark.parametrize("case", list(CASES))
def test_interpreted_kernel_matches_fp64(interpreted, case):
    row = interpreted.get(case)
    assert row is not None and "error" not in row, row
    windows, heads, N, d, _, dtype, _ = CASES[case]
    assert row["shape"] == [windows, heads, N, d] and row["dtype"] == str(dtype)
    assert row["out"] < TOLERANCE[dtype] and row["reference"] < TOLERANCE[dtype], row


@pytest.mark.parametrize("case", list(ORDERED))
def test_interpreted_kernel_reads_windows_through_the_token_order(interpreted, case):
    row = interpreted.get(case)
    assert row is not None and "error" not in row, row
    images, per_image, heads, N, d, _, dtype = ORDERED[case]
    assert row["shape"] == [images, heads, per_image * N, d] and row["dtype"] == str(dtype)
    assert row["out"] < TOLERANCE[dtype] and row["reference"] < TOLERANCE[dtype], row


def test_masks_change_the_result():
    """The masked windows differ from the unmasked computation, the unmasked ones do not."""
    q, k, v, bias, masks, mask_index = make(6, 2, 16, 8, 3, torch.float32, False)
    masked = window_attention_reference(q, k, v, bias, 0.3, masks, mask_index)
    plain = window_attention_reference(q, k, v, bias, 0.3)
    for w in range(6):
        same = torch.allclose(masked[w], plain[w])
        assert same == (int(mask_index[w % 3]) < 0), w


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, bias, masks, mask_index = make(4, 2, 16, 8, 2, torch.float32, True)
    got = window_attention(q, k, v, bias, 0.5, masks, mask_index)
    assert torch.equal(got, window_attention_reference(q, k, v, bias, 0.5, masks, mask_index))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"q": torch.randn(2, 8, 4)}, r"q: expected a float tensor \(windows, heads, N, head_dim\)"),
        ({"k": torch.randn(2, 2, 8, 5)}, r"k: expected the shape of q \(2, 2, 8, 4\)"),
        ({"bias": torch.randn(2, 8, 7)}, r"bias: expected shape \(2, 8, 8\)"),
        ({"masks": None}, "masks, mask_index: expected both or neither"),
        ({"mask_index": torch.tensor([0, -1, 0])}, "mask_index: expected a length dividing the 2 windows"),
        ({"masks": torch.zeros(1, 8, 9)}, r"masks: expected shape \(num_masks, 8, 8\)"),
        ({"token_order": torch.arange(7)}, "token_order: expected a permutation of the 8 tokens of an image"),
        ({"token_order": torch.arange(8.0)}, "token_order: expected a permutation of the 8 tokens"),
        (
            {"token_order": torch.arange(8), "bias": torch.randn(2, 3, 3)},
            "token_order: expected a permutation of the 8 tokens of an image, windows of 3",
        ),
    ],
)
def test_bad_inputs_are_refused(change, match):
    args = {
        "q": torch.randn(2, 2, 8, 4),
        "k": torch.randn(2, 2, 8, 4),
        "v": torch.randn(2, 2, 8, 4),
        "bias": torch.randn(2, 8, 8),
        "masks": torch.zeros(1, 8, 8),
        "mask_index": torch.tensor([0, -1]),
        "token_order": None,
    }
    args.update(change)
    with pytest.raises(ValueError, match=match):
        window_attention(
            args["q"],
            args["k"],
            args["v"],
            args["bias"],
            0.5,
            args["masks"],
            args["mask_index"],
            token_order=args["token_order"],
        )


# ------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", [(1792, 8, 64, 12, 448), (300, 8, 100, 24, 150), (64, 4, 32, 32, 0)])
def test_gpu_kernel_matches_fp64(dtype, case):
    row = compare(*case, dtype, True, device="cuda")
    assert row["out"] < TOLERANCE[dtype], row


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_kernel_reads_windows_through_the_token_order(dtype):
    row = compare_ordered(2, 40, 8, 100, 24, True, dtype, device="cuda")
    assert row["out"] < TOLERANCE[dtype], row


if __name__ == "__main__":
    main()
