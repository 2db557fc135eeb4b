"""From attention over tokens back to pixels: per-scale maps in true spatial layout, their placement on the
original image, ViT query-patch maps and ViT attention rollout.

Geometry of one scale (:class:`ScaleGeometry`, from the preprocessing metadata
:class:`~navil_utils.processing.multiscale.ScaleInfo`)::

    original image  H × W  --resize (aspect kept, no rounding)-->  h × w  --zero pad bottom/right-->  hp × wp
    token grid: rows = hp / (p·m), cols = wp / (p·m)   (patch grid: hp / p × wp / p)

so the grid covers the *padded* resized image; cell ``(r, c)`` is the resized-image square
``[c·u, (c+1)·u) × [r·u, (r+1)·u)`` (``u = p·m`` for visual tokens, ``p`` for ViT patches), which maps to the
original image by the per-axis factors ``W / w`` and ``H / h`` (a resize maps pixel *edges* linearly: edge
``0 → 0``, edge ``w → W``).  Cells of the last row/column may reach past the image (padding): their part
beyond ``W`` / ``H`` is not image.  Everything is in original-image pixel coordinates, boxes as
``(x0, y0, x1, y1)`` with ``x1``/``y1`` exclusive (pixel ``x`` covers ``[x, x+1)``).

    layout = TokenLayout.from_model(model, input_ids, image_grid_thw)
    geometry = scale_geometries(multiscale_inputs)                 # or plan_geometries(model, (H, W))
    maps = scale_maps(rec.llm_map(-1)[0, -1], layout, geometry=geometry)   # one ScaleMap per scale
    heat = upsample_to_image(maps[-1], mode="bilinear")            # (H, W) on the original pixels
    rollout = vit_rollout(rec, layout)                             # one ScaleRollout per scale
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from navil_utils.analysis.attention import AttentionRecorder, TokenLayout, VitSegmentAttention
from navil_utils.errors import ConfigError, ModelInputError

#: ``(x0, y0, x1, y1)`` in original-image pixels, ``x1``/``y1`` exclusive (floats allowed).
Box = tuple[float, float, float, float]

UPSAMPLE_MODES = ("nearest", "bilinear")


# ---------------------------------------------------------------------------------------------------
# geometry


@dataclass(frozen=True)
class ScaleGeometry:
    """Where the cells of one scale's grid lie on the original image.

    Attributes:
        image, scale: image index in the prompt and scale index (0 = smallest, prompt order).
        rows, cols: cells of the grid (merged visual tokens, or ViT patches — see ``cell_px``).
        cell_px: side of one cell in *resized-image* pixels (``p·m`` for visual tokens, ``p`` for patches).
        original_hw: ``(H, W)`` of the image as loaded; resized_hw: ``(h, w)`` the scale's resize;
            padded_hw: ``(hp, wp) = (rows·cell_px, cols·cell_px)`` after zero padding at the bottom/right.
    """

    image: int
    scale: int
    rows: int
    cols: int
    cell_px: int
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    padded_hw: tuple[int, int]

    def __post_init__(self) -> None:
        if self.rows * self.cell_px != self.padded_hw[0] or self.cols * self.cell_px != self.padded_hw[1]:
            raise ConfigError(f"a {self.rows} x {self.cols} grid of {self.cell_px}-px cells does not cover the padded "
                              f"size {self.padded_hw}")
        if min(self.original_hw) < 1 or min(self.resized_hw) < 1:
            raise ConfigError(f"empty image sizes in {self}")

    @classmethod
    def from_scale_info(cls, info: Any, merge_size: int, *, image: int | None = None,
                        scale: int | None = None) -> ScaleGeometry:
        """The token-level geometry of a :class:`~navil_utils.processing.multiscale.ScaleInfo`."""
        _, gh, gw = (int(v) for v in info.grid_thw)
        hp, wp = (int(v) for v in info.padded_hw)
        if gh % merge_size or gw % merge_size or hp % gh or wp % gw or hp // gh != wp // gw:
            raise ConfigError(f"scale grid {info.grid_thw} does not fit padded size {info.padded_hw} with merge size "
                              f"{merge_size}")
        patch = hp // gh
        return cls(int(info.image_index) if image is None else image,
                   int(info.scale_index) if scale is None else scale,
                   gh // merge_size, gw // merge_size, patch * merge_size,
                   tuple(int(v) for v in info.original_hw), tuple(int(v) for v in info.resized_hw), (hp, wp))

    # ------------------------------------------------------------------ derived
    @property
    def grid(self) -> tuple[int, int]:
        return self.rows, self.cols

    @property
    def factors(self) -> tuple[float, float]:
        """``(H / h, W / w)``: original pixels per resized pixel along y and x."""
        return self.original_hw[0] / self.resized_hw[0], self.original_hw[1] / self.resized_hw[1]

    @property
    def cell_hw(self) -> tuple[float, float]:
        """``(height, width)`` of one cell in original-image pixels."""
        fy, fx = self.factors
        return self.cell_px * fy, self.cell_px * fx

    @property
    def grid_box(self) -> Box:
        """The pixel box the whole grid covers, padding included (may extend beyond the image)."""
        fy, fx = self.factors
        return 0.0, 0.0, self.padded_hw[1] * fx, self.padded_hw[0] * fy

    @property
    def image_box(self) -> Box:
        """``(0, 0, W, H)``: the part of :attr:`grid_box` that is image."""
        return 0.0, 0.0, float(self.original_hw[1]), float(self.original_hw[0])

    def cell_box(self, row: int, col: int) -> Box:
        """Pixel box of cell ``(row, col)`` in original-image coordinates (not clipped to the image)."""
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise ModelInputError(f"cell ({row}, {col}) is outside the {self.rows} x {self.cols} grid")
        ch, cw = self.cell_hw
        return col * cw, row * ch, (col + 1) * cw, (row + 1) * ch

    def cell_boxes(self) -> np.ndarray:
        """``(rows, cols, 4)`` float64: every cell's :meth:`cell_box`."""
        ch, cw = self.cell_hw
        r, c = np.meshgrid(np.arange(self.rows, dtype=np.float64), np.arange(self.cols, dtype=np.float64),
                           indexing="ij")
        return np.stack([c * cw, r * ch, (c + 1) * cw, (r + 1) * ch], axis=-1)

    def overlap_fraction(self, box: Box) -> np.ndarray:
        """``(rows, cols)`` in [0, 1]: the share of each cell's area (padding part included) inside ``box``."""
        x0, y0, x1, y1 = (float(v) for v in box)
        ch, cw = self.cell_hw
        ys = np.arange(self.rows + 1, dtype=np.float64) * ch
        xs = np.arange(self.cols + 1, dtype=np.float64) * cw
        overlap_y = np.clip(np.minimum(ys[1:], y1) - np.maximum(ys[:-1], y0), 0.0, None) / ch
        overlap_x = np.clip(np.minimum(xs[1:], x1) - np.maximum(xs[:-1], x0), 0.0, None) / cw
        return np.clip(overlap_y[:, None] * overlap_x[None, :], 0.0, 1.0)

    def image_fraction(self) -> np.ndarray:
        """``(rows, cols)`` in [0, 1]: the share of each cell that is image rather than zero padding."""
        return self.overlap_fraction(self.image_box)

    def at_patches(self, merge_size: int) -> ScaleGeometry:
        """The same scale at ViT-patch resolution (cells of ``cell_px / m``)."""
        if self.cell_px % merge_size:
            raise ConfigError(f"cell size {self.cell_px} is not divisible by merge size {merge_size}")
        return replace(self, rows=self.rows * merge_size, cols=self.cols * merge_size,
                       cell_px=self.cell_px // merge_size)

    def describe(self) -> dict[str, Any]:
        """One table row: grid, sizes and the covered pixel box."""
        box = self.grid_box
        return {"image": self.image, "scale": self.scale, "rows": self.rows, "cols": self.cols,
                "cell_px": self.cell_px, "original_hw": self.original_hw, "resized_hw": self.resized_hw,
                "padded_hw": self.padded_hw, "grid_box": tuple(round(v, 3) for v in box),
                "cell_hw": tuple(round(v, 3) for v in self.cell_hw),
                "padding_share": round(1.0 - float(self.image_fraction().mean()), 4)}


def geometry_frame(geometries: Sequence[ScaleGeometry]):
    """One row per scale (pandas DataFrame): grid, original/resized/padded sizes, covered pixel box."""
    import pandas as pd

    return pd.DataFrame([g.describe() for g in geometries])


def scale_geometries(scales: Any, image: int = 0, merge_size: int | None = None) -> tuple[ScaleGeometry, ...]:
    """Token-level geometry of every scale of one image, smallest first.

    Args:
        scales: a :class:`~navil_utils.processing.multiscale.MultiScaleInputs` (its ``scales`` and merge size
            are used; ``image`` selects the image) or a sequence of ``ScaleInfo`` of one image, in prompt order.
        merge_size: needed for a plain sequence of ``ScaleInfo`` (default 2); ignored for ``MultiScaleInputs``.
    """
    infos = getattr(scales, "scales", None)
    if infos is not None:
        m = int(scales.merge_size)
        infos = [s for s in infos if int(s.image_index) == image]
        if not infos:
            raise ModelInputError(f"the preprocessed inputs have no image {image}")
    else:
        m = 2 if merge_size is None else int(merge_size)
        infos = list(scales)
        if not infos:
            raise ModelInputError("no scales given")
    return tuple(ScaleGeometry.from_scale_info(info, m, image=image, scale=k) for k, info in enumerate(infos))


def plan_geometries(model_or_config: Any, image_size: tuple[int, int], image: int = 0) -> tuple[ScaleGeometry, ...]:
    """Geometry of the scales a checkpoint makes of an ``(H, W)`` image, from its pixel budget (no pixels).

    Uses :func:`~navil_utils.processing.multiscale.plan_multiscale` with the config's
    :func:`~navil_utils.processing.processor.pixel_budget`, so it holds for any NaViL checkpoint.
    """
    from navil_utils.processing.multiscale import plan_multiscale
    from navil_utils.processing.processor import pixel_budget

    budget = pixel_budget(model_or_config)
    height, width = (int(v) for v in image_size)
    infos = plan_multiscale(height, width, **budget, image_index=image)
    return scale_geometries(infos, image, budget["merge_size"])


def match_geometry(layout: TokenLayout, image: int, geometry: Sequence[ScaleGeometry]) -> list[ScaleGeometry]:
    """``geometry`` checked against the layout's scales of ``image`` (same count and order, same token grids) and
    relabelled with the layout's image and scale indices.

    Raises:
        ModelInputError: the grids differ (geometry of another image, or of other preprocessing settings).
    """
    scales = [s for s in layout.scales if s.image == image]
    geometry = list(geometry)
    if len(geometry) != len(scales) or any((g.rows, g.cols) != (s.rows, s.cols) for g, s in zip(geometry, scales)):
        raise ModelInputError(f"the geometry's grids {[g.grid for g in geometry]} do not match image {image}'s "
                              f"token grids in the prompt {[(s.rows, s.cols) for s in scales]}")
    return [replace(g, image=image, scale=s.scale) for g, s in zip(geometry, scales)]


# ---------------------------------------------------------------------------------------------------
# LLM attention rows -> per-scale maps


@dataclass(frozen=True)
class ScaleMap:
    """A quantity of one image-scale laid out as the image.

    Attributes:
        image, scale: which scale.
        values: ``(..., rows, cols)`` — raster layout (row 0 = top), leading dims as given (e.g. heads).
        geometry: where the cells lie on the original image (``None`` when no geometry was given).
        query: for ViT patch maps, the query patch ``(row, col)`` on this scale's patch grid.
    """

    image: int
    scale: int
    values: torch.Tensor
    geometry: ScaleGeometry | None = None
    query: tuple[int, int] | None = None

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.values.shape[-2]), int(self.values.shape[-1])

    @property
    def pixel_box(self) -> Box | None:
        """The original-image box the grid covers (padding included), or ``None`` without geometry."""
        return None if self.geometry is None else self.geometry.grid_box

    @property
    def mass(self) -> torch.Tensor:
        """``(...)`` sum over the grid (NaN cells ignored)."""
        return torch.nan_to_num(self.values.float()).sum(dim=(-2, -1))


def _visual_positions(layout: TokenLayout, image: int, scale: int, frame: int) -> torch.Tensor:
    visual = layout.kind_mask("visual")
    return (visual & (layout.image == image) & (layout.scale == scale) & (layout.frame == frame)).nonzero().reshape(-1)


def scale_maps(attention_row: torch.Tensor, layout: TokenLayout, image: int = 0, *,
               geometry: Sequence[ScaleGeometry] | None = None, frame: int = 0) -> list[ScaleMap]:
    """Split an attention row over LLM keys into one raster map per scale of ``image``.

    Args:
        attention_row: ``(..., K)`` — e.g. ``rec.llm_map(layer)[h, i]`` or a head-stacked ``(heads', K)``.
            ``K`` may differ from ``len(layout)`` (a prefill row of a layout built with the answer appended)
            as long as it reaches past the image's last visual token.
        layout: the prompt's :class:`~navil_utils.analysis.attention.TokenLayout`.
        geometry: the image's :class:`ScaleGeometry` per scale (:func:`scale_geometries`,
            :func:`plan_geometries`); checked against the layout's grids.
    Returns:
        One :class:`ScaleMap` per scale (smallest first) with ``values (..., rows, cols)``: cell ``(r, c)`` holds
        the attention on the visual token showing that raster cell (window permutation undone).
    """
    scales = [s for s in layout.scales if s.image == image]
    if not scales:
        raise ModelInputError(f"the prompt has no image {image}")
    geometries = match_geometry(layout, image, geometry) if geometry is not None else [None] * len(scales)
    row = torch.as_tensor(attention_row)
    out = []
    for info, geo in zip(scales, geometries):
        positions = _visual_positions(layout, image, info.scale, frame)
        if positions.numel() != info.rows * info.cols:
            raise ConfigError(f"image {image} scale {info.scale} has no frame {frame}")
        if int(positions[-1]) >= row.shape[-1]:
            raise ModelInputError(f"the attention row has {row.shape[-1]} keys but image {image} scale {info.scale} "
                                  f"reaches position {int(positions[-1])}")
        values = row.new_zeros(*row.shape[:-1], info.rows, info.cols)
        device = row.device
        values[..., layout.row[positions].to(device), layout.col[positions].to(device)] = row[..., positions.to(device)]
        out.append(ScaleMap(image, info.scale, values, geo))
    return out


def upsample_to_image(grid_map: ScaleMap | torch.Tensor, image_size: tuple[int, int] | None = None, *,
                      geometry: ScaleGeometry | None = None, mode: str = "nearest") -> torch.Tensor:
    """Place a scale's grid map on the original image's pixel grid: ``(..., rows, cols)`` → ``(..., H, W)``.

    Every original pixel ``(y, x)`` is looked up at its centre ``(y + ½, x + ½)``, mapped into the scale's grid
    with the geometry (resize factors and cell size; padding cells lie beyond the image and are never hit
    by ``nearest``).

    * ``"nearest"``: the value of the cell containing the pixel centre — a piecewise-constant map whose cell
      footprints are exactly the cell boxes (:meth:`ScaleGeometry.cell_box`) clipped to the image.
    * ``"bilinear"``: values sit at cell centres and are interpolated linearly in y then x, clamped at the
      first/last cell centre (``align_corners=False`` convention); near a padded edge it blends towards the
      padding cell's value, as the model saw it.

    Values are *intensities*, not masses: the sum over pixels is not the sum over cells (multiply by
    ``1 / cell area`` first for a density).  For in-box mass shares use
    :meth:`ScaleGeometry.overlap_fraction`, which is exact.

    Args:
        grid_map: a :class:`ScaleMap` (its geometry is used) or a tensor ``(..., rows, cols)``.
        image_size: ``(H, W)``; default: the geometry's original size.
        geometry: for a tensor: its :class:`ScaleGeometry`; without one the grid is stretched over the image
            (correct only for a scale without zero padding, whose grid covers exactly the resized image).
        mode: ``"nearest"`` or ``"bilinear"``.
    """
    if mode not in UPSAMPLE_MODES:
        raise ConfigError(f"mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
    if isinstance(grid_map, ScaleMap):
        geometry = grid_map.geometry if geometry is None else geometry
        values = grid_map.values
    else:
        values = torch.as_tensor(grid_map)
    if values.ndim < 2:
        raise ModelInputError(f"a grid map needs at least 2 dims (rows, cols), got shape {tuple(values.shape)}")
    rows, cols = values.shape[-2:]
    if geometry is not None and (geometry.rows, geometry.cols) != (rows, cols):
        raise ModelInputError(f"the map's grid {(rows, cols)} is not the geometry's {geometry.grid}")
    if image_size is None:
        if geometry is None:
            raise ConfigError("upsample_to_image needs image_size or a geometry")
        image_size = geometry.original_hw
    height, width = (int(v) for v in image_size)
    if geometry is not None and (height, width) != tuple(geometry.original_hw):
        raise ModelInputError(f"image_size {(height, width)} is not the geometry's original size "
                              f"{geometry.original_hw}")
    # pixel centre (y + 1/2) in cell units is (2y + 1)·num / (2·den): num / den = cells per original pixel
    if geometry is not None:
        (num_y, den_y), (num_x, den_x) = ((geometry.resized_hw[0], height * geometry.cell_px),
                                          (geometry.resized_hw[1], width * geometry.cell_px))
    else:
        (num_y, den_y), (num_x, den_x) = (rows, height), (cols, width)
    centres_y = 2 * torch.arange(height, dtype=torch.long) + 1
    centres_x = 2 * torch.arange(width, dtype=torch.long) + 1
    device = values.device
    if mode == "nearest":  # integer arithmetic: a pixel centre on a cell edge belongs to the later cell
        iy = torch.div(centres_y * num_y, 2 * den_y, rounding_mode="floor").clamp_(0, rows - 1).to(device)
        ix = torch.div(centres_x * num_x, 2 * den_x, rounding_mode="floor").clamp_(0, cols - 1).to(device)
        return values[..., iy[:, None], ix[None, :]]
    fy = centres_y.double() * num_y / (2 * den_y)
    fx = centres_x.double() * num_x / (2 * den_x)
    work = values if values.is_floating_point() else values.float()
    out = _lerp(work, fy - 0.5, rows, dim=-2)
    return _lerp(out, fx - 0.5, cols, dim=-1)


def _lerp(values: torch.Tensor, where: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Linear interpolation of ``values`` along ``dim`` at fractional indices ``where`` (clamped)."""
    where = where.clamp(0, size - 1)
    low = where.floor().long()
    high = (low + 1).clamp(max=size - 1)
    weight = (where - low).to(values.dtype).to(values.device)
    a = values.index_select(dim, low.to(values.device))
    b = values.index_select(dim, high.to(values.device))
    shape = [1] * values.ndim
    shape[dim] = -1
    weight = weight.view(shape)
    return a * (1 - weight) + b * weight


# ---------------------------------------------------------------------------------------------------
# ViT: query-patch maps


def _vit_scales(layout: TokenLayout, image: int) -> list:
    scales = [s for s in layout.scales if s.image == image]
    if not scales:
        raise ModelInputError(f"the prompt has no image {image}")
    return scales


def _patch_geometry(layout: TokenLayout, image: int,
                    geometry: Sequence[ScaleGeometry] | None) -> list[ScaleGeometry | None]:
    if geometry is None:
        return [None] * len(_vit_scales(layout, image))
    return [g.at_patches(layout.merge_size) for g in match_geometry(layout, image, geometry)]


def vit_position(layout: TokenLayout, image: int, scale: int, row: int, col: int, frame: int = 0) -> int:
    """Prompt-local ViT (encoder-order) position of patch ``(row, col)`` of one scale."""
    hit = ((layout.vit_image == image) & (layout.vit_scale == scale) & (layout.vit_frame == frame)
           & (layout.vit_row == row) & (layout.vit_col == col)).nonzero().reshape(-1)
    if hit.numel() != 1:
        raise ModelInputError(f"image {image} scale {scale} has no patch ({row}, {col}) in frame {frame}")
    return int(hit[0])


def _segment_of(segments: Sequence[VitSegmentAttention], position: int) -> VitSegmentAttention:
    for segment in segments:
        if segment.start <= position < segment.end:
            return segment
    raise ConfigError(f"no recorded ViT segment holds position {position}: its segment was not recorded (include "
                      "the position in vit_queries)")


def vit_query_maps(recorder: AttentionRecorder, layout: TokenLayout, layer: int,
                   patches: Sequence[tuple[int, int, int]], *, image: int = 0, call: int = 0,
                   geometry: Sequence[ScaleGeometry] | None = None) -> list[ScaleMap]:
    """Attention of chosen query patches in one ViT layer, each on its scale's patch grid.

    Args:
        recorder: a recorder that recorded ``layer`` of the ViT (with ``vit_queries`` covering the patches).
        layout: the prompt's layout (its ``vit_offset`` locates the prompt in a packed batch).
        patches: ``(scale, patch_row, patch_col)`` per query, raster patch coordinates.
        geometry: the image's token-level geometry (converted to patch level).
    Returns:
        One :class:`ScaleMap` per query: ``values (heads', h, w)`` on the query's scale (``h × w`` patches);
        keys outside the query's attention segment (other windows in a window layer) are NaN.
    """
    segments = recorder.vit_segments(layer, call)
    scales = _vit_scales(layout, image)
    geos = _patch_geometry(layout, image, geometry)
    by_scale = {s.scale: (s, g) for s, g in zip(scales, geos)}
    out = []
    for scale, row, col in patches:
        if scale not in by_scale:
            raise ModelInputError(f"image {image} has no scale {scale}")
        info, geo = by_scale[scale]
        local = vit_position(layout, image, scale, row, col)
        position = local + layout.vit_offset
        segment = _segment_of(segments, position)
        hit = (segment.query_positions == position).nonzero().reshape(-1)
        if hit.numel() == 0:
            raise ConfigError(f"ViT position {position} (scale {scale}, patch ({row}, {col})) was not recorded in "
                              f"layer {layer}: include it in vit_queries")
        keys = segment.probs[:, int(hit[0])].float()                               # (heads', L_segment)
        values = layout.arrange_vit(keys, image, scale, offset=segment.start - layout.vit_offset)
        out.append(ScaleMap(image, info.scale, values, geo, query=(int(row), int(col))))
    return out


# ---------------------------------------------------------------------------------------------------
# ViT: attention rollout


def attention_rollout(layer_maps: Sequence[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) of square maps, first layer first.

    Each layer's map ``A`` (``(L, L)``, or ``(heads, L, L)`` averaged over heads) becomes
    ``A' = (1 − residual)·A + residual·I``, rows re-normalised to sum to one (the identity stands for the
    residual stream); the rollout is ``R = A'_n ⋯ A'_2 · A'_1`` (float64), so ``R[i, j]`` is the share of
    output token ``i``'s information that flows from input token ``j``.  ``residual=0.5`` is the usual
    convention.  Returns ``(L, L)`` float64 (the identity for no maps is not defined: at least one map).
    """
    if not layer_maps:
        raise ConfigError("attention_rollout needs at least one layer map")
    if not 0.0 <= residual <= 1.0:
        raise ConfigError(f"residual must be in [0, 1], got {residual}")
    result = None
    for index, probs in enumerate(layer_maps):
        probs = torch.as_tensor(probs).double()
        if probs.ndim == 3:
            probs = probs.mean(0)
        if probs.ndim != 2 or probs.shape[0] != probs.shape[1]:
            raise ModelInputError(f"layer map {index} must be (L, L) or (heads, L, L), got {tuple(probs.shape)}")
        if result is not None and probs.shape != result.shape:
            raise ModelInputError(f"layer map {index} has shape {tuple(probs.shape)}, earlier maps "
                                  f"{tuple(result.shape)}")
        step = (1.0 - residual) * probs + residual * torch.eye(probs.shape[0], dtype=probs.dtype)
        step = step / step.sum(-1, keepdim=True).clamp_min(torch.finfo(step.dtype).tiny)
        result = step if result is None else step @ result
    return result


@dataclass(frozen=True)
class ScaleRollout:
    """ViT attention rollout of one image-scale.

    Attributes:
        image, scale: which scale; grid: ``(h, w)`` patches.
        matrix: ``(h·w, h·w)`` float64 rollout, rows = output patches, columns = input patches, both in raster
            order (index ``row·w + col``; the encoder's window order undone).
        layers: the ViT layers multiplied, first first.
        geometry: patch-level :class:`ScaleGeometry` or ``None``.
    """

    image: int
    scale: int
    grid: tuple[int, int]
    matrix: torch.Tensor
    layers: tuple[int, ...]
    geometry: ScaleGeometry | None = None

    def map(self, queries: Sequence[tuple[int, int]] | None = None) -> ScaleMap:
        """Mean rollout row of the query patches ``[(row, col), …]`` (default: every patch) as an ``(h, w)`` map."""
        h, w = self.grid
        if queries is None:
            rows = self.matrix.mean(0)
            query = None
        else:
            queries = list(queries)
            bad = [q for q in queries if not (0 <= q[0] < h and 0 <= q[1] < w)]
            if bad or not queries:
                raise ModelInputError(f"query patches {bad or queries} are not on the {h} x {w} patch grid")
            rows = self.matrix[[r * w + c for r, c in queries]].mean(0)
            query = tuple(queries[0]) if len(queries) == 1 else None
        return ScaleMap(self.image, self.scale, rows.reshape(h, w), self.geometry, query=query)


def vit_rollout(recorder: AttentionRecorder, layout: TokenLayout, image: int = 0, *,
                layers: Sequence[int] | None = None, call: int = 0, residual: float = 0.5,
                geometry: Sequence[ScaleGeometry] | None = None) -> list[ScaleRollout]:
    """Attention rollout across ViT layers, per scale of ``image`` (see :func:`attention_rollout`).

    A scale's patches attend only to patches of the same scale (global layers: one segment per scale; window
    layers: block-diagonal windows), so each scale has its own ``(L, L)`` rollout.  Per layer the recorded
    segments of the scale are assembled into one ``(L, L)`` map (zero between windows), heads averaged.

    Args:
        recorder: recorded with ``vit_layers`` covering ``layers`` and ``vit_queries="all"`` (every row is
            needed); heads ``"all"`` or ``"mean"`` (a ``"max"`` recording would be rolled out as recorded).
        layers: ViT layers to multiply, in ascending order (default: every recorded layer).
    Raises:
        ConfigError: a layer or a row was not recorded.
    """
    if layers is None:
        chosen = sorted(recorder.vit_layers)
    else:
        vit = getattr(recorder, "_vit", None)
        count = vit.config.num_hidden_layers if vit is not None else 0
        chosen = sorted({int(layer) + count if int(layer) < 0 else int(layer) for layer in layers})
    if not chosen:
        raise ConfigError("no ViT layer was recorded: use AttentionRecorder(..., vit_layers='all')")
    scales = _vit_scales(layout, image)
    if any(info.grid_thw[0] != 1 for info in scales):
        raise ConfigError("vit_rollout supports single-frame scales (images), not videos")
    geos = _patch_geometry(layout, image, geometry)
    per_layer = {layer: recorder.vit_segments(layer, call) for layer in chosen}
    out = []
    for info, geo in zip(scales, geos):
        start, end = info.vit_start + layout.vit_offset, info.vit_end + layout.vit_offset
        length = end - start
        maps = []
        for layer in chosen:
            full = torch.zeros(length, length, dtype=torch.float64)
            covered = torch.zeros(length, dtype=torch.bool)
            for segment in per_layer[layer]:
                if segment.end <= start or segment.start >= end:
                    continue
                if segment.start < start or segment.end > end:
                    raise ConfigError(f"ViT segment [{segment.start}, {segment.end}) of layer {layer} straddles the "
                                      f"scale [{start}, {end})")
                rows = segment.query_rows
                local = slice(segment.start - start, segment.end - start)
                block = torch.zeros(segment.length, segment.length, dtype=torch.float64)
                block[rows] = segment.probs.double().mean(0)
                full[local, local] = block
                covered[segment.start - start + rows] = True
            if not bool(covered.all()):
                raise ConfigError(f"ViT layer {layer} has unrecorded rows for image {image} scale {info.scale}: "
                                  "the rollout needs every row (record with vit_queries='all')")
            maps.append(full)
        rollout = attention_rollout(maps, residual)
        # encoder order -> raster order of the scale's patch grid
        local_positions = torch.arange(info.vit_start, info.vit_end)
        w = info.grid_thw[2]
        raster = layout.vit_row[local_positions] * w + layout.vit_col[local_positions]
        matrix = torch.empty_like(rollout)
        matrix[raster[:, None], raster[None, :]] = rollout
        out.append(ScaleRollout(image, info.scale, (info.grid_thw[1], w), matrix, tuple(chosen), geo))
    return out
