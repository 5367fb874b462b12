"""`giva finetune` on a small CSV: the default split and calibration sizes fit the data, `--max-steps` bounds the run."""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_cli import model_dir, no_model_loading, one_error_line  # noqa: F401  (fixtures)

import giva.finetune
from giva.cli import main
from giva.finetune import TrainConfig, split_sizes, train
from tiny_models import text_batches, tiny_bert

ROWS = 60


@pytest.fixture
def small_csv(tmp_path):
    rows = [(f"{'good great' if i % 2 else 'bad awful'} film w{i}", "pos" if i % 2 else "neg") for i in range(ROWS)]
    path = tmp_path / "my.csv"
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return path


def run_json(argv: list[str], capsys) -> dict:
    assert main([*argv, "--no-progress", "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # --json: stdout is the JSON alone


def test_a_60_row_csv_trains_with_every_default(model_dir, small_csv, tmp_path, capsys):  # noqa: F811
    result = run_json(["finetune", "--model", str(model_dir), "--data", str(small_csv), "--output-dir", str(tmp_path / "o")], capsys)
    config = result["config"]
    # 20 % test, 10 % validation; the 42 training rows make 3 batches of 16, all of them calibration batches
    assert (config["n_test_unscored"], config["n_val"], config["n_train"], config["num_batches"]) == (12, 6, 42, 3)
    assert config["train_steps"] == 2 * 3  # 2 epochs
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(("flags", "expected"), [([], 11), (["--num-batches", "all"], 11), (["--num-batches", "2"], 2)])
def test_calibration_defaults_to_every_training_batch(model_dir, small_csv, tmp_path, capsys, flags, expected):  # noqa: F811
    """42 training rows in batches of 4 make 11 batches: the default ('all') reads all of them, an int its k."""
    argv = ["finetune", "--model", str(model_dir), "--data", str(small_csv), "--output-dir", str(tmp_path / "o"),
            "--batch-size", "4", "--max-steps", "1", *flags]
    assert main([*argv, "--no-progress", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["config"]["num_batches"] == expected
    every = flags != ["--num-batches", "2"]
    assert result["config"]["calibration"] == ("all" if every else "first")
    init_line = next(line for line in captured.err.splitlines() if line.startswith("init time"))  # the summary
    assert f"gradient over {expected} calibration batches{', every training batch' if every else ''} + SVD" in init_line


def test_default_sizes_keep_the_benchmark_split_on_large_data_and_fit_small_data():
    assert split_sizes(4000, None, None) == (1000, 400)  # Pang & Lee: as `giva bench`
    assert split_sizes(2957, None, None) == (1000, 400)  # CoNLL-2010 (repeats dropped): as `giva bench`
    assert split_sizes(2799, None, None) == (560, 280)  # 1000 + 400 would be over half the rows
    assert split_sizes(60, None, None) == (12, 6)
    assert split_sizes(3, None, None) == (1, 1)
    assert split_sizes(60, 0.5, None) == (0.5, 6)  # a given size is kept as given
    with pytest.raises(ValueError, match=r"out of the 2 rows of the data \(repeats dropped\); set --test-size and --val-size"):
        split_sizes(2, None, None)


def test_sizes_that_do_not_fit_name_the_flags_and_the_row_count(model_dir, small_csv, tmp_path, capsys, no_model_loading):  # noqa: F811
    base = ["finetune", "--model", str(model_dir), "--data", str(small_csv), "--output-dir", str(tmp_path / "o"), "--no-progress"]
    cases = [
        (["--test-size", "1000", "--val-size", "400"],
         r"test_size \(1000 rows\) \+ val_size \(400 rows\) leave no training rows out of the 60 rows of .*my.csv "
         r"\(repeats dropped\); set --test-size and --val-size \(row counts, or fractions such as 0.2 and 0.1\)$"),
        (["--test-size", "54"], r"test_size \(54 rows\) \+ val_size \(6 rows\) leave no training rows out of the 60 rows"),
        (["--val-size", "0.001"], r"val_size=0.001 leaves no validation rows out of the 60 rows of .*; set --val-size"),
        (["--test-size", "0.001"], r"test_size=0.001 leaves no test rows out of the 60 rows of .*; set --test-size"),
        (["--num-batches", "4"], r"num_batches=4 calibration batches, but the 42 training rows make only 3 batch\(es\) of 16; "
                                 r"set --num-batches 3 or less, or a smaller --batch-size$"),
        (["--max-steps", "0"], r"argument --max-steps: must be >= 1"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        line = one_error_line(capsys)
        assert re.search(message, line), line
    assert not (tmp_path / "o").exists()


def test_max_steps_overrides_epochs_and_sizes_the_schedule(model_dir, small_csv, tmp_path, capsys, monkeypatch):  # noqa: F811
    argv = ["finetune", "--model", str(model_dir), "--data", str(small_csv), "--output-dir", str(tmp_path / "o")]
    assert run_json([*argv, "--max-steps", "7", "--epochs", "1"], capsys)["config"]["train_steps"] == 7  # > 1 epoch of 3
    assert run_json([*argv, "--max-steps", "2"], capsys)["config"]["train_steps"] == 2  # < 2 epochs of 3

    model = tiny_bert()
    for p in model.parameters():
        p.requires_grad_(False)
    model.classifier.weight.requires_grad_(True)
    loader = text_batches(n=3)
    scheduled: list[tuple[int, int]] = []
    schedule = giva.finetune.get_linear_schedule_with_warmup

    def recorded(optimizer, warmup, total):
        scheduled.append((warmup, total))
        return schedule(optimizer, warmup, total)

    monkeypatch.setattr(giva.finetune, "get_linear_schedule_with_warmup", recorded)
    stats = train(model, loader, TrainConfig(epochs=1.0, max_steps=10, warmup_ratio=0.2), progress=False)
    assert len(stats.losses) == 10 and scheduled == [(2, 10)]
    with pytest.raises(ValueError, match=r"TrainConfig.max_steps must be an integer >= 1, got 0"):
        TrainConfig(max_steps=0)
    assert torch.isfinite(torch.tensor(stats.losses)).all()


@pytest.fixture
def bundled_corpus(tmp_path, monkeypatch):
    """A stand-in for the fetched Pang & Lee corpus (label, text rows without a header), 3000 distinct rows."""
    from giva.data import BUNDLED

    monkeypatch.setenv("GIVA_DATA_DIR", str(tmp_path / "corpora"))
    (tmp_path / "corpora").mkdir()
    rows = "".join(f"{1 if i % 2 else -1},sentence number {i}\n" for i in range(3000))
    (tmp_path / "corpora" / BUNDLED["pang-lee"]).write_text(rows, encoding="utf-8")
    return "pang-lee"


@pytest.mark.parametrize("test_size", ["999", "500", "0.1"])
def test_a_bundled_corpus_keeps_the_benchmarks_test_rows_out_of_training(
    model_dir, bundled_corpus, tmp_path, capsys, no_model_loading, test_size  # noqa: F811
):
    """Fewer test rows than the benchmark's 1000 would move some of its test rows into training or validation."""
    argv = ["finetune", "--model", str(model_dir), "--data", bundled_corpus, "--output-dir", str(tmp_path / "o")]
    assert main([*argv, "--test-size", test_size]) == 2
    assert re.search(r"sets aside \d+ rows of the bundled corpus 'pang-lee', fewer than the 1000 rows of the "
                     r"benchmark's \(evidence suite's\) test split: .*leave --test-size unset", one_error_line(capsys))
    assert not (tmp_path / "o").exists()
    for fine in (["--test-size", "1200"], ["--val-size", "100"], []):  # a superset of the test rows: the checks pass
        with pytest.raises(AssertionError, match="the model was loaded"):
            main([*argv, *fine])
