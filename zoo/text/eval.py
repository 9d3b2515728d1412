"""``zoo eval text``: accuracy of a registered text model on an LRA-style task split.

Weights come from a shipped tag (``--model ponet_lra_listops.TAG``, loaded with
``pretrained=True``), a local checkpoint (``--checkpoint``, e.g. a ``best.safetensors`` that
``zoo train text`` wrote) or nowhere (random init, useful as a chance-level check). The result
(accuracy, mean cross-entropy, example count, model, task, environment) is printed and, with
``--out``, written as JSON.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Subset

__all__ = ["evaluate_model"]


def evaluate_model(
    model: str,
    task: str | None = None,
    split: str = "test",
    checkpoint: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    limit: int | None = None,
    amp: bool = True,
    task_options: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
    out: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (``arch`` or ``arch.tag``) on ``task``'s ``split``; returns the result dict."""
    import zoo
    from zoo.registry import get_entry
    from zoo.text.lra import TASKS, collate, get_task
    from zoo.text.train import _device, _environment, evaluate

    entry, tag = get_entry(model)
    if task is None:
        task = next((name for name, cls in TASKS.items() if cls.model == entry.name), None)
        if task is None:
            raise ValueError(f"task: {entry.name} is not made for one LRA task; name one of {sorted(TASKS)}")
    lra = get_task(task, **(task_options or {}))
    dev = _device(device)
    net = zoo.create(
        model,
        pretrained=tag is not None and checkpoint is None,
        checkpoint=checkpoint,
        **(model_options or {}),
    )
    net = net.to(dev)
    dataset = lra.split(split)
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    loader = DataLoader(
        dataset, batch_size=batch_size, collate_fn=functools.partial(collate, max_length=lra.max_length)
    )
    metrics = evaluate(net, loader, dev, lra.pair, amp, desc=f"{task}/{split}")
    result = {
        "model": model,
        "checkpoint": checkpoint,
        "task": lra.describe(),
        "split": split,
        **metrics,
        "environment": _environment(dev),
    }
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))
    return result
