"""`giva sft` end to end on a tiny random Llama with a tiny word-level tokenizer, and one line (exit 2) for bad input."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Optional

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import giva.cli
import giva.sft.checkpoints
import giva.sft.run
import giva.sft.tracking
from giva.checkpoint import is_side_file
from giva.cli import main
from giva.sft.run import SFTOptions, load_sft_adapter, make_trainer, preflight, train_sft
from tiny_models import QUANTISABLE, TRANSFORMERS_4, tiny_llama

cuda = pytest.mark.cuda  # skipped without a CUDA device (conftest.py); the device script runs -m cuda
# the GPU machine lacks TRL: the device script installs it from wheels it carries (benchmarks/gpu/run_on_device.sh)
def _trl_error() -> Optional[str]:
    """Why TRL's SFTTrainer cannot be imported (not installed, or a carried wheel that does not import there), or None."""
    if importlib.util.find_spec("trl") is None:
        return "TRL is not installed (pip install 'giva[sft]')"
    try:
        from trl import SFTTrainer  # noqa: F401
    except Exception as error:  # e.g. its datasets against another pyarrow: skipped, named, not five errors
        return f"TRL does not import here: {type(error).__name__}: {error}"
    return None


_TRL_ERROR = _trl_error()
needs_trl = pytest.mark.skipif(_TRL_ERROR is not None, reason=_TRL_ERROR or "")
ON_CUDA_TOO = ["cpu", pytest.param("cuda", marks=[cuda, needs_trl])]

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from launch import TORCHRUN, TorchrunFailed, run_launcher, run_torchrun  # noqa: E402

WORDS = "the film plot is good great bad awful . review positive or negative ? answer one word".split()
SPECIAL = ["<pad>", "<eos>", "<unk>", "<system>", "<user>", "<assistant>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + ' <eos> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
)


def tiny_tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIAL + WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _saved(tmp_path_factory, name: str, model, chat: bool) -> Path:
    """``model`` and the tiny tokenizer saved in a fresh folder, as a --model folder."""
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    tiny_tokenizer(chat=chat).save_pretrained(folder)
    return folder


def _llama(**kwargs):
    model = tiny_llama(**kwargs)
    model.config.max_position_embeddings = 256  # rotary positions: the default --max-length 256 fits
    return model


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return _saved(tmp_path_factory, "tiny-llama-chat", _llama(**QUANTISABLE), chat=True)  # also loaded in 4-bit


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    return _saved(tmp_path_factory, "tiny-llama-plain", _llama(), chat=False)


@pytest.fixture(scope="module")
def gpt2_model(tmp_path_factory):
    """A tiny GPT-2 (Conv1D layers, 64 learned positions) with the plain tokenizer."""
    from tiny_models import tiny_gpt2

    return _saved(tmp_path_factory, "tiny-gpt2", tiny_gpt2(), chat=False)


def review(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(["positive", "negative"])
    words = "good great" if label == "positive" else "bad awful"
    return f"the film is {words} . positive or negative ?", label


@pytest.fixture
def pc_jsonl(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "pc.jsonl"
    rows = [review(rng) for _ in range(40)]  # plain-text rows are joined as they are: the completion brings its space
    path.write_text("".join(json.dumps({"prompt": prompt, "completion": " " + label}) + "\n" for prompt, label in rows))
    return path


@pytest.fixture
def messages_jsonl(tmp_path):
    rng = random.Random(1)
    rows = []
    for _ in range(40):
        prompt, label = review(rng)
        rows.append({"messages": [{"role": "system", "content": "answer one word"}, {"role": "user", "content": prompt},
                                  {"role": "assistant", "content": label}]})
    path = tmp_path / "messages.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def options(model, data, out, **extra) -> SFTOptions:
    settings = dict(model=str(model), data=str(data), output_dir=str(out), val_size=8, max_steps=4, batch_size=4, r=2,
                    progress=False, device="cpu")
    return SFTOptions(**{**settings, **extra})


def cli(model, data, out, *extra) -> list[str]:
    return ["sft", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--val-size", "8",
            "--max-steps", "4", "--batch-size", "4", "--r", "2", "--device", "cpu", "--no-progress", *extra]


@pytest.mark.parametrize("on", [False, True])
def test_gradient_checkpointing_reaches_the_trainer_under_the_installed_transformers_name(tmp_path, on):
    """--gradient-checkpointing sets TrainingArguments' activation_checkpointing (newer 5.x) or, on 4.x and older 5.x,
    gradient_checkpointing (4.x's SFTConfig refused the new name with a TypeError); TRL's default of on is overridden."""
    from dataclasses import fields

    from trl import SFTConfig

    config = giva.sft.run.sft_config(options("m", "d", tmp_path / "out", gradient_checkpointing=on), "cpu",
                                 str(tmp_path / "scratch"))
    # the rename came within 5.x (5.17, the GPU machine's, still has the old name): the field the installed one has
    renamed = "activation_checkpointing" in {f.name for f in fields(SFTConfig)}
    assert not (TRANSFORMERS_4 and renamed)
    assert getattr(config, "activation_checkpointing" if renamed else "gradient_checkpointing") is on


def test_torch_compile_trains_a_compiled_model_to_the_eager_runs_adapter(chat_model, pc_jsonl, tmp_path, monkeypatch):
    """--torch-compile: the Trainer's step runs a torch.compile'd model (dynamo captures graphs; none without the flag)
    and the adapter it trains is the eager run's to float rounding (inductor fuses the element-wise maths; Adam turns a
    rounding difference in a gradient near 0 into a step of up to 1e-5 in its vector, of values near 2e-2 here).
    The eager run comes second: transformers 4.x's TrainingArguments left ACCELERATE_DYNAMO_BACKEND=inductor in
    os.environ, and every later Trainer of the process (and every process it started) compiled its model too."""
    from torch._dynamo.utils import counters

    argv = []
    parse = giva.cli._sft
    monkeypatch.setattr(giva.cli, "_sft", lambda args: argv.append(args.torch_compile) or parse(args))
    before = os.environ.get("ACCELERATE_DYNAMO_BACKEND")
    runs = {}
    for compiled in (True, False):
        counters.clear()
        out = tmp_path / f"compiled-{compiled}"
        assert main(cli(chat_model, pc_jsonl, out, *(["--torch-compile"] if compiled else []))) == 0
        runs[compiled] = (json.loads((out / "sft_result.json").read_text()), load_file(out / "adapter_model.safetensors"),
                          counters["stats"]["unique_graphs"])
        assert os.environ.get("ACCELERATE_DYNAMO_BACKEND") == before
    assert argv == [True, False]
    (eager, eager_tensors, eager_graphs), (compiled, compiled_tensors, graphs) = runs[False], runs[True]
    assert eager_graphs == 0 and graphs > 0  # the compiled model ran the steps
    assert compiled["options"]["torch_compile"] is True and eager["options"]["torch_compile"] is False
    assert compiled["val_loss_before"] == eager["val_loss_before"] != compiled["val_loss_after"]  # eager; trained
    assert math.isclose(compiled["train_loss"], eager["train_loss"], rel_tol=1e-5)
    assert math.isclose(compiled["val_loss_after"], eager["val_loss_after"], rel_tol=1e-5)
    assert eager_tensors.keys() == compiled_tensors.keys() and eager_tensors
    for name, tensor in eager_tensors.items():
        torch.testing.assert_close(compiled_tensors[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_sft_trains_reports_and_saves_an_adapter_that_reloads_bit_identically(chat_model, pc_jsonl, tmp_path):
    out = tmp_path / "out"
    result, model, tokenizer = train_sft(options(chat_model, pc_jsonl, out, export_lora=str(tmp_path / "lora")))
    assert result.steps == 4 and (result.train_rows, result.validation_rows) == (32, 8)
    assert all(map(torch.isfinite, torch.tensor([result.val_loss_before, result.val_loss_after])))
    assert result.val_loss_after != result.val_loss_before  # training moved the model
    assert result.exact_match_before is not None and 0 <= result.exact_match_after <= 1  # one-word labels: scored
    assert result.trainable_parameters > 0 and result.adapter_bytes > 0
    saved = json.loads((out / "sft_result.json").read_text())
    assert saved["val_loss_after"] == result.val_loss_after and saved["options"]["r"] == 2
    assert saved["lora_dir"] == result.lora_dir == str(tmp_path / "lora") and saved["adapter_bytes"] > 0
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # the run's tokenizer, chat template included, beside the LoRA, as giva export-lora copies it from --output-dir
    # (it wrote the LoRA without them)
    assert main(["export-lora", str(out), str(tmp_path / "lora-again")]) == 0
    carried = sorted(p.name for p in (tmp_path / "lora-again").iterdir() if is_side_file(p.name))
    assert "tokenizer_config.json" in carried and sorted(p.name for p in (tmp_path / "lora").iterdir() if is_side_file(p.name)) == carried
    assert all((tmp_path / "lora" / name).read_bytes() == (out / name).read_bytes() for name in carried)
    assert "AutoTokenizer.from_pretrained" in (tmp_path / "lora" / "README.md").read_text()

    reloaded, _ = load_sft_adapter(str(out))
    batch = tokenizer(["the film is good . positive or negative ?"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)
        with model.disable_adapter():  # the adapter changed the model: the check above compares trained weights
            assert not torch.equal(model(**batch).logits, reloaded(**batch).logits)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp folders left


def test_the_training_loss_reported_is_the_mean_over_the_steps(chat_model, pc_jsonl, tmp_path, monkeypatch):
    """train_loss is the Trainer's training_loss, the mean of the per-step losses (4 steps, each one logged); the
    summary called it the final training loss, which differs."""
    trainers = []
    build = giva.sft.run.make_trainer
    monkeypatch.setattr(giva.sft.run, "make_trainer", lambda *a, **k: trainers.append(build(*a, **k)) or trainers[-1])
    result, _, _ = train_sft(options(chat_model, pc_jsonl, tmp_path / "out", lr=5e-2))
    losses = [entry["loss"] for entry in trainers[0].state.log_history if "loss" in entry]
    # transformers 4.x's Trainer logs each loss rounded to 4 decimals (its training_loss is not rounded)
    mean = pytest.approx(sum(losses) / 4, abs=5e-5) if TRANSFORMERS_4 else pytest.approx(sum(losses) / 4, rel=1e-6)
    assert len(losses) == result.steps == 4 and result.train_loss == mean
    assert abs(losses[-1] - result.train_loss) > 1e-3  # the final step's loss is another number
    assert f"(mean training loss {result.train_loss:.4f})" in result.summary() and "final" not in result.summary()


def test_a_bf16_run_reloads_bit_identically_through_the_same_forward(chat_model, pc_jsonl, tmp_path):
    """With --bf16 the model train_sft returns still runs its forward under the Trainer's bf16 autocast (Accelerate
    wrapped it), a bf16 reload without. The saved tensors are the trained ones, and the reload matches the trained
    model bit for bit: plain, under the same autocast, and with Accelerate's wrapper removed. (Before GiVA formed
    its factor outside autocast, the plain comparison differed by up to 0.0039 here, from autocast, not the save.)"""
    from accelerate.utils import extract_model_from_parallel
    from peft import get_peft_model_state_dict

    out = tmp_path / "out"
    before = os.environ.get("ACCELERATE_MIXED_PRECISION")
    _, model, tokenizer = train_sft(options(chat_model, pc_jsonl, out, bf16=True, lr=5e-2))
    # transformers 4.x wrote "bf16" there for the rest of the process: a later fp32 run would autocast to bf16
    assert os.environ.get("ACCELERATE_MIXED_PRECISION") == before
    saved, trained = adapter_tensors(out), get_peft_model_state_dict(model)
    assert saved.keys() == trained.keys()
    assert all(saved[k].dtype == trained[k].dtype and torch.equal(saved[k], trained[k]) for k in saved)
    reloaded, _ = load_sft_adapter(str(out), dtype=torch.bfloat16)
    batch = tokenizer(["the film is good . positive or negative ?"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        wrapped, plain = model(**batch).logits, reloaded(**batch).logits
        assert torch.equal(wrapped, plain.float())  # GiVA's maths no longer depend on the wrapper's autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(reloaded(**batch).logits.float(), wrapped)
        assert torch.equal(extract_model_from_parallel(model, keep_fp32_wrapper=False)(**batch).logits, plain)


def labelled_text(trainer, tokenizer, row: int) -> tuple[str, int]:
    """The text of the tokens that carry a label, and how many prompt tokens come first (all must be -100)."""
    example = trainer.train_dataset[row]
    labels, ids = example["labels"], example["input_ids"]
    first = next(i for i, label in enumerate(labels) if label != -100)
    assert all(label == -100 for label in labels[:first])
    assert labels[first:] == ids[first:]
    return tokenizer.decode(ids[first:]), first


@pytest.mark.parametrize("model_name, data_name, expected_prompt",
                         [("chat_model", "pc_jsonl", "<user> {p} <eos> <assistant>"),
                          ("plain_model", "pc_jsonl", "{p}"),
                          ("chat_model", "messages_jsonl", "<system> answer one word <eos> <user> {p} <eos> <assistant>")])
def test_only_the_completion_carries_labels(model_name, data_name, expected_prompt, request, tmp_path):
    model, data = request.getfixturevalue(model_name), request.getfixturevalue(data_name)
    opts = options(model, data, tmp_path / "out")
    device, path, tokenizer, sft_data = preflight(opts)
    trainer = make_trainer(opts, device, path, tokenizer, sft_data, str(tmp_path / "scratch"))
    for row in range(len(sft_data.train)):
        text, prompt_len = labelled_text(trainer, tokenizer, row)
        source = sft_data.train[row]
        completion = source["completion"] if isinstance(source["completion"], str) else source["completion"][0]["content"]
        assert text.split() == [completion.strip(), "<eos>"]
        prompt = source["prompt"] if isinstance(source["prompt"], str) else source["prompt"][-1]["content"]
        tokens = tokenizer.convert_ids_to_tokens(trainer.train_dataset[row]["input_ids"][:prompt_len])
        assert tokens == expected_prompt.format(p=prompt).split()


def conversations_jsonl(path: Path, n: int) -> Path:
    """``n`` chats, conversation i with i % 3 + 1 assistant replies ("good i.k" for reply k), the first after a system
    message: each reply is a word the tiny tokenizer knows, tagged by where it stands."""
    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": "answer one word"}]
        for k in range(i % 3 + 1):
            messages += [{"role": "user", "content": f"the film is good . {i} {k}"},
                         {"role": "assistant", "content": f"good {i} {k}"}]
        rows.append({"messages": messages})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_every_assistant_reply_of_a_conversation_is_trained_with_its_own_context(tmp_path):
    """A chat of n assistant replies gives n rows, reply k's prompt the conversation before it (only the last reply
    was trained on before); the split and --max-train-samples count conversations, so none has turns on both sides."""
    from giva.sft.data import load_sft_data

    data = load_sft_data(str(conversations_jsonl(tmp_path / "chats.jsonl", 30)), 6, 0, max_train_samples=20, chat=True)
    sides = {}
    for split, rows in (("train", data.train), ("validation", data.validation)):
        for row in rows:
            _, i, k = row["completion"][0]["content"].split()
            assert row["prompt"][-1] == {"role": "user", "content": f"the film is good . {i} {k}"}
            assert len(row["prompt"]) == 2 * int(k) + 2  # the system message, then every turn before this reply
            assert [m["content"] for m in row["prompt"][2::2]] == [f"good {i} {j}" for j in range(int(k))]
            sides.setdefault(i, set()).add(split)
    assert all(len(split) == 1 for split in sides.values())  # each conversation on one side
    assert sorted(i for i, split in sides.items() if split == {"validation"}).__len__() == 6
    assert sum(split == {"train"} for split in sides.values()) == 20
    conversations = {int(i) for i, split in sides.items() if split == {"train"}}
    assert len(data.train) == sum(i % 3 + 1 for i in conversations)  # every reply of every training conversation
    assert "(assistant turn 2 of 3)" in " ".join(data.train_where + data.validation_where)


def test_each_reply_of_a_conversation_carries_the_labels_of_its_row(chat_model, tmp_path):
    """Through TRL: every row's unlabelled tokens are its own prefix of the conversation with the generation prompt,
    its labelled ones the reply and <eos>; the conversations gave more rows than there are conversations."""
    opts = options(chat_model, conversations_jsonl(tmp_path / "chats.jsonl", 12), tmp_path / "out", val_size=3)
    device, path, tokenizer, sft_data = preflight(opts)
    trainer = make_trainer(opts, device, path, tokenizer, sft_data, str(tmp_path / "scratch"))
    assert len(trainer.train_dataset) == len(sft_data.train) > 9  # 9 training conversations
    for row, source in enumerate(sft_data.train):
        text, prompt_len = labelled_text(trainer, tokenizer, row)
        assert text.split() == [*tokenizer.tokenize(source["completion"][0]["content"]), "<eos>"]
        prompt = tokenizer.apply_chat_template(source["prompt"], add_generation_prompt=True, tokenize=False)
        assert trainer.train_dataset[row]["input_ids"][:prompt_len] == tokenizer(prompt, add_special_tokens=False)["input_ids"]


@pytest.fixture
def text_jsonl(tmp_path):
    rng = random.Random(2)
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(review(rng))}) + "\n" for _ in range(40)))
    return path


def test_text_rows_put_the_loss_on_every_token_without_a_chat_template(chat_model, text_jsonl, tmp_path):
    """TRL's language-modelling rows: the text as it is (no chat template, though the tokenizer has one) and its EOS,
    every token labelled; no exact match (no completion to match)."""
    opts = options(chat_model, text_jsonl, tmp_path / "out")
    device, path, tokenizer, sft_data = preflight(opts)
    assert sft_data.labels is None and all(set(row) == {"text"} for row in sft_data.train + sft_data.validation)
    trainer = make_trainer(opts, device, path, tokenizer, sft_data, str(tmp_path / "scratch"))
    for row, source in enumerate(sft_data.train):
        example = trainer.train_dataset[row]
        assert example["labels"] == example["input_ids"]
        assert tokenizer.convert_ids_to_tokens(example["input_ids"]) == [*source["text"].split(), "<eos>"]


def test_sft_trains_on_text_rows_and_reports_the_loss_over_every_token(chat_model, text_jsonl, tmp_path):
    result, _, _ = train_sft(options(chat_model, text_jsonl, tmp_path / "out", max_steps=2))
    assert result.exact_match_before is None and result.exact_match_after is None
    assert result.loss_tokens == "every token" and "(every token)" in result.summary()
    assert math.isfinite(result.val_loss_after) and result.steps == 2
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("think", [False, True])
@pytest.mark.parametrize("stops", [True, False])
def test_exact_match_scores_a_model_that_writes_its_trained_completion(chat_model, pc_jsonl, tmp_path, monkeypatch,
                                                                       think, stops):
    """A model whose greedy answer is the completion it was trained on scores 1, one that goes on after it 0. With a
    template that adds to the reply (Qwen3's empty think block, non-special tokens before the answer) the reference
    was the raw answer and the budget too short for the block: 0 for a perfect model."""
    model = chat_model
    if think:
        model = tmp_path / "think-model"
        shutil.copytree(chat_model, model)
        tokenizer = tiny_tokenizer(chat=True)
        tokenizer.add_tokens(["<think>", "</think>"])
        tokenizer.chat_template = CHAT_TEMPLATE.replace(
            "'> ' + m['content']", "'> ' + ('<think> </think> ' if m['role'] == 'assistant' else '') + m['content']")
        tokenizer.save_pretrained(model)
    build = giva.sft.run.make_trainer
    completions = []

    def with_oracle(*args, **kwargs):  # greedy answers: the labelled tokens TRL built for the prompt
        trainer = build(*args, **kwargs)
        prompts = giva.sft.run.prompt_ids(trainer.eval_dataset)
        gold = [ids[len(prompt):] for ids, prompt in zip(trainer.eval_dataset["input_ids"], prompts)]
        completions.extend(gold)
        word = trainer.processing_class.convert_tokens_to_ids("good")

        def generate(input_ids, attention_mask, max_new_tokens, pad_token_id, **kwargs):
            rows = []
            for row, mask in zip(input_ids.tolist(), attention_mask.tolist()):
                answer = gold[prompts.index([t for t, m in zip(row, mask) if m])]
                answer = (answer if stops else answer[:-1] + [word])[:max_new_tokens]  # the end token, or a word
                rows.append(row + answer + [pad_token_id] * (max_new_tokens - len(answer)))
            return torch.tensor(rows)

        trainer.model.generate = generate
        return trainer

    monkeypatch.setattr(giva.sft.run, "make_trainer", with_oracle)
    result, _, tokenizer = train_sft(options(model, pc_jsonl, tmp_path / "out", max_steps=1))
    assert tokenizer.decode(completions[0]).startswith("<think> </think> ") == think
    assert result.exact_match_before == result.exact_match_after == (1.0 if stops else 0.0)


def test_the_cli_prints_the_summary_and_json(chat_model, messages_jsonl, tmp_path, capsys):
    """With --json stdout is the one JSON document: the summary and the Trainer's log dicts (progress on, they were
    printed to stdout) go to stderr."""
    argv = [a for a in cli(chat_model, messages_jsonl, tmp_path / "out", "--json") if a != "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert "validation loss" in captured.err and "exact match" in captured.err and "'loss':" in captured.err
    assert record["steps"] == 4 and record["data"] == str(messages_jsonl)
    assert main(cli(chat_model, messages_jsonl, tmp_path / "out2")) == 0
    assert "validation loss" in capsys.readouterr().out  # without --json the summary is the output
    assert main(cli(chat_model, messages_jsonl, tmp_path / "out", "--overwrite")) == 0  # replaces its own adapter


@pytest.mark.parametrize("extra", [[], ["--eval-steps", "1"]], ids=["plain", "eval-steps"])
def test_a_diverging_run_stops_and_saves_nothing(chat_model, pc_jsonl, tmp_path, capsys, extra):
    """--lr 1e30: the Trainer logged each NaN loss as the mean of the earlier ones (logging_nan_inf_filter), so the
    run exited 0 with a finite mean training loss and saved NaN vectors. It stops as giva finetune does, and the
    checkpoints written before hold finite vectors. With --eval-steps 1 too: the periodic validation's log call
    dropped each step's training-loss log, and the run exited 0 with NaN checkpoints."""
    out = tmp_path / "out"
    assert main(cli(chat_model, pc_jsonl, out, "--lr", "1e30", "--save-steps", "1", "--export-lora", str(tmp_path / "lora"),
                    *extra)) == 2
    error = re.fullmatch(r"giva sft: error: the training loss is (nan|inf) at step (\d+); nothing was saved\. Try a "
                         r"smaller learning rate \(--lr 1e\+30\)", one_error_line(capsys))
    assert error is not None
    assert not out.exists() and not (tmp_path / "lora").exists()
    checkpoints = sorted((tmp_path / "out-checkpoints").glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    # every step before the non-finite loss saved one, and each holds finite vectors (none saved, nothing was checked)
    assert [path.name for path in checkpoints] == [f"checkpoint-{step}" for step in range(1, int(error.group(2)))] != []
    for checkpoint in checkpoints:
        assert all(torch.isfinite(t).all() for t in adapter_tensors(checkpoint).values()), checkpoint.name


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_giva_merge_writes_a_plain_model_that_gives_the_adapters_outputs(chat_model, pc_jsonl, tmp_path, capsys, dtype):
    """giva sft, then giva merge: a transformers folder with the tokenizer, no adapter files, that AutoModelForCausalLM
    loads alone and that gives the adapted model's logits (fp32: 1e-5; bf16 weights: bf16's rounding). An earlier
    merge is replaced only with --overwrite, and wholly (no shard of it left); other folders are refused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, merged = tmp_path / "out", tmp_path / "merged"
    train_sft(options(chat_model, pc_jsonl, out, max_steps=2))
    adapted, _ = load_sft_adapter(str(out))
    ids = torch.tensor([[3, 5, 7, 9, 11, 4]])
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
    assert main(["merge", str(out), str(merged), "--dtype", dtype]) == 0
    assert capsys.readouterr().out.startswith(f"merged model (LlamaForCausalLM, {'float32' if dtype == 'auto' else dtype})")
    assert not (merged / "adapter_config.json").exists() and (merged / "giva_merge.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(merged, dtype="auto").eval()
    assert model.dtype == (torch.float32 if dtype == "auto" else torch.bfloat16)
    with torch.no_grad():
        got = model(input_ids=ids).logits.float()
    atol = 1e-5 if dtype == "auto" else 2e-2
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)
    assert AutoTokenizer.from_pretrained(merged).chat_template == AutoTokenizer.from_pretrained(out).chat_template
    record = json.loads((merged / "giva_merge.json").read_text())
    assert (record["adapter"], record["tokenizer"]) == (str(out.absolute()), "adapter")

    (merged / "model-00002-of-00002.safetensors").write_bytes(b"stale")  # as an earlier, sharded merge would leave
    capsys.readouterr()
    assert main(["merge", str(out), str(merged)]) == 2
    assert capsys.readouterr().err.strip() == (f"giva merge: output folder {merged} holds an earlier merge; pass "
                                               "--overwrite to replace it, or give another folder")
    assert main(["merge", str(out), str(merged), "--overwrite"]) == 0
    assert not (merged / "model-00002-of-00002.safetensors").exists()
    for bad, message in ((out / "inside", "are the same folder or one holds the other"),
                         (tmp_path, "are the same folder or one holds the other"),
                         (chat_model, "is not empty and holds no earlier merge (giva_merge.json)"),
                         (pc_jsonl / "merged", f"cannot be created: {str(pc_jsonl)!r} is a file")):
        assert main(["merge", str(out), str(bad)]) == 2
        assert message in capsys.readouterr().err


def test_the_json_output_writes_a_non_finite_number_as_null(chat_model, pc_jsonl, tmp_path, capsys, monkeypatch):
    """A non-finite number in the result (a validation loss that overflowed) is null: json.dumps wrote NaN."""
    result = train_sft(options(chat_model, pc_jsonl, tmp_path / "out", max_steps=1))[0]
    monkeypatch.setattr(giva.sft.run, "run_sft", lambda options: replace(result, val_loss_after=float("nan"),
                                                                      train_loss=float("inf")))
    assert main(cli(chat_model, pc_jsonl, tmp_path / "out2", "--json")) == 0
    strict = {"parse_constant": lambda name: pytest.fail(f"{name} in the JSON")}
    record = json.loads(capsys.readouterr().out, **strict)  # stdout is the JSON alone
    assert record["val_loss_after"] is None and record["train_loss"] is None and record["steps"] == 1
    # The run's own sft_result.json as well (it was plain json.dumps: NaN). The Trainer's evaluation overflowing:
    monkeypatch.undo()
    monkeypatch.setattr(giva.sft.run, "validation_loss", lambda trainer, batch_size: float("nan"))
    train_sft(options(chat_model, pc_jsonl, tmp_path / "out3", max_steps=1))
    saved = json.loads((tmp_path / "out3" / "sft_result.json").read_text(), **strict)
    assert saved["val_loss_before"] is None and saved["val_loss_after"] is None


def test_every_sft_option_is_a_flag_that_reaches_the_run(chat_model, pc_jsonl, tmp_path, monkeypatch):
    """Each SFTOptions field is a `giva sft` flag of the same name (``progress``: --no-progress), and a flag given on
    the command line is in the options the run gets (a flag the parser took but _sft left out would be lost)."""
    from dataclasses import fields

    from giva.cli import build_parser

    sft_parser = build_parser()._subparsers._group_actions[0].choices["sft"]
    flags = {action.dest for action in sft_parser._actions}
    assert {f.name for f in fields(SFTOptions)} - {"progress"} <= flags
    seen = []

    class Seen(Exception):
        pass

    def run_sft(options):
        seen.append(options)
        raise Seen

    monkeypatch.setattr(giva.sft.run, "run_sft", run_sft)
    with pytest.raises(Seen):
        main(cli(chat_model, pc_jsonl, tmp_path / "out", "--packing", "--max-length", "64", "--gradient-checkpointing", "--keep-best",
                 "--attn-implementation", "eager", "--lr-scheduler", "cosine", "--warmup-ratio", "0.1", "--weight-decay",
                 "0.01", "--max-grad-norm", "0.5", "--dropout", "0.05", "--eval-steps", "3", "--eval-batch-size", "5",
                 "--report-to", "tensorboard", "--logging-steps", "2", "--logging-dir", str(tmp_path / "tb")))
    given = seen[0]
    assert (given.packing, given.max_length, given.gradient_checkpointing, given.attn_implementation, given.progress) == (
        True, 64, True, "eager", False)
    assert (given.lr_scheduler, given.warmup_ratio, given.weight_decay, given.max_grad_norm, given.dropout) == (
        "cosine", 0.1, 0.01, 0.5, 0.05)
    assert (given.eval_steps, given.eval_batch_size, given.report_to, given.logging_steps, given.logging_dir) == (
        3, 5, ["tensorboard"], 2, str(tmp_path / "tb"))
    assert given.keep_best is True


def test_the_training_recipe_flags_reach_the_trainer_and_the_adapter(chat_model, pc_jsonl, tmp_path):
    """--lr-scheduler, --warmup-ratio, --weight-decay, --max-grad-norm and --dropout: in the Trainer's arguments and
    the GiVA layers, and the learning rate of each of 8 steps is the cosine schedule's with 2 warm-up steps."""
    from transformers import get_scheduler

    pytest.importorskip("tensorboardX")
    recipe = dict(lr_scheduler="cosine", warmup_ratio=0.25, weight_decay=0.01, max_grad_norm=0.5, dropout=0.05,
                  max_steps=8)
    opts = options(chat_model, pc_jsonl, tmp_path / "out", **recipe)
    device, path, tokenizer, data = preflight(opts)
    trainer = make_trainer(opts, device, path, tokenizer, data, str(tmp_path / "scratch"))
    args = trainer.args
    assert (getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type), args.warmup_steps, args.weight_decay,
            args.max_grad_norm) == ("cosine", 2, 0.01, 0.5)
    dropouts = [m.giva_dropout["default"].p for m in trainer.model.modules() if hasattr(m, "giva_dropout")]
    assert dropouts and set(dropouts) == {0.05}
    train_sft(options(chat_model, pc_jsonl, tmp_path / "run", report_to="tensorboard", logging_steps=1, **recipe))
    logged = tensorboard_scalars(tmp_path / "run-logs")["train/learning_rate"]
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=opts.lr)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=8)
    expected = []
    for _ in range(8):  # the rate each step trained with (the Trainer logs it before the schedule moves on)
        expected.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert [step for step, _ in logged] == list(range(1, 9))
    assert [lr for _, lr in logged] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match=r"^SFTOptions.warmup_ratio must be a number in \[0, 1\), got 1.0$"):
        SFTOptions(warmup_ratio=1.0)
    with pytest.raises(ValueError, match=r"^SFTOptions.lr_scheduler must be one of \('linear', 'cosine'"):
        SFTOptions(lr_scheduler="polynomial")


def test_json_is_all_a_fresh_process_prints_on_stdout(chat_model, pc_jsonl, tmp_path):
    """In a fresh process accelerate imports DeepSpeed during the run, whose logger wrote "Setting accelerator to
    CPU" to stdout, before the JSON."""
    src = str(Path(giva.sft.run.__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    argv = cli(chat_model, pc_jsonl, tmp_path / "out", "--json", "--max-steps", "1")
    done = subprocess.run([sys.executable, "-m", "giva.cli", *argv], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["steps"] == 1, done.stdout


def test_overwrite_drops_an_earlier_runs_tokenizer_files(chat_model, plain_model, pc_jsonl, tmp_path):
    """--overwrite with a model whose tokenizer has no chat template: the earlier run's chat_template.jinja goes with
    the rest of its adapter (the reloaded tokenizer would format prompts as this adapter was never trained)."""
    out = tmp_path / "out"
    train_sft(options(chat_model, pc_jsonl, out, max_steps=1))
    assert (out / "chat_template.jinja").exists()
    (out / "my_notes.md").write_text("kept")  # a file of the user's, not a side file of a save
    train_sft(options(plain_model, pc_jsonl, out, max_steps=1, overwrite=True))
    assert not (out / "chat_template.jinja").exists() and (out / "my_notes.md").read_text() == "kept"
    assert load_sft_adapter(str(out))[1].chat_template is None


@pytest.mark.skipif(TRANSFORMERS_4, reason="transformers 4.x prints no LOAD REPORT (a 5.x log)")
def test_no_progress_hides_the_transformers_load_report(chat_model, pc_jsonl, tmp_path, caplog):
    broken = tmp_path / "model"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((chat_model / name).read_bytes())
    weights = load_file(chat_model / "model.safetensors")
    weights.pop("model.norm.weight")  # a missing key: transformers prints its LOAD REPORT
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings(record=True) as quiet_warnings:
        warnings.simplefilter("always")
        assert main(cli(broken, pc_jsonl, tmp_path / "quiet")) == 0
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage()]
    with warnings.catch_warnings(record=True) as loud_warnings:
        warnings.simplefilter("always")
        assert main([a for a in cli(broken, pc_jsonl, tmp_path / "loud") if a != "--no-progress"]) == 0
    assert [r for r in caplog.records if "LOAD REPORT" in r.getMessage()]  # the check above can fail

    def deprecations(seen):  # the libraries' own notices, e.g. transformers' is_gradient_checkpointing as TRL calls it
        return [w for w in seen if issubclass(w.category, FutureWarning) and "deprecated" in str(w.message)]

    # a giva command prints none, with or without --no-progress (test_cli's deprecation test shows the filter can fail)
    assert not deprecations(quiet_warnings) and not deprecations(loud_warnings)


@pytest.fixture
def no_model_loading(monkeypatch):
    def loaded(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(giva.sft.run, "_load_model", loaded)


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("giva sft: error: ")
    return lines[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lr", "nan"], "argument --lr: must be a finite number"),
        (["--lr", "0"], "argument --lr: must be > 0"),
        (["--max-steps", "0"], "argument --max-steps: must be >= 1"),
        (["--epochs", "-1"], "argument --epochs: must be > 0"),
        (["--r", "0"], "argument --r: must be >= 1"),
        (["--batch-size", "2.5"], "argument --batch-size: expected a whole number"),
        (["--max-length", "4"], "argument --max-length: must be >= 8"),
        (["--val-size", "0"], "argument --val-size: expected a row count >= 1 or a fraction"),
        (["--seed", "-1"], "argument --seed: must be >= 0"),
        (["--seed", str(2**32)], "argument --seed: must be <= 4294967295"),  # numpy's range (transformers' set_seed)
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        (["--init-mode", "fast"], "argument --init-mode: invalid choice: 'fast'"),
        (["--bf16", "--fp16"], "argument --fp16: not allowed with argument --bf16"),
        (["--load-in-4bit", "--load-in-8bit"], "argument --load-in-8bit: not allowed with argument --load-in-4bit"),
        (["--fp16"], "--fp16 needs a GPU"),
        (["--target-modules", "q_proj,,v_proj"], "--target-modules has an empty name"),
        (["--target-modules", "q_proj,v_projj"], "target_modules names module(s) ['v_projj'] that match no module of this "
         "model (a name matches a module's name or a dotted suffix of it); its linear layers are named down_proj, "
         "gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),  # not lm_head, which TRL refuses
        (["--target-modules", "q_proj,embed_tokens"], "target_modules matches 'model.embed_tokens', a "
         "torch.nn.modules.sparse.Embedding, which GiVA cannot adapt: it adapts linear layers (torch.nn.Linear, "
         "transformers Conv1D and quantised linear layers); this model's linear layers are named down_proj, gate_proj, "
         "k_proj, o_proj, q_proj, up_proj, v_proj"),
        (["--target-modules", "q_proj,lm_head"], "target_modules matches 'lm_head', the LM head, which TRL's SFTTrainer "
         "does not adapt: it computes the log-probabilities from the head's weight directly, so an adapter there would "
         "never be trained; leave it out (the other linear layers are named down_proj, gate_proj, k_proj, o_proj, "
         "q_proj, up_proj, v_proj)"),
        (["--val-size", "40"], "--val-size 40 gives 40 validation rows of the 40 rows"),
        (["--micro-batch-size", "3"], "--batch-size 4 is not a multiple of --micro-batch-size 3; give a --micro-batch-size"),
        (["--micro-batch-size", "0"], "argument --micro-batch-size: must be >= 1"),
        (["--save-steps", "0"], "argument --save-steps: must be >= 1"),
        (["--checkpoint-dir", "ck"], "--checkpoint-dir 'ck' is used with --save-steps N or --resume; give one"),
        (["--warmup-ratio", "1"], "argument --warmup-ratio: must be in [0, 1), got '1'"),
        (["--dropout", "-0.1"], "argument --dropout: must be in [0, 1), got '-0.1'"),
        (["--weight-decay", "nan"], "argument --weight-decay: must be a finite number, got 'nan'"),
        (["--max-grad-norm", "-1"], "argument --max-grad-norm: must be >= 0, got '-1'"),
        (["--lr-scheduler", "step"], "argument --lr-scheduler: invalid choice: 'step'"),
        (["--eval-steps", "0"], "argument --eval-steps: must be >= 1"),
        (["--eval-batch-size", "0"], "argument --eval-batch-size: must be >= 1"),
    ],
)
def test_bad_options_get_one_line_before_the_model_loads(chat_model, pc_jsonl, tmp_path, capsys, no_model_loading,
                                                          extra, message):
    assert main(cli(chat_model, pc_jsonl, tmp_path / "out", *extra)) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_the_target_check_before_loading_accepts_conv1d(gpt2_model, pc_jsonl, tmp_path):
    """The module-type check runs on the weightless skeleton: GPT-2's Conv1D projections are layers GiVA adapts."""
    preflight(options(gpt2_model, pc_jsonl, tmp_path / "out", target_modules=["c_attn", "c_fc"], max_length=64))


def test_the_target_check_before_loading_accepts_layers_that_load_in_4bit(chat_model, pc_jsonl, tmp_path):
    """On the weightless skeleton a layer that loads quantised is still an nn.Linear."""
    pytest.importorskip("bitsandbytes")
    preflight(options(chat_model, pc_jsonl, tmp_path / "out", target_modules=["q_proj", "v_proj"], load_in_4bit=True))


def test_the_target_check_accepts_a_model_already_quantised_by_hqq():
    """On a model already quantised the check asks PEFT's backends, as get_peft_model does."""
    pytest.importorskip("hqq")
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    from giva import GivaConfig
    from giva.model import check_targets_before_loading

    model = tiny_llama(**QUANTISABLE)
    attention = model.model.layers[0].self_attn
    attention.q_proj = HQQLinear(attention.q_proj, BaseQuantizeConfig(nbits=4, group_size=32), compute_dtype=torch.float32,
                                 device="cpu")
    check_targets_before_loading(GivaConfig(r=2, target_modules=["q_proj"]), model)


def test_devices_and_quantisation_that_are_not_there(chat_model, pc_jsonl, tmp_path, capsys, no_model_loading, monkeypatch):
    if not torch.cuda.is_available():
        assert main(cli(chat_model, pc_jsonl, tmp_path / "out", "--device", "cuda")) == 2
        assert "--device cuda: no CUDA device is visible" in one_error_line(capsys)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # find_spec: not installed
    assert main(cli(chat_model, pc_jsonl, tmp_path / "out", "--load-in-4bit")) == 2
    assert "--load-in-4bit needs bitsandbytes: pip install" in one_error_line(capsys)
    monkeypatch.setitem(sys.modules, "trl", None)
    assert main(cli(chat_model, pc_jsonl, tmp_path / "out")) == 2
    assert "giva sft needs trl: pip install 'giva[sft]'" in one_error_line(capsys)


def test_a_flash_attention_without_its_gpu_or_package_is_refused_before_the_model_loads(
        chat_model, pc_jsonl, tmp_path, capsys, no_model_loading, monkeypatch):
    assert main(cli(chat_model, pc_jsonl, tmp_path / "out", "--attn-implementation", "flash_attention_2")) == 2
    assert ("--attn-implementation flash_attention_2 runs on CUDA GPUs only, and this run's device is cpu; use sdpa"
            in one_error_line(capsys))
    monkeypatch.setattr(giva.sft.run, "resolve_device", lambda options: "cuda")  # a GPU without the package
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    assert main(cli(chat_model, pc_jsonl, tmp_path / "out", "--attn-implementation", "flash_attention_3")) == 2
    assert ("--attn-implementation flash_attention_3 needs flash-attn's hopper build (the module 'flash_attn_interface' "
            "is not installed)" in one_error_line(capsys))
    with pytest.raises(ValueError, match=r"SFTOptions.attn_implementation must be None or one of \('eager', 'sdpa'"):
        SFTOptions(attn_implementation="flash")


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files of ``folder``: tag -> [(step, value)], read record by record."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(folder).glob("**/events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):  # TFRecord: length (8 bytes), its CRC (4), the record, its CRC (4)
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + length])
            at += 16 + length
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_report_to_tensorboard_logs_every_step_into_a_folder_of_its_own(chat_model, pc_jsonl, tmp_path, monkeypatch):
    """--report-to tensorboard --logging-steps 1: the Trainer's training loss of each of the 4 steps is in the event
    files of '<output-dir>-logs' (the Trainer's own choice, under its output_dir, is the scratch folder the run
    deletes), and their mean is the mean training loss the run reports."""
    pytest.importorskip("tensorboardX")
    monkeypatch.chdir(tmp_path)
    result = train_sft(options(chat_model, pc_jsonl, tmp_path / "out", report_to="tensorboard", logging_steps=1))[0]
    losses = tensorboard_scalars(tmp_path / "out-logs")["train/loss"]
    assert [step for step, _ in losses] == [1, 2, 3, 4]
    assert sum(v for _, v in losses) / 4 == pytest.approx(result.train_loss, rel=1e-5)
    assert result.options["report_to"] == ["tensorboard"] and result.options["logging_steps"] == 1
    assert not list(tmp_path.glob("out/**/events.out.tfevents.*")) and not (tmp_path / "runs").exists()
    # --logging-dir elsewhere, and the default cadence (20 logs; 4 steps: every step)
    train_sft(options(chat_model, pc_jsonl, tmp_path / "out2", report_to="tensorboard", logging_dir=str(tmp_path / "tb")))
    assert [step for step, _ in tensorboard_scalars(tmp_path / "tb")["train/loss"]] == [1, 2, 3, 4]
    assert not (tmp_path / "out2-logs").exists()
    # a fresh run over an earlier run's event files: refused before the model loads, or with --overwrite replaced
    with pytest.raises(ValueError, match="holds TensorBoard event files of an earlier run; pass --overwrite"):
        train_sft(options(chat_model, pc_jsonl, tmp_path / "out3", report_to="tensorboard", logging_dir=str(tmp_path / "tb")))
    (tmp_path / "tb" / "notes.txt").write_text("mine")
    train_sft(options(chat_model, pc_jsonl, tmp_path / "out2", report_to="tensorboard", logging_dir=str(tmp_path / "tb"),
                      overwrite=True, max_steps=2))
    assert [step for step, _ in tensorboard_scalars(tmp_path / "tb")["train/loss"]] == [1, 2]
    assert (tmp_path / "tb" / "notes.txt").read_text() == "mine"


def test_a_resumed_run_logs_at_its_own_cadence_and_purges_what_the_cut_off_run_logged_after_its_checkpoint(
        chat_model, pc_jsonl, tmp_path, monkeypatch):
    """--resume with another --logging-steps: the Trainer took the checkpoint's cadence (every step) and ignored the
    new one. The resumed run's TensorBoard writer purges from the step after its checkpoint (TensorBoard drops what
    the cut-off run logged there, so no step is plotted twice)."""
    pytest.importorskip("tensorboardX")
    common = dict(max_steps=6, save_steps=2, report_to="tensorboard")
    cut_off_at(3, monkeypatch)
    with pytest.raises(_Preempted):
        train_sft(options(chat_model, pc_jsonl, tmp_path / "out", logging_steps=1, **common))
    monkeypatch.undo()
    earlier = sorted((tmp_path / "out-logs").glob("events.out.tfevents.*"))  # the cut-off run's (what it flushed)
    assert earlier
    resumed, _, _ = train_sft(options(chat_model, pc_jsonl, tmp_path / "out", resume=True, logging_steps=3, **common))
    assert resumed.resumed_from.endswith("checkpoint-2")
    newest = [path for path in sorted((tmp_path / "out-logs").glob("events.out.tfevents.*")) if path not in earlier]
    assert len(newest) == 1
    steps = [step for step, _ in tensorboard_scalars_of(newest[0])["train/loss"]]
    assert steps == [3, 4, 6]  # every 3rd step, and the checkpoint steps 4 and 6 (logged before each save)
    assert purge_steps(newest[0]) == [3]


def tensorboard_scalars_of(path) -> dict[str, list[tuple[int, float]]]:
    """:func:`tensorboard_scalars` of one event file."""
    folder = path.parent / f"only-{path.name}"
    folder.mkdir()
    shutil.copy2(path, folder / path.name)
    return tensorboard_scalars(folder)


def purge_steps(path) -> list[int]:
    """The steps of the SessionLog START events in one event file (a writer made with purge_step writes one there)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event, SessionLog

    data, at, steps = path.read_bytes(), 0, []
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at : at + 8])
        event = Event.FromString(data[at + 12 : at + 12 + length])
        at += 16 + length
        if event.HasField("session_log") and event.session_log.status == SessionLog.START:
            steps.append(event.step)
    return steps


def test_report_to_refusals_come_before_the_model_loads(chat_model, pc_jsonl, tmp_path, capsys, no_model_loading,
                                                         monkeypatch):
    out = tmp_path / "out"
    assert main(cli(chat_model, pc_jsonl, out, "--report-to", "tensorbored")) == 2
    assert one_error_line(capsys).startswith("giva sft: error: --report-to tensorbored: 'tensorbored' is not one of "
                                             "transformers' integrations (")
    monkeypatch.setattr(giva.sft.tracking, "installed", lambda: ["tensorboard"])  # wandb's package missing
    assert main(cli(chat_model, pc_jsonl, out, "--report-to", "tensorboard,wandb")) == 2
    assert one_error_line(capsys) == ("giva sft: error: --report-to tensorboard,wandb: transformers finds no installed "
                                      "package for 'wandb'; install it (pip install wandb), or leave it out")
    assert main(cli(chat_model, pc_jsonl, out, "--logging-dir", str(tmp_path / "tb"))) == 2
    assert one_error_line(capsys) == (f"giva sft: error: --logging-dir {str(tmp_path / 'tb')!r} is TensorBoard's folder; "
                                      "give --report-to tensorboard with it, or drop it")
    assert main(cli(chat_model, pc_jsonl, out, "--report-to", "tensorboard", "--logging-dir", str(out / "tb"))) == 2
    assert one_error_line(capsys) == (f"giva sft: error: --logging-dir {str(out / 'tb')!r} and --output-dir {str(out)!r} "
                                      "are the same folder or one holds the other; TensorBoard's logs need a folder of "
                                      "their own")
    (tmp_path / "file").write_text("")
    assert main(cli(chat_model, pc_jsonl, out, "--report-to", "tensorboard", "--logging-dir", str(tmp_path / "file" / "tb"))) == 2
    assert one_error_line(capsys) == (f"giva sft: error: --logging-dir: output_dir {str(tmp_path / 'file' / 'tb')!r} "
                                      f"cannot be created: {str(tmp_path / 'file')!r} is a file")
    for bad in (["all", "wandb"], [""], "none,"):
        with pytest.raises(ValueError, match=r"^SFTOptions.report_to must be 'none', 'all' or integration names"):
            SFTOptions(report_to=bad)
    assert SFTOptions(report_to="none").report_to == [] == SFTOptions(report_to=["none"]).report_to
    assert SFTOptions(report_to="wandb,tensorboard").report_to == ["wandb", "tensorboard"]
    monkeypatch.setattr(giva.sft.tracking, "installed", lambda: ["trackio"])
    assert giva.sft.tracking.resolve(["all"]) == ["trackio"]


def test_the_attention_implementation_reaches_the_model(chat_model, pc_jsonl, tmp_path):
    for implementation in ("eager", "sdpa"):
        opts = options(chat_model, pc_jsonl, tmp_path / "out", attn_implementation=implementation)
        device, path, tokenizer, data = preflight(opts)
        trainer = make_trainer(opts, device, path, tokenizer, data, str(tmp_path / "scratch"))
        assert trainer.model.config._attn_implementation == implementation


def test_several_gpus_without_torchrun_are_refused(chat_model, pc_jsonl, tmp_path, capsys, no_model_loading, monkeypatch):
    """Outside torchrun the Trainer wraps the model in nn.DataParallel over every visible GPU: --batch-size rows on
    each, a schedule sized for one. Refused before the model loads; torchrun (LOCAL_RANK) or one GPU is fine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for device in ("cuda", "auto"):
        assert main(cli(chat_model, pc_jsonl, tmp_path / "out", "--device", device)) == 2
        line = one_error_line(capsys)
        assert f"--device {device}: 2 GPUs are visible and giva sft was not launched by torchrun" in line
        assert "torchrun --nproc_per_node 2" in line and "CUDA_VISIBLE_DEVICES=0" in line
    assert giva.sft.run.resolve_device(options(chat_model, pc_jsonl, tmp_path / "out", device="cpu")) == "cpu"
    monkeypatch.setenv("LOCAL_RANK", "1")  # one process per GPU: each drives its own
    assert giva.sft.run.resolve_device(options(chat_model, pc_jsonl, tmp_path / "out", device="cuda")) == "cuda"
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert giva.sft.run.resolve_device(options(chat_model, pc_jsonl, tmp_path / "out", device="auto")) == "cuda"


FSDP_REFUSED = ("FSDP (accelerate launch's configuration: ACCELERATE_USE_FSDP) is not supported by giva sft, whose "
                "validation, exact-match scoring and adapter save read whole weights; launch with DeepSpeed ZeRO-3 to "
                "shard the base (docs/sft.md), or with torchrun (data parallelism: GiVA's gradients and optimizer state "
                "are two vectors per layer, so sharding them saves next to nothing), or load the base in 4 bits "
                "(--load-in-4bit), or train through the Python API (giva.initialize under FSDP2: docs/distributed.md)")
ZERO3 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}


ZERO3_ON_4 = (f"giva sft under DeepSpeed ZeRO-3 needs transformers >= 5 (with {transformers.__version__} the first step "
              "failed in the Trainer's learning-rate scheduler); upgrade transformers, or launch with torchrun or ZeRO "
              "stage 1 or 2")


def zero3_refuses(flag: str, why: str) -> str:
    if TRANSFORMERS_4:
        return ZERO3_ON_4
    return (f"{flag} is not supported under DeepSpeed ZeRO-3 (accelerate launch's configuration: ACCELERATE_USE_DEEPSPEED, "
            f"stage 3): {why}; leave it out, or launch with torchrun or ZeRO stage 1 or 2")


@pytest.mark.parametrize("launch, flags, message", [
    ({"ACCELERATE_USE_FSDP": "true"}, (), FSDP_REFUSED),
    ({"ACCELERATE_USE_FSDP": "1"}, (), FSDP_REFUSED),
    ({"ACCELERATE_USE_FSDP": "yes"}, (), FSDP_REFUSED),
    ({"ACCELERATE_USE_FSDP": "false"}, (), None),
    (ZERO3, (), ZERO3_ON_4 if TRANSFORMERS_4 else None),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"}, ("--load-in-4bit",),
     zero3_refuses("--load-in-4bit", "bitsandbytes' quantised weights are not partitioned by ZeRO-3")),
    (ZERO3, ("--load-in-8bit",), zero3_refuses("--load-in-8bit", "bitsandbytes' quantised weights are not partitioned "
                                                                 "by ZeRO-3")),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "empty.json"}, (),
     "ACCELERATE_DEEPSPEED_CONFIG_FILE 'empty.json': JSONDecodeError: Expecting value: line 1 column 1 (char 0)"),
    (ZERO3, ("--torch-compile",), zero3_refuses("--torch-compile", "the compiled step's first backward failed there (an "
                                                                   "in-place change that autograd refused, in TRL's "
                                                                   "chunked log-probabilities)")),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, ("--load-in-4bit", "--save-steps", "2"),
     None),
], ids=["fsdp-true", "fsdp-1", "fsdp-yes", "fsdp-false", "zero3", "zero3-config-file-4bit", "zero3-8bit",
        "zero3-empty-config-file", "zero3-compile", "zero2-all-flags"])
def test_a_launch_that_shards_the_weights_is_refused_before_the_model_loads(launch, flags, message, chat_model, pc_jsonl,
                                                                           tmp_path, capsys, no_model_loading,
                                                                           monkeypatch):
    """`accelerate launch` sets the variables the Trainer reads. With FSDP the Trainer would shard the weights on GPUs,
    which giva sft's validation, exact match and save read whole, and on CPUs Accelerate ignores the variable and runs
    DDP (seen under torchrun on 2 CPU processes: the run went through as DDP, and nothing said so): refused, in
    accelerate's spellings of true. DeepSpeed ZeRO-3 runs (test_under_deepspeed_zero3_the_run_matches_data_parallelism_and_resumes)
    but refuses the flags that read or write whole weights outside its engine, from the stage variable or a config file;
    under ZeRO-2, which partitions no weight, they are allowed."""
    monkeypatch.chdir(tmp_path)
    Path("ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}))
    Path("empty.json").write_text("")  # a config file DeepSpeed cannot read: named with json's error
    for variable, value in launch.items():
        monkeypatch.setenv(variable, value)
    if message is None:
        preflight(options(chat_model, pc_jsonl, tmp_path / "out", **dict(
            load_in_4bit="--load-in-4bit" in flags, save_steps=2 if "--save-steps" in flags else None)))
    else:
        assert main(cli(chat_model, pc_jsonl, tmp_path / "out", *flags)) == 2
        assert one_error_line(capsys) == f"giva sft: error: {message}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a"}\n', "bad.jsonl:1: needs 'prompt' and 'completion', 'messages', or 'text'; the row has ['prompt']"),
        ('{"prompt": "a", "completion": "b"}\n{"text": "c"}\n', "bad.jsonl:2: a 'text' row after plain-text rows"),
        ('{"text": "a"}\n{"prompt": "a", "completion": "b"}\n', "bad.jsonl:2: a plain-text row after 'text' rows"),
        ('{"text": " "}\n', "bad.jsonl:1: 'text' must be a non-empty string"),
        ('{"txt": "a"}\n', "bad.jsonl:1: needs 'prompt' and 'completion', 'messages', or 'text'; the row has ['txt']"),
        ('{"prompt": "a", "completion": ""}\n', "bad.jsonl:1: 'completion' must be a non-empty string"),
        ('{"prompt": "a", "completion": "b"}\nnot json\n', "bad.jsonl:2: not valid JSON"),
        ('{"messages": [{"role": "user", "content": "a"}]}\n', "bad.jsonl:1: 'messages' must end with an assistant message"),
        ('{"messages": [{"role": "bot", "content": "a"}]}\n', "bad.jsonl:1: messages[0] must be {\"role\": one of"),
        # an empty reply was trained as the label "" (a plain-text empty completion was refused), and a user message
        # in a completion carried the loss
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " \\n"}]}\n',
         "bad.jsonl:1: messages[1] is an assistant message with empty content, which would be trained as a reply"),
        ('{"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": ""}]}\n',
         "bad.jsonl:1: completion[0] is an assistant message with empty content"),
        ('{"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user", "content": "b"}, '
         '{"role": "assistant", "content": "c"}]}\n', "bad.jsonl:1: completion[0] is a 'user' message; the completion "
         "holds the assistant's reply only (every message of it carries the loss): move the others into the prompt"),
        ('{"prompt": "a", "completion": "b"}\n{"messages": [{"role": "user", "content": "a"}, '
         '{"role": "assistant", "content": "b"}]}\n', "bad.jsonl:2: a chat row after plain-text rows"),
        ("", "bad.jsonl: no rows found"),
        ('{"prompt": "a", "completion": "b"}\n["a", "b"]\n',  # was finetune's "with the text and label columns"
         "bad.jsonl:2: expected a JSON object with 'prompt' and 'completion', 'messages', or 'text', got list"),
    ],
)
def test_bad_data_gets_one_line_naming_file_and_line(chat_model, tmp_path, capsys, no_model_loading, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    assert main(cli(chat_model, tmp_path / "bad.jsonl", tmp_path / "out")) == 2
    assert message in one_error_line(capsys)


def test_a_dataset_folder_and_its_split_give_the_rows_of_the_same_jsonl(chat_model, pc_jsonl, messages_jsonl, tmp_path,
                                                                         capsys, no_model_loading):
    """--data a folder that `datasets` wrote (save_to_disk: a DatasetDict or one Dataset) or laid out as the hub does
    (data/<split>-00000-of-00001.parquet), --data-split naming the split: the same training and validation rows as
    the JSONL file they came from. A split the folder lacks, a folder without data, and --data-split with a JSONL file
    are one line before the model loads."""
    from datasets import Dataset, DatasetDict

    from giva.sft.data import load_sft_data

    for jsonl in (pc_jsonl, messages_jsonl):
        rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
        expected = load_sft_data(str(jsonl), 8, 0)
        saved_dict, saved_one, hub = (tmp_path / jsonl.stem / name for name in ("dict", "one", "hub"))
        DatasetDict({"train_sft": Dataset.from_list(rows), "test_sft": Dataset.from_list(rows[:3])}).save_to_disk(str(saved_dict))
        Dataset.from_list(rows).save_to_disk(str(saved_one))
        (hub / "data").mkdir(parents=True)
        Dataset.from_list(rows).to_parquet(str(hub / "data" / "train_sft-00000-of-00001.parquet"))
        Dataset.from_list(rows[:3]).to_parquet(str(hub / "data" / "test_sft-00000-of-00001.parquet"))
        for folder, split in ((saved_dict, "train_sft"), (saved_one, "train"), (hub, "train_sft")):
            data = load_sft_data(str(folder), 8, 0, split=split)
            assert (data.train, data.validation, data.labels) == (expected.train, expected.validation, expected.labels)
            assert data.train_where[0].startswith(f"dataset folder {str(folder)!r} row ")
        assert len(load_sft_data(str(hub), 1, 0, split="test_sft").train) == 2
    out = tmp_path / "out"
    capsys.readouterr()  # datasets' bars above
    assert main(cli(chat_model, saved_dict, out)) == 2  # the default split, 'train', is not there
    assert one_error_line(capsys) == (f"giva sft: error: dataset folder {str(saved_dict)!r} has no split 'train'; it has "
                                      "['test_sft', 'train_sft']: give --data-split")
    assert main(cli(chat_model, hub, out, "--data-split", "validation")) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"giva sft: error: dataset folder {str(hub)!r} (--data-split 'validation', --data-config None): ")
    assert "validation" in line.split("): ", 1)[1]  # datasets' own words on the unknown split
    for folder, flags, message in (
            (saved_one, ["--data-split", "test"], "holds one dataset written by save_to_disk, no split 'test'; drop "
                                                  "--data-split"),
            (saved_dict, ["--data-split", "train_sft", "--data-config", "x"], "was written by save_to_disk and has no "
                                                                            "configurations; drop --data-config")):
        assert main(cli(chat_model, folder, out, *flags)) == 2
        assert one_error_line(capsys) == f"giva sft: error: dataset folder {str(folder)!r} {message}"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    assert main(cli(chat_model, broken, out)) == 2
    # datasets' words for it differ by version: 5.x wraps the JSON error, 4.8 (the GPU machine's) raises it as it is
    assert re.fullmatch(rf"giva sft: error: dataset folder {re.escape(repr(str(broken)))} \(--data-split 'train', "
                        r"--data-config None\): (An error occurred while generating the dataset.*|Expected object or "
                        r"value at position \d+)", one_error_line(capsys))
    (tmp_path / "empty").mkdir()
    assert main(cli(chat_model, tmp_path / "empty", out)) == 2
    assert one_error_line(capsys).startswith(f"giva sft: error: dataset folder {str(tmp_path / 'empty')!r} (--data-split")
    assert main(cli(chat_model, pc_jsonl, out, "--data-split", "test")) == 2
    assert one_error_line(capsys) == (f"giva sft: error: --data-split 'test' is for a datasets name or a dataset folder; "
                                      f"--data {str(pc_jsonl)!r} is a file")
    assert main(cli(chat_model, "pang-lee", out, "--data-config", "plain")) == 2
    assert one_error_line(capsys) == ("giva sft: error: --data-config 'plain' is for a datasets name or a dataset folder; "
                                      "--data 'pang-lee' is a bundled set")
    assert not out.exists()


def test_chat_rows_need_a_tokenizer_with_a_chat_template(plain_model, messages_jsonl, tmp_path, capsys, no_model_loading):
    """TRL refused them only after the model loaded, naming neither the file nor the flag."""
    assert main(cli(plain_model, messages_jsonl, tmp_path / "out")) == 2
    assert (f"--data {str(messages_jsonl)!r} has chat rows but the tokenizer of --model {str(plain_model)!r} has no chat "
            "template") in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_a_chat_template_that_refuses_a_row_is_named_with_file_and_line(chat_model, messages_jsonl, pc_jsonl, tmp_path,
                                                                          capsys, no_model_loading):
    """A template that raises (Mistral-style: no system role) failed inside SFTTrainer after the model loaded, as a
    jinja2 traceback; it is a data error naming a row it refuses, before the model loads."""
    strict = tmp_path / "strict-model"
    shutil.copytree(chat_model, strict)
    tokenizer = tiny_tokenizer(chat=True)
    tokenizer.chat_template = CHAT_TEMPLATE.replace(
        "{% for m in messages %}",
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}")
    tokenizer.save_pretrained(strict)
    assert main(cli(strict, messages_jsonl, tmp_path / "out")) == 2
    line = one_error_line(capsys)
    match = re.search(rf"{re.escape(str(messages_jsonl))}:(\d+): the chat template of --model {re.escape(repr(str(strict)))} "
                      r"fails on this row: System role not supported$", line)
    assert match, line
    named = json.loads(messages_jsonl.read_text().splitlines()[int(match.group(1)) - 1])
    assert named["messages"][0]["role"] == "system"  # the line named is one the template refuses
    giva.sft.run.preflight(options(strict, pc_jsonl, tmp_path / "out"))  # rows it renders pass
    assert not (tmp_path / "out").exists()


def test_the_bundled_corpora_become_one_word_questions(tmp_path, monkeypatch):
    """Both corpora label their rows 1 and -1 (the CoNLL-2010 file: 1 certain, -1 uncertain, as pattern's own test and
    the evidence suite's label words read it); the CoNLL-2010 instruction mapped '0' and '1' and failed on '-1'."""
    from giva.data import BUNDLED
    from giva.sft.data import INSTRUCTIONS, load_sft_data

    monkeypatch.setenv("GIVA_DATA_DIR", str(tmp_path))
    for name, file in BUNDLED.items():
        (tmp_path / file).write_text("".join(f'"{label}","sentence {i}"\n' for i, label in enumerate(["1", "-1"] * 4)))
        data = load_sft_data(name, 2, 0)
        words = {row["prompt"].split("\n")[0].split()[-1]: row["completion"] for row in data.train + data.validation}
        assert len(words) == 8 and set(words.values()) == set(INSTRUCTIONS[name][1].values())
        expected = {"pang-lee": ("positive", "negative"), "conll2010-uncertainty": ("certain", "uncertain")}[name]
        assert (words["0"], words["1"]) == expected  # sentence 0 is labelled 1, sentence 1 is labelled -1


def test_bad_paths_get_one_line_before_the_model_loads(chat_model, pc_jsonl, tmp_path, capsys, no_model_loading):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "GIVA"}))
    cases = [
        (cli(chat_model, pc_jsonl, a_file), "is a file; expected a folder"),
        (cli(chat_model, pc_jsonl, tmp_path / "other"), "is a non-empty folder that holds no adapter"),
        (cli(chat_model, pc_jsonl, tmp_path / "adapter"), "already holds an adapter; pass --overwrite"),
        (cli(chat_model, pc_jsonl, tmp_path / "out", "--export-lora", str(tmp_path / "out")), "the LoRA export needs its own folder"),
        (cli(chat_model, pc_jsonl, tmp_path / "out", "--export-lora", str(tmp_path / "adapter")), "belongs to a 'GIVA' adapter"),
        (cli(tmp_path / "missing-model", pc_jsonl, tmp_path / "out"), "no such folder"),
        (cli(chat_model, tmp_path / "missing.jsonl", tmp_path / "out"), "does not exist"),
        (cli(chat_model, a_file, tmp_path / "out"), "expected JSON Lines (.jsonl or .json)"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in one_error_line(capsys), argv
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()) == {"peft_type": "GIVA"}


def test_an_export_folder_that_holds_or_lies_in_the_output_folder_is_refused_before_the_model_loads(
        chat_model, pc_jsonl, tmp_path, capsys, no_model_loading):
    """--output-dir L/out --export-lora L trained, saved the adapter into L/out, then failed to export into the
    non-empty L, leaving an sft_result.json that named L as the LoRA export."""
    for out, lora in ((tmp_path / "L" / "out", tmp_path / "L"), (tmp_path / "M", tmp_path / "M" / "lora")):
        assert main(cli(chat_model, pc_jsonl, out, "--export-lora", str(lora))) == 2
        assert (f"--export-lora {str(lora)!r} and --output-dir {str(out)!r} are the same folder or one holds the other; "
                "the LoRA export needs its own folder") in one_error_line(capsys)
        assert not lora.exists() and not out.exists()


def test_a_failed_lora_export_keeps_the_adapter_and_names_no_export(chat_model, pc_jsonl, tmp_path, monkeypatch):
    """sft_result.json named --export-lora as written before the export ran; the adapter is saved first and the
    result names the export only once it is written."""
    import giva.export

    def fails(model, folder, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(giva.export, "export_lora", fails)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        train_sft(options(chat_model, pc_jsonl, out, max_steps=1, export_lora=str(tmp_path / "lora")))
    assert json.loads((out / "sft_result.json").read_text())["lora_dir"] is None
    assert (out / "adapter_config.json").exists() and not (tmp_path / "lora").exists()


def test_export_lora_keeps_what_the_folder_holds(chat_model, pc_jsonl, tmp_path, capsys, no_model_loading):
    """--export-lora follows --output-dir's rule: a non-empty folder with no adapter is refused (the export replaced
    its README.md), an earlier LoRA export is replaced only with --overwrite; both before the model loads."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.md").write_text("my notes")
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (earlier / "README.md").write_text("# LoRA export of a GiVA adapter\n")  # what marks an export (a user's LoRA is refused)
    assert main(cli(chat_model, pc_jsonl, tmp_path / "out", "--export-lora", str(notes))) == 2
    assert (f"--export-lora {str(notes)!r}: output folder {notes} is not empty and holds no adapter; the export would "
            "overwrite its files") in one_error_line(capsys)
    assert main(cli(chat_model, pc_jsonl, tmp_path / "out", "--export-lora", str(earlier))) == 2
    assert (f"--export-lora {str(earlier)!r} already holds a LoRA export; pass --overwrite to replace it"
            in one_error_line(capsys))
    assert (notes / "README.md").read_text() == "my notes" and not (tmp_path / "out").exists()
    preflight(options(chat_model, pc_jsonl, tmp_path / "out", export_lora=str(earlier), overwrite=True))
    (tmp_path / "empty").mkdir()
    preflight(options(chat_model, pc_jsonl, tmp_path / "out", export_lora=str(tmp_path / "empty")))


def test_a_4bit_base_trains_through_sft(chat_model, pc_jsonl, tmp_path):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    result, model, _ = train_sft(options(chat_model, pc_jsonl, tmp_path / "out", load_in_4bit=True, bf16=True, max_steps=2))
    assert (result.quantization, result.precision, result.steps) == ("nf4", "bf16", 2)
    assert torch.isfinite(torch.tensor(result.val_loss_after)) and result.val_loss_after != result.val_loss_before
    base_layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base_layer, Linear4bit) and (tmp_path / "out" / "adapter_config.json").exists()


RUNS = {"fp32": {}, "bf16": dict(bf16=True), "nf4-bf16": dict(load_in_4bit=True, bf16=True, gradient_checkpointing=True),
        "int8": dict(load_in_8bit=True)}
QUANTISED_LAYER = {"load_in_4bit": "Linear4bit", "load_in_8bit": "Linear8bitLt"}


@pytest.mark.parametrize("device", ON_CUDA_TOO)
@pytest.mark.parametrize("run", RUNS)
def test_a_run_trains_on_its_device_and_reloads_as_it_was_trained(chat_model, pc_jsonl, tmp_path, run, device):
    """The user's path, on the CPU and (marked cuda) on a GPU: `giva sft` in fp32, bf16, the QLoRA recipe (NF4 base,
    bf16, gradient checkpointing) and on an int8 base lowers the validation loss, and load_sft_adapter rebuilds the
    base as the run's sft_result.json says it was loaded (bf16 weights, the quantised base) with the trained logits: bit for bit on
    the CPU, to the dtype's tolerance on a GPU. quantized=False puts the same adapter on the unquantised base."""
    from accelerate.utils import extract_model_from_parallel

    flags = RUNS[run]
    quantised = next((QUANTISED_LAYER[k] for k in flags if k in QUANTISED_LAYER), None)
    if quantised:
        pytest.importorskip("bitsandbytes")
    from peft import get_peft_model_state_dict

    out = tmp_path / "out"
    result, model, tokenizer = train_sft(options(chat_model, pc_jsonl, out, device=device, lr=5e-2, **flags))
    assert result.device == device and {p.device.type for p in model.parameters()} == {device}
    assert result.val_loss_after < result.val_loss_before, (result.val_loss_before, result.val_loss_after)
    trained = extract_model_from_parallel(model, keep_fp32_wrapper=False).eval()
    reloaded, _ = load_sft_adapter(str(out), device=device)
    dtype = torch.bfloat16 if "bf16" in flags else torch.float32
    assert {p.device.type for p in reloaded.parameters()} == {device}
    assert reloaded.get_base_model().model.embed_tokens.weight.dtype == dtype  # the run's dtype, not the checkpoint's
    layer = reloaded.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == (quantised or "Linear")
    batch = tokenizer(["the film is good . positive or negative ?"], return_tensors="pt").to(device)
    with torch.no_grad():
        expected, got = trained(**batch).logits, reloaded(**batch).logits
        with reloaded.disable_adapter():
            base = reloaded(**batch).logits
    assert got.dtype == expected.dtype == dtype
    if device == "cpu":
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected)  # the dtype's default tolerance
    assert not torch.allclose(got, base)  # the adapter is part of the comparison
    if quantised:
        plain, _ = load_sft_adapter(str(out), device=device, quantized=False)
        layer = plain.get_base_model().model.layers[0].self_attn.q_proj.base_layer
        assert type(layer).__name__ == "Linear" and layer.weight.dtype == dtype
        vectors, reloaded_vectors = get_peft_model_state_dict(plain), get_peft_model_state_dict(reloaded)
        assert vectors and all(torch.equal(v, reloaded_vectors[k]) for k, v in vectors.items())
        with torch.no_grad():
            assert torch.isfinite(plain(**batch).logits).all()
    else:
        with pytest.raises(ValueError, match=r"quantized=True, but .* is not a run on a quantised base \(its "
                                             r"sft_result\.json has neither load_in_4bit nor load_in_8bit\)"):
            load_sft_adapter(str(out), quantized=True)


def test_a_checkpoint_reloads_as_its_run_was_trained(chat_model, pc_jsonl, tmp_path):
    """A checkpoint-N folder of --save-steps holds no sft_result.json: load_sft_adapter reads the run's record beside it
    (giva_sft_options.json), so the checkpoint of a QLoRA run reloads onto the NF4 base in bf16, as the final adapter
    does; it loaded as an fp32 run's before."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "out"
    train_sft(options(chat_model, pc_jsonl, out, load_in_4bit=True, bf16=True, max_steps=2, save_steps=2))
    checkpoint = Path(f"{out}-checkpoints") / "checkpoint-2"
    assert not (checkpoint / "sft_result.json").exists()
    (from_checkpoint, tokenizer), (final, _) = load_sft_adapter(str(checkpoint)), load_sft_adapter(str(out))
    for model in (from_checkpoint, final):
        base = model.get_base_model().model
        assert type(base.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
        assert base.embed_tokens.weight.dtype == torch.bfloat16
    batch = tokenizer(["the film is good . positive or negative ?"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(from_checkpoint(**batch).logits, final(**batch).logits)  # step 2's adapter is the final one
    elsewhere = tmp_path / "copy"  # the same files out of their run's folder: an fp32 run's, as documented
    shutil.copytree(checkpoint, elsewhere)
    assert load_sft_adapter(str(elsewhere))[0].get_base_model().model.embed_tokens.weight.dtype == torch.float32
    find_spec = importlib.util.find_spec  # a machine without bitsandbytes: a clear error, not transformers' own
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
        with pytest.raises(ImportError, match=r"trained on a 4-bit base, which needs bitsandbytes: pip install "
                                              r"'giva\[quant\]', or pass quantized=False"):
            load_sft_adapter(str(out))
        assert load_sft_adapter(str(out), quantized=False)[0].get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16


def test_a_reload_leaves_out_a_flash_kernel_it_cannot_run(chat_model, pc_jsonl, tmp_path, monkeypatch):
    """A run trained with --attn-implementation flash_attention_2 reloads where the kernel cannot run (here: the CPU,
    no flash-attn) with the model's own attention, which trains the same adapter; before, the reload raised after
    transformers had tried to fetch a flash kernel from the hub. attn_implementation= overrides the run's choice."""
    out = tmp_path / "out"
    train_sft(options(chat_model, pc_jsonl, out, max_steps=1, attn_implementation="eager"))
    record = json.loads((out / "sft_result.json").read_text())
    expected, _ = load_sft_adapter(str(out))
    assert expected.get_base_model().config._attn_implementation == "eager"  # the run's own choice
    record["options"]["attn_implementation"] = "flash_attention_2"
    (out / "sft_result.json").write_text(json.dumps(record))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reloaded, tokenizer = load_sft_adapter(str(out))
    assert reloaded.get_base_model().config._attn_implementation == "sdpa"  # the model's default
    assert load_sft_adapter(str(out), attn_implementation="eager")[0].get_base_model().config._attn_implementation == "eager"
    batch = tokenizer(["the film is good . positive or negative ?"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected(**batch).logits, rtol=1e-5, atol=1e-5)


def test_the_trl_example_trains_giva_on_a_4bit_base_and_its_adapter_reloads_onto_one(chat_model, pc_jsonl, tmp_path):
    """examples/sft_qlora.py, the calls a user's own TRL script makes (an NF4 base in bf16, GivaConfig as TRL's
    peft_config, GivaInitCallback, gradient checkpointing): the bases are set, the vectors train in fp32, and the
    saved adapter, put on a fresh 4-bit base with PEFT's own PeftModel.from_pretrained, gives the trained logits."""
    pytest.importorskip("bitsandbytes")
    import importlib.util as loader

    from accelerate.utils import extract_model_from_parallel
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = loader.spec_from_file_location("sft_qlora", Path(__file__).parents[1] / "examples" / "sft_qlora.py")
    example = loader.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "out"
    trainer = example.main(["--model", str(chat_model), "--data", str(pc_jsonl), "--output-dir", str(out),
                            "--max-steps", "3"])
    trained = extract_model_from_parallel(trainer.model, keep_fp32_wrapper=False).eval()
    layers = [m for m in trained.modules() if isinstance(m, giva.GivaLayer)]
    assert len(layers) == 14 and type(layers[0].base_layer).__name__ == "Linear4bit"
    vectors = {n: p for n, p in trained.named_parameters() if "giva_lambda" in n}
    assert {p.dtype for p in vectors.values()} == {torch.float32} and all(p.requires_grad for p in vectors.values())
    lambda_o = [p for n, p in vectors.items() if "lambda_o" in n]
    assert len(lambda_o) == 14 and all(p.abs().sum() > 0 for p in lambda_o)  # from 0: they trained
    basis = layers[0].giva_A["default"].float()
    torch.testing.assert_close(basis @ basis.T, torch.eye(basis.shape[0]), atol=1e-5, rtol=0)  # set, orthonormal rows
    base = AutoModelForCausalLM.from_pretrained(chat_model, quantization_config=example.quantisation(),
                                                dtype=torch.bfloat16, device_map={"": "cpu"})
    reloaded = PeftModel.from_pretrained(base, str(out)).eval()
    batch = trainer.processing_class(["the film is good . positive or negative ?"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, trained(**batch).logits)


def test_giva_vectors_on_a_4bit_base_stay_fp32_and_lambda_s_moves_at_a_qlora_learning_rate(chat_model, pc_jsonl, tmp_path,
                                                                                          monkeypatch):
    """TRL casts a quantised model's trainable parameters to bf16, where lambda_s (init 1, step 2**-7) cannot take
    AdamW's steps at lr 1e-3: without GivaInitCallback's upcast none of its 28 entries moves in 4 steps."""
    pytest.importorskip("bitsandbytes")
    import giva.integrations.trainer as callback_module

    def train(out):
        _, model, _ = train_sft(options(chat_model, pc_jsonl, out, load_in_4bit=True, lr=1e-3, max_steps=4))
        vectors = {n: p for n, p in model.named_parameters() if "giva_lambda" in n}
        lambda_s = torch.cat([p.detach().flatten() for n, p in vectors.items() if "lambda_s" in n])
        return {p.dtype for p in vectors.values()}, int((lambda_s != 1).sum()), lambda_s.numel()

    assert train(tmp_path / "out") == ({torch.float32}, 28, 28)
    assert {v.dtype for k, v in adapter_tensors(tmp_path / "out").items() if "lambda" in k} == {torch.float32}
    monkeypatch.setattr(callback_module, "upcast_vectors", lambda model: 0)  # TRL's cast left as it is
    assert train(tmp_path / "cast") == ({torch.bfloat16}, 0, 28)


def test_a_max_length_that_cuts_off_every_completion_is_refused(chat_model, pc_jsonl, tmp_path, capsys):
    assert main(cli(chat_model, pc_jsonl, tmp_path / "out", "--max-length", "8")) == 2
    assert "--max-length 8 cuts off the whole completion of 8 of the 8 validation rows; raise --max-length" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_a_max_length_that_cuts_a_validation_reply_partway_is_refused_when_exact_match_scores_it(chat_model, tmp_path,
                                                                                                  capsys):
    """Replies of 1 and 3 words: at the --max-length where the 1-word rows just fit, TRL cuts the 3-word replies
    after their first words, and exact match compared the answers with those cut replies, exit 0. Rows that fit
    exactly, end token included, are not cut."""
    rng = random.Random(3)
    data = tmp_path / "replies.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "the film is good . positive or negative ?"},
                                                     {"role": "assistant", "content": rng.choice(["good", "bad awful great"])}]})
                            + "\n" for _ in range(40)))
    opts = options(chat_model, data, tmp_path / "probe")
    device, path, tokenizer, rows = preflight(opts)
    lengths = sorted({len(ids) for ids in make_trainer(opts, device, path, tokenizer, rows, str(tmp_path / "s")).eval_dataset["input_ids"]})
    assert len(lengths) == 2 and lengths[1] == lengths[0] + 2
    capsys.readouterr()
    assert main(cli(chat_model, data, tmp_path / "out", "--max-length", str(lengths[0]))) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after the datasets progress bars the probe turned on
    assert re.search(rf"--max-length {lengths[0]} cuts the end off the completion of \d+ of the 8 validation rows, and "
                     "exact match would compare the answers with the cut replies; raise --max-length", line), line
    assert main(cli(chat_model, data, tmp_path / "out", "--max-length", str(lengths[1]))) == 0  # every row fits exactly


def test_a_max_length_beyond_the_models_positions_is_refused_before_the_model_loads(gpt2_model, tmp_path, capsys,
                                                                                     no_model_loading):
    """GPT-2 learns its 64 positions: a row TRL cut at --max-length 128 failed in training with an IndexError after
    the model loaded. giva finetune checked this; giva sft did not."""
    folder, positions = gpt2_model, 64
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"prompt": "the film is " + "good " * 100 + "?", "completion": " positive"}) + "\n"
                            for _ in range(20)))
    assert main(cli(folder, data, tmp_path / "out", "--max-length", str(2 * positions))) == 2
    assert (f"max_length={2 * positions} tokens exceeds the {positions} positions the model in {folder} takes (its "
            f"config.json / tokenizer); set --max-length {positions} or less") in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [0, 2.5, "some", True])
def test_sft_options_name_both_kinds_of_num_batches(value):
    """The library's SFTOptions refuses what the CLI's --num-batches refuses, naming ints and 'all'."""
    with pytest.raises(ValueError, match=r"^SFTOptions\.num_batches must be a whole number >= 1 or 'all', got "):
        SFTOptions(num_batches=value)
    assert SFTOptions(num_batches="all").num_batches == "all" and SFTOptions(num_batches=3).num_batches == 3


@pytest.mark.parametrize("extra, available", [([], 8), (["--micro-batch-size", "2"], 7)])
def test_more_calibration_batches_than_the_training_data_holds_are_refused_before_the_model_loads(
        chat_model, pc_jsonl, tmp_path, capsys, no_model_loading, extra, available):
    """30 training rows: 8 batches of 4 (the last one of 2 rows), but with --micro-batch-size 2 the callback draws 2
    micro-batches per calibration batch from 15, so 7. --num-batches beyond that failed in GivaInitCallback, after the
    model loaded, with a traceback (GradientInitError)."""
    flags = ["--max-train-samples", "30", *extra]
    assert main(cli(chat_model, pc_jsonl, tmp_path / "out", *flags, "--num-batches", str(available + 1))) == 2
    assert (f"--num-batches {available + 1} asks for more calibration batches than the training data holds: its 30 "
            f"training rows make {available} batch(es) of --batch-size 4; give --num-batches {available} or less, "
            "or 'all'") in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_the_num_batches_check_counts_the_batches_the_callback_draws(chat_model, pc_jsonl, tmp_path):
    """The bound is what GivaInitCallback can draw: the Trainer's loader on each process, in groups of the gradient
    accumulation; under torchrun Accelerate gives every process ceil(batches / processes) of them."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    for micro in (None, 2, 1):
        opts = options(chat_model, pc_jsonl, tmp_path / "out", max_train_samples=30, micro_batch_size=micro)
        device, path, tokenizer, data = preflight(opts)
        trainer = make_trainer(opts, device, path, tokenizer, data, str(tmp_path / "scratch"))
        drawn = len(trainer.get_train_dataloader()) // trainer.args.gradient_accumulation_steps
        giva.sft.run.check_num_batches(replace(opts, num_batches=drawn), 30, 1)
        with pytest.raises(ValueError, match=f"make {drawn} batch"):
            giva.sft.run.check_num_batches(replace(opts, num_batches=drawn + 1), 30, 1)
    for rows, micro, world, accumulation in ((30, 2, 2, 1), (31, 1, 4, 1), (7, 2, 2, 1), (30, 2, 2, 2)):
        opts = SFTOptions(batch_size=micro * world * accumulation, micro_batch_size=micro)
        shares = {len(BatchSamplerShard(BatchSampler(range(rows), micro, drop_last=False), world, rank))
                  for rank in range(world)}
        assert len(shares) == 1  # every process draws as many
        drawn = shares.pop() // accumulation
        giva.sft.run.check_num_batches(replace(opts, num_batches=drawn), rows, world)
        with pytest.raises(ValueError, match=f"make {drawn} batch"):
            giva.sft.run.check_num_batches(replace(opts, num_batches=drawn + 1), rows, world)


def test_a_gradient_init_error_is_one_line(chat_model, pc_jsonl, tmp_path, capsys, monkeypatch):
    from giva import GradientInitError

    def fails(options):
        raise GradientInitError("the dataloader gave 3 batches but num_batches=4 were asked for")

    monkeypatch.setattr(giva.sft.run, "run_sft", fails)
    assert main(cli(chat_model, pc_jsonl, tmp_path / "out")) == 2
    assert one_error_line(capsys) == "giva sft: error: the dataloader gave 3 batches but num_batches=4 were asked for"


def test_sft_options_refuse_a_seed_numpy_cannot_take():
    """transformers' set_seed seeds numpy, which takes seeds below 2**32: a larger one failed after the model loaded."""
    with pytest.raises(ValueError, match=r"^SFTOptions\.seed must be a whole number <= 4294967295 .*got 4294967296$"):
        SFTOptions(seed=2**32)
    assert SFTOptions(seed=2**32 - 1).seed == 2**32 - 1


# ------------------------------------------------------------------ micro-batches, checkpoints and --resume


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture
def varied_jsonl(tmp_path):
    """Rows that differ from each other (pc_jsonl has two prompts: a gradient over 4 rows is not one over 16), with
    completions of 1 to 3 words, so that a mean loss per micro-batch would weigh their tokens unequally."""
    rng = random.Random(2)
    path = tmp_path / "varied.jsonl"
    answers = ["positive", "negative", "positive good", "negative bad", "positive good great", "negative bad awful"]
    rows = [(" ".join(rng.choices(WORDS[:9], k=rng.randint(3, 8))) + " ?", rng.choice(answers)) for _ in range(40)]
    path.write_text("".join(json.dumps({"prompt": prompt, "completion": " " + label}) + "\n" for prompt, label in rows))
    return path


def test_exact_match_stops_each_answer_at_the_end_token_trl_trained(chat_model, varied_jsonl, tmp_path, monkeypatch):
    """The real generate, its logits forced to write each row's trained completion (ending with the tokenizer's EOS,
    which TRL appends) and then more words. The tiny model's generation config names another end token (as a base
    model given a chat template does), so the answers ran on past the trained reply to the longest completion's
    length: every shorter completion scored a miss."""
    from transformers import LogitsProcessor, LogitsProcessorList

    build, seen = giva.sft.run.make_trainer, []

    def with_oracle(*args, **kwargs):
        trainer = build(*args, **kwargs)
        prompts = giva.sft.run.prompt_ids(trainer.eval_dataset)
        gold = [ids[len(prompt):] for ids, prompt in zip(trainer.eval_dataset["input_ids"], prompts)]
        tokenizer = trainer.processing_class
        assert trainer.model.generation_config.eos_token_id != tokenizer.eos_token_id  # the case this is about
        word, generate = tokenizer.convert_tokens_to_ids("good"), trainer.model.generate

        def forced(input_ids, attention_mask, **kwargs):
            answers = [gold[prompts.index([t for t, m in zip(row, mask) if m])]
                       for row, mask in zip(input_ids.tolist(), attention_mask.tolist())]
            width = input_ids.shape[1]
            seen.append(sorted({len(a) for a in answers}))

            class Oracle(LogitsProcessor):
                def __call__(self, ids, scores):
                    forced_scores = torch.full_like(scores, -1e9)
                    for b, row in enumerate(ids.tolist()):
                        k = len(row) - width
                        forced_scores[b, answers[b][k] if k < len(answers[b]) else word] = 0
                    return forced_scores

            return generate(input_ids=input_ids, attention_mask=attention_mask,
                            logits_processor=LogitsProcessorList([Oracle()]), **kwargs)

        trainer.model.generate = forced
        return trainer

    monkeypatch.setattr(giva.sft.run, "make_trainer", with_oracle)
    result, _, _ = train_sft(options(chat_model, varied_jsonl, tmp_path / "out", max_steps=1))
    assert any(len(lengths) > 1 for lengths in seen)  # completions of several lengths in one batch
    assert result.exact_match_before == result.exact_match_after == 1.0


def test_micro_batches_accumulate_to_the_same_optimizer_step(chat_model, varied_jsonl, tmp_path):
    """--micro-batch-size splits each --batch-size step into accumulated forwards: the calibration still reads
    --num-batches batches of --batch-size rows (every completion token weighed alike), and training takes the same
    steps (equal up to float sums)."""
    whole, _, _ = train_sft(options(chat_model, varied_jsonl, tmp_path / "whole", batch_size=8, num_batches=2,
                                    max_steps=None))
    split, _, _ = train_sft(options(chat_model, varied_jsonl, tmp_path / "split", batch_size=8, micro_batch_size=2,
                                    num_batches=2, max_steps=None))
    assert (whole.steps, split.steps) == (4, 4) and split.options["micro_batch_size"] == 2  # one epoch of 32 rows
    a, b = adapter_tensors(tmp_path / "whole"), adapter_tensors(tmp_path / "split")
    for key in a:
        if "giva_A" in key:  # the bases: the gradient over the same 16 rows
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)
        elif "lambda" in key:  # four AdamW steps on the same rows, float sums in another order (Adam amplifies them)
            torch.testing.assert_close(b[key], a[key], rtol=1e-2, atol=1e-4, msg=key)
    # the same loss at every step, up to float sums: 3.6e-6 relative apart on transformers 4.57 (4.56.2: within 1e-6)
    assert split.train_loss == pytest.approx(whole.train_loss, rel=1e-5 if TRANSFORMERS_4 else 1e-6)
    # validation batches of 2 rows against 8: the loss per completion token of the same base model
    assert split.val_loss_before == pytest.approx(whole.val_loss_before, rel=1e-6)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "padding-free"])
def test_the_validation_loss_is_the_mean_over_every_scored_token_whatever_the_batch(chat_model, varied_jsonl, tmp_path,
                                                                                   packing):
    """The validation loss is the completion tokens' losses summed over the whole split, over their count: the same
    for 1, 3 or 8 rows per forward (padded, or padding-free as the collator gives them with --packing) and equal to
    each row scored alone. The Trainer's eval_loss, which it replaced, averages each batch's mean over the rows, so
    with completions of 1 to 3 words it moves with the batch size (checked, so that this test can fail)."""
    from giva.sft.evaluation import validation_loss

    opts = options(chat_model, varied_jsonl, tmp_path / "out", packing=packing)
    device, path, tokenizer, data = giva.sft.run.preflight(opts)
    trainer = giva.sft.run.make_trainer(opts, device, path, tokenizer, data, str(tmp_path / "scratch"))
    model = trainer.model.train()
    with model.disable_adapter(), torch.no_grad():
        losses = {size: validation_loss(trainer, size) for size in (1, 3, 8)}
        assert model.training  # left as it was (scored in eval mode)
        model.eval()
        total = tokens = 0.0
        for row in trainer.eval_dataset:  # each row alone, unpadded: the token losses summed by hand
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
            logits = model(input_ids=ids).logits[0, :-1].double()
            scored = labels[1:] != -100
            total += torch.nn.functional.cross_entropy(logits[scored], labels[1:][scored], reduction="sum").item()
            tokens += scored.sum().item()
        trainers = {}
        for size in (1, 8):
            trainer.args.per_device_eval_batch_size = size
            trainers[size] = trainer.evaluate()["eval_loss"]
    assert losses[1] == pytest.approx(total / tokens, rel=1e-6)
    assert losses[3] == pytest.approx(losses[1], rel=1e-6) and losses[8] == pytest.approx(losses[1], rel=1e-6)
    assert abs(trainers[1] - trainers[8]) > 1e-3 * trainers[1]  # the Trainer's own figure does move


@pytest.mark.parametrize(("attention", "device"), [("sdpa", "cpu"), ("eager", "cpu"), pytest.param("sdpa", "cuda", marks=[cuda, needs_trl])])
def test_a_packed_step_is_the_padded_step_over_the_same_rows(chat_model, varied_jsonl, tmp_path, attention, device):
    """--packing lays rows end to end in one sequence, told apart by their position_ids (padding-free): transformers
    masks attention between them, so one packed sequence of 8 rows gives the calibration gradient, the loss and the
    update of a padded batch of the same 8 rows (equal up to float sums). Attention across the rows fails it."""
    common = dict(max_train_samples=8, max_steps=None, num_batches=1, attn_implementation=attention, device=device)
    padded, _, _ = train_sft(options(chat_model, varied_jsonl, tmp_path / "padded", batch_size=8, **common))
    packed, _, _ = train_sft(options(chat_model, varied_jsonl, tmp_path / "packed", batch_size=1, packing=True, **common))
    assert (padded.steps, packed.steps, padded.packed_sequences, packed.packed_sequences) == (1, 1, None, 1)
    assert "8 training rows (packed into 1 sequences)" in packed.summary()
    a, b = adapter_tensors(tmp_path / "padded"), adapter_tensors(tmp_path / "packed")
    # on a GPU the two layouts take other kernels, whose float sums an SVD amplifies where singular values lie close
    # (3.4e-4 between one and two processes on the CPU, docs/sft.md): looser there; attention across the rows moves
    # the loss by far more than 1e-4
    basis, vectors, loss = (1e-5, 1e-3, 1e-5) if device == "cpu" else (1e-3, 1e-2, 1e-4)
    for key in a:
        if "giva_A" in key:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=basis, msg=key)
        elif "lambda" in key:
            torch.testing.assert_close(b[key], a[key], rtol=vectors, atol=1e-5, msg=key)
    assert packed.train_loss == pytest.approx(padded.train_loss, rel=loss)
    # validation rows one at a time (--batch-size 1) against 8 at once, padding-free: the same loss per token
    assert packed.val_loss_before == pytest.approx(padded.val_loss_before, rel=loss / 10)


def test_packing_sizes_the_schedule_and_the_calibration_check_by_sequences(chat_model, varied_jsonl, tmp_path):
    """With --packing the loader's rows are the packed sequences: the warm-up, the logging cadence and the
    --num-batches check count them (a --num-batches the rows allow but the sequences do not is refused)."""
    opts = options(chat_model, varied_jsonl, tmp_path / "out", packing=True, max_length=64, batch_size=2, max_steps=None,
                   epochs=10)
    device, path, tokenizer, data = preflight(opts)
    trainer = make_trainer(opts, device, path, tokenizer, data, str(tmp_path / "scratch"))
    sequences = len(trainer.train_dataset)
    assert 1 < sequences < len(data.train) and sum(map(len, trainer.train_dataset["seq_lengths"])) == len(data.train)
    steps = 10 * math.ceil(sequences / 2)
    assert (trainer.args.warmup_steps, trainer.args.logging_steps) == (int(0.06 * steps), max(1, steps // 20))
    unpacked = make_trainer(replace(opts, packing=False), device, path, tokenizer, data, str(tmp_path / "scratch"))
    steps = 10 * math.ceil(len(data.train) / 2)  # unpacked, the rows
    assert (unpacked.args.warmup_steps, unpacked.args.logging_steps) == (int(0.06 * steps), max(1, steps // 20))
    too_many = math.ceil(sequences / 2) + 1  # within the 16 batches of 2 rows the preflight counts
    with pytest.raises(ValueError, match=rf"its {sequences} packed sequences of --max-length 64 make "
                                         rf"{too_many - 1} batch\(es\) of --batch-size 2"):
        train_sft(replace(opts, num_batches=too_many))
    assert not (tmp_path / "out").exists()


def test_a_packed_row_whose_completion_the_max_length_cuts_off_counts_as_untrained():
    """Packed, TRL keeps a row whose completion --max-length cut off (unpacked, it drops it): the truncation check
    counts the rows that still carry a label."""
    from datasets import Dataset

    packed = Dataset.from_dict({"labels": [[-100, 5, -100, -100, -100, 7], [-100, -100]],
                                "seq_lengths": [[2, 3, 1], [2]]})
    assert giva.sft.run.trained_rows(packed) == 2  # rows 1 and 3 of the first sequence; the second and the last have none
    assert giva.sft.run.trained_rows(Dataset.from_dict({"labels": [[1], [2], [3]]})) == 3
    rng = random.Random(0)  # more sequences than one read of the set holds (it reads 1024 at a time)
    lengths = [[rng.randint(1, 4) for _ in range(rng.randint(1, 5))] for _ in range(2500)]
    labels = [[rng.choice([-100, -100, 3]) for _ in range(sum(row))] for row in lengths]
    expected = sum(any(label != -100 for label in seq[sum(row[:i]):sum(row[: i + 1])])
                   for seq, row in zip(labels, lengths) for i in range(len(row)))
    assert giva.sft.run.trained_rows(Dataset.from_dict({"labels": labels, "seq_lengths": lengths})) == expected


def test_a_cut_in_the_last_assistant_turn_of_a_conversation_counts_as_a_cut_completion():
    """A row cut inside its completion fills --max-length and its completion lost its end-of-turn token. With several
    assistant turns the earlier turns keep theirs: only the last labelled run is the one --max-length can cut."""
    from giva.sft.evaluation import cut_completions

    end = 9  # the chat template's end-of-turn token
    rows = {
        "input_ids": [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, end], [1, 3, end, 2, 4, 5], [1, 3, end, 2, 4, end, 2],
                      [1, 3, end, 2, 2, 2]],
        "labels": [[-100, -100, 3, 4, 5, 6], [-100, -100, 3, 4, 5, end], [-100, 3, end, -100, 4, 5],
                   [-100, 3, end, -100, 4, end, -100], [-100, 3, end, -100, -100, -100]],
    }
    # single turn cut; single turn whole; second turn cut (was missed: the first turn's end token counted);
    # second turn whole; cut in the user's second turn after a whole first reply (no completion cut)
    assert [cut_completions({k: [v[i]] for k, v in rows.items()}, 6, {end}) for i in range(5)] == [1, 0, 1, 0, 0]
    assert cut_completions(rows, 6, {end}) == 2


class _Preempted(Exception):
    pass


def cut_off_at(step: int, monkeypatch, after_checkpoint: bool = False) -> None:
    """Make the next train_sft raise _Preempted at the end of optimizer step ``step`` (a job killed then), before the
    Trainer writes that step's checkpoint, or, with ``after_checkpoint``, once it has written it."""
    from transformers import TrainerCallback

    class CutOff(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step and not after_checkpoint:
                raise _Preempted

        def on_save(self, args, state, control, **kwargs):
            if state.global_step == step and after_checkpoint:
                raise _Preempted

    build = giva.sft.run.make_trainer

    def preempted(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(CutOff())
        return trainer

    monkeypatch.setattr(giva.sft.run, "make_trainer", preempted)


def test_a_run_cut_off_after_a_checkpoint_resumes_to_the_same_adapter(chat_model, pc_jsonl, tmp_path, monkeypatch, capsys,
                                                                      caplog):
    whole, _, _ = train_sft(options(chat_model, pc_jsonl, tmp_path / "whole", save_steps=2))
    assert sorted(p.name for p in (tmp_path / "whole-checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    out, checkpoints = tmp_path / "out", tmp_path / "out-checkpoints"
    cut_off_at(3, monkeypatch)  # during step 4, after checkpoint-2 was written
    with pytest.raises(_Preempted):
        train_sft(options(chat_model, pc_jsonl, out, save_steps=2))
    monkeypatch.undo()
    assert not out.exists() and [p.name for p in checkpoints.glob("checkpoint-*")] == ["checkpoint-2"]
    (checkpoints / "checkpoint-4").mkdir()  # killed while writing checkpoint-4: the Trainer writes trainer_state.json last
    (checkpoints / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"")

    assert main(cli(chat_model, pc_jsonl, out, "--save-steps", "2")) == 2  # a fresh run would mix its checkpoints in
    assert "holds an earlier run's checkpoints; pass --resume to continue that run" in one_error_line(capsys)
    assert main(cli(chat_model, pc_jsonl, out, "--resume", "--lr", "0.02", "--r", "3")) == 2
    assert ("flags differ from the run in" in (line := one_error_line(capsys))
            and "--lr 0.01 -> 0.02; --r 2 -> 3" in line)
    edited = tmp_path / "edited.jsonl"  # the rows changed (under any name)
    edited.write_text(pc_jsonl.read_text().replace("great", "good"))
    assert main(cli(chat_model, edited, out, "--resume")) == 2
    assert "are not those of the run in" in one_error_line(capsys) and not out.exists()

    for name in ("optimizer.pt", "scheduler.pt"):  # deleted to save space: the Trainer restarted both, silently
        (checkpoints / "checkpoint-2" / name).rename(tmp_path / name)
        assert main(cli(chat_model, pc_jsonl, out, "--resume")) == 2
        assert f"checkpoint-2 has no {name}, which the Trainer resumes the optimizer" in one_error_line(capsys)
        (tmp_path / name).rename(checkpoints / "checkpoint-2" / name)

    moved = tmp_path / "moved.jsonl"  # the same rows elsewhere: --data may change
    moved.write_bytes(pc_jsonl.read_bytes())
    resumed, _, _ = train_sft(options(chat_model, moved, out, resume=True))  # --save-steps kept from the run
    assert resumed.resumed_from == str(checkpoints / "checkpoint-2") and resumed.steps == 4
    assert "checkpoint-4 has no trainer_state.json" in caplog.text
    assert (checkpoints / "checkpoint-4" / "trainer_state.json").is_file() and resumed.init_seconds == 0.0
    a, b = adapter_tensors(tmp_path / "whole"), adapter_tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert resumed.val_loss_after == whole.val_loss_after


def test_eval_steps_logs_a_validation_loss_curve_that_survives_a_resume(chat_model, varied_jsonl, tmp_path, monkeypatch):
    """--eval-steps 2 over 6 steps: the validation loss after steps 2, 4 and 6, in sft_result.json, the summary and
    TensorBoard; the last point is the loss scored after training (the same model, batches and eval mode). A run cut
    off after step 3 and resumed from checkpoint-2 reports the same curve: the earlier points come from the
    checkpoint's log history, the later ones from the same adapter states (bit-identical resumption)."""
    pytest.importorskip("tensorboardX")
    common = dict(max_steps=6, eval_steps=2, save_steps=2, eval_batch_size=3)
    whole, _, _ = train_sft(options(chat_model, varied_jsonl, tmp_path / "whole", report_to="tensorboard", **common))
    curve = whole.val_loss_curve
    assert [step for step, _ in curve] == [2, 4, 6] and curve[-1][1] == whole.val_loss_after
    assert len({loss for _, loss in curve}) == 3 and curve[0][1] != whole.val_loss_before
    assert json.loads((tmp_path / "whole" / "sft_result.json").read_text())["val_loss_curve"] == curve
    lowest = min(curve, key=lambda point: point[1])
    assert f", lowest {lowest[1]:.4f} at step {lowest[0]}" in whole.summary()
    scalars = tensorboard_scalars(tmp_path / "whole-logs")
    logged = scalars["eval/loss"]
    assert [step for step, _ in logged] == [2, 4, 6]
    # the training loss still logged at every step (20 logs over 6 steps), those that validated too
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in logged] == pytest.approx([loss for _, loss in curve], rel=1e-6)  # float32 in the event file

    cut_off_at(3, monkeypatch)
    with pytest.raises(_Preempted):
        train_sft(options(chat_model, varied_jsonl, tmp_path / "out", **common))
    monkeypatch.undo()
    resumed, _, _ = train_sft(options(chat_model, varied_jsonl, tmp_path / "out", resume=True, **common))
    assert resumed.resumed_from.endswith("checkpoint-2") and resumed.val_loss_curve == curve
    assert "lowest" not in replace(whole, val_loss_curve=None).summary()


def test_a_save_steps_given_with_resume_replaces_the_stored_one(chat_model, pc_jsonl, tmp_path, monkeypatch):
    out, checkpoints = tmp_path / "out", tmp_path / "out-checkpoints"
    cut_off_at(3, monkeypatch)
    with pytest.raises(_Preempted):
        train_sft(options(chat_model, pc_jsonl, out, save_steps=2, max_steps=6))
    monkeypatch.undo()
    train_sft(options(chat_model, pc_jsonl, out, save_steps=1, max_steps=6, resume=True))
    # every step from the resumed one on (the newest two kept); the Trainer alone would have kept the stored 2: 4, 6
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]


def test_a_finished_run_whose_save_failed_is_saved_again_without_training(chat_model, pc_jsonl, tmp_path, capsys):
    out, checkpoints = tmp_path / "out", tmp_path / "out-checkpoints"
    first, _, _ = train_sft(options(chat_model, pc_jsonl, out, save_steps=3, eval_steps=2))  # the last step saved too
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    (tmp_path / "kept").mkdir()
    (out / "adapter_model.safetensors").rename(tmp_path / "kept" / "adapter_model.safetensors")
    for leftover in out.iterdir():  # as if the final save had failed
        leftover.unlink()
    out.rmdir()
    again, _, _ = train_sft(options(chat_model, pc_jsonl, out, resume=True, eval_steps=2))
    assert (again.steps, again.train_loss, again.resumed_from) == (4, None, str(checkpoints / "checkpoint-4"))
    assert again.val_loss_curve == first.val_loss_curve and len(first.val_loss_curve) == 2  # from the checkpoint's log
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]  # no step 5
    a, b = adapter_tensors(tmp_path / "kept"), adapter_tensors(out)
    assert all(torch.equal(a[k], b[k]) for k in a) and again.val_loss_after == first.val_loss_after
    assert json.loads((out / "sft_result.json").read_text())["train_loss"] is None  # strict JSON: null, not NaN
    assert main(cli(chat_model, pc_jsonl, out, "--resume", "--overwrite")) == 2  # now saved: nothing to resume
    assert "finished (step 4) and its adapter is in --output-dir" in one_error_line(capsys)


def record_folder(tmp_path, chat_model, data, **stored_options) -> Path:
    """A checkpoint folder as a run leaves it after checkpoint-2 of 4, its record holding ``stored_options``."""
    folder = tmp_path / "out-checkpoints"
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2, "max_steps": 4}))
    for name in ("optimizer.pt", "scheduler.pt"):
        (folder / "checkpoint-2" / name).write_bytes(b"")
    record = giva.sft.checkpoints.run_record(options(chat_model, "rows.jsonl", tmp_path / "out", save_steps=2, **stored_options), data)
    (folder / "giva_sft_options.json").write_text(json.dumps(record))
    return folder


def test_resume_compares_what_changes_training_and_nothing_else(chat_model, tmp_path, monkeypatch):
    from giva.sft.checkpoints import check_checkpoints
    from giva.sft.data import SFTData

    data = SFTData(train=[{"prompt": "a", "completion": "b"}], validation=[{"prompt": "c", "completion": "d"}],
                   source="rows", labels=None)
    folder = record_folder(tmp_path, chat_model, data, target_modules=["q_proj", "v_proj"])
    monkeypatch.chdir(chat_model.parent)  # the model as a relative path, from another folder than the record's
    given = options(chat_model.name, "moved.jsonl", tmp_path / "out", resume=True, target_modules=["v_proj", "q_proj"],
                    micro_batch_size=2, device="cpu")
    resumed_options, checkpoint = check_checkpoints(given, data)  # module order, the model's spelling, --data: fine
    assert checkpoint == str(folder / "checkpoint-2") and resumed_options.save_steps == 2  # the stored cadence
    record = json.loads((folder / "giva_sft_options.json").read_text())
    del record["options"]["init_mode"]  # a record from before that flag existed: compared with its default
    (folder / "giva_sft_options.json").write_text(json.dumps(record))
    assert check_checkpoints(given, data)[1] == checkpoint
    with pytest.raises(ValueError, match=r"--init-mode 'auto' -> 'exact'"):
        check_checkpoints(replace(given, init_mode="exact"), data)
    # what only scores, logs or reports may change; the training recipe may not
    watched = replace(given, eval_steps=3, eval_batch_size=5, logging_steps=7, report_to="all", logging_dir="tb")
    assert check_checkpoints(watched, data)[1] == checkpoint
    with pytest.raises(ValueError, match=r"--lr-scheduler 'linear' -> 'cosine'; --warmup-ratio 0.06 -> 0.1; "
                                         r"--weight-decay 0.0 -> 0.01; --max-grad-norm 1.0 -> 0.5; --dropout 0.0 -> 0.05; resume"):
        check_checkpoints(replace(given, lr_scheduler="cosine", warmup_ratio=0.1, weight_decay=0.01, max_grad_norm=0.5,
                                  dropout=0.05), data)
    (folder / "giva_sft_options.json").unlink()
    with pytest.raises(FileNotFoundError, match="holds checkpoints but no giva_sft_options.json"):
        check_checkpoints(given, data)
    empty = options(chat_model, "rows.jsonl", tmp_path / "new", resume=True)  # nothing to resume, nothing to save
    with pytest.raises(ValueError, match="without --save-steps N this run would write no checkpoint"):
        check_checkpoints(empty, data)


@pytest.mark.parametrize("content", ["", "{\"global_step\": 4, \"max_st", "[]", "{\"global_step\": \"4\"}", "\xff"])
def test_a_checkpoint_whose_trainer_state_is_empty_or_invalid_counts_as_cut_off(chat_model, tmp_path, caplog, content):
    """A machine that went down while the Trainer wrote trainer_state.json (its last file) leaves it empty or half
    written: --resume failed on it with an unnamed JSON error; it warns, naming the file, and resumes from the
    checkpoint before."""
    from giva.sft.checkpoints import check_checkpoints
    from giva.sft.data import SFTData

    data = SFTData(train=[{"prompt": "a", "completion": "b"}], validation=[{"prompt": "c", "completion": "d"}],
                   source="rows", labels=None)
    folder = record_folder(tmp_path, chat_model, data)
    (folder / "checkpoint-4").mkdir()
    (folder / "checkpoint-4" / "trainer_state.json").write_bytes(content.encode("latin-1"))
    _, checkpoint = check_checkpoints(options(chat_model, "rows.jsonl", tmp_path / "out", resume=True), data)
    assert checkpoint == str(folder / "checkpoint-2")
    assert (f"--resume: {folder / 'checkpoint-4' / 'trainer_state.json'} is empty or invalid (cut off while being "
            "written); resuming from checkpoint-2") in caplog.text


def test_a_checkpoint_without_its_optimizer_or_schedule_is_refused_unless_training_is_over(chat_model, tmp_path):
    from giva.sft.checkpoints import check_checkpoints
    from giva.sft.data import SFTData

    data = SFTData(train=[{"prompt": "a", "completion": "b"}], validation=[{"prompt": "c", "completion": "d"}],
                   source="rows", labels=None)
    folder = record_folder(tmp_path, chat_model, data)
    given = options(chat_model, "rows.jsonl", tmp_path / "out", resume=True)
    (folder / "checkpoint-2" / "optimizer.pt").rename(folder / "checkpoint-2" / "optimizer.bin")  # the other name
    assert check_checkpoints(given, data)[1] == str(folder / "checkpoint-2")
    (folder / "checkpoint-2" / "optimizer.bin").unlink()
    (folder / "checkpoint-2" / "scheduler.pt").unlink()
    with pytest.raises(FileNotFoundError, match="checkpoint-2 has no optimizer.pt and no scheduler.pt, which the Trainer"):
        check_checkpoints(given, data)
    (folder / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 4, "max_steps": 4}))
    assert check_checkpoints(given, data)[1] == str(folder / "checkpoint-2")  # trained to the end: only scored


def test_a_run_cut_off_before_its_first_checkpoint_starts_again(chat_model, pc_jsonl, tmp_path, monkeypatch, caplog):
    """Nothing to resume yet: the folder holds only the run's record. A rerun, with or without --resume (so a
    job script can always pass it), starts from the first step."""
    whole, _, _ = train_sft(options(chat_model, pc_jsonl, tmp_path / "whole"))
    out, checkpoints = tmp_path / "out", tmp_path / "out-checkpoints"
    cut_off_at(1, monkeypatch)
    with pytest.raises(_Preempted):
        train_sft(options(chat_model, pc_jsonl, out, save_steps=2))
    monkeypatch.undo()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["giva_sft_options.json"]
    again, _, _ = train_sft(options(chat_model, pc_jsonl, out, resume=True))
    assert again.resumed_from is None and again.steps == 4 and "holds no finished checkpoint yet" in caplog.text
    assert (checkpoints / "checkpoint-4").is_dir()  # the stored --save-steps 2
    a, b = adapter_tensors(tmp_path / "whole"), adapter_tensors(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_that_another_process_sees_as_a_fresh_start_is_refused(chat_model, pc_jsonl, tmp_path, monkeypatch):
    """The wiring of check_same_resume: each process's resumed step goes through the launch's all-gather before any
    training, and a process that found no checkpoint (a --checkpoint-dir on a disk only some nodes see) stops the
    resume; the checkpoint stays as it was and no adapter is written."""
    import giva.integrations.distributed

    out, checkpoints = tmp_path / "out", tmp_path / "out-checkpoints"
    cut_off_at(3, monkeypatch)
    with pytest.raises(_Preempted):
        train_sft(options(chat_model, pc_jsonl, out, save_steps=2))
    monkeypatch.undo()
    before = adapter_tensors(checkpoints / "checkpoint-2")
    gathered = []

    def two_processes(value):  # process 1 of a pretended launch found the folder empty
        gathered.append(value)
        return [value, None]

    monkeypatch.setattr(giva.integrations.distributed, "every_rank", two_processes)
    with pytest.raises(RuntimeError, match=r"different checkpoints in --checkpoint-dir '.*out-checkpoints' \(process 0: "
                                           r"step 2, process 1: a fresh start\)"):
        train_sft(options(chat_model, pc_jsonl, out, resume=True))
    assert gathered == [2] and not out.exists()
    after = adapter_tensors(checkpoints / "checkpoint-2")
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_checkpoints_need_a_folder_of_their_own(chat_model, pc_jsonl, tmp_path, capsys, no_model_loading):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    cases = [
        (["--checkpoint-dir", str(tmp_path / "out")], "and --output-dir"),
        (["--checkpoint-dir", str(tmp_path / "out" / "ckpt")], "are the same folder or one holds the other"),
        (["--checkpoint-dir", str(tmp_path / "lora")], "and --export-lora"),
        (["--checkpoint-dir", str(tmp_path)], "and --output-dir"),  # it would hold the output folder
        (["--checkpoint-dir", str(tmp_path / "notes")], "is a non-empty folder that holds no giva sft run"),
    ]
    for extra, message in cases:
        argv = cli(chat_model, pc_jsonl, tmp_path / "out", "--export-lora", str(tmp_path / "lora"), "--save-steps", "2",
                   *extra)
        assert main(argv) == 2, extra
        assert message in one_error_line(capsys), extra
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    # without --save-steps / --resume no checkpoint folder is used, so the default path cannot clash
    options(chat_model, pc_jsonl, tmp_path / "o", export_lora=str(tmp_path / "o-checkpoints"))


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")
def test_under_torchrun_one_process_writes_and_the_bases_match_one_process(chat_model, varied_jsonl, tmp_path, monkeypatch):
    """Two gloo processes, 2 rows per forward: --batch-size stays the rows per optimizer step, the bases come from
    the same 16 rows as in one process (completion tokens weighed alike), only rank 0 prints and saves, a failed
    save makes both raise, so does a load that fails on rank 1 only, exact match sums both halves, and the process
    group is closed at the end."""
    flags = ("--batch-size", "8", "--micro-batch-size", "2", "--num-batches", "2")
    single, _, _ = train_sft(options(chat_model, varied_jsonl, tmp_path / "single", batch_size=8, num_batches=2))
    monkeypatch.setenv("GIVA_TEST_WORSE_STEP", "4")  # step 4's validation loss raised by 1: --keep-best keeps step 2
    records = run_torchrun("sft_cli.py", tmp_path / "launch", args=cli(chat_model, varied_jsonl, tmp_path / "two",
                                                                        *flags, "--eval-steps", "2", "--keep-best",
                                                                        "--json")).json()
    assert [r["code"] for r in records] == [0, 0] and [r["group_left_open"] for r in records] == [False, False]
    assert [len(r["saves"]) for r in records] == [1, 0]
    assert records[1]["stdout"] == "" and "\nadapter " not in records[1]["stderr"]
    summary = records[0]["stderr"]  # --json: the summary goes to stderr, stdout is the JSON alone
    assert summary.count("\nadapter ") == 1 and "4 (mean training loss" in summary and ", 2 processes" in summary
    result = json.loads(records[0]["stdout"])
    assert (result["processes"], result["steps"], result["train_rows"]) == (2, single.steps, single.train_rows)
    a, b = adapter_tensors(tmp_path / "single"), adapter_tensors(tmp_path / "two")
    bases = [k for k in a if "giva_A" in k]
    assert bases and all(torch.allclose(b[k], a[k], rtol=0, atol=1e-5) for k in bases)
    assert [r["exact_match"] for r in records] == [records[0]["expected"]] * 2 == [4 / 7] * 2
    # validation rows split over the two processes, 2 per forward, against 8 in one: the same loss per token
    assert result["val_loss_before"] == pytest.approx(single.val_loss_before, rel=1e-6)
    # --eval-steps: both processes score their halves at steps 2 and 4 (a collective each time); with step 4's loss
    # raised, --keep-best keeps step 2 (both processes restore it, and score it again: the same loss as at step 2)
    curve = result["val_loss_curve"]
    assert [step for step, _ in curve] == [2, 4] and curve[1][1] > curve[0][1]
    assert result["kept_step"] == 2 and result["val_loss_after"] == curve[0][1]
    assert records[0]["raised"] == "OSError: No space left on device"
    assert records[1]["raised"] == ("RuntimeError: the first process of the launch failed to write the results: "
                                    "OSError: No space left on device")
    assert records[1]["raised_every"] == "KeyError: 'missing adapter weights'"  # rank 0 did not wait at a collective
    assert records[0]["raised_every"] == "RuntimeError: loading failed (process 1): KeyError: 'missing adapter weights'"
    reloaded, _ = load_sft_adapter(str(tmp_path / "two"))  # what rank 0 saved loads in one process
    assert sum(p.numel() for n, p in reloaded.named_parameters() if "giva_lambda" in n) == result["trainable_parameters"]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed (extra 'distributed')")
def test_under_deepspeed_zero3_the_run_matches_data_parallelism_and_resumes(chat_model, pc_jsonl, tmp_path, monkeypatch,
                                                                             capsys):
    """`accelerate launch` with ZeRO-3 (its variables, under torchrun): the model loads partitioned, the base model is
    scored once the engine exists, validation (9 rows, one per forward: 5 and 4 per process) and exact match (4
    prompts per call: 2 and 1 calls) run in lockstep, the second process forwarding a filler each time, a worse
    step 4 makes --keep-best write step 2's vectors back into the partitioned parameters, and the adapter and its LoRA
    export are gathered whole to be written. Everything against plain torchrun (DDP) with the same flags: the same
    scores, the same kept step, the same adapter up to float sums (before, the launch was refused; without the gather
    the saved vectors were empty). Cut off after checkpoint-2, the run resumes under ZeRO-3 from DeepSpeed's
    checkpoint to the same adapter bit for bit; a launch without DeepSpeed is refused that checkpoint (it went on
    with a fresh optimizer, to another adapter, and exit 0)."""
    if TRANSFORMERS_4:  # refused before the model loads (test_a_launch_that_shards_the_weights_is_refused_...)
        pytest.skip("giva sft under ZeRO-3 needs transformers >= 5")
    monkeypatch.setenv("GIVA_TEST_WORSE_STEP", "4")
    flags = ("--val-size", "9", "--eval-batch-size", "1", "--eval-steps", "2", "--keep-best", "--save-steps", "2",
             "--json")
    zero3_launch = (("ACCELERATE_USE_DEEPSPEED", "true"), ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3"), ("DS_ACCELERATOR", "cpu"))
    runs = {}
    for name in ("ddp", "zero3"):
        with monkeypatch.context() as env:
            if name == "zero3":
                for variable, value in zero3_launch:
                    env.setenv(variable, value)
            records = run_torchrun("sft_cli.py", tmp_path / f"launch-{name}", args=cli(
                chat_model, pc_jsonl, tmp_path / name, *flags, "--export-lora", str(tmp_path / f"{name}-lora"))).json()
        assert [r["code"] for r in records] == [0, 0], records[0]["stderr"][-2000:]
        assert [any(r["partitioned"]) for r in records] == [name == "zero3"] * 2
        # each process's own bases, compared before anything could broadcast them (ZeRO-3 broadcasts no buffer)
        assert records[0]["bases"] is not None and records[0]["bases"] == records[1]["bases"]
        runs[name] = json.loads(records[0]["stdout"])
        assert ("2 processes, the base partitioned by DeepSpeed ZeRO-3\n" in records[0]["stderr"]) == (name == "zero3")
    ddp, zero3 = runs["ddp"], runs["zero3"]
    assert zero3["processes"] == 2 and zero3["kept_step"] == ddp["kept_step"] == 2
    assert (zero3["zero3"], ddp["zero3"]) == (True, False)
    assert zero3["val_loss_before"] == pytest.approx(ddp["val_loss_before"], rel=1e-6)
    assert [s for s, _ in zero3["val_loss_curve"]] == [2, 4]
    assert [v for _, v in zero3["val_loss_curve"]] == pytest.approx([v for _, v in ddp["val_loss_curve"]], rel=1e-5)
    assert zero3["val_loss_after"] == pytest.approx(ddp["val_loss_after"], rel=1e-5)
    # step 2's vectors written back into the partitioned parameters: scored again, step 2's loss, not step 4's
    (_, second), (_, fourth) = zero3["val_loss_curve"]
    assert zero3["val_loss_after"] == pytest.approx(second, rel=1e-6) and abs(fourth - 1 - second) > 1e-4
    assert (zero3["exact_match_before"], zero3["exact_match_after"]) == (ddp["exact_match_before"], ddp["exact_match_after"])
    assert zero3["trainable_parameters"] == ddp["trainable_parameters"]
    for folder in ("{}", "{}-lora"):
        a, b = adapter_tensors(tmp_path / folder.format("zero3")), adapter_tensors(tmp_path / folder.format("ddp"))
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
        assert all(torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=1e-4) for k in a)
    trained = adapter_tensors(tmp_path / "zero3")  # lambda_o starts at 0: step 2's vectors, not the initial ones
    assert all(trained[k].abs().max() > 0 for k in trained if "giva_lambda_o" in k)
    reloaded, _ = load_sft_adapter(str(tmp_path / "zero3"))  # written whole: it loads in one process
    assert sum(p.numel() for n, p in reloaded.named_parameters() if "giva_lambda" in n) == ddp["trainable_parameters"]

    shutil.rmtree(tmp_path / "zero3")  # cut off after checkpoint-2
    shutil.rmtree(tmp_path / "zero3-checkpoints" / "checkpoint-4")
    capsys.readouterr()
    assert main(cli(chat_model, pc_jsonl, tmp_path / "zero3", *flags, "--resume")) == 2  # without DeepSpeed
    assert one_error_line(capsys) == (
        f"giva sft: error: --resume: {tmp_path / 'zero3-checkpoints' / 'checkpoint-2'} was written under ZeRO-3 on 2 "
        "processes, and this is a launch without DeepSpeed: resume it under the launch that wrote it (the optimizer "
        "state is in its format)")
    with monkeypatch.context() as env:
        for variable, value in zero3_launch:
            env.setenv(variable, value)
        records = run_torchrun("sft_cli.py", tmp_path / "launch-resumed", args=cli(
            chat_model, pc_jsonl, tmp_path / "zero3", *flags, "--resume")).json()
    assert [r["code"] for r in records] == [0, 0], records[0]["stderr"][-2000:]
    resumed = json.loads(records[0]["stdout"])
    assert resumed["resumed_from"] == str(tmp_path / "zero3-checkpoints" / "checkpoint-2")
    assert (resumed["steps"], resumed["kept_step"], resumed["init_seconds"]) == (4, 2, 0.0)  # bases from the checkpoint
    again = adapter_tensors(tmp_path / "zero3")
    assert again.keys() == trained.keys() and all(torch.equal(again[k], trained[k]) for k in trained)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed (extra 'distributed')")
@pytest.mark.skipif(TRANSFORMERS_4, reason="giva sft under ZeRO-3 needs transformers >= 5")
def test_a_failure_while_scoring_under_zero3_stops_every_process(chat_model, pc_jsonl, tmp_path, monkeypatch):
    """Under ZeRO-3 every forward waits for all processes: process 1 failing at its second validation batch (before
    the forward process 0 is already in) left process 0 waiting in the weights' all-gather until the group's timeout.
    The failure now goes through the process group's store and the group is aborted: process 1 stops at once, naming
    its error, and process 0 either raises the same or is stopped by torchrun when process 1 exits (which comes first
    depends on timing: on CI its log was empty)."""
    for variable, value in (("ACCELERATE_USE_DEEPSPEED", "true"), ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3"),
                            ("DS_ACCELERATOR", "cpu"), ("GIVA_TEST_FAIL_SCORING", "1")):
        monkeypatch.setenv(variable, value)
    with pytest.raises(TorchrunFailed) as failed:
        run_torchrun("sft_cli.py", tmp_path / "launch", timeout_s=150,
                     args=cli(chat_model, pc_jsonl, tmp_path / "out", "--val-size", "9", "--eval-batch-size", "1"))
    assert "did not finish" not in str(failed.value)  # before: still waiting when killed
    named = "the validation loss failed on process 1 of 2: MemoryError: injected at the second validation batch"
    logs = {log.parent.name: log.read_text() for log in (tmp_path / "launch").glob("**/attempt_*/*/stderr.log")}
    assert sorted(logs) == ["0", "1"] and named in logs["1"]
    assert named in logs["0"] or "failed on process" not in logs["0"]  # raised the same, or stopped before it could
    assert not (tmp_path / "out").exists()


REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"


@pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate's launcher not installed next to the interpreter")
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed (extra 'distributed')")
@pytest.mark.skipif(TRANSFORMERS_4, reason="giva sft under ZeRO-3 needs transformers >= 5")
def test_accelerate_launch_with_the_example_zero3_config(chat_model, pc_jsonl, tmp_path):
    """The documented command, `accelerate launch --config_file examples/accelerate_zero3.yaml $(which giva) sft ...`,
    with the example's settings on 2 CPU processes (use_cpu, num_processes 2): the base is partitioned on both
    processes, and the base model's validation loss, scored in lockstep over both, is the one-process run's."""
    import yaml

    config = yaml.safe_load((REPO / "examples" / "accelerate_zero3.yaml").read_text())
    assert (config["distributed_type"], config["deepspeed_config"]["zero_stage"]) == ("DEEPSPEED", 3)
    (tmp_path / "cpu.yaml").write_text(yaml.safe_dump({**config, "use_cpu": True, "num_processes": 2}))
    giva_cli = Path(sys.executable).parent / "giva"
    code, output = run_launcher([str(ACCELERATE), "launch", "--config_file", str(tmp_path / "cpu.yaml"), str(giva_cli),
                                 *cli(chat_model, pc_jsonl, tmp_path / "out", "--json")], env={"DS_ACCELERATOR": "cpu"})
    assert code == 0, output[-3000:]
    assert output.count("2 processes, the base partitioned by DeepSpeed ZeRO-3\n") == 1  # the first process's summary
    result = json.loads((tmp_path / "out" / "sft_result.json").read_text())
    assert (result["processes"], result["zero3"]) == (2, True)
    single, _, _ = train_sft(options(chat_model, pc_jsonl, tmp_path / "single", max_steps=1))
    assert result["val_loss_before"] == pytest.approx(single.val_loss_before, rel=1e-6)
    reloaded, _ = load_sft_adapter(str(tmp_path / "out"))
    assert sum(p.numel() for n, p in reloaded.named_parameters() if "giva_lambda" in n) == result["trainable_parameters"]


def deepspeed_checkpoint(folder: Path, stage: int, processes: int) -> Path:
    """A Trainer checkpoint folder with the files DeepSpeed writes at step 2 (names only) under ZeRO ``stage``."""
    (folder / "global_step2").mkdir(parents=True)
    (folder / "latest").write_text("global_step2")
    names = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(processes) if stage]
    names += ([f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(processes)] if stage == 3
              else ["mp_rank_00_model_states.pt"])
    for name in names:
        (folder / "global_step2" / name).write_bytes(b"")
    return folder


@pytest.mark.parametrize("written, launch, processes, message", [
    (None, {}, 1, None),
    ((3, 2), ZERO3, 2, None),
    ((2, 2), {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, 2, None),
    ((3, 2), {}, 2, "was written under ZeRO-3 on 2 processes, and this is a launch without DeepSpeed: resume it under "
                    "the launch that wrote it (the optimizer state is in its format)"),
    ((2, 2), {}, 2, "was written under ZeRO stage 1 or 2 on 2 processes, and this is a launch without DeepSpeed: "),
    (None, ZERO3, 2, "was written under a launch without DeepSpeed, and this is ZeRO-3: resume it under the launch "),
    ((2, 2), ZERO3, 2, "was written under ZeRO stage 1 or 2 on 2 processes, and this is ZeRO-3: "),
    ((3, 2), ZERO3, 1, "was written under ZeRO-3 on 2 processes, and this launch has 1: DeepSpeed reads its partitioned "
                       "optimizer state with as many processes; launch 2"),
    ((0, 1), {}, 1, "was written under DeepSpeed without ZeRO, and this is a launch without DeepSpeed: "),
], ids=["plain", "zero3", "zero2", "zero3-plain", "zero2-plain", "plain-zero3", "zero2-zero3", "zero3-fewer", "ds-plain"])
def test_a_checkpoint_resumes_only_under_the_launch_that_wrote_it(written, launch, processes, message, tmp_path,
                                                                  monkeypatch):
    """The Trainer reads DeepSpeed's optimizer state only under DeepSpeed: a ZeRO-3 checkpoint resumed by plain
    torchrun went on with a fresh optimizer (another adapter, exit 0); a plain one under ZeRO-3 failed once the model
    had loaded ("Can't find a valid checkpoint"); a 2-process ZeRO-3 checkpoint under 1 process exited 1 with no
    message. Each is refused, from the files in the checkpoint, naming what wrote it."""
    from giva.sft.zero3 import check_resume_launch

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    if written is not None:
        deepspeed_checkpoint(checkpoint, *written)
    for variable in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in launch.items():
        monkeypatch.setenv(variable, value)
    if message is None:
        check_resume_launch(str(checkpoint), processes)
        return
    with pytest.raises(ValueError) as refused:
        check_resume_launch(str(checkpoint), processes)
    assert str(refused.value).startswith(f"--resume: {checkpoint} {message}")


def scripted_validation(monkeypatch, scripted: dict[int, float]) -> dict[int, int]:
    """giva sft's validation loss, scripted by optimizer step (step -> loss) for the periodic validations and the one
    after training; the base model's (step 0), and any after a --keep-best restore, are the real ones. Returns the
    number of calls at each step, as they happen."""
    import giva.sft.best

    real, calls, restored = giva.sft.run.validation_loss, {}, []
    restore = giva.sft.best.BestAdapter.restore

    def loss(trainer, batch_size):
        step = trainer.state.global_step
        calls[step] = calls.get(step, 0) + 1
        return scripted[step] if step in scripted and not restored else real(trainer, batch_size)

    monkeypatch.setattr(giva.sft.run, "validation_loss", loss)
    monkeypatch.setattr(giva.sft.best.BestAdapter, "restore", lambda self, model: restored.append(1) or restore(self, model))
    return calls


KEEP_BEST = dict(lr=5e-2, lr_scheduler="constant_with_warmup", warmup_ratio=0.0, eval_steps=2)  # a constant LR: the
# first 4 steps of a 6-step run are a 4-step run's


@pytest.mark.parametrize(("scripted", "kept"), [({2: 0.5, 4: 0.3, 6: 0.4}, 4), ({2: 0.5, 4: 0.3, 6: 0.2}, 6),
                                                ({2: 0.5, 4: 0.3, 6: 0.3}, 4), ({2: 0.5, 4: 0.3, 6: math.nan}, 4)],
                         ids=["earlier", "last", "tie", "nan-last"])
def test_keep_best_saves_the_adapter_of_the_lowest_validation_and_reports_its_scores(chat_model, pc_jsonl, tmp_path,
                                                                                     monkeypatch, scripted, kept):
    """--keep-best: where the validation at step 4 scores lowest (scripted 0.5, 0.3, 0.4 at steps 2, 4, 6), the adapter
    saved (and exported) is the one of step 4, bit for bit the adapter of the same run stopped at step 4, and the
    scores after training are its own (its real validation loss and exact match). Where the last step scores lowest,
    it is kept as it is, with no second evaluation; a last step that ties, or scores NaN, is not (the first version
    kept both)."""
    reference, _, _ = train_sft(options(chat_model, pc_jsonl, tmp_path / "ref", max_steps=kept, **KEEP_BEST))
    calls = scripted_validation(monkeypatch, scripted)
    result, _, _ = train_sft(options(chat_model, pc_jsonl, tmp_path / "out", max_steps=6, keep_best=True,
                                     export_lora=str(tmp_path / "lora"), **KEEP_BEST))
    assert (result.steps, result.kept_step) == (6, kept)
    assert calls[6] == (3 if kept == 4 else 2)  # periodic, after training (and after the restore)
    assert [step for step, _ in result.val_loss_curve] == list(scripted)
    assert [loss for _, loss in result.val_loss_curve] == pytest.approx(list(scripted.values()), nan_ok=True)
    if kept == 4:
        assert result.val_loss_after == reference.val_loss_after
        assert result.exact_match_after == reference.exact_match_after
    else:
        assert result.val_loss_after == 0.2
    saved, ref = adapter_tensors(tmp_path / "out"), adapter_tensors(tmp_path / "ref")
    assert saved and saved.keys() == ref.keys() and all(torch.equal(saved[k], ref[k]) for k in saved)
    assert f"kept adapter       step {kept} of 6 (--keep-best: the lowest validation loss" in result.summary()
    assert json.loads((tmp_path / "out" / "sft_result.json").read_text())["kept_step"] == kept
    exported = export_of(tmp_path / "ref", tmp_path / "ref-lora")
    lora = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert lora and lora.keys() == exported.keys() and all(torch.equal(lora[k], exported[k]) for k in lora)


def export_of(adapter_dir, out):
    """The LoRA export of a saved giva sft adapter."""
    from giva.export import export_lora

    model, _ = load_sft_adapter(str(adapter_dir))
    export_lora(model, str(out))
    return load_file(str(out / "adapter_model.safetensors"))


def test_keep_best_survives_a_resume(chat_model, pc_jsonl, tmp_path, monkeypatch):
    """With checkpoints, each improvement is written (best-<step>.safetensors) before the checkpoint of its step. Cut
    off after checkpoint 4, or after checkpoint 6 (no step left), the resumed run keeps step 4's adapter as the
    uninterrupted run does, read from best-4; resumed from checkpoint 2, it forgets best-4 (it trains those steps
    again, and validates step 4 anew)."""
    scripted = {2: 0.5, 4: 0.3, 6: 0.4}
    common = dict(max_steps=6, keep_best=True, save_steps=2, **KEEP_BEST)
    scripted_validation(monkeypatch, scripted)
    whole, _, _ = train_sft(options(chat_model, pc_jsonl, tmp_path / "whole", **common))
    assert whole.kept_step == 4
    # checkpoints 4 and 6 remain (the Trainer keeps two), and a resume from either reads best-4: best-2 went
    assert sorted(p.name for p in (tmp_path / "whole-checkpoints").glob("*-*")) == [
        "best-4.safetensors", "checkpoint-4", "checkpoint-6"]
    expected = adapter_tensors(tmp_path / "whole")
    for name, cut, resumed_from, validations_at_4 in (("from2", lambda: cut_off_at(5, monkeypatch), "checkpoint-2", 1),
                                                      ("from4", lambda: cut_off_at(5, monkeypatch), "checkpoint-4", 0),
                                                      ("from6", lambda: cut_off_at(6, monkeypatch, after_checkpoint=True),
                                                       "checkpoint-6", 0)):
        monkeypatch.undo()
        out, checkpoints = tmp_path / name, tmp_path / f"{name}-checkpoints"
        scripted_validation(monkeypatch, scripted)
        cut()
        with pytest.raises(_Preempted):
            train_sft(options(chat_model, pc_jsonl, out, **common))
        monkeypatch.undo()
        if name == "from2":  # as if killed while checkpoint-4 was written: best-4 is of steps trained again
            shutil.rmtree(checkpoints / "checkpoint-4")
            (checkpoints / "best-4.safetensors").write_bytes(b"not read")
        if name == "from4":  # best-4 deleted: the resumed run forgot it and kept step 6 (loss 0.4), exit 0
            (checkpoints / "best-4.safetensors").rename(tmp_path / "best-4")
            with pytest.raises(FileNotFoundError, match=r"best-4.safetensors is missing: it holds the adapter of the "
                                                        r"lowest validation loss up to step 4 \(0.3, at step 4\)"):
                train_sft(options(chat_model, pc_jsonl, out, resume=True, **common))
            (tmp_path / "best-4").rename(checkpoints / "best-4.safetensors")
        calls = scripted_validation(monkeypatch, scripted)
        resumed, _, _ = train_sft(options(chat_model, pc_jsonl, out, resume=True, **common))
        assert resumed.resumed_from.endswith(resumed_from) and resumed.kept_step == 4, name
        assert calls.get(4, 0) == validations_at_4, name
        got = adapter_tensors(out)
        assert got and got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), name
        assert resumed.val_loss_after == whole.val_loss_after, name


def test_keep_best_needs_eval_steps(chat_model, pc_jsonl, tmp_path, capsys):
    assert main(cli(chat_model, pc_jsonl, tmp_path / "out", "--keep-best")) == 2
    assert one_error_line(capsys).startswith("giva sft: error: --keep-best needs --eval-steps N")


def test_a_resume_checks_the_kept_file_against_the_logged_validation_losses(tmp_path):
    from safetensors.torch import save_file

    from giva.sft.best import check_kept_file

    history = [{"step": 1, "loss": 2.0}, {"step": 2, "eval_loss": 0.5}, {"step": 4, "eval_loss": float("nan")},
               {"step": 6, "eval_loss": 0.5}, {"step": 8, "eval_loss": 0.2}]
    check_kept_file(tmp_path, history[:1], 1)  # nothing validated yet: nothing to read
    with pytest.raises(FileNotFoundError, match=r"best-2.safetensors is missing: .* up to step 6 \(0.5, at step 2\)"):
        check_kept_file(tmp_path, history, 6)  # a tie keeps the earlier, a NaN never
    save_file({"v": torch.zeros(1)}, str(tmp_path / "best-2.safetensors"), metadata={"step": "2", "loss": repr(0.25)})
    with pytest.raises(ValueError, match=r"best-2.safetensors holds validation loss 0.25, but the run logged 0.5 at step 2"):
        check_kept_file(tmp_path, history, 6)
    save_file({"v": torch.zeros(1)}, str(tmp_path / "best-2.safetensors"), metadata={"step": "2", "loss": repr(0.5)})
    check_kept_file(tmp_path, history, 6)
    with pytest.raises(FileNotFoundError, match="best-8.safetensors is missing"):
        check_kept_file(tmp_path, history, 8)


def test_processes_that_found_different_checkpoints_all_refuse_to_resume():
    from giva.sft.checkpoints import check_same_resume

    check_same_resume([None, None], "ck")  # a fresh start everywhere
    check_same_resume([4, 4], "ck")
    for steps, seen in (([4, None], "process 0: step 4, process 1: a fresh start"),
                        ([2, 4], "process 0: step 2, process 1: step 4")):
        with pytest.raises(RuntimeError, match=rf"found different checkpoints in --checkpoint-dir 'ck' \({seen}\)"):
            check_same_resume(steps, "ck")


def test_the_kept_adapter_on_disk_is_the_newest_up_to_the_resumed_step(tmp_path):
    """BestAdapter.start on a resume at step 5 reads best-4 (each file beats every earlier one) and deletes best-6, of a
    step the resumed run trains again; a fresh run deletes them all; a NaN loss is never kept; restoring into a model
    with other trainable parameters is one clear error."""
    from giva.sft.best import BestAdapter

    model = torch.nn.Linear(2, 2)
    best = BestAdapter(tmp_path, main_process=True)
    for step, loss in ((2, 0.5), (4, 0.3), (5, float("nan")), (6, 0.2)):
        with torch.no_grad():
            model.weight.fill_(step)
        best.offer(model, step, loss)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-2.safetensors", "best-4.safetensors", "best-6.safetensors"]
    resumed = BestAdapter(tmp_path, main_process=True)
    resumed.start(5)
    assert (resumed.step, resumed.loss) == (4, 0.3) and torch.equal(resumed.tensors["weight"], torch.full((2, 2), 4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-2.safetensors", "best-4.safetensors"]
    other = BestAdapter(tmp_path, main_process=False)  # another process of the launch reads, deletes nothing
    other.start(3)
    assert other.step == 2 and len(list(tmp_path.iterdir())) == 2
    resumed.restore(model)
    assert torch.equal(model.weight, torch.full((2, 2), 4.0))
    with pytest.raises(RuntimeError, match="the kept tensors do not match the model's trainable parameters"):
        resumed.restore(torch.nn.Linear(2, 3, bias=False))
    with pytest.raises(RuntimeError, match=r"\['weight'\] differ in name or shape"):
        resumed.restore(torch.nn.Linear(3, 2))
    for step in (6, 8):
        best.offer(model, step, 0.1 / step)
    best.prune([4, 6])  # a resume from 4 reads best-4, from 6 best-6; best-2 serves none; best-8 is after them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-4.safetensors", "best-6.safetensors", "best-8.safetensors"]
    BestAdapter(tmp_path, main_process=True).start(None)  # a fresh run
    assert list(tmp_path.iterdir()) == []


def test_the_sft_package_names_its_api_and_loads_a_module_only_when_used():
    """``giva.sft``'s public names are those of their modules; reading the options (as the CLI's parser does) does
    not import the run, TRL's side of the command."""
    import giva.sft.options

    assert giva.sft.load_sft_adapter is giva.sft.run.load_sft_adapter and giva.sft.run_sft is giva.sft.run.run_sft
    assert giva.sft.SFTOptions is giva.sft.options.SFTOptions
    with pytest.raises(AttributeError, match="module 'giva.sft' has no attribute 'nothing'"):
        giva.sft.nothing  # noqa: B018
    code = "import sys, giva.sft.options, giva.sft.recipe; print('giva.sft.run' in sys.modules, 'trl' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False"]
