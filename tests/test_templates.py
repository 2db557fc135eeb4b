"""Chat templates and prompt assembly (navil_utils.processing.templates) against the reference fixtures."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from navil_utils.constants import (
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_FRAME_BREAK_TOKEN,
    IMG_LINE_BREAK_TOKEN,
    IMG_START_TOKEN,
)
from navil_utils.errors import ConfigError, PromptError
from navil_utils.processing.image_tokens import image_span_text
from navil_utils.processing.templates import (
    DEFAULT_SYSTEM_MESSAGE,
    TEMPLATES,
    add_image_placeholders,
    build_prompt,
    clean_response,
    get_template,
    template_from_config,
)
from navil_utils.reference.fixtures import GOLDEN_VARIANTS, golden_dir, read_meta

COMMON = json.loads((golden_dir("common") / "meta.json").read_text())
GRIDS = COMMON["image_grid_thw"]          # [[1,4,6],[1,4,8],[1,6,10]]
NUM_SCALES = COMMON["num_scales"]         # [3]


@pytest.mark.parametrize("variant", GOLDEN_VARIANTS)
def test_fixture_prompt_reproduced_character_for_character(variant):
    meta = read_meta(golden_dir(variant))
    expected = (golden_dir(variant) / "prompt.txt").read_text(encoding="utf-8")
    prompt = build_prompt(meta["question"], GRIDS, NUM_SCALES, template=meta["template"])
    assert prompt == expected
    assert prompt.count(IMG_CONTEXT_TOKEN) == meta["num_img_context_tokens"] == 29


@pytest.mark.parametrize("variant", GOLDEN_VARIANTS)
def test_template_from_fixture_config(variant):
    config = json.loads((golden_dir(variant) / "config.json").read_text())
    template, system = template_from_config(config)
    assert template.name == read_meta(golden_dir(variant))["template"]
    assert system == DEFAULT_SYSTEM_MESSAGE


def test_config_system_message_overrides_default():
    template, system = template_from_config({"template": "qwen3-chat", "system_message": "Be brief."})
    prompt = build_prompt("Hi", template=template, system_message=system)
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nHi<|im_end|>")
    assert DEFAULT_SYSTEM_MESSAGE not in prompt
    with pytest.raises(ConfigError, match="template"):
        template_from_config({"system_message": "x"})


def test_text_only_prompt_structure_per_template():
    internlm2 = build_prompt("Hello there!", template="internlm2-chat")
    assert internlm2 == (f"<|im_start|>system\n{DEFAULT_SYSTEM_MESSAGE}<|im_end|>"
                         "<|im_start|>user\nHello there!<|im_end|><|im_start|>assistant\n")
    qwen3 = build_prompt("Hello there!", template="qwen3-chat")
    # identical up to the non-thinking assistant role
    assert qwen3 == internlm2 + "<think>\n\n</think>\n\n"
    assert "<image>" not in internlm2 and IMG_START_TOKEN not in internlm2


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_multi_turn_extends_previous_prompt(template):
    chat_template = get_template(template)
    first_question = add_image_placeholders("What is this?", 1)
    assert first_question == "<image>\nWhat is this?"
    turn1 = build_prompt("What is this?", GRIDS, NUM_SCALES, template=template)
    answer1 = "A box."
    turn2 = build_prompt("And its colour?", GRIDS, NUM_SCALES, template=template,
                         history=[(first_question, answer1)])
    # the second prompt is the first one + answer + sep + the new user turn, image span kept once
    assert turn2 == (turn1 + answer1 + chat_template.sep + chat_template.user_role + "And its colour?"
                     + chat_template.sep + chat_template.assistant_role)
    assert turn2.count(IMG_START_TOKEN) == 1
    # a follow-up turn without the conversation's image cannot expand the stored placeholder
    with pytest.raises(PromptError, match="placeholder"):
        build_prompt("And its colour?", template=template, history=[(first_question, answer1)])


def test_several_images_one_placeholder_each_in_order():
    grids = [[1, 2, 2], [1, 4, 4], [1, 2, 4]]
    prompt = build_prompt("Compare them.", grids, [2, 1])
    span_a, span_b = image_span_text(grids[:2]), image_span_text(grids[2:])
    assert f"<|im_start|>user\n{span_a}\n{span_b}\nCompare them.<|im_end|>" in prompt
    assert prompt.count(IMG_START_TOKEN) == prompt.count(IMG_END_TOKEN) == 2


def test_explicit_placeholders_are_kept_in_place():
    grids = [[1, 2, 2], [1, 2, 4]]
    prompt = build_prompt("Left: <image> right: <image>. Same?", grids, [1, 1])
    assert f"user\nLeft: {image_span_text(grids[:1])} right: {image_span_text(grids[1:])}. Same?<|im_end|>" in prompt


def test_bad_inputs_raise_typed_errors():
    with pytest.raises(PromptError, match="placeholder"):
        build_prompt("<image> <image>", GRIDS, NUM_SCALES)           # 2 placeholders, 1 image
    with pytest.raises(PromptError, match="add up"):
        build_prompt("x", GRIDS, [2])                                 # scales do not match grid rows
    with pytest.raises(PromptError):
        build_prompt("x", None, [1])
    with pytest.raises(ConfigError, match="unknown conversation template"):
        build_prompt("x", template="vicuna")
    with pytest.raises(ValueError, match="divisible"):
        build_prompt("x", [[1, 3, 4]])                                # odd grid vs merge size 2


def test_empty_message_contributes_role_only_like_reference():
    template = get_template("internlm2-chat")
    rendered = template.render([("q", ""), ("r", None)], system_message="s")
    assert rendered == ("<|im_start|>system\ns<|im_end|><|im_start|>user\nq<|im_end|><|im_start|>assistant\n"
                        "<|im_start|>user\nr<|im_end|><|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  A cat.<|im_end|>garbage", "A cat."),
        ("A cat.<|im_end|", "A cat."),
        ("A cat. <|im_end", "A cat."),
        ("A cat.<|im", "A cat."),
        ("\nA <|im cat\n", "A <|im cat"),   # only a trailing fragment is removed
        ("", ""),
    ],
)
def test_clean_response(raw, expected):
    assert clean_response(raw) == expected


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 2), st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=4))
def test_span_token_accounting(scales):
    grids = [(t, 2 * h, 2 * w) for t, h, w in scales]
    prompt = build_prompt("Q", grids, [len(grids)])
    assert prompt.count(IMG_CONTEXT_TOKEN) == sum(t * h * w for t, h, w in scales)
    assert prompt.count(IMG_LINE_BREAK_TOKEN) == sum(t * h for t, h, _ in scales)
    assert prompt.count(IMG_FRAME_BREAK_TOKEN) == sum(t for t, _, _ in scales)
    assert prompt.index(IMG_START_TOKEN) < prompt.index("\nQ<|im_end|>")
