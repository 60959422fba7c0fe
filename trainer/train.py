"""ELIAS training end to end: stage 0 (clusters), stage 1 (fixed A), sparse-A init, stage 2 (A learned)."""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from elias_retrieval.atomic import StagedDir, atomic_dir, write_json
from elias_retrieval.config import EliasConfig, ModelConfig, TrainConfig
from elias_retrieval.data import Dataset, dataset_data_config, has_split, read_split
from elias_retrieval.encoders import (
    Encoder,
    EncoderInputs,
    SparseInputs,
    TfidfEncoder,
    TransformerEncoder,
    default_transformer_path,
)
from elias_retrieval.evaluation import evaluate_split, predict
from elias_retrieval.features import TfidfFeaturizer
from elias_retrieval.frozen_encoders import FrozenBase, FrozenTransformer, FrozenTransformerEncoder, HybridEncoder
from elias_retrieval.malloc import release_freed_memory, reuse_freed_memory
from elias_retrieval.model import EliasModel
from elias_retrieval.modeldir import TrainedModel, load_model_dir, save_model_dir
from elias_retrieval.precision import PrecisionError, matmul_dtype
from elias_retrieval.search import cluster_scores
from trainer import checkpoint, distributed
from trainer.clustering import balanced_clusters, joint_features, pifa
from trainer.graph_init import cluster_affinity, init_graph
from trainer.label_init import centroid_init, cluster_init, label_centroids
from trainer.optim import RowAdam
from trainer.reranker import DEEP_DEPTH, SHALLOW_DEPTH, choose_depth, choose_pruning, deep_keep_rate, train_ranker

console = Console(stderr=True)


class TrainingError(ValueError):
    """Training cannot start or continue (bad data, config or resume state)."""


@dataclass
class TrainData:
    train: Dataset
    dev: Dataset | None
    X_train: sp.csr_matrix  # rows of the train documents that have text
    Y_train: sp.csr_matrix  # (N, L) known labels
    label_counts: np.ndarray
    dev_is_holdout: bool = False  # dev was split off train (the dataset has none)
    empty_train: int = 0  # train documents left out: no text in the text fields


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def make_encoder(cfg: EliasConfig, featurizer: TfidfFeaturizer, num_labels: int) -> Encoder:
    m = cfg.model
    dim = m.embedding_dim(num_labels)
    if m.encoder == "tfidf":
        return TfidfEncoder(featurizer, dim)
    if m.encoder in ("transformer", "frozen", "hybrid"):
        transformer = TransformerEncoder(m.transformer_path or default_transformer_path(), m.pooling, m.max_length)
        if m.encoder == "transformer":
            return transformer
        if m.encoder == "frozen":
            return FrozenTransformerEncoder(FrozenTransformer(transformer), dim)
        return HybridEncoder(TfidfEncoder(featurizer, dim), FrozenTransformer(transformer))
    raise TrainingError(f"model.encoder must be tfidf, transformer, frozen or hybrid, got {m.encoder!r}")


def encoder_inputs(encoder: Encoder, X: sp.csr_matrix, data: Dataset) -> EncoderInputs:
    """The encoder's inputs for `data`, whose tf-idf rows `X` are already computed."""
    if isinstance(encoder, TfidfEncoder):
        return SparseInputs(X)
    if isinstance(encoder, HybridEncoder):
        return encoder.prepare_with(X, data)
    return encoder.prepare(data)


def tfidf_rows(inputs: EncoderInputs | None) -> sp.csr_matrix | None:
    """The tf-idf rows inside prepared inputs, when they hold some."""
    if isinstance(inputs, SparseInputs):
        return inputs.X
    return getattr(getattr(inputs, "sparse", None), "X", None)


def _log(msg: str, progress: bool) -> None:
    if progress:
        console.print(msg, highlight=False)


def hold_out(train: Dataset, fraction: float, max_points: int, seed: int) -> tuple[Dataset, Dataset | None]:
    """Split a seeded random `fraction` of `train` (at most `max_points`, at least one point) off as a dev split."""
    n = min(int(round(fraction * len(train))), max_points)
    if fraction <= 0 or n < 1 or len(train) - n < 1:
        return train, None
    perm = np.random.default_rng(seed).permutation(len(train))
    return train.subset(np.sort(perm[n:])), train.subset(np.sort(perm[:n]))


def load_data(dataset_dir: Path, cfg: EliasConfig, featurizer: TfidfFeaturizer | None, progress: bool):
    t0 = time.perf_counter()
    train = read_split(dataset_dir, "train", cfg.data)
    if cfg.train.max_train_points and len(train) > cfg.train.max_train_points:
        train = train.subset(np.arange(cfg.train.max_train_points))
    dev = read_split(dataset_dir, "dev", cfg.data, vocab=train.vocab) if has_split(dataset_dir, "dev") else None
    if dev is not None and cfg.train.max_eval_points and len(dev) > cfg.train.max_eval_points:
        dev = dev.subset(np.arange(cfg.train.max_eval_points))
    held_out = ""
    if dev is None:
        train, dev = hold_out(train, cfg.train.holdout_fraction, cfg.train.holdout_max, cfg.train.seed)
        held_out = " (held out from train: the dataset has no dev split)" if dev is not None else ""
    _log(f"read {len(train):,} train / {len(dev) if dev else 0:,} dev points{held_out}, "
         f"{train.num_labels:,} labels ({time.perf_counter() - t0:.1f} s)", progress)
    empty = train.empty_rows()
    fields = ", ".join(cfg.data.text_fields)
    if len(empty) == len(train):
        raise TrainingError(f"{dataset_dir}: no train document has text in the text fields ({fields})")
    if len(empty):
        _log(f"{len(empty):,} of {len(train):,} train documents have no text in {fields}: left out of training",
             progress)
        train = train.subset(np.setdiff1d(np.arange(len(train)), empty))
    if dev is not None and len(dev_empty := dev.empty_rows()):
        _log(f"{len(dev_empty):,} of {len(dev):,} dev documents have no text in {fields}: they count as misses",
             progress)
    t0 = time.perf_counter()
    if featurizer is None:
        featurizer, X = TfidfFeaturizer.fit_transform(train, cfg.features)
    else:
        X = featurizer.transform(train)
    _log(f"tf-idf: {featurizer.num_features:,} features ({time.perf_counter() - t0:.1f} s)", progress)
    Y = train.known_labels().tocsr()
    counts = np.asarray(Y.sum(0)).ravel().astype(np.int64)
    if Y.nnz == 0:
        raise TrainingError(f"{dataset_dir}: the train split has no labels")
    return featurizer, TrainData(train, dev, X, Y, counts, dev_is_holdout=bool(held_out), empty_train=len(empty))


def embed_dropout(m: ModelConfig, epochs: int) -> float:
    """The embedding dropout of a stage that runs `epochs` epochs: the configured one, or with -1 the reference's
    0.5 for more than `m.dropout_epochs` epochs (many passes over a small dataset) and 0 for fewer."""
    if m.embed_dropout >= 0:
        return m.embed_dropout
    return 0.5 if epochs > m.dropout_epochs else 0.0


BASE_BATCH = 256
LABELS_PER_BASE_BATCH = 16_384
MIN_STEPS_PER_EPOCH = 128


def batch_size(cfg: EliasConfig, num_labels: int, num_points: int) -> int:
    """`train.batch_size`, or when it is 0 a batch by the label count: 256, doubled for every doubling of L past
    16,384 (rounded to the nearest power of two), but halved back towards 256 until an epoch holds at least 128
    steps. A step's label-side work (W_L's dense AdamW update, its cluster blocks' rows gathered and their
    gradient placed) grows with L and not with the batch; a larger batch spreads it. On TIBKAT (32k labels) four
    epochs at batch 512 gave dev P@5 20.66 against 20.45 at 256 in 15% less stage-1 time, and at 1,024 (76 steps
    an epoch) 19.69 (BENCHMARKS.md, "Training recipe on TIBKAT (dev)"); the reference trains with 256 to 1,024.
    The fine-tuned transformer keeps 256: its forward and backward cost far more per point than a step's label
    side."""
    t = cfg.train
    if t.batch_size > 0:
        return t.batch_size
    if cfg.model.encoder == "transformer":
        return BASE_BATCH
    doublings = max(0, round(math.log2(max(num_labels, 1) / LABELS_PER_BASE_BATCH)))
    b = BASE_BATCH << doublings
    while b > BASE_BATCH and num_points < MIN_STEPS_PER_EPOCH * b:
        b //= 2
    return b


def min_steps(t: TrainConfig, stage: int) -> int:
    """A stage's minimum optimiser steps: its minimum training points at the batch size."""
    examples = t.stage1_min_examples if stage == 1 else t.stage2_min_examples
    return math.ceil(examples / max(1, t.batch_size))


def stage_epochs(t: TrainConfig, stage: int, steps_per_epoch: int) -> int:
    """The configured epochs, raised so that the stage runs at least its minimum number of steps."""
    epochs = t.stage1_epochs if stage == 1 else t.stage2_epochs
    if epochs == 0:
        return 0
    return max(epochs, math.ceil(min_steps(t, stage) / max(1, steps_per_epoch)))


def recluster_epoch(fraction: float, epochs: int) -> int:
    """The stage-1 epoch after which the labels are clustered again: `fraction` of `epochs`, rounded half up, kept
    before the last epoch (0 = never: no fraction, or too few epochs to leave one after it)."""
    if fraction <= 0 or epochs < 2:
        return 0
    return min(max(1, math.floor(fraction * epochs + 0.5)), epochs - 1)


def _schedule(total_steps: int, warmup_fraction: float):
    warm = max(1, int(total_steps * warmup_fraction))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return f


def make_optimizers(model: EliasModel, cfg: EliasConfig, stage: int, total_steps: int):
    """AdamW for dense parameters (separate learning rates), RowAdam for the sparse-gradient projection."""
    t = cfg.train
    transformer = model.encoder.kind == "transformer"
    if stage == 1:
        lr_enc = t.lr_transformer if transformer else t.lr_encoder
        lr_clu = t.lr_clusters
    else:
        lr_enc = t.lr_transformer_stage2 if transformer else t.lr_encoder_stage2
        lr_clu = t.lr_clusters_stage2
    sparse = model.encoder.sparse_params()
    sparse_ids = {id(p) for p in sparse}
    enc_dense = [p for p in model.encoder.parameters() if id(p) not in sparse_ids and p.requires_grad]
    groups = [
        {"params": enc_dense, "lr": lr_enc},
        {"params": [model.W_C, model.b_C], "lr": lr_clu},
        {"params": [model.W_L, model.b_L], "lr": t.lr_labels},
    ]
    if stage == 2:
        groups.append({"params": [model.A_logits], "lr": t.lr_graph, "weight_decay": 0.0})
    opts: dict[str, torch.optim.Optimizer] = {"dense": _adamw(groups, t.weight_decay)}
    if sparse:
        opts["sparse"] = RowAdam(sparse, lr=lr_enc)
    lam = _schedule(total_steps, t.warmup_fraction)
    scheds = {name: torch.optim.lr_scheduler.LambdaLR(o, lam) for name, o in opts.items()}
    return opts, scheds


def train_step(model: EliasModel, inputs: EncoderInputs, Y: sp.csr_matrix, rows: np.ndarray, lam: float,
               opts: dict[str, torch.optim.Optimizer], device: torch.device,
               dtype: torch.dtype = torch.float32,
               group: distributed.Group | None = None) -> tuple[float, dict[str, float]]:
    """One optimiser step on the training points `rows`: the ELIAS loss, its gradients, every optimiser's update.
    Returns the loss and the loss's statistics (of this rank's part of `rows` when `group` spans several processes:
    each back-propagates its part, and the gradients are averaged before the update)."""
    group = group or distributed.Group()
    local = group.shard(rows)
    for o in opts.values():
        o.zero_grad(set_to_none=True)
    loss_value, stats = 0.0, {"recall": 0.0, "path_loss": 0.0}
    if len(local):
        batch = inputs.batch(local, device)
        yb = Y[local].tocoo()
        pos_rows = torch.from_numpy(yb.row.astype(np.int64)).to(device)
        pos_labels = torch.from_numpy(yb.col.astype(np.int64)).to(device)
        loss, stats = model.loss(batch, pos_rows, pos_labels, lam, dtype)
        loss.backward()
        loss_value = float(loss.detach())
    if group.active:
        params = [p for g in (o.param_groups for o in opts.values()) for pg in g for p in pg["params"]]
        sparse = {id(p) for p in model.encoder.sparse_params()}
        distributed.average_gradients(params, sparse, len(local) / len(rows))
    for o in opts.values():
        o.step()
    return loss_value, stats


def _adamw(groups: list[dict[str, Any]], weight_decay: float) -> torch.optim.Optimizer:
    """torch's fused AdamW (one kernel per step instead of a dozen passes over W_L: 7x faster on the CPU), or the
    plain one where fused kernels are not available for these parameters."""
    try:
        return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, weight_decay=weight_decay)


@torch.no_grad()
def top_clusters(model: EliasModel, inputs: EncoderInputs, top: int, batch_size: int, device: torch.device):
    """For every training point, its top clusters and their scores (stage-1 model, eval mode)."""
    model.eval()
    n = len(inputs)
    ids = np.zeros((n, top), dtype=np.int64)
    scores = np.zeros((n, top), dtype=np.float32)
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        emb = model.encoder(inputs.batch(rows, device))
        s = cluster_scores(emb @ model.W_C.T + model.b_C, model.cfg.alpha)
        v, i = torch.topk(s, min(top, s.shape[1]), dim=1)
        ids[rows, : i.shape[1]] = i.cpu().numpy()
        scores[rows, : v.shape[1]] = v.cpu().numpy()
    return ids, scores


class Trainer:
    """Runs the stages, checkpoints after each epoch, resumes from the last checkpoint."""

    def __init__(self, dataset_dir: str | Path, out_dir: str | Path, cfg: EliasConfig, progress: bool = True):
        self.dataset_dir, self.out_dir = Path(dataset_dir), Path(out_dir)
        self.group = distributed.current()
        self.cfg, self.progress = cfg, progress and self.group.is_main
        self.device = distributed.local_device(pick_device(cfg.train.device), self.group)
        try:
            self.matmul_dtype = matmul_dtype(cfg.train.precision, self.device)
        except PrecisionError as e:
            raise TrainingError(str(e)) from None
        self.history: list[dict[str, Any]] = []
        self.stage2_skipped = ""  # why stage 2 stopped at its probe, when it did
        self.dev_inputs: EncoderInputs | None = None
        self.dropouts: dict[str, float] = {}  # the embedding dropout each stage trained with
        self.timings: dict[str, float] = {}
        self.writes = checkpoint.BackgroundWrites()  # checkpoints synced and swapped in beside the next epoch
        self.last_checkpoint = time.perf_counter()  # when the last checkpoint was staged (or the run began)
        self.unsaved_records: list[dict[str, Any]] = []  # history of the epochs since the last checkpoint
        # The best model so far when it is not on disk yet: a copy in memory and its metadata, written at the next
        # checkpoint or the stage's end (when a later epoch beats it first, it is never written).
        self.best_copy: EliasModel | None = None
        self.unsaved_best: tuple[TrainData, dict[str, Any]] | None = None

    # ---- setup ---------------------------------------------------------------------------------
    def _prepare(self, resume: bool) -> tuple[TfidfFeaturizer, TrainData]:
        if self.cfg.train.threads > 0:
            torch.set_num_threads(self.cfg.train.threads)
        elif self.group.active:
            torch.set_num_threads(distributed.threads_per_process(self.group))
        featurizer = TfidfFeaturizer.load(self.out_dir / "featurizer") if resume else None
        t0 = time.perf_counter()
        featurizer, data = load_data(self.dataset_dir, self.cfg, featurizer, self.progress)
        self.timings["data_and_features_s"] = time.perf_counter() - t0
        if not resume and self.group.is_main:
            featurizer.save(self.out_dir / "featurizer")
        return featurizer, data

    def embedding_cache(self) -> Path:
        return Path(self.cfg.train.embedding_cache) if self.cfg.train.embedding_cache else \
            self.out_dir / "embeddings"

    def _solo_threads(self) -> None:
        """Rank 0 alone works from here on (or while the others wait on it): all of the node's cores."""
        if self.group.active and self.cfg.train.threads == 0:
            torch.set_num_threads(os.cpu_count() or 1)

    def _shared_threads(self) -> None:
        if self.group.active and self.cfg.train.threads == 0:
            torch.set_num_threads(distributed.threads_per_process(self.group))

    def _save(self, model: EliasModel, data: TrainData, extra: dict[str, Any]) -> None:
        """Write the model directory, from the live model (each file fsynced and swapped in before training goes
        on: a copy to write from beside training would cost the model's size in memory)."""
        if not self.group.is_main:
            return
        t0 = time.perf_counter()
        meta = {"num_train": len(data.train), "empty_train_documents": data.empty_train, "timings": self.timings,
                "embed_dropout": self.dropouts, **extra}
        save_model_dir(self.out_dir, model, self.cfg, data.train.vocab, model_featurizer(model, self.featurizer),
                       torch.from_numpy(data.label_counts), meta)
        self._saving(t0)

    def _hold_best(self, model: EliasModel, data: TrainData, extra: dict[str, Any]) -> None:
        """Keep the model as the best so far in memory (a copy beside training), to be written by `_flush_best`:
        a model directory costs seconds per GB to write, a copy a fraction of a second, and while dev keeps
        improving each epoch's best is replaced before it would have been read."""
        if not self.group.is_main:
            return
        t0 = time.perf_counter()
        if self.best_copy is None or [v.shape for v in self.best_copy.state_dict().values()] != [
                v.shape for v in model.state_dict().values()]:
            self.best_copy = None
            shared = {id(m.featurizer): m.featurizer for m in model.modules() if hasattr(m, "featurizer")}
            self.best_copy = copy.deepcopy(model, memo=shared)
        else:
            with torch.no_grad():
                for mine, live in zip(self.best_copy.state_dict().values(), model.state_dict().values(), strict=True):
                    mine.copy_(live)
        self.unsaved_best = (data, extra)
        self._saving(t0)

    def _flush_best(self) -> None:
        """Write the best model held in memory, if one is waiting."""
        if self.unsaved_best is not None and self.best_copy is not None:
            self._save(self.best_copy, *self.unsaved_best)
        self.unsaved_best = None

    def _saving(self, t0: float) -> None:
        """Count the time since t0 as the foreground's share of writing checkpoints and model directories."""
        self.timings["saving_s"] = self.timings.get("saving_s", 0.0) + time.perf_counter() - t0

    def _wait_for_writes(self) -> None:
        t0 = time.perf_counter()
        self.writes.wait()
        self._saving(t0)

    # ---- the run -------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> TrainedModel | None:
        """Train; returns the selected model (None on the ranks after the first of a multi-process run)."""
        try:
            return self._run(resume)
        except BaseException:
            # Interrupted or failed: the checkpoints already staged still land (or fail on their own), so that
            # --resume starts from the last one; the best model so far is written if it was only in memory.
            with contextlib.suppress(Exception):
                self.writes.wait()
            with contextlib.suppress(Exception):
                self._flush_best()
            raise

    def _run(self, resume: bool) -> TrainedModel | None:
        cfg = self.cfg
        if resume and not checkpoint.has_state(self.out_dir):
            raise TrainingError(f"{self.out_dir}: nothing to resume (no {checkpoint.STATE_DIR}/: a checkpoint is "
                                "written at each stage's end and every train.checkpoint_minutes); train again without "
                                "--resume")
        if not resume and checkpoint.has_state(self.out_dir):
            raise TrainingError(
                f"{self.out_dir} already holds a training run: pass --resume, or choose a new directory"
            )
        if not self.dataset_dir.is_dir():
            raise TrainingError(f"{self.dataset_dir}: dataset directory not found")
        if not resume:  # the fields used are recorded: evaluating and serving the model read texts the same way
            cfg.data = dataset_data_config(self.dataset_dir, cfg.data)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.group.is_main:
            write_json(self.out_dir / "config.json", cfg.to_dict())
        reuse_freed_memory()
        t_start = time.perf_counter()
        self.featurizer, data = self._prepare(resume)
        release_freed_memory()  # the tf-idf fit's working memory
        L = data.train.num_labels
        C = cfg.model.num_clusters(L)
        torch.manual_seed(cfg.train.seed)
        if cfg.model.dim == 0 or cfg.train.batch_size == 0:  # the width and batch chosen by the data, recorded
            cfg.model.dim = cfg.model.embedding_dim(L)
            cfg.train.batch_size = batch_size(cfg, L, data.Y_train.shape[0])
            if self.group.is_main:
                write_json(self.out_dir / "config.json", cfg.to_dict())
        encoder = make_encoder(cfg, self.featurizer, L)
        if isinstance(encoder, FrozenBase):
            encoder.set_cache(self.embedding_cache(), self.progress)
        if isinstance(encoder, TransformerEncoder):  # fine-tuned: its forward and backward in bf16 where native
            encoder.bf16 = self.matmul_dtype == torch.bfloat16
        model = EliasModel(encoder, L, C, min(cfg.model.kappa, L), cfg.model).to(self.device)

        state_t, state_m = (checkpoint.load_state(self.out_dir) if resume else ({}, {}))
        progress_state = state_m.get("progress", {})
        self.history = progress_state.get("history", [])
        if resume:
            _log(f"resuming from stage {progress_state['stage']}, epoch {progress_state['epoch']}", self.progress)
            mt = checkpoint.model_tensors(state_t)
            model.set_graph(mt["A_ids"], mt["A_logits"], stage=int(mt["stage"]))
            model.load_state_dict(mt)
        else:
            t0 = time.perf_counter()
            Z = pifa(data.X_train, data.Y_train)
            partition = balanced_clusters(Z, C, seed=cfg.train.seed, progress=self.progress)
            model.set_partition(partition)
            del Z
            release_freed_memory()
            self.timings["stage0_s"] = time.perf_counter() - t0
            _log(f"stage 0: {C} clusters of {min(map(len, partition))}-{max(map(len, partition))} labels "
                 f"({self.timings['stage0_s']:.1f} s)", self.progress)
            progress_state = {"stage": 1, "epoch": 0}
        self.timings.update(progress_state.get("timings", {}))

        # The tf-idf encoders read the features load_data computed; the others tokenise or embed the texts.
        t0 = time.perf_counter()
        enc = model.encoder
        if isinstance(enc, FrozenBase) and enc.cache is not None and self.group.active and data.train.texts:
            distributed.share_embeddings(enc.cache, enc.frozen, list(data.train.texts), self.group, self.device,
                                         self.progress)
        inputs = encoder_inputs(model.encoder, data.X_train, data.train)
        self.timings["encoder_inputs_s"] = time.perf_counter() - t0
        if not resume and cfg.train.init == "centroid":
            t0 = time.perf_counter()
            centroids, mean_norm = label_centroids(model, inputs, data.Y_train, cfg.train.eval_batch_size,
                                                   self.device)
            # init_scale is the starting logit of a query on its label's centroid for a unit-length embedding, as
            # the tf-idf, frozen and hybrid encoders give at the start; a transformer's pooled output is longer
            # (MiniLM: about 6), and unscaled rows would start with saturated logits and exploding gradients.
            scale = cfg.train.init_scale / (mean_norm if isinstance(model.encoder, TransformerEncoder) else 1.0)
            n = centroid_init(model, centroids, partition, scale, cfg.train.init_label_bias)
            self.timings["init_s"] = time.perf_counter() - t0
            _log(f"W_L and W_C start at label centroids ({n:,} labels, {self.timings['init_s']:.1f} s)", self.progress)
        stage = int(progress_state["stage"])
        if stage == 1:
            self._run_stage(model, data, inputs, 1, progress_state, state_t, state_m)
            state_t, state_m = {}, {}
            self.stage2_skipped = self._stage1_unconverged()
            if self.stage2_skipped:
                _log(f"stage 2 {self.stage2_skipped}", self.progress)
        if stage == 1 and not self.stage2_skipped:
            t0 = time.perf_counter()
            ids, scores = top_clusters(
                model, inputs, cfg.train.init_top_clusters, cfg.train.eval_batch_size, self.device
            )
            aff = cluster_affinity(ids, scores, data.Y_train, C)
            partition = [np.asarray(r[r < L].cpu().numpy()) for r in model.A_ids]
            A_ids, A_logits = init_graph(aff, partition, min(cfg.model.kappa, L))
            model.set_graph(A_ids, A_logits, stage=2)
            self.timings["graph_init_s"] = time.perf_counter() - t0
            _log(f"A initialised: {int((A_ids < L).sum()):,} edges, every label covered "
                 f"({self.timings['graph_init_s']:.1f} s)", self.progress)
            progress_state = {"stage": 2, "epoch": 0, "history": self.history,
                              "best_metric": progress_state.get("best_metric", -1.0)}
        if not self.stage2_skipped:
            self._run_stage(model, data, inputs, 2, progress_state, state_t, state_m)
        self._wait_for_writes()  # what follows reads the model directory
        if self.group.is_main and not (self.out_dir / "model.json").exists():
            # stage2_epochs=0: the stage-1 model with A initialised
            self._save(model, data, {"selected": {"stage": 2, "epoch": 0}, "history": self.history})
        self.group.barrier()
        if not self.group.is_main:  # the rest (the ELIAS++ ranker, the final metadata) is rank 0's
            return None
        self._solo_threads()
        if cfg.train.reranker:
            # The ranker reads the selected model back from disk: the trained one (and its optimiser state, gone
            # with the stage) would only hold memory meanwhile.
            del model, enc, inputs
            gc.collect()
            release_freed_memory()
            self._train_reranker(data)
        self.timings["total_s"] = time.perf_counter() - t_start + progress_state.get("elapsed_before_s", 0.0)
        best = self.out_dir / "model.json"
        if best.exists():  # record the total time in the selected model's metadata
            meta = json.loads(best.read_text())
            meta["timings"] = {**meta.get("timings", {}), **self.timings}
            meta["history"] = self.history
            if self.stage2_skipped:
                meta["stage2_skipped"] = self.stage2_skipped
            write_json(best, meta)
        return load_model_dir(self.out_dir, self.device)

    def _run_stage(self, model: EliasModel, data: TrainData, inputs: EncoderInputs, stage: int,
                   progress_state: dict[str, Any], state_t: dict, state_m: dict) -> None:
        cfg, t = self.cfg, self.cfg.train
        n = len(inputs)
        steps_per_epoch = math.ceil(n / t.batch_size)
        epochs = stage_epochs(t, stage, steps_per_epoch)
        lam = t.lambda_stage1 if stage == 1 else t.lambda_stage2
        model.dropout.p = embed_dropout(cfg.model, epochs)
        self.dropouts[f"stage{stage}"] = model.dropout.p
        self.group.broadcast_module(model)  # every rank starts the stage from rank 0's tensors, exactly
        opts, scheds = make_optimizers(model, cfg, stage, max(1, epochs * steps_per_epoch))
        start_epoch = int(progress_state.get("epoch", 0))
        best_metric = float(progress_state.get("best_metric", -1.0))
        if state_t:
            checkpoint.restore_training(state_t, state_m, opts, scheds)
        Y = data.Y_train
        has_dev = data.dev is not None
        # Stage 2 must earn its time: it is evaluated on dev early, after a fraction of its first epoch (of its
        # minimum steps, when more), and stopped there unless it already does better than the best model so far.
        probe_at = math.ceil(t.stage2_probe_fraction * max(steps_per_epoch, min_steps(t, 2))) if (
            stage == 2 and has_dev and start_epoch == 0 and best_metric >= 0 and 0 < t.stage2_probe_fraction < 1
            and epochs > 0) else 0
        stale = int(progress_state.get("stale", 0))  # evaluations in a row without a better dev metric
        # The first evaluation after a re-clustering does not count against patience: W_C has just started over.
        grace = bool(progress_state.get("grace", False))
        for epoch in range(start_epoch, epochs):
            t_epoch = time.perf_counter()
            seed = t.seed + 1000 * stage + epoch
            torch.manual_seed(seed)
            order = np.random.default_rng(seed).permutation(n)
            if stage == 2:
                model.update_parents()
            model.train()
            tot_loss, tot_recall, seen, probe = 0.0, 0.0, 0, None
            with Progress(TextColumn("[bold]stage {task.fields[stage]} epoch {task.fields[epoch]}"), BarColumn(),
                          MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                          TextColumn("{task.fields[rate]:.0f} ex/s"), TimeElapsedColumn(),
                          disable=not self.progress, transient=True) as bar:
                task = bar.add_task("", total=n, stage=stage, epoch=f"{epoch + 1}/{epochs}", loss=0.0, rate=0.0)
                for step, start in enumerate(range(0, n, t.batch_size), 1):
                    rows = order[start: start + t.batch_size]
                    loss, stats = train_step(model, inputs, Y, rows, lam, opts, self.device, self.matmul_dtype,
                                             self.group)
                    for s in scheds.values():
                        s.step()
                    n_local = len(self.group.shard(rows))
                    tot_loss += loss * n_local
                    tot_recall += stats["recall"] * n_local
                    seen += n_local
                    bar.update(task, advance=len(rows), loss=tot_loss / max(1, seen),
                               rate=seen * self.group.world / max(1e-9, time.perf_counter() - t_epoch))
                    if epoch * steps_per_epoch + step == probe_at:
                        probe = self._evaluate_dev(model, data)
                        if probe[t.select_metric] <= best_metric:
                            break
                        model.train()
            tot_loss, tot_recall, seen = self.group.sum_floats([tot_loss, tot_recall, seen], self.device)
            record: dict[str, Any] = {
                "stage": stage, "epoch": epoch + 1, "loss": tot_loss / max(1, seen),
                "train_shortlist_recall": tot_recall / max(1, seen), "epoch_s": time.perf_counter() - t_epoch,
            }
            key = f"stage{stage}_train_s"
            self.timings[key] = self.timings.get(key, 0.0) + record["epoch_s"]
            last = epoch + 1 == epochs
            stopped = probe is not None and probe[t.select_metric] <= best_metric
            if stopped:
                record.update(steps=probe_at, dev=probe)
                self.stage2_skipped = (
                    f"stopped after {probe_at} of its {epochs * steps_per_epoch} steps: dev {t.select_metric} "
                    f"{probe[t.select_metric]:.2f} did not beat the best model's {best_metric:.2f} "
                    f"({self._selected_name()})")
            elif has_dev and (last or (t.eval_every and (epoch + 1) % t.eval_every == 0)):
                record["dev"] = self._evaluate_dev(model, data)
            self.history.append(record)
            _log(_format_record(record), self.progress)
            if stopped:
                _log(f"stage 2 {self.stage2_skipped}: that model is kept", self.progress)
            metric = record.get("dev", {}).get(t.select_metric, -1.0)
            improved = "dev" in record and metric > best_metric
            due = time.perf_counter() - self.last_checkpoint >= 60 * t.checkpoint_minutes
            if improved or (not has_dev and last and stage == 2):
                best_metric = max(best_metric, metric)
                extra = {"selected": {"stage": stage, "epoch": epoch + 1, t.select_metric: metric},
                         "history": list(self.history)}
                if last or due:  # written now, from the live model
                    self.unsaved_best = None
                    self._save(model, data, extra)
                else:
                    self._hold_best(model, data, extra)
            stale = 0 if improved else stale + ("dev" in record and not grace)
            grace = grace and "dev" not in record
            # Dev early stopping: a stage ends once `patience` evaluations in a row did not improve on the best,
            # but not before its minimum number of steps (a small dataset's dev split is small and noisy).
            stopped = stopped or (has_dev and t.patience > 0 and stale >= t.patience
                                  and (epoch + 1) * steps_per_epoch >= min_steps(t, stage))
            if stopped and not last:
                _log(f"stage {stage}: dev {t.select_metric} has not improved; the stage ends here", self.progress)
            if stage == 1 and epoch + 1 == recluster_epoch(t.recluster_fraction, epochs) and not (stopped or last):
                self._recluster(model, data, inputs, opts["dense"])
                grace = True
            progress = {"stage": stage, "epoch": epochs if stopped else epoch + 1, "best_metric": best_metric,
                        "stale": stale, "grace": grace, "history": self.history, "timings": self.timings}
            self.unsaved_records.append(json.loads(json.dumps(record)))
            if self.group.is_main and (due or last or stopped):
                self._flush_best()  # the checkpoint's best_metric names the model on disk
                t0 = time.perf_counter()
                staged = checkpoint.stage_state(self.out_dir, model, opts, scheds, progress)
                self.writes.submit(self._commit_epoch, staged, self.unsaved_records)
                self.unsaved_records, self.last_checkpoint = [], time.perf_counter()
                self._saving(t0)
            if stopped:
                break
        self._flush_best()
        self.best_copy = None
        progress_state["epoch"] = epochs
        progress_state["best_metric"] = best_metric

    def _stage1_unconverged(self) -> str:
        """Why stage 2 is skipped (`train.stage2_after_convergence`), or "" when it runs: stage 1's last dev
        evaluation beat every earlier one, so its epoch budget, not convergence, ended it."""
        t = self.cfg.train
        evals = [r["dev"][t.select_metric] for r in self.history if r["stage"] == 1 and "dev" in r]
        if not t.stage2_after_convergence or t.stage2_epochs == 0 or len(evals) < 2 or evals[-1] <= max(evals[:-1]):
            return ""
        return (f"skipped: stage 1 was still improving at its last epoch (dev {t.select_metric} {max(evals[:-1]):.2f} "
                f"before it, {evals[-1]:.2f} after it), not converged")

    def _selected_name(self) -> str:
        """'stage S epoch E' of the model selected on dev so far (the last record that improved the metric)."""
        key, best, name = self.cfg.train.select_metric, -1.0, "none yet"
        for r in self.history:
            m = r.get("dev", {}).get(key, -1.0)
            if "dev" in r and m > best:
                best, name = m, f"stage {r['stage']} epoch {r['epoch']}"
        return name

    def _recluster(self, model: EliasModel, data: TrainData, inputs: EncoderInputs,
                   dense: torch.optim.Optimizer) -> None:
        """Cluster the labels again on [mean embedding | PIFA] with the model trained so far; W_C, b_C start over
        at the new clusters (their optimiser state too), W_L and the encoder keep what they learned.

        A cluster's row starts as the normalised sum of its labels' (normalised) trained W_L rows, as centroid_init
        starts it from the labels' first rows."""
        t0 = time.perf_counter()
        t = self.cfg.train
        centroids, _ = label_centroids(model, inputs, data.Y_train, t.eval_batch_size, self.device)
        Z = joint_features(centroids.cpu().numpy(), pifa(data.X_train, data.Y_train))
        partition = balanced_clusters(Z, model.num_clusters, seed=t.seed + 1, progress=self.progress)
        model.set_partition(partition)
        cluster_init(model, model.W_L.detach().float(), partition, float(model.W_C.detach().norm(dim=1).mean()))
        for p in (model.W_C, model.b_C):
            dense.state.pop(p, None)
        del centroids, Z
        release_freed_memory()  # the clustering's working memory, before stage 1 goes on beside it
        self.group.broadcast_module(model)
        self.timings["recluster_s"] = time.perf_counter() - t0
        _log(f"labels clustered again on the embeddings and PIFA ({self.timings['recluster_s']:.1f} s)",
             self.progress)

    def _evaluate_dev(self, model: EliasModel, data: TrainData) -> dict[str, float]:
        """The model's dev metrics (P@1, P@5, nDCG@5, R@10, R@100) at the search defaults; leaves it in eval mode.
        Rank 0 evaluates; every rank gets its figures."""
        model.eval()
        metrics = None
        if self.group.is_main:
            self._solo_threads()
            metrics = self._dev_metrics(model, data)
            self._shared_threads()
        return self.group.broadcast_object(metrics)

    def _dev_metrics(self, model: EliasModel, data: TrainData) -> dict[str, float]:
        t0 = time.perf_counter()
        cfg = self.cfg
        assert data.dev is not None
        if self.dev_inputs is None:  # featurised (or tokenised, or embedded) once for every evaluation
            X_dev = self.featurizer.transform(data.dev) if isinstance(model.encoder, (
                TfidfEncoder, HybridEncoder)) else None
            self.dev_inputs = encoder_inputs(model.encoder, X_dev, data.dev)
        dev = evaluate_split(model.encoder, model.search_tensors(), data.dev, data.label_counts, len(data.train),
                             cfg.model.beam_size, cfg.model.shortlist_size, cfg.train.eval_batch_size,
                             inputs=self.dev_inputs)
        self.timings["dev_eval_s"] = self.timings.get("dev_eval_s", 0.0) + time.perf_counter() - t0
        return {k: dev[k] for k in ("P@1", "P@5", "nDCG@5", "R@10", "R@100")}

    def _train_reranker(self, data: TrainData) -> None:
        """ELIAS++: fit the sparse ranker on the selected model's training shortlists; its pruning threshold and
        fusion weight from dev."""
        t0 = time.perf_counter()
        cfg, t = self.cfg, self.cfg.train
        best = load_model_dir(self.out_dir, self.device)
        enc, tensors = best.model.encoder, best.model.search_tensors()
        if isinstance(enc, FrozenBase):
            enc.set_cache(self.embedding_cache(), self.progress)
        beam, K = cfg.model.beam_size, cfg.model.shortlist_size
        report: dict[str, Any] = {}
        depth = t.reranker_depth or SHALLOW_DEPTH
        if data.dev is not None:
            dev_ids, dev_scores = predict(enc, tensors, data.dev, depth if t.reranker_depth else DEEP_DEPTH, beam, K,
                                          t.eval_batch_size, inputs=self.dev_inputs)
            if not t.reranker_depth:
                depth, missed = choose_depth(dev_ids, data.dev.labels, data.train.num_labels)
                report["dev_positives_below_100_of_top_300"] = round(missed, 4)
                _log(f"ELIAS++ ranker depth {depth}: {100 * missed:.1f}% of the dev positives in ELIAS's top "
                     f"{DEEP_DEPTH} rank below 100", self.progress)
            dev_ids, dev_scores = dev_ids[:, :depth], dev_scores[:, :depth]
        ids, _ = predict(enc, tensors, data.train, depth, beam, K, t.eval_batch_size, self.progress,
                         inputs=encoder_inputs(enc, data.X_train, data.train))
        seconds = {"shortlists": time.perf_counter() - t0}
        n_jobs = max(1, t.threads or torch.get_num_threads())
        deep_keep = deep_keep_rate(t.reranker_deep_keep, depth, t.reranker_deep_from)
        report["deep_keep"] = round(deep_keep, 4)
        floor = min(t.reranker_thresholds)  # fitted once, keeping every weight any threshold could keep
        fit = functools.partial(train_ranker, c=t.reranker_c, threshold=floor, n_jobs=n_jobs, progress=self.progress,
                                seed=t.seed, deep_keep=deep_keep, deep_from=t.reranker_deep_from, tol=t.reranker_tol)
        ranker = fit(data.X_train, data.Y_train, ids)
        seconds["fit"] = time.perf_counter() - t0 - seconds["shortlists"]
        threshold = max(t.reranker_thresholds)
        if data.dev is not None:
            X_dev = tfidf_rows(self.dev_inputs)
            if X_dev is None:
                X_dev = self.featurizer.transform(data.dev)
            threshold, weight, by_threshold = choose_pruning(
                ranker, t.reranker_thresholds, X_dev, dev_ids, dev_scores, data.dev.labels, data.label_counts,
                len(data.train), t.select_metric)
            report["dev_" + t.select_metric + "_by_fusion_weight"] = {
                str(k): v for k, v in by_threshold[threshold].items()}
            report["dev_" + t.select_metric + "_by_threshold"] = {
                str(thr): max(by_w.values()) for thr, by_w in by_threshold.items()}
            if data.dev_is_holdout:  # the settings are chosen; the held-out points now train the ranker too
                ranker = fit(sp.vstack([data.X_train, X_dev], format="csr"),
                             sp.vstack([data.Y_train, data.dev.known_labels()], format="csr"),
                             np.concatenate([ids, dev_ids]))
            ranker.fusion_weight = weight
        ranker = ranker.pruned(threshold)
        ranker.depth = depth
        report.update(nnz=int(ranker.W.nnz), threshold=threshold, depth=depth)
        with atomic_dir(self.out_dir / "ranker") as tmp:
            ranker.save(tmp)
        self.timings["reranker_s"] = time.perf_counter() - t0
        report["fusion_weight"] = ranker.fusion_weight
        seconds["choice_and_save"] = self.timings["reranker_s"] - seconds["shortlists"] - seconds["fit"]
        report["seconds"] = {k: round(v, 1) for k, v in seconds.items()}  # the holdout's refit is in the last
        _log(f"ELIAS++ ranker: {ranker.W.nnz:,} weights (pruned below {threshold:g}), fusion weight "
             f"{ranker.fusion_weight} ({self.timings['reranker_s']:.1f} s)", self.progress)
        meta_path = self.out_dir / "model.json"
        meta = json.loads(meta_path.read_text())
        meta["reranker"] = report
        write_json(meta_path, meta)

    def _commit_epoch(self, staged: StagedDir, records: list[dict[str, Any]]) -> None:
        """Put a staged checkpoint in place, then the lines of history.jsonl of the epochs it holds (those after
        the last checkpoint: an epoch that a resume runs again is logged once)."""
        staged.commit()
        for record in records:
            self._append_history(record)

    def _append_history(self, record: dict[str, Any]) -> None:
        with open(self.out_dir / "history.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def model_featurizer(model: EliasModel, fallback: TfidfFeaturizer) -> TfidfFeaturizer:
    return model.encoder.featurizer if isinstance(model.encoder, TfidfEncoder) else fallback


def _format_record(r: dict[str, Any]) -> str:
    s = (f"stage {r['stage']} epoch {r['epoch']}: loss {r['loss']:.4f}, "
         f"train shortlist recall {100 * r['train_shortlist_recall']:.1f}%, {r['epoch_s']:.1f} s")
    if "dev" in r:
        s += " | dev " + ", ".join(f"{k} {v:.2f}" for k, v in r["dev"].items())
    return s


def _train_rank(dataset_dir: str | Path, out_dir: str | Path, cfg: EliasConfig, resume: bool, progress: bool) -> None:
    Trainer(dataset_dir, out_dir, cfg, progress).run(resume)


def train(dataset_dir: str | Path, out_dir: str | Path, cfg: EliasConfig | None = None, resume: bool = False,
          progress: bool = True, nproc: int = 1) -> TrainedModel | None:
    """Train ELIAS on DATASET_DIR (train split; dev for model selection) and write the model to OUT_DIR.

    `nproc` > 1 trains data-parallel in that many processes started here (trainer/distributed.py). Under torchrun
    (WORLD_SIZE set) every process calls this with nproc=1 and joins torchrun's group; all but rank 0 return None.
    """
    cfg = cfg or EliasConfig()
    if nproc < 1:
        raise TrainingError(f"--nproc must be at least 1, got {nproc}")
    if nproc > 1:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise TrainingError("--nproc starts its own processes: under torchrun leave it out")
        if distributed.backend(cfg.train.device) == "nccl" and nproc > torch.cuda.device_count():
            raise TrainingError(f"--nproc {nproc} on CUDA needs {nproc} GPUs; {torch.cuda.device_count()} found")
        distributed.launch(nproc, cfg.train.device, _train_rank, dataset_dir, out_dir, cfg, resume, progress)
        return load_model_dir(Path(out_dir), pick_device(cfg.train.device))
    distributed.init_from_env(cfg.train.device)
    return Trainer(dataset_dir, out_dir, cfg, progress).run(resume)
