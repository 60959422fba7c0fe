"""Training state for --resume: model, optimiser and schedule as safetensors + JSON (no pickle)."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from elias_retrieval.atomic import StagedDir, staged_dir

STATE_DIR = "train_state"


def _flatten_optimizer(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            name = f"{prefix}.{idx}.{key}"
            if isinstance(val, torch.Tensor):
                tensors[name] = val.detach()
            else:
                scalars[name] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        p, _, rest = name.partition(".")
        if p == prefix:  # the state file also holds "model.*" tensors and other optimisers' state
            idx, key = rest.split(".", 1)
            state.setdefault(int(idx), {})[key] = val
    for name, val in meta["scalars"].items():
        _p, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def stage_state(
    out_dir: Path,
    model: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
    progress: dict[str, Any],
) -> StagedDir:
    """Write the training state after a finished epoch (model, optimisers, schedules, progress) as a new
    OUT/train_state beside the current one, straight from the live tensors: training may change them as soon as
    this returns, with no copy of them held meanwhile. The returned directory's `commit` (fsync, then the atomic
    swap) may run later, on another thread."""
    tensors = {f"model.{k}": v.detach() for k, v in model.state_dict().items()}
    opt_meta: dict[str, Any] = {}
    for name, opt in optimizers.items():
        t, m = _flatten_optimizer(opt, name)
        tensors.update(t)
        opt_meta[name] = m
    meta = {"progress": progress, "optimizers": opt_meta,
            "schedulers": {k: s.state_dict() for k, s in schedulers.items()}}
    with staged_dir(out_dir / STATE_DIR) as staged:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(staged.tmp / "state.safetensors"))
        (staged.tmp / "state.json").write_text(json.dumps(meta))
    return staged


class BackgroundWrites:
    """Writes that run one after another, in order, on one thread beside training: an epoch's staged checkpoint
    is fsynced and swapped in while the next epoch trains. `wait` returns once all submitted writes are done and
    raises the first one's error; `submit` raises an earlier write's error too."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="elias-writes")
        self._pending: list[Future[None]] = []

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self._raise_failed()
        self._pending.append(self._pool.submit(fn, *args))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def _raise_failed(self) -> None:
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for f in done:
            f.result()


def has_state(out_dir: Path) -> bool:
    return (out_dir / STATE_DIR / "state.json").is_file()


def load_state(out_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    d = out_dir / STATE_DIR
    return load_file(str(d / "state.safetensors")), json.loads((d / "state.json").read_text())


def restore_training(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
) -> None:
    for name, opt in optimizers.items():
        _restore_optimizer(opt, name, tensors, meta["optimizers"][name])
    for name, sch in schedulers.items():
        sch.load_state_dict(meta["schedulers"][name])


def model_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
