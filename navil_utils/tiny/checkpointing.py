"""Resumable training checkpoints in safetensors + JSON (no pickle anywhere).

A checkpoint directory ``<run>/checkpoint/`` holds

* ``model.safetensors`` — the model weights,
* ``optimizer.safetensors`` — every tensor of ``optimizer.state_dict()['state']`` flattened to
  ``state.<param_index>.<name>``,
* ``rng.safetensors`` — torch CPU (and CUDA) RNG states,
* ``trainer_state.json`` — step, samples seen, optimiser param groups, scheduler state, config,
* ``COMPLETE`` — written last: the step and the size of every other file.

Replacement is crash-safe.  A new checkpoint is written to ``checkpoint.tmp/`` (every file fsynced, the
``COMPLETE`` manifest last), then the current one is renamed to ``checkpoint.old/``, the new one renamed into
place and the old one deleted.  At every moment either ``checkpoint/`` is a complete checkpoint, or it is
missing and ``checkpoint.tmp/`` is complete while ``checkpoint.old/`` still holds the previous one; a run
killed at any moment (inside a write, between the renames, during a deletion or during a recovery) leaves a
state that :func:`recover_checkpoint` completes, and nothing ever deletes the only complete checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from navil_utils.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    WeightsMismatchError,
)


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


#: Written last into a checkpoint directory: its presence (with matching file sizes) means every file of it
#: is complete.
COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json")


# --- crash-safe file primitives ---------------------------------------------------------------------------

def write_synced(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` and fsync it (not atomic: callers publish the file by a rename)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: str | Path) -> None:
    """Make renames/creations inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Replace ``path`` by ``data`` atomically: a kill leaves either the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write_synced(tmp, data)
    os.replace(tmp, path)
    fsync_directory(path.parent)


# --- checkpoints ------------------------------------------------------------------------------------------

def _siblings(directory: Path) -> tuple[Path, Path]:
    return directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")


def is_complete(directory: str | Path) -> bool:
    """Whether ``directory`` holds a ``COMPLETE`` manifest whose files all exist with the recorded sizes.

    A marker holding a bare step number (written before the manifest existed) counts as complete.
    """
    marker = Path(directory) / COMPLETE_MARKER
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if isinstance(manifest, int) and not isinstance(manifest, bool):
        return True
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return False
    for name, size in manifest["files"].items():
        try:
            if (Path(directory) / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def save_checkpoint(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, trainer_state: dict[str, Any]) -> Path:
    """Write a resumable checkpoint to ``directory`` crash-safely; return it.

    The new checkpoint is written to ``<dir>.tmp`` (each file fsynced, the ``COMPLETE`` manifest last), then
    the old one is moved to ``<dir>.old``, the new one into place, and the old one deleted.  A kill at any
    point leaves a complete checkpoint that :func:`recover_checkpoint` puts back: the new one if its manifest
    is complete, else the old one.
    """
    directory = Path(directory)
    recover_checkpoint(directory)
    tmp, old = _siblings(directory)
    if tmp.exists():
        shutil.rmtree(tmp)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    opt_tensors, opt_scalars = _flatten_optimizer_state(opt["state"])
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    state = dict(trainer_state)
    state["optimizer_param_groups"] = opt["param_groups"]
    state["optimizer_scalars"] = opt_scalars
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    files = {"model.safetensors": save(weights),
             "optimizer.safetensors": save(opt_tensors or {"_empty": torch.zeros(0)}),
             "rng.safetensors": save(rng),
             "trainer_state.json": json.dumps(state, indent=1, sort_keys=True).encode("utf-8")}
    tmp.mkdir(parents=True)
    for name, data in files.items():
        write_synced(tmp / name, data)
    write_synced(tmp / COMPLETE_MARKER, json.dumps({"step": state.get("step"),
                                                    "files": {n: len(d) for n, d in files.items()}}))
    fsync_directory(tmp)
    if directory.exists():
        if old.exists():
            shutil.rmtree(old)
        directory.rename(old)
    tmp.rename(directory)
    fsync_directory(directory.parent)
    if old.exists():
        shutil.rmtree(old)
    return directory


def recover_checkpoint(directory: str | Path) -> bool:
    """Finish an interrupted :func:`save_checkpoint`; return whether ``directory`` now holds a checkpoint.

    ``<dir>`` present: stale ``.tmp``/``.old`` leftovers are removed.  ``<dir>`` missing (killed between the
    two renames): a complete ``<dir>.tmp`` is moved into place, else ``<dir>.old`` is.  Each step leaves a
    state this function recovers from, so a kill during the recovery itself loses nothing either.
    """
    directory = Path(directory)
    tmp, old = _siblings(directory)
    if not directory.exists():
        if tmp.exists() and is_complete(tmp):
            tmp.rename(directory)
        elif old.exists():
            old.rename(directory)
        else:
            if tmp.exists():  # an unfinished first write: nothing to recover
                shutil.rmtree(tmp)
            return False
        fsync_directory(directory.parent)
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    return True


def _read_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device=device)
    except FileNotFoundError as error:
        raise CheckpointNotFoundError(f"checkpoint file {path} does not exist") from error
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CorruptCheckpointError(f"checkpoint file {path} is truncated or corrupt and cannot be read "
                                     f"({type(error).__name__}: {error})") from error


def load_weights(path: str | Path, model: torch.nn.Module, device: str = "cpu") -> None:
    """Load a ``model.safetensors`` into ``model`` (strict); typed errors naming the file."""
    path = Path(path)
    weights = _read_tensors(path, device)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = [(k, tuple(weights[k].shape), tuple(expected[k].shape)) for k in sorted(set(weights) & set(expected))
                  if weights[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise WeightsMismatchError(f"{path} does not fit the model: missing {missing[:5]}, unexpected "
                                   f"{unexpected[:5]}, wrongly shaped {mismatched[:5]}",
                                   missing, unexpected, mismatched)
    model.load_state_dict(weights, strict=True)


def load_checkpoint(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> dict[str, Any]:
    """Restore model, optimiser, scheduler and RNG from ``directory``; return the trainer state.

    Every file is read and checked before anything is restored.  A missing file raises
    :class:`~navil_utils.errors.CheckpointNotFoundError`, an unreadable (truncated/corrupt) one
    :class:`~navil_utils.errors.CorruptCheckpointError`; both name the file.
    """
    directory = Path(directory)
    missing = [n for n in CHECKPOINT_FILES if not (directory / n).exists()]
    if missing:
        raise CheckpointNotFoundError(f"checkpoint {directory} is incomplete: missing {missing}")
    device = str(next(model.parameters()).device)
    state_path = directory / "trainer_state.json"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        opt_scalars, param_groups, sched = (state.pop("optimizer_scalars"), state.pop("optimizer_param_groups"),
                                            state.pop("scheduler"))
        int(state["step"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CorruptCheckpointError(f"checkpoint file {state_path} is truncated or corrupt "
                                     f"({type(error).__name__}: {error})") from error
    opt_tensors = _read_tensors(directory / "optimizer.safetensors", device)
    opt_tensors.pop("_empty", None)
    rng_path = directory / "rng.safetensors"
    rng = _read_tensors(rng_path)
    if "torch_cpu" not in rng:
        raise CorruptCheckpointError(f"checkpoint file {rng_path} lacks the torch_cpu RNG state")
    load_weights(directory / "model.safetensors", model, device)
    # AdamW keeps `step` on CPU unless capturable/fused; load_state_dict casts the rest to the params.
    try:
        optimizer.load_state_dict({"state": _unflatten_optimizer_state(opt_tensors, opt_scalars),
                                   "param_groups": param_groups})
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"the optimiser state in {directory / 'optimizer.safetensors'} / {state_path} does "
                              f"not fit the optimiser ({error})") from error
    for entry in optimizer.state.values():
        if "step" in entry and torch.is_tensor(entry["step"]):
            entry["step"] = entry["step"].cpu()
    if scheduler is not None and sched is not None:
        scheduler.load_state_dict(sched)
    torch.set_rng_state(rng["torch_cpu"])
    cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return state
