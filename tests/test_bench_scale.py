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
    runs = {f"{TINY.name}/{kind}": {**record, "status": "ok"} for kind, record in records.items()}
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
    table = (tmp_path / "results.md").read_text()
    assert f"| {TINY.name} |" in table
    assert (tmp_path / "memory_vs_parameters.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="unknown scale model"):
        scale.run_scale(tmp_path, models=["llama-70b"])
