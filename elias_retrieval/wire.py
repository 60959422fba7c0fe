"""Search results as `elias.v1` response bytes: the same bytes `SerializeToString` writes for the same message.

`result_to_proto` builds the message (the reference). `ResponseEncoder` writes most results faster: a hit is mostly
its label's constant fields (index, label_id, name), so it keeps each label's encoded hit up to its score and
appends the score's 4 bytes. A result it does not write itself (explanations, a score of exactly +0.0, which
proto3 leaves out, or mostly labels not cached) is the reference's bytes. Field numbers and wire types are
those of proto/elias/v1/searcher.proto.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
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


class ResponseEncoder:
    """`SearchResponse` / `SearchBatchResponse` bytes of `SearchResults`, with each label's head cached.

    Made after a search, a head costs microseconds, which a label seen once never pays back: a result of mostly
    uncached labels is the reference's bytes, and caches them only when a result led by the same label came before
    (a query, or its neighbourhood, repeats); a result of mostly cached labels caches the rest. At most
    `max_labels` heads (about 180 bytes each with 30-character ids and names; when full, the cache starts again);
    the cache belongs to one `LabelStrings` (one index): results of other labels start it again. Thread-safe.
    """

    def __init__(self, max_labels: int = 1 << 18):
        self.max_labels = max_labels
        # (the labels of the cache, their heads by dense id, the top labels of results of mostly uncached labels)
        self._cache: tuple[LabelStrings | None, dict[int, bytes], set[int]] = (None, {}, set())

    def search_response(self, res: SearchResults, index_version: str) -> Encoded:
        return Encoded(_message(_MESSAGE_1, self.result(res, 0)) + _string(_STRING_2, index_version), index_version)

    def batch_response(self, res: SearchResults, index_version: str) -> Encoded:
        results = b"".join(_message(_MESSAGE_1, self.result(res, i)) for i in range(len(res)))
        return Encoded(results + _string(_STRING_2, index_version), index_version)

    def result(self, res: SearchResults, row: int) -> bytes:
        """Row `row` of `res` as an encoded `SearchResult`: `result_to_proto(res, row).SerializeToString()`.

        Few numpy calls: after a search their code and data are cold, and each costs microseconds.
        """
        if res.cluster is not None:
            return result_to_proto(res, row).SerializeToString()
        ids = res.ids[row].tolist()
        while ids and ids[-1] < 0:  # the -1s after the last reachable label
            ids.pop()
        cache, tops = self._cache_of(res.labels)
        heads = list(map(cache.get, ids))
        new = [j for j, h in enumerate(heads) if h is None]
        if 2 * len(new) > len(ids):  # mostly uncached labels: the reference writes them as fast
            data = result_to_proto(res, row).SerializeToString()
            if ids[0] in tops:
                self._add(cache, [ids[j] for j in new], [res.label_ids[row][j] for j in new],
                          [res.label_names[row][j] for j in new])
            else:
                if len(tops) >= self.max_labels:
                    tops.clear()
                tops.add(ids[0])
            return data
        if new:
            new_ids = [ids[j] for j in new]
            dense = np.array([new_ids], dtype=np.int64)
            made = self._add(cache, new_ids, res.labels.ids_of(dense)[0], res.labels.names_of(dense)[0])
            for j, head in zip(new, made, strict=True):
                heads[j] = head
        scores = _split4(len(ids))(res.scores[row, :len(ids)].astype("<f4", copy=False).tobytes())
        if _ZERO_F32 in scores:  # left out of its hit: that head's length is wrong
            return result_to_proto(res, row).SerializeToString()
        parts = heads * 2  # head, score, head, score, ...
        parts[0::2], parts[1::2] = heads, scores
        return b"".join(parts) + _string(_STRING_2, res.methods[row] if res.methods else "ELIAS")

    def _cache_of(self, labels: LabelStrings) -> tuple[dict[int, bytes], set[int]]:
        """The heads cached of `labels` and the top labels seen (both new for other labels than the last)."""
        cached, cache, tops = self._cache
        if cached is not labels:
            cache, tops = {}, set()
            self._cache = (labels, cache, tops)
        return cache, tops

    def _add(self, cache: dict[int, bytes], ids: list[int], label_ids: list[str], names: list[str]) -> list[bytes]:
        """Make the heads of these labels and cache them (starting again when full)."""
        made = list(map(_head, ids, label_ids, names))
        if len(cache) + len(made) > self.max_labels:
            cache.clear()
        cache.update(zip(ids, made, strict=True))
        return made
