import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from elias_retrieval.config import DataConfig
from elias_retrieval.data import DataFormatError, LabelVocab, dataset_data_config, find_split, has_split, read_split
from elias_retrieval.dataset_fields import DatasetFieldsError

CFG = DataConfig(text_fields=["title", "body"], label_field="labels")


def write_jsonl(path: Path, rows: list[dict], gz: bool = False) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())


ROWS = [
    {"id": "a", "title": "First doc", "body": ["para one", "para two"], "labels": ["x", "y"]},
    {"id": "b", "title": "Second", "labels": [3, "x"]},
    {"id": "c", "body": "only body", "other": "ignored", "labels": []},
]


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_plain_and_gzip_read_texts_labels_and_ids(tmp_path, gz):
    write_jsonl(tmp_path / ("train.jsonl.gz" if gz else "train.jsonl"), ROWS, gz)
    d = read_split(tmp_path, "train", CFG)
    assert d.texts == ["First doc\npara one\npara two", "Second", "only body"]
    assert d.ids == ["a", "b", "c"]
    assert d.features is None
    assert d.vocab.ids == ["3", "x", "y"]  # sorted string ids, ints converted
    assert d.vocab.names == [None, None, None]
    assert d.labels.dtype == np.float32
    assert d.labels.toarray().tolist() == [[0, 1, 1], [1, 1, 0], [0, 0, 0]]
    assert len(d) == 3 and d.num_labels == 3


def test_gzip_detected_by_magic_bytes_not_suffix(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS, gz=True)
    assert read_split(tmp_path, "train", CFG).texts[1] == "Second"


def test_max_chars_truncates_and_max_rows_limits(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    d = read_split(tmp_path, "train", DataConfig(text_fields=["title", "body"], max_chars=5), max_rows=2)
    assert d.texts == ["First", "Secon"]
    assert d.labels.shape[0] == 2


def test_label_names_come_from_labels_jsonl(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "labels.jsonl.gz", [{"id": "x", "name": "Ex"}, {"id": "3", "name": "Three"}], gz=True)
    assert read_split(tmp_path, "train", CFG).vocab.names == ["Three", "Ex", None]


def test_vocab_save_load_round_trip(tmp_path):
    vocab = LabelVocab(["10", "2", "abc"], ["ten", None, "Äbc"])
    vocab.save(tmp_path / "labels.jsonl")
    loaded = LabelVocab.load(tmp_path / "labels.jsonl")
    assert loaded.ids == vocab.ids and loaded.names == vocab.names
    assert loaded.index() == {"10": 0, "2": 1, "abc": 2}
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporaries


def test_unseen_test_labels_become_extra_columns(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    test_rows = [{"title": "t", "labels": ["new", "x"]}, {"title": "u", "labels": ["z", "new"]}]
    write_jsonl(tmp_path / "test.jsonl", test_rows)
    train = read_split(tmp_path, "train", CFG)
    test = read_split(tmp_path, "test", CFG, vocab=train.vocab)
    assert test.num_labels == 3
    assert test.labels.shape == (2, 5)  # 3 vocab columns + "new" + "z"
    assert test.labels.toarray().tolist() == [[0, 1, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert test.known_labels().toarray().tolist() == [[0, 1, 0], [0, 0, 0]]
    sub = test.subset(np.array([1]))
    assert sub.texts == ["u"] and sub.labels.shape == (1, 5)


def test_find_split_and_missing_split_error(tmp_path):
    write_jsonl(tmp_path / "dev.jsonl.gz", ROWS, gz=True)
    assert find_split(tmp_path, "dev").name == "dev.jsonl.gz"
    assert has_split(tmp_path, "dev") and not has_split(tmp_path, "test")
    with pytest.raises(DataFormatError, match=r"no test split \(looked for test\.jsonl, .*test\.X\.npz"):
        find_split(tmp_path, "test")


XC = "3 6 4\n0,2 0:1 5:2.5\n 1:1\n3 2:0.5 4:1\n"


def test_xc_reader_incl_point_without_labels(tmp_path):
    (tmp_path / "train.txt").write_text(XC)
    (tmp_path / "test.txt.gz").write_bytes(gzip.compress(b"1 6 4\n1 0:3\n"))
    d = read_split(tmp_path, "train", CFG)
    assert d.texts is None and d.features.dtype == np.float32
    assert d.features.shape == (3, 6)
    assert d.features.toarray()[0].tolist() == [1, 0, 0, 0, 0, 2.5]
    assert d.features.toarray()[1].tolist() == [0, 1, 0, 0, 0, 0]
    assert d.labels.toarray().tolist() == [[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    assert d.vocab.ids == ["0", "1", "2", "3"]
    test = read_split(tmp_path, "test", CFG, vocab=d.vocab)
    assert test.labels.toarray().tolist() == [[0, 1, 0, 0]]


@pytest.mark.parametrize(
    ("content", "lineno", "problem"),
    [
        ("3 6\n0 0:1\n", 1, "bad header"),
        ("x 6 4\n0 0:1\n", 1, "bad header"),
        ("3 6 4\n0 0:1\n1 1:1\n", None, "header says 3 rows, found 2"),
        ("1 6 4\n0 0:1\n1 1:1\n", 3, "more rows"),
        ("2 6 4\n0 0:1\n1 6:1\n", 3, "feature id 6 out of range"),
        ("2 6 4\n0 0:1\n1 2:abc\n", 3, "feature value 'abc' is not a number"),
        ("2 6 4\n0 0:1\n1 z:1\n", 3, "feature id 'z' is not an integer"),
        ("2 6 4\n0 0:1\n1 2\n", 3, "not an 'id:value' pair"),
        ("2 6 4\n0,x 0:1\n1 1:1\n", 2, "label id 'x' is not an integer"),
        ("2 6 4\n0,4 0:1\n1 1:1\n", 2, "label id 4 out of range"),
        ("2 6 4\n\n1 1:1\n", 2, "empty line"),
    ],
)
def test_malformed_xc_raises_naming_file_and_line(tmp_path, content, lineno, problem):
    (tmp_path / "train.txt").write_text(content)
    with pytest.raises(DataFormatError) as e:
        read_split(tmp_path, "train", CFG)
    where = f"train.txt:{lineno}: " if lineno else "train.txt: "
    assert where in str(e.value) and problem in str(e.value)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"title": "t", "labels": ["a"', "not valid JSON"),
        ('{"title": "t"}', "no 'labels' field"),
        ('["not", "an", "object"]', "expected a JSON object"),
        ('{"title": "t", "labels": "a"}', "must be a list"),
    ],
)
def test_malformed_jsonl_raises_naming_file_and_line(tmp_path, line, problem):
    (tmp_path / "train.jsonl").write_text('{"title": "ok", "labels": ["a"]}\n' + line + "\n")
    with pytest.raises(DataFormatError) as e:
        read_split(tmp_path, "train", CFG)
    assert "train.jsonl:2: " in str(e.value) and problem in str(e.value)


def test_npz_reader(tmp_path):
    X = sp.random(5, 7, density=0.4, format="csr", random_state=0)
    Y = sp.csr_matrix(np.eye(5, 3))
    sp.save_npz(tmp_path / "train.X.npz", X)
    sp.save_npz(tmp_path / "train.Y.npz", Y)
    d = read_split(tmp_path, "train", CFG, max_rows=4)
    assert d.features.shape == (4, 7) and d.features.dtype == np.float32
    assert d.labels.toarray().tolist() == np.eye(5, 3)[:4].tolist()
    assert d.vocab.ids == ["0", "1", "2"]
    (tmp_path / "train.Y.npz").unlink()
    with pytest.raises(DataFormatError, match="train.Y.npz"):
        read_split(tmp_path, "train", CFG)


@pytest.mark.slow
def test_real_bibtex_and_eurlex_first_rows(shared_data):
    bib = read_split(shared_data / "xc" / "bibtex", "train", DataConfig(), max_rows=50)
    assert bib.features.shape == (50, 1836) and bib.labels.shape == (50, 159)
    assert bib.labels.nnz > 50
    eur = read_split(shared_data / "eurlex57k", "dev", DataConfig(), max_rows=30)
    assert len(eur) == 30 and all(len(t) > 100 for t in eur.texts)
    assert eur.ids[0] == "31960D0712"
    assert eur.vocab.ids == sorted(eur.vocab.ids) and all(n is not None for n in eur.vocab.names)


@pytest.mark.slow
def test_real_delicious_point_without_labels(shared_data):
    d = read_split(shared_data / "xc" / "delicious", "train", DataConfig(), max_rows=700)
    # File line 657 (after the header: point 655) starts with a space: no labels, but features.
    assert d.labels[655].nnz == 0 and d.features[655].nnz > 0


# ---- which fields hold the text and the labels ------------------------------------------------------

TIBKAT_LIKE = [
    {"id": "1", "type": "Book", "lang": "de", "text": "Ein Titel\nEine Zusammenfassung", "labels": ["a"]},
    {"id": "2", "type": "Article", "lang": "en", "text": "A title\nAn abstract", "labels": ["b", "a"]},
]
EURLEX_LIKE = [
    {"id": "1", "type": "Regulation", "title": "T", "header": "H", "recitals": "R", "main_body": ["M1", "M2"],
     "attachments": "annex", "labels": ["x"]},
]


def test_text_and_label_fields_are_found_in_the_rows(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", TIBKAT_LIKE)
    cfg = dataset_data_config(tmp_path, DataConfig())
    assert cfg.text_fields == ["text"] and cfg.label_field == "labels"
    assert read_split(tmp_path, "train").texts == ["Ein Titel\nEine Zusammenfassung", "A title\nAn abstract"]


def test_known_fields_are_joined_title_first_and_unknown_ones_left_out(tmp_path):
    write_jsonl(tmp_path / "train.jsonl.gz", EURLEX_LIKE, gz=True)
    assert dataset_data_config(tmp_path, DataConfig()).text_fields == ["title", "header", "recitals", "main_body"]
    assert read_split(tmp_path, "train").texts == ["T\nH\nR\nM1\nM2"]


def test_dataset_json_names_the_fields_and_explicit_settings_win(tmp_path):
    rows = [{"name": "a doc", "blurb": "more words", "subject_ids": ["s1"], "text": "ignored"}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"text_fields": ["name", "blurb"], "label_field": "subject_ids", "language": "en"}))
    cfg = dataset_data_config(tmp_path, DataConfig())
    assert (cfg.text_fields, cfg.label_field, cfg.language) == (["name", "blurb"], "subject_ids", "en")
    assert read_split(tmp_path, "train").texts == ["a doc\nmore words"]
    explicit = dataset_data_config(tmp_path, DataConfig(text_fields=["text"]))
    assert explicit.text_fields == ["text"] and explicit.label_field == "subject_ids"


@pytest.mark.parametrize(("spec", "problem"), [
    ('{"text_field": ["a"]}', "unknown key 'text_field'"),
    ('{"text_fields": "text"}', "text_fields must be a list"),
    ('{"label_field": ["labels"]}', "label_field must be a string"),
    ("[1, 2]", "expected a JSON object"),
    ("{oops", "not valid JSON"),
])
def test_malformed_dataset_json_is_an_error_naming_the_file(tmp_path, spec, problem):
    write_jsonl(tmp_path / "train.jsonl", TIBKAT_LIKE)
    (tmp_path / "dataset.json").write_text(spec)
    with pytest.raises(DatasetFieldsError, match=problem) as e:
        read_split(tmp_path, "train")
    assert "dataset.json" in str(e.value)


def test_a_configured_text_field_no_row_has_is_an_error_listing_the_fields(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", TIBKAT_LIKE)
    with pytest.raises(DataFormatError) as e:
        read_split(tmp_path, "train", DataConfig(text_fields=["title", "text"]))
    assert "no row has the text field 'title'" in str(e.value)
    assert "id, labels, lang, text, type" in str(e.value)


def test_rows_without_a_known_text_or_label_field_are_an_error_listing_the_fields(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"id": "1", "words": "some text", "labels": ["a"]}])
    with pytest.raises(DatasetFieldsError, match=r"no text field found .* fields id, labels, words"):
        read_split(tmp_path, "train")
    write_jsonl(tmp_path / "train.jsonl", [{"id": "1", "text": "some text", "cats": "a"}])
    with pytest.raises(DatasetFieldsError, match=r"no label field found .* fields cats, id, text"):
        read_split(tmp_path, "train")


def test_a_missing_label_field_names_the_fields_of_the_row(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "labels": ["x"]}, {"text": "b", "tags": ["y"]}])
    with pytest.raises(DataFormatError, match=r"train.jsonl:2: no 'labels' field; the row has fields text, tags"):
        read_split(tmp_path, "train")


def test_empty_documents_are_found(tmp_path):
    rows = [{"text": "words", "labels": ["a"]}, {"text": "  ", "labels": ["a"]}, {"title": "t", "labels": []}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    d = read_split(tmp_path, "train", DataConfig(text_fields=["text"]))
    assert d.empty_rows().tolist() == [1, 2]


@pytest.mark.slow
def test_real_tibkat_text_field_is_found(shared_data):
    cfg = dataset_data_config(shared_data / "tibkat", DataConfig())
    assert cfg.text_fields == ["text"] and cfg.label_field == "labels"
    d = read_split(shared_data / "tibkat", "dev", cfg, max_rows=50)
    assert len(d.empty_rows()) == 0 and min(len(t) for t in d.texts) > 10
