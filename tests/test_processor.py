"""NaViLProcessor is the one prompt source: chat, the training collator and the tiny tokenizer's
Jinja template all render the same text."""
from __future__ import annotations

import random

import pytest
import torch

import navil_utils
from navil_utils.constants import IMAGE_PLACEHOLDER
from navil_utils.models.presets import TINY_SYSTEM_MESSAGE
from navil_utils.processing.processor import NaViLProcessor, pixel_budget
from navil_utils.processing.templates import TEMPLATES, expand_image_placeholders
from navil_utils.tiny.data import TinyCollator
from navil_utils.tiny.synthetic import SyntheticVQA

TINY = navil_utils.repo_root() / "data" / "models" / "navil-tiny"


@pytest.fixture(scope="module")
def processor():
    return NaViLProcessor.from_pretrained(TINY)


def test_from_pretrained_reads_the_checkpoint(processor):
    config = navil_utils.NaViLChatConfig.from_pretrained(str(TINY))
    assert processor.template is TEMPLATES[config.template]
    assert processor.system_message == config.system_message == TINY_SYSTEM_MESSAGE
    assert processor.budget == pixel_budget(config)
    assert processor.eos_token_id == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_shipped_jinja_template_is_generated_from_the_processor(processor):
    assert (TINY / "chat_template.jinja").read_text(encoding="utf-8") == processor.jinja_chat_template()


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_jinja_and_render_agree_on_random_conversations(name):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = TEMPLATES[name]
    jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template.to_jinja("Sys."))
    rng = random.Random(0)
    words = ["a", "What's\nthis?", "x's \\n", "", "<image>\nQ", "ünï"]
    for _ in range(30):
        turns = [(rng.choice(words[:-1]) or "q", rng.choice(words)) for _ in range(rng.randint(0, 3))]
        question = rng.choice(words[1:])
        messages = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        messages.append({"role": "user", "content": question})
        rendered = jinja.render(messages=messages, add_generation_prompt=True)
        assert rendered == template.render([*turns, (question, None)], "Sys."), (turns, question)
        system_first = [{"role": "system", "content": "Other."}, *messages]
        assert jinja.render(messages=system_first, add_generation_prompt=True) == \
            template.render([*turns, (question, None)], "Other.")


def test_chat_template_of_the_tokenizer_renders_what_chat_sends(processor):
    sample = SyntheticVQA(5).sample(0)
    inputs = processor([sample.image], [sample.question])
    grids = inputs.image_grid_thw
    templated = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{sample.question}"}], tokenize=False,
        add_generation_prompt=True)
    assert expand_image_placeholders(templated, [grids.tolist()], processor.merge_size) == inputs.prompts[0]
    assert inputs.input_ids[0].tolist() == processor.tokenizer.encode(inputs.prompts[0])


def test_collator_prompt_ids_equal_the_processor_prompt(processor):
    collator = TinyCollator(processor.tokenizer, padding_side="left")
    data = SyntheticVQA(11)
    samples = [data.sample(i) for i in range(6)]
    batch = collator(samples, with_answers=False)
    inputs = processor([s.image for s in samples], [s.question for s in samples])
    assert torch.equal(batch.input_ids, inputs.input_ids)
    assert torch.equal(batch.pixel_values, inputs.pixel_values)


def test_text_around_image_brackets_the_span(processor):
    sample = SyntheticVQA(3).sample(2)
    inputs = processor([sample.image], [sample.question])
    before, after = processor.text_around_image(sample.question)
    prompt = inputs.prompts[0]
    assert prompt.startswith(before) and prompt.endswith(after)
    span = prompt[len(before):len(prompt) - len(after)]
    assert span.startswith("<img>") and span.endswith("</img>") and IMAGE_PLACEHOLDER not in prompt


def test_chat_messages_give_the_same_inputs_as_questions_and_history(processor):
    sample = SyntheticVQA(4).sample(1)
    first = processor([sample.image], [sample.question])
    history = [(first.questions[0], "red")]
    direct = processor([sample.image], ["And the shape?"], [history], "Be brief.")
    via_messages = processor.apply_chat([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": sample.question},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And the shape?"},
    ], images=sample.image)
    assert via_messages.prompts == direct.prompts
    assert torch.equal(via_messages.input_ids, direct.input_ids)


@pytest.mark.parametrize("messages", [
    [], [{"role": "assistant", "content": "hi"}], [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], [{"role": "tool", "content": "x"}],
    [{"role": "user", "content": None}]])
def test_malformed_messages_raise_a_prompt_error(processor, messages):
    from navil_utils.errors import PromptError

    with pytest.raises(PromptError):
        processor.apply_chat(messages)
