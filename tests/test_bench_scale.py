"""The scale benchmark's measurement and runner on a tiny Llama (the real suite takes an hour)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from giva.bench import scale

TINY = scale.ScaleModel("llama-tiny", "float32", 2, 2, 8, 120, 32, 64, 2, 4, 2, vocab=100)


# The pre-package implementation is read from git history, which a shallow clone (some CI checkouts) lacks.
LEGACY_IN_HISTORY = (
    subprocess.run(
        ["git", "-C", str(Path(scale.__file__).resolve().parents[3]), "cat-file", "-e", f"{scale.LEGACY_COMMIT}^{{commit}}"],
        capture_output=True,
    ).returncode
    == 0
)


@pytest.fixture(scope="module")
def records() -> dict[str, dict]:
    kinds = [k for k in scale.KINDS if LEGACY_IN_HISTORY or k != "exact_legacy"]
    return {kind: scale.measure(TINY, kind) for kind in kinds}


def test_each_measurement_reports_time_and_a_peak_above_its_starting_rss(records):
    for kind, record in records.items():
        assert record["kind"] == kind and record["seconds"] > 0
        assert record["peak_rss"] >= record["rss_before"] > 0, kind
        assert record["parameters"] > record["targeted_parameters"] > 0
    assert records["train_step"]["fwd_bwd_seconds"] > 0
    assert records["sketch"]["passes"] >= 2 and records["exact"]["passes"] == 1


@pytest.mark.skipif(not LEGACY_IN_HISTORY, reason=f"commit {scale.LEGACY_COMMIT} is not in this clone's history (shallow)")
def test_exact_bases_match_the_pre_package_implementation(records):
    # The legacy module is today's code at LEGACY_COMMIT, loaded from git: same data, same bases.
    assert records["exact"]["bases_checksum"] == pytest.approx(records["exact_legacy"]["bases_checksum"], rel=1e-6)
    assert records["sketch"]["bases_checksum"] > 0


def test_runner_resumes_and_writes_table_and_plot(records, tmp_path, monkeypatch):
    monkeypatch.setitem(scale.MODELS, TINY.name, TINY)
    runs = {f"{TINY.name}/{kind}": {**record, "status": "ok", "shape": scale.shape(TINY)} for kind, record in records.items()}
    (tmp_path / "results.json").write_text(json.dumps({"runs": runs}))

    def must_not_run(*args):
        raise AssertionError(f"measured again: {args}")

    monkeypatch.setattr(scale, "run_one", must_not_run)
    results = scale.run_scale(tmp_path, models=[TINY.name])
    assert set(results["runs"]) == set(runs)
    row = scale.summary_rows(results)[0]
    assert row["sketch_peak_over_train"] == pytest.approx(records["sketch"]["peak_rss"] / records["train_step"]["peak_rss"])
    if LEGACY_IN_HISTORY:
        assert row["exact_time_over_legacy"] > 0
    loraga = records["loraga"]["peak_rss"] / records["train_step"]["peak_rss"]
    assert row["loraga_peak_over_train"] == pytest.approx(loraga)
    table = (tmp_path / "results.md").read_text()
    header, _, line = (next(x for x in table.splitlines() if x.startswith(p)) for p in ("| model |", "|---", f"| {TINY.name} |"))
    assert dict(zip(header.split(" | "), line.split(" | ")))["LoRA-GA/train peak"] == f"{loraga:.2f}"
    assert "[?] commit unknown (recorded before records named their commit)" in table  # these records name none
    assert (tmp_path / "memory_vs_parameters.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="unknown scale model"):
        scale.run_scale(tmp_path, models=["llama-70b"])


def test_compare_alternates_fresh_processes_resumes_and_reports_the_ratio(tmp_path, monkeypatch):
    calls = []

    def fake_run_one(model, kind, scratch):
        calls.append(kind)
        seconds = 2.0 if kind == "exact" else 4.0
        return {"model": model, "kind": kind, "status": "ok", "seconds": seconds, "gradient_seconds": 1.0,
                "svd_seconds": seconds - 1.0, "peak_rss": 2e9 if kind == "exact" else 1e9, "load_average": [1.0, 1.0, 1.0]}

    monkeypatch.setattr(scale, "run_one", fake_run_one)
    results = scale.compare("llama-0.5b", ["exact", "exact_legacy"], 2, tmp_path, "cmd")
    assert calls == ["exact", "exact_legacy", "exact_legacy", "exact"]  # ABBA
    assert results["summary"]["time_ratio"] == pytest.approx(0.5)
    assert results["summary"]["paired_time_ratios"] == [pytest.approx(0.5)] * 2
    table = (tmp_path / "compare.md").read_text()
    assert "Time exact / exact_legacy: 0.500" in table and "Peak exact / exact_legacy: 2.000" in table
    scale.compare("llama-0.5b", ["exact", "exact_legacy"], 3, tmp_path)  # resumes: only the third pair runs
    assert calls[4:] == ["exact", "exact_legacy"]
    assert json.loads((tmp_path / "compare.json").read_text())["command"] == "cmd"
    with pytest.raises(ValueError, match="two measurements"):
        scale.compare("llama-0.5b", ["exact", "nope"], 1, tmp_path)


def test_remeasure_replaces_only_the_selected_records_and_keeps_the_others(tmp_path, monkeypatch):
    monkeypatch.setitem(scale.MODELS, TINY.name, TINY)
    old = {"status": "ok", "seconds": 9.0, "fwd_bwd_seconds": 4.0, "peak_rss": 3e9, "parameters": 1e6,
           "load_average": [20.0, 20.0, 20.0]}
    runs = {f"{TINY.name}/{kind}": {"model": TINY.name, "kind": kind, "shape": scale.shape(TINY), **old} for kind in TINY.kinds}
    (tmp_path / "results.json").write_text(json.dumps({"runs": runs}))
    calls = []

    def fake_run_one(model, kind, scratch):
        calls.append(kind)
        return {"model": model, "kind": kind, "status": "ok", "seconds": 1.0, "peak_rss": 2e9, "parameters": 1e6,
                "load_average": [1.0, 1.0, 1.0]}

    monkeypatch.setattr(scale, "run_one", fake_run_one)
    scale.run_scale(tmp_path, models=[TINY.name], kinds=["exact"])  # resumes: nothing to do
    assert calls == []
    scale.run_scale(tmp_path, models=[TINY.name], kinds=["exact", "loraga"], remeasure=True)
    assert calls == ["exact", "loraga"]
    saved = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert set(saved) == set(runs)
    for key, run in saved.items():
        fresh = key.endswith(("/exact", "/loraga"))
        assert run["seconds"] == (1.0 if fresh else 9.0), key
        assert ("commit" in run) == fresh and (not fresh or run["commit"] == scale.code_commit())
    assert f"{TINY.name}/exact 1.0 ({scale.short_commit(scale.code_commit())})" in (tmp_path / "results.md").read_text()


def test_records_keep_their_shapes_and_commit_and_a_record_of_other_shapes_is_measured_again(tmp_path, monkeypatch):
    """A record is done only if its own shapes are the model's now; one of other code is kept, marked in results.md
    and noted by the dry run; the summary divides by each record's own k."""
    monkeypatch.setitem(scale.MODELS, TINY.name, TINY)
    monkeypatch.setattr(scale, "code_commit", lambda: "c" * 40)
    base = {"model": TINY.name, "status": "ok", "seconds": 8.0, "fwd_bwd_seconds": 1.0, "peak_rss": 2e9, "parameters": 1e6,
            "passes": 2, "load_average": [1.0, 1.0, 1.0]}
    k4 = {**scale.shape(TINY), "num_batches": 4}  # measured when the model had k = 4 batches
    runs = {
        f"{TINY.name}/train_step": {**base, "kind": "train_step", "shape": k4, "commit": "c" * 40},
        f"{TINY.name}/sketch": {**base, "kind": "sketch", "shape": k4},
        f"{TINY.name}/exact": {**base, "kind": "exact"},  # no shape of its own: the file's models table (k = 2)
    }
    results = {"runs": runs, "models": {TINY.name: {"name": TINY.name, **scale.shape(TINY), "timeout_s": 1}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    row = scale.summary_rows(results)[0]
    assert row["sketch_time_over_k_fwd_bwd"] == pytest.approx(8.0 / (4 * 1.0))  # the records' k, not MODELS' 2
    assert "exact_peak_over_train" not in row  # exact (k = 2) and the train step (k = 4) measured other shapes
    monkeypatch.setattr(scale, "MODELS", {TINY.name: TINY})  # plan_scale goes over every model: the tiny one only
    planned = scale.plan_scale(tmp_path)
    assert f"scale: {TINY.name}/train_step (measured with other shapes: {k4})" in planned
    assert f"scale: {TINY.name}/sketch (measured with other shapes: {k4})" in planned
    assert not any(line.startswith(f"scale: {TINY.name}/exact ") or line == f"scale: {TINY.name}/exact" for line in planned)
    assert scale.scale_notes(tmp_path) == [
        f"scale: kept {TINY.name}/exact, measured at commit unknown, not the code now (ccccccc); python -m "
        f"giva.bench.scale run --models {TINY.name} --kinds exact --remeasure measures it again"
    ]
    calls = []

    def fake_run_one(model, kind, scratch):
        calls.append(kind)
        return {**base, "kind": kind}

    monkeypatch.setattr(scale, "run_one", fake_run_one)
    monkeypatch.setattr(scale, "_free_gib", lambda: 1000.0)
    scale.run_scale(tmp_path, models=[TINY.name], kinds=["train_step", "sketch", "exact"])
    assert calls == ["train_step", "sketch"]  # the two of other shapes; exact (other code) is kept
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"] == results["models"]  # no longer overwritten by today's MODELS
    for kind in ("train_step", "sketch"):
        record = saved["runs"][f"{TINY.name}/{kind}"]
        assert record["shape"] == scale.shape(TINY) and record["commit"] == "c" * 40 and record["started_utc"][:2] == "20"
    table = (tmp_path / "results.md").read_text()
    assert "[a] ccccccc; [?] commit unknown" in table and " s [a] |" in table and " s [?] |" in table
    assert f"{TINY.name}/exact 1.0 (commit unknown)" in table


def test_cpu_contention_times_each_kernel_alone_and_two_at_once(tmp_path):
    results = scale.cpu_contention(tmp_path, scale_repeats=0.01, kernels=["matmul256"])  # 3 processes
    assert [r["kernel"] for r in results["rows"]] == ["matmul256"]
    for row in results["rows"]:
        assert row["alone_seconds"] > 0 and len(row["together_seconds"]) == 2 and row["slowdown"] > 0
    assert "| matmul256 |" in (tmp_path / "cpu_contention.md").read_text()
    assert json.loads((tmp_path / "cpu_contention.json").read_text())["rows"] == results["rows"]
