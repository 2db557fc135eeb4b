"""Resumable training checkpoints in safetensors + JSON (no pickle anywhere).

A checkpoint directory ``<run>/checkpoint/`` holds

* ``model.safetensors`` — the model weights,
* ``optimizer.safetensors`` — every tensor of ``optimizer.state_dict()['state']`` flattened to
  ``state.<param_index>.<name>``,
* ``rng.safetensors`` — torch CPU (and CUDA) RNG states,
* ``trainer_state.json`` — step, samples seen, optimiser param groups, scheduler state, config.

It is written to ``checkpoint.tmp/`` first (a ``COMPLETE`` marker last) and swapped into place by two
renames; a run killed at any moment leaves either the previous or the new checkpoint, which
:func:`recover_checkpoint` restores before resuming.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from navil_utils.errors import CheckpointError


def _flatten_optimizer_state(state: dict[int, dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for index, entry in state.items():
        for name, value in entry.items():
            key = f"state.{index}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value.detach().to("cpu").contiguous()
            else:
                scalars[key] = value
    return tensors, scalars


def _unflatten_optimizer_state(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> dict[int, dict[str, Any]]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(scalars.items()):
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    return state


#: Written last into a checkpoint directory: its presence means every file of it is complete.
COMPLETE_MARKER = "COMPLETE"


def _siblings(directory: Path) -> tuple[Path, Path]:
    return directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")


def save_checkpoint(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, trainer_state: dict[str, Any]) -> Path:
    """Write a resumable checkpoint to ``directory`` crash-safely; return it.

    The new checkpoint is written to ``<dir>.tmp`` (``COMPLETE`` marker last), then the old one is moved
    to ``<dir>.old``, the new one into place, and the old one deleted.  A kill at any point leaves a
    complete checkpoint that :func:`recover_checkpoint` puts back: the new one if its marker was written,
    else the old one.
    """
    directory = Path(directory)
    recover_checkpoint(directory)
    tmp, old = _siblings(directory)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(weights, tmp / "model.safetensors")
    opt = optimizer.state_dict()
    opt_tensors, opt_scalars = _flatten_optimizer_state(opt["state"])
    save_file(opt_tensors or {"_empty": torch.zeros(0)}, tmp / "optimizer.safetensors")
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    save_file(rng, tmp / "rng.safetensors")
    state = dict(trainer_state)
    state["optimizer_param_groups"] = opt["param_groups"]
    state["optimizer_scalars"] = opt_scalars
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
    _write_synced(tmp / COMPLETE_MARKER, str(state.get("step", "")))
    if directory.exists():
        if old.exists():
            shutil.rmtree(old)
        directory.rename(old)
    tmp.rename(directory)
    if old.exists():
        shutil.rmtree(old)
    return directory


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def recover_checkpoint(directory: str | Path) -> bool:
    """Finish an interrupted :func:`save_checkpoint`; return whether ``directory`` now holds a checkpoint.

    ``<dir>`` present: stale ``.tmp``/``.old`` leftovers are removed.  ``<dir>`` missing (killed between the
    two renames): a complete ``<dir>.tmp`` is moved into place, else ``<dir>.old`` is.
    """
    directory = Path(directory)
    tmp, old = _siblings(directory)
    if directory.exists():
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)
        return True
    if tmp.exists() and (tmp / COMPLETE_MARKER).exists():
        tmp.rename(directory)
    elif old.exists():
        old.rename(directory)
    else:
        return False
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    return True


def load_checkpoint(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> dict[str, Any]:
    """Restore model, optimiser, scheduler and RNG from ``directory``; return the trainer state."""
    directory = Path(directory)
    needed = ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"]
    missing = [n for n in needed if not (directory / n).exists()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is incomplete: missing {missing}")
    device = next(model.parameters()).device
    weights = load_file(directory / "model.safetensors", device=str(device))
    result = model.load_state_dict(weights, strict=True)
    del result
    state = json.loads((directory / "trainer_state.json").read_text())
    opt_tensors = load_file(directory / "optimizer.safetensors", device=str(device))
    opt_tensors.pop("_empty", None)
    # AdamW keeps `step` on CPU unless capturable/fused; load_state_dict casts the rest to the params.
    optimizer.load_state_dict({
        "state": _unflatten_optimizer_state(opt_tensors, state.pop("optimizer_scalars")),
        "param_groups": state.pop("optimizer_param_groups"),
    })
    for entry in optimizer.state.values():
        if "step" in entry and torch.is_tensor(entry["step"]):
            entry["step"] = entry["step"].cpu()
    sched = state.pop("scheduler")
    if scheduler is not None and sched is not None:
        scheduler.load_state_dict(sched)
    rng = load_file(directory / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return state
