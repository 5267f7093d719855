"""The synthetic shapes data: deterministic for a seed, answers that match what was drawn, full coverage."""

from __future__ import annotations

import base64
import io
import random
import re

import numpy as np
import pytest
from PIL import Image

from tritonvlm import synthetic
from tritonvlm.synthetic import COLOURS, QUESTION_TYPES, SHAPES, make_sample, make_scene, random_scene

PAIR = re.compile(r"\b(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")\b")


def pixels(img: Image.Image) -> bytes:
    return img.tobytes()


def test_same_seed_same_samples():
    for i in range(20):
        a, b = make_sample(7, i, paraphrase=True), make_sample(7, i, paraphrase=True)
        assert (a.qtype, a.question, a.answer, a.text_first) == (b.qtype, b.question, b.answer, b.text_first)
        assert a.scenes == b.scenes
        assert [pixels(im) for im in a.images] == [pixels(im) for im in b.images]


def test_different_seeds_or_indices_differ():
    first = [make_sample(1, i).scenes for i in range(10)]
    assert first != [make_sample(2, i).scenes for i in range(10)]
    assert len({s for scenes in first for s in scenes}) == sum(len(s) for s in first)


def test_every_shape_colour_type_and_background_appears():
    samples = [make_sample(3, i) for i in range(300)]
    scenes = [scene for s in samples for scene in s.scenes]
    assert {shape.kind for sc in scenes for shape in sc.shapes} == set(SHAPES)
    assert {shape.colour for sc in scenes for shape in sc.shapes} == set(COLOURS)
    assert {s.qtype for s in samples} == set(QUESTION_TYPES)
    assert {len(sc.shapes) for sc in scenes} == {1, 2, 3}
    assert {sc.background for sc in scenes} == set(synthetic.BACKGROUNDS)
    assert {sc.noise_seed is None for sc in scenes} == {True, False}
    assert len({(sc.width, sc.height) for sc in scenes}) > 10


def test_layout_is_inside_the_image_ordered_and_separated():
    rng = random.Random(11)
    for _ in range(300):
        scene = random_scene(rng)
        assert scene.width >= 112 and scene.height >= 112
        assert scene.width * scene.height <= 448 * 448
        kinds = [s.kind for s in scene.shapes]
        assert len(set(kinds)) == len(kinds)
        for shape in scene.shapes:
            assert synthetic.SHAPE_MIN <= shape.size <= synthetic.SHAPE_MAX
            assert shape.x >= 0 and shape.x + shape.size <= scene.width
            assert shape.y >= 0 and shape.y + shape.size <= scene.height
        for left, right in zip(scene.shapes, scene.shapes[1:], strict=False):
            assert left.x + left.size <= right.x  # columns: no overlap, left-to-right order is unambiguous


def test_drawn_pixels_match_the_scene():
    """Each shape's label-map region is painted in (about) its colour, and nothing else is."""
    for i in range(40):
        scene = random_scene(random.Random(i), noise=False)
        img = np.asarray(scene.render(), dtype=np.int32)
        mask = np.asarray(scene.render_mask())
        assert set(np.unique(mask)) == set(range(len(scene.shapes) + 1))
        for k, shape in enumerate(scene.shapes, start=1):
            region = img[mask == k]
            assert region.shape[0] > 0.3 * shape.size**2  # a big shape, not a sliver
            assert np.abs(region.mean(0) - np.array(COLOURS[shape.colour])).max() < 20
            ys, xs = np.nonzero(mask == k)
            assert shape.x <= xs.min() and xs.max() < shape.x + shape.size
            assert shape.y <= ys.min() and ys.max() < shape.y + shape.size
        background = img[mask == 0]
        assert np.abs(background - np.array(synthetic.BACKGROUNDS[scene.background])).max() == 0


def test_shape_kinds_are_distinct_silhouettes():
    """Same box, different kinds: the label maps differ a lot (a tiny model must tell them apart)."""
    masks = {}
    for kind in SHAPES:
        scene = make_scene([("red", kind)], width=112, height=112, size=60)
        masks[kind] = np.asarray(scene.render_mask()) > 0
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (masks[a] ^ masks[b]).sum() > 0.1 * 60 * 60, (a, b)


@pytest.mark.parametrize("qtype", QUESTION_TYPES)
def test_answers_follow_the_drawn_scene(qtype):
    for i in range(60):
        sample = make_sample(5, i, qtype)
        assert sample.qtype == qtype
        assert sample.question == synthetic.CANONICAL_QUESTIONS[qtype].format(
            **_fields(sample.question, qtype)
        )
        scene = sample.scenes[0]
        pairs = [(s.colour, s.kind) for s in scene.shapes]
        if qtype == "describe":
            assert PAIR.findall(sample.answer) == pairs
            assert sample.answer[0].isupper() and sample.answer.endswith(".")
        elif qtype == "colour":
            kind = sample.question.split("the ")[-1].rstrip("?")
            (shape,) = [s for s in scene.shapes if s.kind == kind]
            assert sample.answer == f"The {kind} is {shape.colour}."
        elif qtype == "count":
            words = {1: "There is one shape.", 2: "There are two shapes.", 3: "There are three shapes."}
            assert sample.answer == words[len(scene.shapes)]
        elif qtype == "position":
            side, kind = re.match(
                r"Which shape is to the (left|right) of the (\w+)\?", sample.question
            ).groups()
            idx = [s.kind for s in scene.shapes].index(kind)
            others = scene.shapes[:idx] if side == "left" else scene.shapes[idx + 1 :]
            assert len(others) == 1  # only questions with one right answer are asked
            assert sample.answer == f"The {others[0].colour} {others[0].kind}."
        else:
            assert len(sample.scenes) == 2
            first, second = sample.answer.split(". The second image shows ")
            assert first.startswith("The first image shows ")
            assert PAIR.findall(first) == pairs
            assert PAIR.findall(second) == [(s.colour, s.kind) for s in sample.scenes[1].shapes]


def _fields(question: str, qtype: str) -> dict[str, str]:
    if qtype == "colour":
        return {"shape": question.split("the ")[-1].rstrip("?")}
    if qtype == "position":
        side, kind = re.match(r"Which shape is to the (\w+) of the (\w+)\?", question).groups()
        return {"side": side, "shape": kind}
    return {}


def test_articles_and_lists():
    scene = make_scene([("orange", "circle"), ("blue", "star"), ("red", "square")])
    assert scene.describe() == "an orange circle, a blue star and a red square"
    assert make_scene([("red", "triangle")]).describe() == "a red triangle"


def test_paraphrases_and_order_are_drawn_from_the_stream():
    samples = [make_sample(9, i, paraphrase=True) for i in range(200)]
    assert {s.text_first for s in samples} == {True, False}
    assert len({s.question for s in samples if s.qtype == "describe"}) > 2
    canonical = [make_sample(9, i) for i in range(50)]
    assert all(s.text_first for s in canonical)


def test_messages_and_data_urls():
    sample = make_sample(4, 0, "two_images")
    content = sample.messages()[0]["content"]
    assert content[0] == {"type": "text", "text": sample.question}
    assert content[1:] == [{"type": "image"}, {"type": "image"}]
    url = synthetic.to_data_url(sample.images[0])
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.tobytes() == sample.images[0].tobytes()


def test_grid_friendly_sizes():
    """Most pictures have sides that are multiples of 28 (no resampling by the image processor)."""
    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(400)]
    snapped = sum(s.width % 28 == 0 and s.height % 28 == 0 for s in scenes)
    assert 0.6 * len(scenes) < snapped < len(scenes)


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_sample(0, 0, "nonsense")
    with pytest.raises(ValueError):
        make_scene([("red", "circle"), ("blue", "circle")])
    with pytest.raises(ValueError):
        make_scene([("pink", "circle")])
