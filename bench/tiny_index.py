"""A tiny trained text index for the --quick runs of the serving benchmarks (bench/fuzz_grpc.py, bench/serve_load.py).

300 TIBKAT rows, one epoch per stage, d = 16, with the ELIAS++ re-ranker: an index that takes text, sparse and
embedding queries, built in a few seconds. Its numbers mean nothing; it exercises every query path of the server.
"""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIBKAT = ROOT.parent / "shared" / "data" / "tibkat"
TINY = [
    "train.max_train_points=300", "train.stage1_epochs=1", "train.stage2_epochs=1", "train.stage1_min_examples=0",
    "train.stage2_min_examples=0", "model.dim=16", "train.batch_size=128", "train.reranker=true",
    "train.threads=1", "train.device=cpu",
]


def tiny_text_index(work: Path, rows: int = 300) -> Path:
    """Train on the first `rows` TIBKAT train/test rows and build the index at WORK/index; its path."""
    from elias_retrieval.config import EliasConfig
    from index_builder.build import build_index
    from trainer.train import train

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        with gzip.open(TIBKAT / f"{split}.jsonl.gz", "rt") as f, open(data / f"{split}.jsonl", "w") as g:
            g.writelines(itertools.islice(f, rows))
    train(data, work / "model", EliasConfig().with_overrides(TINY), progress=False)
    return build_index(work / "model", work / "index", progress=False)
