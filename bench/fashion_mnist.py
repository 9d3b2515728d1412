"""Fashion-MNIST from scratch, one recipe for FaViT-B0 and its peers; the shipped favit_b0 weights come from here.

FaViT: "Factorization Vision Transformer: Modeling Long Range Dependency with Local Window
Cost", arXiv 2312.08614. Fashion-MNIST: arXiv 1708.07747 (the Debian package
``dataset-fashion-mnist``; 60k train / 10k test images, 28x28, upsampled to 64 px).

Every model is trained by ``zoo train image`` with the same recipe and the same wall-clock
budget: by default all of them at once on one GPU (at 64 px each run is bound by kernel
launches, so they share the card well), each fitting its number of epochs to the budget
after timing its first epoch. Then ``zoo eval image`` (fp32) measures each final model on the
10k test images.

The runs live under ``--work``; ``--out`` receives at most seven files:

- ``fashion_mnist.json``: per model top-1/top-5 (the eval command's row), epochs, images/s,
  time, the per-epoch history and the end of its training log;
- ``favit_b0.fashion_mnist.safetensors`` + ``favit_b0.fashion_mnist.json``: the weights and
  their card (sha256, metrics, training and eval commands, preprocessing) for ``zoo/weights/``;
- ``favit_b0_resume/`` (only if favit_b0 stopped before its planned epochs): its last weights,
  optimizer shards and ``resume.json``; rerun with ``--resume-from OUT_COPY --models favit_b0``.

    python bench/fashion_mnist.py --out $OUT --data-dir DIR --budget-minutes 8.2 --models favit_b0
    # the shipped weights: 56 epochs in 8.2 min alone on an H200 (batch 1024: at 64 px the runs
    # are bound by kernel launches, so a larger batch buys epochs)
    python bench/fashion_mnist.py --out /tmp/fm --smoke         # a few steps on the CPU
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["favit_b0", "pvt_v2_b0", "swin_tiny_patch4_window7_224"]
# keywords a model needs to run at the recipe's resolution (not part of the recipe itself)
MODEL_KWARGS = {"swin_tiny_patch4_window7_224": ["img_size=64"]}
RECIPE = [
    "--dataset", "fashion_mnist",
    "--img-size", "64",
    "-b", "1024",
    "--opt", "adamw", "--lr", "2e-3", "--weight-decay", "0.05",
    "--sched", "cosine", "--warmup-epochs", "3", "--min-lr", "1e-5",
    "--scale", "0.6", "1.0", "--ratio", "0.8", "1.25", "--hflip", "0.5", "--color-jitter", "0",
    "--reprob", "0.2", "--smoothing", "0.1", "--drop-path", "0.1",
    "--channels-last", "--pin-mem",
]  # fmt: skip
RESUME_FILES = ("resume.json", "last.safetensors", "last_ema.safetensors")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the few files to keep")
    p.add_argument("--work", default="/tmp/zoo_fashion_mnist", help="folder of the training runs")
    p.add_argument(
        "--data-dir", default=None, help="folder of the Fashion-MNIST IDX files (default: Debian's)"
    )
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--budget-minutes", type=float, default=6.0, help="training wall time per model")
    p.add_argument("--max-epochs", type=int, default=100, help="upper bound on the fitted epochs")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--workers", type=int, default=None, help="loader workers per run (default: cores / runs)")
    p.add_argument("--sequential", action="store_true", help="train one model after the other")
    p.add_argument("--resume-from", default=None, help="folder holding <model>_resume/ folders to continue")
    p.add_argument(
        "--torchcompile",
        choices=("model", "blocks"),
        default=None,
        help="part of the recipe for every model: torch.compile the model or each repeated block",
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="part of the recipe for every model (default 1024)"
    )
    p.add_argument("--lr", type=float, default=None, help="part of the recipe for every model (default 2e-3)")
    p.add_argument(
        "--smoke", action="store_true", help="a few CPU steps on a few images (checks the plumbing)"
    )
    return p.parse_args(argv)


def recipe(args: argparse.Namespace) -> list[str]:
    """RECIPE with the batch size and learning rate this run asks for."""
    overrides = {"-b": args.batch_size, "--lr": args.lr}
    out = list(RECIPE)
    for flag, value in overrides.items():
        if value is not None:
            out[out.index(flag) + 1] = str(value)
    if args.torchcompile:
        out += ["--torchcompile", args.torchcompile]
    return out


def train_command(
    model: str, run_dir: Path, args: argparse.Namespace, workers: int, resume: bool
) -> list[str]:
    cmd = [sys.executable, "-m", "zoo.vision.train", "-m", model, *recipe(args)]
    if model in MODEL_KWARGS:
        cmd += ["--model-kwargs", *MODEL_KWARGS[model]]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    cmd += ["--out", str(run_dir), "-j", str(workers), "--eval-every", str(args.eval_every)]
    cmd += ["--log-interval", "100"]
    if args.smoke:
        cmd += ["--epochs", "1", "--max-steps", "2", "--num-samples", "32", "--num-val-samples", "32"]
        cmd += ["-b", "8", "--device", "cpu", "--log-interval", "1"]
    else:
        cmd += ["--epochs", str(args.max_epochs), "--time-budget", str(args.budget_minutes)]
        cmd += ["--max-minutes", str(args.budget_minutes + 0.5)]
    if resume:
        cmd += ["--resume", "auto"]
    return cmd


def eval_command(checkpoint: Path, result: Path, args: argparse.Namespace, workers: int) -> list[str]:
    cmd = [sys.executable, "-m", "zoo.vision.validate", "--dataset", "fashion_mnist", "--split", "test"]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    cmd += ["--checkpoint", str(checkpoint), "-b", "500", "-j", str(workers), "--log-freq", "0"]
    cmd += ["--results-file", str(result), "--results-format", "json"]
    if args.smoke:
        cmd += ["--num-samples", "32", "-b", "16", "--device", "cpu"]
    return cmd


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resume_files(run_dir: Path) -> list[Path]:
    files = [run_dir / n for n in RESUME_FILES if (run_dir / n).is_file()]
    return files + sorted(run_dir.glob("optimizer-*-of-*.safetensors"))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    env = dict(os.environ, ZOO_QUIET="0", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    n_parallel = 1 if args.sequential else len(args.models)
    workers = args.workers or max(1, min(8, ((os.cpu_count() or 4) - n_parallel) // n_parallel))
    if args.smoke:
        workers = 0

    runs: dict[str, dict[str, Any]] = {}
    for model in args.models:
        run_dir = work / model
        run_dir.mkdir(parents=True, exist_ok=True)
        resume = False
        if args.resume_from:
            saved = Path(args.resume_from) / f"{model}_resume"
            if (saved / "resume.json").is_file():
                for f in saved.iterdir():
                    shutil.copyfile(f, run_dir / f.name)
                resume = True
        runs[model] = dict(dir=run_dir, cmd=train_command(model, run_dir, args, workers, resume))

    def launch(model: str) -> subprocess.Popen:
        run = runs[model]
        print(
            f"[{time.perf_counter() - started:6.1f}s] train {model}: {shlex.join(run['cmd'][1:])}", flush=True
        )
        log = open(run["dir"] / "train.log", "a")
        return subprocess.Popen(run["cmd"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    if args.sequential:
        for model in args.models:
            runs[model]["rc"] = launch(model).wait()
    else:
        procs = {model: launch(model) for model in args.models}
        for model, proc in procs.items():
            runs[model]["rc"] = proc.wait()
    for model, run in runs.items():
        print(f"[{time.perf_counter() - started:6.1f}s] {model} exited {run['rc']}", flush=True)
        if run["rc"] != 0:
            print((run["dir"] / "train.log").read_text()[-3000:], flush=True)

    rows = []
    for model, run in runs.items():
        row: dict[str, Any] = dict(model=model, train_rc=run["rc"])
        metrics_file = run["dir"] / "metrics.json"
        if metrics_file.is_file():
            m = json.loads(metrics_file.read_text())
            for key in ("top1", "top5", "epochs_done", "epochs_planned", "complete", "updates", "train_images_per_s",
                        "elapsed_s", "param_count", "device", "data_config", "command"):  # fmt: skip
                row[key] = m.get(key)
        weights = run["dir"] / "model.safetensors"
        if weights.is_file():
            result = run["dir"] / "eval.json"
            cmd = eval_command(weights, result, args, max(workers, 0))
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if res.returncode == 0 and result.is_file():
                row["eval"] = json.loads(result.read_text())
                row["eval_command"] = "zoo eval image " + shlex.join(cmd[3:])
            else:
                row["eval_error"] = res.stderr[-2000:]
        if (run["dir"] / "log.csv").is_file():
            with open(run["dir"] / "log.csv") as f:
                row["history"] = list(csv.DictReader(f))
        log_file = run["dir"] / "train.log"
        row["log_tail"] = log_file.read_text()[-4000:] if log_file.is_file() else ""
        rows.append(row)
        brief = {k: v for k, v in row.items() if k not in ("command", "eval_command", "history", "log_tail")}
        print(json.dumps(brief), flush=True)

    favit = next((r for r in rows if r["model"] == "favit_b0" and "eval" in r), None)
    if favit is not None:
        shipped = out / "favit_b0.fashion_mnist.safetensors"
        shutil.copyfile(runs["favit_b0"]["dir"] / "model.safetensors", shipped)
        card = dict(
            arch="favit_b0",
            tag="fashion_mnist",
            file=shipped.name,
            sha256=sha256_of(shipped),
            dataset="Fashion-MNIST (Debian dataset-fashion-mnist; 60k train, metrics on the 10k test images)",
            metrics=dict(top1=favit["eval"]["top1"], top5=favit["eval"]["top5"]),
            config=dict(num_classes=10),
            command=favit.get("command", ""),
            eval_command="zoo eval image --dataset fashion_mnist --split test -m favit_b0.fashion_mnist --pretrained",
            data_config=favit.get("data_config") or {},
            trained=dict(
                epochs=favit.get("epochs_done"),
                complete=favit.get("complete"),
                device=favit.get("device"),
                images_per_s=favit.get("train_images_per_s"),
                seconds=favit.get("elapsed_s"),
                smoke=args.smoke,
            ),
        )
        (out / "favit_b0.fashion_mnist.json").write_text(json.dumps(card, indent=1))
        if not favit.get("complete", True):
            keep = out / "favit_b0_resume"
            keep.mkdir(exist_ok=True)
            for f in resume_files(runs["favit_b0"]["dir"]):
                shutil.copyfile(f, keep / f.name)

    summary = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command="python bench/fashion_mnist.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        budget_minutes_per_model=args.budget_minutes,
        parallel=not args.sequential,
        recipe=" ".join(recipe(args)),
        rows=rows,
        wall_s=round(time.perf_counter() - started, 1),
    )
    (out / "fashion_mnist.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{'model':<32}{'top1':>8}{'top5':>8}{'epochs':>8}{'img/s':>9}{'train s':>9}")
    for r in rows:
        ev = r.get("eval", {})
        print(
            f"{r['model']:<32}{ev.get('top1', float('nan')):>8.2f}{ev.get('top5', float('nan')):>8.2f}"
            f"{str(r.get('epochs_done')):>8}{r.get('train_images_per_s') or 0:>9.0f}{r.get('elapsed_s') or 0:>9.0f}"
        )
    print(f"wrote {out / 'fashion_mnist.json'} in {summary['wall_s']} s")
    return 0 if all(r["train_rc"] == 0 and "eval" in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
