"""`elias train` and `elias eval`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from elias_retrieval.atomic import write_json
from elias_retrieval.baseline import DEFAULT_EF_SEARCH, AnnBaseline, check_kind
from elias_retrieval.cli.app import app, console, fail, user_errors
from elias_retrieval.config import EliasConfig

ENCODER_KINDS = ("tfidf", "transformer", "frozen", "hybrid")
DATASET_HELP = (
    "Dataset directory holding train.*, test.* and optionally dev.* (JSON lines or XC format, gzipped or not)."
)


@app.command()
@user_errors
def train(
    dataset_dir: Annotated[Path, typer.Argument(help=DATASET_HELP)],
    model_dir: Annotated[Path, typer.Argument(help="Output model directory (created).")],
    encoder: Annotated[str | None, typer.Option(
        help="Query encoder: tfidf (fast on CPU), transformer (fine-tuned), frozen (a trained layer on frozen "
             "transformer embeddings) or hybrid (tfidf plus frozen embeddings).")] = None,
    config: Annotated[
        Path | None, typer.Option(help="JSON config file (sections data, features, model, train).")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key: section.key=value.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in MODEL_DIR from its last checkpoint "
                                         "(written at each stage's end and every train.checkpoint_minutes).")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
    nproc: Annotated[int, typer.Option(
        help="Train data-parallel in N processes on this machine (torch.distributed: gloo on the CPU, nccl with one "
             "GPU each). For several machines run `torchrun ... -m elias_retrieval train` instead.")] = 1,
) -> None:
    """Train an ELIAS model (stages 0, 1, sparse-A init, 2) and write it to MODEL_DIR."""
    from trainer.train import train as run_training

    if resume:
        if config or set_ or encoder:
            fail("--resume continues with the run's saved config; drop --config, --set and --encoder")
        if not (model_dir / "config.json").is_file():
            fail(f"{model_dir}: nothing to resume (no config.json)")
        cfg = EliasConfig.load(model_dir / "config.json")
    else:
        cfg = EliasConfig.load(config) if config else EliasConfig()
        if encoder:
            cfg = cfg.with_overrides([f"model.encoder={encoder}"])
        cfg = cfg.with_overrides(set_ or [])
        if cfg.model.encoder not in ENCODER_KINDS:
            fail(f"--encoder must be one of {', '.join(ENCODER_KINDS)}, got {cfg.model.encoder!r}")
    t0 = time.perf_counter()
    trained = run_training(dataset_dir, model_dir, cfg, resume=resume, progress=not quiet, nproc=nproc)
    if trained is None:  # a process after the first of a torchrun group: rank 0 reports
        return
    sel = trained.meta.get("selected", {})
    console.print(f"model written to [bold]{model_dir}[/] in {time.perf_counter() - t0:.0f} s "
                  f"(selected stage {sel.get('stage')} epoch {sel.get('epoch')})")


@app.command("eval")
@user_errors
def eval_(
    model_dir: Annotated[Path, typer.Argument(help="A trained model directory or a built index directory.")],
    dataset_dir: Annotated[Path, typer.Argument(help=DATASET_HELP)],
    split: Annotated[str, typer.Option(help="Split to evaluate: test, dev or train.")] = "test",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the metrics to this JSON file.")] = None,
    beam_size: Annotated[int | None, typer.Option(help="Clusters kept in the beam (default: the model's).")] = None,
    shortlist_size: Annotated[int | None, typer.Option(help="Labels shortlisted (default: the model's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Queries per search batch.")] = 512,
    max_points: Annotated[int, typer.Option(help="Evaluate only the first N points (0 = all).")] = 0,
    rerank: Annotated[bool, typer.Option(help="Apply the ELIAS++ re-ranker when the model or index has one.")] = True,
    baseline: Annotated[str | None, typer.Option(
        help="Instead of ELIAS, rank by w_l . phi + b_l from a faiss index over the model's W_L (same encoder): "
             "flat (exact), hnsw or ivf. Disables ELIAS++ re-ranking.")] = None,
    ef_search: Annotated[int | None, typer.Option(
        help=f"HNSW efSearch for --baseline hnsw (default {DEFAULT_EF_SEARCH}).")] = None,
    nprobe: Annotated[int | None, typer.Option(
        help="IVF lists probed for --baseline ivf (default: a quarter of the lists).")] = None,
) -> None:
    """Evaluate a model or an index offline: P@k, nDCG@k, PSP@k, R@k and recall by label frequency."""
    from elias_retrieval.data import read_split
    from elias_retrieval.evaluation import evaluate_baseline_split, evaluate_split
    from elias_retrieval.metrics import format_table

    if split not in ("train", "dev", "test"):
        fail(f"--split must be train, dev or test, got {split!r}")
    for name, v in (("--beam-size", beam_size), ("--shortlist-size", shortlist_size), ("--batch-size", batch_size)):
        if v is not None and v < 1:
            fail(f"{name} must be at least 1, got {v}")
    if baseline is not None:
        check_kind(baseline)
        if beam_size is not None or shortlist_size is not None:
            fail("--beam-size and --shortlist-size are ELIAS settings; they do not apply to --baseline")
    for name, v, kind in (("--ef-search", ef_search, "hnsw"), ("--nprobe", nprobe, "ivf")):
        if v is not None and v < 1:
            fail(f"{name} must be at least 1, got {v}")
        if v is not None and baseline != kind:
            fail(f"{name} applies to --baseline {kind} only")
    source = load_for_eval(model_dir)
    data = read_split(dataset_dir, split, source.data_cfg, vocab=source.vocab, max_rows=max_points)
    t0 = time.perf_counter()
    if baseline is not None:
        try:
            ann = AnnBaseline.from_searcher(source.tensors, baseline)
        except ImportError as e:
            fail(str(e))
        metrics, settings = evaluate_baseline_split(source.encoder, ann, data, source.label_counts, source.num_train,
                                                    ef_search, nprobe, batch_size, progress=True)
        method, elapsed = ann.method, time.perf_counter() - t0
        note = (f"{', '.join(f'{k} {v}' for k, v in settings.items()) or 'exact'}; "
                f"index built in {ann.build_seconds:.2f} s; no ELIAS++ re-ranking")
        info: dict[str, object] = {"method": method, "baseline": baseline, **settings,
                                   "build_seconds": ann.build_seconds}
    else:
        beam = beam_size or min(source.beam_size, source.tensors.num_clusters)
        if beam > source.tensors.num_clusters:
            fail(f"--beam-size {beam} is larger than the number of clusters ({source.tensors.num_clusters})")
        metrics = evaluate_split(source.encoder, source.tensors, data, source.label_counts, source.num_train,
                                 beam, shortlist_size or source.shortlist_size, batch_size, progress=True,
                                 ranker=source.ranker if rerank else None, featurizer=source.featurizer)
        method = "ELIAS++" if rerank and source.ranker is not None else "ELIAS"
        elapsed, note = time.perf_counter() - t0, ""
        info = {"beam_size": beam, "method": method, "shortlist_size": shortlist_size or source.shortlist_size}
    console.print(format_table(metrics))
    console.print(f"method: {method}" + (f" ({note})" if note else ""))
    console.print(f"{metrics['num_points']:,} {split} points in {elapsed:.1f} s "
                  f"({1000 * elapsed / max(1, len(data)):.2f} ms per query, encoding included); "
                  f"{metrics['num_points_without_labels']:,} without labels count as 0 for P/nDCG/PSP "
                  "and are left out of R")
    if json_out:
        write_json(json_out, {**metrics, "split": split, "source": str(model_dir), **info, "seconds": elapsed})


class EvalSource:
    """What `elias eval` needs, from a model directory or an index directory."""

    def __init__(self, path: Path):
        from elias_retrieval.index_format import is_index_dir, read_index
        from elias_retrieval.modeldir import is_model_dir, load_model_dir

        if is_model_dir(path):
            tm = load_model_dir(path)
            self.encoder, self.tensors, self.vocab = tm.model.encoder, tm.model.search_tensors(), tm.vocab
            self.data_cfg = tm.config.data
            self.beam_size, self.shortlist_size = tm.config.model.beam_size, tm.config.model.shortlist_size
            self.label_counts = tm.train_label_counts.numpy()
            self.num_train = int(tm.meta["num_train"])
            self.ranker, self.featurizer = tm.ranker, tm.featurizer
        elif is_index_dir(path):
            index = read_index(path)
            self.encoder, self.tensors, self.vocab = index.load_encoder(), index.tensors, index.labels
            self.data_cfg = EliasConfig.from_dict(index.manifest.get("config", {})).data
            self.beam_size = int(index.defaults["beam_size"])
            self.shortlist_size = int(index.defaults["shortlist_size"])
            counts = index.train_label_counts
            self.label_counts = (np.asarray(counts, dtype=np.int64) if counts is not None
                                 else np.zeros(len(self.vocab), dtype=np.int64))
            self.num_train = int(index.manifest.get("num_train", 1))
            self.ranker, self.featurizer = index.load_ranker(), index.load_featurizer()
        else:
            raise ValueError(f"{path}: neither a model directory nor an index directory")


def load_for_eval(path: Path) -> EvalSource:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such directory")
    return EvalSource(path)
