"""``torch.autocast`` around GiVA's maths: whether it is on, and switching it off where fp32 must stay fp32
(the layer's factor and ``delta_W``, ``compute_dtype="float32"``, the initialisation's sums, QR and SVDs)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext

import torch

# The device types autocast knows, read once: dynamo traces a membership test, but not (torch 2.11) the call
# `torch.amp.is_autocast_available`, which it skips, breaking the graph.
_AUTOCAST_TYPES = frozenset(
    t
    for t in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "ipu", torch._C._get_privateuse1_backend_name())
    if torch.amp.is_autocast_available(t)
)


def autocast_enabled(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` (False for a type autocast does not know, as "meta").
    Dynamo traces it (and ``torch.autocast(..., enabled=False)``) without a graph break."""
    return device_type in _AUTOCAST_TYPES and torch.is_autocast_enabled(device_type)


def outside_autocast(device_type: str) -> AbstractContextManager:
    """Autocast disabled on ``device_type`` while it is on there, else nothing. (The layer's per-forward paths test
    :func:`autocast_enabled` themselves and enter no context at all without autocast.)"""
    return torch.autocast(device_type, enabled=False) if autocast_enabled(device_type) else nullcontext()


@contextmanager
def autocast_off(*devices: torch.device | str) -> Iterator[None]:
    """Autocast switched off for the CPU and the device types of ``devices`` (where the caller had it on): the maths
    inside run in their inputs' dtypes (fp32 sums, QR and SVD), whatever ``torch.autocast`` the caller opened.

    Autocast is per thread, and CUDA runs backward hooks on autograd's own threads, so code a hook calls (the
    statistic's sums) switches it off itself rather than relying on its caller.
    """
    with ExitStack() as stack:
        for device_type in sorted({"cpu", *(torch.device(d).type for d in devices)}):
            stack.enter_context(outside_autocast(device_type))
        yield
