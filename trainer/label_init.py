"""Starting W_L and W_C from the data instead of at random (train.init = "centroid").

Each label's classifier starts at the normalised mean of the normalised embeddings of its training positives,
and each cluster's at the normalised mean of its labels' rows: before the first step the model is a
nearest-centroid classifier in the encoder's space, and a label seen once or twice starts pointing at its
documents rather than at a random direction it has too few examples to leave.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from elias_retrieval.encoders import EncoderInputs
from elias_retrieval.model import EliasModel


@torch.no_grad()
def label_centroids(model: EliasModel, inputs: EncoderInputs, Y: sp.csr_matrix, batch_size: int,
                    device: torch.device) -> tuple[torch.Tensor, float]:
    """(L, d): for each label, the sum of the l2-normalised embeddings of its training positives; and the mean
    norm of the embeddings."""
    was_training = model.training
    model.eval()
    acc = torch.zeros(model.num_labels, model.W_L.shape[1], device=device)
    n = len(inputs)
    norm_sum = 0.0
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        raw = model.encoder(inputs.batch(rows, device)).float()
        norm_sum += float(raw.norm(dim=1).sum())
        emb = F.normalize(raw, dim=1)
        yb = Y[rows].tocoo()
        acc.index_add_(0, torch.from_numpy(yb.col.astype(np.int64)).to(device),
                       emb.index_select(0, torch.from_numpy(yb.row.astype(np.int64)).to(device)))
    model.train(was_training)
    return acc, norm_sum / max(1, n)


@torch.no_grad()
def centroid_init(model: EliasModel, centroids: torch.Tensor, partition: list[np.ndarray], scale: float,
                  label_bias: float) -> int:
    """Set W_L = scale * normalize(centroid), b_L = label_bias, W_C = scale * normalize(sum of its labels'
    normalised centroids), b_C = 0. Labels without positives keep their rows. Returns how many rows were set."""
    norms = centroids.norm(dim=1, keepdim=True)
    has = norms.squeeze(1) > 0
    unit = centroids / norms.clamp(min=1e-12)
    model.W_L[has] = scale * unit[has].to(model.W_L.dtype)
    model.b_L[has] = label_bias
    cluster_init(model, centroids, partition, scale)
    return int(has.sum())


@torch.no_grad()
def cluster_init(model: EliasModel, label_rows: torch.Tensor, partition: list[np.ndarray], scale: float) -> None:
    """W_C[c] = scale * normalize(sum of the normalised `label_rows` of cluster c's labels: their centroids, or
    their trained W_L rows), b_C = 0."""
    unit = F.normalize(label_rows, dim=1)
    for c, members in enumerate(partition):
        centre = unit[torch.as_tensor(members, dtype=torch.long, device=unit.device)].sum(0)
        if centre.norm() > 0:
            model.W_C[c] = scale * F.normalize(centre, dim=0).to(model.W_C.dtype)
    model.b_C.zero_()
