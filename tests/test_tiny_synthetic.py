"""Tests of the synthetic VQA generator: determinism, pixel-level ground truth, balance, errors."""
from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np
import pytest

from navil_utils.errors import ConfigError
from navil_utils.tiny.synthetic import (
    ALL_QUESTION_TYPES,
    COLORS,
    OBJECT_GAP,
    PLAIN_BACKGROUNDS,
    REGIONS,
    TEXT_COLOR,
    SyntheticConfig,
    SyntheticVQA,
    enumerate_questions,
    region_of,
    region_touches,
    relation_holds,
    relation_word,
    render_text_mask,
)

N_PIXEL_CHECK = 300


@pytest.fixture(scope="module")
def data() -> SyntheticVQA:
    return SyntheticVQA(seed=7, question_types=ALL_QUESTION_TYPES, extra_qas=3)


@pytest.fixture(scope="module")
def samples(data):
    return [data.sample(i) for i in range(N_PIXEL_CHECK)]


@pytest.fixture(scope="module")
def balance_samples():
    data = SyntheticVQA(seed=3)
    return data, [data.sample(i) for i in range(2400)]


# ---- determinism ---------------------------------------------------------------------------------

def test_same_seed_same_sample_in_any_order():
    a, b = SyntheticVQA(seed=11), SyntheticVQA(seed=11)
    forward = [a.sample(i) for i in range(40)]
    backward = [b.sample(i) for i in reversed(range(40))][::-1]
    for s, t in zip(forward, backward):
        assert s.to_dict() == t.to_dict()
        assert np.array_equal(np.asarray(s.image), np.asarray(t.image))
    assert a[5].to_dict() == forward[5].to_dict()


def test_different_seeds_and_indices_differ():
    a, b = SyntheticVQA(seed=1), SyntheticVQA(seed=2)
    same_images = sum(np.array_equal(np.asarray(a[i].image), np.asarray(b[i].image)) for i in range(30))
    assert same_images == 0
    assert len({a[i].caption for i in range(30)}) > 25


def test_iter_samples_shards_by_index():
    data = SyntheticVQA(seed=0)
    shard = list(data.iter_samples(start=1, stop=9, step=3))
    assert [s.index for s in shard] == [1, 4, 7]
    assert shard[1].to_dict() == data.sample(4).to_dict()


# ---- image sizes -----------------------------------------------------------------------------------

def test_image_sizes_follow_config(samples):
    cfg = SyntheticConfig()
    sizes = {s.size for s in samples}
    for w, h in sizes:
        assert w % cfg.size_multiple == 0 and h % cfg.size_multiple == 0
        assert min(w, h) >= cfg.min_short_side and w * h <= cfg.image_size_range[1] ** 2
    ratios = [w / h for w, h in sizes]
    assert max(ratios) >= 3 and min(ratios) <= 1 / 3  # long thin images in both orientations
    assert len(sizes) >= 12
    assert all(s.image.mode == "RGB" for s in samples)


# ---- pixel-level ground truth ------------------------------------------------------------------------

def _shape_pixels(pixels: np.ndarray, rgb) -> np.ndarray:
    return np.all(pixels == np.array(rgb, np.uint8), axis=2)


def test_objects_are_disjoint_and_inside(samples):
    for s in samples:
        w, h = s.size
        boxes = [o.box for o in s.objects]
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                separated = a[2] + OBJECT_GAP <= b[0] or b[2] + OBJECT_GAP <= a[0] or \
                    a[3] + OBJECT_GAP <= b[1] or b[3] + OBJECT_GAP <= a[1]
                assert separated, (s.index, a, b)


def test_shape_pixels_match_boxes_and_colours(samples):
    """Every palette-coloured pixel lies in a box of a shape of that colour, and every shape's box
    is tightly filled with its colour — so counting boxes is counting shapes in the image."""
    for s in samples:
        pixels = np.asarray(s.image)
        shapes = [o for o in s.objects if o.kind != "text"]
        for name, rgb in COLORS.items():
            mask = _shape_pixels(pixels, rgb)
            inside = np.zeros_like(mask)
            for o in shapes:
                if o.color == name:
                    x0, y0, x1, y1 = o.box
                    inside[y0:y1, x0:x1] = True
            assert not (mask & ~inside).any(), f"sample {s.index}: stray {name} pixels"
        for o in shapes:
            x0, y0, x1, y1 = o.box
            own = _shape_pixels(pixels[y0:y1, x0:x1], COLORS[o.color])
            ys, xs = np.nonzero(own)
            assert own[(y1 - y0) // 2, (x1 - x0) // 2], f"sample {s.index}: {o.kind} centre not {o.color}"
            assert xs.min() <= 1 and ys.min() <= 1 and xs.max() >= x1 - x0 - 2 and ys.max() >= y1 - y0 - 2
            assert own.mean() > 0.3, (s.index, o.kind, own.mean())
            assert o.size == x1 - x0 == y1 - y0 >= 16


def test_text_boxes_hold_the_rendered_string(samples):
    texts_seen = 0
    for s in samples:
        pixels = np.asarray(s.image).astype(int)
        ink = pixels.max(axis=2) < 100  # near-black: only text is this dark
        inside = np.zeros_like(ink)
        for o in s.objects:
            if o.kind != "text":
                continue
            texts_seen += 1
            x0, y0, x1, y1 = o.box
            inside[y0:y1, x0:x1] = True
            mask = np.asarray(render_text_mask(o.text, o.size))
            assert mask.shape == (y1 - y0, x1 - x0)
            assert ink[y0:y1, x0:x1].any()
            if s.background in PLAIN_BACKGROUNDS:  # fully covered glyph pixels are exactly the text colour
                full = mask == 255
                assert np.all(pixels[y0:y1, x0:x1][full] == np.array(TEXT_COLOR))
        assert not (ink & ~inside).any(), f"sample {s.index}: ink outside text boxes"
    assert texts_seen > 30


# ---- answers agree with the boxes ----------------------------------------------------------------------

def _find(s, description):
    color, kind = description.split(" ", 1)
    matches = [o for o in s.objects if o.color == color and o.kind == kind]
    assert len(matches) == 1, (s.index, description)
    return matches[0]


def test_answers_follow_from_geometry(samples):
    """Recompute every primary answer from the object boxes with the question's definition."""
    seen = Counter()
    for s in samples:
        w, h = s.size
        shapes = [o for o in s.objects if o.kind != "text"]
        for o in s.objects:
            assert o.region == region_of(o.box, w, h)
        q = s.question
        seen[s.template] += 1
        if s.template == "color":
            kind = q[len("What color is the "):-1]
            (target,) = [o for o in shapes if o.kind == kind]
            assert s.answer == target.color
        elif s.template == "count_color":
            color = q.split()[2]
            assert s.answer == str(sum(o.color == color for o in shapes))
        elif s.template == "count_kind":
            plural = q.split()[2]
            assert s.answer == str(sum(plural.startswith(o.kind) for o in shapes))
        elif s.template == "count_all":
            assert s.answer == str(len(shapes))
        elif s.template == "position_kind":
            region = q[len("What shape is at the "):-1]
            left, top = region.endswith("left"), region.startswith("top")
            if region == "center":
                holders = [o for o in s.objects if o.box[0] < w / 2 < o.box[2] and o.box[1] < h / 2 < o.box[3]]
            else:  # everything that intersects the quadrant
                qx = (0, w / 2) if left else (w / 2, w)
                qy = (0, h / 2) if top else (h / 2, h)
                holders = [o for o in s.objects if o.box[0] < qx[1] and o.box[2] > qx[0] and o.box[1] < qy[1] and o.box[3] > qy[0]]
            assert len(holders) == 1 and holders[0].kind == s.answer
        elif s.template == "position_region":
            target = _find(s, q[len("Where is the "):-1])
            x0, y0, x1, y1 = target.box
            if s.answer == "center":
                assert x0 < w / 2 < x1 and y0 < h / 2 < y1
            else:
                v, hz = s.answer.split("-")
                assert (y1 <= h / 2) if v == "top" else (y0 >= h / 2)
                assert (x1 <= w / 2) if hz == "left" else (x0 >= w / 2)
        elif s.template == "relation":
            body = q[len("Is the "):-1]
            for rel in ("left of", "right of", "above", "below"):
                if f" {rel} the " in body:
                    first, second = body.split(f" {rel} the ")
                    break
            a, b = _find(s, first).box, _find(s, second).box
            truth = {"left of": a[2] < b[0], "right of": a[0] > b[2], "above": a[3] < b[1], "below": a[1] > b[3]}[rel]
            opposite = {"left of": a[0] > b[2], "right of": a[2] < b[0], "above": a[1] > b[3], "below": a[3] < b[1]}[rel]
            assert truth != opposite and s.answer == ("yes" if truth else "no")
        elif s.template == "text":
            (text,) = [o for o in s.objects if o.kind == "text"]
            assert s.answer == text.text and 2 <= len(text.text) <= 4
        elif s.template == "caption":
            assert s.answer == s.caption
    assert set(seen) >= {"color", "count_color", "count_kind", "count_all", "position_kind", "position_region",
                         "relation", "text", "caption"}


def test_enumerated_questions_contain_the_primary_and_extras(samples):
    cfg = SyntheticConfig(question_types=ALL_QUESTION_TYPES)
    for s in samples:
        qas = {(qa.question, qa.answer) for qa in enumerate_questions(s.objects, *s.size, cfg)}
        if s.qtype != "caption":
            assert (s.question, s.answer) in qas
        assert all((qa.question, qa.answer) in qas for qa in s.extra_qas)
        questions = [qa.question for qa in s.qas]
        assert len(questions) == len(set(questions)) and len(s.extra_qas) <= 3
    assert sum(len(s.extra_qas) == 3 for s in samples) > 0.8 * len(samples)


def test_evidence_box_covers_the_evidence(samples):
    for s in samples:
        x0, y0, x1, y1 = s.evidence_box
        for b in s.evidence_boxes:
            assert x0 <= b[0] and y0 <= b[1] and b[2] <= x1 and b[3] <= y1
        if s.evidence_boxes:
            assert (x0, y0) == (min(b[0] for b in s.evidence_boxes), min(b[1] for b in s.evidence_boxes))
        assert set(s.evidence_boxes) <= {o.box for o in s.objects}


def test_caption_lists_every_object(samples):
    for s in samples:
        assert s.caption.startswith(f"A {s.background} background")
        assert s.caption.count(" at the ") == len(s.objects)
        for o in s.objects:
            phrase = f"the text {o.text}" if o.kind == "text" else f"{o.color} {o.kind} at the {o.region}"
            assert phrase in s.caption


def test_regions_and_relations_helpers():
    assert region_of((2, 2, 20, 20), 64, 64) == "top-left"
    assert region_of((20, 2, 40, 20), 64, 64) == "top"
    assert region_of((20, 20, 40, 40), 64, 64) == "center"
    assert region_of((40, 40, 60, 60), 64, 64) == "bottom-right"
    assert region_touches("top-left", "top") and region_touches("top-left", "center")
    assert not region_touches("top-left", "bottom") and not region_touches("center", "top-left")
    assert [r for r in REGIONS if region_touches("center", r)] == ["center"]
    assert relation_holds((0, 0, 10, 10), (20, 0, 30, 10), "left of") is True
    assert relation_holds((20, 0, 30, 10), (0, 0, 10, 10), "left of") is False
    assert relation_holds((0, 0, 10, 10), (5, 20, 15, 30), "left of") is None
    assert relation_holds((0, 0, 10, 10), (5, 20, 15, 30), "below") is False


# ---- balance -------------------------------------------------------------------------------------------

def _chi2_ok(counter: Counter, categories) -> bool:
    """Chi-square statistic against uniform below df + 5·sqrt(2·df) (≈ p < 1e-4 for these df)."""
    n = sum(counter[c] for c in categories)
    expected = n / len(categories)
    chi2 = sum((counter[c] - expected) ** 2 / expected for c in categories)
    df = len(categories) - 1
    return chi2 < df + 5 * math.sqrt(2 * df)


def test_answers_and_question_types_are_balanced(balance_samples):
    data, samples = balance_samples
    assert _chi2_ok(Counter(s.qtype for s in samples), data.config.question_types)
    by_template = defaultdict(Counter)
    for s in samples:
        by_template[s.template][s.answer] += 1
    for template, counts in by_template.items():
        space = data.answer_space(template)
        if space:
            assert set(counts) <= set(space), template
            assert _chi2_ok(counts, space), (template, counts)
    chars = Counter("".join(s.answer for s in samples if s.qtype == "text"))
    assert _chi2_ok(chars, data.config.text_alphabet)
    # the skewed prior of random scenes is what answer-first sampling avoids
    assert max(by_template["count_color"].values()) < 0.3 * sum(by_template["count_color"].values())


def test_chi2_check_detects_skew():
    skewed = Counter({"1": 66, "2": 10, "3": 9, "4": 8, "5": 7})
    assert not _chi2_ok(skewed, ["1", "2", "3", "4", "5"])


def test_text_sizes_span_the_configured_range(balance_samples):
    _, samples = balance_samples
    sizes = Counter(o.size for s in samples for o in s.objects if o.kind == "text")
    assert set(sizes) == set(SyntheticConfig().text_sizes)


# ---- configuration -------------------------------------------------------------------------------

def test_overrides_restrict_the_task():
    data = SyntheticVQA(0, question_types=("color",), colors=("red", "blue"), shape_kinds=("circle", "square"),
                        image_size_range=(96, 96), aspect_ratios=(1.0,), distractor_text_prob=0.0)
    for s in (data.sample(i) for i in range(50)):
        assert s.qtype == "color" and s.answer in ("red", "blue") and s.size == (96, 96)
        assert all(o.kind in ("circle", "square") for o in s.objects)


def test_the_default_task_is_unchanged():
    """A fingerprint of the first 200 samples' content (questions, answers, objects, boxes): every shipped model
    and stored result was made from this stream; a new option must leave the defaults alone."""
    import hashlib
    import json

    data = SyntheticVQA(0)
    content = json.dumps([data.sample(i).to_dict() for i in range(200)], sort_keys=True).encode()
    assert hashlib.sha256(content).hexdigest() == "ccdfb3d1ec70c1c5f451a5f2fcaf5268b053f3bef5049dd47373fc22f035f59e"


def _relation_words(data: SyntheticVQA, n: int) -> Counter:
    return Counter(relation_word(qa.question) for i in range(n) for qa in data.sample(i).qas if qa.qtype == "relation")


def test_relation_words_can_be_restricted_and_weighted():
    """The curriculum that breaks the above/below symmetry: a subset of relation words, or weighted words, in the
    primary question and in the extra questions alike; answers stay balanced per word."""
    subset = SyntheticVQA(2, question_types=("relation",), extra_qas=7, relations=("above", "left of"))
    assert set(_relation_words(subset, 100)) == {"above", "left of"}
    with pytest.raises(ConfigError, match="not a relation question"):
        relation_word("What color is the star?")
    weighted = SyntheticVQA(2, question_types=("relation",), extra_qas=7, relation_weights=(3, 1, 3, 1))
    counts = _relation_words(weighted, 300)                # RELATIONS order: left of, right of, above, below
    assert 2.0 < counts["left of"] / counts["right of"] < 4.0 and 2.0 < counts["above"] / counts["below"] < 4.0
    answers = Counter(qa.answer for i in range(300) for qa in weighted.sample(i).qas)
    assert abs(answers["yes"] - answers["no"]) < 0.1 * sum(answers.values())


def test_more_distractor_texts_make_glyph_dense_scenes():
    plain = SyntheticVQA(1, distractor_text_prob=1.0, text_length_range=(1, 1), text_sizes=(26, 34))
    dense = SyntheticVQA(1, distractor_text_prob=1.0, max_distractor_texts=3, text_length_range=(1, 1),
                         text_sizes=(26, 34))
    texts = [[sum(o.kind == "text" for o in d.sample(i).objects) for i in range(100)] for d in (plain, dense)]
    assert max(texts[0]) == 1 and max(texts[1]) == 3
    assert sum(texts[1]) > 2 * sum(texts[0])                               # measured 2.18 per image against 1
    none = SyntheticVQA(1, question_types=("color",), max_distractor_texts=0, distractor_text_prob=1.0)
    assert all(o.kind != "text" for i in range(50) for o in none.sample(i).objects)


@pytest.mark.parametrize("overrides", [
    {"max_distractor_texts": 9},
    {"max_distractor_texts": 1.5},
    {"question_types": ("colour",)},
    {"colors": ("red", "magenta")},
    {"count_range": (1, 9), "max_objects": 6},
    {"image_size_range": (32, 48)},
    {"object_size_range": (30, 40)},
    {"text_sizes": ()},
    {"qtype_weights": (1.0,)},
    {"relations": ("beside",)},
    {"relation_weights": (1.0, 2.0)},
    {"relation_weights": (0.0, 0.0, 0.0, 0.0)},
    {"not_a_field": 1},
])
def test_bad_config_raises_config_error(overrides):
    with pytest.raises(ConfigError):
        SyntheticVQA(0, **overrides)


def test_bad_index_raises():
    data = SyntheticVQA(0)
    with pytest.raises(IndexError):
        data.sample(-1)
    with pytest.raises(ConfigError):
        SyntheticVQA(-3)
