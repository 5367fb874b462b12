"""`giva sft`: supervised fine-tuning of a causal LM with GiVA through TRL's ``SFTTrainer``.

A thin layer: :class:`SFTOptions` (the command's flags, checked in ``__post_init__``) becomes a
:class:`giva.GivaConfig` and a TRL ``SFTConfig``; both go to ``SFTTrainer`` with
:class:`giva.GivaInitCallback`, which fills the bases from the trainer's own first batches. TRL owns the
data formatting (prompt/completion rows, chat templates, the completion-only loss mask); this module runs the
checks that come before the model loads (:mod:`giva.sft.checks`), the before/after validation
(:mod:`giva.sft.evaluation`), the atomic save, resumable checkpoints (``--save-steps``, ``--resume``: the Trainer's own,
:mod:`giva.sft.checkpoints`) and the bookkeeping of a torchrun launch (one process writes, the exact-match scoring
is split over the processes). The flags are :class:`giva.sft.options.SFTOptions`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

from ..data import DataError
from .best import BestAdapter
from .checkpoints import (
    check_checkpoints,
    check_same_resume,
    checkpoint_state,
    finished_checkpoints,
    is_finished,
    saved_run,
    write_record,
)
from .checks import (
    check_attention,
    check_chat_template,
    check_num_batches,
    check_output_dirs,
    check_packages,
    check_quantization,
    check_sharding,
    check_tracking,
    check_truncation,
    resolve_device,
)
from .data import SFTData, load_sft_data, row_format
from .evaluation import completion_ids, cut_completions, exact_match, prompt_ids, validation_loss
from .options import RESULT_FILE, TRL_LM_HEAD, SFTOptions
from .zero3 import check_resume_launch, check_zero3_finished, gathered, on_train_begin, partitioned

logger = logging.getLogger("giva.sft")  # the name its sibling modules log under too


@dataclass
class SFTResult:
    model: str
    data: str
    device: str
    precision: str
    quantization: Optional[str]
    train_rows: int
    validation_rows: int
    steps: int
    val_loss_before: float
    val_loss_after: float
    exact_match_before: Optional[float]
    exact_match_after: Optional[float]
    train_loss: Optional[float]  # the Trainer's training_loss: the mean over the steps this run made (None: no step left)
    trainable_parameters: int
    total_parameters: int
    adapter_bytes: int
    init_seconds: float
    train_seconds: float
    output_dir: str
    lora_dir: Optional[str]
    options: dict[str, Any]
    versions: dict[str, str]
    processes: int = 1
    resumed_from: Optional[str] = None
    loss_tokens: str = "completion tokens only"  # the tokens the losses cover: "every token" for 'text' rows
    packed_sequences: Optional[int] = None  # with --packing: the sequences of --max-length tokens the rows went into
    # with --eval-steps: [step, validation loss] every N steps, those before a --resume included (the Trainer's log)
    val_loss_curve: Optional[list[list[float]]] = None
    kept_step: Optional[int] = None  # with --keep-best: the step whose adapter was saved (the after scores are its)
    zero3: bool = False  # the base was partitioned over the processes by DeepSpeed ZeRO-3

    def _lowest(self) -> str:
        if not self.val_loss_curve:
            return ""
        step, loss = min(self.val_loss_curve, key=lambda point: point[1])
        return f", lowest {loss:.4f} at step {int(step)}"

    def summary(self) -> str:
        em = ("" if self.exact_match_before is None else
              f"\nexact match        {self.exact_match_before:.2%} -> {self.exact_match_after:.2%} (greedy answers, validation)")
        return (
            f"model              {self.model} ({self.device}, {self.precision}"
            f"{', ' + self.quantization if self.quantization else ''})\n"
            f"data               {self.data}: {self.train_rows} training rows"
            f"{'' if self.packed_sequences is None else f' (packed into {self.packed_sequences} sequences)'}, "
            f"{self.validation_rows} validation rows\n"
            f"validation loss    {self.val_loss_before:.4f} -> {self.val_loss_after:.4f} ({self.loss_tokens})"
            f"{self._lowest()}{em}\n"
            + (f"kept adapter       step {self.kept_step} of {self.steps} (--keep-best: the lowest validation loss; the "
               f"scores after training are its)\n" if self.kept_step is not None else "")
            + f"trainable params   {self.trainable_parameters:,} of {self.total_parameters:,}\n"
            f"steps              {self.steps} "
            f"({'no step left to train' if self.train_loss is None else f'mean training loss {self.train_loss:.4f}'})"
            f"{f', resumed from {self.resumed_from}' if self.resumed_from else ''}"
            f"{f', {self.processes} processes' if self.processes > 1 else ''}"
            f"{', the base partitioned by DeepSpeed ZeRO-3' if self.zero3 else ''}\n"
            f"init / train time  {self.init_seconds:.1f} s / {self.train_seconds:.1f} s\n"
            f"adapter            {self.adapter_bytes / 1024:.1f} KiB in {self.output_dir}"
            + (f"\nLoRA export        {self.lora_dir}" if self.lora_dir else "")
        )


# ------------------------------------------------------------------------------------------ before the model loads


def launch() -> tuple[int, int]:
    """(this process's rank, the number of processes): torchrun's ``RANK`` / ``WORLD_SIZE``, else (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def preflight(options: SFTOptions) -> tuple[str, str, Any, SFTData]:
    """Every check that needs no model weights: (device, model path, tokenizer, data). Loads nothing big."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..assets import resolve_model
    from ..finetune import check_max_length, model_skeleton
    from ..model import check_targets_before_loading

    check_packages()
    options.batch_layout(launch()[1])
    device = resolve_device(options)
    check_attention(options.attn_implementation, device)
    check_quantization(options)
    check_sharding(options)
    check_output_dirs(options)
    check_tracking(options)
    path = resolve_model(options.model)
    # --target-modules against the model's module names and types, on a weightless skeleton (PEFT alone refuses only
    # when no name matches, and only once the weights have loaded)
    skeleton = model_skeleton(path, AutoModelForCausalLM)
    head = skeleton.get_output_embeddings()
    check_targets_before_loading(giva_config_of(options), skeleton,
                                 {key: TRL_LM_HEAD for key, module in skeleton.named_modules() if module is head})
    tokenizer = AutoTokenizer.from_pretrained(path)
    check_max_length(options.max_length, path, tokenizer)  # beyond GPT-2's learned positions: an IndexError in training
    chat = getattr(tokenizer, "chat_template", None) is not None
    data = load_sft_data(options.data, options.val_size, options.seed, options.max_train_samples, chat=chat,
                         split=options.data_split, config=options.data_config)
    check_num_batches(options, len(data.train), launch()[1])
    if not chat and row_format(data.train[0]) == "chat":  # one format per file: the first row says which
        raise DataError(f"--data {options.data!r} has chat rows but the tokenizer of --model {options.model!r} has no "
                        "chat template; give a model whose tokenizer has one, or plain-text prompt/completion rows")
    if chat:
        check_chat_template(tokenizer, data, options.model)
    return device, path, tokenizer, data


# ------------------------------------------------------------------------------------------ the run


@contextmanager
def quiet_transformers(enabled: bool) -> Iterator[None]:
    """With ``enabled``: transformers' and datasets' progress bars, info/warning logs and the libraries' deprecation
    notices (not the user's to fix) off; restored after."""
    if not enabled:
        yield
        return
    import warnings

    import datasets
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    ds_bars = datasets.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category, module=r"(transformers|trl|peft|accelerate)(\.|$)")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if ds_bars:
            datasets.enable_progress_bars()


def _load_model(path: str, options: SFTOptions, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    local = f"{device}:{os.environ.get('LOCAL_RANK', '0')}" if device == "cuda" else device  # torchrun: its own GPU
    return AutoModelForCausalLM.from_pretrained(path, **base_loading(
        options.bf16, options.fp16, options.load_in_4bit, options.load_in_8bit, options.attn_implementation, local))


def base_loading(bf16: bool, fp16: bool, load_in_4bit: bool, load_in_8bit: bool, attn_implementation: Optional[str],
                 device: str, dtype: Any = None) -> dict[str, Any]:
    """``from_pretrained``'s arguments for the base model of a run with these flags: its weights in bf16 with
    ``--bf16``, else fp32 (``dtype`` overrides); with ``--load-in-4bit`` the NF4 double-quantised base computing in the
    run's precision, with ``--load-in-8bit`` the int8 base, either placed on ``device`` as it loads (a plain model is
    moved later, by the Trainer or the caller)."""
    import torch
    from transformers import BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": dtype or (torch.bfloat16 if bf16 else torch.float32)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit or load_in_8bit:
        compute = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
            if load_in_4bit else BitsAndBytesConfig(load_in_8bit=True)
        )
        kwargs["device_map"] = {"": device}
    return kwargs


def sft_config(options: SFTOptions, device: str, scratch: str) -> Any:
    """TRL's SFTConfig for these options (TRL's own defaults of bf16 and gradient checkpointing overridden).

    ``--batch-size`` rows per optimizer step over every process: each process runs ``micro`` rows per forward and
    accumulates ``accumulation`` of them. With ``--save-steps`` the Trainer writes its checkpoints (adapter,
    optimizer, schedule, RNG states) into the checkpoint folder, else into ``scratch``, which the run deletes."""
    from trl import SFTConfig

    from . import tracking

    # transformers 5 renamed TrainingArguments.gradient_checkpointing to activation_checkpointing; 4.x knows only the
    # old name (and SFTConfig refuses the new one with a TypeError)
    names = {f.name for f in fields(SFTConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    micro, accumulation = options.batch_layout(launch()[1])
    saving = options.save_steps is not None
    return SFTConfig(
        output_dir=options.checkpoints if saving else scratch,
        max_steps=options.max_steps or -1,
        num_train_epochs=options.epochs,
        learning_rate=options.lr,
        lr_scheduler_type=options.lr_scheduler,
        weight_decay=options.weight_decay,
        max_grad_norm=options.max_grad_norm,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        per_device_eval_batch_size=options.eval_batch_size or micro,  # rows: validation is never packed
        max_length=options.max_length,
        # best-fit decreasing: whole rows (cut at --max-length) into sequences of --max-length tokens, padding-free, the
        # rows told apart by position_ids; validation stays a row per sequence (exact match reads its prompts)
        packing=options.packing,
        packing_strategy="bfd",
        eval_packing=False,
        completion_only_loss=True,
        bf16=options.bf16,
        fp16=options.fp16,
        **{checkpointing: options.gradient_checkpointing},  # TRL's SFTConfig defaults it to on
        torch_compile=options.torch_compile,  # Accelerate compiles the model it wraps; trainer.model stays eager
        use_cpu=device == "cpu",
        seed=options.seed,
        data_seed=options.seed,
        save_strategy="steps" if saving else "no",
        save_steps=options.save_steps or 500,
        save_total_limit=2,  # the newest, and the one before it in case the newest was cut off mid-write
        eval_strategy="no",
        report_to=tracking.trainer_report_to(tracking.resolve(options.report_to)),
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN (not the mean of the earlier ones): see _divergence
        disable_tqdm=not options.progress,
        dataset_num_proc=None,
    )


def schedule(options: SFTOptions, train_rows: int) -> dict[str, int]:
    """The warm-up (``--warmup-ratio`` of the optimizer steps, rounded down) and logging cadence (``--logging-steps``, else 20 logs) of a run over ``train_rows`` rows of the
    Trainer's loader: the rows TRL kept, or with ``--packing`` the packed sequences."""
    steps = options.max_steps or math.ceil(math.ceil(train_rows / options.batch_size) * options.epochs)
    return {"warmup_steps": int(options.warmup_ratio * steps), "logging_steps": options.logging_steps or max(1, steps // 20)}


def trained_rows(dataset: Any) -> int:
    """The rows of TRL's processed training set that carry a label. Unpacked, TRL has dropped those whose completion
    ``--max-length`` cut off; packed (a ``seq_lengths`` column), they stay in their sequence and carry none."""
    if "seq_lengths" not in dataset.column_names:
        return len(dataset)
    import numpy as np

    kept = 0
    for batch in dataset.select_columns(["labels", "seq_lengths"]).iter(batch_size=1024):  # bounded memory
        for labels, lengths in zip(batch["labels"], batch["seq_lengths"]):
            starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))  # every row holds at least one token
            kept += int(np.count_nonzero(np.add.reduceat((np.asarray(labels) != -100).astype(np.int64), starts)))
    return kept


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "trl": trl.__version__, "python": platform.python_version(), "machine": f"{platform.machine()}, "
            f"{os.cpu_count()} CPUs"}


def run_sft(options: SFTOptions) -> SFTResult:
    """The whole `giva sft` job: check, load, evaluate, train through SFTTrainer, evaluate, save (atomically)."""
    return train_sft(options)[0]


def completion_token_loss(model: Any, batch: Any) -> Any:
    """The calibration loss summed over the completion tokens (the model's mean times their count): every token
    weighs the same in the gradient however the rows are split into micro-batches and processes. The bases do not
    depend on the gradient's scale, so with one batch they are those of the mean loss."""
    from ..init.capture import default_loss

    return default_loss(model, batch) * (batch["labels"][..., 1:] != -100).sum()  # the tokens the model's shift scores


def giva_config_of(options: SFTOptions) -> Any:
    """The adapter's :class:`giva.GivaConfig` for these options."""
    from ..config import GivaConfig

    return GivaConfig(r=options.r, target_modules=options.target_modules, seed=options.seed, task_type="CAUSAL_LM",
                      giva_dropout=options.dropout)


def make_trainer(options: SFTOptions, device: str, path: str, tokenizer: Any, data: SFTData, scratch: str,
                 resume_step: Optional[int] = None, best: Optional[BestAdapter] = None) -> Any:
    """TRL's SFTTrainer over a freshly loaded model, with the GiVA config and :class:`giva.GivaInitCallback`
    (``resume_step``: the step of the checkpoint a ``--resume`` continues from, for the TensorBoard log)."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTTrainer

    from ..integrations.trainer import GivaInitCallback
    from . import tracking

    giva_config = giva_config_of(options)
    args = sft_config(options, device, scratch)
    # k calibration batches of --batch-size rows: k x accumulation micro-batches on each process, summed over them
    k = options.num_batches
    calibration = k if k == "all" else k * args.gradient_accumulation_steps
    trainer = SFTTrainer(
        model=_load_model(path, options, device),
        args=args,
        train_dataset=Dataset.from_list(data.train),
        eval_dataset=Dataset.from_list(data.validation),
        processing_class=tokenizer,
        peft_config=giva_config,
        callbacks=[GivaInitCallback(num_batches=calibration, loss_fn=completion_token_loss, progress=options.progress,
                                    mode=options.init_mode),
                   *tracking.callbacks(tracking.resolve(options.report_to), options.logs, resume_step,
                                           replace=options.overwrite and not options.resume)],
    )
    # sized on the loader's rows, known once TRL has processed (and with --packing packed) them; read in train()
    for name, value in schedule(options, len(trainer.train_dataset)).items():
        setattr(trainer.args, name, value)
    trainer.remove_callback(PrinterCallback)  # without a progress bar it prints every log dict to stdout
    trainer.add_callback(_save_cadence())
    trainer.add_callback(_divergence(options))
    if options.eval_steps is not None:
        trainer.add_callback(_periodic_validation(trainer, options.eval_steps, best))
    return trainer


def _periodic_validation(trainer: Any, every: int, best: Optional[BestAdapter] = None) -> Any:
    """A callback: the validation loss (:func:`giva.sft.evaluation.validation_loss`) after every ``every``-th optimizer step,
    logged as ``eval_loss`` through the Trainer (its log history, which a checkpoint keeps, and the ``--report-to``
    integrations, as ``eval/loss``). Every process of a launch reaches it at the same step.

    Through ``transformers.Trainer.log``, not TRL's override (which would move the training metrics it has gathered
    since the last log, entropy and token accuracy, into this entry), and with the step's ``should_log`` put back: the
    Trainer's log call clears it, which dropped the step's training-loss log, and with it the divergence check of
    :func:`_divergence`, at every step that also validated (a diverging run with ``--eval-steps 1`` saved NaN
    vectors and exited 0). With ``best`` (``--keep-best``) each validation offers the model's trainable tensors to it,
    and after each checkpoint (and the Trainer's rotation of older ones) the first process deletes the files of it
    that no remaining checkpoint can resume to."""
    from transformers import Trainer, TrainerCallback

    class PeriodicValidation(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step % every == 0:
                loss = validation_loss(trainer, args.per_device_eval_batch_size)
                if best is not None:  # before the Trainer's checkpoint of this step, which a resume starts from
                    with gathered(trainer.model):
                        best.offer(trainer.model, state.global_step, loss)
                should_log = control.should_log
                Trainer.log(trainer, {"eval_loss": loss})
                control.should_log = should_log

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if best is not None and best.folder is not None and best.main_process:
                best.prune([int(p.name.removeprefix("checkpoint-")) for p in finished_checkpoints(Path(args.output_dir))])

    return PeriodicValidation()


def loss_curve(trainer: Any) -> list[list[float]]:
    """[step, validation loss] of every periodic validation in the Trainer's log history (a resumed run's too)."""
    return [[entry["step"], entry["eval_loss"]] for entry in trainer.state.log_history if "eval_loss" in entry]


def _save_cadence() -> Any:
    """A callback: a resumed Trainer takes ``save_steps`` and ``logging_steps`` from the checkpoint's
    ``trainer_state.json``, so a ``--save-steps`` or ``--logging-steps`` given with ``--resume`` would be ignored;
    this puts the run's own back."""
    from transformers import TrainerCallback

    class SaveCadence(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            state.save_steps, state.logging_steps = args.save_steps, args.logging_steps

    return SaveCadence()


def _divergence(options: SFTOptions) -> Any:
    """A callback: a non-finite logged training loss stops the run with giva finetune's :class:`TrainingDiverged`,
    so nothing is saved (the Trainer itself logs on and saves NaN vectors). The steps that end training or write a
    checkpoint are logged too, so every step is in a log before a checkpoint or the adapter is written; the logged
    loss is gathered over the processes of a launch, so all of them stop together."""
    from transformers import TrainerCallback

    from ..finetune import TrainingDiverged

    class StopOnDivergence(TrainerCallback):
        logged = 0  # the last step logged

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.logged = state.global_step  # a resumed run starts there

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if control.should_save or control.should_training_stop:
                control.should_log = True

        def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict[str, Any]] = None,
                   **kwargs: Any) -> None:
            loss = (logs or {}).get("loss")
            if loss is None:
                return
            if not math.isfinite(loss):
                first, step = self.logged + 1, state.global_step
                steps = f"step {step}" if first == step else f"steps {first}..{step}"
                raise TrainingDiverged(f"the training loss is {loss} at {steps}; nothing was saved. Try a smaller "
                                       f"learning rate (--lr {options.lr:g})")
            self.logged = state.global_step

    return StopOnDivergence()


def train_sft(options: SFTOptions) -> tuple[SFTResult, Any, Any]:
    """:func:`run_sft`, also returning the trained PEFT model and the tokenizer."""
    check_packages()  # before quiet_transformers imports datasets: a missing package is one line naming the extra
    with quiet_transformers(not options.progress), _accelerate_precision_kept():  # datasets' bars in reading --data too
        device, path, tokenizer, data = preflight(options)
        options, resume_from = check_checkpoints(options, data)
        return _train(options, device, path, tokenizer, data, resume_from)


# What transformers 4.x's TrainingArguments writes into os.environ and leaves there (5.x only reads them)
ACCELERATE_LEFTOVERS = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_DYNAMO_MODE")


@contextmanager
def _accelerate_precision_kept() -> Iterator[None]:
    """transformers 4.x's TrainingArguments writes ``ACCELERATE_MIXED_PRECISION`` into ``os.environ`` for a bf16/fp16
    run, and ``ACCELERATE_DYNAMO_BACKEND`` for a ``--torch-compile`` one, and leaves them there (5.x only reads them):
    every later Trainer of the process, an fp32 or eager ``train_sft`` among them, would autocast to that dtype or
    compile its model, and so would the processes it starts. The caller's values come back afterwards."""
    saved = {name: os.environ.get(name) for name in ACCELERATE_LEFTOVERS}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def on_main_process(trainer: Any, work: Any) -> None:
    """``work()`` on the first process of a launch only (on the only one otherwise); the others wait for it, and
    every process raises if it failed, so none is left waiting for a process that has gone."""
    _agreed(work, trainer.is_world_process_zero(), "the first process of the launch failed to write the results")


def on_every_process(work: Any, what: str) -> None:
    """``work()`` on every process of a launch; if it fails on any, every process raises (naming the first that
    failed), so none goes on to a collective that a failed process will never reach."""
    _agreed(work, True, what)


def _agreed(work: Any, run_here: bool, what: str) -> None:
    from ..integrations.distributed import every_rank, is_distributed

    if not is_distributed():
        work()
        return
    failure: Optional[str] = None
    error: Optional[BaseException] = None
    if run_here:
        try:
            work()
        except BaseException as err:  # Ctrl-C or a kill's SystemExit too: the others must not wait for this one
            error, failure = err, f"{type(err).__name__}: {err}"
    failures: list[Optional[str]] = every_rank(failure)
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(failures) if message is not None]
    if failed:
        rank, message = failed[0]
        where = "" if not run_here else f" (process {rank})"
        raise RuntimeError(f"{what}{where}: {message}")


def _train(options: SFTOptions, device: str, path: str, tokenizer: Any, data: SFTData,
           resume_from: Optional[str] = None) -> tuple[SFTResult, Any, Any]:
    from ..finetune import directory_bytes, save_atomically
    from ..integrations.distributed import every_rank
    from ..integrations.trainer import GivaInitCallback

    with tempfile.TemporaryDirectory(prefix="giva-sft-") as scratch:
        resumed = checkpoint_state(resume_from) if resume_from else {}
        if resume_from is not None:  # before the model loads: the adapter of a finished checkpoint is read, else the
            if is_finished(resumed):  # Trainer resumes the checkpoint in the format of the launch that wrote it
                check_zero3_finished(resume_from)
            else:
                check_resume_launch(resume_from, launch()[1])
        best = None
        if options.keep_best:
            first = launch()[0] == 0
            best = BestAdapter(options.checkpoints if options.save_steps is not None else None, first,
                               on_main=lambda work: _agreed(work, first, "the first process failed to write the "
                                                                       "--keep-best file"))  # every process raises
        trainer = make_trainer(options, device, path, tokenizer, data, scratch, resumed.get("global_step"), best)
        check_same_resume(every_rank(resumed.get("global_step")), options.checkpoints)  # the launch's group exists now
        if best is not None:
            on_every_process(lambda: best.start(resumed.get("global_step")),
                             "--keep-best: reading the kept adapter of the checkpoint folder failed on a process of the launch")
        if options.save_steps is not None and resume_from is None:
            on_main_process(trainer, lambda: write_record(options, data))
        check_truncation(options, trained_rows(trainer.train_dataset), len(data.train), len(trainer.eval_dataset),
                         len(data.validation), cut_completions(trainer.eval_dataset, options.max_length,
                                                               set(tokenizer.all_special_ids)), data.labels is not None)
        unit = f"packed sequences of --max-length {options.max_length}" if options.packing else "training rows"
        check_num_batches(options, len(trainer.train_dataset), trainer.args.world_size, unit)  # the rows TRL kept
        callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, GivaInitCallback))
        peft_model = trainer.model
        # the reference answers of exact match, where completions are single labels ('text' rows have none)
        answers = None if data.labels is None else (prompt_ids(trainer.eval_dataset), completion_ids(trainer.eval_dataset))

        def evaluate() -> tuple[float, Optional[float]]:
            loss = validation_loss(trainer, trainer.args.per_device_eval_batch_size)
            em = None if answers is None else exact_match(
                peft_model, tokenizer, *answers, 4 * trainer.args.per_device_eval_batch_size, options.progress)
            return loss, em

        scores_before: list[Any] = []

        def score_base_model() -> None:
            with peft_model.disable_adapter():  # lambda_o = 0 makes the adapted model the base model
                scores_before.extend(evaluate())

        zero3 = partitioned(peft_model)
        if zero3:  # ZeRO-3 loaded it partitioned: a forward needs the engine, which train() builds
            trainer.add_callback(on_train_begin(score_base_model))
        else:
            score_base_model()
        start = time.perf_counter()
        train_loss: Optional[float] = None
        if is_finished(resumed):  # trained to the end but not saved: no step left
            on_every_process(lambda: peft_model.load_adapter(
                resume_from, adapter_name=peft_model.active_adapter, is_trainable=True),
                f"--resume: loading the adapter of {resume_from} failed on a process of the launch")
            from transformers import TrainerState

            trainer.state = TrainerState.load_from_json(str(Path(resume_from) / "trainer_state.json"))  # its log too
        else:
            train_loss = trainer.train(resume_from_checkpoint=resume_from).training_loss  # bases from the checkpoint
        train_seconds = time.perf_counter() - start
        loss_before, em_before = scores_before
        loss_after, em_after = evaluate()
        kept_step = None
        if best is not None:  # the last step's adapter, unless it scores above (or ties, or is NaN) an earlier one
            kept_step = trainer.state.global_step
            if best.step is None:
                logger.warning("--keep-best: no validation ran before the last step (--eval-steps %d, %d steps); the last "
                               "step's adapter is kept", options.eval_steps, kept_step)
            elif best.step != kept_step and not loss_after < best.loss:
                with gathered(peft_model, modify=True):  # ZeRO-3: written whole, partitioned again after
                    on_every_process(lambda: best.restore(peft_model),
                                     "--keep-best: restoring the kept adapter failed on a process of the launch")
                kept_step = best.step
                loss_after, em_after = evaluate()
    trainable, total = peft_model.get_nb_trainable_parameters()
    result = SFTResult(
        model=options.model, data=data.source, device=device,
        precision="bf16" if options.bf16 else "fp16 autocast" if options.fp16 else "fp32",
        quantization="nf4" if options.load_in_4bit else "int8" if options.load_in_8bit else None,
        train_rows=len(data.train), validation_rows=len(data.validation), steps=trainer.state.global_step,
        val_loss_before=loss_before, val_loss_after=loss_after, exact_match_before=em_before, exact_match_after=em_after,
        train_loss=train_loss, trainable_parameters=trainable, total_parameters=total, adapter_bytes=0,
        init_seconds=callback.report.total_seconds if callback.report else 0.0,
        train_seconds=train_seconds, output_dir=options.output_dir, lora_dir=None,  # set once the export is written
        options=asdict(options), versions=_versions(), processes=trainer.args.world_size,
        resumed_from=resume_from,
        loss_tokens="every token" if row_format(data.train[0]) == "text" else "completion tokens only",
        packed_sequences=len(trainer.train_dataset) if options.packing else None,
        val_loss_curve=loss_curve(trainer) if options.eval_steps is not None else None, kept_step=kept_step,
        zero3=zero3,
    )

    from ..checkpoint import atomic_file, json_text

    def write(folder: str) -> None:
        peft_model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        result.adapter_bytes = directory_bytes(folder)
        Path(folder, RESULT_FILE).write_text(json_text(asdict(result)) + "\n", encoding="utf-8")

    def write_all() -> None:
        save_atomically(options.output_dir, write)  # an earlier run's chat template goes
        if options.export_lora is not None:  # the adapter first: a failed export loses no training
            from ..export import export_lora

            export_lora(peft_model, options.export_lora, tokenizer=tokenizer)  # its chat template, as giva export-lora
            result.lora_dir = options.export_lora
            with atomic_file(Path(options.output_dir).expanduser() / RESULT_FILE) as tmp:
                tmp.write_text(json_text(asdict(result)) + "\n", encoding="utf-8")

    with gathered(peft_model):  # ZeRO-3: the adapter whole on every process while the first one writes it
        on_main_process(trainer, write_all)
    result.lora_dir = options.export_lora  # every process: on_main_process raised on all of them if the export failed
    return result, peft_model, tokenizer


def load_sft_adapter(output_dir: str, model: Optional[str] = None, dtype: Any = None, device: Optional[str] = None,
                     quantized: Optional[bool] = None, attn_implementation: Optional[str] = None,
                     tokenizer: Any = None) -> tuple[Any, Any]:
    """Reload what `giva sft` saved, as it was trained: (the causal LM with its GiVA adapter, in eval mode; the tokenizer).

    The run's ``sft_result.json`` says how its base was loaded: in bf16 after ``--bf16`` (else fp32), quantised after
    ``--load-in-4bit`` / ``--load-in-8bit`` (the same bitsandbytes settings), with its ``--attn-implementation``
    unless that is a flash kernel the reload cannot run (not on a CUDA device, or its package missing: the model's own
    choice then; the kernel does not change what was trained). ``attn_implementation`` and ``dtype`` override the
    run's, ``quantized=False`` loads the unquantised base (an adapter trained on a 4-bit base served on the full
    base, as QLoRA adapters are), ``model`` the base model (default: the adapter
    config's), ``device`` where it goes (default the CPU), ``tokenizer`` the one saved beside the adapter when the
    caller has loaded it already (else it is loaded from there). A ``checkpoint-N`` folder of ``--save-steps`` is read
    through its run's record beside it; a folder with neither (an adapter written by other code) loads as an fp32
    run's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..assets import resolve_model

    folder = Path(os.path.expanduser(output_dir))
    if model is None:
        model = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    record, saved = saved_run(folder)
    run = saved.get("options", {})
    flags = {key: bool(run.get(key)) for key in ("bf16", "fp16", "load_in_4bit", "load_in_8bit")}
    if quantized is False:
        flags.update(load_in_4bit=False, load_in_8bit=False)
    elif quantized and not (flags["load_in_4bit"] or flags["load_in_8bit"]):
        why = (f"its {record.name} has neither load_in_4bit nor load_in_8bit" if record is not None else f"it holds no "
               f"{RESULT_FILE} to say how its base was quantised")
        raise ValueError(f"load_sft_adapter: quantized=True, but {folder} is not a run on a quantised base ({why})")
    if (flags["load_in_4bit"] or flags["load_in_8bit"]) and importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"load_sft_adapter: the run in {folder} trained on a {'4' if flags['load_in_4bit'] else '8'}-bit "
                          "base, which needs bitsandbytes: pip install 'giva[quant]', or pass quantized=False to put the "
                          "adapter on the unquantised base")
    device = device or "cpu"
    attention = attn_implementation or run.get("attn_implementation")
    if attn_implementation is None:  # the run's kernel, if it runs here
        try:
            check_attention(attention, device)
        except (ValueError, ImportError) as err:
            logger.info("load_sft_adapter: %s; the model's own attention instead", err)
            attention = None
    kwargs = base_loading(**flags, attn_implementation=attention, device=device, dtype=dtype)
    base = AutoModelForCausalLM.from_pretrained(resolve_model(model or "smollm2"), **kwargs)
    if "device_map" not in kwargs:
        base = base.to(device)
    return PeftModel.from_pretrained(base, str(folder)).eval(), tokenizer or AutoTokenizer.from_pretrained(folder)
