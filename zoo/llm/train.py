"""``zoo train lm``: train the small Llama-style LM on the offline token files, resumably.

Recipe (one GPU, a wall-clock budget): AdamW (betas 0.9/0.95, weight decay 0.1 on matrices),
linear warm-up then cosine decay to 10% over the budget, bf16 autocast on CUDA, gradient
clipping at 1.0, random windows of the training tokens. The last ``long_fraction`` of the budget
trains on ``long_seq_len`` windows (8192) at the same tokens per step, so the model works at the
context the sparse-prefill methods need. A fraction ``needle_prob`` of the windows hides the
sentence ``The secret number is NNNNN.`` and ends with the question and its answer
(:func:`zoo.llm.corpus.needle_tokens`), which teaches retrieval for the needle-in-a-haystack test.

Progress is measured in seconds of training (or in steps with ``max_steps``) and saved with the
model, optimizer and random state every ``checkpoint_every`` seconds to ``out/checkpoint.pt``
(tensors and plain containers only, read back with ``weights_only=True``); rerunning the same
command resumes. At the end the best validation checkpoint is exported:

    out/<arch>.<tag>.safetensors   bf16 weights (the tied head stored once)
    out/<arch>.<tag>.tokenizer.json
    out/<arch>.<tag>.json          record with sha256, validation perplexity (1k and 8k windows), command
    out/metrics.json               the same metrics with the training log

Copy those three ``<arch>.<tag>.*`` files into ``zoo/weights/`` to ship them:
:func:`zoo.llm.model.register_shipped_weights` registers the record.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from zoo.progress import get_logger

__all__ = ["TrainConfig", "evaluate_val", "train_lm"]

log = get_logger("zoo.llm.train")


@dataclass
class TrainConfig:
    data: str
    out: str
    arch: str = "zoo_llama_9m"
    tag: str = "kjv_gcide"
    minutes: float = 7.0
    max_steps: int | None = None  # progress in steps instead of seconds (quick runs, tests)
    seq_len: int = 1024
    long_seq_len: int = 8192
    long_fraction: float = 0.25
    batch_tokens: int = 65536
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: float = 0.03
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    needle_prob: float = 0.5
    eval_every: float = 45.0  # seconds (steps with max_steps)
    eval_tokens: int = 131072
    checkpoint_every: float = 60.0  # seconds (steps with max_steps)
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # architecture config overrides
    init: str | None = None  # weights to start from (continued training) when there is no checkpoint


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _windows(tokens: torch.Tensor, rows: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``rows`` random windows of ``length + 1`` tokens (inputs and shifted targets)."""
    if tokens.numel() < length + 2:
        raise ValueError(
            f"data: expected more than {length + 1} tokens for windows of {length}, got {tokens.numel()}"
        )
    starts = torch.randint(0, tokens.numel() - length - 1, (rows,), generator=generator)
    index = starts[:, None] + torch.arange(length + 1)[None, :]
    return tokens[index]


def _plant_needles(batch: torch.Tensor, tokenizer, prob: float, generator: torch.Generator) -> int:
    """Hide a needle in some rows and end them with question + answer; returns how many."""
    from zoo.llm.corpus import needle_tokens

    planted = 0
    length = batch.shape[1]
    for row in range(batch.shape[0]):
        if float(torch.rand((), generator=generator)) >= prob:
            continue
        number = int(torch.randint(10000, 100000, (), generator=generator))
        needle, question, answer = needle_tokens(tokenizer, number)
        tail = question + answer
        room = length - len(tail) - len(needle)
        if room < 1:
            continue
        at = int(torch.randint(0, room, (), generator=generator))
        batch[row, at : at + len(needle)] = torch.tensor(needle)
        batch[row, length - len(tail) :] = torch.tensor(tail)
        planted += 1
    return planted


def _lr_factor(progress: float, cfg: TrainConfig) -> float:
    if progress < cfg.warmup:
        return max(progress / cfg.warmup, 1e-3)
    t = min(1.0, (progress - cfg.warmup) / max(1e-9, 1.0 - cfg.warmup))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


@torch.no_grad()
def evaluate_val(
    model: torch.nn.Module, tokens: torch.Tensor, seq_len: int, max_tokens: int, device: torch.device
) -> float:
    """Perplexity over consecutive, non-overlapping windows of ``seq_len`` (up to ``max_tokens``)."""
    from zoo.llm.model import sequence_nll

    model.eval()
    windows = min(max_tokens, tokens.numel() - 1) // seq_len
    if windows == 0:  # shorter than one window: the whole stream is the window
        pieces = [tokens]
    else:
        pieces = [tokens[w * seq_len : w * seq_len + seq_len + 1] for w in range(windows)]
    if pieces[0].numel() < 2:
        raise ValueError(f"val: expected at least 2 tokens, got {tokens.numel()}")
    total, count = 0.0, 0
    rows = max(1, 32768 // seq_len)
    for start in range(0, len(pieces), rows):
        ids = torch.stack(pieces[start : start + rows]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            nll, n = sequence_nll(model, ids)
        total, count = total + nll, count + n
    model.train()
    return math.exp(total / max(count, 1))


def _state(model, optimizer, step, progress, best, history, generator) -> dict[str, Any]:
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "step": step,
        "progress": progress,
        "best": best,
        "history": history,
        "torch_rng": torch.get_rng_state(),
        "window_rng": generator.get_state(),
        "python_rng": list(random.getstate()[1]),
    }


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def train_lm(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) and export; returns the metrics written to ``out/metrics.json``."""
    import zoo
    from zoo import checkpoints
    from zoo.llm.corpus import load_token_file, load_tokenizer

    data, out = Path(cfg.data), Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(data / "tokenizer.json")
    train_tokens = torch.from_numpy(load_token_file(data / "train.bin").astype("int64"))
    val_tokens = torch.from_numpy(load_token_file(data / "val.bin").astype("int64"))
    overrides = dict(cfg.overrides)
    overrides.setdefault("vocab_size", tokenizer.get_vocab_size())
    ckpt_path = out / "checkpoint.pt"
    if cfg.init and not ckpt_path.is_file():
        model = zoo.create(cfg.arch, checkpoint=cfg.init, **overrides).to(device)
        log.info("starting from the weights in %s", cfg.init)
    else:
        model = zoo.create(cfg.arch, **overrides).to(device)
    max_context = model.config.max_position_embeddings
    if cfg.long_seq_len > max_context or cfg.seq_len > max_context:
        raise ValueError(
            f"long_seq_len/seq_len: expected at most the context {max_context}, got {cfg.long_seq_len}"
        )
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    step, progress, best, history = 0, 0.0, {"val_ppl": float("inf"), "step": -1}, []
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        step, progress, best, history = state["step"], state["progress"], state["best"], state["history"]
        torch.set_rng_state(state["torch_rng"])
        generator.set_state(state["window_rng"])
        random.setstate((3, tuple(state["python_rng"]), None))
        log.info("resumed from %s at step %d (progress %.3f)", ckpt_path, step, progress)
    best_path = out / "best.safetensors"
    train_model = torch.compile(model) if cfg.compile else model
    budget = float(cfg.max_steps) if cfg.max_steps is not None else cfg.minutes * 60.0
    unit = 1.0 if cfg.max_steps is not None else None
    last_eval = last_ckpt = progress
    model.train()
    log.info(
        "training %s (%.2fM params) on %d tokens, %s budget %.0f %s, device %s",
        cfg.arch,
        sum(p.numel() for p in model.parameters()) / 1e6,
        train_tokens.numel(),
        "step" if unit else "time",
        budget,
        "steps" if unit else "s",
        device,
    )
    tick = time.perf_counter()
    tokens_seen = 0
    while progress < budget:
        fraction = progress / budget
        length = cfg.long_seq_len if fraction >= 1.0 - cfg.long_fraction else cfg.seq_len
        rows = max(1, cfg.batch_tokens // length)
        batch = _windows(train_tokens, rows, length, generator)
        _plant_needles(batch, tokenizer, cfg.needle_prob, generator)
        batch = batch.to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(fraction, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = train_model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        tokens_seen += rows * length
        now = time.perf_counter()
        progress += 1.0 if unit else now - tick
        tick = now
        if (
            progress - last_eval >= (cfg.eval_every if unit is None else max(1.0, cfg.eval_every))
            or progress >= budget
        ):
            val_ppl = evaluate_val(model, val_tokens, cfg.seq_len, cfg.eval_tokens, device)
            history.append(
                {
                    "step": step,
                    "progress": progress,
                    "loss": float(loss.detach()),
                    "val_ppl": val_ppl,
                    "seq_len": length,
                }
            )
            log.info(
                "step %d  loss %.3f  val ppl %.2f  (seq %d, lr %.2e)",
                step,
                float(loss.detach()),
                val_ppl,
                length,
                optimizer.param_groups[0]["lr"],
            )
            # the best weights of the long-context phase are the ones we ship (or the last ones before it)
            if val_ppl < best["val_ppl"] or (
                length == cfg.long_seq_len and best.get("seq_len") != cfg.long_seq_len
            ):
                best = {"val_ppl": val_ppl, "step": step, "seq_len": length}
                checkpoints.save(model.state_dict(), best_path)
            last_eval = progress
            tick = time.perf_counter()  # evaluation time is not training time
        if progress - last_ckpt >= cfg.checkpoint_every or progress >= budget:
            _save_atomic(_state(model, optimizer, step, progress, best, history, generator), ckpt_path)
            last_ckpt = progress
            tick = time.perf_counter()
    return export(cfg, model, tokenizer, val_tokens, best, history, step, device)


def export(cfg: TrainConfig, model, tokenizer, val_tokens, best, history, step, device) -> dict[str, Any]:
    """Write the shipped files from the best checkpoint, with the validation perplexities."""
    from zoo import checkpoints
    from zoo.registry import get_entry, sha256_of

    out = Path(cfg.out)
    best_path = out / "best.safetensors"
    if best_path.is_file():
        checkpoints.load_into(model, checkpoints.load(best_path), strict=True)
    val = {}
    for length in sorted({cfg.seq_len, cfg.long_seq_len}):
        if val_tokens.numel() > length + 1:
            val[f"val_ppl_{length}"] = round(evaluate_val(model, val_tokens, length, 1 << 20, device), 4)
    name = f"{cfg.arch}.{cfg.tag}"
    weights = out / f"{name}.safetensors"
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    checkpoints.save(state, weights, metadata={"arch": cfg.arch, "tag": cfg.tag})
    shutil.copyfile(Path(cfg.data) / "tokenizer.json", out / f"{name}.tokenizer.json")
    meta_path = Path(cfg.data) / "meta.json"
    data_meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    params = sum(p.numel() for p in model.parameters())
    defaults = get_entry(cfg.arch)[0].config
    config_changes = {k: v for k, v in getattr(model, "zoo_config", {}).items() if defaults.get(k) != v}
    command = "zoo train lm " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["train", "lm"] else "zoo train lm"
    metrics = {"params": params, "steps": step, "best_step": best.get("step"), **val}
    record = {
        "kind": "zoo.llm.pretrained",
        "arch": cfg.arch,
        "tag": cfg.tag,
        "file": weights.name,
        "sha256": sha256_of(weights),
        "dataset": "+".join(data_meta.get("sources", ["offline text"])),
        "metrics": metrics,
        "config": config_changes,
        "command": command,
        "extra": {"tokenizer": f"{name}.tokenizer.json", "train_tokens": data_meta.get("train_tokens")},
    }
    (out / f"{name}.json").write_text(json.dumps(record, indent=1))
    summary = {
        **metrics,
        "weights_mb": round(weights.stat().st_size / 1e6, 2),
        "history": history,
        "config": asdict(cfg),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    log.info("exported %s (%.1f MB): %s", weights, weights.stat().st_size / 1e6, val)
    return summary
