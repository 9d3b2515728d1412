"""Shipped FaViT weights: a card beside a safetensors file under zoo/weights registers `arch.tag`."""

import json

import pytest
import torch

import zoo
import zoo.vision
from zoo import checkpoints, registry
from zoo.cli import main as zoo_main
from zoo.vision.data import FASHION_MNIST_DIR

TAG = "zz_card_test"


@pytest.fixture
def shipped_card(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "weights_dir", lambda: tmp_path)
    monkeypatch.setattr(zoo.vision, "weights_dir", lambda: tmp_path)
    model = zoo.create("favit_b0", num_classes=10)
    path = checkpoints.save(model.state_dict(), tmp_path / f"favit_b0.{TAG}.safetensors")
    card = dict(
        arch="favit_b0",
        tag=TAG,
        file=path.name,
        sha256=registry.sha256_of(path),
        dataset="Fashion-MNIST",
        metrics=dict(top1=12.5, top5=50.0),
        config=dict(num_classes=10),
        command="zoo train image --dataset fashion_mnist",
        data_config=dict(
            input_size=[3, 48, 48], crop_pct=1.0, interpolation="bilinear", mean=[0.5] * 3, std=[0.25] * 3
        ),
    )
    (tmp_path / f"favit_b0.{TAG}.json").write_text(json.dumps(card))
    zoo.vision._register_shipped()
    yield model, path
    registry.get_entry("favit_b0")[0].tags.pop(TAG, None)


def test_card_registers_the_tag_and_its_weights_load(shipped_card):
    model, path = shipped_card
    assert f"favit_b0.{TAG}" in zoo.list_models("favit*", pretrained=True)
    info = zoo.model_info(f"favit_b0.{TAG}")
    assert info["config"]["num_classes"] == 10 and info["pretrained"][TAG]["metrics"]["top1"] == 12.5
    loaded = zoo.create(f"favit_b0.{TAG}", pretrained=True)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ValueError, match="sha256"):
        zoo.create(f"favit_b0.{TAG}", pretrained=True)


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(), reason="no Fashion-MNIST"
)
def test_eval_of_a_shipped_tag_uses_its_preprocessing(shipped_card, tmp_path):
    out = tmp_path / "row.json"
    args = ["-q", "eval", "image", "--dataset", "fashion_mnist", "-m", f"favit_b0.{TAG}", "--pretrained"]
    args += ["--num-samples", "8", "-b", "8", "-j", "0", "--device", "cpu", "--results-file", str(out)]
    assert zoo_main(args + ["--results-format", "json"]) == 0
    row = json.loads(out.read_text())
    assert (row["img_size"], row["crop_pct"], row["interpolation"]) == (48, 1.0, "bilinear")


SHIPPED_CARD = registry.weights_dir() / "favit_b0.fashion_mnist.json"
HAVE_SHIPPED = SHIPPED_CARD.is_file() and (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file()


def eval_shipped(tmp_path, num_samples=None):
    out = tmp_path / "shipped.json"
    args = [
        "-q",
        "eval",
        "image",
        "--dataset",
        "fashion_mnist",
        "--split",
        "test",
        "-m",
        "favit_b0.fashion_mnist",
    ]
    args += ["--pretrained", "-b", "250", "-j", "0", "--device", "cpu", "--results-file", str(out)]
    if num_samples:
        args += ["--num-samples", str(num_samples)]
    assert zoo_main(args + ["--results-format", "json"]) == 0
    return json.loads(out.read_text())


@pytest.mark.skipif(not HAVE_SHIPPED, reason="favit_b0.fashion_mnist weights not shipped in this checkout")
def test_shipped_favit_b0_classifies_fashion_mnist(tmp_path):
    card = json.loads(SHIPPED_CARD.read_text())
    row = eval_shipped(tmp_path, num_samples=1000)
    # far above chance (10%) and consistent with the card measured on all 10k test images
    assert row["top1"] >= 80.0 and abs(row["top1"] - card["metrics"]["top1"]) < 3.0


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SHIPPED, reason="favit_b0.fashion_mnist weights not shipped in this checkout")
def test_shipped_favit_b0_metrics_are_what_the_eval_command_measures(tmp_path):
    card = json.loads(SHIPPED_CARD.read_text())
    row = eval_shipped(tmp_path)
    assert (
        abs(row["top1"] - card["metrics"]["top1"]) <= 0.05
        and abs(row["top5"] - card["metrics"]["top5"]) <= 0.05
    )
