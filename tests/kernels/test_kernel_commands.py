"""The kernels' CLI pieces: ``zoo bench block-sparse`` is registered, and the demo runs."""

import pytest

from zoo import cli


def test_bench_block_sparse_is_registered(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "block-sparse", "--help"])
    assert exit_info.value.code == 0
    assert "bench/block_sparse.py" in capsys.readouterr().out


def test_demo_prints_density_and_error(capsys):
    assert cli.main(["demo", "--only", "kernels"]) == 0
    out = capsys.readouterr().out
    assert "density" in out and "rel. error vs dense" in out
    last = out.strip().splitlines()[-1].split()
    assert float(last[0]) == 1.0 and float(last[1]) == 1.0 and float(last[2]) < 1e-5
