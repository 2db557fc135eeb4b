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


#: Vision-encoder parameters of the FLOP estimate: NaViL-2B / NaViL-9B from the NaViL paper's Table 6
#: (0.6B, 1.2B), NVLM-D-72B's InternViT-6B-448px-V1-5 (5.5B; NVLM paper §4.1).
ENCODER_PARAMS = {"NaViL-2B": 0.6e9, "NaViL-9B": 1.2e9, "NVLM-D-72B": 5.5e9}
#: ViT tokens per 448² NVLM-D tile: 32×32 patches of 14 px plus InternViT's class token.
NVLM_VIT_TOKENS_PER_TILE = 1025


def encoder_flops(params: float, tokens: int) -> float:
    """Forward FLOPs of a transformer encoder, approximated as ``2 × params × tokens``.

    The usual dense-matmul estimate (one multiply-add per parameter per token); it leaves out the
    attention-score term, which grows with the sequence length and is small next to the matmuls at
    these sizes.
    """
    if params < 0 or tokens < 0:
        raise ValueError(f"params and tokens must be >= 0, got {params}, {tokens}")
    return 2.0 * float(params) * int(tokens)


def encoder_cost_table(sizes: Sequence[tuple[int, int]], navil_settings: dict | None = None,
                       nvlm_settings: dict | None = None, *, encoder_params: dict | None = None,
                       nvlm_vit_tokens_per_tile: int = NVLM_VIT_TOKENS_PER_TILE):
    """Vision-encoder work per image: ViT tokens × encoder size, NaViL-2B/9B vs NVLM-D-72B.

    NaViL's ViT runs on the 16-px patches of *every* scale (4 patches per visual token, before the
    2×2 merge); NVLM-D's InternViT runs on ``nvlm_vit_tokens_per_tile`` tokens per tile (thumbnail
    included).  Returns a DataFrame with one row per ``(height, width)``: ``height, width,
    navil_patches, nvlm_tiles, nvlm_vit_tokens`` and ``<model>_encoder_tflops`` (``2 × params ×
    tokens / 1e12``, :func:`encoder_flops`) for every model in ``encoder_params`` (default
    :data:`ENCODER_PARAMS`; keys starting with ``NaViL`` use the NaViL patch count, the others NVLM-D's).
    """
    import pandas as pd

    params = dict(encoder_params or ENCODER_PARAMS)
    navil_settings = dict(navil_settings or {})
    nvlm_settings = dict(nvlm_settings or {})
    nvlm_settings.pop("tokens_per_tile", None)
    rows = []
    for height, width in sizes:
        scales = plan_multiscale(height, width, **navil_settings)
        patches = sum(int(s.grid_thw[0]) * int(s.grid_thw[1]) * int(s.grid_thw[2]) for s in scales)
        tiles = plan_tiles(height, width, **nvlm_settings).num_tiles
        row = {"height": height, "width": width, "navil_patches": patches, "nvlm_tiles": tiles,
               "nvlm_vit_tokens": tiles * nvlm_vit_tokens_per_tile}
        for model, size in params.items():
            tokens = patches if model.startswith("NaViL") else row["nvlm_vit_tokens"]
            row[f"{model}_encoder_tflops"] = encoder_flops(size, tokens) / 1e12
        rows.append(row)
    return pd.DataFrame(rows)
