"""The golden fixtures: tiny random NaViL models run once through the official code.

``tests/fixtures/golden/{internlm2_ve,qwen3_ve}`` hold a checkpoint, its inputs and the reference
outputs; ``common/`` holds the multi-scale pixel inputs.  :func:`load_golden_case` returns all of them
together with the model loaded by :func:`navil_utils.load_model`, and :func:`load_golden_chat_model` the
model with the fixture's toy tokenizer — used by the tests, the parity section of notebook 01 and the
benchmarks, never by the runtime code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from navil_utils.errors import CheckpointError
from navil_utils.reference.fixtures import GOLDEN_VARIANTS, golden_dir, read_meta
from navil_utils.paths import repo_root


@dataclass
class GoldenCase:
    """One golden fixture: checkpoint directory, model, inputs, reference outputs and metadata."""

    variant: str
    directory: Path
    model: Any
    inputs: dict[str, torch.Tensor]          # input_ids, attention_mask, labels, ..., text_only_input_ids
    outputs: dict[str, torch.Tensor]         # logits, hidden_states.NN, loss, vision_*, generated_*
    pixel_inputs: dict[str, torch.Tensor]    # pixel_values (116, 3, 16, 16), image_grid_thw (3, 3), num_scales
    meta: dict[str, Any]

    @property
    def image_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of ``model(...)`` / ``model.generate(...)`` for the fixture's image prompt."""
        return dict(input_ids=self.inputs["input_ids"], attention_mask=self.inputs["attention_mask"],
                    pixel_values=self.pixel_inputs["pixel_values"],
                    image_grid_thw=self.pixel_inputs["image_grid_thw"])


def golden_root() -> Path:
    return repo_root() / "tests" / "fixtures" / "golden"


def load_golden_case(variant: str, load: bool = True, **load_kwargs: Any) -> GoldenCase:
    """Load fixture ``variant`` (``"internlm2_ve"`` or ``"qwen3_ve"``); ``load_kwargs`` go to ``load_model``."""
    from safetensors.torch import load_file

    from navil_utils.models.loading import load_model

    if variant not in GOLDEN_VARIANTS:
        raise CheckpointError(f"unknown golden variant {variant!r}; known: {GOLDEN_VARIANTS}")
    directory = golden_root() / variant
    meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    model = load_model(directory, special_token_ids=meta["special_token_ids"], **load_kwargs) if load else None
    return GoldenCase(
        variant=variant, directory=directory, model=model,
        inputs=load_file(str(directory / "inputs.safetensors")),
        outputs=load_file(str(directory / "outputs.safetensors")),
        pixel_inputs=load_file(str(golden_root() / "common" / "pixel_inputs.safetensors")),
        meta=meta,
    )


def load_golden_chat_model(variant: str, *, dtype: Any = None, **kwargs: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of one golden fixture: its checkpoint with the fixture's toy tokenizer and
    the special-token ids recorded in its ``meta.json`` (``variant``: ``"internlm2_ve"`` / ``"qwen3_ve"``
    or a fixture directory)."""
    from navil_utils.models.loading import load_model
    from navil_utils.reference.toy_tokenizer import ToyTokenizer

    directory = Path(variant) if Path(str(variant)).is_dir() else golden_dir(variant)
    meta = read_meta(directory)
    model = load_model(directory, special_token_ids=meta["special_token_ids"], dtype=dtype, **kwargs)
    return model, ToyTokenizer.from_fixture(directory)
