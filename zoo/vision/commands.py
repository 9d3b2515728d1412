"""``zoo eval image``, ``zoo train image``, ``zoo bench vision`` and the vision part of ``zoo demo``.

FaViT (arXiv 2312.08614) backbones and any timm model. Only argparse is imported here; the
handlers import torch, timm and the model code when they run.
"""

from __future__ import annotations

import argparse
import time


def _eval_image(args: argparse.Namespace) -> int:
    from zoo.vision import validate

    return validate.run(args)


def _train_image(args: argparse.Namespace) -> int:
    from zoo.vision import train

    train.train(args)
    return 0


def _bench_vision(args: argparse.Namespace) -> int:
    from zoo.cli import run_bench_script

    return run_bench_script("vision", args.bench_args)


def register(top: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    from zoo.vision.train import add_train_arguments
    from zoo.vision.validate import add_eval_arguments

    p = groups["eval"].add_parser(
        "image",
        help="image classification top-1/top-5 like timm's validate.py (zoo or timm models)",
        description="Evaluate a zoo or timm image classifier on an ImageFolder tree or Fashion-MNIST.",
    )
    add_eval_arguments(p)
    p.set_defaults(func=_eval_image)

    p = groups["train"].add_parser(
        "image",
        help="train an image classifier with timm's factories (AMP, EMA, resume, DDP)",
        description="Train a zoo or timm image classifier; run under torchrun for several GPUs.",
    )
    add_train_arguments(p)
    p.set_defaults(func=_train_image)

    p = groups["bench"].add_parser(
        "vision",
        help="FaViT vs timm peers: throughput, params, GMACs (bench/vision.py)",
        description="Runs bench/vision.py; arguments after `--` go to it (see its --help).",
    )
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of bench/vision.py")
    p.set_defaults(func=_bench_vision)


def demo(args: argparse.Namespace) -> None:
    """favit_b0 on a few Fashion-MNIST test images: shipped weights if present, else shapes and parameters."""
    import torch

    import zoo
    from zoo import registry
    from zoo.vision.data import DATASET_DEFAULTS, FASHION_MNIST_CLASSES, FashionMNIST

    tags = registry.get_entry("favit_b0")[0].tags
    start = time.perf_counter()
    if "fashion_mnist" in tags:
        model = zoo.create("favit_b0.fashion_mnist", pretrained=True).eval()
        print(f"favit_b0.fashion_mnist: shipped weights, metrics {tags['fashion_mnist'].metrics}")
    else:
        model = zoo.create("favit_b0", num_classes=10).eval()
        print("favit_b0: no shipped Fashion-MNIST weights in this installation; random weights")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"  parameters {n_params / 1e6:.2f}M, built in {time.perf_counter() - start:.1f} s")

    cfg = DATASET_DEFAULTS["fashion_mnist"]
    side = cfg["input_size"][-1]
    try:
        data = FashionMNIST(split="test", num_samples=8)
        images = [data.image(i) for i in range(len(data))]
        labels = [int(t) for t in data.targets]
        source = "Fashion-MNIST test images"
    except FileNotFoundError:
        images, labels, source = None, None, "random images (Fashion-MNIST is not installed)"
    if images is not None:
        import torchvision.transforms.functional as TF

        batch = torch.stack(
            [
                TF.normalize(
                    TF.to_tensor(TF.resize(img, [side, side], interpolation=TF.InterpolationMode.BICUBIC)),
                    cfg["mean"],
                    cfg["std"],
                )
                for img in images
            ]
        )
    else:
        batch = torch.randn(8, 3, side, side)
    with torch.inference_mode():
        feats = model.forward_intermediates(batch, intermediates_only=True)
        logits = model(batch)
    print(f"  input {tuple(batch.shape)} ({source}); stage features:")
    for i, f in enumerate(feats):
        print(f"    stage {i + 1}: {tuple(f.shape)}  (stride {batch.shape[-1] // f.shape[-1]})")
    pred = logits.argmax(-1).tolist()
    if labels is not None:
        hits = sum(int(p == t) for p, t in zip(pred, labels))
        for p, t in list(zip(pred, labels))[:4]:
            print(f"    predicted {FASHION_MNIST_CLASSES[p]:<12} true {FASHION_MNIST_CLASSES[t]}")
        print(f"  {hits}/{len(labels)} correct")
    else:
        print(f"  predicted classes {pred}")
