"""PBS-Attn key importance (``zoo.kernels.pbs_importance``) against a dense fp64 softmax.

On the CPU the Triton kernels run through the interpreter in a separate process: this file run
as a script with TRITON_INTERPRET=1 (set before triton is imported) prints one JSON line per
check, and the tests below read them. On a GPU (marker ``gpu``) they run compiled.
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

from zoo.kernels.pbs_importance import (  # noqa: E402
    key_importance,
    key_importance_reference,
    key_importance_triton,
)


def dense_importance(q: torch.Tensor, k: torch.Tensor, last: int, causal: bool) -> torch.Tensor:
    """Full ``[B, H, last, M]`` fp64 softmax of the last queries, averaged per key head."""
    q, k = q.double(), k.double()
    batch, heads, n, dim = q.shape
    kv_heads, m = k.shape[1], k.shape[2]
    group = heads // kv_heads
    logits = q[:, :, n - last :] @ k.repeat_interleave(group, 1).transpose(-1, -2) * dim**-0.5
    if causal:
        query_pos = (m - n) + torch.arange(n - last, n)
        logits = logits.masked_fill(torch.arange(m)[None, :] > query_pos[:, None], float("-inf"))
    return torch.softmax(logits, -1).reshape(batch, kv_heads, group * last, m).mean(2)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


# ------------------------------------------------------------------------- interpreted checks
# name: (B, H, Hkv, N, M, D, last, causal, dtype, keys_per_split)
CASES = {
    "causal_n_ne_m_gqa": (2, 4, 2, 40, 77, 24, 20, True, "float32", 32),
    "causal_last_is_n": (1, 3, 1, 33, 33, 16, 33, True, "float32", 16),
    "noncausal_mha_ragged_split": (1, 2, 2, 50, 90, 32, 17, False, "float32", 40),
    "causal_gqa_bfloat16": (1, 4, 1, 48, 96, 32, 24, True, "bfloat16", 48),
    "causal_float16_one_split": (1, 2, 1, 20, 64, 16, 9, True, "float16", 1000),
}


def _inputs(name: str, seed: int, device: str = "cpu"):
    batch, heads, kv_heads, n, m, dim, last, causal, dtype, split = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    q = (2.0 * torch.randn(batch, heads, n, dim, generator=gen)).to(getattr(torch, dtype))
    k = torch.randn(batch, kv_heads, m, dim, generator=gen).to(getattr(torch, dtype))
    k[:, :, torch.randperm(m, generator=gen)[:5]] += 2.0 * q[:, :1, -1:].mean(1, keepdim=True)  # strong keys
    return q.to(device), k.to(device), last, causal, split


def _check(name: str, seed: int) -> dict:
    q, k, last, causal, split = _inputs(name, seed)
    got = key_importance_triton(q, k, last, causal, keys_per_split=split)
    want = dense_importance(q, k, last, causal)  # the same rounded input values, in fp64
    return {
        "dtype": str(got.dtype),
        "shape": list(got.shape),
        "error": rel_error(got, want),
        "max_abs": float((got.double() - want).abs().max()),
        "finite": bool(torch.isfinite(got).all()),
        "auto_backend": rel_error(key_importance(q, k, last, causal, backend="triton"), want),
    }


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1")
    for seed, name in enumerate(CASES):
        try:
            row = _check(name, seed)
        except Exception as err:  # reported per check by the test
            row = {"failure": f"{type(err).__name__}: {err}"}
        print(json.dumps({"name": name, **row}), flush=True)


# ------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def interpreted() -> dict:
    from .interpreter import run_interpreted  # here: this file also runs as the interpreter's script

    return run_interpreted(os.path.abspath(__file__))


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernels_match_dense_fp64_softmax(interpreted, name):
    row = interpreted.get(name)
    assert row is not None, f"{name} did not run"
    assert "failure" not in row, row["failure"]
    batch, _, kv_heads, _, m, *_ = CASES[name]
    assert row["dtype"] == "torch.float32" and row["shape"] == [batch, kv_heads, m]
    assert row["finite"]
    assert row["error"] < 2e-5 and row["auto_backend"] < 2e-5, row


@pytest.mark.parametrize("name", list(CASES))
def test_chunked_reference_matches_dense_softmax(name):
    q, k, last, causal, _ = _inputs(name, seed=100)
    want = dense_importance(q, k, last, causal)
    got = key_importance_reference(q.double(), k.double(), last, causal, chunk_elements=300)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    got32 = key_importance(q, k, last, causal)  # CPU: the reference, fp32 accumulation
    assert got32.dtype == torch.float32 and rel_error(got32, want) < 1e-5


def test_limiting_cases():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 6, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, 9, 8, generator=gen, dtype=torch.float64)
    # each row's softmax sums to one, so the importances of a key head sum to one
    total = key_importance_reference(q, k, 4, causal=True, chunk_elements=7).sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-14)
    # one query per head, no mask: the mean of the heads' softmax rows
    rows = torch.softmax(q[0, :, -1] @ k[0, 0].T / 8**0.5, -1).mean(0)
    torch.testing.assert_close(key_importance_reference(q, k, 1, causal=False)[0, 0], rows)
    # causal, last = N = M: the first query sees only key 0, the last key only by the last query
    q_square, k_square = q[:, :, :6], k[:, :, :6]
    imp = key_importance_reference(q_square, k_square, 6, causal=True)
    logits_last = q_square[0, :, -1] @ k_square[0, 0].T / 8**0.5
    torch.testing.assert_close(imp[0, 0, -1], torch.softmax(logits_last, -1)[:, -1].mean() / 6)
    # zero queries: uniform over each row's visible keys
    flat = key_importance_reference(torch.zeros(1, 1, 3, 4), torch.randn(1, 1, 5, 4), 3, causal=True)
    want = torch.tensor(
        [1 / 3 + 1 / 4 + 1 / 5, 1 / 3 + 1 / 4 + 1 / 5, 1 / 3 + 1 / 4 + 1 / 5, 1 / 4 + 1 / 5, 1 / 5]
    )
    torch.testing.assert_close(flat[0, 0], want / 3)


def test_bad_inputs_raise_clear_errors(monkeypatch):
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 12, 16)
    with pytest.raises(ValueError, match=r"last: expected an int in \[1, N=8\], got 9"):
        key_importance(q, k, 9)
    with pytest.raises(ValueError, match="last: expected"):
        key_importance(q, k, 0)
    with pytest.raises(ValueError, match="heads dividing"):
        key_importance(q, torch.randn(1, 3, 12, 16), 4)
    with pytest.raises(ValueError, match="N <= M"):
        key_importance(q, torch.randn(1, 2, 6, 16), 4)
    with pytest.raises(ValueError, match="q: expected a float tensor"):
        key_importance(q[0], k, 4)
    with pytest.raises(ValueError, match="backend: expected"):
        key_importance(q, k, 4, backend="cuda")
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="q: the Triton kernel needs CUDA"):
        key_importance(q, k, 4, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # checked before any kernel runs
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        key_importance_triton(q.double(), k.double(), 4)
    with pytest.raises(ValueError, match="keys_per_split"):
        key_importance_triton(q, k, 4, keys_per_split=0)


# ------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype, n, m, causal",
    [
        (torch.bfloat16, 8192, 8192, True),
        (torch.bfloat16, 3000, 9001, True),
        (torch.float16, 4096, 4096, False),
        (torch.float32, 2048, 5000, True),
    ],
)
def test_gpu_kernels_match_fp64(dtype, n, m, causal):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = (2.0 * torch.randn(1, 8, n, 128, device="cuda", generator=gen)).to(dtype)
    k = torch.randn(1, 2, m, 128, device="cuda", generator=gen).to(dtype)
    got = key_importance(q, k, 128, causal)  # auto: Triton on CUDA
    want = key_importance_reference(q.double(), k.double(), 128, causal)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert rel_error(got, want) < 2e-5  # the same rounded inputs; fp32 runs an IEEE (not TF32) dot


@pytest.mark.gpu
def test_gpu_importance_at_long_context_holds_no_logits():
    q = torch.randn(1, 32, 65536, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, 65536, 128, device="cuda", dtype=torch.bfloat16)
    key_importance(q, k, 128)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = key_importance(q, k, 128)
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 8 * 65536 * 4 + (64 << 20)  # the output and small row statistics only
    assert torch.allclose(out.sum(-1), torch.ones(1, 8, device="cuda"), atol=1e-3)


if __name__ == "__main__":
    main()
