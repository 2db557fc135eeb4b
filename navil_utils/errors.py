"""Typed exceptions of the workbook.  Catch :class:`NaViLError` to catch them all.

Each error message names the offending file/key/value and what was expected, so that a user who
points a notebook at the wrong directory learns what is wrong without reading a traceback.
"""
from __future__ import annotations


class NaViLError(Exception):
    """Base class of every error raised on purpose by navil_utils."""


class ImageLoadError(NaViLError, ValueError):
    """An image could not be opened or used (not an image, truncated, too large, bad aspect ratio)."""


class CheckpointError(NaViLError, OSError):
    """A checkpoint directory/file is missing, corrupt, or its weights do not match the model."""


class ConfigError(NaViLError, ValueError):
    """A configuration is invalid or names an unknown model type / architecture."""


class OfflineError(NaViLError, OSError):
    """A hub id was given but the model hub is not reachable (and the files are not cached)."""


class PromptError(NaViLError, ValueError):
    """A chat prompt cannot be built (placeholder/image count mismatch, bad grids, bad history)."""


class PaperDataError(NaViLError, LookupError):
    """A paper table (data/paper/*.csv) is unknown, missing, malformed, or lacks a requested model/benchmark."""


class ImageNotFoundError(ImageLoadError, FileNotFoundError):
    """An image path does not exist (also catchable as ``FileNotFoundError``)."""


class ModelInputError(NaViLError, ValueError):
    """Model inputs are inconsistent (e.g. ``<IMG_CONTEXT>`` count vs visual tokens, bad ``image_grid_thw``)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint directory or one of its files (config.json, weights, shards) does not exist."""


class CorruptCheckpointError(CheckpointError):
    """A weights file exists but cannot be read (truncated/corrupt safetensors, bad shard index)."""


class WeightsMismatchError(CheckpointError):
    """The checkpoint's tensors do not match the model: missing, unexpected or wrongly shaped keys.

    The lists are available as ``missing``, ``unexpected`` and ``mismatched`` (``(key, file_shape,
    model_shape)`` triples) and are spelled out in the message.
    """

    def __init__(self, message: str, missing: list[str] | None = None, unexpected: list[str] | None = None,
                 mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] | None = None) -> None:
        super().__init__(message)
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])
        self.mismatched = list(mismatched or [])


class WorkbookFilesError(NaViLError, FileNotFoundError):
    """The workbook's own files (data/, tests/fixtures/, figures/) cannot be found — e.g. navil_utils was
    installed without its repository."""


class PromptTooLongError(PromptError):
    """The prompt (plus the requested new tokens) does not fit the model's context window; the message
    gives both numbers."""


class ImageTimeoutError(ImageLoadError, TimeoutError):
    """Reading an image (a slow URL, a pipe, a stalled file system) took longer than its deadline."""


class InvalidWeightsError(CheckpointError):
    """A checkpoint's tensors load but cannot be right: NaN/Inf values or a non-floating dtype."""


class RunDirectoryError(ConfigError):
    """A training output directory holds a different run (its saved configuration differs) or an
    unusable state; the message names the option(s) that differ."""
