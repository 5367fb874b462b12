"""Loading user data: CSV / JSONL with text and label columns, clear errors, fixed splits."""

import json
import time

import pytest

from giva import data as data_module
from giva.data import DataError, load_file, load_text_classification, normalise_label, split_dataset


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


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def test_an_integer_is_one_class_however_it_is_written(tmp_path):
    labels = [1, 1.0, "1", " 1.0 ", 0, "0", 0.0, True, False]
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": y} for i, y in enumerate(labels[:7])])
    data = load_file(path)
    assert data.label_names == ["0", "1"] and data.labels == [1, 1, 1, 1, 0, 0, 0]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\na,1\nb,1.0\nc, 1 \nd,2\n")
    assert load_file(csv_path).label_names == ["1", "2"]
    assert normalise_label(True, "x") == "true" and normalise_label(" pos ", "x") == "pos"


def test_integer_ids_above_2_to_the_53_stay_distinct_classes(tmp_path):
    """float() would make 2**53 + 1 and 2**53 one class; a CSV id (also written `N.0`) is as exact as a JSON integer."""
    big = 2**53
    csv_path = tmp_path / "ids.csv"
    csv_path.write_text(f"text,label\na,{big + 1}\nb,{big}\nc,1\nd,{big + 1}.0\n")
    data = load_file(csv_path)
    assert data.label_names == ["1", str(big), str(big + 1)] and data.labels == [2, 1, 0, 2]
    jsonl = write_jsonl(tmp_path / "ids.jsonl", [{"text": "a", "label": big + 1}, {"text": "b", "label": big}])
    assert load_file(jsonl).label_names == [str(big), str(big + 1)]


@pytest.mark.parametrize("cell", ["NaN", "nan", "null", "NULL", "None", "n/a", "N/A", " NaN ", ""])
@pytest.mark.parametrize("first", ["pos", "1"])
def test_missing_value_cells_are_missing_labels_for_names_and_numbers(tmp_path, cell, first):
    """Spreadsheet / pandas missing-value cells are never a class, whether the other labels are names or numbers."""
    path = tmp_path / "d.csv"
    path.write_text(f"text,label\na,{first}\nb,{'neg' if first == 'pos' else '0'}\nc,{cell}\n")
    with pytest.raises(DataError, match=r"d.csv:4: the label is (missing|empty)"):
        load_file(path)


def test_a_json_nan_label_is_missing(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": NaN}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: the label is missing \(NaN\)"):
        load_file(path)


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"text": "a", "label": 1}, {"text": "b", "label": None}], r"d.jsonl:2: the label is missing"),
        ([{"text": "a", "label": 1}, {"text": "b"}], r"d.jsonl:2: the label is missing"),
        ([{"text": "a", "label": 1}, {"text": "b", "label": 0.5}], r"d.jsonl:2: label 0.5 is not a class"),
        ([{"text": "a", "label": 1}, {"text": "b", "label": " 2.50 "}], r"d.jsonl:2: label 2.50 is not a class"),
        ([{"text": "a", "label": 1}, {"text": "b", "label": "1e5000"}], r"d.jsonl:2: label 1e5000... has over 4000 digits"),
        ([{"text": "a", "label": 1}, {"text": "b", "label": "1e9999999999999999999999"}],
         r"d.jsonl:2: label 1e9{18}\.\.\. has over 4000 digits"),  # beyond decimal's exponent range
        ([{"text": "a", "label": 1}, {"text": "b", "label": "nan"}], r"d.jsonl:2: the label is missing \('nan'\)"),
        ([{"text": "a", "label": "pos"}, {"text": "b", "label": 2}], r"d.jsonl:2: label '2' is a number but .*'pos' is a name"),
        ([{"text": "a", "label": 1}, {"text": "b", "label": [1]}], r"d.jsonl:2: label \[1\] is a list"),
        ([{"text": "a", "label": 1}, {"text": None, "label": 0}], r"d.jsonl:2: the text is missing"),
        ([{"text": "a", "label": 1}, {"text": "  ", "label": 0}], r"d.jsonl:2: the text is empty"),
    ],
)
def test_bad_labels_and_texts_name_the_file_line_and_value(tmp_path, records, message):
    with pytest.raises(DataError, match=message):
        load_file(write_jsonl(tmp_path / "d.jsonl", records))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("d.csv", 'text,label\n"two\nlines",1\nok,0\nempty,\n', r"d.csv:5: the label is empty"),  # row starts at 5
        ("d.csv", "text,label\na,1\nb, with a comma,0\n", r"d.csv:3: 3 cells but the header has 2 \(text, label\)"),
        ("d.csv", "", "d.csv: empty file"),
        ("d.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n{"text": "c", "label": 0\n', r"d.jsonl:4: not valid JSON"),
        ("d.jsonl", '{"text": "a", "label": 1}\n[1, 2]\n', r"d.jsonl:2: expected a JSON object"),
        ("d.json", '[{"text": "a", "label": 1},\n {"text": "b" "label": 0}]', r"d.json:2: not valid JSON"),
    ],
)
def test_malformed_files_name_the_line_where_the_row_starts(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        load_file(tmp_path / name)


def test_jsonl_lines_end_at_newlines_only(tmp_path):
    """json.dumps(ensure_ascii=False) leaves U+2028, U+2029 and U+0085 unescaped inside a string: still one line."""
    texts = ["line one\u2028line two", "para\u2029graph", "caf\x85e", "plain"]
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": t, "label": i % 2}, ensure_ascii=False) for i, t in enumerate(texts)]
    path.write_text("\r\n".join(lines[:2]) + "\r\n" + "\n".join(lines[2:]) + "\n", encoding="utf-8", newline="")
    assert load_file(path).texts == texts
    path.write_text("\r".join(lines) + "\r", encoding="utf-8", newline="")  # old Mac line ends: a JSON string holds no raw CR
    assert load_file(path).texts == texts
    path.write_text("\n".join(lines) + '\n{"text": "a\u2028b", "label": 0\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d.jsonl:5: not valid JSON"):  # line numbers count newlines only
        load_file(path)


def test_a_csv_field_longer_than_the_csv_modules_default_limit_is_read(tmp_path, monkeypatch):
    import csv

    limit = csv.field_size_limit()
    path = tmp_path / "d.csv"
    path.write_text("text,label\nshort,pos\n" + "x" * 200_000 + ",neg\n")
    assert [len(t) for t in load_file(path).texts] == [5, 200_000]
    assert csv.field_size_limit() == limit  # the module's global setting is restored
    monkeypatch.setattr(data_module, "CSV_FIELD_LIMIT", 1000)  # any csv.Error is a DataError naming the row's line
    with pytest.raises(DataError, match=r"d.csv:3: not readable as CSV \(field larger than field limit \(1000\)\)"):
        load_file(path)
    assert csv.field_size_limit() == limit


def test_non_utf8_names_the_line(tmp_path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ngood,1\ncaf\u00e9,0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.csv:3: not UTF-8 text \(byte 0xe9\)"):
        load_file(latin)


def test_tsv_json_array_and_files_without_extension(tmp_path):
    (tmp_path / "d.tsv").write_text("text\tlabel\na, b\tx\nc\ty\n")
    assert load_file(tmp_path / "d.tsv").texts == ["a, b", "c"]
    # one unmatched quote in a file written without quoting: the rows up to the next quote became one text, exit 0
    (tmp_path / "q.tsv").write_text('text\tlabel\nI loved it\tpos\n"boring plot\tneg\nbest film ever\tpos\n'
                                     'the "Titanic" is overrated\tneg\n')
    with pytest.raises(DataError, match=r"q.tsv:3: a cell runs over several lines and holds tabs: a quote"):
        load_file(tmp_path / "q.tsv")
    # quotes as csv and pandas write them, a line break in a quoted text: read as written
    import csv

    texts = ['He said "great film" twice', "two\nlines", "plain"]
    with open(tmp_path / "w.tsv", "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([["text", "label"], *[[t, label] for t, label in zip(texts, "xyx")]])
    assert load_file(tmp_path / "w.tsv").texts == texts
    (tmp_path / "d.json").write_text(json.dumps([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]))
    assert load_file(tmp_path / "d.json").label_names == ["x", "y"]
    (tmp_path / "noext").write_text("text,label\na,x\nb,y\n")
    assert len(load_text_classification(str(tmp_path / "noext"))) == 2
    with pytest.raises(DataError, match="is a folder"):
        load_text_classification(str(tmp_path))


def test_column_names_for_a_bundled_corpus_are_refused_before_it_is_read(monkeypatch):
    monkeypatch.setattr(data_module, "load_bundled", lambda name: pytest.fail("the corpus was read"))
    for columns in ({"text_column": "sentence"}, {"label_column": "y"}):
        with pytest.raises(DataError, match=r"data 'pang-lee' is a bundled corpus with fixed columns; .* leave them unset"):
            load_text_classification("pang-lee", **columns)


def test_a_missing_local_path_is_never_looked_up_on_the_hub(tmp_path, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(data_module, "load_hub", no_hub)
    for source in [str(tmp_path / "train"), "./train", "~/nope/train", "data/sub/train", "train.csv"]:
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_text_classification(source)


def test_a_hub_name_offline_says_so_at_once(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DataError, match="HF_HUB_OFFLINE is set"):
        load_text_classification("someone/some-dataset")
    assert time.perf_counter() - start < 2


def test_a_hub_datasets_class_names_are_its_classes(monkeypatch):
    """A ClassLabel column holds integer ids of named classes: labels.json recorded "0", "1", "2"."""
    datasets = pytest.importorskip("datasets")
    from datasets import ClassLabel, Dataset, Features, Value

    import giva.data as data_module

    features = Features({"text": Value("string"), "label": ClassLabel(names=["negative", "neutral", "positive"])})
    table = Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 1, 2, 1]}, features=features)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: table)  # the table of the moment
    monkeypatch.setattr(data_module, "hub_unreachable", lambda: None)
    loaded = data_module.load_text_classification("someorg/sentiment")
    assert loaded.label_names == ["negative", "neutral", "positive"]
    assert [loaded.label_names[i] for i in loaded.labels] == ["negative", "neutral", "positive", "neutral"]
    # the dataset's order, not sorted names, and every class (a head trained on it keeps its outputs); -1: refused
    features = Features({"text": Value("string"), "label": ClassLabel(names=["World", "Sports", "Business", "Sci/Tech"])})
    table = Dataset.from_dict({"text": ["a", "b", "c"], "label": [3, 0, 3]}, features=features)
    loaded = data_module.load_text_classification("someorg/news")
    assert loaded.label_names == ["World", "Sports", "Business", "Sci/Tech"] and loaded.labels == [3, 0, 3]
    table = Dataset.from_dict({"text": ["a", "b"], "label": [-1, 0]}, features=features)
    with pytest.raises(DataError, match=r"dataset 'someorg/news' row 0: label -1 is not one of the 4 classes of its "
                                        r"ClassLabel column \(World, Sports, Business, Sci/Tech\)"):
        data_module.load_text_classification("someorg/news")
