"""Dense per-token targets of the synthetic task, the training levers that use them (auxiliary token loss,
per-question loss averaging, connector init scale) and the frozen-feature probes."""
from __future__ import annotations

import csv
import math
import json

import pytest
import torch
from test_tiny_train import MICRO_MODEL, micro_config

import navil_utils
from navil_utils.analysis.attention import TokenLayout
from navil_utils.errors import ConfigError
from navil_utils.models import load_model
from navil_utils.paths import repo_root
from navil_utils.tiny.data import TinyCollator
from navil_utils.tiny.objectives import grid_positions, question_loss
from navil_utils.tiny.probes import fit_probe, probe_records, probe_table, visual_token_geometry
from navil_utils.tiny.synthetic import SceneObject, SyntheticVQA
from navil_utils.tiny.token_targets import (
    IGNORE_INDEX,
    TOKEN_TARGETS,
    character_centres,
    object_points,
    target_classes,
    token_at,
    window_order,
)
from navil_utils.tiny.train import TrainConfig, train

TINY = repo_root() / "data/models/navil-tiny"


@pytest.fixture(scope="module")
def tiny():
    return navil_utils.load_chat_model(str(TINY))


def test_character_centres_split_the_ink_box_in_reading_order():
    obj = SceneObject("text", "black", (10, 20, 70, 40), "center", 26, "AXE")
    centres = character_centres(obj)
    assert [c for c, _, _ in centres] == ["A", "X", "E"]
    xs = [x for _, x, _ in centres]
    assert 10 < xs[0] < xs[1] < xs[2] < 70 and all(y == 30 for _, _, y in centres)
    with pytest.raises(ConfigError, match="text object"):
        character_centres(SceneObject("circle", "red", (0, 0, 9, 9), "center", 9))


def test_token_at_covers_the_image():
    assert token_at(0, 0, 128, 64, 2, 4) == (0, 0)
    assert token_at(127.9, 63.9, 128, 64, 2, 4) == (1, 3)
    assert token_at(128, 64, 128, 64, 2, 4) == (1, 3)          # the far edge belongs to the last token
    assert token_at(40, 10, 128, 64, 2, 4) == (0, 1)


def _fine_encoder_model(tokenizer):
    """A randomly initialised tiny NaViL with 8-px patches merged 4 × 4 (one LLM token still shows 32 × 32 px)."""
    from navil_utils.models.configuration_navil import NaViLChatConfig
    from navil_utils.models.modeling_navil import NaViLForConditionalGeneration
    from navil_utils.models.presets import tiny_model_config
    from navil_utils.processing.tokenizers import navil_token_ids

    config = tiny_model_config(len(tokenizer), navil_token_ids(tokenizer), patch_size=8, merge_size=4,
                               vit_layer_scale=0.5, **{k: v for k, v in MICRO_MODEL.items() if k.startswith("vit")})
    model = NaViLForConditionalGeneration(NaViLChatConfig(**config))
    assert bool((model.vision_model.encoder.layers[0].ls1 == 0.5).all())
    return model


@pytest.mark.parametrize("encoder", ["shipped", "patch8_merge4"])
def test_targets_follow_the_models_visual_token_order(tiny, encoder):
    """Every object's classes sit at the visual token TokenLayout places at the object's centre."""
    model, tokenizer = tiny
    if encoder == "patch8_merge4":
        model = _fine_encoder_model(tokenizer)
        assert (model.config.vision_config.patch_size, model.config.merge_size) == (8, 4)
    data = SyntheticVQA(5)
    classes = target_classes(data.config)
    collator = TinyCollator.from_model_config(model.config, tokenizer, token_target_classes=classes)
    merge, window = model.config.merge_size, model.config.vision_config.window_size
    checked = 0
    for index in range(12):
        sample = data.sample(index)
        encoded = collator.encode(sample)
        grid = encoded.image_grid_thw
        slots = window_order(encoded.token_targets, grid, merge_size=merge, window_size=window)
        layout = TokenLayout.build(torch.tensor(encoded.input_ids), grid, dict(model.special_token_ids),
                                   merge_size=merge, window_size=window)
        width, height = sample.size
        for scale, (_, h, w) in enumerate(grid.tolist()):
            on_scale = (layout.scale == scale) & (layout.visual_index >= 0)
            where = {(int(r), int(c)): int(v) for r, c, v in zip(layout.row[on_scale], layout.col[on_scale],
                                                                 layout.visual_index[on_scale], strict=True)}
            hits = {}
            for names, x, y in object_points(sample.objects):
                hits[token_at(x, y, width, height, h // merge, w // merge)] = names   # the later object wins
            for (row, col), names in hits.items():
                expected = [IGNORE_INDEX if names[t] is None else classes[t].index(names[t]) for t in TOKEN_TARGETS]
                assert slots[where[(row, col)]].tolist() == expected
                checked += 1
            labelled = int((slots[list(where.values())] != IGNORE_INDEX).any(-1).sum())
            assert labelled == len(hits)                                   # no other token has a target
    assert checked > 50


def test_batches_carry_the_targets_of_all_their_tokens(tiny):
    model, tokenizer = tiny
    data = SyntheticVQA(5)
    collator = TinyCollator(tokenizer, token_target_classes=target_classes(data.config))
    batch = collator([data.sample(i) for i in range(3)])
    tokens = int((batch.input_ids == model.special_token_ids["<IMG_CONTEXT>"]).sum())
    assert batch.extra["token_targets"].shape == (tokens, 3)
    assert "token_targets" not in TinyCollator(tokenizer)([data.sample(0)]).extra


def test_question_loss_averages_each_qa_first():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.full((2, 6), -100)
    answer_qa = torch.full((2, 6), -1)
    labels[0, 2:5], answer_qa[0, 2:5] = torch.tensor([1, 2, 3]), 0       # QA 0: three tokens
    labels[1, 3], answer_qa[1, 3] = 4, 1                                 # QA 1: one token
    total, count = question_loss(logits, labels, answer_qa)
    nll = torch.nn.functional.cross_entropy
    qa0 = nll(logits[0, 1:4], labels[0, 2:5])
    qa1 = nll(logits[1, 2:3], labels[1, 3:4])
    assert count == 2
    torch.testing.assert_close(total, qa0 + qa1)
    token_mean = nll(torch.cat([logits[0, 1:4], logits[1, 2:3]]), torch.cat([labels[0, 2:5], labels[1, 3:4]]))
    assert not torch.allclose(total / count, token_mean)                 # the two averages differ


def test_token_loss_weights_weight_each_target_and_zero_leaves_it_untrained():
    """Σ w·CE / Σ w over the targets in the batch; a target of weight 0 gets no gradient but keeps its accuracy;
    no weights = the plain mean."""
    from navil_utils.tiny.objectives import TokenHeads

    classes = {"kind": ("a", "b", "c"), "color": ("r", "g"), "glyph": ("x", "y", "z", "w")}
    torch.manual_seed(0)
    heads = TokenHeads(8, classes)
    tokens = torch.randn(6, 8)
    targets = torch.tensor([[0, 1, -100], [2, 0, 3], [1, 1, -100], [0, 0, 1], [-100, 1, -100], [2, 0, -100]])
    ce = {}
    for k, target in enumerate(TOKEN_TARGETS):
        keep = targets[:, k] >= 0
        ce[target] = torch.nn.functional.cross_entropy(heads.logits(tokens[keep], target), targets[keep, k])
    plain, accuracy = heads(tokens, targets)
    torch.testing.assert_close(plain, (ce["kind"] + ce["color"] + ce["glyph"]) / 3)
    weighted, _ = heads(tokens, targets, {"kind": 2.0, "color": 0.5})            # glyph: missing = 1
    torch.testing.assert_close(weighted, (2 * ce["kind"] + 0.5 * ce["color"] + ce["glyph"]) / 3.5)
    heads.zero_grad()
    kind_only, kind_accuracy = heads(tokens, targets, {"color": 0.0, "glyph": 0.0})
    torch.testing.assert_close(kind_only, ce["kind"])
    kind_only.backward()
    assert heads.heads["kind"].weight.grad.abs().sum() > 0
    assert heads.heads["color"].weight.grad is None and heads.heads["glyph"].weight.grad is None
    assert kind_accuracy == accuracy and set(accuracy) == set(TOKEN_TARGETS)  # still measured


def test_position_targets_are_the_grid_place_of_each_visual_token(tiny):
    """grid_positions in the window order is, for the k-th visual token, the (row, column) fraction TokenLayout
    gives that token — on multi-scale images of every aspect ratio."""
    model, tokenizer = tiny
    collator = TinyCollator.from_model_config(model.config, tokenizer)
    merge, window = model.config.merge_size, model.config.vision_config.window_size
    data, scales = SyntheticVQA(5), set()
    for index in range(20):
        encoded = collator.encode(data.sample(index))
        grid = encoded.image_grid_thw
        targets = window_order(grid_positions(grid, merge), grid, merge_size=merge, window_size=window)
        layout = TokenLayout.build(torch.tensor(encoded.input_ids), grid, dict(model.special_token_ids),
                                   merge_size=merge, window_size=window)
        visual = layout.visual_index >= 0
        rows = (grid[:, 1] // merge)[layout.scale[visual]].float()
        cols = (grid[:, 2] // merge)[layout.scale[visual]].float()
        expected = torch.stack([(layout.row[visual] + 0.5) / rows, (layout.col[visual] + 0.5) / cols], -1)
        torch.testing.assert_close(targets[layout.visual_index[visual]], expected)
        scales.add(grid.shape[0])
    assert max(scales) >= 2
    torch.testing.assert_close(grid_positions(torch.tensor([[1, 4, 6]]), 2),
                               torch.tensor([[.25, 1 / 6], [.25, .5], [.25, 5 / 6], [.75, 1 / 6], [.75, .5], [.75, 5 / 6]]))


@pytest.mark.parametrize("weights", [{"shape": 1.0}, {"kind": -1.0}, {"kind": float("inf")},
                                     {"kind": 0, "color": 0, "glyph": 0}, [1.0], {"kind": "1"}])
def test_bad_token_loss_weights_are_refused(tmp_path, weights):
    with pytest.raises(ConfigError, match="token_loss_weights"):
        micro_config(tmp_path, token_loss=0.5, token_loss_weights=weights).validate()


@pytest.mark.parametrize(("option", "value"), [("loss_averaging", "sample"), ("token_loss", -1.0),
                                               ("connector_init_scale", 0.0), ("position_loss", -0.5),
                                               ("position_loss_layer", -1), ("position_loss_layer", 1.5)])
def test_bad_training_levers_are_refused(tmp_path, option, value):
    with pytest.raises(ConfigError, match=option):
        micro_config(tmp_path, **{option: value}).validate()
    with pytest.raises(ConfigError, match="token_loss"):
        TrainConfig(architecture="nvlm_d", token_loss=0.5).validate()
    with pytest.raises(ConfigError, match="position_loss"):
        TrainConfig(architecture="nvlm_d", position_loss=0.5).validate()
    with pytest.raises(ConfigError, match="position_loss_layer=9"):      # the micro decoder has 1 layer
        train(micro_config(tmp_path / "deep", position_loss=0.5, position_loss_layer=9))


def test_training_with_the_levers_logs_token_accuracy_and_exports_a_plain_model(tmp_path):
    out = tmp_path / "run"
    train(micro_config(out, total_steps=4, token_loss=0.5, loss_averaging="question", connector_init_scale=0.25,
                       qa_packing="isolated", extra_qas=2, position_loss=1.0, position_loss_layer=0))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all({"token_loss", "token_acc", "objective", "position_loss", "position_error"} <= set(r) for r in records)
    assert set(records[-1]["token_acc"]) <= set(TOKEN_TARGETS) and records[-1]["token_acc"]
    assert set(records[-1]["position_error"]) == {"row", "col"}
    assert all(math.isfinite(e) and e > 0 for r in records for e in r["position_error"].values())
    exported = load_model(out / "final")                                 # strict: no scaffolding keys
    assert not hasattr(exported, "token_heads") and not hasattr(exported, "position_head")
    assert not any(k.startswith(("token_heads", "position_head")) for k in exported.state_dict())


def test_a_fine_patch_encoder_trains_and_its_collator_follows_the_checkpoint(tmp_path):
    """patch_size / merge_size given as model options reach the training batches, the exported config and the
    collator rebuilt from that config (evaluation and probes)."""
    from navil_utils.processing.tokenizers import navil_token_ids
    from navil_utils.tiny.train import StepBatches, _tokenizer_for

    out = tmp_path / "run"
    config = micro_config(out, total_steps=2, token_loss=0.5,
                          model={**MICRO_MODEL, "patch_size": 8, "merge_size": 4})
    tokenizer, _ = _tokenizer_for(config)
    batch = StepBatches(config, tokenizer)[0]
    assert batch.pixel_values.shape[1:] == (3, 8, 8)
    grid = batch.image_grid_thw
    visual = int((batch.input_ids == navil_token_ids(tokenizer)["<IMG_CONTEXT>"]).sum())
    assert visual == int((grid[:, 1] * grid[:, 2]).sum()) // 16 == batch.extra["token_targets"].shape[0]
    train(config)
    model = load_model(out / "final")
    assert (model.config.vision_config.patch_size, model.config.merge_size) == (8, 4)
    assert model.mlp1[1].in_features == 16 * MICRO_MODEL["vit_width"]
    collator = TinyCollator.from_model_config(model.config, tokenizer)
    assert (collator.preprocess_kwargs["patch_size"], collator.merge_size) == (8, 4)
    again = collator([SyntheticVQA(1).sample(0)])
    assert again.pixel_values.shape[1:] == (3, 8, 8)
    with torch.no_grad():
        assert torch.isfinite(model(**again.model_inputs()).logits).all()


def test_token_loss_runs_resume_bit_for_bit(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    options = dict(token_loss=0.5, loss_averaging="question", position_loss=0.5, position_loss_layer=0)
    train(micro_config(straight, **options))
    train(micro_config(resumed, **options), _simulate_kill_after=3)
    train(micro_config(resumed, **options))
    a = load_model(straight / "final").state_dict()
    b = load_model(resumed / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_connector_init_scale_scales_the_last_connector_layer(tmp_path):
    from navil_utils.tiny.train import _tokenizer_for, build_model

    plain_config = micro_config(tmp_path)
    tokenizer, _ = _tokenizer_for(plain_config)
    plain = build_model(plain_config, tokenizer)
    scaled = build_model(micro_config(tmp_path, connector_init_scale=0.25), tokenizer)
    torch.testing.assert_close(scaled.mlp1[-1].weight, 0.25 * plain.mlp1[-1].weight)
    torch.testing.assert_close(scaled.mlp1[1].weight, plain.mlp1[1].weight)


def test_probes_separate_what_is_separable():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=generator)
    informative = torch.nn.functional.one_hot(labels, 4).float() + 0.1 * torch.randn(400, 4, generator=generator)
    noise = torch.randn(400, 8, generator=generator)
    assert fit_probe(informative[:300], labels[:300], informative[300:], labels[300:], 4) == 1.0
    assert fit_probe(noise[:300], labels[:300], noise[300:], labels[300:], 4) < 0.45


def test_visual_token_geometry_measures_scale_apart_from_direction(tiny):
    import copy

    model, tokenizer = tiny
    geometry = visual_token_geometry(model, tokenizer, SyntheticVQA(11), range(6))
    assert geometry["norm_ratio"] == pytest.approx(geometry["visual_norm"] / geometry["text_norm"])
    assert geometry["visual_norm"] > 3 * geometry["text_norm"]      # the shipped connector is not normalised
    assert -1 <= geometry["mean_cosine"] < 0.5
    assert 2 < geometry["effective_rank"] <= model.config.llm_config.hidden_size
    louder = copy.deepcopy(model)
    with torch.no_grad():                      # the connector's last layer ×3: every visual token ×3
        louder.mlp1[-1].weight.mul_(3)
        louder.mlp1[-1].bias.mul_(3)
    scaled = visual_token_geometry(louder, tokenizer, SyntheticVQA(11), range(6))
    assert scaled["visual_norm"] == pytest.approx(3 * geometry["visual_norm"], rel=1e-5)
    assert scaled["text_norm"] == pytest.approx(geometry["text_norm"])
    for key in ("mean_cosine", "effective_rank"):
        assert scaled[key] == pytest.approx(geometry[key], rel=1e-4, abs=1e-6)
    collapsed = copy.deepcopy(model)           # every visual token the same direction: rank 1, cosine 1
    with torch.no_grad():
        collapsed.mlp1[-1].weight.zero_()
        collapsed.mlp1[-1].bias.copy_(torch.linspace(-1, 1, collapsed.mlp1[-1].bias.numel()))
    flat = visual_token_geometry(collapsed, tokenizer, SyntheticVQA(11), range(3))
    assert flat["mean_cosine"] == pytest.approx(1.0, abs=1e-6) and flat["effective_rank"] == 0.0
    with pytest.raises(ConfigError, match="at least one image"):
        visual_token_geometry(model, tokenizer, SyntheticVQA(11), [])


def test_probe_records_of_the_embedded_model(tiny):
    model, tokenizer = tiny
    records = probe_records(model, tokenizer, SyntheticVQA(11), range(30))
    n = records.image.numel()
    assert {site: tuple(f.shape) for site, f in records.features.items()} == {
        "pixels": (n, 3 * 32 * 32), "vit": (n, 4 * model.config.vision_config.hidden_size),
        "llm_input": (n, model.config.llm_config.hidden_size), "random_vit": (n, 4 * model.config.vision_config.hidden_size)}
    shapes = records.labels["kind"] >= 0
    assert bool((records.labels["color"][shapes] >= 0).all()) and bool((records.labels["glyph"][shapes] < 0).all())
    table = probe_table(records, sites=("llm_input",), hidden=(0,), epochs=50)
    assert set(table["target"]) == {"kind", "color", "glyph"}
    colour = table[table.target == "color"].accuracy.item()
    assert colour > 0.6                          # colour is readable from the visual tokens (chance ~0.17)


def test_the_last_checkpoint_of_a_run_exports_as_a_plain_model(tmp_path, capsys):
    from safetensors.torch import load_file

    from navil_utils.tiny.train import main

    run = tmp_path / "run"
    train(micro_config(run, token_loss=0.5), _simulate_kill_after=3)      # checkpoint at step 2, no final model
    assert main(["--out", str(run), "--export-checkpoint", str(tmp_path / "exported")]) == 0
    assert "exported step 2" in capsys.readouterr().out
    exported = load_model(tmp_path / "exported")                          # strict: no token_heads keys
    saved = load_file(run / "checkpoint" / "model.safetensors")
    assert any(k.startswith("token_heads.") for k in saved)
    state = exported.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in state)
    assert json.loads((tmp_path / "exported" / "trainer_step.json").read_text())["step"] == 2
    assert main(["--out", str(tmp_path / "nothing"), "--export-checkpoint", str(tmp_path / "x")]) == 1
    assert "holds no checkpoint" in capsys.readouterr().err


def test_encoder_capacity_learns_colour_and_is_deterministic(tmp_path, capsys):
    """The encoder-only token-head run: colour (a per-pixel property) is learned far above chance within a few
    dozen steps, the run is a pure function of its arguments, and the CLI appends one JSON line per evaluation."""
    from navil_utils.tiny.encoder_capacity import encoder_capacity, main

    options = {k: v for k, v in MICRO_MODEL.items() if k.startswith("vit")}
    kwargs = dict(steps=100, batch_size=8, lr=3e-3, warmup_steps=5, eval_images=32, eval_every=50,
                  data={"image_size_range": [128, 128], "aspect_ratios": [1.0]})    # two scales: 96² and 128²
    first = encoder_capacity(options, **kwargs)
    assert [r["step"] for r in first] == [50, 100]
    chance = 1 / len(target_classes(SyntheticVQA(0).config)["color"])       # 6 colours
    assert first[-1]["acc_color"] > 4 * chance, first                         # measured 0.96
    assert first[-1]["eval_tokens"]["color"] > 50
    counts = first[-1]["eval_tokens"]
    assert 0 < counts["color_full"] < counts["color"]                                    # + smaller scales
    assert sum(counts[f"kind_full_{b}"] for b in ("small", "medium", "large")) == counts["kind_full"]
    again = encoder_capacity(options, **kwargs)
    assert [r["acc_color"] for r in again] == [r["acc_color"] for r in first]
    kind_only = encoder_capacity(options, **kwargs, train_targets=("kind",))    # the colour head is never trained
    assert kind_only[-1]["acc_color"] < 2 * chance < first[-1]["acc_color"], kind_only
    weighted = encoder_capacity(options, **kwargs, target_weights={"color": 0.0, "glyph": 0.0})
    assert [r["acc_kind"] for r in weighted] == [r["acc_kind"] for r in kind_only]   # the same run, another way
    with pytest.raises(ConfigError, match="train_targets"):
        encoder_capacity(options, **kwargs, train_targets=("shape",))
    with pytest.raises(ConfigError, match="token_loss_weights"):
        encoder_capacity(options, **kwargs, target_weights={"shape": 1.0})
    out = tmp_path / "capacity.jsonl"
    small = {"image_size_range": [64, 64], "aspect_ratios": [1.0]}
    assert main(["--model", json.dumps(options), "--steps", "2", "--eval-every", "1", "--batch-size", "2",
                 "--eval-images", "4", "--data", json.dumps(small), "--target-weights", '{"glyph": 0}',
                 "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2] and lines[0]["model"] == options
    assert lines[0]["data"] == small and lines[0]["target_weights"] == {"glyph": 0}
    assert main(["--model", "{not json", "--out", str(out)]) == 1
    assert main(["--model", json.dumps({"patch_size": 7}), "--out", str(out)]) == 1
    assert "pixel budget" in capsys.readouterr().err


def test_encoder_pretraining_exports_a_model_a_training_run_starts_from(tmp_path):
    """``save=``: the encoder trained by the token heads is exported with the language model as initialised and
    no heads — a strict-loading checkpoint that ``init_from`` starts a full training run from."""
    from safetensors.torch import load_file

    from navil_utils.tiny.encoder_capacity import encoder_capacity

    data = {"image_size_range": [64, 64], "aspect_ratios": [1.0]}
    pretrained = tmp_path / "pretrained"
    records = encoder_capacity(MICRO_MODEL, steps=3, batch_size=2, warmup_steps=1, eval_images=2, eval_every=3,
                               data=data, target_weights={"color": 0.1, "glyph": 0.0}, save=pretrained)
    model = load_model(pretrained)                                        # strict: no token_heads keys
    assert not any(k.startswith("token_heads") for k in model.state_dict())
    settings = json.loads((pretrained / "encoder_pretraining.json").read_text())
    assert settings["steps"] == 3 and settings["last_eval"] == records[-1]
    fresh = encoder_capacity(MICRO_MODEL, steps=1, batch_size=2, warmup_steps=1, eval_images=2, eval_every=1,
                             data=data, save=tmp_path / "fresh")
    assert fresh and load_file(str(tmp_path / "fresh" / "model.safetensors")).keys() == model.state_dict().keys()
    saved = load_file(str(pretrained / "model.safetensors"))
    other = load_file(str(tmp_path / "fresh" / "model.safetensors"))
    changed = {k for k in saved if not torch.equal(saved[k], other[k])}
    assert changed and all(k.startswith(("vision_model.", "mlp1.")) for k in changed)   # only the encoder trained
    run = tmp_path / "run"
    train(micro_config(run, total_steps=1, data=data, init_from=str(pretrained), token_loss=0.5))
    assert (run / "final" / "model.safetensors").exists()


def test_spread_targets_label_every_token_inside_a_shape_and_keep_the_centre_ones():
    from navil_utils.tiny.token_targets import token_targets

    classes = target_classes(SyntheticVQA(0).config)
    square = SceneObject("square", "red", (8, 8, 100, 60), "center", 92)       # covers token centres 16..80 x 16..48
    word = SceneObject("text", "black", (70, 100, 120, 124), "center", 24, "AX")
    sample = type("Sample", (), {"size": (128, 128), "objects": (square, word)})()
    grid = torch.tensor([[1, 8, 8]])                                                # 4 x 4 tokens of 32 px
    plain = token_targets(sample, grid, classes, merge_size=2).view(4, 4, 3)
    spread = token_targets(sample, grid, classes, merge_size=2, spread=True).view(4, 4, 3)
    kind, color = classes["kind"].index("square"), classes["color"].index("red")
    assert (plain[..., 0] == kind).sum() == 1 and plain[1, 1, 0] == kind           # the centre (54, 34)
    assert {(r, c) for r in range(4) for c in range(4) if spread[r, c, 0] == kind} == {
        (r, c) for r in (0, 1) for c in (0, 1, 2)}
    assert bool((spread[0:2, 0:3, 1] == color).all()) and bool((spread[..., 2][spread[..., 0] >= 0] == -100).all())
    glyphs = plain[..., 2] >= 0
    assert torch.equal(spread[glyphs], plain[glyphs])                                # characters as before
    assert torch.equal(spread[plain[..., 0] >= 0], plain[plain[..., 0] >= 0])
    from navil_utils.tiny.token_targets import shape_tokens

    assert shape_tokens(sample, 4, 4) == [(square, 1, 1)]                           # shapes only, at their centre
    assert shape_tokens(sample, 2, 4) == [(square, 0, 1)]


def test_crop_cnn_reference_is_deterministic_and_reports_by_size():
    from navil_utils.tiny.encoder_capacity import SIZE_BUCKETS, crop_cnn_reference

    kwargs = dict(train_images=60, eval_images=30, epochs=2, batch_size=32)
    first = crop_cnn_reference(**kwargs)
    assert [r["epoch"] for r in first] == [1, 2]
    assert first[0]["shapes_seen"] * 2 == first[1]["shapes_seen"] and first[0]["test_shapes"] > 40
    assert all(0 <= r["acc_kind"] <= 1 for r in first)
    assert {f"acc_kind_{b}" for b in SIZE_BUCKETS} <= set(first[0])
    assert crop_cnn_reference(**kwargs) == first


ENCODER_CAPACITY = repo_root() / "data/encoder_capacity"


def _probe_accuracies(name: str) -> dict[tuple[str, str, str], float]:
    """``(target, features, probe) → accuracy`` of a probe table in data/encoder_capacity."""
    with (ENCODER_CAPACITY / name).open() as handle:
        return {(r["target"], r["features"], r["probe"]): float(r["accuracy"]) for r in csv.DictReader(handle)}


def _end_to_end_runs() -> dict[str, dict[int, dict]]:
    """``config → step → evaluation`` of the end-to-end runs (data/encoder_capacity/end_to_end.jsonl)."""
    runs: dict[str, dict[int, dict]] = {}
    for r in map(json.loads, (ENCODER_CAPACITY / "end_to_end.jsonl").read_text().splitlines()):
        runs.setdefault(r["config"], {})[r["step"]] = r
    return runs


def test_the_encoder_capacity_study_says_what_its_data_holds():
    """data/encoder_capacity/README.md quotes these records; the shapes learn colour, not glyphs."""
    folder = repo_root() / "data/encoder_capacity"
    pilot = [json.loads(line) for line in (folder / "pilot.jsonl").read_text().splitlines()]
    last = {}
    for record in pilot:
        last[json.dumps(record["model"], sort_keys=True), record["lr"], record.get("spread_targets", False),
             json.dumps(record.get("train_data", {}))] = record

    def kind_full(model, lr=0.001, spread=False, train_data="{}"):
        return round(last[json.dumps(model, sort_keys=True), lr, spread, train_data]["acc_kind_full"], 3)

    assert kind_full({}) == 0.371 and kind_full({"patch_size": 8}) == 0.435
    assert kind_full({"vit_stem_channels": [32, 64, 128]}) == 0.41 and kind_full({}, spread=True) == 0.379
    assert max(r["acc_kind_full"] for r in last.values() if "acc_kind_full" in r) == pytest.approx(0.435, abs=5e-4)
    assert all(r["acc_glyph"] < 0.1 for r in last.values())
    assert all(r["acc_color_full"] > 0.96 for r in last.values() if "acc_color_full" in r)
    long = [json.loads(line) for line in (folder / "long.jsonl").read_text().splitlines()]
    assert (long[-1]["step"], round(long[-1]["acc_kind_full"], 3)) == (2000, 0.463)
    cnn = [json.loads(line) for line in (folder / "crop_cnn.jsonl").read_text().splitlines()]
    assert [(r["shapes_seen"], round(r["acc_kind"], 3)) for r in cnn if r["epoch"] in (1, 2, 6)] == [
        (13668, 0.656), (27336, 0.918), (82008, 0.97)]
    objective = {(tuple(r["train_targets"]), r["step"]): round(r["acc_kind_full"], 3)
                 for r in map(json.loads, (folder / "objective.jsonl").read_text().splitlines())}
    assert [objective[("kind",), step] for step in (200, 300, 400)] == [0.381, 0.54, 0.597]
    assert objective[("kind", "color"), 400] == 0.389 and objective[("kind", "glyph"), 400] == 0.409
    kind_long = [json.loads(line) for line in (folder / "objective_long.jsonl").read_text().splitlines()]
    assert [(r["step"], round(r["acc_kind_full"], 3)) for r in kind_long] == [
        (250, 0.498), (500, 0.765), (750, 0.882), (1000, 0.907)]
    weighted = {tuple(r["target_weights"][t] for t in TOKEN_TARGETS): (round(r["acc_kind_full"], 3),
                                                                     round(r["acc_color_full"], 3))
                for r in map(json.loads, (folder / "weights.jsonl").read_text().splitlines()) if r["step"] == 400}
    assert weighted == {(1, 0.1, 0.1): (0.494, 0.97), (1, 0.1, 0): (0.541, 0.971), (1, 0.02, 0.02): (0.581, 0.836)}
    pretraining = [json.loads(line) for line in (folder / "pretraining.jsonl").read_text().splitlines()]
    assert [(r["step"], round(r["acc_kind_full"], 3)) for r in pretraining] == [
        (250, 0.428), (500, 0.645), (750, 0.799), (1000, 0.84)]
    assert round(pretraining[-1]["acc_color_full"], 3) == 0.967
    probes = {key: round(value, 2) for key, value in _probe_accuracies("probes_pretrained.csv").items()}
    assert [probes["kind", "llm_input", p] for p in ("linear", "mlp256")] == [0.79, 0.8]
    assert [probes["kind", "vit", p] for p in ("linear", "mlp256")] == [0.51, 0.77]
    assert [probes["color", "llm_input", p] for p in ("linear", "mlp256")] == [0.95, 0.96]
    assert [probes["glyph", "llm_input", p] for p in ("linear", "mlp256")] == [0.05, 0.08]
    glyphs = {}
    for r in map(json.loads, (folder / "glyphs.jsonl").read_text().splitlines()):
        key = (json.dumps(r.get("data", {}), sort_keys=True), json.dumps(r["train_data"], sort_keys=True),
               r["model"].get("patch_size", 16))
        glyphs.setdefault(key, []).append((r["step"], round(r["acc_glyph_full"], 3), r["eval_tokens"]["glyph_full"]))
    large = json.dumps({"text_length_range": [1, 1], "text_sizes": [26, 34]}, sort_keys=True)
    dense = json.dumps({"distractor_text_prob": 1.0, "max_distractor_texts": 3}, sort_keys=True)
    assert glyphs[large, "{}", 16][-1] == (400, 0.13, 100)
    assert [acc for _, acc, _ in glyphs[large, dense, 16]] == [0.12, 0.37, 0.58, 0.65]
    assert glyphs["{}", dense, 16][-1] == (400, 0.087, 150)
    assert [acc for _, acc, _ in glyphs["{}", dense, 8]] == [0.107, 0.272, 0.362, 0.388]
    merge4 = [json.loads(line) for line in (folder / "glyphs_merge4.jsonl").read_text().splitlines()]
    assert {json.dumps(r["model"], sort_keys=True) for r in merge4} == {'{"merge_size": 4, "patch_size": 8}'}
    assert all(json.dumps(r["train_data"], sort_keys=True) == dense and r["train_targets"] == ["glyph"] for r in merge4)
    assert [(r["step"], round(r["acc_glyph_full"], 3)) for r in merge4] == [(100, 0.08), (200, 0.073), (300, 0.133),
                                                                            (400, 0.093)]
    assert merge4[-1]["eval_tokens"]["glyph_full"] == 150
    readme = (folder / "README.md").read_text()
    for quoted in ("0.371", "0.435", "0.463", "0.656", "0.918", "**0.970**", "13,668", "82,008", "**0.597**", "0.389",
                   "**0.907**", "0.409", "**0.79 / 0.80**", "**0.65**", "**0.388**", "**0.093**", "| 0.494 | 0.970 |", "| 0.541 | 0.971 |", "| 0.581 | 0.836 |", "**0.840**",
                   "0.967"):
        assert quoted in readme, quoted


def test_gen2b_recipe_is_gen2_started_from_the_pretrained_encoder_with_kind_weighted_token_loss():
    configs = repo_root() / "configs"
    gen2 = json.loads((configs / "tiny_gen2_stage1.json").read_text())
    gen2b = json.loads((configs / "tiny_gen2b_stage1.json").read_text())
    assert gen2b.pop("init_from") == "runs/navil-tiny-gen2b/stage0"       # encoder_capacity --save (its README)
    assert gen2b.pop("token_loss_weights") == {"kind": 1.0, "color": 0.1, "glyph": 0.0}
    assert gen2.pop("connector_init_scale") == 0.125                       # the connector comes pretrained
    assert gen2b == gen2
    gen1_log = repo_root() / "data/models/navil-tiny/gen1/training_log_stage1.jsonl"
    shipped = {r["step"]: r for r in map(json.loads, gen1_log.read_text().splitlines()) if "eval_overall" in r}
    runs = _end_to_end_runs()
    readme = (configs / "README.md").read_text()
    for name, log in (("tiny_stage1", shipped), ("tiny_gen2_stage1", runs["configs/tiny_gen2_stage1.json"]),
                      ("tiny_gen2b_stage1", runs["configs/tiny_gen2b_stage1.json"])):
        quoted = " / ".join(f"{log[step]['eval_overall']:.3f}" for step in (200, 400, 600, 800, 1000))
        assert quoted in readme, (name, quoted)                        # the gen-2b row quotes all three runs
    gen2b_runs = runs["configs/tiny_gen2b_stage1.json"]
    assert all(gen2b_runs[step]["eval_overall"] > shipped[step]["eval_overall"] + 0.06 for step in range(200, 1001, 200))
    assert [round(gen2b_runs[s]["eval_per_type"]["color"], 2) for s in range(200, 1001, 200)] == [
        0.9, 0.93, 0.95, 0.98, 0.97]
    for name in ("tiny_stage1", "tiny_stage2", "tiny_gen2_stage1", "tiny_gen2_stage2", "tiny_gen2b_stage1",
                 "tiny_gen2b_stage2"):
        TrainConfig.from_dict({**json.loads((configs / f"{name}.json").read_text()), "out": "unused"}).validate()


def test_gen2b_end_to_end_numbers_quoted_in_the_readmes_are_the_data():
    greedy = {(r["seed"], r["scales"]): r for r in map(json.loads, (ENCODER_CAPACITY / "gen2b_greedy.jsonl")
                                                         .read_text().splitlines())}
    full = greedy[(1234, "all")]
    assert full["n"] == 1000 and full["overall"] == 0.651 and greedy[(2026, "all")]["overall"] == 0.615
    readme = (ENCODER_CAPACITY / "README.md").read_text()
    lines = readme.splitlines()
    table = lines[next(i for i, l in enumerate(lines) if l.startswith("| question type | first generation")):]
    names = {"color": "colour", "count": "count", "position": "position", "relation": "relation", "text": "text"}
    for qtype, name in names.items():      # table row: gen 1 | gen 2b all | largest | smallest
        line = next(l for l in table if l.startswith(f"| {name} | "))
        quoted = [float(c.strip(" *")) for c in line.split("|")[3:6]]
        measured = [greedy[(1234, s)]["per_type"][qtype] for s in ("all", "largest", "smallest")]
        assert quoted == pytest.approx(measured, abs=6e-4), (qtype, quoted, measured)   # the JSON keeps 4 decimals
    # the multi-scale gain quoted: +8.6 overall, +31 count, +14 position over the largest scale alone
    largest = greedy[(1234, "largest")]
    assert round(100 * (full["overall"] - largest["overall"]), 1) == 8.6
    assert [round(100 * (full["per_type"][q] - largest["per_type"][q])) for q in ("count", "position")] == [31, 14]
    runs = _end_to_end_runs()
    stage1, stage2 = runs["configs/tiny_gen2b_stage1.json"], runs["configs/tiny_gen2b_stage2.json"]
    assert f"{stage1[2400]['eval_overall']:.3f}" == "0.734" and f"{stage2[800]['eval_overall']:.3f}" == "0.760"
    # relation questions enter the curriculum at step 400 of stage 1
    relation = [r["eval_per_type"]["relation"] for step, r in stage1.items() if step >= 400]
    relation += [r["eval_per_type"]["relation"] for r in stage2.values()]
    assert 0.475 <= min(relation) and max(relation) < 0.53                 # "0.48-0.53 at every evaluation"
    probes = _probe_accuracies("probes_gen2b.csv")
    assert [round(probes[("kind", "llm_input", p)], 2) for p in ("linear", "mlp256")] == [0.96, 0.96]
    assert [round(probes[("kind", "vit", p)], 2) for p in ("linear", "mlp256")] == [0.79, 0.92]
    assert max(probes[("glyph", f, p)] for f in ("vit", "llm_input") for p in ("linear", "mlp256")) < 0.08
    assert "**0.760**" in (repo_root() / "configs/README.md").read_text() and "**0.96 / 0.96**" in readme
