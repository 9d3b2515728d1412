"""``zoo`` sub-commands for the approximate attention layers (SEA, Scatterbrain, Combiner, SPT).

    zoo eval approx-attention   error vs budget of every approximation on real q/k/v (+ a GPU sweep)
    zoo train distill-sea       distill a SEA student from a dense byte-level LM; perplexity and memory
    zoo demo --only layers      a few seconds: each method's error on a small structured input

Only argparse is imported here; the work imports live in the handlers.
"""

from __future__ import annotations

import argparse


def add_approx_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``zoo eval approx-attention`` (shared with bench/approx_attention.py)."""
    p.add_argument(
        "--out", default="bench/results", help="folder for <name>.json and <name>.png (default: %(default)s)"
    )
    p.add_argument(
        "--name", default="approx_attention", help="file stem of the outputs (default: %(default)s)"
    )
    p.add_argument(
        "--qkv",
        nargs="+",
        default=None,
        metavar="FILE",
        help=".safetensors q/k/v files (save_samples format or tensors q, k, v)",
    )
    p.add_argument("--lm", action="store_true", help="also use the byte LM source when --qkv is given")
    p.add_argument(
        "--model",
        default=None,
        help="a registered token model whose SDPA q/k/v to use, e.g. zoo_llama_9m (with --checkpoint)",
    )
    p.add_argument("--checkpoint", default=None, help="weights for --model (any format zoo.create reads)")
    p.add_argument(
        "--tokens",
        default="runs/lm_data/val.bin",
        help="token file for --model (uint16 .bin of zoo train lm; default: %(default)s)",
    )
    p.add_argument(
        "--lm-checkpoint",
        default=None,
        help="ByteLM weights (e.g. teacher.safetensors of distill-sea); trained here if absent",
    )
    p.add_argument(
        "--text",
        default=None,
        help="training/held-out text file (default: the KJV Bible from bible-kjv-text)",
    )
    p.add_argument(
        "--lm-seconds",
        type=float,
        default=60.0,
        help="LM training time when no checkpoint (default: %(default)s)",
    )
    p.add_argument("--lm-dim", type=int, default=256)
    p.add_argument("--lm-depth", type=int, default=4)
    p.add_argument("--lm-heads", type=int, default=4)
    p.add_argument("--lm-batch", type=int, default=16, help="LM training batch (default: %(default)s)")
    p.add_argument(
        "--length",
        type=int,
        default=1024,
        help="sequence length N of the captured q/k/v (default: %(default)s)",
    )
    p.add_argument(
        "--windows", type=int, default=4, help="held-out windows (the last is evaluated, the rest fit SEA)"
    )
    p.add_argument("--max-samples", type=int, default=4, help="layers evaluated (default: %(default)s)")
    p.add_argument(
        "--families",
        nargs="+",
        default=None,
        help="only these method families (e.g. scatterbrain combiner spt sea xattention)",
    )
    p.add_argument(
        "--sea-steps", type=int, default=200, help="distillation steps of SEA's predictor per layer"
    )
    p.add_argument("--sb-features", type=int, default=32, help="Scatterbrain's m in the equal-budget test")
    p.add_argument(
        "--sb-window", type=int, default=32, help="Scatterbrain's band / bucket in the equal-budget test"
    )
    p.add_argument("--sb-trials", type=int, default=3, help="draws of features and hashes averaged")
    p.add_argument(
        "--sb-feature-shares",
        type=float,
        nargs="+",
        default=None,
        help="also try Scatterbrain at these shares of the budget spent on features (best split reported)",
    )
    p.add_argument(
        "--sb-feature-map",
        choices=["cosh", "positive"],
        default="cosh",
        help="random features of Scatterbrain and the Performer baseline (default: %(default)s)",
    )
    p.add_argument("--sweep", action="store_true", help="time / peak-memory sweep N = 1k..64k (GPU)")
    p.add_argument("--sweep-max-n", type=int, default=65536)
    p.add_argument(
        "--sweep-seconds", type=float, default=150.0, help="time budget of the sweep (default: %(default)s)"
    )
    p.add_argument(
        "--save-qkv", action="store_true", help="also write the captured q/k/v as <name>_qkv.safetensors"
    )
    p.add_argument(
        "--plot-only", default=None, metavar="JSON", help="only redraw the plot from a result JSON"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)"
    )
    p.add_argument("--seed", type=int, default=0)


def _approx_eval(args: argparse.Namespace) -> int:
    import torch

    from zoo.layers import approx_eval

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        import zoo

        model = zoo.create(args.model, checkpoint=args.checkpoint)
        tokens = approx_eval.read_token_file(args.tokens)
        info = {"model": args.model, "checkpoint": args.checkpoint, "tokens": args.tokens,
                "token_count": int(tokens.numel()), "length": args.length, "windows": args.windows}  # fmt: skip
        args.model_source = (model, tokens, info)
    approx_eval.run(args)
    return 0


def _distill_sea(args: argparse.Namespace) -> int:
    import json

    import torch

    from zoo.layers.sea_distill import DistillConfig, LMConfig, run_distillation

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.length > args.max_len:
        raise ValueError(f"--length {args.length} exceeds --max-len {args.max_len}")
    if args.compressed_len % 4 or args.compressed_len < 4:
        raise ValueError(f"--compressed-len must be a multiple of 4, got {args.compressed_len}")
    cfg = DistillConfig(
        lm=LMConfig(dim=args.dim, depth=args.depth, num_heads=args.heads, max_len=args.max_len),
        length=args.length,
        batch=args.batch,
        teacher_seconds=args.teacher_seconds,
        teacher_steps=args.teacher_steps,
        student_seconds=args.student_seconds,
        student_steps=args.student_steps,
        student_batch=args.student_batch,
        k=args.k,
        compressed_len=args.compressed_len,
        eval_windows=args.eval_windows,
        seed=args.seed,
    )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = run_distillation(
        cfg, args.out, device=device, text=args.text, teacher_checkpoint=args.teacher_checkpoint
    )
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("perplexity", "attention_memory_elements_per_layer", "attention_peak_bytes")
            },
            indent=1,
        )
    )
    print(f"wrote {args.out}/distill_sea.json")
    return 0


def register(top: argparse._SubParsersAction, groups: dict) -> None:
    p = groups["eval"].add_parser(
        "approx-attention",
        help="SEA / Scatterbrain / Combiner / SPT / block-sparse: error vs budget on real q/k/v",
    )
    add_approx_eval_arguments(p)
    p.set_defaults(func=_approx_eval)

    p = groups["train"].add_parser(
        "distill-sea", help="distill a SEA student from a dense byte LM (KJV text)"
    )
    p.add_argument(
        "--out",
        default="runs/distill_sea",
        help="folder for distill_sea.json and weights (default: %(default)s)",
    )
    p.add_argument("--text", default=None, help="text file (default: the KJV Bible from bible-kjv-text)")
    p.add_argument(
        "--teacher-checkpoint", default=None, help="ByteLM weights to use instead of training the teacher"
    )
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--length", type=int, default=1024, help="context N (default: %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="teacher batch")
    p.add_argument("--teacher-seconds", type=float, default=120.0)
    p.add_argument("--teacher-steps", type=int, default=3000)
    p.add_argument("--student-seconds", type=float, default=120.0)
    p.add_argument("--student-steps", type=int, default=1500)
    p.add_argument("--student-batch", type=int, default=8)
    p.add_argument("--k", type=int, default=64, help="SEA key budget per query (default: %(default)s)")
    p.add_argument("--compressed-len", type=int, default=256, help="SEA's T_M (default: %(default)s)")
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_distill_sea)


def demo(args: argparse.Namespace) -> None:
    """Each approximation's error against exact attention on a small structured causal input."""
    import torch

    from zoo.layers.approx_eval import AttentionSample, evaluate

    gen = torch.Generator().manual_seed(0)
    n, d, h = 256, 32, 2
    # queries and keys with local structure (smooth in position) and a few shared topics
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freqs = torch.exp(-torch.arange(d // 2, dtype=torch.float32) / 4)[None, :]
    rope = torch.cat([torch.sin(pos * freqs), torch.cos(pos * freqs)], -1)
    topics = torch.randn(4, d, generator=gen)[torch.randint(0, 4, (n,), generator=gen)]
    q = (rope + topics + 0.3 * torch.randn(h, n, d, generator=gen)).unsqueeze(0)
    k = (rope + topics + 0.3 * torch.randn(h, n, d, generator=gen)).unsqueeze(0)
    v = torch.randn(1, h, n, d, generator=gen)
    sample = AttentionSample("demo", q, k, v, causal=True, source="synthetic: smooth positions + 4 topics")
    names = ["scatterbrain-lsh m=16 w=16", "scatterbrain-local m=16 w=16", "local w=32", "performer m=64",
             "combiner-fixed", "combiner-logsparse", "combiner-axial", "combiner-mixture", "spt top_k=N/8",
             "sea k=16", "oracle top-1 blocks"]  # fmt: skip
    rows = evaluate([sample], sea_steps=15, sea_width=64, method_names=names)
    print(f"N={n}, D={d}, causal; error = ||out - exact|| / ||exact||, budget = attention FLOPs / dense")
    print("(at this small N the feature maps and SEA's predictor cost more than dense attention)")
    print(f"{'method':30s} {'error':>8s} {'budget':>8s}")
    for r in sorted(rows, key=lambda r: r["flops_fraction"]):
        print(f"{r['method']:30s} {r['rel_error']:8.4f} {r['flops_fraction']:8.3f}")
