"""Small experiments on real offline data for the routing and multi-modal layers.

- ``run_moe_lm``: byte-level causal LM on the King James Bible (Debian ``bible-kjv-text``)
  whose FFNs are :class:`~zoo.layers.moe.MoE` layers; the standard, Similarity-Aware and
  Attention-Aware routers ("Improving Routing in Sparse Mixture of Experts with Graph of
  Tokens", arXiv 2505.00792) trained at equal budget (same data order, steps, widths and
  initial weights). Measures validation perplexity, expert load and routing fluctuation:
  the share of probe tokens whose top-1 expert changes between consecutive checkpoints late
  in training.
- ``run_gin_adapter``: a dense byte LM pretrained on the Bible, then fine-tuned on the GCIDE
  dictionary (Debian ``dict-gcide``, a held-out domain) with Sparse-GIN adapters
  ("Graph-Aware Isomorphic Attention for Adaptive Dynamics in Transformers", arXiv 2501.02393)
  or LoRA at an equal trainable-parameter budget; reports held-out perplexity on both domains.
- ``run_mot``: two modalities in one causal sequence, Bible text bytes and Fashion-MNIST
  image patches (Debian ``dataset-fashion-mnist``) with a caption naming the garment;
  a Mixture-of-Transformers model ("Mixture-of-Transformers", arXiv 2411.04996) against the
  dense transformer of the same FLOPs per token. Reports loss per modality against steps
  and wall-clock.
- ``run_routing_bench``: time and peak memory of MoE dispatch and of the SPT routed FFN
  against their dense equivalents (one process, one device).

Every runner takes an ``argparse.Namespace`` (the ``zoo train``/``zoo bench`` flags, see
``zoo.layers.routing_commands``), works at a small size on 2 CPU cores by default and
scales with flags on a GPU, and writes one JSON with the exact command under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from zoo import datasets
from zoo.layers.gin_attention import SparseGINAdapter
from zoo.layers.mixture_of_transformers import MoTBlock
from zoo.layers.moe import MoE
from zoo.layers.spt_ffn import RoutedFFN
from zoo.progress import get_logger, progress

__all__ = [
    "ByteLM",
    "MoTModel",
    "fashion_mnist",
    "gcide_text",
    "kjv_text",
    "run_gin_adapter",
    "run_moe_lm",
    "run_mot",
    "run_routing_bench",
    "export_data",
]

log = get_logger("zoo.layers.routing")

FASHION_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)


# ----------------------------------------------------------------------------- data


export_data = datasets.export  # copies the corpora and images for a machine without the Debian packages


def kjv_text() -> bytes:
    """The King James Bible as bytes: a ``Book C`` line per chapter, one verse per line, no verse numbers."""
    return datasets.kjv_bytes(verse_numbers=False)


def gcide_text(max_bytes: Optional[int] = None) -> bytes:
    """GCIDE dictionary entries as plain text (:func:`zoo.datasets.gcide_text`), the first ``max_bytes``."""
    data = datasets.gcide_text().encode("utf-8")
    return data if max_bytes is None else data[:max_bytes]


def split_bytes(data: bytes, val_every: int = 20, block: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Train/validation split of a byte string: every ``val_every``-th block of ``block`` bytes."""
    arr = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    n_blocks = arr.numel() // block
    blocks = arr[: n_blocks * block].view(n_blocks, block)
    is_val = torch.arange(n_blocks) % val_every == val_every - 1
    return blocks[~is_val].reshape(-1).clone(), blocks[is_val].reshape(-1).clone()


def fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 28, 28]`` uint8 and labels ``[N]`` int64 (:func:`zoo.datasets.fashion_mnist`)."""
    images, labels = datasets.fashion_mnist(split)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


def random_windows(data: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, data.numel() - length - 1, (batch,), generator=generator)
    return data[start[:, None] + torch.arange(length + 1)].long()


def fixed_windows(data: torch.Tensor, count: int, length: int) -> torch.Tensor:
    start = torch.linspace(0, data.numel() - length - 2, count).long()
    return data[start[:, None] + torch.arange(length + 1)].long()


# ----------------------------------------------------------------------------- models


class LoRA(nn.Module):
    """Low-rank update ``(alpha / r) * B A x`` added to a frozen linear map (B starts at zero)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float = 16.0) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * self.scale


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention; SDPA unless the probabilities are asked for."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.lora_qkv: Optional[LoRA] = None
        self.lora_proj: Optional[LoRA] = None

    def forward(
        self, x: torch.Tensor, need_probs: bool = False
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        b, n, c = x.shape
        qkv = self.qkv(x)
        if self.lora_qkv is not None:
            qkv = qkv + self.lora_qkv(x)
        q, k, v = qkv.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        probs = None
        if need_probs:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            scores = scores.masked_fill(
                torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1), float("-inf")
            )
            probs = scores.float().softmax(dim=-1)
            out = probs.to(v.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = out.transpose(1, 2).reshape(b, n, c)
        y = self.proj(out)
        if self.lora_proj is not None:
            y = y + self.lora_proj(out)
        return y, probs


class LMBlock(nn.Module):
    """Pre-norm block: attention, optional Sparse-GIN adapter, then a dense or MoE FFN."""

    def __init__(self, dim: int, num_heads: int, moe: Optional[dict] = None, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads)
        self.ln2 = nn.LayerNorm(dim)
        if moe is None:
            self.ffn: nn.Module = nn.Sequential(
                nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
            )
        else:
            self.ffn = MoE(dim, causal=True, **moe)
        self.adapter: Optional[SparseGINAdapter] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wants_attn = isinstance(self.ffn, MoE) and self.ffn.router == "attention"
        a, probs = self.attn(self.ln1(x), need_probs=wants_attn or self.adapter is not None)
        h = x + a
        if self.adapter is not None:
            h = self.adapter(h, probs)
        if isinstance(self.ffn, MoE):
            return h + self.ffn(self.ln2(h), probs if wants_attn else None)
        return h + self.ffn(self.ln2(h))


class ByteLM(nn.Module):
    """Byte-level causal transformer LM (learned positions, tied embeddings)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        seq_len: int,
        moe: Optional[dict] = None,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.pos = nn.Parameter(torch.zeros(seq_len, dim))
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(LMBlock(dim, num_heads, moe, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.t()

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    def aux_loss(self) -> torch.Tensor:
        losses = [m.last_routing.aux_loss for m in self.moe_layers() if m.last_routing is not None]
        return torch.stack(losses).mean() if losses else torch.zeros(())


class MoTModel(nn.Module):
    """Text bytes + image patches in one causal sequence through :class:`MoTBlock` layers.

    ``num_modalities=1`` is the dense transformer with the same FLOPs per token (text and
    image tokens then share every weight but the embeddings and output heads).
    """

    def __init__(
        self, dim: int, depth: int, num_heads: int, seq_len: int, patch_dim: int, num_modalities: int = 2
    ):
        super().__init__()
        self.num_modalities = num_modalities
        self.text_embed = nn.Embedding(256, dim)
        self.image_embed = nn.Linear(patch_dim, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(seq_len, dim))
        self.blocks = nn.ModuleList(
            MoTBlock(dim, num_heads, num_modalities, qk_norm=True) for _ in range(depth)
        )
        self.final_norm = nn.Parameter(torch.ones(num_modalities, dim))
        self.text_head = nn.Linear(dim, 256)
        self.image_head = nn.Linear(dim, patch_dim)

    def forward(self, text: torch.Tensor, patches: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """``text [B, N]`` bytes, ``patches [B, N, P]``, ``modality [B, N]`` (0 text, 1 image)."""
        is_image = (modality == 1).unsqueeze(-1)
        x = (
            torch.where(is_image, self.image_embed(patches), self.text_embed(text))
            + self.pos[: text.shape[1]]
        )
        block_modality = modality if self.num_modalities > 1 else torch.zeros_like(modality)
        for block in self.blocks:
            x = block(x, block_modality)
        weight = self.final_norm[block_modality]
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight


# ----------------------------------------------------------------------------- shared helpers


def _device(args: argparse.Namespace) -> torch.device:
    name = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _autocast(device: torch.device, amp: str):
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def _lr_at(step: int, steps: int, lr: float) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress_frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_frac)))


def _environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def _command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run: the shell's argv when run as ``zoo``, else every flag."""
    argv = getattr(args, "argv", None)
    if argv:
        return " ".join(["python"] + [shlex.quote(a) for a in argv])
    program = Path(sys.argv[0]) if sys.argv else Path()
    if program.name == "zoo" or (program.name == "__main__.py" and program.parent.name == "zoo"):
        return " ".join(["zoo"] + [shlex.quote(a) for a in sys.argv[1:]])
    words = ["zoo", args.command, args.subcommand]
    for key, value in _config(args).items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            words.append(flag)
        elif isinstance(value, (list, tuple)):
            words += [flag] + [shlex.quote(str(v)) for v in value]
        else:
            words += [flag, shlex.quote(str(value))]
    return " ".join(words)


def _write(args: argparse.Namespace, name: str, payload: dict) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"_{args.tag}" if getattr(args, "tag", None) else ""
    path = out / f"{name}{tag}.json"
    path.write_text(json.dumps(payload, indent=1, default=float) + "\n")
    log.info("wrote %s", path)
    return path


def _config(
    args: argparse.Namespace, skip: tuple[str, ...] = ("func", "argv", "command", "subcommand", "quiet")
) -> dict:
    return {k: v for k, v in vars(args).items() if k not in skip and not callable(v)}


def _train_lm(
    model: ByteLM,
    train: torch.Tensor,
    args: argparse.Namespace,
    device: torch.device,
    params: list[nn.Parameter],
    lr: float,
    steps: int,
    aux_weight: float = 0.0,
    on_step: Optional[Callable[[int], None]] = None,
    desc: str = "train",
) -> list[float]:
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    losses = []
    model.train()
    for step in progress(range(steps), desc=desc):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        batch = random_windows(train, args.batch, args.seq_len, generator).to(device)
        with _autocast(device, args.amp):
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, 256), batch[:, 1:].reshape(-1))
            total = loss + aux_weight * model.aux_loss().to(loss.device) if aux_weight else loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step)
    return losses


@torch.no_grad()
def _eval_lm(model: ByteLM, windows: torch.Tensor, args: argparse.Namespace, device: torch.device) -> float:
    """Mean next-byte cross-entropy (nats) over fixed validation windows."""
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(args.batch):
        chunk = chunk.to(device)
        with _autocast(device, args.amp):
            logits = model(chunk[:, :-1])
        total += F.cross_entropy(
            logits.float().reshape(-1, 256), chunk[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += chunk[:, 1:].numel()
    model.train()
    return total / count


def _ppl(nats: float) -> dict:
    return {
        "loss": round(nats, 4),
        "ppl": round(math.exp(nats), 4),
        "bits_per_byte": round(nats / math.log(2), 4),
    }


# ----------------------------------------------------------------------------- MoE LM


@torch.no_grad()
def _top1_and_load(model: ByteLM, probe: torch.Tensor, args: argparse.Namespace, device: torch.device):
    """Top-1 expert of every probe token in every MoE layer, and each layer's expert load."""
    model.eval()
    saved = [m.capacity_factor for m in model.moe_layers()]
    for m in model.moe_layers():
        m.capacity_factor = None
    top1 = [[] for _ in model.moe_layers()]
    counts = [torch.zeros(m.num_experts) for m in model.moe_layers()]
    for chunk in probe.split(args.batch):
        with _autocast(device, args.amp):
            model(chunk[:, :-1].to(device))
        for i, m in enumerate(model.moe_layers()):
            info = m.last_routing
            top1[i].append(info.expert_index[..., 0].cpu())
            counts[i] += torch.bincount(info.expert_index.reshape(-1).cpu(), minlength=m.num_experts).float()
    for m, cf in zip(model.moe_layers(), saved):
        m.capacity_factor = cf
    model.train()
    return [torch.cat(t) for t in top1], [c / c.sum() for c in counts]


def run_moe_lm(args: argparse.Namespace) -> dict:
    """Train one MoE byte LM per router at equal budget; write ``routing_moe_lm.json``."""
    device = _device(args)
    torch.set_float32_matmul_precision("high")
    text = kjv_text()
    train, val = split_bytes(text)
    val_windows = fixed_windows(val, args.eval_windows, args.seq_len)
    probe = fixed_windows(val, args.probe_windows, args.seq_len)
    late_start = int(args.steps * (1 - args.late_fraction))
    results = {}
    for router in args.routers:
        torch.manual_seed(args.seed)
        moe = dict(
            num_experts=args.experts,
            top_k=args.top_k,
            router=router,
            hidden=args.expert_hidden,
            capacity_factor=args.capacity_factor,
        )
        model = ByteLM(args.dim, args.depth, args.heads, args.seq_len, moe=moe).to(device)
        snapshots: list[list[torch.Tensor]] = []
        curve: list[dict] = []

        def on_step(step: int, model=model, snapshots=snapshots, curve=curve) -> None:
            done = step + 1
            if done >= late_start and (done - late_start) % args.probe_every == 0:
                top1, _ = _top1_and_load(model, probe, args, device)
                snapshots.append(top1)
            if done % args.eval_every == 0 or done == args.steps:
                curve.append({"step": done, "val_loss": round(_eval_lm(model, val_windows, args, device), 4)})

        start = time.perf_counter()
        losses = _train_lm(
            model,
            train,
            args,
            device,
            list(model.parameters()),
            args.lr,
            args.steps,
            args.aux_weight,
            on_step,
            desc=f"moe-lm {router}",
        )
        seconds = time.perf_counter() - start
        val_nats = _eval_lm(model, val_windows, args, device)
        _, load = _top1_and_load(model, probe, args, device)
        changes = []
        for prev, cur in zip(snapshots, snapshots[1:]):
            changes.append(sum((a != b).float().mean().item() for a, b in zip(prev, cur)) / len(cur))
        overall = (
            sum((a != b).float().mean().item() for a, b in zip(snapshots[0], snapshots[-1]))
            / len(snapshots[0])
            if len(snapshots) > 1
            else None
        )
        results[router] = {
            "val": _ppl(val_nats),
            "train_loss_last100": round(sum(losses[-100:]) / len(losses[-100:]), 4),
            "routing_fluctuation": round(sum(changes) / len(changes), 5) if changes else None,
            "routing_fluctuation_per_interval": [round(c, 5) for c in changes],
            "routing_change_first_to_last_late_checkpoint": None if overall is None else round(overall, 5),
            "late_checkpoints": len(snapshots),
            "expert_load_per_layer": [[round(v, 4) for v in layer.tolist()] for layer in load],
            "expert_load_max_over_mean": round(max(float(layer.max() * layer.numel()) for layer in load), 3),
            "params": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(seconds, 1),
            "val_curve": curve,
        }
        log.info(
            "%s: val ppl %.3f, fluctuation %s, %.0f s",
            router,
            math.exp(val_nats),
            results[router]["routing_fluctuation"],
            seconds,
        )
    payload = {
        "experiment": "MoE byte LM on KJV: standard vs similarity-aware vs attention-aware routing",
        "command": _command_line(args),
        "environment": _environment(device),
        "config": _config(args),
        "data": {"train_bytes": train.numel(), "val_bytes": val.numel(), "source": "bible-kjv-text (Debian)"},
        "results": results,
    }
    _write(args, "routing_moe_lm", payload)
    return payload


# ----------------------------------------------------------------------------- Sparse-GIN vs LoRA


def _adapter_params(dim: int, gnn_dim: int, mlp_ratio: float) -> int:
    return sum(p.numel() for p in SparseGINAdapter(dim, gnn_dim=gnn_dim, mlp_ratio=mlp_ratio).parameters())


def run_gin_adapter(args: argparse.Namespace) -> dict:
    """Pretrain on KJV, fine-tune on GCIDE with Sparse-GIN or LoRA; write ``routing_gin_adapter.json``."""
    device = _device(args)
    torch.set_float32_matmul_precision("high")
    kjv_train, kjv_val = split_bytes(kjv_text())
    gc_train, gc_val = split_bytes(gcide_text(args.gcide_bytes))
    kjv_windows = fixed_windows(kjv_val, args.eval_windows, args.seq_len)
    gc_windows = fixed_windows(gc_val, args.eval_windows, args.seq_len)

    torch.manual_seed(args.seed)
    base = ByteLM(args.dim, args.depth, args.heads, args.seq_len).to(device)
    base_path = (
        Path(args.out) / f"routing_gin_base_d{args.dim}_l{args.depth}_s{args.pretrain_steps}.safetensors"
    )
    start = time.perf_counter()
    if args.base and Path(args.base).exists():
        from zoo import checkpoints

        checkpoints.load_into(base, args.base)
        pretrain_seconds = 0.0
    else:
        _train_lm(
            base,
            kjv_train,
            args,
            device,
            list(base.parameters()),
            args.lr,
            args.pretrain_steps,
            desc="pretrain",
        )
        pretrain_seconds = time.perf_counter() - start
        if args.save_base:
            from zoo import checkpoints

            checkpoints.save(base.state_dict(), base_path)
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    results = {
        "base": {
            "kjv_val": _ppl(_eval_lm(base, kjv_windows, args, device)),
            "gcide_val": _ppl(_eval_lm(base, gc_windows, args, device)),
        },
    }
    budget = args.depth * _adapter_params(args.dim, args.gnn_dim, args.gin_mlp_ratio)
    per_rank = args.depth * ((args.dim + 3 * args.dim) + (args.dim + args.dim))
    lora_rank = max(1, round(budget / per_rank))
    for method in args.methods:
        model = ByteLM(args.dim, args.depth, args.heads, args.seq_len).to(device)
        model.load_state_dict(base_state)
        for p in model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(args.seed + 1)
        for i, block in enumerate(model.blocks):
            if method == "sparse-gin":
                if args.gin_init_scale == "linear":  # upstream: 0 in the first layer to 0.5 in the last
                    init = 0.5 * i / max(1, args.depth - 1)
                else:
                    init = float(args.gin_init_scale)
                block.adapter = SparseGINAdapter(
                    args.dim,
                    gnn_dim=args.gnn_dim,
                    mlp_ratio=args.gin_mlp_ratio,
                    threshold=args.gin_threshold,
                    edge_threshold=args.gin_edge_threshold,
                    init_scale=init,
                ).to(device)
            elif method == "lora":
                block.attn.lora_qkv = LoRA(args.dim, 3 * args.dim, lora_rank).to(device)
                block.attn.lora_proj = LoRA(args.dim, args.dim, lora_rank).to(device)
            else:
                raise ValueError(f"--methods: expected 'sparse-gin' or 'lora', got {method!r}")
        trainable = [p for p in model.parameters() if p.requires_grad]
        initial = _eval_lm(model, gc_windows, args, device)
        curve = []

        def on_step(step: int, model=model, curve=curve) -> None:
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                curve.append(
                    {"step": step + 1, "gcide_val_loss": round(_eval_lm(model, gc_windows, args, device), 4)}
                )

        start = time.perf_counter()
        losses = _train_lm(
            model,
            gc_train,
            args,
            device,
            trainable,
            args.finetune_lr,
            args.steps,
            on_step=on_step,
            desc=method,
        )
        seconds = time.perf_counter() - start
        entry = {
            "trainable_params": sum(p.numel() for p in trainable),
            "gcide_val_before": _ppl(initial),
            "gcide_val": _ppl(_eval_lm(model, gc_windows, args, device)),
            "kjv_val": _ppl(_eval_lm(model, kjv_windows, args, device)),
            "train_loss_last50": round(sum(losses[-50:]) / len(losses[-50:]), 4),
            "finetune_seconds": round(seconds, 1),
            "val_curve": curve,
        }
        if method == "lora":
            entry["lora_rank"] = lora_rank
            entry["lora_targets"] = "attention qkv and output projection"
        else:
            entry["trained_scales"] = [round(b.adapter.scale.item(), 4) for b in model.blocks]
            with torch.no_grad(), _autocast(device, args.amp):
                probe = gc_windows[: args.batch, :-1].to(device)
                x = model.embed(probe) + model.pos[: probe.shape[1]]
                _, probs = model.blocks[0].attn(model.blocks[0].ln1(x), need_probs=True)
                density = (model.blocks[0].adapter.adjacency(probs) > 0).float().sum(-1).mean().item()
            entry["layer0_mean_edges_per_token"] = round(density, 2)
        results[method] = entry
        log.info(
            "%s: gcide ppl %.3f (%d trainable)", method, entry["gcide_val"]["ppl"], entry["trainable_params"]
        )
    payload = {
        "experiment": "Sparse-GIN vs LoRA fine-tuning of a KJV-pretrained byte LM on GCIDE (held-out domain)",
        "command": _command_line(args),
        "environment": _environment(device),
        "config": _config(args),
        "pretrain_seconds": round(pretrain_seconds, 1),
        "data": {
            "pretrain": "bible-kjv-text",
            "finetune": "dict-gcide",
            "gcide_train_bytes": gc_train.numel(),
            "gcide_val_bytes": gc_val.numel(),
        },
        "results": results,
    }
    _write(args, "routing_gin_adapter", payload)
    return payload


# ----------------------------------------------------------------------------- MoT


class _MoTData:
    """Batches of ``[KJV text | caption | image patches]`` (caption and image order random)."""

    CAPTION_LEN = 16

    def __init__(self, split: str, text_len: int, patch: int) -> None:
        kjv_train, kjv_val = split_bytes(kjv_text())
        self.text = kjv_train if split == "train" else kjv_val
        images, self.labels = fashion_mnist("train" if split == "train" else "test")
        x = images.float() / 255.0
        x = (x - 0.2860) / 0.3530  # Fashion-MNIST train mean / std
        n, side = x.shape[0], x.shape[1] // patch
        self.patches = (
            x.view(n, side, patch, side, patch).permute(0, 1, 3, 2, 4).reshape(n, side * side, patch * patch)
        )
        self.text_len, self.num_patches, self.patch_dim = text_len, side * side, patch * patch
        captions = [
            f"a {name}.".ljust(self.CAPTION_LEN)[: self.CAPTION_LEN].encode() for name in FASHION_CLASSES
        ]
        self.captions = torch.tensor([list(c) for c in captions], dtype=torch.long)
        self.seq_len = text_len + self.CAPTION_LEN + self.num_patches

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        text = random_windows(self.text, size, self.text_len - 1, generator)  # [size, text_len]
        idx = torch.randint(0, self.patches.shape[0], (size,), generator=generator)
        caption_first = torch.rand(size, generator=generator) < 0.5
        n, c, p = self.seq_len, self.CAPTION_LEN, self.num_patches
        tokens = torch.zeros(size, n, dtype=torch.long)
        patches = torch.zeros(size, n, self.patch_dim)
        modality = torch.zeros(size, n, dtype=torch.long)
        tokens[:, : self.text_len] = text
        t0 = self.text_len
        for first, rows in ((True, caption_first), (False, ~caption_first)):
            if not rows.any():
                continue
            cap_at = t0 if first else t0 + p
            img_at = t0 + c if first else t0
            tokens[rows, cap_at : cap_at + c] = self.captions[self.labels[idx[rows]]]
            patches[rows, img_at : img_at + p] = self.patches[idx[rows]]
            modality[rows, img_at : img_at + p] = 1
        return tokens, patches, modality


def _mot_losses(model: MoTModel, tokens, patches, modality) -> dict:
    h = model(tokens, patches, modality)[:, :-1]
    target_is_image = modality[:, 1:] == 1
    text_h, image_h = h[~target_is_image], h[target_is_image]
    text_loss = F.cross_entropy(model.text_head(text_h).float(), tokens[:, 1:][~target_is_image])
    image_loss = F.mse_loss(model.image_head(image_h).float(), patches[:, 1:][target_is_image])
    return {"text": text_loss, "image": image_loss}


def run_mot(args: argparse.Namespace) -> dict:
    """Train MoT and the dense transformer of equal FLOPs; write ``routing_mot.json``."""
    device = _device(args)
    torch.set_float32_matmul_precision("high")
    train_data = _MoTData("train", args.text_len, args.patch)
    val_data = _MoTData("val", args.text_len, args.patch)
    val_batches = [
        val_data.batch(args.batch, torch.Generator().manual_seed(1000 + i)) for i in range(args.eval_batches)
    ]
    results = {}
    for name, modalities in (("mot", 2), ("dense", 1)):
        if name not in args.models:
            continue
        torch.manual_seed(args.seed)
        model = MoTModel(
            args.dim, args.depth, args.heads, train_data.seq_len, train_data.patch_dim, modalities
        ).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
        generator = torch.Generator().manual_seed(args.seed)
        curve = []
        elapsed = 0.0
        for step in progress(range(args.steps), desc=f"mot {name}"):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, args.steps, args.lr)
            batch = [t.to(device) for t in train_data.batch(args.batch, generator)]
            if device.type == "cuda":
                torch.cuda.synchronize()
            tick = time.perf_counter()
            with _autocast(device, args.amp):
                losses = _mot_losses(model, *batch)
                loss = losses["text"] + args.image_weight * losses["image"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed += time.perf_counter() - tick
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                model.eval()
                with torch.no_grad(), _autocast(device, args.amp):
                    vals = [_mot_losses(model, *[t.to(device) for t in vb]) for vb in val_batches]
                model.train()
                curve.append(
                    {
                        "step": step + 1,
                        "seconds": round(elapsed, 2),
                        "val_text_loss": round(sum(v["text"].item() for v in vals) / len(vals), 4),
                        "val_image_mse": round(sum(v["image"].item() for v in vals) / len(vals), 4),
                        "train_text_loss": round(losses["text"].item(), 4),
                        "train_image_mse": round(losses["image"].item(), 4),
                    }
                )
        results[name] = {
            "num_modalities": modalities,
            "params": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(elapsed, 1),
            "seconds_per_step": round(elapsed / args.steps, 4),
            "final": curve[-1],
            "curve": curve,
        }
        log.info("%s: %s", name, curve[-1])
    flops = {}
    from torch.utils.flop_counter import FlopCounterMode

    tokens, patches, modality = (t[:2].to(device) for t in val_batches[0])
    for name, modalities in (("mot", 2), ("dense", 1)):
        model = MoTModel(
            args.dim, args.depth, args.heads, train_data.seq_len, train_data.patch_dim, modalities
        ).to(device)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(tokens, patches, modality)
        flops[name] = counter.get_total_flops() / tokens.numel()
    payload = {
        "experiment": "Mixture-of-Transformers vs dense transformer of equal FLOPs: KJV text + Fashion-MNIST patches",
        "command": _command_line(args),
        "environment": _environment(device),
        "config": _config(args),
        "sequence": {
            "text_bytes": args.text_len,
            "caption_bytes": _MoTData.CAPTION_LEN,
            "image_patches": train_data.num_patches,
            "patch_pixels": train_data.patch_dim,
            "length": train_data.seq_len,
        },
        "forward_flops_per_token": flops,
        "results": results,
    }
    _write(args, "routing_mot", payload)
    return payload


# ----------------------------------------------------------------------------- benchmark


def _measure(
    fn: Callable[[], torch.Tensor], device: torch.device, backward: bool, reps: int, warmup: int
) -> dict:
    """Median milliseconds and peak memory of ``fn`` (and its backward) on ``device``."""
    for _ in range(warmup):
        out = fn()
        if backward:
            out.float().sum().backward()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            tick = time.perf_counter()
        out = fn()
        if backward:
            out.float().sum().backward()
        if device.type == "cuda":
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            times.append(1e3 * (time.perf_counter() - tick))
        del out
    times.sort()
    row = {"ms": round(times[len(times) // 2], 3), "ms_min": round(times[0], 3)}
    if device.type == "cuda":
        row["peak_mib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
    return row


def run_routing_bench(args: argparse.Namespace) -> dict:
    """MoE dispatch and SPT routed FFN against their dense equivalents; write ``routing.json``."""
    device = _device(args)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    rows = []

    def add(
        group: str, name: str, fn: Callable[[], torch.Tensor], params: list[torch.Tensor], extra: dict
    ) -> None:
        for mode in ("forward", "forward_backward"):
            for p in params:
                p.grad = None
            row = {"group": group, "name": name, "mode": mode, **extra}
            try:
                row.update(_measure(fn, device, mode == "forward_backward", args.reps, args.warmup))
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
                torch.cuda.empty_cache()
            rows.append(row)
            log.info("%s", row)

    tokens, c = args.moe_tokens, args.moe_dim
    x = torch.randn(1, tokens, c, device=device, dtype=dtype, requires_grad=True)
    for router in args.moe_routers:
        for dispatch, cf in (("sparse", args.capacity_factor), ("sparse", None), ("dense", None)):
            moe = MoE(
                c,
                args.experts,
                args.top_k,
                router=router,
                hidden=args.expert_hidden,
                capacity_factor=cf,
                dispatch=dispatch,
            )
            moe = moe.to(device, dtype)
            seq = args.moe_seq_len
            xs = x.view(tokens // seq, seq, c)
            attn = None
            if router == "attention":
                attn = torch.softmax(torch.randn(tokens // seq, 4, seq, seq, device=device), -1).to(dtype)
            label = f"moe_{dispatch}" + ("" if dispatch == "dense" else f"_cf{cf}")
            add(
                f"moe_{router}",
                label,
                lambda moe=moe, xs=xs, attn=attn: moe(xs, attn),
                list(moe.parameters()) + [x],
                {
                    "tokens": tokens,
                    "dim": c,
                    "experts": args.experts,
                    "top_k": args.top_k,
                    "expert_hidden": args.expert_hidden,
                },
            )
            del moe
    for hidden, label in (
        (args.top_k * args.expert_hidden, "dense_ffn_equal_active_flops"),
        (args.expert_hidden, "dense_ffn_one_expert"),
    ):
        ffn = nn.Sequential(nn.Linear(c, hidden), nn.GELU(), nn.Linear(hidden, c)).to(device, dtype)
        add(
            "moe_softmax",
            label,
            lambda ffn=ffn, x=x: ffn(x),
            list(ffn.parameters()) + [x],
            {"tokens": tokens, "dim": c, "hidden": hidden},
        )
    del x

    xf = torch.randn(args.ffn_tokens, args.ffn_dim, device=device, dtype=dtype, requires_grad=True)
    for style in ("opt", "llama"):
        top_k = args.ffn_blocks // (2 if style == "opt" else 4)
        routed = RoutedFFN(args.ffn_dim, args.ffn_hidden, args.ffn_blocks, top_k, style=style).to(
            device, dtype
        )
        extra = {
            "tokens": args.ffn_tokens,
            "dim": args.ffn_dim,
            "hidden": args.ffn_hidden,
            "blocks": args.ffn_blocks,
            "top_k": top_k,
        }
        params = list(routed.parameters()) + [xf]
        routed.dispatch = "grouped"
        add(f"routed_ffn_{style}", "routed_grouped", lambda r=routed: r(xf), params, extra)
        masked = RoutedFFN(
            args.ffn_dim, args.ffn_hidden, args.ffn_blocks, top_k, style=style, dispatch="masked"
        )
        masked.load_state_dict(routed.state_dict())
        masked = masked.to(device, dtype)
        add(f"routed_ffn_{style}", "routed_masked_reference", lambda r=masked: r(xf), params, extra)
        add(
            f"routed_ffn_{style}",
            "dense_ffn_equal_width",
            lambda r=routed: r.dense_forward(xf),
            params,
            extra,
        )
        del routed, masked
    summary = {}
    for group in sorted({r["group"] for r in rows}):
        for mode in ("forward", "forward_backward"):
            sel = {r["name"]: r for r in rows if r["group"] == group and r["mode"] == mode and "ms" in r}
            ref = sel.get("dense_ffn_equal_width") or sel.get("moe_dense")
            if ref:
                summary[f"{group}/{mode}"] = {n: round(r["ms"] / ref["ms"], 3) for n, r in sel.items()}
    payload = {
        "benchmark": "routing: MoE dispatch and SPT routed FFN vs dense equivalents",
        "command": _command_line(args),
        "environment": _environment(device),
        "config": _config(args),
        "time_ratio_vs_dense": summary,
        "rows": rows,
    }
    print(f"{'group':<22}{'name':<34}{'mode':<18}{'ms':>10}{'peak MiB':>10}")
    for r in rows:
        print(
            f"{r['group']:<22}{r['name']:<34}{r['mode']:<18}{r.get('ms', float('nan')):>10.3f}{r.get('peak_mib', float('nan')):>10}"
        )
    _write(args, "routing", payload)
    return payload
