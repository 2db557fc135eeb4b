"""The reference multi-scale pipeline, restated literally on top of transformers' Qwen2-VL processor.

This is the *oracle* that tests and ``benchmarks/preprocess_speed.py`` compare
:func:`navil_utils.preprocess_multiscale` against; it is slow on purpose (it does what the
reference does, step by step) and is not used by the workbook otherwise.

* transformers 5.x ships ``Qwen2VLImageProcessorPil`` (numpy + PIL, no torchvision).  It has no
  ``do_pad`` branch, so NaViL's processor call (resize rule with ``factor=1`` → bicubic resize →
  zero padding to multiples of ``p·m``) is assembled from that processor's own pieces:
  transformers' ``smart_resize(…, factor=1)`` for the size, the processor's ``resize`` and ``pad``,
  then the processor itself with ``do_resize=False`` for rescale, normalise and patchify.
* The scale loop follows ``anyres_preprocess_multi_scale`` of NaViL's ``demo.py`` line by line,
  with torch tensors where the reference has them (the float32 budget is a 0-d tensor).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image

from navil_utils.constants import NAVIL_SCALE_DOWNSAMPLE_RATIO
from navil_utils.processing.image_io import ImageSource, load_image


def make_reference_processor(min_pixels: int, max_pixels: int, patch_size: int = 16, merge_size: int = 2):
    """``Qwen2VLImageProcessorPil`` configured as ``NaViL.__init__`` configures its processor
    (mean = std = 0.5, temporal patch 1; ``do_resize=False`` because resize + pad happen outside)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil(
        do_resize=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=patch_size,
        temporal_patch_size=1,
        merge_size=merge_size,
    )


def reference_processor_call(processor, image: Image.Image, min_pixels, max_pixels) -> tuple[torch.Tensor, torch.Tensor]:
    """One call of NaViL's processor (``do_pad`` branch): ``(patches [n, 3·p·p], grid_thw [1, 3])``."""
    from transformers.image_utils import PILImageResampling, SizeDict

    chw = processor.process_image(image, do_convert_rgb=True)  # uint8 (3, H, W)
    # the processor's own resize: transformers' smart_resize with factor=1, then a PIL bicubic resize
    budget = SizeDict(shortest_edge=min_pixels, longest_edge=max_pixels)
    resized = processor.resize(chw, size=budget, resample=PILImageResampling.BICUBIC, factor=1)
    resized_h, resized_w = resized.shape[-2:]
    unit = processor.patch_size * processor.merge_size
    pad_h, pad_w = math.ceil(resized_h / unit) * unit, math.ceil(resized_w / unit) * unit
    padded = processor.pad([resized], pad_size=SizeDict(height=pad_h, width=pad_w), fill_value=0)[0]
    out = processor(padded, do_resize=False, input_data_format="channels_first", return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def reference_preprocess_multiscale(
    images: ImageSource | Sequence[ImageSource],
    min_pixels: int,
    max_pixels: int,
    scale_downsample_ratio: float = NAVIL_SCALE_DOWNSAMPLE_RATIO,
    patch_size: int = 16,
    merge_size: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``anyres_preprocess_multi_scale`` literally: ``(pixel_values [N,3,p,p], grids [S,3], num_scales)``."""
    processor = make_reference_processor(min_pixels, max_pixels, patch_size, merge_size)
    if not isinstance(images, (list, tuple)):
        images = [images]
    pixel_values_all, image_grid_thws_all, num_scales_all = [], [], []
    for source in images:
        image = load_image(source)
        patches, grid = reference_processor_call(processor, image, min_pixels, max_pixels)
        image_grid_thws = [grid[0]]
        pixel_values = patches.reshape(grid.prod(), -1, patch_size, patch_size)
        while True:
            current_pixels = image_grid_thws[0].prod() * (patch_size**2)
            budget = current_pixels * (scale_downsample_ratio**2)  # int64 tensor × float → float32
            if budget < min_pixels:
                break
            patches, grid = reference_processor_call(processor, image, min_pixels, budget)
            if grid.prod() >= image_grid_thws[0].prod():
                break
            image_grid_thws.insert(0, grid[0])
            pixel_values = torch.cat([patches.reshape(grid.prod(), -1, patch_size, patch_size), pixel_values], dim=0)
        pixel_values_all.append(pixel_values)
        image_grid_thws_all.extend(image_grid_thws)
        num_scales_all.append(len(image_grid_thws))
    return torch.cat(pixel_values_all, dim=0), torch.stack(image_grid_thws_all), num_scales_all


def reference_scale_sizes(
    height: int,
    width: int,
    min_pixels: int,
    max_pixels: int,
    scale_downsample_ratio: float = NAVIL_SCALE_DOWNSAMPLE_RATIO,
    patch_size: int = 16,
    merge_size: int = 2,
) -> list[tuple[tuple[int, int], tuple[int, int, int]]]:
    """The same loop on sizes only (no pixels): ``[(resized (h, w), grid (t, h, w)), …]`` smallest first.

    Uses transformers' ``smart_resize(…, factor=1)`` with the reference's tensor-valued budgets, so
    huge images can be checked without allocating them.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    unit = patch_size * merge_size

    def call(budget) -> tuple[tuple[int, int], torch.Tensor]:
        h, w = smart_resize(height, width, factor=1, min_pixels=min_pixels, max_pixels=budget)
        grid = torch.tensor([1, math.ceil(h / unit) * merge_size, math.ceil(w / unit) * merge_size])
        return (int(h), int(w)), grid

    sizes, grids = [], []
    size, grid = call(max_pixels)
    sizes.append(size)
    grids.append(grid)
    while True:
        budget = grids[0].prod() * (patch_size**2) * (scale_downsample_ratio**2)
        if budget < min_pixels:
            break
        size, grid = call(budget)
        if grid.prod() >= grids[0].prod():
            break
        sizes.insert(0, size)
        grids.insert(0, grid)
    return [(s, tuple(int(v) for v in g)) for s, g in zip(sizes, grids)]
