"""``zoo train text``: train PoNet (or a baseline mixer at the same size) on an LRA-style task.

The recipe follows PoNet's LRA code (``examples/LRA/code/lra_config.py``): Adam(W) with linear
warm-up then linear decay to zero, cross-entropy, evaluation on the validation split every
``eval_every`` steps, and the test split scored once at the end with the weights of the best
validation step (what LRA reports). Mixed precision is bf16 autocast on CUDA. ListOps departs
from that config's 5000 steps at learning rate 1e-4, after which both PoNet and the Transformer
were still near 22% on our generated data: 16000 steps at 5e-4 reach the published ~37%.

Several mixers (``--mixer ponet,sdpa,fnet``) run one after another with the same data order,
steps and learning rate: the "equal budget" comparison. Each run writes under ``--out``:

- ``<task>_<mixer>/checkpoint.pt``: model, optimiser and step, saved at every evaluation
  (``--resume`` continues from it; the data order is a function of the step, so a resumed run
  sees the batches a straight run would);
- ``<task>_<mixer>/best.safetensors``: weights of the best validation step;
- ``<task>_<mixer>/results.json``: config, accuracies, time, throughput, peak memory, history;

and ``--out/<task>_summary.json`` gathers the runs. ``--tag NAME`` also writes
``<arch>.<NAME>.safetensors`` (``NAME_<mixer>`` for the baselines) and a ``text_tags.json`` entry (sha256, metrics, command) ready to
be copied into ``zoo/weights``.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from zoo.progress import get_logger, progress

__all__ = ["TASK_PRESETS", "TrainConfig", "evaluate", "parse_options", "train", "train_many"]

log = get_logger("zoo.text.train")

# per-task defaults: LRA's batch sizes; step counts and learning rates sized for a few GPU minutes
TASK_PRESETS: dict[str, dict[str, Any]] = {
    "listops": dict(batch_size=32, lr=5e-4, warmup=1000, steps=16000, eval_every=1000),
    "image": dict(batch_size=256, lr=5e-4, warmup=500, steps=6000, eval_every=500),
    "text": dict(batch_size=32, lr=2e-4, warmup=1000, steps=5000, eval_every=500),
    "retrieval": dict(batch_size=32, lr=2e-4, warmup=1000, steps=5000, eval_every=500),
    "pathfinder": dict(batch_size=256, lr=5e-4, warmup=500, steps=6000, eval_every=500),
}


@dataclass
class TrainConfig:
    task: str = "listops"
    model: str = ""  # registered name; default: the task's model
    mixer: str = "ponet"
    out: str = "runs/text"
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    warmup: int | None = None
    eval_every: int | None = None
    weight_decay: float = 0.0
    eval_batches: int | None = None  # validation batches per evaluation (None: whole split)
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    num_workers: int = 2
    max_minutes: float | None = None  # stop training (and say so) after this long
    resume: bool = False
    tag: str | None = None
    command: str = ""  # the command line, recorded in the results
    task_options: dict[str, Any] = field(default_factory=dict)
    model_options: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        preset = TASK_PRESETS.get(self.task, {})
        values = asdict(self)
        for key, value in preset.items():
            if values.get(key) is None:
                values[key] = value
        return TrainConfig(**values)


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``["num_train=64", "closing_brackets=true"]`` -> ``{"num_train": 64, "closing_brackets": True}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"option: expected KEY=VALUE, got {item!r}")
        low = raw.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        elif low in ("none", "null"):
            out[key] = None
        else:
            try:
                out[key] = int(raw)
            except ValueError:
                try:
                    out[key] = float(raw)
                except ValueError:
                    out[key] = raw
    return out


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _batches(
    num_examples: int, batch_size: int, seed: int, start_step: int, steps: int
) -> Iterator[list[int]]:
    """Index lists for steps ``start_step .. steps-1``: a fresh permutation per epoch, seeded by epoch."""
    per_epoch = max(1, num_examples // batch_size)
    perm_epoch, perm = -1, None
    for step in range(start_step, steps):
        epoch, pos = divmod(step, per_epoch)
        if epoch != perm_epoch:
            perm_epoch, perm = epoch, np.random.default_rng((seed, epoch)).permutation(num_examples)
        yield perm[pos * batch_size : (pos + 1) * batch_size].tolist()


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], pair: bool):
    if pair:
        return model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["input_ids_2"],
            batch["attention_mask_2"],
            batch["labels"],
        )
    return model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])


def _autocast(device: torch.device, amp: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    pair: bool = False,
    amp: bool = True,
    max_batches: int | None = None,
    desc: str = "eval",
) -> dict[str, float]:
    """Accuracy and mean cross-entropy over ``loader`` (at most ``max_batches`` batches)."""
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for i, batch in enumerate(progress(loader, desc=desc, total=len(loader))):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with _autocast(device, amp):
            out = _forward(model, batch, pair)
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
        loss_sum += float(out.loss) * len(batch["labels"])
    model.train(was_training)
    return {"acc": correct / max(total, 1), "loss": loss_sum / max(total, 1), "examples": total}


def _lr_lambda(warmup: int, steps: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return factor


def _environment(device: torch.device) -> dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:  # pragma: no cover - CPU-only installs
        pass
    return env


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train one model on one task; returns (and writes) its results dict."""
    import zoo
    from zoo import checkpoints
    from zoo.registry import sha256_of
    from zoo.text.lra import collate, get_task

    cfg = cfg.resolved()
    device = _device(cfg.device)
    task = get_task(cfg.task, **cfg.task_options)
    arch = cfg.model or task.model
    run_dir = Path(cfg.out) / f"{cfg.task}_{cfg.mixer}"
    run_dir.mkdir(parents=True, exist_ok=True)
    # data first: ListOps generation forks worker processes, best before CUDA is initialised
    train_set, val_set, test_set = (task.split(s) for s in ("train", "val", "test"))
    torch.manual_seed(cfg.seed)
    model_options = dict(cfg.model_options)
    model_options.setdefault("mixer", cfg.mixer)
    model = zoo.create(arch, **model_options).to(device)
    model_cfg = dict(getattr(model, "zoo_config", {}))
    if model_cfg.get("max_position_embeddings", task.max_length) < task.max_length:
        raise ValueError(
            f"model {arch}: max_position_embeddings {model_cfg['max_position_embeddings']} < task length {task.max_length}"
        )
    if model_cfg.get("vocab_size", task.vocab_size) < task.vocab_size:
        raise ValueError(
            f"model {arch}: vocab_size {model_cfg['vocab_size']} < task vocabulary {task.vocab_size}"
        )

    if len(train_set) < cfg.batch_size:
        raise ValueError(f"batch_size: {cfg.batch_size} is larger than the training split ({len(train_set)})")

    def loader(dataset, batch_sampler=None, shuffle=False):
        kwargs: dict[str, Any] = dict(
            collate_fn=functools.partial(collate, max_length=task.max_length),
            num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda",
        )
        if cfg.num_workers > 0:
            kwargs["persistent_workers"] = False
        if batch_sampler is not None:
            return DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
        return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=shuffle, **kwargs)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup, cfg.steps))
    start_step, best_val, history = 0, -1.0, []
    ckpt_path = run_dir / "checkpoint.pt"
    if cfg.resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, best_val = int(state["step"]), float(state["best_val"])
        history = (
            json.loads((run_dir / "history.json").read_text()) if (run_dir / "history.json").is_file() else []
        )
        log.info("resumed %s at step %d", run_dir.name, start_step)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    batches = _batches(len(train_set), cfg.batch_size, cfg.seed, start_step, cfg.steps)
    train_loader = loader(train_set, batch_sampler=list(batches))
    val_loader, test_loader = loader(val_set), loader(test_set)
    started = time.perf_counter()
    train_time = 0.0
    stopped_by_time = False
    step = start_step
    running, seen = 0.0, 0
    bar = progress(train_loader, desc=f"{cfg.task}/{cfg.mixer}", total=cfg.steps - start_step, unit="step")
    tick = time.perf_counter()
    for batch in bar:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with _autocast(device, cfg.amp):
            out = _forward(model, batch, task.pair)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        running = running + out.loss.detach()  # no host sync per step
        seen += 1
        over_time = cfg.max_minutes is not None and time.perf_counter() - started > 60 * cfg.max_minutes
        if step % cfg.eval_every == 0 or step == cfg.steps or over_time:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_time += time.perf_counter() - tick
            val = evaluate(model, val_loader, device, task.pair, cfg.amp, cfg.eval_batches, desc="val")
            entry = {
                "step": step,
                "train_loss": float(running) / max(seen, 1),
                "val_acc": val["acc"],
                "val_loss": val["loss"],
            }
            history.append(entry)
            running, seen = 0.0, 0
            log.info(
                "%s step %d: train loss %.4f, val acc %.4f",
                run_dir.name,
                step,
                entry["train_loss"],
                val["acc"],
            )
            if val["acc"] > best_val:
                best_val = val["acc"]
                checkpoints.save(model.state_dict(), run_dir / "best.safetensors")
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "best_val": best_val,
                },
                ckpt_path,
            )
            (run_dir / "history.json").write_text(json.dumps(history))
            tick = time.perf_counter()
        if over_time:
            stopped_by_time = step < cfg.steps
            break

    best = checkpoints.load(run_dir / "best.safetensors")
    checkpoints.load_into(model, best)
    test = evaluate(model, test_loader, device, task.pair, cfg.amp, desc="test")
    steps_done = step - start_step
    results: dict[str, Any] = {
        "task": task.describe(),
        "model": arch,
        "mixer": cfg.mixer,
        "params": sum(p.numel() for p in model.parameters()),
        "model_config": model_cfg,
        "train_config": {k: v for k, v in asdict(cfg).items() if k not in ("resume", "command")},
        "steps": step,
        "stopped_by_time": stopped_by_time,
        "best_val_acc": best_val,
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        "test_examples": test["examples"],
        "train_time_s": train_time,
        "train_steps_per_s": steps_done / train_time if train_time > 0 else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "environment": _environment(device),
        "command": cfg.command,
        "history": history,
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    if cfg.tag:
        results["tag"] = _write_tag(cfg, arch, run_dir, results, sha256_of)
        (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    log.info("%s: test acc %.4f (best val %.4f), %d steps", run_dir.name, test["acc"], best_val, step)
    return results


def _write_tag(
    cfg: TrainConfig, arch: str, run_dir: Path, results: dict[str, Any], sha256_of
) -> dict[str, Any]:
    """Copy the best weights to ``<out>/<arch>.<tag>.safetensors`` and add a ``text_tags.json`` entry."""
    out = Path(cfg.out)
    tag = cfg.tag if cfg.mixer == "ponet" else f"{cfg.tag}_{cfg.mixer}"
    file = f"{arch}.{tag}.safetensors"
    shutil.copyfile(run_dir / "best.safetensors", out / file)
    size_mb = os.path.getsize(out / file) / 2**20
    if size_mb >= 20:
        log.warning("%s is %.1f MB: too large to ship (< 20 MB)", file, size_mb)
    config = {k: v for k, v in cfg.model_options.items()}
    if cfg.mixer != "ponet":
        config["mixer"] = cfg.mixer
    entry = {
        "arch": arch,
        "tag": tag,
        "file": file,
        "sha256": sha256_of(out / file),
        "dataset": f"zoo.text.lra {cfg.task} ({json.dumps(cfg.task_options) if cfg.task_options else 'defaults'})",
        "metrics": {
            "test_acc": round(100 * results["test_acc"], 2),
            "val_acc": round(100 * results["best_val_acc"], 2),
        },
        "config": config,
        "command": results["command"],
    }
    manifest = out / "text_tags.json"
    entries = json.loads(manifest.read_text()) if manifest.is_file() else []
    entries = [e for e in entries if (e["arch"], e["tag"]) != (arch, tag)] + [entry]
    manifest.write_text(json.dumps(entries, indent=1))
    return entry


def train_many(cfg: TrainConfig, mixers: list[str]) -> dict[str, Any]:
    """The same recipe for each mixer in turn; writes ``<out>/<task>_summary.json``."""
    runs = {}
    for mixer in mixers:
        one = TrainConfig(**{**asdict(cfg), "mixer": mixer})
        runs[mixer] = train(one)
    summary = {
        "task": cfg.task,
        "runs": {
            m: {
                k: r[k]
                for k in (
                    "model",
                    "params",
                    "steps",
                    "stopped_by_time",
                    "best_val_acc",
                    "test_acc",
                    "train_steps_per_s",
                    "peak_memory_gb",
                )
            }
            for m, r in runs.items()
        },
    }
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / f"{cfg.task}_summary.json").write_text(json.dumps(summary, indent=1))
    width = max(len(m) for m in runs) + 2
    print(
        f"{'mixer':<{width}}{'params':>9}{'steps':>7}{'val acc':>9}{'test acc':>9}{'steps/s':>9}{'mem GB':>8}"
    )
    for m, r in summary["runs"].items():
        sps = r["train_steps_per_s"]
        mem = r["peak_memory_gb"]
        print(
            f"{m:<{width}}{r['params']:>9}{r['steps']:>7}{100 * r['best_val_acc']:>9.2f}{100 * r['test_acc']:>9.2f}"
            f"{(f'{sps:.1f}' if sps else '-'):>9}{(f'{mem:.2f}' if mem is not None else '-'):>8}"
        )
    return summary
