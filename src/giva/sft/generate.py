"""`giva generate`: answers from an adapter `giva sft` saved, to prompts given as the run's rows were formatted.

A prompt becomes tokens as TRL made the prompts of the run's rows: with a chat template (the one the tokenizer saved
beside the adapter), a plain-text prompt is one user turn and a list of messages is the conversation so far, both
rendered with the generation prompt; without one, or after a run on ``text`` rows (no template, every token trained),
the text is tokenized as it is and continued. The model is reloaded as it was trained
(:func:`giva.sft.run.load_sft_adapter`: the run's precision and quantisation). With ``base=True`` each prompt is also
answered with the adapter switched off, which shows what the fine-tuning changed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..data import DataError, _decode, _read_json_rows
from .data import _messages

Prompt = str | list[dict[str, str]]  # a text, or messages ({"role", "content"}) ending where the answer starts


@dataclass
class Answer:
    prompt: Prompt
    answer: str
    base_answer: Optional[str] = None  # with base=True: the answer with the adapter switched off


def read_prompts(path: str) -> list[Prompt]:
    """The prompts of a file: JSON Lines (``.jsonl``, or ``.json`` also as one array) whose rows hold ``prompt`` (a
    text or a list of messages) or ``messages``; any other file (``-``: standard input) one prompt per non-empty line.
    A ``messages`` row that ends with an assistant message (`giva sft`'s form, its reference reply last) is answered
    from the messages before that reply, which would otherwise be given away in the prompt; a ``prompt`` is taken
    whole, as `giva sft` trains on it."""
    if path == "-":
        return [line for line in sys.stdin.read().splitlines() if line.strip()]
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"--prompts {path!r}: no such file")
    text = _decode(file)
    if file.suffix not in (".jsonl", ".json"):
        return [line for line in text.splitlines() if line.strip()]
    prompts: list[Prompt] = []
    for where, row in _read_json_rows(file, text, "'prompt' (a text or a list of messages) or 'messages'"):
        field = "prompt" if "prompt" in row else "messages"
        value = row.get(field)
        if isinstance(value, str) and value.strip():
            prompts.append(value)
        elif isinstance(value, list):
            messages = _messages(value, where, field)  # as giva sft checks them: one line naming the message
            if field == "messages" and messages[-1]["role"] == "assistant":  # a giva sft row: its reference reply
                messages = messages[:-1]
            if not messages:
                raise DataError(f"{where}: 'messages' holds only the assistant's reply; give the conversation before it")
            prompts.append(messages)
        else:
            raise DataError(f"{where}: expected 'prompt' (a non-empty text or a list of {{\"role\", \"content\"}} "
                            f"messages) or 'messages', got {row!r:.80}")
    if not prompts:
        raise DataError(f"--prompts {path!r} holds no prompt")
    return prompts


def prompt_ids(tokenizer: Any, prompt: Prompt, text_run: bool, where: str = "the prompt") -> list[int]:
    """``prompt`` as the run's rows were tokenized (module docstring): TRL's rendering of a prompt, as ``_tokenize``
    in ``trl.data_utils`` does it (``apply_chat_template`` with the generation prompt, or the tokenizer's call)."""
    chat = getattr(tokenizer, "chat_template", None) is not None and not text_run
    if isinstance(prompt, list):
        if not chat:
            why = "trained on text rows, without a chat template" if text_run else "has no chat template"
            raise DataError(f"{where} is a list of messages, but the run {why}: give the prompt as text")
        messages = prompt
    elif chat:
        messages = [{"role": "user", "content": prompt}]
    else:
        return list(tokenizer(text=prompt)["input_ids"])
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                              return_dict=True)["input_ids"])


def text_run(adapter_dir: str) -> bool:
    """Whether the adapter in ``adapter_dir`` was trained on ``text`` rows, as its run's record says
    (:func:`giva.sft.checkpoints.saved_run`: ``sft_result.json``, or beside a ``checkpoint-N`` folder the run's
    options file); False for prompt/completion and chat runs, and for a folder with neither record."""
    from .checkpoints import saved_run

    _, record = saved_run(Path(adapter_dir).expanduser())
    return record.get("loss_tokens") == "every token" or record.get("rows") == "text"


def generate(output_dir: str, prompts: list[Prompt], max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, device: str = "auto", batch_size: int = 8, base: bool = False,
             quantized: Optional[bool] = None, progress: bool = False) -> list[Answer]:
    """Each prompt's answer (greedy at ``temperature`` 0, else sampled with ``top_p``, seeded), from the adapter in
    ``output_dir`` (``giva sft``'s output folder or one of its ``checkpoint-N`` folders); with ``base`` also the base
    model's. Prompts are checked before the model loads."""
    import torch

    from .checks import available_device
    from .evaluation import generated, stop_tokens
    from .run import load_sft_adapter

    if not prompts:
        raise ValueError("no prompt to answer: give prompts as arguments or --prompts FILE")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"--max-new-tokens and --batch-size must be >= 1, got {max_new_tokens} and {batch_size}")
    if not (temperature >= 0 and 0 < top_p <= 1):
        raise ValueError(f"--temperature must be >= 0 and --top-p in (0, 1], got {temperature} and {top_p}")
    folder = Path(output_dir).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{output_dir!r} holds no adapter_config.json: not an adapter saved by `giva sft`")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = text_run(str(folder))
    ids = [prompt_ids(tokenizer, p, text, f"prompt {i + 1}") for i, p in enumerate(prompts)]
    model, _ = load_sft_adapter(str(folder), device=available_device(device), quantized=quantized, tokenizer=tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else
                {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})  # not the model's defaults

    def answers(desc: str) -> list[str]:
        torch.manual_seed(seed)
        new = generated(model, ids, pad, batch_size, progress=progress, desc=desc, max_new_tokens=max_new_tokens,
                        eos_token_id=stop_tokens(model, tokenizer), **sampling)
        return [a.strip() for a in tokenizer.batch_decode(new, skip_special_tokens=True)]

    tuned = answers("generate")
    if not base:
        return [Answer(p, a) for p, a in zip(prompts, tuned)]
    with model.disable_adapter():
        plain = answers("generate (base)")
    return [Answer(p, a, b) for p, a, b in zip(prompts, tuned, plain)]
