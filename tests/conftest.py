import os

import pytest
import torch

from tiny_models import text_batches

_MIXED_PRECISION = os.environ.get("ACCELERATE_MIXED_PRECISION")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped where no CUDA device is visible (selected on one with ``-m cuda``)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def batches() -> list[dict]:
    return text_batches()


@pytest.fixture(autouse=True)
def _no_leaked_mixed_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers 4.x's TrainingArguments writes ACCELERATE_MIXED_PRECISION into os.environ (5.x only reads it), so
    one bf16 run (TRL's configs default to bf16) made every later Trainer of the process autocast to bf16:
    each test starts with the variable as the session found it and leaves it so."""
    if _MIXED_PRECISION is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", _MIXED_PRECISION)
