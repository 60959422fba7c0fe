import numpy as np
import pytest
import scipy.sparse as sp

from elias_retrieval.config import FeatureConfig
from elias_retrieval.data import Dataset, LabelVocab
from elias_retrieval.features import FeatureError, TfidfFeaturizer

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]


def text_dataset(n: int = 60, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(3, 15))) for _ in range(n)]
    texts[0] = ""  # an empty document gives an all-zero row
    labels = sp.csr_matrix(np.eye(n, 4, dtype=np.float32))
    return Dataset(texts, None, labels, LabelVocab(["a", "b", "c", "d"]))


def sparse_dataset(n: int = 40) -> Dataset:
    X = sp.random(n, 30, density=0.2, format="csr", random_state=1, dtype=np.float32)
    X.data = np.ceil(X.data * 5)
    return Dataset(None, X, sp.csr_matrix((n, 3), dtype=np.float32), LabelVocab(["0", "1", "2"]))


def assert_l2_rows(X: sp.csr_matrix) -> None:
    norms = np.sqrt(np.asarray(X.multiply(X).sum(1))).ravel()
    assert np.allclose(norms[norms > 0], 1.0, atol=1e-5)


def assert_exactly_equal(A: sp.csr_matrix, B: sp.csr_matrix) -> None:
    assert A.shape == B.shape and A.dtype == B.dtype
    assert np.array_equal(A.indptr, B.indptr) and np.array_equal(A.indices, B.indices)
    assert np.array_equal(A.data, B.data)


def test_text_fit_transform_shapes_dtype_and_l2_rows():
    data = text_dataset()
    feat = TfidfFeaturizer.fit(data, FeatureConfig(min_df=2, ngram_max=2, max_features=50))
    X = feat.transform(data)
    assert feat.kind == "text" and feat.num_features == 50
    assert X.shape == (60, 50) and X.dtype == np.float32 and X.has_sorted_indices
    assert_l2_rows(X)
    assert X[0].nnz == 0
    assert feat.transform(["ALPHA beta", "unknownword"]).shape == (2, 50)  # lowercased; unknown terms dropped


def test_fit_transform_equals_fit_then_transform():
    data = text_dataset()
    cfg = FeatureConfig(min_df=1, max_features=1000)
    feat, X = TfidfFeaturizer.fit_transform(data, cfg)
    assert_exactly_equal(X, TfidfFeaturizer.fit(data, cfg).transform(data))
    assert_exactly_equal(X, feat.transform(data.texts))


def test_parallel_chunked_transform_equals_single_pass():
    data = text_dataset(n=4500)
    feat = TfidfFeaturizer.fit(data, FeatureConfig(min_df=1))
    assert_exactly_equal(feat.transform(data, n_jobs=2), feat.transform(data, n_jobs=1))


@pytest.mark.parametrize("make", [text_dataset, sparse_dataset])
def test_save_load_round_trip_is_exact_and_writes_no_pickle(tmp_path, make):
    data = make()
    feat = TfidfFeaturizer.fit(data, FeatureConfig(min_df=1))
    before = feat.transform(data)
    feat.save(tmp_path / "featurizer")
    files = sorted(p.name for p in (tmp_path / "featurizer").iterdir())
    expected = ["featurizer.json", "idf.safetensors"] + (["vocab.json"] if feat.kind == "text" else [])
    assert files == sorted(expected)
    for p in (tmp_path / "featurizer").iterdir():
        assert not p.read_bytes().startswith(b"\x80")  # no pickle protocol header anywhere
    loaded = TfidfFeaturizer.load(tmp_path / "featurizer")
    assert loaded.kind == feat.kind and loaded.num_features == feat.num_features
    assert_exactly_equal(loaded.transform(data), before)


def test_sparse_kind_reweights_given_features():
    data = sparse_dataset()
    feat = TfidfFeaturizer.fit(data, FeatureConfig())
    X = feat.transform(data)
    assert feat.kind == "sparse" and feat.num_features == 30
    assert X.shape == (40, 30) and X.dtype == np.float32
    assert_l2_rows(X)
    assert np.array_equal((X != 0).toarray(), (data.features != 0).toarray())  # same support, new weights
    with pytest.raises(FeatureError, match="transforms sparse feature matrices, not texts"):
        feat.transform(["some text"])
    with pytest.raises(FeatureError, match="expected 30 features"):
        feat.transform(sp.csr_matrix((2, 31)))


def test_text_kind_rejects_a_dataset_without_texts():
    feat = TfidfFeaturizer.fit(text_dataset(), FeatureConfig(min_df=1))
    with pytest.raises(FeatureError, match="needs a dataset with texts"):
        feat.transform(sparse_dataset())


def test_load_of_a_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FeatureError, match="not a featurizer directory"):
        TfidfFeaturizer.load(tmp_path)
