"""PoNet's pooling kernels (``zoo.kernels.ponet_pool``) against the fp64 PoNet reference.

On the CPU the kernels run through the Triton interpreter in a separate process: this file
run as a script with TRITON_INTERPRET=1 (set before triton is imported) prints one JSON line
per check, and the tests below read them. On a GPU (marker ``gpu``) they run compiled, in
bfloat16, at realistic sizes.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if __name__ == "__main__":
    sys.path.insert(0, ROOT)

from zoo.layers.ponet import ponet_mixing, ponet_mixing_reference  # noqa: E402

NAMES = ("out", "dq", "dk", "do", "dlocal", "dsegment")
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.detach().double()
    return float((got.detach().double() - want).norm() / want.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------- interpreted checks
# name: (B, N, C, H, options); N = 140 spans three 64-token tiles, so segments cross tiles.
def _masks(N: int) -> dict[str, torch.Tensor]:
    real = torch.ones(2, N, dtype=torch.bool)
    real[1, 100:] = False  # right padding
    real[1, 3] = False  # and a pad inside the sequence
    special = torch.zeros(2, N, dtype=torch.bool)
    special[:, 0] = True
    special[0, 70] = True
    lengths = [1, 5, 60, 2, 33, 39]  # runs of one id, one longer than a tile
    ids = torch.cat([torch.full((n,), 9 - i) for i, n in enumerate(lengths)])  # not sorted
    sentence = torch.stack([ids, torch.arange(N) // 3])
    return {"real": real, "special": special, "ids": sentence}


CASES = {
    "one_segment": (1, 140, 16, 2, {}),
    "padded_equal_chunks": (2, 140, 16, 2, {"padding_mask": "real", "segment_size": 9}),
    "ids_special_padded": (
        2,
        140,
        16,
        2,
        {"padding_mask": "real", "segment_ids": "ids", "special_mask": "special"},
    ),
    "shared_ids_kernel5_head_dim_9": (1, 140, 18, 2, {"segment_ids": "ids0", "local_kernel": 5}),
    "all_pad_row": (2, 40, 16, 2, {"padding_mask": "row1_empty", "segment_size": 7}),
    "bfloat16_padded": (2, 140, 16, 2, {"padding_mask": "real", "segment_size": 41}),
}


def _options(B: int, N: int, spec: dict) -> dict:
    masks = _masks(N) if N == 140 else {}
    out = {}
    for key, value in spec.items():
        if value == "ids0":
            out[key] = masks["ids"][0]
        elif value == "row1_empty":
            real = torch.ones(B, N, dtype=torch.bool)
            real[1] = False
            real[0, -5:] = False
            out[key] = real
        elif isinstance(value, str):
            out[key] = masks[value][:B]
        else:
            out[key] = value
    return out


def _compare(name: str, dtype: torch.dtype, seed: int, packed: bool = False) -> dict:
    from zoo.kernels.ponet_pool import ponet_pool_mixing_packed

    B, N, C, H, spec = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(B, N, C, generator=gen).to(dtype) for _ in range(5)]
    options = _options(B, N, spec)
    exact = [t.double().requires_grad_(True) for t in inputs]  # the same (rounded) values
    expected = ponet_mixing_reference(*exact, H, **options)
    grad_out = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, exact, grad_out)
    if packed:
        projected = torch.cat(inputs, dim=-1).requires_grad_(True)
        out = ponet_pool_mixing_packed(projected, H, **options)
        grads = torch.autograd.grad(out, projected, grad_out.to(dtype))[0].split(C, dim=-1)
    else:
        ours = [t.clone().requires_grad_(True) for t in inputs]
        out = ponet_mixing(*ours, H, backend="triton", **options)
        grads = torch.autograd.grad(out, ours, grad_out.to(dtype))
    row = {"dtype": str(out.dtype).replace("torch.", "")}
    for key, got, want in zip(NAMES, (out, *grads), (expected, *expected_grads)):
        row[key] = rel_error(got, want)
    row["finite"] = bool(all(torch.isfinite(t).all() for t in (out, *grads)))
    if "padding_mask" in options:
        pads = ~options["padding_mask"]
        row["pads_zero"] = bool((out[pads] == 0).all())
    return row


def _ties() -> dict:
    """Integer-valued inputs: many equal maxima. The gradient goes to the first one."""
    B, N, C, H = 1, 100, 8, 2
    gen = torch.Generator().manual_seed(7)
    inputs = [torch.randn(B, N, C, generator=gen) for _ in range(3)]
    local = torch.randint(0, 3, (B, N, C), generator=gen).float()
    segment = torch.randint(0, 3, (B, N, C), generator=gen).float()
    size = 30
    tensors = [t.requires_grad_(True) for t in (*inputs, local, segment)]
    out = ponet_mixing(*tensors, H, segment_size=size, backend="triton")
    grad_out = torch.randn(B, N, C, generator=gen)
    grads = torch.autograd.grad(out, tensors, grad_out)
    exact = [t.detach().double().requires_grad_(True) for t in tensors]
    expected = ponet_mixing_reference(*exact, H, segment_size=size)
    expected_grads = torch.autograd.grad(expected, exact, grad_out.double())
    # segment max: each chunk's whole gradient sum at its first maximal token, per channel
    seg = segment.detach()[0]
    share = (grad_out * inputs[2])[0].double()  # d out / d S_t = o_t
    want = torch.zeros(N, C, dtype=torch.float64)
    for start in range(0, N, size):
        chunk = seg[start : start + size]
        first = (chunk == chunk.amax(0)).double().argmax(0)  # first index of the max
        want[start + first, torch.arange(C)] = share[start : start + size].sum(0)
    return {
        "out": rel_error(out, expected),
        "dlocal": rel_error(grads[3], expected_grads[3]),  # MaxPool1d: first maximum too
        "dsegment_first_max": rel_error(grads[4][0], want),
        "ties_present": bool(((seg[:size] == seg[:size].amax(0)).sum(0) > 1).any()),
        "others": max(rel_error(g, w) for g, w in zip(grads[:3], expected_grads[:3])),
    }


# GPU kernels that only allocate or re-view memory; everything else is a launch
_NOT_LAUNCHES = {
    "empty", "empty_strided", "new_empty", "empty_like", "view", "_unsafe_view", "split",
    "split_with_sizes", "slice", "select", "unbind", "detach", "alias", "as_strided", "t",
    "transpose", "expand", "unsqueeze", "squeeze", "permute", "reshape",
}  # fmt: skip
_SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "tolist"}


def _launch_counts() -> dict:
    """Triton launches, other ATen ops and host synchronisations of one forward + backward."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    import zoo.kernels.ponet_pool as pool
    from zoo.layers.ponet import PoNetMixer

    launches, aten, inside = Counter(), Counter(), [False]

    class Counted:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                launches[self.name] += 1
                inside[0] = True  # the interpreter's own tensor traffic is not counted
                try:
                    return launch(*args, **kwargs)
                finally:
                    inside[0] = False

            return run

    class CountOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside[0]:
                aten[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    originals = {n: getattr(pool, n) for n in dir(pool) if n.startswith("_") and n.endswith("_kernel")}
    host_reads = {n: getattr(torch.Tensor, n) for n in ("item", "tolist")}

    def counted_read(name):
        def read(self, *args, **kwargs):
            aten[name] += 1
            return host_reads[name](self, *args, **kwargs)

        return read

    B, N, C, H = 2, 140, 16, 2
    gen = torch.Generator().manual_seed(11)
    inputs = [torch.randn(B, N, C, generator=gen, requires_grad=True) for _ in range(5)]
    real = torch.ones(B, N, dtype=torch.bool)
    real[1, 90:] = False
    mixer = PoNetMixer(C, H)
    mixer.backend = "triton"
    x = torch.randn(B, N, C, generator=gen, requires_grad=True)
    runs = {
        "equal_padded": lambda: ponet_mixing(*inputs, H, real, segment_size=13, backend="triton"),
        "one_segment": lambda: ponet_mixing(*inputs, H, backend="triton"),
        "mixer_equal": lambda: mixer(x, real, segment_size=13),
        "sentence_ids": lambda: ponet_mixing(*inputs, H, real, torch.arange(N) // 16, backend="triton"),
    }
    rows = {}
    try:
        for name, kernel in originals.items():
            setattr(pool, name, Counted(name, kernel))
        for name in host_reads:
            setattr(torch.Tensor, name, counted_read(name))
        for run_name, run in runs.items():
            for t in (*inputs, x, *mixer.parameters()):
                t.grad = None
            launches.clear()
            aten.clear()
            grad = torch.ones(B, N, C)
            with CountOps():
                run().backward(grad)
            rows[run_name] = {
                "triton": dict(launches),
                "aten": {k: v for k, v in aten.items() if k not in _NOT_LAUNCHES},
                "syncs": sum(v for k, v in aten.items() if k in _SYNC_OPS),
            }
    finally:
        for name, kernel in originals.items():
            setattr(pool, name, kernel)
        for name, read in host_reads.items():
            setattr(torch.Tensor, name, read)
    return rows


def checks() -> list[str]:
    names = [f"{name}-float32" for name in CASES if not name.startswith("bfloat16")]
    return [*names, "bfloat16_padded-bfloat16", "ids_special_padded-packed-float32", "ties", "launches"]


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1")
    for seed, check in enumerate(checks()):
        try:
            if check == "ties":
                row = _ties()
            elif check == "launches":
                row = _launch_counts()
            else:
                name, *flags, dtype = check.split("-")
                row = _compare(name, getattr(torch, dtype), seed, packed="packed" in flags)
        except Exception as err:  # reported per check by the test
            row = {"error": f"{type(err).__name__}: {err}"}
        print(json.dumps({"name": check, **row}), flush=True)


# ------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def interpreted() -> dict:
    from .interpreter import run_interpreted  # here: this file also runs as the interpreter's script

    return run_interpreted(os.path.abspath(__file__))


@pytest.mark.parametrize("check", [c for c in checks() if c not in ("ties", "launches")])
def test_interpreted_kernels_match_fp64_reference(interpreted, check):
    row = interpreted.get(check)
    assert row is not None, f"{check} did not run"
    assert "error" not in row, row["error"]
    dtype = check.rsplit("-", 1)[1]
    assert row["dtype"] == dtype
    assert row["finite"], "NaN or inf in the output or the gradients"
    assert row.get("pads_zero", True), "pads must output zero"
    for name in NAMES:
        assert row[name] < TOLERANCE[dtype], f"{name}: relative error {row[name]:.2e}"


def test_interpreted_ties_give_the_gradient_to_the_first_maximum(interpreted):
    row = interpreted["ties"]
    assert "error" not in row, row["error"]
    assert row["ties_present"]
    assert row["out"] < 1e-6 and row["others"] < 1e-5
    assert row["dlocal"] < 1e-6
    assert row["dsegment_first_max"] < 1e-6


# per forward + backward: reduce, q mean, softmax, softmax merge, output; pool backward, dg,
# global backward, d q mean, scatter
EXPECTED_LAUNCHES = {
    "_reduce_kernel": 1,
    "_tile_sum_kernel": 3,
    "_softmax_kernel": 1,
    "_softmax_merge_kernel": 1,
    "_output_kernel": 1,
    "_pool_backward_kernel": 1,
    "_global_backward_kernel": 1,
    "_scatter_kernel": 1,
}


@pytest.mark.parametrize("run", ["equal_padded", "one_segment", "mixer_equal"])
def test_interpreted_equal_segments_launch_counts(interpreted, run):
    """Equal segments: ten Triton launches, two fills, no host synchronisation, no glue ops."""
    row = interpreted["launches"]
    assert "error" not in row, row["error"]
    counts = row[run]
    assert counts["triton"] == EXPECTED_LAUNCHES
    assert counts["syncs"] == 0
    aten = dict(counts["aten"])
    # the mixer adds its projection: weight and bias concatenations, the GEMM and its backward
    projection = {"cat": 2, "addmm": 1, "mm": 2, "sum": 1} if run == "mixer_equal" else {}
    for name, n in projection.items():
        assert aten.pop(name, 0) == n, (name, counts["aten"])
    assert aten == {"full": 1, "zeros": 1}, counts["aten"]  # seg-max table; backward tables


def test_interpreted_segment_ids_cost_one_host_synchronisation(interpreted):
    """Explicit ids: their range and contiguity are read back together, once."""
    counts = interpreted["launches"]["sentence_ids"]
    assert counts["triton"] == EXPECTED_LAUNCHES
    assert counts["syncs"] == 1


def test_contiguous_segment_ranks():
    from zoo.kernels.ponet_pool import contiguous_segment_ranks

    ranks, most = contiguous_segment_ranks(torch.tensor([[5, 5, 2, 2, 2, 7], [0, 0, 0, 0, 1, 1]]), 2)
    assert ranks.tolist() == [[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 1, 1]] and most == 3
    ranks, most = contiguous_segment_ranks(torch.tensor([3, 4, 4]), 2)
    assert ranks.tolist() == [[0, 1, 1], [0, 1, 1]] and most == 2
    assert contiguous_segment_ranks(torch.tensor([[0, 1, 0]]), 1) is None


def _small_inputs(dtype=torch.float32):
    return [torch.randn(2, 12, 8, dtype=dtype) for _ in range(5)]


def test_bad_backend_is_refused():
    with pytest.raises(ValueError, match="backend: expected one of"):
        ponet_mixing(*_small_inputs(), 2, backend="cuda")


def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend: 'triton'.*CUDA"):
        ponet_mixing(*_small_inputs(), 2, backend="triton")


@pytest.mark.parametrize(
    "case, match",
    [
        ("scattered_ids", "contiguous run"),
        ("ids_out_of_range", r"segment_ids: expected values in \[0, 11\]"),
        ("float64", "float16, bfloat16 or float32"),
        ("mixed_dtypes", "one dtype"),
    ],
)
def test_triton_backend_refuses_what_it_does_not_cover(monkeypatch, case, match):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # checked before any kernel runs
    inputs, options = _small_inputs(), {}
    if case == "scattered_ids":
        options["segment_ids"] = torch.tensor([0, 0, 1, 1, 0, 2, 2, 2, 3, 3, 3, 3])
    elif case == "ids_out_of_range":
        options["segment_ids"] = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 12])
    elif case == "float64":
        inputs = _small_inputs(torch.float64)
    else:
        inputs[2] = inputs[2].half()
    with pytest.raises(ValueError, match=match):
        ponet_mixing(*inputs, 2, backend="triton", **options)


def test_auto_backend_on_cpu_equals_reference():
    inputs = _small_inputs()
    ids = torch.tensor([0, 0, 1, 1, 0, 2, 2, 2, 3, 3, 3, 3])  # not contiguous: PyTorch path anyway
    got = ponet_mixing(*inputs, 2, segment_ids=ids)
    want = ponet_mixing_reference(*[t.double() for t in inputs], 2, segment_ids=ids)
    assert rel_error(got, want) < 1e-5


def test_packed_input_of_the_wrong_width_is_refused():
    from zoo.kernels.ponet_pool import ponet_pool_mixing_packed

    with pytest.raises(ValueError, match=r"projected: expected a \(B, N, 5\*C\)"):
        ponet_pool_mixing_packed(torch.randn(1, 4, 12), 2)


# ------------------------------------------------------------------------------------- GPU
def _gpu_case(N: int, dtype: torch.dtype, options: dict, seed: int = 0, C: int = 768, H: int = 12):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    inputs = [torch.randn(2, N, C, device="cuda", generator=gen).to(dtype) for _ in range(5)]
    grad_out = torch.randn(2, N, C, device="cuda", generator=gen, dtype=torch.float64)
    ours = [t.clone().requires_grad_(True) for t in inputs]
    out = ponet_mixing(*ours, H, backend="triton", **options)
    grads = torch.autograd.grad(out, ours, grad_out.to(dtype))
    exact = [t.double().requires_grad_(True) for t in inputs]
    expected = ponet_mixing(*exact, H, backend="torch", **options)
    expected_grads = torch.autograd.grad(expected, exact, grad_out)
    return inputs, grad_out, out, grads, expected, expected_grads


def _gpu_masks(N: int) -> dict[str, torch.Tensor]:
    real = torch.ones(2, N, dtype=torch.bool, device="cuda")
    real[1, N // 2 :] = False
    special = torch.zeros_like(real)
    special[:, 0] = True
    special[:, 517] = True
    ids = torch.arange(N, device="cuda") // 128
    return {"real": real, "special": special, "ids": ids}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["equal_chunks", "sentence_ids"])
def test_gpu_kernels_match_fp64(dtype, layout):
    N = 3000
    masks = _gpu_masks(N)
    options = {"padding_mask": masks["real"]}
    if layout == "equal_chunks":
        options["segment_size"] = N // 64 + 1
    else:
        options["segment_ids"] = masks["ids"]
        options["special_mask"] = masks["special"]
    inputs, grad_out, out, grads, expected, expected_grads = _gpu_case(N, dtype, options)
    tol = TOLERANCE["float32" if dtype == torch.float32 else "bfloat16"]
    assert out.dtype == dtype and rel_error(out, expected) < tol
    # d local: MaxPool1d gives each window's gradient to its first maximum, as the kernels do
    kept = masks["real"] & ~options.get("special_mask", torch.zeros_like(masks["real"]))
    local = inputs[3].double().masked_fill(~kept[..., None], float("-inf")).requires_grad_(True)
    pooled = torch.nn.functional.max_pool1d(local.transpose(1, 2), 3, stride=1, padding=1)
    window_grad = grad_out.masked_fill(~kept[..., None], 0.0).transpose(1, 2)
    (expected_dlocal,) = torch.autograd.grad(pooled, local, window_grad)
    expected_grads = (*expected_grads[:3], expected_dlocal, expected_grads[4])
    for name, got, want in zip(NAMES[1:5], grads[:4], expected_grads[:4]):
        assert torch.isfinite(got).all(), name
        assert rel_error(got, want) < tol, f"{name}: {rel_error(got, want):.2e}"
    # d segment: ties (frequent in bfloat16) are split by the PyTorch path and given to the
    # first maximum by the kernels; the sums over each segment agree, and only maxima get any
    seg_ids = (
        torch.arange(N, device="cuda") // options["segment_size"]
        if layout == "equal_chunks"
        else masks["ids"]
    )
    index = seg_ids[None, :, None].expand(2, N, inputs[4].shape[-1])
    sums = torch.zeros(2, N, inputs[4].shape[-1], device="cuda", dtype=torch.float64)
    got_sums = sums.scatter_add(1, index, grads[4].double())
    want_sums = sums.scatter_add(1, index, expected_grads[4])
    assert rel_error(got_sums, want_sums) < tol
    seg = inputs[4].double().masked_fill(~masks["real"][..., None], float("-inf"))
    seg_max = torch.full_like(sums, float("-inf")).scatter_reduce(1, index, seg, "amax").gather(1, index)
    assert bool((grads[4][seg != seg_max] == 0).all())


@pytest.mark.gpu
def test_gpu_ponet_layer_fused_path_matches_pytorch_path():
    from zoo.layers.ponet import PoNetMixer

    torch.manual_seed(0)
    mixer = PoNetMixer(256, 4).cuda()
    x = torch.randn(2, 1000, 256, device="cuda", requires_grad=True)
    real = torch.ones(2, 1000, dtype=torch.bool, device="cuda")
    real[0, 900:] = False
    out = mixer(x, real, segment_size=101)
    out.backward(torch.ones_like(out))
    grads = [x.grad.clone(), *(p.grad.clone() for p in mixer.parameters())]
    x.grad = None
    mixer.zero_grad()
    q, k, o, local, segment = mixer.project(x).split(256, dim=-1)
    expected = ponet_mixing(q, k, o, local, segment, 4, real, segment_size=101, backend="torch")
    expected.backward(torch.ones_like(expected))
    assert rel_error(out, expected) < 1e-5
    for got, p in zip(grads, [x, *mixer.parameters()]):
        assert rel_error(got, p.grad) < 1e-4


if __name__ == "__main__":
    main()
