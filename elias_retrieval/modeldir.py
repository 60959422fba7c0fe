"""A trained model is a directory you can `ls` (docs/architecture.md): config, labels, encoder, tensors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from elias_retrieval.atomic import atomic_dir, write_json, write_safetensors
from elias_retrieval.config import EliasConfig
from elias_retrieval.data import LabelVocab
from elias_retrieval.encoders import load_encoder
from elias_retrieval.features import TfidfFeaturizer
from elias_retrieval.model import EliasModel
from elias_retrieval.reranker import SparseRanker, has_ranker

MODEL_TENSORS = "model.safetensors"
MODEL_META = "model.json"


class ModelDirError(ValueError):
    """A model directory is missing a file or holds inconsistent data."""


@dataclass
class TrainedModel:
    config: EliasConfig
    model: EliasModel
    vocab: LabelVocab
    featurizer: TfidfFeaturizer
    meta: dict[str, Any]
    train_label_counts: torch.Tensor  # (L,) training positives per label, for PSP and frequency buckets
    ranker: SparseRanker | None = None  # ELIAS++ re-ranker, when trained


def save_model_dir(
    directory: str | Path,
    model: EliasModel,
    config: EliasConfig,
    vocab: LabelVocab,
    featurizer: TfidfFeaturizer,
    train_label_counts: torch.Tensor,
    meta: dict[str, Any],
) -> None:
    """Write (or overwrite) a model directory; each file is replaced atomically, tensors last but one."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / "config.json", config.to_dict())
    if not (d / "labels.jsonl").exists():
        vocab.save(d / "labels.jsonl")
    if not (d / "featurizer").exists():
        with atomic_dir(d / "featurizer") as tmp:
            featurizer.save(tmp)
    with atomic_dir(d / "encoder") as tmp:
        model.encoder.save(tmp)
    tensors = {
        "W_C": model.W_C, "b_C": model.b_C, "A_ids": model.A_ids, "A_logits": model.A_logits,
        "W_L": model.W_L, "b_L": model.b_L, "label_parent": model.label_parent,
        "train_label_counts": train_label_counts,
    }
    write_safetensors(d / MODEL_TENSORS, tensors)
    full_meta = {
        **meta,
        "stage": int(model.stage),
        "num_labels": model.num_labels,
        "num_clusters": model.num_clusters,
        "kappa": model.kappa,
        "dim": model.encoder.dim,
        "encoder": model.encoder.kind,
    }
    write_json(d / MODEL_META, full_meta)


def is_model_dir(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / MODEL_META).is_file() and (d / MODEL_TENSORS).is_file()


def load_model_dir(directory: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Load a model directory written by `save_model_dir` (JSON + safetensors only)."""
    d = Path(directory)
    for name in ("config.json", MODEL_META, MODEL_TENSORS, "labels.jsonl", "featurizer", "encoder"):
        if not (d / name).exists():
            raise ModelDirError(f"{d}: not a model directory (missing {name})")
    config = EliasConfig.load(d / "config.json")
    meta = json.loads((d / MODEL_META).read_text())
    vocab = LabelVocab.load(d / "labels.jsonl")
    featurizer = TfidfFeaturizer.load(d / "featurizer")
    encoder = load_encoder(d / "encoder")
    t = load_file(str(d / MODEL_TENSORS))
    L, C = int(meta["num_labels"]), int(meta["num_clusters"])
    if len(vocab) != L or t["W_L"].shape[0] != L or t["W_C"].shape[0] != C:
        raise ModelDirError(f"{d}: labels.jsonl, model.json and {MODEL_TENSORS} disagree on L or C")
    model = EliasModel(encoder, L, C, t["A_ids"].shape[1], config.model)
    model.set_graph(t["A_ids"], t["A_logits"], stage=int(meta["stage"]))
    with torch.no_grad():
        for name in ("W_C", "b_C", "W_L", "b_L"):
            getattr(model, name).copy_(t[name])
    model.label_parent = t["label_parent"]
    model.to(device).eval()
    ranker = SparseRanker.load(d / "ranker") if has_ranker(d / "ranker") else None
    return TrainedModel(config, model, vocab, featurizer, meta, t["train_label_counts"], ranker)
