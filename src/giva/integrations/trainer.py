"""`GivaInitCallback`: initialise GiVA bases inside a transformers `Trainer` (or TRL's `SFTTrainer`)."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Optional

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..init import (
    DEFAULT_NUM_BATCHES,
    InitMode,
    InitReport,
    NumBatches,
    Statistic,
    bases_initialized,
    check_mode,
    giva_configs,
    initialize,
)
from ..init.accumulate import check_num_batches
from ..init.capture import LossFn, half_precision_vectors, unwrap
from ..init.session import check_statistic
from .distributed import every_rank, launcher_mismatch

logger = logging.getLogger(__name__)


def _quantised(model: Any) -> bool:
    """TRL's test for a quantised model (``is_loaded_in_4bit`` / ``is_loaded_in_8bit``; a PeftModel forwards both)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def sharded_run(args: Any) -> bool:
    """FSDP or DeepSpeed, set in the TrainingArguments or by ``accelerate launch`` (its environment variables)."""
    launcher = any(os.environ.get(f"ACCELERATE_USE_{name}", "").lower() in ("1", "true") for name in ("FSDP", "DEEPSPEED"))
    return launcher or bool(getattr(args, "fsdp", None)) or bool(getattr(args, "deepspeed", None)) \
        or getattr(args, "deepspeed_plugin", None) is not None


def upcast_vectors(model: Any) -> int:
    """Put GiVA's trainable vectors (and the opt-in core) of a quantised model back in fp32; returns how many tensors.

    TRL's ``SFTTrainer`` casts every trainable parameter of a quantised model to bf16 (its QLoRA rule; it spares only
    DoRA's magnitude vector, for the reason that applies here too). ``lambda_s`` starts at 1, where bf16's step is
    2**-7: an AdamW update below 0.004 rounds away, so at a QLoRA learning rate such as 2e-4 it never moves, and
    ``lambda_o`` keeps 8 bits of precision. GiVA computes in the input's dtype either way (the folded forward), so
    fp32 vectors cost nothing per token. Parameters already partitioned (ZeRO-3's ``zero.Init``, DTensors) are left
    as they are; for FSDP and DeepSpeed, whose flat parameters need one dtype, the callback does not call this."""
    if not _quantised(model):
        return 0
    upcast = [p for p in half_precision_vectors(unwrap(model)) if not hasattr(p, "ds_id") and type(p.data) is torch.Tensor]
    for param in upcast:
        param.data = param.data.float()
    return len(upcast)


def reference_mirrors(model: Any) -> dict[str, str]:
    """GiVA adapters that were made copies of another when added (TRL's ``"ref"`` adapter: name -> source).

    The copy is the reference policy, fixed at the start: a copy of an initialised adapter has its bases, and a copy
    of a fresh one is an identity (the base model, which is the initial policy then), so it is never calibrated."""
    tuner = getattr(unwrap(model), "base_model", None)
    mirrors = getattr(tuner, "giva_mirrors", None)
    return dict(mirrors) if isinstance(mirrors, dict) else {}


class GivaInitCallback(TrainerCallback):
    """Fills the GiVA bases from the Trainer's own train dataloader before the first optimizer step.

    Bases are buffers and the adapter is an identity at init (lambda_o = 0), so this runs in
    ``on_train_begin``, after the optimizer and LR schedule exist, without disturbing either.
    Adapters whose bases are already set (resumed from a checkpoint) are left alone, and so is TRL's frozen ``"ref"``
    adapter, a copy of ``"default"`` made when it was added (:func:`reference_mirrors`). On a quantised model it also
    puts the vectors back in fp32 when the trainer is built (:func:`upcast_vectors`: TRL casts them to bf16, where
    ``lambda_s`` cannot move at small learning rates); pass the callback to the trainer's constructor for that. ``mode`` is
    :func:`giva.initialize`'s (``"auto"``, ``"sketch"``, ``"exact"``), and so is ``statistic`` (``"mean"``, or
    ``"second-moment"``); ``num_batches="all"`` averages every
    batch of the train dataloader: before training, one pass over the training set in exact mode, or in sketch
    mode (``"auto"`` picks it for large models) ``giva.initialize``'s ``passes`` (3) passes, for which it keeps
    every batch the loader gave (inputs and labels, not activations) until the last. Under torchrun every rank
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
        check_mode(mode)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"GivaInitCallback's loss_fn must be callable (model, batch) -> loss, got {loss_fn!r}")
        self.num_batches = num_batches
        self.loss_fn = loss_fn
        self.progress = progress
        self.mode = mode
        self.statistic = statistic
        self.report: Optional[InitReport] = None

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None,
                    **kwargs: Any) -> None:
        # After SFTTrainer's bf16 cast, before the optimizer and any DDP wrapper exist. FSDP (1) flattens parameters
        # of one dtype only, and TRL's cast is what gives it one: left as it is there, and under DeepSpeed.
        sharded = sharded_run(args)
        if model is not None and sharded and _quantised(model):
            logger.info("GiVA: FSDP/DeepSpeed run, the vectors keep the dtype the trainer gave them")
        upcast = 0 if model is None or sharded else upcast_vectors(model)
        if upcast:
            logger.info("GiVA: %d vector tensors of the quantised model were in half precision (TRL's QLoRA cast); "
                        "back in fp32, where lambda_s can take small steps", upcast)

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
        mirrors = reference_mirrors(model)
        if mirrors:
            logger.info("GiVA: %s copied from %s when added (TRL's reference adapter): not initialised here",
                        sorted(mirrors), sorted(set(mirrors.values())))
        pending = [name for name in giva_configs(model) if name not in mirrors and not bases_initialized(model, name)]
        views = every_rank(pending)  # initialize is a collective: a rank that skips it would leave the others waiting
        if any(view != pending for view in views):
            seen = ", ".join(f"process {rank}: {view or 'none'}" for rank, view in enumerate(views))
            raise RuntimeError(
                f"GivaInitCallback: the processes disagree on which adapters still need bases ({seen}); some resumed "
                "from a checkpoint that the others did not (a resume_from_checkpoint or --checkpoint-dir on a disk "
                "that only some nodes see?): give every process the same checkpoint, or none")
        for name in pending:
            self.report = initialize(
                model, train_dataloader, self.num_batches, self.loss_fn, adapter_name=name, progress=self.progress,
                mode=self.mode, statistic=self.statistic,
            )
            logger.info("GiVA init of %r took %.2fs", name, self.report.total_seconds)
