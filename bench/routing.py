"""Benchmark: MoE dispatch and the SPT routed FFN against their dense equivalents.

Papers: "Improving Routing in Sparse Mixture of Experts with Graph of Tokens" (arXiv
2505.00792) for the MoE routers; "SPT: Fine-Tuning Transformer-based Language Models
Efficiently with Sparsification" (arXiv 2312.10365) for the routed FFN.

Rows, each forward and forward+backward, median milliseconds and peak extra memory:

- MoE (softmax / similarity / attention router): capacity-buffer dispatch with
  ``--capacity-factor``, the same without dropping, the dense path (every expert on every
  token), and dense FFNs with ``top_k * expert_hidden`` (equal active FLOPs) and
  ``expert_hidden`` (one expert) hidden units;
- RoutedFFN (OPT style, half the blocks; LLaMA style, a quarter): tokens batched per block,
  the masked reference (all blocks computed), and the dense FFN of equal width.

Writes ``<out>/routing.json`` (device, versions, date, every row, time ratios against the
dense path) and prints a table. One H100: ``python bench/routing.py --out bench/results --tag h100``
(about 2 minutes). CPU smoke run: add ``--small``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMALL = [
    "--dtype=fp32",
    "--reps=3",
    "--warmup=1",
    "--moe-tokens=1024",
    "--moe-seq-len=256",
    "--moe-dim=128",
    "--expert-hidden=256",
    "--ffn-tokens=1024",
    "--ffn-dim=128",
    "--ffn-hidden=512",
]


def main(argv: list[str] | None = None) -> int:
    from zoo.cli import build_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    small = "--small" in argv
    argv = [a for a in argv if a != "--small"]
    args = build_parser().parse_args(["bench", "routing"] + (SMALL if small else []) + argv)
    args.argv = ["bench/routing.py"] + (["--small"] if small else []) + argv
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from zoo.layers.routing_experiments import run_routing_bench

    run_routing_bench(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
