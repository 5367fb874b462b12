"""Experiment tracking for `giva sft`: transformers' own reporting integrations (``report_to``), checked before the
model loads.

The Trainer reports its logs (training loss, learning rate, gradient norm) to each integration named, from the first
process of a launch only. TensorBoard is the one integration that writes into a folder the Trainer picks (under its
``output_dir``, which `giva sft` deletes after a run without ``--save-steps``): `giva sft` gives it a folder of its
own, ``--logging-dir``, through transformers' ``TensorBoardCallback``.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Optional

TENSORBOARD = "tensorboard"


def known() -> list[str]:
    """The integration names the installed transformers knows."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return sorted(INTEGRATION_TO_CALLBACK)


def installed() -> list[str]:
    """The integrations whose package is installed here."""
    from transformers.integrations import get_available_reporting_integrations

    return list(get_available_reporting_integrations())


def resolve(names: list[str]) -> list[str]:
    """``names`` checked against transformers' integrations and the packages installed here ('all': every installed
    one); a ValueError naming ``--report-to`` and what was expected. Imports transformers' integrations, no model."""
    if names == ["all"]:
        return installed()
    unknown = [name for name in names if name not in known()]
    if unknown:
        raise ValueError(f"--report-to {','.join(names)}: {', '.join(map(repr, unknown))} is not one of transformers' "
                         f"integrations ({', '.join(known())}), 'all' or 'none'")
    missing = [name for name in names if name not in installed()]
    if missing:
        raise ValueError(f"--report-to {','.join(names)}: transformers finds no installed package for "
                         f"{', '.join(map(repr, missing))}; install it (pip install {' '.join(missing)}), or leave it out")
    return names


def trainer_report_to(names: list[str]) -> list[str]:
    """What goes to the Trainer's ``report_to``: every integration but TensorBoard (see :func:`callbacks`)."""
    return [name for name in names if name != TENSORBOARD] or ["none"]


EVENT_FILES = "events.out.tfevents.*"


def earlier_events(logging_dir: str) -> list[Path]:
    """The TensorBoard event files directly in ``logging_dir`` (where a run's writer puts them)."""
    return sorted(Path(logging_dir).glob(EVENT_FILES))


def callbacks(names: list[str], logging_dir: str, resume_step: Optional[int] = None, replace: bool = False) -> list[Any]:
    """transformers' ``TensorBoardCallback`` writing into ``logging_dir`` when TensorBoard is asked for, else none.
    The writer is torch's (the ``tensorboard`` package), else ``tensorboardX``'s, as transformers picks it.

    A run resumed from step ``resume_step`` purges what the run it continues logged after that step (TensorBoard's
    ``purge_step``), so that no step is plotted twice; ``replace`` (a fresh run with ``--overwrite``) deletes the
    event files of an earlier run in ``logging_dir`` when the writer is made, once training has begun."""
    if TENSORBOARD not in names:
        return []
    from transformers.integrations import TensorBoardCallback

    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from tensorboardX import SummaryWriter

    purge = None if resume_step is None else resume_step + 1
    return [TensorBoardCallback(tb_writer=_LazyWriter(SummaryWriter, logging_dir, purge, replace))]


class _LazyWriter:
    """A SummaryWriter made on its first use: on the first process of a launch only (the callback writes from there
    alone), so the other processes create no folder and no empty event file."""

    def __init__(self, cls: Any, logging_dir: str, purge_step: Optional[int], replace: bool) -> None:
        self._cls, self._dir, self._purge, self._replace, self._writer = cls, logging_dir, purge_step, replace, None

    def _make(self) -> Any:
        if self._replace:
            for events in earlier_events(self._dir):
                events.unlink()
        # a suffix of its own: two writers made in one second (a run cut off and resumed at once) would share a file name
        return self._cls(log_dir=self._dir, purge_step=self._purge, filename_suffix=f".{uuid.uuid4().hex[:8]}")

    def __bool__(self) -> bool:  # the callback's on_train_end closes a writer only if it is truthy: made, on process 0
        return self._writer is not None

    def __getattr__(self, name: str) -> Any:
        if self._writer is None:
            self._writer = self._make()
        return getattr(self._writer, name)
