"""`giva bench --suite sketch`: sketched vs exact GiVA bases on the real gradients of MiniLM and SmolLM2.

The reference is each layer's dense mean gradient over the calibration batches (every linear layer but
the head) and its full LAPACK SVD; for each rank r a fresh model is initialised with
``giva.initialize(mode="sketch")`` (variant VrUr) on the same batches. Each record gives, over every
targeted layer, the mean top-r principal cosine between the exact and sketched right singular vectors
(A) and left ones (B of VrUr), their minimum, times, and the memory of each mode.

    giva bench --suite sketch                        # MiniLM and SmolLM2, r = 8, 32, 64, the default sketch
    giva bench --suite sketch --dry-run              # the (model, r, setting) records not in the JSON yet, or stale
    python -m giva.bench.sketch --models smollm2 --ranks 8 --sketch 4:16 5:16   # other sketch settings

Writes benchmarks/results/sketch/sketch_accuracy.json (one record per model, r and sketch setting, each naming the
code commit it measured, :func:`~giva.bench.versions.code_commit`, and the library's default sketch then; records
of the code that runs are kept, so an interrupted run resumes and a rerun with every record there measures nothing,
while records of other code, or of none recorded, are stale and measured again unless ``--keep-stale``) and, from it
alone, sketch_accuracy.md (the table with each record's commit, and the verdict against the 0.99 target).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .names import SKETCH_SUITE
from .runner import write_json_atomically, write_text_atomically
from .versions import code_commit, same_code, short_commit, stale_note

logger = logging.getLogger(__name__)

RESULTS_NAME = "sketch_accuracy"  # sketch_accuracy.json and sketch_accuracy.md in the suite's folder
MODELS = ("minilm", "smollm2")
TARGET = 0.99  # issue 8: mean top-r principal cosine of A at the default sketch settings
# Singular directions below this fraction of the largest are numerically absent (a layer whose
# gradient has rank < r, e.g. the last layer of an encoder read at one token per example): the
# top-r subspace is undefined there, so only the top min(r, rank) directions are compared.
RANK_TOL = 1e-3


def _default_setting() -> tuple[int, Optional[int]]:
    from ..init import DEFAULT_OVERSAMPLING, DEFAULT_PASSES

    return DEFAULT_PASSES, DEFAULT_OVERSAMPLING


def library_default() -> dict[str, Any]:
    """The library's default sketch as the code that runs defines it (each record keeps the one it measured with)."""
    from ..init.sketch import MIN_OVERSAMPLING

    passes, oversampling = _default_setting()
    return {"passes": passes, "oversampling": oversampling, "min_oversampling": MIN_OVERSAMPLING}


@dataclass(frozen=True)
class SketchRequest:
    """What to measure: models x ranks x sketch settings (passes, oversampling; None: the library default)
    on ``num_batches`` batches of ``batch_size`` Pang & Lee sentences of at most ``max_length`` tokens."""

    models: tuple[str, ...] = MODELS
    ranks: tuple[int, ...] = (8, 32, 64)
    settings: Optional[tuple[tuple[int, Optional[int]], ...]] = None  # None: the library's default setting only
    num_batches: int = 4
    batch_size: int = 8
    max_length: int = 64
    threads: Optional[int] = None  # torch threads while measuring (None: torch's setting); every record keeps its count

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in MODELS]
        if not self.models or unknown:
            raise ValueError(f"SketchRequest.models must be among {list(MODELS)}, got {list(self.models)!r}")
        if not self.ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in self.ranks):
            raise ValueError(f"SketchRequest.ranks must be integers >= 1, got {list(self.ranks)!r}")
        for passes, oversampling in self.settings or ():
            if isinstance(passes, bool) or not isinstance(passes, int) or passes < 2:
                raise ValueError(f"SketchRequest.settings: passes must be an integer >= 2, got {passes!r}")
            if oversampling is not None and (isinstance(oversampling, bool) or not isinstance(oversampling, int) or oversampling < 0):
                raise ValueError(f"SketchRequest.settings: oversampling must be None or an integer >= 0, got {oversampling!r}")
        for name in ("num_batches", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SketchRequest.{name} must be an integer >= 1, got {value!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"SketchRequest.threads must be None or an integer >= 1, got {self.threads!r}")

    def sketch_settings(self) -> tuple[tuple[int, Optional[int]], ...]:
        return self.settings or (_default_setting(),)

    def setup(self) -> dict[str, int]:
        """The data every record of one JSON shares."""
        return {"num_batches": self.num_batches, "batch_size": self.batch_size, "max_length": self.max_length}


def row_key(model: str, r: int, passes: int, oversampling: Optional[int]) -> str:
    return f"{model}/r{r}/p{passes}/o{'default' if oversampling is None else oversampling}"


def results_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / f"{RESULTS_NAME}.json"


def load_results(output_dir: str | Path, request: SketchRequest) -> dict[str, Any]:
    """The records in ``output_dir`` (none yet: empty), refused in one line if they were measured on other data."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"sketch output folder {out} is a file, not a folder")
    path = results_path(out)
    if not path.exists():
        return {"rows": {}, "commands": []}
    try:
        results = json.loads(path.read_text())
        rows = results["rows"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{path} is not a sketch-accuracy record file (JSON with 'rows')") from None
    if not isinstance(rows, dict):
        raise ValueError(f"{path}: 'rows' must map record keys to records")
    if results.get("setup", request.setup()) != request.setup():
        raise ValueError(f"{path} holds records for {results['setup']}, not {request.setup()}: use another output folder")
    return results


def plan_sketch(output_dir: str | Path, request: Optional[SketchRequest] = None, keep_stale: bool = False) -> list[str]:
    """The records :func:`run_sketch` would measure now into ``output_dir``: those missing, and those measured by
    other code or with no commit recorded (stale; kept with ``keep_stale``)."""
    request = request or SketchRequest()
    rows = load_results(output_dir, request)["rows"]
    now = code_commit()
    return [
        f"sketch: {key}" + ("" if key not in rows else stale_note(rows[key].get("commit"), now))
        for key in _wanted(request, rows, redo=False, keep_stale=keep_stale)
    ]


def _wanted(request: SketchRequest, rows: dict[str, Any], redo: bool, keep_stale: bool = False) -> list[str]:
    """The keys of ``request`` to measure: every one with ``redo``, else those without a record of this code."""
    commit = code_commit()

    def kept(key: str) -> bool:
        return key in rows and (keep_stale or same_code(rows[key].get("commit"), commit))

    return [
        row_key(model, r, *setting) for model in request.models for r in request.ranks for setting in request.sketch_settings()
        if redo or not kept(row_key(model, r, *setting))
    ]


def batches(tokenizer: Any, num_batches: int, batch_size: int, max_length: int, causal: bool) -> list[dict]:
    """The first ``num_batches`` x ``batch_size`` Pang & Lee sentences, tokenised, with labels for the model's loss."""
    from ..data import load_bundled

    data = load_bundled("pang-lee")
    out = []
    for i in range(num_batches):
        rows = slice(i * batch_size, (i + 1) * batch_size)
        enc = tokenizer(data.texts[rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        if causal:
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        else:
            labels = torch.tensor(data.labels[rows])
        out.append({**enc, "labels": labels})
    return out


def load(name: str) -> tuple[torch.nn.Module, Any, bool]:
    """(model, tokenizer, causal) of a model of :data:`MODELS`."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from ..assets import minilm_path, smollm2_path
    from ..finetune import ensure_pad_token

    if name == "minilm":
        path = minilm_path()
        torch.manual_seed(0)  # the fresh classifier head
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval(), AutoTokenizer.from_pretrained(path), False
    path = smollm2_path()
    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(path), where=path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tokenizer, True


def reference(base: torch.nn.Module, data: list[dict], task_type: str) -> dict[str, Any]:
    """Exact singular vectors and numerical rank of each layer's dense mean gradient (LAPACK SVD), its time (after an
    untimed warm-up pass over the same batches) and bytes."""
    from peft import get_peft_model

    from ..config import GivaConfig
    from ..init import compute_gradients, giva_layers

    model = get_peft_model(copy.deepcopy(base), GivaConfig(r=1, target_modules=None, task_type=task_type))
    # One untimed pass first: the process's first forward and backward pay one-off costs (allocator growth, kernel
    # selection, page faults) that the sketch rows, all run after this one, never pay; timed cold, the reference's
    # time was mostly those costs and not comparable with the rows' sketch times.
    compute_gradients(model, giva_layers(model), data, num_batches=len(data), progress=False)
    start = time.perf_counter()
    grads, _ = compute_gradients(model, giva_layers(model), data, num_batches=len(data), progress=False)
    vectors = {}
    for name, g in grads.items():
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        vectors[name] = (u, vh, int((s > s[0] * RANK_TOL).sum()))
    dense_bytes = sum(g.numel() * g.element_size() for g in grads.values())
    return {"vectors": vectors, "seconds": time.perf_counter() - start, "bytes": dense_bytes}


def sketched(base: torch.nn.Module, data: list[dict], r: int, task_type: str, passes: int,
             oversampling: Optional[int]) -> tuple[dict, Any, float]:
    """The (A, B) of every layer after ``giva.initialize(mode="sketch")`` (VrUr), its report and its time."""
    from peft import get_peft_model

    from ..config import GivaConfig
    from ..init import giva_layers, initialize

    config = GivaConfig(r=r, target_modules=None, variant="VrUr", task_type=task_type)
    model = get_peft_model(copy.deepcopy(base), config)
    start = time.perf_counter()
    report = initialize(model, data, num_batches=len(data), progress=False, mode="sketch", passes=passes, oversampling=oversampling)
    seconds = time.perf_counter() - start
    bases = {n: (m.giva_A["default"].clone(), m.giva_B["default"].clone()) for n, m in giva_layers(model).items()}
    return bases, report, seconds


def measure_row(name: str, r: int, passes: int, oversampling: Optional[int], exact: dict[str, Any], data: list[dict],
                task_type: str, base: torch.nn.Module) -> dict[str, Any]:
    """Principal cosines of one sketch setting against the exact singular vectors (:func:`reference`), every layer."""
    from ..init.sketch import MIN_OVERSAMPLING, principal_cosines

    started = time.time()
    sketch, report, sketch_s = sketched(base, data, r, task_type, passes, oversampling)
    cos_a, cos_b = [], []
    for n, (u, vh, rank) in exact["vectors"].items():
        k = min(r, rank, sketch[n][0].shape[0])
        cos_a.append(principal_cosines(vh[:k], sketch[n][0][:k]).mean())
        cos_b.append(principal_cosines(u[:, :k].mT, sketch[n][1][:, :k].mT).mean())
    cos_a, cos_b = torch.stack(cos_a), torch.stack(cos_b)
    return {
        "model": name, "r": r, "passes": report.passes, "oversampling": oversampling,
        "width": r + (max(2 * r, MIN_OVERSAMPLING) if oversampling is None else oversampling),
        "default": (passes, oversampling) == _default_setting(),  # the default of the library this record measured
        "library_default": library_default(), "commit": code_commit(), "torch": torch.__version__,
        "layers": len(cos_a), "mean_cos_a": float(cos_a.mean()), "min_cos_a": float(cos_a.min()),
        "mean_cos_b": float(cos_b.mean()), "min_cos_b": float(cos_b.min()),
        "exact_seconds": exact["seconds"], "exact_warm": True, "sketch_seconds": sketch_s, "exact_mb": exact["bytes"] / 2**20,
        "sketch_mb_per_pass": report.sums_bytes / 2**20, "load_average": os.getloadavg()[0],
        "threads": torch.get_num_threads(), "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
    }


def sketch_report(results: dict[str, Any]) -> str:
    """sketch_accuracy.md: the markdown table and verdict, from the JSON records alone."""
    from ..init.sketch import DEFAULT_PASSES, MIN_OVERSAMPLING

    rows = sorted(results["rows"].values(), key=lambda x: (x["model"] != "minilm", x["r"], not x["default"], x["passes"], x["width"]))
    setup = results["setup"]
    lines = [
        "# Sketched vs exact GiVA bases on real gradients",
        "",
        f"Written by `giva bench --suite sketch` (`giva.bench.sketch`; do not edit by hand); records in `{RESULTS_NAME}.json`. "
        "The suite resumes: records already in the JSON are kept, and `--dry-run` lists the missing ones. "
        "Commands that measured the records (`scripts/sketch_accuracy.py` was this suite's earlier form; "
        "`python -m giva.bench.sketch` takes the same options):",
        "",
        *[f"- `{c}`" for c in results["commands"]],
        "",
        f"k = {setup['num_batches']} batches of {setup['batch_size']} Pang & Lee sentences (max length "
        f"{setup['max_length']}); MiniLM: sequence-classification loss, SmolLM2-135M: language-model loss on every "
        "token. Every linear layer but the head (MiniLM includes the pooler); variant VrUr. Exact: the dense mean "
        "gradient of each layer (`compute_gradients`) and its full LAPACK SVD (exact s: that pass plus the SVDs, timed "
        "after an untimed warm-up pass over the same batches, as every sketch row runs after it; `(cold)`: a record "
        "timed as the process's first forward and backward, before the warm-up existed, not comparable with its "
        "sketch s). threads: torch's CPU threads. "
        "Sketch: `giva.initialize(mode='sketch')` with the passes and l = r + oversampling of each row (library "
        f"default: {DEFAULT_PASSES} passes, l = r + max(2r, {MIN_OVERSAMPLING})). cos: mean of the "
        f"top-min(r, rank) principal cosines of one layer (rank: singular values above {RANK_TOL} of the largest), "
        "then mean / min over layers; A = right singular vectors, B = left ones (VrUr's B). MB: the dense "
        "gradients one process holds (exact) / the sums of one sketch pass (what a distributed run all-reduces). "
        f"{results['platform']}; times are noisy (shared 2-core machine; load average per row) and only "
        "comparable within one model's rows. default: the row's setting was the default of the library it measured. "
        "commit: the code the row measured (the last commit that changed `src/giva`); `unknown`: recorded before "
        "records named their commit. A run measures again every record of other code than its own (`--dry-run` "
        "lists them as stale; `--keep-stale` keeps them).",
        "",
        "| model | r | passes | l | default | layers | mean cos A (V) | min cos A | mean cos B (U) | min cos B | exact s "
        "| sketch s | exact MB | sketch MB/pass | load | threads | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in rows:
        lines.append(
            f"| {x['model']} | {x['r']} | {x['passes']} | {x['width']} | {'yes' if x['default'] else 'no'} | {x['layers']} | "
            f"{x['mean_cos_a']:.4f} | {x['min_cos_a']:.4f} | {x['mean_cos_b']:.4f} | {x['min_cos_b']:.4f} | "
            f"{x['exact_seconds']:.1f}{'' if x.get('exact_warm') else ' (cold)'} | {x['sketch_seconds']:.1f} | "
            f"{x['exact_mb']:.1f} | {x['sketch_mb_per_pass']:.1f} | {x['load_average']:.1f} | {x.get('threads', '?')} | "
            f"{short_commit(x.get('commit'))} |"
        )
    lines += ["", f"Target: mean top-r principal cosine of A >= {TARGET} at the default settings.", *_verdict(rows)]
    return "\n".join(lines) + "\n"


def _verdict(rows: list[dict[str, Any]]) -> list[str]:
    defaults = [x for x in rows if x["default"]]
    if not defaults:
        return []
    missed = [x for x in defaults if x["mean_cos_a"] < TARGET]
    worst = min(defaults, key=lambda x: x["min_cos_a"])
    commits = ", ".join(sorted({short_commit(x.get("commit")) for x in defaults}))
    return [
        ("Met on every default row measured" if not missed else f"NOT met on {len(missed)} of {len(defaults)} default rows")
        + ": " + ", ".join(f"{x['model']} r={x['r']} {x['mean_cos_a']:.4f}" for x in defaults)
        + f" (measured at commit {commits}).",
        f"The worst single layer at the default settings: {worst['model']} r={worst['r']}, cos A {worst['min_cos_a']:.4f}.",
    ]


def run_sketch(
    output_dir: str | Path, request: Optional[SketchRequest] = None, redo: bool = False,
    command: str = f"giva bench --suite {SKETCH_SUITE}", keep_stale: bool = False,
) -> dict[str, Any]:
    """Measure the records of ``request`` not in ``output_dir`` yet, or there but measured by other code than this
    process runs (all of them with ``redo``; the missing ones only with ``keep_stale``), saving after each, then
    rewrite sketch_accuracy.md from the JSON. ``command`` is recorded with the records it measured.

    Returns ``headlines`` (the default rows against the target), ``ran`` (the keys measured now), ``n_runs``
    (records in the JSON), ``problems`` (none), ``output_dir`` and ``reports`` (the .md's path, in a list).
    """
    request = request or SketchRequest()
    out = Path(output_dir)
    results = load_results(out, request)  # a bad folder or other data: refused before any model loads
    path = results_path(out)
    missing = set(_wanted(request, results["rows"], redo, keep_stale))
    ran: list[str] = []
    threads = torch.get_num_threads()
    try:
        if request.threads is not None:
            torch.set_num_threads(request.threads)
        _measure(request, results, path, out, missing, ran, command)
    finally:
        torch.set_num_threads(threads)
    if results["rows"]:
        write_text_atomically(out / f"{RESULTS_NAME}.md", sketch_report(results))
    headlines = [
        f"sketch {x['model']} r={x['r']}: mean cos A {x['mean_cos_a']:.4f} (min {x['min_cos_a']:.4f}; target {TARGET})"
        for x in results["rows"].values() if x["default"]
    ]
    return {"headlines": headlines, "ran": ran, "n_runs": len(results["rows"]), "problems": [], "output_dir": str(out),
            "reports": [str(out / f"{RESULTS_NAME}.md")]}


def _measure(request: SketchRequest, results: dict[str, Any], path: Path, out: Path, missing: set[str], ran: list[str],
             command: str) -> None:
    """Measure the ``missing`` records of ``request`` into ``results``, saving the JSON after each (``ran``: their keys)."""
    for name in request.models:
        wanted = [(r, s) for r in request.ranks for s in request.sketch_settings() if row_key(name, r, *s) in missing]
        if not wanted:
            continue
        if not ran:  # the first record this run measures: say how, and where
            results.update(setup=request.setup(), platform=f"torch {torch.__version__}, {platform.machine()}")
            results["commands"] = list(dict.fromkeys([*results["commands"], command]))
            out.mkdir(parents=True, exist_ok=True)
        base, tokenizer, causal = load(name)
        data = batches(tokenizer, request.num_batches, request.batch_size, request.max_length, causal)
        task_type = "CAUSAL_LM" if causal else "SEQ_CLS"
        exact = reference(base, data, task_type)
        for r, (passes, oversampling) in wanted:
            row = measure_row(name, r, passes, oversampling, exact, data, task_type, base)
            key = row_key(name, r, passes, oversampling)
            results["rows"][key] = row
            ran.append(key)
            write_json_atomically(path, results)  # each record survives an interruption; the .md follows from it
            logger.info("sketch %s: %s", key, json.dumps(row))


def _setting(text: str) -> tuple[int, Optional[int]]:
    """``"P"`` or ``"P:O"``: sketch passes and oversampling (omitted: the library default)."""
    passes, _, oversampling = text.partition(":")
    try:
        return int(passes), (int(oversampling) if oversampling else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sketch expects PASSES or PASSES:OVERSAMPLING, got {text!r}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m giva.bench.sketch", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--ranks", nargs="+", type=int, default=list(SketchRequest.ranks))
    parser.add_argument("--num-batches", type=int, default=SketchRequest.num_batches)
    parser.add_argument("--batch-size", type=int, default=SketchRequest.batch_size)
    parser.add_argument("--max-length", type=int, default=SketchRequest.max_length)
    parser.add_argument("--sketch", nargs="+", type=_setting, default=None,
                        help="sketch settings PASSES[:OVERSAMPLING] to measure (default: the library default)")
    parser.add_argument("--output-dir", default=f"benchmarks/results/{SKETCH_SUITE}",
                        help=f"folder of {RESULTS_NAME}.json (resumed) and {RESULTS_NAME}.md")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads while measuring (default: torch's)")
    parser.add_argument("--redo", action="store_true", help="measure records already in the JSON again")
    parser.add_argument("--keep-stale", action="store_true",
                        help="keep records measured by other code (another commit of src/giva, or none recorded)")
    args = parser.parse_args(argv)
    try:
        request = SketchRequest(
            models=tuple(args.models), ranks=tuple(args.ranks), settings=tuple(args.sketch) if args.sketch else None,
            num_batches=args.num_batches, batch_size=args.batch_size, max_length=args.max_length, threads=args.threads,
        )
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        command = " ".join(["python -m giva.bench.sketch", *(argv if argv is not None else sys.argv[1:])])
        result = run_sketch(args.output_dir, request, redo=args.redo, command=command, keep_stale=args.keep_stale)
    except ValueError as err:
        print(f"python -m giva.bench.sketch: {err}", file=sys.stderr)
        return 2
    print("\n".join(result["headlines"]))
    print(f"results: {', '.join(result['reports'])} ({result['n_runs']} records, {len(result['ran'])} new)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
