"""bench/approx_train.py trains approximate-attention layers end to end (tiny CPU run)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("approx_train", ROOT / "bench" / "approx_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layers_train_and_the_results_are_written(tmp_path):
    script = _script()
    args = [
        "--device",
        "cpu",
        "--layers",
        "dense_sdpa",
        "spt_pq_sparse",
        "--seconds",
        "30",
        "--max-steps",
        "25",
    ]
    args += ["--length", "32", "--dim", "32", "--heads", "2", "--batch", "4", "--out", str(tmp_path)]
    assert script.main(args) == 0
    result = json.loads((tmp_path / "approx_train.json").read_text())
    rows = {r["layer"]: r for r in result["rows"]}
    assert set(rows) == {"dense_sdpa", "spt_pq_sparse"} and result["all_trained"]
    for row in rows.values():
        assert row["steps"] == 25 and row["last_loss"] < row["first_loss"] and row["finite_grads"]
        assert row["params_without_grad"] == []


def test_unknown_layer_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--layers"):
        _script().main(["--device", "cpu", "--layers", "nope", "--out", str(tmp_path)])
