"""The GPU scripts run end to end on the CPU at toy sizes (slow: imports timm models and trains a few steps)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_vision_runs_on_cpu(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "vision.py"),
        "--device",
        "cpu",
        "--models",
        "favit_b0",
        "pvt_v2_b0",
    ]
    cmd += ["--img-size", "64", "--infer-batch", "2", "--train-batch", "2", "--warmup", "0", "--iters", "1"]
    cmd += ["--compile", "--profile", "favit_b0", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, timeout=900)
    result = json.loads((tmp_path / "vision.json").read_text())
    rows = {r["model"]: r for r in result["rows"]}
    assert rows["favit_b0"]["params_m"] == 3.428 and rows["favit_b0"]["infer_img_s"] > 0
    assert (tmp_path / "vision_profile_favit_b0.txt").is_file()


@pytest.mark.slow
def test_bench_fashion_mnist_smoke_and_resume(tmp_path):
    script, out, work = str(ROOT / "bench" / "fashion_mnist.py"), tmp_path / "out", tmp_path / "work"
    subprocess.run(
        [sys.executable, script, "--out", str(out), "--work", str(work), "--smoke"], check=True, timeout=1200
    )
    card = json.loads((out / "favit_b0.fashion_mnist.json").read_text())
    assert card["arch"] == "favit_b0" and card["config"] == {"num_classes": 10}
    summary = json.loads((out / "fashion_mnist.json").read_text())
    assert [r["model"] for r in summary["rows"]] == ["favit_b0", "pvt_v2_b0", "swin_tiny_patch4_window7_224"]
    kept = [p for p in out.rglob("*") if p.is_file()]
    assert len(kept) <= 8 and all(p.stat().st_size < 16 * 2**20 for p in kept)
    # the smoke run stops mid-epoch, so favit_b0's state came back; continue it from there
    assert (out / "favit_b0_resume" / "resume.json").is_file()
    cmd = [
        sys.executable,
        script,
        "--out",
        str(tmp_path / "out2"),
        "--work",
        str(tmp_path / "work2"),
        "--smoke",
    ]
    subprocess.run(cmd + ["--models", "favit_b0", "--resume-from", str(out)], check=True, timeout=1200)
    again = json.loads((tmp_path / "out2" / "fashion_mnist.json").read_text())["rows"][0]
    assert again["updates"] == 4  # two steps before, two after resuming
