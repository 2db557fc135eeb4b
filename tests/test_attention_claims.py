"""Claims about attention, measured (navil_utils.analysis.attention_claims): visual share, energy-based pointing
with its baselines and bootstrap intervals, attention sinks and the blanking check — on constructed attention
rows with known answers, plus one smoke test on the embedded tiny model."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from navil_utils.analysis.attention import AttentionRecorder, TokenLayout
from navil_utils.analysis.attention_claims import (
    AttentionQuestion,
    attention_share,
    attention_sinks,
    blank_features,
    blanking_check,
    blanking_positions,
    bootstrap_means,
    collect_answer_attention,
    pointing_summary,
    pointing_table,
    shuffled_partners,
    visual_attention_share,
)
from navil_utils.analysis.attention_maps import scale_geometries
from navil_utils.errors import ConfigError, ModelInputError
from navil_utils.processing.image_tokens import image_span_ids
from navil_utils.processing.multiscale import preprocess_multiscale

IDS = {"<img>": 1, "</img>": 2, "<IMG_CONTEXT>": 3, "<IMG_LINE_BREAK>": 4, "<IMG_FRAME_BREAK>": 5}
TEXT = [10, 11, 12]
BUDGET = dict(min_pixels=2048, max_pixels=16384)   # 131 x 77: 4 scales, the largest unresized
STATISTICS = ["attention", "uniform", "area", "shuffled", "mass_share"]


def _question(height: int, width: int, box, *, pad: int = 0, index: int = 0, budget: dict | None = None
              ) -> AttentionQuestion:
    """A prompt ``[pad] text <img>…</img> text`` for an ``height × width`` image; rows filled in by the test."""
    inputs = preprocess_multiscale(np.zeros((height, width, 3), dtype=np.uint8), **(budget or BUDGET))
    ids = [0] * pad + TEXT + image_span_ids(inputs.grids_of(0), IDS, 2) + TEXT
    mask = [0] * pad + [1] * (len(ids) - pad)
    layout = TokenLayout.build(ids, inputs.image_grid_thw, IDS, merge_size=2, window_size=4, attention_mask=mask)
    return AttentionQuestion(layout, scale_geometries(inputs), {0: torch.zeros(len(layout))}, box, 0, index)


def _with_row(question: AttentionQuestion, row: torch.Tensor, layer: int = 0) -> AttentionQuestion:
    return dataclasses.replace(question, rows={**question.rows, layer: row / row.sum()})


def _visual(question: AttentionQuestion, scale: int | None = None) -> torch.Tensor:
    mask = question.layout.kind_mask("visual")
    if scale is not None:
        mask &= question.layout.scale == scale
    return mask


def _overlap_per_position(question: AttentionQuestion, box) -> torch.Tensor:
    out = torch.zeros(len(question.layout), dtype=torch.float64)
    for geo in question.geometry:
        here = _visual(question, geo.scale).nonzero().reshape(-1)
        fractions = geo.overlap_fraction(box)
        out[here] = torch.from_numpy(fractions[question.layout.row[here].numpy(), question.layout.col[here].numpy()])
    return out


# ---------------------------------------------------------------------------------------------------
# visual share


def test_attention_share_of_constructed_rows():
    q = _question(77, 131, (0, 0, 10, 10), pad=3)
    layout, length = q.layout, len(q.layout)
    visual, text = _visual(q).float(), layout.kind_mask("text").float()
    markers = sum(layout.kind_mask(k) for k in ("img_start", "line_break", "frame_break", "img_end")).float()
    real = 1 - layout.kind_mask("padding").float()
    probs = torch.stack([visual / visual.sum(), text / text.sum(), real / real.sum(),
                         0.25 * visual / visual.sum() + 0.75 * markers / markers.sum()])[None]   # (1, 4, K)
    shares = attention_share(probs, torch.full((4,), length - 1), layout)
    torch.testing.assert_close(shares["visual"][0], torch.tensor([1.0, 0.0, visual.sum() / real.sum(), 0.25]))
    torch.testing.assert_close(shares["text"][0], torch.tensor([0.0, 1.0, text.sum() / real.sum(), 0.0]))
    torch.testing.assert_close(shares["markers"][0], torch.tensor([0.0, 0.0, markers.sum() / real.sum(), 0.75]))
    assert float(shares["padding"].abs().max()) == 0.0
    # a uniform row over its (non-padding) keys has exactly the uniform baseline's visual share
    torch.testing.assert_close(shares["visual"][0, 2], shares["visual_uniform"][2])
    # causal baseline: a query before the image sees no visual key
    early = attention_share(probs[:, :1], torch.tensor([4]), layout)
    assert float(early["visual_uniform"][0]) == 0.0
    with pytest.raises(ModelInputError, match="build the layout from the full sequence"):
        attention_share(torch.zeros(1, 1, length + 2), torch.tensor([0]), layout)


def test_visual_attention_share_from_a_recording(case):
    model, px = case.model, case.pixel_inputs
    heads = model.config.llm_config.num_attention_heads
    with torch.inference_mode(), AttentionRecorder(model, queries=slice(-8, None), dtype=torch.float32) as rec:
        model(**case.image_inputs)
    layout = TokenLayout.from_model(model, case.inputs["input_ids"], px["image_grid_thw"])
    table = visual_attention_share(rec, layout)
    per_head = visual_attention_share(rec, layout, layers=[-1], per_head=True, call=0)
    assert list(table["layer"]) == rec.llm_layers and (table["rows"] == 8).all()
    groups = table[["visual", "text", "markers", "padding"]].sum(axis=1)
    np.testing.assert_allclose(groups, 1.0, atol=1e-5)
    assert ((table[["visual", "visual_uniform"]] >= 0) & (table[["visual", "visual_uniform"]] <= 1)).all().all()
    for layer in rec.llm_layers:                                    # by hand: mean over heads and rows
        probs = rec.llm_map(layer)
        expected = probs[..., layout.kind_mask("visual")].sum(-1).mean()
        assert abs(float(table.loc[table["layer"] == layer, "visual"].iloc[0]) - float(expected)) < 1e-6
    assert len(per_head) == heads and list(per_head["head"]) == list(range(heads))
    last = table[table["layer"] == rec.llm_layers[-1]]
    assert abs(per_head["visual"].mean() - float(last["visual"].iloc[0])) < 1e-6
    one_row = visual_attention_share(rec, layout, positions=[case.inputs["input_ids"].shape[1] - 1])
    assert (one_row["rows"] == 1).all()


# ---------------------------------------------------------------------------------------------------
# pointing


def test_pointing_of_constructed_rows():
    box = (16, 8, 120, 72)
    q = _question(77, 131, box, pad=2)
    overlap = _overlap_per_position(q, box)
    visual = _visual(q)
    assert bool(((overlap == 1) & visual).any())

    # all mass on cells wholly inside the box (plus some on text): attention = 1 wherever there is mass
    inside = ((overlap == 1) & visual).double()
    row = inside + 0.5 * q.layout.kind_mask("text").double() * inside.sum() / 3
    table = pointing_table([_with_row(q, row)], 0)
    assert list(table["scale"]) == ["all"] + list(range(len(q.geometry)))
    everywhere = table[table["scale"] == "all"].iloc[0]
    assert everywhere["attention"] == pytest.approx(1.0)
    for _, entry in table.iterrows():
        assert np.isnan(entry["attention"]) or entry["attention"] == pytest.approx(1.0)
    assert everywhere["area"] == pytest.approx(104 * 64 / (77 * 131))
    assert np.isnan(everywhere["shuffled"])                           # one question: nothing to shuffle with

    # a uniform row over the visual tokens: attention = the uniform baseline, per scale too; the uniform
    # baseline is the mean overlap of the cells (padding cells pull it below the area share)
    uniform = pointing_table([_with_row(q, visual.double())], 0)
    np.testing.assert_allclose(uniform["attention"], uniform["uniform"])
    assert uniform.iloc[0]["uniform"] == pytest.approx(float(overlap[visual].mean()))

    # mass split 1:3 between the smallest and the largest scale
    small, large = _visual(q, 0).double(), _visual(q, len(q.geometry) - 1).double()
    split = pointing_table([_with_row(q, 0.25 * small / small.sum() + 0.75 * large / large.sum())], 0)
    shares = dict(zip(split["scale"].astype(str), split["mass_share"]))
    assert shares["all"] == pytest.approx(1.0) and shares["0"] == pytest.approx(0.25)
    assert shares[str(len(q.geometry) - 1)] == pytest.approx(0.75)

    # the whole image as the box: area share 1, attention = the image (non-padding) share of the mass
    whole = dataclasses.replace(_with_row(q, visual.double()), box=(0, 0, 131, 77))
    entry = pointing_table([whole], 0).iloc[0]
    fraction = _overlap_per_position(q, (0, 0, 131, 77))[visual]
    assert entry["area"] == pytest.approx(1.0) and entry["attention"] == pytest.approx(float(fraction.mean()))

    # leaving the wholly-inside tokens out: only the partly overlapping and the outside cells remain
    excluded = pointing_table([_with_row(q, visual.double())], 0, exclude=[(overlap == 1).nonzero().reshape(-1)])
    rest = visual & (overlap < 1)
    assert excluded.iloc[0]["attention"] == pytest.approx(float(overlap[rest].mean()))
    assert excluded.iloc[0]["tokens"] == int(rest.sum())


def test_shuffled_baseline_uses_another_questions_box_in_relative_coordinates():
    left, right = (0, 0, 60, 77), (71, 0, 131, 77)
    a, b = _question(77, 131, left, index=0), _question(77, 131, right, index=1)
    inside_left = ((_overlap_per_position(a, left) == 1) & _visual(a)).double()
    inside_right = ((_overlap_per_position(b, right) == 1) & _visual(b)).double()
    table = pointing_table([_with_row(a, inside_left), _with_row(b, inside_right)], 0)
    everywhere = table[table["scale"] == "all"].set_index("question")
    assert everywhere["attention"].tolist() == pytest.approx([1.0, 1.0])
    assert everywhere["shuffled"].tolist() == pytest.approx([0.0, 0.0])      # two questions: boxes swapped
    # different image sizes: the borrowed box is scaled to the borrowing image
    tall = _question(150, 60, (0, 0, 30, 75), index=2)
    row = _visual(tall).double()
    pair = pointing_table([_with_row(tall, row), _with_row(a, inside_left)], 0)
    moved = (0, 0, 60 * 60 / 131, 150)                                # a's box relative (0…0.458, 0…1) on 60 × 150
    direct = pointing_table([dataclasses.replace(_with_row(tall, row), box=moved)], 0)
    assert pair.iloc[0]["shuffled"] == pytest.approx(direct.iloc[0]["attention"])
    partners = shuffled_partners(7, seed=3)
    assert sorted(partners) == list(range(7)) and (partners != np.arange(7)).all()
    assert (shuffled_partners(7, seed=3) == partners).all() and (shuffled_partners(1) == -1).all()


def test_bootstrap_and_summary():
    constant = np.full((20, 2), 0.3)
    mean, low, high = bootstrap_means(constant, n_boot=200)
    np.testing.assert_allclose([mean, low, high], 0.3)
    values = np.random.default_rng(1).normal(0.5, 0.1, size=(200, 1))
    mean, low, high = bootstrap_means(values, n_boot=500, seed=4)
    assert mean[0] == pytest.approx(values.mean()) and low[0] < mean[0] < high[0]
    assert high[0] - low[0] == pytest.approx(2 * 1.96 * values.std() / np.sqrt(200), rel=0.25)
    again = bootstrap_means(values, n_boot=500, seed=4)
    assert again[1][0] == low[0] and again[2][0] == high[0]
    with_nan = np.array([[1.0], [np.nan], [3.0]])
    assert bootstrap_means(with_nan, n_boot=50)[0][0] == pytest.approx(2.0)

    box = (20, 10, 110, 60)
    questions = [_with_row(_question(77, 131, box, index=i), _visual(_question(77, 131, box)).double())
                 for i in range(4)]
    summary = pointing_summary(pointing_table(questions, 0), n_boot=100)
    assert set(summary["statistic"]) == set(STATISTICS) | {"attention - uniform", "attention - shuffled",
                                                           "attention - area"}
    everywhere = summary[(summary["scale"] == "all")].set_index("statistic")
    # identical questions: every resample has the same mean
    np.testing.assert_allclose(everywhere["low"], everywhere["mean"], atol=1e-12)
    np.testing.assert_allclose(everywhere["high"], everywhere["mean"], atol=1e-12)
    assert everywhere.loc["attention - uniform", "mean"] == pytest.approx(0.0, abs=1e-12)
    assert (summary["n"] == 4).all()


# ---------------------------------------------------------------------------------------------------
# sinks


def test_attention_sinks_of_a_constructed_row():
    """Half the mass on the first visual token (smallest scale, cell (0, 0): a corner, outside the box), half
    spread over cells wholly inside the box: the top-1 token is a border token and the first one, carries half
    the mass, and pointing without it is perfect."""
    box = (130, 70, 250, 150)
    q = _question(150, 250, box, budget=dict(min_pixels=8192, max_pixels=65536))
    overlap = _overlap_per_position(q, box)
    visual = _visual(q)
    first = int(q.layout.positions("visual")[0])
    assert (int(q.layout.scale[first]), int(q.layout.row[first]), int(q.layout.col[first])) == (0, 0, 0)
    assert float(overlap[first]) == 0.0
    inside = ((overlap == 1) & visual).double()
    row = 0.5 * inside / inside.sum()
    row[first] = 0.5
    q = _with_row(q, row)
    table = attention_sinks([q, q], k=1)
    entry = table.iloc[0]
    assert (entry["layer"], entry["k"], entry["n"]) == (0, 1, 2)
    assert entry["topk_mass"] == pytest.approx(0.5)
    assert entry["border"] == 1.0 and entry["first"] == 1.0 and entry["smallest_scale"] == 1.0
    assert entry["first_baseline"] == pytest.approx(1 / int(visual.sum()))
    assert 0 < entry["border_baseline"] < 1
    assert entry["pointing"] == pytest.approx(0.5) and entry["pointing_without_sinks"] == pytest.approx(1.0)
    # sinks found from another row (e.g. the question tokens' mean row): here the uniform row, ties broken by
    # position, picks the first visual token too
    other = attention_sinks([q], k=1, sink_rows=[{0: visual.double()}]).iloc[0]
    assert other["first"] == 1.0
    with pytest.raises(ConfigError, match="k must be"):
        attention_sinks([q], k=0)
    with pytest.raises(ConfigError, match="layer 5 was not recorded"):
        attention_sinks([q], layers=[5])


# ---------------------------------------------------------------------------------------------------
# blanking


def test_blanking_positions_inside_and_matched_outside():
    box = (70, 30, 100, 50)
    q = _question(77, 131, box)
    tokens = blanking_positions(q.layout, q.geometry, box, seed=5)
    overlap = _overlap_per_position(q, box)
    visual = _visual(q)
    assert torch.equal(tokens.inside, ((overlap > 0) & visual).nonzero().reshape(-1))
    assert tokens.matched and tokens.outside.numel() == tokens.inside.numel()
    assert not set(tokens.inside.tolist()) & set(tokens.outside.tolist())
    assert float(overlap[tokens.outside].abs().max()) == 0.0
    fraction = _overlap_per_position(q, (0, 0, 131, 77))
    assert bool((fraction[tokens.outside] > 0).all())                   # never an all-padding cell
    for geo in q.geometry:                                               # same count per scale
        here = q.layout.scale
        assert int((here[tokens.inside] == geo.scale).sum()) == int((here[tokens.outside] == geo.scale).sum())
    again = blanking_positions(q.layout, q.geometry, box, seed=5)
    assert torch.equal(again.outside, tokens.outside)
    strict = blanking_positions(q.layout, q.geometry, box, threshold=0.5)
    assert torch.equal(strict.inside, ((overlap > 0.5) & visual).nonzero().reshape(-1))
    everything = blanking_positions(q.layout, q.geometry, (0, 0, 131, 77))
    assert not everything.matched and everything.outside.numel() == 0

    features = torch.arange(2 * 40 * 3, dtype=torch.float32).reshape(-1, 3) + 1
    offset = 7
    blanked = blank_features(features, q.layout, tokens.inside, offset)
    zero_rows = (blanked == 0).all(-1).nonzero().reshape(-1)
    assert torch.equal(zero_rows, (q.layout.visual_index[tokens.inside] + offset).sort().values)
    assert torch.equal(features[(blanked != 0).all(-1)], blanked[(blanked != 0).all(-1)])
    with pytest.raises(ModelInputError, match="only visual-token positions"):
        blank_features(features, q.layout, torch.tensor([0]))


# ---------------------------------------------------------------------------------------------------
# smoke test on the embedded tiny model


@pytest.fixture(scope="module")
def tiny():
    from navil_utils.chatting import load_chat_model
    from navil_utils.tiny.synthetic import SyntheticVQA

    model, tokenizer = load_chat_model("data/models/navil-tiny")
    model.eval()
    data = SyntheticVQA(seed=1234)
    return model, tokenizer, [data.sample(i) for i in range(8)]


def test_smoke_on_the_tiny_model(tiny):
    from navil_utils.tiny.evaluate import evaluate_model

    model, tokenizer, samples = tiny
    images, texts = [s.image for s in samples], [s.question for s in samples]
    boxes, answers = [s.evidence_box for s in samples], [s.answer for s in samples]
    layers = model.config.llm_config.num_hidden_layers
    questions = collect_answer_attention(model, tokenizer, images, texts, boxes, batch_size=4,
                                         indices=[s.index for s in samples])
    assert len(questions) == 8 and all(sorted(q.rows) == list(range(layers)) for q in questions)
    for q, sample in zip(questions, samples):
        assert q.image_hw == (sample.image.height, sample.image.width)
        for row in q.rows.values():
            assert row.shape == (len(q.layout),) and abs(float(row.sum()) - 1) < 1e-4
            assert float(row[q.layout.kind_mask("padding")].abs().sum()) == 0.0

    table = pointing_table(questions, layer=-1)
    assert len(table) == sum(1 + len(q.geometry) for q in questions)
    values = table[STATISTICS].to_numpy(dtype=float)
    assert np.isfinite(values).all() and (values >= 0).all() and (values <= 1 + 1e-9).all()
    summary = pointing_summary(table, n_boot=100)
    assert summary[summary["statistic"].isin(STATISTICS)][["low", "high"]].apply(np.isfinite).all().all()
    sinks = attention_sinks(questions, k=3)
    assert list(sinks["layer"]) == list(range(layers))
    shares = sinks.drop(columns=["layer", "k", "n"]).to_numpy(dtype=float)
    assert ((shares >= 0) & (shares <= 1 + 1e-9)).all()

    # visual share of a recorded batch forward
    from navil_utils.processing.processor import NaViLProcessor

    processor = NaViLProcessor.from_config(model, tokenizer)
    inputs = processor(images[:2], texts[:2])
    layouts = TokenLayout.build_batch(inputs.input_ids, inputs.image_grid_thw, attention_mask=inputs.attention_mask,
                                      **TokenLayout.model_settings(model))
    with torch.inference_mode(), AttentionRecorder(model, heads="mean", queries="last") as rec:
        model(**inputs.generate_kwargs())
    share = visual_attention_share(rec, layouts[1], batch=1)
    parts = share[["visual", "text", "markers", "padding"]].to_numpy()
    assert ((parts >= 0) & (parts <= 1)).all() and np.allclose(parts.sum(1), 1, atol=1e-3)
    # the recorded rows are the collected ones (same prompts, same batch layout of two)
    pair = collect_answer_attention(model, tokenizer, images[:2], texts[:2], boxes[:2], batch_size=2)
    torch.testing.assert_close(pair[1].rows[layers - 1], rec.llm[layers - 1][0].probs[1, 0, 0].float(), atol=1e-3,
                               rtol=0)

    # the causal check: intact = a plain greedy evaluation of the same questions
    result = blanking_check(model, tokenizer, images, texts, answers, boxes, batch_size=4)
    plain = evaluate_model(model, tokenizer, samples=samples, batch_size=4)
    records = result.records
    assert records["intact_prediction"].tolist() == [r["prediction"] for r in plain.records]
    accuracy = result.accuracy()
    assert accuracy["intact"] == plain.overall
    assert all(0 <= v <= 1 for v in accuracy.values())
    assert (records["inside_tokens"] > 0).all() and (records["outside_tokens"] <= records["inside_tokens"]).all()
    assert (records["matched"] == (records["outside_tokens"] == records["inside_tokens"])).all()
    summary = result.summary(n_boot=100)
    assert list(summary["condition"]) == ["intact", "inside_blanked", "outside_blanked"]
    assert (summary["low"] <= summary["accuracy"]).all() and (summary["accuracy"] <= summary["high"]).all()
