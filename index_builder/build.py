"""A trained model directory -> an index directory (docs/index-format.md), behind `elias build-index`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from elias_retrieval.index_format import LABEL_DTYPES, write_index
from elias_retrieval.modeldir import load_model_dir
from elias_retrieval.reranker import has_ranker
from index_builder.prune import PruneStats, prune_graph

DEFAULT_K = 100  # results per query unless a request says otherwise (the metrics rank the top 100)


def build_index(
    model_dir: str | Path,
    out: str | Path,
    dtype: str = "fp16",
    kappa: int | None = None,
    progress: bool = True,
    reranker: bool = True,
) -> Path:
    """Build the index of `model_dir` at `out` (atomically: a killed build leaves any previous `out` intact).

    `dtype` is the storage of the label embeddings W_L (fp32 | fp16 | int8 with per-row scales); `kappa`
    prunes A's rows to their top-`kappa` edges, keeping every label reachable (index_builder.prune).
    With `reranker` (the default) a model's ELIAS++ re-ranker (`MODEL_DIR/ranker/`) goes into the index with
    its tf-idf featurizer: the tf-idf encoder's own when it is the model's `featurizer/`, else a copy of that.
    """
    if dtype not in LABEL_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(LABEL_DTYPES)}, got {dtype!r}")
    model_dir, out = Path(model_dir), Path(out)
    if out.resolve() == model_dir.resolve():
        raise ValueError(f"{out}: the index may not replace its own model directory")
    trained = load_model_dir(model_dir)
    model, cfg = trained.model, trained.config
    tensors = model.search_tensors()
    pruning: PruneStats | None = None
    if kappa is not None:
        tensors.A_ids, tensors.A_weights, pruning = prune_graph(tensors.A_ids, tensors.A_weights, kappa,
                                                                model.num_labels)
    meta: dict[str, Any] = {
        "config": cfg.to_dict(),
        "num_train": int(trained.meta.get("num_train", 0)),
        "source": {
            "model_dir": str(model_dir.resolve()),
            "stage": int(model.stage),
            "beta": float(cfg.model.beta),
            "selected": trained.meta.get("selected"),
        },
        "pruning": None if pruning is None else pruning.to_dict(),
    }
    defaults = {"k": DEFAULT_K, "beam_size": int(cfg.model.beam_size), "shortlist_size": int(cfg.model.shortlist_size)}
    encoder_dir = model_dir / "encoder"
    ranker_dir = featurizer_dir = None
    if reranker and has_ranker(model_dir / "ranker"):
        ranker_dir = model_dir / "ranker"
        if not _same_files(model_dir / "featurizer", encoder_dir / "featurizer"):
            featurizer_dir = model_dir / "featurizer"
    write_index(out, tensors, trained.vocab, encoder_dir, dtype=dtype, defaults=defaults, meta=meta,
                progress=progress, train_label_counts=trained.train_label_counts, ranker_dir=ranker_dir,
                featurizer_dir=featurizer_dir)
    return out


def _same_files(a: Path, b: Path) -> bool:
    """Whether directories `a` and `b` hold the same files byte for byte (b may not exist)."""
    def files(d: Path) -> dict[str, Path]:
        return {p.relative_to(d).as_posix(): p for p in sorted(d.rglob("*")) if p.is_file()} if d.is_dir() else {}

    fa, fb = files(a), files(b)
    return bool(fa) and fa.keys() == fb.keys() and all(fa[k].read_bytes() == fb[k].read_bytes() for k in fa)
