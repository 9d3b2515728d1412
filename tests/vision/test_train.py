"""`zoo train image`: a few steps on Fashion-MNIST (or a tiny folder), resume, and the eval round trip."""

import json

import pytest
from safetensors import safe_open

from zoo.cli import main as zoo_main
from zoo.vision import train as train_module
from zoo.vision.data import FASHION_MNIST_DIR

HAVE_FASHION_MNIST = (FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz").is_file()


def adam_steps(out):
    steps = set()
    for shard in out.glob("optimizer-*-of-*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            steps |= {int(f.get_tensor(k)) for k in f.keys() if k.endswith(".step")}
    return steps


def run_train(out, *extra):
    args = ["--dataset", "fashion_mnist", "-m", "favit_b0", "--img-size", "32", "-b", "8", "-j", "0"]
    args += ["--num-samples", "16", "--num-val-samples", "16", "--epochs", "2", "--warmup-epochs", "1"]
    args += ["--device", "cpu", "--out", str(out), "--log-interval", "0", *extra]
    return train_module.main(args)


@pytest.mark.skipif(not HAVE_FASHION_MNIST, reason="Debian package dataset-fashion-mnist not installed")
def test_train_stops_resumes_and_our_eval_reproduces_its_metrics(tmp_path):
    out = tmp_path / "run"
    recipe = ["--mixup", "0.2", "--cutmix", "1.0", "--model-ema", "--reprob", "0.25", "--clip-grad", "1.0"]
    # first run stops (resumably) after its first epoch; the state is safetensors shards + JSON
    assert run_train(out, *recipe, "--max-minutes", "0", "--shard-mb", "4") == 0
    state = json.loads((out / "resume.json").read_text())
    assert (state["epoch"], state["num_updates"], state["num_epochs"]) == (1, 2, 2)
    shards = sorted(out.glob("optimizer-*-of-*.safetensors"))
    assert len(shards) == len(state["optimizer_shards"]) >= 3  # 2 x 12.7 MB of AdamW moments
    assert all(p.stat().st_size < 4.2 * 2**20 for p in shards)
    assert adam_steps(out) == {2}
    first = json.loads((out / "metrics.json").read_text())
    assert first["complete"] is False and first["epochs_done"] == 1

    # second run continues from the saved state to the end of the schedule
    assert run_train(out, *recipe, "--resume", "auto") == 0
    state = json.loads((out / "resume.json").read_text())
    assert (state["epoch"], state["num_updates"]) == (2, 4)
    assert adam_steps(out) == {4}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] is True and metrics["epochs_done"] == 2 and metrics["ema"] is True
    history = (out / "log.csv").read_text().splitlines()
    assert len(history) == 3  # header + two epochs

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["model"]) == "favit_b0" and json.loads(meta["num_classes"]) == 10
    assert json.loads(meta["data_config"])["input_size"] == [3, 32, 32]

    # `zoo eval image` on the saved weights: model, classes and preprocessing come from the file
    row_file = tmp_path / "row.json"
    args = [
        "-q",
        "eval",
        "image",
        "--dataset",
        "fashion_mnist",
        "--checkpoint",
        str(out / "model.safetensors"),
    ]
    args += ["--num-samples", "16", "-b", "8", "-j", "0", "--device", "cpu"]
    assert zoo_main(args + ["--results-file", str(row_file), "--results-format", "json"]) == 0
    row = json.loads(row_file.read_text())
    assert row["model"] == "favit_b0" and row["img_size"] == 32
    assert row["top1"] == metrics["top1"] and row["top5"] == metrics["top5"]


def test_train_on_an_image_folder_with_a_timm_model(tiny_image_folder, tmp_path):
    out = tmp_path / "folder_run"
    args = [str(tiny_image_folder), "--train-split", "validation", "-m", "resnet10t", "--num-classes", "3"]
    args += ["--img-size", "32", "-b", "4", "-j", "0", "--epochs", "1", "--max-steps", "2", "--device", "cpu"]
    args += ["--out", str(out), "--log-interval", "1", "--opt", "sgd", "--lr", "0.01", "--sched", "step"]
    assert zoo_main(["-q", "train", "image", *args]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["updates"] == 2 and metrics["param_count"] == 4.92
    command = metrics["command"]
    assert command.startswith("zoo train image ") and f"{tiny_image_folder} " in command
    assert "--model resnet10t" in command and "--num-classes 3" in command and "--sched step" in command


def test_bad_train_arguments(tmp_path):
    with pytest.raises(ValueError, match="neither a zoo model"):
        train_module.main(
            ["--dataset", "fashion_mnist", "-m", "nope_model", "--device", "cpu", "--out", str(tmp_path)]
        )


@pytest.mark.skipif(not HAVE_FASHION_MNIST, reason="Debian package dataset-fashion-mnist not installed")
def test_time_budget_fits_the_epochs_after_the_first(tmp_path):
    out = tmp_path / "budget"
    args = ["--dataset", "fashion_mnist", "-m", "favit_b0", "--img-size", "32", "-b", "8", "-j", "0"]
    args += ["--num-samples", "16", "--num-val-samples", "8", "--epochs", "1000", "--time-budget", "0.1"]
    args += ["--device", "cpu", "--out", str(out), "--log-interval", "0", "--eval-every", "0"]
    assert train_module.main(args) == 0
    state = json.loads((out / "resume.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert state["fitted"] is True and 1 <= state["num_epochs"] < 1000
    assert metrics["epochs_done"] == metrics["epochs_planned"] == state["num_epochs"]
