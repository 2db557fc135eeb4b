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
