"""Sparse-prefill benchmark: estimation + kernel time of XAttention, PBS-Attn and MInference vs dense SDPA.

    python bench/sparse_prefill.py [--seq-lens 32768 131072] [--out bench/results/sparse_prefill.json]

One GPU, bf16, B = 1, H = 32 query heads, Hkv = 8 key/value heads (grouped-query, as Llama-3-8B),
D = 128, causal prefill, N = M in {32k, 128k}. Inputs are planted synthetic attention
(:func:`zoo.llm.harness.synthetic_qkv`: sinks, vertical lines, slash lines and a local band
holding most of the softmax mass, as in trained LMs), so the methods find realistic densities.

Measured in one process (median CUDA-event time after warm-up), for every method at its
published defaults:

- ``estimate_ms``: building the ``BlockSparseMask`` (XAttention: antidiagonal scoring Triton
  kernel + threshold selection; PBS: key permutation, pooled scores and selection, with the
  permutation alone as ``permutation_ms``; MInference: its pattern estimate);
- ``kernel_ms``: ``zoo.kernels.block_sparse_attention`` on that mask (Triton, autotuned on the
  first call, whose latency is recorded as ``first_call_s``);
- ``total_ms`` = estimate + kernel, ``estimate_share``, ``density`` (kept / causally reachable
  blocks) and ``speedup`` = dense SDPA time / total.

Peer in the same run: dense causal ``scaled_dot_product_attention``, the fastest of PyTorch's
default backend (cuDNN on Hopper) and the flash backend, each with ``enable_gqa`` and on
repeated K/V (every variant's time is recorded). The issue's targets are
checked at the end (XAttention at 128k: density <= 10% and >= 8x faster than SDPA including its
estimation, estimation <= 10% of its total; PBS at 128k: permutation + selection <= 6% of its
total) and written with every row, the device, versions and date to ``--out``. ``--quick`` runs
tiny sizes (on the CPU without a GPU) to check the script. ``--only xattention,pbs`` runs a
subset of the methods. XAttention rows also carry ``scoring_ms``, ``scoring_tflops``
(``N^2*D*H/S`` causal FLOPs over ``scoring_ms``) and ``selection_ms``; PBS rows
``permutation_ms`` and ``selection_ms`` (pooled scores + threshold selection).

What the targets allow (FLOP arithmetic, causal, per head): dense attention costs
``2*N^2*D`` (QK^T and PV, each ``N^2*D`` under the mask). The antidiagonal scoring matmul is
``(N/S) x (N/S)`` over ``S*D`` features, ``N^2*D/S`` under the mask: ``1/(2S)`` of dense, i.e.
1/16 at stride 8 and 1/32 at stride 16. Block-sparse attention at density ``rho`` costs about
``rho`` of dense. At equal efficiency the estimation share is at least
``(1/(2S)) / (1/(2S) + rho)``: at ``rho = 10%`` 38% for stride 8 and 24% for stride 16, and
more at the lower densities the planted inputs give (~1.6% at 128k: 80% and 66%). So
"estimation <= 10% of the total" is out of reach for the antidiagonal method at any density
that also gives 8x: it would need ``rho >= 9/(2S)`` (56% at stride 8). The 8x target is
reachable: at 128k (H = 32, D = 128) the scoring is 8.8 TFLOP at stride 8 and 4.4 TFLOP at
stride 16, i.e. ~15 ms and ~7.5 ms at 600 TFLOP/s, against ~30 ms allowed by 8x over cuDNN's
~242 ms; with the kernel at 1.6% density (~6 ms) and a cheap selection, stride 16 lands near
14 ms (~17x) and stride 8 near 22 ms (~11x).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from zoo.kernels import block_sparse_attention  # noqa: E402
from zoo.layers import MInference, PBSAttention, XAttention  # noqa: E402
from zoo.llm.harness import synthetic_qkv  # noqa: E402
from zoo.timing import first_call_s, median_ms  # noqa: E402

METHODS: dict[str, Callable[[], torch.nn.Module]] = {
    "xattention": lambda: XAttention(block_size=128, stride=8, threshold=0.9),
    "xattention_s16": lambda: XAttention(block_size=128, stride=16, threshold=0.9),
    "pbs": lambda: PBSAttention(block_size=128, segment_size=256, threshold=0.9),
    "minference_vertical_slash": lambda: MInference("vertical_slash"),
    "minference_a_shape": lambda: MInference("a_shape"),
    "minference_block_sparse": lambda: MInference("block_sparse"),
}


def dense_sdpa_variants(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> list[tuple[Callable[[], torch.Tensor], str]]:
    """Dense causal SDPA calls to time: PyTorch's default backend choice (cuDNN on Hopper) and
    the flash backend, each with ``enable_gqa`` and on repeated K/V; variants that raise are left out."""
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    if not q.is_cuda:
        return [((lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True)), "math, repeated kv")]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def call(backend: Any, gqa: bool) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            if gqa:
                args, kwargs = (q, k, v), {"enable_gqa": True}
            else:
                args, kwargs = (q, kk, vv), {}
            if backend is None:
                return F.scaled_dot_product_attention(*args, is_causal=True, **kwargs)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(*args, is_causal=True, **kwargs)

        return run

    variants = []
    for backend, name in ((None, "default"), (SDPBackend.FLASH_ATTENTION, "flash")):
        for gqa in (False, True):
            fn = call(backend, gqa)
            try:
                fn()
            except RuntimeError:
                continue
            variants.append((fn, f"{name}, {'enable_gqa' if gqa else 'repeated kv'}"))
    return variants


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def measure(
    name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dense_ms: float, warmup: int, reps: int
) -> dict[str, Any]:
    """One method at one length: density, estimate / kernel / total time, shares, speed-up."""
    layer = METHODS[name]()
    row: dict[str, Any] = {"seq_len": q.shape[2], "method": name, "config": layer.extra_repr()}
    try:
        mask = layer.estimate(q, k, causal=True)
        row["density"] = mask.density(causal=True)
        row["first_call_s"] = first_call_s(lambda: block_sparse_attention(q, k, v, mask, causal=True))
        row["estimate_ms"] = median_ms(lambda: layer.estimate(q, k, causal=True), warmup, reps)
        row["kernel_ms"] = median_ms(lambda: block_sparse_attention(q, k, v, mask, causal=True), warmup, reps)
        if isinstance(layer, PBSAttention):
            row["permutation_ms"] = median_ms(lambda: layer.key_permutation(q, k), warmup, reps)
            row["selection_ms"] = row["estimate_ms"] - row["permutation_ms"]
        if isinstance(layer, XAttention):
            row["scoring_ms"] = median_ms(lambda: layer.block_scores(q, k), warmup, reps)
            scores = layer.block_scores(q, k)
            row["selection_ms"] = median_ms(
                lambda: layer.select(scores, q.shape[2], k.shape[2], causal=True), warmup, reps
            )
            del scores
            n, m = q.shape[2], k.shape[2]
            visible_pairs = n * m - n * n / 2  # causal, queries the last N of M positions
            flops = 2 * visible_pairs * q.shape[3] * q.shape[1] / layer.stride
            row["scoring_tflops"] = flops / (row["scoring_ms"] * 1e-3) / 1e12
    except (RuntimeError, ValueError) as err:  # out of memory or a kernel limit: record and go on
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        return row
    row["total_ms"] = row["estimate_ms"] + row["kernel_ms"]
    row["estimate_share"] = row["estimate_ms"] / row["total_ms"]
    row["speedup"] = dense_ms / row["total_ms"]
    row["kernel_speedup"] = dense_ms / row["kernel_ms"]
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    rows: list[dict[str, Any]] = []
    dense_rows: dict[int, dict[str, Any]] = {}
    start = time.perf_counter()
    for seq_len in args.seq_lens:
        warmup, reps = (1, 3) if seq_len >= 100_000 else (2, 5)
        if args.quick:
            warmup, reps = 0, 1
        q, k, v, _ = synthetic_qkv(
            seq_len, args.heads, args.kv_heads, args.head_dim, seed=seq_len, dtype=dtype, device=device
        )
        # the peer is the faster of the dense variants
        timed = {how: median_ms(fn, warmup, reps) for fn, how in dense_sdpa_variants(q, k, v)}
        how = min(timed, key=timed.get)
        dense_ms = timed[how]
        dense_rows[seq_len] = {
            "seq_len": seq_len,
            "dense_sdpa_ms": dense_ms,
            "sdpa": how,
            "variants_ms": timed,
        }
        print(f"N={seq_len}: dense SDPA {timed} -> peer {how} {dense_ms:.2f} ms", flush=True)
        free()
        for name in args.methods:
            row = measure(name, q, k, v, dense_ms, warmup, reps)
            rows.append(row)
            print(
                f"  {name:<28}"
                + (
                    f"density {row['density']:.3f}  estimate {row['estimate_ms']:8.2f} ms  kernel {row['kernel_ms']:8.2f} ms"
                    f"  share {row['estimate_share']:.3f}  speedup {row['speedup']:.2f}x"
                    + (
                        f"  scoring {row['scoring_ms']:.2f} ms ({row['scoring_tflops']:.0f} TFLOP/s)"
                        f"  selection {row['selection_ms']:.2f} ms"
                        if "scoring_ms" in row
                        else ""
                    )
                    if "error" not in row
                    else row["error"]
                ),
                flush=True,
            )
            free()
        del q, k, v
        free()
    result = {
        "benchmark": "sparse_prefill",
        "command": "python bench/sparse_prefill.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": str(dtype).replace("torch.", ""),
        "shape": {"batch": 1, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim},
        "inputs": "zoo.llm.harness.synthetic_qkv (planted sinks, verticals, slashes, local band)",
        "dense": list(dense_rows.values()),
        "rows": rows,
        "targets": targets(rows),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    return result


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets at the longest measured length (128k on the GPU run)."""
    ok_rows = [r for r in rows if "error" not in r]
    if not ok_rows:
        return {}
    longest = max(r["seq_len"] for r in ok_rows)
    at = {r["method"]: r for r in ok_rows if r["seq_len"] == longest}
    out: dict[str, Any] = {"seq_len": longest}
    x = at.get("xattention")
    if x:
        out["xattention_density<=0.10"] = x["density"] <= 0.10
        out["xattention_speedup>=8"] = x["speedup"] >= 8.0
        out["xattention_estimate_share<=0.10"] = x["estimate_share"] <= 0.10
    p = at.get("pbs")
    if p:
        out["pbs_estimate_share<=0.06"] = p["estimate_share"] <= 0.06
    return out


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\n{result['device']}  torch {result['torch']}  triton {result['triton']}  {result['dtype']}  {result['shape']}"
    )
    print(
        f"{'N':>7} {'method':<28}{'density':>8}{'est ms':>9}{'kern ms':>9}{'total':>9}{'share':>7}{'speedup':>9}"
    )
    dense = {d["seq_len"]: d["dense_sdpa_ms"] for d in result["dense"]}
    for n, ms in dense.items():
        print(f"{n:>7} {'dense SDPA':<28}{1.0:>8.3f}{0.0:>9.2f}{ms:>9.2f}{ms:>9.2f}{0.0:>7.3f}{1.0:>9.2f}")
        for r in result["rows"]:
            if r["seq_len"] != n:
                continue
            if "error" in r:
                print(f"{n:>7} {r['method']:<28}{r['error']}")
                continue
            print(
                f"{n:>7} {r['method']:<28}{r['density']:>8.3f}{r['estimate_ms']:>9.2f}{r['kernel_ms']:>9.2f}"
                f"{r['total_ms']:>9.2f}{r['estimate_share']:>7.3f}{r['speedup']:>9.2f}"
            )
    for key, value in result["targets"].items():
        print(f"target {key}: {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--only", default=None, help="comma-separated subset of the methods, e.g. xattention,pbs"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sparse_prefill.json"))
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes (CPU without a GPU) to check the script"
    )
    args = parser.parse_args(argv)
    if args.only:
        args.methods = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = sorted(set(args.methods) - set(METHODS))
        if unknown:
            parser.error(f"--only: expected names from {sorted(METHODS)}, got {unknown}")
    if args.quick:
        args.seq_lens = [n for n in args.seq_lens if n <= 4096] or [1024, 2048]
        if not torch.cuda.is_available():
            args.heads, args.kv_heads, args.head_dim = 4, 2, 64
    result = run(args)
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
