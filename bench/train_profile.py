"""Where a training step's time and memory go: torch.profiler over stage-1 and stage-2 steps on a real dataset.

    python bench/train_profile.py                          # TIBKAT; writes "## Training step profile"
    python bench/train_profile.py --data ../shared/data/eurlex57k
    python bench/train_profile.py --quick --no-write       # small smoke run (the test suite runs it)

The model is set up as `elias train` sets it up (stage-0 clusters, the configured init; for stage 2, A
initialised from the stage-1 model's top clusters), then each stage runs `--warmup` untimed steps and
`--steps` timed ones: wall time per step, minor page faults per step (fresh memory the kernel had to map and
zero), peak RSS, and the operators that took the most CPU time with the memory they allocated.

`--section` names the BENCHMARKS.md section, so that an older checkout can be profiled by the same script
beside the current one (`PYTHONPATH=OLD_CHECKOUT python bench/train_profile.py --section "..."`): with an
older trainer the script uses only what it had (no bf16 products, no reuse of freed memory).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import BENCHMARKS, ROOT, command_line, machine, publish, today  # noqa: E402

import trainer.train as T  # noqa: E402

try:
    from elias_retrieval import cluster_blocks  # noqa: E402
except ImportError:  # an older checkout
    cluster_blocks = None
from elias_retrieval.config import EliasConfig  # noqa: E402
from elias_retrieval.encoders import SparseInputs  # noqa: E402
from elias_retrieval.model import EliasModel  # noqa: E402
from trainer.clustering import balanced_clusters, pifa  # noqa: E402
from trainer.graph_init import cluster_affinity, init_graph  # noqa: E402

SECTION = "## Training step profile"


def _step(model, inputs, Y, rows, lam, opts, device, dtype) -> None:
    """trainer.train.train_step where the trainer has it, else the same step written out (older checkouts)."""
    if hasattr(T, "train_step"):
        T.train_step(model, inputs, Y, rows, lam, opts, device, dtype)
        return
    batch = inputs.batch(rows, device)
    yb = Y[rows].tocoo()
    loss, _ = model.loss(batch, torch.from_numpy(yb.row.astype(np.int64)), torch.from_numpy(yb.col.astype(np.int64)),
                         lam)
    for o in opts.values():
        o.zero_grad(set_to_none=True)
    loss.backward()
    for o in opts.values():
        o.step()


def _stage(model, inputs, Y, lam, opts, device, dtype, order, start, warmup, steps, batch_size, profiled=True):
    """Run warm-up steps, then time and profile `steps` steps; returns (profiler or None, seconds per step, page
    faults per step)."""
    def rows(i: int) -> np.ndarray:
        a = ((start + i) * batch_size) % max(1, len(order) - batch_size)
        return order[a: a + batch_size]

    for i in range(warmup):
        _step(model, inputs, Y, rows(i), lam, opts, device, dtype)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        _step(model, inputs, Y, rows(i), lam, opts, device, dtype)
    per_step = (time.perf_counter() - t0) / steps
    per_fault = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
    if not profiled:
        return None, per_step, per_fault
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for i in range(warmup + steps, warmup + 2 * steps):
            _step(model, inputs, Y, rows(i), lam, opts, device, dtype)
    return prof, per_step, per_fault


def _top_ops(prof, steps: int, n: int) -> list[str]:
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    lines = []
    for e in events[:n]:
        mem = max(0, e.self_cpu_memory_usage) / steps / 2**20
        ms, share = e.self_cpu_time_total / steps / 1e3, 100 * e.self_cpu_time_total / total
        lines.append(f"| `{e.key}` | {ms:.1f} | {share:.0f}% | {e.count // steps} | {mem:,.0f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "tibkat")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override section.key=value")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=12, help="operators listed per stage")
    ap.add_argument("--section", default=SECTION, help="the BENCHMARKS.md section to write")
    ap.add_argument("--quick", action="store_true", help="2,000 training points, 2 steps per stage")
    ap.add_argument("--no-write", action="store_true", help="print the table instead of writing BENCHMARKS.md")
    ap.add_argument("--benchmarks-file", type=Path, default=BENCHMARKS)
    args = ap.parse_args()
    overrides = list(args.overrides)
    if args.quick:
        overrides += ["train.max_train_points=2000", "features.max_features=5000", "model.dim=64", "model.kappa=200",
                      "model.shortlist_size=200"]
        args.warmup, args.steps = 1, 2
    cfg = EliasConfig().with_overrides(overrides)
    if hasattr(T, "dataset_data_config"):
        cfg.data = T.dataset_data_config(args.data, cfg.data)
    if hasattr(T, "reuse_freed_memory"):
        T.reuse_freed_memory()
    device = torch.device("cpu")
    dtype = T.matmul_dtype(cfg.train.precision, device) if hasattr(T, "matmul_dtype") else torch.float32

    t0 = time.perf_counter()
    featurizer, data = T.load_data(args.data, cfg, None, progress=False)
    load_s = time.perf_counter() - t0
    L, C = data.Y_train.shape[1], cfg.model.num_clusters(data.Y_train.shape[1])
    torch.manual_seed(cfg.train.seed)
    model = EliasModel(T.make_encoder(cfg, featurizer, L), L, C, min(cfg.model.kappa, L), cfg.model)
    partition = balanced_clusters(pifa(data.X_train, data.Y_train), C, seed=cfg.train.seed)
    model.set_partition(partition)
    inputs = SparseInputs(data.X_train)
    if hasattr(T, "centroid_init") and cfg.train.init == "centroid":
        T.centroid_init(model, T.label_centroids(model, inputs, data.Y_train, cfg.train.eval_batch_size, device)[0],
                        partition, cfg.train.init_scale, cfg.train.init_label_bias)
    order = np.random.default_rng(cfg.train.seed).permutation(len(inputs))
    if cfg.train.batch_size == 0:  # by the data, as `elias train` resolves it
        cfg.train.batch_size = T.batch_size(cfg, L, data.Y_train.shape[0])
    B, total = cfg.train.batch_size, 2 * args.warmup + 4 * args.steps
    results = {}
    for stage in (1, 2):
        if stage == 2:
            ids, scores = T.top_clusters(model, inputs, cfg.train.init_top_clusters, cfg.train.eval_batch_size, device)
            A_ids, A_logits = init_graph(cluster_affinity(ids, scores, data.Y_train, C), partition,
                                         min(cfg.model.kappa, L))
            model.set_graph(A_ids, A_logits, stage=2)
        opts, _ = T.make_optimizers(model, cfg, stage, total)
        model.train()
        lam = cfg.train.lambda_stage1 if stage == 1 else cfg.train.lambda_stage2
        first = (stage - 1) * (args.warmup + 2 * args.steps)
        if stage == 1 and hasattr(cluster_blocks, "_BLOCK_FRACTION"):
            # The same steps through the dense (B, L) label product, the route before the cluster blocks, after a
            # pass of the default route that warms the allocator up (the first steps of a process map fresh memory).
            _stage(model, inputs, data.Y_train, lam, opts, device, dtype, order, first, args.warmup, args.steps, B,
                   profiled=False)
            default_fraction, cluster_blocks._BLOCK_FRACTION = cluster_blocks._BLOCK_FRACTION, 0.0
            results["1, dense label product"] = _stage(model, inputs, data.Y_train, lam, opts, device, dtype,
                                                       order, first, args.warmup, args.steps, B)
            cluster_blocks._BLOCK_FRACTION = default_fraction
        results[stage] = _stage(model, inputs, data.Y_train, lam, opts, device, dtype, order, first, args.warmup,
                                args.steps, B)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    bf16 = "bf16" if dtype == torch.bfloat16 else "fp32"
    source = Path(T.__file__).resolve().parents[1]
    new_api = "bf16 products and freed memory reused" if hasattr(T, "train_step") else "the trainer of that checkout"
    if source != ROOT:
        new_api += f"; trainer code from `{source}`, put first on PYTHONPATH"
    lines = [
        f"Machine: {machine()}. Date: {today()}. Command: `{command_line()}`.",
        "",
        f"Dataset `{args.data.name}`: N = {len(inputs):,} training points, L = {L:,}, C = {C}, "
        f"d = {cfg.model.embedding_dim(L)}, "
        f"batch {B}, shortlist {cfg.model.shortlist_size}, kappa {model.kappa} in stage 2; torch threads "
        f"{torch.get_num_threads()}; label-classifier products in {bf16} ({new_api}). Reading and tf-idf took "
        f"{load_s:.0f} s. Each stage: {args.warmup} warm-up steps, then {args.steps} timed steps, then {args.steps} "
        f"profiled ones (the profiler slows them; its times are shares, the timed steps are the speed)."
        + (" Stage 1 runs three times on the same batches: an untimed pass of the cluster-block label product (the "
           "default) that warms the allocator up, the dense (B, L) product (the route before it, its own profile "
           "below), then the default."
           if "1, dense label product" in results else ""),
        "",
        "| stage | s per step | examples/s | minor page faults per step | peak RSS (MB) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for stage, (_, per_step, faults) in results.items():
        lines.append(f"| {stage} | {per_step:.3f} | {B / per_step:,.0f} | {faults:,.0f} | {peak:,.0f} |")
    for stage, (prof, _, _) in results.items():
        if prof is None:
            continue
        lines += ["", f"Stage {stage}, the {args.top} operators with the most CPU time (per step, profiled steps):",
                  "", "| operator | ms | share | calls | MB allocated |", "| --- | ---: | ---: | ---: | ---: |"]
        lines += _top_ops(prof, args.steps, args.top)
    text = "\n".join(lines)
    publish(args.section, text, args)


if __name__ == "__main__":
    main()
