"""Where the workbook's files live, independent of the current working directory."""
from __future__ import annotations

import os
from pathlib import Path

#: Environment variable that sends every ``save_figure`` call elsewhere.  ``pytest --nbval`` sets it to a
#: temporary directory (notebooks/conftest.py), so running the tests never rewrites the tracked figures/.
FIGURES_DIR_ENV = "NAVIL_FIGURES_DIR"

#: Environment variable naming the workbook checkout, for a non-editable install of navil_utils.
REPO_ROOT_ENV = "NAVIL_WORKBOOK_ROOT"

#: The checkout that holds this package (``navil_utils/paths.py`` → one level up).
_SOURCE_ROOT = Path(__file__).resolve().parents[1]


def _is_workbook(path: Path) -> bool:
    return (path / "data" / "paper").is_dir() and (path / "navil_utils").is_dir()


def repo_root() -> Path:
    """The workbook checkout (the folder holding ``data/``, ``figures/``, ``notebooks/`` and ``tests/``).

    The package's own checkout when installed editable (``make``, ``pip install -e .``); otherwise
    ``$NAVIL_WORKBOOK_ROOT``.  Raises :class:`~navil_utils.errors.WorkbookFilesError` when neither holds
    the workbook's data (the paper tables, the embedded model and the golden fixtures are files of the
    repository, not of the installed package).
    """
    override = os.environ.get(REPO_ROOT_ENV)
    if override:
        root = Path(override).expanduser().resolve()
        if not _is_workbook(root):
            raise _missing(f"${REPO_ROOT_ENV}={override} is not a NaViL workbook checkout (no data/paper/)")
        return root
    if _is_workbook(_SOURCE_ROOT):
        return _SOURCE_ROOT
    raise _missing(f"navil_utils is installed at {_SOURCE_ROOT / 'navil_utils'} without the workbook's files "
                   "(data/, tests/fixtures/)")


def _missing(why: str) -> Exception:
    from navil_utils.errors import WorkbookFilesError

    return WorkbookFilesError(f"{why}. Install it editable from a clone (`pip install -e .` or `make`), or set "
                              f"${REPO_ROOT_ENV} to the clone's directory.")


def data_dir() -> Path:
    return repo_root() / "data"


def figures_dir() -> Path:
    """``figures/`` of the repo, or ``$NAVIL_FIGURES_DIR`` when set (created if missing)."""
    override = os.environ.get(FIGURES_DIR_ENV)
    path = Path(override).expanduser() if override else repo_root() / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path
