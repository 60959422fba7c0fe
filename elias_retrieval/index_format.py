"""The on-disk index (docs/index-format.md): the one module that reads and writes an index directory.

    INDEX/
      manifest.json        format, version, shapes, dtypes, search defaults; bytes + sha256 of every other file
      tensors.safetensors  W_C, b_C, A_ids (int32), A_weights (normalised), W_L (fp32|fp16|int8), [W_L_scale], b_L,
                           [row_labels] (int32, the label id of each row: rows in cluster order, label_layout.py)
      labels.jsonl         one {"id": <dataset label id>[, "name": <name>]} per dense label id
      encoder/             the query encoder, as `Encoder.save` wrote it (JSON + safetensors only)
      ranker/              optional ELIAS++ re-ranker, as `SparseRanker.save` wrote it
      featurizer/          the re-ranker's tf-idf featurizer, when the encoder does not hold it (transformer)

Writing is atomic (a temporary directory beside OUT, fsynced, then swapped in: atomic.atomic_dir). Reading
memory-maps the tensors (pages are read when search touches them), checks version, file sizes, header, shapes
and dtypes, writes nothing, and runs no code from the files: no pickle anywhere. `verify_index` adds the
sha256 of every file.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from elias_retrieval.atomic import atomic_dir, leftover_previous
from elias_retrieval.label_layout import cluster_order, is_permutation, relabel_rows, rows_of
from elias_retrieval.search import SearchTensors

if TYPE_CHECKING:
    from elias_retrieval.data import LabelVocab
    from elias_retrieval.encoders import Encoder
    from elias_retrieval.features import TfidfFeaturizer
    from elias_retrieval.reranker import SparseRanker

FORMAT_NAME = "elias-index"
FORMAT_VERSION = 3
# Versions this reader opens: 1 stored W_C in fp32 always; 2 stores it in fp16 beside an fp16 or int8 W_L;
# 3 stores label rows in cluster order, with `row_labels` (the label id of each row; absent: row = label id).
READABLE_VERSIONS = (1, 2, 3)

MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
LABELS = "labels.jsonl"
ENCODER_DIR = "encoder"
RANKER_DIR = "ranker"
FEATURIZER_DIR = "featurizer"
ENCODER_FEATURIZER = f"{ENCODER_DIR}/featurizer"  # a tf-idf encoder's own featurizer

LABEL_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}
# W_C's storage for each W_L storage: a compact index keeps W_C in fp16 too (search multiplies it in fp32).
CLUSTER_DTYPES = {"fp32": "fp32", "fp16": "fp16", "int8": "fp16"}
# safetensors dtype codes <-> torch dtypes (only those an index uses).
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "I8": torch.int8, "I32": torch.int32, "I64": torch.int64}
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}
# Files an index never carries: formats whose loaders may run code (pickle).
_UNSAFE_SUFFIXES = (".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib", ".npy", ".h5", ".msgpack")
_MAX_HEADER = 100 << 20
_CHUNK = 16 << 20
# Manifest keys written by this module; `meta` passed to write_index may not override them.
_RESERVED = ("format", "version", "created", "index_version", "model", "defaults", "encoder", "label_weights",
             "cluster_weights", "label_order", "tensors", "files", "reranker")


class IndexFormatError(ValueError):
    """An index directory is missing, truncated, corrupt or of an unknown version; the message names the file."""


@dataclass
class Index:
    """A loaded index: memory-mapped search tensors, the manifest, and (on first use) labels and encoder."""

    path: Path
    manifest: dict[str, Any]
    tensors: SearchTensors
    train_label_counts: Tensor | None = None  # (L,) training positives per label, when the builder knew them
    _labels: LabelVocab | None = field(default=None, repr=False)

    @property
    def labels(self) -> LabelVocab:
        """The label vocabulary (read on first access: a million JSON lines take about a second)."""
        if self._labels is None:
            self._labels = _read_labels(self.path / LABELS, self.tensors.num_labels)
        return self._labels

    @property
    def defaults(self) -> dict[str, int]:
        """Search defaults: {"k", "beam_size", "shortlist_size"}."""
        return dict(self.manifest["defaults"])

    def load_encoder(self) -> Encoder | None:
        """The query encoder saved in the index, or None for an index built without one (embeddings only)."""
        from elias_retrieval.encoders import load_encoder

        if self.manifest.get("encoder") is None:
            return None
        return load_encoder(self.path / ENCODER_DIR)

    def load_ranker(self) -> SparseRanker | None:
        """The ELIAS++ re-ranker, or None for an index built without one."""
        from elias_retrieval.reranker import SparseRanker

        if self.manifest.get("reranker") is None:
            return None
        ranker = SparseRanker.load(self.path / RANKER_DIR)
        L = self.tensors.num_labels
        if ranker.W.shape[0] != L or ranker.bias.shape != (L,):
            raise IndexFormatError(f"{self.path / RANKER_DIR}: ranker has {ranker.W.shape[0]} label rows and "
                                   f"{ranker.bias.shape[0]} biases, the index has {L} labels")
        return ranker

    def load_featurizer(self) -> TfidfFeaturizer | None:
        """The tf-idf featurizer of the re-ranker's features (with no re-ranker: a tf-idf encoder's), or None."""
        from elias_retrieval.features import TfidfFeaturizer

        rel = featurizer_path(self.manifest)
        return None if rel is None else TfidfFeaturizer.load(self.path / rel)


def featurizer_path(manifest: dict[str, Any]) -> str | None:
    """The index-relative directory of the tf-idf featurizer `Index.load_featurizer` reads, if any."""
    if manifest.get("reranker") is not None:
        return str(manifest["reranker"]["featurizer"])
    return ENCODER_FEATURIZER if manifest.get("encoder") == "tfidf" else None


# ----------------------------------------------------------------------------------------------- writing


def quantize_int8(W: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: `W ~= q * scale[:, None]`, scale = max|w| / 127 (1 for an all-zero row)."""
    W = W.float()
    scale = W.abs().amax(1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(W / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def write_index(
    out: str | Path,
    tensors: SearchTensors,
    labels: LabelVocab,
    encoder_dir: str | Path | None,
    *,
    dtype: str,
    defaults: dict[str, int],
    meta: dict[str, Any],
    progress: bool = False,
    train_label_counts: Tensor | None = None,
    ranker_dir: str | Path | None = None,
    featurizer_dir: str | Path | None = None,
    cluster_layout: bool = True,
) -> None:
    """Write an index directory at `out` atomically: a killed write leaves any previous `out` as it was.

    `tensors.A_weights` must already be normalised (pad slots 0, pad id = L). `dtype` (fp32|fp16|int8) is
    the storage of W_L; W_C is stored in fp16 beside a compact W_L (CLUSTER_DTYPES), everything else in fp32
    (A_ids in int32). `meta` entries (e.g. `config`, `num_train`, `source`) are added to the manifest as they
    are. `ranker_dir` (a `SparseRanker.save` directory) adds the ELIAS++ re-ranker, with its tf-idf featurizer
    copied from `featurizer_dir`, or, when that is None, the tf-idf encoder's own (`encoder/featurizer`).
    Label rows are stored in cluster order (label_layout.py) unless `cluster_layout` is False.
    """
    if dtype not in LABEL_DTYPES:
        raise IndexFormatError(f"W_L dtype must be one of {', '.join(LABEL_DTYPES)}, got {dtype!r}")
    if clash := sorted(set(meta) & set(_RESERVED)):
        raise ValueError(f"meta may not set the manifest keys {clash}")
    for key in ("k", "beam_size", "shortlist_size"):
        if not isinstance(defaults.get(key), int) or defaults[key] < 1:
            raise ValueError(f"defaults[{key!r}] must be a positive integer, got {defaults.get(key)!r}")
    arrays, model = _stored_tensors(tensors, dtype, train_label_counts, cluster_layout)
    if len(labels) != model["num_labels"]:
        raise ValueError(f"{len(labels)} labels in the vocabulary, {model['num_labels']} rows in W_L")
    encoder_kind = None
    if encoder_dir is not None:
        encoder_dir = Path(encoder_dir)
        try:
            encoder_kind = json.loads((encoder_dir / "encoder.json").read_text())["kind"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{encoder_dir}: not an encoder directory (no readable encoder.json: {e})") from e
    reranker = None
    if ranker_dir is not None:
        ranker_dir = Path(ranker_dir)
        if featurizer_dir is None and encoder_kind != "tfidf":
            raise ValueError("a re-ranker needs its tf-idf featurizer: give featurizer_dir (the encoder has none)")
        feat = Path(featurizer_dir) if featurizer_dir is not None else encoder_dir / "featurizer"  # type: ignore[operator]
        try:
            rmeta = json.loads((ranker_dir / "ranker.json").read_text())
            num_features = int(json.loads((feat / "featurizer.json").read_text())["num_features"])
            shape = [int(x) for x in rmeta["shape"]]
            reranker = {"fusion_weight": float(rmeta["fusion_weight"]), "nnz": int(rmeta["nnz"]), "shape": shape,
                        "depth": int(rmeta.get("depth", 100)),
                        "featurizer": FEATURIZER_DIR if featurizer_dir is not None else ENCODER_FEATURIZER}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{ranker_dir}, {feat}: not a ranker and featurizer (unreadable JSON: {e})") from e
        if shape != [model["num_labels"], num_features]:
            raise ValueError(f"{ranker_dir}: ranker shape {shape}, expected [{model['num_labels']}, {num_features}] "
                             "(labels, tf-idf features)")
    sources = {ENCODER_DIR: encoder_dir, RANKER_DIR: ranker_dir,
               FEATURIZER_DIR: None if ranker_dir is None else featurizer_dir}
    trees = [(rel, Path(src)) for rel, src in sources.items() if src is not None]
    for _rel, src in trees:
        for f in _walk_files(src):
            if f.name.endswith(_UNSAFE_SUFFIXES):
                raise ValueError(f"{f}: an index carries no pickle-capable files ({f.suffix}); save with safetensors")

    files: dict[str, dict[str, Any]] = {}
    with atomic_dir(out) as tmp, _progress_bar(progress, _total_bytes(arrays, [s for _, s in trees])) as advance:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; an index is read by the serving user
        files[TENSORS] = _write_safetensors(tmp / TENSORS, arrays, advance)
        files[LABELS] = _write_hashed(tmp / LABELS, _label_lines(labels), advance)
        for prefix, root in trees:
            for src in _walk_files(root):
                rel = src.relative_to(root).as_posix()
                dst = tmp / prefix / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                files[f"{prefix}/{rel}"] = _write_hashed(dst, _file_chunks(src), advance)
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "index_version": files[TENSORS]["sha256"][:12],
            "model": model,
            "defaults": {k: int(defaults[k]) for k in ("k", "beam_size", "shortlist_size")},
            "encoder": encoder_kind,
            "label_weights": dtype,
            "cluster_weights": CLUSTER_DTYPES[dtype],
            "label_order": "clusters" if cluster_layout else "ids",
            "tensors": {n: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                        for n, t in arrays.items()},
            "files": files,
            "reranker": reranker,
            **meta,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last: no manifest, no index


@dataclass
class _Rows:
    """A (rows, cols) tensor produced chunk by chunk while it is written (W_L converted to its storage dtype)."""

    shape: tuple[int, int]
    dtype: torch.dtype
    rows: Callable[[int, int], Tensor]


def _stored_tensors(
    t: SearchTensors, dtype: str, counts: Tensor | None, cluster_layout: bool = True
) -> tuple[dict[str, Tensor | _Rows], dict[str, Any]]:
    """The arrays as stored (W_L converted chunk by chunk, never as a second full copy) and the model shapes.

    With `cluster_layout` the label rows are stored in cluster order (label_layout.py), else as given.
    """
    C, d = t.W_C.shape
    L = t.W_L.shape[0]
    kappa = t.A_ids.shape[1]
    expect = {"W_C": (C, d), "b_C": (C,), "A_ids": (C, kappa), "A_weights": (C, kappa), "W_L": (L, d), "b_L": (L,)}
    for name, shape in expect.items():
        if tuple(getattr(t, name).shape) != shape:
            raise ValueError(f"{name} has shape {tuple(getattr(t, name).shape)}, expected {shape}")
    if L >= 2**31 - 1:
        raise ValueError(f"{L} labels do not fit int32 label ids")
    A_ids = t.A_ids.detach().cpu()
    if A_ids.numel() and (int(A_ids.min()) < 0 or int(A_ids.max()) > L):
        raise ValueError(f"A_ids must lie in 0..{L} (pad id = L)")
    A_w = t.A_weights.detach().cpu().float()
    if A_w.numel() and (float(A_w.min()) < 0 or float(A_w.max()) > 1 or bool((A_w[A_ids == L] != 0).any())):
        raise ValueError("A_weights must be normalised edge weights in [0, 1], 0 on pad slots")
    W_L = t.W_L.detach().cpu()
    scale_in = None if t.W_L_scale is None else t.W_L_scale.detach().cpu().float()
    # Storage order: row r of the index holds row order[r] of `t`; in cluster order (label_layout.py) or by id.
    base = torch.arange(L) if t.row_labels is None else t.row_labels.detach().cpu().long()
    if tuple(base.shape) != (L,) or not is_permutation(base, L):
        raise ValueError(f"row_labels must be a permutation of 0..{L - 1}")
    order = cluster_order(A_ids, A_w, L, t.row_labels) if cluster_layout else rows_of(base)[:L]

    def stored(a: int, b: int) -> Tensor:
        return W_L.index_select(0, order[a:b])

    def fp32_rows(a: int, b: int) -> Tensor:
        w = stored(a, b).float()
        return w if scale_in is None else w * scale_in.index_select(0, order[a:b]).unsqueeze(1)

    arrays: dict[str, Tensor | _Rows] = {}
    if counts is not None:
        if tuple(counts.shape) != (L,):
            raise ValueError(f"train_label_counts has shape {tuple(counts.shape)}, expected ({L},)")
        arrays["train_label_counts"] = counts.detach().cpu().to(torch.int64)
    arrays.update(
        W_C=t.W_C.detach().cpu().to(LABEL_DTYPES[CLUSTER_DTYPES[dtype]]), b_C=t.b_C.detach().cpu().float(),
        A_ids=relabel_rows(A_ids, order).to(torch.int32),
        A_weights=A_w, b_L=t.b_L.detach().cpu().float().index_select(0, order),
    )
    if cluster_layout:
        arrays["row_labels"] = base.index_select(0, order).to(torch.int32)
    if dtype == "int8":
        step = 1 << 16
        scale = torch.cat([fp32_rows(a, min(L, a + step)).abs().amax(1) for a in range(0, L, step)]) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        arrays["W_L_scale"] = scale

        def rows(a: int, b: int) -> Tensor:
            return torch.round(fp32_rows(a, b) / scale[a:b].unsqueeze(1)).clamp_(-127, 127).to(torch.int8)

    else:
        target = LABEL_DTYPES[dtype]

        def rows(a: int, b: int) -> Tensor:
            return (stored(a, b) if scale_in is None and W_L.dtype == target else fp32_rows(a, b)).to(target)

    arrays["W_L"] = _Rows((L, d), LABEL_DTYPES[dtype], rows)
    model = {"num_labels": L, "num_clusters": C, "kappa": kappa, "dim": d, "alpha": float(t.alpha)}
    return arrays, model


def _write_safetensors(path: Path, arrays: dict[str, Tensor | _Rows], advance: Callable[[int], None]) -> dict[str, Any]:
    """A safetensors file (8-byte header length, JSON header, raw buffers), written in chunks and hashed.

    Tensors are laid out by decreasing element size after a header padded to 8 bytes, so every tensor
    starts aligned to its element size (what safetensors itself does) and maps without copies.
    """
    names = sorted(arrays, key=lambda n: -arrays[n].dtype.itemsize)  # stable within one element size
    header: dict[str, Any] = {"__metadata__": {"format": FORMAT_NAME, "version": str(FORMAT_VERSION)}}
    offset = 0
    for name in names:
        a = arrays[name]
        shape = list(a.shape)
        nbytes = math.prod(shape) * a.dtype.itemsize
        header[name] = {"dtype": _ST_CODES[a.dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    def chunks() -> Iterator[bytes | memoryview]:
        yield struct.pack("<Q", len(raw)) + raw
        for name in names:
            a = arrays[name]
            if isinstance(a, _Rows):
                n_rows, n_cols = a.shape
                step = max(1, _CHUNK // max(1, n_cols * a.dtype.itemsize))
                for r in range(0, n_rows, step):
                    yield _bytes_of(a.rows(r, min(n_rows, r + step)))
            else:
                buf = _bytes_of(a)
                for r in range(0, len(buf), _CHUNK):
                    yield buf[r : r + _CHUNK]

    return _write_hashed(path, chunks(), advance)


def _bytes_of(t: Tensor) -> memoryview:
    t = t.contiguous()
    return memoryview(t.numpy()).cast("B") if t.numel() else memoryview(b"")


def _write_hashed(path: Path, chunks: Iterator[bytes | memoryview], advance: Callable[[int], None]) -> dict[str, Any]:
    h, n = hashlib.sha256(), 0
    with open(path, "wb") as f:
        for c in chunks:
            f.write(c)
            h.update(c)
            n += len(c)
            advance(len(c))
    return {"bytes": n, "sha256": h.hexdigest()}


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while c := f.read(_CHUNK):
            yield c


def _label_lines(labels: LabelVocab) -> Iterator[bytes]:
    """JSON lines, `name` left out when unknown; written in blocks of lines."""
    names = getattr(labels, "names", None) or [None] * len(labels)
    block: list[str] = []
    for i, name in zip(labels.ids, names, strict=True):
        row = {"id": str(i)} if name is None else {"id": str(i), "name": name}
        block.append(json.dumps(row, ensure_ascii=False, separators=(",", ":")))
        if len(block) == 65536:
            yield ("\n".join(block) + "\n").encode()
            block = []
    if block:
        yield ("\n".join(block) + "\n").encode()


def _walk_files(root: Path) -> list[Path]:
    """Regular files under `root`, skipping hidden ones (e.g. temporaries of an interrupted atomic write)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(root).parts))


def _total_bytes(arrays: dict[str, Tensor | _Rows], dirs: list[Path]) -> int:
    n = sum(math.prod(a.shape) * a.dtype.itemsize for a in arrays.values())
    return n + sum(p.stat().st_size for d in dirs for p in _walk_files(d))


class _progress_bar:  # noqa: N801 - used as a context manager like a function
    """A rich bar over bytes written (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("writing index"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                            transient=True)
        self.bar.__enter__()
        task = self.bar.add_task("write", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)


# ----------------------------------------------------------------------------------------------- reading


def is_index_dir(path: str | Path) -> bool:
    """True when `path` holds a manifest.json (read_index then says precisely what else is wrong, if anything)."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest, checked for format name, version and the keys this reader needs."""
    p = Path(path) / MANIFEST
    if not Path(path).is_dir():
        # A reader never writes (read-only mounts, a serving user), so it does not rename a previous index back.
        if (old := leftover_previous(path)) is not None:
            raise IndexFormatError(f"{path}: no such index directory; a build killed while replacing it left the "
                                   f"previous index at {old}: the next build into {path} renames it back")
        raise IndexFormatError(f"{path}: no such index directory")
    try:
        manifest = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexFormatError(f"{p}: missing (not an index directory, or an unfinished build)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFormatError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise IndexFormatError(f"{p}: not an {FORMAT_NAME} manifest (format {manifest.get('format')!r})"
                               if isinstance(manifest, dict) else f"{p}: not a JSON object")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise IndexFormatError(f"{p}: unknown format version {manifest.get('version')!r} "
                               f"(this reader knows versions {', '.join(map(str, READABLE_VERSIONS))})")
    for key in ("model", "defaults", "label_weights", "tensors", "files"):
        if key not in manifest:
            raise IndexFormatError(f"{p}: no {key!r} entry")
    if manifest["label_weights"] not in LABEL_DTYPES:
        raise IndexFormatError(f"{p}: unknown label_weights dtype {manifest['label_weights']!r}")
    if manifest.setdefault("cluster_weights", "fp32") not in ("fp32", "fp16"):
        raise IndexFormatError(f"{p}: unknown cluster_weights dtype {manifest['cluster_weights']!r}")
    if manifest.setdefault("label_order", "ids") not in ("ids", "clusters"):
        raise IndexFormatError(f"{p}: unknown label_order {manifest['label_order']!r}")
    reranker = manifest.get("reranker")
    if reranker is not None:
        feat = reranker.get("featurizer") if isinstance(reranker, dict) else None
        if feat not in (FEATURIZER_DIR, ENCODER_FEATURIZER):
            raise IndexFormatError(f"{p}: 'reranker' must be null or an object whose 'featurizer' is "
                                   f"{FEATURIZER_DIR!r} or {ENCODER_FEATURIZER!r}")
        for name in (f"{RANKER_DIR}/ranker.safetensors", f"{RANKER_DIR}/ranker.json", f"{feat}/featurizer.json"):
            if name not in manifest["files"]:
                raise IndexFormatError(f"{p}: a re-ranker, but 'files' does not list {name}")
    for name in (TENSORS, LABELS):
        if name not in manifest["files"]:
            raise IndexFormatError(f"{p}: 'files' does not list {name}")
    for rel in manifest["files"]:
        if rel.startswith("/") or ".." in Path(rel).parts or rel.endswith(_UNSAFE_SUFFIXES):
            raise IndexFormatError(f"{p}: refusing listed file {rel!r}")
    return manifest


def read_index(path: str | Path, device: str | torch.device = "cpu", verify: bool = False) -> Index:
    """Open an index: check it, memory-map its tensors (no copy on the CPU), and return them.

    Checks version, that every listed file exists with its listed size, the safetensors header, and every
    tensor's dtype and shape against the manifest. `verify=True` also checks every file's sha256.
    """
    path = Path(path)
    manifest = read_manifest(path)
    _check_files(path, manifest, hashes=verify)
    raw = _map_safetensors(path / TENSORS)
    m = manifest["model"]
    L, C, kappa, d = (int(m[k]) for k in ("num_labels", "num_clusters", "kappa", "dim"))
    wl = str(LABEL_DTYPES[manifest["label_weights"]]).removeprefix("torch.")
    wc = str(LABEL_DTYPES[manifest["cluster_weights"]]).removeprefix("torch.")
    expect = {
        "W_C": (wc, [C, d]), "b_C": ("float32", [C]), "A_ids": ("int32", [C, kappa]),
        "A_weights": ("float32", [C, kappa]), "W_L": (wl, [L, d]), "b_L": ("float32", [L]),
    }
    if manifest["label_weights"] == "int8":
        expect["W_L_scale"] = ("float32", [L])
    if "train_label_counts" in raw:
        expect["train_label_counts"] = ("int64", [L])
    if manifest["label_order"] == "clusters":
        expect["row_labels"] = ("int32", [L])
    for name, (dt, shape) in expect.items():
        t = raw.get(name)
        got = None if t is None else (str(t.dtype).removeprefix("torch."), list(t.shape))
        if got != (dt, shape):
            raise IndexFormatError(f"{path / TENSORS}: tensor {name} is {got or 'missing'}, expected ({dt}, {shape})")
    if extra := sorted(set(raw) - set(expect)):
        raise IndexFormatError(f"{path / TENSORS}: unexpected tensors {extra}")
    row_labels = raw.get("row_labels")
    if row_labels is not None and L and (int(row_labels.min()) < 0 or int(row_labels.max()) >= L):
        raise IndexFormatError(f"{path / TENSORS}: row_labels holds ids outside 0..{L - 1}")
    tensors = SearchTensors(
        W_C=raw["W_C"], b_C=raw["b_C"], A_ids=raw["A_ids"], A_weights=raw["A_weights"], W_L=raw["W_L"],
        b_L=raw["b_L"], alpha=float(m["alpha"]), W_L_scale=raw.get("W_L_scale"), row_labels=row_labels,
    )
    if torch.device(device).type != "cpu":
        tensors = tensors.to(device)
    return Index(path, manifest, tensors, raw.get("train_label_counts"))


def verify_index(path: str | Path) -> None:
    """Check everything read_index checks, plus the sha256 of every file and A's ids; raise IndexFormatError."""
    index = read_index(path, verify=True)
    A = index.tensors.A_ids
    L = index.tensors.num_labels
    for a in range(0, A.shape[0], 4096):
        block = A[a : a + 4096]
        if block.numel() and (int(block.min()) < 0 or int(block.max()) > L):
            raise IndexFormatError(f"{Path(path) / TENSORS}: A_ids rows {a}.. hold ids outside 0..{L}")
    rows = index.tensors.row_labels
    if rows is not None and not is_permutation(rows, L):
        raise IndexFormatError(f"{Path(path) / TENSORS}: row_labels is not a permutation of 0..{L - 1}")
    index.labels  # noqa: B018 - parses every line and checks the count
    if index.manifest.get("reranker") is not None:
        ranker_path = Path(path) / RANKER_DIR
        try:
            ranker, featurizer = index.load_ranker(), index.load_featurizer()
            assert ranker is not None and featurizer is not None
            ranker.W.check_format(full_check=True)
        except IndexFormatError:
            raise
        except (ValueError, KeyError, OSError) as e:
            raise IndexFormatError(f"{ranker_path}: cannot load the re-ranker or its featurizer ({e})") from None
        if ranker.W.shape[1] != featurizer.num_features:
            raise IndexFormatError(f"{ranker_path}: {ranker.W.shape[1]} ranker features, its featurizer has "
                                   f"{featurizer.num_features}")


def _check_files(path: Path, manifest: dict[str, Any], hashes: bool) -> None:
    for rel, entry in manifest["files"].items():
        f = path / rel
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            raise IndexFormatError(f"{f}: missing (listed in {MANIFEST})") from None
        if size != entry.get("bytes"):
            raise IndexFormatError(f"{f}: {size} bytes, {MANIFEST} says {entry.get('bytes')} (truncated or replaced)")
        if hashes:
            h = hashlib.sha256()
            for c in _file_chunks(f):
                h.update(c)
            if (got := h.hexdigest()) != entry.get("sha256"):
                raise IndexFormatError(f"{f}: sha256 mismatch, the file is corrupt or was modified (got "
                                       f"{got[:16]}..., {MANIFEST} says {str(entry.get('sha256'))[:16]}...)")
    if manifest.get("encoder") is not None and not any(r.startswith(ENCODER_DIR + "/") for r in manifest["files"]):
        raise IndexFormatError(f"{path / MANIFEST}: encoder {manifest['encoder']!r} but no encoder files listed")


def _map_safetensors(path: Path) -> dict[str, Tensor]:
    """Parse a safetensors header and map each tensor from the file (copy-on-write: never writes the file)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise IndexFormatError(f"{path}: truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise IndexFormatError(f"{path}: header length {n} is larger than the file allows")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise IndexFormatError(f"{path}: safetensors header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise IndexFormatError(f"{path}: safetensors header is not a JSON object")
        header.pop("__metadata__", None)
        data_len = size - 8 - n
        spans = []
        for name, e in header.items():
            try:
                dt = _ST_DTYPES[e["dtype"]]
                shape = [int(s) for s in e["shape"]]
                begin, end = (int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise IndexFormatError(f"{path}: bad header entry for {name!r}: {e!r}") from None
            if min(shape, default=0) < 0 or end - begin != math.prod(shape) * dt.itemsize:
                raise IndexFormatError(f"{path}: tensor {name} has {end - begin} bytes for shape {shape}")
            spans.append((begin, end, name, dt, shape))
        spans.sort()
        pos = 0
        for begin, end, name, _dt, _shape in spans:
            if begin != pos:
                raise IndexFormatError(f"{path}: tensor {name} starts at byte {begin}, expected {pos} "
                                       "(holes or overlap)")
            pos = end
        if pos != data_len:
            raise IndexFormatError(f"{path}: tensors cover {pos} bytes, the file holds {data_len} (truncated?)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    if buf is not None:
        _advise(buf, [(8 + n + b, 8 + n + e, name) for b, e, name, _dt, _shape in spans])
    out: dict[str, Tensor] = {}
    for begin, end, name, dt, shape in spans:
        if end == begin or buf is None:
            out[name] = torch.empty(shape, dtype=dt)
        else:
            # frombuffer keeps the mapping alive; ACCESS_COPY makes it writable without touching the file.
            out[name] = torch.frombuffer(buf, dtype=dt, count=(end - begin) // dt.itemsize,
                                         offset=8 + n + begin).view(shape)
    return out


# Search reads W_C (and b_C) whole and everything else by rows: start reading the former at open, and
# keep the kernel from reading (and mapping) 64-128 KiB around every row fault in the latter.
_READ_AT_OPEN = ("W_C", "b_C")


def _advise(buf: mmap.mmap, regions: list[tuple[int, int, str]]) -> None:
    if not hasattr(buf, "madvise"):
        return
    page = mmap.PAGESIZE
    for begin, end, name in regions:
        start = begin - begin % page
        if end <= start:
            continue
        advice = mmap.MADV_WILLNEED if name in _READ_AT_OPEN else getattr(mmap, "MADV_RANDOM", None)
        if advice is not None:
            with contextlib.suppress(OSError):  # advice only
                buf.madvise(advice, start, end - start)


def _read_labels(path: Path, num_labels: int) -> LabelVocab:
    from elias_retrieval.data import LabelVocab

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IndexFormatError(f"{path}: missing") from None
    except UnicodeDecodeError as e:
        raise IndexFormatError(f"{path}: not UTF-8 ({e})") from None
    lines = text.splitlines()
    try:
        rows = json.loads("[" + ",".join(lines) + "]")  # one C-speed parse
    except json.JSONDecodeError:
        for i, line in enumerate(lines, 1):
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                raise IndexFormatError(f"{path}: line {i} is not valid JSON ({e})") from None
        raise IndexFormatError(f"{path}: not JSON lines") from None
    if len(rows) != num_labels:
        raise IndexFormatError(f"{path}: {len(rows)} labels, the index has {num_labels}")
    try:
        ids = [str(r["id"]) for r in rows]
        names = [r.get("name") for r in rows]
    except (KeyError, TypeError, AttributeError):
        raise IndexFormatError(f"{path}: every line must be an object with an \"id\"") from None
    return LabelVocab(ids, names)


def index_size(path: str | Path) -> dict[str, int]:
    """Bytes per part of an index (from the safetensors header and the file list), for reports."""
    manifest = read_manifest(path)
    parts: dict[str, int] = {}
    with open(Path(path) / TENSORS, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    parts["tensors header"] = 8 + n
    for name, e in header.items():
        if name != "__metadata__":
            parts[name] = e["data_offsets"][1] - e["data_offsets"][0]
    for rel, entry in manifest["files"].items():
        if rel != TENSORS:
            top = rel.split("/", 1)[0]
            key = top if top in (ENCODER_DIR, RANKER_DIR, FEATURIZER_DIR) else rel
            parts[key] = parts.get(key, 0) + int(entry["bytes"])
    parts[MANIFEST] = (Path(path) / MANIFEST).stat().st_size
    return parts


def drop_page_cache(path: str | Path) -> None:
    """Ask the kernel to forget the cached pages of an index's files (for cold-load measurements)."""
    for f in _walk_files(Path(path)):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


__all__ = [
    "CLUSTER_DTYPES", "FORMAT_NAME", "FORMAT_VERSION", "READABLE_VERSIONS", "Index", "IndexFormatError",
    "drop_page_cache", "index_size", "is_index_dir", "quantize_int8", "read_index", "read_manifest", "verify_index",
    "write_index",
]
