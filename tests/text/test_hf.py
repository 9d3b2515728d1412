"""Hugging Face interop: export to a transformers model and folders, and back, with identical logits."""

import json

import pytest
import torch

import zoo
from zoo.text import hf
from zoo.text.hf import from_pretrained_folder, save_pretrained, to_transformers
from zoo.text.modeling_ponet import PoNetConfig, PoNetForPreTraining

from .test_modeling import TINY, official_state_dict, sentence_pair_batch


def tiny_model():
    torch.manual_seed(0)
    model = PoNetForPreTraining(PoNetConfig(**TINY)).eval()
    with torch.no_grad():
        model.cls.predictions.bias.normal_()  # make the bias matter
    return model


def test_to_transformers_and_back_through_a_folder(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForPreTraining

    model = tiny_model()
    ids, mask = sentence_pair_batch()
    ref = model(ids, mask)
    exported = to_transformers(model).eval()
    torch.testing.assert_close(
        exported(input_ids=ids, attention_mask=mask).prediction_logits, ref.prediction_logits
    )
    vocab = tmp_path / "v.txt"
    vocab.write_text("[PAD]\n[UNK]\n")
    folder = save_pretrained(model, tmp_path / "ponet", vocab_file=vocab)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "ponet" and config["clsgsepg"] is True and config["hidden_size"] == 32
    assert (folder / "vocab.txt").is_file() and json.loads((folder / "tokenizer_config.json").read_text())[
        "do_lower_case"
    ]
    loaded = AutoModelForPreTraining.from_pretrained(folder).eval()
    assert loaded.cls.predictions.decoder.weight is loaded.ponet.embeddings.word_embeddings.weight
    out = loaded(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out.prediction_logits, ref.prediction_logits)
    torch.testing.assert_close(out.seq_relationship_logits, ref.seq_relationship_logits)
    back = from_pretrained_folder(folder).eval()
    torch.testing.assert_close(back(ids, mask).prediction_logits, ref.prediction_logits)


def test_folder_without_transformers_and_official_folder(tmp_path, monkeypatch):
    model = tiny_model()
    ids, mask = sentence_pair_batch()

    def no_transformers(_):
        raise ImportError("transformers is not installed")

    monkeypatch.setattr(hf, "to_transformers", no_transformers)
    folder = save_pretrained(model, tmp_path / "plain")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    torch.testing.assert_close(
        from_pretrained_folder(folder)(ids, mask).prediction_logits, model(ids, mask).prediction_logits
    )

    # the official layout: BertConfig-style config.json (model_type "bert") + pytorch_model.bin
    official = tmp_path / "official"
    official.mkdir()
    (official / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["PoNetForPreTraining"], **TINY})
    )
    torch.save(official_state_dict(TINY), official / "pytorch_model.bin")
    ours = from_pretrained_folder(official).eval()
    via_registry = zoo.create("ponet_base_uncased", checkpoint=official / "pytorch_model.bin", **TINY).eval()
    torch.testing.assert_close(ours(ids, mask).prediction_logits, via_registry(ids, mask).prediction_logits)


def test_interop_errors(tmp_path):
    with pytest.raises(
        ValueError, match="model: expected a PoNetForPreTraining, got PoNetForSequenceClassification"
    ):
        to_transformers(zoo.create("ponet_lra_listops", max_position_embeddings=32))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained_folder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained_folder(tmp_path)
