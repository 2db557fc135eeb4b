"""Where the workbook's files live, independent of the current working directory."""
from __future__ import annotations

import os
from pathlib import Path

#: Environment variable that sends every ``save_figure`` call elsewhere.  ``pytest --nbval`` sets it to a
#: temporary directory (notebooks/conftest.py), so running the tests never rewrites the tracked figures/.
FIGURES_DIR_ENV = "NAVIL_FIGURES_DIR"

_PACKAGE_DIR = Path(__file__).resolve().parent


def repo_root() -> Path:
    """The repository root (the folder holding ``pyproject.toml``, ``data/`` and ``figures/``)."""
    return _PACKAGE_DIR.parent


def data_dir() -> Path:
    return repo_root() / "data"


def figures_dir() -> Path:
    """``figures/`` of the repo, or ``$NAVIL_FIGURES_DIR`` when set (created if missing)."""
    override = os.environ.get(FIGURES_DIR_ENV)
    path = Path(override).expanduser() if override else repo_root() / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path
