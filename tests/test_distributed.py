"""Data-parallel training on torch.distributed (gloo, CPU): gradients, quality against one process, rank-0-only
writes, resume across world sizes, torchrun, and errors raised inside the processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_trainer import E2E, TINY, _cli, _cli_ok, _epochs, _interrupt_loss_at, _one_line_error, _sets
from torch import nn

from elias_retrieval.config import EliasConfig
from trainer import distributed
from trainer.train import TrainingError
from trainer.train import train as run_training

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


# ---- gradients ------------------------------------------------------------------------------------

class _Toy(nn.Module):
    """A sparse embedding (rows shared between the batch's rows), a dense layer, and a parameter never used."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(40, 6, sparse=True)
        self.lin = nn.Linear(6, 3)
        self.unused = nn.Parameter(torch.ones(2))

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(ids).mean(1)).square().sum(1).mean()


BATCHES = [torch.tensor([[1, 2, 3, 4], [2, 5, 6, 7], [9, 1, 1, 8], [3, 3, 0, 39], [7, 2, 11, 12]]),  # 3 + 2 rows
           torch.tensor([[4, 5, 6, 4]])]  # one row: the second rank's part is empty


def _grads(model: _Toy) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            out[f"none.{name}"] = torch.zeros(1)
        else:
            out[name] = p.grad.to_dense().clone()
    return out


def _rank_grads(out: str) -> None:
    group = distributed.current()
    model = _Toy()
    params = list(model.parameters())
    for i, rows in enumerate(BATCHES):
        model.zero_grad(set_to_none=True)
        local = group.shard(rows)
        if len(local):
            model.loss(local).backward()
        distributed.average_gradients(params, {id(model.emb.weight)}, len(local) / len(rows))
        save_file(_grads(model), str(Path(out) / f"rank{group.rank}.batch{i}.safetensors"))


def test_averaged_gradients_are_the_whole_batch_gradients(tmp_path):
    distributed.launch(2, "cpu", _rank_grads, str(tmp_path))
    for i, rows in enumerate(BATCHES):
        model = _Toy()
        model.loss(rows).backward()
        want = _grads(model)
        assert "none.unused" in want
        for rank in (0, 1):
            got = load_file(str(tmp_path / f"rank{rank}.batch{i}.safetensors"))
            assert sorted(got) == sorted(want), (rank, i)
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=f"{name} {rank} {i}")


def _rank_embeddings(model_dir: str, cache_dir: str, out: str, n: int) -> None:
    from elias_retrieval.encoders import TransformerEncoder
    from elias_retrieval.frozen_encoders import EmbeddingCache, FrozenTransformer

    group = distributed.current()
    frozen = FrozenTransformer(TransformerEncoder(model_dir, pooling="mean", max_length=32))
    frozen.bf16 = "fp32"
    texts = [f"document {i} " + "word " * (i % 7) for i in range(n)]
    seen: list[int] = []
    embed = frozen.embed
    frozen.embed = lambda ts, progress=False: (seen.append(len(ts)), embed(ts))[1]  # type: ignore[method-assign]
    cache = EmbeddingCache(cache_dir)
    distributed.share_embeddings(cache, frozen, texts, group, torch.device("cpu"))
    E = cache.embed(frozen, texts)  # from memory: nothing embedded here
    save_file({"E": E, "seen": torch.tensor(seen + [0])}, str(Path(out) / f"rank{group.rank}.safetensors"))
    # Again, now that rank 0 has the file: nobody embeds.
    seen.clear()
    distributed.share_embeddings(EmbeddingCache(cache_dir), frozen, texts, group, torch.device("cpu"))
    assert not seen


def test_frozen_embeddings_are_made_once_each_rank_its_share(tiny_bert, tmp_path):
    from elias_retrieval.encoders import TransformerEncoder
    from elias_retrieval.frozen_encoders import FrozenTransformer

    n = 75  # more than one embedding batch; the ranks' shares differ by one row
    distributed.launch(2, "cpu", _rank_embeddings, str(tiny_bert), str(tmp_path / "cache"), str(tmp_path), n)
    frozen = FrozenTransformer(TransformerEncoder(tiny_bert, pooling="mean", max_length=32))
    frozen.bf16 = "fp32"
    want = frozen.embed([f"document {i} " + "word " * (i % 7) for i in range(n)])
    got = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    assert [g["seen"].tolist() for g in got] == [[38, 0], [37, 0]]  # each embedded its share, once
    for g in got:
        torch.testing.assert_close(g["E"], want, rtol=1e-4, atol=1e-5)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1  # rank 0 wrote it


# ---- training -----------------------------------------------------------------------------------

def _eval(model_dir: Path, bibtex: Path, out: Path) -> dict:
    _cli_ok("eval", model_dir, bibtex, "--json", out)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def two_process_run(bibtex, tmp_path_factory) -> tuple[Path, Path]:
    """The same E2E run in one process and in two (each with one thread)."""
    d = tmp_path_factory.mktemp("ddp")
    _cli_ok("train", bibtex, d / "one", "--quiet", *_sets(E2E))
    _cli_ok("train", bibtex, d / "two", "--quiet", "--nproc", "2", *_sets(E2E))
    return d / "one", d / "two"


def test_two_processes_train_as_well_as_one(two_process_run, bibtex, tmp_path):
    one, two = (_eval(m, bibtex, tmp_path / f"{m.name}.json") for m in two_process_run)
    assert two["P@5"] > 0.8 * one["P@5"] > 0  # far above chance, not a broken run
    # The two runs take the same steps on the same batches; they differ in summation order and dropout masks.
    assert abs(two["P@1"] - one["P@1"]) <= 3.0, (one, two)
    assert abs(two["P@5"] - one["P@5"]) <= 1.5, (one, two)
    assert abs(two["R@100"] - one["R@100"]) <= 2.0, (one, two)


def test_only_rank_0_writes(two_process_run):
    one, two = two_process_run
    assert _epochs(two) == _epochs(one)  # one history line per epoch, not one per process
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    meta = json.loads((two / "model.json").read_text())
    assert meta["selected"]["stage"] in (1, 2) and "reranker" in meta
    leftovers = [p for p in two.rglob("*") if ".tmp" in p.name or p.name.startswith(".")]
    assert not leftovers, leftovers


def test_resume_in_two_processes_after_one_was_interrupted(bibtex, tmp_path, monkeypatch):
    out = tmp_path / "model"
    with monkeypatch.context() as m:
        _interrupt_loss_at(m, 2, 3)  # stage 1 checkpointed, stage 2 under way
        with pytest.raises(KeyboardInterrupt):
            run_training(bibtex, out, EliasConfig().with_overrides(TINY), progress=False)
    _cli_ok("train", bibtex, out, "--resume", "--quiet", "--nproc", "2")
    assert _epochs(out) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert (out / "ranker").is_dir()


def test_resume_in_one_process_after_two_were_killed(bibtex, tmp_path):
    out = tmp_path / "model"
    cfg = [o for o in TINY if not o.startswith("train.stage1_epochs")] + ["train.stage1_epochs=8"]
    proc = subprocess.Popen([PYTHON, "-m", "elias_retrieval", "train", str(bibtex), str(out), "--quiet",
                             "--nproc", "2", *_sets(cfg)], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "train_state" / "state.json"
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert state.exists(), "the two-process run wrote no checkpoint"
    done = json.loads(state.read_text())["progress"]
    assert (done["stage"], done["epoch"]) < (2, 2), "killed too late to resume anything"
    _cli_ok("train", bibtex, out, "--resume", "--quiet")
    assert _epochs(out)[-3:] == [(1, 8), (2, 1), (2, 2)]
    assert _epochs(out) == sorted(set(_epochs(out)))  # each epoch once: the killed run's last one was not redone


def test_torchrun_runs_the_same_training(bibtex, tmp_path):
    out = tmp_path / "model"
    res = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "elias_retrieval", "train", str(bibtex), str(out), "--quiet", *_sets(TINY)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _epochs(out) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert res.stdout.count("model written to") == 1  # rank 0 reports, once


# ---- errors -------------------------------------------------------------------------------------

def test_an_error_inside_the_processes_is_one_line(bibtex, tmp_path):
    _one_line_error(_cli("train", tmp_path / "missing", tmp_path / "m", "--nproc", "2"), "dataset directory not found")


def test_bad_nproc_is_one_line(bibtex, tmp_path, monkeypatch):
    _one_line_error(_cli("train", bibtex, tmp_path / "m", "--nproc", "0"), "--nproc must be at least 1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    _one_line_error(_cli("train", bibtex, tmp_path / "m", "--nproc", "2"), "under torchrun")


def _crash() -> None:
    raise AssertionError("a bug")


def test_a_crash_names_the_process_and_its_traceback(tmp_path):
    with pytest.raises(RuntimeError, match=r"training process 0 failed:\n(.|\n)*AssertionError: a bug"):
        distributed.launch(2, "cpu", _crash)
    with pytest.raises(TrainingError, match="--nproc must be at least 1"):
        run_training(tmp_path / "missing", tmp_path / "m", EliasConfig(), progress=False, nproc=-1)
