"""Hugging Face ``transformers`` interop for PoNet (arXiv 2110.02442) pretraining models.

Our ``PoNetForPreTraining`` has the module names of the Hugging Face checkpoint
``chtan/ponet-base-uncased``, so moving weights either way is a matter of config files:

- ``to_transformers(model)``: a ``transformers.PreTrainedModel`` (``PoNetHFForPreTraining``,
  config ``model_type="ponet"``, registered with ``AutoConfig`` / ``AutoModelForPreTraining``)
  holding the same modules; ``save_pretrained`` / ``from_pretrained`` work on it;
- ``save_pretrained(model, folder, vocab_file=None)``: a Hugging Face style folder
  (``config.json`` with BertConfig field names plus ``clsgsepg``, ``model.safetensors``,
  optional ``vocab.txt`` + ``tokenizer_config.json`` for ``BertTokenizer``); written with
  ``transformers`` when it is installed, else by hand in the same layout;
- ``from_pretrained_folder(folder)``: our model from such a folder (ours, or one holding the
  official ``config.json`` + ``pytorch_model.bin``), loaded strictly through
  ``checkpoint_filter_fn``.

``transformers`` is imported inside the functions only.
"""

from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any

from torch import nn

from zoo import checkpoints
from zoo.text.modeling_ponet import (
    PoNetConfig,
    PoNetForPreTraining,
    PoNetLMPredictionHead,
    checkpoint_filter_fn,
)

__all__ = ["from_pretrained_folder", "save_pretrained", "to_transformers", "transformers_classes"]

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@lru_cache(maxsize=1)
def transformers_classes() -> tuple[type, type]:
    """``(PoNetHFConfig, PoNetHFForPreTraining)``, defined on first use and registered with the Auto classes."""
    from dataclasses import dataclass

    import torch
    import transformers
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.utils import ModelOutput

    major = int(transformers.__version__.split(".")[0])

    class PoNetHFConfig(PretrainedConfig):
        model_type = "ponet"

        def __init__(self, **kwargs: Any) -> None:
            ours = PoNetConfig().to_dict()
            values = {k: kwargs.pop(k, v) for k, v in ours.items() if k not in ("pad_token_id", "num_labels")}
            kwargs.setdefault("pad_token_id", ours["pad_token_id"])
            tie = kwargs.pop("tie_word_embeddings", True)  # the MLM decoder shares the word embeddings
            super().__init__(**kwargs)
            self.tie_word_embeddings = tie
            for key, value in values.items():
                setattr(self, key, value)

        def to_ponet(self) -> PoNetConfig:
            return PoNetConfig.from_dict({**self.to_dict(), "num_labels": self.num_labels})

    @dataclass
    class PoNetHFPreTrainingOutput(ModelOutput):
        loss: torch.Tensor | None = None
        mlm_loss: torch.Tensor | None = None
        sso_loss: torch.Tensor | None = None
        prediction_logits: torch.Tensor | None = None
        seq_relationship_logits: torch.Tensor | None = None

    class PoNetHFForPreTraining(PreTrainedModel):
        config_class = PoNetHFConfig
        base_model_prefix = "ponet"
        if major >= 5:
            _tied_weights_keys = {"cls.predictions.decoder.weight": "ponet.embeddings.word_embeddings.weight"}
        else:  # pragma: no cover - transformers 4.x
            _tied_weights_keys = ["cls.predictions.decoder.weight"]

        def __init__(self, config: PoNetHFConfig) -> None:
            super().__init__(config)
            inner = PoNetForPreTraining(config.to_ponet())
            self.ponet, self.cls = inner.ponet, inner.cls
            self.post_init()

        def _init_weights(self, module: nn.Module) -> None:
            super()._init_weights(module)
            if isinstance(module, PoNetLMPredictionHead):
                nn.init.zeros_(module.bias)

        def get_input_embeddings(self) -> nn.Module:
            return self.ponet.embeddings.word_embeddings

        def set_input_embeddings(self, value: nn.Module) -> None:
            self.ponet.embeddings.word_embeddings = value

        def get_output_embeddings(self) -> nn.Module:
            return self.cls.predictions.decoder

        def set_output_embeddings(self, value: nn.Module) -> None:
            self.cls.predictions.decoder = value

        def forward(
            self,
            input_ids=None,
            attention_mask=None,
            token_type_ids=None,
            segment_ids=None,
            position_ids=None,
            inputs_embeds=None,
            labels=None,
            next_sentence_label=None,
            **_: Any,
        ) -> PoNetHFPreTrainingOutput:
            out = PoNetForPreTraining.forward(
                self,
                input_ids,
                attention_mask,
                token_type_ids,
                segment_ids,
                position_ids,
                inputs_embeds,
                labels,
                next_sentence_label,
            )
            return PoNetHFPreTrainingOutput(
                loss=out.loss,
                mlm_loss=out.mlm_loss,
                sso_loss=out.sso_loss,
                prediction_logits=out.prediction_logits,
                seq_relationship_logits=out.seq_relationship_logits,
            )

    from transformers import AutoConfig, AutoModelForPreTraining

    try:
        AutoConfig.register("ponet", PoNetHFConfig)
        AutoModelForPreTraining.register(PoNetHFConfig, PoNetHFForPreTraining)
    except ValueError:  # pragma: no cover - another definition was registered first
        pass
    return PoNetHFConfig, PoNetHFForPreTraining


def to_transformers(model: PoNetForPreTraining) -> nn.Module:
    """The same weights as a ``transformers.PreTrainedModel`` (needs ``transformers``)."""
    if not isinstance(model, PoNetForPreTraining):
        raise ValueError(f"model: expected a PoNetForPreTraining, got {type(model).__name__}")
    config_cls, model_cls = transformers_classes()
    config = config_cls(**model.config.to_dict(), architectures=["PoNetForPreTraining"])
    hf = model_cls(config)
    hf.load_state_dict(model.state_dict())
    return hf.to(next(model.parameters()).dtype)


def _hf_config_dict(config: PoNetConfig) -> dict[str, Any]:
    return {
        "architectures": ["PoNetForPreTraining"],
        "model_type": "ponet",
        **config.to_dict(),
        "position_embedding_type": "absolute",
    }


def save_pretrained(
    model: PoNetForPreTraining, folder: str | Path, vocab_file: str | Path | None = None
) -> Path:
    """Write a Hugging Face style folder (config.json, model.safetensors, optional vocab.txt)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        to_transformers(model).save_pretrained(folder)
    except ImportError:
        (folder / "config.json").write_text(json.dumps(_hf_config_dict(model.config), indent=2))
        state = {k: v for k, v in model.state_dict().items() if k != "cls.predictions.decoder.weight"}
        checkpoints.save(state, folder / "model.safetensors", metadata={"format": "pt"})
    if vocab_file is not None:
        shutil.copyfile(vocab_file, folder / "vocab.txt")
        (folder / "tokenizer_config.json").write_text(
            json.dumps(
                {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}, indent=2
            )
        )
    return folder


def from_pretrained_folder(folder: str | Path) -> PoNetForPreTraining:
    """Our ``PoNetForPreTraining`` from a Hugging Face style folder (config.json + weights), strictly."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"folder: no config.json in {folder}")
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"folder: none of {WEIGHT_FILES} in {folder}")
    model = PoNetForPreTraining(PoNetConfig.from_dict(json.loads(config_path.read_text())))
    checkpoints.load_into(model, checkpoints.load(weights), filter_fn=checkpoint_filter_fn, strict=True)
    return model
