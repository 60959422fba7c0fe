"""tf-idf features (scikit-learn), saved without pickle: vocabulary as JSON, idf as safetensors.

Two kinds: "text" (TfidfVectorizer over word 1..n-grams) for raw-text datasets, and "sparse" (idf
re-weighting of given bag-of-words features) for the XC format. Rows are l2-normalised, float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from joblib import Parallel, delayed
from safetensors.torch import load_file
from sklearn.feature_extraction.text import TfidfTransformer, TfidfVectorizer

from elias_retrieval.atomic import write_json, write_safetensors
from elias_retrieval.config import FeatureConfig
from elias_retrieval.data import Dataset

FORMAT_VERSION = 1
# Below this many texts, transforming in one process beats starting workers.
_PARALLEL_MIN_TEXTS = 4000


class FeatureError(ValueError):
    """Features cannot be computed for this input, or a saved featurizer is malformed."""


def _vectorizer(cfg: FeatureConfig, vocabulary: dict[str, int] | None = None) -> TfidfVectorizer:
    return TfidfVectorizer(
        ngram_range=(1, cfg.ngram_max), min_df=1 if vocabulary else cfg.min_df,
        max_features=None if vocabulary else cfg.max_features, sublinear_tf=cfg.sublinear_tf,
        dtype=np.float32, vocabulary=vocabulary,
    )


def _finish(X: sp.spmatrix) -> sp.csr_matrix:
    X = sp.csr_matrix(X, dtype=np.float32)
    X.sort_indices()
    return X


class TfidfFeaturizer:
    def __init__(self, kind: str, cfg: FeatureConfig, transformer: TfidfVectorizer | TfidfTransformer,
                 num_features: int):
        if kind not in ("text", "sparse"):
            raise FeatureError(f"unknown featurizer kind {kind!r}")
        self.kind, self.cfg, self._t, self._num_features = kind, cfg, transformer, num_features

    @property
    def num_features(self) -> int:
        return self._num_features

    @classmethod
    def fit(cls, data: Dataset, cfg: FeatureConfig) -> TfidfFeaturizer:
        """Fit on a dataset's texts (kind "text") or, when it has none, its given features (kind "sparse")."""
        if data.texts is not None:
            vec = _vectorizer(cfg).fit(data.texts)
            if not vec.vocabulary_:
                raise FeatureError("no terms survive tf-idf's min_df / vocabulary limits")
            return cls("text", cfg, vec, len(vec.vocabulary_))
        if data.features is None:
            raise FeatureError("dataset has neither texts nor features")
        tr = TfidfTransformer(sublinear_tf=cfg.sublinear_tf).fit(data.features)
        return cls("sparse", cfg, tr, data.features.shape[1])

    def transform(self, data: Dataset | list[str] | sp.spmatrix, n_jobs: int = 2) -> sp.csr_matrix:
        """tf-idf rows (l2-normalised, float32, sorted indices) for a dataset, raw texts or raw features."""
        if isinstance(data, Dataset):
            data = data.texts if self.kind == "text" else data.features  # type: ignore[assignment]
            if data is None:
                raise FeatureError(f"this {self.kind} featurizer needs a dataset with "
                                   f"{'texts' if self.kind == 'text' else 'sparse features'}")
        if self.kind == "text":
            if not isinstance(data, list):
                raise FeatureError("a text featurizer transforms texts")
            if len(data) < _PARALLEL_MIN_TEXTS or n_jobs <= 1:
                return _finish(self._t.transform(data))
            chunks = np.array_split(np.arange(len(data)), n_jobs)
            parts = Parallel(n_jobs=n_jobs)(delayed(self._t.transform)([data[i] for i in c]) for c in chunks)
            return _finish(sp.vstack(parts))
        if not sp.issparse(data):
            raise FeatureError("a sparse featurizer transforms sparse feature matrices")
        if data.shape[1] != self._num_features:
            raise FeatureError(f"expected {self._num_features} features, got {data.shape[1]}")
        return _finish(self._t.transform(data))

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        idf = torch.from_numpy(np.asarray(self._t.idf_, dtype=np.float32))
        write_safetensors(d / "idf.safetensors", {"idf": idf})
        if self.kind == "text":
            vocab = {t: int(i) for t, i in self._t.vocabulary_.items()}
            write_json(d / "vocab.json", vocab)
        write_json(d / "featurizer.json", {
            "format_version": FORMAT_VERSION, "kind": self.kind, "num_features": self._num_features,
            "config": {"max_features": self.cfg.max_features, "ngram_max": self.cfg.ngram_max,
                       "min_df": self.cfg.min_df, "sublinear_tf": self.cfg.sublinear_tf},
        })

    @classmethod
    def load(cls, directory: str | Path) -> TfidfFeaturizer:
        d = Path(directory)
        try:
            meta = json.loads((d / "featurizer.json").read_text())
            idf = load_file(str(d / "idf.safetensors"))["idf"].numpy().astype(np.float64)
        except FileNotFoundError as e:
            raise FeatureError(f"{d}: not a featurizer directory ({e.filename} missing)") from e
        except (json.JSONDecodeError, KeyError) as e:
            raise FeatureError(f"{d}: malformed featurizer ({e})") from e
        if meta.get("format_version") != FORMAT_VERSION:
            raise FeatureError(f"{d / 'featurizer.json'}: unsupported format version {meta.get('format_version')}")
        cfg = FeatureConfig(**meta["config"])
        n = int(meta["num_features"])
        if len(idf) != n:
            raise FeatureError(f"{d / 'idf.safetensors'}: {len(idf)} idf values for {n} features")
        if meta["kind"] == "text":
            vocab = json.loads((d / "vocab.json").read_text())
            if len(vocab) != n:
                raise FeatureError(f"{d / 'vocab.json'}: {len(vocab)} terms for {n} features")
            vec = _vectorizer(cfg, vocab)
            vec.fit_vocabulary = False
            vec.vocabulary_ = vocab
            vec.idf_ = idf
            return cls("text", cfg, vec, n)
        tr = TfidfTransformer(sublinear_tf=cfg.sublinear_tf)
        tr.idf_ = idf
        return cls("sparse", cfg, tr, n)
