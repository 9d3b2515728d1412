"""PoNet scaling benchmark: encoder layers and the mixing step, forward + backward, one GPU.

PoNet (Tan et al., arXiv 2110.02442) mixes tokens by pooling, in time and memory linear in the
sequence length N. This script measures, in one process on one GPU:

1. one encoder layer (token mixer + self-output + FFN, BERT-base width: 768, 12 heads,
   FFN 3072, bf16, batch 1) with three mixers: PoNet (``zoo.layers.PoNetMixer``: one fused
   projection GEMM and the Triton pooling kernels of ``zoo.kernels.ponet_pool``; LRA-style
   equal segments, 64 per sequence, and sentence-style explicit segment ids; ``ponet_torch``:
   the same layer with the PyTorch mixing ops), BERT self-attention
   through ``scaled_dot_product_attention`` restricted to the FlashAttention backend, and FNet's
   Fourier mixing; forward + backward time and peak memory at N = 1k, 4k, 16k, 64k;
2. the PoNet mixing step alone (after the projections): ours (``ponet_mixing``: the Triton
   kernels on the GPU; ``ours_torch_bf16``: its PyTorch ops) in bf16 and fp32 against a plain-PyTorch re-implementation of upstream's LRA step
   (``examples/LRA/code/attention_ponet.py``: masked fills with -1e4, einsum global step,
   ``MaxPool1d`` on a channels-first copy, segment max by scatter + gather, per-head permutes;
   fp32 as upstream runs it with autocast off; ``torch.scatter_reduce`` stands in for
   ``torch_scatter.scatter_max``), same shapes (12 heads x 64, 64 segments).

Writes ``bench/results/ponet.json`` (device, versions, date, every row; ``--out`` elsewhere)
and prints two tables. All rows run eagerly; ``--compile`` adds ``torch.compile``'d rows for the
PoNet layer and mixing step on the PyTorch path (compilation happens in the warm-up, outside
the timings).
``--quick`` runs tiny sizes (on the CPU if there is no GPU) to check that the script works.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from zoo.layers.ponet import equal_segment_size, ponet_mixing  # noqa: E402
from zoo.text.modeling_ponet import PoNetConfig, PoNetLayer  # noqa: E402

# ----------------------------------------------------------------------------- upstream step


def upstream_lra_mixing(
    q: torch.Tensor,
    k: torch.Tensor,
    o: torch.Tensor,
    local: torch.Tensor,
    segment: torch.Tensor,
    mask: torch.Tensor,
    num_heads: int,
    segment_num: int,
) -> torch.Tensor:
    """Upstream's LRA PoNet mixing step in plain PyTorch (inputs ``(B, N, C)``, mask float 0/1)."""
    B, N, C = q.shape
    D = C // num_heads

    def split_heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(B, N, num_heads, D).transpose(1, 2)

    Q, K, O = split_heads(q), split_heads(k), split_heads(o)
    pad = mask[:, None, :, None] < 0.5
    Qm = Q.masked_fill(pad, 0.0)
    q_mean = Qm.sum(dim=-2) / torch.ones_like(pad).to(Q.dtype).masked_fill(pad, 0.0).sum(dim=-2)
    att = torch.einsum("bdh,bdlh->bdl", q_mean, K) / math.sqrt(D)
    att = att.masked_fill(pad.squeeze(-1), -10000.0)
    v = torch.einsum("bdlh,bdl->bdh", K, att.softmax(dim=-1))
    pad_tokens = pad.squeeze(1)
    seg = segment.masked_fill(pad_tokens, -10000.0)
    loc = local.masked_fill(pad_tokens, -10000.0)
    loc = torch.nn.functional.max_pool1d(loc.permute(0, 2, 1), 3, stride=1, padding=1).permute(0, 2, 1)
    seg_len = N // segment_num + 1
    index = (
        torch.arange(segment_num, device=q.device)
        .view(1, segment_num, 1)
        .repeat(1, 1, seg_len)
        .view(1, -1)[:, :N]
        .repeat(B, 1)
    )
    gather_index = index.unsqueeze(-1).expand(B, N, C)
    seg_max = torch.full((B, segment_num, C), float("-inf"), device=q.device, dtype=seg.dtype)
    seg_max = seg_max.scatter_reduce(1, gather_index, seg, reduce="amax", include_self=True)
    seg = torch.gather(seg_max, 1, gather_index)
    loc = split_heads(loc)
    seg = split_heads(seg)
    ctx = (v.unsqueeze(-2) + seg) * O + loc
    ctx = ctx.permute(0, 2, 1, 3).reshape(B, N, C)
    return ctx.masked_fill(pad_tokens, 0.0)


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], torch.Tensor],
    grad_of: list[torch.Tensor],
    device: torch.device,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    """Median forward+backward time (ms) and peak memory above the baseline (MB), or the error."""
    try:
        for _ in range(warmup):
            out = fn()
            out.backward(torch.ones_like(out))
        for t in grad_of:
            t.grad = None
        _sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            out = fn()
            out.backward(torch.ones_like(out))
            _sync(device)
            times.append(1e3 * (time.perf_counter() - start))
            del out
            for t in grad_of:
                t.grad = None
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
        times.sort()
        return {"ms": times[len(times) // 2], "ms_min": times[0], "peak_mb": peak}
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"ms": None, "peak_mb": None, "error": "out of memory"}
    except Exception as err:  # one failing variant must not end the whole run
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {
            "ms": None,
            "peak_mb": None,
            "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}",
        }


def _layer(
    mixer: str, dim: int, heads: int, ffn: int, device: torch.device, dtype: torch.dtype
) -> PoNetLayer:
    cfg = PoNetConfig(
        hidden_size=dim,
        num_attention_heads=heads,
        intermediate_size=ffn,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        mixer=mixer,
    )
    layer = PoNetLayer(cfg).to(device=device, dtype=dtype)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return layer


def _layer_variants(args: argparse.Namespace, n: int, device: torch.device, dtype: torch.dtype):
    """Callables running one layer of each kind at length ``n``, and the tensors whose grads they fill."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x = torch.randn(args.batch, n, args.dim, device=device, dtype=dtype, requires_grad=True)
    seg_size = equal_segment_size(n, args.segments)
    sentence_ids = (torch.arange(n, device=device) // 128).expand(args.batch, n)  # 128-token "sentences"
    ponet = _layer("ponet", args.dim, args.heads, args.ffn, device, dtype)
    ponet_torch = _layer("ponet", args.dim, args.heads, args.ffn, device, dtype)
    ponet_torch.attention.self.backend = "torch"  # the PyTorch mixing path, for comparison
    sdpa = _layer("sdpa", args.dim, args.heads, args.ffn, device, dtype)
    fnet = _layer("fnet", args.dim, args.heads, args.ffn, device, dtype)

    def sdpa_flash() -> torch.Tensor:
        if device.type != "cuda":
            return sdpa(x)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa(x)

    variants: dict[str, Callable[[], torch.Tensor]] = {
        "ponet": lambda: ponet(x, segment_size=seg_size),
        "ponet_ids": lambda: ponet(x, segment_ids=sentence_ids),
        "ponet_torch": lambda: ponet_torch(x, segment_size=seg_size),
        "sdpa_flash": sdpa_flash,
        "fnet": lambda: fnet(x),
    }
    if args.compile:
        ponet_compiled = torch.compile(ponet_torch)  # the Triton path is not traced by dynamo
        variants["ponet_torch_compiled"] = lambda: ponet_compiled(x, segment_size=seg_size)
    layers = (ponet, ponet_torch, sdpa, fnet)
    return variants, [x, *(p for layer in layers for p in layer.parameters())]


def bench_layers(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    rows = []
    for n in args.seq_lens:
        variants, grads = _layer_variants(args, n, device, dtype)
        for name, fn in variants.items():
            if name == "sdpa_flash" and n > args.max_sdpa_len:
                rows.append(
                    {"part": "layer", "n": n, "mixer": name, "ms": None, "peak_mb": None, "error": "skipped"}
                )
                continue
            result = measure(fn, grads, device, args.warmup, args.repeats)
            rows.append({"part": "layer", "n": n, "mixer": name, **result})
            print(f"  layer n={n:>6} {name:<14} {_fmt(result)}", flush=True)
        del variants, grads
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_mixing(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for n in args.seq_lens:
        impls = [
            ("ours_bf16", torch.bfloat16),
            ("ours_torch_bf16", torch.bfloat16),
            ("ours_fp32", torch.float32),
            ("upstream_fp32", torch.float32),
        ]
        if args.compile:
            impls.insert(1, ("ours_bf16_compiled", torch.bfloat16))
        for impl, dtype in impls:
            if dtype == torch.bfloat16 and device.type != "cuda":
                continue
            inputs = [
                torch.randn(args.batch, n, args.dim, device=device, dtype=dtype, requires_grad=True)
                for _ in range(5)
            ]
            if impl == "upstream_fp32":
                mask = torch.ones(args.batch, n, device=device)
                fn = lambda inputs=inputs, mask=mask: upstream_lra_mixing(
                    *inputs, mask, args.heads, args.segments
                )  # noqa: E731
            else:
                real = torch.ones(args.batch, n, device=device, dtype=torch.bool)
                size = equal_segment_size(n, args.segments)
                mixing = _compiled_mixing() if impl.endswith("_compiled") else ponet_mixing
                backend = "torch" if "_torch" in impl or impl.endswith("_compiled") else "auto"
                fn = lambda inputs=inputs, real=real, size=size, mixing=mixing, backend=backend: mixing(  # noqa: E731
                    *inputs, args.heads, padding_mask=real, segment_size=size, backend=backend
                )
            result = measure(fn, inputs, device, args.warmup, args.repeats)
            rows.append({"part": "mixing", "n": n, "impl": impl, **result})
            print(f"  mixing n={n:>6} {impl:<14} {_fmt(result)}", flush=True)
            del inputs
    return rows


_COMPILED: dict[str, Callable] = {}


def _compiled_mixing() -> Callable:
    if "mixing" not in _COMPILED:
        _COMPILED["mixing"] = torch.compile(ponet_mixing, dynamic=True)
    return _COMPILED["mixing"]


def check_against_upstream(args: argparse.Namespace, device: torch.device) -> float:
    """Relative difference of our mixing step and the upstream re-implementation (fp32, with padding)."""
    n = min(args.seq_lens)
    gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = [torch.randn(2, n, args.dim, generator=gen).to(device) for _ in range(5)]
    mask = torch.ones(2, n, device=device)
    mask[1, n // 2 :] = 0
    ours = ponet_mixing(
        *inputs, args.heads, padding_mask=mask.bool(), segment_size=equal_segment_size(n, args.segments)
    )
    theirs = upstream_lra_mixing(*inputs, mask, args.heads, args.segments)
    return float((ours - theirs).norm() / theirs.norm())


def _fmt(r: dict[str, Any]) -> str:
    if r.get("ms") is None:
        return r.get("error", "-")
    mem = f"{r['peak_mb']:.0f} MB" if r.get("peak_mb") is not None else ""
    return f"{r['ms']:.2f} ms {mem}"


def _table(rows: list[dict[str, Any]], seq_lens: list[int]) -> None:
    def get(part, key, name, n, field="ms"):
        for r in rows:
            if r["part"] == part and r.get(key) == name and r["n"] == n:
                return r.get(field)
        return None

    def num(v, fmt="{:.2f}"):
        return fmt.format(v) if v is not None else "-"

    mixers = list(dict.fromkeys(r["mixer"] for r in rows if r["part"] == "layer"))
    print("\nencoder layer, forward + backward: ms (peak MB); last column: SDPA time / PoNet time")
    print(f"{'N':>7} " + " ".join(f"{m:>20}" for m in mixers) + f" {'sdpa/ponet':>11}")
    for n in seq_lens:
        cells = []
        for m in mixers:
            ms, mb = get("layer", "mixer", m, n), get("layer", "mixer", m, n, "peak_mb")
            cells.append(f"{num(ms)} ({num(mb, '{:.0f}')})")
        p, s = get("layer", "mixer", "ponet", n), get("layer", "mixer", "sdpa_flash", n)
        print(
            f"{n:>7} "
            + " ".join(f"{c:>20}" for c in cells)
            + f" {num(s / p if p and s else None, '{:.1f}x'):>11}"
        )
    impls = list(dict.fromkeys(r["impl"] for r in rows if r["part"] == "mixing"))
    print("\nmixing step alone, forward + backward: ms; last column: upstream fp32 / ours bf16")
    print(f"{'N':>7} " + " ".join(f"{i:>19}" for i in impls) + f" {'speed-up':>9}")
    for n in seq_lens:
        times = [get("mixing", "impl", i, n) for i in impls]
        up, ours = get("mixing", "impl", "upstream_fp32", n), get("mixing", "impl", "ours_bf16", n)
        print(
            f"{n:>7} "
            + " ".join(f"{num(t):>19}" for t in times)
            + f" {num(up / ours if up and ours else None, '{:.1f}x'):>9}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--ffn", type=int, default=3072)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--segments", type=int, default=64, help="PoNet segments per sequence (LRA segment_num)"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--max-sdpa-len", type=int, default=1 << 20, help="skip SDPA above this length")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ponet.json"))
    parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile'd PoNet layer and mixing step"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, to check the script (CPU if no GPU)"
    )
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.seq_lens, args.dim, args.heads, args.ffn, args.segments = [256, 512], 64, 4, 128, 8
        args.warmup, args.repeats = 1, 2
    elif device.type != "cuda":
        print("bench ponet: no CUDA GPU; use --quick for a CPU smoke run", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    started = time.perf_counter()
    deviation = check_against_upstream(args, device)
    print(f"ours vs upstream mixing step (fp32, padded batch): relative difference {deviation:.2e}")
    rows = bench_layers(args, device, dtype) + bench_mixing(args, device)
    _table(rows, args.seq_lens)
    result = {
        "benchmark": "ponet",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "layer_dtype": str(dtype),
        "check_vs_upstream_rel_diff": deviation,
        "wall_s": time.perf_counter() - started,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out} ({result['wall_s']:.0f} s)")
    return 0


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
