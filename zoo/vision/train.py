"""Image-classifier training with timm's factories: ``zoo train image`` / ``python -m zoo.vision.train``.

Trains FaViT (arXiv 2312.08614; zoo names ``favit_b0`` ..) or any timm model, the recipe of
timm's train.py cut to what our runs use:

- data: ``timm.data.create_dataset`` trees or Fashion-MNIST (``zoo.vision.data``), timm's
  ``create_loader`` (``create_transform`` train/eval transforms, GPU prefetcher, random
  erasing) and ``Mixup`` / ``FastCollateMixup`` with label smoothing;
- optimisation: ``create_optimizer_v2`` (no weight decay on norms, biases and
  ``no_weight_decay()``), ``create_scheduler_v2`` stepped every update, gradient clipping,
  autocast (bfloat16 on CUDA by default; float16 with a gradient scaler), optional EMA
  (``ModelEmaV3``), channels-last, gradient checkpointing, ``torch.compile``;
- several GPUs: run under ``torchrun --nproc-per-node N``; DistributedDataParallel and a
  distributed sampler are set up from the environment;
- time: ``--time-budget MIN`` fits the number of epochs after the first one is timed (the
  learning-rate schedule is rebuilt for the fitted count); ``--max-minutes MIN`` stops early;
- outputs under ``--out``: ``last.safetensors`` (+ ``last_ema.safetensors``) and
  the optimizer state as safetensors shards (``optimizer-000-of-00N.safetensors``, at most
  ``--shard-mb`` each) with ``resume.json`` (epoch, update count, fitted epochs, scaler,
  history; no pickles) after every epoch, so ``--resume auto`` (or ``--resume DIR``)
  continues an interrupted run, also on another machine; at the end
  ``model.safetensors`` (metadata: model, num_classes, model_kwargs, data_config, command),
  ``metrics.json`` (top-1/top-5 on the eval split, measured like ``zoo eval image``) and
  ``log.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from zoo.progress import get_logger, progress
from zoo.vision.compile import compile_blocks

__all__ = ["add_train_arguments", "main", "train"]

log = get_logger("zoo.vision.train")


class _ParseKwargs(argparse.Action):
    """``key=value`` pairs; values parsed as JSON when they can be (numbers, lists, booleans)."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep:
                raise argparse.ArgumentError(self, f"expected key=value, got {item!r}")
            try:
                kwargs[key] = json.loads(value)
            except ValueError:
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("data")
    g.add_argument(
        "data", nargs="?", metavar="DIR", help="dataset root (ImageFolder tree or Fashion-MNIST IDX folder)"
    )
    g.add_argument("--data-dir", metavar="DIR", help="dataset root (same as DIR)")
    g.add_argument("--dataset", default="", help="dataset type/name, e.g. fashion_mnist (default: folder)")
    g.add_argument("--train-split", default="train", help="training split (default: train)")
    g.add_argument("--val-split", default="validation", help="evaluation split (default: validation)")
    g.add_argument(
        "--num-samples", type=int, default=None, help="use only the first N training images (Fashion-MNIST)"
    )
    g.add_argument(
        "--num-val-samples", type=int, default=None, help="use only the first N eval images (Fashion-MNIST)"
    )
    g.add_argument("--class-map", default="", help="class to index mapping file")
    g.add_argument(
        "-j",
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="data loading workers per process (default: 8, at most the CPU count)",
    )
    g.add_argument("--pin-mem", action="store_true", help="pin CPU memory of batches")
    g.add_argument("--no-prefetcher", action="store_true", help="normalise on the CPU instead of the device")

    g = parser.add_argument_group("model")
    g.add_argument("-m", "--model", default="favit_b0", help="zoo or timm model name (default favit_b0)")
    g.add_argument("--pretrained", action="store_true", help="start from shipped / pretrained weights")
    g.add_argument("--initial-checkpoint", default="", help="start from these weights (any supported format)")
    g.add_argument(
        "--num-classes", type=int, default=None, help="classes (default: the dataset's, else the model's)"
    )
    g.add_argument("--in-chans", type=int, default=None, help="image channels (default 3)")
    g.add_argument("--drop", type=float, default=0.0, help="dropout before the head")
    g.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate")
    g.add_argument(
        "--model-kwargs", nargs="*", default={}, action=_ParseKwargs, help="extra model keywords key=value"
    )
    g.add_argument(
        "--grad-checkpointing", action="store_true", help="recompute activations in the backward pass"
    )
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    g.add_argument(
        "--torchcompile",
        nargs="?",
        const="model",
        default=None,
        choices=("model", "blocks"),
        help="torch.compile the whole model, or (blocks) each repeated block (faster to compile)",
    )

    g = parser.add_argument_group("preprocessing (default: the dataset's, else the model's)")
    g.add_argument("--img-size", type=int, default=None, help="image side")
    g.add_argument("--input-size", type=int, nargs=3, default=None, metavar="N", help="C H W")
    g.add_argument("--crop-pct", type=float, default=None, help="eval center crop fraction")
    g.add_argument("--interpolation", default="", help="eval resize interpolation")
    g.add_argument(
        "--train-interpolation", default="random", help="train resize interpolation (default random)"
    )
    g.add_argument("--mean", type=float, nargs="+", default=None, help="normalisation mean")
    g.add_argument("--std", type=float, nargs="+", default=None, help="normalisation std")

    g = parser.add_argument_group("augmentation and regularisation")
    g.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), help="random resized crop area range")
    g.add_argument(
        "--ratio", type=float, nargs=2, default=(3 / 4, 4 / 3), help="random resized crop aspect range"
    )
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--vflip", type=float, default=0.0, help="vertical flip probability")
    g.add_argument("--color-jitter", type=float, default=0.4, help="color jitter strength")
    g.add_argument("--aa", default=None, help="auto-augment policy, e.g. rand-m9-mstd0.5-inc1")
    g.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    g.add_argument("--remode", default="pixel", help="random erasing mode")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    g.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    g.add_argument(
        "--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix when both are on"
    )
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")

    g = parser.add_argument_group("optimisation")
    g.add_argument("-b", "--batch-size", type=int, default=128, help="batch size per process (default 128)")
    g.add_argument("--opt", default="adamw", help="timm optimizer name (default adamw)")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    g.add_argument("--weight-decay", type=float, default=0.05, help="weight decay (default 0.05)")
    g.add_argument("--momentum", type=float, default=0.9, help="momentum (SGD-type optimizers)")
    g.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this value")
    g.add_argument("--sched", default="cosine", help="timm scheduler name (default cosine)")
    g.add_argument("--epochs", type=int, default=30, help="epochs (an upper bound with --time-budget)")
    g.add_argument("--warmup-epochs", type=float, default=2, help="linear warm-up epochs")
    g.add_argument("--warmup-lr", type=float, default=1e-5, help="warm-up start learning rate")
    g.add_argument("--min-lr", type=float, default=1e-5, help="final learning rate")
    g.add_argument(
        "--model-ema", action="store_true", help="keep an EMA of the weights (saved and evaluated)"
    )
    g.add_argument("--model-ema-decay", type=float, default=0.9998, help="EMA decay")
    g.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=None, help="autocast (default: on for CUDA)"
    )
    g.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"), help="autocast dtype")
    g.add_argument("--seed", type=int, default=42, help="random seed")
    g.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")

    g = parser.add_argument_group("run control and outputs")
    g.add_argument("--out", default="output/train", help="output folder (checkpoints, metrics.json, log.csv)")
    g.add_argument(
        "--resume", default="", help="folder with resume.json to continue from, or 'auto' (OUT, if present)"
    )
    g.add_argument(
        "--time-budget", type=float, default=None, help="minutes for the whole run; fits the epochs"
    )
    g.add_argument("--max-minutes", type=float, default=None, help="stop (resumable) after this many minutes")
    g.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many updates of this run (smoke tests)"
    )
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (0: only at the end)")
    g.add_argument("--log-interval", type=int, default=50, help="log every N updates")
    g.add_argument(
        "--eval-batch-size", type=int, default=None, help="eval batch size (default 2x batch size)"
    )
    g.add_argument("--shard-mb", type=float, default=15.0, help="largest optimizer-state file, MB")
    return parser


_ALWAYS_IN_COMMAND = ("model", "dataset", "batch_size", "epochs", "opt", "lr", "weight_decay", "sched")


def command_line(args: argparse.Namespace) -> str:
    """The ``zoo train image`` command that reproduces ``args`` (arguments that differ from the defaults)."""
    parser = add_train_arguments(argparse.ArgumentParser(add_help=False))
    defaults = vars(parser.parse_args([]))
    words: list[str] = []
    for action in parser._actions:
        dest = action.dest
        if dest not in defaults or dest in ("out", "resume"):
            continue
        value = getattr(args, dest, defaults[dest])
        if dest in _ALWAYS_IN_COMMAND and value not in (None, "", [], {}):
            pass
        elif value == defaults[dest] or (
            isinstance(value, (list, tuple)) and list(value) == list(defaults[dest])
        ):
            continue
        if not action.option_strings:
            words.insert(0, str(value))
        elif isinstance(action, argparse.BooleanOptionalAction):
            words.append(action.option_strings[0] if value else action.option_strings[-1])
        elif action.nargs == 0:
            words.append(action.option_strings[-1])
        elif isinstance(value, dict):
            words += [action.option_strings[-1], *(f"{k}={json.dumps(v)}" for k, v in value.items())]
        elif isinstance(value, (list, tuple)):
            words += [action.option_strings[-1], *map(str, value)]
        else:
            words += [action.option_strings[-1], str(value)]
    return "zoo train image " + " ".join(shlex.quote(w) for w in words)


# ----------------------------------------------------------------------------------------------
# setup helpers


def _init_distributed(device_arg: Optional[str]) -> tuple[torch.device, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
            backend = "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        torch.distributed.init_process_group(backend=backend)
        return device, torch.distributed.get_rank(), world
    device = (
        torch.device(device_arg)
        if device_arg
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    return device, 0, 1


def _build_model(
    args: argparse.Namespace, num_classes: Optional[int]
) -> tuple[torch.nn.Module, dict[str, Any], dict]:
    """The model, the keywords that rebuild it, and its preferred data config."""
    from zoo import checkpoints, registry

    kwargs: dict[str, Any] = dict(args.model_kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if args.in_chans is not None:
        kwargs["in_chans"] = args.in_chans
    train_kwargs = dict(drop_rate=args.drop)
    if args.drop_path is not None:
        train_kwargs["drop_path_rate"] = args.drop_path
    try:
        entry, tag = registry.get_entry(args.model)
    except ValueError:
        entry, tag = None, None
    data_config: dict[str, Any] = {}
    if entry is not None:
        model = registry.create(args.model, pretrained=args.pretrained, **kwargs, **train_kwargs)
        if tag is not None:
            data_config = dict(entry.tags[tag].extra.get("data_config", {}))
        filter_fn = entry.checkpoint_filter_fn
    else:
        import timm

        if not timm.is_model(args.model.split(".")[0]):
            raise ValueError(
                f"model: {args.model!r} is neither a zoo model (see `zoo list`) nor a timm model"
            )
        model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs, **train_kwargs)
        filter_fn = None
    if args.initial_checkpoint:
        checkpoints.load_into(
            model, checkpoints.load(args.initial_checkpoint), filter_fn=filter_fn, strict=True
        )
    kwargs.setdefault("num_classes", getattr(model, "num_classes", None))
    return model, kwargs, data_config


def save_resume_state(
    out: Path,
    optimizer: torch.optim.Optimizer,
    scaler: Optional[Any],
    progress_state: dict[str, Any],
    shard_mb: float = 15.0,
) -> None:
    """Optimizer tensors as safetensors shards of at most ``shard_mb`` MB, everything else in resume.json.

    No pickles: the files load with ``safetensors`` and ``json`` only, and shards stay small
    enough to move between machines one by one.
    """
    opt_state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in opt_state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = _json_safe(value)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, limit = 0, int(shard_mb * 2**20)
    for key, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    names = [f"optimizer-{i:03d}-of-{len(shards):03d}.safetensors" for i in range(len(shards))]
    for stale in out.glob("optimizer-*-of-*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    for name, shard in zip(names, shards):
        _atomic_save_weights(shard, out / name)
    state = dict(
        progress_state,
        optimizer_param_groups=_json_safe(opt_state["param_groups"]),
        optimizer_scalars=scalars,
        optimizer_shards=names,
        scaler=_json_safe(scaler.state_dict()) if scaler is not None else {},
    )
    tmp = out / "resume.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, out / "resume.json")


def load_resume_state(
    folder: Path, optimizer: torch.optim.Optimizer, scaler: Optional[Any]
) -> dict[str, Any]:
    """Restore the optimizer (and gradient scaler) saved by ``save_resume_state``; returns the progress state."""
    from zoo import checkpoints

    state = json.loads((folder / "resume.json").read_text())
    per_param: dict[int, dict[str, Any]] = {}
    for name in state["optimizer_shards"]:
        for key, value in checkpoints.load(folder / name).items():
            idx, entry = key.split(".", 1)
            per_param.setdefault(int(idx), {})[entry] = value
    for idx, entries in state["optimizer_scalars"].items():
        per_param.setdefault(int(idx), {}).update(entries)
    groups = state["optimizer_param_groups"]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state


def _atomic_save_weights(state: dict, path: Path, metadata: Optional[dict] = None) -> None:
    from zoo import checkpoints

    tmp = path.with_name(path.stem + ".tmp.safetensors")
    checkpoints.save(state, tmp, metadata=metadata)
    os.replace(tmp, path)


def _json_safe(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return str(value)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# ----------------------------------------------------------------------------------------------
# the run


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train, checkpoint every epoch, evaluate the final weights; returns the final metrics (rank 0)."""
    from timm.data import FastCollateMixup, Mixup, create_loader, resolve_data_config
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import random_seed

    from zoo import checkpoints
    from zoo.vision.data import DATASET_DEFAULTS, create_image_dataset, is_fashion_mnist
    from zoo.vision.validate import evaluate

    start_time = time.time()
    device, rank, world = _init_distributed(args.device)
    is_main = rank == 0
    out = Path(args.out)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    random_seed(args.seed, rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    root = args.data or args.data_dir
    fashion = is_fashion_mnist(args.dataset, root if not args.dataset else None)
    preset = dict(DATASET_DEFAULTS["fashion_mnist"]) if fashion else {}
    num_classes = args.num_classes if args.num_classes is not None else preset.get("num_classes")

    model, model_kwargs, tag_data = _build_model(args, num_classes)
    num_classes = model_kwargs.get("num_classes")
    defaults = {k: v for k, v in preset.items() if k != "num_classes"}
    defaults.update(tag_data)
    if defaults:
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **defaults}
        if "input_size" in defaults:
            model.pretrained_cfg.pop("test_input_size", None)
    cfg_args = dict(
        input_size=args.input_size,
        img_size=args.img_size,
        in_chans=args.in_chans,
        crop_pct=args.crop_pct,
        interpolation=args.interpolation,
        mean=args.mean,
        std=args.std,
    )
    data_config = resolve_data_config(cfg_args, model=model)
    eval_config = resolve_data_config(cfg_args, model=model, use_test_size=True)
    n_params = sum(p.numel() for p in model.parameters())
    if is_main:
        log.info("model %s: %.2fM parameters, data %s", args.model, n_params / 1e6, data_config)

    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    use_amp = args.amp if args.amp is not None else device.type == "cuda"
    amp_dtype = (torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16) if use_amp else None
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    optimizer = create_optimizer_v2(
        model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum
    )

    ema = None
    if args.model_ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=args.model_ema_decay)

    # data
    img_mode = "RGB" if data_config["input_size"][0] == 3 else "L"
    dataset_train = create_image_dataset(
        args.dataset,
        root=root,
        split=args.train_split,
        is_training=True,
        img_mode=img_mode,
        num_samples=args.num_samples,
        class_map=args.class_map,
        seed=args.seed,
    )
    dataset_eval = create_image_dataset(
        args.dataset,
        root=root,
        split=args.val_split,
        img_mode=img_mode,
        num_samples=args.num_val_samples,
        class_map=args.class_map,
        seed=args.seed,
    )
    prefetcher = not args.no_prefetcher
    mixup_active = args.mixup > 0 or args.cutmix > 0
    collate_fn, mixup_fn = None, None
    if mixup_active:
        mixup_args = dict(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob,
            label_smoothing=args.smoothing,
            num_classes=num_classes,
        )
        if prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)
    persistent = args.workers > 0
    loader_train = create_loader(
        dataset_train,
        input_size=data_config["input_size"],
        batch_size=args.batch_size,
        is_training=True,
        use_prefetcher=prefetcher,
        re_prob=args.reprob,
        re_mode=args.remode,
        scale=tuple(args.scale),
        ratio=tuple(args.ratio),
        hflip=args.hflip,
        vflip=args.vflip,
        color_jitter=args.color_jitter,
        auto_augment=args.aa,
        interpolation=args.train_interpolation,
        mean=data_config["mean"],
        std=data_config["std"],
        num_workers=args.workers,
        distributed=world > 1,
        collate_fn=collate_fn,
        pin_memory=args.pin_mem,
        device=device,
        persistent_workers=persistent,
    )
    loader_eval = create_loader(
        dataset_eval,
        input_size=eval_config["input_size"],
        batch_size=args.eval_batch_size or 2 * args.batch_size,
        is_training=False,
        use_prefetcher=prefetcher,
        interpolation=eval_config["interpolation"],
        mean=eval_config["mean"],
        std=eval_config["std"],
        num_workers=args.workers,
        crop_pct=eval_config["crop_pct"],
        pin_memory=args.pin_mem,
        device=device,
        persistent_workers=persistent,
    )
    updates_per_epoch = len(loader_train)

    if mixup_active:
        train_loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = torch.nn.CrossEntropyLoss()

    def make_scheduler(num_epochs: int):
        warmup = min(args.warmup_epochs, max(num_epochs - 1, 0))
        sched, _ = create_scheduler_v2(
            optimizer,
            sched=args.sched,
            num_epochs=num_epochs,
            warmup_epochs=warmup,
            warmup_lr=args.warmup_lr,
            min_lr=args.min_lr,
            step_on_epochs=False,
            updates_per_epoch=updates_per_epoch,
        )
        return sched

    # resume
    start_epoch, num_updates, num_epochs, elapsed_before = 0, 0, args.epochs, 0.0
    fitted = False
    history: list[dict[str, Any]] = []
    resume_dir = None
    if args.resume:
        resume_dir = out if args.resume == "auto" else Path(args.resume)
        if resume_dir.is_file():
            resume_dir = resume_dir.parent
        if not (resume_dir / "resume.json").is_file():
            if args.resume != "auto":
                raise FileNotFoundError(f"resume: no resume.json under {resume_dir}")
            resume_dir = None
    if resume_dir is not None:
        state = load_resume_state(resume_dir, optimizer, scaler)
        checkpoints.load_into(model, checkpoints.load(resume_dir / "last.safetensors"), strict=True)
        if ema is not None and (resume_dir / "last_ema.safetensors").is_file():
            checkpoints.load_into(
                ema.module, checkpoints.load(resume_dir / "last_ema.safetensors"), strict=True
            )
        start_epoch, num_updates = int(state["epoch"]), int(state["num_updates"])
        num_epochs, fitted = int(state["num_epochs"]), bool(state["fitted"])
        elapsed_before = float(state["elapsed_s"])
        history = list(state.get("history", []))
        if is_main:
            log.info(
                "resumed from %s at epoch %d (update %d of %d epochs)",
                resume_dir,
                start_epoch,
                num_updates,
                num_epochs,
            )
    scheduler = make_scheduler(num_epochs)
    scheduler.step_update(num_updates)
    start_updates = num_updates

    train_model: torch.nn.Module = model
    if args.torchcompile == "model":
        train_model = torch.compile(model)
    elif args.torchcompile == "blocks":
        compile_blocks(model)
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )

    command = command_line(args)
    if is_main:
        (out / "args.json").write_text(json.dumps(_json_safe(vars(args)), indent=1))

    def elapsed() -> float:
        return elapsed_before + time.time() - start_time

    def save_state(epoch_done: int) -> None:
        if not is_main:
            return
        _atomic_save_weights(_unwrap(model).state_dict(), out / "last.safetensors")
        if ema is not None:
            _atomic_save_weights(ema.module.state_dict(), out / "last_ema.safetensors")
        save_resume_state(
            out,
            optimizer,
            scaler,
            dict(
                epoch=epoch_done,
                num_updates=num_updates,
                num_epochs=num_epochs,
                fitted=fitted,
                elapsed_s=elapsed(),
                history=history,
            ),
            shard_mb=args.shard_mb,
        )

    autocast = (
        (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else nullcontext
    )
    stopped_early = False
    epoch = start_epoch
    images_seen, train_seconds = 0, 0.0
    while epoch < num_epochs:
        if world > 1 and hasattr(loader_train.sampler, "set_epoch"):
            loader_train.sampler.set_epoch(epoch)
        if mixup_active and collate_fn is not None and hasattr(loader_train, "mixup_enabled"):
            loader_train.mixup_enabled = True
        train_model.train()
        epoch_start = time.time()
        loss_sum = torch.zeros((), device=device)
        loss_count = 0
        for step, (images, target) in enumerate(
            progress(loader_train, desc=f"epoch {epoch + 1}/{num_epochs}", total=updates_per_epoch)
        ):
            if not prefetcher:
                images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
                if mixup_fn is not None:
                    images, target = mixup_fn(images, target)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast():
                output = train_model(images)
                loss = train_loss_fn(output, target)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                if args.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if args.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                optimizer.step()
            if ema is not None:
                ema.update(model, step=num_updates)
            num_updates += 1
            scheduler.step_update(num_updates)
            loss_sum += loss.detach()
            loss_count += 1
            images_seen += images.shape[0] * world
            if is_main and args.log_interval and num_updates % args.log_interval == 0:
                log.info(
                    "epoch %d step %d/%d loss %.4f lr %.2e %.0f img/s",
                    epoch + 1,
                    step + 1,
                    updates_per_epoch,
                    (loss_sum / loss_count).item(),
                    optimizer.param_groups[0]["lr"],
                    (step + 1) * images.shape[0] * world / max(time.time() - epoch_start, 1e-9),
                )
            if args.max_steps is not None and num_updates - start_updates >= args.max_steps:
                stopped_early = True
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_seconds = time.time() - epoch_start
        train_seconds += epoch_seconds
        train_loss = (loss_sum / max(loss_count, 1)).item()
        if world > 1:
            t = torch.tensor([train_loss], device=device)
            torch.distributed.all_reduce(t)
            train_loss = t.item() / world
        epoch += 0 if stopped_early and step + 1 < updates_per_epoch else 1
        row: dict[str, Any] = dict(
            epoch=epoch,
            updates=num_updates,
            train_loss=round(train_loss, 5),
            epoch_s=round(epoch_seconds, 2),
            lr=optimizer.param_groups[0]["lr"],
            elapsed_s=round(elapsed(), 1),
        )
        last_epoch = epoch >= num_epochs
        if args.eval_every and (epoch % args.eval_every == 0 or last_epoch) and not stopped_early:
            eval_start = time.time()
            _, top1, top5 = evaluate(
                _unwrap(model),
                loader_eval,
                device,
                amp_dtype=amp_dtype,
                channels_last=args.channels_last,
                prefetcher=prefetcher,
                log_freq=0,
                desc=f"eval epoch {epoch}",
            )
            row.update(
                eval_top1=round(top1, 3), eval_top5=round(top5, 3), eval_s=round(time.time() - eval_start, 2)
            )
            if ema is not None:
                _, top1_ema, _ = evaluate(
                    ema.module,
                    loader_eval,
                    device,
                    amp_dtype=amp_dtype,
                    channels_last=args.channels_last,
                    prefetcher=prefetcher,
                    log_freq=0,
                    desc=f"eval ema epoch {epoch}",
                )
                row.update(eval_top1_ema=round(top1_ema, 3))
        history.append(row)
        if is_main:
            log.info("epoch %d/%d: %s", epoch, num_epochs, row)

        # fit the number of epochs to the time budget once the first epoch of this run is timed
        if args.time_budget and not fitted and epoch >= 1:
            if "eval_s" in row:
                eval_seconds = float(row["eval_s"])
            else:  # time one evaluation: the periodic ones and the final one come out of the budget too
                eval_start = time.time()
                evaluate(_unwrap(model), loader_eval, device, amp_dtype=amp_dtype, channels_last=args.channels_last,
                         prefetcher=prefetcher, log_freq=0, desc="timing eval")  # fmt: skip
                eval_seconds = time.time() - eval_start
            per_epoch = epoch_seconds + (eval_seconds / args.eval_every if args.eval_every else 0.0)
            remaining = args.time_budget * 60.0 - elapsed() - 2 * eval_seconds - 5.0
            fit = epoch + max(0, math.floor(0.97 * remaining / max(per_epoch, 1e-9)))
            fit = max(epoch, min(args.epochs, fit))
            if epoch == 1 and fit >= epoch + 2:
                fit = None  # the first epoch carries warm-up costs (autotuning, loader start): refit after the second
            if world > 1:
                t = torch.tensor([-1 if fit is None else fit], device=device)
                torch.distributed.broadcast(t, 0)
                fit = None if int(t.item()) < 0 else int(t.item())
        if args.time_budget and not fitted and epoch >= 1 and fit is not None:
            fitted = True
            if fit != num_epochs:
                if is_main:
                    log.info(
                        "time budget %.1f min: %.1f s per epoch -> %d epochs",
                        args.time_budget,
                        per_epoch,
                        fit,
                    )
                num_epochs = fit
                scheduler = make_scheduler(num_epochs)
                scheduler.step_update(num_updates)
        save_state(epoch)
        if stopped_early:
            break
        if args.max_minutes is not None and elapsed() > args.max_minutes * 60.0 and epoch < num_epochs:
            if is_main:
                log.warning(
                    "stopped after %.1f min at epoch %d/%d; continue with --resume auto",
                    elapsed() / 60,
                    epoch,
                    num_epochs,
                )
            stopped_early = True
            break

    if is_main and history:
        with open(out / "log.csv", "w", newline="") as f:
            keys = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)

    metrics: dict[str, Any] = {}
    if is_main:
        final = ema.module if ema is not None else _unwrap(model)
        data_meta = {
            k: _json_safe(v)
            for k, v in eval_config.items()
            if k in ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")
        }
        metadata = dict(
            model=json.dumps(args.model),
            num_classes=json.dumps(num_classes),
            model_kwargs=json.dumps(
                _json_safe({k: v for k, v in model_kwargs.items() if k != "num_classes"})
            ),
            data_config=json.dumps(data_meta),
            dataset=json.dumps("fashion_mnist" if fashion else (args.dataset or str(root))),
            command=json.dumps(command),
            complete=json.dumps(not stopped_early),
        )
        _atomic_save_weights(final.state_dict(), out / "model.safetensors", metadata=metadata)
        _, top1, top5 = evaluate(
            final,
            loader_eval,
            device,
            amp_dtype=amp_dtype,
            channels_last=args.channels_last,
            prefetcher=prefetcher,
            log_freq=0,
            desc="final eval",
        )
        metrics = dict(
            model=args.model,
            dataset=json.loads(metadata["dataset"]),
            eval_split=args.val_split,
            top1=round(top1, 4),
            top1_err=round(100 - top1, 4),
            top5=round(top5, 4),
            top5_err=round(100 - top5, 4),
            param_count=round(n_params / 1e6, 2),
            img_size=data_config["input_size"][-1],
            epochs_done=epoch,
            epochs_planned=num_epochs,
            complete=not stopped_early,
            updates=num_updates,
            ema=ema is not None,
            train_seconds_this_run=round(train_seconds, 1),
            train_images_per_s=round(images_seen / max(train_seconds, 1e-9), 1),
            elapsed_s=round(elapsed(), 1),
            amp_dtype=str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "float32",
            world_size=world,
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            data_config=data_meta,
            command=command,
        )
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        log.info("final: top1 %.3f top5 %.3f (%s)", top1, top5, out / "model.safetensors")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = add_train_arguments(
        argparse.ArgumentParser(description="Train an image classifier with timm's factories")
    )
    train(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
