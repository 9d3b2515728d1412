"""Text family: PoNet encoders (arXiv 2110.02442), Long Range Arena tasks built offline.

Registered models (family ``text``):

- ``ponet_base_uncased``: ``PoNetForPreTraining``, 12 layers, hidden 768, the Hugging Face
  key layout of ``chtan/ponet-base-uncased`` (load it with ``checkpoint=PATH``);
- ``ponet_lra_listops``, ``ponet_lra_image``, ``ponet_lra_text``, ``ponet_lra_retrieval``,
  ``ponet_lra_pathfinder``:
  the 2-layer, width-64 Long Range Arena models of the paper (``mixer="sdpa"`` or
  ``"fnet"`` swaps in the baselines at the same size).

Shipped weights are listed in ``zoo/weights/text_tags.json`` (written by ``zoo train text``)
and registered here when their file is present.
"""

from __future__ import annotations

import json
from typing import Any

from torch import nn

from zoo.registry import PretrainedTag, register_model, register_pretrained, weights_dir
from zoo.text.modeling_ponet import (
    PoNetConfig,
    PoNetForDocumentMatching,
    PoNetForMaskedLM,
    PoNetForPreTraining,
    PoNetForSequenceClassification,
    PoNetModel,
    checkpoint_filter_fn,
)

__all__ = [
    "PoNetConfig",
    "PoNetForDocumentMatching",
    "PoNetForMaskedLM",
    "PoNetForPreTraining",
    "PoNetForSequenceClassification",
    "PoNetModel",
    "checkpoint_filter_fn",
]

PAPER = ("PoNet: Pooling Network for Efficient Token Mixing in Long Sequences", "2110.02442")
EVAL_COMMAND = "zoo eval text --model NAME --task TASK"

BASE_UNCASED = PoNetConfig().to_dict()

# Long Range Arena models of the paper: 2 layers, width 64, 2 heads of 32, FFN 128, mean pooling,
# a 2-layer ReLU classifier of width 128; segment_num as in upstream's lra_config.py.
_LRA_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    type_vocab_size=1,
    layer_norm_eps=1e-12,
    clsgsepg=False,
    classifier_pooling="mean",
    classifier_hidden=128,
)
LRA_VARIANTS: dict[str, tuple[type[nn.Module], dict[str, Any], str]] = {
    "ponet_lra_listops": (
        PoNetForSequenceClassification,
        dict(_LRA_COMMON, vocab_size=32, max_position_embeddings=2048, segment_num=64, num_labels=10),
        "ListOps (10 classes, up to 2000 tokens), zoo.text.lra.ListOps",
    ),
    "ponet_lra_image": (
        PoNetForSequenceClassification,
        dict(_LRA_COMMON, vocab_size=256, max_position_embeddings=1024, segment_num=32, num_labels=10),
        "pixel sequences (Fashion-MNIST, 784 tokens), zoo.text.lra.FashionMNISTPixels",
    ),
    "ponet_lra_text": (
        PoNetForSequenceClassification,
        dict(_LRA_COMMON, vocab_size=258, max_position_embeddings=4096, segment_num=2048, num_labels=6),
        "byte-level document classification (KJV divisions, up to 4000 bytes), zoo.text.lra.KJVDivisions",
    ),
    "ponet_lra_pathfinder": (
        PoNetForSequenceClassification,
        dict(_LRA_COMMON, vocab_size=256, max_position_embeddings=1024, segment_num=1, num_labels=2),
        "our Pathfinder-32 generator (1024 pixel tokens, 2 classes), zoo.text.lra.Pathfinder",
    ),
    "ponet_lra_retrieval": (
        PoNetForDocumentMatching,
        dict(_LRA_COMMON, vocab_size=258, max_position_embeddings=4096, segment_num=64, num_labels=2),
        "byte-level document matching (two KJV passages, same book?), zoo.text.lra.KJVSameBook",
    ),
}


def _builder(cls: type[nn.Module]):
    def build(**config: Any) -> nn.Module:
        return cls(PoNetConfig(**config))

    build.__name__ = f"build_{cls.__name__}"
    return build


register_model(
    "ponet_base_uncased",
    family="text",
    config=BASE_UNCASED,
    paper=PAPER,
    checkpoint_filter_fn=checkpoint_filter_fn,
    eval_command=EVAL_COMMAND,
    description="PoNet base (12 x 768), PoNetForPreTraining (MLM + 3-way sentence structure), Hugging Face key layout",
)(_builder(PoNetForPreTraining))

for _name, (_cls, _overrides, _about) in LRA_VARIANTS.items():
    register_model(
        _name,
        family="text",
        config=PoNetConfig(**_overrides).to_dict(),
        paper=PAPER,
        checkpoint_filter_fn=checkpoint_filter_fn,
        eval_command=EVAL_COMMAND,
        description=f"PoNet LRA model (2 x 64): {_about}",
    )(_builder(_cls))


def _register_shipped_weights() -> None:
    """Tags listed in ``zoo/weights/text_tags.json`` whose weight files are installed."""
    manifest = weights_dir() / "text_tags.json"
    if not manifest.is_file():
        return
    for item in json.loads(manifest.read_text()):
        tag = PretrainedTag(**{k: v for k, v in item.items() if k != "arch"})
        if tag.path().is_file():
            register_pretrained(item["arch"], tag)


_register_shipped_weights()
