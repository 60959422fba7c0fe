"""Encoders over a frozen transformer: the transformer embeds each document once, a small layer on top trains.

- `FrozenTransformerEncoder` (`model.encoder=frozen`): the frozen embedding through a trainable projection and
  a residual GELU layer (the tf-idf encoder's head).
- `HybridEncoder` (`model.encoder=hybrid`): the tf-idf encoder, trained end to end as usual, plus the frozen
  embedding through a trainable projection, summed.

Training reads the embeddings from a cache (`EmbeddingCache`: safetensors files in the model directory's
`embeddings/`, keyed by the texts and the transformer's settings), so the train split is embedded once for all
stages and for the ELIAS++ ranker's shortlists. Search embeds a text query the same way, in its batch.
Embedding runs in bf16 (autocast, fp32 accumulation) where the hardware has native bf16, else fp32.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from safetensors.torch import load_file
from torch import Tensor, nn

from elias_retrieval.atomic import write_json, write_safetensors
from elias_retrieval.data import Dataset
from elias_retrieval.encoders import (
    ENCODER_FILE,
    ENCODERS,
    Encoder,
    EncoderError,
    SparseInputs,
    TfidfEncoder,
    TransformerEncoder,
)
from elias_retrieval.precision import has_fast_bf16

EMBED_BATCH = 64


class DenseInputs:
    """Precomputed embeddings; a batch is their rows."""

    def __init__(self, E: Tensor):
        self.E = E.float().contiguous()

    def __len__(self) -> int:
        return self.E.shape[0]

    def batch(self, rows: np.ndarray, device: torch.device) -> dict[str, Tensor]:
        return {"embeddings": self.E[torch.from_numpy(np.asarray(rows, dtype=np.int64))].to(device)}


class HybridInputs:
    """tf-idf rows and embeddings of the same documents."""

    def __init__(self, sparse: SparseInputs, dense: DenseInputs):
        if len(sparse) != len(dense):
            raise ValueError(f"{len(sparse)} tf-idf rows but {len(dense)} embeddings")
        self.sparse, self.dense = sparse, dense

    def __len__(self) -> int:
        return len(self.dense)

    def batch(self, rows: np.ndarray, device: torch.device) -> dict[str, Tensor]:
        return {**self.sparse.batch(rows, device), **self.dense.batch(rows, device)}


def _texts(data: Dataset | list[str]) -> list[str]:
    texts = data if isinstance(data, list) else data.texts
    if texts is None:
        raise EncoderError("a transformer-based encoder needs raw text; this dataset has only sparse features")
    return list(texts)


class FrozenTransformer(nn.Module):
    """A transformer that is never trained: embeddings of texts, batched by length, L2-normalised."""

    def __init__(self, transformer: TransformerEncoder):
        super().__init__()
        self.transformer = transformer
        self.transformer.requires_grad_(False)
        self.transformer.bf16 = False  # the precision is this wrapper's own autocast (`bf16` below)
        self.transformer.eval()
        self.dim = transformer.dim
        self.bf16 = "auto"  # "auto": bf16 where native; "fp32" / "bf16" force one (the benchmarks compare them)

    def train(self, mode: bool = True) -> FrozenTransformer:
        super().train(mode)
        self.transformer.eval()  # no dropout: the same embedding in training and at search time
        return self

    def settings(self) -> dict[str, Any]:
        t = self.transformer
        return {"model": self.fingerprint(), "pooling": t.pooling, "max_length": t.max_length}

    def fingerprint(self) -> str:
        """A hash of the transformer's weights: the same model wherever its directory is (a saved copy too)."""
        if not hasattr(self, "_fingerprint"):
            h = hashlib.sha256()
            for name, v in sorted(self.transformer.model.state_dict().items()):
                h.update(name.encode())
                h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def use_bf16(self) -> bool:
        device = next(self.transformer.parameters()).device
        return self.bf16 == "bf16" or (self.bf16 == "auto" and has_fast_bf16(device))

    @torch.inference_mode()
    def embed(self, texts: list[str], progress: bool = False) -> Tensor:
        """(N, dim) fp32 embeddings; texts sorted by token count so that each batch pads little."""
        t = self.transformer
        device = next(t.parameters()).device
        tok = t.tokenizer(texts, max_length=t.max_length, truncation=True)
        ids = tok["input_ids"]
        order = np.argsort([len(x) for x in ids], kind="stable")
        out = torch.zeros(len(texts), self.dim)
        bf16 = self.use_bf16()
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("embedding", total=len(texts))
            for start in range(0, len(texts), EMBED_BATCH):
                rows = order[start: start + EMBED_BATCH]
                padded = t.tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
                batch = {k: padded[k].to(device) for k in ("input_ids", "attention_mask")}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    e = t(batch)
                out[torch.from_numpy(rows)] = nn.functional.normalize(e.float(), dim=1).cpu()
                bar.advance(task, len(rows))
        return out

    def embed_batch(self, batch: dict[str, Tensor]) -> Tensor:
        """Embeddings of a tokenised batch (the transformer encoder's batch dict)."""
        with torch.no_grad(), torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16,
                                             enabled=self.use_bf16()):
            return nn.functional.normalize(self.transformer(batch).float(), dim=1)


class EmbeddingCache:
    """Embeddings of whole splits as safetensors files in one directory, keyed by texts and transformer settings;
    those read or made in this process are kept in memory as well."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._memo: dict[str, Tensor] = {}

    def key(self, frozen: FrozenTransformer, texts: list[str]) -> str:
        h = hashlib.sha256(json.dumps({**frozen.settings(), "bf16": frozen.use_bf16()}, sort_keys=True).encode())
        for text in texts:
            h.update(text.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
        return h.hexdigest()[:32]

    def load(self, frozen: FrozenTransformer, texts: list[str]) -> Tensor | None:
        """The cached embeddings of `texts`, or None."""
        key = self.key(frozen, texts)
        if key in self._memo:
            return self._memo[key]
        path = self.directory / f"{key}.safetensors"
        if path.is_file():
            E = load_file(str(path))["embeddings"]
            if E.shape == (len(texts), frozen.dim):
                self._memo[key] = E
                return E
        return None

    def store(self, frozen: FrozenTransformer, texts: list[str], E: Tensor, write: bool = True) -> None:
        """Cache `E` as the embeddings of `texts`: in memory, and (`write`) in the directory, atomically."""
        key = self.key(frozen, texts)
        self._memo[key] = E
        if write:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_safetensors(self.directory / f"{key}.safetensors", {"embeddings": E}, metadata={
                "texts": str(len(texts)), **{k: str(v) for k, v in frozen.settings().items()}})

    def embed(self, frozen: FrozenTransformer, texts: list[str], progress: bool = False) -> Tensor:
        E = self.load(frozen, texts)
        if E is None:
            E = frozen.embed(texts, progress)
            self.store(frozen, texts, E)
        return E


class FrozenBase(Encoder):
    """What the frozen and hybrid encoders share: the frozen transformer, its embedding cache, saving."""

    frozen: FrozenTransformer
    cache: EmbeddingCache | None = None
    progress: bool = False

    def set_cache(self, directory: str | Path | None, progress: bool = False) -> None:
        """Keep the embeddings of whole datasets in `directory` (training); None: embed every time (search)."""
        self.cache = None if directory is None else EmbeddingCache(directory)
        self.progress = progress

    def embeddings(self, data: Dataset | list[str]) -> DenseInputs:
        texts = _texts(data)
        big = len(texts) > EMBED_BATCH
        if self.cache is not None and big:
            return DenseInputs(self.cache.embed(self.frozen, texts, self.progress))
        return DenseInputs(self.frozen.embed(texts, self.progress and big))

    def batch_embeddings(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["embeddings"] if "embeddings" in batch else self.frozen.embed_batch(batch)

    def _save_parts(self, d: Path) -> None:
        """Parts saved in their own subdirectories besides the transformer (the hybrid's tf-idf encoder)."""

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._save_parts(d)
        self.frozen.transformer.save(d / "transformer")
        write_safetensors(d / "head.safetensors", _head_state(self))
        write_json(d / ENCODER_FILE, {"kind": self.kind, "dim": self.dim})


def _load_transformer(d: Path) -> FrozenTransformer:
    meta = json.loads((d / "transformer" / ENCODER_FILE).read_text())
    return FrozenTransformer(TransformerEncoder.load(d / "transformer", meta))


_NOT_HEAD = ("frozen.", "tfidf.")  # saved in their own directories


def _head_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in module.state_dict().items() if not k.startswith(_NOT_HEAD)}


def _load_head(module: nn.Module, path: Path) -> None:
    got = module.load_state_dict(load_file(str(path)), strict=False)
    bad = [k for k in got.missing_keys if not k.startswith(_NOT_HEAD)] + list(got.unexpected_keys)
    if bad:
        raise EncoderError(f"{path}: does not match the encoder ({', '.join(bad[:3])})")


class FrozenTransformerEncoder(FrozenBase):
    kind = "frozen"

    def __init__(self, frozen: FrozenTransformer, dim: int):
        super().__init__()
        self.frozen, self.dim = frozen, dim
        self.proj = nn.Linear(frozen.dim, dim)
        nn.init.normal_(self.proj.weight, std=dim**-0.5)  # a unit embedding maps to about a unit vector
        nn.init.zeros_(self.proj.bias)
        self.hidden = nn.Linear(dim, dim)
        nn.init.zeros_(self.hidden.weight)

    def prepare(self, data: Dataset | list[str]) -> DenseInputs:
        return self.embeddings(data)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        h = self.proj(self.batch_embeddings(batch))
        return h + self.hidden(nn.functional.gelu(h))

    @classmethod
    def load(cls, directory: str | Path, meta: dict[str, Any]) -> FrozenTransformerEncoder:
        d = Path(directory)
        enc = cls(_load_transformer(d), int(meta["dim"]))
        _load_head(enc, d / "head.safetensors")
        return enc


class HybridEncoder(FrozenBase):
    """phi(x) = tfidf_encoder(x) + P e(x): the tf-idf encoder plus the frozen embedding e through a projection P."""

    kind = "hybrid"

    def __init__(self, tfidf: TfidfEncoder, frozen: FrozenTransformer):
        super().__init__()
        self.tfidf, self.frozen, self.dim = tfidf, frozen, tfidf.dim
        self.dense = nn.Linear(frozen.dim, tfidf.dim, bias=False)
        nn.init.normal_(self.dense.weight, std=tfidf.dim**-0.5)

    def prepare(self, data: Dataset | list[str]) -> HybridInputs:
        return HybridInputs(self.tfidf.prepare(data), self.embeddings(data))

    def prepare_with(self, X: Any, data: Dataset) -> HybridInputs:
        """`prepare` with the tf-idf rows already computed."""
        return HybridInputs(SparseInputs(X), self.embeddings(data))

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        if "features" not in batch:  # a tokenised batch: tf-idf rows are not at hand here
            raise EncoderError("the hybrid encoder needs the tf-idf rows and the embeddings of each document")
        return self.tfidf(batch) + self.dense(self.batch_embeddings(batch))

    def sparse_params(self) -> list[nn.Parameter]:
        return self.tfidf.sparse_params()

    def _save_parts(self, d: Path) -> None:
        self.tfidf.save(d / "tfidf")

    @classmethod
    def load(cls, directory: str | Path, meta: dict[str, Any]) -> HybridEncoder:
        d = Path(directory)
        tfidf = TfidfEncoder.load(d / "tfidf", json.loads((d / "tfidf" / ENCODER_FILE).read_text()))
        enc = cls(tfidf, _load_transformer(d))
        _load_head(enc, d / "head.safetensors")
        return enc


ENCODERS.update(frozen=FrozenTransformerEncoder, hybrid=HybridEncoder)
