"""`giva bench` requests that used to be ignored or misread get one clear error before anything runs, and a dry run
of the serve and scale suites lists what a real run would measure (issue 24, item 8)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from giva.bench import plan_benchmark, suite_names
from giva.bench.runner import load_runs
from giva.bench.scale import MODELS, plan_scale, shape
from giva.bench.serve import DEFAULT_MODELS, ServeSettings, plan_serve
from giva.bench.serve_memory import plan_adapter_memory

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"suite": "nosuch"}, r"no suite 'nosuch'; the suites are \[.*'evidence'.*'serve', 'scale', 'gpu', 'sketch', 'finetune', 'qlora'\]"),
        ({"suite": "evidence", "quick": True}, r"--quick runs the 'quick' suite \(or the gpu suite's tiny shapes\); it cannot be combined with --suite evidence"),
        ({"suite": "evidence", "phases": ["nosuch"]}, r"suite 'evidence' has no phase\(s\) \['nosuch'\]; its phases are"),
        ({"suite": "evidence", "phases": []}, "--phases names no phase"),
        ({"suite": "serve", "phases": ["x"]}, "--phases: the 'serve' suite has no phases"),
        ({"suite": "scale", "phases": ["x"]}, "--phases: the 'scale' suite has no phases"),
        ({"suite": "sketch", "phases": ["x"]}, "--phases: the 'sketch' suite has no phases"),
        ({"suite": "finetune", "phases": ["lr", "nosuch"]},
         r"suite 'finetune' has no phase\(s\) \['nosuch'\]; its phases are \['lr', 'calibration', 'init-mode', 'rank-conll', 'bases-dtype'\]$"),
        ({"suite": "finetune", "phases": []}, "--phases names no phase"),
        ({"suite": "finetune", "quick": True}, "--quick runs the 'quick' suite .*; it cannot be combined with --suite finetune"),
        ({"suite": "evidence", "keep_stale": True},
         "--keep-stale applies to the serve, sketch and qlora suites .*; not to --suite evidence$"),
        ({"suite": "scale", "keep_stale": True}, "not to --suite scale \\(it keeps records of other code and marks them"),
        ({"quick": True, "keep_stale": True}, "not to --suite quick$"),
    ],
)
def test_requests_that_would_be_ignored_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_benchmark(root=BENCH, **kwargs)


def test_an_output_dir_that_is_a_file_is_refused_before_planning(tmp_path: Path) -> None:
    target = tmp_path / "results"
    target.write_text("not a folder")
    for suite in ("evidence", "serve", "scale", "sketch", "finetune", "qlora"):
        with pytest.raises(ValueError, match=f"--output-dir {target} is a file, not a folder"):
            plan_benchmark(suite, output_dir=target, root=BENCH)


def test_suite_names_are_the_json_suites_then_serve_scale_gpu_sketch_finetune_and_qlora() -> None:
    names = suite_names(BENCH)
    assert names[-6:] == ["serve", "scale", "gpu", "sketch", "finetune", "qlora"]
    assert set(names[:-6]) == {p.stem for p in (BENCH / "suites").glob("*.json")}


def test_serve_dry_run_lists_every_point_of_an_empty_folder_and_every_stale_point_of_the_committed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import giva.bench.serve

    monkeypatch.setattr(giva.bench.serve, "code_commit", lambda: "c" * 40)  # code other than the committed points'
    planned = plan_serve(tmp_path)
    memory = plan_adapter_memory(tmp_path)  # first the byte counts (adapter_memory.json): two models, then one with its head
    assert len(memory) == 3 and planned[:3] == memory
    assert len(planned) == 3 + len(DEFAULT_MODELS) * len(ServeSettings().ns)
    assert plan_benchmark("serve", output_dir=tmp_path, root=BENCH)["runs"] == planned
    # The committed timings were measured by other code than this (patched) one: stale, every point is planned
    # again (the byte counts are complete), unless --keep-stale keeps them.
    committed = BENCH / "results" / "serve"
    stale = plan_serve(committed)
    assert [line.split(":")[1].strip() for line in stale] == [f"{m.name} N={n}" for m in DEFAULT_MODELS for n in ServeSettings().ns]
    assert all(re.search(r"\(recorded at commit \w+, the code is now ccccccc: stale\)$", line) for line in stale)
    assert plan_benchmark("serve", output_dir=committed, root=BENCH)["runs"] == stale
    assert plan_serve(committed, keep_stale=True) == []
    assert plan_benchmark("serve", output_dir=committed, root=BENCH, keep_stale=True)["runs"] == []


def test_scale_dry_run_lists_only_the_records_not_measured_ok(tmp_path: Path) -> None:
    everything = [f"scale: {name}/{kind}" for name, spec in MODELS.items() for kind in spec.kinds]
    assert plan_scale(tmp_path) == everything
    small = shape(MODELS["smollm2-135m"])
    (tmp_path / "results.json").write_text(json.dumps({"runs": {
        "smollm2-135m/exact": {"status": "ok", "shape": small},
        "smollm2-135m/sketch": {"status": "ok", "shape": {**small, "seq_len": 128}},  # other shapes: measured again
        "llama-3b/exact": {"status": "skipped_memory"},
    }}))
    planned = plan_scale(tmp_path)
    assert "scale: smollm2-135m/exact" not in planned and "scale: llama-3b/exact" in planned
    assert f"scale: smollm2-135m/sketch (measured with other shapes: {({**small, 'seq_len': 128})})" in planned
    assert len(planned) == len(everything) - 1


@pytest.mark.parametrize(("content", "message"), [("{}", "is not a run record"), ('{"run_id": "a", "met', "is not valid JSON")])
def test_a_broken_run_json_is_named(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "good.json").write_text(json.dumps({"run_id": "a", "kind": "train"}))
    (tmp_path / "broken.json").write_text(content)
    with pytest.raises(ValueError, match=f"{tmp_path / 'broken.json'} {message}"):
        load_runs(tmp_path)


def test_cli_reports_a_bad_request_in_one_line_with_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "giva.cli", "bench", "--suite", "evidence", "--phases", ",", "--dry-run"],
        capture_output=True, text=True, cwd=BENCH.parent, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "giva bench: --phases names no phase; give comma-separated phase names"


@pytest.mark.parametrize(("suite", "adaptive"), [("serve", False), ("scale", False), ("sketch", False), ("qlora", False),
                                               ("finetune", True), ("quick", True)])
def test_the_dry_run_mentions_adaptive_sweeps_only_for_suites_that_have_them(suite: str, adaptive: bool, tmp_path: Path,
                                                                             capsys, monkeypatch) -> None:
    from giva import cli

    monkeypatch.chdir(BENCH.parent)
    assert cli.main(["bench", "--suite", suite, "--dry-run", "--output-dir", str(tmp_path / suite)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("giva bench --dry-run: "))
    assert ("adaptive LR sweeps may add more" in line) == adaptive


def test_cli_keeps_stale_records_only_when_told(capsys, monkeypatch) -> None:
    import giva.bench.sketch
    from giva import cli

    monkeypatch.chdir(BENCH.parent)
    monkeypatch.setattr(giva.bench.sketch, "code_commit", lambda: "c" * 40)  # code other than the records measured
    assert cli.main(["bench", "--suite", "sketch", "--dry-run"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("giva bench --dry-run: 6 run(s) to add now")
    assert cli.main(["bench", "--suite", "sketch", "--dry-run", "--keep-stale"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("giva bench --dry-run: 0 run(s) to add now")
    assert cli.main(["bench", "--suite", "evidence", "--dry-run", "--keep-stale"]) == 2
    assert "--keep-stale applies to the serve, sketch and qlora suites" in capsys.readouterr().err


def test_cli_names_a_missing_quantisation_package_in_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """`giva bench --phases clm-nf4` without bitsandbytes: one line and exit 2, before any task loads."""
    import importlib.util

    from giva import cli
    from giva.bench import runner

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    monkeypatch.setattr(runner, "load_task", lambda spec: pytest.fail("a task was loaded before the check"))
    monkeypatch.chdir(BENCH.parent)
    assert cli.main(["bench", "--suite", "evidence", "--phases", "clm-nf4"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "giva bench: quantization 'nf4' needs bitsandbytes: pip install -e '.[quant]'"
    )


def test_suites_run_as_modules_without_a_second_copy():
    """`python -m giva.bench.<suite>` (how the scale and qlora suites start each measurement) runs the module once:
    the package does not import the suites run that way, so runpy neither warns nor executes a second copy."""
    runnable = ["gpu", "scale", "sketch", "qlora"]
    code = "import sys, giva.bench; print(sorted(m for m in sys.modules if m.startswith('giva.bench.')))"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert not [name for name in runnable if f"'giva.bench.{name}'" in imported], imported
    result = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "giva.bench.qlora", "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "found in sys.modules" not in result.stderr, result.stderr
