"""``zoo bench block-sparse`` and the kernels' part of ``zoo demo``.

Block-sparse flash attention (FlashAttention-2, arXiv 2307.08691, over the block lists of a
``BlockSparseMask`` as in FlexAttention, arXiv 2412.05496). Imports only argparse at import
time; the work imports live in the handlers.
"""

from __future__ import annotations

import argparse


def cmd_bench_block_sparse(args: argparse.Namespace) -> int:
    from zoo.cli import run_bench_script

    return run_bench_script("block_sparse", args.bench_args)


def register(top: argparse._SubParsersAction, groups: dict) -> None:
    p = groups["bench"].add_parser(
        "block-sparse",
        help="block-sparse attention vs dense SDPA and FlexAttention (one GPU)",
        description="Runs bench/block_sparse.py; arguments after the command go to it "
        "(e.g. --seq-lens 8192 32768 --no-flex --out results.json, or --quick).",
    )
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for bench/block_sparse.py")
    p.set_defaults(func=cmd_bench_block_sparse)


def demo(args: argparse.Namespace) -> None:
    """A mask from block scores, its density, and the error against dense attention (CPU)."""
    import torch

    from zoo.kernels import BlockSparseMask, block_sparse_attention, dense_attention_reference

    generator = torch.Generator().manual_seed(0)
    batch, heads, seq_len, head_dim, block = 1, 2, 1024, 64, 32
    # queries and keys with a local pattern (rotary-like position features) and a few heavy
    # "sink" keys at the start: the structure sparse prefill exploits
    position = torch.arange(seq_len, dtype=torch.float32)[:, None]
    frequency = torch.logspace(-2.5, -0.5, 24)[None, :]
    features = torch.cat([torch.cos(position * frequency), torch.sin(position * frequency)], -1)
    noise = lambda: torch.randn(batch, heads, seq_len, head_dim, generator=generator)
    q, k, v = noise(), noise(), noise()
    q[..., :48] += 2.0 * features
    k[..., :48] += 2.0 * features
    q[..., 48] += 2.0
    k[..., :16, 48] += 6.0
    # block scores: the attention mass of each block, pooled from the exact probabilities
    num_blocks = seq_len // block
    probs = torch.softmax(
        (q @ k.transpose(-1, -2) * head_dim**-0.5).masked_fill(
            ~torch.ones(seq_len, seq_len, dtype=torch.bool).tril(), float("-inf")
        ),
        -1,
    )
    scores = probs.view(batch, heads, num_blocks, block, num_blocks, block).sum((3, 5))
    dense = dense_attention_reference(q, k, v, causal=True)
    print(f"q, k, v: {tuple(q.shape)}, causal, blocks {block}x{block} (PyTorch reference on the CPU)")
    print("threshold  density  rel. error vs dense")
    for threshold in (0.8, 0.9, 0.95, 0.99, 1.0):
        mask = BlockSparseMask.from_scores(scores, block, seq_len, seq_len, threshold=threshold, causal=True)
        out = block_sparse_attention(q, k, v, mask, causal=True)
        error = float((out - dense).norm() / dense.norm())
        print(f"{threshold:9.2f}  {mask.density(causal=True):7.3f}  {error:.2e}")
