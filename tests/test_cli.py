from __future__ import annotations

import subprocess
import sys

import pytest

from m2flow.cli import main


@pytest.mark.parametrize("command", ["train", "demo"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "key=value" in out


def test_bad_key_is_a_clear_error(capsys):
    assert main(["train", "train.lrr=1e-4"]) == 2
    err = capsys.readouterr().err
    assert "train.lrr" in err and "train.lr" in err


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "m2flow", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "train" in proc.stdout and "demo" in proc.stdout
