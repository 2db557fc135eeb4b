"""NaViL's visual multi-scale packing: image → ``pixel_values [N, 3, p, p]`` + ``image_grid_thw [S, 3]``.

NaViL feeds every image at several scales (paper §4.1, "visual multi-scale packing").  The released
code (``anyres_preprocess_multi_scale`` in ``demo.py`` on top of its copy of Qwen2-VL's image
processor with ``do_resize=False, do_pad=True``) does, per image of size ``H × W``:

1. **resize rule** (``smart_resize`` with ``factor=1``): keep the size if ``H·W`` is inside
   ``[min_pixels, max_pixels]``; otherwise scale both sides by ``β`` (``floor`` when shrinking to
   ``max_pixels``, ``ceil`` when growing to ``min_pixels``) — aspect ratio kept, *no* rounding to the
   patch grid; aspect ratios above 200 are rejected;
2. PIL **bicubic** resize of the uint8 RGB image to that size;
3. **zero padding** at the bottom/right up to multiples of ``p·m`` (= 32 px), i.e. −1 after
   normalisation — padded patches are ordinary tokens;
4. ``(x / 255 − 0.5) / 0.5`` in float32, patches ordered merge-block by merge-block (§4.1 of the spec);
5. **scale loop**: the next budget is ``padded area of the current smallest scale × 0.7071²``
   computed as an int64 tensor times a Python float, i.e. in **float32**; stop when that budget is
   below ``min_pixels`` or when the new scale does not have fewer patches; scales are prepended, so
   the output runs smallest → largest.

:func:`plan_multiscale` reproduces steps 1 and 5 with plain arithmetic (float32 emulated with numpy
scalars, bit-identical to the reference's torch scalars), so sizes and token counts are known without
touching pixels.  :func:`preprocess_multiscale` then runs one PIL bicubic resize of the original per
*kept* scale and none for a scale of the original size (the reference also runs the discarded last
processor call, and copies, pads, rescales in float64 and transposes every scale separately), keeps
pixels in uint8 through padding and patch reordering, and normalises once, from a strided patch-order
view straight into the preallocated output — bit-identical to the reference's
float64-rescale-then-float32-normalise arithmetic (checked for all 256 values at import).
Large inputs resize their scales in parallel threads (PIL releases the GIL); results do not depend
on it.

Deliberate deviations from the reference (plain RGB images of height other than 1 or 3 are unaffected):

* images are loaded with :func:`navil_utils.load_image` (EXIF orientation applied, alpha composited on
  white — the reference demo's ``.convert("RGB")`` drops alpha instead);
* transformers 4.51's ``infer_channel_dimension_format`` reads an ``(H, W, 3)`` array with
  ``H ∈ {1, 3}`` as channels-first, so the reference garbles images of height 1 or 3; here they are
  handled like any other image (as transformers 5.x's PIL backend does).

Token accounting (visual tokens per scale, rows, the ``<img>…</img>`` span) lives in
:mod:`navil_utils.processing.image_tokens` and is re-exported here.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from navil_utils.constants import (
    NAVIL_MAX_PIXELS,
    NAVIL_MERGE_SIZE,
    NAVIL_MIN_PIXELS,
    NAVIL_PATCH_SIZE,
    NAVIL_SCALE_DOWNSAMPLE_RATIO,
    NAVIL_WINDOW_SIZE,
)
from navil_utils.errors import ImageLoadError
from navil_utils.processing.image_io import ImageSource, describe_source, load_image
from navil_utils.processing.image_tokens import (
    ScaleTokens,
    image_span_ids,
    image_span_text,
    scale_token_counts,
)

#: The processor refuses ``max(H, W) / min(H, W)`` above this.
MAX_ASPECT_RATIO = 200
RESCALE_FACTOR = 1 / 255


def normalisation_table() -> np.ndarray:
    """``uint8 → float32`` exactly as the processor computes it: ``float32(u · (1/255))`` (rescale in
    float64, then cast), then ``(x − 0.5) / 0.5`` in float32.  ``[256]`` float32."""
    rescaled = (np.arange(256, dtype=np.float64) * RESCALE_FACTOR).astype(np.float32)
    return ((rescaled - np.float32(0.5)) / np.float32(0.5)).astype(np.float32)


def _normalise_into(pixels_u8: np.ndarray, out: np.ndarray) -> None:
    """``out = (float32(u) / 255 − 0.5) · 2`` in float32, in place (no temporaries; ``pixels_u8`` may
    be a strided view).  Bit-identical to :func:`normalisation_table` — checked for all 256 values
    when this module is imported."""
    np.divide(pixels_u8, np.float32(255), out=out, dtype=np.float32)
    np.subtract(out, np.float32(0.5), out=out)
    np.multiply(out, np.float32(2), out=out)


def _check_normalisation() -> None:
    every_value = np.arange(256, dtype=np.uint8)
    result = np.empty(256, dtype=np.float32)
    _normalise_into(every_value, result)
    if not np.array_equal(result, normalisation_table()):  # pragma: no cover - IEEE float32 guarantees it
        raise RuntimeError("float32 normalisation does not reproduce the processor's arithmetic")


_check_normalisation()


# ---------------------------------------------------------------------------------------------------
# sizes: the resize rule and the scale loop (arithmetic only)


def check_aspect_ratio(height: int, width: int, name: str = "image") -> None:
    """Raise :class:`ImageLoadError` if ``max/min`` side ratio exceeds :data:`MAX_ASPECT_RATIO`."""
    if height < 1 or width < 1:
        raise ImageLoadError(f"{name}: empty image ({height}x{width})")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageLoadError(
            f"{name}: aspect ratio {ratio:.1f} ({width}x{height}) exceeds NaViL's limit of "
            f"{MAX_ASPECT_RATIO}; crop or pad the image first"
        )


def navil_resize_size(height: int, width: int, min_pixels: int, max_pixels: float | np.float32) -> tuple[int, int]:
    """The processor's resize rule (Qwen2-VL ``smart_resize`` with ``factor=1``) → ``(h, w)``.

    ``max_pixels`` is an int (first scale) or a ``np.float32`` budget (later scales): with a float32
    budget the comparison and ``H·W / budget`` are evaluated in float32 exactly like the reference's
    0-d float32 tensor (``1/budget`` first, then the product), the square root and ``floor`` in float64.
    """
    check_aspect_ratio(height, width)
    h_bar, w_bar = height, width  # round(x / 1) * 1 of ints
    if isinstance(max_pixels, np.floating):
        budget = np.float32(max_pixels)
        too_large = bool(np.float32(h_bar * w_bar) > budget)
        if too_large:
            beta = math.sqrt(float((np.float32(1.0) / budget) * np.float32(height * width)))
    else:
        too_large = h_bar * w_bar > max_pixels
        if too_large:
            beta = math.sqrt(height * width / max_pixels)
    if too_large:
        h_bar, w_bar = math.floor(height / beta), math.floor(width / beta)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta), math.ceil(width * beta)
    if h_bar < 1 or w_bar < 1:
        raise ImageLoadError(
            f"a {width}x{height} image shrinks to {w_bar}x{h_bar} under max_pixels={float(max_pixels):g}; "
            f"use a larger pixel budget"
        )
    return h_bar, w_bar


def next_scale_budget(padded_pixels: int, scale_downsample_ratio: float = NAVIL_SCALE_DOWNSAMPLE_RATIO) -> np.float32:
    """``max_pixels`` of the next smaller scale: ``float32(padded_pixels) · float32(r²)``.

    (The reference multiplies an int64 tensor by the Python float ``r ** 2``; torch computes that in
    float32, e.g. ``6144 · 0.7071² = 3071.94`` for the golden fixture.)
    """
    return np.float32(padded_pixels) * np.float32(scale_downsample_ratio**2)


@dataclass(frozen=True)
class ScaleInfo:
    """Geometry and token budget of one scale of one image (sizes are ``(height, width)`` in pixels)."""

    image_index: int
    scale_index: int  # 0 = smallest scale of this image
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    padded_hw: tuple[int, int]
    grid_thw: tuple[int, int, int]  # (t, h, w) in patches
    max_pixels: float  # the pixel budget this scale was sized with
    tokens: ScaleTokens  # rows, cols, visual tokens, span tokens (navil_utils.processing.image_tokens)

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w

    @property
    def visual_tokens(self) -> int:
        return self.tokens.visual_tokens

    @property
    def padded_pixels(self) -> int:
        return self.padded_hw[0] * self.padded_hw[1]

    @property
    def padding_fraction(self) -> float:
        """Share of this scale's pixels (and patches' area) that is zero padding."""
        return 1.0 - self.resized_hw[0] * self.resized_hw[1] / self.padded_pixels

    @property
    def needs_resize(self) -> bool:
        return self.resized_hw != self.original_hw


def _make_scale(
    image_index: int, original_hw: tuple[int, int], resized_hw: tuple[int, int], max_pixels: float,
    patch_size: int, merge_size: int,
) -> ScaleInfo:
    unit = patch_size * merge_size
    padded = (math.ceil(resized_hw[0] / unit) * unit, math.ceil(resized_hw[1] / unit) * unit)
    grid = (1, padded[0] // patch_size, padded[1] // patch_size)
    tokens = scale_token_counts([grid], merge_size)[0]
    return ScaleInfo(image_index, 0, original_hw, resized_hw, padded, grid, float(max_pixels), tokens)


def _check_settings(min_pixels: int, max_pixels: float, ratio: float, patch_size: int, merge_size: int) -> None:
    if patch_size < 1 or merge_size < 1:
        raise ValueError(f"patch_size and merge_size must be positive, got {patch_size}, {merge_size}")
    if min_pixels < 1 or max_pixels < min_pixels:
        raise ValueError(f"need 1 <= min_pixels <= max_pixels, got min_pixels={min_pixels}, max_pixels={max_pixels}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"scale_downsample_ratio must be in (0, 1), got {ratio}")


def plan_multiscale(
    height: int,
    width: int,
    min_pixels: int = NAVIL_MIN_PIXELS,
    max_pixels: int = NAVIL_MAX_PIXELS,
    scale_downsample_ratio: float = NAVIL_SCALE_DOWNSAMPLE_RATIO,
    patch_size: int = NAVIL_PATCH_SIZE,
    merge_size: int = NAVIL_MERGE_SIZE,
    *,
    image_index: int = 0,
    name: str = "image",
) -> list[ScaleInfo]:
    """Scales (smallest → largest) that NaViL makes of an ``height × width`` image; no pixels touched."""
    _check_settings(min_pixels, max_pixels, scale_downsample_ratio, patch_size, merge_size)
    check_aspect_ratio(height, width, name)
    original = (height, width)
    scales = [_make_scale(image_index, original, navil_resize_size(height, width, min_pixels, max_pixels),
                          max_pixels, patch_size, merge_size)]
    while True:
        budget = next_scale_budget(scales[0].num_patches * patch_size**2, scale_downsample_ratio)
        if budget < np.float32(min_pixels):
            break
        candidate = _make_scale(image_index, original, navil_resize_size(height, width, min_pixels, budget),
                                budget, patch_size, merge_size)
        if candidate.num_patches >= scales[0].num_patches:
            break
        scales.insert(0, candidate)
    return [_with_index(s, i) for i, s in enumerate(scales)]


def _with_index(scale: ScaleInfo, scale_index: int) -> ScaleInfo:
    return ScaleInfo(scale.image_index, scale_index, scale.original_hw, scale.resized_hw, scale.padded_hw,
                     scale.grid_thw, scale.max_pixels, scale.tokens)


def navil_token_count(height: int, width: int, *, span: bool = False, **settings) -> int:
    """Visual tokens NaViL spends on an ``height × width`` image, summed over scales.

    With ``span=True`` the whole image span is counted (``<img>``, line breaks, frame breaks,
    ``</img>``).  ``settings`` are :func:`plan_multiscale`'s keyword arguments.
    """
    scales = plan_multiscale(height, width, **settings)
    if span:
        return 2 + sum(s.tokens.span_tokens for s in scales)
    return sum(s.visual_tokens for s in scales)


# ---------------------------------------------------------------------------------------------------
# pixels


def patchify(padded: np.ndarray, patch_size: int = NAVIL_PATCH_SIZE, merge_size: int = NAVIL_MERGE_SIZE) -> np.ndarray:
    """``(Hp, Wp, C)`` → ``(N, C, p, p)`` in the ViT's patch order (merge blocks in raster order,
    the ``m×m`` patches of a block in raster order).  Works for any dtype; returns a new array."""
    hp, wp, channels = padded.shape
    unit = patch_size * merge_size
    if hp % unit or wp % unit:
        raise ValueError(f"padded size {hp}x{wp} is not a multiple of patch_size*merge_size={unit}")
    blocks = padded.reshape(hp // unit, merge_size, patch_size, wp // unit, merge_size, patch_size, channels)
    blocks = blocks.transpose(0, 3, 1, 4, 6, 2, 5)  # (bh, bw, mh, mw, c, py, px)
    return np.ascontiguousarray(blocks).reshape(-1, channels, patch_size, patch_size)


def unpatchify(patches: np.ndarray | torch.Tensor, grid_thw: Sequence[int], merge_size: int = NAVIL_MERGE_SIZE) -> np.ndarray:
    """Inverse of :func:`patchify` for one scale: ``(t·h·w, C, p, p)`` → ``(C, h·p, w·p)`` (frame 0)."""
    array = patches.detach().cpu().numpy() if isinstance(patches, torch.Tensor) else np.asarray(patches)
    _, gh, gw = (int(v) for v in grid_thw)
    n, channels, p, _ = array.shape
    if n < gh * gw:
        raise ValueError(f"{n} patches cannot fill a {gh}x{gw} grid")
    m = merge_size
    blocks = array[: gh * gw].reshape(gh // m, gw // m, m, m, channels, p, p)
    return blocks.transpose(4, 0, 2, 5, 1, 3, 6).reshape(channels, gh * p, gw * p)


def _write_scale(image: Image.Image, scale: ScaleInfo, out: np.ndarray, patch_size: int, merge_size: int) -> None:
    """Resize (only if the size changes), zero-pad, patchify and normalise one scale into ``out``
    ``(n, 3, p, p)``: one PIL bicubic resize of the original, uint8 until the final normalisation,
    which reads the padded image through a strided patch-order view and writes ``out`` directly."""
    h, w = scale.resized_hw
    if scale.needs_resize:
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    resized = np.asarray(image)
    hp, wp = scale.padded_hw
    if (hp, wp) != (h, w):
        padded = np.zeros((hp, wp, 3), dtype=np.uint8)
        padded[:h, :w] = resized
    else:
        padded = resized
    unit = patch_size * merge_size
    blocks = padded.reshape(hp // unit, merge_size, patch_size, wp // unit, merge_size, patch_size, 3)
    blocks = blocks.transpose(0, 3, 1, 4, 6, 2, 5)  # (bh, bw, mh, mw, c, py, px) — patch order, a view
    _normalise_into(blocks, out.reshape(blocks.shape))


_PARALLEL_MIN_PIXELS = 1_000_000


def _worker_count(requested: int | None, jobs: list) -> int:
    if requested is not None:
        if requested < 1:
            raise ValueError(f"num_workers must be >= 1, got {requested}")
        return min(requested, len(jobs))
    resize_work = sum(image.width * image.height for image, scale, _ in jobs if scale.needs_resize)
    if resize_work < _PARALLEL_MIN_PIXELS:
        return 1
    return max(1, min(4, os.cpu_count() or 1, len(jobs)))


@dataclass
class MultiScaleInputs:
    """Output of :func:`preprocess_multiscale` (the layout of the golden ``pixel_inputs.safetensors``).

    ``pixel_values [N, 3, p, p]`` float32 and ``image_grid_thw [S, 3]`` int64 list every image's scales
    smallest → largest, images in input order; ``num_scales[i]`` is the number of scales of image i;
    ``scales`` holds one :class:`ScaleInfo` per grid row.
    """

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    num_scales: list[int]
    scales: list[ScaleInfo]
    patch_size: int = NAVIL_PATCH_SIZE
    merge_size: int = NAVIL_MERGE_SIZE
    sources: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return len(self.num_scales)

    def scales_of(self, image_index: int) -> list[ScaleInfo]:
        """The scales (smallest → largest) of one image."""
        if not 0 <= image_index < self.num_images:
            raise IndexError(f"image_index {image_index} out of range for {self.num_images} image(s)")
        return [s for s in self.scales if s.image_index == image_index]

    def grids_of(self, image_index: int) -> list[tuple[int, int, int]]:
        return [s.grid_thw for s in self.scales_of(image_index)]

    def patch_ranges(self) -> list[tuple[int, int]]:
        """``(start, stop)`` rows of ``pixel_values`` for every grid row."""
        bounds = np.cumsum([0] + [s.num_patches for s in self.scales]).tolist()
        return list(zip(bounds[:-1], bounds[1:]))

    def visual_tokens_per_scale(self) -> list[int]:
        return [s.visual_tokens for s in self.scales]

    @property
    def num_visual_tokens(self) -> int:
        """``<IMG_CONTEXT>`` tokens of all images (= ``N / m²``)."""
        return sum(s.visual_tokens for s in self.scales)

    def image_span_text(self, image_index: int = 0) -> str:
        """The ``<img>…</img>`` prompt span of one image (:func:`navil_utils.processing.image_tokens.image_span_text`)."""
        return image_span_text(self.grids_of(image_index), self.merge_size)

    def image_span_ids(self, token_ids: dict[str, int], image_index: int = 0) -> list[int]:
        return image_span_ids(self.grids_of(image_index), token_ids, self.merge_size)

    def to_frame(self):
        """One row per scale (pandas DataFrame): sizes, grid, budget, tokens, padding share."""
        import pandas as pd

        return pd.DataFrame([{
            "image": s.image_index, "scale": s.scale_index + 1,
            "resized (h×w)": f"{s.resized_hw[0]}×{s.resized_hw[1]}",
            "padded (h×w)": f"{s.padded_hw[0]}×{s.padded_hw[1]}",
            "grid (t,h,w)": str(s.grid_thw), "max_pixels": round(s.max_pixels, 2),
            "patches": s.num_patches, "visual tokens": s.visual_tokens, "span tokens": s.tokens.span_tokens,
            "padding %": round(100 * s.padding_fraction, 1),
        } for s in self.scales])

    def scale_images(self) -> list[np.ndarray]:
        """Every scale as the uint8 ``(Hp, Wp, 3)`` image the ViT sees (padding included)."""
        images = []
        for scale, (start, stop) in zip(self.scales, self.patch_ranges()):
            chw = unpatchify(self.pixel_values[start:stop], scale.grid_thw, self.merge_size)
            images.append(np.clip(np.rint((chw * 0.5 + 0.5) * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0))
        return images


def preprocess_multiscale(
    images: ImageSource | Sequence[ImageSource],
    min_pixels: int = NAVIL_MIN_PIXELS,
    max_pixels: int = NAVIL_MAX_PIXELS,
    scale_downsample_ratio: float = NAVIL_SCALE_DOWNSAMPLE_RATIO,
    patch_size: int = NAVIL_PATCH_SIZE,
    merge_size: int = NAVIL_MERGE_SIZE,
    *,
    num_workers: int | None = None,
) -> MultiScaleInputs:
    """NaViL's visual multi-scale packing of one image or a list of images.

    Args:
        images: one image or a list/tuple of images; each a path, URL, bytes, ``PIL.Image`` or array
            (see :func:`navil_utils.load_image`).
        min_pixels, max_pixels: pixel budget of the largest scale (defaults: NaViL's
            ``min/max_dynamic_patch`` 256 / 24576 patches of 16² px = 65,536 / 6,291,456 px).
        scale_downsample_ratio: side ratio between consecutive scales (0.7071).
        patch_size, merge_size: ViT patch size (16) and pixel-shuffle merge size (2).
        num_workers: threads resizing scales in parallel (default: up to 4 for inputs of more than
            1 MPixel of resize work, else 1); the output does not depend on it.

    Returns:
        :class:`MultiScaleInputs` with ``pixel_values [N, 3, p, p]`` float32 in [-1, 1],
        ``image_grid_thw [S, 3]`` int64 (per image smallest → largest), ``num_scales`` (one per image)
        and per-scale :class:`ScaleInfo` (resized/padded size, grid, visual tokens).

    Raises:
        ImageLoadError: unreadable image, or aspect ratio above 200 (the message names the image).
    """
    sources = list(images) if isinstance(images, (list, tuple)) else [images]
    if not sources:
        raise ImageLoadError("preprocess_multiscale got an empty list of images")
    _check_settings(min_pixels, max_pixels, scale_downsample_ratio, patch_size, merge_size)
    loaded, plans, names = [], [], []
    for index, source in enumerate(sources):
        name = describe_source(source)
        image = load_image(source)
        plans.append(plan_multiscale(image.height, image.width, min_pixels, max_pixels, scale_downsample_ratio,
                                     patch_size, merge_size, image_index=index, name=name))
        loaded.append(image)
        names.append(name)
    scales = [s for plan in plans for s in plan]
    total = sum(s.num_patches for s in scales)
    pixel_values = np.empty((total, 3, patch_size, patch_size), dtype=np.float32)
    jobs, start = [], 0
    for image, plan in zip(loaded, plans):
        for scale in plan:
            stop = start + scale.num_patches
            jobs.append((image, scale, pixel_values[start:stop]))
            start = stop
    workers = _worker_count(num_workers, jobs)
    if workers > 1:  # PIL's resize and numpy's copies release the GIL; every job owns its output rows
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(_write_scale, *job, patch_size, merge_size) for job in jobs]:
                future.result()
    else:
        for job in jobs:
            _write_scale(*job, patch_size, merge_size)
    grids = torch.tensor([s.grid_thw for s in scales], dtype=torch.int64)
    return MultiScaleInputs(
        pixel_values=torch.from_numpy(pixel_values),
        image_grid_thw=grids,
        num_scales=[len(plan) for plan in plans],
        scales=scales,
        patch_size=patch_size,
        merge_size=merge_size,
        sources=names,
    )



# ---------------------------------------------------------------------------------------------------
# window attention partitions — thin adapters over the ViT's own window_layout, so
# the figures show exactly the partition the model uses


def window_token_order(grid_h: int, grid_w: int, window_size: int = NAVIL_WINDOW_SIZE,
                       merge_size: int = NAVIL_MERGE_SIZE) -> np.ndarray:
    """The ViT's window permutation of one scale (``navil_utils.models.vision.window_layout``): raster
    indices of the merged tokens listed window by window (raster inside a window).  The reference never
    undoes it, so the LLM receives such a scale's visual tokens in this order (e.g. merged grid 3×5 →
    ``[0,1,2,3,5,6,7,8,10,11,12,13,4,9,14]``)."""
    return _window_layout(grid_h, grid_w, window_size, merge_size)[0]


def merged_token_windows(grid_h: int, grid_w: int, window_size: int = NAVIL_WINDOW_SIZE,
                         merge_size: int = NAVIL_MERGE_SIZE) -> np.ndarray:
    """Window id (0, 1, … in the ViT's window order) of every merged token of one scale,
    ``[grid_h/m, grid_w/m]`` int64; windows are ``window_size`` patches per side from the top-left,
    the last row/column of windows may be partial."""
    order, window_of_position = _window_layout(grid_h, grid_w, window_size, merge_size)
    ids = np.empty(order.size, dtype=np.int64)
    ids[order] = window_of_position
    return ids.reshape(grid_h // merge_size, grid_w // merge_size)


def _window_layout(grid_h: int, grid_w: int, window_size: int, merge_size: int) -> tuple[np.ndarray, np.ndarray]:
    from navil_utils.models.vision import window_layout

    if grid_h % merge_size or grid_w % merge_size:
        raise ValueError(f"grid {grid_h}x{grid_w} is not divisible by merge_size={merge_size}")
    if window_size // merge_size < 1:
        raise ValueError(f"window_size={window_size} is smaller than merge_size={merge_size}")
    layout = window_layout(torch.tensor([[1, grid_h, grid_w]]), merge_size, window_size)
    blocks_per_window = np.diff(np.asarray(layout.cu_window_seqlens)) // merge_size**2
    blocks_per_window = blocks_per_window[blocks_per_window > 0]  # the reference keeps empty windows
    window_of_position = np.repeat(np.arange(blocks_per_window.size), blocks_per_window)
    return layout.window_index.numpy().astype(np.int64), window_of_position
