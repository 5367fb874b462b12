"""The oldest supported transformers (``MIN_TRANSFORMERS_VERSION``, a 4.x) is declared and tested.

scripts/setup.sh installs exactly that version, with the huggingface_hub, tokenizers and datasets pip resolves for it,
into ``.venv-transformers-min`` (``pip install --target``, no dependencies); the tests of the places where GiVA meets
transformers then run in one child pytest with it first on ``PYTHONPATH``. The few 4.x differences in the tests'
own fixtures and expectations branch on ``tiny_models.TRANSFORMERS_4``, each with its reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from giva.peft_compat import MIN_TRANSFORMERS_VERSION

ROOT = Path(__file__).resolve().parents[2]
MIN_DIR = ROOT / ".venv-transformers-min"
# The integration points: PEFT's API and checkpoints, transformers' load_adapter and Trainer, serving, the CLI,
# quantised bases, TRL's SFT/DPO trainers and the real MiniLM run (about 2.5 min on 2 cores). test_export (4-5 min
# alone) and PEFT's generic tuner tests (4 min, tiny models only) are left to the main run.
FILES = [
    "tests/test_peft_api.py",
    "tests/test_checkpoint.py",
    "tests/test_checkpoint_hardening.py",
    "tests/test_checkpoint_load_paths.py",
    "tests/test_integrations.py",
    "tests/test_serving.py",
    "tests/test_cli.py",
    "tests/test_quant.py",
    "tests/test_sft.py",
    "tests/test_trl_trainers.py",
    "tests/test_real_minilm.py",
]


def test_pyproject_declares_the_minimum():
    assert f'"transformers>={MIN_TRANSFORMERS_VERSION}",' in (ROOT / "pyproject.toml").read_text()


def _with_min_transformers() -> dict[str, str]:
    if not (MIN_DIR / f"transformers-{MIN_TRANSFORMERS_VERSION}.dist-info").is_dir():
        pytest.fail(f"transformers=={MIN_TRANSFORMERS_VERSION} is not installed in {MIN_DIR}: run scripts/setup.sh")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(MIN_DIR), os.environ.get("PYTHONPATH")]))}


def test_import_giva_on_the_minimum_transformers_leaves_bitsandbytes_unimported():
    """transformers 4.x looks bitsandbytes up while it imports, which GiVA's deferral of bitsandbytes during PEFT's
    import refused ("bitsandbytes deferred by giva while PEFT imports"): ``import giva`` failed when bitsandbytes
    was installed and transformers not yet imported."""
    code = ("import sys, giva; giva.load(); import transformers\n"
            "print(transformers.__version__, 'bitsandbytes' in sys.modules)")
    probe = subprocess.run([sys.executable, "-c", code], env=_with_min_transformers(), capture_output=True, text=True,
                           timeout=300, cwd=ROOT)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.split() == [MIN_TRANSFORMERS_VERSION, "False"]


def test_the_integration_tests_pass_on_the_minimum_transformers():
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FILES],
        env=_with_min_transformers(), capture_output=True, text=True, timeout=1200, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
