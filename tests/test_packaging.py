"""What `pip install giva` (a built wheel, not this checkout's editable install) puts on disk, and that it runs.

Every test here but the wheel's own runs against the editable install, which reads the source tree: a file the
package needs at run time but the wheel leaves out (the Flower app's pyproject.toml, which `giva federated` reads)
breaks only a user's install.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

import giva
from giva.cli import main

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "giva"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # built from a copy of what the build reads, so that setuptools' build/ and egg-info land there, not in the checkout
    # (a stale build/lib there would also leak deleted modules into later wheels)
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    # the venv's own setuptools when it is new enough for pyproject.toml (torch installs one), else pip's isolated
    # build, which fetches setuptools from PyPI
    isolation = [] if int(version("setuptools").split(".")[0]) < 77 else ["--no-build-isolation"]
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "--no-cache-dir", "-q", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("giva-*.whl")
    return path


def package_files() -> set[str]:
    """Every file of src/giva a wheel must hold, as wheel paths (``giva/...``): all but caches and compiled files."""
    return {
        "giva/" + path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo")
    }


def test_the_wheel_holds_every_file_of_the_package(wheel):
    with zipfile.ZipFile(wheel) as archive:
        held = {name for name in archive.namelist() if name.startswith("giva/")}
    assert package_files() - held == set()
    assert {"giva/py.typed", "giva/federated/flower_app/pyproject.toml"} <= held


def test_the_wheel_is_versioned_from_the_package(wheel):
    assert wheel.name.startswith(f"giva-{giva.__version__}-")
    assert version("giva") == giva.__version__


def test_the_installed_wheel_reads_its_flower_app(wheel, tmp_path):
    """The federated command's first step reads the app's declared run config from the installed package."""
    pytest.importorskip("flwr", reason="the federated extra (flwr) is not installed")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path)
    probe = ("import giva; from giva.federated.local_deployment import APP_DIR, declared_config; "
             "print(giva.__file__); print(APP_DIR); print(sorted(declared_config()))")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    source, app_dir, keys = result.stdout.strip().splitlines()
    assert Path(source).is_relative_to(tmp_path) and Path(app_dir).is_relative_to(tmp_path)
    assert "'rounds'" in keys and "'giva-r'" in keys


def test_version_flag_names_giva_and_the_libraries_it_runs_on(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"giva {giva.__version__} (")
    for name in ("torch", "transformers", "peft"):
        assert re.search(rf"\b{name} {re.escape(version(name))}\b", line), line
    assert f"python {sys.version.split()[0]}" in line
