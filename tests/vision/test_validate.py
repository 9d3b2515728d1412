"""`zoo eval image` equals timm's validate logic; Fashion-MNIST and IDX reading."""

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from zoo import checkpoints
from zoo.cli import main as zoo_main
from zoo.vision.data import FASHION_MNIST_DIR, FashionMNIST, create_image_dataset, read_idx

HAVE_FASHION_MNIST = (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file()
ROW_FIELDS = [
    "model",
    "top1",
    "top1_err",
    "top5",
    "top5_err",
    "param_count",
    "img_size",
    "crop_pct",
    "interpolation",
]


def reference_predictions(model, paths):
    """timm's own preprocessing (resolve_data_config + create_transform), one image at a time."""
    config = resolve_data_config({}, model=model, use_test_size=True)
    transform = create_transform(**config)
    model.eval()
    with torch.no_grad():
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        return model(x).argmax(-1).tolist(), config


def test_eval_image_equals_timm_validate_on_a_folder(tmp_path):
    # random images; each goes into the class folder the model predicts under timm's preprocessing,
    # so timm's pipeline scores exactly 100 % and any other preprocessing almost surely less
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=3)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    g = torch.Generator().manual_seed(3)
    paths = []
    for i in range(12):
        h, w = 50 + 7 * (i % 3), 70 - 5 * (i % 4)
        level = torch.randint(0, 200, (1, 1, 3), generator=g)
        pixels = (level + torch.randint(0, 56, (h, w, 3), generator=g)).to(torch.uint8).numpy()
        paths.append(scratch / f"{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    # a head that scores each image's pooled features against their mean: diverse classes
    config = resolve_data_config({}, model=model, use_test_size=True)
    transform = create_transform(**config)
    model.eval()
    with torch.no_grad():
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        model.fc.weight.copy_(torch.randn(3, feats.shape[1]) / feats.std(0).clamp_min(1e-6))
        model.fc.bias.copy_(-model.fc.weight @ feats.mean(0))
    preds, config = reference_predictions(model, paths)
    assert len(set(preds)) == 3, f"degenerate test: predictions {preds}"
    classes = ["ant", "bee", "cat"]
    for i, (p, c) in enumerate(zip(paths, preds)):
        folder = tmp_path / "data" / "validation" / classes[c]
        folder.mkdir(parents=True, exist_ok=True)
        p.rename(folder / f"{i}.png")
    ckpt = checkpoints.save(model.state_dict(), tmp_path / "resnet10t.safetensors")
    results_file = tmp_path / "row.json"
    args = ["eval", "image", str(tmp_path / "data"), "-m", "resnet10t", "--num-classes", "3"]
    args += ["--checkpoint", str(ckpt), "-b", "5", "-j", "0", "--device", "cpu"]
    args += ["--results-file", str(results_file), "--results-format", "json"]
    assert zoo_main(["-q", *args]) == 0
    row = json.loads(results_file.read_text())
    assert list(row) == ROW_FIELDS
    assert row["top1"] == 100.0 and row["top1_err"] == 0.0 and row["top5"] == 100.0
    assert row["param_count"] == round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    assert (row["img_size"], row["crop_pct"], row["interpolation"]) == (
        config["input_size"][-1],
        config["crop_pct"],
        config["interpolation"],
    )

    # a different preprocessing (no center crop, other size) moves predictions off the labels
    args_csv = args[:-4] + [
        "--results-file",
        str(tmp_path / "row.csv"),
        "--crop-pct",
        "1.0",
        "--img-size",
        "96",
    ]
    assert zoo_main(["-q", *args_csv]) == 0
    lines = (tmp_path / "row.csv").read_text().splitlines()
    assert lines[0].split(",") == ROW_FIELDS
    assert lines[1].split(",")[6:8] == ["96", "1.0"]
    assert float(lines[1].split(",")[1]) < 100.0


def test_eval_image_reports_unknown_model_and_missing_folder(tmp_path, capsys):
    assert zoo_main(["eval", "image", str(tmp_path), "-m", "no_such_model_xyz", "--device", "cpu"]) == 2
    assert "neither a zoo model" in capsys.readouterr().err
    assert zoo_main(["eval", "image", str(tmp_path / "nope"), "-m", "resnet10t", "--device", "cpu"]) == 2


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_and_fashion_mnist_from_a_folder(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), images)
    data = create_image_dataset("", root=tmp_path, split="validation")
    assert isinstance(data, FashionMNIST) and len(data) == 5
    img, label = data[2]
    assert label == 4 and img.mode == "RGB" and img.size == (28, 28)
    np.testing.assert_array_equal(np.asarray(img)[..., 0], images[2])
    with pytest.raises(ValueError, match="split: expected one of"):
        FashionMNIST(tmp_path, split="dev")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04"))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad.gz")


@pytest.mark.skipif(not HAVE_FASHION_MNIST, reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_package_and_eval_defaults(tmp_path):
    test = FashionMNIST(split="test")
    assert len(test) == 10000 and test.targets[:5].tolist() == [9, 2, 1, 1, 6]
    assert np.bincount(test.targets).tolist() == [1000] * 10

    import zoo

    model = zoo.create("favit_b0", num_classes=10)
    ckpt = checkpoints.save(model.state_dict(), tmp_path / "favit_b0.safetensors")
    out = tmp_path / "row.json"
    args = ["-q", "eval", "image", "--dataset", "fashion_mnist", "-m", "favit_b0", "--num-classes", "10"]
    args += ["--checkpoint", str(ckpt), "--num-samples", "24", "-b", "8", "-j", "0", "--device", "cpu"]
    assert zoo_main(args + ["--results-file", str(out), "--results-format", "json"]) == 0
    row = json.loads(out.read_text())
    assert (row["img_size"], row["crop_pct"], row["param_count"]) == (64, 1.0, 3.17)
