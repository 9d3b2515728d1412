import subprocess
import sys

import pytest

from zoo.cli import main


def test_list_and_info(capsys, tiny_arch):
    assert main(["list", "--params"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "family", "params", "pretrained"]
    assert any(line.split() == ["zz_tinynet", "vision", "67", "toy"] for line in lines)
    assert main(["list", "zz_*", "--pretrained"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split() == ["zz_tinynet.toy", "vision", "toy"]
    assert main(["info", "zz_tinynet.toy"]) == 0
    out = capsys.readouterr().out
    assert "paper:   A tiny net (arXiv 0000.00000)" in out and "dataset random  top1 12.5" in out


def test_unknown_model_is_one_line_without_traceback(capsys):
    assert main(["info", "definitely_not_a_model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo info: error: unknown model 'definitely_not_a_model'")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_arguments_exit_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["list", "--family"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err


def test_bad_family_is_a_user_error(capsys):
    assert main(["list", "--family", "audio"]) == 2
    assert "family: expected one of" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--help"], ["list", "--help"], ["eval", "--help"], ["train", "--help"]])
def test_every_command_has_help(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_python_dash_m_zoo():
    done = subprocess.run([sys.executable, "-m", "zoo", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("attnzoo ")
