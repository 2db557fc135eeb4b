"""Quiet output for notebooks and command lines: no progress bars, no library chatter on stderr.

Only *named* sources are silenced — the loggers of transformers, accelerate, huggingface_hub,
matplotlib, PIL and papermill, and the progress bars of transformers and tqdm — never Python's warning
machinery as a whole, so a user's own warnings (and genuine deprecations in their code) still show.
"""
from __future__ import annotations

import logging
import os

#: Loggers whose INFO/WARNING chatter would reach a notebook's stderr (nbval compares stderr).
NOISY_LOGGERS: tuple[str, ...] = ("transformers", "accelerate", "huggingface_hub", "matplotlib", "PIL", "papermill")


def quiet_libraries() -> None:
    """Silence the named noisy loggers and progress bars (idempotent)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass
