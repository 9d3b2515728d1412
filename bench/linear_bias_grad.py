"""Bias gradients of linear layers: ``torch``'s column reduction vs cuBLAS's ``G^T 1``, on one GPU.

The bias gradient of a linear layer over ``M`` tokens is the column sum of its output gradient
``G (M, C)``. ``nn.Linear``'s backward runs ``G.sum(0)``; ``zoo.layers.linear`` runs the
matrix-vector product ``G^T 1``. Shapes: FaViT-B2's linear layers at batch 128, 224 px (stage
token counts 401408, 100352, 25088, 6272), bf16. Writes ``--out/linear_bias_grad.json``.

    python bench/linear_bias_grad.py --out bench/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from zoo.layers.linear import bias_grad  # noqa: E402
from zoo.timing import capture_graph, median_ms  # noqa: E402

SHAPES = [
    (401408, 64),
    (401408, 512),
    (100352, 128),
    (100352, 768),
    (25088, 256),
    (25088, 1024),
    (6272, 512),
    (6272, 2048),
]


def graph_ms(fn, calls: int = 20, iters: int = 10) -> float:
    """GPU time per call: ``calls`` calls captured in one CUDA graph, median replay / ``calls``."""
    replay = capture_graph(lambda: [fn() for _ in range(calls)], torch.device("cuda"))
    return median_ms(replay, warmup=2, reps=iters) / calls


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/linear_bias_grad.py needs a CUDA GPU")
    rows = []
    for M, C in SHAPES:
        grad = torch.randn(M, C, device="cuda", dtype=torch.bfloat16)
        row = {"M": M, "C": C, "gbytes": round(M * C * 2 / 1e9, 4)}
        for name, fn in (("torch_sum", lambda g=grad: g.sum(0)), ("matvec", lambda g=grad: bias_grad(g))):
            row[f"{name}_gpu_ms"] = round(graph_ms(fn), 4)
            row[f"{name}_eager_ms"] = round(median_ms(fn, warmup=5, reps=30), 4)  # host launch included
        row["gpu_speedup"] = round(row["torch_sum_gpu_ms"] / row["matvec_gpu_ms"], 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {
        "benchmark": "linear bias gradient, bf16: *_gpu_ms GPU time per call (20 calls in a CUDA graph, "
        "median of 10 replays); *_eager_ms one call between CUDA events (median of 30, host launch included)",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }
    out = Path(args.out) / "linear_bias_grad.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
