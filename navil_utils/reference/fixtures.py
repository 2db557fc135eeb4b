"""Where the golden fixtures live and what their ``meta.json`` says (file access only, no models).

``tests/fixtures/golden/{internlm2_ve,qwen3_ve}`` hold a tiny random NaViL checkpoint each, its inputs
and the outputs of the official code; ``common/`` the multi-scale pixel inputs shared by both.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from navil_utils.errors import CheckpointError
from navil_utils.paths import repo_root

GOLDEN_VARIANTS: tuple[str, ...] = ("internlm2_ve", "qwen3_ve")


def golden_dir(variant: str | None = None) -> Path:
    """``tests/fixtures/golden`` (or one variant's sub-directory, e.g. ``"internlm2_ve"``)."""
    root = repo_root() / "tests" / "fixtures" / "golden"
    if variant is None:
        return root
    if variant not in (*GOLDEN_VARIANTS, "common"):
        raise CheckpointError(f"unknown golden variant {variant!r}; known: {GOLDEN_VARIANTS}")
    return root / variant


def read_meta(fixture_dir: str | os.PathLike) -> dict[str, Any]:
    """The fixture's ``meta.json`` (question, template, toy-tokenizer rule, special-token ids, …)."""
    path = Path(fixture_dir) / "meta.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {fixture_dir} is not a golden fixture directory")
    return json.loads(path.read_text(encoding="utf-8"))
