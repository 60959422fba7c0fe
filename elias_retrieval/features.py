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
from rich.progress import track
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
    """Text: scikit-learn TfidfVectorizer (word 1..ngram_max-grams, sublinear tf, min_df, max_features, lowercase,
    float32, l2 rows). Given sparse features: idf re-weighting (TfidfTransformer semantics, l2 rows)."""

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
        return cls._fit(data, cfg, transform=False)[0]

    @classmethod
    def fit_transform(cls, data: Dataset, cfg: FeatureConfig) -> tuple[TfidfFeaturizer, sp.csr_matrix]:
        """Fit on `data` and return the featurizer with `data`'s features, in one pass over the texts.

        The features equal `fit(data, cfg).transform(data)`.
        """
        feat, X = cls._fit(data, cfg, transform=True)
        assert X is not None
        return feat, X

    @classmethod
    def _fit(cls, data: Dataset, cfg: FeatureConfig, transform: bool) -> tuple[TfidfFeaturizer, sp.csr_matrix | None]:
        if data.texts is not None:
            vec = _vectorizer(cfg)
            try:
                X = vec.fit_transform(data.texts) if transform else vec.fit(data.texts)
            except ValueError as e:  # sklearn: "empty vocabulary" / "max_df corresponds to < documents than min_df"
                raise FeatureError(f"cannot fit tf-idf on these texts: {e}") from e
            feat = cls("text", cfg, vec, len(vec.vocabulary_))
        elif data.features is not None:
            tr = TfidfTransformer(sublinear_tf=cfg.sublinear_tf)
            X = tr.fit_transform(data.features) if transform else tr.fit(data.features)
            feat = cls("sparse", cfg, tr, data.features.shape[1])
        else:
            raise FeatureError("dataset has neither texts nor features")
        return feat, _finish(X) if transform else None

    def transform(self, data: Dataset | list[str] | sp.spmatrix, show_progress: bool = False,
                  n_jobs: int = 2) -> sp.csr_matrix:
        """tf-idf rows (l2-normalised, float32, sorted indices) for a dataset, raw texts or raw features.

        Many texts are transformed in chunks by `n_jobs` worker processes (joblib); `show_progress` shows a
        progress bar over the chunks.
        """
        if isinstance(data, Dataset):
            data = data.texts if self.kind == "text" else data.features  # type: ignore[assignment]
            if data is None:
                raise FeatureError(f"this {self.kind} featurizer needs a dataset with "
                                   f"{'texts' if self.kind == 'text' else 'sparse features'}")
        if self.kind == "text":
            if not isinstance(data, list):
                raise FeatureError("a text featurizer transforms a list of texts")
            return self._transform_texts(data, show_progress, n_jobs)
        if not sp.issparse(data):
            raise FeatureError("a sparse featurizer transforms sparse feature matrices, not texts")
        if data.shape[1] != self._num_features:
            raise FeatureError(f"expected {self._num_features} features, got {data.shape[1]}")
        return _finish(self._t.transform(sp.csr_matrix(data, dtype=np.float32)))

    def _transform_texts(self, texts: list[str], show_progress: bool, n_jobs: int) -> sp.csr_matrix:
        if len(texts) < _PARALLEL_MIN_TEXTS and not show_progress:
            return _finish(self._t.transform(texts))
        # One chunk per worker; more (for a finer progress bar) only when progress is shown.
        n_chunks = max(1, min(len(texts) // 1000, (4 if show_progress else 1) * max(n_jobs, 1)))
        bounds = np.linspace(0, len(texts), n_chunks + 1).astype(int)
        chunks = [texts[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        if n_jobs > 1 and len(texts) >= _PARALLEL_MIN_TEXTS:
            parts = Parallel(n_jobs=n_jobs, return_as="generator")(delayed(self._t.transform)(c) for c in chunks)
        else:
            parts = (self._t.transform(c) for c in chunks)
        if show_progress:
            parts = track(parts, total=len(chunks), description="tf-idf", transient=True)
        return _finish(sp.vstack(list(parts), format="csr"))

    def save(self, directory: str | Path) -> None:
        """Write featurizer.json, vocab.json (text kind) and idf.safetensors into `directory`, atomically each."""
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
        """Read a directory written by `save` (JSON + safetensors, no pickle)."""
        d = Path(directory)
        try:
            meta = json.loads((d / "featurizer.json").read_text())
            idf = load_file(str(d / "idf.safetensors"))["idf"].numpy()
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
