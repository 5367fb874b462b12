"""`giva generate`: prompts tokenized as TRL tokenized the run's prompts, answers those of the trained model, bad
input in one line before the model loads."""

from __future__ import annotations

import json

import pytest
import torch
from test_sft import chat_model, messages_jsonl, options, pc_jsonl, plain_model, text_jsonl  # noqa: F401  (fixtures)

import giva.sft.run
from giva.cli import main
from giva.sft.evaluation import prompt_ids as trl_prompt_ids
from giva.sft.evaluation import stop_tokens
from giva.sft.generate import prompt_ids, read_prompts, text_run
from giva.sft.run import make_trainer, preflight, train_sft

PROMPT = "the film is good great . positive or negative ?"


def _trl_rows(opts, tmp_path):
    """(the tokenizer, the validation rows giva sft gave TRL, TRL's processed rows of them)."""
    device, path, tokenizer, data = preflight(opts)
    trainer = make_trainer(opts, device, path, tokenizer, data, str(tmp_path / "scratch"))
    return tokenizer, data.validation, trainer.eval_dataset


@pytest.mark.parametrize("case", ["text prompt, chat template", "messages, chat template", "text prompt, no template"])
def test_prompts_become_the_tokens_trl_trained_on(chat_model, plain_model, pc_jsonl, messages_jsonl, tmp_path, case):  # noqa: F811
    model = plain_model if "no template" in case else chat_model
    data = messages_jsonl if case.startswith("messages") else pc_jsonl
    tokenizer, rows, processed = _trl_rows(options(model, data, tmp_path / "out"), tmp_path)
    trl = trl_prompt_ids(processed)
    assert len(rows) == len(trl) == 8
    for row, expected in zip(rows, trl):
        prompt = row["prompt"]
        if case == "text prompt, chat template":  # giva sft made the text one user turn; generate gets the text
            assert [m["role"] for m in prompt] == ["user"]
            prompt = prompt[0]["content"]
        assert isinstance(prompt, str) == case.startswith("text")
        assert prompt_ids(tokenizer, prompt, text_run=False) == expected


def test_a_text_run_continues_the_text_without_the_chat_template(chat_model, text_jsonl, tmp_path):  # noqa: F811
    """A run on text rows (the tokenizer has a chat template, which TRL leaves out for them): a row's text becomes
    the tokens TRL trained on, up to the EOS TRL appends; with the template it would not."""
    tokenizer, rows, processed = _trl_rows(options(chat_model, text_jsonl, tmp_path / "out"), tmp_path)
    assert len(rows) == len(processed) == 8
    for row, trained in zip(rows, processed["input_ids"]):
        assert prompt_ids(tokenizer, row["text"], text_run=True) + [tokenizer.eos_token_id] == trained
        assert prompt_ids(tokenizer, row["text"], text_run=False) != trained[:-1]


def test_a_text_runs_checkpoint_is_continued_as_text_too(chat_model, pc_jsonl, text_jsonl, tmp_path):  # noqa: F811
    """A checkpoint-N folder holds no sft_result.json: the run's record beside it says the rows were text."""
    for name, data in (("text", text_jsonl), ("pc", pc_jsonl)):
        train_sft(options(chat_model, data, tmp_path / name, save_steps=2))
        checkpoint = tmp_path / f"{name}-checkpoints" / "checkpoint-2"
        assert (checkpoint / "adapter_config.json").is_file() and not (checkpoint / "sft_result.json").exists()
        assert text_run(str(checkpoint)) is text_run(str(tmp_path / name)) is (name == "text")
    assert text_run(str(tmp_path)) is False  # neither record


def test_generate_answers_as_the_trained_model_and_the_base_with_base(chat_model, pc_jsonl, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    _, model, tokenizer = train_sft(options(chat_model, pc_jsonl, out, lr=5e-2, max_steps=16))  # answers a word
    capsys.readouterr()
    prompts = tmp_path / "prompts.jsonl"
    messages = [{"role": "user", "content": "the film is bad ."}, {"role": "assistant", "content": "negative"},
                {"role": "user", "content": PROMPT}]
    prompts.write_text(json.dumps({"prompt": "the plot is awful . positive or negative ?"}) + "\n"
                       + json.dumps({"messages": messages}) + "\n")
    assert main(["generate", str(out), PROMPT, "--prompts", str(prompts), "--base", "--max-new-tokens", "4",
                 "--device", "cpu", "--no-progress", "--json"]) == 0
    answers = json.loads(capsys.readouterr().out)
    assert [a["prompt"] for a in answers] == [PROMPT, "the plot is awful . positive or negative ?", messages]

    model.eval()
    for entry in answers:  # what the model trained in memory writes, greedy, for the same tokens
        ids = torch.tensor([prompt_ids(tokenizer, entry["prompt"], text_run=False)])
        for key, adapter in (("answer", True), ("base_answer", False)):
            with torch.no_grad():
                stop = stop_tokens(model, tokenizer)  # the model's end token and the tokenizer's EOS TRL trained
                if adapter:
                    out_ids = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, eos_token_id=stop)
                else:
                    with model.disable_adapter():
                        out_ids = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, eos_token_id=stop)
            assert entry[key] == tokenizer.decode(out_ids[0, ids.shape[1]:], skip_special_tokens=True).strip(), key
    assert any(a["answer"] for a in answers)  # the comparison above is not between empty answers only

    assert main(["generate", str(out), PROMPT, "--max-new-tokens", "4", "--device", "cpu", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert text == f"[1] {PROMPT}\n  giva: {answers[0]['answer']}\n"  # no base line without --base
    assert main(["generate", str(out), PROMPT, "--max-new-tokens", "4", "--device", "cpu", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"prompt": PROMPT, "answer": answers[0]["answer"]}]


def test_sampling_is_seeded(chat_model, pc_jsonl, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    train_sft(options(chat_model, pc_jsonl, out, max_steps=1))
    runs = []
    for seed in (1, 1, 2):
        assert main(["generate", str(out), PROMPT, PROMPT, "--temperature", "5", "--seed", str(seed),
                     "--max-new-tokens", "8", "--device", "cpu", "--no-progress", "--json"]) == 0
        runs.append([a["answer"] for a in json.loads(capsys.readouterr().out)])
    assert runs[0] == runs[1] and runs[0] != runs[2]  # at temperature 5 over 8 tokens, two seeds differ


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err and not captured.out, captured.err
    assert lines[0].startswith("giva generate: error: ")
    return lines[0]


@pytest.fixture
def trained(chat_model, plain_model, pc_jsonl, tmp_path_factory):  # noqa: F811
    runs = {}
    for name, model in (("chat", chat_model), ("plain", plain_model)):
        runs[name] = tmp_path_factory.mktemp(name) / "out"
        train_sft(options(model, pc_jsonl, runs[name], max_steps=1))
    return runs


def test_bad_input_is_one_line_before_the_model_loads(trained, tmp_path, capsys, monkeypatch):
    def loaded(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(giva.sft.run, "load_sft_adapter", loaded)
    bad_row = tmp_path / "bad.jsonl"
    bad_row.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"question": "no prompt"}) + "\n")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": PROMPT}]}) + "\n")
    cases = [
        ([str(tmp_path / "nothing"), PROMPT], "holds no adapter_config.json"),
        ([str(trained["chat"])], "no prompt to answer"),
        ([str(trained["chat"]), "--prompts", str(bad_row)], f"{bad_row}:2: expected 'prompt'"),
        ([str(trained["chat"]), "--prompts", str(tmp_path / "missing.txt")], "missing.txt' : no such file".replace(" :", ":")),
        ([str(trained["plain"]), "--prompts", str(chat)], "prompt 1 is a list of messages, but the run has no chat template"),
        ([str(trained["chat"]), PROMPT, "--top-p", "0"], "--top-p in (0, 1]"),
    ]
    for argv, expected in cases:
        assert main(["generate", *argv, "--device", "cpu", "--no-progress"]) == 2, argv
        assert expected in one_error_line(capsys), argv


def test_generate_reads_the_saved_tokenizer_once(trained, capsys, monkeypatch):
    """The prompts are tokenized before the model loads, with the tokenizer saved beside the adapter; the reload
    takes that one (it read the folder's tokenizer a second time)."""
    from transformers import AutoTokenizer

    read, load = [], AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: read.append(a) or load(*a, **k))
    assert main(["generate", str(trained["chat"]), PROMPT, "--max-new-tokens", "2", "--device", "cpu", "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith(f"[1] {PROMPT}\n  giva: ") and len(read) == 1


def test_generate_stops_at_the_tokenizers_eos(trained, capsys, monkeypatch):
    """The answer ends where TRL ended every trained completion, at the tokenizer's EOS, although the tiny model's
    generation config names another end token: forced to write "good", EOS, then more words, it answered them all."""
    from transformers import LogitsProcessor, LogitsProcessorList

    load = giva.sft.run.load_sft_adapter

    def forcing(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        assert model.generation_config.eos_token_id != tokenizer.eos_token_id  # the case this is about
        script = [tokenizer.convert_tokens_to_ids("good"), tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids("bad")] * 4
        generate = model.generate

        def forced(input_ids, **generation):
            width = input_ids.shape[1]

            class Script(LogitsProcessor):
                def __call__(self, ids, scores):
                    out = torch.full_like(scores, -1e9)
                    out[:, script[ids.shape[1] - width]] = 0
                    return out

            return generate(input_ids=input_ids, logits_processor=LogitsProcessorList([Script()]), **generation)

        model.generate = forced
        return model, tokenizer

    monkeypatch.setattr(giva.sft.run, "load_sft_adapter", forcing)
    assert main(["generate", str(trained["chat"]), PROMPT, "--max-new-tokens", "5", "--device", "cpu", "--no-progress",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"prompt": PROMPT, "answer": "good"}]


def test_a_conversation_ending_with_its_reply_is_answered_from_the_messages_before_it(tmp_path):
    """A row of giva sft's messages form ends with the assistant's reference reply: it was kept in the prompt (the
    answer given away, and the model asked to reply again); a role giva sft refuses is refused here too."""
    from giva.data import DataError

    user = {"role": "user", "content": PROMPT}
    rows = tmp_path / "val.jsonl"
    reply = {"role": "assistant", "content": "positive"}
    rows.write_text(json.dumps({"messages": [user, reply]}) + "\n" + json.dumps({"prompt": [user]}) + "\n"
                    + json.dumps({"prompt": [user, reply]}) + "\n")  # a prompt is taken whole, as giva sft trains it
    assert read_prompts(str(rows)) == [[user], [user], [user, reply]]
    for bad, message in (([{"role": "bot", "content": "hi"}], "messages\\[0\\] must be {\"role\": one of \\['system', "),
                         ([reply], "'messages' holds only the assistant's reply; give the conversation before it")):
        rows.write_text(json.dumps({"messages": bad}) + "\n")
        with pytest.raises(DataError, match=f"{rows}:1: {message}"):
            read_prompts(str(rows))


def test_a_prompt_file_of_lines(tmp_path):
    lines = tmp_path / "prompts.txt"
    lines.write_text("first prompt\n\n  \nsecond prompt\n")
    assert read_prompts(str(lines)) == ["first prompt", "second prompt"]
