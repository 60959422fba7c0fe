"""The tf-idf projection of a training batch, X @ P[features], with its sparse row gradient written in one pass.

Through nn.Embedding(sparse=True) and a sparse product, backward zero-fills a (U, d) gradient for the batch's U
distinct features, accumulates X^T @ dH into it, and autograd copies it once more into the parameter's sparse
gradient: at 23k distinct features and d = 768, three passes over 70 MB per step. Here each feature's gradient
row is written once, from the documents that hold it, into a coalesced sparse tensor over the batch's features
(sorted, distinct), which the RowAdam update reads as it is. The forward pass is torch's gather and product.

A batch's distinct features and its rows re-indexed onto them come from `sparse_batch`.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from elias_retrieval.kernel_threads import torch_sized_pool

# Past this many feature ids per stored entry, sorting a batch's entries beats marking them in a table the size
# of the vocabulary (measured on EURLEX57K's 200k features: a sort at 1 row, the table from 16 rows on).
_SORT_FEATURES_PER_ENTRY = 64


def distinct_features(indices: np.ndarray, num_features: int) -> tuple[np.ndarray, np.ndarray]:
    """The sorted distinct feature ids among `indices` and each entry's position among them: np.unique's answer,
    from a mark per feature where a batch holds enough entries (a training batch: 9x faster than its sort)."""
    if indices.size * _SORT_FEATURES_PER_ENTRY < num_features:
        features, local = np.unique(indices, return_inverse=True)
        return features, local.ravel()
    present = np.zeros(num_features, dtype=bool)
    present[indices] = True
    features = np.flatnonzero(present)
    slot = np.empty(num_features, dtype=np.int64)
    slot[features] = np.arange(len(features))
    return features, slot[indices]


def sparse_batch(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, num_features: int,
                 device: torch.device | str) -> dict[str, Tensor]:
    """The tf-idf encoder's batch of CSR rows: the batch's distinct feature ids (sorted) and the rows re-indexed
    onto them, so that the projection reads each distinct row of its table once."""
    features, local = distinct_features(indices, num_features)
    return {
        "features": torch.from_numpy(features.astype(np.int64, copy=False)).to(device),
        "crow": torch.from_numpy(indptr.astype(np.int64, copy=False)).to(device),
        "col": torch.from_numpy(local.astype(np.int64, copy=False)).to(device),
        "values": torch.from_numpy(values.astype(np.float32, copy=False)).to(device),
    }


@njit(parallel=True, cache=True)
def _backward(grad_out, crow, col, values, num_features, out):  # pragma: no cover - compiled
    """out[u] = sum over the entries of local feature u of value * grad_out[row] (X^T @ grad_out)."""
    d = grad_out.shape[1]
    n_rows = crow.shape[0] - 1
    nnz = col.shape[0]
    # The batch's entries by feature (a counting sort), each with its row.
    start = np.zeros(num_features + 1, dtype=np.int64)
    for p in range(nnz):
        start[col[p] + 1] += 1
    for u in range(num_features):
        start[u + 1] += start[u]
    fill = start[:-1].copy()
    row_of = np.empty(nnz, dtype=np.int64)
    entry = np.empty(nnz, dtype=np.int64)
    for i in range(n_rows):
        for p in range(crow[i], crow[i + 1]):
            u = col[p]
            row_of[fill[u]] = i
            entry[fill[u]] = p
            fill[u] += 1
    for u in prange(num_features):
        for j in range(d):
            out[u, j] = 0.0
        for q in range(start[u], start[u + 1]):
            i = row_of[q]
            v = values[entry[q]]
            for j in range(d):
                out[u, j] += v * grad_out[i, j]


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx, P: Tensor, features: Tensor, crow: Tensor, col: Tensor,  # type: ignore[override]
                values: Tensor) -> Tensor:
        rows = P.detach().index_select(0, features)
        X = torch.sparse_csr_tensor(crow, col, values, size=(crow.shape[0] - 1, rows.shape[0]), check_invariants=False)
        out = X @ rows
        ctx.save_for_backward(features, crow, col, values)
        ctx.shape = P.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        features, crow, col, values = ctx.saved_tensors
        rows = torch.empty(features.shape[0], ctx.shape[1], dtype=torch.float32)
        with torch_sized_pool():
            _backward(grad_out.float().contiguous().numpy(), crow.numpy(), col.numpy(), values.numpy(),
                      features.shape[0], rows.numpy())
        grad = torch.sparse_coo_tensor(features.unsqueeze(0), rows, ctx.shape, is_coalesced=True,
                                       check_invariants=False)
        return grad, None, None, None, None


def fused_route_applies(P: Tensor, batch: dict[str, Tensor]) -> bool:
    """Whether `project` applies: a float32 CPU table and a float32 CPU batch."""
    return (P.device.type == "cpu" and P.dtype == torch.float32 and batch["values"].dtype == torch.float32
            and batch["features"].device.type == "cpu")


def project(P: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """(n_docs, d): each document's tf-idf row times P, for a batch of SparseInputs.batch (features sorted and
    distinct; col indexes them); differentiable in P with a coalesced sparse gradient over the batch's features.
    Needs `fused_route_applies(P, batch)`."""
    return _Project.apply(P, batch["features"], batch["crow"].contiguous(), batch["col"].contiguous(),
                          batch["values"].contiguous())
