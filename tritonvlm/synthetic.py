"""Seeded synthetic pictures of coloured shapes, with questions and canonical answers.

This is the data the built-in demonstration model (``models/tritonvlm-shapes-demo``) is trained and
evaluated on. A :class:`Scene` is a plain background (optionally with pixel noise) holding one to three
shapes of different kinds (:data:`SHAPES`), each in one of :data:`COLOURS`, laid out left to right in
separate columns so that "left of" and "right of" are never ambiguous. A :class:`Sample` is one
question about one or two scenes, with its answer written from a fixed template, so an exact string
match is a meaningful score.

Sizes are chosen for Qwen2.5-VL's image processor (patch 14, merge 2): classic image sides are usually
multiples of 28 (no resampling; a 112x112 picture becomes 16 vision tokens) and a shape is 40 to 60
pixels across, i.e. three to four patches, large enough for a tiny vision tower to tell the kinds apart.

Two styles of picture. *Classic* scenes (:func:`random_scene`, the default of :func:`make_sample`) are
the above: one layout, one palette, four light backgrounds. *Varied* scenes (:func:`varied_scene`,
``make_sample(..., varied=True)``, what the demo model is trained on) vary what real pictures vary:
image sizes and aspect ratios over the processor's whole range (56x56 to 224x224 pixels after its
resize, some drawn up to 1024 pixels a side for it to shrink), shapes from 26 pixels to most of the
picture placed anywhere, turned, in their own proportions, some outlined, fills drawn from a range per
colour name, and the backgrounds, noise, edges and JPEG artifacts of :mod:`tritonvlm.synthetic_looks`.
Varied pictures also include two kinds outside the one-to-three-shapes world, so that the model has a
short answer for them: *crowds* of four to six shapes (kinds repeat) on any background ("There are many
shapes.") and pictures with *no shapes* at all ("There are no shapes.").

Everything is deterministic: :func:`make_sample` with the same ``(seed, index)`` draws the same
pictures and question on every machine (Python's ``random`` and NumPy's ``PCG64`` are both portable).

Question types (:data:`QUESTION_TYPES`), with their canonical questions:

- ``describe``: "What is in this image?" → "A red circle and a blue square." (shapes left to right)
- ``colour``: "What colour is the circle?" → "The circle is red."
- ``count``: "How many shapes are in this image?" → "There are two shapes."
- ``position``: "Which shape is to the left of the square?" → "The red circle."
- ``two_images``: "Describe the first image in one sentence, and then describe the second image in
  another sentence." → "The first image shows a red circle. The second image shows a green star and a
  blue square." (reworded, half of the questions are the seed's own request, :data:`SEED_TWO_IMAGE_PROMPT`;
  three-shape pictures are drawn twice as often as in the other types)
- ``json``: "What is in this image? Answer in JSON with the shape and its colour." →
  ``{"shape": "circle", "colour": "red"}`` (one shape per picture; the layout a JSON-schema constraint
  with these two keys allows, so constrained decoding and the model agree)
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from tritonvlm import synthetic_looks
from tritonvlm.synthetic_looks import Look

__all__ = [
    "BACKGROUNDS",
    "CANONICAL_QUESTIONS",
    "COLOURS",
    "PROCESSOR_MAX_PIXELS",
    "QUESTION_TYPES",
    "SEED_TWO_IMAGE_PROMPT",
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
    "varied_scene",
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

QUESTION_TYPES: tuple[str, ...] = ("describe", "colour", "count", "position", "two_images", "json")

CANONICAL_QUESTIONS: dict[str, str] = {
    "describe": "What is in this image?",
    "colour": "What colour is the {shape}?",
    "count": "How many shapes are in this image?",
    "position": "Which shape is to the {side} of the {shape}?",
    "two_images": (
        "Describe the first image in one sentence, and then describe the second image in another sentence."
    ),
    "json": "What is in this image? Answer in JSON with the shape and its colour.",
}

# The seed's own two-image request (its second example), verbatim.
SEED_TWO_IMAGE_PROMPT = (
    "I have two very different images. They are not related at all. Please describe the first image in "
    "one sentence, and then describe the second image in another sentence."
)

# Other wordings used in training (``paraphrase=True``) so the model is not tied to one phrasing.
_PARAPHRASES: dict[str, tuple[str, ...]] = {
    "describe": (
        "What is in this image?",
        "What do you see in this image?",
        "Describe this image.",
        "What shapes are in this picture?",
        "What is in this picture?",
        "What's in the image?",
        "Describe the picture in one sentence.",
        "what is this",
    ),
    "colour": (
        "What colour is the {shape}?",
        "What color is the {shape}?",
        "Which colour is the {shape}?",
        "What color is the {shape} in this image?",
    ),
    "count": (
        "How many shapes are in this image?",
        "How many shapes are there?",
        "Count the shapes.",
        "How many objects are in the picture?",
    ),
    "position": (
        "Which shape is to the {side} of the {shape}?",
        "What is to the {side} of the {shape}?",
        "What shape is on the {side} of the {shape}?",
    ),
    "two_images": (
        "Describe the first image in one sentence, and then describe the second image in another sentence.",
        "describe the first image in one sentence, and then describe the second image in another sentence",
        SEED_TWO_IMAGE_PROMPT,
        SEED_TWO_IMAGE_PROMPT,
        "Describe each image in one sentence.",
        "Describe the two images.",
        "What is in these two pictures?",
        "I have two images. Please describe the first one, and then the second one.",
    ),
    "json": (
        "What is in this image? Answer in JSON with the shape and its colour.",
        "What shape is in this picture, and what colour is it? Reply in JSON.",
        "Return a JSON object with the shape and its colour.",
        "Describe the shape in this image as JSON, with its shape and colour.",
        "Answer in JSON: which shape is this and what colour?",
    ),
}

# Share of reworded two-image questions that are the seed's own request (its most common first use).
_SEED_TWO_IMAGE_SHARE = 0.5

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
    """One drawn shape: its kind, colour name and bounding box (``x``, ``y`` top-left, ``size`` side).

    Varied scenes also set ``turn`` (degrees), ``form`` (a square's side, a circle's diameter as a share
    of the box; a triangle's height over its base; a star's inner radius over its outer one) and an
    optional ``outline`` colour and width. Classic scenes leave them at their defaults (unused).
    """

    kind: str
    colour: str
    x: int
    y: int
    size: int
    turn: float = 0.0
    form: float = 1.0
    outline: tuple[int, int, int] | None = None
    outline_width: float = 0.0

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
    """A picture to draw: size, background, noise and shapes (ordered left to right).

    A varied scene has a ``look`` (its background is then ``"varied"``) and a ``content``: ``"shapes"``
    (one to three shapes of different kinds, in columns), ``"crowd"`` (four to six, anywhere) or
    ``"empty"``.
    """

    width: int
    height: int
    background: str
    noise_seed: int | None  # None: plain background; else the seed of the pixel noise
    shapes: tuple[ShapeSpec, ...]
    fills: tuple[tuple[int, int, int], ...]  # the jittered RGB fill of each shape
    look: Look | None = None
    content: str = "shapes"

    def render(self) -> Image.Image:
        """The scene as an RGB Pillow image (deterministic)."""
        if self.look is not None:
            return synthetic_looks.render(self.width, self.height, self.look, self.shapes, self.fills)
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
        if self.look is not None:
            return synthetic_looks.label_map(self.width, self.height, self.shapes)
        img = Image.new("L", (self.width, self.height), 0)
        draw = ImageDraw.Draw(img)
        for i, shape in enumerate(self.shapes):
            _draw_shape(draw, shape, i + 1)
        return img

    def describe(self) -> str:
        """``"a red circle and a blue square"`` (lower case, no full stop; shapes left to right).

        A crowd is ``"many shapes"``, an empty picture ``"no shapes"``.
        """
        if self.content == "crowd":
            return "many shapes"
        if self.content == "empty":
            return "no shapes"
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


# The demo model's image processor keeps pictures between 56*56 and this many pixels (larger ones are
# shrunk to it): at most 64 vision tokens (8x8 cells of 28x28 pixels for a square picture).
PROCESSOR_MAX_PIXELS = 224 * 224

# Varied scenes, in the processor's pixels (after its resize; see varied_scene).
_VARIED_AREA = (64 * 64, PROCESSOR_MAX_PIXELS)
_VARIED_ASPECT = 2.5  # width/height from 1/2.5 to 2.5
_VARIED_SHAPE_MIN = 26  # a shape's box side, at least (a 2x2 block of patches)
_TURN = 15.0  # shapes are turned by up to this many degrees
_FORMS = {"circle": (0.9, 1.0), "square": (0.78, 0.95), "triangle": (0.8, 1.05), "star": (0.38, 0.56)}
_ROOM = 1.15  # horizontal room a turned shape needs, per unit of its box side


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _varied_size(rng: random.Random, n: int, content: str) -> tuple[int, int]:
    """An image size (processor pixels) whose width holds ``n`` shapes in columns (crowds: any)."""
    need_w = n * (_VARIED_SHAPE_MIN * _ROOM + 4) + 4 if content == "shapes" else 0
    min_short = 120 if content == "crowd" else 56
    while True:
        # Two in five at (nearly) the processor's largest size, the rest from small to large.
        if rng.random() < 0.4:
            area = rng.uniform(0.6, 1.0) * _VARIED_AREA[1]
        else:
            area = _log_uniform(rng, *_VARIED_AREA)
        aspect = _log_uniform(rng, 1 / _VARIED_ASPECT, _VARIED_ASPECT)
        width = round(math.sqrt(area * aspect))
        height = round(area / width)
        if min(width, height) >= min_short and width >= need_w and height >= _VARIED_SHAPE_MIN + 8:
            if rng.random() < 0.15:  # some sides on the processor's 28-pixel grid
                width, height = max(56, 28 * round(width / 28)), max(56, 28 * round(height / 28))
            return width, height


def _row_layout(rng: random.Random, width: int, height: int, n: int) -> list[tuple[int, int, int]]:
    """``n`` boxes ``(x, y, side)`` in left-to-right order whose horizontal extents never overlap."""
    short = min(width, height)
    for attempt in range(100):
        high = max(_VARIED_SHAPE_MIN, min(0.62 * short, short - 6) * 0.97**attempt)
        low = min(high, max(_VARIED_SHAPE_MIN, 0.12 * short))
        sides = [_log_uniform(rng, low, high) for _ in range(n)]
        rooms = [side * _ROOM for side in sides]
        free = width - sum(rooms) - 4 * (n + 1)
        if free >= 0:
            break
    else:  # pragma: no cover - _varied_size leaves room for n shapes of the smallest size
        raise RuntimeError(f"no room for {n} shapes in {width}x{height}")
    weights = [rng.random() + 0.05 for _ in range(n + 1)]
    gaps = [4 + free * w / sum(weights) for w in weights]
    boxes, left = [], gaps[0]
    for side, room, gap in zip(sides, rooms, gaps[1:], strict=True):
        margin = side * (_ROOM - 1) / 2 + 1
        x = left + (room - side) / 2
        y = rng.uniform(margin, max(margin, height - side - margin))
        boxes.append((round(x), round(y), max(_VARIED_SHAPE_MIN, round(side))))
        left += room + gap
    return boxes


def _crowd_layout(rng: random.Random, width: int, height: int, n: int) -> list[tuple[int, int, int]]:
    """Up to ``n`` non-overlapping boxes anywhere (fewer only if they do not fit), left to right."""
    short = min(width, height)
    boxes: list[tuple[int, int, int]] = []
    for _ in range(400):
        if len(boxes) == n:
            break
        side = round(_log_uniform(rng, max(_VARIED_SHAPE_MIN, 0.08 * short), max(30, 0.3 * short)))
        x, y = rng.randint(2, max(2, width - side - 2)), rng.randint(2, max(2, height - side - 2))
        if all(
            x + side + 3 < bx or bx + bs + 3 < x or y + side + 3 < by or by + bs + 3 < y
            for bx, by, bs in boxes
        ):
            boxes.append((x, y, side))
    return sorted(boxes, key=lambda b: b[0] + b[2] / 2)


def varied_scene(rng: random.Random, n_shapes: int | None = None, content: str = "shapes") -> Scene:
    """A varied scene (see the module docstring): ``content`` ``"shapes"`` (1-3 of different kinds, or
    ``n_shapes``), ``"crowd"`` (4-6, kinds may repeat) or ``"empty"``.

    The layout is drawn in the processor's pixels (:data:`PROCESSOR_MAX_PIXELS` at most); some pictures
    are then drawn up to 4 times larger (at most 1024 pixels a side), as a user's photo would be, for the
    processor to shrink.
    """
    if content == "shapes":
        n = rng.randint(1, 3) if n_shapes is None else n_shapes
        if not 1 <= n <= len(SHAPES) - 1:
            raise ValueError(f"n_shapes must be 1..{len(SHAPES) - 1}, got {n}")
    elif content == "crowd":
        n = rng.randint(4, 6)
    elif content == "empty":
        n = 0
    else:
        raise ValueError(f"unknown content {content!r}")
    width, height = _varied_size(rng, n, content)
    if content == "shapes":
        boxes = _row_layout(rng, width, height, n)
        kinds = rng.sample(SHAPES, n)
    else:
        boxes = _crowd_layout(rng, width, height, n)
        kinds = [rng.choice(SHAPES) for _ in boxes]
    scale = 1.0
    if rng.random() < (0.35 if width * height >= 0.6 * PROCESSOR_MAX_PIXELS else 0.1):
        scale = rng.uniform(1.0, max(1.0, min(4.0, 1024 / max(width, height))))
    outlined = rng.random() < 0.12
    shapes, fills = [], []
    for kind, (x, y, side) in zip(kinds, boxes, strict=True):
        colour = rng.choice(list(COLOURS))
        if rng.random() < 0.2:  # the classic palette, jittered
            fill = tuple(int(min(255, max(0, c + rng.randint(-18, 18)))) for c in COLOURS[colour])
        else:
            fill = synthetic_looks.random_fill(rng, colour)
        outline, outline_width = None, 0.0
        if outlined:
            dark = rng.random() < 0.6
            outline = (rng.randint(0, 60),) * 3 if dark else tuple(int(c * 0.55) for c in fill)
            outline_width = max(1.0, side * scale * rng.uniform(0.03, 0.08))
        shapes.append(
            ShapeSpec(
                kind,
                colour,
                round(x * scale),
                round(y * scale),
                round(side * scale),
                turn=0.0 if kind == "circle" else rng.uniform(-_TURN, _TURN),
                form=rng.uniform(*_FORMS[kind]),
                outline=outline,  # type: ignore[arg-type]
                outline_width=outline_width,
            )
        )
        fills.append(fill)
    look = synthetic_looks.random_look(rng, vivid=content != "shapes")
    size = (round(width * scale), round(height * scale))
    return Scene(*size, "varied", None, tuple(shapes), tuple(fills), look, content)  # type: ignore[arg-type]


def _varied_content(rng: random.Random, crowd: float, empty: float) -> str:
    r = rng.random()
    return "crowd" if r < crowd else "empty" if r < crowd + empty else "shapes"


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
    varied: bool = False,
) -> Sample:
    """The ``index``-th sample of the stream ``seed`` (the same on every call and machine).

    ``qtype`` picks the question type (default: at random, uniformly or with ``weights``, one per
    entry of :data:`QUESTION_TYPES`). ``paraphrase`` draws the question
    from several wordings instead of the canonical one; ``text_first`` puts the question before the
    images (default: the canonical order, question first, unless ``paraphrase`` is set, where it is
    random). ``varied``: varied scenes (:func:`varied_scene`), a few of them crowds or empty for the
    question types that have an answer for those (describe, count, two images); otherwise classic ones.
    """
    rng = random.Random(seed * 1_000_003 + index)
    kind = qtype if qtype is not None else rng.choices(QUESTION_TYPES, weights=weights)[0]
    if kind not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {kind!r}; use one of {QUESTION_TYPES}")
    order = text_first if text_first is not None else (rng.random() < 0.5 if paraphrase else True)

    def scene(n: int | None = None, crowd: float = 0.0, empty: float = 0.0) -> Scene:
        if not varied:
            return random_scene(rng, n_shapes=n)
        return varied_scene(rng, n, _varied_content(rng, crowd, empty))

    if kind == "describe":
        picture = scene(crowd=0.06, empty=0.03)
        answer = {
            "crowd": "There are many shapes.",
            "empty": "There are no shapes.",
        }.get(picture.content, _capitalise(picture.describe()) + ".")
        return Sample(kind, _question(rng, kind, paraphrase), answer, (picture,), order)
    if kind == "colour":
        picture = scene()
        target = rng.choice(picture.shapes)
        question = _question(rng, kind, paraphrase, shape=target.kind)
        return Sample(kind, question, f"The {target.kind} is {target.colour}.", (picture,), order)
    if kind == "count":
        picture = scene(crowd=0.06, empty=0.03)
        n = len(picture.shapes)
        answer = "There is one shape." if n == 1 else f"There are {_NUMBER_WORDS.get(n, 'many')} shapes."
        if picture.content == "empty":
            answer = "There are no shapes."
        return Sample(kind, _question(rng, kind, paraphrase), answer, (picture,), order)
    if kind == "position":
        picture = scene(rng.randint(2, 3))
        shapes = picture.shapes
        # Only pairs with a unique answer: the reference's neighbour on the side with one shape.
        options = [("left", 1), ("right", len(shapes) - 2)]
        side, ref = rng.choice(options)
        other = shapes[ref - 1] if side == "left" else shapes[ref + 1]
        question = _question(rng, kind, paraphrase, side=side, shape=shapes[ref].kind)
        return Sample(kind, question, f"The {other.phrase}.", (picture,), order)
    if kind == "json":
        picture = scene(1)
        shape = picture.shapes[0]
        answer = json.dumps({"shape": shape.kind, "colour": shape.colour})
        return Sample(kind, _question(rng, kind, paraphrase), answer, (picture,), order)

    def pair_scene() -> Scene:
        # Three-shape pictures are where two-image answers go wrong: draw them twice as often.
        return scene(rng.choice((1, 2, 3, 3)), crowd=0.04, empty=0.02)

    first, second = pair_scene(), pair_scene()
    answer = f"The first image shows {first.describe()}. The second image shows {second.describe()}."
    if paraphrase and rng.random() < _SEED_TWO_IMAGE_SHARE:
        question = SEED_TWO_IMAGE_PROMPT
    else:
        question = _question(rng, kind, paraphrase)
    return Sample(kind, question, answer, (first, second), order)


def generate(seed: int, n: int, qtype: str | None = None, paraphrase: bool = False) -> list[Sample]:
    """``n`` samples of the stream ``seed`` (indices 0..n-1), all of ``qtype`` if given."""
    return [make_sample(seed, i, qtype, paraphrase) for i in range(n)]


def to_data_url(image: Image.Image) -> str:
    """The image as a ``data:image/png;base64,...`` URL (what an OpenAI client sends)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
