"""Token budgets: how many LLM tokens an image costs under NaViL's multi-scale packing and NVLM-D's tiling."""
from __future__ import annotations

from collections.abc import Sequence

from navil_utils.processing.multiscale import plan_multiscale
from navil_utils.processing.tiling import NVLM_TOKENS_PER_TILE, plan_tiles


def token_budget_table(sizes: Sequence[tuple[int, int]], navil_settings: dict | None = None,
                       nvlm_settings: dict | None = None):
    """Token spend of NaViL multi-scale packing vs NVLM-D tiling for ``(height, width)`` sizes.

    Returns a pandas DataFrame with one row per size: ``height, width, megapixels, aspect`` (W/H),
    ``navil_scales``, ``navil_largest_tokens`` (visual tokens of the largest scale),
    ``navil_visual_tokens`` (all scales), ``navil_span_tokens`` (+ ``<img>``, line/frame breaks,
    ``</img>``), ``navil_padding`` (padded share of the largest scale), ``nvlm_tiles`` (incl. thumbnail)
    and ``nvlm_visual_tokens`` (256 per tile).  Defaults are the papers' settings.
    """
    import pandas as pd

    navil_settings = dict(navil_settings or {})
    nvlm_settings = dict(nvlm_settings or {})
    tokens_per_tile = nvlm_settings.pop("tokens_per_tile", NVLM_TOKENS_PER_TILE)
    rows = []
    for height, width in sizes:
        scales = plan_multiscale(height, width, **navil_settings)
        tiles = plan_tiles(height, width, **nvlm_settings)
        rows.append({
            "height": height, "width": width, "megapixels": height * width / 1e6, "aspect": width / height,
            "navil_scales": len(scales),
            "navil_largest_tokens": scales[-1].visual_tokens,
            "navil_visual_tokens": sum(s.visual_tokens for s in scales),
            "navil_span_tokens": 2 + sum(s.tokens.span_tokens for s in scales),
            "navil_padding": scales[-1].padding_fraction,
            "nvlm_tiles": tiles.num_tiles,
            "nvlm_visual_tokens": tiles.num_tiles * tokens_per_tile,
        })
    return pd.DataFrame(rows)
