"""Seeded synthetic pictures of coloured shapes, with questions and canonical answers.

This is the data the built-in demonstration model (``models/tritonvlm-shapes-demo``) is trained and
evaluated on. A :class:`Scene` is a plain background (optionally with pixel noise) holding one to three
shapes of different kinds (:data:`SHAPES`), each in one of :data:`COLOURS`, laid out left to right in
separate columns so that "left of" and "right of" are never ambiguous. A :class:`Sample` is one
question about one or two scenes, with its answer written from a fixed template, so an exact string
match is a meaningful score.

Sizes are chosen for Qwen2.5-VL's image processor (patch 14, merge 2): image sides are usually
multiples of 28 (no resampling; a 112x112 picture becomes 16 vision tokens) and a shape is 40 to 60
pixels across, i.e. three to four patches, large enough for a tiny vision tower to tell the kinds apart.

Everything is deterministic: :func:`make_sample` with the same ``(seed, index)`` draws the same
pictures and question on every machine (Python's ``random`` and NumPy's ``PCG64`` are both portable).

Question types (:data:`QUESTION_TYPES`), with their canonical questions:

- ``describe``: "What is in this image?" → "A red circle and a blue square." (shapes left to right)
- ``colour``: "What colour is the circle?" → "The circle is red."
- ``count``: "How many shapes are in this image?" → "There are two shapes."
- ``position``: "Which shape is to the left of the square?" → "The red circle."
- ``two_images``: "Describe the first image in one sentence, and then describe the second image in
  another sentence." → "The first image shows a red circle. The second image shows a green star and a
  blue square."
"""

from __future__ import annotations

import base64
import io
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUNDS",
    "CANONICAL_QUESTIONS",
    "COLOURS",
    "QUESTION_TYPES",
    "SHAPES",
    "Sample",
    "Scene",
    "ShapeSpec",
    "describe_shapes",
    "generate",
    "make_sample",
    "make_scene",
    "random_scene",
    "to_data_url",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

# Fill colours (RGB). Each drawn shape gets a little per-channel jitter around its colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 215, 20),
    "purple": (135, 45, 180),
    "orange": (250, 135, 10),
}

# Light, neutral backgrounds, far from every fill colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light grey": (222, 222, 222),
    "cream": (245, 240, 222),
    "pale blue": (228, 236, 244),
}

QUESTION_TYPES: tuple[str, ...] = ("describe", "colour", "count", "position", "two_images")

CANONICAL_QUESTIONS: dict[str, str] = {
    "describe": "What is in this image?",
    "colour": "What colour is the {shape}?",
    "count": "How many shapes are in this image?",
    "position": "Which shape is to the {side} of the {shape}?",
    "two_images": (
        "Describe the first image in one sentence, and then describe the second image in another sentence."
    ),
}

# Other wordings used in training (``paraphrase=True``) so the model is not tied to one phrasing.
_PARAPHRASES: dict[str, tuple[str, ...]] = {
    "describe": (
        "What is in this image?",
        "What do you see in this image?",
        "Describe this image.",
        "What shapes are in this picture?",
        "What is in this picture?",
    ),
    "colour": ("What colour is the {shape}?", "What color is the {shape}?", "Which colour is the {shape}?"),
    "count": ("How many shapes are in this image?", "How many shapes are there?", "Count the shapes."),
    "position": ("Which shape is to the {side} of the {shape}?", "What is to the {side} of the {shape}?"),
    "two_images": (
        "Describe the first image in one sentence, and then describe the second image in another sentence.",
        "describe the first image in one sentence, and then describe the second image in another sentence",
        "Describe each image in one sentence.",
        "Describe the two images.",
    ),
}

_NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}

# Geometry, in pixels. Shapes sit in equal-width columns (one per shape) with a margin around them.
SHAPE_MIN = 40
SHAPE_MAX = 60
_MARGIN = 6
_GRID = 28  # patch 14 x merge 2: sides that are multiples of 28 are not resampled by the processor
_SIDE_MIN = 112  # smallest image side (16 vision tokens for 112x112)
_NOISE_SIGMA = 14.0


@dataclass(frozen=True)
class ShapeSpec:
    """One drawn shape: its kind, colour name and bounding box (``x``, ``y`` top-left, ``size`` side)."""

    kind: str
    colour: str
    x: int
    y: int
    size: int

    @property
    def center_x(self) -> float:
        """Horizontal centre in pixels (shapes are ordered by it)."""
        return self.x + self.size / 2

    @property
    def phrase(self) -> str:
        """``"red circle"``."""
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """A picture to draw: size, background, noise and shapes (ordered left to right)."""

    width: int
    height: int
    background: str
    noise_seed: int | None  # None: plain background; else the seed of the pixel noise
    shapes: tuple[ShapeSpec, ...]
    fills: tuple[tuple[int, int, int], ...]  # the jittered RGB fill of each shape

    def render(self) -> Image.Image:
        """The scene as an RGB Pillow image (deterministic)."""
        img = Image.new("RGB", (self.width, self.height), BACKGROUNDS[self.background])
        if self.noise_seed is not None:
            rng = np.random.Generator(np.random.PCG64(self.noise_seed))
            base = np.asarray(img, dtype=np.float32)
            noise = rng.normal(0.0, _NOISE_SIGMA, size=(self.height, self.width, 1)).astype(np.float32)
            img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        for shape, fill in zip(self.shapes, self.fills, strict=True):
            _draw_shape(draw, shape, fill)
        return img

    def render_mask(self) -> Image.Image:
        """A label map (mode ``L``): 0 for background, ``i + 1`` where ``shapes[i]`` is drawn on top."""
        img = Image.new("L", (self.width, self.height), 0)
        draw = ImageDraw.Draw(img)
        for i, shape in enumerate(self.shapes):
            _draw_shape(draw, shape, i + 1)
        return img

    def describe(self) -> str:
        """``"a red circle and a blue square"`` (lower case, no full stop; shapes left to right)."""
        return describe_shapes(self.shapes)


def describe_shapes(shapes: tuple[ShapeSpec, ...] | list[ShapeSpec]) -> str:
    """Shapes as an English list: "a red circle", "an orange circle and a blue star", "a, b and c"."""
    parts = [f"{'an' if s.colour[0] in 'aeiou' else 'a'} {s.phrase}" for s in shapes]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _star_points(cx: float, cy: float, radius: float, inner_ratio: float = 0.42) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * inner_ratio
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def _draw_shape(draw: ImageDraw.ImageDraw, shape: ShapeSpec, fill: tuple[int, int, int] | int) -> None:
    x0, y0, s = shape.x, shape.y, shape.size
    x1, y1 = x0 + s - 1, y0 + s - 1
    if shape.kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape.kind == "square":
        inset = round(s * 0.08)  # a square the same area-ish as the circle
        draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=fill)
    elif shape.kind == "triangle":
        draw.polygon([(x0 + s / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape.kind == "star":
        # The star's points reach the box edges; its centre sits a little low so it fills the box.
        draw.polygon(_star_points(x0 + s / 2, y0 + s * 0.53, s * 0.52), fill=fill)
    else:  # pragma: no cover - guarded by random_scene
        raise ValueError(f"unknown shape {shape.kind!r}")


def _pick_side(rng: random.Random, low: int, high: int, snap: bool) -> int:
    if snap:
        return _GRID * rng.randint(math.ceil(low / _GRID), high // _GRID)
    return rng.randint(low, high)


def random_scene(rng: random.Random, n_shapes: int | None = None, noise: bool | None = None) -> Scene:
    """Draw a random scene: 1-3 shapes of different kinds, random colours, sizes, positions and size.

    The image is wide enough for one column of at least ``SHAPE_MAX + 2 * margin`` pixels per shape;
    each shape sits at a random place inside its own column, so the left-to-right order is the column
    order. Three in four images have sides that are multiples of 28 (the processor's grid), the rest any
    size in the same range (the processor then resamples slightly).
    """
    n = rng.randint(1, 3) if n_shapes is None else n_shapes
    if not 1 <= n <= len(SHAPES) - 1:
        raise ValueError(f"n_shapes must be 1..{len(SHAPES) - 1}, got {n}")
    column_min = SHAPE_MAX + 2 * _MARGIN
    snap = rng.random() < 0.75
    width = _pick_side(rng, max(_SIDE_MIN, n * column_min), max(_SIDE_MIN, n * column_min) + 56, snap)
    height = _pick_side(rng, _SIDE_MIN, _SIDE_MIN + 56, snap)
    kinds = rng.sample(SHAPES, n)
    colours = [rng.choice(list(COLOURS)) for _ in range(n)]
    column = width / n
    shapes = []
    for i, (kind, colour) in enumerate(zip(kinds, colours, strict=True)):
        size = rng.randint(SHAPE_MIN, SHAPE_MAX)
        left = int(i * column) + _MARGIN
        right = int((i + 1) * column) - _MARGIN - size
        x = rng.randint(left, max(left, right))
        y = rng.randint(_MARGIN, height - _MARGIN - size)
        shapes.append(ShapeSpec(kind, colour, x, y, size))
    fills = tuple(
        tuple(int(min(255, max(0, c + rng.randint(-18, 18)))) for c in COLOURS[s.colour]) for s in shapes
    )
    background = rng.choice(list(BACKGROUNDS))
    noisy = rng.random() < 0.5 if noise is None else noise
    noise_seed = rng.getrandbits(32) if noisy else None
    return Scene(width, height, background, noise_seed, tuple(shapes), fills)  # type: ignore[arg-type]


def make_scene(
    items: list[tuple[str, str]],
    width: int | None = None,
    height: int = 140,
    background: str = "white",
    noise_seed: int | None = None,
    size: int = 52,
) -> Scene:
    """A scene with exactly the given ``(colour, kind)`` shapes, left to right, centred in their columns.

    ``width`` defaults to the smallest multiple of 28 that fits the shapes. For tests and examples:
    ``make_scene([("red", "circle"), ("blue", "square")])``.
    """
    n = len(items)
    column_min = SHAPE_MAX + 2 * _MARGIN
    if width is None:
        width = _GRID * math.ceil(max(_SIDE_MIN, n * column_min) / _GRID)
    if not 1 <= n <= len(SHAPES) - 1 or len({kind for _, kind in items}) != n:
        raise ValueError("a scene holds 1 to 3 shapes of different kinds")
    column = width / n
    shapes = []
    for i, (colour, kind) in enumerate(items):
        if colour not in COLOURS or kind not in SHAPES:
            raise ValueError(f"unknown colour or shape: {colour!r} {kind!r}")
        x = int(i * column + (column - size) / 2)
        shapes.append(ShapeSpec(kind, colour, x, (height - size) // 2, size))
    fills = tuple(COLOURS[colour] for colour, _ in items)
    return Scene(width, height, background, noise_seed, tuple(shapes), fills)


@dataclass
class Sample:
    """One question about one or two scenes, with its canonical answer.

    ``images`` are rendered lazily (``Sample.images``); ``text_first`` says whether the question comes
    before the image parts in the user message.
    """

    qtype: str
    question: str
    answer: str
    scenes: tuple[Scene, ...]
    text_first: bool = True
    _images: list[Image.Image] | None = field(default=None, repr=False, compare=False)

    @property
    def images(self) -> list[Image.Image]:
        """The scenes as RGB Pillow images (rendered once)."""
        if self._images is None:
            self._images = [scene.render() for scene in self.scenes]
        return self._images

    def content(self, image_parts: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """The user message's content parts: the question and one part per image, in order.

        ``image_parts`` replaces the default ``{"type": "image"}`` placeholders (e.g. with OpenAI
        ``image_url`` parts).
        """
        parts = image_parts if image_parts is not None else [{"type": "image"} for _ in self.scenes]
        text = [{"type": "text", "text": self.question}]
        return text + parts if self.text_first else parts + text

    def messages(self, image_parts: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """A one-turn conversation (no system message: the chat template adds its default one)."""
        return [{"role": "user", "content": self.content(image_parts)}]


def _question(rng: random.Random, qtype: str, paraphrase: bool, **fmt: str) -> str:
    template = rng.choice(_PARAPHRASES[qtype]) if paraphrase else CANONICAL_QUESTIONS[qtype]
    return template.format(**fmt)


def make_sample(
    seed: int,
    index: int,
    qtype: str | None = None,
    paraphrase: bool = False,
    text_first: bool | None = None,
    weights: tuple[float, ...] | None = None,
) -> Sample:
    """The ``index``-th sample of the stream ``seed`` (the same on every call and machine).

    ``qtype`` picks the question type (default: at random, uniformly or with ``weights``, one per
    entry of :data:`QUESTION_TYPES`). ``paraphrase`` draws the question
    from several wordings instead of the canonical one; ``text_first`` puts the question before the
    images (default: the canonical order, question first, unless ``paraphrase`` is set, where it is
    random).
    """
    rng = random.Random(seed * 1_000_003 + index)
    kind = qtype if qtype is not None else rng.choices(QUESTION_TYPES, weights=weights)[0]
    if kind not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {kind!r}; use one of {QUESTION_TYPES}")
    order = text_first if text_first is not None else (rng.random() < 0.5 if paraphrase else True)
    if kind == "describe":
        scene = random_scene(rng)
        answer = _capitalise(scene.describe()) + "."
        return Sample(kind, _question(rng, kind, paraphrase), answer, (scene,), order)
    if kind == "colour":
        scene = random_scene(rng)
        target = rng.choice(scene.shapes)
        question = _question(rng, kind, paraphrase, shape=target.kind)
        return Sample(kind, question, f"The {target.kind} is {target.colour}.", (scene,), order)
    if kind == "count":
        scene = random_scene(rng)
        n = len(scene.shapes)
        answer = "There is one shape." if n == 1 else f"There are {_NUMBER_WORDS[n]} shapes."
        return Sample(kind, _question(rng, kind, paraphrase), answer, (scene,), order)
    if kind == "position":
        scene = random_scene(rng, n_shapes=rng.randint(2, 3))
        shapes = scene.shapes
        # Only pairs with a unique answer: the reference's neighbour on the side with one shape.
        options = [("left", 1), ("right", len(shapes) - 2)]
        side, ref = rng.choice(options)
        other = shapes[ref - 1] if side == "left" else shapes[ref + 1]
        question = _question(rng, kind, paraphrase, side=side, shape=shapes[ref].kind)
        return Sample(kind, question, f"The {other.phrase}.", (scene,), order)
    first, second = random_scene(rng), random_scene(rng)
    answer = f"The first image shows {first.describe()}. The second image shows {second.describe()}."
    return Sample(kind, _question(rng, kind, paraphrase), answer, (first, second), order)


def generate(seed: int, n: int, qtype: str | None = None, paraphrase: bool = False) -> list[Sample]:
    """``n`` samples of the stream ``seed`` (indices 0..n-1), all of ``qtype`` if given."""
    return [make_sample(seed, i, qtype, paraphrase) for i in range(n)]


def to_data_url(image: Image.Image) -> str:
    """The image as a ``data:image/png;base64,...`` URL (what an OpenAI client sends)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
