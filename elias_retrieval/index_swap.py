"""Hot index swap: a new index is loaded, verified, checked and warmed beside the served one (then the server
switches to it, server.py `SearchServer.reload`), and the `elias.v1.Admin` service that asks for it.

A path is resolved again on every reload, so a "current" symlink that a deploy flips is followed. The new
index must pass `index_format.verify_index` (what `elias index verify` runs: sizes, shapes, A's ids, labels,
every file's sha256; it reads each file once, which also pages it in before the first query) and be
compatible with the served one: the same embedding dim and encoder kind, every query kind still accepted,
and the same sparse feature space when sparse queries were accepted. Anything else is `SwapRefused`, whose
message names the file and the reason; the served index is left as it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import grpc

from elias_retrieval.index_format import MANIFEST, IndexFormatError, verify_index
from elias_retrieval.proto.elias.v1 import admin_pb2 as admin_pb
from elias_retrieval.proto.elias.v1 import admin_pb2_grpc as admin_grpc
from elias_retrieval.searcher import Searcher, SearcherInfo

if TYPE_CHECKING:
    import torch

ADMIN_SERVICE_NAME = admin_pb.DESCRIPTOR.services_by_name["Admin"].full_name  # "elias.v1.Admin"


class SwapRefused(Exception):
    """The new index cannot replace the served one (the message names the file and the reason)."""


class SwapBusy(Exception):
    """Another reload is running (reloads are serialised)."""


class NotServing(Exception):
    """No index is served yet, so there is nothing to swap."""


@dataclass
class SwapResult:
    """What a reload did: the versions before and after, the directory loaded, and its timings (s)."""

    index_version: str
    previous_version: str
    path: Path
    load_seconds: float  # open + verify + check + warm-up, while the old index served
    switch_seconds: float  # the switch and the wait for the old index's calls in flight


def resolve_index_dir(path: str | Path) -> Path:
    """The directory `path` names now (symlinks followed); SwapRefused when there is none."""
    try:
        real = Path(path).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, dangling symlink, loop
        link = f" (a symlink to {os.readlink(path)})" if Path(path).is_symlink() else ""
        raise SwapRefused(f"{path}{link}: no such index directory") from None
    if not real.is_dir():
        raise SwapRefused(f"{path}: {real} is not a directory")
    return real


def incompatibility(served: SearcherInfo, new: SearcherInfo) -> str | None:
    """Why an index described by `new` cannot answer the clients of `served`, or None when it can."""
    if new.dim != served.dim:
        return f"embedding dim {new.dim}, the served index has {served.dim}"
    if new.encoder != served.encoder:
        return f"encoder {new.encoder or 'none'!r}, the served index has {served.encoder or 'none'!r}"
    if dropped := [k for k in served.query_kinds if k not in new.query_kinds]:
        return f"does not take {', '.join(dropped)} queries, which the served index takes"
    if "sparse" in served.query_kinds and new.num_features != served.num_features:
        return f"{new.num_features} sparse features, the served index has {served.num_features}"
    return None


def load_for_serving(path: str | Path, device: str | torch.device, served: Searcher | None) -> tuple[Searcher, Path]:
    """Resolve, verify, open, check against `served` and warm up the index at `path` (SwapRefused if it can't serve)."""
    real = resolve_index_dir(path)
    try:
        verify_index(real)
        searcher = Searcher.open(real, device=device)
    except IndexFormatError as e:
        raise SwapRefused(str(e)) from None
    except Exception as e:  # noqa: BLE001 - any failure to load refuses the swap, the server keeps serving
        raise SwapRefused(f"{real}: cannot be opened ({type(e).__name__}: {e})") from None
    if served is not None and (reason := incompatibility(served.info, searcher.info)):
        raise SwapRefused(f"{real / MANIFEST}: incompatible with the served index: {reason}")
    searcher.warmup()
    return searcher, real


class Reloader(Protocol):
    def reload(self, path: str | Path | None = None, wait: bool = False) -> SwapResult: ...


class AdminServicer(admin_grpc.AdminServicer):
    """`elias.v1.Admin`: ReloadIndex maps SwapRefused to FAILED_PRECONDITION, SwapBusy to ABORTED."""

    def __init__(self, server: Reloader):
        self._server = server

    def ReloadIndex(self, request: admin_pb.ReloadIndexRequest,
                    context: grpc.ServicerContext) -> admin_pb.ReloadIndexResponse:
        try:
            r = self._server.reload(request.path if request.HasField("path") else None)
        except SwapRefused as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except SwapBusy as e:
            context.abort(grpc.StatusCode.ABORTED, str(e))
        except NotServing as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return admin_pb.ReloadIndexResponse(index_version=r.index_version, previous_version=r.previous_version,
                                            load_seconds=r.load_seconds, path=str(r.path))


def point_symlink(link: str | Path, target: str | Path) -> None:
    """Make `link` a symlink to `target` atomically (a new link renamed over the old one), as a deploy flips
    a "current" link: a reload never sees it missing. (The shell: `ln -sfn` is not atomic; `ln -s T L.new &&
    mv -T L.new L` is.)"""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)
