"""``zoo`` sub-commands for the routing and multi-modal layers.

    zoo train moe-lm       MoE byte LM on the KJV Bible: softmax vs similarity- vs attention-aware routers
    zoo train gin-adapter  Sparse-GIN vs LoRA fine-tuning on GCIDE of a KJV-pretrained byte LM
    zoo train mot          Mixture-of-Transformers vs dense: KJV text + Fashion-MNIST patches
    zoo bench routing      MoE dispatch and SPT routed FFN vs their dense equivalents

Defaults are small enough for 2 CPU cores (a few minutes each); the flags scale them up on
a GPU. Each writes one JSON (with the exact command) under ``--out``. Only argparse is
imported here; the work imports live in the handlers.
"""

from __future__ import annotations

import argparse


def _common(p: argparse.ArgumentParser, out_default: str = "bench/results") -> None:
    p.add_argument("--out", default=out_default, help="folder for the result JSON (default: %(default)s)")
    p.add_argument("--tag", default=None, help="suffix of the JSON name, e.g. h100")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--amp", choices=("none", "bf16"), default="none", help="autocast dtype (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)"
    )


def _lm(p: argparse.ArgumentParser, dim: int, depth: int, heads: int, seq_len: int, batch: int) -> None:
    p.add_argument("--dim", type=int, default=dim)
    p.add_argument("--depth", type=int, default=depth)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--seq-len", type=int, default=seq_len)
    p.add_argument("--batch", type=int, default=batch)


def _run(name: str):
    def handler(args: argparse.Namespace) -> int:
        import torch

        from zoo.layers import routing_experiments

        if args.threads:
            torch.set_num_threads(args.threads)
        getattr(routing_experiments, name)(args)
        return 0

    return handler


def register(top: argparse._SubParsersAction, groups: dict) -> None:
    train, bench = groups["train"], groups["bench"]

    p = train.add_parser("moe-lm", help="MoE byte LM (KJV): standard vs graph-of-tokens routers")
    _common(p)
    _lm(p, dim=64, depth=2, heads=4, seq_len=64, batch=16)
    p.add_argument("--routers", nargs="+", default=["softmax", "similarity", "attention"])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=128)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--aux-weight", type=float, default=0.01, help="load-balancing loss weight")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--late-fraction", type=float, default=0.3, help="last share of training where routing is probed"
    )
    p.add_argument("--probe-every", type=int, default=20, help="steps between routing checkpoints")
    p.add_argument("--probe-windows", type=int, default=16)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=100)
    p.set_defaults(func=_run("run_moe_lm"))

    p = train.add_parser("gin-adapter", help="Sparse-GIN vs LoRA fine-tuning on GCIDE of a KJV byte LM")
    _common(p)
    _lm(p, dim=64, depth=2, heads=4, seq_len=64, batch=16)
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps")
    p.add_argument("--lr", type=float, default=2e-3, help="pretraining learning rate")
    p.add_argument("--finetune-lr", type=float, default=2e-3)
    p.add_argument("--methods", nargs="+", default=["sparse-gin", "lora"])
    p.add_argument(
        "--gnn-dim", type=int, default=48, help="Sparse-GIN width (sets the shared parameter budget)"
    )
    p.add_argument("--gin-mlp-ratio", type=float, default=1.0)
    p.add_argument("--gin-threshold", type=float, default=0.1)
    p.add_argument("--gin-edge-threshold", type=float, default=0.6)
    p.add_argument(
        "--gin-init-scale", default="linear", help="'linear' (0 -> 0.5 over layers, upstream) or a number"
    )
    p.add_argument("--gcide-bytes", type=int, default=8_000_000, help="GCIDE bytes used (train + held-out)")
    p.add_argument("--base", default=None, help="load a pretrained base (safetensors) instead of pretraining")
    p.add_argument("--save-base", action="store_true", help="save the pretrained base next to the JSON")
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=50)
    p.set_defaults(func=_run("run_gin_adapter"))

    p = train.add_parser("mot", help="Mixture-of-Transformers vs dense: KJV text + Fashion-MNIST patches")
    _common(p)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--text-len", type=int, default=32, help="KJV bytes before the caption/image pair")
    p.add_argument("--patch", type=int, default=4, help="image patch side (28 must be divisible)")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--image-weight", type=float, default=1.0, help="weight of the image MSE in the loss")
    p.add_argument("--models", nargs="+", default=["mot", "dense"])
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=4)
    p.set_defaults(func=_run("run_mot"))

    p = bench.add_parser("routing", help="MoE dispatch and SPT routed FFN vs dense (time, peak memory)")
    _common(p)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--moe-tokens", type=int, default=16384)
    p.add_argument("--moe-seq-len", type=int, default=2048)
    p.add_argument("--moe-dim", type=int, default=1024)
    p.add_argument("--moe-routers", nargs="+", default=["softmax", "similarity", "attention"])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=4096)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--ffn-tokens", type=int, default=8192)
    p.add_argument("--ffn-dim", type=int, default=2048)
    p.add_argument("--ffn-hidden", type=int, default=8192)
    p.add_argument("--ffn-blocks", type=int, default=8)
    p.set_defaults(func=_run("run_routing_bench"))


def demo(args: argparse.Namespace) -> None:
    """A few seconds on CPU: each layer once, checked against its limiting case."""
    import torch

    from zoo.layers import GINAttention, MoE, MoTBlock, RoutedFFN, SparseGINAdapter

    torch.manual_seed(0)
    x = torch.randn(2, 16, 32)
    attn = torch.softmax(
        torch.randn(2, 4, 16, 16).masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), -1e9), -1
    )
    for router in ("softmax", "similarity", "attention"):
        moe = MoE(32, 8, 2, router=router, capacity_factor=1.25, causal=True)
        _, info = moe(x, attn if router == "attention" else None, return_routing=True)
        load = " ".join(f"{v:.2f}" for v in info.expert_load.tolist())
        print(
            f"MoE {router:<10} load [{load}]  aux {info.aux_loss.item():.3f}  dropped {info.dropped_fraction:.1%}"
        )
    ffn = RoutedFFN(32, 128, 8, top_k=8)
    torch.nn.init.zeros_(ffn.router.weight)
    torch.nn.init.zeros_(ffn.router.bias)
    print(
        f"RoutedFFN all blocks, unit scale vs dense FFN: max |diff| {(ffn(x) - ffn.dense_forward(x)).abs().max():.2e}"
    )
    gin = GINAttention(32, 4)
    out, probs = gin(x, return_attn=True)
    adapter = SparseGINAdapter(32, gnn_dim=16)
    print(
        f"GINAttention {tuple(out.shape)}; Sparse-GIN at scale 0 == frozen: {torch.equal(adapter(x, probs), x)}"
    )
    mot = MoTBlock(32, 4, num_modalities=2)
    modality = (torch.arange(16) >= 8).long().expand(2, 16)
    print(
        f"MoTBlock text+image {tuple(mot(x, modality).shape)}, params {sum(p.numel() for p in mot.parameters())}"
    )
