"""Training recipe variants side by side on one dataset's dev split: stage 1 only, the same tf-idf features.

    python bench/recipe_sweep.py                        # TIBKAT; writes "## Training recipe on TIBKAT (dev)"
    python bench/recipe_sweep.py ../shared/data/eurlex57k --epochs 3
    python bench/recipe_sweep.py --quick --no-write     # small smoke run (the test suite runs it)

Each variant is `elias train`'s trainer with the defaults plus the variant's settings, `--epochs` stage-1 epochs
(no minimum), no stage 2 and no re-ranker; the tf-idf features are computed once and shared by all variants, so
the table compares the recipe alone. Every row gives the dev metrics after each epoch and the stage-1 time.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import BENCHMARKS, ROOT, command_line, machine, publish, today  # noqa: E402

import trainer.train as T  # noqa: E402
from elias_retrieval.config import EliasConfig  # noqa: E402

NAMES = {"eurlex57k": "EURLEX57K", "tibkat": "TIBKAT", "bibtex": "Bibtex", "delicious": "Delicious"}
VARIANTS = {  # name for --only: (what the row says, the settings)
    "defaults": ("defaults (embedding dropout 0 over these few epochs)", []),
    "dropout-0.5": ("embedding dropout 0.5 (the reference's)", ["model.embed_dropout=0.5"]),
    "dropout-0.2": ("embedding dropout 0.2", ["model.embed_dropout=0.2"]),
    "random-init": ("random init of W_L, W_C", ["train.init=random"]),
    "fp32": ("fp32 label products", ["train.precision=fp32"]),
    "no-recluster": ("labels not clustered again in stage 1", ["train.recluster_fraction=0"]),
    "batch-256": ("batch 256", ["train.batch_size=256"]),
    "batch-512": ("batch 512", ["train.batch_size=512"]),
    "batch-1024": ("batch 1024", ["train.batch_size=1024"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, nargs="?", default=ROOT.parent / "shared" / "data" / "tibkat")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--only", action="append", default=[], choices=list(VARIANTS), help="run only these variants")
    ap.add_argument("--quick", action="store_true", help="2,000 training points, 300 dev points, 1 epoch")
    ap.add_argument("--no-write", action="store_true", help="print the table instead of writing BENCHMARKS.md")
    ap.add_argument("--benchmarks-file", type=Path, default=BENCHMARKS)
    args = ap.parse_args()
    base = [f"train.stage1_epochs={args.epochs}", "train.stage1_min_examples=0", "train.stage2_epochs=0",
            "train.reranker=false", "train.patience=0"]
    if args.quick:
        base += ["train.max_train_points=2000", "train.max_eval_points=300", "features.max_features=5000",
                 "model.dim=64", "model.shortlist_size=200"]
        args.epochs = 1
        base[0] = "train.stage1_epochs=1"
    variants = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only}
    cfg0 = EliasConfig().with_overrides(base)
    cfg0.data = T.dataset_data_config(args.data, cfg0.data)
    t0 = time.perf_counter()
    cached = T.load_data(args.data, cfg0, None, progress=False)
    load_s = time.perf_counter() - t0
    original = T.load_data
    T.load_data = lambda *a, **k: cached  # every variant trains on the same features
    rows: list[str] = []
    try:
        for label, sets in variants.values():
            with tempfile.TemporaryDirectory(prefix="recipe-") as tmp:
                trainer = T.Trainer(args.data, Path(tmp) / "m", EliasConfig().with_overrides(base + sets),
                                    progress=False)
                trainer.run()
                dev = [r["dev"] for r in trainer.history if r["stage"] == 1 and "dev" in r]
                per_epoch = " / ".join(f"{d['P@5']:.2f}" for d in dev)
                last = dev[-1]
                stage1_s = trainer.timings["stage1_train_s"] + trainer.timings.get("recluster_s", 0.0)
                rows.append(f"| {label} | `{' '.join(sets) or '-'}` | {per_epoch} | {last['P@1']:.2f} | "
                            f"{last['R@100']:.2f} | {stage1_s:.0f} |")
                shutil.rmtree(Path(tmp) / "m", ignore_errors=True)
    finally:
        T.load_data = original
    X, L = cached[1].X_train, cached[1].Y_train.shape[1]
    lines = [
        f"Machine: {machine()}. Date: {today()}. Command: `{command_line()}`.",
        "",
        f"Dataset `{args.data.name}`: N = {X.shape[0]:,}, L = {L:,}, {len(cached[1].dev or []):,} dev points; "
        f"{args.epochs} stage-1 epoch(s) per variant, no stage 2, no re-ranker; features computed once "
        f"({load_s:.0f} s) and shared. Dev P@5 after each epoch, then P@1 and R@100 after the last.",
        "",
        "| variant | settings | dev P@5 by epoch | dev P@1 | dev R@100 | stage-1 time, re-clustering included (s) |",
        "| --- | --- | --- | ---: | ---: | ---: |",
        *rows,
    ]
    text = "\n".join(lines)
    title = f"## Training recipe on {NAMES.get(args.data.name, args.data.name)} (dev)"
    publish(title, text, args)


if __name__ == "__main__":
    main()
