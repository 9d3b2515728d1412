"""Fine-tuning Adas: ``--init`` starts it from given weights, ``--forecaster`` replaces the forecaster's training."""

from __future__ import annotations

import json

import pytest
import torch

from zoo import checkpoints
from zoo.cli import main
from zoo.weather import create_model
from zoo.weather.nature_run import generate_nature_run
from zoo.weather.train import _save_model, resolve_checkpoint, train_forecaster

GRID = ["--nlat", "16", "--nlon", "32", "--device", "cpu"]
# distinct from the increment scale train_adas measures from the forecaster's errors
SOURCE_SCALE = [0.3, 0.5, 0.7]


@pytest.fixture(scope="module")
def osse(tmp_path_factory):
    """A 16x32 nature run (3 days a year), a forecaster after one step, and an Adas to start from."""
    data = tmp_path_factory.mktemp("osse")
    generate_nature_run(
        data, years=(2001, 2002, 2003, 2004), nlat=16, nlon=32, days=3.0, spinup_days=1.0, show_progress=False
    )
    train_forecaster(data, data / "fc", "fengwu_lite_tiny", minutes=5, max_steps=1, batch=2, nlat=16, nlon=32)
    forecaster = data / "fc" / "forecaster.safetensors"
    fmeta = json.loads(forecaster.with_suffix(".json").read_text())
    torch.manual_seed(123)
    source = create_model("adas_osse_tiny", grid=(16, 32))
    source.set_increment_scale(SOURCE_SCALE)
    meta = {"arch": "adas_osse_tiny", "config": {"grid": [16, 32]}}
    meta.update({k: fmeta[k] for k in ("layout", "normalisation")})
    init = _save_model(data / "src", "adas", source, meta)
    return {"data": data, "forecaster": forecaster, "init": init, "state": source.state_dict()}


def test_init_starts_adas_from_the_given_weights(osse, tmp_path):
    out = tmp_path / "ft"
    argv = ["-q", "train", "weather", "adas", "--data", str(osse["data"]), "--out", str(out), *GRID]
    argv += ["--forecaster", str(osse["forecaster"]), "--arch", "adas_osse_tiny", "--streams", "2"]
    assert main([*argv, "--init", str(osse["init"]), "--max-steps", "0"]) == 0
    saved = checkpoints.load(out / "adas.safetensors")  # parameters saved in bf16, buffers in fp32
    assert set(saved) == set(osse["state"])
    for name, value in osse["state"].items():
        assert torch.equal(saved[name], value.to(saved[name].dtype)), name
    assert saved["increment_scale"].tolist() == pytest.approx(SOURCE_SCALE)
    meta = json.loads((out / "adas.json").read_text())
    assert meta["init"]["source"] == str(osse["init"]) and meta["increment_scale"] == pytest.approx(
        SOURCE_SCALE
    )
    # a training step moves the weights away from the source, but not far
    assert main([*argv, "--init", str(osse["init"]), "--max-steps", "1", "--out", str(tmp_path / "one")]) == 0
    moved = checkpoints.load(tmp_path / "one" / "adas.safetensors")
    assert any(not torch.equal(moved[k], saved[k]) for k in saved)


def test_bad_init_and_forecaster_are_named(osse, tmp_path, capsys):
    argv = ["-q", "train", "weather", "adas", "--data", str(osse["data"]), "--out", str(tmp_path), *GRID]
    argv += ["--forecaster", str(osse["forecaster"]), "--max-steps", "0"]
    assert main([*argv, "--init", str(osse["forecaster"]), "--arch", "adas_osse_tiny"]) == 2
    assert "init: expected adas weights" in capsys.readouterr().err
    assert main([*argv, "--init", str(osse["init"]), "--arch", "adas_osse_64x128"]) == 2
    assert "init: expected adas_osse_64x128 weights" in capsys.readouterr().err
    assert main([*argv, "--init", "shipped", "--arch", "adas_osse_tiny"]) == 2  # nothing shipped at 16x32
    assert "init: expected shipped adas weights for the 16x32 grid" in capsys.readouterr().err
    with pytest.raises(ValueError, match="forecaster: expected forecaster weights"):
        resolve_checkpoint(osse["init"], "forecaster", 16, 32)


def test_shipped_weights_resolve_with_their_normalisation():
    path, meta = resolve_checkpoint("shipped", "adas", 64, 128, argument="init")
    assert path.name == "adas_osse_64x128.osse.safetensors" and meta["source"] == "adas_osse_64x128.osse"
    assert len(meta["normalisation"]["std"]) == 3 and meta["arch"] == "adas_osse_64x128"


def test_all_with_a_given_forecaster_trains_only_adas_and_evaluates(osse, tmp_path):
    data, out = osse["data"], tmp_path / "all"
    argv = ["-q", "train", "weather", "all", "--data", str(data), "--out", str(out), *GRID]
    argv += ["--days", "3", "--spinup-days", "1", "--budget-minutes", "0.05", "--eval-minutes", "0"]
    argv += ["--samples", "2", "--cycles", "3", "--adas-arch", "adas_osse_tiny", "--streams", "2"]
    assert main([*argv, "--forecaster", str(osse["forecaster"]), "--adas-init", str(osse["init"])]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["forecaster"]["source"] == str(osse["forecaster"]) and results["forecaster"]["steps"] == 1
    assert set(results["forecaster"]["metrics"]) >= {"rmse_6h", "rmse_persistence"}
    assert not (data / "runs" / "forecaster_train.pt").exists()  # no forecaster training
    assert results["adas"]["init"]["source"] == str(osse["init"]) and results["adas"]["steps"] >= 1
    assert set(results["eval"]["by_fraction"]) == {"0.1", "0.01", "0.001"}
    assert results["eval"]["models"] == {"forecaster": "forecaster.safetensors", "adas": "adas.safetensors"}
    copied, given = checkpoints.load(out / "forecaster.safetensors"), checkpoints.load(osse["forecaster"])
    assert set(copied) == set(given) and all(torch.equal(copied[k], given[k]) for k in given)
