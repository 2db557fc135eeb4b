"""End-to-end chat on the golden fixture models (navil_utils.chat) and the parity report."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import navil_utils
from navil_utils.chatting import batch_chat, chat_turn
from navil_utils.constants import IMG_CONTEXT_TOKEN, IMG_START_TOKEN
from navil_utils.errors import PromptError
from navil_utils.processing.processor import pixel_budget, prepare_chat_inputs
from navil_utils.processing.templates import clean_response, get_template
from navil_utils.reference.fixtures import GOLDEN_VARIANTS, golden_dir, read_meta
from navil_utils.reference.parity import compare_with_golden
from navil_utils.reference.toy_tokenizer import ToyTokenizer

IMAGE = golden_dir("common") / "image.png"


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """The fixture models are tiny: one intra-op thread is ~10x faster than two on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", params=GOLDEN_VARIANTS)
def fixture(request):
    directory = golden_dir(request.param)
    meta = read_meta(directory)
    model = navil_utils.load_model(directory, special_token_ids=meta["special_token_ids"])
    return {
        "dir": directory, "meta": meta, "model": model, "tok": ToyTokenizer.from_fixture(directory),
        "inputs": load_file(directory / "inputs.safetensors"),
        "outputs": load_file(directory / "outputs.safetensors"),
        "prompt": (directory / "prompt.txt").read_text(encoding="utf-8"),
    }


def test_pixel_budget_from_config(fixture):
    budget = pixel_budget(fixture["model"].config)
    assert budget == {"min_pixels": 12 * 256, "max_pixels": 48 * 256, "scale_downsample_ratio": 0.7071,
                      "patch_size": 16, "merge_size": 2}


def test_chat_reproduces_reference_end_to_end(fixture):
    """image file → preprocessing → prompt → toy tokens → greedy generation == reference chat()."""
    turn = chat_turn(fixture["model"], fixture["tok"], IMAGE, fixture["meta"]["question"], max_new_tokens=8)
    assert turn.prompts[0] == fixture["prompt"]
    assert torch.equal(turn.input_ids, fixture["inputs"]["input_ids"])
    assert torch.equal(turn.generated_ids, fixture["outputs"]["generated_ids"])
    assert turn.answer == clean_response(fixture["meta"]["chat_response"])
    answer, history = navil_utils.chat(fixture["model"], fixture["tok"], IMAGE, fixture["meta"]["question"],
                                       max_new_tokens=8)
    assert answer == turn.answer
    assert history == [("<image>\n" + fixture["meta"]["question"], answer)]


def test_streaming_yields_the_same_answer(fixture):
    model, tok = fixture["model"], fixture["tok"]
    stream = navil_utils.chat(model, tok, IMAGE, fixture["meta"]["question"], stream=True, max_new_tokens=8)
    pieces = list(stream)
    generated = fixture["outputs"]["generated_ids"][0].tolist()
    assert "".join(pieces) == tok.decode(generated, skip_special_tokens=True)
    assert stream.answer == clean_response(fixture["meta"]["chat_response"])
    assert stream.history == [("<image>\n" + fixture["meta"]["question"], stream.answer)]


class WordToyTokenizer(ToyTokenizer):
    """Decodes every ordinary id as a word + space, so the streamer may flush after each token."""

    def decode(self, ids, skip_special_tokens=False, **_):
        ids = ids.tolist() if hasattr(ids, "tolist") else ([ids] if isinstance(ids, int) else ids)
        return "".join(f"w{i} " for i in ids if i >= self.char_offset or not skip_special_tokens)


def test_streaming_is_incremental(fixture):
    tok = WordToyTokenizer.from_fixture(fixture["dir"])
    stream = navil_utils.chat(fixture["model"], tok, IMAGE, fixture["meta"]["question"], stream=True,
                              max_new_tokens=8)
    pieces = list(stream)
    words = [i for i in fixture["outputs"]["generated_ids"][0].tolist() if i >= tok.char_offset]
    assert pieces == [f"w{i} " for i in words]               # one piece per generated (non-special) token
    assert stream.answer == "".join(pieces).strip()


def test_multi_turn_prompt_and_missing_image(fixture):
    model, tok = fixture["model"], fixture["tok"]
    first = chat_turn(model, tok, IMAGE, "Describe the image.", max_new_tokens=4)
    second = chat_turn(model, tok, IMAGE, "Anything else?", first.history, max_new_tokens=4)
    template = get_template(fixture["meta"]["template"])
    assert second.prompts[0] == (first.prompts[0] + first.answer + template.sep + template.user_role
                                 + "Anything else?" + template.sep + template.assistant_role)
    assert second.prompts[0].count(IMG_START_TOKEN) == 1
    assert len(second.history) == 2 and second.history[0] == first.history[0]
    with pytest.raises(PromptError, match="pass the conversation's image"):
        chat_turn(model, tok, None, "Anything else?", first.history, max_new_tokens=2)


def test_batched_chat_matches_single_runs(fixture):
    model, tok = fixture["model"], fixture["tok"]
    questions = [fixture["meta"]["question"], "Hello there!", "What is in the picture?"]
    images = [IMAGE, None, IMAGE]
    batch = batch_chat(model, tok, images, questions, max_new_tokens=6)
    assert batch.input_ids.shape[0] == 3
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    for row, (image, question) in enumerate(zip(images, questions)):
        single = chat_turn(model, tok, image, question, max_new_tokens=6)
        ids = batch.generated_ids[row].tolist()
        ids = ids[: ids.index(eos) + 1] if eos in ids else ids
        assert ids == single.generated_ids[0].tolist()
        assert batch.answers[row] == single.answer
    assert batch.generated_ids[0].tolist() == fixture["outputs"]["generated_ids"][0, :6].tolist()


def test_text_only_and_several_images(fixture):
    model, tok = fixture["model"], fixture["tok"]
    text = prepare_chat_inputs(model, tok, [None], ["Hello there!"])
    assert text.pixel_values is None and IMG_START_TOKEN not in text.prompts[0]
    two = prepare_chat_inputs(model, tok, [[IMAGE, IMAGE]], ["Same picture twice?"])
    assert two.num_scales == [3, 3] and two.prompts[0].count(IMG_START_TOKEN) == 2
    assert two.prompts[0].count(IMG_CONTEXT_TOKEN) == 2 * 29
    answer, history = navil_utils.chat(model, tok, [IMAGE, IMAGE], "Same picture twice?", max_new_tokens=3)
    assert history[0][0] == "<image>\n<image>\nSame picture twice?" and isinstance(answer, str)


def test_chat_follows_model_dtype(fixture):
    model = copy.deepcopy(fixture["model"]).to(torch.bfloat16)   # bf16 pixels and weights, no dtype error
    turn = chat_turn(model, fixture["tok"], IMAGE, fixture["meta"]["question"], max_new_tokens=2)
    assert turn.generated_ids.shape == (1, 2)


def test_parity_report(fixture):
    report = compare_with_golden(fixture["model"], fixture["dir"])
    assert report["passed"].all(), report.to_string()
    assert {"logits", "vision_last_hidden_state", "vision_mlp1_out", "hidden_states.03", "generated_ids",
            "text_only_generated_ids"} <= set(report["tensor"])
    assert report.loc[report["tensor"] == "logits", "max_abs_error"].item() < 1e-4


def test_parity_report_detects_a_perturbed_model(fixture):
    model = copy.deepcopy(fixture["model"])
    with torch.no_grad():
        model.language_model.get_output_embeddings().weight[5] += 0.01   # one LM-head row
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")                           # TF32 allowed by the caller
    try:
        report = compare_with_golden(model, fixture["dir"], generate=False).set_index("tensor")
        assert torch.get_float32_matmul_precision() == "high"            # restored after the comparison
    finally:
        torch.set_float32_matmul_precision(previous)
    assert not report.loc["logits", "passed"] and report.loc["logits", "max_abs_error"] > 1e-3
    assert report.loc["hidden_states.03", "passed"]                      # everything before the head agrees


class _CountSteps:
    """A stopping criterion that only counts generation steps."""

    def __init__(self) -> None:
        self.steps = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.steps += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@pytest.fixture(scope="module")
def tiny_chat():
    import navil_utils

    return navil_utils.load_chat_model(navil_utils.repo_root() / "data" / "models" / "navil-tiny")


@pytest.mark.parametrize("how", ["break", "close", "garbage"])
def test_an_abandoned_stream_stops_generating(tiny_chat, how):
    """Forced to generate 400 tokens, a stream left after its first piece (loop exit, close(), or dropped
    without iterating) stops within a few steps instead of finishing in the background."""
    import gc

    from transformers import StoppingCriteriaList

    from navil_utils.chatting import chat
    from navil_utils.tiny.synthetic import SyntheticVQA

    model, tokenizer = tiny_chat
    sample = SyntheticVQA(3).sample(0)
    counter = _CountSteps()
    stream = chat(model, tokenizer, sample.image, sample.question, stream=True, max_new_tokens=400,
                  min_new_tokens=400, stopping_criteria=StoppingCriteriaList([counter]))
    thread = stream._thread
    if how == "break":
        for _ in stream:
            break
    elif how == "close":
        next(iter(stream))
        stream.close()
    else:
        del stream
        gc.collect()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert counter.steps < 100, counter.steps


def test_a_finished_stream_still_generates_everything(tiny_chat):
    from navil_utils.chatting import chat
    from navil_utils.tiny.synthetic import SyntheticVQA

    model, tokenizer = tiny_chat
    sample = SyntheticVQA(3).sample(0)
    stream = chat(model, tokenizer, sample.image, sample.question, stream=True, max_new_tokens=16)
    pieces = list(stream)
    answer, _ = chat(model, tokenizer, sample.image, sample.question, max_new_tokens=16)
    assert stream.answer == answer and "".join(pieces).strip().startswith(answer)
    assert not stream.generating
