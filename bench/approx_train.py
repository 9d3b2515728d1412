"""Every approximate-attention layer trained end to end as the mixer of a small byte-level LM.

SEA (arXiv 2310.01777), Scatterbrain (arXiv 2110.15343), Combiner (arXiv 2107.05768) and SPT's
PQ sparse attention (upstream ytgui/SPT-proto) each replace the causal self-attention of the
same byte-level transformer (``zoo.layers.sea_distill.ByteLM``: embeddings, pre-norm blocks,
tied head), beside dense SDPA attention. Every model gets the same recipe and the same
wall-clock budget on the KJV text (``zoo.layers.sea_distill.load_text_corpus``; the last 5%
held out); SPT adds its codebook loss (``aux_loss``) to the task loss, the others train on the
task loss alone (SEA's distillation from a dense teacher is ``zoo train distill-sea``).

Recorded per layer: steps, seconds per step, first and last training loss (mean of 10 steps),
held-out perplexity, peak CUDA memory, whether the gradients are finite and which parameters
the task loss does not reach (SEA's attention predictor learns only from the distillation
losses, since its top-k selection passes no gradient).

    python bench/approx_train.py --device cuda --seconds 40 --out bench/results   # ~6 min on one GPU
    python bench/approx_train.py --device cpu --seconds 20 --length 256 --dim 64 --out /tmp/at
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def layer_factories(dim: int, heads: int, length: int) -> dict[str, Callable[[], torch.nn.Module]]:
    """Causal self-attention modules ``(B, N, dim) -> (B, N, dim)`` by name."""
    from zoo.layers import CombinerAttention, PQSparseAttention, ScatterbrainAttention, SEAAttention
    from zoo.layers.sea_distill import DenseCausalAttention

    window = max(16, length // 8)
    return {
        "dense_sdpa": lambda: DenseCausalAttention(dim, heads),
        "sea": lambda: SEAAttention(dim, heads, causal=True, k=max(16, length // 8), max_len=length),
        "scatterbrain_lsh": lambda: ScatterbrainAttention(
            dim, heads, sparse="lsh", window=window, causal=True
        ),
        "scatterbrain_local": lambda: ScatterbrainAttention(
            dim, heads, sparse="local", window=window, causal=True
        ),
        "combiner_fixed": lambda: CombinerAttention(dim, heads, variant="fixed", causal=True),
        "combiner_logsparse": lambda: CombinerAttention(dim, heads, variant="logsparse", causal=True),
        "combiner_axial": lambda: CombinerAttention(dim, heads, variant="axial", causal=True),
        "combiner_mixture": lambda: CombinerAttention(dim, heads, variant="mixture", causal=True),
        "spt_pq_sparse": lambda: PQSparseAttention(dim, heads, causal=True),
    }


def aux_losses(model: torch.nn.Module) -> torch.Tensor | float:
    """Sum of the auxiliary losses the layers left after their last forward (SPT's codebook loss)."""
    total: torch.Tensor | float = 0.0
    for module in model.modules():
        aux = getattr(module, "aux_loss", None)
        if isinstance(aux, torch.Tensor):
            total = total + aux
    return total


def train_one(
    name: str,
    make: Callable[[], torch.nn.Module],
    train_data: torch.Tensor,
    val_data: torch.Tensor,
    args: argparse.Namespace,
    device: torch.device,
) -> dict:
    from zoo.layers.sea_distill import ByteLM, LMConfig, byte_batches, evaluate_perplexity

    torch.manual_seed(args.seed)
    model = ByteLM(LMConfig(dim=args.dim, depth=args.depth, num_heads=args.heads, max_len=args.length), make)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, grads_ok, no_grad, step = [], True, [], 0
    start = time.perf_counter()
    model.train()
    while step < args.max_steps and time.perf_counter() - start < args.seconds:
        warm = min(1.0, (step + 1) / 50)
        for group in opt.param_groups:
            group["lr"] = args.lr * warm
        tokens = byte_batches(train_data, args.batch, args.length, gen).to(device)
        with autocast:
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        total = loss + aux_losses(model)
        opt.zero_grad(set_to_none=True)
        total.backward()
        if step == 0:  # parameters the loss does not reach, and any non-finite gradient
            no_grad = [n for n, p in model.named_parameters() if p.grad is None]
            grads_ok = all(
                bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None
            )
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    ppl = evaluate_perplexity(model, val_data, args.length, windows=16, batch=8, device=device)
    head, tail = losses[:10], losses[-10:]
    row = dict(
        layer=name,
        params=sum(p.numel() for p in model.parameters()),
        steps=step,
        seconds=round(seconds, 1),
        ms_per_step=round(1e3 * seconds / max(step, 1), 1),
        first_loss=round(sum(head) / max(len(head), 1), 4),
        last_loss=round(sum(tail) / max(len(tail), 1), 4),
        val_ppl=round(ppl, 3),
        finite_grads=grads_ok,
        params_without_grad=sorted({n.split(".", 2)[-1] for n in no_grad}),
        trained=bool(step >= 20 and math.isfinite(ppl) and sum(tail) / len(tail) < sum(head) / len(head)),
    )
    if device.type == "cuda":
        row["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return row


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for approx_train.json")
    p.add_argument("--name", default="approx_train", help="results file stem")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", nargs="+", default=None, help="subset of the layers (default: all)")
    p.add_argument("--seconds", type=float, default=40.0, help="training wall time per layer")
    p.add_argument("--max-steps", type=int, default=100000)
    p.add_argument("--length", type=int, default=512, help="bytes per training window")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", default=None, help="UTF-8 text instead of the KJV Bible")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    from zoo.layers.sea_distill import load_text_corpus

    args = parse_args(argv)
    device = torch.device(args.device)
    factories = layer_factories(args.dim, args.heads, args.length)
    names = args.layers or list(factories)
    unknown = [n for n in names if n not in factories]
    if unknown:
        raise SystemExit(f"--layers: expected names from {sorted(factories)}, got {unknown}")
    corpus = torch.frombuffer(bytearray(load_text_corpus(args.text)), dtype=torch.uint8)
    split = int(0.95 * corpus.numel())
    train_data, val_data = corpus[:split], corpus[split:]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command="python bench/approx_train.py " + " ".join(sys.argv[1:] if argv is None else argv),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        settings={k: v for k, v in vars(args).items() if k not in ("out", "name", "layers")},
        rows=[],
    )
    for name in names:
        try:
            row = train_one(name, factories[name], train_data, val_data, args, device)
        except Exception as err:  # one failing layer is recorded, the others still run
            row = dict(layer=name, error=f"{type(err).__name__}: {err}", trained=False)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    result["all_trained"] = all(r.get("trained") for r in result["rows"])
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / (args.name + '.json')}; all trained: {result['all_trained']}")
    return 0 if result["all_trained"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
