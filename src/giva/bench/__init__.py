"""`giva bench`: side-by-side comparison of GiVA with its baselines, runs differing only in the adapter.

Method and suite configs are JSON files in the repository's benchmarks/ folder (read, never
imported). ``run_benchmark("full")`` runs (or resumes) a suite and writes, under
``benchmarks/results/<suite>/``, one JSON per run in runs/, then results.json, results.md and the plots.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from .finetune import plan_finetune, run_finetune_suite, select_studies
from .names import FINETUNE_SUITE, GPU_SUITE, QLORA_SUITE, SCALE_SUITE, SERVE_SUITE, SKETCH_SUITE
from .report import PLOTS, write_report
from .runner import dry_run, load_runs, run_suite, select_phases
from .schema import validate_run
from .spec import benchmarks_dir, load_suite

# The suites that run as `python -m giva.bench.<suite>` (gpu, scale, sketch, qlora; serve with them) are imported
# where a request reaches them, not here: a module the package imported already would run as a second copy.

logger = logging.getLogger(__name__)

QUICK_SUITE = "quick"
STALE_SUITES = (SERVE_SUITE, SKETCH_SUITE, QLORA_SUITE)  # suites whose records measured by other code are measured again
DEFAULT_SUITE = "full"  # what the library's run_benchmark() / plan_benchmark() run without a suite (the CLI: quick)

__all__ = [
    "PLOTS", "QUICK_SUITE", "check_outputs", "check_request", "plan_benchmark", "run_benchmark", "suite_names", "validate_run",
]


def _gpu_folder(quick: bool) -> str:
    return f"{GPU_SUITE}-tiny" if quick else GPU_SUITE


def check_outputs(output_dir: Path) -> list[str]:
    """Problems with a finished suite's outputs: run schema, table rows, plots (empty list if none)."""
    problems = []
    runs = load_runs(output_dir / "runs")
    if not runs:
        problems.append(f"no run JSONs in {output_dir / 'runs'}")
    for record in runs:
        problems += validate_run(record)
    table = output_dir / "results.md"
    if not table.exists() or not table.stat().st_size:
        problems.append(f"{table} is missing or empty")
    else:
        text = table.read_text()
        for method in {r["method"]["name"] for r in runs if r.get("kind") == "train"}:
            if f"| {method} |" not in text:
                problems.append(f"{table} has no row for method {method!r}")
    for name in PLOTS:
        path = output_dir / name
        if not path.exists() or path.stat().st_size < 1000 or path.read_bytes()[:4] != b"\x89PNG":
            problems.append(f"plot {path} is missing or not a PNG")
    return problems


def suite_names(root: Optional[Path] = None) -> list[str]:
    """Every suite ``giva bench --suite`` accepts: the training suites of benchmarks/suites, then serve, scale, gpu,
    sketch, finetune and qlora."""
    root = root or benchmarks_dir()
    return sorted(p.stem for p in (root / "suites").glob("*.json")) + [
        SERVE_SUITE, SCALE_SUITE, GPU_SUITE, SKETCH_SUITE, FINETUNE_SUITE, QLORA_SUITE,
    ]


def check_request(
    suite: Optional[str], quick: bool = False, output_dir: Optional[str | Path] = None,
    phases: Optional[Sequence[str]] = None, root: Optional[Path] = None, keep_stale: bool = False,
) -> None:
    """Refuse a request that would be ignored or misread, before anything is loaded or run (``ValueError``)."""
    root = root or benchmarks_dir()
    known = suite_names(root)
    if keep_stale and (quick or suite not in STALE_SUITES):
        raise ValueError(
            f"--keep-stale applies to the {', '.join(STALE_SUITES[:-1])} and {STALE_SUITES[-1]} suites (they re-measure records of other code); "
            f"not to --suite {QUICK_SUITE if quick else suite or DEFAULT_SUITE}"
            + (" (it keeps records of other code and marks them in results.md)" if suite == SCALE_SUITE else "")
        )
    if quick and suite not in (None, QUICK_SUITE, GPU_SUITE):
        raise ValueError(
            f"--quick runs the {QUICK_SUITE!r} suite (or the gpu suite's tiny shapes); it cannot be combined with --suite {suite}"
        )
    suite = suite if quick and suite == GPU_SUITE else QUICK_SUITE if quick else suite or DEFAULT_SUITE
    if suite not in known:
        raise ValueError(f"no suite {suite!r}; the suites are {known}")
    if phases is not None:
        if suite in (SERVE_SUITE, SCALE_SUITE, GPU_SUITE, SKETCH_SUITE, QLORA_SUITE):
            raise ValueError(f"--phases: the {suite!r} suite has no phases")
        if not phases:
            raise ValueError("--phases names no phase; give comma-separated phase names")
        if suite == FINETUNE_SUITE:  # its phases are its studies
            select_studies(phases)
        else:
            select_phases(load_suite(root, suite), phases)  # an unknown name raises, listing the suite's phases
    if output_dir is not None and Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise ValueError(f"--output-dir {output_dir} is a file, not a folder")


def plan_benchmark(
    suite: Optional[str] = None, quick: bool = False, output_dir: Optional[str | Path] = None,
    root: Optional[Path] = None, phases: Optional[Sequence[str]] = None, keep_stale: bool = False,
) -> dict[str, Any]:
    """What ``run_benchmark`` with the same arguments would run now (``giva bench --dry-run``), running nothing:
    {'runs': run ids, 'waiting': rows waiting on another sweep, 'estimate': run time by phase, 'output_dir'}, and for
    the scale suite 'notes': the records a run keeps although other code measured them.
    ``keep_stale`` (serve, sketch, qlora): records measured by other code count as done."""
    root = root or benchmarks_dir()
    check_request(suite, quick, output_dir, phases, root, keep_stale)
    if suite == GPU_SUITE:
        from .gpu import FULL, TINY, plan

        out = Path(output_dir) if output_dir else root / "results" / _gpu_folder(quick)
        return {"runs": [f"{shape}/{row}" for shape, row in plan(TINY if quick else FULL)], "waiting": [], "estimate": {},
                "output_dir": str(out)}
    name = QUICK_SUITE if quick else suite or DEFAULT_SUITE
    out = Path(output_dir) if output_dir else root / "results" / name
    if name == SERVE_SUITE:  # on a CUDA machine the accelerator settings (serve_plan), else the CPU points left to measure
        from .serve import plan_serve, serve_plan

        runs = serve_plan(out) if torch.cuda.is_available() else plan_serve(out, keep_stale=keep_stale)
        return {"runs": runs, "waiting": [], "estimate": {}, "output_dir": str(out)}
    if name == SCALE_SUITE:
        from .scale import plan_scale, scale_notes

        return {"runs": plan_scale(out), "waiting": [], "estimate": {}, "output_dir": str(out), "notes": scale_notes(out)}
    if name == QLORA_SUITE:
        from .qlora import plan_qlora

        return {"runs": plan_qlora(out, keep_stale=keep_stale), "waiting": [], "estimate": {}, "output_dir": str(out)}
    if name == SKETCH_SUITE:
        from .sketch import plan_sketch

        return {"runs": plan_sketch(out, keep_stale=keep_stale), "waiting": [], "estimate": {}, "output_dir": str(out)}
    if name == FINETUNE_SUITE:
        return {**plan_finetune(out, phases), "estimate": {}, "output_dir": str(out)}
    return {**dry_run(load_suite(root, name), root, out, phases), "output_dir": str(out)}


def run_benchmark(
    suite: Optional[str] = None, quick: bool = False, output_dir: Optional[str | Path] = None,
    root: Optional[Path] = None, progress: bool = True, phases: Optional[Sequence[str]] = None,
    report_only: bool = False, keep_stale: bool = False,
) -> dict[str, Any]:
    """Run (or resume) a suite, then write its report; ``quick`` runs the tiny CI suite and checks the outputs.

    ``phases`` limits the run to the named phases (the report still covers every finished run).
    ``report_only`` runs nothing: it rewrites results.md / results.json / the plots from the run JSONs
    already in the output folder (after an interrupted run, or to refresh a report mid-suite); for the
    finetune suite, each study's report from its records.

    ``keep_stale`` (serve, sketch, qlora): keep the records measured by other code instead of measuring them again.

    Returns the results dict (see report.write_report) with a ``problems`` list added.
    """
    root = root or benchmarks_dir()
    check_request(suite, quick, output_dir, phases, root, keep_stale)
    suite = suite or DEFAULT_SUITE
    if suite == FINETUNE_SUITE:
        out = Path(output_dir) if output_dir else root / "results" / FINETUNE_SUITE
        return run_finetune_suite(out, phases, report_only=report_only, progress=progress)
    if report_only and (suite in (GPU_SUITE, SKETCH_SUITE, QLORA_SUITE) or suite in (SERVE_SUITE, SCALE_SUITE) and not quick):
        raise ValueError(f"--report-only applies to training suites; the {suite!r} suite writes its report as it runs")
    if suite == GPU_SUITE:  # --quick: the tiny shapes, on CPU when there is no GPU
        from .gpu import FULL, TINY, run_gpu

        out = Path(output_dir) if output_dir else root / "results" / _gpu_folder(quick)
        return run_gpu(out, TINY if quick else FULL, command=f"giva bench --suite gpu{' --quick' if quick else ''}")
    if suite == SERVE_SUITE and not quick:
        from .serve import run_serve

        return run_serve(output_dir or root / "results" / SERVE_SUITE, progress=progress, keep_stale=keep_stale)
    if suite == SCALE_SUITE and not quick:
        from .scale import run_scale

        return run_scale(Path(output_dir) if output_dir else root / "results" / SCALE_SUITE)
    if suite == QLORA_SUITE:
        from .qlora import run_qlora

        return run_qlora(Path(output_dir) if output_dir else root / "results" / QLORA_SUITE, keep_stale=keep_stale)
    if suite == SKETCH_SUITE:
        from .sketch import run_sketch

        return run_sketch(Path(output_dir) if output_dir else root / "results" / SKETCH_SUITE, keep_stale=keep_stale)
    name = QUICK_SUITE if quick else suite
    spec = load_suite(root, name)
    out = Path(output_dir) if output_dir else root / "results" / name
    if report_only:
        existing = load_runs(out / "runs")
        if not existing:
            raise FileNotFoundError(f"--report-only: no run JSONs in {out / 'runs'} to report on")
        broken = [problem for record in existing for problem in validate_run(record)]
        if broken:
            raise ValueError(f"--report-only: {len(broken)} problem(s) in the run JSONs of {out / 'runs'}: "
                             + "; ".join(broken[:5]))
    ran = [] if report_only else run_suite(spec, root, out, progress=progress, phases=phases)
    results = write_report(out, spec)
    results["problems"] = check_outputs(out) if quick else []
    results["ran"] = ran
    results["output_dir"] = str(out)
    return results
