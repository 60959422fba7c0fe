"""Adding labels to and removing labels from a built index (index_builder/labels.py, `elias index add-labels|
remove-labels`), on a tiny model trained from real EURLEX57K rows without the labels it then adds."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import TINY, _cli, _one_line_error

from elias_retrieval.config import EliasConfig
from elias_retrieval.index_format import read_index, verify_index, write_index
from elias_retrieval.label_layout import in_label_order
from elias_retrieval.search import search
from elias_retrieval.searcher import Searcher
from index_builder.build import build_index
from index_builder.labels import (
    NEUTRAL_MARGIN,
    Examples,
    LabelChangeError,
    add_labels,
    remove_labels,
    unreachable_labels,
)
from trainer.train import train as run_training

ROWS = 800
MORE = ["train.max_train_points=800", "model.dim=32", "train.reranker=true"]


@pytest.fixture(scope="module")
def base(shared_data_dir, tmp_path_factory) -> dict:
    """A tiny text model with an ELIAS++ ranker trained on EURLEX57K rows from which 10 labels (seeded, 5 to 40
    documents each) were deleted; its index; and those labels' documents, as the dataset has them."""
    root = tmp_path_factory.mktemp("labels")
    (root / "data").mkdir()
    with gzip.open(shared_data_dir / "eurlex57k" / "train.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in itertools.islice(f, ROWS)]
    counts = Counter(x for r in rows for x in r["labels"])
    rng = np.random.default_rng(0)
    new = sorted(rng.choice(sorted(x for x, c in counts.items() if 5 <= c <= 40), 10, replace=False).tolist())
    train = [{**r, "labels": [x for x in r["labels"] if x not in new]} for r in rows]
    (root / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (root / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:50]))
    run_training(root / "data", root / "model", EliasConfig().with_overrides([*TINY, *MORE]), progress=False)
    build_index(root / "model", root / "index", progress=False)
    docs = [r for r in rows if set(r["labels"]) & set(new)]
    (root / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in docs))
    (root / "new.jsonl").write_text("".join(json.dumps({"id": x, "name": f"label {x}"}) + "\n" for x in new))
    return {"root": root, "index": root / "index", "new": new, "docs": docs}


@pytest.fixture(scope="module")
def added(base) -> Path:
    out = base["root"] / "added"
    add_labels(base["index"], out, [{"id": x, "name": None} for x in base["new"]], base["root"] / "docs.jsonl")
    return out


def _digest(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _edges(index: Path) -> dict[int, set[str]]:
    """Each cluster's labels (dataset ids)."""
    idx = read_index(index)
    t = idx.tensors
    ids = idx.labels.ids
    return {c: {ids[int(label)] for label in t.labels_of(row[row < t.num_labels].long())}
            for c, row in enumerate(t.A_ids)}


def test_added_labels_are_found_by_search_for_their_own_examples(base, added):
    verify_index(added)
    old, new = read_index(base["index"]), read_index(added)
    assert new.manifest["index_version"] != old.manifest["index_version"]
    assert new.labels.ids == old.labels.ids + base["new"]
    s = Searcher.open(added, device="cpu")
    new, known = set(base["new"]), set(old.labels.ids)
    for rerank, k in ((True, 10), (False, 100)):  # ELIAS++ (the new ranker rows) and plain ELIAS
        res = s.search_texts([_text(d) for d in base["docs"]], k=k, rerank=rerank)
        found, hits, total, old_hits, old_total = Counter(), 0, 0, 0, 0
        for doc, ids in zip(base["docs"], res.label_ids, strict=True):
            labels = set(doc["labels"])
            found.update(labels & new & set(ids))
            hits, total = hits + len(labels & new & set(ids)), total + len(labels & new)
            old_hits, old_total = old_hits + len(labels & known & set(ids)), old_total + len(labels & known)
        # Most new labels are in the top k for some of their documents, and for nearly as many of them as the
        # index's own labels are for theirs (the same documents: the index's training documents).
        assert len(found) >= 0.8 * len(new), rerank
        assert hits / total >= 0.6 * old_hits / old_total, (rerank, hits, total, old_hits, old_total)


def _text(doc: dict) -> str:
    return "\n".join(doc[f] for f in ("title", "header", "recitals", "main_body") if isinstance(doc.get(f), str))


def test_adding_keeps_every_label_reachable_and_every_cluster_its_labels(base, added):
    assert unreachable_labels(read_index(added).tensors).numel() == 0
    before, after = _edges(base["index"]), _edges(added)
    assert all(before[c] <= after[c] for c in before)
    assert set().union(*after.values()) >= set(base["new"])


def test_rows_of_a_grow_past_kappa_when_full(base, tmp_path):
    old = read_index(base["index"])
    kappa, L, C = old.manifest["model"]["kappa"], old.tensors.num_labels, old.tensors.num_clusters
    free = int((old.tensors.A_ids == L).sum(1).min())
    names = [{"id": f"new-{i}", "name": f"regulation {i} on fisheries"} for i in range(free + 1)]
    add_labels(base["index"], tmp_path / "wide", names, clusters_per_label=C)  # every row gets free + 1 labels
    new = read_index(tmp_path / "wide", verify=True)
    assert new.manifest["model"]["kappa"] > kappa  # one row took more labels than it had pad slots
    assert unreachable_labels(new.tensors).numel() == 0
    assert all(_edges(base["index"])[c] <= e for c, e in _edges(tmp_path / "wide").items())
    # A name-only label has an empty ranker row whose margin leaves it undecided (rank score 0.5).
    ranker = new.load_ranker()
    assert ranker.W[L:].nnz == 0 and np.allclose(ranker.bias[L:], NEUTRAL_MARGIN)
    assert np.allclose(ranker.rank_score(np.float32(NEUTRAL_MARGIN)), 0.5)


def test_example_labels_get_ranker_rows_fitted_on_their_examples_or_scaled_like_the_existing_ones(base, added):
    index = read_index(added)
    ranker = index.load_ranker()
    L = read_index(base["index"]).tensors.num_labels
    W = ranker.W.tocsr()
    norms = np.sqrt(np.asarray(W.multiply(W).sum(1)).ravel())
    old = np.median(norms[:L][np.diff(W.indptr)[:L] > 0])
    # A label with enough hard negatives among the examples gets a fitted squared-hinge row (it has negative
    # weights, for the words of the documents it must rank below); the rest the calibrated mean of its examples.
    fitted = [j for j in range(L, W.shape[0]) if (W[j].data < 0).any()]
    assert fitted
    for j in sorted(set(range(L, W.shape[0])) - set(fitted)):
        assert np.isclose(norms[j], old, rtol=1e-3)
    X = index.load_featurizer().transform([_text(d) for d in base["docs"]])
    for j in fitted:
        own = np.asarray([base["new"][j - L] in d["labels"] for d in base["docs"]])
        m = (X @ W[j].T).toarray().ravel() + ranker.bias[j]
        assert m[own].mean() > m[~own].mean() + 0.5, j


def test_refined_classifiers_keep_the_scale_and_separate_the_examples_better(base, added, tmp_path):
    add_labels(base["index"], tmp_path / "closed", [{"id": x} for x in base["new"]], base["root"] / "docs.jsonl",
               refine_steps=0)
    L = read_index(base["index"]).tensors.num_labels
    enc = read_index(added).load_encoder()
    emb = torch.nn.functional.normalize(enc.encode([_text(d) for d in base["docs"]]), dim=1)
    Y = torch.tensor([[x in d["labels"] for x in base["new"]] for d in base["docs"]], dtype=torch.float32)

    def auc(index: Path) -> float:  # how often a label scores its own example above another label's, on average
        t = in_label_order(read_index(index).tensors)
        cos = emb @ torch.nn.functional.normalize(t.W_L[L:].float(), dim=1).T
        return float(np.mean([(cos[y > 0, j, None] > cos[None, y == 0, j]).float().mean() for j, y in enumerate(Y.T)]))

    closed, refined = (in_label_order(read_index(i).tensors) for i in (tmp_path / "closed", added))
    assert torch.allclose(refined.W_L[L:].float().norm(dim=1), closed.W_L[L:].float().norm(dim=1), rtol=1e-2)
    assert auc(added) > auc(tmp_path / "closed")  # `added` used the default refinement


def test_the_input_index_is_never_modified(base, tmp_path):
    before = _digest(base["index"])
    add_labels(base["index"], tmp_path / "a", [{"id": "x-1", "name": "chemistry"}])
    remove_labels(base["index"], tmp_path / "r", [read_index(base["index"]).labels.ids[0]])
    assert _digest(base["index"]) == before
    with pytest.raises(LabelChangeError, match="another directory"):
        remove_labels(base["index"], base["index"], [read_index(base["index"]).labels.ids[0]])


def test_bad_label_input_is_an_error_naming_the_ids(base, tmp_path):
    index, out = base["index"], tmp_path / "out"
    existing = read_index(index).labels.ids[3]
    with pytest.raises(LabelChangeError, match=f"already in the index: '{existing}'"):
        add_labels(index, out, [{"id": existing, "name": "x"}])
    with pytest.raises(LabelChangeError, match="more than once: 'dup'"):
        add_labels(index, out, [{"id": "dup", "name": "a"}, {"id": "dup", "name": "b"}])
    with pytest.raises(LabelChangeError, match="need a name: 'nameless'"):
        add_labels(index, out, [{"id": "nameless"}])
    with pytest.raises(LabelChangeError, match="not in the index: 'no-such-label'"):
        remove_labels(index, out, ["no-such-label", existing])
    with pytest.raises(LabelChangeError, match="dimension 3, the index's is 32"):
        add_labels(index, out, [{"id": "e"}], Examples([["e"]], embeddings=torch.ones(1, 3)))
    assert not out.exists()


def test_an_index_without_an_encoder_takes_embeddings_but_refuses_text(base, tmp_path):
    old = read_index(base["index"])
    bare = tmp_path / "bare"
    write_index(bare, in_label_order(old.tensors), old.labels, None, dtype="fp32", defaults=old.defaults, meta={})
    with pytest.raises(LabelChangeError, match="no encoder"):
        add_labels(bare, tmp_path / "out", [{"id": "n", "name": "physics"}])
    emb = torch.randn(4, old.tensors.dim)
    add_labels(bare, tmp_path / "out", [{"id": "n"}], Examples([["n"]] * 4, embeddings=emb))
    new = read_index(tmp_path / "out", verify=True)
    assert new.labels.ids[-1] == "n" and unreachable_labels(new.tensors).numel() == 0


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_removed_labels_never_come_back_and_the_rest_score_as_before(base, tmp_path, dtype):
    index = base["index"] if dtype == "fp16" else build_index(base["root"] / "model", tmp_path / "i8", dtype="int8",
                                                              progress=False)
    old = read_index(index)
    L, C = old.tensors.num_labels, old.tensors.num_clusters
    rng = np.random.default_rng(0)
    gone = sorted(rng.choice(L, size=L // 5, replace=False).tolist())
    gone_ids = [old.labels.ids[i] for i in gone]
    remove_labels(index, tmp_path / "removed", gone_ids)
    new = read_index(tmp_path / "removed", verify=True)
    assert new.tensors.num_labels == L - len(gone) and not set(gone_ids) & set(new.labels.ids)
    q = torch.randn(200, old.tensors.dim) * 3
    r_old = search(q, old.tensors, k=L, beam_size=C, shortlist_size=L)
    r_new = search(q, new.tensors, k=L, beam_size=C, shortlist_size=L)
    old_ids, new_ids = np.array(old.labels.ids + [""]), np.array(new.labels.ids + [""])
    for i in range(q.shape[0]):  # every label scored (full beam and shortlist): the same labels, the same scores
        got = dict(zip(new_ids[r_new.ids[i].numpy()], r_new.scores[i].tolist(), strict=True))
        want = dict(zip(old_ids[r_old.ids[i].numpy()], r_old.scores[i].tolist(), strict=True))
        assert not set(got) & set(gone_ids)
        want = {label: score for label, score in want.items() if label not in gone_ids}
        assert got.keys() == want.keys()
        assert np.allclose([got[x] for x in want], list(want.values()), atol=1e-6)
    # Text queries through the searcher (ELIAS++ re-ranked) never return them either.
    res = Searcher.open(tmp_path / "removed", device="cpu").search_texts([_text(d) for d in base["docs"]], k=50)
    assert not {x for ids in res.label_ids for x in ids} & set(gone_ids)


def test_cli_add_and_remove_labels(base, tmp_path):
    root = base["root"]
    res = _cli("index", "add-labels", base["index"], tmp_path / "a", "--labels", root / "new.jsonl",
               "--examples", root / "docs.jsonl", "--quiet")
    assert res.exit_code == 0, res.output
    assert f"{len(base['new'])} labels added ({len(base['new'])} from example documents" in res.output
    assert _cli("index", "verify", tmp_path / "a").exit_code == 0
    (tmp_path / "ids.txt").write_text("\n".join(base["new"][:3]) + "\n\n")
    res = _cli("index", "remove-labels", tmp_path / "a", tmp_path / "r", "--ids", tmp_path / "ids.txt", "--quiet")
    assert res.exit_code == 0, res.output
    assert read_index(tmp_path / "r").labels.ids == read_index(base["index"]).labels.ids + base["new"][3:]
    _one_line_error(_cli("index", "add-labels", base["index"], tmp_path / "b", "--labels", root / "new.jsonl",
                         "--examples", tmp_path / "missing.jsonl"), "missing.jsonl", "no such file")
    _one_line_error(_cli("index", "remove-labels", tmp_path / "a", tmp_path / "c", "--ids", root / "new.jsonl"),
                    "not in the index")
    (tmp_path / "bad.jsonl").write_text('{"name": "no id"}\n')
    _one_line_error(_cli("index", "add-labels", base["index"], tmp_path / "d", "--labels", tmp_path / "bad.jsonl"),
                    "bad.jsonl:1", "id")
