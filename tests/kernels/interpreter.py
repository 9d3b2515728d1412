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
