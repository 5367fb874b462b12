"""The oldest supported PEFT (``MIN_PEFT_VERSION``) is declared, refused below, and tested.

scripts/setup.sh installs exactly that version into ``.venv-peft-min`` (``pip install --target``, no
dependencies); the PEFT API tests then run in a child process with it first on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from giva.peft_compat import MIN_PEFT_VERSION, check_peft_version

ROOT = Path(__file__).resolve().parents[2]
MIN_PEFT_DIR = ROOT / ".venv-peft-min"


@pytest.mark.parametrize("installed", ["0.18.0", "0.19.1", "0.20.0", "0.21.0rc1"])
def test_an_older_peft_is_refused_naming_both_versions(installed):
    with pytest.raises(ImportError, match=rf"peft>={MIN_PEFT_VERSION}.*peft {installed} is installed"):
        check_peft_version(installed)


@pytest.mark.parametrize("installed", [MIN_PEFT_VERSION, "0.21.2", "1.0.0"])
def test_the_minimum_and_newer_are_accepted(installed):
    check_peft_version(installed)


def test_pyproject_declares_the_minimum():
    # tomllib is 3.11+; an upper bound may follow (",<0.22": a newer PEFT not yet supported)
    assert re.search(rf'"peft>={re.escape(MIN_PEFT_VERSION)}(,<[0-9.]+)?",', (ROOT / "pyproject.toml").read_text())


def _with_min_peft() -> dict[str, str]:
    if not (MIN_PEFT_DIR / f"peft-{MIN_PEFT_VERSION}.dist-info").is_dir():
        pytest.fail(f"peft=={MIN_PEFT_VERSION} is not installed in {MIN_PEFT_DIR}: run scripts/setup.sh")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(MIN_PEFT_DIR), os.environ.get("PYTHONPATH", "")])}


def test_peft_api_tests_pass_on_the_minimum_peft():
    env = _with_min_peft()
    probe = subprocess.run(
        [sys.executable, "-c", "import giva, peft; print(peft.__version__)"],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == MIN_PEFT_VERSION
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_peft_api.py"],
        env=env, capture_output=True, text=True, timeout=1200, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
