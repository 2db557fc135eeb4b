"""Small helpers shared by the workbook's command lines (evaluate, sweep, run_notebooks).

Every command line reports a bad argument or a :class:`~navil_utils.errors.NaViLError` as **one line**
on stderr (``<prog>: error: <message>``, no traceback) and exits non-zero: 2 for a bad argument
(argparse's convention), 1 for an error found while running.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import NoReturn

#: Exit status of a command line that failed while running (bad arguments exit with 2).
EXIT_FAILURE = 1
#: Exit status of a command line given bad arguments.
EXIT_USAGE = 2


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose errors are one line on stderr (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def report_error(prog: str, error: BaseException | str) -> int:
    """Print ``error`` as one line on stderr; return :data:`EXIT_FAILURE` for ``main`` to return."""
    message = one_line(error) if isinstance(error, str) or str(error) else type(error).__name__
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return EXIT_FAILURE


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer (>= 0), got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def torch_device(text: str) -> str:
    """argparse type: a torch device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``) that exists here."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (expected e.g. cpu, cuda, cuda:0)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine")
    return text


def torch_device_or_auto(text: str) -> str:
    """argparse type: ``auto`` or a :func:`torch_device`."""
    return text if text == "auto" else torch_device(text)


def resolve_device(text: str) -> str:
    """``auto`` → ``cuda`` when a GPU is available, else ``cpu``; any other device string unchanged."""
    if text != "auto":
        return text
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
