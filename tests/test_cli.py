"""`giva finetune` end to end on a tiny local model, and one clear line (exit 2) for every bad input, before any loading."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import BertTokenizer

import giva.finetune
from giva.assets import resolve_model
from giva.cli import main
from giva.finetune import load_finetuned
from tiny_models import VOCAB, tiny_bert

WORDS = ["good", "bad", "film", "plot", "great", "awful", "fine", "dull"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert().save_pretrained(folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    vocab += [f"w{i}" for i in range(VOCAB - len(vocab))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


@pytest.fixture
def data_csv(tmp_path):
    rows = [(f"{'good great' if i % 2 else 'bad awful'} film w{i}", "pos" if i % 2 else "neg") for i in range(40)]
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return path


def args(model_dir, data, out, *extra):
    return [
        "finetune", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--test-size", "4",
        "--val-size", "4", "--epochs", "1", "--batch-size", "8", "--num-batches", "1", "--r", "2",
        "--target-modules", "query,value", "--no-progress", *extra,
    ]


def test_finetune_saves_an_adapter_that_reloads_with_its_label_names(model_dir, data_csv, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(args(model_dir, data_csv, out)) == 0
    assert "accuracy" in capsys.readouterr().out
    labels = json.loads((out / "labels.json").read_text())
    assert labels["id2label"] == {"0": "neg", "1": "pos"} and labels["label2id"] == {"neg": 0, "pos": 1}
    model, tokenizer = load_finetuned(out)
    assert model.config.id2label == {0: "neg", 1: "pos"}
    batch = tokenizer(["good great film", "bad awful film"], return_tensors="pt")
    with torch.no_grad():
        first = model(**batch).logits
        again = load_finetuned(out)[0](**batch).logits
    assert torch.equal(first, again) and torch.isfinite(first).all()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp folders left


def test_a_tilde_output_dir_is_the_folder_saved_and_reported(model_dir, data_csv, tmp_path, capsys, monkeypatch):
    """`--output-dir=~/ft` (bash leaves a `~` after `=` alone): the size and the path reported are the saved folder's.
    With --json stdout is the JSON alone (`giva finetune --json | jq .`), the summary on stderr."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert main([*args(model_dir, data_csv, "~/ft"), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert "adapter size" in captured.err
    saved = home / "ft" / "adapter_model.safetensors"
    assert result["output_dir"] == str(home / "ft") and result["adapter_bytes"] == saved.stat().st_size > 0
    assert not (tmp_path / "~").exists()


def test_a_saved_classifier_of_another_class_count_gets_a_new_head(model_dir, tmp_path, capsys, caplog):
    """model_dir holds a 2-label classifier; 3-class data re-initialises the head only, and the result reloads."""
    rows = [(f"{['bad awful', 'good great', 'fine plot'][i % 3]} film w{i}", ["neg", "pos", "mid"][i % 3]) for i in range(40)]
    data = tmp_path / "three.csv"
    data.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="giva.finetune"):
        assert main(args(model_dir, data, out)) == 0
    assert re.search(r"has 2 classes, the data 3: its head is re-initialised for 3 classes", caplog.text)
    model, tokenizer = load_finetuned(out)
    assert model.config.id2label == {0: "mid", 1: "neg", 2: "pos"}
    body = model.get_base_model().bert.embeddings.word_embeddings.weight
    assert torch.equal(body, tiny_bert().bert.embeddings.word_embeddings.weight)  # the saved body, not a fresh one
    batch = tokenizer(["good great film", "fine plot"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3) and torch.equal(logits, load_finetuned(out)[0](**batch).logits)


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    """A tiny Llama classifier whose tokenizer (word level) has an EOS token but no pad token, as GPT-2 / Llama ship."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    words = ["<unk>", "<s>", "</s>", *WORDS]
    vocab = {word: i for i, word in enumerate(words + [f"w{i}" for i in range(VOCAB - len(words))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    assert tokenizer.pad_token is None
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # saved as chat_template.jinja
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, num_labels=2, pad_token_id=None)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    return folder


def test_a_decoder_without_a_pad_token_trains_and_reloads(decoder_dir, data_csv, tmp_path):
    """Batches are padded with EOS; the reloaded classifier gives each row in a padded batch its own logits."""
    out = tmp_path / "out"
    assert main([*args(decoder_dir, data_csv, out), "--target-modules", "q_proj,v_proj"]) == 0
    model, tokenizer = load_finetuned(out)
    texts = ["good great film w3 plot", "bad"]
    with torch.no_grad():
        batch = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits
        alone = torch.cat([model(**tokenizer([text], return_tensors="pt")).logits for text in texts])
    assert tokenizer.pad_token == "</s>" and model.config.pad_token_id == tokenizer.eos_token_id
    assert torch.allclose(batch, alone, atol=1e-5)


def test_a_tokenizer_that_cannot_pad_is_named():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    with pytest.raises(ValueError, match="the tokenizer of some/model has neither a pad token nor an EOS token"):
        giva.finetune.ensure_pad_token(tokenizer, where="some/model")


def test_a_readme_in_the_output_folder_is_updated_not_replaced(model_dir, data_csv, tmp_path):
    """PEFT's in-place save updates an existing model card; the atomic save must do the same."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("# my project notes\nimportant text\n")
    (out / "notes.txt").write_text("kept\n")
    assert main(args(model_dir, data_csv, out)) == 0
    card = (out / "README.md").read_text()
    assert "important text" in card and "library_name: peft" in card and "- PEFT " in card
    assert (out / "notes.txt").read_text() == "kept\n"


def test_a_rerun_into_the_same_folder_drops_the_earlier_runs_tokenizer_files(model_dir, decoder_dir, data_csv, tmp_path):
    """A Llama-style run, then a BERT run into the same folder: the folder is what a fresh BERT run writes (plus the
    user's own file), and the reloaded tokenizer is BERT's, without the decoder's chat template."""
    fresh, out = tmp_path / "fresh", tmp_path / "out"
    assert main(args(model_dir, data_csv, fresh)) == 0
    assert main([*args(decoder_dir, data_csv, out), "--target-modules", "q_proj,v_proj"]) == 0
    assert (out / "chat_template.jinja").is_file()
    (out / "notes.txt").write_text("mine\n")
    (out / "tokenizer_notes.md").write_text("mine too\n")  # side files are known by name, not by a prefix
    assert main(args(model_dir, data_csv, out)) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in fresh.iterdir()), "notes.txt",
                                                             "tokenizer_notes.md"])
    tokenizer = load_finetuned(out)[1]
    assert tokenizer.chat_template is None
    assert tokenizer("good film")["input_ids"] == load_finetuned(fresh)[1]("good film")["input_ids"]


def test_the_reloaded_tokenizer_truncates_at_the_training_max_length(model_dir, data_csv, tmp_path):
    out = tmp_path / "out"
    assert main([*args(model_dir, data_csv, out), "--max-length", "8"]) == 0
    tokenizer = load_finetuned(out)[1]
    assert tokenizer.model_max_length == 8
    assert len(tokenizer(" ".join(["good film"] * 20), truncation=True)["input_ids"]) == 8


def test_a_relative_model_folder_is_recorded_as_an_absolute_path(model_dir, data_csv, tmp_path, monkeypatch):
    """The adapter records its base model; a path relative to the training cwd would not reload from elsewhere."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(model_dir.parent)
    out = tmp_path / "out"
    assert main(args(model_dir.name, data_csv, out)) == 0
    recorded = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == os.path.abspath(model_dir)
    monkeypatch.chdir(tmp_path)
    model, tokenizer = load_finetuned(out)
    with torch.no_grad():
        assert torch.isfinite(model(**tokenizer(["good film"], return_tensors="pt")).logits).all()


def test_init_mode_reaches_initialize_and_is_recorded(model_dir, data_csv, tmp_path, capsys):
    for mode, used, passes in (("sketch", "sketch", 3), ("exact", "exact", 1), ("auto", "exact", 1)):  # auto: tiny -> exact
        assert main([*args(model_dir, data_csv, tmp_path / mode), "--init-mode", mode, "--json"]) == 0
        captured = capsys.readouterr()
        config = json.loads(captured.out)["config"]  # --json: stdout is the JSON alone, the summary on stderr
        assert (config["init_mode"], config["init_mode_used"], config["init_passes"]) == (mode, used, passes)
        assert f"mode {used})" in captured.err
        assert json.loads((tmp_path / mode / "adapter_config.json").read_text())["bases_info"]["mode"] == used
    with pytest.raises(ValueError, match=r"init_mode must be one of \['auto', 'sketch', 'exact'\], got 'fast'"):
        giva.finetune.finetune(model=str(model_dir), data=str(data_csv), init_mode="fast", output_dir=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_bases_dtype_reaches_the_config_and_the_saved_bases(model_dir, data_csv, tmp_path, capsys):
    from safetensors.torch import load_file

    for dtype, torch_dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        assert main([*args(model_dir, data_csv, tmp_path / dtype), "--bases-dtype", dtype]) == 0
        assert json.loads((tmp_path / dtype / "adapter_config.json").read_text())["bases_dtype"] == dtype
        bases = [t for name, t in load_file(tmp_path / dtype / "adapter_model.safetensors").items() if "giva_A" in name]
        assert bases and all(t.dtype == torch_dtype for t in bases)
    capsys.readouterr()
    assert main([*args(model_dir, data_csv, tmp_path / "f16"), "--bases-dtype", "float16"]) == 2
    assert "argument --bases-dtype: invalid choice: 'float16'" in one_error_line(capsys)
    assert not (tmp_path / "f16").exists()


def test_a_max_length_beyond_the_models_positions_is_refused_before_it_loads(model_dir, data_csv, tmp_path, capsys,
                                                                             monkeypatch):
    """tiny_bert takes 64 positions: --max-length 128 would crash in the embeddings once a row is long enough."""
    def loaded(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(giva.finetune.AutoModelForSequenceClassification, "from_pretrained", loaded)
    out = tmp_path / "out"
    assert main([*args(model_dir, data_csv, out), "--max-length", "128"]) == 2
    assert re.search(r"max_length=128 tokens exceeds the 64 positions the model in .* takes .*; set --max-length 64 or "
                     r"less$", one_error_line(capsys))
    assert not out.exists()


@pytest.fixture
def no_model_loading(monkeypatch):
    """Validation must fail before any model or tokenizer is loaded."""

    def loaded(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(giva.finetune.AutoModelForSequenceClassification, "from_pretrained", loaded)
    monkeypatch.setattr(giva.finetune.AutoTokenizer, "from_pretrained", loaded)


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("giva finetune: error: ")
    return lines[0]


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--lr", "nan", "argument --lr: must be a finite number"),
        ("--lr", "inf", "argument --lr: must be a finite number"),
        ("--lr", "0", "argument --lr: must be > 0"),
        ("--lr", "-1", "argument --lr: must be > 0"),
        ("--lr", "abc", "argument --lr: expected a number"),
        ("--head-lr", "nan", "argument --head-lr: must be a finite number"),
        ("--head-lr", "-0.1", "argument --head-lr: must be > 0"),
        ("--epochs", "0", "argument --epochs: must be > 0"),
        ("--epochs", "inf", "argument --epochs: must be a finite number"),
        ("--batch-size", "0", "argument --batch-size: must be >= 1"),
        ("--batch-size", "2.5", "argument --batch-size: expected a whole number"),
        ("--max-length", "2", "argument --max-length: must be >= 3"),
        ("--r", "0", "argument --r: must be >= 1"),
        ("--num-batches", "0", "argument --num-batches: expected a whole number >= 1 or 'all', got '0'"),
        ("--num-batches", "most", "argument --num-batches: expected a whole number >= 1 or 'all', got 'most'"),
        ("--dropout", "1", r"argument --dropout: must be in \[0, 1\)"),
        ("--dropout", "nan", "argument --dropout: must be a finite number"),
        ("--test-size", "0", "argument --test-size: expected a row count >= 1 or a fraction"),
        ("--test-size", "1.5", "argument --test-size: expected a row count >= 1 or a fraction"),
        ("--val-size", "-1", "argument --val-size: expected a row count >= 1 or a fraction"),
        ("--max-train-samples", "0", "argument --max-train-samples: must be >= 1"),
        ("--seed", "-1", "argument --seed: must be >= 0"),
        ("--variant", "nope", "argument --variant: invalid choice"),
        ("--init-mode", "fast", r"argument --init-mode: invalid choice: 'fast' \(choose from 'auto', 'sketch', 'exact'\)"),
        ("--label-column", "text", "--text-column and --label-column are both 'text'"),
        ("--target-modules", "query,,value", "--target-modules has an empty name"),
        ("--target-modules", "qeury,value", r"GivaConfig.target_modules names module\(s\) \['qeury'\] that match no module "
                                            r"of this model .*; its linear layers are named classifier, dense, key, query, value$"),
        ("--target-modules", "query,pooler", r"GivaConfig.target_modules matches 'bert.pooler', a transformers.models.bert."
                                             r"modeling_bert.BertPooler, which GiVA cannot adapt: it adapts linear layers "
                                             r".*; this model's linear layers are named classifier, dense, key, query, value$"),
        ("--target-modules", "word_embeddings", r"matches 'bert.embeddings.word_embeddings', a torch.nn.modules.sparse."
                                                r"Embedding, which GiVA cannot adapt"),
        ("--num-batches", "9", "num_batches=9 calibration batches, but the 32 training rows make only 4 batch"),
        ("--test-size", "40", r"test_size \(40 rows\) \+ val_size \(4 rows\) leave no training rows out of the 40"),
        ("--text-column", "sentence", r"reviews.csv: no column 'sentence'; the columns are \['label', 'text'\]"),
    ],
)
def test_bad_options_get_one_line_before_the_model_loads(
    model_dir, data_csv, tmp_path, capsys, no_model_loading, option, value, message
):
    assert main([*args(model_dir, data_csv, tmp_path / "out"), option, value]) == 2
    assert re.search(message, one_error_line(capsys))
    assert not (tmp_path / "out").exists()


def test_bad_paths_get_one_line_before_the_model_loads(model_dir, data_csv, tmp_path, capsys, no_model_loading, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    cases = [
        (args(model_dir, data_csv, tmp_path / "a-file"), "output_dir .*a-file' is a file"),
        (args(model_dir, data_csv, tmp_path / "a-file" / "out"), "output_dir .* cannot be created: .*a-file' is a file"),
        (args(tmp_path / "no-model", data_csv, tmp_path / "out"), "model .*no-model': no such folder"),
        (args("./no/such/model", data_csv, tmp_path / "out"), "model './no/such/model': no such folder"),
        (args(tmp_path, data_csv, tmp_path / "out"), "model folder .* has no config.json"),
        (args(model_dir, tmp_path / "train", tmp_path / "out"), "data file .*train' does not exist"),
        (args(model_dir, "./data/train.jsonl", tmp_path / "out"), "data file 'data/train.jsonl' does not exist"),
        ([*args(model_dir, "pang-lee", tmp_path / "out"), "--label-column", "y"],
         "data 'pang-lee' is a bundled corpus with fixed columns; .* got 'text' / 'y': leave them unset"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        line = one_error_line(capsys)
        assert re.search(message, line), line


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "a", "label": 1}\n{"text": "b", "label": 1.0}\n{"text": "c", "label": null}\n', r"d.jsonl:3: the label is missing"),
        ('{"text": "a", "label": 1}\n{"text": "b", "label": "x"}\n', r"d.jsonl:2: label 'x' is a name but"),
        ('{"text": "a", "label": 1}\n{"text": "b", "label": 0\n', r"d.jsonl:2: not valid JSON"),
    ],
)
def test_bad_data_gets_one_line_naming_file_and_line(model_dir, tmp_path, capsys, no_model_loading, content, message):
    (tmp_path / "d.jsonl").write_text(content)
    assert main(args(model_dir, tmp_path / "d.jsonl", tmp_path / "out")) == 2
    assert re.search(message, one_error_line(capsys))


def test_a_hub_id_offline_fails_at_once(data_csv, tmp_path, capsys, no_model_loading, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert main(args("some-org/some-model", data_csv, tmp_path / "out")) == 2
    assert time.perf_counter() - start < 3
    assert "HF_HUB_OFFLINE is set" in one_error_line(capsys)


def test_a_diverging_run_stops_and_saves_nothing(model_dir, data_csv, tmp_path, capsys):
    assert main(args(model_dir, data_csv, tmp_path / "out", "--lr", "1e30")) == 2
    assert "the training loss is nan" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_an_unwritable_output_parent_is_reported_before_loading(model_dir, data_csv, tmp_path, capsys, no_model_loading, monkeypatch):
    def refused(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(giva.finetune.tempfile, "mkdtemp", refused)  # root may write anywhere; a refusal stands in
    assert main(args(model_dir, data_csv, tmp_path / "out")) == 2
    assert re.search(r"output_dir .*out': cannot write in .* \(Permission denied\)", one_error_line(capsys))


def test_a_cached_hub_model_is_used_from_the_cache_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--some-org--some-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--some-org--some-model" / "refs").mkdir()
    (tmp_path / "hub" / "models--some-org--some-model" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("some-org/some-model") == str(snapshot)


def test_federated_dtype_options_reach_the_config_and_bad_ones_fail_before_any_work(monkeypatch, capsys):
    pytest.importorskip("flwr")
    import giva.federated.run as federated_run

    seen = {}

    def fake_run_comparison(config, output_dir, methods, **kwargs):
        seen["config"], seen["lrs"] = config, kwargs.get("lrs")
        return {"table": ""}

    monkeypatch.setattr(federated_run, "run_comparison", fake_run_comparison)
    assert main(["federated", "--bases-dtype", "bfloat16", "--sketch-dtype", "float32"]) == 0
    assert (seen["config"].bases_dtype, seen["config"].sketch_dtype) == ("bfloat16", "float32")
    assert main(["federated"]) == 0  # unset: FederatedConfig's own defaults
    assert (seen["config"].bases_dtype, seen["config"].sketch_dtype) == ("float32", "bfloat16")

    assert seen["lrs"] == {}
    assert main(["federated", "--method", "all", "--lr-giva", "0.02", "--lr-lora", "1e-3"]) == 0
    assert seen["lrs"] == {"giva": 0.02, "lora": 0.001} and seen["config"].lr is None

    seen.clear()
    assert main(["federated", "--bases-dtype", "float16"]) == 2
    assert "bases_dtype" in capsys.readouterr().err and not seen
    assert main(["federated", "--lr-vera", "-1"]) == 2
    assert "--lr-vera" in capsys.readouterr().err and not seen


HEAVY = ("torch", "peft", "transformers")


def checkout_env() -> dict[str, str]:
    """The environment of a fresh interpreter that imports giva from this checkout."""
    src = str(Path(giva.finetune.__file__).parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def python_c(code: str) -> str:
    """Run ``code`` in a fresh interpreter that imports giva from this checkout; its stdout."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=checkout_env()).stdout


def test_help_imports_neither_torch_nor_peft():
    """The ``giva`` console script (what `pip install` writes beside the interpreter) prints its help, and a
    command's, without importing torch, PEFT or transformers (``-X importtime`` lists every module imported)."""
    script = Path(sys.executable).with_name("giva")
    assert script.is_file(), f"{script}: the giva command is installed beside the interpreter (pip install -e .)"
    for argv in (["--help"], ["sft", "--help"]):
        done = subprocess.run([sys.executable, "-X", "importtime", str(script), *argv], capture_output=True, text=True,
                              check=True, env=checkout_env())
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
        assert "giva.cli" in imported and not imported & set(HEAVY), argv
    assert "--load-in-4bit" in done.stdout


@pytest.mark.parametrize("module", ["giva", "giva.cli"])
def test_python_dash_m_giva_is_the_command_and_its_help_stays_light(module):
    """``python -m giva`` (where the console script is not on PATH) runs the same command line; its help imports
    neither torch nor PEFT (it imported them all, 10 s here, before a line of help), and a command still loads them."""
    for argv in (["--help"], ["sft", "--help"]):
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", module, *argv], capture_output=True, text=True,
                              check=True, env=checkout_env())
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
        assert not imported & set(HEAVY), argv
    assert "--load-in-4bit" in done.stdout
    done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, check=True,
                          env=checkout_env())
    assert done.stdout.startswith(f"giva {giva.__version__} (torch ")


@pytest.mark.parametrize("imports", ["giva", "giva.cli, giva", "giva.cli"])
def test_any_import_but_the_commands_registers_giva_with_peft(imports):
    """Only the ``giva`` command defers loading; ``import giva.cli`` from Python left GiVA unregistered with PEFT
    (``PEFT_TYPE_TO_CONFIG_MAPPING`` had no 'GIVA', so a GiVA adapter did not load) until a command ran."""
    out = python_c(f"import {imports}, peft.mapping as m; print(m.PEFT_TYPE_TO_CONFIG_MAPPING['GIVA'].__name__)")
    assert out.strip() == "GivaConfig"


def test_cli_defaults_mirror_the_library():
    from giva import bench, cli
    from giva.bases import VARIANTS
    from giva.finetune import DEFAULT_TARGETS, TrainConfig
    from giva.serving import BASES_DTYPES

    assert cli.VARIANTS == VARIANTS and cli.DEFAULT_TARGETS == DEFAULT_TARGETS
    assert cli.DEFAULT_FINETUNE_LR == TrainConfig.lr
    assert set(cli.CODE_SUITES) == {bench.SCALE_SUITE, bench.SERVE_SUITE, bench.GPU_SUITE, bench.SKETCH_SUITE, bench.FINETUNE_SUITE, bench.QLORA_SUITE}
    assert cli.BASES_DTYPES == tuple(BASES_DTYPES)


def test_bench_help_lists_the_suites(capsys):
    from giva.cli import CODE_SUITES

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    suites = sorted(p.stem for p in (Path(__file__).parents[1] / "benchmarks" / "suites").glob("*.json"))
    assert suites and f"one of: {', '.join([*suites, *CODE_SUITES])}" in help_text
    # every suite, the built-in ones too, needs a checkout's benchmarks/ (the help once suggested they did not)
    assert "the benchmarks/ folder of a source checkout: run from inside one, or set GIVA_BENCH_DIR" in help_text


def test_sft_help_says_what_overwrite_replaces(capsys):
    """--overwrite also replaces an earlier LoRA export in --export-lora (docs/sft.md); the help named --output-dir only."""
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--overwrite replace an adapter already in --output-dir and an earlier LoRA export in --export-lora" in help_text


def test_a_folder_named_like_a_hub_id_is_recorded_as_the_hub_id(model_dir, tmp_path, monkeypatch):
    """`huggingface-cli download org/name --local-dir org/name` leaves a folder named like the id: the adapter should
    record the portable id, not this machine's absolute path; a plainly local name is made absolute."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(model_dir, tmp_path / "someorg" / "tiny-model")
    assert resolve_model("someorg/tiny-model") == "someorg/tiny-model"
    assert resolve_model("./someorg/tiny-model") == str(tmp_path / "someorg" / "tiny-model")
    shutil.copytree(model_dir, tmp_path / "tiny-model")
    assert resolve_model("tiny-model") == str(tmp_path / "tiny-model")


def test_a_command_prints_no_deprecation_notice_of_the_libraries_but_giva_s_own(monkeypatch, capsys, tmp_path):
    """PEFT's call of transformers' deprecated is_gradient_checkpointing printed a FutureWarning in the middle of every
    `giva finetune`; a command now leaves out the libraries' FutureWarning and DeprecationWarning, not giva's, and the
    filter ends with the command."""
    import warnings

    import giva.data

    def fetch(force=False):  # warnings attributed to a library module and to a giva module, as each would raise them
        for module in ("transformers.modeling_utils", "peft.peft_model", "giva.finetune"):
            exec(f"import warnings\nwarnings.warn('{module}', FutureWarning)\nwarnings.warn('{module}', DeprecationWarning)",
                 {"__name__": module})
        return tmp_path

    monkeypatch.setattr(giva.data, "fetch_corpora", fetch)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["fetch-data"]) == 0
        assert [(w.category, str(w.message)) for w in seen] == [(FutureWarning, "giva.finetune"),
                                                               (DeprecationWarning, "giva.finetune")]
        exec("import warnings\nwarnings.warn('after', FutureWarning)", {"__name__": "transformers.modeling_utils"})
        assert len(seen) == 3  # outside the command the library's notice shows again


@pytest.mark.real
def test_the_bundled_smollm2_tokenizer_loads_under_every_supported_transformers(tmp_path, monkeypatch):
    """The converted SmolLM2 folder (giva sft's default model) named its tokenizer class as transformers 5 writes it,
    TokenizersBackend, which transformers 4.x does not know: the default giva sft failed there. This runs under
    both (tests/transformers_min runs this file on 4.56.2); a copy converted before the fix is repaired in place."""
    import shutil

    from transformers import AutoTokenizer

    import giva.assets

    folder = Path(giva.assets.smollm2_path())
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chat = [{"role": "user", "content": "Review: great film\nIs this positive?"}, {"role": "assistant", "content": "positive"}]
    ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    assert (tokenizer.eos_token, len(tokenizer), ids[:8], sum(ids)) == (
        "<|im_end|>", 49152, [1, 9690, 198, 2683, 359, 253, 5356, 5646], 179143)
    old = tmp_path / "giva-models" / "smollm2-135m-instruct"  # an earlier conversion, in a cache of its own
    shutil.copytree(folder, old, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((old / "tokenizer_config.json").read_text())
    (old / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "TokenizersBackend"}))
    monkeypatch.setattr(giva.assets, "models_cache_dir", lambda: tmp_path / "giva-models")
    assert giva.assets.smollm2_path() == str(old)
    assert json.loads((old / "tokenizer_config.json").read_text()) == config
