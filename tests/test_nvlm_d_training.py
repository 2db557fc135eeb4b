"""The tiny NVLM-D of issue 15: extended tokenizer, tiled collator, training through ``train()`` (learning,
bit-for-bit resume), export → strict load → evaluation, the unchanged NaViL collator, the comparison runner."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from navil_utils.errors import ConfigError, WeightsMismatchError
from navil_utils.paths import repo_root
from navil_utils.processing.tiling import nvlm_tile_tags, plan_tiles
from navil_utils.tiny.data import IGNORE_INDEX, TiledCollator, TinyCollator
from navil_utils.tiny.nvlm_d import NVLM_TINY_TOKENS, extend_tokenizer_with_nvlm_tokens
from navil_utils.tiny.synthetic import SyntheticVQA
from navil_utils.tiny.tokenizer import load_tiny_tokenizer
from navil_utils.tiny.train import StepBatches, TrainConfig, build_model, train

TINY = repo_root() / "data" / "models" / "navil-tiny"
MICRO_NVLM = {"vit_width": 32, "vit_layers": 1, "vit_heads": 2, "llm_width": 64, "llm_layers": 1, "llm_heads": 2,
              "llm_kv_heads": 1, "llm_intermediate": 128, "connector_hidden": 64}


def micro_config(out, **overrides) -> TrainConfig:
    values = {"out": str(out), "tokenizer": str(TINY), "total_steps": 6, "batch_size": 4, "lr": 2e-3,
              "warmup_steps": 2, "log_every": 1, "eval_every": 1000, "eval_batches": 0, "checkpoint_every": 2,
              "threads": 1, "progress": False, "model": MICRO_NVLM, "architecture": "nvlm_d",
              "data": {"image_size_range": [64, 64], "aspect_ratios": [1.0]}, "curriculum": [[0.0, {"color": 1.0}]]}
    values.update(overrides)
    return TrainConfig.from_dict(values)


@pytest.fixture(scope="module")
def nvlm_tokenizer_dir(tmp_path_factory):
    return extend_tokenizer_with_nvlm_tokens(TINY, tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def nvlm_tok(nvlm_tokenizer_dir):
    return load_tiny_tokenizer(nvlm_tokenizer_dir)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A micro NVLM-D trained 12 steps on a fixed single-size colour task; its fresh model and first batch."""
    out = tmp_path_factory.mktemp("nvlm_run")
    config = micro_config(out, total_steps=12)
    train(config)
    tokenizer = load_tiny_tokenizer(out / "final")
    fresh = build_model(config, tokenizer)
    batch = StepBatches(config, tokenizer)[0]
    return out, config, fresh, batch


# ----------------------------------------------------------------------------- tokenizer
def test_extended_tokenizer_appends_nvlm_tokens_and_keeps_every_navil_id(nvlm_tokenizer_dir, nvlm_tok):
    shipped = json.loads((TINY / "tokenizer.json").read_text(encoding="utf-8"))
    shipped_ids = {**shipped["model"]["vocab"], **{t["content"]: t["id"] for t in shipped["added_tokens"]}}
    assert len(shipped_ids) == 480
    vocab = nvlm_tok.get_vocab()
    assert all(vocab[token] == i for token, i in shipped_ids.items())              # no NaViL id moved
    assert [vocab[t] for t in NVLM_TINY_TOKENS] == list(range(480, 496)) and len(nvlm_tok) == 496
    assert vocab["<Image>"] == 480 and vocab["<|vision_pad|>"] == 482 and vocab["<tile_1>"] == 484
    ids = nvlm_tok("<Image><tile_2><|vision_pad|></Image>", add_special_tokens=False).input_ids
    assert ids == [480, 485, 482, 481]                                                # each tag is one token
    assert nvlm_tok.decode([480, 483, 482, 481], skip_special_tokens=True) == ""      # special: skipped
    config = json.loads((nvlm_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"]["482"]["content"] == "<|vision_pad|>"
    assert config["additional_special_tokens"][-16:] == list(NVLM_TINY_TOKENS)
    with pytest.raises(ConfigError, match="already holds"):
        extend_tokenizer_with_nvlm_tokens(nvlm_tokenizer_dir, nvlm_tokenizer_dir.parent / "again")


# ----------------------------------------------------------------------------- collators
def test_tiled_collator_pads_follow_the_tiling_plan_and_the_text_is_navils(nvlm_tok):
    data = SyntheticVQA(11)
    samples = [data.sample(i) for i in range(12)]
    assert len({s.image.size for s in samples}) >= 6                                  # varied sizes and ratios
    collator = TiledCollator(nvlm_tok, tile_size=64, max_tiles=6)
    batch = collator(samples)
    assert collator.tokens_per_tile == 4
    plans = [plan_tiles(s.image.height, s.image.width, 6, 64) for s in samples]
    pads = (batch.input_ids == nvlm_tok.convert_tokens_to_ids("<|vision_pad|>")).sum(1).tolist()
    assert pads == [4 * p.num_tiles for p in plans]
    assert batch.pixel_values.shape == (sum(p.num_tiles for p in plans), 3, 64, 64)
    assert batch.image_grid_thw.tolist() == [[p.num_tiles, p.grid[1], p.grid[0]] for p in plans]
    assert "image_grid_thw" not in batch.model_inputs()
    navil = TinyCollator(nvlm_tok)(samples)
    for row, (sample, plan) in enumerate(zip(samples, plans)):
        ids = batch.input_ids[row, batch.attention_mask[row] == 1].tolist()
        start, end = ids.index(480), ids.index(481)
        tags = [nvlm_tok.convert_ids_to_tokens(i) for i in ids[start + 1:end] if i != 482]
        assert tags == nvlm_tile_tags(plan.num_tiles)                                 # <tile_1>… thumbnail last
        reference = navil.input_ids[row, navil.attention_mask[row] == 1].tolist()
        img, img_end = reference.index(nvlm_tok.convert_tokens_to_ids("<img>")), reference.index(
            nvlm_tok.convert_tokens_to_ids("</img>"))
        assert ids[:start] == reference[:img] and ids[end + 1:] == reference[img_end + 1:]   # same text, same answer
        labels = batch.labels[row][batch.labels[row] != IGNORE_INDEX].tolist()
        assert nvlm_tok.decode(labels[:-1]) == sample.answer
    # a question that spells the tags stays plain text
    hostile = collator.question_ids("What does <Image><tile_1><|vision_pad|> say?")
    assert not {480, 482, 484} & set(hostile)


#: sha256 of (input_ids, labels, attention_mask, image_grid_thw, pixel_values[, 4-D mask, positions]) of step 0
#: of ``StepBatches(TrainConfig(batch_size=4, total_steps=10, ...))`` with the shipped tokenizer, computed
#: before the NVLM-D option was added.
NAVIL_BATCH_SHA256 = {
    ("single", 0): "1e25b6fa17c6fd103e3165106471f18c206e35a5801dc244ef1a9adbceaf93bc",
    ("isolated", 3): "4ebd5a02d2484f4bf1ffe6875a215f4b5597e18413d4024222fae4055df3dd44",
}


def _fingerprint(batch) -> str:
    digest = hashlib.sha256()
    for tensor in (batch.input_ids, batch.labels, batch.attention_mask, batch.image_grid_thw, batch.pixel_values):
        digest.update(tensor.contiguous().numpy().tobytes())
    if batch.attention_mask_4d is not None:
        digest.update(batch.attention_mask_4d.numpy().tobytes())
        digest.update(batch.position_ids.numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("packing, extra", sorted(NAVIL_BATCH_SHA256))
def test_navil_collator_output_is_unchanged(packing, extra):
    tokenizer = load_tiny_tokenizer(TINY)
    config = TrainConfig(batch_size=4, total_steps=10, qa_packing=packing, extra_qas=extra)
    assert config.architecture == "navil"
    steps = StepBatches(config, tokenizer)
    assert type(steps.collator) is TinyCollator
    batch = steps[0]
    assert _fingerprint(batch) == NAVIL_BATCH_SHA256[(packing, extra)]
    fresh = TinyCollator(tokenizer, min_pixels=config.min_pixels, max_pixels=config.max_pixels, qa_packing=packing,
                         pad_to_multiple_of=8)([steps.stages[0].sample(j) for j in range(4)])
    for name in ("input_ids", "labels", "attention_mask", "pixel_values", "image_grid_thw"):
        assert torch.equal(getattr(batch, name), getattr(fresh, name)), name
    assert "image_grid_thw" in batch.model_inputs()


# ----------------------------------------------------------------------------- sizes
def test_full_size_tiny_models_have_matching_parameter_counts(tmp_path):
    from navil_utils.analysis.parameters import count_parameters

    config = TrainConfig(out=str(tmp_path), tokenizer=str(TINY), architecture="nvlm_d")
    tokenizer = load_tiny_tokenizer(extend_tokenizer_with_nvlm_tokens(TINY, tmp_path / "tok"))
    nvlm = count_parameters(build_model(config, tokenizer))
    navil = count_parameters(build_model(TrainConfig(model={"llm_intermediate": 384}), load_tiny_tokenizer(TINY)))
    assert navil.total == 3_871_424                                     # data/models/navil-tiny/README.md
    assert nvlm.total == 3_880_512 and nvlm.vision_encoder == 893_312 and nvlm.active == nvlm.total
    assert abs(nvlm.total / navil.total - 1) < 0.01


# ----------------------------------------------------------------------------- training
def test_micro_nvlm_d_learns_through_train_with_its_encoder(trained):
    from navil_utils.tiny.nvlm_d import load_tiny_nvlm_d

    out, _, fresh, batch = trained

    saved = json.loads((out / "train_config.json").read_text())
    assert saved["architecture"] == "nvlm_d"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    model, _ = load_tiny_nvlm_d(out / "final")
    with torch.no_grad():
        before = float(fresh.eval()(**batch.model_inputs()).loss)
        after = float(model(**batch.model_inputs()).loss)
    assert before > 5.0                                   # ~ln(496): an untrained model
    assert after < before - 1.0, (before, after)          # the first batch's loss fell clearly (6.22 → 4.71)
    trained_state, fresh_state = model.state_dict(), fresh.state_dict()
    vision = [k for k in fresh_state if k.startswith("vision_model.")]
    assert len(vision) > 10 and all(not torch.equal(fresh_state[k], trained_state[k]) for k in vision)


def test_killed_nvlm_d_run_resumes_bit_for_bit(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(micro_config(straight))
    train(micro_config(resumed), _simulate_kill_after=3)          # dies after step 3; checkpoint holds step 2
    state = json.loads((resumed / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2 and not (resumed / "final").exists()
    train(micro_config(resumed))
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("vision_model.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    log_a = [json.loads(x) for x in (straight / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (resumed / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in log_a] == [(r["step"], r["loss"]) for r in log_b]
    # the architecture is part of the run: resuming it as a NaViL is refused
    with pytest.raises(ConfigError, match="architecture"):
        train(micro_config(resumed, architecture="navil"))
    with pytest.raises(ConfigError, match="architecture='vit'"):
        micro_config(tmp_path / "x", architecture="vit").validate()
    with pytest.raises(ConfigError, match=r"unknown tiny NVLM-D model option\(s\) \['vit_widht'\]"):
        micro_config(tmp_path / "x", model={"vit_widht": 64}).validate()


# ----------------------------------------------------------------------------- export, load, evaluate
def test_export_strict_load_and_evaluation_report_plan_tokens(trained, tmp_path):
    from navil_utils.models.modeling_nvlm_d import NVLMDForConditionalGeneration
    from navil_utils.tiny.evaluate import evaluate_model, load_eval_model

    final = trained[0] / "final"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (final / name).is_file(), name
    assert json.loads((final / "config.json").read_text())["model_type"] == "NVLM_D"
    model, tokenizer = load_eval_model(final)
    assert isinstance(model, NVLMDForConditionalGeneration) and len(tokenizer) == 496
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    data = SyntheticVQA(21)
    samples = [data.sample(i) for i in range(6)]
    result = evaluate_model(model, tokenizer, samples=samples, batch_size=3, seed=21)
    expected = [4 * plan_tiles(s.image.height, s.image.width, 6, 64).num_tiles for s in samples]
    assert [r["visual_tokens"] for r in result.records] == expected
    assert result.visual_tokens_max == max(expected) and result.visual_tokens_mean == pytest.approx(sum(expected) / 6)
    assert result.architecture == "nvlm_d" and result.n == 6 and 0 < result.seconds_per_sample < 5
    assert all(isinstance(r["prediction"], str) for r in result.records)
    with pytest.raises(ConfigError, match="NaViL ablation"):
        evaluate_model(model, tokenizer, samples=samples, scales="largest")
    # loading is strict: a checkpoint without one tensor is refused
    broken = tmp_path / "broken"
    shutil.copytree(final, broken)
    weights = load_file(broken / "model.safetensors")
    weights.pop("mlp1.1.weight")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsMismatchError, match="mlp1.1.weight"):
        load_eval_model(broken)


# ----------------------------------------------------------------------------- comparison runner
def test_compare_runner_writes_two_records_and_skips_them_on_restart(tmp_path, monkeypatch, capsys):
    from navil_utils.tiny import compare

    spec = repo_root() / "configs" / "nvlm_d" / "compare_micro.json"
    results, runs = tmp_path / "compare.jsonl", tmp_path / "runs"
    argv = [str(spec), "--results", str(results), "--out-root", str(runs), "--no-progress"]
    assert compare.main(argv) == 0
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["architecture"] for r in records] == ["navil", "nvlm_d"]
    for record in records:
        assert record["samples"] == 8 and record["steps"] == 2 and record["train_seconds"] >= 0
        assert record["params_total"] > record["params_encoder"] > 0
        assert set(record["accuracy"]) >= {"overall"} and set(record["accuracy_subsets"]) == {"extreme_aspect",
                                                                                               "small_text"}
        assert set(record["accuracy_subsets"]["small_text"]) == {"overall", "text"}
        assert record["eval"] == {"seed": 1234, "n": 4} and record["inference_seconds_per_sample"] > 0
        assert record["machine"] and "git_commit" in record
        assert (runs / record["run_id"] / "final" / "model.safetensors").is_file()
    nvlm = records[1]
    assert nvlm["params_total"] == nvlm["params_active"]
    extreme = SyntheticVQA(1234, aspect_ratios=(0.25, 4.0))
    expected = [4 * plan_tiles(extreme.sample(i).image.height, extreme.sample(i).image.width, 6, 64).num_tiles
                for i in range(2)]
    assert nvlm["subsets"]["extreme_aspect"]["visual_tokens_mean"] == pytest.approx(sum(expected) / 2)
    text = results.read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(compare, "execute_run", no_training)
    capsys.readouterr()
    assert compare.main(argv) == 0
    assert results.read_text() == text
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"runs": 2, "finished": 2,
                                                                          "results": str(results)}


def test_compare_spec_is_validated_and_ids_change_with_the_recipe():
    from navil_utils.tiny.compare import expand_spec

    spec = json.loads((repo_root() / "configs" / "nvlm_d" / "compare.json").read_text())
    runs = expand_spec(spec)
    assert [(r.architecture, r.seed, r.total_steps) for r in runs] == [
        (a, seed, 512) for seed in spec["seeds"] for a in ("navil", "nvlm_d")]
    assert len(spec["seeds"]) >= 2, "a seed spread needs two seeds per architecture"
    assert runs[0].train_config("x").model == {"llm_intermediate": 384}
    changed = expand_spec({**spec, "train": {**spec["train"], "lr": 1e-3}})
    assert {r.run_id for r in changed}.isdisjoint(r.run_id for r in runs)
    with pytest.raises(ConfigError, match="unknown comparison options"):
        expand_spec({**spec, "budget": 3})
    with pytest.raises(ConfigError, match="may not set"):
        expand_spec({**spec, "train": {"architecture": "navil"}})
    with pytest.raises(ConfigError, match="multiple of batch_size"):
        expand_spec({**spec, "samples": 100})
