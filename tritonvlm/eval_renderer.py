"""A second, independent drawing routine for *evaluating* the shapes demo model; never used for training.

The demo model (``models/tritonvlm-shapes-demo``) is trained on :mod:`tritonvlm.synthetic`'s pictures.
A score on those can be earned by memorising that renderer (its sizes, proportions, palette, layout),
so this module draws the same kind of subject, shapes and colours, the way someone else would:

- its own rasteriser: shapes are NumPy coverage masks (inside tests at pixel centres, and on a 4x4
  sub-pixel grid along the edges, averaged), no Pillow ``ImageDraw``;
- its own proportions: equilateral triangles, stars with an inner radius of half the outer one, squares
  that fill their box, every shape turned by up to 12 degrees;
- its own palette: CSS/web colour values (``#ff0000``, ``forestgreen``, ``royalblue``, ``gold``,
  ``darkviolet``, ``darkorange``, ...) and web background colours (``aliceblue``, ``lightblue``,
  ``beige``, ...), some with a vertical gradient or grain;
- its own sizes and layout: image sides a person would pick (100 to 800 pixels, common aspect ratios,
  never a multiple of 28), shapes 20-45% of the short side placed anywhere, with only their horizontal
  extents kept apart so that "left of" has one answer; some pictures saved as JPEG.

:func:`eval_sample` gives a question of one of :data:`EVAL_TYPES` with its exact expected answer (the
same wording as the training answers: that is the model's vocabulary). ``two_images_seed`` is the
seed's own request: two images, then the text of :data:`SEED_TWO_IMAGE_PROMPT`.

:func:`outside_picture` draws pictures outside the model's world (4-6 shapes, kinds repeated, coloured,
textured or noisy backgrounds, up to 1024x1024): no exact answer exists; a good answer is short and
well-formed (see :func:`repeats_too_much`).
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "EVAL_BACKGROUNDS",
    "EVAL_COLOURS",
    "EVAL_TYPES",
    "SEED_TWO_IMAGE_PROMPT",
    "EvalSample",
    "Figure",
    "Picture",
    "eval_sample",
    "eval_set",
    "outside_picture",
    "random_picture",
    "repeats_too_much",
]

KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star")

# Web colours a person would use for each name (sRGB).
EVAL_COLOURS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((255, 0, 0), (220, 20, 60), (205, 38, 38), (238, 44, 44)),
    "green": ((0, 128, 0), (34, 139, 34), (50, 205, 50), (46, 139, 87)),
    "blue": ((0, 0, 255), (65, 105, 225), (30, 144, 255), (0, 0, 205)),
    "yellow": ((255, 255, 0), (255, 215, 0), (255, 236, 40)),
    "purple": ((128, 0, 128), (148, 0, 211), (138, 43, 226), (153, 50, 204)),
    "orange": ((255, 165, 0), (255, 140, 0), (255, 127, 36)),
}

EVAL_BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (255, 255, 255),  # white
    (240, 248, 255),  # aliceblue
    (173, 216, 230),  # lightblue
    (245, 245, 220),  # beige
    (211, 211, 211),  # lightgray
    (240, 255, 240),  # honeydew
    (230, 230, 250),  # lavender
    (255, 228, 225),  # mistyrose
    (250, 240, 230),  # linen
    (47, 47, 47),  # near black
)

# Backgrounds for pictures outside the model's world: saturated or mid-tone colours.
_OUTSIDE_BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (135, 206, 235),  # skyblue
    (144, 238, 144),  # lightgreen
    (255, 182, 193),  # lightpink
    (255, 218, 185),  # peachpuff
    (176, 196, 222),  # lightsteelblue
    (128, 128, 128),  # grey
    (25, 25, 112),  # midnightblue
    (85, 107, 47),  # darkolivegreen
    (210, 180, 140),  # tan
    (64, 224, 208),  # turquoise
)

SEED_TWO_IMAGE_PROMPT = (
    "I have two very different images. They are not related at all. Please describe the first image in "
    "one sentence, and then describe the second image in another sentence."
)

EVAL_TYPES: tuple[str, ...] = (
    "describe",
    "colour",
    "count",
    "position",
    "two_images",
    "two_images_seed",
    "json",
)

_QUESTIONS = {
    "describe": "What is in this image?",
    "colour": "What colour is the {kind}?",
    "count": "How many shapes are in this image?",
    "position": "Which shape is to the {side} of the {kind}?",
    "two_images": (
        "Describe the first image in one sentence, and then describe the second image in another sentence."
    ),
    "two_images_seed": SEED_TWO_IMAGE_PROMPT,
    "json": "What is in this image? Answer in JSON with the shape and its colour.",
}

_WIDTHS = (100, 120, 150, 160, 180, 200, 240, 250, 256, 300, 320, 333, 360, 400, 450, 480, 500, 512, 600, 640)
_ASPECTS = (1.0, 1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16, 2.0)
_MAX_PIXELS = 224 * 224  # the demo model's processor shrinks larger pictures to this area
_MIN_SHAPE_AFTER_RESIZE = 32  # a shape's box side in pixels after the processor's resize, at least
_SS = 4  # sub-pixel samples per axis


@dataclass(frozen=True)
class Figure:
    """One shape to draw: kind, colour name, RGB, centre, box side (pixels), turn (degrees), outline."""

    kind: str
    colour: str
    rgb: tuple[int, int, int]
    cx: float
    cy: float
    size: float
    turn: float = 0.0
    outline: tuple[int, int, int] | None = None

    @property
    def phrase(self) -> str:
        """``"red circle"``."""
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Picture:
    """A picture: size, background (plain or two-colour vertical gradient), grain, figures, file format."""

    width: int
    height: int
    top: tuple[int, int, int]
    bottom: tuple[int, int, int]
    grain: float  # standard deviation of the per-pixel grey grain (0: none)
    grain_seed: int
    figures: tuple[Figure, ...]  # left to right
    jpeg_quality: int | None = None  # None: PNG

    def render(self) -> Image.Image:
        """The picture as an RGB image (deterministic), after a JPEG round trip when it has a quality."""
        h, w = self.height, self.width
        t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
        canvas = (1 - t) * np.array(self.top, np.float32) + t * np.array(self.bottom, np.float32)
        canvas = np.broadcast_to(canvas, (h, w, 3)).copy()
        for fig in self.figures:
            _paint(canvas, fig)
        if self.grain > 0:
            rng = np.random.default_rng(self.grain_seed)
            canvas += rng.normal(0.0, self.grain, size=(h, w, 1)).astype(np.float32)
        img = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
        if self.jpeg_quality is not None:
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=self.jpeg_quality)
            img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        return img

    def encoded(self) -> tuple[bytes, str]:
        """``(file bytes, mime type)``: JPEG for a picture with a quality, else PNG."""
        buf = io.BytesIO()
        if self.jpeg_quality is not None:
            self.render().save(buf, format="JPEG", quality=95)  # already degraded once by render()
            return buf.getvalue(), "image/jpeg"
        self.render().save(buf, format="PNG")
        return buf.getvalue(), "image/png"

    def describe(self) -> str:
        """``"a red circle and a blue square"`` (the answers' wording; figures left to right)."""
        parts = [f"{'an' if f.colour[0] in 'aeiou' else 'a'} {f.phrase}" for f in self.figures]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _coverage(fig: Figure, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean inside-test of ``fig`` at sample points (``xs``, ``ys`` in pixels, any equal shapes)."""
    a = math.radians(fig.turn)
    # Coordinates in the figure's own frame (unit = half the box side, y pointing down).
    dx, dy = xs - fig.cx, ys - fig.cy
    u = (dx * math.cos(a) + dy * math.sin(a)) / (fig.size / 2)
    v = (-dx * math.sin(a) + dy * math.cos(a)) / (fig.size / 2)
    if fig.kind == "circle":
        return u * u + v * v <= 1.0
    if fig.kind == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if fig.kind == "triangle":
        # Equilateral, apex up, side 2 (the box's width), centred in the box (height sqrt(3)).
        h = math.sqrt(3.0)
        return (v <= h / 2) & (v >= -h / 2 + h * np.abs(u))
    if fig.kind == "star":
        return _in_star(u, v)
    raise ValueError(f"unknown kind {fig.kind!r}")


def _in_star(u: np.ndarray, v: np.ndarray, inner: float = 0.5) -> np.ndarray:
    """Even-odd test against a five-pointed star of outer radius 1 (one point up)."""
    pts = []
    for i in range(10):
        r = 1.0 if i % 2 == 0 else inner
        ang = -math.pi / 2 + i * math.pi / 5
        pts.append((r * math.cos(ang), r * math.sin(ang) + 0.1))  # the star's centre sits a bit low
    inside = np.zeros(u.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1], strict=True):
        crosses = (y0 > v) != (y1 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


def _paint(canvas: np.ndarray, fig: Figure) -> None:
    """Blend ``fig`` into ``canvas`` (H, W, 3 float) with anti-aliased edges, in place."""
    h, w, _ = canvas.shape
    r = fig.size * 0.75 + 3
    x0, x1 = max(0, int(fig.cx - r)), min(w, int(fig.cx + r) + 1)
    y0, y1 = max(0, int(fig.cy - r)), min(h, int(fig.cy + r) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    offs = (np.arange(_SS, dtype=np.float32) + 0.5) / _SS
    sub_x = np.tile(offs, _SS)[None, :]  # the _SS x _SS sub-pixel grid
    sub_y = np.repeat(offs, _SS)[None, :]

    def cover(f: Figure) -> np.ndarray:
        # Pixel centres first; only pixels next to a change (the edges) are sampled on the finer grid.
        centre = _coverage(f, xs, ys)
        padded = np.pad(centre, 1, mode="edge")
        edge = np.zeros_like(centre)
        for dy in range(3):
            for dx in range(3):
                edge |= padded[dy : dy + centre.shape[0], dx : dx + centre.shape[1]] != centre
        alpha = centre.astype(np.float32)
        ey, ex = np.nonzero(edge)
        if len(ey):
            px = (ex + x0).astype(np.float32)[:, None] + sub_x
            py = (ey + y0).astype(np.float32)[:, None] + sub_y
            alpha[ey, ex] = _coverage(f, px, py).mean(axis=1)
        return alpha[..., None]

    region = canvas[y0:y1, x0:x1]
    if fig.outline is not None:
        outer = cover(fig)
        region[:] = region * (1 - outer) + np.array(fig.outline, np.float32) * outer
        width = max(2.0, fig.size * 0.06)
        inner = Figure(fig.kind, fig.colour, fig.rgb, fig.cx, fig.cy, fig.size - 2 * width, fig.turn)
        alpha = cover(inner)
    else:
        alpha = cover(fig)
    region[:] = region * (1 - alpha) + np.array(fig.rgb, np.float32) * alpha


def _resize_factor(width: int, height: int) -> float:
    return min(1.0, math.sqrt(_MAX_PIXELS / (width * height)))


def _size(rng: random.Random) -> tuple[int, int]:
    w = rng.choice(_WIDTHS)
    h = round(w / rng.choice(_ASPECTS))
    h = min(max(h, 90), 720)
    if w % 28 == 0:
        w += 3
    if h % 28 == 0:
        h += 5
    return w, h


def _place(
    rng: random.Random, width: int, height: int, n: int, frac: tuple[float, float]
) -> list[tuple[float, float, float]] | None:
    """``n`` boxes ``(cx, cy, side)`` left to right with disjoint horizontal extents, or None."""
    short = min(width, height)
    smallest = _MIN_SHAPE_AFTER_RESIZE / _resize_factor(width, height)
    sides = [max(smallest, rng.uniform(*frac) * short) for _ in range(n)]
    gap = max(6.0, 0.04 * width)
    free = width - sum(sides) - gap * (n + 1)
    if free < 0 or max(sides) > height - 8:
        return None
    cuts = sorted(rng.uniform(0, free) for _ in range(n))
    boxes, x = [], gap
    prev = 0.0
    for side, cut in zip(sides, cuts, strict=True):
        x += cut - prev
        prev = cut
        cy = rng.uniform(4 + side / 2, height - 4 - side / 2)
        boxes.append((x + side / 2, cy, side))
        x += side + gap
    return boxes


def _background(rng: random.Random, choices: tuple[tuple[int, int, int], ...]) -> tuple[Any, Any]:
    top = rng.choice(choices)
    if rng.random() < 0.25:  # a gentle vertical gradient towards a shade of the same colour
        k = rng.uniform(0.8, 0.95)
        return top, tuple(int(c * k) for c in top)
    return top, top


def random_picture(rng: random.Random, n: int | None = None, size: tuple[int, int] | None = None) -> Picture:
    """A picture of 1-3 shapes of different kinds (or ``n``), at a random or given ``size``."""
    n = rng.randint(1, 3) if n is None else n
    for _ in range(200):
        width, height = size if size is not None else _size(rng)
        boxes = _place(rng, width, height, n, (0.2, 0.45))
        if boxes is not None:
            break
    else:
        raise ValueError(f"{n} shapes do not fit in {size}")
    kinds = rng.sample(KINDS, n)
    figures = []
    top, bottom = _background(rng, EVAL_BACKGROUNDS)
    for kind, (cx, cy, side) in zip(kinds, boxes, strict=True):
        colour = rng.choice(list(EVAL_COLOURS))
        outline = (0, 0, 0) if rng.random() < 0.1 else None
        turn = rng.uniform(-12, 12) if kind != "circle" else 0.0
        figures.append(Figure(kind, colour, rng.choice(EVAL_COLOURS[colour]), cx, cy, side, turn, outline))
    grain = rng.choice((0.0, 0.0, 0.0, 4.0, 8.0))
    jpeg = rng.choice((None, None, None, 85, 70))
    return Picture(width, height, top, bottom, grain, rng.getrandbits(31), tuple(figures), jpeg)


def outside_picture(rng: random.Random, size: tuple[int, int] | None = None) -> Picture:
    """A picture outside the model's world: 4-6 shapes (kinds repeat), coloured/noisy, up to 1024^2
    (or ``size``)."""
    n = rng.randint(4, 6)
    for _ in range(500):
        width, height = size or (rng.choice((512, 640, 800, 1000, 1024)), rng.choice((480, 600, 768, 1024)))
        boxes = _place(rng, width, height, n, (0.08, 0.2))
        if boxes is not None:
            break
    else:  # pragma: no cover - 4-6 boxes of 8-20% always fit in these sizes
        raise RuntimeError("could not place the shapes")
    top, bottom = _background(rng, _OUTSIDE_BACKGROUNDS)
    figures = []
    for cx, cy, side in boxes:
        kind, colour = rng.choice(KINDS), rng.choice(list(EVAL_COLOURS))
        figures.append(
            Figure(kind, colour, rng.choice(EVAL_COLOURS[colour]), cx, cy, side, rng.uniform(-30, 30))
        )
    grain = rng.choice((10.0, 20.0, 30.0))
    return Picture(width, height, top, bottom, grain, rng.getrandbits(31), tuple(figures), None)


@dataclass
class EvalSample:
    """A question about one or two pictures with its exact expected answer (``messages`` like training)."""

    qtype: str
    question: str
    answer: str
    pictures: tuple[Picture, ...]
    text_first: bool = True
    _images: list[Image.Image] | None = field(default=None, repr=False, compare=False)

    @property
    def images(self) -> list[Image.Image]:
        """The pictures, rendered (once)."""
        if self._images is None:
            self._images = [p.render() for p in self.pictures]
        return self._images

    def messages(self, image_parts: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """A one-turn conversation: the question and the image parts in this sample's order."""
        parts = image_parts if image_parts is not None else [{"type": "image"} for _ in self.pictures]
        text = [{"type": "text", "text": self.question}]
        return [{"role": "user", "content": text + parts if self.text_first else parts + text}]


_NUMBERS = {1: "one", 2: "two", 3: "three"}


def eval_sample(seed: int, index: int, qtype: str) -> EvalSample:
    """The ``index``-th evaluation sample of ``qtype`` in the stream ``seed`` (deterministic)."""
    rng = random.Random(f"eval-renderer/{seed}/{qtype}/{index}")
    if qtype == "describe":
        pic = random_picture(rng)
        return EvalSample(qtype, _QUESTIONS[qtype], pic.describe().capitalize() + ".", (pic,))
    if qtype == "colour":
        pic = random_picture(rng)
        fig = rng.choice(pic.figures)
        question = _QUESTIONS[qtype].format(kind=fig.kind)
        return EvalSample(qtype, question, f"The {fig.kind} is {fig.colour}.", (pic,))
    if qtype == "count":
        pic = random_picture(rng)
        n = len(pic.figures)
        answer = "There is one shape." if n == 1 else f"There are {_NUMBERS[n]} shapes."
        return EvalSample(qtype, _QUESTIONS[qtype], answer, (pic,))
    if qtype == "position":
        pic = random_picture(rng, n=rng.randint(2, 3))
        figs = pic.figures
        side = rng.choice(("left", "right"))
        ref = 1 if side == "left" else len(figs) - 2  # the neighbour on that side is the only one
        other = figs[ref - 1] if side == "left" else figs[ref + 1]
        question = _QUESTIONS[qtype].format(side=side, kind=figs[ref].kind)
        return EvalSample(qtype, question, f"The {other.phrase}.", (pic,))
    if qtype in ("two_images", "two_images_seed"):
        first, second = random_picture(rng), random_picture(rng)
        while (second.width, second.height) == (first.width, first.height):
            second = random_picture(rng)
        answer = f"The first image shows {first.describe()}. The second image shows {second.describe()}."
        # The seed sent the two images first and its request after them.
        return EvalSample(qtype, _QUESTIONS[qtype], answer, (first, second), qtype == "two_images")
    if qtype == "json":
        pic = random_picture(rng, n=1)
        (fig,) = pic.figures
        return EvalSample(
            qtype, _QUESTIONS[qtype], json.dumps({"shape": fig.kind, "colour": fig.colour}), (pic,)
        )
    raise ValueError(f"unknown question type {qtype!r}; use one of {EVAL_TYPES}")


def eval_set(seed: int, n: int, types: tuple[str, ...] | list[str] = EVAL_TYPES) -> list[EvalSample]:
    """``n`` samples of each type in ``types``."""
    return [eval_sample(seed, i, qtype) for qtype in types for i in range(n)]


def repeats_too_much(text: str, limit: int = 2) -> bool:
    """True when a word or phrase occurs more than ``limit`` times in a row (``"three three three"``).

    Words are compared lower-cased without punctuation, so ``"three, three, three"`` counts too.
    """
    words = ["".join(ch for ch in w.lower() if ch.isalnum()) for w in text.split()]
    words = [w for w in words if w]
    for size in range(1, len(words) // (limit + 1) + 1):
        for start in range(len(words) - size * (limit + 1) + 1):
            phrase = words[start : start + size]
            if all(words[start + k * size : start + (k + 1) * size] == phrase for k in range(1, limit + 1)):
                return True
    return False
