"""Shipping OSSE weights: manifests carry the run's metrics and the file's sha256, and register as tags."""

import json

import torch

from zoo.checkpoints import save
from zoo.registry import get_entry, sha256_of, weights_dir
from zoo.weather import osse
from zoo.weather.shipping import ship

RESULTS = {
    "forecaster": {
        "metrics": {
            "rmse_6h": {"geopotential/500": 333.35},
            "rmse_20_steps": {"geopotential/500": 2634.9},
            "rmse_persistence": {"geopotential/500": 918.7},
        }
    },
    "eval": {
        "by_fraction": {
            "0.1": {"adas_over_background": {"geopotential": 0.79303}},
            "0.001": {"adas_over_background": {"geopotential": 0.94846}},
        },
        "cycling": {
            "cycles": 1458,
            "adas": {"rmse_last_30_days": {"geopotential": 1440.93}, "diverged": False},
        },
    },
}


def test_ship_writes_weights_and_manifests_with_the_runs_metrics(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name, arch in (("forecaster", "fengwu_lite_osse_64x128"), ("adas", "adas_osse_64x128")):
        save({"weight": torch.randn(3, 2)}, run / f"{name}.safetensors")
        sidecar = {"arch": arch, "config": {"grid": [64, 128]}, "layout": {"upper": ["z"]}, "history": 2}
        (run / f"{name}.json").write_text(json.dumps(sidecar))
    (run / "results.json").write_text(json.dumps(RESULTS))

    written = ship(run, command="zoo train weather all --budget-minutes 7.6", target_dir=tmp_path / "shipped")

    assert sorted(p.name for p in written) == [
        "adas_osse_64x128.osse.safetensors",
        "fengwu_lite_osse_64x128.osse.safetensors",
    ]
    sources = {"adas_osse_64x128": "adas", "fengwu_lite_osse_64x128": "forecaster"}
    for path in written:
        manifest = json.loads(path.with_suffix(".json").read_text())
        source = run / f"{sources[manifest['arch']]}.safetensors"
        assert manifest["sha256"] == sha256_of(path) == sha256_of(source)
        assert manifest["command"] == "zoo train weather all --budget-minutes 7.6"
        assert manifest["extra"] == {"layout": {"upper": ["z"]}, "history": 2}
    adas = json.loads((tmp_path / "shipped" / "adas_osse_64x128.osse.json").read_text())["metrics"]
    assert adas == {
        "rmse_ratio_geopotential@10%": 0.793,
        "rmse_ratio_geopotential@0.1%": 0.9485,
        "cycle_rmse_last_30_days_geopotential": 1440.93,
        "cycles": 1458,
        "cycle_diverged": False,
    }
    forecaster = json.loads((tmp_path / "shipped" / "fengwu_lite_osse_64x128.osse.json").read_text())[
        "metrics"
    ]
    assert forecaster == {"rmse_6h_geopotential/500": 333.35, "rmse_20_steps_geopotential/500": 2634.9}


def test_shipped_osse_weights_are_registered_with_their_files():
    for arch in ("adas_osse_64x128", "fengwu_lite_osse_64x128"):
        entry, _ = get_entry(arch)
        tag = entry.tags[entry.default_tag]
        assert entry.default_tag == "osse"
        assert tag.sha256 == sha256_of(weights_dir() / tag.file)
        assert tag.metrics and "layout" in tag.extra and "normalisation" in tag.extra
    assert osse.shipped_forecaster(64, 128) == "fengwu_lite_osse_64x128.osse"
    assert osse.shipped_forecaster(16, 32) is None
