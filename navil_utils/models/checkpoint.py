"""Checkpoint I/O of the official NaViL format: locating files, reading the config, strict weight checks.

A checkpoint is a local directory holding ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``), or a hub id (``org/name``).  Before any weight is read, the
checkpoint's tensor names and shapes (safetensors headers) are compared with the model built from the
config: missing, unexpected or wrongly shaped keys raise :class:`~navil_utils.errors.WeightsMismatchError`
listing them — a model is never returned with silently random weights.  Other failures raise typed
errors: :class:`CheckpointNotFoundError` (no directory / config / weights / shard),
:class:`CorruptCheckpointError` (truncated or corrupt safetensors, bad index), :class:`ConfigError` (not a
NaViL config, unknown LLM architecture), :class:`OfflineError` (a hub id while the hub is unreachable or
``HF_HUB_OFFLINE`` is set and the files are not cached).  Nothing here imports the model classes.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from navil_utils.constants import (
    CHAT_TOKENS,
    IMG_CONTEXT_TOKEN,
    IMG_START_TOKEN,
    SPECIAL_TOKEN_LIST,
)
from navil_utils.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    InvalidWeightsError,
    OfflineError,
    WeightsMismatchError,
)
from navil_utils.models.configuration_navil import NaViLChatConfig

CONFIG_NAME = "config.json"


WEIGHTS_NAME = "model.safetensors"


WEIGHTS_INDEX_NAME = "model.safetensors.index.json"




_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt"]


_MAX_LISTED = 20


# ----------------------------------------------------------------------------- locating files
def _hub_offline_requested() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(flag.strip().lower() in ("1", "true", "yes", "on") for flag in flags)


def looks_like_hub_id(text: str) -> bool:
    """Whether ``text`` has the form of a hub id (``org/name``, not an absolute path)."""
    return bool(_HUB_ID.match(str(text))) and not Path(str(text)).is_absolute()


def resolve_checkpoint(path_or_id: str | os.PathLike, *, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
                       local_files_only: bool = False) -> Path:
    """Return the local directory of a checkpoint, downloading a hub id if the hub is reachable.

    A string that is not an existing path and looks like ``org/name`` is treated as a hub id.  Offline
    (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` set, ``local_files_only``, or no network) only the local
    hub cache is consulted, and a miss raises :class:`OfflineError` at once (no retry loop).
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a checkpoint directory containing {CONFIG_NAME}")
    text = str(path_or_id)
    if not looks_like_hub_id(text):
        raise CheckpointNotFoundError(f"checkpoint directory {path} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = local_files_only or _hub_offline_requested()
    try:
        return Path(snapshot_download(text, revision=revision, cache_dir=cache_dir, token=token,
                                      local_files_only=offline, allow_patterns=_HUB_PATTERNS, etag_timeout=10))
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise CheckpointNotFoundError(f"hub repository {text!r} (revision {revision or 'main'}) not found or not "
                                      f"accessible: {err}") from err
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, ConnectionError, TimeoutError) as err:
        why = "offline mode is on (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE or local_files_only)" if offline \
            else "the Hugging Face hub is not reachable"
        raise OfflineError(f"{text!r} looks like a hub id, but {why} and it is not in the local hub cache. "
                           "Download it where the hub is reachable, or pass a local checkpoint directory.") from err


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory (single file or every shard of the index)."""
    directory = Path(directory)
    single, index = directory / WEIGHTS_NAME, directory / WEIGHTS_INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CorruptCheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {err}") \
                from err
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise CheckpointNotFoundError(f"{index} lists shard(s) that do not exist: {missing}")
        return [directory / s for s in shards]
    others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
    hint = f" (found {others}: only safetensors are loaded, never pickles)" if others else ""
    raise CheckpointNotFoundError(f"{directory} has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}{hint}")


def checkpoint_headers(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """Tensor name → ``(shape, safetensors dtype such as "F32"/"I64", file)`` from the headers (no data read)."""
    from safetensors import SafetensorError, safe_open

    headers: dict[str, tuple[tuple[int, ...], str, Path]] = {}
    for file in files:
        if file.stat().st_size < 8:
            raise CorruptCheckpointError(f"{file} is truncated ({file.stat().st_size} bytes)")
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    tensor = handle.get_slice(key)
                    headers[key] = (tuple(tensor.get_shape()), str(tensor.get_dtype()), file)
        except SafetensorError as err:
            raise CorruptCheckpointError(f"{file} is not a readable safetensors file: {err}") from err
    return headers


def checkpoint_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape from the safetensors headers (no tensor data is read)."""
    return {key: shape for key, (shape, _, _) in checkpoint_headers(files).items()}


# ----------------------------------------------------------------------------- config
def read_config_json(directory: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """``(path, contents)`` of a checkpoint's ``config.json``: a missing file, invalid JSON or JSON that is not
    an object raise typed errors naming the file."""
    file = Path(directory) / CONFIG_NAME
    if not file.is_file():
        raise CheckpointNotFoundError(f"{file} not found: {directory} is not a model directory")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{file} must hold a JSON object (the model config), got a JSON {type(data).__name__}")
    return file, data


def load_config(directory: str | os.PathLike, **overrides: Any) -> NaViLChatConfig:
    """Read ``config.json`` of a NaViL checkpoint (``model_type`` must be ``navil_chat``)."""
    file, data = read_config_json(directory)
    for key in ("llm_config", "vision_config"):
        if key in data and not isinstance(data[key], dict):
            raise ConfigError(f"{file}: {key!r} must be a JSON object, got {type(data[key]).__name__}")
    model_type = data.get("model_type")
    if model_type != NaViLChatConfig.model_type:
        raise ConfigError(f"{file} has model_type {model_type!r}; this loader reads NaViL checkpoints "
                          f"(model_type {NaViLChatConfig.model_type!r})")
    config = NaViLChatConfig.from_pretrained(str(directory), **overrides)
    return config


# ----------------------------------------------------------------------------- strict key check
def _meta_state(config: NaViLChatConfig, model_class: type) -> tuple[dict[str, tuple[int, ...]], set[str], dict[str, str]]:
    """Shapes, floating-point keys and tied keys of ``model_class(config)``'s state dict (meta device)."""
    with torch.device("meta"):
        model = model_class(config)
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    floating = {k for k, v in state.items() if v.is_floating_point()}
    return shapes, floating, dict(model.all_tied_weights_keys)


def expected_shapes(config: NaViLChatConfig, model_class: type) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """State-dict shapes of ``model_class(config)`` (built on the meta device) and its tied keys."""
    shapes, _, tied = _meta_state(config, model_class)
    return shapes, tied


def _is_floating_dtype(safetensors_dtype: str) -> bool:
    """``F64``/``F32``/``F16``/``BF16``/``F8_*``… are floating; ``I*``/``U*``/``BOOL``/``C*`` are not."""
    return safetensors_dtype.startswith(("F", "BF"))


def _listing(keys: list[Any]) -> str:
    shown = ", ".join(str(k) for k in keys[:_MAX_LISTED])
    return shown + (f", … ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def check_weights(config: NaViLChatConfig, found: Mapping[str, tuple[int, ...]], model_class: type,
                  where: str = "checkpoint",
                  dtypes: Mapping[str, tuple[str, Path]] | None = None) -> None:
    """Raise :class:`WeightsMismatchError` unless ``found`` (name → shape) matches the model exactly.

    A tied target (e.g. ``language_model.output.weight`` when ``tie_word_embeddings``) may be absent.
    With ``dtypes`` (name → (safetensors dtype, file)) a non-floating tensor where the model has a
    floating one raises :class:`InvalidWeightsError` naming the file(s) and key(s).
    """
    expected, floating, tied = _meta_state(config, model_class)
    compare_state_shapes(expected, found, f"{where} does not match the NaViL model built from its config", tied)
    if dtypes is not None:
        _check_dtypes(floating, dtypes)


def compare_state_shapes(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                         what: str, optional: Mapping[str, Any] | set[str] = frozenset()) -> None:
    """Raise :class:`WeightsMismatchError` (``what`` + the missing, unexpected and wrongly shaped keys) unless
    ``found`` (name → shape) has exactly the keys and shapes of ``expected``; keys in ``optional`` (e.g. tied
    weights) may be absent."""
    missing = sorted(k for k in expected if k not in found and k not in optional)
    unexpected = sorted(k for k in found if k not in expected)
    mismatched = sorted((k, tuple(found[k]), tuple(expected[k])) for k in expected
                        if k in found and tuple(found[k]) != tuple(expected[k]))
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} wrongly shaped key(s): "
                     + _listing([f"{k} (file {f}, model {m})" for k, f, m in mismatched]))
    raise WeightsMismatchError(f"{what} — " + "; ".join(parts), missing, unexpected, mismatched)


def _by_file(entries: list[tuple[Path | None, str]]) -> str:
    files: dict[str, list[str]] = {}
    for file, text in entries:
        files.setdefault(str(file) if file is not None else "the checkpoint", []).append(text)
    return "; ".join(f"{file}: {_listing(items)}" for file, items in files.items())


def _check_dtypes(floating: set[str], dtypes: Mapping[str, tuple[str, Path]]) -> None:
    """Raise :class:`InvalidWeightsError` for a non-floating tensor where the model has a floating one
    (buffers that are integer in the model keep whatever integer dtype they have)."""
    bad = sorted((file, f"{key} ({dtype})") for key, (dtype, file) in dtypes.items()
                 if key in floating and not _is_floating_dtype(dtype))
    if bad:
        raise InvalidWeightsError(f"{len(bad)} tensor(s) have a non-floating dtype where the model has floating "
                                  f"weights — {_by_file(bad)}")


def _all_finite(tensor: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """``torch.isfinite(tensor).all()`` in chunks (no full-size boolean copy of a large tensor)."""
    flat = tensor.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def check_finite_weights(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Raise :class:`InvalidWeightsError` if a floating weight of the loaded ``model`` holds NaN or Inf.

    One ``isfinite`` pass per tensor (tensors left on the meta device are skipped).  The message names
    the key(s) and the safetensors file each came from, and says whether the value is in the file or
    appeared when casting to the model's dtype (overflow, e.g. float32 → float16).
    """
    bad = [(key, tensor) for key, tensor in model.state_dict().items()
           if tensor.is_floating_point() and tensor.device.type != "meta" and not _all_finite(tensor)]
    if not bad:
        return
    try:
        headers = checkpoint_headers(weight_files(directory))
    except CheckpointError:
        headers = {}
    from safetensors import safe_open

    entries = []
    for key, tensor in bad:
        file = headers[key][2] if key in headers else None
        why = "NaN/Inf"
        if file is not None:
            with safe_open(str(file), framework="pt") as handle:
                stored = handle.get_tensor(key)
            if stored.is_floating_point() and _all_finite(stored):
                why = f"Inf after casting {stored.dtype} to {tensor.dtype} (values out of range)"
        entries.append((file, f"{key} ({why})"))
    raise InvalidWeightsError(f"{len(bad)} tensor(s) hold NaN/Inf values — {_by_file(entries)}")


# ----------------------------------------------------------------------------- special tokens
def special_token_ids_from_tokenizer_files(directory: str | os.PathLike) -> dict[str, int] | None:
    """Ids of the NaViL special tokens (and ``<|im_start|>``/``<|im_end|>``) from tokenizer files.

    Reads the added-token tables of ``tokenizer_config.json``, ``tokenizer.json`` and ``added_tokens.json``;
    if ``<IMG_CONTEXT>``/``<img>`` are not there, falls back to ``transformers.AutoTokenizer`` (no remote
    code).  Returns None when the directory has no usable tokenizer.
    """
    directory = Path(directory)
    wanted = set(SPECIAL_TOKEN_LIST) | set(CHAT_TOKENS)
    found: dict[str, int] = {}

    def read(name: str) -> Any:
        file = directory / name
        if not file.is_file():
            return None
        try:
            return json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None

    def read_object(name: str) -> dict[str, Any]:
        data = read(name)
        return data if isinstance(data, dict) else {}

    def read_int(value: Any) -> int | None:
        try:
            return int(value)
        except (TypeError, ValueError):
            return None

    decoder = read_object("tokenizer_config.json").get("added_tokens_decoder")
    for token_id, entry in (decoder.items() if isinstance(decoder, dict) else []):
        if isinstance(entry, dict) and entry.get("content") in wanted and read_int(token_id) is not None:
            found[entry["content"]] = read_int(token_id)
    added = read_object("tokenizer.json").get("added_tokens")
    for entry in added if isinstance(added, list) else []:
        if isinstance(entry, dict) and entry.get("content") in wanted and read_int(entry.get("id")) is not None:
            found.setdefault(entry["content"], read_int(entry["id"]))
    for content, token_id in read_object("added_tokens.json").items():
        if content in wanted and read_int(token_id) is not None:
            found.setdefault(content, read_int(token_id))
    if IMG_CONTEXT_TOKEN in found and IMG_START_TOKEN in found:
        return found
    if not any((directory / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except (OSError, ValueError, ImportError, KeyError, TypeError):
        return None
    vocab = tokenizer.get_vocab()
    for token in wanted:
        if token in vocab:
            found.setdefault(token, int(vocab[token]))
    return found if IMG_CONTEXT_TOKEN in found and IMG_START_TOKEN in found else None


def prepare_pretrained(path: str | os.PathLike, config: Any, hub_kwargs: dict[str, Any],
                       config_overrides: dict[str, Any], model_class: type) -> tuple[Path, NaViLChatConfig]:
    """Resolve the checkpoint directory, read its config and validate every weight name/shape (no data read)."""
    directory = resolve_checkpoint(path, **hub_kwargs)
    if config is None or isinstance(config, (str, os.PathLike)):
        config = load_config(directory if config is None else config, **config_overrides)
    elif not isinstance(config, NaViLChatConfig):
        raise ConfigError(f"config must be a NaViLChatConfig, got {type(config).__name__}")
    headers = checkpoint_headers(weight_files(directory))
    check_weights(config, {k: shape for k, (shape, _, _) in headers.items()}, model_class, where=str(directory),
                  dtypes={k: (dtype, file) for k, (_, dtype, file) in headers.items()})
    return directory, config
