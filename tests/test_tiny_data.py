"""Tests of the tiny-model batching: prompt ids, labels, patches, padding, isolated QA packing."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from navil_utils.constants import IMG_CONTEXT_TOKEN
from navil_utils.errors import ConfigError
from navil_utils.models.configuration_navil import NaViLChatConfig
from navil_utils.models.modeling_navil import NaViLForConditionalGeneration
from navil_utils.models.presets import TINY_SYSTEM_MESSAGE
from navil_utils.processing.multiscale import preprocess_multiscale
from navil_utils.processing.templates import build_prompt
from navil_utils.processing.tokenizers import navil_token_ids
from navil_utils.reference.fixtures import golden_dir
from navil_utils.tiny.data import (
    IGNORE_INDEX,
    SyntheticBatches,
    TinyCollator,
    isolated_block_mask,
    qa_exact_match,
)
from navil_utils.tiny.synthetic import SyntheticVQA
from navil_utils.tiny.tokenizer import load_tiny_tokenizer
from navil_utils.paths import data_dir

BUDGET = dict(min_pixels=32 * 32, max_pixels=128 * 128)


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer(data_dir() / "models" / "navil-tiny")


@pytest.fixture(scope="module")
def samples():
    data = SyntheticVQA(5, extra_qas=3)
    return [data.sample(i) for i in range(6)]


def _tiny_model(tok, attn: str) -> NaViLForConditionalGeneration:
    """A random NaViL (the golden Qwen3-VE fixture's shape) with the tiny tokenizer's vocabulary."""
    cfg = json.loads((golden_dir("qwen3_ve") / "config.json").read_text())
    cfg["llm_config"]["vocab_size"] = len(tok)
    cfg.pop("special_token_ids", None)
    config = NaViLChatConfig(**cfg)
    config.llm_config._attn_implementation = attn
    torch.manual_seed(0)
    model = NaViLForConditionalGeneration(config).eval()
    model.set_special_token_ids(navil_token_ids(tok))
    return model


def test_prompt_ids_match_build_prompt_and_labels_hold_the_answer(tok, samples):
    collator = TinyCollator(tok, **BUDGET)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for s in samples:
        e = collator.encode(s)
        grids = preprocess_multiscale(s.image, **BUDGET).image_grid_thw
        prompt = build_prompt(s.question, grids, template="qwen3-chat", system_message=TINY_SYSTEM_MESSAGE)
        n_prompt = e.labels.index(next(v for v in e.labels if v != IGNORE_INDEX))
        assert e.input_ids[:n_prompt] == tok(prompt).input_ids
        answer = e.input_ids[n_prompt:]
        assert answer[-1] == im_end and tok.decode(answer[:-1]) == s.answer
        assert e.labels[n_prompt:] == answer and set(e.labels[:n_prompt]) == {IGNORE_INDEX}
        assert e.qa_index == [-1] * n_prompt + [0] * len(answer)


def test_batch_layout_and_patches(tok, samples):
    batch = TinyCollator(tok, **BUDGET)(samples)
    pre = preprocess_multiscale([s.image for s in samples], **BUDGET)
    assert torch.equal(batch.pixel_values, pre.pixel_values)
    assert torch.equal(batch.image_grid_thw, pre.image_grid_thw)
    assert batch.num_scales == pre.num_scales
    ctx = tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    assert int((batch.input_ids == ctx).sum()) == batch.pixel_values.shape[0] // 4
    lengths = batch.attention_mask.sum(1)
    for row, n in enumerate(lengths.tolist()):  # right padding: tokens first, pad after
        assert batch.attention_mask[row, :n].all() and not batch.attention_mask[row, n:].any()
        assert (batch.input_ids[row, n:] == tok.pad_token_id).all()
        assert (batch.labels[row, n:] == IGNORE_INDEX).all()
    assert [qa.answer for qa in batch.qas] == [s.answer for s in samples]
    assert batch.sample_indices == [s.index for s in samples]


def test_left_padding_mirrors_right_padding(tok, samples):
    right = TinyCollator(tok, **BUDGET)(samples)
    left = TinyCollator(tok, padding_side="left", pad_to_multiple_of=16, **BUDGET)(samples)
    assert left.input_ids.shape[1] % 16 == 0
    for row in range(len(samples)):
        r = right.input_ids[row][right.attention_mask[row] == 1]
        l_ = left.input_ids[row][left.attention_mask[row] == 1]
        assert torch.equal(r, l_)
        assert left.attention_mask[row, -1] == 1  # the last position is a real token


def test_prompts_without_answers_end_with_the_assistant_role(tok, samples):
    batch = TinyCollator(tok, padding_side="left", **BUDGET)(samples, with_answers=False)
    assert (batch.labels == IGNORE_INDEX).all()
    tail = tok.decode(batch.input_ids[0, -6:].tolist())
    assert tail.endswith("assistant\n<think>\n\n</think>\n\n")


def test_exact_match_from_teacher_forced_logits(tok, samples):
    batch = TinyCollator(tok, qa_packing="isolated", **BUDGET)(samples)
    assert len(batch.qas) == sum(len(s.qas) for s in samples)
    logits = torch.zeros(*batch.input_ids.shape, len(tok))
    rows, cols = torch.nonzero(batch.labels != IGNORE_INDEX, as_tuple=True)
    logits[rows, cols - 1, batch.labels[rows, cols]] = 1.0  # position i-1 predicts label i
    assert qa_exact_match(logits, batch).all()
    q = 5  # spoil the last answer token (<|im_end|>) of one QA
    r, c = torch.nonzero(batch.answer_qa == q, as_tuple=True)
    logits[r[-1], c[-1] - 1] = 0.0
    logits[r[-1], c[-1] - 1, 0] = 1.0
    expected = torch.ones(len(batch.qas), dtype=torch.bool)
    expected[q] = False
    assert torch.equal(qa_exact_match(logits, batch), expected)


def test_block_mask_structure():
    blocks = torch.tensor([[-1, -1, 0, 0, 1, 1, -2]])
    allowed = isolated_block_mask(blocks)[0, 0] == 0
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_isolated_packing_equals_separate_sequences(tok, samples, attn):
    """Each packed QA block gets exactly the logits of its own single-QA sequence."""
    model = _tiny_model(tok, attn)
    packed_collator = TinyCollator(tok, qa_packing="isolated", **BUDGET)
    single_collator = TinyCollator(tok, **BUDGET)
    packed = packed_collator(samples[:2])
    with torch.no_grad():
        packed_logits = model(**packed.model_inputs()).logits
        for row, s in enumerate(samples[:2]):
            singles = [replace(s, question=qa.question, answer=qa.answer, qtype=qa.qtype, template=qa.template,
                               evidence_boxes=qa.evidence_boxes, extra_qas=()) for qa in s.qas]
            batch = single_collator(singles)
            logits = model(**batch.model_inputs()).logits
            encoded = packed_collator.encode(s)
            prefix = encoded.block_ids.count(-1)
            for k in range(len(s.qas)):
                cols = [i for i, b in enumerate(encoded.block_ids) if b == k]
                n = len(cols)
                assert torch.equal(batch.input_ids[k, prefix:prefix + n], packed.input_ids[row, cols])
                torch.testing.assert_close(packed_logits[row, cols], logits[k, prefix:prefix + n],
                                           atol=1e-5, rtol=1e-4)


def test_model_loss_is_the_answer_token_cross_entropy(tok, samples):
    model = _tiny_model(tok, "sdpa")
    batch = TinyCollator(tok, **BUDGET)(samples)
    with torch.no_grad():
        out = model(**batch.model_inputs())
    rows, cols = torch.nonzero(batch.labels != IGNORE_INDEX, as_tuple=True)
    manual = torch.nn.functional.cross_entropy(out.logits[rows, cols - 1].float(), batch.labels[rows, cols])
    torch.testing.assert_close(out.loss, manual)
    assert batch.num_answer_tokens == len(rows)


def test_collator_errors(tok, samples):
    with pytest.raises(ConfigError):
        TinyCollator(tok, padding_side="middle")
    with pytest.raises(ConfigError):
        TinyCollator(tok, qa_packing="causal")
    collator = TinyCollator(tok, **BUDGET)
    with pytest.raises(ConfigError):
        collator.collate([])
    packed = TinyCollator(tok, qa_packing="isolated", **BUDGET).encode(samples[0])
    with pytest.raises(ConfigError):
        collator.collate([packed, collator.encode(samples[1])])


def test_synthetic_batches_are_resumable_and_worker_independent(tok, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    data = SyntheticVQA(9)
    collator = TinyCollator(tok, **BUDGET)
    stream = SyntheticBatches(data, collator, batch_size=3, num_batches=4)
    serial = list(stream)
    assert [b.sample_indices for b in serial] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    resumed = next(iter(SyntheticBatches(data, collator, batch_size=3, start=6, num_batches=1)))
    assert torch.equal(resumed.input_ids, serial[2].input_ids)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    parallel = list(loader)
    assert [b.sample_indices for b in parallel] == [b.sample_indices for b in serial]
    for a, b in zip(serial, parallel):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
