"""Notebook set-up: reproducible, quiet, and independent of where Jupyter was started."""
from __future__ import annotations

import os
import random
from pathlib import Path

from navil_utils.paths import repo_root
from navil_utils.workbook.quiet import quiet_libraries

#: Environment variable that points every notebook at another checkpoint (e.g. real NaViL-2B/9B).
MODEL_PATH_ENV = "NAVIL_MODEL_PATH"


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_notebook(seed: int = 0, *, threads: int | None = 1) -> Path:
    """Prepare a notebook kernel for deterministic, quiet execution and return the repo root.

    - seeds ``random``, NumPy and torch with ``seed``;
    - applies the workbook's matplotlib style (fixed figsize and dpi, PNG inline output);
    - silences progress bars and the named noisy library loggers (:mod:`navil_utils.workbook.quiet`) so
      nothing volatile reaches stdout/stderr; Python warnings are left alone;
    - sets torch's intra-op threads to ``threads`` (default 1: the workbook's tiny models run fastest
      with one thread on a laptop, and float reductions are then reproducible run to run, which
      ``pytest --nbval`` relies on); pass ``threads=None`` to keep torch's default (real checkpoints).

    The returned path is the repository root, so notebooks find ``data/`` and ``figures/`` no matter
    which directory Jupyter was started in.
    """
    quiet_libraries()
    seed_everything(seed)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from navil_utils.plotting.style import use_workbook_style

    use_workbook_style()
    try:  # inline backend: PNG only (SVG outputs carry random ids and would break nbval)
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        set_matplotlib_formats("png")
    except ImportError:  # pragma: no cover - only outside IPython
        pass
    return repo_root()


def resolve_model_path(model_path: str | os.PathLike | None = None, default: str | os.PathLike | None = None) -> str:
    """Pick the checkpoint a notebook runs on.

    Precedence: an explicit ``model_path`` (e.g. papermill ``-p model_path …``) >
    ``$NAVIL_MODEL_PATH`` > ``default`` (relative defaults are resolved against the repo root).
    Hub ids (``org/name``) are returned unchanged; :func:`navil_utils.load_model` decides whether
    they can be reached.  A ``model_path`` / ``$NAVIL_MODEL_PATH`` that is neither an existing path nor a
    hub id raises :class:`~navil_utils.errors.CheckpointNotFoundError` naming where it came from.
    """
    from navil_utils.errors import CheckpointNotFoundError, ConfigError
    from navil_utils.models.checkpoint import looks_like_hub_id

    env_value = os.environ.get(MODEL_PATH_ENV)
    if model_path:
        chosen, source = model_path, "model_path"
    elif env_value:
        chosen, source = env_value, f"${MODEL_PATH_ENV}"
    else:
        chosen, source = default, "the default model path"
    if chosen is None:
        raise ConfigError(f"no model path given: pass model_path=… or set ${MODEL_PATH_ENV}")
    chosen = str(chosen)
    candidate = Path(chosen).expanduser()
    if not candidate.is_absolute() and not candidate.exists() and (repo_root() / candidate).exists():
        candidate = repo_root() / candidate
    if candidate.exists():
        return str(candidate.resolve())
    if source != "the default model path" and not looks_like_hub_id(chosen):
        raise CheckpointNotFoundError(f"{source} = {chosen!r}: no such checkpoint directory (and not a hub id "
                                      "'org/name')")
    return chosen
