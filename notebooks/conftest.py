"""``pytest --nbval`` settings for the notebooks: figures go to a temporary directory.

The notebooks save every figure with ``navil_utils.save_figure``; under test they must not rewrite the
tracked ``figures/`` (running the tests never modifies the repository).  The kernels nbval starts inherit
this process's environment, so ``$NAVIL_FIGURES_DIR`` set here reaches ``navil_utils.paths.figures_dir``.
``make run`` is what regenerates ``figures/``.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from navil_utils.paths import FIGURES_DIR_ENV

_state: dict[str, str | None] = {}


def pytest_configure(config):
    _state["previous"] = os.environ.get(FIGURES_DIR_ENV)
    _state["directory"] = tempfile.mkdtemp(prefix="navil-nbval-figures-")
    os.environ[FIGURES_DIR_ENV] = _state["directory"]


def pytest_unconfigure(config):
    if _state.get("previous") is None:
        os.environ.pop(FIGURES_DIR_ENV, None)
    else:
        os.environ[FIGURES_DIR_ENV] = _state["previous"]
    if _state.get("directory"):
        shutil.rmtree(_state["directory"], ignore_errors=True)
