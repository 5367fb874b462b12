"""GiVA: Gradient-Informed Bases for Vector-Based Adaptation, as a PEFT method.

``import giva`` registers the method with PEFT; then::

    model = peft.get_peft_model(base_model, giva.GivaConfig(r=8, target_modules=["query", "value"]))
    giva.initialize(model, train_dataloader)   # bases from the loss gradient (k = 4 batches)
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "GIVA_PEFT_TYPE",
    "GRADIENT_VARIANTS",
    "VARIANTS",
    "BasesNotInitializedError",
    "CheckpointError",
    "GivaConfig",
    "GivaInitCallback",
    "GivaLayer",
    "GivaModel",
    "GradientInitError",
    "InitReport",
    "bases_initialized",
    "initialize",
]

if TYPE_CHECKING:
    from .bases import GRADIENT_VARIANTS, VARIANTS
    from .checkpoint import CheckpointError
    from .config import GivaConfig
    from .init import GradientInitError, InitReport, bases_initialized, initialize
    from .integrations.trainer import GivaInitCallback
    from .layer import BasesNotInitializedError, GivaLayer
    from .model import GivaModel
    from .peft_compat import GIVA_PEFT_TYPE


def load() -> None:
    """Import the library (torch, transformers, PEFT) and register GiVA with PEFT; idempotent.

    ``import giva`` calls it, except when the ``giva`` command imports the package for its command line
    (``giva.cli``), which calls it once a command, not ``--help``, runs.
    """
    # peft_compat first, by name so that no import sorter can move it: it refuses a too-old PEFT before anything
    # imports PEFT's internals, and imports PEFT with bitsandbytes deferred (export imports PEFT too).
    peft_compat = importlib.import_module(f"{__name__}.peft_compat")
    from . import checkpoint, export
    from .bases import GRADIENT_VARIANTS, VARIANTS
    from .checkpoint import CheckpointError
    from .config import GivaConfig
    from .init import GradientInitError, InitReport, bases_initialized, initialize
    from .integrations.trainer import GivaInitCallback
    from .layer import BasesNotInitializedError, GivaLayer
    from .model import GivaModel

    peft_compat.register(GivaConfig, GivaModel)
    peft_compat.install_checkpoint_hooks(
        checkpoint.save_pretrained, checkpoint.checked_load, checkpoint.forget_checksum, checkpoint.load_peft_weights,
        checkpoint.config_differences, checkpoint.check_load_into_existing,
    )
    peft_compat.install_transformers_load_hook(checkpoint.transformers_load_adapter)
    peft_compat.install_lora_conversion(export.convert_module, export.convert_to_lora, export.save_as_lora)
    globals().update(
        GIVA_PEFT_TYPE=peft_compat.GIVA_PEFT_TYPE, GRADIENT_VARIANTS=GRADIENT_VARIANTS, VARIANTS=VARIANTS,
        BasesNotInitializedError=BasesNotInitializedError, CheckpointError=CheckpointError, GivaConfig=GivaConfig,
        GivaInitCallback=GivaInitCallback, GivaLayer=GivaLayer, GivaModel=GivaModel, GradientInitError=GradientInitError,
        InitReport=InitReport, bases_initialized=bases_initialized, initialize=initialize,
    )


def __getattr__(name: str) -> Any:
    if name in __all__:
        load()
        return globals()[name]
    raise AttributeError(f"module 'giva' has no attribute {name!r}")


def _run_as_module() -> bool:
    """The interpreter was started as ``python [options] -m giva`` (``giva/__main__.py``) or ``-m giva.cli``."""
    argv = list(getattr(sys, "orig_argv", ()))
    return "-m" in argv[1:-1] and argv[argv.index("-m", 1) + 1] in ("giva", "giva.cli")


def _imported_for_cli() -> bool:
    """True when this package is being imported by the ``giva`` command for its command line: the program is the
    ``giva`` console script (``sys.argv[0]``), and the import system's own frames name ``giva.cli``; or the
    interpreter runs the command as a module (``python -m giva``, :func:`_run_as_module`).

    Any other import of ``giva`` loads everything at once and registers GiVA with PEFT, ``import giva.cli`` from
    Python included (it left GiVA unregistered until a command ran: a GiVA adapter then failed to load in PEFT).
    """
    if _run_as_module():
        return True
    program = os.path.basename(getattr(sys, "argv", None) and sys.argv[0] or "")
    if program.removesuffix(".exe").removesuffix("-script.py") != "giva":
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib") and frame.f_locals.get("name") == "giva.cli":
            return True
        frame = frame.f_back
    return False


if not _imported_for_cli():
    load()
