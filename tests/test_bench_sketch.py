"""`giva bench --suite sketch` (giva.bench.sketch, issue 24): the dry run lists the (model, r, setting) records the
JSON lacks, a rerun measures only those, the committed table is what the committed records give, and bad input is
refused in one line before any model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import giva.bench.sketch as sketch
from giva.bench import plan_benchmark, run_benchmark
from giva.bench.sketch import SketchRequest, plan_sketch, run_sketch
from tiny_models import text_batches, tiny_bert

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
COMMITTED = BENCH / "results" / "sketch"
ALL = [f"sketch: {m}/r{r}/p3/odefault" for m in ("minilm", "smollm2") for r in (8, 32, 64)]
NOW = "c" * 40  # the code commit the tests run as
# The committed records name the commit that measured them (older ones none: 'unknown'); to the tests they are stale.
_RECORDED = {row.get("commit") or "unknown" for row in json.loads((COMMITTED / "sketch_accuracy.json").read_text())["rows"].values()}
STALE = f" (recorded at commit {_RECORDED.pop()[:7]}, the code is now ccccccc: stale)" if len(_RECORDED) == 1 else None


@pytest.fixture(autouse=True)
def code_at_a_known_commit(monkeypatch) -> None:
    monkeypatch.setattr(sketch, "code_commit", lambda: NOW, raising=False)


def _stamp(path: Path, commit: str = NOW) -> dict:
    """The records at ``path`` as if measured by the code at ``commit`` (returned as they were before)."""
    records = json.loads(path.read_text())
    path.write_text(json.dumps({**records, "rows": {k: {**v, "commit": commit} for k, v in records["rows"].items()}}))
    return records


def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded")


@pytest.fixture
def committed(tmp_path: Path) -> Path:
    out = tmp_path / "sketch"
    shutil.copytree(COMMITTED, out)
    return out


def test_the_dry_run_lists_every_record_of_an_empty_folder_and_every_stale_one_of_the_committed_one(tmp_path: Path) -> None:
    assert plan_sketch(tmp_path) == ALL
    assert plan_benchmark("sketch", output_dir=tmp_path, root=BENCH)["runs"] == ALL
    # the committed records were measured before records named their commit (d6d38f5, on code changed since)
    assert plan_sketch(COMMITTED) == [key + STALE for key in ALL]
    assert plan_benchmark("sketch", output_dir=COMMITTED, root=BENCH)["runs"] == [key + STALE for key in ALL]
    assert plan_sketch(COMMITTED, keep_stale=True) == []
    assert plan_benchmark("sketch", output_dir=COMMITTED, root=BENCH, keep_stale=True)["runs"] == []
    other = SketchRequest(models=("smollm2",), ranks=(8,), settings=((4, 16), (3, None)))
    assert plan_sketch(COMMITTED, other) == ["sketch: smollm2/r8/p4/o16", "sketch: smollm2/r8/p3/odefault" + STALE]
    assert plan_sketch(COMMITTED, other, keep_stale=True) == ["sketch: smollm2/r8/p4/o16"]


def test_records_of_other_code_are_measured_again_and_name_the_code_and_default_they_measured(committed: Path, monkeypatch) -> None:
    path = committed / "sketch_accuracy.json"
    before = _stamp(path, "d" * 40)
    assert plan_sketch(committed) == [key + " (recorded at commit ddddddd, the code is now ccccccc: stale)" for key in ALL]
    monkeypatch.setattr(sketch, "load", lambda name: (tiny_bert(), None, False))
    monkeypatch.setattr(sketch, "batches", lambda tokenizer, n, size, length, causal: text_batches(n=n, batch=size))
    result = run_sketch(committed, SketchRequest(models=("minilm",), ranks=(8,)))
    assert result["ran"] == ["minilm/r8/p3/odefault"]
    rows = json.loads(path.read_text())["rows"]
    fresh = rows["minilm/r8/p3/odefault"]
    assert fresh["commit"] == NOW and fresh["started_utc"][:2] == "20"
    assert fresh["library_default"] == {"passes": 3, "oversampling": None, "min_oversampling": 32} and fresh["default"]
    assert all(rows[k] == {**v, "commit": "d" * 40} for k, v in before["rows"].items() if k != "minilm/r8/p3/odefault")
    table = (committed / "sketch_accuracy.md").read_text()
    assert "| 0.9 | ccccccc |" not in table and table.count("| ddddddd |") == 5 and table.count(" | ccccccc |") == 1
    assert plan_sketch(committed) == [key + " (recorded at commit ddddddd, the code is now ccccccc: stale)" for key in ALL[1:]]


def test_the_committed_table_is_what_the_committed_records_give() -> None:
    records = json.loads((COMMITTED / "sketch_accuracy.json").read_text())
    assert sketch.sketch_report(records) == (COMMITTED / "sketch_accuracy.md").read_text()


def test_a_rerun_with_every_record_measures_nothing_and_rewrites_the_same_files(committed: Path, monkeypatch) -> None:
    before = {p.name: p.read_bytes() for p in committed.iterdir()}
    monkeypatch.setattr(sketch, "load", _no_model)
    result = run_benchmark("sketch", output_dir=committed, root=BENCH, keep_stale=True)  # the committed ones are stale
    assert result["ran"] == [] and result["n_runs"] == 6 and result["reports"] == [str(committed / "sketch_accuracy.md")]
    assert {p.name: p.read_bytes() for p in committed.iterdir()} == before
    assert result["headlines"][0] == "sketch minilm r=8: mean cos A 0.9997 (min 0.9987; target 0.99)"


def test_a_missing_record_is_measured_alone_and_the_others_are_kept(committed: Path, monkeypatch) -> None:
    path = committed / "sketch_accuracy.json"
    _stamp(path)  # as if measured by the code that runs
    records = json.loads(path.read_text())
    del records["rows"]["minilm/r8/p3/odefault"]
    path.write_text(json.dumps(records, indent=1))
    assert plan_sketch(committed) == ["sketch: minilm/r8/p3/odefault"]
    # a tiny BERT stands in for MiniLM: each layer's gradient has rank <= 32 (its smaller side), below the default
    # sketch's l = 8 + 32 = 40 columns, so the sketch spans its whole range and must find the exact singular vectors
    monkeypatch.setattr(sketch, "load", lambda name: (tiny_bert(), None, False))
    monkeypatch.setattr(sketch, "batches", lambda tokenizer, n, size, length, causal: text_batches(n=n, batch=size))
    result = run_sketch(committed)
    assert result["ran"] == ["minilm/r8/p3/odefault"]
    after = json.loads(path.read_text())
    row = after["rows"]["minilm/r8/p3/odefault"]
    assert row["default"] and row["width"] == 40 and row["layers"] == 13
    assert row["min_cos_a"] > 0.9999 and row["min_cos_b"] > 0.9999
    assert {k: v for k, v in after["rows"].items() if k != "minilm/r8/p3/odefault"} == records["rows"]
    assert after["commands"] == [*records["commands"], *(["giva bench --suite sketch"] * ("giva bench --suite sketch" not in records["commands"]))]
    assert plan_sketch(committed) == []


def test_the_reference_is_timed_after_an_untimed_warm_up_pass(monkeypatch) -> None:
    """The exact reference was timed as the process's first forward and backward (cold) while every sketch row ran
    warm after it: a fake clock that charges 100 s to the first gradient pass and 1 s to each later one shows the
    reference's time is a warm pass's (plus the SVDs, free on this clock)."""
    import types

    import giva.init

    real = giva.init.compute_gradients
    calls: list[int] = []
    clock = [0.0]

    def charged(*args, **kwargs):
        clock[0] += 100.0 if not calls else 1.0
        calls.append(kwargs["num_batches"])
        return real(*args, **kwargs)

    monkeypatch.setattr(giva.init, "compute_gradients", charged)
    monkeypatch.setattr(sketch, "time", types.SimpleNamespace(perf_counter=lambda: clock[0], time=lambda: 0.0))
    data = text_batches(n=2, batch=4)
    exact = sketch.reference(tiny_bert(), data, "SEQ_CLS")
    assert calls == [2, 2]  # the warm-up pass, then the timed one, both over every batch
    assert exact["seconds"] == 1.0


def test_the_thread_count_is_set_while_measuring_recorded_and_given_back(tmp_path: Path, monkeypatch) -> None:
    import torch

    before = torch.get_num_threads()
    seen: list[int] = []
    real = sketch.reference
    monkeypatch.setattr(sketch, "reference", lambda *a: seen.append(torch.get_num_threads()) or real(*a))
    monkeypatch.setattr(sketch, "load", lambda name: (tiny_bert(), None, False))
    monkeypatch.setattr(sketch, "batches", lambda tokenizer, n, size, length, causal: text_batches(n=n, batch=size))
    run_sketch(tmp_path, SketchRequest(models=("minilm",), ranks=(4,), num_batches=2, batch_size=4, threads=1))
    row = json.loads((tmp_path / "sketch_accuracy.json").read_text())["rows"]["minilm/r4/p3/odefault"]
    assert seen == [1] and row["threads"] == 1 and row["exact_warm"] and torch.get_num_threads() == before
    assert "| 1 | ccccccc |" in (tmp_path / "sketch_accuracy.md").read_text()
    with pytest.raises(ValueError, match="SketchRequest.threads must be None or an integer >= 1, got 0"):
        SketchRequest(threads=0)


def test_the_command_line_measures_and_names_its_report(capsys, tmp_path: Path, monkeypatch) -> None:
    """`python -m giva.bench.sketch` ends by printing where the table is, exit 0 (it raised KeyError 'report' after
    every record was measured)."""
    monkeypatch.setattr(sketch, "load", lambda name: (tiny_bert(), None, False))
    monkeypatch.setattr(sketch, "batches", lambda tokenizer, n, size, length, causal: text_batches(n=n, batch=size))
    assert sketch.main(["--models", "minilm", "--ranks", "8", "--num-batches", "2", "--batch-size", "4",
                        "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"results: {tmp_path / 'sketch_accuracy.md'} (1 records, 1 new)"
    assert out[0].startswith("sketch minilm r=8: mean cos A ")
    assert (tmp_path / "sketch_accuracy.md").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"models": ("llama",)}, r"SketchRequest.models must be among \['minilm', 'smollm2'\], got \['llama'\]"),
        ({"ranks": (8, 0)}, r"SketchRequest.ranks must be integers >= 1, got \[8, 0\]"),
        ({"settings": ((1, None),)}, "SketchRequest.settings: passes must be an integer >= 2, got 1"),
        ({"settings": ((3, -1),)}, "SketchRequest.settings: oversampling must be None or an integer >= 0, got -1"),
        ({"batch_size": 0}, "SketchRequest.batch_size must be an integer >= 1, got 0"),
    ],
)
def test_a_bad_request_is_refused_in_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SketchRequest(**kwargs)


def test_records_of_other_data_or_a_broken_file_are_refused_before_any_model_loads(committed: Path, monkeypatch) -> None:
    monkeypatch.setattr(sketch, "load", _no_model)
    path = committed / "sketch_accuracy.json"
    text = path.read_text()
    with pytest.raises(ValueError, match=rf"{path} holds records for \{{'num_batches': 4, 'batch_size': 8, 'max_length': 64\}}, "
                                         r"not \{'num_batches': 1, .*\}: use another output folder"):
        run_sketch(committed, SketchRequest(num_batches=1))
    path.write_text('{"rows": {"a"')
    with pytest.raises(ValueError, match=rf"{path} is not a sketch-accuracy record file \(JSON with 'rows'\)"):
        plan_sketch(committed)
    (committed / "file").write_text("x")
    with pytest.raises(ValueError, match=f"sketch output folder {committed / 'file'} is a file, not a folder"):
        run_sketch(committed / "file")
    path.write_text(text)


def test_the_command_line_refuses_bad_options_with_exit_2(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sketch, "load", _no_model)
    assert sketch.main(["--ranks", "0", "--output-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "python -m giva.bench.sketch: SketchRequest.ranks must be integers >= 1, got [0]"
    with pytest.raises(SystemExit) as stop:
        sketch.main(["--sketch", "3:x"])
    assert stop.value.code == 2 and "--sketch expects PASSES or PASSES:OVERSAMPLING, got '3:x'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--report-only applies to training suites; the 'sketch' suite writes its report as it runs"):
        run_benchmark("sketch", output_dir=tmp_path, root=BENCH, report_only=True)
    assert list(tmp_path.iterdir()) == []
