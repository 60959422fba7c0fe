"""`elias eval --baseline flat|hnsw|ivf`: the model's encoder and W_L searched by faiss, same metrics as ELIAS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import TINY, _cli, _one_line_error

from elias_retrieval.config import EliasConfig
from trainer.train import train as run_training


@pytest.fixture(scope="module")
def tiny_model(bibtex, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli-baseline") / "model"
    run_training(bibtex, out, EliasConfig().with_overrides(TINY), progress=False)
    return out


@pytest.fixture(scope="module")
def elias_metrics(tiny_model, bibtex, tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("elias-json") / "m.json"
    res = _cli("eval", tiny_model, bibtex, "--max-points", "200", "--json", path)
    assert res.exit_code == 0, res.output
    return json.loads(path.read_text())


@pytest.mark.parametrize(("kind", "extra", "method", "settings"), [
    ("flat", [], "Flat (faiss)", {}),
    ("hnsw", ["--ef-search", "300"], "HNSW (faiss)", {"ef_search": 300, "M": 32, "ef_construction": 200}),
    ("ivf", ["--nprobe", "1000"], "IVF (faiss)", {"nprobe": 50, "nlist": 50}),  # L = 159: nlist 50, nprobe capped
])
def test_eval_with_a_baseline_reports_the_same_metrics(tiny_model, bibtex, tmp_path, elias_metrics, kind, extra,
                                                       method, settings):
    res = _cli("eval", tiny_model, bibtex, "--max-points", "200", "--baseline", kind, *extra,
               "--json", tmp_path / "b.json")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "b.json").read_text())
    assert m["method"] == method and m["baseline"] == kind and m["num_points"] == 200
    assert {k: m[k] for k in settings} == settings
    assert set(elias_metrics) - {"beam_size", "shortlist_size"} <= set(m)  # the same metric keys
    assert 0 < m["R@100"] <= 100 and 0 <= m["P@5"] <= 100
    out = " ".join(res.stdout.split())  # the console wraps long lines
    assert f"method: {method}" in out and "no ELIAS++ re-ranking" in out and "P@1" in out


def test_exact_and_generous_approximate_baselines_agree(tiny_model, bibtex, tmp_path):
    # 159 labels: HNSW with efSearch past L and IVF probing every list are exact.
    got = {}
    for kind, extra in (("flat", []), ("hnsw", ["--ef-search", "400"]), ("ivf", ["--nprobe", "50"])):
        res = _cli("eval", tiny_model, bibtex, "--max-points", "200", "--baseline", kind, *extra,
                   "--json", tmp_path / f"{kind}.json")
        assert res.exit_code == 0, res.output
        got[kind] = json.loads((tmp_path / f"{kind}.json").read_text())
    for kind in ("hnsw", "ivf"):
        assert got[kind]["R@100"] == pytest.approx(got["flat"]["R@100"], abs=0.5), kind
        assert got[kind]["P@5"] == pytest.approx(got["flat"]["P@5"], abs=0.5), kind


def test_bad_baseline_options_are_one_error_line(tiny_model, bibtex):
    _one_line_error(_cli("eval", tiny_model, bibtex, "--baseline", "annoy"), "unknown baseline kind 'annoy'")
    _one_line_error(_cli("eval", tiny_model, bibtex, "--baseline", "hnsw", "--ef-search", "0"), "--ef-search", "0")
    _one_line_error(_cli("eval", tiny_model, bibtex, "--baseline", "ivf", "--nprobe", "-2"), "--nprobe")
    _one_line_error(_cli("eval", tiny_model, bibtex, "--baseline", "flat", "--ef-search", "64"),
                    "--ef-search applies to --baseline hnsw only")
    _one_line_error(_cli("eval", tiny_model, bibtex, "--nprobe", "8"), "--nprobe applies to --baseline ivf only")
    _one_line_error(_cli("eval", tiny_model, bibtex, "--baseline", "flat", "--beam-size", "4"), "--beam-size")


def test_eval_help_says_the_baseline_disables_reranking():
    res = _cli("eval", "--help")
    assert res.exit_code == 0
    text = " ".join(res.stdout.split())
    assert "--baseline" in text and "--ef-search" in text and "--nprobe" in text
    assert "Disables ELIAS++ re-ranking" in text
