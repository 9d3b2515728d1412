"""Image-classification evaluation, equal to timm's validate.py: ``zoo eval image`` / ``python -m zoo.vision.validate``.

Used to measure the FaViT papers' metric (top-1 / top-5 accuracy; arXiv 2312.08614 reports
ImageNet top-1) for zoo models (``favit_b0``, ``favit_b0.fashion_mnist``) and any timm model.

The steps are timm validate.py's: the model (zoo name, timm name, ``--pretrained`` or
``--checkpoint``), ``timm.data.resolve_data_config`` (test size), ``timm.data.create_dataset``
(ImageFolder/ImageTar trees; Fashion-MNIST from its IDX files), ``timm.data.create_loader``
(resize, center crop, normalisation on the prefetcher), one warm-up batch, then top-1/top-5 by
``timm.utils.accuracy`` averaged over images. The result row has the same fields: model,
top1, top1_err, top5, top5_err, param_count (millions), img_size, crop_pct, interpolation.

Defaults for the preprocessing, below explicit arguments: the data config stored in a
checkpoint written by ``zoo train image``, then a shipped tag's, then the dataset's
(Fashion-MNIST: 64 px, its mean/std), then the model's pretrained config.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from zoo.progress import get_logger, progress

__all__ = ["add_eval_arguments", "create_model_for_eval", "evaluate", "main", "validate", "write_results"]

log = get_logger("zoo.vision.validate")
DATA_KEYS = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """timm validate.py's main arguments."""
    parser.add_argument(
        "data", nargs="?", metavar="DIR", help="dataset root (ImageFolder tree or Fashion-MNIST IDX folder)"
    )
    parser.add_argument("--data-dir", metavar="DIR", help="dataset root (same as DIR)")
    parser.add_argument(
        "--dataset",
        default="",
        metavar="NAME",
        help="dataset type/name, e.g. fashion_mnist (default: folder)",
    )
    parser.add_argument("--split", default="validation", help="dataset split (default: validation)")
    parser.add_argument(
        "--num-samples", type=int, default=None, help="evaluate only the first N images (Fashion-MNIST)"
    )
    parser.add_argument("--class-map", default="", metavar="FILE", help="class to index mapping file")
    parser.add_argument(
        "-m", "--model", default=None, help="zoo name (favit_b0, favit_b0.fashion_mnist) or timm name"
    )
    parser.add_argument("--pretrained", action="store_true", help="load the shipped / pretrained weights")
    parser.add_argument(
        "--checkpoint", default="", metavar="PATH", help="weights to load (.safetensors/.pth/...)"
    )
    parser.add_argument("--use-ema", action="store_true", help="use the EMA weights of a training checkpoint")
    parser.add_argument("--num-classes", type=int, default=None, help="classes of the head")
    parser.add_argument("--in-chans", type=int, default=None, help="image channels (default 3)")
    parser.add_argument("-b", "--batch-size", type=int, default=256, help="batch size (default 256)")
    parser.add_argument(
        "-j",
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="data loading workers (default: 4, at most the CPU count)",
    )
    parser.add_argument("--img-size", type=int, default=None, help="image side (default: the model's)")
    parser.add_argument("--input-size", type=int, nargs=3, default=None, metavar="N", help="C H W")
    parser.add_argument(
        "--use-train-size", action="store_true", help="use the train size even if a test size is set"
    )
    parser.add_argument("--crop-pct", type=float, default=None, help="center crop fraction")
    parser.add_argument("--crop-mode", default=None, help="crop mode: center, squash or border")
    parser.add_argument("--interpolation", default="", help="resize interpolation (default: the model's)")
    parser.add_argument("--mean", type=float, nargs="+", default=None, help="normalisation mean")
    parser.add_argument("--std", type=float, nargs="+", default=None, help="normalisation std")
    parser.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")
    parser.add_argument("--amp", action="store_true", help="autocast (mixed precision)")
    parser.add_argument(
        "--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"), help="autocast dtype"
    )
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    parser.add_argument(
        "--no-prefetcher", action="store_true", help="normalise on the CPU instead of the device"
    )
    parser.add_argument("--pin-mem", action="store_true", help="pin CPU memory of batches")
    parser.add_argument("--torchcompile", action="store_true", help="torch.compile the model")
    parser.add_argument("--log-freq", type=int, default=10, help="log every N batches")
    parser.add_argument("--results-file", default="", metavar="FILE", help="write the result row here")
    parser.add_argument(
        "--results-format", default="csv", choices=("csv", "json"), help="results file format"
    )
    parser.add_argument("--seed", type=int, default=42, help="random seed")
    return parser


def _checkpoint_metadata(path: str) -> dict[str, Any]:
    """The ``zoo train image`` metadata (model, num_classes, model_kwargs, data_config) of a safetensors file."""
    if not path or not str(path).endswith(".safetensors") or not os.path.isfile(path):
        return {}
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    out: dict[str, Any] = {}
    for key, value in meta.items():
        try:
            out[key] = json.loads(value)
        except (TypeError, ValueError):
            out[key] = value
    return out


def create_model_for_eval(
    name: str,
    pretrained: bool = False,
    checkpoint: str = "",
    num_classes: Optional[int] = None,
    in_chans: Optional[int] = None,
    use_ema: bool = False,
    model_kwargs: Optional[dict[str, Any]] = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build a zoo or timm model and load its weights; returns it with its preferred data config."""
    from zoo import checkpoints, registry

    model_kwargs = dict(model_kwargs or {})
    if num_classes is not None:
        model_kwargs["num_classes"] = num_classes
    if in_chans is not None:
        model_kwargs["in_chans"] = in_chans
    try:
        entry, tag = registry.get_entry(name)
    except ValueError:
        entry, tag = None, None
    data_config: dict[str, Any] = {}
    if entry is not None:
        if checkpoint:
            model = registry.create(name, **model_kwargs)
            state = checkpoints.load(checkpoint, use_ema=use_ema)
            checkpoints.load_into(model, state, filter_fn=entry.checkpoint_filter_fn, strict=True)
        else:
            model = registry.create(name, pretrained=pretrained, **model_kwargs)
        if tag is not None:
            data_config = dict(entry.tags[tag].extra.get("data_config", {}))
        return model, data_config

    import timm

    if not timm.is_model(name.split(".")[0]):
        raise ValueError(f"model: {name!r} is neither a zoo model (see `zoo list`) nor a timm model")
    model = timm.create_model(name, pretrained=pretrained and not checkpoint, **model_kwargs)
    if checkpoint:
        checkpoints.load_into(model, checkpoints.load(checkpoint, use_ema=use_ema), strict=True)
    return model, data_config


def apply_data_defaults(
    model: torch.nn.Module, meta: dict[str, Any], fashion: bool, tag_data: Optional[dict[str, Any]] = None
) -> None:
    """Put the data config the weights were trained with into ``model.pretrained_cfg``, where
    ``timm.data.resolve_data_config`` reads it: Fashion-MNIST's defaults, then the registered tag's,
    then the ``zoo train image`` checkpoint metadata's ``data_config``."""
    from zoo.vision.data import DATASET_DEFAULTS

    defaults: dict[str, Any] = {}
    if fashion:
        defaults.update({k: v for k, v in DATASET_DEFAULTS["fashion_mnist"].items() if k in DATA_KEYS})
    defaults.update(tag_data or {})
    defaults.update(meta.get("data_config", {}) or {})
    if defaults:
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **defaults}
        if "input_size" in defaults:  # a stored size replaces the model's own test size too
            model.pretrained_cfg.pop("test_input_size", None)


def _resolve_device(name: Optional[str]) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate(
    model: torch.nn.Module,
    loader: Any,
    device: torch.device,
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    prefetcher: bool = True,
    log_freq: int = 10,
    desc: str = "eval",
) -> tuple[float, float, float]:
    """Mean loss, top-1 and top-5 (percent, averaged over images) of ``model`` on ``loader``."""
    from timm.utils import AverageMeter, accuracy

    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    criterion = torch.nn.CrossEntropyLoss()
    losses, top1, top5, batch_time = AverageMeter(), AverageMeter(), AverageMeter(), AverageMeter()
    model.eval()
    with torch.inference_mode():
        end = time.time()
        for batch_idx, (images, target) in enumerate(progress(loader, desc=desc, total=len(loader))):
            if not prefetcher:
                images, target = images.to(device), target.to(device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast:
                output = model(images)
                loss = criterion(output, target)
            acc1, acc5 = accuracy(output.detach(), target, topk=(1, 5))
            n = output.shape[0]
            losses.update(loss.item(), n)
            top1.update(acc1.item(), n)
            top5.update(acc5.item(), n)
            batch_time.update(time.time() - end)
            end = time.time()
            if log_freq and batch_idx % log_freq == 0:
                log.info(
                    "%s: [%d/%d] %.3fs/batch (%.1f img/s) loss %.4f acc@1 %.3f acc@5 %.3f",
                    desc,
                    batch_idx,
                    len(loader),
                    batch_time.avg,
                    n / max(batch_time.avg, 1e-9),
                    losses.avg,
                    top1.avg,
                    top5.avg,
                )
    return losses.avg, top1.avg, top5.avg


def validate(args: argparse.Namespace) -> OrderedDict:
    """Evaluate one model; returns timm validate.py's result row."""
    from timm.data import create_loader, resolve_data_config
    from timm.utils import random_seed

    from zoo.vision.data import create_image_dataset, is_fashion_mnist

    root = args.data or args.data_dir
    if root is not None and not Path(root).exists():
        raise FileNotFoundError(f"data: no such folder {root}")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint: no such file {args.checkpoint}")
    meta = _checkpoint_metadata(args.checkpoint)
    model_name = args.model or meta.get("model")
    if not model_name:
        raise ValueError("model: expected -m NAME (or a checkpoint written by `zoo train image`), got none")
    fashion = is_fashion_mnist(args.dataset, root if not args.dataset else None)
    num_classes = args.num_classes
    if num_classes is None:
        num_classes = meta.get("num_classes")
    # timm validate.py: without a checkpoint, evaluate the pretrained weights
    pretrained = args.pretrained or not args.checkpoint
    random_seed(args.seed)
    device = _resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    model, tag_data = create_model_for_eval(
        model_name,
        pretrained=pretrained,
        checkpoint=args.checkpoint,
        num_classes=num_classes,
        in_chans=args.in_chans,
        use_ema=args.use_ema,
        model_kwargs=meta.get("model_kwargs"),
    )
    param_count = sum(p.numel() for p in model.parameters())
    log.info("model %s created, %d parameters", model_name, param_count)

    apply_data_defaults(model, meta, fashion, tag_data)
    data_config = resolve_data_config(vars(args), model=model, use_test_size=not args.use_train_size)

    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.torchcompile:
        model = torch.compile(model)
    amp_dtype = (torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16) if args.amp else None

    img_mode = "RGB" if data_config["input_size"][0] == 3 else "L"
    dataset = create_image_dataset(
        args.dataset,
        root=root,
        split=args.split,
        img_mode=img_mode,
        num_samples=args.num_samples,
        class_map=args.class_map,
        seed=args.seed,
    )
    prefetcher = not args.no_prefetcher
    loader = create_loader(
        dataset,
        input_size=data_config["input_size"],
        batch_size=args.batch_size,
        use_prefetcher=prefetcher,
        interpolation=data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
        num_workers=args.workers,
        crop_pct=data_config["crop_pct"],
        crop_mode=data_config.get("crop_mode"),
        pin_memory=args.pin_mem,
        device=device,
        persistent_workers=False,
    )

    # warm-up batch, as timm's validate.py does
    model.eval()
    with torch.inference_mode():
        warm = torch.randn((min(args.batch_size, 8),) + tuple(data_config["input_size"]), device=device)
        if args.channels_last:
            warm = warm.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext():
            model(warm)

    _, top1a, top5a = evaluate(
        model,
        loader,
        device,
        amp_dtype=amp_dtype,
        channels_last=args.channels_last,
        prefetcher=prefetcher,
        log_freq=args.log_freq,
        desc=f"eval {model_name}",
    )
    results = OrderedDict(
        model=model_name,
        top1=round(top1a, 4),
        top1_err=round(100 - top1a, 4),
        top5=round(top5a, 4),
        top5_err=round(100 - top5a, 4),
        param_count=round(param_count / 1e6, 2),
        img_size=data_config["input_size"][-1],
        crop_pct=data_config["crop_pct"],
        interpolation=data_config["interpolation"],
    )
    log.info(
        " * Acc@1 %.3f (%.3f) Acc@5 %.3f (%.3f)",
        results["top1"],
        results["top1_err"],
        results["top5"],
        results["top5_err"],
    )
    return results


def write_results(results_file: str | os.PathLike, results: Any, fmt: str = "csv") -> None:
    """One row (or a list of rows) as CSV with a header, or as JSON."""
    Path(results_file).parent.mkdir(parents=True, exist_ok=True)
    with open(results_file, "w", newline="") as f:
        if fmt == "json":
            json.dump(results, f, indent=4)
            return
        rows = results if isinstance(results, (list, tuple)) else [results]
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(rows)


def run(args: argparse.Namespace) -> int:
    """Handler of ``zoo eval image``: validate, write the results file, print the row as JSON."""
    results = validate(args)
    if args.results_file:
        write_results(args.results_file, results, fmt=args.results_format)
    print(f"--result\n{json.dumps(results, indent=4)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = add_eval_arguments(
        argparse.ArgumentParser(description="Evaluate an image classifier like timm's validate.py")
    )
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
