"""Training objectives of the tiny NaViL beyond the model's own next-token loss.

* :class:`TokenHeads` — the auxiliary per-visual-token loss (``TrainConfig.token_loss``): linear heads on the
  visual tokens the LLM reads predict the kind, colour and glyph of the object each token shows
  (targets from :mod:`navil_utils.tiny.token_targets`). Training scaffolding: saved in checkpoints, never exported.
* :class:`PositionHead` — the auxiliary position loss (``TrainConfig.position_loss``): a linear head on the LLM's
  hidden state of every visual token after one decoder layer predicts where in the image the token lies (its row
  and column as fractions of the grid). Neither the ViT (2-D RoPE: relative positions only) nor the LLM (1-D RoPE
  over a row-major sequence) hands a visual token its absolute column; this makes the decoder compute it.
  Training scaffolding like :class:`TokenHeads`.
* :func:`question_loss` — per-question averaging of the answer loss (``TrainConfig.loss_averaging="question"``):
  a one-word answer weighs as much as a long one.
"""
from __future__ import annotations

from typing import Any

import torch

from navil_utils.tiny.synthetic import SyntheticConfig
from navil_utils.tiny.token_targets import TOKEN_TARGETS, target_classes


class TokenHeads(torch.nn.Module):
    """Linear heads on the visual tokens the LLM reads (RMS-normalised first), one per
    :data:`~navil_utils.tiny.token_targets.TOKEN_TARGETS` target: training scaffolding of ``TrainConfig.token_loss``
    (saved in checkpoints, never exported)."""

    def __init__(self, hidden: int, classes: dict[str, tuple[str, ...]]) -> None:
        super().__init__()
        self.targets = TOKEN_TARGETS
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(hidden, len(classes[t])) for t in TOKEN_TARGETS})

    def logits(self, tokens: torch.Tensor, target: str) -> torch.Tensor:
        """``(n, classes)`` logits of ``target`` for visual tokens ``(n, H)``."""
        features = tokens.float()
        # unit RMS: the heads read the tokens' direction, so they learn at the same pace whatever the tokens'
        # scale (they start ~0.1x a text embedding's norm with connector_init_scale=0.125)
        features = torch.nn.functional.rms_norm(features, features.shape[-1:], eps=1e-6)
        return self.heads[target](features)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor, weights: dict[str, float] | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """``tokens`` ``(n, H)``, ``targets`` ``(n, 3)`` (-100 = none) → (weighted mean of the targets'
        cross-entropies, accuracy per target on the tokens that have one). ``weights`` per target (missing = 1;
        None = all 1): the loss is ``Σ w·CE / Σ w`` over the targets present in the batch; a target of weight 0
        does not train (its accuracy is still reported)."""
        losses, shares, accuracy = [], [], {}
        for k, target in enumerate(self.targets):
            labels = targets[:, k]
            keep = labels >= 0
            if not bool(keep.any()):
                continue
            weight = 1.0 if weights is None else float(weights.get(target, 1.0))
            logits = self.logits(tokens[keep], target)
            accuracy[target] = float((logits.detach().argmax(-1) == labels[keep]).float().mean())
            if weight > 0:
                losses.append(torch.nn.functional.cross_entropy(logits, labels[keep]) * weight)
                shares.append(weight)
        if not losses:
            return tokens.sum() * 0.0, accuracy
        return torch.stack(losses).sum() / sum(shares), accuracy


class PositionHead(torch.nn.Module):
    """A linear head reading a visual token's ``(row, column)`` fraction from an LLM hidden state (RMS-normalised
    first): training scaffolding of ``TrainConfig.position_loss`` (saved in checkpoints, never exported)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(hidden, 2)

    def forward(self, states: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """``states`` ``(n, H)``, ``targets`` ``(n, 2)`` row and column fractions in (0, 1) → (mean squared error
        over both axes, mean absolute error per axis as ``{"row": …, "col": …}``)."""
        features = torch.nn.functional.rms_norm(states.float(), states.shape[-1:], eps=1e-6)
        predicted = self.head(features)
        error = (predicted.detach() - targets).abs().mean(0)
        return torch.nn.functional.mse_loss(predicted, targets), {"row": float(error[0]), "col": float(error[1])}


def grid_positions(image_grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """``(n_tokens, 2)`` float: the centre of every merged token of the grids ``(S, 3)`` as (row, column)
    fractions of its grid, grid by grid, raster order within a grid (apply the window order as for token targets)."""
    blocks = []
    for t, h, w in (tuple(int(v) for v in row) for row in image_grid_thw):
        rows, cols = h // merge_size, w // merge_size
        row = ((torch.arange(rows, dtype=torch.float32) + 0.5) / rows)[:, None].expand(rows, cols)
        col = ((torch.arange(cols, dtype=torch.float32) + 0.5) / cols)[None, :].expand(rows, cols)
        blocks.append(torch.stack([row, col], -1).reshape(1, -1, 2).expand(t, -1, -1).reshape(-1, 2))
    return torch.cat(blocks)


def attach_position_head(model: torch.nn.Module, seed: int) -> None:
    """Give ``model`` (a NaViL) a :class:`PositionHead` initialised from ``seed``; the caller's RNG is kept."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.position_head = PositionHead(model.config.llm_config.hidden_size)


def attach_token_heads(model: torch.nn.Module, data: dict[str, Any], seed: int) -> None:
    """Give ``model`` (a NaViL) the :class:`TokenHeads` of the synthetic task configured by ``data`` (overrides of
    :class:`~navil_utils.tiny.synthetic.SyntheticConfig`), initialised from ``seed``; the caller's RNG is kept."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.token_heads = TokenHeads(model.config.llm_config.hidden_size, target_classes(SyntheticConfig(**data)))


def question_loss(logits: torch.Tensor, labels: torch.Tensor, answer_qa: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum over QAs of each QA's mean answer-token cross-entropy, and the number of QAs: ``logits`` ``(B, T, V)``
    predict ``labels`` ``(B, T)`` one position later; ``answer_qa`` ``(B, T)`` numbers each answer token's QA."""
    target, qa = labels[:, 1:], answer_qa[:, 1:]
    keep = target >= 0
    nll = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="none")
    index = qa[keep]
    count = int(index.max()) + 1 if index.numel() else 0
    sums = nll.new_zeros(count).index_add(0, index, nll)
    tokens = torch.bincount(index, minlength=count)
    present = tokens > 0
    return (sums[present] / tokens[present]).sum(), int(present.sum())
