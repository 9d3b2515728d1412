"""Capture the q, k, v of a trained LRA Transformer's self-attention, for ``zoo eval approx-attention``.

The Transformer baseline of the PoNet LRA models (PoNet: Pooling Network for Efficient Token
Mixing in Long Sequences, arXiv 2110.02442; ``mixer="sdpa"``: BERT self-attention, "Attention
Is All You Need", arXiv 1706.03762) runs held-out examples of an LRA task; forward hooks on
each ``SDPASelfAttention`` record the outputs of its ``query``, ``key`` and ``value``
projections, split into heads as the layer does, ``(B, H, N, D)``. The module's own output
(the context before the output projection) is recorded too, and the capture checks that
``softmax(q k^T / sqrt(D)) v`` of the recorded tensors reproduces it, so the file holds
exactly the attention the model computed. The result is written with
``zoo.layers.approx_eval.save_samples`` (one non-causal sample per layer, all heads), the
format ``zoo eval approx-attention --qkv`` reads, plus a JSON sidecar naming the checkpoint,
the examples, their labels and the model's predictions.

    python -m zoo.text.capture_qkv --checkpoint runs/lra/image_sdpa/best.safetensors \\
        --task image --count 8 --out runs/approx_lra_image/qkv.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from zoo.layers.approx_eval import (
    AttentionSample,
    parse_capture_arguments,
    save_captured_samples,
    select_examples,
)
from zoo.text.modeling_ponet import SDPASelfAttention

__all__ = ["capture_self_attention_qkv", "main", "select_examples"]

# fp32 attention recomputed in fp64 differs from the model's by rounding only
REPRODUCTION_TOLERANCE = 1e-4


def _heads(t: Tensor, num_heads: int) -> Tensor:
    """(B, N, C) -> (B, H, N, C / H), the split ``SDPASelfAttention`` applies."""
    B, N, C = t.shape
    return t.reshape(B, N, num_heads, C // num_heads).transpose(1, 2)


def _softmax_attention_fp64(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Non-causal softmax attention written out in fp64: (B, H, N, D) -> (B, N, H * D)."""
    q, k, v = q.double(), k.double(), v.double()
    probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    out = probs @ v
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def capture_self_attention_qkv(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    label: str = "",
) -> list[AttentionSample]:
    """q, k, v ``(B, H, N, D)`` of every ``SDPASelfAttention`` layer while ``model`` encodes ``input_ids``.

    Parameters
    ----------
    model:
        A PoNet-family model built with ``mixer="sdpa"`` (any module holding ``SDPASelfAttention``
        layers whose forward takes ``input_ids, attention_mask``). Run in eval mode (no dropout);
        its training flag is restored afterwards.
    input_ids:
        ``(B, N)`` integer tokens.
    attention_mask:
        ``(B, N)``, 1/True = real token. Padded positions are refused: the approximations are
        compared on unmasked attention.
    label:
        Prefix of the sample names (``<label>.<module name>``) and of their ``source``.

    Returns
    -------
    One non-causal ``AttentionSample`` per layer, in forward order, on the CPU in fp32.

    Raises
    ------
    ValueError
        ``input_ids`` not a ``(B, N)`` integer tensor, ``attention_mask`` of another shape or
        with padding, or a model without ``SDPASelfAttention`` layers.
    RuntimeError
        The recorded q, k, v do not reproduce the layer's output (a layer that is not plain
        scaled softmax attention).
    """
    if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.is_complex():
        raise ValueError(
            f"input_ids: expected a (B, N) integer tensor, got {tuple(input_ids.shape)} {input_ids.dtype}"
        )
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask: expected shape {tuple(input_ids.shape)} like input_ids, "
                f"got {tuple(attention_mask.shape)}"
            )
        if not bool(attention_mask.bool().all()):
            raise ValueError(
                f"attention_mask: expected no padding (q/k/v are evaluated without a mask), "
                f"got {int((~attention_mask.bool()).sum())} padded positions"
            )
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, SDPASelfAttention)]
    if not layers:
        mixer = getattr(getattr(model, "config", None), "mixer", None)
        raise ValueError(
            f"model: expected SDPASelfAttention layers (a model built with mixer='sdpa'), found none"
            f" (mixer={mixer!r})"
        )

    recorded: dict[str, dict[str, Tensor]] = {name: {} for name, _ in layers}

    def keep(name: str, what: str):
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            recorded[name][what] = output.detach().float().cpu()

        return hook

    handles = []
    for name, attn in layers:
        handles.append(attn.query.register_forward_hook(keep(name, "q")))
        handles.append(attn.key.register_forward_hook(keep(name, "k")))
        handles.append(attn.value.register_forward_hook(keep(name, "v")))
        handles.append(attn.register_forward_hook(keep(name, "context")))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(input_ids, attention_mask)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    samples = []
    for name, attn in layers:
        got = recorded[name]
        if set(got) != {"q", "k", "v", "context"}:
            raise RuntimeError(f"capture: layer {name} did not run (recorded {sorted(got)})")
        q, k, v = (_heads(got[x], attn.num_heads) for x in "qkv")
        context = got["context"]
        error = (
            (_softmax_attention_fp64(q, k, v) - context.double()).norm() / context.double().norm()
        ).item()
        if not error < REPRODUCTION_TOLERANCE:
            raise RuntimeError(
                f"capture: softmax(q k^T / sqrt(D)) v of layer {name} differs from its output "
                f"(relative error {error:.2e}, expected < {REPRODUCTION_TOLERANCE:g})"
            )
        full = f"{label}.{name}" if label else name
        source = (
            f"{label + ' ' if label else ''}{name}: post-projection q/k/v; output reproduced to {error:.1e}"
        )
        samples.append(AttentionSample(full, q, k, v, causal=False, source=source))
    return samples


def _load_model(checkpoint: Path, model_name: str | None, task_model: str) -> tuple[nn.Module, dict]:
    """The model of a ``zoo train text`` run: ``results.json`` beside the weights gives its config;
    without one, the registered model (``model_name`` or the task's) with ``mixer="sdpa"``."""
    import zoo

    results = checkpoint.parent / "results.json"
    config: dict[str, Any] = {"mixer": "sdpa"}
    if results.is_file():
        saved = json.loads(results.read_text())
        model_name = model_name or saved.get("model")
        config = dict(saved.get("model_config") or config)
        if config.get("mixer") != "sdpa":
            raise ValueError(
                f"checkpoint: expected a model trained with mixer 'sdpa', {results} says {config.get('mixer')!r}"
            )
    name = model_name or task_model
    origin = {"model": name, "config_from": str(results) if results.is_file() else "mixer=sdpa"}
    return zoo.create(name, checkpoint=checkpoint, **config), origin


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m zoo.text.capture_qkv``: held-out examples through a trained sdpa model; q/k/v to a file."""
    from zoo.text.lra import collate, get_task

    p = argparse.ArgumentParser(prog="python -m zoo.text.capture_qkv", description=main.__doc__)
    p.add_argument(
        "--task", default="image", help="LRA task whose examples are encoded (default: %(default)s)"
    )
    p.add_argument(
        "--model", default=None, help="registered model (default: results.json's, else the task's)"
    )
    args, checkpoint = parse_capture_arguments(
        p, argv, checkpoint_help="best.safetensors / checkpoint.pt of zoo train text", unit="examples"
    )
    task = get_task(args.task)
    model, origin = _load_model(checkpoint, args.model, task.model)
    data = task.split(args.split)
    indices = select_examples(len(data), args.count)  # type: ignore[arg-type]
    batch = collate([data[i] for i in indices], task.max_length)
    label = f"{args.task}_sdpa"
    samples = capture_self_attention_qkv(model, batch["input_ids"], batch["attention_mask"], label=label)
    model.eval()
    with torch.no_grad():
        predictions = model(batch["input_ids"], batch["attention_mask"]).logits.argmax(-1)
    command = " ".join(["python -m zoo.text.capture_qkv", *(argv if argv is not None else sys.argv[1:])])
    save_captured_samples(samples, args.out, checkpoint=checkpoint, split=args.split, indices=indices,
                          labels=batch["labels"], predictions=predictions, command=command, **origin,
                          task=args.task)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
