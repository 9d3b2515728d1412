"""Capture the q, k, v of a trained image classifier's attention, for ``zoo eval approx-attention``.

Any model whose attention calls ``F.scaled_dot_product_attention`` (timm's Vision Transformer,
"An Image is Worth 16x16 Words", arXiv 2010.11929, and the other timm or zoo models with fused
attention) runs held-out Fashion-MNIST test images through the evaluation transform stored in a
``zoo train image`` checkpoint; ``zoo.layers.approx_eval.capture_sdpa_qkv`` records the q, k, v
each attention module passes to SDPA (``(B, H, N, D)``, the class token included). The capture
checks that SDPA was called without a mask and that ``softmax(q k^T / sqrt(D)) v`` of the
recorded tensors in fp64 equals the call's own output, so the file holds exactly the attention
the model computed. The result is written with ``zoo.layers.approx_eval.save_samples`` (one
non-causal sample per layer), the format ``zoo eval approx-attention --qkv`` reads, plus a JSON
sidecar naming the checkpoint, the images, their labels and the model's predictions.

    python -m zoo.vision.capture_qkv --checkpoint runs/vit_fm/model.safetensors \\
        --count 8 --out runs/approx_vit_fm/qkv.safetensors
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.layers.approx_eval import (
    AttentionSample,
    capture_sdpa_qkv,
    parse_capture_arguments,
    save_captured_samples,
    select_examples,
)

__all__ = ["capture_image_attention_qkv", "main"]

# fp32 attention recomputed in fp64 differs from the model's by rounding only
REPRODUCTION_TOLERANCE = 1e-4


def capture_image_attention_qkv(
    model: nn.Module, images: Tensor, *, label: str = ""
) -> tuple[list[AttentionSample], Tensor]:
    """q, k, v of every SDPA attention call while ``model`` classifies ``images`` ``(B, C, H, W)``.

    Returns one non-causal ``AttentionSample`` per attention module, in forward order, on the CPU
    in fp32, and the model's output of that forward pass. The model runs in eval mode (its training flag is restored afterwards).

    Raises
    ------
    ValueError
        ``images`` not a ``(B, C, H, W)`` floating tensor, or a model that makes no SDPA call
        (attention written out by hand is not captured).
    RuntimeError
        A call with an attention mask or causal masking, or recorded q, k, v that do not reproduce
        the call's output.
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            f"images: expected a (B, C, H, W) floating tensor, got {tuple(images.shape)} {images.dtype}"
        )
    outputs: list[Tensor] = []
    original = F.scaled_dot_product_attention

    def keep_output(*args: Any, **kwargs: Any) -> Tensor:
        out = original(*args, **kwargs)
        outputs.append(out.detach().float().cpu())
        return out

    was_training = model.training
    model.eval()
    try:
        F.scaled_dot_product_attention = keep_output  # inner: the capture wraps this one
        with torch.no_grad(), capture_sdpa_qkv(model, max_per_module=1) as found:
            logits = model(images)
    finally:
        F.scaled_dot_product_attention = original
        model.train(was_training)
    if not found:
        raise ValueError("model: expected attention through F.scaled_dot_product_attention, found no call")
    if len(found) != len(outputs):
        raise RuntimeError(
            f"model: {len(outputs)} SDPA calls for {len(found)} attention modules; expected one each"
        )
    samples = []
    for sample, out in zip(found, outputs):
        if sample.source or sample.causal:
            raise RuntimeError(
                f"{sample.name}: SDPA was called with a mask or is_causal; expected plain attention"
            )
        q, k, v = (t.double() for t in (sample.q, sample.k, sample.v))
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        err = ((probs @ v) - out.double()).abs().max().item()
        if err > REPRODUCTION_TOLERANCE * max(1.0, out.abs().max().item()):
            raise RuntimeError(f"{sample.name}: the recorded q, k, v reproduce the output only to {err:.2e}")
        name = f"{label}.{sample.name}" if label else sample.name
        source = f"{label} {sample.name}: SDPA q/k/v; output reproduced to {err:.1e}".strip()
        samples.append(AttentionSample(name, sample.q, sample.k, sample.v, False, source))
    return samples, logits


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m zoo.vision.capture_qkv``: held-out images through a trained classifier; q/k/v to a file."""
    from timm.data import create_transform, resolve_data_config

    from zoo.vision.data import FashionMNIST
    from zoo.vision.validate import _checkpoint_metadata, apply_data_defaults, create_model_for_eval

    p = argparse.ArgumentParser(prog="python -m zoo.vision.capture_qkv", description=main.__doc__)
    p.add_argument(
        "--data-dir", default=None, help="Fashion-MNIST IDX folder (default: the Debian package's)"
    )
    args, checkpoint = parse_capture_arguments(
        p, argv, checkpoint_help="model.safetensors written by zoo train image", unit="images"
    )
    meta = _checkpoint_metadata(str(checkpoint))
    if not meta.get("model"):
        raise ValueError(
            f"checkpoint: expected the metadata of zoo train image (a model name), got {sorted(meta)}"
        )
    model, _ = create_model_for_eval(meta["model"], checkpoint=str(checkpoint), num_classes=meta.get("num_classes"),
                                     model_kwargs=meta.get("model_kwargs"))  # fmt: skip
    apply_data_defaults(model, meta, fashion=True)
    data_config = resolve_data_config({}, model=model)
    transform = create_transform(**data_config, is_training=False)
    data = FashionMNIST(
        root=args.data_dir, split=args.split, img_mode="RGB" if data_config["input_size"][0] == 3 else "L"
    )
    indices = select_examples(len(data), args.count)
    images = torch.stack([transform(data.image(i)) for i in indices])
    labels = torch.tensor([int(data.targets[i]) for i in indices])
    label = f"{meta['model']}_fashion_mnist"
    samples, logits = capture_image_attention_qkv(model, images, label=label)
    predictions = logits.argmax(-1)
    command = " ".join(["python -m zoo.vision.capture_qkv", *(argv if argv is not None else sys.argv[1:])])
    data_config = {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}
    save_captured_samples(samples, args.out, checkpoint=checkpoint, split=args.split, indices=indices, labels=labels,
                          predictions=predictions, command=command, unit="images", model=meta["model"],
                          model_kwargs=meta.get("model_kwargs"), data_config=data_config)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
