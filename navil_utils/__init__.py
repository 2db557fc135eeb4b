"""navil_utils — the shared package of the NaViL research workbook.

Every notebook imports this package; each function lives here once.  The public API is re-exported
lazily (importing ``navil_utils`` does not import torch/transformers until a name that needs them is
used), so ``import navil_utils`` stays fast in notebooks and tests.

Main entry points
-----------------
setup_notebook            seeds, deterministic plotting style, quiet logging; returns the repo root
resolve_model_path        parameter > $NAVIL_MODEL_PATH > the embedded tiny model
save_figure               figures/<name>.png and .pdf
load_image                robust image loading (modes, EXIF, bombs, truncation)
preprocess_multiscale     NaViL's visual multi-scale packing
preprocess_tiles          NVLM-D dynamic tiling
load_model, chat          the native NaViL model and chat loop
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it (lazy re-export)
_EXPORTS: dict[str, str] = {
    # notebook + plotting + paths
    "setup_notebook": "navil_utils.notebook",
    "resolve_model_path": "navil_utils.notebook",
    "repo_root": "navil_utils.paths",
    "data_dir": "navil_utils.paths",
    "figures_dir": "navil_utils.paths",
    "save_figure": "navil_utils.plotting",
    # errors
    "NaViLError": "navil_utils.errors",
    "ImageLoadError": "navil_utils.errors",
    "CheckpointError": "navil_utils.errors",
    "ConfigError": "navil_utils.errors",
    "OfflineError": "navil_utils.errors",
    # paper tables
    "load_paper_table": "navil_utils.paper",
}


def _register(module: str, *names: str) -> None:
    for name in names:
        _EXPORTS[name] = module


# preprocessing (issue 5)
_register("navil_utils.preprocessing", "load_image", "preprocess_multiscale", "preprocess_tiles")
_register("navil_utils.preprocessing", "MultiScaleInputs", "ScaleInfo", "plan_multiscale", "navil_token_count",
          "navil_resize_size", "merged_token_windows", "window_token_order", "unpatchify", "token_budget_table")
_register("navil_utils.tiling", "TiledInputs", "TilePlan", "plan_tiles", "nvlm_token_count", "nvlm_tile_tags",
          "nvlm_image_span_text")
_register("navil_utils.image_io", "to_rgb", "make_test_pattern")
# model, loading, chat (issue 6)
_register("navil_utils.models.loading", "load_model")
_register("navil_utils.models", "NaViLForConditionalGeneration", "NaViLChatConfig", "NaViLVisionConfig",
          "InternLM2VEConfig", "Qwen3VEConfig", "register_auto_classes")
_register("navil_utils.models.golden", "load_golden_case")
_register("navil_utils.chatting", "chat", "chat_turn", "batch_chat", "ChatStream", "ChatTurn", "prepare_chat_inputs",
          "load_chat_model")
_register("navil_utils.prompting", "build_prompt", "get_template", "template_from_config", "clean_response",
          "ChatTemplate")
_register("navil_utils.tokenization", "load_tokenizer", "InternLM2Tokenizer", "navil_token_ids")
_register("navil_utils.testing", "ToyTokenizer", "golden_dir")
_register("navil_utils.configs", "navil_2b_config", "navil_9b_config", "build_empty_model", "count_parameters",
          "expected_parameter_counts", "compare_with_paper", "plan_device_map", "DevicePlan")
_register("navil_utils.parity", "compare_with_golden")
# paper tables and their figures (issue 1)
_register("navil_utils.paper", "available_paper_tables", "benchmark_matrix", "recompute_average",
          "percent_scores", "fit_power_law", "PowerLaw", "architecture_summary")
_register("navil_utils.paper_plots", "model_colours", "plot_training_curves", "plot_grouped_bars", "plot_radar",
          "plot_optimal_encoder", "plot_params_vs_score", "FAMILY_COLOURS")
# embedded tiny model: synthetic task, tokenizer, batches (issue 7)
_register("navil_utils.synthetic", "SyntheticVQA", "SyntheticConfig")
_register("navil_utils.tiny_tokenizer", "train_tiny_tokenizer", "load_tiny_tokenizer")
_register("navil_utils.tiny_data", "TinyCollator", "TinyBatch", "SyntheticBatches", "qa_exact_match")
# inference chapter (notebook 03): chance levels, accuracy tables, gallery, ablation plot, speed
_register("navil_utils.inference", "chance_levels", "answer_space_size", "accuracy_frame", "accuracy_table",
          "plot_scale_ablation", "plot_qa_gallery", "plot_image_answers", "GalleryItem", "success_failure_items",
          "measure_generation_speed", "compare_kv_cache", "speed_frame", "GenerationSpeed")


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'navil_utils' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)


# Importing the model package registers NaViL with transformers' AutoConfig / AutoModel, so that
# `import navil_utils` is enough for `AutoModel.from_pretrained(<NaViL checkpoint dir>)`.
from . import models as _models  # noqa: E402,F401
