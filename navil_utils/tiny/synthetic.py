"""Synthetic visual question answering: the task of the embedded tiny NaViL.

A deterministic, index-addressable generator of small images (varied sizes and aspect ratios, long
thin ones included) showing coloured shapes and short rendered strings, each with a question, a
short canonical answer and full ground truth (object boxes, the answer's evidence box, a caption).

    >>> data = SyntheticVQA(seed=0)
    >>> s = data.sample(123)              # the same Sample on every machine, for every worker
    >>> s.question, s.answer, s.qtype     # ('How many circles are there?', '3', 'count')
    >>> s.image.size                      # (W, H), e.g. (192, 64)

Question types (``qtype``) and their templates (one template per sub-type, see ``TEMPLATES``):

========== ===================================== ======================================
qtype      question                              answer
========== ===================================== ======================================
color      What color is the {kind}?             a colour name (``red`` …)
count      How many {color} shapes are there? /  a digit (``count_range``)
           How many {kinds} are there? /
           How many shapes are there?
position   What shape is at the {region}? /      a shape kind / a region name
           Where is the {color} {kind}?
relation   Is the {color} {kind} {left of|right  ``yes`` / ``no``
           of|above|below} the {color} {kind}?
text       What does the text say?               the rendered string (``K7R``)
caption    Describe the image.                   the caption (optional, not exact-match)
========== ===================================== ======================================

Design rules (see ``data/models/navil-tiny/README.md`` for the full task card):

* **Answer first.** Each question samples its answer uniformly, then builds a scene that makes it
  true, so answer priors are flat (skewed priors stalled counting in the tiny-model study).
* **Well-defined geometry.** Every object is placed inside one of nine *regions* defined by the
  image's midlines: a quadrant (``top-left`` …, the box lies wholly in it), an edge (``top``: the box
  straddles the vertical midline in the top half, …) or ``center`` (the box contains the centre).
  "What shape is at the top-left?" is only asked when exactly one object touches that quadrant;
  relations are only asked for strictly separated boxes (gap ≥ ``RELATION_GAP`` px).
* **Exact ground truth.** Shapes are drawn without anti-aliasing in exact palette colours, boxes are
  tight (``x1``/``y1`` exclusive), objects never overlap (gap ≥ ``OBJECT_GAP`` px), backgrounds are
  light neutral greys that never contain a palette colour, text is near-black and its box is the
  bounding box of its ink.
* **Machine-independent rendering.** Text uses DejaVu Sans Bold shipped inside matplotlib and
  Pillow's basic layout engine (no system fonts, no raqm), randomness is ``numpy``'s PCG64 seeded
  by ``(seed, index)``.
"""
from __future__ import annotations

import bisect
import functools
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from navil_utils.errors import ConfigError

Box = tuple[int, int, int, int]
"""``(x0, y0, x1, y1)`` in pixels, ``x1``/``y1`` exclusive."""

# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------

SHAPE_KINDS: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star")
KIND_PLURALS: dict[str, str] = {
    "circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses", "star": "stars",
}
#: Palette: well separated, saturated colours (hue steps of ≥ 25°, none close to the neutral
#: backgrounds or to the near-black text).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 135, 0),
    "yellow": (235, 205, 0),
    "green": (30, 160, 50),
    "blue": (30, 80, 230),
    "purple": (145, 45, 195),
}
TEXT_COLOR: tuple[int, int, int] = (20, 20, 20)
TEXT_COLOR_NAME = "black"
#: The nine regions of an image (see module docstring), in reading order.
REGIONS: tuple[str, ...] = (
    "top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right",
)
QUADRANTS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
BACKGROUNDS: tuple[str, ...] = ("white", "gray", "beige", "noisy", "striped", "checkered")
PLAIN_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255), "gray": (205, 205, 205), "beige": (238, 230, 212),
}
#: Characters of rendered strings: upper-case letters and digits with distinct glyphs
#: (no O/0/D/Q, I/1/J, S/5, Z/2, B/8, G/6/C, U/V/W, N).
TEXT_ALPHABET = "ACEFHKLMPRTXY347"
QUESTION_TYPES: tuple[str, ...] = ("color", "count", "position", "relation", "text")
ALL_QUESTION_TYPES: tuple[str, ...] = QUESTION_TYPES + ("caption",)

#: Question templates, one per sub-type (``QA.template``).
TEMPLATES: dict[str, str] = {
    "color": "What color is the {kind}?",
    "count_color": "How many {color} shapes are there?",
    "count_kind": "How many {kinds} are there?",
    "count_all": "How many shapes are there?",
    "position_kind": "What shape is at the {region}?",
    "position_region": "Where is the {color} {kind}?",
    "relation": "Is the {color} {kind} {relation} the {color2} {kind2}?",
    "text": "What does the text say?",
    "caption": "Describe the image.",
}
SUBTYPES: dict[str, tuple[str, ...]] = {
    "color": ("color",),
    "count": ("count_color", "count_kind", "count_all"),
    "position": ("position_kind", "position_region"),
    "relation": ("relation",),
    "text": ("text",),
    "caption": ("caption",),
}

OBJECT_GAP = 3      # min. empty pixels between two objects
BORDER_MARGIN = 2   # min. pixels between an object and the image border
MIDLINE_MARGIN = 2  # a quadrant object stays this far from the midlines
RELATION_GAP = 3    # "A left of B" means A.x1 + RELATION_GAP <= B.x0
_PLACE_TRIES = 40
_SCENE_TRIES = 60


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SceneObject:
    """One thing drawn in the image.

    ``kind`` is a shape kind or ``"text"``; ``size`` is the box side of a shape or the font size (px)
    of a text; ``region`` is one of :data:`REGIONS`.
    """

    kind: str
    color: str
    box: Box
    region: str
    size: int
    text: str | None = None

    @property
    def description(self) -> str:
        """``"red circle"`` or ``'the text "K7R"'``."""
        return f"the text {self.text}" if self.kind == "text" else f"{self.color} {self.kind}"


@dataclass(frozen=True)
class QA:
    """One question about a scene with its canonical answer and evidence boxes."""

    question: str
    answer: str
    qtype: str
    template: str
    evidence_boxes: tuple[Box, ...]


@dataclass(frozen=True)
class Sample:
    """One image with its (primary) question and all ground truth.

    ``evidence_box`` is the union of ``evidence_boxes`` (the objects that make the answer true);
    for an answer with no supporting object it is the whole image.  ``extra_qas`` holds further
    questions about the same image (``SyntheticConfig.extra_qas``), for multi-QA packing.
    """

    index: int
    image: Image.Image
    question: str
    answer: str
    qtype: str
    template: str
    objects: tuple[SceneObject, ...]
    evidence_box: Box
    evidence_boxes: tuple[Box, ...]
    caption: str
    background: str
    extra_qas: tuple[QA, ...] = ()

    @property
    def qa(self) -> QA:
        return QA(self.question, self.answer, self.qtype, self.template, self.evidence_boxes)

    @property
    def qas(self) -> tuple[QA, ...]:
        """The primary QA followed by ``extra_qas``."""
        return (self.qa,) + self.extra_qas

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels."""
        return self.image.size

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable ground truth (everything but the image)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "image"}
        out["objects"] = [asdict(o) for o in self.objects]
        out["extra_qas"] = [asdict(q) for q in self.extra_qas]
        out["size"] = list(self.size)
        return out


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SyntheticConfig:
    """Every knob of the task (all sizes in pixels).

    Image size: ``sqrt(W·H)`` is drawn in ``image_size_range``, the aspect ratio ``W/H`` from
    ``aspect_ratios``; sides are multiples of ``size_multiple`` (32 = patch 16 × merge 2: no padding
    at full resolution), the short side is at least ``min_short_side`` and ``W·H ≤ image_size_range[1]²``
    (use ``max_pixels ≥ image_size_range[1]²`` so the largest scale shows the image unresized).
    """

    image_size_range: tuple[int, int] = (64, 128)
    aspect_ratios: tuple[float, ...] = (1 / 4, 1 / 3, 1 / 2, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 2.0, 3.0, 4.0)
    size_multiple: int = 32
    min_short_side: int = 64
    question_types: tuple[str, ...] = QUESTION_TYPES
    qtype_weights: tuple[float, ...] | None = None
    shape_kinds: tuple[str, ...] = SHAPE_KINDS
    colors: tuple[str, ...] = tuple(COLORS)
    backgrounds: tuple[str, ...] = BACKGROUNDS
    object_size_range: tuple[int, int] = (16, 40)
    max_objects: int = 6
    count_range: tuple[int, int] = (1, 5)
    position_regions: tuple[str, ...] = QUADRANTS + ("center",)
    relations: tuple[str, ...] = RELATIONS   # relation words asked (a subset breaks the above/below symmetry)
    relation_weights: tuple[float, ...] | None = None   # relative frequency of each of ``relations``
    text_alphabet: str = TEXT_ALPHABET
    text_length_range: tuple[int, int] = (2, 4)
    text_sizes: tuple[int, ...] = (8, 12, 18, 26, 34)
    distractor_text_prob: float = 0.3
    max_distractor_texts: int = 1      # distractor texts tried per scene, each kept with distractor_text_prob
    extra_qas: int = 0

    def __post_init__(self) -> None:
        lo, hi = self.image_size_range
        if not (0 < lo <= hi):
            raise ConfigError(f"image_size_range must be 0 < lo <= hi, got {self.image_size_range}")
        if self.size_multiple < 1 or self.min_short_side < self.size_multiple:
            raise ConfigError(f"need 1 <= size_multiple <= min_short_side, got {self.size_multiple}, "
                              f"{self.min_short_side}")
        if self.min_short_side ** 2 > hi ** 2:
            raise ConfigError(f"min_short_side={self.min_short_side} does not fit "
                              f"image_size_range={self.image_size_range}")
        if not self.aspect_ratios or any(a <= 0 for a in self.aspect_ratios):
            raise ConfigError(f"aspect_ratios must be positive, got {self.aspect_ratios}")
        _check_subset("question_types", self.question_types, ALL_QUESTION_TYPES)
        _check_weights("qtype_weights", self.qtype_weights, self.question_types)
        _check_subset("shape_kinds", self.shape_kinds, SHAPE_KINDS)
        _check_subset("colors", self.colors, tuple(COLORS))
        _check_subset("backgrounds", self.backgrounds, BACKGROUNDS)
        _check_subset("position_regions", self.position_regions, REGIONS)
        _check_subset("relations", self.relations, RELATIONS)
        _check_weights("relation_weights", self.relation_weights, self.relations)
        if "color" in self.question_types and len(self.shape_kinds) < 2:
            raise ConfigError("color questions need >= 2 shape kinds")
        if "relation" in self.question_types and len(self.shape_kinds) * len(self.colors) < 2:
            raise ConfigError("relation questions need >= 2 distinct shape descriptions")
        smin, smax = self.object_size_range
        if not (8 <= smin <= smax):
            raise ConfigError(f"object_size_range must be 8 <= min <= max, got {self.object_size_range}")
        if smin > self.min_short_side // 3:
            raise ConfigError(f"object_size_range[0]={smin} is too large for min_short_side={self.min_short_side} "
                              f"(max {self.min_short_side // 3})")
        cmin, cmax = self.count_range
        if not (0 <= cmin <= cmax <= self.max_objects):
            raise ConfigError(f"count_range must satisfy 0 <= min <= max <= max_objects={self.max_objects}, "
                              f"got {self.count_range}")
        if self.max_objects < 2 or self.max_objects > 9:
            raise ConfigError(f"max_objects must be in [2, 9], got {self.max_objects}")
        if len(set(self.text_alphabet)) != len(self.text_alphabet) or not self.text_alphabet.isalnum():
            raise ConfigError(f"text_alphabet must be distinct letters/digits, got {self.text_alphabet!r}")
        tmin, tmax = self.text_length_range
        if not (1 <= tmin <= tmax <= 8):
            raise ConfigError(f"text_length_range must be 1 <= min <= max <= 8, got {self.text_length_range}")
        if not self.text_sizes or min(self.text_sizes) < 4:
            raise ConfigError(f"text_sizes must be font sizes >= 4 px, got {self.text_sizes}")
        if not 0.0 <= self.distractor_text_prob <= 1.0:
            raise ConfigError(f"distractor_text_prob must be in [0, 1], got {self.distractor_text_prob}")
        if not isinstance(self.max_distractor_texts, int) or not 0 <= self.max_distractor_texts <= 8:
            raise ConfigError(f"max_distractor_texts must be an integer in [0, 8], got {self.max_distractor_texts!r}")
        if self.extra_qas < 0:
            raise ConfigError(f"extra_qas must be >= 0, got {self.extra_qas}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_weights(name: str, weights: Sequence[float] | None, options: Sequence[str]) -> None:
    """``weights`` is None or one number >= 0 per option, not all 0."""
    if weights is not None and (len(weights) != len(options) or min(weights) < 0 or sum(weights) <= 0):
        raise ConfigError(f"{name} {weights} must be >= 0, one per entry of {list(options)}, not all 0")


def _cumulative(weights: Sequence[float] | None, n: int) -> list[float]:
    """Normalised cumulative weights for :meth:`_Rng.weighted` (``None`` = ``n`` equal weights)."""
    values = np.asarray(weights or [1.0] * n, dtype=float)
    return list(np.cumsum(values / values.sum()))


def _check_subset(name: str, values: Sequence[str], allowed: Sequence[str]) -> None:
    unknown = [v for v in values if v not in allowed]
    if not values or unknown or len(set(values)) != len(values):
        raise ConfigError(f"{name} must be distinct values from {list(allowed)}, got {list(values)}")


# --------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------

def _axis_side(lo: int, hi: int, extent: int) -> str:
    mid = extent / 2
    if hi <= mid:
        return "low"
    if lo >= mid:
        return "high"
    return "middle"


_REGION_OF_SIDES = {
    ("top", "left"): "top-left", ("top", "middle"): "top", ("top", "right"): "top-right",
    ("middle", "left"): "left", ("middle", "middle"): "center", ("middle", "right"): "right",
    ("bottom", "left"): "bottom-left", ("bottom", "middle"): "bottom", ("bottom", "right"): "bottom-right",
}
_SIDES_OF_REGION = {region: sides for sides, region in _REGION_OF_SIDES.items()}


def region_of(box: Box, width: int, height: int) -> str:
    """The region (:data:`REGIONS`) of a box: quadrant, edge or centre, by the image midlines."""
    x0, y0, x1, y1 = box
    h = {"low": "left", "middle": "middle", "high": "right"}[_axis_side(x0, x1, width)]
    v = {"low": "top", "middle": "middle", "high": "bottom"}[_axis_side(y0, y1, height)]
    return _REGION_OF_SIDES[(v, h)]


def region_touches(zone: str, region: str) -> bool:
    """Whether an object in ``region`` can intersect the zone named ``zone``.

    The zone of a quadrant is the quadrant, of an edge region its half-midline, of ``center`` the
    centre point; an object at ``top`` (straddling the vertical midline) touches the ``top-left``
    quadrant, an object at ``top-left`` does not touch ``center``.
    """
    (zv, zh), (ov, oh) = _SIDES_OF_REGION[zone], _SIDES_OF_REGION[region]
    return (oh == zh or oh == "middle") and (ov == zv or ov == "middle")


def _axis_range(side: str, size: int, extent: int) -> tuple[int, int]:
    """Inclusive range of the low coordinate of a ``size``-long box on one axis for a side."""
    mid = extent // 2
    if side in ("left", "top"):
        return BORDER_MARGIN, mid - MIDLINE_MARGIN - size
    if side in ("right", "bottom"):
        return mid + MIDLINE_MARGIN, extent - BORDER_MARGIN - size
    # straddle the midline by at least a quarter of the size on each side
    return max(BORDER_MARGIN, mid - size + max(1, size // 4)), min(extent - BORDER_MARGIN - size, mid - max(1, size // 4))


def union_box(boxes: Sequence[Box]) -> Box:
    """Smallest box containing all ``boxes`` (non-empty)."""
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _boxes_clear(a: Box, b: Box, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def relation_word(question: str) -> str:
    """The relation word (one of :data:`RELATIONS`) a relation question asks about."""
    for relation in RELATIONS:
        if f" {relation} the " in question:
            return relation
    raise ConfigError(f"not a relation question: {question!r}")


def relation_holds(a: Box, b: Box, relation: str) -> bool | None:
    """``True``/``False`` if box ``a`` is strictly / strictly not ``relation`` box ``b``; ``None`` if ambiguous.

    "a left of b" is true when ``a.x1 + RELATION_GAP <= b.x0`` and false when ``b.x1 + RELATION_GAP <= a.x0``
    (a is right of b); overlapping projections are ambiguous.
    """
    lo, hi = {"left of": (0, 2), "right of": (0, 2), "above": (1, 3), "below": (1, 3)}[relation]
    a_first = a[hi] + RELATION_GAP <= b[lo]
    b_first = b[hi] + RELATION_GAP <= a[lo]
    if not (a_first or b_first):
        return None
    return a_first if relation in ("left of", "above") else b_first


# --------------------------------------------------------------------------------------------------
# Randomness
# --------------------------------------------------------------------------------------------------

class _Rng:
    """Per-sample random stream: Python's Mersenne Twister seeded by ``(seed, index)``.

    Only ``random()`` is used (its output for an int seed is guaranteed across Python versions and
    platforms); integers are derived from it here, so no library algorithm change can alter data.
    Seeding costs ~6 µs (numpy's ``default_rng`` ~40 µs), which matters at thousands of samples/s.
    """

    __slots__ = ("_random",)

    def __init__(self, seed: int, index: int) -> None:
        self._random = random.Random((seed << 64) | index).random

    def random(self) -> float:
        return self._random()

    def below(self, n: int) -> int:
        """Uniform int in ``[0, n)``."""
        return int(self._random() * n)

    def integer(self, lo: int, hi: int) -> int:
        """Uniform int in ``[lo, hi]`` (inclusive)."""
        return lo + int(self._random() * (hi - lo + 1))

    def pick(self, options: Sequence[Any]) -> Any:
        return options[int(self._random() * len(options))]

    def weighted(self, cumulative: Sequence[float]) -> int:
        """Index drawn with probabilities given by normalised cumulative weights (last = 1)."""
        return min(bisect.bisect_right(cumulative, self._random()), len(cumulative) - 1)


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def font_path() -> Path:
    """DejaVu Sans Bold as shipped inside matplotlib (identical on every machine)."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
    if not path.is_file():
        raise ConfigError(f"matplotlib's DejaVuSans-Bold.ttf is missing at {path}")
    return path


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path()), size, layout_engine=ImageFont.Layout.BASIC)


def render_text_mask(text: str, font_size: int) -> Image.Image:
    """Anti-aliased ``"L"`` mask of ``text`` cropped to its ink (``mask.size`` = ink width, height)."""
    font = _font(font_size)
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(mask).text((1 - left, 1 - top), text, font=font, fill=255)
    ink = mask.getbbox()
    if ink is None:
        raise ConfigError(f"text {text!r} at {font_size}px renders no ink")
    return mask.crop(ink)


def _shape_polygon(kind: str, box: Box) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    r, b = x1 - 1, y1 - 1  # last pixel row/column inside the box
    w, h = r - x0, b - y0
    if kind == "triangle":
        return [(x0 + w / 2, y0), (r, b), (x0, b)]
    if kind == "cross":
        t0, t1 = 1 / 3, 2 / 3
        pts = [(t0, 0), (t1, 0), (t1, t0), (1, t0), (1, t1), (t1, t1),
               (t1, 1), (t0, 1), (t0, t1), (0, t1), (0, t0), (t0, t0)]
        return [(x0 + u * w, y0 + v * h) for u, v in pts]
    if kind == "star":
        raw = []
        for k in range(10):
            radius = 1.0 if k % 2 == 0 else 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            raw.append((radius * math.cos(angle), radius * math.sin(angle)))
        xs, ys = [p[0] for p in raw], [p[1] for p in raw]
        sx, sy = max(xs) - min(xs), max(ys) - min(ys)
        return [(x0 + (u - min(xs)) / sx * w, y0 + (v - min(ys)) / sy * h) for u, v in raw]
    raise ConfigError(f"unknown shape kind {kind!r}")


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: Box, rgb: tuple[int, int, int]) -> None:
    """Draw one shape filling ``box`` (no anti-aliasing, exact colour)."""
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=rgb)
    elif kind == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=rgb)
    else:
        draw.polygon(_shape_polygon(kind, box), fill=rgb)


def render_background(name: str, width: int, height: int, rng: _Rng, noise_tile: np.ndarray | None = None) -> Image.Image:
    """Light neutral ``width × height`` RGB background; textures draw their parameters from ``rng``.

    ``noisy`` crops a random window of ``noise_tile`` (``[H', W']`` uint8 grey levels, at least
    ``height × width``); without a tile it draws fresh noise (slower).
    """
    if name in PLAIN_BACKGROUNDS:
        return Image.new("RGB", (width, height), PLAIN_BACKGROUNDS[name])
    if name == "noisy":
        if noise_tile is None:
            noise_tile = _noise_tile(rng.below(2**32), height, width)
        y, x = rng.integer(0, noise_tile.shape[0] - height), rng.integer(0, noise_tile.shape[1] - width)
        gray = noise_tile[y:y + height, x:x + width]
    elif name == "striped":
        period = rng.integer(6, 16)
        yy, xx = np.arange(height)[:, None], np.arange(width)[None, :]
        coord = [xx + 0 * yy, yy + 0 * xx, xx + yy, xx - yy + height][rng.below(4)]
        gray = np.where((coord // (period // 2)) % 2 == 0, 232, 196).astype(np.uint8)
    elif name == "checkered":
        cell = rng.integer(4, 12)
        yy, xx = np.arange(height)[:, None] // cell, np.arange(width)[None, :] // cell
        gray = np.where((xx + yy) % 2 == 0, 236, 204).astype(np.uint8)
    else:
        raise ConfigError(f"unknown background {name!r}; known: {list(BACKGROUNDS)}")
    return Image.fromarray(gray, "L").convert("RGB")


def _noise_tile(seed: int, height: int, width: int) -> np.ndarray:
    """``[height, width]`` uint8 grey noise in [185, 245], fixed by ``seed``."""
    return np.random.default_rng(seed).integers(185, 246, size=(height, width), dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# Scene building
# --------------------------------------------------------------------------------------------------

@dataclass
class _Scene:
    width: int
    height: int
    objects: list[SceneObject] = field(default_factory=list)
    text_masks: dict[int, Image.Image] = field(default_factory=dict)  # object index -> ink mask

    @property
    def shapes(self) -> list[SceneObject]:
        return [o for o in self.objects if o.kind != "text"]

    def is_free(self, box: Box) -> bool:
        return all(_boxes_clear(box, o.box, OBJECT_GAP) for o in self.objects)


class _SceneFailed(Exception):
    pass


@functools.lru_cache(maxsize=4096)
def _glyph_extent(char: str, font_size: int) -> tuple[float, int]:
    """(advance, ink height bound) of one character: ``Σ advance + font_size`` bounds a string's ink width."""
    font = _font(font_size)
    left, top, right, bottom = font.getbbox(char)
    return max(font.getlength(char), right - left), bottom - top


def _text_fits(text: str, font_size: int, scene: _Scene) -> bool:
    """Conservative (cheap) test that ``text`` at ``font_size`` fits inside the border margins."""
    extents = [_glyph_extent(c, font_size) for c in text]
    width = sum(e[0] for e in extents) + font_size
    height = max(e[1] for e in extents) + 2
    return width <= scene.width - 2 * BORDER_MARGIN and height <= scene.height - 2 * BORDER_MARGIN


class SyntheticVQA:
    """Deterministic synthetic VQA generator; ``sample(index)`` depends only on ``(seed, index, config)``.

    Args:
        seed: stream seed (use a different seed per split, e.g. 0 = train, 1 = eval).
        config: a :class:`SyntheticConfig`; keyword ``overrides`` replace its fields, e.g.
            ``SyntheticVQA(0, question_types=("color", "count"), image_size_range=(96, 160))``.

    Indexing is random access (``data[i]`` ≡ ``data.sample(i)``), so a training run resumes from a
    sample index and workers shard by index.
    """

    def __init__(self, seed: int = 0, config: SyntheticConfig | None = None, **overrides: Any) -> None:
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
        try:
            self.config = replace(config or SyntheticConfig(), **overrides)
        except TypeError as err:
            raise ConfigError(f"unknown SyntheticConfig field in {sorted(overrides)}: {err}") from None
        self.seed = int(seed)
        cfg = self.config
        self._qtype_cum = _cumulative(cfg.qtype_weights, len(cfg.question_types))
        self._relation_cum = _cumulative(cfg.relation_weights, len(cfg.relations))
        self._sizes = self._image_sizes()
        max_h, max_w = max(h for _, h in self._sizes), max(w for w, _ in self._sizes)
        self._noise = _noise_tile(self.seed, max_h + 64, max_w + 64)

    # ---- public API ------------------------------------------------------------------------------

    def sample(self, index: int) -> Sample:
        """The sample at ``index`` (any non-negative int)."""
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise IndexError(f"sample index must be a non-negative int, got {index!r}")
        rng = _Rng(self.seed, int(index))
        cfg = self.config
        qtype = cfg.question_types[rng.weighted(self._qtype_cum)]
        width, height = rng.pick(self._sizes)
        background = rng.pick(cfg.backgrounds)
        scene, qa = self._build(rng, qtype, width, height)
        image = self._render(scene, background, rng)
        caption = make_caption(scene.objects, background)
        if qtype == "caption":
            qa = QA(TEMPLATES["caption"], caption, "caption", "caption", tuple(o.box for o in scene.objects))
        extra = self._extra_qas(rng, scene, qa) if cfg.extra_qas else ()
        objects = tuple(sorted(scene.objects, key=lambda o: (o.box[1], o.box[0])))
        evidence = union_box(qa.evidence_boxes) if qa.evidence_boxes else (0, 0, width, height)
        return Sample(
            index=int(index), image=image, question=qa.question, answer=qa.answer, qtype=qa.qtype,
            template=qa.template, objects=objects, evidence_box=evidence, evidence_boxes=qa.evidence_boxes,
            caption=caption, background=background, extra_qas=extra,
        )

    __getitem__ = sample

    def iter_samples(self, start: int = 0, stop: int | None = None, step: int = 1) -> Iterator[Sample]:
        """Samples ``start, start+step, …`` (up to ``stop``, forever if ``None``); ``step`` shards workers."""
        index = start
        while stop is None or index < stop:
            yield self.sample(index)
            index += step

    def answer_space(self, template: str) -> tuple[str, ...]:
        """All answers a sub-type can produce (``()`` for open-ended text and captions)."""
        cfg = self.config
        lo, hi = cfg.count_range
        spaces = {
            "color": tuple(cfg.colors), "count_color": tuple(str(k) for k in range(lo, hi + 1)),
            "count_kind": tuple(str(k) for k in range(lo, hi + 1)), "count_all": tuple(str(k) for k in range(lo, hi + 1)),
            "position_kind": tuple(cfg.shape_kinds), "position_region": tuple(cfg.position_regions),
            "relation": ("yes", "no"), "text": (), "caption": (),
        }
        if template not in spaces:
            raise ConfigError(f"unknown template {template!r}; known: {sorted(spaces)}")
        return spaces[template]

    def vocabulary_texts(self) -> list[str]:
        """Every word form the task can emit (templates filled with every option): tokenizer corpus."""
        cfg = self.config
        texts = [TEMPLATES["count_all"], TEMPLATES["text"], TEMPLATES["caption"]]
        texts += [TEMPLATES["color"].format(kind=k) for k in cfg.shape_kinds]
        texts += [TEMPLATES["count_color"].format(color=c) for c in cfg.colors]
        texts += [TEMPLATES["count_kind"].format(kinds=KIND_PLURALS[k]) for k in cfg.shape_kinds]
        texts += [TEMPLATES["position_kind"].format(region=r) for r in REGIONS]
        texts += [TEMPLATES["position_region"].format(color=c, kind=k) for c in cfg.colors for k in cfg.shape_kinds]
        texts += [TEMPLATES["relation"].format(color=c, kind=k, relation=r, color2=c, kind2=k)
                  for c in cfg.colors for k in cfg.shape_kinds for r in RELATIONS]
        texts += list(cfg.colors) + list(cfg.shape_kinds) + list(REGIONS) + ["yes", "no"]
        texts += [str(k) for k in range(10)] + list(cfg.text_alphabet)
        texts += [make_caption([SceneObject("text", TEXT_COLOR_NAME, (0, 0, 1, 1), r, 8, cfg.text_alphabet[:2])], bg)
                  for bg in cfg.backgrounds for r in REGIONS]
        texts += [make_caption([SceneObject(k, c, (0, 0, 16, 16), "center", 16)], "white")
                  for c in cfg.colors for k in cfg.shape_kinds]
        return texts

    # ---- sizes -----------------------------------------------------------------------------------

    def _image_sizes(self) -> list[tuple[int, int]]:
        """All admissible ``(W, H)`` (drawn uniformly; multiples of ``size_multiple``)."""
        cfg = self.config
        lo, hi = cfg.image_size_range
        m = cfg.size_multiple
        sizes = set()
        for w in range(m, 16 * hi + 1, m):
            for h in range(m, 16 * hi + 1, m):
                if min(w, h) < cfg.min_short_side or w * h > hi * hi or w * h < (lo - m / 2) ** 2:
                    continue
                if any(abs(math.log(w / h) - math.log(a)) <= math.log(1.25) for a in cfg.aspect_ratios):
                    sizes.add((w, h))
        if not sizes:
            raise ConfigError(f"no image size fits image_size_range={cfg.image_size_range}, aspect_ratios="
                              f"{cfg.aspect_ratios}, size_multiple={m}, min_short_side={cfg.min_short_side}")
        return sorted(sizes)

    # ---- scenes ----------------------------------------------------------------------------------

    def _shape_size(self, rng: _Rng, scene: _Scene, attempt: int) -> int:
        smin, smax = self.config.object_size_range
        smax = max(smin, min(smax, min(scene.width, scene.height) // 3))
        if attempt >= _SCENE_TRIES // 2:  # crowded scene: fall back to the smallest shapes
            smax = smin
        return rng.integer(smin, smax)

    def _place(self, rng: _Rng, scene: _Scene, size: tuple[int, int],
               regions: Sequence[str], accept: Callable[[Box], bool] | None = None) -> Box | None:
        """A free box of ``size`` (w, h) inside one of ``regions`` (drawn per try), or ``None``."""
        w, h = size
        for _ in range(_PLACE_TRIES):
            region = rng.pick(regions)
            v, hz = _SIDES_OF_REGION[region]
            x_lo, x_hi = _axis_range(hz, w, scene.width)
            y_lo, y_hi = _axis_range(v, h, scene.height)
            if x_lo > x_hi or y_lo > y_hi:
                continue
            x, y = rng.integer(x_lo, x_hi), rng.integer(y_lo, y_hi)
            box = (x, y, x + w, y + h)
            if scene.is_free(box) and (accept is None or accept(box)):
                return box
        return None

    def _add_shape(self, rng, scene, kind, color, attempt, regions=REGIONS, accept=None,
                   required=True) -> SceneObject | None:
        s = self._shape_size(rng, scene, attempt)
        box = self._place(rng, scene, (s, s), regions, accept)
        if box is None:
            if required:
                raise _SceneFailed
            return None
        obj = SceneObject(kind, color, box, region_of(box, scene.width, scene.height), s)
        scene.objects.append(obj)
        return obj

    def _add_text(self, rng, scene, text, regions=REGIONS, required=True) -> SceneObject | None:
        cfg = self.config
        fitting = [size for size in cfg.text_sizes if _text_fits(text, size, scene)]
        if not fitting:
            if required:
                raise ConfigError(f"text {text!r} fits no size of {cfg.text_sizes} in a {scene.width}x{scene.height} image")
            return None
        size = rng.pick(fitting)
        mask = render_text_mask(text, size)
        box = None
        for _ in range(_PLACE_TRIES):
            x = rng.integer(BORDER_MARGIN, scene.width - BORDER_MARGIN - mask.size[0])
            y = rng.integer(BORDER_MARGIN, scene.height - BORDER_MARGIN - mask.size[1])
            candidate = (x, y, x + mask.size[0], y + mask.size[1])
            if scene.is_free(candidate) and region_of(candidate, scene.width, scene.height) in regions:
                box = candidate
                break
        if box is None:
            if required:
                raise _SceneFailed
            return None
        obj = SceneObject("text", TEXT_COLOR_NAME, box, region_of(box, scene.width, scene.height), size, text)
        scene.text_masks[len(scene.objects)] = mask
        scene.objects.append(obj)
        return obj

    def _random_text(self, rng: _Rng) -> str:
        lo, hi = self.config.text_length_range
        n = rng.integer(lo, hi)
        alphabet = self.config.text_alphabet
        return "".join(rng.pick(alphabet) for _ in range(n))

    def _distractors(self, rng, scene, attempt, allowed: Callable[[str, str], bool], max_new: int,
                     regions: Sequence[str] = REGIONS, text_regions: Sequence[str] = REGIONS, text: bool = True) -> None:
        """Add up to ``max_new`` random shapes with ``allowed(kind, color)``, and maybe distractor texts (up to
        ``max_distractor_texts`` tries, each with ``distractor_text_prob``; one that finds no free place is
        dropped)."""
        cfg = self.config
        options = [(k, c) for k in cfg.shape_kinds for c in cfg.colors if allowed(k, c)]
        n = rng.integer(0, max_new) if options else 0
        for _ in range(n):
            kind, color = rng.pick(options)
            self._add_shape(rng, scene, kind, color, attempt, regions, required=False)
        for _ in range(cfg.max_distractor_texts if text else 0):
            if rng.random() < cfg.distractor_text_prob:
                self._add_text(rng, scene, self._random_text(rng), text_regions, required=False)

    def _build(self, rng: _Rng, qtype: str, width: int, height: int) -> tuple[_Scene, QA]:
        builder = getattr(self, f"_build_{qtype}")
        for attempt in range(_SCENE_TRIES):
            scene = _Scene(width, height)
            try:
                qa = builder(rng, scene, attempt)
            except _SceneFailed:
                continue
            return scene, qa
        raise ConfigError(f"could not build a {qtype!r} scene in a {width}x{height} image after {_SCENE_TRIES} "
                          "attempts; relax object_size_range / max_objects / count_range")

    def _pick(self, rng: _Rng, options: Sequence[Any]) -> Any:
        return rng.pick(options)

    def _build_color(self, rng, scene, attempt) -> QA:
        cfg = self.config
        color, kind = self._pick(rng, cfg.colors), self._pick(rng, cfg.shape_kinds)
        target = self._add_shape(rng, scene, kind, color, attempt)
        self._distractors(rng, scene, attempt, lambda k, c: k != kind, cfg.max_objects - 1)
        return QA(TEMPLATES["color"].format(kind=kind), color, "color", "color", (target.box,))

    def _build_count(self, rng, scene, attempt) -> QA:
        cfg = self.config
        lo, hi = cfg.count_range
        template = self._pick(rng, SUBTYPES["count"])
        answer = rng.integer(lo, hi)
        if template == "count_color":
            color = self._pick(rng, cfg.colors)
            match = lambda k, c: c == color  # noqa: E731
            question = TEMPLATES[template].format(color=color)
        elif template == "count_kind":
            kind = self._pick(rng, cfg.shape_kinds)
            match = lambda k, c: k == kind  # noqa: E731
            question = TEMPLATES[template].format(kinds=KIND_PLURALS[kind])
        else:
            match = lambda k, c: True  # noqa: E731
            question = TEMPLATES[template]
        targets = [(k, c) for k in cfg.shape_kinds for c in cfg.colors if match(k, c)]
        boxes = []
        for _ in range(answer):
            kind, color = self._pick(rng, targets)
            boxes.append(self._add_shape(rng, scene, kind, color, attempt).box)
        self._distractors(rng, scene, attempt, lambda k, c: not match(k, c), cfg.max_objects - answer)
        return QA(question, str(answer), "count", template, tuple(boxes))

    def _build_position(self, rng, scene, attempt) -> QA:
        cfg = self.config
        template = self._pick(rng, SUBTYPES["position"])
        kind, color = self._pick(rng, cfg.shape_kinds), self._pick(rng, cfg.colors)
        region = self._pick(rng, cfg.position_regions)
        target = self._add_shape(rng, scene, kind, color, attempt, (region,))
        if template == "position_kind":
            free = [r for r in REGIONS if not region_touches(region, r)]
            self._distractors(rng, scene, attempt, lambda k, c: True, cfg.max_objects - 1, free, free)
            return QA(TEMPLATES[template].format(region=region), kind, "position", template, (target.box,))
        self._distractors(rng, scene, attempt, lambda k, c: (k, c) != (kind, color), cfg.max_objects - 1)
        return QA(TEMPLATES[template].format(color=color, kind=kind), region, "position", template, (target.box,))

    def _build_relation(self, rng, scene, attempt) -> QA:
        cfg = self.config
        relation = (self._pick(rng, cfg.relations) if cfg.relation_weights is None
                    else cfg.relations[rng.weighted(self._relation_cum)])
        answer = rng.below(2) == 1
        pairs = [(k, c) for k in cfg.shape_kinds for c in cfg.colors]
        (k1, c1) = self._pick(rng, pairs)
        (k2, c2) = self._pick(rng, [p for p in pairs if p != (k1, c1)])
        a = self._add_shape(rng, scene, k1, c1, attempt)
        b = self._add_shape(rng, scene, k2, c2, attempt, accept=lambda box: relation_holds(a.box, box, relation) is answer)
        self._distractors(rng, scene, attempt, lambda k, c: (k, c) not in ((k1, c1), (k2, c2)), cfg.max_objects - 2)
        question = TEMPLATES["relation"].format(color=c1, kind=k1, relation=relation, color2=c2, kind2=k2)
        return QA(question, "yes" if answer else "no", "relation", "relation", (a.box, b.box))

    def _build_text(self, rng, scene, attempt) -> QA:
        target = self._add_text(rng, scene, self._random_text(rng))
        self._distractors(rng, scene, attempt, lambda k, c: True, self.config.max_objects - 1, text=False)
        return QA(TEMPLATES["text"], target.text, "text", "text", (target.box,))

    def _build_caption(self, rng, scene, attempt) -> QA:
        self._distractors(rng, scene, attempt, lambda k, c: True, self.config.max_objects)
        return QA(TEMPLATES["caption"], "", "caption", "caption", ())  # answer filled in by sample()

    # ---- extra questions about the same scene -----------------------------------------------------

    def _extra_qas(self, rng: _Rng, scene: _Scene, primary: QA) -> tuple[QA, ...]:
        """Up to ``extra_qas`` further questions about ``scene``: qtype drawn uniformly among those
        the scene supports, then a question of that type; no question repeats."""
        by_type: dict[str, list[QA]] = {}
        for qa in enumerate_questions(scene.objects, scene.width, scene.height, self.config):
            if qa.question != primary.question and qa.qtype in self.config.question_types \
                    and self._keep_relation(rng, qa):
                by_type.setdefault(qa.qtype, []).append(qa)
        out: list[QA] = []
        while by_type and len(out) < self.config.extra_qas:
            qtype = rng.pick(sorted(by_type))
            candidates = by_type[qtype]
            out.append(candidates.pop(rng.below(len(candidates))))
            if not candidates:
                del by_type[qtype]
        return tuple(out)

    def _keep_relation(self, rng: _Rng, qa: QA) -> bool:
        """With ``relation_weights``, keep a relation question with probability weight / max weight."""
        weights = self.config.relation_weights
        if weights is None or qa.qtype != "relation":
            return True
        return rng.random() * max(weights) < weights[self.config.relations.index(relation_word(qa.question))]

    # ---- rendering -------------------------------------------------------------------------------

    def _render(self, scene: _Scene, background: str, rng: _Rng) -> Image.Image:
        image = render_background(background, scene.width, scene.height, rng, self._noise)
        draw = ImageDraw.Draw(image)
        for i, obj in enumerate(scene.objects):
            if obj.kind == "text":
                image.paste(TEXT_COLOR, obj.box, scene.text_masks[i])
            else:
                draw_shape(draw, obj.kind, obj.box, COLORS[obj.color])
        return image


# --------------------------------------------------------------------------------------------------
# Ground truth from a scene
# --------------------------------------------------------------------------------------------------

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(objects: Sequence[SceneObject], background: str) -> str:
    """Canonical caption: ``"A white background with a red circle at the top-left and the text K7 at the bottom."``

    Objects are listed in reading order of their regions (then left to right).
    """
    order = sorted(objects, key=lambda o: (REGIONS.index(o.region), o.box[0], o.box[1]))
    parts = [(f"the text {o.text}" if o.kind == "text" else f"{_article(o.color)} {o.color} {o.kind}")
             + f" at the {o.region}" for o in order]
    if not parts:
        return f"A {background} background."
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"A {background} background with {listed}."


def enumerate_questions(objects: Sequence[SceneObject], width: int, height: int,
                        config: SyntheticConfig | None = None) -> list[QA]:
    """Every well-defined question (of the exact-match types) that a scene answers.

    Used for multi-QA packing and as an independent check of the generator's ground truth.
    """
    cfg = config or SyntheticConfig()
    shapes = [o for o in objects if o.kind != "text"]
    texts = [o for o in objects if o.kind == "text"]
    lo, hi = cfg.count_range
    out: list[QA] = []
    kinds = Counter(o.kind for o in shapes)
    for o in shapes:
        if kinds[o.kind] == 1:
            out.append(QA(TEMPLATES["color"].format(kind=o.kind), o.color, "color", "color", (o.box,)))
    counts = [("count_color", TEMPLATES["count_color"].format(color=c), lambda o, c=c: o.color == c) for c in cfg.colors]
    counts += [("count_kind", TEMPLATES["count_kind"].format(kinds=KIND_PLURALS[k]), lambda o, k=k: o.kind == k)
               for k in cfg.shape_kinds]
    counts.append(("count_all", TEMPLATES["count_all"], lambda o: True))
    for template, question, match in counts:
        boxes = tuple(o.box for o in shapes if match(o))
        if lo <= len(boxes) <= hi:
            out.append(QA(question, str(len(boxes)), "count", template, boxes))
    for region in cfg.position_regions:
        touching = [o for o in objects if region_touches(region, o.region)]
        if len(touching) == 1 and touching[0].kind != "text" and touching[0].region == region:
            o = touching[0]
            out.append(QA(TEMPLATES["position_kind"].format(region=region), o.kind, "position", "position_kind", (o.box,)))
    descriptions = Counter((o.color, o.kind) for o in shapes)
    unique = [o for o in shapes if descriptions[(o.color, o.kind)] == 1]
    for o in unique:
        if o.region in cfg.position_regions:
            out.append(QA(TEMPLATES["position_region"].format(color=o.color, kind=o.kind), o.region, "position",
                          "position_region", (o.box,)))
    for a in unique:
        for b in unique:
            if a is b:
                continue
            for relation in cfg.relations:
                holds = relation_holds(a.box, b.box, relation)
                if holds is not None:
                    question = TEMPLATES["relation"].format(color=a.color, kind=a.kind, relation=relation,
                                                            color2=b.color, kind2=b.kind)
                    out.append(QA(question, "yes" if holds else "no", "relation", "relation", (a.box, b.box)))
    if len(texts) == 1:
        out.append(QA(TEMPLATES["text"], texts[0].text, "text", "text", (texts[0].box,)))
    return out
