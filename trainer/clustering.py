"""Stage 0: PIFA label features and balanced hierarchical spherical 2-means (ELIAS.md, "Stage 0")."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from rich.progress import Progress
from sklearn.preprocessing import normalize


def pifa(X: sp.csr_matrix, Y: sp.csr_matrix) -> sp.csr_matrix:
    """z_l = normalize(sum of normalize(x_i) over the points i with label l): (L, F), rows l2-normalised."""
    Xn = normalize(X.astype(np.float32, copy=False), norm="l2", axis=1, copy=True)
    Z = (Y.T.tocsr().astype(np.float32) @ Xn).tocsr()
    return normalize(Z, norm="l2", axis=1, copy=False)


def joint_features(embedding_centroids: np.ndarray, Z_tfidf: sp.csr_matrix) -> sp.csr_matrix:
    """[normalize(mean phi) | normalize(PIFA)] / sqrt(2): both halves count alike and the rows are unit length
    (ELIAS.md, stage 0's re-clustering variant). A label without positives keeps zero rows."""
    phi = normalize(np.asarray(embedding_centroids, dtype=np.float32), norm="l2", axis=1)
    joint = sp.hstack([sp.csr_matrix(phi), Z_tfidf.astype(np.float32, copy=False)], format="csr")
    return normalize(joint, norm="l2", axis=1, copy=False)  # in place: the matrix is as large as the PIFA


def _bisect(Z: sp.csr_matrix, rng: np.random.Generator, iters: int) -> np.ndarray:
    """Balanced spherical 2-means of the rows of Z: a boolean mask of the first half (ceil(n/2) rows)."""
    n = Z.shape[0]
    half = (n + 1) // 2
    if Z.nnz == 0:
        mask = np.zeros(n, dtype=bool)
        mask[rng.permutation(n)[:half]] = True
        return mask
    i, j = rng.choice(n, size=2, replace=False)
    diff = np.asarray((Z[i] - Z[j]).todense()).ravel()
    mask = np.zeros(n, dtype=bool)
    Zt = Z.T  # CSC, no copy: the centroid sums are products, with no copy of either half's rows per iteration
    total = Zt @ np.ones(n, dtype=Z.dtype)
    for _ in range(iters):
        score = Z @ diff
        order = np.argsort(-score, kind="stable")
        new = np.zeros(n, dtype=bool)
        new[order[:half]] = True
        if np.array_equal(new, mask):
            break
        mask = new
        c1 = Zt @ mask.astype(Z.dtype)
        c2 = total - c1
        c1 /= max(np.linalg.norm(c1), 1e-12)
        c2 /= max(np.linalg.norm(c2), 1e-12)
        diff = c1 - c2
    return mask


def balanced_clusters(
    Z: sp.csr_matrix, num_clusters: int, seed: int = 0, iters: int = 20, progress: bool = False
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
    Z = Z.tocsr()
    clusters = [np.arange(L)]
    depth = int(np.log2(num_clusters))
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("stage 0: clustering labels", total=num_clusters - 1)
        for _ in range(depth):
            nxt: list[np.ndarray] = []
            for members in clusters:
                # the first split reads Z itself: a copy of all its rows would double the memory the clustering needs
                mask = _bisect(Z if len(members) == L else Z[members], rng, iters)
                nxt += [members[mask], members[~mask]]
                bar.advance(task)
            clusters = nxt
    return clusters
