"""Ranking metrics (ELIAS.md, "How results are measured"), vectorised numpy, values in percent.

Points with no labels count as 0 for P, nDCG and PSP and are left out of R. Labels that never occur in
training (columns past the training vocabulary) count against recall.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from rich.table import Table

BUCKETS: list[tuple[int, float, str]] = [
    (0, 0, "0"), (1, 2, "1-2"), (3, 5, "3-5"), (6, 20, "6-20"), (21, 100, "21-100"), (101, np.inf, ">100"),
]
PRECISION_KS = (1, 3, 5)
RECALL_KS = (10, 20, 50, 100)


def inverse_propensity(train_label_counts: np.ndarray, num_train: int, a: float = 0.55, b: float = 1.5) -> np.ndarray:
    """1 + (ln N - 1) (B + 1)^A (n_l + B)^-A, from the training label counts n_l."""
    c = (np.log(max(num_train, 2)) - 1.0) * (b + 1.0) ** a
    return 1.0 + c * np.power(np.asarray(train_label_counts, dtype=np.float64) + b, -a)


def _valid_preds(pred_ids: np.ndarray, ncols: int) -> np.ndarray:
    """Predictions with padding (-1) and ids past `y_true`'s columns mapped to the never-true column `ncols`."""
    p = np.asarray(pred_ids, dtype=np.int64)
    return np.where((p >= 0) & (p < ncols), p, ncols)


def _hits(pred: np.ndarray, y: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """(N, k) bool: is the prediction at each rank a true label of its point? (`pred` from `_valid_preds`)

    Also returns (N, k) positions into `y.indices` of the matched true labels (valid where a hit).
    """
    n = pred.shape[0]
    width = np.int64(y.shape[1] + 1)
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(y.indptr))
    y_keys = rows * width + y.indices.astype(np.int64)  # sorted: CSR rows in order, indices sorted
    if not len(y_keys):
        return np.zeros(pred.shape, dtype=bool), np.zeros(pred.shape, dtype=np.int64)
    p_keys = np.arange(n, dtype=np.int64)[:, None] * width + pred
    pos = np.minimum(np.searchsorted(y_keys, p_keys), len(y_keys) - 1)
    return y_keys[pos] == p_keys, pos


def hits(pred_ids: np.ndarray, y_true: sp.csr_matrix) -> np.ndarray:
    """(N, k) bool: is the prediction at each rank (-1 = padding) a true label of its point?"""
    return _hits(_valid_preds(pred_ids, y_true.shape[1]), y_true.tocsr())[0]


def evaluate(
    pred_ids: np.ndarray,
    y_true: sp.csr_matrix,
    train_label_counts: np.ndarray,
    num_train: int,
    psp_a: float = 0.55,
    psp_b: float = 1.5,
) -> dict[str, float]:
    """P@1/3/5, nDCG@1/3/5, PSP@1/3/5, R@10/20/50/100 and R@100 by training-frequency bucket.

    `pred_ids` (N, k): ranked label ids, -1 for padding. `y_true` (N, L_total) binary CSR; columns past
    `len(train_label_counts)` are labels unseen in training.
    """
    y = sp.csr_matrix(y_true, copy=True)
    y.eliminate_zeros()
    y.sum_duplicates()
    y.sort_indices()
    if pred_ids.ndim != 2:
        raise ValueError(f"pred_ids must be (N, k), got shape {pred_ids.shape}")
    n = pred_ids.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"{n} predictions for {y.shape[0]} points")
    pred_ids = _valid_preds(pred_ids, y.shape[1])  # invalid ids -> column y.shape[1], never a hit
    hits, hit_pos = _hits(pred_ids, y)
    n_true = np.diff(y.indptr)
    has = n_true > 0
    counts = np.zeros(y.shape[1], dtype=np.float64)
    counts[: len(train_label_counts)] = train_label_counts
    out: dict[str, float] = {}
    for kk in PRECISION_KS:
        out[f"P@{kk}"] = 100.0 * hits[:, :kk].sum(1).mean() / kk if n else 0.0
    disc = 1.0 / np.log2(np.arange(2, max(PRECISION_KS) + 2))
    for kk in PRECISION_KS:
        dcg = (hits[:, :kk] * disc[: hits[:, :kk].shape[1]]).sum(1)
        idcg = np.concatenate([[0.0], np.cumsum(disc[:kk])])[np.minimum(n_true, kk)]
        out[f"nDCG@{kk}"] = 100.0 * np.where(has, dcg / np.where(has, idcg, 1.0), 0.0).mean() if n else 0.0
    ip = inverse_propensity(counts, num_train, psp_a, psp_b)
    ip_pad = np.append(ip, 0.0)
    # The best achievable PSP numerator: each point's k largest inverse propensities among its true labels.
    rows = np.repeat(np.arange(n), n_true)
    order = np.lexsort((-ip[y.indices], rows))
    rank = np.arange(len(order)) - y.indptr[rows[order]]
    for kk in PRECISION_KS:
        num = (hits[:, :kk] * ip_pad[pred_ids[:, :kk]]).sum()
        best = np.where(rank < kk, ip[y.indices[order]], 0.0).sum()
        out[f"PSP@{kk}"] = 100.0 * num / best if best > 0 else 0.0
    for kk in RECALL_KS:
        r = hits[has, :kk].sum(1) / n_true[has]
        out[f"R@{kk}"] = 100.0 * r.mean() if has.any() else 0.0
    # Recall@100 by the label's number of training positives, micro-averaged over (point, label) pairs.
    found = np.zeros(y.nnz, dtype=bool)  # per stored true label: found in the point's top 100
    found[hit_pos[:, :100][hits[:, :100]]] = True
    label_n = counts[y.indices]
    for lo, hi, name in BUCKETS:
        sel = (label_n >= lo) & (label_n <= hi)
        if sel.any():
            out[f"R@100 [{name}]"] = 100.0 * found[sel].mean()
    out["num_points"] = int(n)
    out["num_points_without_labels"] = int((~has).sum())
    return out


def format_table(metrics: dict[str, float]) -> Table:
    """The metrics as a two-column rich table."""
    table = Table(title="evaluation", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else f"{value:.2f}")
    return table
