"""The `finetune` suite: `giva finetune` recipes compared on the VALIDATION split (``giva bench --suite finetune``).

Each study is a phase (``--phases lr,calibration,init-mode,rank-conll,bases-dtype``) whose arms differ only in `giva finetune` flags;
every arm runs on the study's seeds, one fresh ``giva finetune --no-progress --json FLAGS`` process per run
(`giva finetune` never scores the test split, so nothing here sees it). A study's records live in
``<output_dir>/<study file>.json``, appended as each run finishes, so an interrupted study resumes where it
stopped; a record counts as done for a planned run when its flags are exactly the run's flags. The report
(``<study file>.md``) is rewritten from the records after every run:

- ``lr``: `giva finetune`'s default LR, chosen on validation with the evidence suite's adaptive rule
  (:func:`giva.bench.runner.adaptive_plan`);
- ``calibration``: ``--num-batches all`` (the default) against ``4``, paired by seed, with what each costs;
- ``init-mode``: ``--init-mode sketch`` against ``exact``, paired by seed;
- ``rank-conll``: ``--r 32`` against ``8`` on CoNLL-2010, paired by seed;
- ``bases-dtype``: ``--bases-dtype bfloat16`` against ``float32``, paired by seed, plus each fp32-trained
  adapter re-evaluated with its ``A`` rounded to bf16.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tqdm.auto import tqdm

from .names import FINETUNE_SUITE
from .report import mean_std
from .runner import RunFailedError, adaptive_plan, lr_key, write_text_atomically

logger = logging.getLogger(__name__)

RECORD_FIELDS = ("accuracy_before", "init_seconds", "train_seconds", "adapter_bytes", "config")


@dataclass(frozen=True)
class Run:
    """One `giva finetune` run of a study: its arm, seed and the exact flags it is given."""

    study: str
    arm: str
    seed: int
    flags: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{FINETUNE_SUITE}: {self.study}/{self.arm}/seed {self.seed}"


def paired(by_arm: dict[str, dict[int, float]], a: str, b: str) -> dict[str, list]:
    """Validation accuracy of arm ``a`` minus arm ``b``, over the seeds both arms have (in seed order)."""
    seeds = sorted(set(by_arm.get(a, {})) & set(by_arm.get(b, {})))
    return {"seeds": seeds, "differences": [by_arm[a][s] - by_arm[b][s] for s in seeds]}


@dataclass(frozen=True)
class Study:
    """Arms x seeds of `giva finetune` runs that differ only in the arm's flags; ``recipe`` goes to every run."""

    name: str
    stem: str  # the records are <stem>.json, the report <stem>.md
    title: str
    option: str  # the `giva finetune` flag the arms set
    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    recipe: tuple[str, ...] = ()

    def flags(self, arm: str, seed: int) -> tuple[str, ...]:
        return (self.option, arm, "--seed", str(seed), *self.recipe)

    def current(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records made with exactly the flags this study gives their arm and seed (others are kept, not used)."""
        return [r for r in records if tuple(r["flags"]) == self.flags(r["arm"], r["seed"])]

    def by_arm(self, records: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
        """arm -> seed -> validation accuracy of the current records."""
        out: dict[str, dict[int, float]] = {}
        for r in self.current(records):
            out.setdefault(r["arm"], {})[r["seed"]] = r["val_accuracy"]
        return out

    def plan(self, records: list[dict[str, Any]]) -> list[Run]:
        """The runs still missing, seed by seed (so that pairs complete first)."""
        done = {tuple(r["flags"]) for r in records}
        runs = [Run(self.name, arm, seed, self.flags(arm, seed)) for seed in self.seeds for arm in self.arms]
        return [run for run in runs if run.flags not in done]

    def waiting(self, records: list[dict[str, Any]]) -> list[str]:
        """Runs that will be planned once the listed ones finish (none for a fixed grid)."""
        return []

    def measure(self, run: Run, folder: Path, result: dict[str, Any]) -> dict[str, Any]:
        """Measurements beyond `giva finetune`'s own, taken on the saved adapter in ``folder`` before it is removed."""
        return {}

    def summary(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        by = self.by_arm(records)
        return {"validation": {a: by.get(a, {}) for a in self.arms}, "paired": paired(by, *self.arms)}

    def headline(self, summary: dict[str, Any]) -> str:
        a, b = self.arms
        diffs = summary["paired"]["differences"]
        if not diffs:
            return f"{self.name}: no seed has both {a} and {b} yet"
        mean, std = mean_std(diffs)
        return f"{self.name}: {a} - {b} {100 * mean:+.2f} ± {100 * std:.2f} points of validation accuracy (n={len(diffs)})"

    def render(self, doc: dict[str, Any]) -> list[str]:
        raise NotImplementedError


def _header(study: Study, doc: dict[str, Any], each_run: str) -> list[str]:
    lines = [
        f"# {study.title}",
        "",
        f"Written by `giva bench --suite finetune --phases {study.name}` from the records in the JSON next to this file "
        "(rerun it to add the runs still missing; `giva bench --suite finetune --report-only` rewrites the reports alone).",
    ]
    if "converted_from" in doc:
        lines.append(f"The records were made by `{doc['converted_from']['command']}` "
                     f"({doc['converted_from']['note']}).")
    if "flags_pinned" in doc:
        lines.append(doc["flags_pinned"])
    return [*lines, "", f"Each run: `giva finetune --no-progress --json {each_run}`. {doc['description']}", ""]


def _times_table(records: list[dict[str, Any]], arm: str) -> list[str]:
    def cell(r: dict[str, Any], key: str) -> str:
        return f"{r[key]:.1f}" if key in r else "-"

    return [f"| {arm} | seed | init s | train s | load |", "|---|---|---|---|---|"] + [
        f"| {r['arm']} | {r['seed']} | {cell(r, 'init_seconds')} | {cell(r, 'train_seconds')} | {cell(r, 'load_average')} |"
        for r in records
    ]


@dataclass(frozen=True)
class LrStudy(Study):
    """The LR of `giva finetune`'s default recipe: the evidence suite's adaptive sweep, on the validation split."""

    sweep_seeds: tuple[int, ...] = (0, 1)
    max_extensions: int = 4

    def flags(self, arm: str, seed: int) -> tuple[str, ...]:
        return (self.option, repr(lr_key(float(arm))), "--seed", str(seed), *self.recipe)

    def _next(self, records: list[dict[str, Any]]) -> tuple[list[tuple[float, int]], Optional[float]]:
        vals = {lr_key(float(arm)): seeds for arm, seeds in self.by_arm(records).items()}
        return adaptive_plan([float(a) for a in self.arms], self.sweep_seeds, self.seeds, vals, max_extensions=self.max_extensions)

    def plan(self, records: list[dict[str, Any]]) -> list[Run]:
        todo, _ = self._next(records)
        return [Run(self.name, f"{lr:g}", seed, self.flags(f"{lr:g}", seed)) for lr, seed in todo]

    def waiting(self, records: list[dict[str, Any]]) -> list[str]:
        _, chosen = self._next(records)
        if chosen is not None:
            return []
        return [f"{FINETUNE_SUITE}: {self.name}: the chosen LR on seeds {list(self.seeds)}, and any LR the sweep adds, "
                "once the listed runs finish"]

    def summary(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        by = self.by_arm(records)
        _, chosen = self._next(records)
        out: dict[str, Any] = {"chosen_lr": chosen, "validation": dict(sorted(by.items(), key=lambda kv: float(kv[0])))}
        if chosen is not None:
            best = f"{chosen:g}"
            out["paired_minus_chosen"] = {arm: paired(by, arm, best) for arm in out["validation"] if arm != best}
        return out

    def headline(self, summary: dict[str, Any]) -> str:
        chosen = summary["chosen_lr"]
        if chosen is None:
            return f"{self.name}: the sweep has not settled yet"
        mean, std = mean_std(list(summary["validation"][f"{chosen:g}"].values()))
        return f"{self.name}: chosen LR {chosen:g}, validation accuracy {100 * mean:.2f} % ± {100 * std:.2f}"

    def render(self, doc: dict[str, Any]) -> list[str]:
        summary, sweep = doc["summary"], list(self.sweep_seeds)
        vals = {float(arm): seeds for arm, seeds in summary["validation"].items()}
        chosen = summary["chosen_lr"]
        all_seeds = sorted({s for v in vals.values() for s in v})
        lines = _header(self, doc, f"{self.option} LR --seed SEED {' '.join(self.recipe)}".rstrip()) + [
            f"Rule: the best mean validation accuracy over seeds {sweep} (ties: the smaller LR), starting from "
            f"{[float(a) for a in self.arms]}; while the best sits strictly at an edge the grid is extended x2 (at most "
            f"{self.max_extensions} times); then the chosen LR runs on seeds {list(self.seeds)}.",
            "",
            "| LR | " + " | ".join(f"seed {s}" for s in all_seeds) + " | mean over sweep seeds |",
            "|---|" + "---|" * (len(all_seeds) + 1),
        ]
        for lr in sorted(vals):
            cells = [f"{100 * vals[lr][s]:.2f}" if s in vals[lr] else "-" for s in all_seeds]
            on_sweep = [vals[lr][s] for s in sweep if s in vals[lr]]
            mean = f"{100 * statistics.fmean(on_sweep):.2f}" if len(on_sweep) == len(sweep) else "-"
            mark = " (chosen)" if chosen is not None and lr == chosen else ""
            lines.append(f"| {lr:g}{mark} | " + " | ".join(cells) + f" | {mean} |")
        if chosen is None:
            lines += ["", "The sweep has not settled yet; rerun the command to continue it."]
        else:
            final = list(vals[chosen].values())
            mean, std = mean_std(final)
            lines += ["", f"Chosen LR: **{chosen:g}**, validation accuracy {100 * mean:.2f} % ± {100 * std:.2f} "
                      f"(mean ± std over {len(final)} seeds)."]
            lines += ["", "Each LR minus the chosen one, paired by seed (points of validation accuracy):", ""]
            for arm, pair in summary["paired_minus_chosen"].items():
                lines.append(f"- {arm}: " + ", ".join(f"seed {s} {100 * d:+.2f}" for s, d in zip(pair["seeds"], pair["differences"])))
        ordered = sorted(self.current(doc["runs"]), key=lambda r: (float(r["arm"]), r["seed"]))
        return lines + ["", "Times (s; a shared 2-core machine, load average per run):", "", *_times_table(ordered, "LR")]


@dataclass(frozen=True)
class PairedStudy(Study):
    """Two arms of one flag (e.g. sketched against exact bases), the rest of the recipe alike, paired by seed."""

    column: str = "arm"  # what the arm is, in the report's tables

    def render(self, doc: dict[str, Any]) -> list[str]:
        a, b = self.arms
        lines = _header(self, doc, f"{self.option} {self.column.upper()} --seed SEED {' '.join(self.recipe)}") + [
            f"| {self.column} | seed | val accuracy before | val accuracy after | init s | train s | calibration batches | "
            "passes | load |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(self.current(doc["runs"]), key=lambda r: (r["arm"], r["seed"])):
            lines.append(
                f"| {r['arm']} | {r['seed']} | {100 * r['accuracy_before']:.2f} | {100 * r['val_accuracy']:.2f} | "
                f"{r['init_seconds']:.1f} | {r['train_seconds']:.1f} | {r['config'].get('num_batches', '-')} | "
                f"{r['config']['init_passes']} | {r['load_average']:.1f} |"
            )

        def cell(values: Sequence[float], unit: str = "") -> str:
            if not values:
                return "-"
            mean, std = mean_std(values)
            return f"{100 * mean:.2f} ± {100 * std:.2f}{unit}"

        summary = doc["summary"]
        diffs = summary["paired"]["differences"]
        times = {arm: [r["init_seconds"] for r in self.current(doc["runs"]) if r["arm"] == arm] for arm in self.arms}
        lines += [
            "",
            "| | validation accuracy, % (mean ± std over seeds) | init s (mean) |",
            "|---|---|---|",
            *[f"| {m} | {cell(list(summary['validation'][m].values()))} (n={len(summary['validation'][m])}) | "
              f"{f'{statistics.fmean(times[m]):.1f}' if times[m] else '-'} |" for m in self.arms],
            f"| {a} - {b}, paired by seed | {cell(diffs, ' points')} (n={len(diffs)}; "
            + ", ".join(f"{100 * d:+.2f}" for d in diffs) + ") | |",
        ]
        return lines


@dataclass(frozen=True)
class BasesDtypeStudy(Study):
    """A stored in bf16 against fp32; the fp32-trained adapter is also re-evaluated with its A rounded to bf16."""

    def measure(self, run: Run, folder: Path, result: dict[str, Any]) -> dict[str, Any]:
        return {"rounding": rounding_effect(folder, result)} if run.arm == "float32" else {}

    def summary(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().summary(records)
        both = set(out["paired"]["seeds"])
        rounding = [r["rounding"] for r in self.current(records) if "rounding" in r and r["seed"] in both]
        if rounding:
            out["rounding"] = {
                "logits_max_abs_diff": max(r["logits_max_abs_diff"] for r in rounding),
                "logits_mean_abs_diff": statistics.fmean(r["logits_mean_abs_diff"] for r in rounding),
                "predictions_changed": sum(r["predictions_changed"] for r in rounding),
            }
        return out

    def render(self, doc: dict[str, Any]) -> list[str]:
        bf16_arm, fp32_arm = self.arms
        lines = _header(self, doc, f"{self.option} DTYPE --seed SEED {' '.join(self.recipe)}") + [
            "| seed | val acc, A fp32 | val acc, A bf16 | bf16 - fp32 | fp32-trained adapter with A rounded to bf16: "
            "max / mean abs logit change (mean abs logit) | predictions changed | val acc with rounded A |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        by = {(r["seed"], r["arm"]): r for r in self.current(doc["runs"])}
        summary = doc["summary"]
        for seed in summary["paired"]["seeds"]:
            fp32, bf16 = by[seed, fp32_arm], by[seed, bf16_arm]
            rd = fp32["rounding"]
            lines.append(
                f"| {seed} | {fp32['val_accuracy']:.2%} | {bf16['val_accuracy']:.2%} | "
                f"{(bf16['val_accuracy'] - fp32['val_accuracy']) * 100:+.2f} pt | {rd['logits_max_abs_diff']:.2e} / "
                f"{rd['logits_mean_abs_diff']:.2e} ({rd['logits_mean_abs']:.2f}) | {rd['predictions_changed']} of {rd['n_val']} | "
                f"{rd['val_accuracy_A_rounded_to_bf16']:.2%} |"
            )
        if "rounding" in summary:
            (fa, fs), (ba, bs) = (mean_std(list(summary["validation"][d].values())) for d in (fp32_arm, bf16_arm))
            dm, ds = mean_std(summary["paired"]["differences"])
            rd = summary["rounding"]
            lines += [
                "",
                f"Over {len(summary['paired']['seeds'])} seeds: validation accuracy A fp32 {fa:.2%} ± {fs:.2%}, "
                f"A bf16 {ba:.2%} ± {bs:.2%} (mean ± std); paired difference bf16 - fp32 {dm * 100:+.2f} ± {ds * 100:.2f} pt. "
                f"Rounding a trained fp32 A to bf16: logits change by at most {rd['logits_max_abs_diff']:.2e} "
                f"(mean {rd['logits_mean_abs_diff']:.2e}); {rd['predictions_changed']} validation prediction(s) changed in all.",
            ]
        return lines


# k=4 calibration batches, `giva finetune`'s default until the whole training set ("all") replaced it: the studies
# made under it keep it, so that their records stay theirs (each record's config.num_batches says 4).
K4 = ("--num-batches", "4")
STUDIES: tuple[Study, ...] = (
    LrStudy(
        name="lr", stem="lr_sweep", title="`giva finetune`: the default LR, chosen on validation", option="--lr",
        arms=("0.01", "0.02", "0.04"), seeds=(0, 1, 2), recipe=K4,
    ),
    PairedStudy(
        name="calibration", stem="calibration",
        title="`giva finetune`'s calibration: every training batch against k=4 (validation split)",
        option="--num-batches", arms=("all", "4"), seeds=(0, 1, 2), column="calibration",
    ),
    PairedStudy(
        name="init-mode", stem="sketch_vs_exact", title="Fine-tuning accuracy: sketched vs exact GiVA bases (`giva finetune`)",
        option="--init-mode", arms=("sketch", "exact"), seeds=(0, 1, 2), recipe=("--epochs", "1", "--lr", "0.02", *K4),
        column="mode",
    ),
    PairedStudy(
        name="rank-conll", stem="rank_conll",
        title="`giva finetune --r 32` against r=8 on CoNLL-2010 (validation split)",
        option="--r", arms=("32", "8"), seeds=(0, 1, 2), recipe=("--data", "conll2010-uncertainty"), column="rank",
    ),
    BasesDtypeStudy(
        name="bases-dtype", stem="bases_dtype", title="Accuracy with A stored in bf16 (`--bases-dtype bfloat16`), validation split",
        option="--bases-dtype", arms=("bfloat16", "float32"), seeds=(0, 1, 2),
        recipe=("--epochs", "1", "--max-train-samples", "800", "--lr", "0.02", *K4),
    ),
)
DESCRIPTIONS = {
    "calibration": "MiniLM-L6 + Pang & Lee, `giva finetune`'s default recipe otherwise (GiVA r=8 on every linear layer, "
                   "LR 1e-2, chosen on validation with k=4 by phase `lr`; 2 epochs over 2600 sentences, batches of 16); the "
                   "two runs of a seed differ only in the calibration batches the gradient is averaged over: every "
                   "training batch (`all`, 163 batches, the default since the evidence suite's gap study) or the first 4. "
                   "Accuracy is on the 400-sentence VALIDATION split; the test split is never scored. `init s` is what "
                   "the calibration costs (gradient passes and SVD); times in s on a shared 2-core machine (load average "
                   "per run).",
    "lr": "MiniLM-L6 + Pang & Lee, `giva finetune`'s defaults otherwise (GiVA r=8 on every linear layer, k=4, 2 epochs "
          "over 2600 sentences, the head at the same LR). Accuracy is on the 400-sentence VALIDATION split; the test split "
          "is never scored.",
    "init-mode": "MiniLM-L6 + Pang & Lee, 1 epoch instead of the default 2, the LR pinned at 2e-2 and k=4 calibration "
                 "batches (the defaults when these runs were made), both modes alike. Accuracy is on the VALIDATION split (the test split is never "
                 "scored); the seed sets the GiVA seed, the head initialisation and the data order, the split is fixed. "
                 "Times in s, measured on a shared 2-core machine (load average per run).",
    "rank-conll": "MiniLM-L6 + CoNLL-2010 (`--data conll2010-uncertainty`: 1557 train / 400 validation rows), `giva "
                  "finetune`'s default recipe otherwise (every linear layer, gradient over every training batch, LR 1e-2 "
                  "chosen on Pang & Lee, 2 epochs, batches of 16); the two runs of a seed differ only in the rank. Stated "
                  "before the runs: docs/finetune.md keeps its advice to try `--r 32` on tasks like CoNLL-2010 (named by "
                  "the evidence suite's rank sweep, 1 epoch at each row's own LR) only if r=32 minus r=8, paired by seed, "
                  "is above zero in mean on this command's own recipe; else it says the advice did not carry over. "
                  "Accuracy is on the VALIDATION split; the test split is never scored.",
    "bases-dtype": "MiniLM-L6, Pang & Lee, GiVA r=8 on every linear layer, 800 training rows, 1 epoch, the LR pinned at "
                   "2e-2 and k=4 calibration batches (the defaults when these runs were made), `giva finetune`'s defaults otherwise; the two runs of a "
                   "seed differ only in `bases_dtype`. The test split is never scored.",
}


def select_studies(phases: Optional[Sequence[str]]) -> tuple[Study, ...]:
    """The studies named in ``phases`` (suite order kept), or all; an unknown name raises ``ValueError``."""
    if not phases:
        return STUDIES
    known = [s.name for s in STUDIES]
    unknown = [p for p in phases if p not in known]
    if unknown:
        raise ValueError(f"suite {FINETUNE_SUITE!r} has no phase(s) {unknown}; its phases are {known}")
    return tuple(s for s in STUDIES if s.name in phases)


# --- one run -----------------------------------------------------------------------------------------------


def run_finetune(flags: Sequence[str], output_dir: Path) -> dict[str, Any]:
    """The JSON that ``giva finetune --no-progress --json FLAGS --output-dir OUTPUT_DIR`` prints, run in a fresh
    process, with its wall seconds added; a failed run raises :class:`RunFailedError` with the command and its stderr."""
    cmd = [sys.executable, "-m", "giva.cli", "finetune", "--no-progress", "--json", *flags, "--output-dir", str(output_dir)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise RunFailedError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout[proc.stdout.index("{"):]), "wall_seconds": time.perf_counter() - start}


def rounding_effect(folder: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Logits of the adapter `giva finetune` saved in ``folder`` on its validation rows, with its A as trained and
    rounded to bf16 (vectors and head unchanged). The rows are rebuilt as `giva finetune` split them (its sizes, seed 0);
    ``val_accuracy_fp32_A`` equal to the run's accuracy shows that they are the run's own."""
    import torch

    from ..data import deduplicate, load_text_classification, split_dataset
    from ..finetune import LABELS_FILE, load_finetuned, make_loader
    from ..layer import GivaLayer

    columns = json.loads((folder / LABELS_FILE).read_text(encoding="utf-8"))
    config = result["config"]
    rows = deduplicate(load_text_classification(result["data"], columns["text_column"], columns["label_column"]))
    _, val_set, _ = split_dataset(rows, test_size=config["n_test_unscored"], val_size=config["n_val"], seed=0)
    model, tokenizer = load_finetuned(folder)
    loader = make_loader(tokenizer, val_set, 64, config["train"]["max_length"], False)

    def logits() -> tuple[torch.Tensor, torch.Tensor]:
        out, labels = [], []
        with torch.inference_mode():
            for batch in loader:
                out.append(model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float())
                labels.append(batch["labels"])
        return torch.cat(out), torch.cat(labels)

    exact, labels = logits()
    for layer in (m for m in model.modules() if isinstance(m, GivaLayer)):
        for name in list(layer.giva_A.keys()):
            layer.giva_A[name] = layer.giva_A[name].to(torch.bfloat16).float()
    rounded, _ = logits()
    diff = (rounded - exact).abs()
    return {
        "logits_max_abs_diff": diff.max().item(),
        "logits_mean_abs_diff": diff.mean().item(),
        "logits_mean_abs": exact.abs().mean().item(),
        "predictions_changed": int((rounded.argmax(-1) != exact.argmax(-1)).sum()),
        "val_accuracy_fp32_A": (exact.argmax(-1) == labels).float().mean().item(),
        "val_accuracy_A_rounded_to_bf16": (rounded.argmax(-1) == labels).float().mean().item(),
        "n_val": len(labels),
    }


def run_record(study: Study, run: Run) -> dict[str, Any]:
    """One run of ``study``: `giva finetune` into a temporary folder, the study's own measurements, the record."""
    from .scale import commit

    with tempfile.TemporaryDirectory(prefix="giva-ft-") as tmp:
        folder = Path(tmp) / "out"
        result = run_finetune(run.flags, folder)
        if result["config"]["train"]["seed"] != run.seed:
            raise RuntimeError(f"giva finetune {' '.join(run.flags)} ran with seed {result['config']['train']['seed']}")
        extra = study.measure(run, folder, result)
    return {
        "study": run.study, "arm": run.arm, "seed": run.seed, "flags": list(run.flags), "val_accuracy": result["accuracy_after"],
        **{key: result[key] for key in RECORD_FIELDS}, "wall_seconds": result["wall_seconds"],
        "load_average": os.getloadavg()[0], "commit": commit(), **extra,
    }


# --- records and reports -----------------------------------------------------------------------------------


def study_path(output_dir: Path, study: Study) -> Path:
    return Path(output_dir) / f"{study.stem}.json"


def load_study(output_dir: Path, study: Study) -> dict[str, Any]:
    """The study's records file, or a new one; a file of another study or without a run list raises ``ValueError``."""
    path = study_path(output_dir, study)
    if not path.exists():
        return {"suite": FINETUNE_SUITE, "study": study.name, "runs": []}
    doc = json.loads(path.read_text())
    if doc.get("study") != study.name or not isinstance(doc.get("runs"), list):
        raise ValueError(f"{path}: expected the records of study {study.name!r} (keys 'study' and 'runs'), "
                         f"found study {doc.get('study')!r}")
    return doc


def write_study(output_dir: Path, study: Study, doc: dict[str, Any]) -> Path:
    """Rewrite the study's JSON (summary recomputed) and its report, each through a temporary file."""
    doc.update(description=DESCRIPTIONS[study.name], summary=study.summary(doc["runs"]))
    path = study_path(output_dir, study)
    write_text_atomically(path, json.dumps(doc, indent=1) + "\n")
    write_text_atomically(path.with_suffix(".md"), "\n".join(study.render(doc)) + "\n")
    return path.with_suffix(".md")


def plan_finetune(output_dir: Path, phases: Optional[Sequence[str]] = None) -> dict[str, list[str]]:
    """What :func:`run_finetune_suite` would run now: {'runs': names, 'waiting': runs an adaptive sweep adds later}."""
    runs, waiting = [], []
    for study in select_studies(phases):
        records = load_study(output_dir, study)["runs"]
        runs += [run.name for run in study.plan(records)]
        waiting += study.waiting(records)
    return {"runs": runs, "waiting": waiting}


def run_finetune_suite(
    output_dir: Path, phases: Optional[Sequence[str]] = None, report_only: bool = False, progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the named studies, then rewrite their reports; ``report_only`` runs nothing."""
    studies = select_studies(phases)
    docs = {study.name: load_study(output_dir, study) for study in studies}  # every file is read before anything runs
    empty = [s for s in studies if not docs[s.name]["runs"]]
    if report_only and empty:  # a study not run yet has nothing to report; the others are rewritten
        if len(empty) == len(studies):
            raise FileNotFoundError(f"--report-only: no records to report on in {', '.join(str(study_path(output_dir, s)) for s in empty)}")
        logger.warning("--report-only: no records yet for phase(s) %s; skipped", [s.name for s in empty])
        studies = tuple(s for s in studies if docs[s.name]["runs"])
    ran, reports = [], []
    for study in studies:
        doc = docs[study.name]
        with tqdm(desc=f"finetune {study.name}", unit="run", disable=not progress or report_only) as bar:
            while not report_only and (todo := study.plan(doc["runs"])):
                logger.info("running %s: giva finetune %s", todo[0].name, " ".join(todo[0].flags))
                doc["runs"].append(run_record(study, todo[0]))
                write_study(output_dir, study, doc)
                ran.append(todo[0].name)
                bar.update()
        reports.append(str(write_study(output_dir, study, doc)))
    return {
        "headlines": [study.headline(docs[study.name]["summary"]) for study in studies],
        "n_runs": sum(len(doc["runs"]) for doc in docs.values()), "ran": ran, "problems": [],
        "output_dir": str(output_dir), "reports": reports,
    }
