"""Search results as `elias.v1` response bytes: the same bytes `SerializeToString` writes for the same message.

`result_to_proto` builds the message (the reference). `ResponseEncoder` writes most results faster: a hit is mostly
its label's constant fields (index, label_id, name), so every label's encoded hit up to its score is made once
(`HitHeads`) and a hit is that and the score's 4 bytes. A result it does not write itself (explanations, a score
of exactly +0.0, which proto3 leaves out) is the reference's bytes. Field numbers and wire types are
those of proto/elias/v1/searcher.proto.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from elias_retrieval.proto.elias.v1 import searcher_pb2 as pb
from elias_retrieval.searcher import LabelStrings, SearchResults

# One byte tags: field number << 3 | wire type (0 varint, 2 length-delimited, 5 fixed32). Field 1 of
# SearchResponse (result), SearchBatchResponse (results) and SearchResult (hits) is a message; field 2 of each
# (index_version, method) and of Hit (label_id) a string.
_MESSAGE_1, _STRING_2 = b"\x0a", b"\x12"
_INDEX, _NAME, _SCORE = b"\x08", b"\x1a", b"\x25"  # Hit.index, .name, .score
_ZERO_F32 = bytes(4)  # a score of +0.0: proto3 leaves the field out (-0.0 is written)
_BYTES = [bytes([n]) for n in range(0x80)]  # the varints of one byte


def result_to_proto(res: SearchResults, row: int) -> pb.SearchResult:
    """Row `row` of `res` as a message (its valid hits, with explanations when `res` has them)."""
    out = pb.SearchResult(method=res.methods[row] if res.methods else "ELIAS")
    n = len(res.label_ids[row])
    ids, scores = res.ids[row, :n].tolist(), res.scores[row, :n].tolist()  # Python scalars: 3x faster to copy
    add = out.hits.add  # built in place: extending by ready-made Hit messages would copy each one
    hits = [add(index=i, label_id=lid, name=name, score=sc)
            for i, lid, name, sc in zip(ids, res.label_ids[row], res.label_names[row], scores, strict=True)]
    if res.cluster is not None:
        for hit, c, p, q in zip(hits, res.cluster[row, :n].tolist(), res.path[row, :n].tolist(),  # type: ignore[index]
                                res.label_prob[row, :n].tolist(), strict=True):  # type: ignore[index]
            hit.explanation.cluster, hit.explanation.path_score, hit.explanation.label_score = c, p, q
    return out


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _BYTES[n]
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _message(tag: bytes, data: bytes) -> bytes:
    return tag + _varint(len(data)) + data


def _string(tag: bytes, s: str) -> bytes:
    return _message(tag, s.encode()) if s else b""


def _head(index: int, label_id: str, name: str) -> bytes:
    """A label's hit up to its score: the hit's tag and length (a 4-byte score included), index, label_id, name
    (each left out when 0 or empty, as proto3 does) and the score's tag."""
    fields = (_INDEX + _varint(index) if index else b"") + _string(_STRING_2, label_id) + _string(_NAME, name)
    return _MESSAGE_1 + _varint(len(fields) + 5) + fields + _SCORE


@lru_cache(maxsize=64)
def _split4(n: int) -> Callable[[bytes], tuple[bytes, ...]]:
    """Splits 4n bytes into n 4-byte strings (each score's little-endian float32)."""
    return struct.Struct("4s" * n).unpack


@dataclass(frozen=True)
class Encoded:
    """A response already serialized; `index_version` as the message would have it (the access log reads it)."""

    data: bytes
    index_version: str

    def SerializeToString(self) -> bytes:  # the message method that a response serializer calls
        return self.data


class HitHeads:
    """Every label's hit up to its score (`_head`), one buffer for the whole index: label j's is
    `data[start[j]:start[j + 1]]`. Made once per served index (1-2 s per million labels, and about
    the labels' strings' size in memory), so that no response pays for its labels' fields."""

    def __init__(self, labels: LabelStrings, num_labels: int):
        ids = labels.ids if labels.ids is not None else [str(j) for j in range(num_labels)]
        names = labels.names if labels.names is not None else [""] * num_labels
        if isinstance(ids, Mapping) or isinstance(names, Mapping):
            raise TypeError("HitHeads needs the whole vocabulary (sequences of ids and names)")
        heads = list(map(_head, range(num_labels), ids, names))
        self.labels = labels
        self.data = b"".join(heads)
        self.start = np.zeros(num_labels + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, heads), dtype=np.int64, count=num_labels), out=self.start[1:])


class ResponseEncoder:
    """`SearchResponse` / `SearchBatchResponse` bytes of `SearchResults`, each hit its label's head and its score.

    With `HitHeads` (one index's, made beforehand: `elias serve` makes them while it loads the index) a result
    costs a few microseconds per hit; results of other labels, with explanations or with a score of +0.0 (proto3
    leaves it out, so the head's length would be wrong) are the reference's bytes.
    """

    def __init__(self, heads: HitHeads | None = None):
        self.heads = heads

    def search_response(self, res: SearchResults, index_version: str) -> Encoded:
        return Encoded(_message(_MESSAGE_1, self.result(res, 0)) + _string(_STRING_2, index_version), index_version)

    def batch_response(self, res: SearchResults, index_version: str) -> Encoded:
        results = b"".join(_message(_MESSAGE_1, self.result(res, i)) for i in range(len(res)))
        return Encoded(results + _string(_STRING_2, index_version), index_version)

    def result(self, res: SearchResults, row: int) -> bytes:
        """Row `row` of `res` as an encoded `SearchResult`: `result_to_proto(res, row).SerializeToString()`.

        Few numpy calls: after a search their code and data are cold, and each costs microseconds.
        """
        heads = self.heads
        if heads is None or res.cluster is not None or res.labels is not heads.labels:
            return result_to_proto(res, row).SerializeToString()
        ids = res.ids[row]
        n = int(np.count_nonzero(ids >= 0))
        scores = _split4(n)(res.scores[row, :n].astype("<f4", copy=False).tobytes())
        if _ZERO_F32 in scores:
            return result_to_proto(res, row).SerializeToString()
        data, start = heads.data, heads.start
        ids = ids[:n]
        parts = [b""] * (2 * n)  # head, score, head, score, ...
        parts[0::2] = [data[a:b] for a, b in zip(start[ids].tolist(), start[ids + 1].tolist(), strict=True)]
        parts[1::2] = scores
        return b"".join(parts) + _string(_STRING_2, res.methods[row] if res.methods else "ELIAS")
