"""The tiny NaViL's tokenizer: a small byte-level BPE trained on the synthetic VQA corpus.

``train_tiny_tokenizer(out_dir)`` writes a directory that ``transformers.AutoTokenizer`` loads
offline (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
``chat_template.jinja``):

* ids 0–2: ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos); ids 3–14: NaViL's 12
  special tokens in :data:`~navil_utils.processing.image_tokens.SPECIAL_TOKEN_LIST` order; then the 256 byte
  symbols, the learned merges, and ``<think>``/``</think>`` (added, not special, as in Qwen3).
* Pre-tokenisation isolates every upper-case letter and digit before GPT-2's byte-level split, so
  rendered strings (``K7R``) and counts are read one character per token, while the closed task
  vocabulary (``circle``, `` color``, ``yes`` …) becomes whole-word tokens.
* The chat template is NaViL's ``qwen3-chat`` conversation format, generated from the same
  :class:`~navil_utils.processing.templates.ChatTemplate` that renders every prompt
  (:meth:`~navil_utils.processing.processor.NaViLProcessor.jinja_chat_template`), with the tiny model's short
  English system message (:data:`~navil_utils.models.presets.TINY_SYSTEM_MESSAGE`) as default; ``apply_chat_template(..., system_message=...)`` or a
  leading ``system`` message overrides it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from navil_utils.constants import IM_END_TOKEN, IM_START_TOKEN, SPECIAL_TOKEN_LIST
from navil_utils.errors import ConfigError
from navil_utils.models.presets import TINY_SYSTEM_MESSAGE, TINY_TEMPLATE
from navil_utils.processing.templates import get_template

PAD_TOKEN = "<|endoftext|>"
THINK_TOKENS: tuple[str, ...] = ("<think>", "</think>")
#: Special tokens in id order (0 … 14).
TINY_SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN) + SPECIAL_TOKEN_LIST
#: Upper-case letters and digits are isolated (one token each) before the byte-level split.
_ISOLATE_PATTERN = r"\p{Lu}|\p{Nd}"

def chat_markup_texts(system_message: str = TINY_SYSTEM_MESSAGE) -> list[str]:
    """Chat scaffolding the tokenizer should compress well (roles, think block, system message)."""
    return [
        f"{IM_START_TOKEN}system\n{system_message}{IM_END_TOKEN}",
        f"{IM_START_TOKEN}user\n<image>\n",
        f"{IM_END_TOKEN}{IM_START_TOKEN}assistant\n{THINK_TOKENS[0]}\n\n{THINK_TOKENS[1]}\n\n",
    ]


def tiny_corpus(num_samples: int = 3000, seed: int = 12345, system_message: str = TINY_SYSTEM_MESSAGE) -> list[str]:
    """Training texts: the task vocabulary, ``num_samples`` synthetic questions/answers/captions, chat markup."""
    from navil_utils.tiny.synthetic import ALL_QUESTION_TYPES, SyntheticVQA

    data = SyntheticVQA(seed, question_types=ALL_QUESTION_TYPES, extra_qas=2)
    texts = data.vocabulary_texts()
    for index in range(num_samples):
        sample = data.sample(index)
        texts += [qa.question for qa in sample.qas] + [qa.answer for qa in sample.qas] + [sample.caption]
    texts += chat_markup_texts(system_message) * max(1, num_samples // 10)
    return texts


def build_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2):
    """Train the byte-level BPE (``tokenizers.Tokenizer``) on ``texts``.

    ``vocab_size`` is an upper bound: merges stop when no pair occurs ``min_frequency`` times, which
    for the closed synthetic vocabulary happens well below 1024.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        trainers,
    )

    min_size = len(TINY_SPECIAL_TOKENS) + 256 + len(THINK_TOKENS)
    if vocab_size < min_size:
        raise ConfigError(f"vocab_size must be >= {min_size} (special tokens + 256 bytes), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_ISOLATE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(THINK_TOKENS), min_frequency=min_frequency, show_progress=False,
        special_tokens=list(TINY_SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(list(texts), trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return tokenizer


def train_tiny_tokenizer(
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 1024,
    num_samples: int = 3000,
    seed: int = 12345,
    system_message: str = TINY_SYSTEM_MESSAGE,
    model_max_length: int = 4096,
) -> Path:
    """Train the tiny tokenizer on the synthetic corpus and save it loadable by ``AutoTokenizer``.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` (class ``PreTrainedTokenizerFast``, pad
    ``<|endoftext|>``, eos ``<|im_end|>``, the chat template inline), ``special_tokens_map.json`` and
    ``chat_template.jinja`` to ``out_dir`` and returns it.  Deterministic for fixed arguments.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(tiny_corpus(num_samples, seed, system_message), vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    template = get_template(TINY_TEMPLATE).to_jinja(system_message)  # the prompt format of chat and training
    added = {
        str(tokenizer.token_to_id(token)): {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": token not in THINK_TOKENS,
        }
        for token in TINY_SPECIAL_TOKENS + THINK_TOKENS
    }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": IM_END_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "additional_special_tokens": [IM_START_TOKEN, *SPECIAL_TOKEN_LIST],
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "right",
        "chat_template": template,
    }
    special_map = {"eos_token": IM_END_TOKEN, "pad_token": PAD_TOKEN,
                   "additional_special_tokens": [IM_START_TOKEN, *SPECIAL_TOKEN_LIST]}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    return out


def load_tiny_tokenizer(path: str | os.PathLike):
    """``AutoTokenizer.from_pretrained(path)`` after checking that the directory has a tokenizer."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise ConfigError(f"{path} has no tokenizer.json; create it with train_tiny_tokenizer({str(path)!r})")
    return AutoTokenizer.from_pretrained(str(path))
