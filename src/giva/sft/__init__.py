"""`giva sft`: supervised fine-tuning of causal LMs with GiVA, a thin layer over TRL's ``SFTTrainer``.

:mod:`~giva.sft.options` the flags (``SFTOptions``) and files; :mod:`~giva.sft.recipe` ``--config`` files;
:mod:`~giva.sft.data` the rows; :mod:`~giva.sft.checks` what is checked before a model loads;
:mod:`~giva.sft.run` the run (TRL, ``GivaInitCallback``, the atomic save, the torchrun bookkeeping);
:mod:`~giva.sft.evaluation` validation loss and exact match; :mod:`~giva.sft.checkpoints` and :mod:`~giva.sft.best`
``--resume`` and ``--keep-best``; :mod:`~giva.sft.zero3` DeepSpeed ZeRO-3; :mod:`~giva.sft.tracking` ``--report-to``;
:mod:`~giva.sft.generate` ``giva generate``. The names below load their module when first used, so that importing
one module (the CLI's parser reads :mod:`~giva.sft.options` and :mod:`~giva.sft.recipe`) does not import the rest.
"""

from __future__ import annotations

import importlib
from typing import Any

# (``generate``, the function, is not among them: its module's name would replace it once imported.)
_PUBLIC = {"SFTOptions": "options", "SFTResult": "run", "run_sft": "run", "load_sft_adapter": "run",
           "load_sft_data": "data"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
