"""Runs the Triton kernels through the interpreter on the option matrix and prints one JSON line
per check. Started by test_block_sparse_triton.py in a fresh process with TRITON_INTERPRET=1, so
that no earlier import in the test process decides how the kernels are built."""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from attention_cases import OPTION_MATRIX, Case, make_case, rel_error  # noqa: E402

from zoo.kernels.block_sparse import block_sparse_attention, dense_attention_reference  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXTRA = [
    Case("head_dim_24", head_dim=24, causal=True, q_len=40, kv_len=60),
    Case("mask_reused", causal=True, q_len=40, kv_len=56),
]
LOW_PRECISION = {"ragged_n_ne_m_causal", "gqa", "permuted_keys", "strided_layout"}


def checks():
    for case in OPTION_MATRIX + EXTRA:
        yield case, "float32"
        if case.name in LOW_PRECISION:
            yield case, "bfloat16"
    yield OPTION_MATRIX[1], "float16"


def run(case: Case, dtype_name: str, seed: int) -> dict:
    dtype = DTYPES[dtype_name]
    q, k, v, mask, keep = make_case(case, dtype=dtype, seed=seed)
    if case.name == "mask_reused":  # index lists cached on the mask must be keyed on causality
        block_sparse_attention(q, k, v, mask, causal=not case.causal, backend="triton").sum().backward()
    out, lse = block_sparse_attention(q, k, v, mask, causal=case.causal, return_lse=True, backend="triton")
    exact = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    expected, expected_lse = dense_attention_reference(
        *exact, causal=case.causal, attn_mask=keep, return_lse=True
    )
    grad_out = torch.randn_like(expected)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
    expected_grads = torch.autograd.grad(expected, exact, grad_out)
    finite = torch.isfinite(expected_lse)
    return {
        "name": f"{case.name}-{dtype_name}",
        "dtype": str(out.dtype),
        "lse_dtype": str(lse.dtype),
        "out": rel_error(out, expected),
        "lse_inf_match": bool(torch.equal(torch.isinf(lse), torch.isinf(expected_lse))),
        "lse": float((lse.detach().double()[finite] - expected_lse.detach()[finite]).abs().max())
        if finite.any()
        else 0.0,
        "dq": rel_error(grads[0], expected_grads[0]),
        "dk": rel_error(grads[1], expected_grads[1]),
        "dv": rel_error(grads[2], expected_grads[2]),
        "finite": bool(all(torch.isfinite(t).all() for t in (out, *grads))),
    }


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1")
    for seed, (case, dtype_name) in enumerate(checks()):
        try:
            result = run(case, dtype_name, seed)
        except Exception as err:  # reported per check by the test
            result = {"name": f"{case.name}-{dtype_name}", "error": f"{type(err).__name__}: {err}"}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
