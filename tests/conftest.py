import pytest

from tiny_models import text_batches


@pytest.fixture
def batches() -> list[dict]:
    return text_batches()
