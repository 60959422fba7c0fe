"""Adding labels to a built index without retraining (`elias index add-labels`), against the index without them.

A seeded set of labels (frequent ones, with at least --min-docs training documents, and some rarer ones) is deleted
from the training data; a model is trained on the rest and its index built; then the held-out labels are added to
that index from their training documents (index_builder/labels.py). On the test split: R@100 and P@5 over all
labels and over the added labels alone (test points holding at least one of them), for ELIAS and ELIAS++ on the
index with and without the added labels, and for exact (Flat) and HNSW faiss search over W_L with the same rows
(elias_retrieval/baseline.py); the time to add against the time to train and build; the index sizes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import command_line, machine, parse_args, today, write_section  # noqa: E402
from elias_retrieval.baseline import AnnBaseline  # noqa: E402
from elias_retrieval.config import DataConfig, EliasConfig  # noqa: E402
from elias_retrieval.data import LabelVocab, dataset_data_config, find_split, open_text, read_split  # noqa: E402
from elias_retrieval.index_format import Index, index_size, read_index  # noqa: E402
from elias_retrieval.metrics import evaluate  # noqa: E402
from elias_retrieval.search import search  # noqa: E402
from index_builder.build import build_index  # noqa: E402
from index_builder.labels import DEFAULT_REFINE_STEPS, Examples, add_labels, remove_labels  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EURLEX = ROOT.parent / "shared" / "data" / "eurlex57k"
TITLE = "## Adding labels to a built index"
QUICK_SETS = [
    "train.stage1_epochs=1", "train.stage2_epochs=1", "train.stage1_min_examples=0", "train.stage2_min_examples=0",
    "model.dim=32", "train.batch_size=128", "train.reranker=true", "train.device=cpu",
]


def _held_out(Y: sp.csr_matrix, frequent: int, rare: int, min_docs: int, seed: int) -> np.ndarray:
    counts = np.asarray(Y.sum(0)).ravel()
    rng = np.random.default_rng(seed)
    freq = np.flatnonzero(counts >= min_docs)
    few = np.flatnonzero((counts > 0) & (counts < min_docs))
    pick = [rng.choice(freq, min(frequent, len(freq)), replace=False), rng.choice(few, min(rare, len(few)),
                                                                                   replace=False)]
    return np.sort(np.concatenate(pick))


def _write_reduced(dataset: Path, out: Path, label_field: str, held: set[str], train_rows: int, test_rows: int) -> None:
    """The dataset with the held-out labels deleted from every training document (dev and test as they are)."""
    out.mkdir(parents=True, exist_ok=True)
    with open_text(find_split(dataset, "train")) as f, open(out / "train.jsonl", "w", encoding="utf-8") as g:
        for i, line in enumerate(f):
            if train_rows and i >= train_rows:
                break
            row = json.loads(line)
            row[label_field] = [x for x in row[label_field] if str(x) not in held]
            g.write(json.dumps(row, ensure_ascii=False) + "\n")
    splits = ["test"] + (["dev"] if not train_rows else [])  # a reduced run selects on a holdout of train
    for split in splits:
        src = find_split(dataset, split)
        with open_text(src) as f, open(out / f"{split}.jsonl", "w", encoding="utf-8") as g:
            for i, line in enumerate(f):
                if test_rows and i >= test_rows:
                    break
                g.write(line)
    for name in ("labels.jsonl.gz", "labels.jsonl", "dataset.json"):
        if (dataset / name).is_file():
            (out / name).write_bytes((dataset / name).read_bytes())


def _restricted(ids: np.ndarray, Y: sp.csr_matrix, mask: np.ndarray, counts: np.ndarray, n: int) -> dict:
    """Metrics over the labels of `mask` alone, on the points that hold one of them."""
    Ym = (Y @ sp.diags(mask.astype(np.float32))).tocsr()
    Ym.eliminate_zeros()
    rows = np.flatnonzero(np.diff(Ym.indptr) > 0)
    return evaluate(ids[rows], Ym[rows], counts, n)


def _metrics(ids: np.ndarray, Y: sp.csr_matrix, held_cols: np.ndarray, counts: np.ndarray, n: int) -> list[float]:
    """R@100 and P@5 over all labels, over the held-out labels alone (points that hold one), and R@100 over the
    other labels alone."""
    every = evaluate(ids, Y, counts, n)
    mask = np.zeros(Y.shape[1], dtype=bool)
    mask[held_cols] = True
    held = _restricted(ids, Y, mask, counts, n)
    old = _restricted(ids, Y, ~mask, counts, n)
    return [every["R@100"], every["P@5"], held["R@100"], held["P@5"], old["R@100"]]


def _elias(index: Index, emb, X, plus: bool) -> np.ndarray:
    d = index.defaults
    r = search(emb, index.tensors, k=100, beam_size=d["beam_size"], shortlist_size=d["shortlist_size"])
    ids, scores = r.ids.numpy(), r.scores.float().numpy()
    if plus:
        ranker = index.load_ranker()
        assert ranker is not None
        ids, _ = ranker.rerank(X, ids, scores)
    return ids


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dataset", nargs="?", type=Path, default=EURLEX)
    ap.add_argument("--work", type=Path, default=None, help="Work directory (default: a temporary one); a model "
                    "already trained there (with its train_seconds.json) is reused.")
    ap.add_argument("--frequent", type=int, default=400, help="Held-out labels with at least --min-docs documents.")
    ap.add_argument("--rare", type=int, default=50, help="Held-out labels with fewer.")
    ap.add_argument("--min-docs", type=int, default=5)
    ap.add_argument("--train-rows", type=int, default=0, help="Use the first N training documents (0: all).")
    ap.add_argument("--test-rows", type=int, default=0, help="Evaluate on the first N test documents (0: all).")
    ap.add_argument("--set", action="append", default=[], help="Training overrides (section.key=value).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--refine-steps", type=int, default=DEFAULT_REFINE_STEPS,
                    help="Logistic steps of the refined variant.")
    ap.add_argument("--full-model", type=Path, default=None,
                    help="A model trained on the dataset with every label (e.g. bench/quality.py's "
                    "runs/bench-eurlex57k/model; trained there first when missing): row (a), the full retrain.")
    ap.add_argument("--quick", action="store_true", help="Seconds: 1,000 training documents, a tiny model.")
    ap.add_argument("--benchmarks-file", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parse_args(ap, {"frequent": 10, "rare": 3, "train_rows": 1000, "test_rows": 200, "set": QUICK_SETS}, argv)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        run(args, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="elias-add-labels-") as tmp:
            run(args, Path(tmp))


def run(args: argparse.Namespace, work: Path) -> None:
    """Hold out, train, build, add, evaluate; write the section."""
    mach = machine()
    cfg = dataset_data_config(args.dataset, DataConfig())
    full = read_split(args.dataset, "train", cfg, max_rows=args.train_rows)
    held = _held_out(full.known_labels(), args.frequent, args.rare, args.min_docs, args.seed)
    held_ids = [full.vocab.ids[j] for j in held]
    n_frequent = int((np.asarray(full.known_labels()[:, held].sum(0)).ravel() >= args.min_docs).sum())

    data, model = work / "data", work / "model"
    timing = work / "train_seconds.json"
    reused = timing.is_file()
    if not reused:
        _write_reduced(args.dataset, data, cfg.label_field, set(held_ids), args.train_rows, args.test_rows)
        from trainer.train import train

        t0 = time.perf_counter()
        train(data, model, EliasConfig().with_overrides(args.set), progress=False)
        timing.write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    train_s = float(json.loads(timing.read_text())["seconds"])
    t0 = time.perf_counter()
    build_index(model, work / "base-index", progress=False)
    build_s = time.perf_counter() - t0

    rows = np.flatnonzero(np.asarray(full.known_labels()[:, held].sum(1)).ravel() > 0)
    examples = Examples.from_dataset(full.subset(rows))
    specs = [{"id": full.vocab.ids[j], "name": full.vocab.names[j]} for j in held]
    t0 = time.perf_counter()
    change = add_labels(work / "base-index", work / "added-index", specs, examples, refine_steps=0)
    add_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    add_labels(work / "base-index", work / "refined-index", specs, examples, refine_steps=args.refine_steps)
    refine_s = time.perf_counter() - t0

    base, added, refined = (read_index(work / n) for n in ("base-index", "added-index", "refined-index"))
    vocab = LabelVocab(list(added.labels.ids), list(added.labels.names))
    test = read_split(data, "test", cfg, vocab=vocab)
    held_cols = np.asarray([vocab.index()[x] for x in held_ids])
    counts = added.train_label_counts.numpy() if added.train_label_counts is not None else np.zeros(len(vocab))
    counts = counts.copy()
    counts[held_cols] = np.asarray(full.known_labels()[:, held].sum(0)).ravel()
    n_train = len(full)
    encoder = added.load_encoder()
    assert encoder is not None
    emb = encoder.encode(test)
    featurizer = added.load_featurizer()
    X = featurizer.transform(test) if featurizer is not None and added.load_ranker() is not None else None

    table = []
    full_s = None
    if args.full_model is not None:
        if not (args.full_model / "model.json").is_file():  # trained here, on the same rows with every label
            _write_reduced(args.dataset, work / "data-full", cfg.label_field, set(), args.train_rows, args.test_rows)
            from trainer.train import train

            train(work / "data-full", args.full_model, EliasConfig().with_overrides(args.set), progress=False)
        build_index(args.full_model, work / "full-index", progress=False)
        full_index = read_index(work / "full-index")
        full_s = json.loads((args.full_model / "model.json").read_text()).get("timings", {}).get("total_s")
        f_encoder, f_featurizer = full_index.load_encoder(), full_index.load_featurizer()
        assert f_encoder is not None
        f_emb = f_encoder.encode(test)
        f_X = f_featurizer.transform(test) if f_featurizer is not None and full_index.load_ranker() else None
        position = vocab.index()
        remap = np.asarray([position.get(x, -1) for x in full_index.labels.ids], dtype=np.int64)
        for plus in (False, True) if f_X is not None else (False,):
            ids = _elias(full_index, f_emb, f_X, plus)
            ids = np.where(ids >= 0, remap[np.maximum(ids, 0)], -1)
            table.append((f"(a) ELIAS{'++' if plus else ''}, full retrain with every label",
                          _metrics(ids, test.labels, held_cols, counts, n_train)))
    variants = (("without the held-out labels", base), ("labels added, closed form", added),
                (f"labels added, refined ({args.refine_steps} logistic steps)", refined))
    for name, index in variants:
        table.append((f"ELIAS, {name}", _metrics(_elias(index, emb, X, False), test.labels, held_cols, counts,
                                                  n_train)))
        if X is not None:
            table.append((f"ELIAS++, {name}", _metrics(_elias(index, emb, X, True), test.labels, held_cols, counts,
                                                        n_train)))
    for kind in ("flat", "hnsw"):
        ann = AnnBaseline.from_searcher(refined.tensors, kind)
        ids, _ = ann.search(emb, 100)
        table.append((f"{ann.method} over W_L, labels added, refined", _metrics(ids, test.labels, held_cols, counts,
                                                                                n_train)))

    # Removing them again: from the refined index, the held-out labels removed; none may come back from a search.
    t0 = time.perf_counter()
    remove_labels(work / "refined-index", work / "removed-index", held_ids)
    remove_s = time.perf_counter() - t0
    removed = read_index(work / "removed-index")
    position = vocab.index()
    back = np.asarray([position[x] for x in removed.labels.ids], dtype=np.int64)
    removal = []
    for plus in (False, True) if X is not None else (False,):
        ids = _elias(removed, emb, X, plus)
        ids = np.where(ids >= 0, back[np.maximum(ids, 0)], -1)
        leaked = int(np.isin(ids, held_cols).sum())
        assert leaked == 0, f"{leaked} results name a removed label"
        removal.append((f"ELIAS{'++' if plus else ''}", len(ids), _metrics(ids, test.labels, held_cols, counts,
                                                                             n_train)[4]))
    others = {name: m[4] for name, m in table}

    size = {name: sum(index_size(work / name).values()) for name in ("base-index", "added-index")}
    n_held_points = int((np.asarray(test.labels[:, held_cols].sum(1)).ravel() > 0).sum())
    lines = [
        f"Dataset `{args.dataset.name}`: {len(held_ids)} of {len(full.vocab):,} training labels held out (seed "
        f"{args.seed}: {n_frequent} with at least {args.min_docs} training documents, {len(held_ids) - n_frequent} "
        f"rarer), deleted from the {n_train:,} training documents; a model trained on the rest "
        f"({'overrides ' + ', '.join(args.set) if args.set else 'default config'}); its index built; the held-out "
        f"labels added back from their {len(rows):,} training documents with `add_labels` (3 clusters each). Test "
        f"split: {len(test):,} points, {n_held_points:,} of them with an added label (the \"added\" columns). "
        f"Machine: {mach}. Date: {today()}. Command: `{command_line()}`.",
        "",
        "| method | R@100 all | P@5 all | R@100 added | P@5 added | R@100 others |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *(f"| {name} | {m[0]:.2f} | {m[1]:.2f} | {m[2]:.2f} | {m[3]:.2f} | {m[4]:.2f} |" for name, m in table),
        "",
        *([f"Row (a): `{args.full_model}`, trained on the whole training split at the same config"
           + (f" in {full_s:,.0f} s" if full_s else "") + "; the others: the model without the held-out labels. "
           "\"R@100 others\": recall of the labels that were never held out, on the points that hold one.", ""]
          if args.full_model is not None else []),
        f"Time: training the model {train_s:,.1f} s"
        f"{' (measured when an earlier run with the same --work trained it)' if reused else ''} + building its "
        f"index {build_s:,.1f} s, against adding the "
        f"{len(held_ids)} labels {add_s:,.1f} s in closed form, {refine_s:,.1f} s refined (encoding their documents "
        f"included). Index size: "
        f"{size['base-index'] / 2**20:,.1f} MiB without them, {size['added-index'] / 2**20:,.1f} MiB with them "
        f"(kappa {change.kappa_before} -> {change.kappa_after}).",
    ]
    refined_name = f"labels added, refined ({args.refine_steps} logistic steps)"
    recall = "; ".join(f"{name} {r:.2f} after removal, {others[f'{name}, {refined_name}']:.2f} before it, "
                       f"{others[f'{name}, without the held-out labels']:.2f} in the index trained without them"
                       for name, _, r in removal)
    searches = ", ".join(f"{n:,} {name}" for name, n, _ in removal)
    lines += ["", f"Removing the {len(held_ids)} labels again (`remove_labels` on the refined index, "
              f"{remove_s:.1f} s): in {sum(n for _, n, _ in removal):,} test searches ({searches}) no result names "
              f"a removed label (asserted). R@100 of the other labels: {recall}. A removed label frees shortlist "
              "and top-100 places and changes no other score, so the others' recall can only rise."]
    write_section(TITLE, "\n".join(lines), args.benchmarks_file)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
