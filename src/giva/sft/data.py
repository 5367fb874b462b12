"""The rows `giva sft` trains on: prompt/completion or chat messages, checked line by line; no torch here.

Every row becomes TRL's prompt/completion form (strings, or lists of ``{"role", "content"}`` messages),
so that TRL's ``SFTTrainer`` masks the prompt out of the loss, or stays a ``{"text": ...}`` row (TRL's language
modelling form: every token carries the loss, no chat template). A ``messages`` record (which must end with the
assistant's message) becomes one row per assistant message: the conversation up to it as the prompt, it as the
completion, so that every assistant reply is trained on, each with the context it had. The records are split into
training and validation before that, so the turns of one conversation stay on one side.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

from ..checkpoint import looks_local
from ..data import BUNDLED, DATA_SUFFIXES, DataError, _decode, _hub_datasets_module, _read_json_rows, load_bundled

Row = dict[str, Any]  # {"prompt": str | list[message], "completion": str | list[message]}, or {"text": str}
Located = tuple[str, Row]  # (where the row came from, e.g. "my.jsonl:7"; the row)
Record = list[Located]  # the rows of one record: one, or one per assistant message of a conversation
T = TypeVar("T")

# The instruction each bundled corpus becomes: the sentence in a question, the class name as a one-word answer.
INSTRUCTIONS: dict[str, tuple[str, dict[str, str]]] = {
    "pang-lee": ("Review: {text}\nIs this review positive or negative? Answer with one word.", {"1": "positive", "-1": "negative"}),
    "conll2010-uncertainty": (
        "Sentence: {text}\nIs this statement certain or uncertain? Answer with one word.",
        {"1": "certain", "-1": "uncertain"},  # the corpus's labels: 1 certain, -1 uncertain (pattern's own test reads them so)
    ),
}
ROLES = ("system", "user", "assistant")
ROW_FIELDS = "'prompt' and 'completion', 'messages', or 'text'"  # what a row holds, for the messages about one that does not
# Completions count as single labels (scored by exact match) when every one is a short single line and few
# distinct values repeat across the rows.
MAX_LABEL_WORDS = 3
MAX_LABELS = 50


@dataclass
class SFTData:
    """Training and validation rows in TRL's prompt/completion form, and where they came from."""

    train: list[Row]
    validation: list[Row]
    source: str
    labels: Optional[list[str]]  # the label set when completions are single labels (exact match is reported)
    train_where: list[str] = field(default_factory=list)  # where each training row came from ("my.jsonl:7")
    validation_where: list[str] = field(default_factory=list)

    def located(self) -> Iterator[Located]:
        """(where, row) for every training row, then every validation row."""
        for split, rows, places in (("training", self.train, self.train_where),
                                    ("validation", self.validation, self.validation_where)):
            for i, row in enumerate(rows):
                yield (places[i] if i < len(places) else f"{self.source}: {split} row {i + 1}"), row


def completion_text(row: Row) -> str:
    """The completion as plain text (the assistant message's content for chat rows)."""
    completion = row["completion"]
    return completion if isinstance(completion, str) else completion[-1]["content"]


def bundled_rows(name: str) -> list[Located]:
    """A bundled corpus (``pang-lee``, ``conll2010-uncertainty``) as instruction rows with a one-word answer."""
    template, words = INSTRUCTIONS[name]
    data = load_bundled(name)
    return [(f"{name} row {i + 1}", {"prompt": template.format(text=text), "completion": words[data.label_names[label]]})
            for i, (text, label) in enumerate(zip(data.texts, data.labels))]


def _messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {field!r} must be a non-empty list of {{\"role\", \"content\"}} messages, got {value!r:.80}")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise DataError(
                f"{where}: {field}[{i}] must be {{\"role\": one of {list(ROLES)}, \"content\": a string}}, got {message!r:.80}"
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _replies(messages: list[dict[str, str]], where: str, field: str, start: int = 0) -> None:
    """Every assistant message from ``start`` on is a reply that carries the loss: it must say something."""
    for i, message in enumerate(messages[start:], start=start):
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataError(f"{where}: {field}[{i}] is an assistant message with empty content, which would be trained "
                            "as a reply; give it its text, or leave the turn out")


def _text(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {field!r} must be a non-empty string (or a list of messages), got {value!r:.80}")
    return value


def conversation_turns(messages: list[dict[str, str]], where: str) -> Record:
    """A conversation as one row per assistant message after the first message: the messages before it as the
    prompt, it as the completion (``where`` gains "assistant turn i of n" when there are several)."""
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant" and i > 0]
    return [(where if len(turns) == 1 else f"{where} (assistant turn {n} of {len(turns)})",
             {"prompt": messages[:i], "completion": [messages[i]]}) for n, i in enumerate(turns, start=1)]


def parse_record(record: Any, where: str) -> Record:
    """One record -> its prompt/completion rows (one per assistant message of a ``messages`` record), or a
    :class:`DataError` naming ``where`` and the missing field."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with {ROW_FIELDS}, got {type(record).__name__}")
    if "messages" in record:
        messages = _messages(record["messages"], where, "messages")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise DataError(f"{where}: 'messages' must end with an assistant message that follows at least one other message")
        _replies(messages, where, "messages", start=1)  # each assistant message after the first is a completion
        return conversation_turns(messages, where)
    if "text" in record and "prompt" not in record and "completion" not in record:
        return [(where, {"text": _text(record["text"], where, "text")})]
    return [(where, parse_row(record, where))]


def parse_row(record: dict[str, Any], where: str) -> Row:
    """A prompt/completion record -> its row, or a :class:`DataError` naming ``where`` and the missing field."""
    if "prompt" not in record or "completion" not in record:
        raise DataError(
            f"{where}: needs {ROW_FIELDS}; the row has {sorted(record)}"
        )
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list) or isinstance(completion, list):
        prompt, completion = _messages(prompt, where, "prompt"), _messages(completion, where, "completion")
        other = next((i for i, m in enumerate(completion) if m["role"] != "assistant"), None)
        if other is not None:  # TRL puts the loss on every message of the completion
            raise DataError(f"{where}: completion[{other}] is a {completion[other]['role']!r} message; the completion holds "
                            "the assistant's reply only (every message of it carries the loss): move the others into "
                            "the prompt")
        _replies(completion, where, "completion")
        return {"prompt": prompt, "completion": completion}
    return {"prompt": _text(prompt, where, "prompt"), "completion": _text(completion, where, "completion")}


def row_format(row: Row) -> str:
    """``"text"`` (language modelling), ``"chat"`` (messages) or ``"plain-text"`` (prompt/completion strings)."""
    return "text" if "text" in row else "chat" if isinstance(row["prompt"], list) else "plain-text"


def parse_rows(records: Iterable[tuple[str, Any]], source: str) -> list[Record]:
    """Every (where, record) parsed into its rows; all rows must have one format (:func:`row_format`)."""
    parsed = [parse_record(record, where) for where, record in records]
    if not parsed:
        raise DataError(f"{source}: no rows found")
    formats = [row_format(rows[0][1]) for rows in parsed]
    other = next((i for i, kind in enumerate(formats) if kind != formats[0]), None)
    if other is not None:
        name = {"text": "'text'", "chat": "chat", "plain-text": "plain-text"}
        raise DataError(f"{parsed[other][0][0]}: a {name[formats[other]]} row after {name[formats[0]]} rows; use one "
                        "format for the whole file")
    return parsed


def read_file(path: Path) -> list[Record]:
    """A JSON Lines file (``.json``: also one array) of prompt/completion, messages or text rows."""
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if path.is_dir():
        raise DataError(f"data file {str(path)!r} is a folder; expected a JSONL file")
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(f"data file {str(path)!r}: expected JSON Lines (.jsonl or .json) with prompt/completion, messages or text")
    return parse_rows(_read_json_rows(path, _decode(path), ROW_FIELDS), str(path))


def read_dataset(name: str, split: str = "train", config: Optional[str] = None, folder: Optional[Path] = None
                 ) -> list[Record]:
    """The ``split`` of a `datasets` dataset with prompt/completion, messages or text columns: a hub name (with its
    ``config``), or a local ``folder``: one written by ``save_to_disk`` (a DatasetDict's split, or the one Dataset),
    or a folder of data files (parquet, JSON Lines, CSV, arrow) that ``load_dataset`` reads, its splits named by the
    files (``data/train_sft-00000-of-00001.parquet``, as the hub lays them out)."""
    if folder is None:
        datasets = _hub_datasets_module(name)
    else:
        import datasets
    from datasets.exceptions import DatasetsError

    where = f"dataset folder {name!r}" if folder is not None else f"dataset {name!r}"
    saved_dict = folder is not None and (folder / "dataset_dict.json").is_file()
    saved_one = folder is not None and not saved_dict and (folder / "state.json").is_file()
    if (saved_dict or saved_one) and config is not None:
        raise DataError(f"{where} was written by save_to_disk and has no configurations; drop --data-config")
    if saved_one and split != "train":
        raise DataError(f"{where} holds one dataset written by save_to_disk, no split {split!r}; drop --data-split")
    try:
        if saved_dict:
            saved = datasets.load_from_disk(str(folder))
            if split not in saved:
                raise DataError(f"{where} has no split {split!r}; it has {sorted(saved)}: give --data-split")
            ds = saved[split]
        elif saved_one:
            ds = datasets.load_from_disk(str(folder))  # one Dataset: it is the split
        else:
            verbosity = datasets.logging.get_verbosity()
            datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a file it cannot read: the one line below
            try:
                ds = datasets.load_dataset(str(folder) if folder is not None else name, config, split=split)
            finally:
                datasets.logging.set_verbosity(verbosity)
    except DataError:
        raise
    # an unknown split or config, a folder without data files, a data file datasets cannot read (its cause named)
    except (ValueError, FileNotFoundError, DatasetsError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        if err.__cause__ is not None and str(err.__cause__).strip():
            reason += f" ({type(err.__cause__).__name__}: {' '.join(str(err.__cause__).split())[:300]})"
        raise DataError(f"{where} (--data-split {split!r}, --data-config {config!r}): {reason}") from None
    if "messages" not in ds.column_names and "text" not in ds.column_names and not {"prompt", "completion"} <= set(ds.column_names):
        raise DataError(f"{where}: needs 'prompt' and 'completion' columns, 'messages' or 'text'; it has "
                        f"{sorted(ds.column_names)}")
    return parse_rows(((f"{where} row {i}", dict(record)) for i, record in enumerate(ds)), name)


def read_rows(source: str, split: str = "train", config: Optional[str] = None) -> list[Record]:
    """A bundled corpus name, a local JSONL path or dataset folder, or a `datasets` hub name, in that order: each
    record's rows, each row with its place. ``split`` and ``config`` are the dataset's (a JSONL file or a bundled
    corpus has neither: a split or config other than the defaults is refused for them)."""
    path = Path(os.path.expanduser(source))
    if source in INSTRUCTIONS:
        kind = "a bundled set"
    elif path.is_dir():
        kind = "a dataset folder"
    elif path.exists() or Path(source).suffix in DATA_SUFFIXES or looks_local(source):
        kind = "a file"
    else:
        kind = "a bundled set" if source in BUNDLED else "a datasets name"
    if kind in ("a bundled set", "a file") and (split != "train" or config is not None):
        flag = f"--data-split {split!r}" if split != "train" else f"--data-config {config!r}"
        raise DataError(f"{flag} is for a datasets name or a dataset folder; --data {source!r} is {kind}")
    if source in INSTRUCTIONS:
        return [[row] for row in bundled_rows(source)]
    if kind == "a file":
        return read_file(path)
    if kind == "a bundled set":
        raise DataError(f"corpus {source!r} has no instruction form; `giva sft` offers {list(INSTRUCTIONS)}")
    return read_dataset(source, split, config, folder=path if kind == "a dataset folder" else None)


def label_set(rows: list[Row]) -> Optional[list[str]]:
    """The distinct completions when they are single labels (short single lines, few values), else None (and for
    ``text`` rows, which have no completion)."""
    if any("text" in row for row in rows):
        return None
    texts = [completion_text(row).strip() for row in rows]
    values = sorted(set(texts))
    if len(values) > min(MAX_LABELS, len(texts) // 2) or any("\n" in t or len(t.split()) > MAX_LABEL_WORDS for t in values):
        return None
    return values


def as_chat(row: Row) -> Row:
    """A plain-text row as one user turn and one assistant turn (for a tokenizer with a chat template); chat and
    ``text`` rows as they are (TRL applies no chat template to a language-modelling row)."""
    if row_format(row) != "plain-text":
        return row
    return {"prompt": [{"role": "user", "content": row["prompt"]}],
            "completion": [{"role": "assistant", "content": row["completion"]}]}


def split_rows(rows: list[T], val_size: int | float, seed: int, max_train_samples: Optional[int] = None) -> tuple[list[T], list[T]]:
    """A fixed (train, validation) split from a seeded shuffle; ``val_size`` is a count or a fraction in (0, 1)."""
    n_val = int(round(val_size * len(rows))) if isinstance(val_size, float) else val_size
    if n_val < 1 or n_val >= len(rows):
        raise DataError(
            f"--val-size {val_size} gives {n_val} validation rows of the {len(rows)} rows; it must leave at least one row "
            "for each of validation and training"
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    train = [rows[i] for i in order[n_val:]]
    return train[:max_train_samples] if max_train_samples else train, [rows[i] for i in order[:n_val]]


def load_sft_data(
    source: str, val_size: int | float, seed: int, max_train_samples: Optional[int] = None, chat: bool = False,
    split: str = "train", config: Optional[str] = None,
) -> SFTData:
    """Read, check and split ``source`` (a dataset's ``split`` and ``config``); ``chat`` turns plain-text rows into
    chat turns. The records (a conversation with all its assistant turns is one) are split, and ``max_train_samples``
    counts them, so that no conversation has turns on both sides."""
    records = read_rows(source, split, config)
    labels = label_set([row for rows in records for _, row in rows])
    if chat:
        records = [[(where, as_chat(row)) for where, row in rows] for rows in records]
    train, validation = (
        [located for rows in part for located in rows] for part in split_rows(records, val_size, seed, max_train_samples)
    )
    return SFTData([row for _, row in train], [row for _, row in validation], source, labels,
                   [where for where, _ in train], [where for where, _ in validation])
