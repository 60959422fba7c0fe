"""The label lifecycle of a built index: add labels, remove labels, without retraining.

Both read an index (never writing it) and write a new one with write_index (atomic, a new index_version):

- `add_labels`: each new label l gets
  - a classifier row: w_l = the normalised mean of its examples' embeddings (through the index's encoder),
    turned by `refine_steps` of logistic regression against the other new labels' examples (0: the closed
    form; bench/add_labels.py measures both), scaled to the median norm of the existing W_L rows; b_l such
    that the _OWN_QUANTILE quantile of its logits w_l . phi + b_l over its examples equals the median logit
    the existing labels give their positives among the example documents (when these name at least
    _MIN_POSITIVES existing labels; else the median logit of each example's top-1 existing label). A label
    without examples stands on its name, encoded as one example.
  - edges in A: to the `clusters_per_label` clusters with the largest mean cluster score s_c over its
    examples, each weighted like that cluster's own labels (the median weight of the home edges of the labels
    whose home is that row, label_layout.home_clusters; stage 1: 1), appended after the row's edges. Rows
    that run out of pad slots widen A for all rows (new slots padded), as `--kappa` pruning does. No existing
    edge changes: every label reachable before stays reachable, and every new label has an edge.
  - with the ELIAS++ re-ranker: a sparse row fitted as training fits the ranker's rows (squared hinge over
    the tf-idf features, trainer/reranker.train_ranker) on its examples as positives and, as hard negatives,
    the other example documents whose top `depth` in the grown index holds it, when there are at least
    _MIN_NEGATIVES of those. With fewer: its examples' mean tf-idf, cut to the median number of weights of
    the existing rows and scaled to their median norm, its bias putting the _OWN_QUANTILE margin on its
    examples at the median margin existing labels give their positives there (too few: 1, where the
    squared-hinge ranker puts its positives). A label without text examples gets an empty row with the
    margin NEUTRAL_MARGIN for every query (rank score 0.5): re-ranking neither lifts it to the top nor
    pushes it to the bottom of a list.
- `remove_labels`: the labels' rows, edges, names, counts and ranker rows are deleted (A's rows are compacted
  and A narrowed to the widest remaining row); every other label keeps its weights and edges, so searches
  score the remaining labels exactly as before.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from elias_retrieval.config import DataConfig
from elias_retrieval.data import Dataset, LabelVocab, read_documents
from elias_retrieval.index_format import (
    ENCODER_DIR,
    ENCODER_FEATURIZER,
    FEATURIZER_DIR,
    Index,
    quantize_int8,
    read_index,
    write_index,
)
from elias_retrieval.label_layout import home_clusters, in_label_order
from elias_retrieval.reranker import SparseRanker
from elias_retrieval.search import SearchTensors, cluster_logits, cluster_scores, search

DEFAULT_CLUSTERS_PER_LABEL = 3
DEFAULT_REFINE_STEPS = 200  # logistic steps turning new W_L directions against the other examples (_refined)
# The margin at which the ranker's rank score exp(-max(0, 1 - m)^3) is 0.5: "undecided".
NEUTRAL_MARGIN = 1.0 - math.log(2.0) ** (1.0 / 3.0)
_MAX_NAMED = 5  # ids named in one error message
# Calibrate on the existing labels the example documents name when they name at least this many (else top-1).
_MIN_POSITIVES = 10
# A new label's ranker row is fitted (squared hinge) when its examples give it at least this many hard negatives;
# with fewer it is the calibrated mean of its examples' tf-idf.
_MIN_NEGATIVES = 10
# The quantile of a new label's logits over its own examples that is set to the calibration target: above the
# median, since a classifier fitted to a few examples scores other documents higher than a trained one does
# (EURLEX57K, bench/add_labels.py: 0.8 instead of 0.5 keeps P@5 over all labels, at some recall of the new ones).
_OWN_QUANTILE = 0.8


class LabelChangeError(ValueError):
    """Bad input to add_labels / remove_labels; the message names the ids or the file."""


@dataclass
class Examples:
    """Example documents of new labels: raw texts or query embeddings (one of them), and each one's label ids."""

    labels: list[list[str]]
    texts: list[str] | None = None
    embeddings: Tensor | None = None  # (N, d)

    def __post_init__(self) -> None:
        if (self.texts is None) == (self.embeddings is None):
            raise LabelChangeError("examples need either texts or embeddings")
        n = len(self.texts) if self.texts is not None else self.embeddings.shape[0]  # type: ignore[union-attr]
        if n != len(self.labels):
            raise LabelChangeError(f"{n} example documents but {len(self.labels)} label lists")

    @classmethod
    def from_dataset(cls, data: Dataset) -> Examples:
        """A dataset's texts and the vocabulary ids of its labels (labels past its vocabulary are dropped)."""
        if data.texts is None:
            raise LabelChangeError("example documents must be texts (this dataset has only sparse features)")
        Y, vocab = data.known_labels(), data.vocab.ids
        return cls([[vocab[j] for j in Y.indices[Y.indptr[i]: Y.indptr[i + 1]]] for i in range(Y.shape[0])],
                   texts=list(data.texts))


@dataclass
class LabelChange:
    """What add_labels / remove_labels wrote."""

    out: Path
    index_version: str
    parent_version: str
    added: int = 0
    removed: int = 0
    num_labels: int = 0
    kappa_before: int = 0
    kappa_after: int = 0
    from_examples: int = 0  # added labels placed from example documents (the rest: from their names)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return d


# ----------------------------------------------------------------------------------------------- input files


def read_label_specs(path: str | Path) -> list[dict[str, Any]]:
    """NEW.jsonl: one {"id": ..., "name": ...} object per line ("name" optional); blank lines skipped."""
    p = Path(path)
    rows = []
    for lineno, row in _json_rows(p):
        if not isinstance(row, dict) or "id" not in row:
            raise LabelChangeError(f"{p}:{lineno}: expected an object with an \"id\" (and a \"name\")")
        rows.append(row)
    if not rows:
        raise LabelChangeError(f"{p}: no labels")
    return rows


def read_label_ids(path: str | Path) -> list[str]:
    """IDS.txt: one label id per line (surrounding white space and blank lines ignored)."""
    p = Path(path)
    ids = [line.strip() for line in _read_text(p).splitlines() if line.strip()]
    if not ids:
        raise LabelChangeError(f"{p}: no label ids")
    return ids


def read_examples(path: str | Path, index: Index, new_ids: Sequence[str]) -> Examples:
    """DOCS.jsonl in the index's dataset shape (its data config's text and label fields), or, for any index,
    rows with an "embedding" field (a list of d numbers: a query embedding) beside the label field."""
    p = Path(path)
    cfg = DataConfig(**(index.manifest.get("config") or {}).get("data", {}))
    first = next(_json_rows(p), None)
    if first is None:
        raise LabelChangeError(f"{p}: no example documents")
    if isinstance(first[1], dict) and "embedding" in first[1]:
        return _read_embedding_rows(p, cfg.label_field or "labels")
    # The index's own labels too: the scores they give the documents calibrate the new labels' biases.
    ids = list(index.labels.ids) + list(new_ids)
    return Examples.from_dataset(read_documents(p, cfg, LabelVocab(ids, [None] * len(ids))))


def _read_embedding_rows(p: Path, label_field: str) -> Examples:
    rows, labels = [], []
    for lineno, row in _json_rows(p):
        emb, labs = (row.get("embedding"), row.get(label_field)) if isinstance(row, dict) else (None, None)
        if not isinstance(emb, list) or not all(isinstance(x, (int, float)) for x in emb):
            raise LabelChangeError(f"{p}:{lineno}: \"embedding\" must be a list of numbers")
        if not isinstance(labs, list) or not all(isinstance(x, (str, int)) for x in labs):
            raise LabelChangeError(f"{p}:{lineno}: {label_field!r} must be a list of label ids")
        if rows and len(emb) != len(rows[0]):
            raise LabelChangeError(f"{p}:{lineno}: embedding of dimension {len(emb)}, the first row's is "
                                   f"{len(rows[0])}")
        rows.append(emb)
        labels.append([str(x) for x in labs])
    return Examples(labels, embeddings=torch.tensor(rows, dtype=torch.float32))


def _json_rows(p: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSON-lines file; an error names a bad line."""
    for lineno, line in enumerate(_read_text(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise LabelChangeError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LabelChangeError(f"{p}: no such file") from None
    except UnicodeDecodeError as e:
        raise LabelChangeError(f"{p}: not UTF-8 ({e.reason})") from None


# ----------------------------------------------------------------------------------------------- adding


def add_labels(
    index_dir: str | Path,
    out_dir: str | Path,
    labels: Sequence[Mapping[str, Any]],
    examples: Examples | Dataset | str | Path | None = None,
    clusters_per_label: int = DEFAULT_CLUSTERS_PER_LABEL,
    progress: bool = False,
    refine_steps: int = DEFAULT_REFINE_STEPS,
) -> LabelChange:
    """Write `index_dir` with `labels` ({"id", "name"} each) added at `out_dir` (see the module docstring).

    `examples`: documents naming new labels in their label field (an `Examples`, a `Dataset`, or the path of a
    JSON-lines file, read_examples); a label with none is placed from its name through the index's encoder.
    """
    index_dir, out_dir = Path(index_dir), Path(out_dir)
    _check_out(index_dir, out_dir)
    if clusters_per_label < 1:
        raise LabelChangeError(f"clusters per label must be at least 1, got {clusters_per_label}")
    index = read_index(index_dir)
    vocab = index.labels
    new_ids, new_names = _parse_specs(labels, vocab)
    if isinstance(examples, (str, Path)):
        examples = read_examples(examples, index, new_ids)
    elif isinstance(examples, Dataset):
        examples = Examples.from_dataset(examples)
    members = _members(examples, new_ids)
    if unnamed := [i for i, m, n in zip(new_ids, members, new_names, strict=True) if not m and not n]:
        raise LabelChangeError(f"labels without example documents need a name: {_some(unnamed)}")

    t = in_label_order(index.tensors)  # row l = label l, A_ids are label ids (pad = L)
    L, d = t.num_labels, t.dim
    emb, anchors = _anchor_embeddings(index, examples, members, new_ids, new_names, d)
    positives = _old_positives(examples if any(members) else None, vocab)  # rows of `emb` only when encoded
    W_new, b_new = _label_rows(t, emb, anchors, index.defaults, positives, refine_steps)
    clusters = _best_clusters(t, emb, anchors, min(clusters_per_label, t.num_clusters))
    A_ids, A_w = _attach(t.A_ids.long(), t.A_weights.float(), L, clusters)
    W_L, W_L_scale = _append_rows(t.W_L, t.W_L_scale, W_new)
    n = len(new_ids)
    grown = dataclasses.replace(t, A_ids=A_ids, A_weights=A_w, W_L=W_L, W_L_scale=W_L_scale,
                                b_L=torch.cat([t.b_L.float(), b_new]), row_labels=None)
    counts = index.train_label_counts
    if counts is not None:
        counts = torch.cat([counts.long(), torch.tensor([len(m) for m in members], dtype=torch.long)])
    ranker = index.load_ranker()
    if ranker is not None:
        ranker = _grow_ranker(ranker, index, examples, members, positives, grown, emb)
    new_vocab = LabelVocab(list(vocab.ids) + new_ids, list(vocab.names) + new_names)
    change = LabelChange(out_dir, "", str(index.manifest.get("index_version", "")), added=n, num_labels=L + n,
                         kappa_before=int(t.A_ids.shape[1]), kappa_after=int(A_ids.shape[1]),
                         from_examples=sum(1 for m in members if m))
    return _write(index, out_dir, grown, new_vocab, counts, ranker, change, progress)


def _parse_specs(labels: Sequence[Mapping[str, Any]], vocab: LabelVocab) -> tuple[list[str], list[str | None]]:
    ids, names = [], []
    for i, row in enumerate(labels):
        if not isinstance(row, Mapping) or not isinstance(row.get("id"), (str, int)) or str(row["id"]).strip() == "":
            raise LabelChangeError(f"label {i + 1}: expected {{\"id\": <non-empty id>, \"name\": ...}}, got {row!r}")
        name = row.get("name")
        if name is not None and not isinstance(name, str):
            raise LabelChangeError(f"label {row['id']!r}: \"name\" must be a string")
        ids.append(str(row["id"]))
        names.append(name.strip() or None if name is not None else None)
    if not ids:
        raise LabelChangeError("no labels to add")
    seen: set[str] = set()
    if dup := sorted({i for i in ids if i in seen or seen.add(i)}):  # type: ignore[func-returns-value]
        raise LabelChangeError(f"label ids given more than once: {_some(dup)}")
    known = vocab.index()
    if exist := [i for i in ids if i in known]:
        raise LabelChangeError(f"label ids already in the index: {_some(exist)}")
    return ids, names


def _members(examples: Examples | None, new_ids: list[str]) -> list[list[int]]:
    """For each new label, the rows of `examples` that name it."""
    col = {label: j for j, label in enumerate(new_ids)}
    out: list[list[int]] = [[] for _ in new_ids]
    for i, labs in enumerate(examples.labels if examples is not None else []):
        for j in {col[x] for x in labs if x in col}:
            out[j].append(i)
    return out


def _anchor_embeddings(index: Index, examples: Examples | None, members: list[list[int]], new_ids: list[str],
                       new_names: list[str | None], d: int) -> tuple[Tensor, list[list[int]]]:
    """(M, d) embeddings (example documents, then the names of labels without examples) and each new label's rows."""
    rows = [list(m) for m in members]
    by_name = [j for j, m in enumerate(members) if not m]
    texts = [new_names[j] or "" for j in by_name]
    parts = []
    if examples is not None and any(members):
        if examples.embeddings is not None:
            if examples.embeddings.dim() != 2 or examples.embeddings.shape[1] != d:
                raise LabelChangeError(f"example embeddings have dimension {examples.embeddings.shape[-1]}, "
                                       f"the index's is {d}")
            parts.append(examples.embeddings.float())
        else:
            parts.append(_encode(index, examples.texts or [], "example documents"))
    offset = parts[0].shape[0] if parts else 0
    if texts:
        named = _some([new_ids[j] for j in by_name])
        parts.append(_encode(index, texts, f"label names (labels without examples: {named})"))
        for k, j in enumerate(by_name):
            rows[j] = [offset + k]
    emb = torch.cat(parts) if parts else torch.zeros(0, d)
    if not bool(torch.isfinite(emb).all()):
        raise LabelChangeError("example embeddings must be finite (no NaN or inf)")
    return emb, rows


def _encode(index: Index, texts: list[str], what: str) -> Tensor:
    kind = index.manifest.get("encoder")
    if kind is None:
        raise LabelChangeError(f"{index.path}: the index has no encoder (embedding queries only), so {what} cannot "
                               "be encoded: give example documents with an \"embedding\" field")
    encoder = index.load_encoder()
    assert encoder is not None
    if getattr(getattr(encoder, "featurizer", None), "kind", "text") != "text":
        raise LabelChangeError(f"{index.path}: the index's encoder takes given sparse features, not text, so {what} "
                               "cannot be encoded: give example documents with an \"embedding\" field")
    return encoder.encode(texts).float()


@torch.no_grad()
def _old_positives(examples: Examples | None, vocab: LabelVocab) -> tuple[np.ndarray, np.ndarray]:
    """(example row, label id) of every existing label an example document names."""
    known = vocab.index()
    pairs = [(i, known[x]) for i, labs in enumerate(examples.labels if examples is not None else [])
             for x in labs if x in known]
    arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def _label_rows(
    t: SearchTensors, emb: Tensor, anchors: list[list[int]], defaults: dict[str, int],
    positives: tuple[np.ndarray, np.ndarray], refine_steps: int,
) -> tuple[Tensor, Tensor]:
    """(n, d) new W_L rows and (n,) biases (module docstring)."""
    norms = torch.cat([_fp32_rows(t, a, min(t.num_labels, a + 65536)).norm(dim=1)
                       for a in range(0, t.num_labels, 65536)])
    scale = float(norms.median()) if norms.numel() else 1.0
    rows, labels = (torch.from_numpy(a) for a in positives)
    if len(rows) >= _MIN_POSITIVES:  # the median logit existing labels give their positives among the examples
        W_pos = t.W_L.index_select(0, labels).float()
        if t.W_L_scale is not None:
            W_pos = W_pos * t.W_L_scale.float().index_select(0, labels).unsqueeze(1)
        target = float(((emb[rows] * W_pos).sum(1) + t.b_L.float()[labels]).median())
    else:
        target = _top_logit(t, emb, defaults)
    U = torch.stack([torch.nn.functional.normalize(emb[r].mean(0), dim=0) for r in anchors])
    W = _refined(U, emb, anchors, refine_steps) * scale
    b = torch.stack([target - (emb[r] @ w).quantile(_OWN_QUANTILE) for r, w in zip(anchors, W, strict=True)])
    return W, b.float()


def _refined(U: Tensor, emb: Tensor, anchors: list[list[int]], steps: int, lr: float = 0.01) -> Tensor:
    """Unit directions `U` after `steps` of full-batch logistic regression on the anchors' cosine features:
    each label's anchors positive (weighted to balance), every other anchor negative; a scale and an offset per
    label are fitted alongside. Labels with no negatives keep their direction."""
    n = U.shape[0]
    Y = torch.zeros(emb.shape[0], n)
    for j, r in enumerate(anchors):
        Y[r, j] = 1.0
    pos, neg = Y.sum(0), (1 - Y).sum(0)
    if steps <= 0 or not bool((neg > 0).any()):
        return U
    x = torch.nn.functional.normalize(emb, dim=1)
    u = U.clone().requires_grad_(True)
    a = torch.full((n,), 10.0, requires_grad=True)
    c = torch.zeros(n, requires_grad=True)
    with torch.enable_grad():
        opt = torch.optim.Adam([u, a, c], lr=lr)
        weight = (neg / pos.clamp(min=1)).clamp(max=100.0)
        for _ in range(steps):
            z = x @ torch.nn.functional.normalize(u, dim=1).T * a + c
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z, Y, pos_weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    out = torch.nn.functional.normalize(u.detach(), dim=1)
    return torch.where((neg > 0).unsqueeze(1), out, U)


def _top_logit(t: SearchTensors, emb: Tensor, defaults: dict[str, int]) -> float:
    """The median, over the anchor embeddings, of the logit of the label each one's search puts first."""
    r = search(emb, t, k=1, beam_size=int(defaults["beam_size"]), shortlist_size=int(defaults["shortlist_size"]))
    p = r.label_prob[:, 0][r.ids[:, 0] >= 0].double().clamp(1e-6, 1 - 1e-6)
    return float(torch.log(p / (1 - p)).median()) if p.numel() else 0.0


def _fp32_rows(t: SearchTensors, a: int, b: int) -> Tensor:
    w = t.W_L[a:b].float()
    return w if t.W_L_scale is None else w * t.W_L_scale[a:b].float().unsqueeze(1)


@torch.no_grad()
def _best_clusters(t: SearchTensors, emb: Tensor, anchors: list[list[int]], n: int) -> Tensor:
    """(labels, n) the clusters with the largest mean cluster score over each label's anchors."""
    s = cluster_scores(cluster_logits(emb, dataclasses.replace(t, W_C_packed=None)), t.alpha)
    mean = torch.stack([s[r].mean(0) for r in anchors])
    return torch.topk(mean, n, dim=1).indices


def _attach(A_ids: Tensor, A_w: Tensor, L: int, clusters: Tensor) -> tuple[Tensor, Tensor]:
    """A with new labels L, L+1, ... appended to the rows `clusters` names (pad id L -> the new L)."""
    n = clusters.shape[0]
    C, kappa = A_ids.shape
    pad = A_ids == L
    used = (~pad).sum(1)
    weights = _home_edge_weights(A_ids, A_w, L)
    extra = torch.bincount(clusters.reshape(-1), minlength=C)
    width = max(kappa, int((used + extra).max()))
    ids = torch.full((C, width), L + n, dtype=torch.long)
    w = torch.zeros(C, width, dtype=torch.float32)
    # Existing edges first, in their order (a row's pads may sit anywhere: keep edges, drop pads).
    order = torch.sort(pad.int(), dim=1, stable=True).indices
    ids[:, :kappa] = torch.where(pad, L + n, A_ids).gather(1, order)
    w[:, :kappa] = A_w.masked_fill(pad, 0.0).gather(1, order)
    fill = used.clone()
    for label, row in enumerate(clusters.tolist()):
        for c in row:
            ids[c, fill[c]] = L + label
            w[c, fill[c]] = weights[c]
            fill[c] += 1
    return ids, w


def _home_edge_weights(A_ids: Tensor, A_w: Tensor, L: int) -> Tensor:
    """(C,) per cluster: the median weight of the labels whose home it is on their home edge (their best edge;
    label_layout.home_clusters). A cluster that is no label's home: the median over all labels' best edges."""
    C = A_ids.shape[0]
    flat_ids = A_ids.reshape(-1)
    best = torch.full((L + 1,), -1.0).scatter_reduce_(0, flat_ids, A_w.reshape(-1), "amax")[:L]
    home = home_clusters(A_ids, A_w, L)
    held = home < C
    fallback = float(best[held].median()) if bool(held.any()) else 1.0
    out = torch.full((C,), fallback)
    for c, w in zip(*_group(home[held], best[held]), strict=True):
        out[c] = w
    return out


def _group(keys: Tensor, values: Tensor) -> tuple[list[int], list[float]]:
    """Distinct keys and the median of the values of each."""
    order = torch.argsort(keys, stable=True)
    keys, values = keys[order], values[order]
    uniq, counts = torch.unique_consecutive(keys, return_counts=True)
    return uniq.tolist(), [float(v.median()) for v in torch.split(values, counts.tolist())]


def _append_rows(W_L: Tensor, scale: Tensor | None, new: Tensor) -> tuple[Tensor, Tensor | None]:
    """W_L (and its int8 scales) with fp32 rows `new` appended in W_L's storage."""
    if W_L.dtype == torch.int8:
        q, s = quantize_int8(new)
        assert scale is not None
        return torch.cat([W_L, q]), torch.cat([scale.float(), s])
    return torch.cat([W_L, new.to(W_L.dtype)]), scale


@torch.no_grad()
def _new_label_shortlists(grown: SearchTensors, emb: Tensor, num_old: int, depth: int,
                          defaults: dict[str, int]) -> np.ndarray:
    """(M, depth) each example document's new labels among its top `depth` in the grown index, as new-label
    numbers (0 = the first new label), -1 elsewhere: the hard negatives the ranker rows are fitted against."""
    if emb.shape[0] == 0:
        return np.full((0, depth), -1, dtype=np.int64)
    r = search(emb, grown, k=depth, beam_size=int(defaults["beam_size"]),
               shortlist_size=int(defaults["shortlist_size"]))
    ids = r.ids.numpy().astype(np.int64)
    return np.where(ids >= num_old, ids - num_old, -1)


def _grow_ranker(ranker: SparseRanker, index: Index, examples: Examples | None, members: list[list[int]],
                 positives: tuple[np.ndarray, np.ndarray], grown: SearchTensors, emb: Tensor) -> SparseRanker:
    """The ranker with a row per new label (module docstring); `emb` starts with the example documents' rows."""
    W = ranker.W.tocsr()
    F = W.shape[1]
    nnz = np.diff(W.indptr)
    row_norms = np.sqrt(np.asarray(W.multiply(W).sum(1)).ravel())
    keep_nnz = int(np.median(nnz[nnz > 0])) if (nnz > 0).any() else 0
    norm = float(np.median(row_norms[nnz > 0])) if (nnz > 0).any() else 1.0
    featurizer = index.load_featurizer()
    X = None
    if examples is not None and examples.texts is not None and featurizer is not None and any(members):
        X = featurizer.transform(list(examples.texts)).tocsr()
    fitted: dict[int, tuple[sp.csr_matrix, float]] = {}
    if X is not None:
        shortlists = _new_label_shortlists(grown, emb[: X.shape[0]], ranker.W.shape[0], ranker.depth, index.defaults)
        fitted = _fitted_rows(X, members, shortlists, float(np.abs(W.data).min()) if W.nnz else 0.0)
    target = 1.0  # where the squared-hinge ranker puts its positives ...
    pos_rows, pos_labels = positives
    if X is not None and len(pos_rows) >= _MIN_POSITIVES:  # ... or the median margin they get in the examples
        target = float(np.median(np.asarray(X[pos_rows].multiply(W[pos_labels]).sum(1)).ravel()
                                 + ranker.bias[pos_labels]))
    rows, bias = [], []
    for j, m in enumerate(members):
        if j in fitted:
            rows.append(fitted[j][0])
            bias.append(fitted[j][1])
            continue
        if X is None or not m or keep_nnz == 0:
            rows.append(sp.csr_matrix((1, F), dtype=np.float32))
            bias.append(NEUTRAL_MARGIN)
            continue
        mean = np.asarray(X[m].mean(0)).ravel()
        top = np.argsort(-np.abs(mean))[:keep_nnz]
        top = top[mean[top] != 0]
        v = mean[top] / max(float(np.linalg.norm(mean[top])), 1e-12) * norm
        row = sp.csr_matrix((v.astype(np.float32), (np.zeros(len(top), int), top)), shape=(1, F))
        rows.append(row)
        bias.append(target - float(np.quantile((X[m] @ row.T).toarray().ravel(), _OWN_QUANTILE)))
    W_new = sp.vstack([W, *rows], format="csr", dtype=np.float32)
    W_new.sort_indices()
    return SparseRanker(W_new, np.concatenate([ranker.bias, np.asarray(bias, np.float32)]).astype(np.float32),
                        ranker.fusion_weight, ranker.depth)


def _fitted_rows(X: sp.csr_matrix, members: list[list[int]], shortlists: np.ndarray, threshold: float
                 ) -> dict[int, tuple[sp.csr_matrix, float]]:
    """Ranker rows fitted as training fits them (trainer/reranker.train_ranker: squared hinge, C = 1, pruned at
    the existing rows' smallest weight) on the example documents, for the new labels with at least
    _MIN_NEGATIVES hard negatives among them (documents whose grown-index top `depth` holds the label)."""
    from trainer.reranker import candidates, train_ranker

    n = len(members)
    rows = np.asarray([i for m in members for i in m], dtype=np.int64)
    cols = np.repeat(np.arange(n), [len(m) for m in members])
    Y = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(X.shape[0], n))
    cand = candidates(Y, shortlists)
    negatives = np.bincount(np.repeat(np.arange(n), np.diff(cand.indptr))[cand.data == 1], minlength=n)
    ok = [j for j in range(n) if members[j] and negatives[j] >= _MIN_NEGATIVES]
    if not ok:
        return {}
    ranker = train_ranker(X, Y, shortlists, 1.0, threshold, n_jobs=max(1, torch.get_num_threads()))
    return {j: (ranker.W[j], float(ranker.bias[j])) for j in ok}


# ----------------------------------------------------------------------------------------------- removing


def remove_labels(
    index_dir: str | Path, out_dir: str | Path, ids: Sequence[str], progress: bool = False
) -> LabelChange:
    """Write `index_dir` without the labels `ids` (dataset label ids) at `out_dir` (see the module docstring)."""
    index_dir, out_dir = Path(index_dir), Path(out_dir)
    _check_out(index_dir, out_dir)
    index = read_index(index_dir)
    vocab = index.labels
    ids = [str(i) for i in ids]
    if not ids:
        raise LabelChangeError("no label ids to remove")
    known = vocab.index()
    if unknown := [i for i in dict.fromkeys(ids) if i not in known]:
        raise LabelChangeError(f"label ids not in the index: {_some(unknown)}")
    t = in_label_order(index.tensors)
    L = t.num_labels
    gone = torch.zeros(L, dtype=torch.bool)
    gone[torch.tensor([known[i] for i in ids])] = True
    if bool(gone.all()):
        raise LabelChangeError("cannot remove every label of the index")
    keep = torch.nonzero(~gone).squeeze(1)
    L2 = keep.numel()
    new_id = torch.full((L + 1,), L2, dtype=torch.long)  # removed labels and the pad id -> the new pad id
    new_id[keep] = torch.arange(L2)
    A_ids = new_id.index_select(0, t.A_ids.long().reshape(-1)).view(t.A_ids.shape)
    pad = A_ids == L2
    order = torch.sort(pad.int(), dim=1, stable=True).indices  # each row's kept edges first, in their order
    width = max(1, int((~pad).sum(1).max()))
    A_ids = A_ids.gather(1, order)[:, :width]
    A_w = t.A_weights.float().masked_fill(pad, 0.0).gather(1, order)[:, :width]
    shrunk = dataclasses.replace(
        t, A_ids=A_ids, A_weights=A_w, W_L=t.W_L.index_select(0, keep), b_L=t.b_L.float().index_select(0, keep),
        W_L_scale=None if t.W_L_scale is None else t.W_L_scale.index_select(0, keep), row_labels=None)
    counts = None if index.train_label_counts is None else index.train_label_counts.index_select(0, keep)
    ranker = index.load_ranker()
    if ranker is not None:
        k = keep.numpy()
        ranker = SparseRanker(ranker.W.tocsr()[k], ranker.bias[k].astype(np.float32), ranker.fusion_weight,
                              ranker.depth)
    kept = keep.tolist()
    new_vocab = LabelVocab([vocab.ids[i] for i in kept], [vocab.names[i] for i in kept])
    change = LabelChange(out_dir, "", str(index.manifest.get("index_version", "")), removed=L - L2, num_labels=L2,
                         kappa_before=int(t.A_ids.shape[1]), kappa_after=width)
    return _write(index, out_dir, shrunk, new_vocab, counts, ranker, change, progress)


# ----------------------------------------------------------------------------------------------- writing


def _check_out(index_dir: Path, out_dir: Path) -> None:
    if out_dir.resolve() == index_dir.resolve():
        raise LabelChangeError(f"{out_dir}: the new index must go to another directory (the input is never modified)")


def _write(index: Index, out: Path, t: SearchTensors, vocab: LabelVocab, counts: Tensor | None,
           ranker: SparseRanker | None, change: LabelChange, progress: bool) -> LabelChange:
    m = index.manifest
    meta = {k: v for k, v in m.items() if k in ("config", "num_train", "source", "pruning")}
    history = list(m.get("label_changes") or [])
    history.append({"parent": change.parent_version, "added": change.added, "removed": change.removed})
    meta["label_changes"] = history
    encoder_dir = index.path / ENCODER_DIR if m.get("encoder") is not None else None
    with tempfile.TemporaryDirectory(prefix="elias-ranker-") as tmp:
        ranker_dir = featurizer_dir = None
        if ranker is not None:
            ranker_dir = Path(tmp) / "ranker"
            ranker.save(ranker_dir)
            if m["reranker"]["featurizer"] != ENCODER_FEATURIZER:
                featurizer_dir = index.path / FEATURIZER_DIR
        write_index(out, t, vocab, encoder_dir, dtype=m["label_weights"], defaults=index.defaults, meta=meta,
                    progress=progress, train_label_counts=counts, ranker_dir=ranker_dir,
                    featurizer_dir=featurizer_dir, cluster_layout=m.get("label_order") == "clusters")
    change.index_version = json.loads((out / "manifest.json").read_text())["index_version"]
    return change


def unreachable_labels(t: SearchTensors) -> Tensor:
    """Label ids (int64) that no row of A holds: search can never return them."""
    L = t.num_labels
    held = torch.zeros(L + 1, dtype=torch.bool)
    held[t.A_ids.long().reshape(-1)] = True
    return t.labels_of(torch.nonzero(~held[:L]).squeeze(1))


def _some(ids: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:_MAX_NAMED])
    return shown + (f" and {len(ids) - _MAX_NAMED} more" if len(ids) > _MAX_NAMED else "")
