"""The options of `giva sft`: :class:`SFTOptions` (one field per command-line flag, checked as it is built), the
choices its flags take, the flags ``--resume`` lets change, and the files a run writes.

The CLI reads it to build its parser, :mod:`giva.sft.checks` and :mod:`giva.sft.checkpoints` read it, and
:mod:`giva.sft.run` runs it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..checkpoint import nested_or_same

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
# kernel, recomputation and compilation, the split of a batch into micro-batches (same rows per optimizer step) and the validation batch. Every other
# flag changes what is trained.
# (--data, --data-split and --data-config may name the same rows elsewhere: the rows' SHA-256 is compared instead.)
RESUMABLE_CHANGES = frozenset({"device", "attn_implementation", "gradient_checkpointing", "torch_compile", "micro_batch_size",
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
    torch_compile: bool = field(default=False, metadata={"help": "the training step under torch.compile (inductor)"})
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
    keep_best: bool = field(default=False, metadata={"help": "save the adapter of the --eval-steps validation with the "
                                                             "lowest loss (or the last step's, if lower)"})
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
        if self.keep_best and self.eval_steps is None:
            raise ValueError("--keep-best needs --eval-steps N: the adapter is chosen among the validations every N "
                             "optimizer steps (and the last step)")
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
