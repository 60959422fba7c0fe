"""`elias build-index` and `elias index info|verify|add-labels|remove-labels` (thin verbs over index_builder and
index_format)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from elias_retrieval.cli.app import app, console, user_errors

index_app = typer.Typer(name="index", help="Inspect, verify and relabel built index directories.", no_args_is_help=True)
app.add_typer(index_app, name="index")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"


@app.command("build-index")
@user_errors
def build_index_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A trained model directory (elias train's output).")],
    out: Annotated[Path, typer.Argument(help="Index directory to write (replaced atomically if it exists).")],
    dtype: Annotated[str, typer.Option(help="Storage of the label embeddings W_L: fp32, fp16 or int8.")] = "fp16",
    kappa: Annotated[int | None, typer.Option(help="Prune A's rows to their top-N edges (every label keeps one).")]
    = None,
    reranker: Annotated[bool, typer.Option(help="Carry the model's ELIAS++ re-ranker (when it has one).")] = True,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Build a self-contained, versioned, memory-mappable index directory from a trained model."""
    from elias_retrieval.index_format import index_size, read_manifest
    from index_builder.build import build_index

    t0 = time.perf_counter()
    build_index(checkpoint, out, dtype=dtype, kappa=kappa, progress=not quiet, reranker=reranker)
    m = read_manifest(out)
    total = sum(index_size(out).values())
    model = m["model"]
    console.print(f"index written to [bold]{out}[/] in {time.perf_counter() - t0:.1f} s: {_human(total)}, "
                  f"{model['num_labels']:,} labels, {model['num_clusters']:,} clusters, kappa {model['kappa']}, "
                  f"W_L {m['label_weights']}, W_C {m['cluster_weights']}, version {m['index_version']}",
                  highlight=False)
    if m.get("reranker"):
        r = m["reranker"]
        console.print(f"ELIAS++ re-ranker: {r['nnz']:,} weights, fusion weight {r['fusion_weight']}, "
                      f"depth {r.get('depth', 100)}, featurizer {r['featurizer']}/", highlight=False)
    if m.get("pruning"):
        p = m["pruning"]
        console.print(f"pruned A to {p['kappa_requested']} edges per row ({p['edges_before']:,} -> "
                      f"{p['edges_after']:,} edges); {p['restored_edges']:,} labels got their best edge back, "
                      f"so rows are {p['kappa_after']} slots wide", highlight=False)


@index_app.command("info")
@user_errors
def info(index_dir: Annotated[Path, typer.Argument(help="An index directory.")]) -> None:
    """Print an index's manifest: format, shapes, search defaults, encoder and files."""
    from elias_retrieval.index_format import index_size, read_manifest

    m = read_manifest(index_dir)
    model, defaults = m["model"], m["defaults"]
    t = Table(title=f"{index_dir}", show_header=False, title_justify="left")
    t.add_column("key", style="bold")
    t.add_column("value")
    rows = [
        ("format", f"{m['format']} v{m['version']}"),
        ("index version", str(m.get("index_version", ""))),
        ("created", str(m.get("created", ""))),
        ("labels L", f"{model['num_labels']:,}"),
        ("clusters C", f"{model['num_clusters']:,}"),
        ("kappa", str(model["kappa"])),
        ("dim d", str(model["dim"])),
        ("alpha", str(model["alpha"])),
        ("defaults", f"k {defaults['k']}, beam {defaults['beam_size']}, shortlist K {defaults['shortlist_size']}"),
        ("encoder", str(m.get("encoder") or "none (embedding queries only)")),
        ("label weights W_L", m["label_weights"]),
        ("cluster weights W_C", m["cluster_weights"]),
        ("label order", "by cluster (row_labels)" if m["label_order"] == "clusters" else "by label id"),
        ("re-ranker", f"ELIAS++, {m['reranker']['nnz']:,} weights, fusion weight {m['reranker']['fusion_weight']}, "
         f"re-orders the top {m['reranker'].get('depth', 100)}" if m.get("reranker") else "none (plain ELIAS)"),
    ]
    if m.get("pruning"):
        p = m["pruning"]
        rows.append(("pruning", f"top {p['kappa_requested']} per row, {p['restored_edges']:,} edges restored"))
    if m.get("source"):
        rows.append(("source", str(m["source"].get("model_dir", ""))))
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    tensors = Table(title="tensors", title_justify="left")
    for col in ("name", "dtype", "shape"):
        tensors.add_column(col)
    for name, e in m["tensors"].items():
        tensors.add_row(name, e["dtype"], " x ".join(f"{s:,}" for s in e["shape"]))
    console.print(tensors)
    files = Table(title="files", title_justify="left")
    for col, just in (("file", "left"), ("bytes", "right"), ("sha256", "left")):
        files.add_column(col, justify=just)  # type: ignore[arg-type]
    for rel, e in m["files"].items():
        files.add_row(rel, f"{e['bytes']:,}", e["sha256"][:16] + "...")
    total = sum(index_size(index_dir).values())
    files.add_row("total (manifest included)", f"{total:,}", _human(total))
    console.print(files)


@index_app.command("verify")
@user_errors
def verify(index_dir: Annotated[Path, typer.Argument(help="An index directory.")]) -> None:
    """Check an index completely: version, sizes, shapes, A's ids, labels, and every file's sha256."""
    from elias_retrieval.index_format import read_manifest, verify_index

    t0 = time.perf_counter()
    verify_index(index_dir)
    m = read_manifest(index_dir)
    total = sum(int(e["bytes"]) for e in m["files"].values())
    console.print(f"ok: {index_dir} ({len(m['files'])} files, {_human(total)}) verified in "
                  f"{time.perf_counter() - t0:.1f} s", highlight=False)


@index_app.command("add-labels")
@user_errors
def add_labels_cmd(
    index_dir: Annotated[Path, typer.Argument(help="An index directory (only read).")],
    out: Annotated[Path, typer.Argument(help="The new index directory to write (atomically).")],
    labels: Annotated[Path, typer.Option(help="NEW.jsonl: one {\"id\", \"name\"} object per new label.")],
    examples: Annotated[Path | None, typer.Option(
        help="DOCS.jsonl: documents in the dataset's JSON-lines shape whose label field names the new ids "
             "(or rows with an \"embedding\" field). Labels without documents are placed from their names.")] = None,
    clusters: Annotated[int, typer.Option(help="Clusters each new label is attached to.")] = 3,
    refine_steps: Annotated[int, typer.Option(
        help="Logistic steps turning each new classifier against the other labels' examples (0: closed form).")]
    = 200,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Add labels to an index without retraining: classifier rows, edges in A and ranker rows from examples."""
    from index_builder.labels import add_labels, read_label_specs

    t0 = time.perf_counter()
    c = add_labels(index_dir, out, read_label_specs(labels), examples, clusters_per_label=clusters,
                   progress=not quiet, refine_steps=refine_steps)
    console.print(f"index written to [bold]{out}[/] in {time.perf_counter() - t0:.1f} s: {c.added:,} labels added "
                  f"({c.from_examples:,} from example documents, {c.added - c.from_examples:,} from their names), "
                  f"{c.num_labels:,} labels, kappa {c.kappa_before} -> {c.kappa_after}, version {c.parent_version} -> "
                  f"{c.index_version}", highlight=False)


@index_app.command("remove-labels")
@user_errors
def remove_labels_cmd(
    index_dir: Annotated[Path, typer.Argument(help="An index directory (only read).")],
    out: Annotated[Path, typer.Argument(help="The new index directory to write (atomically).")],
    ids: Annotated[Path, typer.Option(help="IDS.txt: the dataset label ids to remove, one per line.")],
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Remove labels from an index: search never returns them; every other label scores as before."""
    from index_builder.labels import read_label_ids, remove_labels

    t0 = time.perf_counter()
    c = remove_labels(index_dir, out, read_label_ids(ids), progress=not quiet)
    console.print(f"index written to [bold]{out}[/] in {time.perf_counter() - t0:.1f} s: {c.removed:,} labels "
                  f"removed, {c.num_labels:,} left, kappa {c.kappa_before} -> {c.kappa_after}, version "
                  f"{c.parent_version} -> {c.index_version}", highlight=False)
