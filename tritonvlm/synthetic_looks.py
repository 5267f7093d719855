"""How a *varied* training picture of :mod:`tritonvlm.synthetic` looks, and how it is drawn.

A classic synthetic scene is drawn one way (plain light background, Pillow's aliased polygons, one
palette). A varied scene carries a :class:`Look` that varies what real pictures vary: the background
(plain, tinted, dark, two-colour gradients in any direction, faint stripes or checks, smooth colour
fields like an out-of-focus photo), pixel noise (grey or coloured), anti-aliased or aliased edges, and a
JPEG round trip at some quality. Its shapes are turned, have their own proportions (a triangle's height,
a star's inner radius, a square's side) and some an outline; their fills are drawn per colour name from a
range of hue, saturation and brightness (:func:`random_fill`), not from one RGB value.

Shapes are painted as coverage masks: Pillow polygons on a 4x sub-sampled grid (anti-aliased) or on the
pixel grid (aliased), composited into a float canvas. :func:`label_map` draws the same polygons as a
label map for the training's per-token auxiliary targets.

Everything is deterministic in the values of the :class:`Look` and the shapes.
"""

from __future__ import annotations

import colorsys
import io
import math
import random
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["FILL_RANGES", "Look", "Shape", "label_map", "random_fill", "random_look", "render"]

RGB = tuple[int, int, int]

# Per colour name: hue range in degrees (may wrap past 360), saturation and value ranges. Wide enough
# to cover the usual web/CSS colours of each name, far enough apart to keep the names unambiguous.
FILL_RANGES: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "red": ((345.0, 372.0), (0.7, 1.0), (0.7, 1.0)),
    "orange": ((20.0, 41.0), (0.75, 1.0), (0.85, 1.0)),
    "yellow": ((47.0, 62.0), (0.75, 1.0), (0.85, 1.0)),
    "green": ((92.0, 150.0), (0.55, 1.0), (0.42, 0.92)),
    "blue": ((200.0, 242.0), (0.65, 1.0), (0.6, 1.0)),
    "purple": ((262.0, 305.0), (0.55, 1.0), (0.42, 0.92)),
}


class Shape(Protocol):
    """What :func:`render` needs of a shape (``tritonvlm.synthetic.ShapeSpec`` has it)."""

    kind: str
    x: int
    y: int
    size: int
    turn: float
    form: float
    outline: RGB | None
    outline_width: float


@dataclass(frozen=True)
class Look:
    """A varied picture's background, noise, edges and compression (see the module docstring)."""

    start: RGB  # background colour (at the gradient's start)
    end: RGB  # gradient end colour (== start: plain)
    angle: float  # gradient direction in degrees
    texture: str  # "": none, "stripes", "checks" or "field" (a smooth random colour field)
    texture_amount: float  # stripes/checks: contrast in grey levels; field: blend weight 0..1
    texture_period: float  # stripes/checks period in pixels
    noise: float  # standard deviation of the pixel noise in grey levels (0: none)
    colour_noise: bool  # per-channel noise instead of grey
    seed: int  # seed of the noise and the colour field
    antialias: bool
    jpeg_quality: int  # 0: no JPEG round trip


def random_fill(rng: random.Random, colour: str) -> RGB:
    """An RGB fill for ``colour`` drawn from :data:`FILL_RANGES`."""
    (h0, h1), (s0, s1), (v0, v1) = FILL_RANGES[colour]
    hue = (rng.uniform(h0, h1) % 360.0) / 360.0
    r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(s0, s1), rng.uniform(v0, v1))
    return round(r * 255), round(g * 255), round(b * 255)


def _hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return round(r * 255), round(g * 255), round(b * 255)


def _background_colour(rng: random.Random, vivid: bool) -> RGB:
    """A background colour: light tints mostly, white, dark or mid grey; any colour when ``vivid``."""
    if vivid and rng.random() < 0.6:
        return _hsv(rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.25, 1.0))
    r = rng.random()
    if r < 0.15:
        return (255, 255, 255)
    if r < 0.65:
        return _hsv(rng.random(), rng.uniform(0.0, 0.32), rng.uniform(0.82, 1.0))
    if r < 0.85:
        return _hsv(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.06, 0.3))
    return _hsv(rng.random(), rng.uniform(0.0, 0.12), rng.uniform(0.5, 0.72))


def random_look(rng: random.Random, vivid: bool = False) -> Look:
    """A random :class:`Look`. ``vivid``: also saturated backgrounds, heavy noise and textures (for
    pictures outside the model's world, where no shape colour has to stay readable)."""
    start = _background_colour(rng, vivid)
    end = start
    if rng.random() < 0.3:
        if rng.random() < 0.5:  # a shade of the same colour
            k = rng.uniform(0.75, 1.0)
            end = (round(start[0] * k), round(start[1] * k), round(start[2] * k))
        elif vivid:
            end = _background_colour(rng, vivid)
        else:  # another colour of the same lightness band (a light picture stays light end to end)
            value = max(start) / 255
            low, high = (0.82, 1.0) if value >= 0.8 else (0.06, 0.3) if value <= 0.3 else (0.5, 0.72)
            end = _hsv(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(low, high))
    texture, amount, period = "", 0.0, 8.0
    t = rng.random()
    if t < (0.35 if vivid else 0.08):
        texture = rng.choice(("stripes", "checks"))
        amount = rng.uniform(4.0, 30.0 if vivid else 12.0)
        period = rng.uniform(4.0, 40.0)
    elif t < (0.7 if vivid else 0.14):
        texture = "field"
        amount = rng.uniform(0.3, 1.0) if vivid else rng.uniform(0.1, 0.35)
    noise = 0.0
    if rng.random() < (0.7 if vivid else 0.45):
        noise = rng.uniform(2.0, 35.0 if vivid else 20.0)
    return Look(
        start=start,
        end=end,
        angle=rng.uniform(0.0, 360.0),
        texture=texture,
        texture_amount=amount,
        texture_period=period,
        noise=noise,
        colour_noise=rng.random() < 0.3,
        seed=rng.getrandbits(32),
        antialias=rng.random() < 0.55,
        jpeg_quality=rng.randint(30, 95) if rng.random() < 0.25 else 0,
    )


def _background(look: Look, width: int, height: int) -> np.ndarray:
    """The background as a float32 (H, W, 3) array in 0..255."""
    if look.end == look.start:
        canvas = np.empty((height, width, 3), np.float32)
        canvas[:] = np.array(look.start, np.float32)
    else:
        a = math.radians(look.angle)
        proj = np.arange(width, dtype=np.float32)[None, :] * math.cos(a) + np.arange(
            height, dtype=np.float32
        )[:, None] * math.sin(a)
        lo, hi = float(proj.min()), float(proj.max())
        t = ((proj - lo) / max(1e-6, hi - lo))[..., None]
        canvas = np.array(look.start, np.float32) + t * (
            np.array(look.end, np.float32) - np.array(look.start, np.float32)
        )
    if look.texture in ("stripes", "checks"):
        b = math.radians(look.angle) + 0.6
        xs = np.arange(width, dtype=np.float32)[None, :]
        ys = np.arange(height, dtype=np.float32)[:, None]
        wave = np.sign(np.sin(2 * math.pi * (xs * math.cos(b) + ys * math.sin(b)) / look.texture_period))
        if look.texture == "checks":
            v = -xs * math.sin(b) + ys * math.cos(b)
            wave = wave * np.sign(np.sin(2 * math.pi * v / look.texture_period))
        canvas += (wave * look.texture_amount / 2)[..., None]
    elif look.texture == "field":
        rng = np.random.default_rng(look.seed ^ 0x5EED)
        cells = rng.integers(2, 9, size=2)
        small = rng.integers(0, 256, size=(int(cells[0]), int(cells[1]), 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(small, "RGB").resize((width, height), Image.BICUBIC), np.float32)
        canvas = (1 - look.texture_amount) * canvas + look.texture_amount * field
    return canvas


def _polygon(shape: Shape, scale: float, ox: float, oy: float) -> list[tuple[float, float]] | None:
    """The shape's outline in a frame scaled by ``scale`` and shifted by ``(ox, oy)``; None: a circle."""
    s = shape.size
    cx, cy = shape.x + s / 2, shape.y + s / 2
    if shape.kind == "circle":
        return None
    if shape.kind == "square":
        half = s * shape.form / 2
        pts = [(-half, -half), (half, -half), (half, half), (-half, half)]
    elif shape.kind == "triangle":
        # form = height / base; the larger of the two fills the box.
        base, height = (s, s * shape.form) if shape.form <= 1 else (s / shape.form, s)
        pts = [(0.0, -height / 2), (base / 2, height / 2), (-base / 2, height / 2)]
    elif shape.kind == "star":
        outer = s * 0.52
        pts = []
        for i in range(10):
            r = outer if i % 2 == 0 else outer * shape.form
            ang = -math.pi / 2 + i * math.pi / 5
            pts.append((r * math.cos(ang), r * math.sin(ang) + s * 0.03))
    else:
        raise ValueError(f"unknown shape {shape.kind!r}")
    a = math.radians(shape.turn)
    ca, sa = math.cos(a), math.sin(a)
    return [((cx + px * ca - py * sa - ox) * scale, (cy + px * sa + py * ca - oy) * scale) for px, py in pts]


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, scale: float, ox: float, oy: float, value: int) -> None:
    pts = _polygon(shape, scale, ox, oy)
    if pts is None:
        s = shape.size
        r = s * shape.form / 2
        cx, cy = shape.x + s / 2, shape.y + s / 2
        draw.ellipse(
            ((cx - r - ox) * scale, (cy - r - oy) * scale, (cx + r - ox) * scale, (cy + r - oy) * scale),
            fill=value,
        )
    else:
        draw.polygon(pts, fill=value)


class _Shrunk:
    """A shape drawn ``by`` pixels smaller on every side (the fill inside an outline)."""

    def __init__(self, shape: Shape, by: float) -> None:
        self.kind, self.turn, self.form = shape.kind, shape.turn, shape.form
        self.size = shape.size - 2 * by
        self.x, self.y = shape.x + by, shape.y + by
        self.outline, self.outline_width = None, 0.0


def _coverage(shape: Shape, box: tuple[int, int, int, int], antialias: bool) -> np.ndarray:
    """Coverage (0..1, float32 (h, w, 1)) of ``shape`` over the pixel box ``(x0, y0, x1, y1)``."""
    x0, y0, x1, y1 = box
    ss = 4 if antialias else 1
    mask = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
    _draw(ImageDraw.Draw(mask), shape, ss, x0, y0, 255)
    if ss > 1:
        mask = mask.resize((x1 - x0, y1 - y0), Image.BOX)
    return (np.asarray(mask, np.float32) / 255.0)[..., None]


def render(
    width: int, height: int, look: Look, shapes: tuple[Shape, ...], fills: tuple[RGB, ...]
) -> Image.Image:
    """Draw a varied picture: background, shapes (in order, later on top), noise, JPEG round trip."""
    canvas = _background(look, width, height)
    for shape, fill in zip(shapes, fills, strict=True):
        pad = shape.size * 0.25 + 2
        box = (
            max(0, int(shape.x - pad)),
            max(0, int(shape.y - pad)),
            min(width, int(math.ceil(shape.x + shape.size + pad))),
            min(height, int(math.ceil(shape.y + shape.size + pad))),
        )
        if box[0] >= box[2] or box[1] >= box[3]:
            continue
        region = canvas[box[1] : box[3], box[0] : box[2]]
        inner: Shape = shape
        if shape.outline is not None and shape.outline_width > 0:
            alpha = _coverage(shape, box, look.antialias)
            region[:] = region * (1 - alpha) + np.array(shape.outline, np.float32) * alpha
            inner = _Shrunk(shape, shape.outline_width)
        alpha = _coverage(inner, box, look.antialias)
        region[:] = region * (1 - alpha) + np.array(fill, np.float32) * alpha
    if look.noise > 0:
        rng = np.random.default_rng(look.seed)
        channels = 3 if look.colour_noise else 1
        canvas += rng.normal(0.0, look.noise, size=(height, width, channels)).astype(np.float32)
    img = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
    if look.jpeg_quality:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=look.jpeg_quality)
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img


def label_map(width: int, height: int, shapes: tuple[Shape, ...]) -> Image.Image:
    """Mode ``L``: 0 for background, ``i + 1`` where ``shapes[i]`` (outline included) is on top."""
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    for i, shape in enumerate(shapes):
        _draw(draw, shape, 1.0, 0.0, 0.0, i + 1)
    return img
