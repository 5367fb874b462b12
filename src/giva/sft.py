"""`giva sft`: supervised fine-tuning of a causal LM with GiVA through TRL's ``SFTTrainer``.

A thin layer: :class:`SFTOptions` (the command's flags, checked in ``__post_init__``) becomes a
:class:`giva.GivaConfig` and a TRL ``SFTConfig``; both go to ``SFTTrainer`` with
:class:`giva.GivaInitCallback`, which fills the bases from the trainer's own first batches. TRL owns the
data formatting (prompt/completion rows, chat templates, the completion-only loss mask); this module
adds the checks that run before the model loads, the before/after validation, the atomic save, resumable
checkpoints (``--save-steps``, ``--resume``: the Trainer's own) and the bookkeeping of a torchrun launch (one
process writes, the exact-match scoring is split over the processes).
"""

from __future__ import annotations

import hashlib
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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional

from .checkpoint import nested_or_same
from .data import DataError
from .sft_data import SFTData, load_sft_data, row_format
from .sft_eval import completion_ids, exact_match, prompt_ids, validation_loss

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps")
INIT_MODES = ("auto", "sketch", "exact")
LR_SCHEDULERS = ("linear", "cosine", "constant_with_warmup")  # transformers' names; after the warm-up
# transformers' attention implementations giva sft offers, and the package each flash kernel needs (CUDA only)
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")
FLASH_PACKAGES = {"flash_attention_2": ("flash_attn", "flash-attn"), "flash_attention_3": ("flash_attn_interface",
                  "flash-attn's hopper build")}
RESULT_FILE = "sft_result.json"
OPTIONS_FILE = "giva_sft_options.json"  # in --checkpoint-dir: the flags and rows --resume checks the new ones against
# SFTTrainer refuses an adapter on the output layer (after the model has loaded): why, for the check before that
TRL_LM_HEAD = ("the LM head, which TRL's SFTTrainer does not adapt: it computes the log-probabilities from the head's "
               "weight directly, so an adapter there would never be trained")
MAX_SEED = 2**32 - 1  # transformers' set_seed seeds numpy, which takes no larger seed
# Flags a resumed run may change: where things go, how it reports and logs, the checkpoint cadence, the device, the attention
# kernel, the split of a batch into micro-batches (same rows per optimizer step) and the validation batch. Every other
# flag changes what is trained.
# (--data, --data-split and --data-config may name the same rows elsewhere: the rows' SHA-256 is compared instead.)
RESUMABLE_CHANGES = frozenset({"device", "attn_implementation", "gradient_checkpointing", "micro_batch_size",
                               "eval_steps", "eval_batch_size", "report_to", "logging_steps", "logging_dir",
                               "output_dir", "export_lora", "overwrite", "progress", "save_steps", "checkpoint_dir",
                               "resume", "data", "data_split", "data_config"})


def _finite(name: str, value: Any, minimum: float, inclusive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (value == minimum and not inclusive):
        raise ValueError(f"SFTOptions.{name} must be a finite number {'>=' if inclusive else '>'} {minimum:g}, got {value!r}")


def _whole(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"SFTOptions.{name} must be a whole number >= {minimum}, got {value!r}")


@dataclass
class SFTOptions:
    """Everything `giva sft` takes; each field is one command-line flag of the same name."""

    model: str = field(default="smollm2", metadata={"help": "alias 'smollm2' (offline SmolLM2-135M-Instruct), a folder or a hub id"})
    data: str = field(default="pang-lee", metadata={"help": "'pang-lee', 'conll2010-uncertainty', a JSONL file, a dataset "
                                                            "folder or a datasets name"})
    data_split: str = field(default="train", metadata={"help": "the split of a datasets name or folder"})
    data_config: Optional[str] = field(default=None, metadata={"help": "the configuration of a datasets name"})
    device: str = field(default="auto", metadata={"help": "auto: cuda, else mps, else cpu"})
    bf16: bool = field(default=False, metadata={"help": "bf16 weights and autocast (also on CPU, where torch supports it)"})
    fp16: bool = field(default=False, metadata={"help": "fp16 autocast with loss scaling (GPU only); weights stay fp32"})
    load_in_4bit: bool = field(default=False, metadata={"help": "NF4 base weights with double quantisation (bitsandbytes)"})
    load_in_8bit: bool = field(default=False, metadata={"help": "int8 base weights (bitsandbytes)"})
    gradient_checkpointing: bool = False
    max_steps: Optional[int] = field(default=None, metadata={"help": "optimizer steps; overrides epochs"})
    epochs: float = 1.0
    lr: float = 1e-2  # the GiVA paper's learning rate for its LLM runs (GIVA_SPEC.md section 5)
    lr_scheduler: str = field(default="linear", metadata={"help": "the LR schedule after the warm-up"})
    warmup_ratio: float = field(default=0.06, metadata={"help": "share of the optimizer steps that warm the LR up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW's weight decay (on the vectors too)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm; 0: no clipping"})
    dropout: float = field(default=0.0, metadata={"help": "GiVA's dropout on the adapter's input (the paper's LLM runs: 0.05)"})
    batch_size: int = 8  # rows per optimizer step, over all processes of a torchrun launch
    micro_batch_size: Optional[int] = field(default=None, metadata={"help": "rows per forward on each process"})
    eval_steps: Optional[int] = field(default=None, metadata={"help": "the validation loss every N optimizer steps"})
    eval_batch_size: Optional[int] = field(default=None, metadata={"help": "validation rows per forward on each process; "
                                                                         "None: the micro-batch size"})
    max_length: int = 256
    packing: bool = field(default=False, metadata={"help": "rows packed into sequences of --max-length tokens"})
    attn_implementation: Optional[str] = field(default=None, metadata={"help": "transformers' attention; None: the model's"})
    val_size: int | float = 200
    max_train_samples: Optional[int] = None
    r: int = 8
    target_modules: str | list[str] = "all-linear"
    init_mode: str = "auto"
    num_batches: int | str = 1  # k calibration batches (the paper's default), or "all": every training batch
    seed: int = 0
    output_dir: str = "outputs/giva-sft"
    export_lora: Optional[str] = None
    overwrite: bool = False
    save_steps: Optional[int] = field(default=None, metadata={"help": "a resumable checkpoint every N optimizer steps"})
    checkpoint_dir: Optional[str] = field(default=None, metadata={"help": "default: '<output-dir>-checkpoints'"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in checkpoint_dir"})
    report_to: str | list[str] = field(default="none", metadata={"help": "transformers' integrations the Trainer "
                                                                        "reports to: 'none', 'all' or a list of names"})
    logging_steps: Optional[int] = field(default=None, metadata={"help": "log every N optimizer steps; None: 20 logs"})
    logging_dir: Optional[str] = field(default=None, metadata={"help": "TensorBoard's folder; default "
                                                                       "'<output-dir>-logs'"})
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("r", "batch_size"):
            _whole(name, getattr(self, name), 1)
        if self.num_batches != "all":
            try:
                _whole("num_batches", self.num_batches, 1)
            except ValueError:
                raise ValueError(
                    f"SFTOptions.num_batches must be a whole number >= 1 or 'all', got {self.num_batches!r}"
                ) from None
        _whole("max_length", self.max_length, 8)
        _whole("seed", self.seed, 0)
        if self.seed > MAX_SEED:
            raise ValueError(f"SFTOptions.seed must be a whole number <= {MAX_SEED} (2**32 - 1: transformers seeds numpy "
                             f"with it), got {self.seed!r}")
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to == "none" else self.report_to.split(",")
        if not isinstance(self.report_to, list) or not all(isinstance(n, str) and n for n in self.report_to) or (
                len(self.report_to) > 1 and {"all", "none"} & set(self.report_to)):
            raise ValueError(f"SFTOptions.report_to must be 'none', 'all' or integration names (comma-separated), got "
                             f"{self.report_to!r}")
        if self.report_to == ["none"]:
            self.report_to = []
        for name in ("max_steps", "max_train_samples", "micro_batch_size", "eval_steps", "eval_batch_size", "save_steps",
                     "logging_steps"):
            if getattr(self, name) is not None:
                _whole(name, getattr(self, name), 1)
        _finite("epochs", self.epochs, 0)
        _finite("lr", self.lr, 0)
        for name in ("weight_decay", "max_grad_norm", "warmup_ratio", "dropout"):
            _finite(name, getattr(self, name), 0, inclusive=True)
        for name in ("warmup_ratio", "dropout"):
            if getattr(self, name) >= 1:
                raise ValueError(f"SFTOptions.{name} must be a number in [0, 1), got {getattr(self, name)!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"SFTOptions.lr_scheduler must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}")
        is_fraction = isinstance(self.val_size, float) and 0 < self.val_size < 1
        if not is_fraction:
            _whole("val_size", self.val_size, 1)
        if not isinstance(self.data_split, str) or not self.data_split:
            raise ValueError(f"SFTOptions.data_split must be a split name, got {self.data_split!r}")
        if self.data_config is not None and (not isinstance(self.data_config, str) or not self.data_config):
            raise ValueError(f"SFTOptions.data_config must be None or a configuration name, got {self.data_config!r}")
        if self.device not in DEVICES:
            raise ValueError(f"SFTOptions.device must be one of {DEVICES}, got {self.device!r}")
        if self.attn_implementation is not None and self.attn_implementation not in ATTENTION:
            raise ValueError(f"SFTOptions.attn_implementation must be None or one of {ATTENTION}, "
                             f"got {self.attn_implementation!r}")
        if self.init_mode not in INIT_MODES:
            raise ValueError(f"SFTOptions.init_mode must be one of {INIT_MODES}, got {self.init_mode!r}")
        if self.bf16 and self.fp16:
            raise ValueError("--bf16 and --fp16 exclude each other; pick one")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("--load-in-4bit and --load-in-8bit exclude each other; pick one")
        if isinstance(self.target_modules, list) and (not self.target_modules or not all(self.target_modules)):
            raise ValueError(f"SFTOptions.target_modules has an empty module name: {self.target_modules!r}")
        if self.export_lora is not None and nested_or_same(self.export_lora, self.output_dir):
            raise ValueError(f"--export-lora {self.export_lora!r} and --output-dir {self.output_dir!r} are the same folder "
                             "or one holds the other; the LoRA export needs its own folder")
        if self.checkpoint_dir is not None and self.save_steps is None and not self.resume:
            raise ValueError(f"--checkpoint-dir {self.checkpoint_dir!r} is used with --save-steps N or --resume; "
                             "give one of them, or drop --checkpoint-dir")
        if self.save_steps is not None or self.resume:
            for flag, other in (("--output-dir", self.output_dir), ("--export-lora", self.export_lora)):
                if other is not None and nested_or_same(self.checkpoints, other):
                    raise ValueError(f"--checkpoint-dir {self.checkpoints!r} and {flag} {other!r} are the same folder or "
                                     "one holds the other; checkpoints need a folder of their own")

    @property
    def logs(self) -> str:
        """TensorBoard's folder, expanded: ``logging_dir``, else ``<output_dir>-logs`` beside the adapter's."""
        if self.logging_dir is not None:
            return os.path.abspath(os.path.expanduser(self.logging_dir))
        return os.path.abspath(os.path.expanduser(self.output_dir)) + "-logs"

    @property
    def checkpoints(self) -> str:
        """The checkpoint folder, expanded: ``checkpoint_dir``, else ``<output_dir>-checkpoints`` beside it."""
        if self.checkpoint_dir is not None:
            return os.path.abspath(os.path.expanduser(self.checkpoint_dir))
        return os.path.abspath(os.path.expanduser(self.output_dir)) + "-checkpoints"  # abspath: 'out/' and '.' too

    def batch_layout(self, world_size: int) -> tuple[int, int]:
        """(rows per forward on each process, gradient accumulation steps) for ``batch_size`` rows per optimizer step
        over ``world_size`` processes; a ValueError naming the flags if the rows do not split evenly."""
        per_process, left = divmod(self.batch_size, world_size)
        if left or not per_process:
            raise ValueError(f"--batch-size {self.batch_size} (rows per optimizer step) does not split evenly over "
                             f"{world_size} processes; give a multiple of {world_size}")
        micro = self.micro_batch_size or per_process
        if per_process % micro:
            over = f" x {world_size} processes" if world_size > 1 else ""
            raise ValueError(f"--batch-size {self.batch_size} is not a multiple of --micro-batch-size {micro}{over}; "
                             f"give a --micro-batch-size that divides {per_process}")
        return micro, per_process // micro


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
            f"trainable params   {self.trainable_parameters:,} of {self.total_parameters:,}\n"
            f"steps              {self.steps} "
            f"({'no step left to train' if self.train_loss is None else f'mean training loss {self.train_loss:.4f}'})"
            f"{f', resumed from {self.resumed_from}' if self.resumed_from else ''}"
            f"{f', {self.processes} processes' if self.processes > 1 else ''}\n"
            f"init / train time  {self.init_seconds:.1f} s / {self.train_seconds:.1f} s\n"
            f"adapter            {self.adapter_bytes / 1024:.1f} KiB in {self.output_dir}"
            + (f"\nLoRA export        {self.lora_dir}" if self.lora_dir else "")
        )


# ------------------------------------------------------------------------------------------ checks


def resolve_device(options: SFTOptions) -> str:
    """The device the run will use, or a ValueError if it, or the precision asked for, is not there, or if several
    GPUs would be driven by one process: outside torchrun (no ``LOCAL_RANK``, Accelerate's test) the Trainer wraps the
    model in ``nn.DataParallel`` over every visible GPU, with ``--batch-size`` rows on each and a schedule sized for
    one GPU's rows."""
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    device = options.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: no CUDA device is visible to torch {torch.__version__} "
                         f"({'a CPU-only build' if torch.version.cuda is None else 'CUDA build'}); use --device cpu or auto")
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if gpus > 1 and int(os.environ.get("LOCAL_RANK", "-1")) == -1:
        raise ValueError(f"--device {options.device}: {gpus} GPUs are visible and giva sft was not launched by torchrun, "
                         f"so the Trainer would run nn.DataParallel over them ({gpus} x --batch-size rows per step, the "
                         f"schedule sized for --batch-size); launch one process per GPU (torchrun --nproc_per_node "
                         f"{gpus} -- $(which giva) sft ...) or pick one GPU (CUDA_VISIBLE_DEVICES=0 giva sft ...)")
    if device == "mps" and not mps:
        raise ValueError("--device mps: torch.backends.mps.is_available() is False; use --device cpu or auto")
    if options.bf16 and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--bf16: {torch.cuda.get_device_name()} has no bf16 support; use --fp16")
    if options.fp16 and device == "cpu":
        raise ValueError("--fp16 needs a GPU (fp16 autocast with loss scaling); on CPU use --bf16 or full precision")
    return device


def check_packages() -> None:
    for package in ("trl", "datasets"):
        if importlib.util.find_spec(package) is None:
            raise ImportError(f"giva sft needs {package}: pip install 'giva[sft]' (TRL >= 1.16 and datasets)")


def check_attention(options: SFTOptions, device: str) -> None:
    """A flash attention kernel runs on CUDA GPUs only and needs its package: a clear error before the model loads
    (transformers would raise only once it loads the weights)."""
    if options.attn_implementation not in FLASH_PACKAGES:
        return
    module, package = FLASH_PACKAGES[options.attn_implementation]
    if device != "cuda":
        raise ValueError(f"--attn-implementation {options.attn_implementation} runs on CUDA GPUs only, and this run's "
                         f"device is {device}; use sdpa (transformers' default) or eager")
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"--attn-implementation {options.attn_implementation} needs {package} (the module {module!r} "
                          "is not installed); install it, or use sdpa (transformers' default)")


def check_quantization(options: SFTOptions) -> None:
    if (options.load_in_4bit or options.load_in_8bit) and importlib.util.find_spec("bitsandbytes") is None:
        flag = "--load-in-4bit" if options.load_in_4bit else "--load-in-8bit"
        raise ImportError(f"{flag} needs bitsandbytes: pip install 'giva[quant]' (bitsandbytes >= 0.50)")


def check_zero3() -> None:
    """DeepSpeed ZeRO-3 from ``accelerate launch``'s configuration (``ACCELERATE_USE_DEEPSPEED``, which the Trainer
    reads) is refused before the model loads: the Trainer would load it partitioned (``zero.Init``), and giva sft's own
    validation before training, its exact-match generation (split over the processes) and its save of the adapter (on
    the first process) read whole weights. Such a launch failed in the first validation with "'weight' must be 2-D"
    once the model had loaded. ZeRO stages 1 and 2 partition no weights: they run as data parallelism does."""
    from accelerate.utils import DeepSpeedPlugin, parse_flag_from_env

    if not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):  # accelerate's reading of it (transformers' is the same)
        return

    if DeepSpeedPlugin().zero_stage == 3:  # from ACCELERATE_DEEPSPEED_ZERO_STAGE or ACCELERATE_DEEPSPEED_CONFIG_FILE
        raise ValueError("DeepSpeed ZeRO-3 (accelerate launch's configuration: ACCELERATE_USE_DEEPSPEED, stage 3) is not "
                         "supported by giva sft, whose validation, exact-match scoring and adapter save read whole "
                         "weights; launch with torchrun, or ZeRO stage 1 or 2, or train through the Python API "
                         "(giva.initialize under DeepSpeed: docs/distributed.md)")


def check_output_dirs(options: SFTOptions) -> None:
    """The adapter folder and the LoRA folder can be written, and hold nothing a run would lose: each may be new or
    empty, or hold an earlier run's adapter (the LoRA folder: a LoRA export), replaced only with ``--overwrite``."""
    from .finetune import check_output_dir

    out = check_output_dir(options.output_dir)
    if out.is_dir() and any(out.iterdir()):
        if not (out / "adapter_config.json").exists() and not (out / RESULT_FILE).exists():
            raise FileExistsError(f"--output-dir {options.output_dir!r} is a non-empty folder that holds no adapter; "
                                  "give a new or empty folder")
        if not options.overwrite:
            raise FileExistsError(f"--output-dir {options.output_dir!r} already holds an adapter; pass --overwrite to "
                                  "replace it, or give another folder")
    if options.export_lora is not None:
        from .export import ExportError, _check_output

        lora = check_output_dir(options.export_lora)
        try:
            _check_output(lora)  # a file, read-only, another kind of adapter, or a non-empty folder with no adapter
        except ExportError as err:
            raise ExportError(f"--export-lora {options.export_lora!r}: {err}") from None
        if (lora / "adapter_config.json").exists() and not options.overwrite:
            raise FileExistsError(f"--export-lora {options.export_lora!r} already holds a LoRA export; pass --overwrite "
                                  "to replace it, or give another folder")


def check_tracking(options: SFTOptions) -> None:
    """``--report-to`` names integrations that are installed; TensorBoard's folder is one of its own (the adapter's
    folder is replaced whole at the end, a checkpoint folder has its own rules)."""
    from . import sft_tracking

    names = sft_tracking.resolve(options.report_to)
    if sft_tracking.TENSORBOARD not in names:
        if options.logging_dir is not None:
            raise ValueError(f"--logging-dir {options.logging_dir!r} is TensorBoard's folder; give --report-to "
                             "tensorboard with it, or drop it")
        return
    folders = [("--output-dir", options.output_dir), ("--export-lora", options.export_lora)]
    if options.save_steps is not None or options.resume:
        folders.append(("--checkpoint-dir", options.checkpoints))
    for flag, other in folders:
        if other is not None and nested_or_same(options.logs, other):
            raise ValueError(f"--logging-dir {options.logs!r} and {flag} {other!r} are the same folder or one holds "
                             "the other; TensorBoard's logs need a folder of their own")
    from .finetune import check_output_dir

    try:
        check_output_dir(options.logs)
    except OSError as err:  # a file, a path under a file, a parent this process cannot write in
        raise ValueError(f"--logging-dir: {err}") from None
    if not options.resume and not options.overwrite and sft_tracking.earlier_events(options.logs):
        raise ValueError(f"--logging-dir {options.logs!r} holds TensorBoard event files of an earlier run; pass "
                         "--overwrite to replace them (once training begins), or give another --logging-dir")


def check_num_batches(options: SFTOptions, train_rows: int, world_size: int, unit: str = "training rows") -> None:
    """``--num-batches k`` has :class:`giva.GivaInitCallback` draw ``k`` x (gradient accumulation) micro-batches from the
    Trainer's loader on each process, which holds ``ceil(ceil(train_rows / micro) / processes)`` of them (Accelerate
    gives every process the same count); a ValueError naming the flag if that is too few. With ``--packing`` the
    loader's rows are the packed sequences (``unit``)."""
    if options.num_batches == "all":
        return
    micro, accumulation = options.batch_layout(world_size)
    available = math.ceil(math.ceil(train_rows / micro) / world_size) // accumulation
    if options.num_batches > available:
        fix = f"give --num-batches {available} or less, or 'all'" if available else "give --num-batches all"
        raise ValueError(f"--num-batches {options.num_batches} asks for more calibration batches than the training data "
                         f"holds: its {train_rows} {unit} make {available} batch(es) of --batch-size "
                         f"{options.batch_size}; {fix}")


def launch() -> tuple[int, int]:
    """(this process's rank, the number of processes): torchrun's ``RANK`` / ``WORLD_SIZE``, else (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def run_record(options: SFTOptions, data: SFTData) -> dict[str, Any]:
    """What a run's checkpoint folder keeps of it for ``--resume`` to compare: the flags, and a SHA-256 of the rows
    (a data file edited in place between the two runs changes it). Tuples become lists, as in the stored file."""
    rows = json.dumps([data.train, data.validation], sort_keys=True, ensure_ascii=False).encode("utf-8")
    flags = {key: _compared(key, value) for key, value in json.loads(json.dumps(asdict(options))).items()}
    return {"options": flags, "data_sha256": hashlib.sha256(rows).hexdigest()}


def flag_changes(stored: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """``--flag stored -> given`` for each flag that changes what is trained (a flag the stored record lacks, from an
    older version, compares as its default)."""
    defaults = json.loads(json.dumps(asdict(SFTOptions())))
    return [f"--{k.replace('_', '-')} {stored.get(k, defaults[k])!r} -> {v!r}" for k, v in given.items()
            if k not in RESUMABLE_CHANGES and _compared(k, stored.get(k, defaults[k])) != _compared(k, v)]


def checkpoint_state(checkpoint: str | Path) -> dict[str, Any]:
    """The Trainer's ``trainer_state.json`` of a checkpoint."""
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))


def is_finished(state: dict[str, Any]) -> bool:
    return state.get("global_step", 0) >= state.get("max_steps", float("inf"))


def finished(checkpoint: Path) -> bool:
    """The Trainer finished writing ``checkpoint``: its ``trainer_state.json`` (the last file it writes) holds the
    Trainer's state. Missing, empty or invalid (a machine that went down during the save), it was cut off."""
    try:
        state = checkpoint_state(checkpoint)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(state, dict) and isinstance(state.get("global_step"), int)


def finished_checkpoints(folder: Path) -> list[Path]:
    """The ``checkpoint-N`` folders the Trainer finished writing (see :func:`finished`), by step."""
    steps = [(int(p.name.removeprefix("checkpoint-")), p) for p in folder.glob("checkpoint-*")
             if p.name.removeprefix("checkpoint-").isdigit() and p.is_dir()]
    return [p for _, p in sorted(steps) if finished(p)]


def _compared(key: str, value: Any) -> Any:
    """A flag's value as ``--resume`` compares it: module lists as sets, a local model folder as its absolute path."""
    if key == "target_modules" and isinstance(value, list):
        return sorted(value)
    if key == "model" and isinstance(value, str) and os.path.isdir(os.path.expanduser(value)):
        return os.path.abspath(os.path.expanduser(value))
    return value


def check_checkpoints(options: SFTOptions, data: SFTData) -> tuple[SFTOptions, Optional[str]]:
    """(the options to run with, the checkpoint to resume from or None), for ``--save-steps`` / ``--resume``.

    A fresh run refuses a folder with an earlier run's checkpoints or with files of something else; a run stopped
    before its first checkpoint left only its record, and starts again. ``--resume`` continues from the newest
    checkpoint the Trainer finished writing, after checking that the flags (those in :data:`RESUMABLE_CHANGES` may
    change) and the rows are the stored run's; with nothing to resume yet it starts the run (so a job script can
    always pass it), and without ``--save-steps`` it keeps the stored cadence."""
    from .finetune import check_output_dir

    folder = Path(options.checkpoints)
    if options.save_steps is None and not options.resume:
        return options, None
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"--checkpoint-dir {options.checkpoints!r} is a file; expected a folder")
    contents = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    record_file = folder / OPTIONS_FILE
    ours = OPTIONS_FILE in contents or any(name.startswith("checkpoint-") for name in contents)
    if contents and not ours:
        raise FileExistsError(f"--checkpoint-dir {options.checkpoints!r} is a non-empty folder that holds no giva sft "
                              "run; give a new or empty folder")
    done = finished_checkpoints(folder) if folder.is_dir() else []
    if not options.resume:
        if any(name.startswith("checkpoint-") for name in contents):
            raise FileExistsError(f"--checkpoint-dir {options.checkpoints!r} holds an earlier run's checkpoints; pass "
                                  "--resume to continue that run, or remove the folder to start over")
        check_output_dir(folder)
        return options, None
    if done and not record_file.is_file():
        raise FileNotFoundError(f"--resume: {options.checkpoints!r} holds checkpoints but no {OPTIONS_FILE}: not the "
                                "folder of a giva sft run")
    record = json.loads(record_file.read_text(encoding="utf-8")) if record_file.is_file() else {}
    stored = record.get("options", {})
    if options.save_steps is None and stored.get("save_steps") is not None:
        options = replace(options, save_steps=stored["save_steps"])
    if not done:
        if options.save_steps is None:
            raise ValueError(f"--resume: {options.checkpoints!r} holds no run to resume, and without --save-steps N this "
                             "run would write no checkpoint to resume later; add --save-steps N")
        logger.warning("--resume: %s holds no finished checkpoint yet; starting the run from its first step",
                       options.checkpoints)
        check_output_dir(folder)
        return options, None
    now = run_record(options, data)
    changed = flag_changes(stored, now["options"])
    if changed:
        raise ValueError(f"--resume: flags differ from the run in {options.checkpoints!r} (stored -> given): "
                         f"{'; '.join(changed)}; resume it with its own flags, or start a new run with another "
                         "--checkpoint-dir")
    if record.get("data_sha256") != now["data_sha256"]:
        raise ValueError(f"--resume: the training and validation rows of --data {options.data!r} are not those of the "
                         f"run in {options.checkpoints!r} (another SHA-256; was the file changed?); resume it on its "
                         "own data, or start a new run with another --checkpoint-dir")
    state = checkpoint_state(done[-1])
    saved_file = Path(options.output_dir).expanduser() / RESULT_FILE
    saved = json.loads(saved_file.read_text(encoding="utf-8")) if saved_file.is_file() else None
    if is_finished(state) and saved and saved.get("steps") == state["global_step"] and not flag_changes(
            saved.get("options", {}), now["options"]):
        raise ValueError(f"--resume: the run in {options.checkpoints!r} finished (step {state['global_step']}) and its "
                         f"adapter is in --output-dir {options.output_dir!r}; nothing to resume")
    for cut in sorted(p for p in folder.glob("checkpoint-*") if p.is_dir() and p not in done):
        state_file = cut / "trainer_state.json"
        what = f"{state_file} is empty or invalid" if state_file.exists() else f"{cut.name} has no trainer_state.json"
        logger.warning("--resume: %s (cut off while being written); resuming from %s", what, done[-1].name)
    return options, str(done[-1])


def preflight(options: SFTOptions) -> tuple[str, str, Any, SFTData]:
    """Every check that needs no model weights: (device, model path, tokenizer, data). Loads nothing big."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .assets import resolve_model
    from .finetune import check_max_length, model_skeleton
    from .model import check_targets_before_loading

    check_packages()
    options.batch_layout(launch()[1])
    device = resolve_device(options)
    check_attention(options, device)
    check_quantization(options)
    check_zero3()
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


def check_chat_template(tokenizer: Any, data: SFTData, model: str) -> None:
    """Render the chat template on every row as TRL will (the prompt with the generation prompt, then prompt and
    completion): a template that raises on a row (one that refuses a system message, as Mistral's early ones do) is a
    DataError naming the row's file and line, here rather than inside SFTTrainer after the model has loaded."""
    from jinja2.exceptions import TemplateError

    if row_format(data.train[0]) == "text":  # one format per file; TRL renders no template on a language-modelling row
        return
    for where, row in data.located():
        try:
            tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
            tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        except TemplateError as err:
            raise DataError(f"{where}: the chat template of --model {model!r} fails on this row: {err}") from None


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

    from . import sft_tracking

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
        use_cpu=device == "cpu",
        seed=options.seed,
        data_seed=options.seed,
        save_strategy="steps" if saving else "no",
        save_steps=options.save_steps or 500,
        save_total_limit=2,  # the newest, and the one before it in case the newest was cut off mid-write
        eval_strategy="no",
        report_to=sft_tracking.trainer_report_to(sft_tracking.resolve(options.report_to)),
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


def check_truncation(options: SFTOptions, train_kept: int, train_rows: int, val_kept: int, val_rows: int) -> None:
    """TRL drops the rows whose completion ``--max-length`` cuts off entirely: refuse if that empties training or
    touches the validation split (its scores would then cover other rows than the reference answers)."""
    if val_kept < val_rows or train_kept == 0:
        split, lost, total = ("validation", val_rows - val_kept, val_rows) if val_kept < val_rows else ("training", train_rows, train_rows)
        raise ValueError(f"--max-length {options.max_length} cuts off the whole completion of {lost} of the {total} "
                         f"{split} rows; raise --max-length")
    if train_kept < train_rows:
        logger.warning("--max-length %d cuts off the whole completion of %d of the %d training rows; they train nothing",
                       options.max_length, train_rows - train_kept, train_rows)


def completion_token_loss(model: Any, batch: Any) -> Any:
    """The calibration loss summed over the completion tokens (the model's mean times their count): every token
    weighs the same in the gradient however the rows are split into micro-batches and processes. The bases do not
    depend on the gradient's scale, so with one batch they are those of the mean loss."""
    from .init.capture import default_loss

    return default_loss(model, batch) * (batch["labels"][..., 1:] != -100).sum()  # the tokens the model's shift scores


def giva_config_of(options: SFTOptions) -> Any:
    """The adapter's :class:`giva.GivaConfig` for these options."""
    from .config import GivaConfig

    return GivaConfig(r=options.r, target_modules=options.target_modules, seed=options.seed, task_type="CAUSAL_LM",
                      giva_dropout=options.dropout)


def make_trainer(options: SFTOptions, device: str, path: str, tokenizer: Any, data: SFTData, scratch: str,
                 resume_step: Optional[int] = None) -> Any:
    """TRL's SFTTrainer over a freshly loaded model, with the GiVA config and :class:`giva.GivaInitCallback`
    (``resume_step``: the step of the checkpoint a ``--resume`` continues from, for the TensorBoard log)."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTTrainer

    from . import sft_tracking
    from .integrations.trainer import GivaInitCallback

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
                   *sft_tracking.callbacks(sft_tracking.resolve(options.report_to), options.logs, resume_step,
                                           replace=options.overwrite and not options.resume)],
    )
    # sized on the loader's rows, known once TRL has processed (and with --packing packed) them; read in train()
    for name, value in schedule(options, len(trainer.train_dataset)).items():
        setattr(trainer.args, name, value)
    trainer.remove_callback(PrinterCallback)  # without a progress bar it prints every log dict to stdout
    trainer.add_callback(_save_cadence())
    trainer.add_callback(_divergence(options))
    if options.eval_steps is not None:
        trainer.add_callback(_periodic_validation(trainer, options.eval_steps))
    return trainer


def _periodic_validation(trainer: Any, every: int) -> Any:
    """A callback: the validation loss (:func:`giva.sft_eval.validation_loss`) after every ``every``-th optimizer step,
    logged as ``eval_loss`` through the Trainer (its log history, which a checkpoint keeps, and the ``--report-to``
    integrations, as ``eval/loss``). Every process of a launch reaches it at the same step.

    Through ``transformers.Trainer.log``, not TRL's override (which would move the training metrics it has gathered
    since the last log, entropy and token accuracy, into this entry), and with the step's ``should_log`` put back: the
    Trainer's log call clears it, which dropped the step's training-loss log, and with it the divergence check of
    :func:`_divergence`, at every step that also validated (a diverging run with ``--eval-steps 1`` saved NaN
    vectors and exited 0)."""
    from transformers import Trainer, TrainerCallback

    class PeriodicValidation(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step % every == 0:
                loss = validation_loss(trainer, args.per_device_eval_batch_size)
                should_log = control.should_log
                Trainer.log(trainer, {"eval_loss": loss})
                control.should_log = should_log

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

    from .finetune import TrainingDiverged

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


@contextmanager
def _accelerate_precision_kept() -> Iterator[None]:
    """transformers 4.x's TrainingArguments writes ``ACCELERATE_MIXED_PRECISION`` into ``os.environ`` for a bf16/fp16
    run and leaves it there (5.x only reads it): every later Trainer of the process, an fp32 ``train_sft`` among
    them, would autocast to that dtype. The caller's value comes back afterwards."""
    saved = os.environ.get("ACCELERATE_MIXED_PRECISION")
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
        else:
            os.environ["ACCELERATE_MIXED_PRECISION"] = saved


def on_main_process(trainer: Any, work: Any) -> None:
    """``work()`` on the first process of a launch only (on the only one otherwise); the others wait for it, and
    every process raises if it failed, so none is left waiting for a process that has gone."""
    _agreed(work, trainer.is_world_process_zero(), "the first process of the launch failed to write the results")


def on_every_process(work: Any, what: str) -> None:
    """``work()`` on every process of a launch; if it fails on any, every process raises (naming the first that
    failed), so none goes on to a collective that a failed process will never reach."""
    _agreed(work, True, what)


def _agreed(work: Any, run_here: bool, what: str) -> None:
    import torch.distributed as dist

    from .integrations.distributed import is_distributed

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
    failures: list[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(failures) if message is not None]
    if failed:
        rank, message = failed[0]
        where = "" if not run_here else f" (process {rank})"
        raise RuntimeError(f"{what}{where}: {message}")


def _write_record(options: SFTOptions, data: SFTData) -> None:
    from .checkpoint import atomic_file

    with atomic_file(Path(options.checkpoints) / OPTIONS_FILE) as tmp:
        tmp.write_text(json.dumps(run_record(options, data), indent=2) + "\n", encoding="utf-8")


def _train(options: SFTOptions, device: str, path: str, tokenizer: Any, data: SFTData,
           resume_from: Optional[str] = None) -> tuple[SFTResult, Any, Any]:
    from .finetune import directory_bytes, save_atomically
    from .integrations.trainer import GivaInitCallback

    with tempfile.TemporaryDirectory(prefix="giva-sft-") as scratch:
        resumed = checkpoint_state(resume_from) if resume_from else {}
        trainer = make_trainer(options, device, path, tokenizer, data, scratch, resumed.get("global_step"))
        if options.save_steps is not None and resume_from is None:
            on_main_process(trainer, lambda: _write_record(options, data))
        check_truncation(options, trained_rows(trainer.train_dataset), len(data.train), len(trainer.eval_dataset),
                         len(data.validation))
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

        with peft_model.disable_adapter():  # lambda_o = 0 makes the adapted model the base model; its bases are unset yet
            loss_before, em_before = evaluate()
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
        val_loss_curve=loss_curve(trainer) if options.eval_steps is not None else None,
    )

    from .checkpoint import atomic_file, json_text

    def write(folder: str) -> None:
        peft_model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        result.adapter_bytes = directory_bytes(folder)
        Path(folder, RESULT_FILE).write_text(json_text(asdict(result)) + "\n", encoding="utf-8")

    def write_all() -> None:
        save_atomically(options.output_dir, write)  # an earlier run's chat template goes
        if options.export_lora is not None:  # the adapter first: a failed export loses no training
            from .export import export_lora

            export_lora(peft_model, options.export_lora)
            result.lora_dir = options.export_lora
            with atomic_file(Path(options.output_dir).expanduser() / RESULT_FILE) as tmp:
                tmp.write_text(json_text(asdict(result)) + "\n", encoding="utf-8")

    on_main_process(trainer, write_all)
    result.lora_dir = options.export_lora  # every process: on_main_process raised on all of them if the export failed
    return result, peft_model, tokenizer


def load_sft_adapter(output_dir: str, model: Optional[str] = None, dtype: Any = None, device: Optional[str] = None,
                     quantized: Optional[bool] = None, attn_implementation: Optional[str] = None) -> tuple[Any, Any]:
    """Reload what `giva sft` saved, as it was trained: (the causal LM with its GiVA adapter, in eval mode; the tokenizer).

    The run's ``sft_result.json`` says how its base was loaded: in bf16 after ``--bf16`` (else fp32), quantised after
    ``--load-in-4bit`` / ``--load-in-8bit`` (the same bitsandbytes settings), with its ``--attn-implementation``
    unless that is a flash kernel the reload cannot run (not on a CUDA device, or its package missing: the model's own
    choice then; the kernel does not change what was trained). ``attn_implementation`` and ``dtype`` override the
    run's, ``quantized=False`` loads the unquantised base (an adapter trained on a 4-bit base served on the full
    base, as QLoRA adapters are), ``model`` the base model (default: the adapter
    config's), ``device`` where it goes (default the CPU). A ``checkpoint-N`` folder of ``--save-steps`` is read
    through its run's record beside it; a folder with neither (an adapter written by other code) loads as an fp32
    run's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .assets import resolve_model

    folder = Path(os.path.expanduser(output_dir))
    if model is None:
        model = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    record = next((f for f in (folder / RESULT_FILE, folder.parent / OPTIONS_FILE)
                   if f.is_file() and (f.name == RESULT_FILE or folder.name.removeprefix("checkpoint-").isdigit())), None)
    run = json.loads(record.read_text(encoding="utf-8"))["options"] if record else {}
    flags = {key: bool(run.get(key)) for key in ("bf16", "fp16", "load_in_4bit", "load_in_8bit")}
    if quantized is False:
        flags.update(load_in_4bit=False, load_in_8bit=False)
    elif quantized and not (flags["load_in_4bit"] or flags["load_in_8bit"]):
        why = (f"its {record.name} has neither load_in_4bit nor load_in_8bit" if record else f"it holds no {RESULT_FILE} "
               "to say how its base was quantised")
        raise ValueError(f"load_sft_adapter: quantized=True, but {folder} is not a run on a quantised base ({why})")
    if (flags["load_in_4bit"] or flags["load_in_8bit"]) and importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"load_sft_adapter: the run in {folder} trained on a {'4' if flags['load_in_4bit'] else '8'}-bit "
                          "base, which needs bitsandbytes: pip install 'giva[quant]', or pass quantized=False to put the "
                          "adapter on the unquantised base")
    device = device or "cpu"
    attention = attn_implementation or run.get("attn_implementation")
    if attn_implementation is None and attention in FLASH_PACKAGES and not (
            device.startswith("cuda") and importlib.util.find_spec(FLASH_PACKAGES[attention][0]) is not None):
        logger.info("load_sft_adapter: the run's %s does not run on %s here; the model's own attention instead",
                    attention, device)
        attention = None
    kwargs = base_loading(**flags, attn_implementation=attention, device=device, dtype=dtype)
    base = AutoModelForCausalLM.from_pretrained(resolve_model(model or "smollm2"), **kwargs)
    if "device_map" not in kwargs:
        base = base.to(device)
    return PeftModel.from_pretrained(base, str(folder)).eval(), AutoTokenizer.from_pretrained(folder)
