"""Loading user data: CSV / JSONL with text and label columns, clear errors, fixed splits."""

import json

import pytest

from giva.data import load_file, load_text_classification, split_dataset


def test_csv_and_jsonl_files(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("sentence,label\ngood film,pos\nbad film,neg\nfine,pos\n", encoding="utf-8")
    data = load_text_classification(str(csv_path), text_column="sentence")
    assert data.texts == ["good film", "bad film", "fine"] and data.label_names == ["neg", "pos"]
    assert data.labels == [1, 0, 1]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in [("a", -1), ("b", 1), ("c", 10)]))
    assert load_file(jsonl).label_names == ["-1", "1", "10"]  # numeric labels sort as numbers


def test_bad_files_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_file(tmp_path / "nope.csv")
    path = tmp_path / "d.csv"
    path.write_text("text,target\na,1\nb,0\n")
    with pytest.raises(ValueError, match=r"d.csv: no column 'label'; the columns are \['target', 'text'\]"):
        load_file(path)
    path.write_text("text,label\na,1\nb,1\n")
    with pytest.raises(ValueError, match="single value"):
        load_file(path)


def test_split_is_fixed_and_disjoint(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(100)))
    data = load_file(path)
    train, val, test = split_dataset(data, test_size=20, val_size=0.1, seed=0)
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    again = split_dataset(data, test_size=20, val_size=0.1, seed=0)[2]
    assert again.texts == test.texts
    assert not set(train.texts) & set(test.texts) and not set(val.texts) & set(test.texts)
