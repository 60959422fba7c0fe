"""The trainer end to end on real data (Bibtex, XC format), small enough for the CPU test suite.

Covers: the model directory layout, `elias eval` metrics against a popularity baseline, ELIAS++ re-ranking,
sparse-A coverage on a real stage-1 model, determinism, and resume after an interruption.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from elias_retrieval.cli import index, serve, train  # noqa: F401  (registers the verbs on `app`)
from elias_retrieval.cli.app import app
from elias_retrieval.config import ConfigError, EliasConfig
from elias_retrieval.data import read_split
from elias_retrieval.model import EliasModel
from elias_retrieval.modeldir import load_model_dir
from elias_retrieval.reranker import SparseRanker
from trainer import train as train_module
from trainer.clustering import balanced_clusters, pifa
from trainer.graph_init import cluster_affinity, coverage, init_graph
from trainer.train import top_clusters
from trainer.train import train as run_training

pytestmark = pytest.mark.slow

# Small and fast (a few seconds each), yet a real learned index: C = 8 clusters of ~20 labels, kappa 40, beam 4.
SMALL = [
    "train.stage1_min_examples=0", "train.stage2_min_examples=0", "train.batch_size=64", "train.lr_labels=0.03",
    "train.lr_encoder=0.01", "model.cluster_size=20", "model.kappa=40", "model.beam_size=4",
    "train.threads=1", "train.device=cpu", "train.stage2_after_convergence=false",
]
E2E = [*SMALL, "train.max_train_points=1500", "train.stage1_epochs=4", "train.stage2_epochs=2", "model.dim=64"]
# For the runs compared tensor by tensor: fewer points, same shapes of the problem, and every epoch run (no early
# stopping, no stage-2 probe), so that the runs have the same shape whatever the dev metric does.
TINY = [*SMALL, "train.max_train_points=600", "train.stage1_epochs=2", "train.stage2_epochs=2", "model.dim=32",
        "train.patience=0", "train.stage2_probe_fraction=0", "train.checkpoint_minutes=0"]
TINY_STEPS_PER_EPOCH = 10  # ceil(600 / 64)

runner = CliRunner()


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _cli(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def _cli_ok(*args: str | Path):
    res = _cli(*args)
    assert res.exit_code == 0, f"exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    return res


def _one_line_error(res, *fragments: str) -> str:
    assert res.exit_code == 2, f"exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    assert isinstance(res.exception, SystemExit)  # handled, not a crash
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "Traceback" not in res.output
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor in every safetensors file of a model directory, keyed by file and name."""
    out = {}
    for f in sorted(model_dir.rglob("*.safetensors")):
        for name, t in load_file(str(f)).items():
            out[f"{f.relative_to(model_dir)}:{name}"] = t
    return out


def _assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    assert any(k.startswith("model.safetensors:") for k in ta)
    differ = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert not differ, f"tensors differ: {differ}"


def _epochs(model_dir: Path) -> list[tuple[int, int]]:
    lines = (model_dir / "history.jsonl").read_text().splitlines()
    return [(r["stage"], r["epoch"]) for r in map(json.loads, lines)]


@pytest.fixture(scope="module")
def e2e_model(bibtex, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "model"
    _cli_ok("train", bibtex, out, "--quiet", *_sets(E2E))
    return out


@pytest.fixture(scope="module")
def e2e_eval(e2e_model, bibtex, tmp_path_factory) -> tuple[dict, dict]:
    d = tmp_path_factory.mktemp("eval")
    _cli_ok("eval", e2e_model, bibtex, "--json", d / "pp.json")
    _cli_ok("eval", e2e_model, bibtex, "--no-rerank", "--json", d / "plain.json")
    return json.loads((d / "pp.json").read_text()), json.loads((d / "plain.json").read_text())


@pytest.fixture(scope="module")
def reference_run(bibtex, tmp_path_factory) -> Path:
    """One uninterrupted TINY run, the reference for determinism and resume."""
    out = tmp_path_factory.mktemp("ref") / "model"
    run_training(bibtex, out, EliasConfig().with_overrides(TINY), progress=False)
    return out


# ---- 1. end to end ------------------------------------------------------------------------------

def test_model_dir_holds_the_documented_files(e2e_model):
    for name in ("config.json", "labels.jsonl", "model.safetensors", "model.json", "history.jsonl"):
        assert (e2e_model / name).is_file(), name
    for name in ("featurizer", "encoder", "train_state", "ranker"):
        assert (e2e_model / name).is_dir(), name
    assert (e2e_model / "encoder" / "encoder.json").is_file()

    meta = json.loads((e2e_model / "model.json").read_text())
    L = meta["num_labels"]
    assert (meta["stage"], L, meta["num_clusters"], meta["dim"]) == (2, 159, 8, 64)
    assert meta["kappa"] >= 40

    t = load_file(str(e2e_model / "model.safetensors"))
    C, kappa, d = meta["num_clusters"], meta["kappa"], meta["dim"]
    assert t["W_C"].shape == (C, d) and t["b_C"].shape == (C,)
    assert t["A_ids"].shape == (C, kappa) and t["A_logits"].shape == (C, kappa)
    assert t["W_L"].shape == (L, d) and t["b_L"].shape == (L,)
    assert torch.isinf(t["A_logits"][t["A_ids"] == L]).all()

    labels = [json.loads(x) for x in (e2e_model / "labels.jsonl").read_text().splitlines()]
    assert len(labels) == L and all("id" in r and "name" in r for r in labels)
    assert EliasConfig.load(e2e_model / "config.json").to_dict() == EliasConfig().with_overrides(E2E).to_dict()
    assert _epochs(e2e_model) == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2)]


def test_eval_json_has_every_metric_in_range(e2e_eval):
    for m in e2e_eval:
        for key in ("P@1", "P@3", "P@5", "nDCG@1", "nDCG@5", "PSP@1", "PSP@5", "R@10", "R@100"):
            assert 0.0 <= m[key] <= 100.0, (key, m[key])
        buckets = [k for k in m if k.startswith("R@100 [")]
        assert "R@100 [>100]" in buckets and "R@100 [6-20]" in buckets
        assert all(0.0 <= m[k] <= 100.0 for k in buckets)
        assert m["num_points"] == 2515 and m["split"] == "test"
        assert m["P@1"] == pytest.approx(m["nDCG@1"])
        assert m["R@10"] <= m["R@20"] <= m["R@50"] <= m["R@100"]
        assert m["P@1"] >= m["P@5"]
    assert (e2e_eval[0]["method"], e2e_eval[1]["method"]) == ("ELIAS++", "ELIAS")


def test_trained_model_beats_the_popularity_baseline(e2e_eval, bibtex):
    cfg = EliasConfig().with_overrides(E2E)
    train_split = read_split(bibtex, "train", cfg.data, max_rows=cfg.train.max_train_points)
    test = read_split(bibtex, "test", cfg.data, vocab=train_split.vocab)
    most_frequent = int(np.asarray(train_split.known_labels().sum(0)).ravel().argmax())
    popularity_p1 = 100.0 * test.labels[:, most_frequent].toarray().mean()
    assert 5.0 < popularity_p1 < 25.0  # Bibtex: about 13.6
    plusplus, plain = e2e_eval
    assert plain["P@1"] >= popularity_p1 + 10.0
    assert plusplus["P@1"] >= 2.5 * popularity_p1
    assert plain["R@100"] >= 70.0


def test_no_rerank_changes_the_ranking_but_not_recall_at_100(e2e_eval, e2e_model):
    plusplus, plain = e2e_eval
    assert load_model_dir(e2e_model).ranker is not None
    assert plusplus["R@100"] == pytest.approx(plain["R@100"], abs=1e-9)
    assert plusplus["P@1"] != pytest.approx(plain["P@1"])
    assert plusplus["nDCG@5"] != pytest.approx(plain["nDCG@5"])


# ---- 2. sparse-A initialisation -----------------------------------------------------------------

def test_every_label_has_an_edge_in_the_trained_graph(e2e_model):
    t = load_file(str(e2e_model / "model.safetensors"))
    L = json.loads((e2e_model / "model.json").read_text())["num_labels"]
    covered = coverage(t["A_ids"], L)
    assert covered.all()
    assert t["train_label_counts"].shape == (L,)
    assert covered[t["train_label_counts"].numpy() > 0].all()


def test_initialised_graph_from_a_real_stage1_model_covers_every_label(bibtex, tmp_path):
    # kappa = the stage-1 cluster size (10 labels, 16 clusters): rows are full, so top-kappa by affinity
    # alone would drop labels. stage2_epochs=0 keeps the initialised graph and the stage-1 model as they are
    # (no holdout: with a dev split the stage-1 model could win the selection).
    out = tmp_path / "model"
    # No re-clustering: the stage-1 partition is then stage 0's, which the check below recomputes.
    cfg = EliasConfig().with_overrides([*TINY, "model.cluster_size=10", "model.kappa=10", "train.stage2_epochs=0",
                                        "train.reranker=false", "train.holdout_fraction=0",
                                        "train.recluster_fraction=0"])
    tm = run_training(bibtex, out, cfg, progress=False)
    L, C = tm.model.num_labels, tm.model.num_clusters
    assert (L, C) == (159, 16)
    A_ids = load_file(str(out / "model.safetensors"))["A_ids"]
    assert coverage(A_ids, L).all()
    assert int(tm.meta["stage"]) == 2

    # Recompute the initialisation from the saved stage-1 model: the same graph. And without the coverage
    # guarantee (each row's top kappa labels by affinity) some labels would have had no edge.
    _, data = train_module.load_data(bibtex, cfg, tm.featurizer, progress=False)
    inputs = tm.model.encoder.prepare(data.train)
    ids, scores = top_clusters(tm.model, inputs, cfg.train.init_top_clusters, cfg.train.eval_batch_size,
                               torch.device("cpu"))
    aff = cluster_affinity(ids, scores, data.Y_train, C)
    partition = balanced_clusters(pifa(data.X_train, data.Y_train), C, seed=cfg.train.seed)
    A2, logits2 = init_graph(aff, partition, 10)
    assert torch.equal(A2, A_ids)
    torch.testing.assert_close(logits2, tm.model.A_logits.detach())

    dense = aff.toarray()
    naive = np.zeros(L, dtype=bool)
    for c in range(C):
        top = np.argsort(-dense[:, c], kind="stable")[:10]
        naive[top[dense[top, c] > 0]] = True
    assert not naive.all(), "the data should exercise the coverage guarantee"


def test_zero_stage2_epochs_still_writes_a_loadable_model(bibtex, tmp_path):
    out = tmp_path / "model"
    cfg = EliasConfig().with_overrides([*TINY, "train.stage2_epochs=0", "train.reranker=false",
                                        "train.holdout_fraction=0"])
    run_training(bibtex, out, cfg, progress=False)
    tm = load_model_dir(out)
    assert int(tm.model.stage) == 2
    assert coverage(tm.model.A_ids, tm.model.num_labels).all()
    assert _epochs(out) == [(1, 1), (1, 2)]


# ---- 3. determinism -----------------------------------------------------------------------------

def test_two_runs_with_the_same_seed_give_identical_tensors(bibtex, reference_run, tmp_path):
    out = tmp_path / "again"
    run_training(bibtex, out, EliasConfig().with_overrides(TINY), progress=False)
    _assert_same_tensors(reference_run, out)
    assert (out / "labels.jsonl").read_bytes() == (reference_run / "labels.jsonl").read_bytes()


def test_a_different_seed_gives_different_tensors(bibtex, reference_run, tmp_path):
    out = tmp_path / "seed1"
    cfg = EliasConfig().with_overrides([*TINY, "train.seed=1", "train.stage2_epochs=1", "train.reranker=false"])
    run_training(bibtex, out, cfg, progress=False)
    a, b = load_file(str(reference_run / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert not torch.equal(a["W_L"], b["W_L"])


# ---- 4. resume ----------------------------------------------------------------------------------

def _interrupt_loss_at(monkeypatch, stage: int, call: int) -> None:
    """KeyboardInterrupt on the `call`-th training step of `stage` (1-based), as Ctrl-C would."""
    original = EliasModel.loss
    seen = {1: 0, 2: 0}

    def loss(self, *args, **kwargs):
        s = int(self.stage)
        seen[s] += 1
        if s == stage and seen[s] == call:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EliasModel, "loss", loss)


def _interrupt_graph_init(monkeypatch) -> None:
    """KeyboardInterrupt between the stages: stage 1 is finished and checkpointed, A not yet initialised."""

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "init_graph", boom)


@pytest.mark.parametrize("where", ["mid-stage-1", "after-stage-1", "mid-stage-2"])
def test_resume_after_an_interruption_ends_with_the_uninterrupted_tensors(bibtex, reference_run, tmp_path,
                                                                          monkeypatch, where):
    out = tmp_path / "model"
    with monkeypatch.context() as m:
        if where == "mid-stage-1":
            _interrupt_loss_at(m, 1, TINY_STEPS_PER_EPOCH + 3)  # in epoch 2 of stage 1
        elif where == "after-stage-1":
            _interrupt_graph_init(m)
        else:
            _interrupt_loss_at(m, 2, TINY_STEPS_PER_EPOCH + 3)  # in epoch 2 of stage 2
        with pytest.raises(KeyboardInterrupt):
            run_training(bibtex, out, EliasConfig().with_overrides(TINY), progress=False)
    assert (out / "train_state").is_dir()
    # Bibtex has no dev split, so one is held out from train: the best model so far is written after every
    # evaluated epoch that improves on dev, from the first epoch of stage 1 on.
    assert (out / "model.json").exists()

    _cli_ok("train", bibtex, out, "--resume", "--quiet")
    _assert_same_tensors(reference_run, out)
    assert _epochs(out) == _epochs(reference_run) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    meta, ref_meta = (json.loads((d / "model.json").read_text()) for d in (out, reference_run))
    pairs = [[(r["stage"], r["epoch"]) for r in m["history"]] for m in (meta, ref_meta)]
    assert pairs[0] == pairs[1]


def test_checkpoints_by_time_land_at_each_stage_end_and_resume_the_same(bibtex, reference_run, tmp_path,
                                                                        monkeypatch):
    cfg = EliasConfig().with_overrides([*TINY, "train.checkpoint_minutes=60"])
    early = tmp_path / "early"
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        _interrupt_loss_at(m, 1, TINY_STEPS_PER_EPOCH + 3)  # in epoch 2 of stage 1: no checkpoint is due yet
        run_training(bibtex, early, cfg, progress=False)
    assert not (early / "train_state").exists() and not (early / "history.jsonl").exists()

    out = tmp_path / "model"
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        _interrupt_graph_init(m)  # stage 1 has ended: its checkpoint holds both of its epochs
        run_training(bibtex, out, cfg, progress=False)
    assert _epochs(out) == [(1, 1), (1, 2)]
    _cli_ok("train", bibtex, out, "--resume", "--quiet")
    _assert_same_tensors(reference_run, out)
    assert _epochs(out) == _epochs(reference_run)


def test_resume_with_nothing_to_resume_is_a_one_line_error(bibtex, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(_cli("train", bibtex, empty, "--resume"), "nothing to resume")
    _one_line_error(_cli("train", bibtex, tmp_path / "missing", "--resume"), "nothing to resume")
    # A run that stopped before its first checkpoint has a config but no training state.
    (empty / "config.json").write_text(json.dumps(EliasConfig().to_dict()))
    _one_line_error(_cli("train", bibtex, empty, "--resume"), "nothing to resume")


def test_resume_rejects_new_settings(bibtex, reference_run):
    _one_line_error(_cli("train", bibtex, reference_run, "--resume", "--set", "train.seed=3"), "--resume")


def test_training_into_a_directory_with_a_run_is_a_one_line_error(bibtex, reference_run):
    before = {p: p.read_bytes() for p in (reference_run / "config.json", reference_run / "model.safetensors")}
    _one_line_error(_cli("train", bibtex, reference_run, "--quiet", *_sets(TINY)), "already holds a training run")
    assert {p: p.read_bytes() for p in before} == before


# ---- holdout dev split --------------------------------------------------------------------------

def test_hold_out_splits_train_into_disjoint_seeded_parts(bibtex):
    data = read_split(bibtex, "train", EliasConfig().data, max_rows=200)
    rest, dev = train_module.hold_out(data, 0.1, 5000, seed=3)
    assert dev is not None and (len(rest), len(dev)) == (180, 20)
    again_rest, again_dev = train_module.hold_out(data, 0.1, 5000, seed=3)
    assert (again_dev.features != dev.features).nnz == 0 and (again_rest.labels != rest.labels).nnz == 0
    rows = {tuple(r.indices) + tuple(r.data) for r in (*rest.features, *dev.features)}
    assert len(rows) == len({tuple(r.indices) + tuple(r.data) for r in data.features})  # nothing lost or doubled
    assert len(train_module.hold_out(data, 0.1, 7, seed=3)[1]) == 7  # capped
    assert train_module.hold_out(data, 0.0, 5000, seed=3) == (data, None)


def test_without_a_dev_split_model_selection_and_fusion_weight_use_a_holdout(e2e_model):
    meta = json.loads((e2e_model / "model.json").read_text())
    by_weight = meta["reranker"]["dev_P@5_by_fusion_weight"]  # Bibtex has no dev split
    thr = meta["reranker"]["threshold"]
    by_threshold = meta["reranker"]["dev_P@5_by_threshold"]
    assert thr in EliasConfig().with_overrides(E2E).train.reranker_thresholds
    assert by_threshold[str(thr)] == max(by_threshold.values()) == max(by_weight.values())
    saved = SparseRanker.load(e2e_model / "ranker")
    assert saved.W.nnz == meta["reranker"]["nnz"] and (np.abs(saved.W.data) >= thr).all()
    assert meta["reranker"]["fusion_weight"] == max(by_weight.values()) or \
        by_weight[str(meta["reranker"]["fusion_weight"])] == max(by_weight.values())
    history = [json.loads(x) for x in (e2e_model / "history.jsonl").read_text().splitlines()]
    assert all("dev" in r for r in history if r["stage"] == 2)


# ---- 5. stage lengths: dev early stopping and the stage-2 probe -----------------------------------

HELD_OUT_STEPS_PER_EPOCH = 9  # ceil(540 / 64): 60 of TINY's 600 points are held out as the dev split


def _scripted_dev(monkeypatch, p5: list[float]) -> list[int]:
    """Dev evaluations return the next P@5 of `p5`; returns the list the calls' training steps go into."""
    values = iter(p5)
    steps: list[int] = []
    original = EliasModel.loss

    def loss(self, *args, **kwargs):
        steps.append(int(self.stage))
        return original(self, *args, **kwargs)

    def evaluate(self, model, data):
        v = next(values)
        return {"P@1": v, "P@5": v, "nDCG@5": v, "R@10": v, "R@100": v}

    monkeypatch.setattr(EliasModel, "loss", loss)
    monkeypatch.setattr(train_module.Trainer, "_evaluate_dev", evaluate)
    return steps


def test_a_stage_ends_when_dev_stops_improving_and_the_best_epoch_is_kept(bibtex, tmp_path, monkeypatch):
    steps = _scripted_dev(monkeypatch, [10.0, 12.0, 11.0, 20.0])  # stage 1: up, down (stop); stage 2: up
    cfg = EliasConfig().with_overrides([*TINY, "train.stage1_epochs=4", "train.stage2_epochs=1", "train.patience=1",
                                        "train.reranker=false", "train.recluster_fraction=0"])
    run_training(bibtex, tmp_path / "m", cfg, progress=False)
    assert steps.count(1) == 3 * HELD_OUT_STEPS_PER_EPOCH  # epoch 4 never ran
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert [(r["stage"], r["epoch"]) for r in meta["history"]] == [(1, 1), (1, 2), (1, 3), (2, 1)]
    assert meta["selected"] == {"stage": 2, "epoch": 1, "P@5": 20.0}


def test_the_best_model_waits_in_memory_until_a_checkpoint_and_is_written_once(bibtex, tmp_path, monkeypatch):
    """Between checkpoints the best model is a copy in memory: an epoch that beats it first means it is never
    written, and the model directory still ends with the best epoch's tensors, as when every best is written."""
    saves: list[int] = []
    real_save = train_module.save_model_dir

    def save(directory, model, *args):
        saves.append(args[-1]["selected"]["epoch"])
        return real_save(directory, model, *args)

    monkeypatch.setattr(train_module, "save_model_dir", save)
    runs = {}
    for minutes in (0, 60):
        saves.clear()
        with monkeypatch.context() as m:
            _scripted_dev(m, [10.0, 12.0, 11.0])  # epoch 2 is the best; epoch 3 (the last) is not
            cfg = EliasConfig().with_overrides([*TINY, "train.stage1_epochs=3", "train.stage2_epochs=0",
                                                "train.reranker=false", "train.recluster_fraction=0",
                                                f"train.checkpoint_minutes={minutes}"])
            run_training(bibtex, tmp_path / str(minutes), cfg, progress=False)
        runs[minutes] = list(saves)
    assert runs[0] == [1, 2]  # a checkpoint after every epoch: each best written at once
    assert runs[60] == [2]  # epoch 1's best was replaced in memory before anything wrote it
    _assert_same_tensors(tmp_path / "0", tmp_path / "60")
    assert json.loads((tmp_path / "60" / "model.json").read_text())["selected"]["epoch"] == 2


def test_an_interrupted_run_writes_the_best_model_it_held(bibtex, tmp_path, monkeypatch):
    cfg = EliasConfig().with_overrides([*TINY, "train.checkpoint_minutes=60"])
    out = tmp_path / "m"
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        _interrupt_loss_at(m, 1, HELD_OUT_STEPS_PER_EPOCH + 3)  # in epoch 2 of stage 1: epoch 1's model is held
        run_training(bibtex, out, cfg, progress=False)
    assert not (out / "train_state").exists()
    meta = json.loads((out / "model.json").read_text())
    assert meta["selected"]["stage"] == 1 and meta["selected"]["epoch"] == 1
    assert load_model_dir(out).model.num_labels > 0


def test_the_evaluation_after_a_re_clustering_does_not_count_against_patience(bibtex, tmp_path, monkeypatch):
    # Re-clustered after epoch 3 of 6 (W_C starts over): the dip at epoch 4 is forgiven, the one at 5 ends stage 1.
    steps = _scripted_dev(monkeypatch, [10.0, 11.0, 12.0, 11.0, 11.5, 20.0])
    cfg = EliasConfig().with_overrides([*TINY, "train.stage1_epochs=6", "train.stage2_epochs=1", "train.patience=1",
                                        "train.reranker=false", "train.recluster_fraction=0.5"])
    run_training(bibtex, tmp_path / "m", cfg, progress=False)
    assert steps.count(1) == 5 * HELD_OUT_STEPS_PER_EPOCH  # epoch 6 never ran
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert [(r["stage"], r["epoch"]) for r in meta["history"]] == [*((1, e) for e in range(1, 6)), (2, 1)]
    assert meta["timings"]["recluster_s"] > 0


def test_stage2_stops_at_its_probe_unless_it_beats_stage1(bibtex, tmp_path, monkeypatch):
    cfg = EliasConfig().with_overrides([*TINY, "train.stage2_probe_fraction=0.3", "train.patience=1",
                                        "train.reranker=false"])
    steps = _scripted_dev(monkeypatch, [10.0, 12.0, 11.5])  # stage 1's best is 12; the probe sees 11.5
    run_training(bibtex, tmp_path / "skipped", cfg, progress=False)
    assert steps.count(2) == 3  # ceil(0.3 * 9) steps of stage 2
    meta = json.loads((tmp_path / "skipped" / "model.json").read_text())
    assert meta["selected"]["stage"] == 1 and meta["stage"] == 1
    assert meta["stage2_skipped"].startswith("stopped after 3 of its 18 steps: dev P@5 11.50 did not beat")
    assert meta["history"][-1]["steps"] == 3

    steps = _scripted_dev(monkeypatch, [10.0, 12.0, 13.0, 14.0, 15.0])  # the probe beats stage 1: stage 2 goes on
    run_training(bibtex, tmp_path / "kept", cfg, progress=False)
    assert steps.count(2) == 2 * HELD_OUT_STEPS_PER_EPOCH
    meta = json.loads((tmp_path / "kept" / "model.json").read_text())
    assert meta["selected"] == {"stage": 2, "epoch": 2, "P@5": 15.0} and "stage2_skipped" not in meta


def test_stage2_is_skipped_after_a_stage1_still_improving_and_runs_after_a_converged_one(bibtex, tmp_path,
                                                                                      monkeypatch):
    cfg = EliasConfig().with_overrides([*TINY, "train.stage2_after_convergence=true", "train.reranker=false",
                                        "train.recluster_fraction=0"])
    steps = _scripted_dev(monkeypatch, [10.0, 12.0])  # still rising at stage 1's last epoch
    run_training(bibtex, tmp_path / "rising", cfg, progress=False)
    assert steps.count(2) == 0
    meta = json.loads((tmp_path / "rising" / "model.json").read_text())
    assert meta["stage"] == 1 and meta["selected"] == {"stage": 1, "epoch": 2, "P@5": 12.0}
    assert meta["stage2_skipped"] == ("skipped: stage 1 was still improving at its last epoch (dev P@5 10.00 "
                                      "before it, 12.00 after it), not converged")
    assert "graph_init_s" not in meta["timings"]

    steps = _scripted_dev(monkeypatch, [12.0, 11.0, 13.0, 14.0])  # converged (its last epoch did not improve)
    run_training(bibtex, tmp_path / "flat", cfg, progress=False)
    assert steps.count(2) == 2 * HELD_OUT_STEPS_PER_EPOCH
    meta = json.loads((tmp_path / "flat" / "model.json").read_text())
    assert meta["selected"] == {"stage": 2, "epoch": 2, "P@5": 14.0} and "stage2_skipped" not in meta


def test_early_stopping_waits_for_the_stages_minimum_steps(bibtex, tmp_path, monkeypatch):
    steps = _scripted_dev(monkeypatch, [10.0, 12.0, 11.0, 11.5, 20.0])  # the dip at epoch 3 does not end stage 1
    cfg = EliasConfig().with_overrides([*TINY, "train.stage1_epochs=3", "train.stage2_epochs=1", "train.patience=1",
                                        f"train.stage1_min_examples={4 * HELD_OUT_STEPS_PER_EPOCH * 64}",
                                        "train.reranker=false"])
    run_training(bibtex, tmp_path / "m", cfg, progress=False)
    assert steps.count(1) == 4 * HELD_OUT_STEPS_PER_EPOCH  # raised to 4 epochs by the minimum, all of them run
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["selected"] == {"stage": 2, "epoch": 1, "P@5": 20.0}


def test_embedding_dropout_by_passes_over_the_data():
    from elias_retrieval.config import ModelConfig
    from trainer.train import embed_dropout

    auto = ModelConfig()  # embed_dropout -1: by the number of epochs a stage runs
    assert embed_dropout(auto, 4) == 0.0 and embed_dropout(auto, auto.dropout_epochs) == 0.0
    assert embed_dropout(auto, auto.dropout_epochs + 1) == 0.5  # a small dataset, seen many times
    assert embed_dropout(ModelConfig(embed_dropout=0.3), 50) == 0.3  # an explicit value is kept


# ---- 6. re-clustering in stage 1 ----------------------------------------------------------------

def test_stage1_clusters_the_labels_again_and_a_resume_after_it_ends_the_same(bibtex, tmp_path, monkeypatch):
    cfg = [*TINY, "train.recluster_fraction=0.5", "train.stage2_epochs=1"]  # after epoch 1 of 2
    partitions: list[list[np.ndarray]] = []
    original = EliasModel.set_partition

    def record(self, clusters):
        partitions.append([np.sort(np.asarray(c)) for c in clusters])
        return original(self, clusters)

    with monkeypatch.context() as m:
        m.setattr(EliasModel, "set_partition", record)
        run_training(bibtex, tmp_path / "ref", EliasConfig().with_overrides(cfg), progress=False)
    assert len(partitions) == 2  # stage 0, then after stage-1 epoch 1
    L = 159
    for p in partitions:
        members = np.concatenate(p)
        assert len(members) == L and len(np.unique(members)) == L  # each label in exactly one cluster
        assert max(map(len, p)) - min(map(len, p)) <= 1  # balanced
    assert any(not np.array_equal(a, b) for a, b in zip(*partitions, strict=True)), "the clusters did not change"
    meta = json.loads((tmp_path / "ref" / "model.json").read_text())
    assert meta["timings"]["recluster_s"] > 0

    # Interrupted in the epoch after the re-clustering and resumed: the same tensors as the run straight through
    # (the checkpoint holds the new partition and W_C's fresh optimiser state).
    out = tmp_path / "resumed"
    with monkeypatch.context() as m:
        _interrupt_loss_at(m, 1, TINY_STEPS_PER_EPOCH + 3)
        with pytest.raises(KeyboardInterrupt):
            run_training(bibtex, out, EliasConfig().with_overrides(cfg), progress=False)
    _cli_ok("train", bibtex, out, "--resume", "--quiet")
    _assert_same_tensors(tmp_path / "ref", out)


# ---- background writes --------------------------------------------------------------------------

def test_background_writes_land_in_order_and_report_a_failed_write():
    from trainer.checkpoint import BackgroundWrites

    writes, landed = BackgroundWrites(), []
    writes.submit(lambda: (time.sleep(0.05), landed.append("checkpoint 1")))
    writes.submit(landed.append, "model directory")
    writes.wait()
    assert landed == ["checkpoint 1", "model directory"]

    def full_disk() -> None:
        raise OSError(28, "No space left on device")

    writes.submit(full_disk)
    writes.submit(landed.append, "after the failure")
    with pytest.raises(OSError, match="No space left"):
        writes.wait()
    assert landed[-1] == "after the failure"  # a failed write does not drop the ones queued behind it
    writes.wait()  # the failure is reported once


def test_a_staged_checkpoint_holds_the_state_at_staging_though_training_goes_on(tmp_path):
    from trainer import checkpoint

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    moment = opt.state[model.weight]["exp_avg"].clone()
    staged = checkpoint.stage_state(tmp_path, model, {"dense": opt}, {}, {"stage": 1, "epoch": 1})
    assert not checkpoint.has_state(tmp_path)  # nothing in place before the commit
    with torch.no_grad():  # the next epoch changes the live tensors in place before the commit runs
        model.weight.add_(1.0)
    opt.step()
    staged.commit()
    tensors, meta = checkpoint.load_state(tmp_path)
    for k, v in expected.items():
        assert torch.equal(tensors[f"model.{k}"], v)
    assert torch.equal(tensors["dense.0.exp_avg"], moment)
    assert meta["progress"] == {"stage": 1, "epoch": 1}


def test_the_default_width_grows_with_the_label_count_and_is_recorded(bibtex, tmp_path):
    m = EliasConfig().model
    widths = [m.embedding_dim(n) for n in (159, 4_096, 4_271, 8_192, 16_384, 32_472, 1_000_000)]
    assert widths == [512, 512, 512, 576, 704, 768, 768]
    assert all(w % 64 == 0 for w in widths)
    assert EliasConfig().with_overrides(["model.dim=96"]).model.embedding_dim(1_000_000) == 96
    with pytest.raises(ConfigError, match="model.dim must be 0 .by the label count. or a positive width"):
        EliasConfig().with_overrides(["model.dim=-5"])
    with pytest.raises(ConfigError, match="checkpoint_minutes must be at least 0"):
        EliasConfig().with_overrides(["train.checkpoint_minutes=-1"])

    out = tmp_path / "model"
    trained = run_training(bibtex, out, EliasConfig().with_overrides(
        [*TINY, "model.dim=0", "train.batch_size=0", "train.stage2_epochs=0", "train.reranker=false"]),
        progress=False)
    L = trained.model.num_labels
    assert trained.model.encoder.dim == m.embedding_dim(L) == 512
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["model"]["dim"] == 512 and recorded["train"]["batch_size"] == 256  # resolved, not 0
    assert json.loads((out / "model.json").read_text())["dim"] == 512


def test_the_default_batch_grows_with_the_label_count_while_epochs_keep_their_steps():
    cfg = EliasConfig()
    assert cfg.train.batch_size == 0
    labels = (159, 4_271, 16_384, 23_000, 32_472, 131_072, 1_000_000)
    by_labels = [train_module.batch_size(cfg, L, 10_000_000) for L in labels]
    assert by_labels == [256, 256, 256, 256, 512, 2048, 16384]
    assert train_module.batch_size(cfg, 32_472, 76_937) == 512  # TIBKAT: 151 steps an epoch
    assert train_module.batch_size(cfg, 32_472, 60_000) == 256  # 512 would leave 118 steps an epoch
    assert train_module.batch_size(cfg, 1_000_000, 300_000) == 2048  # halved until an epoch holds 128 steps
    assert train_module.batch_size(cfg, 1_000, 10) == 256  # never below 256
    assert train_module.batch_size(EliasConfig().with_overrides(["model.encoder=transformer"]), 1_000_000, 10**7) == 256
    assert train_module.batch_size(EliasConfig().with_overrides(["train.batch_size=96"]), 1_000_000, 10**7) == 96
    with pytest.raises(ConfigError, match="train.batch_size must be at least 0"):
        EliasConfig().with_overrides(["train.batch_size=-1"])


def test_a_stages_minimum_counts_training_points_and_older_step_counts_convert():
    t = EliasConfig().with_overrides(["train.batch_size=512", "train.stage1_epochs=3"]).train
    assert (train_module.min_steps(t, 1), train_module.min_steps(t, 2)) == (500, 150)  # 256,000 and 76,800 points
    assert train_module.stage_epochs(t, 1, 151) == 4 and train_module.stage_epochs(t, 1, 20) == 25
    t.batch_size = 256
    assert train_module.min_steps(t, 1) == 1000 and train_module.stage_epochs(t, 1, 301) == 4
    # An older model directory's config counted steps at its batch
    old = EliasConfig.from_dict({"train": {"batch_size": 128, "stage1_min_steps": 1000, "stage2_min_steps": 0}})
    assert (old.train.stage1_min_examples, old.train.stage2_min_examples) == (128_000, 0)
    assert EliasConfig().with_overrides(["train.stage1_min_steps=10"]).train.stage1_min_examples == 2560
    with pytest.raises(ConfigError, match="stage1_min_steps must be an integer >= 0"):
        EliasConfig().with_overrides(["train.stage1_min_steps=-3"])
