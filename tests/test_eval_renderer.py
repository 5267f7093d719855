"""The separate evaluation renderer: its own code path, deterministic, answers that match the pixels."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest

from tritonvlm import eval_renderer, synthetic
from tritonvlm.eval_renderer import (
    EVAL_COLOURS,
    EVAL_TYPES,
    Figure,
    Picture,
    eval_sample,
    outside_picture,
    random_picture,
    repeats_too_much,
)

PAIR = re.compile(r"\b(" + "|".join(EVAL_COLOURS) + r") (" + "|".join(synthetic.SHAPES) + r")\b")


def test_a_separate_code_path():
    """Nothing of the training renderer is used: no Pillow drawing, no synthetic module, other values."""
    source = Path(eval_renderer.__file__).read_text(encoding="utf-8")
    code = "\n".join(line for line in source.splitlines() if line.startswith(("import ", "from ")))
    assert "ImageDraw" not in code and "synthetic" not in code and "tritonvlm" not in code
    assert "ImageDraw." not in source
    training_rgbs = set(synthetic.COLOURS.values())
    assert not training_rgbs & {rgb for rgbs in EVAL_COLOURS.values() for rgb in rgbs}
    assert set(EVAL_COLOURS) == set(synthetic.COLOURS)  # the same names: the model's vocabulary


def test_deterministic():
    for qtype in EVAL_TYPES:
        a, b = eval_sample(3, 1, qtype), eval_sample(3, 1, qtype)
        assert (a.question, a.answer, a.pictures) == (b.question, b.answer, b.pictures)
        assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images]
    assert eval_sample(3, 1, "describe").pictures != eval_sample(4, 1, "describe").pictures


def test_sizes_are_not_the_training_grid_and_vary():
    pictures = [p for i in range(60) for p in eval_sample(0, i, "two_images").pictures]
    assert all(p.width % 28 and p.height % 28 for p in pictures)
    assert len({(p.width, p.height) for p in pictures}) > 20
    for sample in (eval_sample(0, i, "two_images_seed") for i in range(20)):
        first, second = sample.pictures
        assert (first.width, first.height) != (second.width, second.height)
        assert not sample.text_first  # the seed sent its images before its text


def _inner_mask(picture: Picture, fig: Figure) -> np.ndarray:
    """Pixels well inside ``fig`` (the figure drawn alone at 75% of its size: no edge, no outline)."""
    inner = Figure(fig.kind, fig.colour, (255, 255, 255), fig.cx, fig.cy, fig.size * 0.75, fig.turn)
    lone = Picture(picture.width, picture.height, (0, 0, 0), (0, 0, 0), 0.0, 0, (inner,))
    return np.asarray(lone.render())[..., 0] == 255


@pytest.mark.parametrize("qtype", EVAL_TYPES)
def test_answers_match_the_pixels(qtype):
    """Every named shape is painted in (about) its colour where it should be, left to right."""
    for i in range(6):
        sample = eval_sample(7, i, qtype)
        for picture in sample.pictures:
            if picture.jpeg_quality is not None or picture.grain > 0:
                continue  # exact colours only on clean pictures
            img = np.asarray(picture.render(), dtype=np.int32)
            for fig in picture.figures:
                mask = _inner_mask(picture, fig)
                assert mask.sum() > 0.15 * fig.size**2
                assert np.abs(img[mask] - np.array(fig.rgb)).max() <= 1
            centres = [f.cx for f in picture.figures]
            assert centres == sorted(centres)
            for left, right in zip(picture.figures, picture.figures[1:], strict=False):
                assert left.cx + left.size / 2 < right.cx - right.size / 2  # "left of" has one answer
        described = PAIR.findall(sample.answer)
        if qtype == "describe":
            assert described == [(f.colour, f.kind) for f in sample.pictures[0].figures]
        elif qtype.startswith("two_images"):
            want = [(f.colour, f.kind) for p in sample.pictures for f in p.figures]
            assert described == want
            assert (
                sample.answer.startswith("The first image shows ")
                and ". The second image shows " in sample.answer
            )


def test_shapes_are_large_enough_after_the_processor_resize():
    rng = random.Random(5)
    for _ in range(200):
        picture = random_picture(rng)
        factor = min(1.0, (224 * 224 / (picture.width * picture.height)) ** 0.5)
        assert all(f.size * factor >= 31.9 for f in picture.figures)
        for f in picture.figures:
            assert f.cx - f.size / 2 >= 0 and f.cx + f.size / 2 <= picture.width
            assert f.cy - f.size / 2 >= 0 and f.cy + f.size / 2 <= picture.height


def test_outside_pictures_are_outside_the_world():
    rng = random.Random(1)
    pictures = [outside_picture(rng) for _ in range(20)]
    assert all(4 <= len(p.figures) <= 6 for p in pictures)
    assert all(max(p.width, p.height) <= 1024 for p in pictures)
    assert any(max(p.width, p.height) == 1024 for p in pictures)
    assert all(p.grain >= 10 for p in pictures)
    assert len({p.top for p in pictures}) > 5
    assert any(len({f.kind for f in p.figures}) < len(p.figures) for p in pictures)  # kinds repeat


def test_encoded_pictures():
    jpeg = next(p for p in (random_picture(random.Random(i)) for i in range(100)) if p.jpeg_quality)
    data, mime = jpeg.encoded()
    assert mime == "image/jpeg" and data[:2] == b"\xff\xd8"
    png = next(p for p in (random_picture(random.Random(i)) for i in range(100)) if not p.jpeg_quality)
    data, mime = png.encoded()
    assert mime == "image/png" and data[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("text", "loops"),
    [
        ("A red circle and a blue square.", False),
        ("There are three shapes.", False),
        ("The three three three, a green square", True),
        ("three, three, three", True),
        ("a green square three three, a green square three three", False),
        ("red circle red circle red circle", True),
        ("The first image shows a red star. The second image shows a red star.", False),
        ("", False),
    ],
)
def test_repeats_too_much(text, loops):
    assert repeats_too_much(text) is loops
