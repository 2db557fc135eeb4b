"""Tokenizers without remote code (navil_utils.processing.tokenizers) and the fixtures' toy tokenizer.

The InternLM2 tests train a tiny sentencepiece BPE model (InternLM2-like settings: byte fallback,
identity normalisation, dummy prefix, <unk>/<s>/</s> = 0/1/2, chat tokens as user-defined pieces) and
add NaViL's 12 image tokens as added tokens above the sentencepiece vocabulary, as a NaViL-2B
checkpoint does.  The Qwen3 path uses a tiny byte-level BPE ``tokenizer.json``.
"""
from __future__ import annotations

import io
import json

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file

from navil_utils.constants import SPECIAL_TOKEN_LIST
from navil_utils.errors import CheckpointError
from navil_utils.processing.templates import build_prompt
from navil_utils.processing.tokenizers import (
    InternLM2Tokenizer,
    load_tokenizer,
    navil_token_ids,
    tokenizer_kind,
)
from navil_utils.reference.fixtures import GOLDEN_VARIANTS, golden_dir, read_meta
from navil_utils.reference.toy_tokenizer import ToyTokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Describe the image in detail. A red square sits left of a blue circle.",
    "NaViL is a native multimodal large language model.",
    "你好，世界！这是一张图片。",
    "Hello there! How are you today?\nFine, thanks.",
    "1234567890 + - * / = ( ) [ ] { }",
] * 10
SP_VOCAB = 400
CHAT = ["<|im_start|>", "<|im_end|>"]


def _added(content: str) -> dict:
    return {"content": content, "lstrip": False, "rstrip": False, "normalized": False,
            "single_word": False, "special": True}


@pytest.fixture(scope="module")
def internlm2_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("internlm2_tok")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=SP_VOCAB, model_type="bpe",
        byte_fallback=True, user_defined_symbols=CHAT, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, minloglevel=2, num_threads=1,
    )
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    added = {str(i): _added(t) for i, t in enumerate(["<unk>", "<s>", "</s>", *CHAT])}
    added.update({str(SP_VOCAB + k): _added(t) for k, t in enumerate(SPECIAL_TOKEN_LIST)})
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "added_tokens_decoder": added, "additional_special_tokens": CHAT,
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
    }))
    (directory / "config.json").write_text(json.dumps({"llm_config": {"architectures": ["InternLM2VEForCausalLM"]}}))
    return directory


@pytest.fixture(scope="module")
def sp_model(internlm2_dir):
    return spm.SentencePieceProcessor(model_file=str(internlm2_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def internlm2_tok(internlm2_dir):
    return load_tokenizer(internlm2_dir)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = tmp_path_factory.mktemp("qwen3_tok")
    specials = ["<|endoftext|>", *CHAT, *SPECIAL_TOKEN_LIST]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "added_tokens_decoder": {str(tok.token_to_id(s)): _added(s) for s in specials},
    }))
    (directory / "config.json").write_text(json.dumps({"llm_config": {"architectures": ["Qwen3VEForCausalLM"]}}))
    return directory


TEXT = "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT><IMG_LINE_BREAK><IMG_FRAME_BREAK></img>\n" \
       "Describe 你好 the image: 42 🙂.<|im_end|><|im_start|>assistant\n"


# ---- InternLM2 sentencepiece tokenizer -----------------------------------------------------------
def test_internlm2_dispatch_and_special_ids(internlm2_dir, internlm2_tok):
    assert tokenizer_kind(internlm2_dir) == "internlm2-sentencepiece"
    assert isinstance(internlm2_tok, InternLM2Tokenizer)
    ids = navil_token_ids(internlm2_tok)
    assert ids["<|im_start|>"] == 3 and ids["<|im_end|>"] == 4       # user-defined sentencepiece pieces
    assert [ids[t] for t in SPECIAL_TOKEN_LIST] == list(range(SP_VOCAB, SP_VOCAB + 12))  # added tokens
    assert (internlm2_tok.bos_token_id, internlm2_tok.eos_token_id, internlm2_tok.pad_token_id) == (1, 2, 2)
    assert len(internlm2_tok) == SP_VOCAB + 12


def test_internlm2_bos_once_no_eos(internlm2_tok):
    ids = internlm2_tok.encode("Hello there!")
    assert ids[0] == 1 and ids.count(1) == 1 and 2 not in ids
    assert internlm2_tok.encode("Hello there!", add_special_tokens=False) == ids[1:]
    batch = internlm2_tok(["Hello", "The quick brown fox"], padding=True, padding_side="left", return_tensors="pt")
    first = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert first == internlm2_tok.encode("Hello") and batch["attention_mask"][0, 0] == 0


def test_internlm2_chunks_encoded_by_sentencepiece(internlm2_tok, sp_model):
    """Text between added tokens is encoded chunk by chunk by sentencepiece (slow-tokenizer rule)."""
    ids = internlm2_tok.encode(TEXT)
    special = navil_token_ids(internlm2_tok)
    expected = [1]
    for piece in ("<|im_start|>", "user\n", "<img>", "<IMG_CONTEXT>", "<IMG_CONTEXT>", "<IMG_LINE_BREAK>",
                  "<IMG_FRAME_BREAK>", "</img>", "\nDescribe 你好 the image: 42 🙂.", "<|im_end|>", "<|im_start|>",
                  "assistant\n"):
        expected.extend([special[piece]] if piece in special else sp_model.encode(piece))
    assert ids == expected
    pieces = [sp_model.id_to_piece(i) for i in ids if i < SP_VOCAB]
    assert [p for p in pieces if p in ("<0xF0>", "<0x9F>", "<0x99>", "<0x82>")] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]  # byte fallback for 🙂


@pytest.mark.parametrize("text", [TEXT, "plain text, no specials", "你好\n\n  spaced  out ", "<img></img>"])
def test_internlm2_round_trip(internlm2_tok, text):
    ids = internlm2_tok.encode(text)
    assert internlm2_tok.decode(ids) == "<s>" + text
    stripped = text
    for token in [*CHAT, *SPECIAL_TOKEN_LIST]:
        stripped = stripped.replace(token, "")
    decoded = internlm2_tok.decode(internlm2_tok.encode(stripped), skip_special_tokens=True)
    assert decoded == stripped


def test_internlm2_skip_special_tokens_drops_image_tokens(internlm2_tok):
    text = internlm2_tok.decode(internlm2_tok.encode(TEXT), skip_special_tokens=True)
    assert not any(tok in text for tok in ["<s>", *CHAT, *SPECIAL_TOKEN_LIST])
    assert "Describe 你好 the image: 42 🙂." in text


def test_internlm2_save_and_reload(internlm2_tok, tmp_path):
    internlm2_tok.save_pretrained(tmp_path)
    reloaded = InternLM2Tokenizer.from_pretrained(tmp_path)
    assert reloaded.encode(TEXT) == internlm2_tok.encode(TEXT)
    assert navil_token_ids(reloaded) == navil_token_ids(internlm2_tok)


def test_prompt_tokenises_to_expected_image_span(internlm2_tok):
    grids = [[1, 4, 6], [1, 6, 10]]
    ids = internlm2_tok.encode(build_prompt("Describe the image.", grids))
    special = navil_token_ids(internlm2_tok)
    assert ids.count(special["<IMG_CONTEXT>"]) == 6 + 15
    assert ids.count(special["<IMG_LINE_BREAK>"]) == 2 + 3
    assert ids.count(special["<img>"]) == ids.count(special["</img>"]) == 1


# ---- Qwen3 fast tokenizer ------------------------------------------------------------------------
def test_qwen3_fast_tokenizer(qwen3_dir):
    assert tokenizer_kind(qwen3_dir) == "fast"
    tok = load_tokenizer(qwen3_dir)
    assert tok.is_fast and tok.bos_token_id is None
    ids = tok.encode(TEXT)
    special = navil_token_ids(tok)
    assert ids[0] == special["<|im_start|>"]                           # no BOS
    assert ids.count(special["<IMG_CONTEXT>"]) == 2
    assert tok.decode(ids) == TEXT
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id


# ---- dispatch errors -----------------------------------------------------------------------------
def test_dispatch_errors(tmp_path, internlm2_dir):
    with pytest.raises(CheckpointError, match="does not exist"):
        tokenizer_kind(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="neither"):
        tokenizer_kind(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes((internlm2_dir / "tokenizer.model").read_bytes())
    with pytest.raises(CheckpointError, match="InternLM2"):
        tokenizer_kind(tmp_path)
    forced = load_tokenizer(tmp_path, kind="internlm2-sentencepiece")
    assert forced.encode("Hi")[0] == 1
    with pytest.raises(CheckpointError, match="no id for NaViL token"):
        navil_token_ids(forced)                                          # image tokens were never added


# ---- toy tokenizer of the golden fixtures --------------------------------------------------------
@pytest.mark.parametrize("variant", GOLDEN_VARIANTS)
def test_toy_tokenizer_reproduces_fixture_inputs(variant):
    directory = golden_dir(variant)
    tok = ToyTokenizer.from_fixture(directory)
    meta = read_meta(directory)
    inputs = load_file(directory / "inputs.safetensors")
    prompt = (directory / "prompt.txt").read_text(encoding="utf-8")
    assert torch.equal(tok(prompt, return_tensors="pt")["input_ids"], inputs["input_ids"])
    text_only = "<|im_start|>user\nHello there!<|im_end|><|im_start|>assistant\n"
    assert torch.equal(tok(text_only, return_tensors="pt")["input_ids"], inputs["text_only_input_ids"])
    assert (inputs["input_ids"][0, 0].item() == tok.bos_token_id) == meta["toy_tokenizer"]["adds_bos"]
    assert navil_token_ids(tok) == meta["special_token_ids"]
    generated = load_file(directory / "outputs.safetensors")["generated_ids"][0]
    assert tok.decode(generated, skip_special_tokens=True) == meta["chat_response"]


def test_toy_tokenizer_padding_and_round_trip():
    tok = ToyTokenizer.from_fixture(golden_dir("internlm2_ve"))
    batch = tok(["ab", "<img>abcd"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 6)
    assert batch["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    text = "<|im_start|>héllo<IMG_CONTEXT>\n"
    assert tok.decode(tok.encode(text)) == "<s>" + text
