"""Run a benchmark suite: expand its phases into runs, skip finished ones, write one JSON per run.

A run is (task, method, ablation, LR, seed). Its JSON is written atomically (temporary file +
``os.replace``), so an interrupted suite never leaves a half-written run behind and a rerun of
the same command continues where it stopped.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..checkpoint import atomic_file
from ..finetune import TrainConfig, TrainStats, is_head_parameter, train
from .grow import GrowHook
from .methods import build_model, quantization_config, strip_peft_prefix
from .schema import SCHEMA_VERSION
from .spec import UNTRAINED_KINDS, Ablation, MethodSpec, Phase, SuiteSpec, load_method
from .speed import run_speed_phase
from .tasks import TaskData, load_task
from .versions import versions

logger = logging.getLogger(__name__)

STEADY_STATE_SKIP = 5  # steps dropped before taking the median step time (allocator and thread-pool warm-up)


@dataclass(frozen=True)
class RunSpec:
    phase: str
    task: str
    method: str
    seed: int
    lr: float
    ablation: Optional[Ablation] = None
    head_lr: Optional[float] = None  # a head LR shared by every method ('probe' rule); None: the suite's rule

    @property
    def run_id(self) -> str:
        tag = f"__{self.ablation.tag}" if self.ablation else ""
        head = f"__h{self.head_lr:g}" if self.head_lr is not None else ""
        return f"{self.task}__{self.method}{tag}__lr{self.lr:g}{head}__s{self.seed}"


class RunFailedError(RuntimeError):
    """A benchmark's child process (one `giva finetune` run, one qlora measurement) exited with an error; the
    message names the command and ends with its stderr. Records made before it are kept, so a rerun resumes."""


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and ``os.replace``: a reader (or a rerun after a kill)
    sees the old file or the new one, never half of one; no temporary file is left behind."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json_atomically(path: Path, record: dict[str, Any]) -> None:
    write_text_atomically(path, json.dumps(record, indent=1))


def load_runs(runs_dir: Path) -> list[dict[str, Any]]:
    """Every run JSON in ``runs_dir``; a file that is not a run record is a ``ValueError`` naming it."""
    runs = []
    for path in sorted(runs_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON ({error}); delete it to rerun that run") from None
        if not isinstance(record, dict) or not {"run_id", "kind"} <= record.keys():
            raise ValueError(f"{path} is not a run record (no run_id or kind); delete it to rerun that run")
        runs.append(record)
    return runs


def lr_key(lr: float) -> float:
    """An LR rounded to 6 significant digits: the form run ids and comparisons use."""
    return float(f"{lr:.6g}")


def validation_by_lr(group: list[dict[str, Any]]) -> dict[float, dict[int, float]]:
    """LR -> seed -> validation accuracy of one row's runs."""
    table: dict[float, dict[int, float]] = {}
    for r in group:
        table.setdefault(lr_key(r["lr"]), {})[r["seed"]] = r["metrics"]["val_accuracy"]
    return table


def mean_validation(by_seed: dict[int, float], seeds: Iterable[int]) -> float:
    """Mean validation accuracy over ``seeds``, rounded to 9 decimals so that equal accuracies tie exactly.

    Accuracies are counts over a fixed validation set, so two LRs often have the same mean; unrounded,
    float summation order (0.6925 + 0.695 against 0.68 + 0.7075) would break the tie instead of the
    declared rule (the smaller LR).
    """
    return round(statistics.fmean(by_seed[s] for s in seeds), 9)


def choose_lr(vals: dict[float, dict[int, float]]) -> Optional[float]:
    """The LR with the best MEAN validation accuracy over the seeds that every LR tried ran (ties: the
    smaller LR); with no seed common to all LRs, seed 0's (the old rule). None if nothing ran.

    Test accuracy never enters the choice.
    """
    if not vals:
        return None
    common = set.intersection(*(set(seeds) for seeds in vals.values()))
    if not common:
        with_zero = {lr: v for lr, v in vals.items() if 0 in v}
        if not with_zero:
            return None
        vals, common = with_zero, {0}
    return max(vals, key=lambda lr: (mean_validation(vals[lr], common), -lr))


def runner_up_lr(vals: dict[float, dict[int, float]], chosen: float) -> Optional[float]:
    """The LR that the choice ranks second (the same rule as :func:`choose_lr`: mean validation over the seeds every
    LR ran, seed 0 without such seeds; ties: the smaller LR); None with a single LR."""
    common = set.intersection(*(set(v) for v in vals.values())) if vals else set()
    if not common:
        vals, common = {x: v for x, v in vals.items() if 0 in v}, {0}
    others = [x for x in vals if f"{x:g}" != f"{chosen:g}"]
    return max(others, key=lambda x: (mean_validation(vals[x], common), -x)) if others else None


def adaptive_plan(
    initial: Sequence[float], sweep_seeds: Sequence[int], seeds: Sequence[int], vals: dict[float, dict[int, float]],
    step: float = 2.0, max_extensions: int = 4,
) -> tuple[list[tuple[float, int]], Optional[float]]:
    """The (LR, seed) runs one row needs next, and its chosen LR once the sweep has settled (else None).

    Every LR of ``initial`` and every LR added so far runs on ``sweep_seeds``; the LR with the best mean
    validation accuracy over those seeds (ties: the smaller) is chosen. While it is STRICTLY better than
    every other LR and sits at the low or high edge, one more LR (edge / step or edge x step) is added, at
    most ``max_extensions`` in all. Then the chosen LR runs on every seed of ``seeds``. Pure: ``vals`` is
    LR -> seed -> validation accuracy of the runs finished so far.
    """
    grid = sorted({lr_key(x) for x in initial})
    grid += [lr for lr in vals if lr not in grid and any(s in vals[lr] for s in sweep_seeds)]
    grid.sort()
    missing = [(lr, s) for lr in grid for s in sweep_seeds if s not in vals.get(lr, {})]
    if missing:
        return missing, None
    means = {lr: mean_validation(vals[lr], sweep_seeds) for lr in grid}
    best = max(grid, key=lambda lr: (means[lr], -lr))
    strictly = all(means[best] > means[lr] for lr in grid if lr != best)
    added = len([lr for lr in grid if lr not in {lr_key(x) for x in initial}])
    if len(grid) > 1 and strictly and added < max_extensions and best in (grid[0], grid[-1]):
        new = lr_key(best / step if best == grid[0] else best * step)
        return [(new, s) for s in sweep_seeds], None
    return [(best, s) for s in seeds if s not in vals[best]], best


def best_lr(runs: list[dict[str, Any]], task: str, method: str, ablation: Optional[str] = None) -> Optional[float]:
    """The LR of the seed-0 sweep with the best VALIDATION accuracy (ties: the smaller LR); None if no sweep ran."""
    candidates = [
        r for r in runs
        if r.get("kind") == "train" and r["task"]["name"] == task and r["method"]["name"] == method
        and r["seed"] == 0 and r["ablation"] == ablation
    ]
    if not candidates:
        return None
    best = max(candidates, key=lambda r: (r["metrics"]["val_accuracy"], -r["lr"]))
    return float(best["lr"])


# --- peak memory -----------------------------------------------------------------------------------------

PEAK_RSS_HOW = "VmHWM of the benchmark process, reset via /proc/self/clear_refs before the run (Linux)"
PEAK_RSS_FALLBACK = "ru_maxrss of the benchmark process (monotonic over the suite: an upper bound)"


def reset_peak_rss() -> str:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return PEAK_RSS_HOW
    except OSError:
        return PEAK_RSS_FALLBACK


def proc_status(*fields: str) -> dict[str, Optional[int]]:
    """``kB`` fields of /proc/self/status (``VmRSS``, ``VmHWM``, ``RssAnon`` ...) in bytes, from one read of the file;
    None for a field it does not have (every field where there is no such file)."""
    found: dict[str, Optional[int]] = dict.fromkeys(fields)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in found:
                    found[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return found


def proc_status_bytes(field: str) -> Optional[int]:
    """One ``kB`` field of /proc/self/status in bytes (:func:`proc_status`); None where there is no such file or field."""
    return proc_status(field)[field]


def peak_rss_bytes() -> int:
    """VmHWM, or VmRSS where it is higher (Linux folds each thread's RSS updates in late, so the high-water mark can
    trail the current size), else ``ru_maxrss``."""
    hwm, rss = proc_status("VmHWM", "VmRSS").values()
    if hwm is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(hwm, rss or 0)


# --- one training run ------------------------------------------------------------------------------------


def saved_bytes(model: nn.Module, method: MethodSpec) -> int:
    """Bytes of the safetensors files that store what the method trained (adapter + head, or the model)."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        if method.kind in ("peft", "osora"):
            model.save_pretrained(tmp)
        else:
            tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(tensors, os.path.join(tmp, "model.safetensors"))
        return sum(f.stat().st_size for f in Path(tmp).rglob("*.safetensors"))


def train_config_for(suite: SuiteSpec, task: TaskData, run: RunSpec, method_train: Optional[dict[str, Any]] = None) -> TrainConfig:
    epochs = {"epochs": task.spec.epochs} if task.spec.epochs else {}
    shared = {**suite.train, **epochs, **(method_train or {}), **(run.ablation.train if run.ablation else {})}
    head_lr = shared.pop("head_lr", "same")
    if run.head_lr is not None:
        head_lr = run.head_lr
    elif head_lr == "probe":  # the probe itself, or a task without a head
        head_lr = "same"
    return TrainConfig(
        lr=run.lr,
        head_lr=None if head_lr == "same" else float(head_lr),
        batch_size=task.spec.batch_size,
        max_length=task.spec.max_length,
        seed=run.seed,
        **shared,
    )


def grow_hook(
    method: MethodSpec, model: nn.Module, config: TrainConfig, steps_per_epoch: int, loader_factory: Callable[[], Any],
) -> Optional[GrowHook]:
    """The hook that grows a GiVA method's held-back rows mid-training (gap candidate (h)); None for other methods."""
    settings = method.grow()
    if settings is None:
        return None
    return GrowHook(model, loader_factory, *settings, config.total_steps(steps_per_epoch))


def execute_run(suite: SuiteSpec, task: TaskData, method: MethodSpec, run: RunSpec, progress: bool) -> dict[str, Any]:
    if run.ablation:
        method = method.with_overrides(run.ablation.peft, run.ablation.init)
    if method.kind == "floor":
        raise ValueError(f"method {method.name!r}: kind 'floor' is a speed-phase reference and cannot be trained")
    config = None if method.kind == "none" else train_config_for(suite, task, run, method.train)
    gc.collect()
    memory_how = reset_peak_rss()
    started = time.time()
    wall = time.perf_counter()
    head_lr = None if config is None else config.lr if config.head_lr is None else config.head_lr  # 'same': the adapter's
    grow: Optional[GrowHook] = None
    built = build_model(method, task, run.seed, calibration=task.train_loader(run.seed), head_lr=head_lr)
    model = built.model
    if method.kind == "none":  # the pretrained model as it is: evaluated, never trained
        stats = TrainStats(epoch_metrics=[task.evaluate(model, "val")])
    else:
        assert config is not None
        loader = task.train_loader(run.seed)
        grow = grow_hook(method, model, config, len(loader), lambda: task.train_loader(run.seed))
        stats = train(
            model, loader, config, progress=progress, desc=run.run_id,
            on_epoch_end=lambda epoch, m=model: task.evaluate(m, "val"), on_step_end=grow,
        )
    test_predictions = task.predict(model, "test")
    test_labels = task.test.labels
    test_accuracy = sum(p == y for p, y in zip(test_predictions, test_labels)) / len(test_labels)
    total_seconds = time.perf_counter() - wall
    peak = peak_rss_bytes()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for _, p in trainable)
    n_adapter = sum(p.numel() for n, p in trainable if not is_head_parameter(strip_peft_prefix(n)))
    steady = stats.step_seconds[STEADY_STATE_SKIP:] or stats.step_seconds
    record = {
        "schema_version": SCHEMA_VERSION,
        "kind": "train",
        "run_id": run.run_id,
        "suite": suite.name,
        "phase": run.phase,
        "task": asdict(task.spec),
        "method": asdict(method),
        "ablation": run.ablation.tag if run.ablation else None,
        "overrides": asdict(run.ablation) if run.ablation else {},
        "seed": run.seed,
        "lr": run.lr,
        "head_lr": run.lr if head_lr is None else head_lr,
        "train_config": asdict(config) if config else {},
        "versions": versions(),
        "metrics": {
            "val_accuracy_per_epoch": stats.epoch_metrics,
            "val_accuracy": stats.epoch_metrics[-1],
            "test_accuracy": test_accuracy,
            # one character per test example, in split order: the predicted label ('-': no label word) and 0/1
            "test_predictions": encode_predictions(test_predictions),
            "test_correct": "".join("1" if p == y else "0" for p, y in zip(test_predictions, test_labels)),
        },
        "train_loss": [round(x, 5) for x in stats.losses],
        "timing": {
            "init_seconds": built.init_seconds,
            "gradient_seconds": built.gradient_seconds,
            "svd_seconds": built.svd_seconds,
            "train_seconds": stats.seconds,
            "median_step_seconds": statistics.median(steady) if steady else 0.0,
            "total_seconds": total_seconds,
            "steps": len(stats.losses),
            **({"grow_seconds": grow.seconds} if grow is not None else {}),  # inside train_seconds, outside step times
        },
        "memory": {"peak_rss_bytes": peak, "how": memory_how},
        "parameters": {
            "trainable": n_trainable,
            "trainable_adapter": n_adapter,
            "total": sum(p.numel() for p in model.parameters()),
        },
        "adapter_bytes": saved_bytes(model, method),
        "trainable_state_bytes": sum(p.numel() * p.element_size() for _, p in trainable),
        "data": {"n_train": len(task.train), "n_val": len(task.val), "n_test": len(task.test),
                 "test_sha256": task.fingerprint("test")},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started)),
    }
    del model, built
    gc.collect()
    return record


def encode_predictions(predictions: list[int]) -> str | list[int]:
    """Label indices as one digit each ('-' for -1), or the plain list when a label needs two digits."""
    if all(-1 <= p <= 9 for p in predictions):
        return "".join("-" if p < 0 else str(p) for p in predictions)
    return predictions


# --- the suite ---------------------------------------------------------------------------------------------


def expand_phase(phase: Phase, root: Path, runs: list[dict[str, Any]]) -> list[RunSpec]:
    """The runs of one training phase; 'best' LRs are resolved from the runs finished so far."""
    specs = []
    ablations: tuple[Optional[Ablation], ...] = phase.ablations or (None,)
    for method_name in phase.methods:
        method = load_method(root, method_name)
        for ablation in ablations:
            if method.kind == "none":
                lrs = [0.0]
            elif phase.lr == "sweep":
                lrs = list(method.lr_sweep)
            else:
                base = method.lr
                if phase.lr == "best":
                    chosen = best_lr(runs, phase.lr_from_task or phase.task, method_name)
                    if chosen is None:
                        logger.warning("no LR sweep of %s on %s yet: using its default LR %g", method_name, phase.task, method.lr)
                    base = chosen if chosen is not None else base
                lrs = [float(f"{base * factor:.6g}") for factor in phase.lr_factors]  # 6 digits: stable run ids
            specs += [RunSpec(phase.name, phase.task, method_name, s, lr, ablation) for lr in lrs for s in phase.seeds]
    return specs


def _record_failure(output_dir: Path, run_id: str) -> None:
    import traceback

    path = output_dir / "failures" / f"{run_id}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(traceback.format_exc())
    logger.error("run %s failed (traceback in %s); continuing", run_id, path)


def _run_once(path: Path, output_dir: Path, compute: Callable[[], dict[str, Any]]) -> Optional[dict[str, Any]]:
    """Compute and write one record unless ``path`` exists; a failure is logged and kept, never raised,
    so one broken method cannot stop a long suite. Returns the new record, or None."""
    if path.exists():
        logger.info("skip %s (done)", path.stem)
        return None
    logger.info("run %s", path.stem)
    try:
        record = compute()
    except Exception:
        _record_failure(output_dir, path.stem)
        return None
    write_json_atomically(path, record)
    return record


def select_phases(suite: SuiteSpec, names: Optional[Sequence[str]]) -> tuple[Phase, ...]:
    """The phases named in ``names`` (suite order kept), or all of them; an unknown name raises ValueError."""
    if not names:
        return suite.phases
    known = [p.name for p in suite.phases]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"suite {suite.name!r} has no phase(s) {unknown}; its phases are {known}")
    return tuple(p for p in suite.phases if p.name in names)


def _row_runs(runs: list[dict[str, Any]], task: str, method: str, ablation: Optional[str]) -> list[dict[str, Any]]:
    return [
        r for r in runs
        if r.get("kind") == "train" and r["task"]["name"] == task and r["method"]["name"] == method and r["ablation"] == ablation
    ]


def probe_rule_applies(head_lr_rule: Any, method_kind: str, task_kind: str) -> bool:
    """Whether a row's head trains at the linear probe's LR: the suite's 'probe' rule, a trained method other than the
    probe itself, and a task with a new head (a causal LM has none). The runner plans by it, the report counts by it."""
    return head_lr_rule == "probe" and method_kind not in ("probe", *UNTRAINED_KINDS) and task_kind != "clm"


def shared_head_lr(suite: SuiteSpec, root: Path, runs: list[dict[str, Any]], task: str, method: MethodSpec) -> tuple[Optional[float], str]:
    """The head LR a run of ``method`` on ``task`` gets under the suite's 'probe' rule (one value for every
    method: the LR the linear probe settled on, chosen on validation), and why it is not known yet ('' if it is).

    (None, '') when the rule does not apply: another rule, the probe itself, an untrained model, or a
    causal-LM task (no new head).
    """
    if not probe_rule_applies(suite.train.get("head_lr", "same"), method.kind, suite.tasks[task].kind):
        return None, ""
    chosen = settled_lr(suite, root, runs, task, "probe")
    if chosen is None:
        return None, f"the probe's LR sweep on {task} (it sets the head LR shared by every method) has not settled"
    return chosen, ""


def adaptive_row(
    suite: SuiteSpec, root: Path, phase: Phase, runs: list[dict[str, Any]], method_name: str, ablation: Optional[Ablation],
) -> tuple[list[RunSpec], Optional[float], str]:
    """One row of an 'adaptive' phase: (the runs it needs next, its chosen LR or None while the sweep is
    open, why it cannot be planned yet or '')."""
    method = load_method(root, method_name)
    tag = ablation.tag if ablation else None
    if method.kind in UNTRAINED_KINDS:
        done = {r["seed"] for r in _row_runs(runs, phase.task, method_name, tag)}
        return [RunSpec(phase.name, phase.task, method_name, s, 0.0, ablation) for s in phase.seeds if s not in done], 0.0, ""
    head_lr, why = shared_head_lr(suite, root, runs, phase.task, method)
    if why:
        return [], None, why
    centre: Optional[float] = method.lr
    if phase.lr_from_task:
        centre = settled_lr(suite, root, runs, phase.lr_from_task, method_name)
        if centre is None:
            return [], None, f"{method_name} has no settled LR on {phase.lr_from_task} yet"
    group = _row_runs(runs, phase.task, method_name, tag)
    if head_lr is not None:
        group = [r for r in group if lr_key(r["head_lr"]) == head_lr]
    todo, chosen = adaptive_plan(
        [centre * f for f in phase.lr_factors], phase.sweep_seeds, phase.seeds, validation_by_lr(group),
        phase.lr_step, phase.max_lr_extensions,
    )
    return [RunSpec(phase.name, phase.task, method_name, s, lr, ablation, head_lr) for lr, s in todo], chosen, ""


def runner_up_row(
    suite: SuiteSpec, root: Path, phase: Phase, runs: list[dict[str, Any]], method_name: str, ablation: Optional[Ablation],
) -> tuple[list[RunSpec], str]:
    """One row of a 'runner-up' phase: (its runner-up validation LR on every seed of ``phase.seeds`` it has not run,
    why it cannot be planned yet or '').

    The row is the one an 'adaptive' phase of the suite settles on ``phase.task`` (same method, same ablation tag); its
    runner-up is :func:`runner_up_lr` of its finished runs. These runs give the report's runner-up variants
    (:func:`giva.bench.stats.lr_variants`) the seeds a verdict needs; they must not move the choice they test, so
    every added seed must be one that some third LR of the row has not run (``choose_lr`` and ``runner_up_lr`` rank
    LRs on the seeds every LR ran): a row of two LRs gets no runs, and says so.
    """
    tag = ablation.tag if ablation else None
    row = f"{phase.task}/{method_name}" + (f":{tag}" if tag else "")
    sweep = next((p for p in suite.phases if p.lr == "adaptive" and p.task == phase.task and method_name in p.methods
                  and tag in ({a.tag for a in p.ablations} if p.ablations else {None})), None)
    if sweep is None:
        return [], f"no 'adaptive' phase of the suite sweeps {row}"
    ablation = next((a for a in sweep.ablations if a.tag == tag), None)  # the row's own definition, not a namesake's
    _, settled, why = adaptive_row(suite, root, sweep, runs, method_name, ablation)
    if why or settled is None:
        return [], why or f"the LR sweep of {row} (phase {sweep.name!r}) has not settled"
    head_lr, _ = shared_head_lr(suite, root, runs, phase.task, load_method(root, method_name))
    group = _row_runs(runs, phase.task, method_name, tag)
    if head_lr is not None:
        group = [r for r in group if lr_key(r["head_lr"]) == head_lr]
    vals = validation_by_lr(group)
    chosen = choose_lr(vals)  # the report's choice (every LR the row ran), which the sweep's must be
    if chosen is None or lr_key(chosen) != lr_key(settled):
        return [], (f"{row}: the report would choose LR {chosen} from the row's runs, its sweep settled on {settled:g} "
                    "(runs at LRs outside its sweep?): no runner-up runs until they agree")
    runner_up = runner_up_lr(vals, chosen)
    if runner_up is None:
        return [], f"{row} ran a single LR: it has no runner-up"
    seeds = [s for s in phase.seeds if s not in vals[runner_up]]
    others = [lr for lr in vals if lr not in (lr_key(chosen), runner_up)]
    if not all(any(s not in vals[lr] for lr in others) for s in seeds):
        return [], (f"{row}: more seeds at its runner-up LR {runner_up:g} would enter the LR choice (no third LR lacks "
                    f"them), so they are not run")
    return [RunSpec(phase.name, phase.task, method_name, s, runner_up, ablation, head_lr) for s in seeds], ""


def settled_lr(suite: SuiteSpec, root: Path, runs: list[dict[str, Any]], task: str, method: str) -> Optional[float]:
    """The LR the suite's 'adaptive' phase of ``method`` on ``task`` settled on (no ablation); None while open."""
    for phase in suite.phases:
        if phase.lr == "adaptive" and phase.task == task and method in phase.methods:
            return adaptive_row(suite, root, phase, runs, method, None)[1]
    return None


def pending_runs(
    suite: SuiteSpec, root: Path, phase: Phase, runs: list[dict[str, Any]],
) -> tuple[list[RunSpec], list[str]]:
    """The runs of a training phase that can be named now and have not run, seed by seed (every row's first
    seed first), and the rows that wait on another sweep. An 'adaptive' phase may name more once these finish."""
    done = {r["run_id"] for r in runs}
    specs: list[RunSpec] = []
    waiting: list[str] = []
    if phase.lr not in ("adaptive", "runner-up"):
        for spec in expand_phase(phase, root, runs):
            head_lr, why = shared_head_lr(suite, root, runs, phase.task, load_method(root, spec.method))
            if why:
                waiting.append(f"{phase.name}/{spec.method}: waits: {why}")
            elif (spec := replace(spec, head_lr=head_lr)).run_id not in done:
                specs.append(spec)
        return specs, list(dict.fromkeys(waiting))
    for method in phase.methods:
        for ablation in phase.ablations or (None,):
            if phase.lr == "runner-up":
                todo, why = runner_up_row(suite, root, phase, runs, method, ablation)
            else:
                todo, _, why = adaptive_row(suite, root, phase, runs, method, ablation)
            specs += [s for s in todo if s.run_id not in done]
            if why:
                waiting.append(f"{phase.name}/{method}: waits: {why}")
    order = {seed: i for i, seed in enumerate(dict.fromkeys([*phase.sweep_seeds, *phase.seeds]))}
    specs.sort(key=lambda s: order.get(s.seed, len(order)))  # stable: rows keep suite order within a seed
    return specs, waiting


def run_time_estimate(runs: list[dict[str, Any]], phase: Phase, n_runs: int) -> dict[str, Any]:
    """What ``n_runs`` more runs of ``phase`` should take, from the finished training runs: their median
    ``timing.total_seconds`` in the same phase, else in the same task; ``median_seconds`` None when neither
    has a run. Only a guide: it ignores rows slower than their phase's median (VeRA r=1024)."""
    finished = [r for r in runs if r.get("kind") == "train" and "total_seconds" in r.get("timing", {})]
    for basis, same in (("phase", lambda r: r.get("phase") == phase.name),
                        ("task", lambda r: r.get("task", {}).get("name") == phase.task)):
        seconds = [r["timing"]["total_seconds"] for r in finished if same(r)]
        if seconds:
            median = statistics.median(seconds)
            return {"runs": n_runs, "basis": basis, "finished": len(seconds), "median_seconds": median,
                    "seconds": median * n_runs}
    return {"runs": n_runs, "basis": None, "finished": 0, "median_seconds": None, "seconds": None}


def dry_run(suite: SuiteSpec, root: Path, output_dir: Path, phases: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """What ``run_suite`` would run now, without running it: {'runs': run ids, 'waiting': rows that wait on
    another sweep, 'estimate': phase name -> :func:`run_time_estimate` of its listed training runs}. All
    empty for a finished suite. An 'adaptive' phase may add runs once these finish (an LR beyond an edge,
    then the remaining seeds), which no estimate counts."""
    runs = load_runs(output_dir / "runs")
    names: list[str] = []
    waiting: list[str] = []
    estimate: dict[str, dict[str, Any]] = {}
    for phase in select_phases(suite, phases):
        if phase.kind == "speed":
            if not (output_dir / "runs" / f"speed__{phase.name}.json").exists():
                names.append(f"speed__{phase.name}")
            continue
        todo, wait = pending_runs(suite, root, phase, runs)
        names += [s.run_id for s in todo]
        waiting += wait
        if todo:
            estimate[phase.name] = run_time_estimate(runs, phase, len(todo))
    return {"runs": names, "waiting": waiting, "estimate": estimate}


def run_suite(
    suite: SuiteSpec, root: Path, output_dir: Path, progress: bool = True, phases: Optional[Sequence[str]] = None,
) -> list[str]:
    """Run the phases of ``suite`` in order (all, or those named in ``phases``), skipping finished runs;
    returns the ids of the runs it ran."""
    selected = select_phases(suite, phases)
    for phase in selected:  # a missing quantisation package fails now, not after the phases before it ran
        quantization_config(suite.tasks[phase.task].quantization)
    threads = torch.get_num_threads()
    torch.set_num_threads(suite.threads)
    try:  # the caller's thread count back afterwards (a test session or a notebook goes on in this process)
        ran = _run_phases(suite, root, output_dir, progress, selected)
    finally:
        torch.set_num_threads(threads)
    return ran


def _run_phases(suite: SuiteSpec, root: Path, output_dir: Path, progress: bool, selected: Sequence[Phase]) -> list[str]:
    runs_dir = output_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    tasks: dict[str, TaskData] = {}
    ran: list[str] = []
    for phase in selected:
        if phase.task not in tasks:
            tasks[phase.task] = load_task(suite.tasks[phase.task])
        task = tasks[phase.task]
        if phase.kind == "speed":
            path = runs_dir / f"speed__{phase.name}.json"
            if _run_once(path, output_dir, lambda: run_speed_phase(suite, phase, task, root)):
                ran.append(path.stem)
            continue
        failed: set[str] = set()
        while True:  # an 'adaptive' phase names its next runs only once the previous ones finished
            todo, waiting = pending_runs(suite, root, phase, load_runs(runs_dir))
            todo = [run for run in todo if run.run_id not in failed]
            for line in waiting if not todo else ():
                logger.warning("%s", line)
            if not todo:
                break
            for run in todo:
                path = runs_dir / f"{run.run_id}.json"
                compute = partial(execute_run, suite, task, load_method(root, run.method), run, progress)
                record = _run_once(path, output_dir, compute)
                if record:
                    logger.info(
                        "done %s: val %.4f test %.4f in %.0f s", run.run_id, record["metrics"]["val_accuracy"],
                        record["metrics"]["test_accuracy"], record["timing"]["total_seconds"],
                    )
                    ran.append(run.run_id)
                elif not path.exists():
                    failed.add(run.run_id)
            if phase.lr != "adaptive":
                break
    return ran
