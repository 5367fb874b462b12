"""`giva bench --suite finetune`: `giva finetune` recipes on the validation split (issue 24). The one function that runs
`giva finetune` is replaced by a fake here, so no model trains, except in the one end-to-end test on the tiny model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_cli import model_dir  # noqa: F401  (fixture)

import giva.bench.finetune as ft
from giva.bench import plan_benchmark, run_benchmark
from giva.cli import main

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
COMMITTED = BENCH / "results" / "finetune"
STUDY = {study.name: study for study in ft.STUDIES}


def flag(flags: list[str], name: str) -> str:
    return flags[flags.index(name) + 1]


class FakeFinetune:
    """Stands in for one `giva finetune` process: the accuracy is ``accuracy(flags)``; records every call."""

    def __init__(self, accuracy: Any = lambda flags: 0.75, fail_at: int | None = None) -> None:
        self.accuracy, self.fail_at, self.calls = accuracy, fail_at, []

    def __call__(self, flags: list[str], output_dir: Path) -> dict[str, Any]:
        if len(self.calls) == self.fail_at:
            raise ft.RunFailedError("giva finetune failed (exit 1): killed")
        self.calls.append(tuple(flags))
        seed = int(flag(list(flags), "--seed"))
        return {"accuracy_before": 0.5, "accuracy_after": self.accuracy(list(flags)), "init_seconds": 1.0, "train_seconds": 2.0,
                "adapter_bytes": 100, "wall_seconds": 3.0, "config": {"train": {"seed": seed}, "init_passes": 1}}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeFinetune:
    runner = FakeFinetune()
    monkeypatch.setattr(ft, "run_finetune", runner)
    monkeypatch.setattr(ft, "rounding_effect", lambda folder, result: {"logits_max_abs_diff": 1e-4, "logits_mean_abs_diff": 5e-5,
                                                                       "logits_mean_abs": 0.2, "predictions_changed": 0, "n_val": 400,
                                                                       "val_accuracy_A_rounded_to_bf16": result["accuracy_after"]})
    return runner


def names(runs: list[tuple[str, int]], study: str) -> list[str]:
    return [f"finetune: {study}/{arm}/seed {seed}" for arm, seed in runs]


def test_dry_run_lists_the_missing_runs_then_none_once_they_are_recorded(tmp_path: Path, fake: FakeFinetune) -> None:
    plan = plan_benchmark("finetune", output_dir=tmp_path, root=BENCH, phases=["init-mode", "lr"])
    assert plan["runs"] == (  # suite order, whatever order --phases names them in
        names([(lr, s) for lr in ("0.01", "0.02", "0.04") for s in (0, 1)], "lr")
        + names([(m, s) for s in (0, 1, 2) for m in ("sketch", "exact")], "init-mode")
    )
    assert len(plan["waiting"]) == 1 and "the chosen LR on seeds [0, 1, 2]" in plan["waiting"][0]
    results = run_benchmark("finetune", output_dir=tmp_path, root=BENCH, phases=["init-mode"], progress=False)
    assert results["ran"] == names([(m, s) for s in (0, 1, 2) for m in ("sketch", "exact")], "init-mode")
    assert [list(c) for c in fake.calls] == [["--init-mode", m, "--seed", str(s), "--epochs", "1", "--lr", "0.02", "--num-batches", "4"]
                                             for s in (0, 1, 2) for m in ("sketch", "exact")]
    assert plan_benchmark("finetune", output_dir=tmp_path, root=BENCH, phases=["init-mode"])["runs"] == []
    assert plan_benchmark("finetune", output_dir=tmp_path, root=BENCH, phases=["bases-dtype"])["runs"] == names(
        [(d, s) for s in (0, 1, 2) for d in ("bfloat16", "float32")], "bases-dtype")


def test_the_committed_records_are_finished_runs(fake: FakeFinetune) -> None:
    assert plan_benchmark("finetune", root=BENCH) == {"runs": [], "waiting": [], "estimate": {}, "output_dir": str(COMMITTED)}


def test_an_interrupted_study_resumes_without_rerunning_a_recorded_run(tmp_path: Path, fake: FakeFinetune) -> None:
    fake.fail_at = 3
    with pytest.raises(RuntimeError, match="giva finetune failed"):
        run_benchmark("finetune", output_dir=tmp_path, root=BENCH, phases=["bases-dtype"], progress=False)
    first = list(fake.calls)
    recorded = json.loads((tmp_path / "bases_dtype.json").read_text())["runs"]
    assert [tuple(r["flags"]) for r in recorded] == first and len(first) == 3  # each appended as it finished
    assert [r["arm"] for r in recorded if "rounding" in r] == ["float32"]  # the fp32 run of seed 0 was re-evaluated
    fake.fail_at, fake.calls = None, []
    results = run_benchmark("finetune", output_dir=tmp_path, root=BENCH, phases=["bases-dtype"], progress=False)
    assert len(fake.calls) == 3 and not set(fake.calls) & set(first)
    assert len(results["ran"]) == 3 and results["n_runs"] == 6
    assert results["headlines"] == ["bases-dtype: bfloat16 - float32 +0.00 ± 0.00 points of validation accuracy (n=3)"]


def test_a_failed_run_is_two_lines_and_exit_1_from_the_cli_with_the_records_kept(tmp_path: Path, fake: FakeFinetune,
                                                                                   capsys) -> None:
    fake.fail_at = 1
    argv = ["bench", "--suite", "finetune", "--phases", "bases-dtype", "--output-dir", str(tmp_path)]
    assert main(argv) == 1
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    err = [line for line in stderr.strip().splitlines() if line.startswith("giva bench")]  # not the progress bar
    assert err == ["giva bench: giva finetune failed (exit 1): killed",
                   "giva bench: the records made before it are kept; rerun the same command to resume"]
    assert len(json.loads((tmp_path / "bases_dtype.json").read_text())["runs"]) == 1


def test_a_record_made_with_other_flags_is_kept_but_not_counted(tmp_path: Path, fake: FakeFinetune) -> None:
    study = STUDY["init-mode"]
    other = {"study": "init-mode", "arm": "sketch", "seed": 0, "flags": ["--init-mode", "sketch", "--seed", "0", "--epochs", "2"],
             "val_accuracy": 0.9}
    (tmp_path / "sketch_vs_exact.json").write_text(json.dumps({"suite": "finetune", "study": "init-mode", "runs": [other]}))
    assert ft.plan_finetune(tmp_path, ["init-mode"])["runs"][0] == "finetune: init-mode/sketch/seed 0"
    run_benchmark("finetune", output_dir=tmp_path, root=BENCH, phases=["init-mode"], progress=False)
    runs = json.loads((tmp_path / "sketch_vs_exact.json").read_text())["runs"]
    assert runs[0] == other and len(runs) == 7
    assert 0.9 not in study.by_arm(runs)["sketch"].values()


def test_the_lr_study_extends_the_grid_past_an_edge_by_the_adaptive_rule(tmp_path: Path, fake: FakeFinetune) -> None:
    # Validation accuracy peaks at 5e-3, below the initial grid [1e-2, 2e-2, 4e-2].
    fake.accuracy = lambda flags: 0.80 - 0.01 * abs(math.log2(float(flag(flags, "--lr")) / 5e-3))
    results = run_benchmark("finetune", output_dir=tmp_path, root=BENCH, phases=["lr"], progress=False)
    ran = [(flag(list(c), "--lr"), int(flag(list(c), "--seed"))) for c in fake.calls]
    assert ran == [(lr, s) for lr in ("0.01", "0.02", "0.04") for s in (0, 1)] + [
        ("0.005", 0), ("0.005", 1),  # 1e-2 was strictly best at the low edge: halve it
        ("0.0025", 0), ("0.0025", 1),  # 5e-3 still strictly best at the edge: halve again
        ("0.005", 2),  # 5e-3 is inside the grid now: chosen, and run on the remaining seed
    ]
    doc = json.loads((tmp_path / "lr_sweep.json").read_text())
    assert doc["summary"]["chosen_lr"] == 0.005
    assert results["headlines"] == ["lr: chosen LR 0.005, validation accuracy 80.00 % ± 0.00"]
    assert doc["summary"]["paired_minus_chosen"]["0.01"] == {"seeds": [0, 1], "differences": [pytest.approx(-0.01)] * 2}
    assert "| 0.005 (chosen) | 80.00 | 80.00 | 80.00 | 80.00 |" in (tmp_path / "lr_sweep.md").read_text()
    assert plan_benchmark("finetune", output_dir=tmp_path, root=BENCH, phases=["lr"])["runs"] == []


def test_paired_differences_use_only_the_seeds_both_arms_have() -> None:
    study = STUDY["init-mode"]
    acc = {("sketch", 0): 0.78, ("sketch", 1): 0.785, ("sketch", 2): 0.7475, ("exact", 0): 0.7825, ("exact", 2): 0.74}
    records = [{"arm": a, "seed": s, "flags": list(study.flags(a, s)), "val_accuracy": v} for (a, s), v in acc.items()]
    summary = study.summary(records)
    assert summary["paired"] == {"seeds": [0, 2], "differences": [pytest.approx(-0.0025), pytest.approx(0.0075)]}
    assert study.headline(summary) == "init-mode: sketch - exact +0.25 ± 0.71 points of validation accuracy (n=2)"
    assert ft.paired({"a": {0: 0.5}}, "a", "b") == {"seeds": [], "differences": []}


def test_unknown_phases_are_refused_with_the_list_before_anything_runs(tmp_path: Path, fake: FakeFinetune, capsys) -> None:
    with pytest.raises(ValueError, match=r"^suite 'finetune' has no phase\(s\) \['sketch'\]; its phases are \['lr', 'calibration', 'init-mode', 'rank-conll', 'bases-dtype'\]$"):
        run_benchmark("finetune", output_dir=tmp_path, root=BENCH, phases=["lr", "sketch"])
    assert main(["bench", "--suite", "finetune", "--phases", "lr,nope", "--output-dir", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["giva bench: suite 'finetune' has no phase(s) ['nope']; its phases are ['lr', 'calibration', 'init-mode', 'rank-conll', 'bases-dtype']"]
    assert fake.calls == [] and list(tmp_path.iterdir()) == []


def test_a_records_file_of_another_study_is_refused(tmp_path: Path, fake: FakeFinetune) -> None:
    (tmp_path / "bases_dtype.json").write_text(json.dumps({"study": "lr", "runs": []}))
    with pytest.raises(ValueError, match=f"^{tmp_path / 'bases_dtype.json'}: expected the records of study 'bases-dtype'"):
        run_benchmark("finetune", output_dir=tmp_path, root=BENCH, progress=False)
    assert fake.calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["bases_dtype.json"]


def test_the_reports_regenerate_from_the_committed_records_unchanged(tmp_path: Path, fake: FakeFinetune, capsys) -> None:
    for study in ft.STUDIES:
        shutil.copy(COMMITTED / f"{study.stem}.json", tmp_path)
    assert main(["bench", "--suite", "finetune", "--output-dir", str(tmp_path), "--report-only"]) == 0
    assert fake.calls == []
    assert "(33 runs, 0 new)" in capsys.readouterr().out
    for study in ft.STUDIES:
        assert (tmp_path / f"{study.stem}.md").read_text() == (COMMITTED / f"{study.stem}.md").read_text(), study.name
        assert json.loads((tmp_path / f"{study.stem}.json").read_text()) == json.loads((COMMITTED / f"{study.stem}.json").read_text())
    # The figures the docs cite, as the replaced scripts printed them.
    assert "| 0.01 (chosen) | 77.75 | 78.25 | 78.00 | 78.00 |" in (tmp_path / "lr_sweep.md").read_text()
    assert "Chosen LR: **0.01**, validation accuracy 78.00 % ± 0.25 (mean ± std over 3 seeds)." in (tmp_path / "lr_sweep.md").read_text()
    calibration = (tmp_path / "calibration.md").read_text()
    assert "| all | 78.50 ± 0.87 (n=3) | 200.5 |" in calibration and "| 4 | 78.00 ± 0.25 (n=3) | 9.9 |" in calibration
    assert "| all - 4, paired by seed | 0.50 ± 0.66 points (n=3; -0.25, +0.75, +1.00) | |" in calibration
    sketch = (tmp_path / "sketch_vs_exact.md").read_text()
    assert "| sketch | 77.08 ± 2.04 (n=3) |" in sketch and "| exact | 76.92 ± 2.31 (n=3) |" in sketch
    assert "| sketch - exact, paired by seed | 0.17 ± 0.38 points (n=3; -0.25, +0.25, +0.50) |" in sketch
    assert "| 32 - 8, paired by seed | 0.42 ± 0.72 points (n=3; +1.25, +0.00, +0.00) | |" in (tmp_path / "rank_conll.md").read_text()
    bases = (tmp_path / "bases_dtype.md").read_text()
    assert "| 0 | 60.75% | 60.75% | +0.00 pt | 2.84e-04 / 1.62e-04 (0.10) | 0 of 400 | 60.75% |" in bases
    assert ("validation accuracy A fp32 61.42% ± 6.28%, A bf16 61.42% ± 6.28% (mean ± std); paired difference bf16 - fp32 "
            "+0.00 ± 0.00 pt. Rounding a trained fp32 A to bf16: logits change by at most 2.84e-04 (mean 8.68e-05)") in bases


def test_report_only_needs_records(tmp_path: Path, fake: FakeFinetune) -> None:
    with pytest.raises(FileNotFoundError, match=r"^--report-only: no records to report on in .*lr_sweep.json"):
        run_benchmark("finetune", output_dir=tmp_path, root=BENCH, report_only=True)
    assert list(tmp_path.iterdir()) == []
    # a study without records yet (one just added) is skipped; the others are rewritten
    shutil.copy(COMMITTED / "lr_sweep.json", tmp_path)
    results = run_benchmark("finetune", output_dir=tmp_path, root=BENCH, report_only=True)
    assert results["reports"] == [str(tmp_path / "lr_sweep.md")] and fake.calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr_sweep.json", "lr_sweep.md"]


def test_the_calibration_study_is_the_default_recipe_with_k_all_or_4(tmp_path: Path, fake: FakeFinetune) -> None:
    fake.accuracy = lambda flags: 0.78 if flag(flags, "--num-batches") == "all" else 0.77
    results = run_benchmark("finetune", output_dir=tmp_path, root=BENCH, phases=["calibration"], progress=False)
    assert [list(c) for c in fake.calls] == [["--num-batches", k, "--seed", str(s)] for s in (0, 1, 2) for k in ("all", "4")]
    assert results["headlines"] == ["calibration: all - 4 +1.00 ± 0.00 points of validation accuracy (n=3)"]
    report = (tmp_path / "calibration.md").read_text()
    assert "| all - 4, paired by seed | 1.00 ± 0.00 points (n=3; +1.00, +1.00, +1.00) | |" in report


def test_one_study_end_to_end_through_giva_finetune_on_the_tiny_model(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """The real `giva finetune` (a fresh process) and the bf16 rounding check, on a tiny BERT and 40 rows: the fp32 run
    of a seed, the one that is re-evaluated with A rounded (one run keeps the test short)."""
    rows = [(f"{'good great' if i % 2 else 'bad awful'} film w{i}", "pos" if i % 2 else "neg") for i in range(40)]
    data = tmp_path / "reviews.csv"
    data.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    tiny = ("--model", str(model_dir), "--data", str(data), "--test-size", "4", "--val-size", "8", "--epochs", "1",
            "--batch-size", "8", "--num-batches", "1", "--r", "2", "--target-modules", "query,value")
    study = ft.BasesDtypeStudy(name="bases-dtype", stem="bases_dtype", title="t", option="--bases-dtype",
                               arms=("bfloat16", "float32"), seeds=(0,), recipe=tiny)
    bf16, fp32 = study.plan([])
    assert (fp32.arm, fp32.flags[:4]) == ("float32", ("--bases-dtype", "float32", "--seed", "0"))
    record = ft.run_record(study, fp32)
    assert (record["arm"], record["seed"], record["flags"]) == ("float32", 0, list(fp32.flags))
    assert record["config"]["n_val"] == 8 and record["config"]["train"]["seed"] == 0 and record["wall_seconds"] > 0
    rounding = record["rounding"]
    assert rounding["n_val"] == 8
    assert rounding["val_accuracy_fp32_A"] == pytest.approx(record["val_accuracy"], abs=1e-6)  # the run's own rows
    assert 0 < rounding["logits_max_abs_diff"] < 1e-2
    assert study.plan([record]) == [bf16]
