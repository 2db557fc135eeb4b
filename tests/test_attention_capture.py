"""Attention maps (navil_utils.analysis.attention): the recorder against eager attentions, and the token
layout against the model's own visual-token order (window permutation, pixel shuffle, multi-scale)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from navil_utils.analysis.attention import AttentionRecorder, TokenLayout
from navil_utils.errors import ConfigError, ModelInputError, NaViLError
from navil_utils.models.configuration_navil import NaViLVisionConfig
from navil_utils.models.vision import NaViLVisionModel, window_layout
from navil_utils.processing.image_tokens import image_span_ids
from navil_utils.processing.multiscale import patchify, preprocess_multiscale
from navil_utils.reference.golden import load_golden_case

F32 = torch.float32
TOL = 1e-5
IM_END = 4   # toy tokenizer id of <|im_end|>
NEW = 8


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _left_padded_batch(case) -> dict[str, torch.Tensor]:
    """The text-only prompt left-padded next to the (longer) image prompt (as in test_attention_interface)."""
    image_prompt, text_prompt = case.inputs["input_ids"][0], case.inputs["text_only_input_ids"][0]
    width = len(image_prompt)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    ids[0, width - len(text_prompt):], mask[0, width - len(text_prompt):] = text_prompt, 1
    ids[1], mask[1] = image_prompt, 1
    px = case.pixel_inputs
    return dict(input_ids=ids, attention_mask=mask, pixel_values=px["pixel_values"],
                image_grid_thw=px["image_grid_thw"])


def _implementations(model) -> tuple:
    return (model.config._attn_implementation, model.language_model.config._attn_implementation,
            model.vision_model.config._attn_implementation)


# ---------------------------------------------------------------------------------------------------
# exactness against eager attentions


def test_llm_capture_equals_eager_attentions(case):
    """Every layer and head of the image prompt: one prefill record per layer, equal to eager's
    output_attentions (the sdpa run's recomputed rows vs the eager run's maps)."""
    model, seq = case.model, case.inputs["input_ids"].shape[1]
    heads = model.config.llm_config.num_attention_heads
    with torch.inference_mode():
        eager = model(**case.image_inputs, output_attentions=True).attentions
        with AttentionRecorder(model, llm_layers="all", dtype=F32) as rec:
            model(**case.image_inputs)
    assert sorted(rec.llm) == list(range(len(eager)))
    for layer, reference in enumerate(eager):
        (call,) = rec.llm[layer]
        assert (call.call, call.past) == (0, 0)
        assert torch.equal(call.query_rows, torch.arange(seq))
        assert call.probs.shape == (1, heads, seq, seq) and call.probs.dtype == F32 and call.probs.device.type == "cpu"
        assert _max_diff(rec.llm_map(layer), reference[0]) <= TOL


def test_llm_capture_equals_eager_with_left_padding(case):
    """A left-padded batch: capture == eager for both rows (padding rows included), and the padded text
    prompt's real block equals the capture of the prompt alone (no probability on padding keys)."""
    model, batch = case.model, _left_padded_batch(case)
    text_prompt = case.inputs["text_only_input_ids"]
    pad = batch["input_ids"].shape[1] - text_prompt.shape[1]
    with torch.inference_mode():
        eager = model(**batch, output_attentions=True).attentions
        with AttentionRecorder(model, dtype=F32) as rec:
            model(**batch)
        with AttentionRecorder(model, dtype=F32) as alone:
            model(input_ids=text_prompt)
    for layer, reference in enumerate(eager):
        captured = rec.llm[layer][0].probs
        assert captured.shape == reference.shape
        assert _max_diff(captured, reference) <= TOL
        real_rows = captured[0, :, pad:]
        assert real_rows[..., :pad].abs().max().item() == 0.0
        assert _max_diff(real_rows[..., pad:], alone.llm_map(layer)) <= TOL


def test_vit_capture_equals_eager_segments(case):
    """ViT maps are kept per attention segment (per scale in global layers, per window in window layers)
    and equal the ViT's own eager ``output_attentions`` maps; the LLM is not switched when not selected."""
    model, px = case.model, case.pixel_inputs
    config = model.config.vision_config
    layout = window_layout(px["image_grid_thw"], config.merge_size, config.window_size)
    with torch.inference_mode():
        eager = model.vision_model(px["pixel_values"], px["image_grid_thw"], output_attentions=True).attentions
        with AttentionRecorder(model, llm_layers=None, vit_layers="all", dtype=F32) as rec:
            assert model.language_model.config._attn_implementation == "sdpa"
            model(**case.image_inputs)
    assert rec.llm == {}
    full = config.fullatt_block_indexes
    for layer, maps in enumerate(eager):
        segments = rec.vit_segments(layer)
        bounds = layout.cu_seqlens if full is None or layer in full else layout.cu_window_seqlens
        expected = sorted(set(zip(bounds[:-1], bounds[1:])) - {(b, b) for b in bounds})
        assert [(s.start, s.end) for s in segments] == expected
        assert len(segments) == len(maps)
        for segment, reference in zip(segments, maps):
            heads, length = config.num_attention_heads, segment.length
            assert segment.probs.shape == reference.shape == (heads, length, length)
            assert _max_diff(segment.probs, reference) <= TOL


# ---------------------------------------------------------------------------------------------------
# the model is unchanged


def test_capture_does_not_change_logits(case):
    model = case.model
    with torch.inference_mode():
        plain = model(**case.image_inputs).logits
        with AttentionRecorder(model, llm_layers="all", vit_layers="all") as rec:
            captured = model(**case.image_inputs).logits
    assert rec.llm[0][0].probs.dtype == torch.float16
    torch.testing.assert_close(captured, plain, atol=1e-6, rtol=0)


def test_generate_is_unchanged_and_each_step_appends_its_row(case):
    """Greedy ids are identical with the recorder; the prefill records its last row, every decoding step
    appends one row over the grown keys, and those rows equal a no-cache generation's recomputed rows."""
    model, seq = case.model, case.inputs["input_ids"].shape[1]
    kwargs = dict(max_new_tokens=NEW, do_sample=False, eos_token_id=IM_END)
    plain = model.generate(**case.image_inputs, **kwargs)
    with AttentionRecorder(model, queries="last", dtype=F32) as rec:
        recorded = model.generate(**case.image_inputs, **kwargs)
    assert torch.equal(recorded, plain)
    assert recorded[0, seq:].tolist() == case.meta["generated_ids"]
    with AttentionRecorder(model, queries="last", dtype=F32) as recompute:
        no_cache = model.generate(**case.image_inputs, use_cache=False, **kwargs)
    assert torch.equal(no_cache, plain)
    for layer, calls in rec.llm.items():
        assert [(c.call, c.past, c.query_rows.tolist(), c.probs.shape[-1]) for c in calls] == (
            [(0, 0, [seq - 1], seq)] + [(i, seq + i - 1, [0], seq + i) for i in range(1, NEW)])
        rows, positions = rec.llm_rows(layer)
        assert rows.shape == (model.config.llm_config.num_attention_heads, NEW, seq + NEW - 1)
        assert positions.tolist() == list(range(seq - 1, seq + NEW - 1))
        torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:-1]))
        assert rows.triu(diagonal=seq).abs().max().item() == 0.0      # zero beyond each row's own keys
        assert [c.past for c in recompute.llm[layer]] == [0] * NEW
        reference = torch.stack([nn_pad(c.probs[0, :, 0], seq + NEW - 1) for c in recompute.llm[layer]], dim=1)
        assert _max_diff(rows, reference) <= TOL


def nn_pad(row: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(row, (0, width - row.shape[-1]))


def test_implementation_is_restored_after_exit_and_after_an_exception(case):
    model = case.model
    before = _implementations(model)
    with torch.inference_mode():
        with AttentionRecorder(model, llm_layers=[0], vit_layers=[0]) as rec:
            name = rec.name
            assert _implementations(model) == (before[0], name, name)
            assert name in ALL_ATTENTION_FUNCTIONS and name in ALL_MASK_ATTENTION_FUNCTIONS
            model(**case.image_inputs)
        assert _implementations(model) == before
        assert name not in ALL_ATTENTION_FUNCTIONS and name not in ALL_MASK_ATTENTION_FUNCTIONS
        assert not model.language_model._forward_pre_hooks and not model.vision_model._forward_pre_hooks

        with pytest.raises(RuntimeError, match="inside the block"):
            with AttentionRecorder(model, llm_layers="all", vit_layers="all"):
                model(**case.image_inputs)
                raise RuntimeError("inside the block")
        assert _implementations(model) == before
        # an error raised by the recorder itself, inside the forward (a query row the call does not have)
        with pytest.raises(ConfigError, match="outside the 166|outside the 148"):
            with AttentionRecorder(model, queries=[500]):
                model(**case.image_inputs)
        assert _implementations(model) == before
        assert not model.language_model._forward_pre_hooks
        # the recorder can be entered again; a fresh recording each time
        recorder = AttentionRecorder(model, llm_layers=[-1], queries="last")
        for _ in range(2):
            with recorder:
                model(**case.image_inputs)
            assert len(recorder.llm[2]) == 1
        assert _implementations(model) == before


def test_an_eager_model_is_recorded_and_restored_to_eager(case):
    model = case.model
    before = _implementations(model)
    try:
        model.set_attn_implementation("eager")
        with torch.inference_mode():
            eager = model(**case.image_inputs, output_attentions=True)
            with AttentionRecorder(model, dtype=F32) as rec:
                logits = model(**case.image_inputs).logits
        assert model.language_model.config._attn_implementation == "eager"
        torch.testing.assert_close(logits, eager.logits, atol=1e-6, rtol=0)
        for layer, reference in enumerate(eager.attentions):
            assert _max_diff(rec.llm_map(layer), reference[0]) <= 1e-6
    finally:
        model.set_attn_implementation(before[0])
    assert _implementations(model) == before


# ---------------------------------------------------------------------------------------------------
# heads and query rows


def test_head_reduction_equals_reducing_the_full_capture(case):
    model = case.model
    captures = {}
    with torch.inference_mode():
        for heads in ("all", "mean", "max", [3, 1]):
            with AttentionRecorder(model, vit_layers="all", heads=heads, dtype=F32) as rec:
                model(**case.image_inputs)
            captures[str(heads)] = rec
    full = captures["all"]
    for layer in full.llm:
        probs = full.llm_map(layer)
        assert _max_diff(captures["mean"].llm_map(layer), probs.mean(0, keepdim=True)) <= 1e-6
        assert _max_diff(captures["max"].llm_map(layer), probs.amax(0, keepdim=True)) <= 1e-6
        assert _max_diff(captures["[3, 1]"].llm_map(layer), probs[[3, 1]]) <= 1e-6
    for layer in full.vit:
        for segment, mean, peak in zip(full.vit_segments(layer), captures["mean"].vit_segments(layer),
                                       captures["max"].vit_segments(layer)):
            assert mean.probs.shape[0] == peak.probs.shape[0] == 1
            assert _max_diff(mean.probs, segment.probs.mean(0, keepdim=True)) <= 1e-6
            assert _max_diff(peak.probs, segment.probs.amax(0, keepdim=True)) <= 1e-6
        # a list of heads is an LLM head list; the ViT keeps all its heads then
        vit_heads = model.config.vision_config.num_attention_heads
        assert captures["[3, 1]"].vit_segments(layer)[0].probs.shape[0] == vit_heads


def test_query_selection_equals_rows_of_the_full_capture(case):
    model, seq = case.model, case.inputs["input_ids"].shape[1]
    selections = [  # (spec, the rows it selects)
        ("last", [seq - 1]),
        (slice(3, 60, 7), list(range(seq))[3:60:7]),
        (torch.tensor([0, 17, -1, 5]), [0, 17, seq - 1, 5]),
        (torch.arange(seq) % 11 == 0, [p for p in range(seq) if p % 11 == 0]),
        (lambda n: slice(n - 4, None), list(range(seq - 4, seq))),
        (7, [7]),
    ]
    vit_positions = torch.tensor([0, 5, 30, 57, 115, 60])
    with torch.inference_mode():
        with AttentionRecorder(model, vit_layers="all", dtype=F32) as full:
            model(**case.image_inputs)
        for spec, rows in selections:
            with AttentionRecorder(model, queries=spec, vit_layers="all", vit_queries=vit_positions,
                                   dtype=F32, max_chunk_elements=1000) as rec:
                model(**case.image_inputs)
            for layer in full.llm:
                (call,) = rec.llm[layer]
                assert call.query_rows.tolist() == rows, spec
                assert _max_diff(call.probs[0], full.llm_map(layer)[:, rows]) <= 1e-6
            for layer in full.vit:
                picked = [s for s in rec.vit_segments(layer)]
                assert sorted(int(p) for s in picked for p in s.query_positions) == sorted(vit_positions.tolist())
                by_start = {s.start: s for s in full.vit_segments(layer)}
                for segment in picked:
                    reference = by_start[segment.start].probs[:, segment.query_rows]
                    assert _max_diff(segment.probs, reference) <= 1e-6


def test_only_selected_layers_are_recorded_and_memory_follows_the_rows(case):
    model, seq = case.model, case.inputs["input_ids"].shape[1]
    heads = model.config.llm_config.num_attention_heads
    with torch.inference_mode():
        with AttentionRecorder(model, llm_layers=[-1], queries="last", heads="mean") as rec:
            model(**case.image_inputs)
    assert list(rec.llm) == [2] and rec.vit == {}
    assert rec.llm_map(-1).shape == (1, 1, seq)             # one row of the last layer: 1 × 1 × T values
    assert rec.llm[2][0].probs.numel() == seq
    with pytest.raises(ConfigError, match="LLM layer 0 was not recorded"):
        rec.llm_map(0)
    assert heads > 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(llm_layers=[7]), "unknown LLM layer index 7"),
    (dict(llm_layers=[-4]), "unknown LLM layer index -4"),
    (dict(vit_layers=[2]), "unknown ViT layer index 2"),
    (dict(llm_layers="some"), "LLM layers must be"),
    (dict(heads="median"), "bad heads spec 'median'"),
    (dict(heads=[0, 9]), "head index 9 does not exist"),
    (dict(heads=[]), "bad heads spec"),
    (dict(queries="first"), "bad queries spec 'first'"),
    (dict(queries=1.5), "bad queries spec"),
    (dict(llm_layers=None), "nothing to record"),
    (dict(dtype=torch.int8), "floating torch dtype"),
    (dict(vit_queries="some"), "bad vit_queries spec"),
])
def test_bad_specs_raise_a_naviL_error(case, kwargs, message):
    with pytest.raises(ConfigError, match=message) as err:
        AttentionRecorder(case.model, **kwargs)
    assert isinstance(err.value, NaViLError)


def test_recording_a_model_that_is_not_navil_is_refused():
    with pytest.raises(ConfigError, match="needs a NaViL model"):
        AttentionRecorder(torch.nn.Linear(2, 2))


def test_the_vision_or_language_model_alone_can_be_recorded(case):
    model, px = case.model, case.pixel_inputs
    with torch.inference_mode():
        with AttentionRecorder(model, llm_layers=None, vit_layers=[1], dtype=F32) as whole:
            model.vision_model(px["pixel_values"], px["image_grid_thw"])
        with AttentionRecorder(model.vision_model, vit_layers=[1], dtype=F32) as alone:   # llm "all": nothing
            model.vision_model(px["pixel_values"], px["image_grid_thw"])
    assert alone.llm == {} and list(alone.vit) == [1]
    for a, b in zip(whole.vit_segments(1), alone.vit_segments(1)):
        assert (a.start, a.end) == (b.start, b.end) and torch.equal(a.probs, b.probs)
    with pytest.raises(ConfigError, match="no NaViL vision model"):
        AttentionRecorder(model.language_model, vit_layers=[0])


# ---------------------------------------------------------------------------------------------------
# token layout


def test_token_layout_of_the_golden_prompt(case):
    """Kinds and counts of the fixture prompt; the last scale (3 × 5 merged tokens, windows of 4 × 4) is
    window-permuted; recorded ViT segments are single windows / single scales of the layout."""
    model, px = case.model, case.pixel_inputs
    ids = case.inputs["input_ids"]
    layout = TokenLayout.from_model(model, ids, px["image_grid_thw"])
    counts = {kind: layout.kinds.count(kind) for kind in set(layout.kinds)}
    assert counts["visual"] == 29 and counts["line_break"] == 2 + 2 + 3 and counts["frame_break"] == 3
    assert counts["img_start"] == counts["img_end"] == 1 and counts["text"] == ids.shape[1] - 29 - 7 - 3 - 2
    ctx = model.special_token_ids["<IMG_CONTEXT>"]
    assert torch.equal(layout.positions("visual"), (ids[0] == ctx).nonzero().reshape(-1))
    assert [(s.grid_thw, s.rows, s.cols, s.vit_start, s.vit_end) for s in layout.scales] == [
        ((1, 4, 6), 2, 3, 0, 24), ((1, 4, 8), 2, 4, 24, 56), ((1, 6, 10), 3, 5, 56, 116)]
    visual = layout.kind_mask("visual")
    for scale in layout.scales:
        here = visual & (layout.scale == scale.scale)
        cells = set(zip(layout.row[here].tolist(), layout.col[here].tolist()))
        assert cells == {(r, c) for r in range(scale.rows) for c in range(scale.cols)}
        permuted = not torch.equal(layout.row[here], layout.slot_row[here]) or \
            not torch.equal(layout.col[here], layout.slot_col[here])
        assert permuted == (scale.scale == 2)   # only the 3 × 5 scale is wider than a window (4 merged tokens)
    # window order of the 3 × 5 scale: the 3 × 4 window first, then the last column
    last = visual & (layout.scale == 2)
    assert layout.col[last].tolist() == [0, 1, 2, 3] * 3 + [4] * 3
    # ViT positions: patch coordinates, the feeding pixel_values row, the containing visual token
    assert layout.num_vit_positions == px["pixel_values"].shape[0]
    assert sorted(layout.vit_patch_index.tolist()) == list(range(116))
    assert torch.equal(layout.row[layout.vit_llm_position], layout.vit_row // 2)
    assert torch.equal(layout.col[layout.vit_llm_position], layout.vit_col // 2)
    with torch.inference_mode(), AttentionRecorder(model, llm_layers=None, vit_layers="all") as rec:
        model.vision_model(px["pixel_values"], px["image_grid_thw"])
    full = model.config.vision_config.fullatt_block_indexes
    for layer, segments in rec.vit.items():
        for segment in segments:
            span = slice(segment.start, segment.end)
            if full is None or layer in full:
                assert len(set(zip(layout.vit_image[span].tolist(), layout.vit_scale[span].tolist()))) == 1
            else:
                assert len(set(layout.vit_window[span].tolist())) == 1
        if full is not None and layer not in full:
            assert len(segments) == len(set(layout.vit_window.tolist())) == 4


def _synthetic_images() -> list[np.ndarray]:
    """Two images of odd sizes (uint8 noise); their content does not matter, only their grids."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, size=(77, 131, 3), dtype=np.uint8),
            rng.integers(0, 255, size=(150, 61, 3), dtype=np.uint8)]


@pytest.mark.parametrize("window_size", [4, 8])
def test_layout_undoes_the_window_order_and_the_pixel_shuffle(window_size):
    """End to end through the model's code: patches carry f(grid, patch row, patch col); a ViT without
    layers (window reordering + identity patch embedding) → pixel shuffle → ``<IMG_CONTEXT>`` scatter of
    ``embed_inputs``; arranging each position's value by the layout gives back f on every grid, for every
    sub-patch of the 2 × 2 shuffle; the same for the ViT positions (encoder order)."""
    inputs = preprocess_multiscale(_synthetic_images(), min_pixels=2048, max_pixels=16384)
    grids = inputs.image_grid_thw
    m, p = inputs.merge_size, inputs.patch_size
    side = window_size // m
    assert len(grids) >= 4 and inputs.num_scales[0] >= 2 and inputs.num_scales[1] >= 2
    assert any((h // m) % side or (w // m) % side for _, h, w in grids.tolist())  # partial windows exist

    # pixel_values: every patch constant f = 10000·grid + 100·row + col, in the processor's patch order
    truth, pixels = [], []
    for g, (_, h, w) in enumerate(grids.tolist()):
        f = 10000.0 * g + 100.0 * np.arange(h)[:, None] + np.arange(w)[None, :]
        truth.append(torch.tensor(f, dtype=F32))
        image = np.repeat(np.repeat(f, p, axis=0), p, axis=1)[..., None].repeat(3, axis=2).astype(np.float32)
        pixels.append(torch.from_numpy(patchify(image, p, m)))
    pixel_values = torch.cat(pixels)

    vision = NaViLVisionModel(NaViLVisionConfig(hidden_size=4, num_attention_heads=1, intermediate_size=8,
                                                num_hidden_layers=0, patch_size=p, downsample_ratio=1 / m,
                                                window_size=window_size, qk_normalization=False)).eval()
    with torch.no_grad():
        vision.embeddings.patch_embedding.weight.zero_()
        vision.embeddings.patch_embedding.bias.zero_()
        vision.embeddings.patch_embedding.weight[0, 0, 0, 0] = 1.0      # channel 0 = the patch's value
        out = vision(pixel_values, grids, output_hidden_states=True)
    shuffled = out.last_hidden_state.reshape(out.last_hidden_state.shape[0], -1)    # (n, m²·4), window order

    case = load_golden_case("qwen3_ve")
    model, ids_map = case.model, case.meta["special_token_ids"]
    text = [27, 85, 118]
    prompt = (text + image_span_ids(inputs.grids_of(0), ids_map, m) + text
              + image_span_ids(inputs.grids_of(1), ids_map, m) + text)
    hidden = model.config.llm_config.hidden_size
    features = torch.nn.functional.pad(shuffled, (0, hidden - shuffled.shape[1]))
    with torch.no_grad():
        embeds, _ = model.embed_inputs(torch.tensor([prompt]), visual_features=features)

    layout = TokenLayout.build(prompt, grids, ids_map, merge_size=m, window_size=window_size)
    assert layout.positions("visual").numel() == shuffled.shape[0]
    permuted_scales = 0
    for g, scale in enumerate(layout.scales):
        assert scale.grid_thw == tuple(grids[g].tolist())
        for a in range(m):
            for b in range(m):
                values = embeds[0, :, (a * m + b) * 4]                     # (T,) one sub-patch per position
                assert torch.equal(layout.arrange(values, scale.image, scale.scale), truth[g][a::m, b::m])
        vit_values = out.hidden_states[0][:, 0]                          # (N,) encoder order
        assert torch.equal(layout.arrange_vit(vit_values, scale.image, scale.scale), truth[g])
        here = layout.kind_mask("visual") & (layout.image == scale.image) & (layout.scale == scale.scale)
        permuted_scales += int(not torch.equal(layout.row[here] * 1000 + layout.col[here],
                                               layout.slot_row[here] * 1000 + layout.slot_col[here]))
    assert permuted_scales >= 1
    assert torch.equal(pixel_values[layout.vit_patch_index, 0, 0, 0], out.hidden_states[0][:, 0])
    # a segment-local quantity with an offset: the last scale's patches alone
    last = layout.scales[-1]
    local = out.hidden_states[0][last.vit_start:last.vit_end, 0]
    assert torch.equal(layout.arrange_vit(local, last.image, last.scale, offset=last.vit_start), truth[-1])


def test_layout_of_a_left_padded_batch_with_answers(case):
    model, px = case.model, case.pixel_inputs
    batch = _left_padded_batch(case)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    width, text_len = ids.shape[1], case.inputs["text_only_input_ids"].shape[1]
    generated = torch.tensor([[16, 9, 3], [16, 9, 3]])     # special ids after the answer start are answers
    full_ids = torch.cat([ids, generated], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(generated)], dim=1)
    settings = TokenLayout.model_settings(model)
    text_layout, image_layout = TokenLayout.build_batch(full_ids, px["image_grid_thw"], attention_mask=full_mask,
                                                        answer_start=width, **settings)
    assert text_layout.kinds[:width - text_len] == ("padding",) * (width - text_len)
    assert text_layout.kinds[width:] == image_layout.kinds[width:] == ("answer",) * 3
    assert text_layout.scales == () and text_layout.num_vit_positions == 0
    assert len(image_layout.scales) == 3 and image_layout.vit_offset == 0
    single = TokenLayout.from_model(model, full_ids[1], px["image_grid_thw"], answer_start=width)
    assert single.kinds == image_layout.kinds and torch.equal(single.row, image_layout.row)
    # two image prompts: the second one's patches follow the first one's in the packed ViT input
    two = TokenLayout.build_batch(torch.stack([ids[1], ids[1]]), px["image_grid_thw"].repeat(2, 1), **settings)
    assert two[1].vit_offset == two[0].num_vit_positions == 116
    assert torch.equal(two[0].vit_row, two[1].vit_row)


def test_layout_errors_name_the_problem(case):
    model, px = case.model, case.pixel_inputs
    ids = case.inputs["input_ids"]
    with pytest.raises(ModelInputError, match="expected <IMG_CONTEXT>|expected <IMG_LINE_BREAK>"):
        TokenLayout.from_model(model, ids, px["image_grid_thw"].flip(0))
    with pytest.raises(ModelInputError, match="more scales than image_grid_thw"):
        TokenLayout.from_model(model, ids, px["image_grid_thw"][:2])
    with pytest.raises(ModelInputError, match="use 3 grid rows but image_grid_thw has 4"):
        TokenLayout.from_model(model, ids, px["image_grid_thw"].repeat(2, 1)[:4])
    settings = TokenLayout.model_settings(model)
    ids_map = {k: v for k, v in settings["special_token_ids"].items() if k != "<IMG_LINE_BREAK>"}
    with pytest.raises(ConfigError, match="IMG_LINE_BREAK"):
        TokenLayout.build(ids, px["image_grid_thw"], ids_map)
    layout = TokenLayout.from_model(model, ids, px["image_grid_thw"])
    with pytest.raises(ModelInputError, match="positions on the last dim"):
        layout.arrange(torch.zeros(5), 0, 0)
    with pytest.raises(ConfigError, match="no image 1 scale 0"):
        layout.arrange(torch.zeros(len(layout)), 1, 0)
    with pytest.raises(ConfigError, match="unknown token kind"):
        layout.positions("pixels")
    with pytest.raises(ModelInputError, match="build_batch"):
        TokenLayout.from_model(model, ids.repeat(2, 1), px["image_grid_thw"])
