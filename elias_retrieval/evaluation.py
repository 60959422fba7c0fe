"""Offline evaluation: search a whole dataset split and score the ranked top 100 (metrics.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor

from elias_retrieval.data import Dataset
from elias_retrieval.encoders import Encoder, EncoderInputs
from elias_retrieval.features import TfidfFeaturizer
from elias_retrieval.metrics import evaluate
from elias_retrieval.reranker import SparseRanker
from elias_retrieval.search import SearchTensors, search

if TYPE_CHECKING:
    from elias_retrieval.baseline import AnnBaseline


def embedded_batches(
    encoder: Encoder, data: Dataset, device: torch.device, batch_size: int, progress: bool, description: str,
    inputs: EncoderInputs | None = None,
) -> Iterator[tuple[np.ndarray, Tensor]]:
    """(row numbers, query embeddings) for `data` in batches, under inference mode, with a progress bar.
    `inputs`: `data` already prepared by the encoder (featurised or tokenised), to do that once for many calls."""
    encoder.eval()
    inputs = inputs if inputs is not None else encoder.prepare(data)
    n = len(inputs)
    with (
        Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                 disable=not progress, transient=True) as bar,
        torch.inference_mode(),
    ):
        task = bar.add_task(description, total=n)
        for start in range(0, n, batch_size):
            rows = np.arange(start, min(start + batch_size, n))
            yield rows, encoder(inputs.batch(rows, device))
            bar.advance(task, len(rows))


def predict(
    encoder: Encoder,
    tensors: SearchTensors,
    data: Dataset,
    k: int = 100,
    beam_size: int = 20,
    shortlist_size: int = 2000,
    batch_size: int = 512,
    progress: bool = False,
    inputs: EncoderInputs | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Ranked top-k label ids (-1 padded) and scores for every point of `data` (`inputs`: see embedded_batches)."""
    ids = np.full((len(data), k), -1, dtype=np.int64)
    scores = np.zeros((len(data), k), dtype=np.float32)
    for rows, emb in embedded_batches(encoder, data, tensors.W_C.device, batch_size, progress, "searching", inputs):
        res = search(emb, tensors, k=k, beam_size=beam_size, shortlist_size=shortlist_size)
        kk = res.ids.shape[1]
        ids[rows, :kk] = res.ids.cpu().numpy()
        scores[rows, :kk] = res.scores.float().cpu().numpy()
    return ids, scores


def predict_baseline(
    encoder: Encoder,
    ann: AnnBaseline,
    data: Dataset,
    k: int = 100,
    ef_search: int | None = None,
    nprobe: int | None = None,
    batch_size: int = 512,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """`predict` with an ANNS baseline instead of ELIAS: the top-k of w_l . phi + b_l from `ann` (-1 padded)."""
    ids = np.full((len(data), k), -1, dtype=np.int64)
    scores = np.full((len(data), k), -np.inf, dtype=np.float32)
    device = next(encoder.parameters()).device
    for rows, emb in embedded_batches(encoder, data, device, batch_size, progress, f"searching ({ann.method})"):
        ids[rows], scores[rows] = ann.search(emb.float(), k, ef_search=ef_search, nprobe=nprobe)
    return ids, scores


def evaluate_split(
    encoder: Encoder,
    tensors: SearchTensors,
    data: Dataset,
    train_label_counts: np.ndarray,
    num_train: int,
    beam_size: int = 20,
    shortlist_size: int = 2000,
    batch_size: int = 512,
    progress: bool = False,
    ranker: SparseRanker | None = None,
    featurizer: TfidfFeaturizer | None = None,
    inputs: EncoderInputs | None = None,
) -> dict[str, float]:
    """Search `data` (ELIAS++ when a ranker is given) and return metrics.evaluate's metrics (percentages)."""
    depth = 100 if ranker is None else max(100, ranker.depth)
    ids, scores = predict(encoder, tensors, data, depth, beam_size, shortlist_size, batch_size, progress, inputs)
    if ranker is not None:
        if featurizer is None:
            raise ValueError("re-ranking needs the tf-idf featurizer")
        ids, _ = ranker.rerank(featurizer.transform(data), ids, scores)
        ids = ids[:, :100]
    return evaluate(ids, data.labels, train_label_counts, num_train)


def evaluate_baseline_split(
    encoder: Encoder,
    ann: AnnBaseline,
    data: Dataset,
    train_label_counts: np.ndarray,
    num_train: int,
    ef_search: int | None = None,
    nprobe: int | None = None,
    batch_size: int = 512,
    progress: bool = False,
) -> tuple[dict[str, float], dict[str, int]]:
    """`evaluate_split` for an ANNS baseline: its metrics, and the index settings used (ann.settings)."""
    settings = ann.settings(ef_search, nprobe)
    ids, _ = predict_baseline(encoder, ann, data, 100, ef_search, nprobe, batch_size, progress)
    return evaluate(ids, data.labels, train_label_counts, num_train), settings
