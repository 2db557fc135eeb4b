"""navil_utils — the shared package of the NaViL research workbook.

Every notebook imports this package; each function lives here once, in the subpackage of its concept:

    models/       the native NaViL model (config, ViT, InternLM2-VE / Qwen3-VE decoders), presets,
                  checkpoint I/O and ``load_model``
    processing/   image I/O, multi-scale packing, NVLM-D tiling, token accounting, chat templates,
                  tokenizers and :class:`NaViLProcessor`, the one place a prompt is rendered
    chatting      chat / streaming / batch chat on top of the processor and ``generate``
    tiny/         the embedded tiny model: synthetic task, tokenizer, collator, trainer, evaluation
    analysis/     computations without plots: accuracy, speed, parameters, device maps, token budgets
    plotting/     the figure style, ``save_figure`` and one module of figures per topic
    paper/        the paper's tables (``data/paper``)
    workbook/     notebook set-up, parameter resolution, paths, the notebook runner
    reference/    test oracles (golden fixtures, parity, literal reference preprocessing); runtime
                  code never imports it

The public API below is re-exported lazily: a name is imported from its subpackage on first use.
Importing ``navil_utils`` itself imports torch and transformers once, to register NaViL with
transformers' ``AutoConfig`` / ``AutoModel`` (so ``AutoModel.from_pretrained(<NaViL dir>)`` works).

Main entry points
-----------------
setup_notebook            seeds, deterministic plotting style, quiet logging; returns the repo root
resolve_model_path        parameter > $NAVIL_MODEL_PATH > the embedded tiny model
save_figure               figures/<name>.png and .pdf
load_image                robust image loading (modes, EXIF, bombs, truncation)
preprocess_multiscale     NaViL's visual multi-scale packing
preprocess_tiles          NVLM-D dynamic tiling
NaViLProcessor            (images, conversation) -> model inputs
load_model, chat          the native NaViL model and chat loop
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it (lazy re-export)
_EXPORTS: dict[str, str] = {}


def _register(module: str, *names: str) -> None:
    for name in names:
        _EXPORTS[name] = module


# workbook: notebooks, paths, figures
_register("navil_utils.workbook.notebook", "setup_notebook", "resolve_model_path")
_register("navil_utils.paths", "repo_root", "data_dir", "figures_dir")
_register("navil_utils.plotting.style", "save_figure")
# errors
_register("navil_utils.errors", "NaViLError", "ImageLoadError", "CheckpointError", "ConfigError", "OfflineError")
# processing: images, multi-scale packing, tiling, templates, tokenizers, the processor
_register("navil_utils.processing.image_io", "load_image", "to_rgb", "make_test_pattern")
_register("navil_utils.processing.multiscale", "preprocess_multiscale", "MultiScaleInputs", "ScaleInfo",
          "plan_multiscale", "navil_token_count", "navil_resize_size", "merged_token_windows", "window_token_order",
          "unpatchify")
_register("navil_utils.processing.tiling", "preprocess_tiles", "TiledInputs", "TilePlan", "plan_tiles",
          "nvlm_token_count", "nvlm_tile_tags", "nvlm_image_span_text")
_register("navil_utils.processing.templates", "build_prompt", "get_template", "template_from_config",
          "clean_response", "ChatTemplate")
_register("navil_utils.processing.tokenizers", "load_tokenizer", "InternLM2Tokenizer", "navil_token_ids")
_register("navil_utils.processing.processor", "NaViLProcessor", "ChatInputs", "prepare_chat_inputs", "pixel_budget")
# models
_register("navil_utils.models.loading", "load_model", "register_auto_classes")
_register("navil_utils.models.modeling_navil", "NaViLForConditionalGeneration")
_register("navil_utils.models.configuration_navil", "NaViLChatConfig", "NaViLVisionConfig", "InternLM2VEConfig",
          "Qwen3VEConfig")
_register("navil_utils.models.common", "register_attention_function")
_register("navil_utils.models.presets", "navil_2b_config", "navil_9b_config", "tiny_model_config",
          "build_empty_model")
# chat
_register("navil_utils.chatting", "chat", "chat_turn", "batch_chat", "ChatStream", "ChatTurn", "load_chat_model")
# analysis
_register("navil_utils.analysis.parameters", "count_parameters", "expected_parameter_counts", "compare_with_paper")
_register("navil_utils.analysis.device_maps", "plan_device_map", "DevicePlan")
_register("navil_utils.analysis.token_budgets", "token_budget_table", "encoder_cost_table", "encoder_flops")
_register("navil_utils.analysis.attention", "AttentionRecorder", "TokenLayout")
_register("navil_utils.analysis.attention_maps", "scale_maps", "upsample_to_image", "attention_rollout", "vit_rollout",
          "scale_geometries", "plan_geometries")
_register("navil_utils.analysis.attention_claims", "visual_attention_share", "pointing_table", "pointing_summary",
          "attention_sinks", "blanking_check", "collect_answer_attention")
_register("navil_utils.analysis.accuracy", "chance_levels", "answer_space_size", "accuracy_frame", "accuracy_table")
_register("navil_utils.analysis.speed", "measure_generation_speed", "compare_kv_cache", "speed_frame",
          "GenerationSpeed")
# plotting
_register("navil_utils.plotting.paper", "model_colours", "plot_training_curves", "plot_grouped_bars", "plot_radar",
          "plot_optimal_encoder", "plot_params_vs_score", "FAMILY_COLOURS")
_register("navil_utils.plotting.architecture", "plot_architecture", "architecture_labels", "ArchitectureLabels")
_register("navil_utils.plotting.evaluation", "plot_scale_ablation", "plot_qa_gallery", "plot_image_answers",
          "GalleryItem", "success_failure_items")
# paper tables
_register("navil_utils.paper.tables", "load_paper_table", "available_paper_tables", "benchmark_matrix",
          "recompute_average", "percent_scores", "architecture_summary")
_register("navil_utils.analysis.scaling", "fit_power_law", "PowerLaw", "optimal_encoder", "optimal_encoders",
          "nominal_encoder_size", "sweep_frame",
          "bootstrap_optimal_encoder_fit", "fit_saturating_power_law", "bootstrap_saturating_power_law",
          "SaturatingPowerLaw", "variant_table", "select_runs", "fit_data_laws")
# embedded tiny model
_register("navil_utils.tiny.synthetic", "SyntheticVQA", "SyntheticConfig")
_register("navil_utils.tiny.tokenizer", "train_tiny_tokenizer", "load_tiny_tokenizer")
_register("navil_utils.tiny.data", "TinyCollator", "TinyBatch", "SyntheticBatches", "qa_exact_match")
# reference oracles (tests, parity checks)
_register("navil_utils.reference.golden", "load_golden_case", "load_golden_chat_model")
_register("navil_utils.reference.fixtures", "golden_dir", "GOLDEN_VARIANTS")
_register("navil_utils.reference.toy_tokenizer", "ToyTokenizer")
_register("navil_utils.reference.parity", "compare_with_golden")


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
from navil_utils import models as _models  # noqa: E402,F401
