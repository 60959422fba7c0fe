"""The `elias` command line: user errors are one `error:` line with exit status 2, and every verb has --help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from elias_retrieval.cli import index, serve, train  # noqa: F401  (registers the verbs on `app`)
from elias_retrieval.cli.app import app
from elias_retrieval.config import EliasConfig
from trainer.train import train as run_training

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

TINY = [
    "train.max_train_points=300", "train.stage1_epochs=1", "train.stage2_epochs=1", "train.stage1_min_examples=0",
    "train.stage2_min_examples=0", "model.dim=16", "train.batch_size=128", "train.reranker=false",
    "train.threads=1", "train.device=cpu",
]


def _cli(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def _one_line_error(res, *fragments: str) -> str:
    assert res.exit_code == 2, f"exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    assert isinstance(res.exception, SystemExit)  # reported, not a crash
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error:"), lines[0]
    assert "Traceback" not in res.output
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny_model(bibtex, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "model"
    run_training(bibtex, out, EliasConfig().with_overrides(TINY), progress=False)
    return out


# ---- train ---------------------------------------------------------------------------------------

def test_train_with_a_missing_dataset_dir_is_one_error_line(tmp_path):
    _one_line_error(_cli("train", tmp_path / "no-such-dataset", tmp_path / "out", "--quiet"), "no-such-dataset",
                    "not found")


def test_train_with_an_unknown_set_key_is_one_error_line(bibtex, tmp_path):
    _one_line_error(_cli("train", bibtex, tmp_path / "out", "--set", "train.no_such_key=1"), "train.no_such_key")
    _one_line_error(_cli("train", bibtex, tmp_path / "out", "--set", "nosection.x=1"), "nosection")
    _one_line_error(_cli("train", bibtex, tmp_path / "out", "--set", "batch_size"), "section.key=value")


def test_train_with_a_wrongly_typed_set_value_is_one_error_line(bibtex, tmp_path):
    _one_line_error(_cli("train", bibtex, tmp_path / "out", "--set", "train.batch_size=many"),
                    "train.batch_size", "integer")
    _one_line_error(_cli("train", bibtex, tmp_path / "out", "--set", "train.reranker=1"), "true or false")
    _one_line_error(_cli("train", bibtex, tmp_path / "out", "--set", "model.alpha=high"), "number")
    assert not (tmp_path / "out").exists()


def test_train_with_an_unknown_choice_is_one_error_line(bibtex, tmp_path):
    _one_line_error(_cli("train", bibtex, tmp_path / "out", "--set", "train.precision=fp16"),
                    "train.precision must be one of auto, fp32, bf16")
    _one_line_error(_cli("train", bibtex, tmp_path / "out", "--set", "train.init=pifa"), "train.init", "centroid")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_train_with_a_text_field_no_row_has_lists_the_fields_found(shared_data, tmp_path):
    line = _one_line_error(_cli("train", shared_data / "tibkat", tmp_path / "out", "--quiet",
                                "--set", 'data.text_fields=["title", "abstract"]'))
    assert "no row has the text field 'title'" in line and "the rows have fields id, labels, lang, text, type" in line


def test_train_on_rows_without_a_known_text_field_lists_the_fields_found(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"id": "1", "words": "some text", "labels": ["a"]}\n')
    _one_line_error(_cli("train", data, tmp_path / "out", "--quiet"), "no text field found",
                    "the rows have fields id, labels, words", "dataset.json")
    assert not (tmp_path / "out").exists()


def test_train_with_an_unknown_encoder_is_one_error_line(bibtex, tmp_path):
    _one_line_error(_cli("train", bibtex, tmp_path / "out", "--encoder", "word2vec"), "word2vec")
    _one_line_error(_cli("train", bibtex, tmp_path / "out", "--set", "model.encoder=bow"), "bow")


def test_train_with_a_malformed_config_file_is_one_error_line(bibtex, tmp_path):
    bad = tmp_path / "cfg.json"
    bad.write_text("{not json")
    _one_line_error(_cli("train", bibtex, tmp_path / "out", "--config", bad), "cfg.json", "not valid JSON")
    bad.write_text(json.dumps({"train": {"epochs_typo": 3}}))
    _one_line_error(_cli("train", bibtex, tmp_path / "out", "--config", bad), "train.epochs_typo")


# ---- eval ----------------------------------------------------------------------------------------

def test_eval_on_a_directory_that_is_not_a_model_is_one_error_line(bibtex, tmp_path):
    _one_line_error(_cli("eval", tmp_path, bibtex), "neither a model directory nor an index directory")
    _one_line_error(_cli("eval", tmp_path / "missing", bibtex), "missing")


def test_eval_with_a_bogus_split_is_one_error_line(tiny_model, bibtex):
    _one_line_error(_cli("eval", tiny_model, bibtex, "--split", "bogus"), "--split", "bogus")


def test_eval_of_a_split_the_dataset_lacks_is_one_error_line(tiny_model, bibtex):
    _one_line_error(_cli("eval", tiny_model, bibtex, "--split", "dev"), "no dev split")


def test_eval_with_bad_search_sizes_is_one_error_line(tiny_model, bibtex):
    _one_line_error(_cli("eval", tiny_model, bibtex, "--beam-size", "0"), "--beam-size")
    _one_line_error(_cli("eval", tiny_model, bibtex, "--beam-size", "999"), "--beam-size 999")


def test_eval_of_a_tiny_model_writes_json(tiny_model, bibtex, tmp_path):
    res = _cli("eval", tiny_model, bibtex, "--max-points", "200", "--json", tmp_path / "m.json")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["num_points"] == 200 and m["method"] == "ELIAS" and 0 <= m["P@1"] <= 100
    assert "P@1" in res.stdout


# ---- a real process ------------------------------------------------------------------------------

def test_python_m_elias_retrieval_reports_user_errors_without_a_traceback(tmp_path):
    env = {**os.environ, "COLUMNS": "60"}  # a narrow terminal must not wrap the error line
    proc = subprocess.run(
        [sys.executable, "-m", "elias_retrieval", "train", str(tmp_path / "nowhere-to-be-found-dataset"),
         str(tmp_path / "out"), "--set", "train.batch_size=lots"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "train.batch_size must be an integer" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


# ---- help ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("verb", [
    ["train"], ["eval"], ["build-index"], ["index"], ["index", "info"], ["index", "verify"], ["search"], ["serve"],
])
def test_every_verb_has_help(verb):
    res = _cli(*verb, "--help")
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.stdout and " ".join(verb) in res.stdout
    assert "Traceback" not in res.output


def test_the_app_lists_every_verb():
    res = _cli("--help")
    assert res.exit_code == 0
    for verb in ("train", "eval", "build-index", "index", "search", "serve"):
        assert verb in res.stdout
