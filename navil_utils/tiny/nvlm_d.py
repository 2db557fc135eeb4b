"""A tiny NVLM-D trained like the tiny NaViL: tokenizer, model size, export and loading.

The comparison model of issue 15 ("tiling vs multi-scale, measured").  It is NVLM-D's architecture
(:class:`~navil_utils.models.modeling_nvlm_d.NVLMDForConditionalGeneration`: InternViT-style ViT with a
class token and learned absolute positions → 2×2 pixel shuffle → ``mlp1`` → dense Qwen2 decoder) fed with
NVLM-D's dynamic tiling (tiles + a global thumbnail, 1-D tile tags), sized to the tiny NaViL and trained
from scratch, encoder included (nothing frozen), by :func:`navil_utils.tiny.train.train` with
``architecture="nvlm_d"`` on the same synthetic data, loss and schedule.

**Tile size rule.** Both tiny models use patch 16 and a 2×2 merge, so one visual token covers 32×32 px in
both.  The tile is ``S = 64`` px (4 visual tokens per tile) with at most 6 tiles (NVLM-D-72B's ``max_num``)
plus the thumbnail: the tiny NaViL's largest image (128²) is 2×2 tiles, as a 896² image is for NVLM-D's
448-px tiles.  Over the generator's 19 image sizes this gives 20.0 visual tokens per image on average
(4–28) against 23.3 (4–41) for the tiny NaViL's multi-scale pyramid (``min_pixels`` 32², ``max_pixels`` 128²).

**Size rule.** ViT, connector and decoder width equal the tiny NaViL's (ViT 128 × 4 layers, MLP 512, 4 heads;
``mlp1`` 512 → 192 → 192; decoder width 192, 4 query / 2 KV heads of 48, FFN 384); the parameters NaViL
spends on its visual experts go to decoder depth: 8 dense layers instead of 4 layers × 2 experts.  Totals:
3,880,512 (NVLM-D, vocabulary 496) vs 3,871,424 (NaViL, vocabulary 480): +0.23 %.  Every NVLM-D parameter
is active per token (NaViL: 2,543,936).

**Tokenizer.** The tiny tokenizer plus NVLM-D's tokens as added special tokens appended after its 480
entries (:func:`extend_tokenizer_with_nvlm_tokens`): ``<Image>`` 480, ``</Image>`` 481, ``<|vision_pad|>``
482, ``<tile_global_thumbnail>`` 483, ``<tile_k>`` 483 + k for k = 1…12.  Every existing token keeps its id.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from navil_utils.errors import ConfigError
from navil_utils.models.presets import TINY_SYSTEM_MESSAGE, TINY_TEMPLATE
from navil_utils.processing.tiling import (
    NVLM_IMAGE_CONTEXT_TOKEN,
    NVLM_IMAGE_END_TOKEN,
    NVLM_IMAGE_START_TOKEN,
    NVLM_THUMBNAIL_TAG,
)

#: Tile tags the extended tokenizer holds (``<tile_1>`` … ``<tile_12>``): enough for ``max_tiles`` ≤ 12.
TOKENIZER_MAX_TILES = 12
#: NVLM-D's tokens in the order they are appended to the tiny tokenizer (prefix-stable: the fixed tokens
#: first, then the tile tags in order).
NVLM_TINY_TOKENS: tuple[str, ...] = (
    NVLM_IMAGE_START_TOKEN, NVLM_IMAGE_END_TOKEN, NVLM_IMAGE_CONTEXT_TOKEN, NVLM_THUMBNAIL_TAG,
    *(f"<tile_{k}>" for k in range(1, TOKENIZER_MAX_TILES + 1)))

#: ``TrainConfig.model`` defaults of the tiny NVLM-D (keyword arguments of ``tiny_nvlm_d_config``).
TINY_NVLM_D_MODEL: dict[str, Any] = {
    "tile_size": 64, "patch_size": 16, "max_tiles": 6,
    "vit_width": 128, "vit_layers": 4, "vit_heads": 4,
    "llm_width": 192, "llm_layers": 8, "llm_heads": 4, "llm_kv_heads": 2, "llm_intermediate": 384,
    "connector_hidden": 192,
}


# ---------------------------------------------------------------------------------------------------
# tokenizer
def has_nvlm_tokens(tokenizer: Any) -> bool:
    """Whether every token of :data:`NVLM_TINY_TOKENS` is a single token of ``tokenizer``."""
    vocab = tokenizer.get_vocab()
    return all(token in vocab for token in NVLM_TINY_TOKENS)


def extend_tokenizer_with_nvlm_tokens(base_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the tiny tokenizer of ``base_dir`` plus NVLM-D's tokens to ``out_dir`` (loadable by ``AutoTokenizer``).

    The tokens of :data:`NVLM_TINY_TOKENS` are added as special tokens (matched whole, never merged, skipped by
    ``decode(skip_special_tokens=True)``) after the existing vocabulary, the way
    :func:`~navil_utils.tiny.tokenizer.train_tiny_tokenizer` declares NaViL's: in ``tokenizer.json``'s added
    tokens, ``tokenizer_config.json``'s ``added_tokens_decoder`` / ``additional_special_tokens`` and
    ``special_tokens_map.json``.  Raises :class:`ConfigError` if an existing token would change its id.
    Deterministic; ``out_dir`` is written through a staging directory (``tokenizer.json`` last).
    """
    from tokenizers import AddedToken, Tokenizer

    base, out = Path(base_dir), Path(out_dir)
    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    before = tokenizer.get_vocab(with_added_tokens=True)
    present = [t for t in NVLM_TINY_TOKENS if t in before]
    if present:
        raise ConfigError(f"{base} already holds NVLM-D token(s) {present}")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in NVLM_TINY_TOKENS])
    after = tokenizer.get_vocab(with_added_tokens=True)
    changed = sorted(t for t, i in before.items() if after.get(t) != i)
    expected = {t: len(before) + k for k, t in enumerate(NVLM_TINY_TOKENS)}
    if changed or any(after.get(t) != i for t, i in expected.items()):
        raise ConfigError(f"adding NVLM-D's tokens would move existing ids ({changed[:5]}) or not append them")
    config = json.loads((base / "tokenizer_config.json").read_text(encoding="utf-8"))
    special_map = json.loads((base / "special_tokens_map.json").read_text(encoding="utf-8"))
    for token, token_id in expected.items():
        config["added_tokens_decoder"][str(token_id)] = {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}
    for mapping in (config, special_map):
        mapping["additional_special_tokens"] = [*(mapping.get("additional_special_tokens") or []), *NVLM_TINY_TOKENS]
    staging = out.with_name(out.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
    (staging / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    if (base / "chat_template.jinja").exists():
        shutil.copy2(base / "chat_template.jinja", staging / "chat_template.jinja")
    tokenizer.save(str(staging / "tokenizer.json"))
    out.mkdir(parents=True, exist_ok=True)
    for item in sorted(staging.iterdir(), key=lambda p: p.name == "tokenizer.json"):
        os.replace(item, out / item.name)
    shutil.rmtree(staging)
    return out


# ---------------------------------------------------------------------------------------------------
# model
#: ``NVLMDConfig`` fields a ``TrainConfig.model`` may set besides the ``tiny_nvlm_d_config`` keywords.
EXTRA_MODEL_OPTIONS = frozenset({"system_message", "template", "use_thumbnail", "min_dynamic_patch"})


def check_model_overrides(overrides: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` naming any ``TrainConfig.model`` key the tiny NVLM-D does not know."""
    import inspect

    from navil_utils.models.configuration_nvlm_d import tiny_nvlm_d_config

    known = {name for name, p in inspect.signature(tiny_nvlm_d_config).parameters.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY} | EXTRA_MODEL_OPTIONS
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown tiny NVLM-D model option(s) {unknown}; known: {sorted(known)}")


def tiny_nvlm_d_model_config(tokenizer: Any, **overrides: Any):
    """:class:`~navil_utils.models.configuration_nvlm_d.NVLMDConfig` of the tiny NVLM-D for ``tokenizer``.

    ``overrides`` replace :data:`TINY_NVLM_D_MODEL` entries (any ``tiny_nvlm_d_config`` keyword) or set
    :data:`EXTRA_MODEL_OPTIONS`; the vocabulary is ``len(tokenizer)`` and ``image_token_id`` its ``<|vision_pad|>``.
    """
    from navil_utils.models.configuration_nvlm_d import tiny_nvlm_d_config

    if not has_nvlm_tokens(tokenizer):
        raise ConfigError("the tokenizer lacks NVLM-D's tokens: extend it with extend_tokenizer_with_nvlm_tokens")
    check_model_overrides(overrides)
    values = {**TINY_NVLM_D_MODEL, **overrides}
    if int(values["max_tiles"]) > TOKENIZER_MAX_TILES:
        raise ConfigError(f"max_tiles {values['max_tiles']} > {TOKENIZER_MAX_TILES} (tile tags in the tokenizer)")
    values.setdefault("system_message", TINY_SYSTEM_MESSAGE)
    values.setdefault("template", TINY_TEMPLATE)
    pad = int(tokenizer.convert_tokens_to_ids(NVLM_IMAGE_CONTEXT_TOKEN))
    try:
        return tiny_nvlm_d_config(len(tokenizer), pad, **values)
    except TypeError as error:
        raise ConfigError(f"invalid tiny NVLM-D model option: {error}") from error


def build_nvlm_d_model(config: Any, tokenizer: Any):
    """A freshly initialised tiny NVLM-D sized by ``config.model`` (a ``TrainConfig``), seeded by ``config.seed``
    on a forked RNG (the caller's RNG state is unchanged).  The class token and the absolute position
    embeddings, which transformers initialises to zero, start from N(0, 0.02) like every other weight."""
    from navil_utils.models.modeling_nvlm_d import NVLMDForConditionalGeneration

    cfg = tiny_nvlm_d_model_config(tokenizer, **config.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = NVLMDForConditionalGeneration(cfg)
        with torch.no_grad():
            model.vision_model.embeddings.cls_token.normal_(std=0.02)
            model.vision_model.embeddings.position_embeddings.normal_(std=0.02)
    return model


def collator_for(config: Any, tokenizer: Any, **kwargs: Any):
    """The :class:`~navil_utils.tiny.data.TiledCollator` of a tiny NVLM-D ``TrainConfig``."""
    from navil_utils.tiny.data import TiledCollator

    return TiledCollator.from_model_config(tiny_nvlm_d_model_config(tokenizer, **config.model), tokenizer, **kwargs)


def export_nvlm_d(model: Any, directory: str | os.PathLike, eos_token_id: int | None = None) -> Path:
    """Save a tiny NVLM-D's ``config.json`` + ``model.safetensors`` (native key layout, strict-loadable) and
    ``generation_config.json`` (greedy, 8 new tokens, eos ``eos_token_id``); the trainer's
    :func:`~navil_utils.tiny.train.export_model` adds the tokenizer files."""
    from navil_utils.models.modeling_nvlm_d import save_nvlm_d

    directory = Path(directory)
    save_nvlm_d(model, directory, layout="native")
    generation = model.generation_config
    generation.do_sample, generation.max_new_tokens, generation.pad_token_id = False, 8, 0
    if eos_token_id is not None:
        generation.eos_token_id = int(eos_token_id)
    generation.save_pretrained(str(directory))
    return directory


def load_tiny_nvlm_d(path: str | os.PathLike, **kwargs: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of an exported tiny NVLM-D, the model through the strict
    :func:`~navil_utils.models.modeling_nvlm_d.load_nvlm_d`."""
    from navil_utils.models.modeling_nvlm_d import load_nvlm_d
    from navil_utils.processing.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(path)
    model = load_nvlm_d(path, **kwargs)
    if not has_nvlm_tokens(tokenizer) or len(tokenizer) != model.config.llm_config.vocab_size:
        raise ConfigError(f"{path}: the tokenizer ({len(tokenizer)} tokens) does not fit the model's vocabulary "
                          f"({model.config.llm_config.vocab_size}) with NVLM-D's tokens")
    return model, tokenizer
