"""Where the workbook's files live, independent of the current working directory."""
from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def repo_root() -> Path:
    """The repository root (the folder holding ``pyproject.toml``, ``data/`` and ``figures/``)."""
    return _PACKAGE_DIR.parent


def data_dir() -> Path:
    return repo_root() / "data"


def figures_dir() -> Path:
    path = repo_root() / "figures"
    path.mkdir(exist_ok=True)
    return path
