"""Stage 0: PIFA label features and balanced hierarchical spherical 2-means (ELIAS.md, "Stage 0")."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from rich.progress import Progress
from sklearn.preprocessing import normalize


def pifa(X: sp.csr_matrix, Y: sp.csr_matrix) -> sp.csr_matrix:
    """z_l = normalize(sum of normalize(x_i) over the points i with label l): (L, F), rows l2-normalised."""
    Xn = normalize(X.astype(np.float32, copy=False), norm="l2", axis=1, copy=True)
    Z = (Y.T.tocsr().astype(np.float32) @ Xn).tocsr()
    return normalize(Z, norm="l2", axis=1, copy=False)


@dataclass
class JointRows:
    """Rows [dense | sparse]: the label embeddings' dense block beside the PIFA's sparse one. Stored apart, the dense
    block's products run as BLAS on every core instead of a sparse product over as many stored entries."""

    dense: np.ndarray  # (n, d) float32
    sparse: sp.csr_matrix  # (n, F) float32

    @classmethod
    def of(cls, Z: sp.csr_matrix | JointRows) -> JointRows:
        if isinstance(Z, JointRows):
            return Z
        Z = Z.tocsr()
        return cls(np.zeros((Z.shape[0], 0), dtype=Z.dtype), Z)

    @property
    def shape(self) -> tuple[int, int]:
        return self.sparse.shape[0], self.dense.shape[1] + self.sparse.shape[1]

    def is_zero(self) -> bool:
        return self.sparse.nnz == 0 and not self.dense.any()

    def rows(self, members: np.ndarray) -> JointRows:
        return JointRows(self.dense[members], self.sparse[members])

    def row(self, i: int) -> np.ndarray:
        return np.concatenate([self.dense[i], self.sparse[i].toarray().ravel()])

    def dot(self, v: np.ndarray) -> np.ndarray:
        """Z @ v."""
        d = self.dense.shape[1]
        out = self.sparse @ v[d:]
        return out + self.dense @ v[:d] if d else out

    def column_sums(self, weights: np.ndarray) -> np.ndarray:
        """Z^T @ weights (no copy of the rows: the sparse block's transpose is its CSC view)."""
        return np.concatenate([weights @ self.dense, self.sparse.T @ weights])


def joint_features(embedding_centroids: np.ndarray, Z_tfidf: sp.csr_matrix) -> JointRows:
    """[normalize(mean phi) | normalize(PIFA)] / sqrt(2): both halves count alike and the rows are unit length
    (ELIAS.md, stage 0's re-clustering variant). A label without positives keeps zero rows. `Z_tfidf` (rows unit
    length or zero) is scaled in place: the joint rows hold it, not a copy."""
    phi = normalize(np.asarray(embedding_centroids, dtype=np.float32), norm="l2", axis=1)
    Z = Z_tfidf.astype(np.float32, copy=False).tocsr()
    has_phi = (np.abs(phi).sum(1) > 0).astype(np.float32)
    has_pifa = (np.diff(Z.indptr) > 0).astype(np.float32)
    scale = 1.0 / np.sqrt(np.maximum(has_phi + has_pifa, 1.0))  # each row: 1/sqrt(2) with both halves, else 1
    phi *= scale[:, None]
    Z.data *= np.repeat(scale, np.diff(Z.indptr))
    return JointRows(phi, Z)


def _bisect(Z: JointRows, rng: np.random.Generator, iters: int) -> np.ndarray:
    """Balanced spherical 2-means of the rows of Z: a boolean mask of the first half (ceil(n/2) rows)."""
    n = Z.shape[0]
    half = (n + 1) // 2
    if Z.is_zero():
        mask = np.zeros(n, dtype=bool)
        mask[rng.permutation(n)[:half]] = True
        return mask
    i, j = rng.choice(n, size=2, replace=False)
    diff = Z.row(i) - Z.row(j)
    mask = np.zeros(n, dtype=bool)
    dtype = Z.sparse.dtype
    total = Z.column_sums(np.ones(n, dtype=dtype))  # the centroid sums are products, with no copy of either half
    for _ in range(iters):
        score = Z.dot(diff)
        order = np.argsort(-score, kind="stable")
        new = np.zeros(n, dtype=bool)
        new[order[:half]] = True
        if np.array_equal(new, mask):
            break
        mask = new
        c1 = Z.column_sums(mask.astype(dtype))
        c2 = total - c1
        c1 /= max(np.linalg.norm(c1), 1e-12)
        c2 /= max(np.linalg.norm(c2), 1e-12)
        diff = c1 - c2
    return mask


def balanced_clusters(
    Z: sp.csr_matrix | JointRows, num_clusters: int, seed: int = 0, iters: int = 20, progress: bool = False
) -> list[np.ndarray]:
    """Recursive bisection into equal halves until there are `num_clusters` (a power of two) leaves.

    Returns the label ids of each leaf; every label is in exactly one leaf and leaf sizes differ by at most one.
    """
    if num_clusters & (num_clusters - 1):
        raise ValueError(f"num_clusters must be a power of two, got {num_clusters}")
    L = Z.shape[0]
    if num_clusters > L:
        raise ValueError(f"cannot split {L} labels into {num_clusters} clusters")
    rng = np.random.default_rng(seed)
    Z = JointRows.of(Z)
    clusters = [np.arange(L)]
    depth = int(np.log2(num_clusters))
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("stage 0: clustering labels", total=num_clusters - 1)
        for _ in range(depth):
            nxt: list[np.ndarray] = []
            for members in clusters:
                # the first split reads Z itself: a copy of all its rows would double the memory the clustering needs
                mask = _bisect(Z if len(members) == L else Z.rows(members), rng, iters)
                nxt += [members[mask], members[~mask]]
                bar.advance(task)
            clusters = nxt
    return clusters
