"""Data-parallel training on torch.distributed: N processes, each its shard of every batch, gradients averaged.

`elias train --nproc N` starts the N processes itself (`launch`, a file rendezvous in a temporary directory);
under `torchrun` (one node or several) the process group comes from the environment torchrun sets
(`init_from_env`). Backend: nccl on CUDA, gloo on the CPU.

Every rank holds the whole model. A global batch of `train.batch_size` rows is split rank by rank, each rank
back-propagates its part, and `average_gradients` sums the parts' gradients weighted by their share of the batch,
so a step is the single-process step on the whole batch. Dense gradients go through one flat all-reduce; the
tf-idf projection's sparse row gradients are all-gathered (ids and rows; nccl has no sparse all-reduce) and
coalesced, so a row touched on two ranks gets the sum of both. Rank 0 alone evaluates dev, writes the model
directory and the checkpoints, and fits the ELIAS++ ranker; its decisions are broadcast, so all ranks run the same
number of steps. A frozen transformer's embeddings of the training split are made once, each rank embedding its
share (`share_embeddings`).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.multiprocessing.spawn import ProcessException

from elias_retrieval.frozen_encoders import EmbeddingCache, FrozenTransformer

# Rank 0 evaluates dev, writes checkpoints and (last) fits the ranker while the other ranks wait in a collective.
TIMEOUT = timedelta(hours=2)


class DistributedError(ValueError):
    """The process group could not be formed, or a training process stopped on bad input (data, config, disk)."""


@dataclass(frozen=True)
class Group:
    """This process's place in the training run: rank `rank` of `world` (`local_rank` on its node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, rows: Any) -> Any:
        """This rank's part of a global batch: every `world`-th row, from `rank` on."""
        return rows[self.rank:: self.world] if self.active else rows

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (small metadata: dev metrics, decisions)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum_floats(self, values: list[float], device: torch.device) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def gather_rows(self, local: Tensor, n: int) -> Tensor:
        """The (n, ...) tensor whose rows rank::world each rank holds as `local` (`shard`'s inverse)."""
        if not self.active:
            return local
        per = -(-n // self.world)
        padded = local.new_zeros((per, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        out = local.new_empty((n, *local.shape[1:]))
        for r, part in enumerate(parts):
            out[r::self.world] = part[: len(range(r, n, self.world))]
        return out

    def broadcast_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (each rank built them the same way; this makes it exact)."""
        if not self.active:
            return
        with torch.no_grad():
            for t in (*module.parameters(), *module.buffers()):
                dist.broadcast(t.data, src=0)


def current() -> Group:
    """The running process group, or a single-process one when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return Group()
    world = dist.get_world_size()
    return Group(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                 int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def backend(device_name: str) -> str:
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


def init_from_env(device_name: str) -> Group:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...), if any."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return current()
    try:
        dist.init_process_group(backend(device_name), init_method="env://", timeout=TIMEOUT)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"cannot join the torch.distributed process group: {e}") from None
    return current()


def local_device(device: torch.device, group: Group) -> torch.device:
    """On CUDA each process on a node drives its own GPU."""
    if device.type == "cuda" and group.active:
        torch.cuda.set_device(group.local_rank)
        return torch.device("cuda", group.local_rank)
    return device


def threads_per_process(group: Group) -> int:
    """The node's cores shared out among its processes."""
    return max(1, (os.cpu_count() or 1) // max(1, group.local_world))


def share_embeddings(cache: EmbeddingCache, frozen: FrozenTransformer, texts: list[str], group: Group,
                     device: torch.device, progress: bool = False) -> None:
    """Embed `texts` once for the whole group, each rank its share (`shard`), into every rank's `cache`; rank 0
    alone writes the file. Nothing to do when rank 0 has them cached already (a rank that cannot read rank 0's
    cache directory, on another node, then embeds them itself)."""
    cached = group.broadcast_object(cache.load(frozen, texts) is not None if group.is_main else None)
    if cached or not group.active:
        return
    local = frozen.embed(group.shard(texts), progress and group.is_main)
    E = group.gather_rows(local.to(device), len(texts)).cpu()
    cache.store(frozen, texts, E, write=group.is_main)
    group.barrier()


@torch.no_grad()
def average_gradients(params: list[nn.Parameter], sparse: set[int], share: float) -> None:
    """Every rank's gradients replaced by the sum over ranks of share_r * grad_r (share_r: the rank's part of the
    batch), which is the whole batch's gradient when the loss is a mean over rows.

    A parameter that has a gradient on some rank but not on this one (its part of the batch was empty) takes part
    with zeros; one with a gradient on no rank keeps none, as in a single process.
    """
    if not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has)
    used = [p for p, h in zip(params, has.tolist(), strict=True) if h]
    dense = [p for p in used if id(p) not in sparse]
    if dense:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in dense]
        flat = torch.cat([g.reshape(-1) for g in grads]).mul_(share)
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(dense, grads, strict=True):
            p.grad = flat[offset: offset + g.numel()].view_as(p)
            offset += g.numel()
    for p in used:
        if id(p) in sparse:
            p.grad = _gather_sparse(p, share)


def _gather_sparse(p: nn.Parameter, share: float) -> Tensor:
    """The sum over ranks of share_r * (sparse row gradient)_r, coalesced."""
    d = p.shape[1]
    if p.grad is None:
        ids, rows = torch.zeros(0, dtype=torch.long, device=p.device), torch.zeros(0, d, dtype=p.dtype, device=p.device)
    else:
        g = p.grad.coalesce()
        ids, rows = g.indices()[0], g.values() * share
    world = dist.get_world_size()
    n = torch.tensor([ids.numel()], device=p.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    top = int(max(int(s) for s in sizes))
    pad_ids = torch.zeros(top, dtype=torch.long, device=p.device)
    pad_rows = torch.zeros(top, d, dtype=p.dtype, device=p.device)
    pad_ids[: ids.numel()], pad_rows[: ids.numel()] = ids, rows
    all_ids = [torch.empty_like(pad_ids) for _ in range(world)]
    all_rows = [torch.empty_like(pad_rows) for _ in range(world)]
    dist.all_gather(all_ids, pad_ids)
    dist.all_gather(all_rows, pad_rows)
    ids = torch.cat([t[: int(s)] for t, s in zip(all_ids, sizes, strict=True)])
    rows = torch.cat([t[: int(s)] for t, s in zip(all_rows, sizes, strict=True)])
    return torch.sparse_coo_tensor(ids.unsqueeze(0), rows, p.shape).coalesce()


def _worker(local_rank: int, world: int, init_file: str, device_name: str, fn: Callable[..., Any],
            args: tuple, errors: Any) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world))
    try:
        dist.init_process_group(backend(device_name), init_method=f"file://{init_file}", rank=local_rank,
                                world_size=world, timeout=TIMEOUT)
        try:
            fn(*args)
        finally:
            dist.destroy_process_group()
    except (ValueError, KeyError, OSError) as e:  # bad data, config or disk: reported in one line
        errors.put((local_rank, str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e), "user"))
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except BaseException:
        errors.put((local_rank, traceback.format_exc(), "crash"))
        raise SystemExit(1) from None
    # The work is done and its files are closed. Leave without the interpreter's teardown: a worker that had a
    # transformer loaded occasionally aborted there ("terminate called without an active exception", after its last
    # Python frame), which turned a finished run into a failed one.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(nproc: int, device_name: str, fn: Callable[..., Any], *args: Any) -> None:
    """Run `fn(*args)` in `nproc` fresh processes forming one process group on this machine.

    A failure in any process stops the others; its message is raised here as a `DistributedError` (the first
    rank's to fail).
    """
    # The others are stopped when one fails; that is reported below, not as torch's "terminating process" warning.
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="elias-rdzv-") as tmp:
        init_file = str(Path(tmp) / "rendezvous")
        try:
            mp.start_processes(_worker, args=(nproc, init_file, device_name, fn, args, errors), nprocs=nproc,
                               start_method="spawn", join=True)
        except ProcessException as e:
            reported = []
            while not errors.empty():
                reported.append(errors.get())
            if not reported:
                raise RuntimeError(f"training process {e.error_index} failed: {e}") from None
            rank, message, kind = min(reported)
            if kind == "user":
                raise DistributedError(message) from None
            raise RuntimeError(f"training process {rank} failed:\n{message}") from None
