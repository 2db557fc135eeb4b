"""Strict loading of NaViL checkpoints: typed errors, sharded checkpoints, Auto classes, round trips."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

import navil_utils
from navil_utils.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    OfflineError,
    WeightsMismatchError,
)
from navil_utils.models.configuration_navil import NaViLChatConfig
from navil_utils.models.modeling_navil import NaViLForConditionalGeneration
from navil_utils.reference.golden import golden_root, load_golden_case

VARIANT = "internlm2_ve"


@pytest.fixture(scope="module")
def case():
    return load_golden_case(VARIANT)


@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    """A writable copy of the fixture checkpoint (config.json + model.safetensors)."""
    target = tmp_path / "ckpt"
    target.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(golden_root() / VARIANT / name, target / name)
    return target


def _rewrite_weights(directory: Path, edit) -> None:
    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"))


def test_load_model_is_exported_and_strict_load_succeeds(case):
    assert navil_utils.load_model is navil_utils.models.loading.load_model
    model = case.model
    assert isinstance(model, NaViLForConditionalGeneration) and not model.training
    assert model.img_context_token_id == 7 and model.img_start_token_id == 9
    assert model.special_token_ids["<IMG_FRAME_BREAK>"] == 16
    file = load_file(str(case.directory / "model.safetensors"))
    state = model.state_dict()
    assert sorted(state) == sorted(file)
    assert all(torch.equal(state[k], file[k]) for k in file)


def test_missing_key_is_listed(checkpoint):
    key = "language_model.model.layers.1.feed_forward_ve.w2.weight"
    _rewrite_weights(checkpoint, lambda t: t.pop(key))
    with pytest.raises(WeightsMismatchError, match=r"1 missing key\(s\): " + key.replace(".", r"\.")) as info:
        navil_utils.load_model(checkpoint)
    assert info.value.missing == [key] and info.value.unexpected == [] and info.value.mismatched == []


def test_unexpected_key_is_listed(checkpoint):
    _rewrite_weights(checkpoint, lambda t: t.update({"mlp1.9.weight": torch.zeros(3)}))
    with pytest.raises(WeightsMismatchError, match=r"unexpected key\(s\): mlp1\.9\.weight") as info:
        navil_utils.load_model(checkpoint)
    assert info.value.unexpected == ["mlp1.9.weight"] and info.value.missing == []


def test_wrong_shape_is_listed(checkpoint):
    key = "special_token_embedding.weight"
    _rewrite_weights(checkpoint, lambda t: t.update({key: torch.zeros(11, 64)}))
    with pytest.raises(WeightsMismatchError, match=r"special_token_embedding\.weight \(file \(11, 64\), "
                                                    r"model \(12, 64\)\)") as info:
        navil_utils.load_model(checkpoint)
    assert info.value.mismatched == [(key, (11, 64), (12, 64))]


def test_truncated_safetensors_is_corrupt(checkpoint):
    file = checkpoint / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="not a readable safetensors file"):
        navil_utils.load_model(checkpoint)
    file.write_bytes(b"\x00\x01")
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        navil_utils.load_model(checkpoint)


def test_missing_files_raise_not_found(checkpoint, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        navil_utils.load_model(tmp_path / "nowhere")
    (checkpoint / "model.safetensors").rename(checkpoint / "pytorch_model.bin")
    with pytest.raises(CheckpointNotFoundError, match="only safetensors"):
        navil_utils.load_model(checkpoint)
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="config.json not found"):
        navil_utils.load_model(checkpoint)
    assert issubclass(CheckpointNotFoundError, CheckpointError)


def _edit_config(directory: Path, edit) -> None:
    data = json.loads((directory / "config.json").read_text())
    edit(data)
    (directory / "config.json").write_text(json.dumps(data))


def test_unknown_architecture_and_model_type(checkpoint):
    _edit_config(checkpoint, lambda d: d["llm_config"].update(architectures=["LlamaForCausalLM"]))
    with pytest.raises(ConfigError, match="unknown LLM architecture 'LlamaForCausalLM'"):
        navil_utils.load_model(checkpoint)
    _edit_config(checkpoint, lambda d: d.update(model_type="internvl_chat"))
    with pytest.raises(ConfigError, match="model_type 'internvl_chat'"):
        navil_utils.load_model(checkpoint)


def test_hub_id_fails_fast_when_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(OfflineError, match="looks like a hub id, but offline mode is on"):
        navil_utils.load_model("OpenGVLab/NaViL-2B", cache_dir=str(tmp_path / "hub-cache"))
    assert time.perf_counter() - start < 10.0


def test_sharded_checkpoint_round_trip(case, tmp_path):
    case.model.save_pretrained(tmp_path, max_shard_size="300KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    loaded = navil_utils.load_model(tmp_path)
    original = case.model.state_dict()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in original.items())
    (tmp_path / shards[-1]).unlink()
    with pytest.raises(CheckpointNotFoundError, match="lists shard"):
        navil_utils.load_model(tmp_path)


def test_save_pretrained_round_trip_is_exact(case, tmp_path):
    case.model.save_pretrained(tmp_path)
    reloaded = navil_utils.load_model(tmp_path)          # special ids come back from config.json
    assert reloaded.special_token_ids == case.model.special_token_ids
    assert reloaded.config.to_dict()["llm_config"] == case.model.config.to_dict()["llm_config"]
    state, original = reloaded.state_dict(), case.model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
    with torch.no_grad():
        a = case.model(**case.image_inputs).logits
        b = reloaded(**case.image_inputs).logits
    assert torch.equal(a, b)


def test_auto_classes_load_the_official_format(case):
    config = AutoConfig.from_pretrained(case.directory)
    assert isinstance(config, NaViLChatConfig) and config.llm_architecture == "InternLM2VEForCausalLM"
    model = AutoModel.from_pretrained(case.directory)
    assert isinstance(model, NaViLForConditionalGeneration)
    model.set_special_token_ids(case.meta["special_token_ids"])
    with torch.no_grad():
        logits = model(**case.image_inputs).logits
    torch.testing.assert_close(logits, case.outputs["logits"], atol=1e-4, rtol=1e-4)


def test_special_ids_come_from_tokenizer_files(checkpoint, case):
    added = {str(i): {"content": t, "special": True} for t, i in case.meta["special_token_ids"].items()}
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    model = navil_utils.load_model(checkpoint)
    assert model.special_token_ids == case.meta["special_token_ids"]
    with pytest.raises(ConfigError, match="lacks"):
        model.set_special_token_ids({"<img>": 9})


def test_model_without_special_ids_explains_how_to_set_them(checkpoint, case):
    model = navil_utils.load_model(checkpoint)
    with pytest.raises(ConfigError, match="special-token ids are unknown"):
        model(input_ids=case.inputs["text_only_input_ids"])
