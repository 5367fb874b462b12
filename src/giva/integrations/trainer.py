"""`GivaInitCallback`: initialise GiVA bases inside a transformers `Trainer` (or TRL's `SFTTrainer`)."""

from __future__ import annotations

import logging
import warnings
from typing import Any, Optional

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..init import (
    DEFAULT_NUM_BATCHES,
    InitMode,
    InitReport,
    NumBatches,
    Statistic,
    bases_initialized,
    giva_configs,
    initialize,
)
from ..init.accumulate import check_num_batches
from ..init.capture import LossFn
from ..init.session import check_statistic
from .distributed import launcher_mismatch

logger = logging.getLogger(__name__)


class GivaInitCallback(TrainerCallback):
    """Fills the GiVA bases from the Trainer's own train dataloader before the first optimizer step.

    Bases are buffers and the adapter is an identity at init (lambda_o = 0), so this runs in
    ``on_train_begin``, after the optimizer and LR schedule exist, without disturbing either.
    Adapters whose bases are already set (resumed from a checkpoint) are left alone. ``mode`` is
    :func:`giva.initialize`'s (``"auto"``, ``"sketch"``, ``"exact"``), and so is ``statistic`` (``"mean"``, or
    ``"second-moment"``); ``num_batches="all"`` averages every
    batch of the train dataloader (one pass over the training set before training). Under torchrun every rank
    runs it on its own batches and gets the same bases.

    Example::

        trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[giva.GivaInitCallback()])
    """

    def __init__(
        self,
        num_batches: NumBatches = DEFAULT_NUM_BATCHES,
        loss_fn: Optional[LossFn] = None,
        progress: bool = True,
        mode: InitMode = "auto",
        statistic: Statistic = "mean",
    ) -> None:
        check_num_batches(num_batches, allow_all=True)  # here, not at on_train_begin after the model loaded
        check_statistic(statistic, ())  # the name; the variants once the model is known
        self.num_batches = num_batches
        self.loss_fn = loss_fn
        self.progress = progress
        self.mode = mode
        self.statistic = statistic
        self.report: Optional[InitReport] = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None or train_dataloader is None:
            raise ValueError("GivaInitCallback needs the Trainer's model and train_dataloader")
        mismatch = launcher_mismatch(args.world_size, "the Trainer")
        if mismatch:
            warnings.warn(mismatch, stacklevel=2)
        pending = [name for name in giva_configs(model) if not bases_initialized(model, name)]
        for name in pending:
            self.report = initialize(
                model, train_dataloader, self.num_batches, self.loss_fn, adapter_name=name, progress=self.progress,
                mode=self.mode, statistic=self.statistic,
            )
            logger.info("GiVA init of %r took %.2fs", name, self.report.total_seconds)
