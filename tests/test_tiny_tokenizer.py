"""Tests of the tiny NaViL tokenizer: special-token layout, round trips, chat template, loading."""
from __future__ import annotations

import json

import pytest

from navil_utils.constants import SPECIAL_TOKEN_LIST
from navil_utils.errors import ConfigError
from navil_utils.models.presets import TINY_SYSTEM_MESSAGE
from navil_utils.processing.image_tokens import image_span_ids, image_span_text
from navil_utils.processing.templates import TEMPLATES, build_prompt
from navil_utils.processing.tokenizers import navil_token_ids
from navil_utils.tiny.synthetic import REGIONS, TEXT_ALPHABET, SyntheticVQA
from navil_utils.tiny.tokenizer import (
    TINY_SPECIAL_TOKENS,
    build_tiny_tokenizer,
    load_tiny_tokenizer,
    tiny_corpus,
    train_tiny_tokenizer,
)
from navil_utils.paths import data_dir

SHIPPED = data_dir() / "models" / "navil-tiny"
GRIDS = [(1, 4, 6), (1, 6, 8)]  # two scales of one image, (t, h, w) in patches


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"), num_samples=300)


@pytest.fixture(scope="module")
def tok(tokenizer_dir, monkeypatch_module):
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    return load_tiny_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_files_and_special_token_ids(tokenizer_dir, tok):
    assert {p.name for p in tokenizer_dir.iterdir()} == {
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}
    assert [tok.convert_tokens_to_ids(t) for t in TINY_SPECIAL_TOKENS] == list(range(15))
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.bos_token is None
    ids = navil_token_ids(tok)  # the model loader's view: chat tokens + the 12 NaViL tokens
    assert [ids[t] for t in SPECIAL_TOKEN_LIST] == list(range(3, 15))
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_vocabulary_is_small(tok):
    assert len(TINY_SPECIAL_TOKENS) + 256 < len(tok) <= 1024
    assert tok.convert_tokens_to_ids("<think>") >= 15 + 256


def test_special_tokens_round_trip_in_a_prompt(tok):
    prompt = build_prompt("What color is the circle?", GRIDS, [2], template="qwen3-chat",
                          system_message=TINY_SYSTEM_MESSAGE)
    ids = tok(prompt).input_ids
    assert tok.decode(ids) == prompt
    span = image_span_text(GRIDS)
    span_ids = image_span_ids(GRIDS, {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKEN_LIST})
    assert tok(span).input_ids == span_ids  # each special string is exactly one token
    assert ids.count(tok.convert_tokens_to_ids("<IMG_CONTEXT>")) == sum(t * (h // 2) * (w // 2) for t, h, w in GRIDS)


def test_answers_are_few_tokens_and_round_trip(tok):
    data = SyntheticVQA(0)
    for template in ("color", "count_color", "position_kind", "position_region", "relation"):
        for answer in data.answer_space(template):
            ids = tok(answer).input_ids
            assert tok.decode(ids) == answer
            assert len(ids) <= (3 if answer in REGIONS else 1), (answer, tok.convert_ids_to_tokens(ids))
    for char in TEXT_ALPHABET + "0123456789":
        assert len(tok(char).input_ids) == 1
    for text in ("K7RA", "AA", "7437", "MXY"):  # rendered strings are read one character per token
        ids = tok(text).input_ids
        assert tok.convert_ids_to_tokens(ids) == list(text) and tok.decode(ids) == text


def test_task_sentences_compress(tok):
    sample_questions = [SyntheticVQA(1).sample(i).question for i in range(50)]
    for question in sample_questions:
        assert len(tok(question).input_ids) <= 12, question
        assert tok.decode(tok(question).input_ids) == question
    unseen = "Zürich — ünïcode 12 €"  # byte-level: anything round-trips
    assert tok.decode(tok(unseen).input_ids) == unseen


def test_chat_template_matches_navil_qwen3_format(tok):
    turns = [("<image>\nWhat color is the circle?", "red"), ("How many shapes are there?", None)]
    messages = [{"role": "user", "content": turns[0][0]}, {"role": "assistant", "content": "red"},
                {"role": "user", "content": turns[1][0]}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == TEMPLATES["qwen3-chat"].render(turns, TINY_SYSTEM_MESSAGE)
    custom = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True, system_message="Be brief.")
    assert custom == TEMPLATES["qwen3-chat"].render([(turns[0][0], None)], "Be brief.")
    system_first = [{"role": "system", "content": "Sys."}] + messages[:1]
    assert tok.apply_chat_template(system_first, tokenize=False, add_generation_prompt=True) == \
        TEMPLATES["qwen3-chat"].render([(turns[0][0], None)], "Sys.")


def test_training_is_deterministic(tmp_path):
    texts = tiny_corpus(num_samples=200)
    a = build_tiny_tokenizer(texts).to_str()
    b = build_tiny_tokenizer(texts).to_str()
    assert a == b


def test_too_small_vocab_raises():
    with pytest.raises(ConfigError):
        build_tiny_tokenizer(["a b"], vocab_size=100)
    with pytest.raises(ConfigError):
        load_tiny_tokenizer(SHIPPED / "does-not-exist")


def test_shipped_tokenizer_loads_offline_and_covers_the_task(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = load_tiny_tokenizer(SHIPPED)
    assert [tok.convert_tokens_to_ids(t) for t in TINY_SPECIAL_TOKENS] == list(range(15))
    for text in SyntheticVQA(0).vocabulary_texts():
        ids = tok(text).input_ids
        assert tok.decode(ids) == text
        assert len(ids) <= len(text.split()) * 3 + 2, (text, tok.convert_ids_to_tokens(ids))
