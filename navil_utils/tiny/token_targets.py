"""Which object every visual token of a synthetic image shows — the dense supervision the synthetic task holds.

A merged visual token of one scale covers a rectangle of the image. Each shape is assigned to the token that
covers its centre, and each character of a rendered text to the token covering the character's centre (the
text's ink box split in proportion to the font's advance widths). A token gets that object's ``kind`` and
``color`` (shapes) or ``glyph`` (characters) as class indices; tokens showing no object centre get
``IGNORE_INDEX`` for every target. Used for

* the probes of :mod:`navil_utils.tiny.probes` (which object a token should encode), and
* the auxiliary per-token loss of training (``TrainConfig.token_loss``): small linear heads on the visual tokens
  the LLM reads, predicting these classes, so that the encoder and connector must keep kind, colour and glyph
  of every object readable. The heads are training scaffolding: they are not part of the exported model.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from navil_utils.errors import ConfigError
from navil_utils.tiny.synthetic import SceneObject, SyntheticConfig, _font

#: Targets of the per-token classes, in the column order of :func:`token_targets`.
TOKEN_TARGETS = ("kind", "color", "glyph")
IGNORE_INDEX = -100


def target_classes(config: SyntheticConfig) -> dict[str, tuple[str, ...]]:
    """Class names of each target for a task configuration."""
    return {"kind": tuple(config.shape_kinds), "color": tuple(config.colors), "glyph": tuple(config.text_alphabet)}


def character_centres(obj: SceneObject) -> list[tuple[str, float, float]]:
    """``(character, x, y)`` centres of a text object's characters (see the module docstring)."""
    if obj.kind != "text" or not obj.text:
        raise ConfigError(f"character_centres needs a text object, got {obj.kind!r}")
    font = _font(obj.size)
    advances = [font.getlength(c) for c in obj.text]
    total = sum(advances)
    x0, y0, x1, y1 = obj.box
    centres, start = [], 0.0
    for char, advance in zip(obj.text, advances, strict=True):
        centres.append((char, x0 + (start + advance / 2) / total * (x1 - x0), (y0 + y1) / 2))
        start += advance
    return centres


def object_points(objects: Sequence[SceneObject]) -> list[tuple[dict[str, str | None], float, float]]:
    """The points that carry targets: ``({target: class name or None}, x, y)`` per shape and per character."""
    points = []
    for obj in objects:
        if obj.kind == "text":
            points += [({"kind": None, "color": None, "glyph": c}, x, y) for c, x, y in character_centres(obj)]
        else:
            cx, cy = (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2
            points.append(({"kind": obj.kind, "color": obj.color, "glyph": None}, cx, cy))
    return points


def token_at(x: float, y: float, width: int, height: int, rows: int, cols: int) -> tuple[int, int]:
    """Raster ``(row, col)`` of the token covering image point ``(x, y)`` when a ``width × height`` image is
    shown as ``rows × cols`` tokens."""
    return min(rows - 1, max(0, int(y / height * rows))), min(cols - 1, max(0, int(x / width * cols)))


def longer_side(obj: SceneObject) -> int:
    """Longer side (px) of an object's tight box: the size used to bucket shapes by how large they are drawn."""
    return max(obj.box[2] - obj.box[0], obj.box[3] - obj.box[1])


def shape_tokens(sample: Any, rows: int, cols: int) -> list[tuple[SceneObject, int, int]]:
    """``(shape, row, col)`` for every shape (not text) of ``sample``: the raster token at its box centre when
    the image is shown as ``rows × cols`` tokens — where the token targets put its kind and colour."""
    width, height = sample.size
    return [(obj, *token_at((obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2, width, height, rows, cols))
            for obj in sample.objects if obj.kind != "text"]


def token_targets(sample: Any, image_grid_thw: torch.Tensor, classes: dict[str, tuple[str, ...]], *,
                  merge_size: int, spread: bool = False) -> torch.Tensor:
    """``(n_tokens, 3)`` long: the :data:`TOKEN_TARGETS` classes of every merged token of ``sample``'s image, scale
    by scale in ``image_grid_thw`` order, raster order within a scale (the ViT's window order is applied by
    the caller, :func:`window_order`). Where two points fall into one token the later object wins.

    ``spread=True`` also labels, with a shape's kind and colour, every token whose centre lies inside the shape's
    box (the points above are written afterwards and win): more supervised tokens per shape, each showing
    part of it."""
    width, height = sample.size
    points = object_points(sample.objects)
    blocks = []
    for t, h, w in (tuple(int(v) for v in row) for row in image_grid_thw):
        rows, cols = h // merge_size, w // merge_size
        grid = torch.full((t, rows, cols, len(TOKEN_TARGETS)), IGNORE_INDEX, dtype=torch.long)
        if spread:
            centre_y = (torch.arange(rows) + 0.5) * height / rows
            centre_x = (torch.arange(cols) + 0.5) * width / cols
            for obj in sample.objects:
                if obj.kind == "text":
                    continue
                x0, y0, x1, y1 = obj.box
                inside = (((centre_y >= y0) & (centre_y <= y1))[:, None]
                          & ((centre_x >= x0) & (centre_x <= x1))[None, :])
                names = {"kind": obj.kind, "color": obj.color, "glyph": None}
                grid[:, inside] = torch.tensor([IGNORE_INDEX if names[target] is None
                                                else classes[target].index(names[target]) for target in TOKEN_TARGETS])
        for names, x, y in points:
            row, col = token_at(x, y, width, height, rows, cols)
            grid[:, row, col] = IGNORE_INDEX
            for k, target in enumerate(TOKEN_TARGETS):
                if names[target] is not None:
                    grid[:, row, col, k] = classes[target].index(names[target])
        blocks.append(grid.reshape(-1, len(TOKEN_TARGETS)))
    return torch.cat(blocks)


def window_order(targets: torch.Tensor, image_grid_thw: torch.Tensor, *, merge_size: int,
                 window_size: int) -> torch.Tensor:
    """Reorder raster-ordered per-token rows of all grids ``(n, …)`` into the order of the visual tokens the
    model produces (the ViT's window order, :func:`~navil_utils.models.vision.window_layout`)."""
    from navil_utils.models.vision import window_layout

    index = window_layout(image_grid_thw, merge_size, window_size).window_index
    if index.numel() != targets.shape[0]:
        raise ConfigError(f"{targets.shape[0]} token rows for grids of {index.numel()} merged tokens")
    return targets[index]
