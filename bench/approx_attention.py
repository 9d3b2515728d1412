"""Approximate attention vs exact: error against budget on real q/k/v, and a time / memory sweep.

    python bench/approx_attention.py [--qkv FILE ...] [--lm-checkpoint W] [--sweep] [--out bench/results]

The same as ``zoo eval approx-attention`` (see ``zoo/layers/approx_eval.py``), with the GPU sweep
on by default. Writes ``bench/results/approx_attention.json`` (device, versions, date, every row)
and ``approx_attention.png`` (error vs FLOPs fraction; time vs N), and prints a short table.
"""

from __future__ import annotations

import argparse
import sys

from zoo.layers.approx_eval import run
from zoo.layers.commands import add_approx_eval_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_approx_eval_arguments(parser)
    parser.add_argument("--no-sweep", action="store_true", help="skip the time / memory sweep")
    args = parser.parse_args(argv)
    args.sweep = not args.no_sweep
    args.command_line = " ".join(
        ["python", "bench/approx_attention.py"] + (argv if argv is not None else sys.argv[1:])
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
