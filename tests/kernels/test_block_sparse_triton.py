"""The Triton kernels (forward, dq and dk/dv passes) against fp64 dense masked attention.

On the CPU they run through the Triton interpreter in a separate process (TRITON_INTERPRET is
read when kernels are built, and this process may already have built them compiled); on a GPU
(marker ``gpu``) they run compiled, at tiny and at realistic sizes.
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from zoo.kernels import BlockSparseMask, block_sparse_attention, dense_attention_reference

from .attention_cases import OPTION_MATRIX, Case, make_case, rel_error
from .interpreter import run_interpreted

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 1e-2}


def _expected_checks() -> list[str]:
    sys.path.insert(0, HERE)
    try:
        from interpret_checks import checks
    finally:
        sys.path.remove(HERE)
    return [f"{case.name}-{dtype}" for case, dtype in checks()]


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_interpreted(os.path.join(HERE, "interpret_checks.py"))


@pytest.mark.parametrize("check", _expected_checks())
def test_interpreted_kernels_match_dense_fp64(interpreted, check):
    row = interpreted.get(check)
    assert row is not None, f"{check} did not run"
    assert "error" not in row, row.get("error")
    dtype = check.rsplit("-", 1)[1]
    tol = TOLERANCE[dtype]
    assert row["dtype"] == f"torch.{dtype}" and row["lse_dtype"] == "torch.float32"
    assert row["finite"], "NaN or inf in the output or the gradients"
    assert row["lse_inf_match"], "rows with no visible key must have lse = -inf, and only those"
    assert row["lse"] < 1e-4
    for name in ("out", "dq", "dk", "dv"):
        assert row[name] < tol, f"{name}: relative error {row[name]:.2e} >= {tol}"


def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, mask, _ = make_case(Case("cpu"), dtype=torch.float32)
    with pytest.raises(ValueError, match="backend"):
        block_sparse_attention(q, k, v, mask, backend="triton")


# ------------------------------------------------------------------------------------- GPU
def _check_against_dense(case: Case, dtype: torch.dtype, seed: int = 0) -> None:
    q, k, v, mask, keep = make_case(case, dtype=dtype, device="cuda", seed=seed)
    out, lse = block_sparse_attention(q, k, v, mask, causal=case.causal, return_lse=True)
    exact = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    expected, expected_lse = dense_attention_reference(
        *exact, causal=case.causal, attn_mask=keep, return_lse=True
    )
    grad_out = torch.randn_like(expected)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
    expected_grads = torch.autograd.grad(expected, exact, grad_out)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert torch.equal(torch.isinf(lse), torch.isinf(expected_lse))
    assert rel_error(out, expected) < tol
    for name, got, want in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert torch.isfinite(got).all(), name
        assert rel_error(got, want) < tol, f"{name}: {rel_error(got, want):.2e}"


FP32_ON_GPU = {"causal", "ragged_n_ne_m_causal", "gqa", "permuted_keys", "empty_rows", "strided_layout"}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", OPTION_MATRIX, ids=lambda c: c.name)
def test_gpu_option_matrix(case, dtype, monkeypatch):
    if dtype == torch.float32 and case.name not in FP32_ON_GPU:
        pytest.skip("fp32 on a subset, to keep compile time down")
    monkeypatch.setenv("ZOO_AUTOTUNE", "0")  # one config per shape keeps compile time short
    _check_against_dense(case, dtype)


GPU_REALISTIC = [
    Case(
        "d64_b64_causal",
        batch=2,
        heads=4,
        kv_heads=2,
        q_len=700,
        kv_len=1000,
        head_dim=64,
        block=(64, 64),
        causal=True,
    ),
    Case(
        "d128_b128_causal",
        heads=4,
        kv_heads=1,
        q_len=1000,
        kv_len=1000,
        head_dim=128,
        block=(128, 128),
        causal=True,
    ),
    Case("d128_b128x64", heads=2, q_len=900, kv_len=1300, head_dim=128, block=(128, 64), density=0.4),
    Case("d32_b64", heads=2, q_len=512, kv_len=512, head_dim=32, block=(64, 64), causal=True, density=0.6),
    Case("d256_b64", heads=2, q_len=300, kv_len=400, head_dim=256, block=(64, 64), causal=True, density=0.7),
    Case(
        "d128_perm",
        batch=2,
        heads=4,
        kv_heads=2,
        q_len=640,
        kv_len=640,
        head_dim=128,
        block=(64, 64),
        causal=True,
        permuted=True,
    ),
]
OTHER_DTYPES_ON_GPU = {"d64_b64_causal", "d128_b128x64"}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", GPU_REALISTIC, ids=lambda c: c.name)
def test_gpu_realistic_sizes(case, dtype, monkeypatch):
    if dtype != torch.bfloat16 and case.name not in OTHER_DTYPES_ON_GPU:
        pytest.skip("float16/float32 on a subset, to keep compile time down")
    monkeypatch.setenv("ZOO_AUTOTUNE", "0")
    _check_against_dense(case, dtype, seed=1)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_full_density_equals_sdpa(causal):
    # autotuned path (the configs the benchmark uses)
    q = torch.randn(2, 8, 1024, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, 1024, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 2, 1024, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = BlockSparseMask.from_dense(
        torch.ones(1, 1, 8, 8, dtype=torch.bool, device="cuda"), 128, 1024, 1024
    )
    out = block_sparse_attention(q, k, v, mask, causal=causal)
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=causal
    )
    assert rel_error(out, ref) < 1e-2
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    theirs = torch.autograd.grad(ref, (q, k, v), grad)
    for got, want in zip(ours, theirs):
        assert rel_error(got, want) < 1e-2
