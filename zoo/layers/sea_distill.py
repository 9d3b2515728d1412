"""Distilling a SEA student from a dense teacher: the recipe behind ``zoo train distill-sea``.

Paper: Heejun Lee, Jina Kim, Jeffrey Willette, Sung Ju Hwang, "SEA: Sparse Linear Attention with
Estimated Attention Mask", ICLR 2024, arXiv 2310.01777 (section 3.3, training by distillation).

Recipe:

1. Teacher: a small byte-level causal transformer (``ByteLM``, dense softmax attention through
   ``scaled_dot_product_attention``) trained here on offline English text (the King James Bible
   of the Debian ``bible-kjv-text`` package, or any text file given) for a fixed time.
2. Student: the same network with every attention replaced by a causal ``SEAAttention``
   initialised from the teacher's projections (gates start open, so the student starts as
   sparse attention on an untrained mask).
3. Distillation: task loss (next-byte cross entropy) plus, per layer, the SEA terms
   (``sea_distillation_loss``): estimated vs teacher attention per compressed column, the
   student's full attention vs the teacher's, and the student's context vs the teacher's.
4. Report: held-out perplexity of teacher and student, and the attention memory of one layer
   (teacher: the N x N probabilities of eager attention; student: the estimated N x T map plus
   the kept entries), counted and, on a GPU, measured as peak allocation.

``ByteLM`` is also the q/k/v source of ``zoo.layers.approx_eval`` for real attention.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo import datasets
from zoo.layers.sea import SEAAttention, sea_distillation_loss
from zoo.progress import get_logger

__all__ = [
    "ByteLM",
    "DenseCausalAttention",
    "DistillConfig",
    "LMConfig",
    "PeakLiveBytes",
    "byte_batches",
    "evaluate_perplexity",
    "load_text_corpus",
    "make_sea_student",
    "run_distillation",
    "train_lm",
]

log = get_logger("zoo.layers.sea_distill")


# ----------------------------------------------------------------------------- data
def load_text_corpus(path: str | os.PathLike | None = None) -> bytes:
    """Offline English text as bytes.

    ``path`` if given; else the King James Bible (:func:`zoo.datasets.kjv_bytes`, from the Debian
    ``bible-kjv-text`` package, cached); else the GCIDE dictionary (:func:`zoo.datasets.gcide_text`,
    ``dict-gcide``). Raises FileNotFoundError naming the packages otherwise.
    """
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"text: no such file {p}")
        data = p.read_bytes()
        if len(data) < 10_000:
            raise ValueError(f"text: {p} has {len(data)} bytes; need at least 10000")
        return data
    try:
        return datasets.kjv_bytes()
    except FileNotFoundError as no_kjv:
        try:
            return datasets.gcide_text().encode("utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(
                "text: no offline corpus found; install the Debian package bible-kjv-text (or dict-gcide), "
                "or pass a text file"
            ) from no_kjv


def byte_batches(data: Tensor, batch: int, length: int, generator: torch.Generator) -> Tensor:
    """Random windows (batch, length + 1) of a uint8 corpus tensor."""
    starts = torch.randint(0, data.numel() - length - 1, (batch,), generator=generator)
    return torch.stack([data[s : s + length + 1] for s in starts.tolist()]).long()


# ----------------------------------------------------------------------------- model
class DenseCausalAttention(nn.Module):
    """Causal softmax attention through ``F.scaled_dot_product_attention`` (what the teacher uses).

    With ``record = True`` the last call keeps its attention probabilities (B, H, N, N) and
    pre-projection context (B, N, C) for distillation.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(dim, 2 * self.num_kv_heads * self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.record = False
        self.last_probs: Tensor | None = None
        self.last_context: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q = self.q_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(x).view(B, N, 2, self.num_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads
        )
        ctx = out.transpose(1, 2).reshape(B, N, C)
        if self.record:
            G = self.num_heads // self.num_kv_heads
            logits = (q @ k.repeat_interleave(G, 1).transpose(-1, -2)) * self.head_dim**-0.5
            causal = torch.ones(N, N, dtype=torch.bool, device=x.device).triu(1)
            self.last_probs = torch.softmax(logits.float().masked_fill(causal, float("-inf")), -1)
            self.last_context = ctx
        return self.proj(ctx)


class _Block(nn.Module):
    def __init__(self, dim: int, attn: nn.Module) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = attn
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@dataclass
class LMConfig:
    dim: int = 256
    depth: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    max_len: int = 1024


class ByteLM(nn.Module):
    """A byte-level causal transformer: embeddings, pre-norm blocks, tied output head."""

    def __init__(self, config: LMConfig, attention_factory=None) -> None:
        super().__init__()
        self.config = config
        make = attention_factory or (
            lambda: DenseCausalAttention(config.dim, config.num_heads, config.num_kv_heads)
        )
        self.embed = nn.Embedding(256, config.dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos = nn.Parameter(0.02 * torch.randn(config.max_len, config.dim))
        self.blocks = nn.ModuleList([_Block(config.dim, make()) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, tokens: Tensor) -> Tensor:
        N = tokens.shape[1]
        if N > self.config.max_len:
            raise ValueError(f"ByteLM: sequence length {N} exceeds max_len {self.config.max_len}")
        x = self.embed(tokens) + self.pos[:N]
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module, data: Tensor, length: int, windows: int, batch: int, device
) -> float:
    """exp(mean next-byte cross entropy) over ``windows`` fixed windows of a held-out corpus."""
    model.eval()
    stride = max(1, (data.numel() - length - 1) // windows)
    starts = [i * stride for i in range(windows)]
    total, count = 0.0, 0
    for s in range(0, len(starts), batch):
        chunk = torch.stack([data[p : p + length + 1] for p in starts[s : s + batch]]).long().to(device)
        logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


def _lr(step: int, total: int, peak: float, warmup: int = 50, progress: float = 0.0) -> float:
    """Linear warm-up, then cosine decay over max(step / total, progress) (progress: share of the time budget)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    done = max((step - warmup) / max(1, total - warmup), progress)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def train_lm(
    model: ByteLM,
    data: Tensor,
    *,
    seconds: float,
    max_steps: int,
    batch: int,
    length: int,
    lr: float,
    device,
    seed: int = 0,
) -> dict:
    """Train for ``seconds`` of wall clock or ``max_steps`` (the cosine schedule assumes max_steps)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    start, step, loss_val = time.perf_counter(), 0, float("nan")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if str(device).startswith("cuda") else _null()
    while step < max_steps and time.perf_counter() - start < seconds:
        for g in opt.param_groups:
            g["lr"] = _lr(step, max_steps, lr, progress=(time.perf_counter() - start) / seconds)
        tokens = byte_batches(data, batch, length, gen).to(device)
        with autocast:
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_val = loss.item() if step % 20 == 0 else loss_val
        if step % 200 == 0:
            log.info("lm step %d loss %.3f (%.0f s)", step, loss.item(), time.perf_counter() - start)
        step += 1
    return {"steps": step, "seconds": round(time.perf_counter() - start, 1), "last_loss": loss_val}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------- student
def make_sea_student(
    teacher: ByteLM, *, k: int, compressed_len: int, gate_init: float = 3.0, output_norm: bool = False
) -> ByteLM:
    """The teacher's network with causal SEA attention, projections copied from the teacher."""
    cfg = teacher.config
    student = ByteLM(
        cfg,
        attention_factory=lambda: SEAAttention(
            cfg.dim,
            cfg.num_heads,
            cfg.num_kv_heads,
            causal=True,
            k=k,
            compressed_len=compressed_len,
            max_len=cfg.max_len,
            output_norm=output_norm,
            gate_init=gate_init,
        ),
    )
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected:
        raise ValueError(f"make_sea_student: teacher keys not in the student: {unexpected}")
    return student


def _attention_modules(model: ByteLM) -> list[nn.Module]:
    return [block.attn for block in model.blocks]


def distill_step_losses(student: ByteLM, teacher: ByteLM, tokens: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Task loss + summed SEA terms over layers for one batch of (B, N + 1) tokens."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    t_attn = _attention_modules(teacher)
    with torch.no_grad():
        for m in t_attn:
            m.record = True
        teacher(inputs)
        for m in t_attn:
            m.record = False
    details, contexts, logits_full = [], [], []
    # the student layer by layer, keeping what the SEA terms need
    x = student.embed(inputs) + student.pos[: inputs.shape[1]]
    for block in student.blocks:
        h = block.norm1(x)
        sea: SEAAttention = block.attn
        B, N, C = h.shape
        q, k, v = sea.project_qkv(h)
        d = sea.attend(q, k, v, return_details=True)
        ctx = d.output.transpose(1, 2).reshape(B, N, C)
        if sea.output_norm is not None:
            ctx = sea.output_norm(ctx) + ctx
        G = sea.num_heads // sea.num_kv_heads
        logits = (q @ k.repeat_interleave(G, 1).transpose(-1, -2)) * sea.head_dim**-0.5
        logits = logits.masked_fill(
            torch.ones(N, N, dtype=torch.bool, device=h.device).triu(1), float("-inf")
        )
        details.append(d)
        contexts.append(ctx)
        logits_full.append(logits)
        x = x + sea.proj(ctx)
        x = x + block.mlp(block.norm2(x))
    out = student.norm(x) @ student.embed.weight.T
    task = F.cross_entropy(out.float().flatten(0, 1), targets.flatten())
    total = task
    parts = {"task": task.item()}
    for d, ctx, lg, tm in zip(details, contexts, logits_full, t_attn):
        terms = sea_distillation_loss(
            d, tm.last_probs, causal=True, student_logits=lg, context=ctx, teacher_context=tm.last_context
        )
        for name, value in terms.items():
            total = total + value
            parts[name] = parts.get(name, 0.0) + value.item()
    return total, parts


# ----------------------------------------------------------------------------- memory
def attention_memory_elements(n: int, heads: int, compressed_len: int, kept_per_query: float) -> dict:
    """Elements of attention state per layer: dense N x N probabilities vs SEA's map + kept entries."""
    dense = heads * n * n
    sea = heads * n * compressed_len + heads * n * kept_per_query
    return {"dense": dense, "sea": sea, "ratio": sea / dense}


class PeakLiveBytes:
    """Peak bytes of the tensors created inside the ``with`` block and still referenced, on any device.

    A ``TorchDispatchMode`` sees every tensor an operator returns; a storage counts from the first
    tensor that holds it until the last such tensor is gone. Inputs made before the block (weights,
    q/k/v) are not counted; neither is what autograd keeps only inside C++ (use it under no_grad).
    This is the CPU counterpart of ``torch.cuda.max_memory_allocated`` for one call.
    """

    def __init__(self) -> None:
        self.peak = 0
        self.largest: tuple[int, tuple[int, ...]] = (0, ())  # bytes and shape of the largest storage

    def __enter__(self) -> PeakLiveBytes:
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        sizes: dict[int, int] = {}
        holders: dict[int, int] = {}
        now = [0]

        def release(ptr: int) -> None:
            holders[ptr] -= 1
            if holders[ptr] == 0:
                now[0] -= sizes.pop(ptr)
                del holders[ptr]

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = {
                    t.untyped_storage().data_ptr()
                    for t in tree_flatten((args, kwargs))[0]
                    if isinstance(t, Tensor)
                }
                for t in tree_flatten(out)[0]:
                    if not isinstance(t, Tensor):
                        continue
                    ptr = t.untyped_storage().data_ptr()
                    if ptr not in sizes:
                        if ptr in inputs:
                            continue  # an in-place result or a view of memory made before the block
                        sizes[ptr], holders[ptr] = t.untyped_storage().nbytes(), 0
                        now[0] += sizes[ptr]
                        tracker.peak = max(tracker.peak, now[0])
                        if sizes[ptr] > tracker.largest[0]:
                            tracker.largest = (sizes[ptr], tuple(t.shape))
                    holders[ptr] += 1
                    weakref.finalize(t, release, ptr)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def _peak_bytes(fn, x: Tensor) -> int | None:
    """Peak bytes allocated by one no-grad call beyond what existed before (CUDA allocator stats, or
    ``PeakLiveBytes`` elsewhere); None when it runs out of memory."""
    try:
        with torch.no_grad():
            fn(x)  # warm up
            if x.is_cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn(x)
                torch.cuda.synchronize()
                return torch.cuda.max_memory_allocated() - base
            with PeakLiveBytes() as tracker:
                fn(x)
            return tracker.peak
    except torch.OutOfMemoryError:
        return None
    finally:
        if x.is_cuda:
            torch.cuda.empty_cache()


def measure_attention_peak_memory(
    config: LMConfig,
    lengths: list[int],
    *,
    k: int,
    compressed_len: int,
    batch: int,
    device,
    cpu_max_len: int = 2048,
) -> list[dict]:
    """Peak bytes of one attention layer forward (no grad) per length: eager dense (the N x N
    probabilities materialised, as the SEA paper's baseline), SDPA (flash on a GPU), and SEA (fresh
    layers: memory depends on shapes and the budget, not on the weights). CUDA: allocator peak;
    CPU: ``PeakLiveBytes``, lengths up to ``cpu_max_len`` only."""
    H, hd, dim = config.num_heads, config.dim // config.num_heads, config.dim
    dense = DenseCausalAttention(dim, H, config.num_kv_heads).to(device).eval()
    cuda = str(device).startswith("cuda")
    rows = []
    for n in lengths:
        if not cuda and n > cpu_max_len:
            continue
        sea = SEAAttention(dim, H, config.num_kv_heads, causal=True, k=k, compressed_len=compressed_len,
                           max_len=n, output_norm=False).to(device).eval()  # fmt: skip
        x = torch.randn(batch, n, dim, device=device)

        def eager(h):
            B, N, C = h.shape
            q = dense.q_proj(h).view(B, N, H, hd).transpose(1, 2)
            kk, v = dense.kv_proj(h).view(B, N, 2, dense.num_kv_heads, hd).permute(2, 0, 3, 1, 4)
            G = H // dense.num_kv_heads
            s = (q @ kk.repeat_interleave(G, 1).transpose(-1, -2)) * hd**-0.5
            s = s.masked_fill(torch.ones(N, N, dtype=torch.bool, device=h.device).triu(1), float("-inf"))
            ctx = torch.softmax(s, -1) @ v.repeat_interleave(G, 1)
            return dense.proj(ctx.transpose(1, 2).reshape(B, N, C))

        row = {"N": n, "batch": batch, "measured_by": "cuda allocator" if cuda else "PeakLiveBytes (cpu)"}
        for name, fn in (("teacher_eager", eager), ("teacher_sdpa", dense), ("student_sea", sea)):
            row[name] = _peak_bytes(fn, x)
        if row.get("teacher_eager") and row.get("student_sea"):
            row["ratio_sea_vs_eager"] = round(row["student_sea"] / row["teacher_eager"], 4)
        if row.get("teacher_sdpa") and row.get("student_sea"):
            row["ratio_sea_vs_sdpa"] = round(row["student_sea"] / row["teacher_sdpa"], 4)
        rows.append(row)
        del sea, x
    return rows


# ----------------------------------------------------------------------------- the command
@dataclass
class DistillConfig:
    lm: LMConfig = field(default_factory=LMConfig)
    length: int = 1024
    batch: int = 16
    teacher_seconds: float = 120.0
    teacher_steps: int = 3000
    teacher_lr: float = 1e-3
    student_seconds: float = 120.0
    student_steps: int = 1500
    student_lr: float = 3e-4
    student_batch: int = 8
    k: int = 64
    compressed_len: int = 256
    eval_windows: int = 64
    seed: int = 0


def run_distillation(
    cfg: DistillConfig,
    out_dir: str | os.PathLike,
    *,
    device: str = "cpu",
    text: str | None = None,
    teacher_checkpoint: str | None = None,
) -> dict:
    """Train (or load) the teacher, distill the SEA student, write ``distill_sea.json`` and weights."""
    from zoo import checkpoints

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if str(device).startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 student
    raw = torch.frombuffer(bytearray(load_text_corpus(text)), dtype=torch.uint8)
    split = int(0.95 * raw.numel())
    train_data, val_data = raw[:split], raw[split:]
    if cfg.length > cfg.lm.max_len:
        raise ValueError(f"length {cfg.length} exceeds the model's max_len {cfg.lm.max_len}")
    teacher = ByteLM(cfg.lm).to(device)
    result: dict = {"config": asdict(cfg), "device": str(device), "corpus_bytes": int(raw.numel())}
    if str(device).startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name(0)
    if teacher_checkpoint:
        checkpoints.load_into(teacher, teacher_checkpoint)
        result["teacher_training"] = {"checkpoint": str(teacher_checkpoint)}
    else:
        log.info("training the dense teacher for up to %.0f s", cfg.teacher_seconds)
        result["teacher_training"] = train_lm(
            teacher,
            train_data,
            seconds=cfg.teacher_seconds,
            max_steps=cfg.teacher_steps,
            batch=cfg.batch,
            length=cfg.length,
            lr=cfg.teacher_lr,
            device=device,
            seed=cfg.seed,
        )
        checkpoints.save(teacher.state_dict(), out / "teacher.safetensors")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    ppl_teacher = evaluate_perplexity(teacher, val_data, cfg.length, cfg.eval_windows, 8, device)
    student = make_sea_student(teacher, k=cfg.k, compressed_len=cfg.compressed_len).to(device)
    ppl_student_init = evaluate_perplexity(student, val_data, cfg.length, cfg.eval_windows, 8, device)
    log.info("teacher ppl %.3f, student before distillation %.3f", ppl_teacher, ppl_student_init)

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.student_lr, weight_decay=0.0)
    student.train()
    start, step, parts = time.perf_counter(), 0, {}
    while step < cfg.student_steps and time.perf_counter() - start < cfg.student_seconds:
        elapsed = (time.perf_counter() - start) / cfg.student_seconds
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.student_steps, cfg.student_lr, warmup=20, progress=elapsed)
        tokens = byte_batches(train_data, cfg.student_batch, cfg.length, gen).to(device)
        loss, parts = distill_step_losses(student, teacher, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            log.info("distill step %d %s", step, {k: round(v, 4) for k, v in parts.items()})
        step += 1
    result["student_training"] = {
        "steps": step,
        "seconds": round(time.perf_counter() - start, 1),
        "last_losses": {k: round(v, 5) for k, v in parts.items()},
    }
    ppl_student = evaluate_perplexity(student, val_data, cfg.length, cfg.eval_windows, 8, device)
    kept = _mean_kept(student, val_data, cfg.length, device)
    mem = attention_memory_elements(cfg.length, cfg.lm.num_heads, cfg.compressed_len, kept)
    result.update(
        {
            "perplexity": {
                "teacher": round(ppl_teacher, 4),
                "student_before": round(ppl_student_init, 4),
                "student": round(ppl_student, 4),
                "student_over_teacher": round(ppl_student / ppl_teacher, 4),
                "within_10_percent": ppl_student <= 1.1 * ppl_teacher,
            },
            "attention_memory_elements_per_layer": mem,
            "mean_kept_keys_per_query": round(kept, 2),
            "attention_peak_bytes": measure_attention_peak_memory(
                cfg.lm,
                [cfg.length * f for f in (1, 2, 4, 8)],
                k=cfg.k,
                compressed_len=cfg.compressed_len,
                batch=4,
                device=device,
            ),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "torch": torch.__version__,
        }
    )
    checkpoints.save(student.state_dict(), out / "student_sea.safetensors")
    (out / "distill_sea.json").write_text(json.dumps(result, indent=1, default=str))
    return result


@torch.no_grad()
def _mean_kept(student: ByteLM, data: Tensor, length: int, device) -> float:
    tokens = data[: length + 1].long().to(device).unsqueeze(0)
    x = student.embed(tokens[:, :-1]) + student.pos[:length]
    kept = []
    for block in student.blocks:
        h = block.norm1(x)
        sea: SEAAttention = block.attn
        q, k, v = sea.project_qkv(h)
        kept.append(sea.attend(q, k, v, return_details=True).kept_keys.float().mean().item())
        x = block(x)
    return sum(kept) / len(kept)
