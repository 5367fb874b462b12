"""The checks `giva sft` makes before the model loads (and the two it can make only once TRL has processed the
rows): each raises one error that names the flag or file and what was expected."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from typing import Any, Optional

from ..checkpoint import nested_or_same
from ..data import DataError
from .data import SFTData, row_format
from .options import FLASH_PACKAGES, RESULT_FILE, SFTOptions

logger = logging.getLogger("giva.sft")


def available_device(device: str) -> str:
    """``--device`` as a torch device type: ``auto`` is CUDA, else MPS, else the CPU; a device torch cannot see is a
    ValueError naming the way out."""
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: no CUDA device is visible to torch {torch.__version__} "
                         f"({'a CPU-only build' if torch.version.cuda is None else 'CUDA build'}); use --device cpu or auto")
    if device == "mps" and not mps:
        raise ValueError("--device mps: torch.backends.mps.is_available() is False; use --device cpu or auto")
    return device


def resolve_device(options: SFTOptions) -> str:
    """The device the run will use, or a ValueError if it, or the precision asked for, is not there, or if several
    GPUs would be driven by one process: outside torchrun (no ``LOCAL_RANK``, Accelerate's test) the Trainer wraps the
    model in ``nn.DataParallel`` over every visible GPU, with ``--batch-size`` rows on each and a schedule sized for
    one GPU's rows."""
    import torch

    device = available_device(options.device)
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if gpus > 1 and int(os.environ.get("LOCAL_RANK", "-1")) == -1:
        raise ValueError(f"--device {options.device}: {gpus} GPUs are visible and giva sft was not launched by torchrun, "
                         f"so the Trainer would run nn.DataParallel over them ({gpus} x --batch-size rows per step, the "
                         f"schedule sized for --batch-size); launch one process per GPU (torchrun --nproc_per_node "
                         f"{gpus} -- $(which giva) sft ...) or pick one GPU (CUDA_VISIBLE_DEVICES=0 giva sft ...)")
    if options.bf16 and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--bf16: {torch.cuda.get_device_name()} has no bf16 support; use --fp16")
    if options.fp16 and device == "cpu":
        raise ValueError("--fp16 needs a GPU (fp16 autocast with loss scaling); on CPU use --bf16 or full precision")
    return device


def check_packages() -> None:
    for package in ("trl", "datasets"):
        if importlib.util.find_spec(package) is None:
            raise ImportError(f"giva sft needs {package}: pip install 'giva[sft]' (TRL >= 1.16 and datasets)")


def check_attention(attn_implementation: Optional[str], device: str) -> None:
    """A flash attention kernel runs on CUDA GPUs only and needs its package: a clear error before the model loads
    (transformers would raise only once it loads the weights). ``device``: ``cuda``, ``cuda:N``, ``cpu``, ..."""
    if attn_implementation not in FLASH_PACKAGES:
        return
    module, package = FLASH_PACKAGES[attn_implementation]
    if device.split(":")[0] != "cuda":
        raise ValueError(f"--attn-implementation {attn_implementation} runs on CUDA GPUs only, and this run's "
                         f"device is {device}; use sdpa (transformers' default) or eager")
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"--attn-implementation {attn_implementation} needs {package} (the module {module!r} "
                          "is not installed); install it, or use sdpa (transformers' default)")


def check_quantization(options: SFTOptions) -> None:
    if (options.load_in_4bit or options.load_in_8bit) and importlib.util.find_spec("bitsandbytes") is None:
        flag = "--load-in-4bit" if options.load_in_4bit else "--load-in-8bit"
        raise ImportError(f"{flag} needs bitsandbytes: pip install 'giva[quant]' (bitsandbytes >= 0.50)")


def check_sharding(options: SFTOptions) -> None:
    """FSDP from ``accelerate launch``'s configuration (``ACCELERATE_USE_FSDP``) is refused before the model loads: on
    GPUs the Trainer would shard the model when training starts, and giva sft's own validation, exact-match generation
    and save of the adapter read whole weights outside it; on CPUs Accelerate ignores the variable and runs data
    parallelism, so the user who asked for FSDP would silently get DDP. DeepSpeed ZeRO-3 runs
    (:mod:`giva.sft.zero3`), without the flags it refuses."""
    from accelerate.utils import parse_flag_from_env

    from .zero3 import check_zero3_run, zero3_launch

    if parse_flag_from_env("ACCELERATE_USE_FSDP"):  # accelerate's reading of it (transformers' is the same)
        raise ValueError("FSDP (accelerate launch's configuration: ACCELERATE_USE_FSDP) is not supported by giva sft, "
                         "whose validation, exact-match scoring and adapter save read whole weights; launch with "
                         "DeepSpeed ZeRO-3 to shard the base (docs/sft.md), or with torchrun (data parallelism: GiVA's "
                         "gradients and optimizer state are two vectors per layer, so sharding them saves next to "
                         "nothing), or load the base in 4 bits (--load-in-4bit), or train through the Python API "
                         "(giva.initialize under FSDP2: docs/distributed.md)")
    if zero3_launch():
        check_zero3_run(options)


def check_output_dirs(options: SFTOptions) -> None:
    """The adapter folder and the LoRA folder can be written, and hold nothing a run would lose: each may be new or
    empty, or hold an earlier run's adapter (the LoRA folder: a LoRA export), replaced only with ``--overwrite``."""
    from ..finetune import check_output_dir

    out = check_output_dir(options.output_dir)
    if out.is_dir() and any(out.iterdir()):
        if not (out / "adapter_config.json").exists() and not (out / RESULT_FILE).exists():
            raise FileExistsError(f"--output-dir {options.output_dir!r} is a non-empty folder that holds no adapter; "
                                  "give a new or empty folder")
        if not options.overwrite:
            raise FileExistsError(f"--output-dir {options.output_dir!r} already holds an adapter; pass --overwrite to "
                                  "replace it, or give another folder")
    if options.export_lora is not None:
        from ..export import ExportError, _check_output

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
    from . import tracking

    names = tracking.resolve(options.report_to)
    if tracking.TENSORBOARD not in names:
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
    from ..finetune import check_output_dir

    try:
        check_output_dir(options.logs)
    except OSError as err:  # a file, a path under a file, a parent this process cannot write in
        raise ValueError(f"--logging-dir: {err}") from None
    if not options.resume and not options.overwrite and tracking.earlier_events(options.logs):
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


def check_truncation(options: SFTOptions, train_kept: int, train_rows: int, val_kept: int, val_rows: int,
                     val_cut: int = 0, exact_match: bool = False) -> None:
    """TRL drops the rows whose completion ``--max-length`` cuts off entirely: refuse if that empties training or
    touches the validation split (its scores would then cover other rows than the reference answers). ``val_cut``
    validation rows lost the end of their completion: with ``exact_match`` scored that is refused too (the answer
    would be compared with the cut reply, not the row's), else said in a warning."""
    if val_kept < val_rows or train_kept == 0:
        split, lost, total = ("validation", val_rows - val_kept, val_rows) if val_kept < val_rows else ("training", train_rows, train_rows)
        raise ValueError(f"--max-length {options.max_length} cuts off the whole completion of {lost} of the {total} "
                         f"{split} rows; raise --max-length")
    if val_cut and exact_match:
        raise ValueError(f"--max-length {options.max_length} cuts the end off the completion of {val_cut} of the "
                         f"{val_rows} validation rows, and exact match would compare the answers with the cut replies; "
                         "raise --max-length")
    if val_cut:
        logger.warning("--max-length %d cuts the end off the completion of %d of the %d validation rows; their loss "
                       "covers the tokens kept", options.max_length, val_cut, val_rows)
    if train_kept < train_rows:
        logger.warning("--max-length %d cuts off the whole completion of %d of the %d training rows; they train nothing",
                       options.max_length, train_rows - train_kept, train_rows)
