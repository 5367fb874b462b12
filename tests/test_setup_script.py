"""scripts/venv.sh, the step of scripts/setup.sh that makes .venv: it repairs a virtualenv left without pip.

`python3 -m venv` on Debian/Ubuntu without python3-venv leaves .venv/bin/python but no pip; setup.sh used to skip
the creation on every rerun and fail on .venv/bin/pip (exit 127). The whole setup.sh is not run here: it installs
torch and the rest from the network.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_SCRIPT = ROOT / "scripts" / "venv.sh"


def run_venv_script(folder: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(VENV_SCRIPT), str(folder)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def without_pip(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    assert (folder / "bin" / "python").exists() and not (folder / "bin" / "pip").exists()
    return folder


def test_setup_makes_the_venv_through_the_script_before_it_uses_pip():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "scripts/venv.sh .venv" in setup
    assert setup.index("scripts/venv.sh .venv") < setup.index(".venv/bin/pip")


def test_a_venv_without_pip_is_repaired(tmp_path):
    venv = without_pip(tmp_path / "venv")
    result = run_venv_script(venv)
    assert result.returncode == 0, result.stderr
    assert "has no pip; installing it with ensurepip" in result.stderr
    pip = subprocess.run([str(venv / "bin" / "pip"), "--version"], capture_output=True, text=True, timeout=60)
    assert pip.returncode == 0 and str(venv) in pip.stdout
    again = run_venv_script(venv)  # a complete venv is left alone
    assert again.returncode == 0 and again.stderr == ""


def test_a_venv_that_cannot_get_pip_says_what_to_install(tmp_path):
    venv = without_pip(tmp_path / "venv")
    stub = tmp_path / "stub" / "ensurepip"  # stands in for a Python whose ensurepip is missing (Debian's python3-venv)
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    (stub / "__main__.py").write_text("raise SystemExit('No module named ensurepip')\n")
    result = run_venv_script(venv, PYTHONPATH=str(stub.parent))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"setup: {venv} has no pip and '{venv}/bin/python -m ensurepip' cannot install it; install your Python's "
        "venv support (Debian/Ubuntu: sudo apt install python3-venv), then run this again"
    )
    failed = run_venv_script(tmp_path / "new", PYTHON="false")
    assert failed.returncode == 1 and "'false -m venv" in failed.stderr and "python3-venv" in failed.stderr
