"""Dataset readers: JSON lines with raw text, the Extreme Classification Repository BoW format, scipy .npz.

A dataset is a directory holding `train.*`, `test.*` and optionally `dev.*`. Labels become dense ids
through a `LabelVocab` built on the train split and saved with the model; labels of another split that
the vocabulary lacks get extra columns, so they count against recall (a model never predicts them).
"""

from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from elias_retrieval.atomic import write_jsonl
from elias_retrieval.config import DataConfig
from elias_retrieval.dataset_fields import resolve_data_config

SPLITS = ("train", "dev", "test")
_TEXT_SUFFIXES = (".jsonl", ".jsonl.gz")
_XC_SUFFIXES = (".txt", ".txt.gz")


class DataFormatError(ValueError):
    """A dataset file is missing or malformed; the message names the file, the line and the problem."""



@dataclass
class LabelVocab:
    """Dense label id -> the dataset's label id (string) and a name where known."""

    ids: list[str]
    names: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.names:
            self.names = [None] * len(self.ids)
        self._index: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {label: i for i, label in enumerate(self.ids)}
        return self._index

    def save(self, path: str | Path) -> None:
        write_jsonl(path, [{"id": i, "name": n} for i, n in zip(self.ids, self.names, strict=True)])

    @classmethod
    def load(cls, path: str | Path) -> LabelVocab:
        ids, names = [], []
        for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            try:
                row = json.loads(line)
                ids.append(str(row["id"]))
                names.append(row.get("name"))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataFormatError(f"{path}:{lineno}: expected an object with an 'id' ({e})") from e
        return cls(ids, names)


@dataclass
class Dataset:
    """One split: raw texts or given sparse features, and the (N, L_total) binary label matrix."""

    texts: list[str] | None
    features: sp.csr_matrix | None
    labels: sp.csr_matrix
    vocab: LabelVocab
    ids: list[str] | None = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    def empty_rows(self) -> np.ndarray:
        """Rows whose document has no text (none for sparse features: a row without features still is a point)."""
        if self.texts is None:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero([not t.strip() for t in self.texts])

    @property
    def num_labels(self) -> int:
        return len(self.vocab)

    def known_labels(self) -> sp.csr_matrix:
        """Labels restricted to the vocabulary's columns."""
        return self.labels[:, : self.num_labels].tocsr()

    def subset(self, rows: np.ndarray) -> Dataset:
        rows = np.asarray(rows)
        return Dataset(
            texts=[self.texts[i] for i in rows] if self.texts is not None else None,
            features=self.features[rows] if self.features is not None else None,
            labels=self.labels[rows],
            vocab=self.vocab,
            ids=[self.ids[i] for i in rows] if self.ids is not None else None,
        )


def _candidates(dataset_dir: Path, split: str) -> list[Path]:
    return [dataset_dir / f"{split}{s}" for s in (*_TEXT_SUFFIXES, *_XC_SUFFIXES, ".X.npz")]


def find_split(dataset_dir: str | Path, split: str) -> Path:
    """The file holding `split` in `dataset_dir` (for .npz: the features file `{split}.X.npz`)."""
    d = Path(dataset_dir)
    if not d.is_dir():
        raise DataFormatError(f"{d}: dataset directory not found")
    for p in _candidates(d, split):
        if p.is_file():
            return p
    looked = ", ".join(p.name for p in _candidates(d, split))
    raise DataFormatError(f"{d}: no {split} split (looked for {looked})")


def has_split(dataset_dir: str | Path, split: str) -> bool:
    return any(p.is_file() for p in _candidates(Path(dataset_dir), split))


def open_text(path: Path) -> io.TextIOBase:
    """A text file, gunzipped when it starts with gzip's magic bytes (whatever its suffix)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _label_names(dataset_dir: Path) -> dict[str, str]:
    for name in ("labels.jsonl", "labels.jsonl.gz"):
        p = dataset_dir / name
        if p.is_file():
            out = {}
            with open_text(p) as f:
                for lineno, line in enumerate(f, 1):
                    try:
                        row = json.loads(line)
                        out[str(row["id"])] = row.get("name")
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise DataFormatError(f"{p}:{lineno}: expected an object with an 'id' ({e})") from e
            return out
    return {}


def _label_matrix(rows: list[list[str]], vocab: LabelVocab) -> sp.csr_matrix:
    """Binary (N, len(vocab) + unseen) matrix; unseen labels get columns past the vocabulary."""
    index = vocab.index()
    extra: dict[str, int] = {}
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    cols: list[int] = []
    for i, labels in enumerate(rows):
        seen = set()
        for lab in labels:
            j = index.get(lab)
            if j is None:
                j = len(index) + extra.setdefault(lab, len(extra))
            if j not in seen:
                seen.add(j)
                cols.append(j)
        indptr[i + 1] = len(cols)
    indices = np.asarray(cols, dtype=np.int32)
    Y = sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, indptr),
                      shape=(len(rows), len(index) + len(extra)))
    Y.sort_indices()
    return Y


def _read_jsonl(path: Path, cfg: DataConfig, vocab: LabelVocab | None, max_rows: int) -> Dataset:
    texts: list[str] = []
    labels: list[list[str]] = []
    ids: list[str] = []
    fields: Counter[str] = Counter()
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if max_rows and len(texts) >= max_rows:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise DataFormatError(f"{path}:{lineno}: expected a JSON object")
            fields.update(row.keys())
            if cfg.label_field not in row:
                raise DataFormatError(f"{path}:{lineno}: no {cfg.label_field!r} field; the row has fields "
                                      f"{', '.join(row) or 'none'} (set data.label_field)")
            labs = row[cfg.label_field]
            if not isinstance(labs, list) or not all(isinstance(x, (str, int)) for x in labs):
                raise DataFormatError(f"{path}:{lineno}: {cfg.label_field!r} must be a list of strings or integers")
            parts = []
            for name in cfg.text_fields:
                v = row.get(name)
                if isinstance(v, list):
                    v = "\n".join(x for x in v if isinstance(x, str))
                if isinstance(v, str) and v:
                    parts.append(v)
            text = "\n".join(parts)
            texts.append(text[: cfg.max_chars] if cfg.max_chars else text)
            labels.append([str(x) for x in labs])
            ids.append(str(row.get("id", lineno)))
    # A field no row has is a wrong setting; other splits only need one of them (a small test split may lack one).
    missing = [name for name in cfg.text_fields if not fields[name]]
    if texts and missing and (vocab is None or len(missing) == len(cfg.text_fields)):
        raise DataFormatError(f"{path}: no row has the text field {missing[0]!r}; the rows have fields "
                              f"{', '.join(sorted(fields))} (set data.text_fields, or name them in dataset.json)")
    if vocab is None:
        names = _label_names(path.parent)
        uniq = sorted({lab for labs in labels for lab in labs})
        vocab = LabelVocab(uniq, [names.get(u) for u in uniq])
    return Dataset(texts, None, _label_matrix(labels, vocab), vocab, ids)


def _xc_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open_text(path) as f:
        yield from enumerate(f, 1)


def _first_bad(tokens: list[str], parse: type) -> str:
    for x in tokens:
        try:
            parse(x)
        except ValueError:
            return x
    return tokens[0] if tokens else ""


def _ints(tokens: list[str], path: Path, lineno: int, what: str) -> list[int]:
    """Parse integer ids; the error names the first token that is not one."""
    try:
        return [int(x) for x in tokens]
    except ValueError:
        bad = _first_bad(tokens, int)
        raise DataFormatError(f"{path}:{lineno}: {what} id {bad!r} is not an integer") from None


def _read_xc(path: Path, vocab: LabelVocab | None, max_rows: int) -> Dataset:
    lines = _xc_lines(path)
    try:
        _, header = next(lines)
    except StopIteration:
        raise DataFormatError(f"{path}:1: empty file, expected a header 'num_points num_features num_labels'") from None
    parts = header.split()
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise DataFormatError(f"{path}:1: bad header {header.strip()!r}, expected 'num_points num_features num_labels'")
    N, F, L = map(int, parts)
    n = min(N, max_rows) if max_rows else N
    lab_ptr, lab_idx = [0], []
    feat_ptr, feat_idx, feat_val = [0], [], []
    count = 0
    for lineno, line in lines:
        if count >= n:
            if max_rows:
                break
            if line.strip():
                raise DataFormatError(f"{path}:{lineno}: more rows than the header's {N}")
            continue
        line = line.rstrip("\r\n")
        if not line:
            raise DataFormatError(f"{path}:{lineno}: empty line (a point with no labels starts with a space)")
        first, _, rest = line.partition(" ")
        labs = _ints(first.split(",") if first else [], path, lineno, "label")
        if labs and (min(labs) < 0 or max(labs) >= L):
            bad = next(x for x in labs if x < 0 or x >= L)
            raise DataFormatError(f"{path}:{lineno}: label id {bad} out of range [0, {L})")
        fi_tok, fv_tok = [], []
        for tok in rest.split():
            f_id, sep, f_val = tok.partition(":")
            if not sep:
                raise DataFormatError(f"{path}:{lineno}: feature {tok!r} is not an 'id:value' pair")
            fi_tok.append(f_id)
            fv_tok.append(f_val)
        fi = _ints(fi_tok, path, lineno, "feature")
        try:
            fv = [float(v) for v in fv_tok]
        except ValueError:
            bad = _first_bad(fv_tok, float)
            raise DataFormatError(f"{path}:{lineno}: feature value {bad!r} is not a number") from None
        if fi and (min(fi) < 0 or max(fi) >= F):
            bad = next(x for x in fi if x < 0 or x >= F)
            raise DataFormatError(f"{path}:{lineno}: feature id {bad} out of range [0, {F})")
        lab_idx += labs
        lab_ptr.append(len(lab_idx))
        feat_idx += fi
        feat_val += fv
        feat_ptr.append(len(feat_idx))
        count += 1
    if count < n:
        raise DataFormatError(f"{path}: the header says {N} rows, found {count}")
    X = sp.csr_matrix((np.asarray(feat_val, np.float32), np.asarray(feat_idx, np.int32), np.asarray(feat_ptr)),
                      shape=(count, F))
    X.sum_duplicates()
    X.sort_indices()
    Y = sp.csr_matrix((np.ones(len(lab_idx), np.float32), np.asarray(lab_idx, np.int32), np.asarray(lab_ptr)),
                      shape=(count, L))
    Y.sum_duplicates()
    Y.data[:] = 1.0
    return _with_vocab(X, Y, vocab)


def _with_vocab(X: sp.csr_matrix, Y: sp.csr_matrix, vocab: LabelVocab | None) -> Dataset:
    identity = [str(i) for i in range(Y.shape[1])]
    if vocab is None or vocab.ids == identity:
        return Dataset(None, X, Y.tocsr(), vocab or LabelVocab(identity))
    # Integer labels under another vocabulary: map through it so that evaluation matches training.
    rows = [[str(j) for j in Y.indices[Y.indptr[i]: Y.indptr[i + 1]]] for i in range(Y.shape[0])]
    return Dataset(None, X, _label_matrix(rows, vocab), vocab)


def _read_npz(path: Path, vocab: LabelVocab | None, max_rows: int) -> Dataset:
    y_path = path.with_name(path.name.replace(".X.npz", ".Y.npz"))
    if not y_path.is_file():
        raise DataFormatError(f"{path}: no matching labels file {y_path.name}")
    try:
        X = sp.load_npz(path).tocsr().astype(np.float32)
        Y = sp.load_npz(y_path).tocsr().astype(np.float32)
    except (ValueError, OSError) as e:
        raise DataFormatError(f"{path}: not a scipy sparse .npz file ({e})") from e
    if X.shape[0] != Y.shape[0]:
        raise DataFormatError(f"{y_path}: {Y.shape[0]} rows, but {path.name} has {X.shape[0]}")
    if max_rows:
        X, Y = X[:max_rows], Y[:max_rows]
    Y.data[:] = 1.0
    return _with_vocab(X, Y, vocab)


def dataset_data_config(dataset_dir: str | Path, cfg: DataConfig) -> DataConfig:
    """`cfg` with the text and label fields it leaves unset decided for this dataset (JSON lines: its
    dataset.json, else the common field names in the train split's rows; other formats have no fields)."""
    path = find_split(dataset_dir, "train")
    if path.name.endswith(_TEXT_SUFFIXES) and not (cfg.text_fields and cfg.label_field):
        return resolve_data_config(dataset_dir, cfg, path)
    return cfg


def read_split(
    dataset_dir: str | Path, split: str, data_cfg: DataConfig | None = None, vocab: LabelVocab | None = None,
    max_rows: int = 0,
) -> Dataset:
    """Read one split (at most `max_rows` rows when > 0).

    JSON lines are read with `data_cfg`'s text and label fields, those it leaves unset decided by
    `dataset_fields.resolve_data_config` (the dataset's `dataset.json`, else the common field names found in the
    rows). Without `vocab` (the train split) the label vocabulary is built from the split: the sorted label ids
    of JSON lines, or all `L` ids the XC / .npz file declares. Labels outside a given `vocab` get extra
    columns past it. Raises `DataFormatError` naming the file, line and problem.
    """
    cfg = data_cfg or DataConfig()
    path = find_split(dataset_dir, split)
    name = path.name
    if name.endswith(_TEXT_SUFFIXES):
        if not (cfg.text_fields and cfg.label_field):
            cfg = resolve_data_config(dataset_dir, cfg, path)
        return _read_jsonl(path, cfg, vocab, max_rows)
    if name.endswith(_XC_SUFFIXES):
        return _read_xc(path, vocab, max_rows)
    return _read_npz(path, vocab, max_rows)


def read_documents(path: str | Path, data_cfg: DataConfig | None, vocab: LabelVocab) -> Dataset:
    """Read one JSON-lines file of documents (not a dataset directory) in a dataset's shape: `data_cfg`'s text
    and label fields, those it leaves unset decided from the file's own rows (dataset_fields). Labels outside
    `vocab` get extra columns past it. Raises `DataFormatError` naming the file, line and problem."""
    p = Path(path)
    if not p.is_file():
        raise DataFormatError(f"{p}: no such file")
    cfg = data_cfg or DataConfig()
    if not (cfg.text_fields and cfg.label_field):
        cfg = resolve_data_config(p.parent, cfg, p)
    return _read_jsonl(p, cfg, vocab, 0)
