"""PEFT's own generic tuner tests, fetched from the package registry for the installed PEFT version.

``tests/test_custom_models.py`` (with ``testing_common.py`` and ``testing_utils.py``) is taken from the
source distribution of exactly the PEFT version that is installed, downloaded with pip (so it goes
through the same index and certificates as every other package) and cached under
``~/.cache/giva/peft-tests/<version>/``. Nothing of it is committed. A failed download raises: a CI run
without the upstream tests must fail, not skip.

Run ``python tests/peft_upstream.py`` to pre-fetch (scripts/setup.sh does).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

UPSTREAM_FILES = ("test_custom_models.py", "testing_common.py", "testing_utils.py")
PACKAGE = "peft_upstream_tests"  # the fetched tests/ folder, importable as a package (it uses relative imports)


def cache_dir(version: str) -> Path:
    root = Path(os.environ.get("GIVA_CACHE", Path.home() / ".cache" / "giva"))
    return root / "peft-tests" / version


def fetch(version: str | None = None) -> Path:
    """The folder holding ``peft_upstream_tests/`` for ``version`` (default: the installed PEFT), fetched once."""
    version = version or importlib.metadata.version("peft")
    target = cache_dir(version)
    package = target / PACKAGE
    if all((package / name).is_file() for name in UPSTREAM_FILES):
        return target
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
            f"peft=={version}", "-d", tmp,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        sdists = list(Path(tmp).glob("peft-*.tar.gz"))
        if done.returncode != 0 or len(sdists) != 1:
            raise RuntimeError(
                f"could not download the source distribution of peft=={version} to get PEFT's generic tests "
                f"(`{' '.join(command)}` exited {done.returncode}): {done.stderr.strip()[-2000:]}"
            )
        staging = Path(tmp) / PACKAGE
        staging.mkdir()
        with tarfile.open(sdists[0]) as archive:
            for name in UPSTREAM_FILES:
                member = f"peft-{version}/tests/{name}"
                try:
                    source = archive.extractfile(member)
                except KeyError:
                    source = None
                if source is None:
                    raise RuntimeError(f"the sdist of peft=={version} has no {member}; PEFT's generic tests moved")
                (staging / name).write_bytes(source.read())
        (staging / "__init__.py").write_text(f'"""tests/ of the peft=={version} sdist (fetched, not committed)."""\n')
        if package.exists():
            shutil.rmtree(package)
        staging.rename(package)  # atomic: a half-written package is never seen
    return target


def load() -> types.ModuleType:
    """Import the fetched ``test_custom_models`` module of the installed PEFT version."""
    target = fetch()
    if "diffusers" not in sys.modules and importlib.util.find_spec("diffusers") is None:
        # testing_common imports StableDiffusionPipeline only for isinstance checks in tests of diffusion
        # models; none of the custom-model tests builds one, so a class nothing is an instance of stands in.
        stub = types.ModuleType("diffusers")
        stub.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})
        sys.modules["diffusers"] = stub
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    import giva  # noqa: F401  (registers GiVA with PEFT before the upstream module reads PEFT's mappings)

    return importlib.import_module(f"{PACKAGE}.test_custom_models")


if __name__ == "__main__":
    print(fetch())
