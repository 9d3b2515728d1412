"""Run a check script through the Triton interpreter in a fresh process.

``TRITON_INTERPRET`` is read when kernels are built, and the test process may already have built
them compiled, so interpreter checks run in a child Python that prints one JSON object per check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_interpreted(script: str, timeout: float = 600) -> dict[str, dict]:
    """Rows printed by ``script`` under ``TRITON_INTERPRET=1``, keyed by their ``name``."""
    pytest.importorskip("triton")
    env = dict(
        os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    proc = subprocess.run(
        [sys.executable, script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    rows = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            rows[row["name"]] = row
    if not rows:
        pytest.fail(f"interpreter run gave no results (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return rows


def print_check_rows(checks: dict) -> None:
    """Script side: run each ``name -> callable`` check and print its row as one JSON line (errors as rows)."""
    for name, check in checks.items():
        try:
            row = check()
        except Exception as err:  # reported by the test that reads the row
            row = {"error": f"{type(err).__name__}: {err}"}
        print(json.dumps({"name": name, **row}), flush=True)


def assert_fp64_row(row: dict | None, name: str, shape, dtype, keys, tolerance: float) -> None:
    """Test side: a check's row ran, has the expected shape and dtype, and every error in ``keys`` is small.

    Rows come from ``compare`` functions that also record the parameter gradients' dtypes (fp32
    parameters keep fp32 gradients) and whether the no-grad launch gives the same output.
    """
    assert row is not None, f"{name} did not run"
    assert "error" not in row, row["error"]
    assert row["shape"] == list(shape) and row["dtype"] == str(dtype).replace("torch.", "")
    for key in keys:
        assert row[key] < tolerance, (key, row)
    assert row["param_grad_dtypes"] == ["torch.float32", "torch.float32"]
    assert row["no_grad_equal"]
