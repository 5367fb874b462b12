import ipaddress
import os
import socket

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


_THIS_MACHINE = {None, "", "localhost", "localhost.localdomain", socket.gethostname()}


def _is_local(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host in _THIS_MACHINE:
        return True
    try:
        ipaddress.ip_address(str(host).split("%")[0])  # an address needs no lookup: left to the caller
        return True
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite runs as on a machine without internet: looking up a host name other than this machine's fails at
    once (socket.gaierror), in this process. A hub lookup that the libraries' offline switches missed (they read
    HF_HUB_OFFLINE once, at import) waited for DNS timeouts instead: 94 s in one test, and another answer on a
    machine with internet. Child processes are not covered."""
    real = socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        if _is_local(host):
            return real(host, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, f"the tests run offline: no lookup of {host!r}")

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
