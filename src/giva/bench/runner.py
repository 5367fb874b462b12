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
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..finetune import TrainConfig, TrainStats, is_head_parameter, train
from .methods import build_model
from .schema import SCHEMA_VERSION
from .spec import Ablation, MethodSpec, Phase, SuiteSpec, load_method
from .tasks import TaskData, load_task

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

    @property
    def run_id(self) -> str:
        tag = f"__{self.ablation.tag}" if self.ablation else ""
        return f"{self.task}__{self.method}{tag}__lr{self.lr:g}__s{self.seed}"


def versions() -> dict[str, str]:
    import peft
    import transformers

    from .. import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "giva": __version__,
        "platform": platform.platform(),
        "cpu_threads": str(torch.get_num_threads()),
    }


def write_json_atomically(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_runs(runs_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]


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


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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


def train_config_for(suite: SuiteSpec, task: TaskData, run: RunSpec) -> TrainConfig:
    shared = {**suite.train, **(run.ablation.train if run.ablation else {})}
    head_lr = shared.pop("head_lr", "same")
    return TrainConfig(
        lr=run.lr,
        head_lr=None if head_lr == "same" else float(head_lr),
        batch_size=task.spec.batch_size,
        max_length=task.spec.max_length,
        seed=run.seed,
        **shared,
    )


def execute_run(suite: SuiteSpec, task: TaskData, method: MethodSpec, run: RunSpec, progress: bool) -> dict[str, Any]:
    if run.ablation:
        method = method.with_overrides(run.ablation.peft, run.ablation.init)
    config = None if method.kind == "none" else train_config_for(suite, task, run)
    gc.collect()
    memory_how = reset_peak_rss()
    started = time.time()
    wall = time.perf_counter()
    built = build_model(method, task, run.seed, calibration=task.train_loader(run.seed))
    model = built.model
    if method.kind == "none":  # the pretrained model as it is: evaluated, never trained
        stats = TrainStats(epoch_metrics=[task.evaluate(model, "val")])
    else:
        assert config is not None
        stats = train(
            model, task.train_loader(run.seed), config, progress=progress, desc=run.run_id,
            on_epoch_end=lambda epoch, m=model: task.evaluate(m, "val"),
        )
    test_accuracy = task.evaluate(model, "test")
    total_seconds = time.perf_counter() - wall
    peak = peak_rss_bytes()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for _, p in trainable)
    n_adapter = sum(p.numel() for n, p in trainable if not is_head_parameter(_strip_peft_prefix(n)))
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
        "head_lr": config.head_lr if config and config.head_lr is not None else run.lr,
        "train_config": asdict(config) if config else {},
        "versions": versions(),
        "metrics": {
            "val_accuracy_per_epoch": stats.epoch_metrics,
            "val_accuracy": stats.epoch_metrics[-1],
            "test_accuracy": test_accuracy,
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
        },
        "memory": {"peak_rss_bytes": peak, "how": memory_how},
        "parameters": {
            "trainable": n_trainable,
            "trainable_adapter": n_adapter,
            "total": sum(p.numel() for p in model.parameters()),
        },
        "adapter_bytes": saved_bytes(model, method),
        "trainable_state_bytes": sum(p.numel() * p.element_size() for _, p in trainable),
        "data": {"n_train": len(task.train), "n_val": len(task.val), "n_test": len(task.test)},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started)),
    }
    del model, built
    gc.collect()
    return record


def _strip_peft_prefix(name: str) -> str:
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


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


def run_suite(
    suite: SuiteSpec, root: Path, output_dir: Path, progress: bool = True, phases: Optional[Sequence[str]] = None,
) -> list[str]:
    """Run the phases of ``suite`` in order (all, or those named in ``phases``), skipping finished runs;
    returns the ids of the runs it ran."""
    from .speed import run_speed_phase

    selected = select_phases(suite, phases)
    torch.set_num_threads(suite.threads)
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
        for run in expand_phase(phase, root, load_runs(runs_dir)):
            path = runs_dir / f"{run.run_id}.json"
            compute = partial(execute_run, suite, task, load_method(root, run.method), run, progress)
            record = _run_once(path, output_dir, compute)
            if record:
                logger.info(
                    "done %s: val %.4f test %.4f in %.0f s", run.run_id, record["metrics"]["val_accuracy"],
                    record["metrics"]["test_accuracy"], record["timing"]["total_seconds"],
                )
                ran.append(run.run_id)
    return ran
