"""The synthetic shapes data: deterministic for a seed, answers that match what was drawn, full coverage."""

from __future__ import annotations

import base64
import io
import json
import random
import re

import numpy as np
import pytest
from PIL import Image

from tritonvlm import synthetic, synthetic_looks
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
        elif qtype == "json":
            (shape,) = scene.shapes
            assert json.loads(sample.answer) == {"shape": shape.kind, "colour": shape.colour}
            assert sample.answer == f'{{"shape": "{shape.kind}", "colour": "{shape.colour}"}}'
        else:
            assert len(sample.scenes) == 2
            first, second = sample.answer.split(". The second image shows ")
            assert first.startswith("The first image shows ")
            assert PAIR.findall(first) == pairs
            assert PAIR.findall(second) == [(s.colour, s.kind) for s in sample.scenes[1].shapes]


def test_reworded_two_image_questions_are_often_the_seeds_request():
    samples = [make_sample(9, i, "two_images", paraphrase=True, varied=True) for i in range(200)]
    seed_share = sum(s.question == synthetic.SEED_TWO_IMAGE_PROMPT for s in samples) / len(samples)
    assert 0.45 <= seed_share <= 0.75  # half directly, plus its place among the other wordings
    three = sum(len(sc.shapes) == 3 for s in samples for sc in s.scenes) / (2 * len(samples))
    assert three > 0.4  # drawn twice as often as one or two shapes


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


# ---- varied scenes (what the demo model is trained on) ----


def _processed_size(width: int, height: int) -> tuple[int, int]:
    """The picture's size after the demo processor's resize (as Qwen2-VL's smart_resize, factor 28)."""
    area = width * height
    scale = min(1.0, (synthetic.PROCESSOR_MAX_PIXELS / area) ** 0.5)
    return round(width * scale), round(height * scale)


def test_varied_samples_are_deterministic():
    for i in range(12):
        a, b = (
            make_sample(8, i, varied=True, paraphrase=True),
            make_sample(8, i, varied=True, paraphrase=True),
        )
        assert (a.question, a.answer, a.scenes) == (b.question, b.answer, b.scenes)
        assert [pixels(im) for im in a.images] == [pixels(im) for im in b.images]


def test_varied_scenes_cover_the_processor_range_and_the_looks():
    rng = random.Random(21)
    scenes = [synthetic.varied_scene(rng) for _ in range(400)]
    processed = [_processed_size(s.width, s.height) for s in scenes]
    areas = [w * h for w, h in processed]
    assert min(areas) < 80 * 80 and max(areas) > 0.95 * synthetic.PROCESSOR_MAX_PIXELS
    aspects = [s.width / s.height for s in scenes]
    assert min(aspects) < 0.5 and max(aspects) > 2.0
    assert max(max(s.width, s.height) for s in scenes) > 700  # some drawn large, for the processor to shrink
    assert all(max(s.width, s.height) <= 1024 and min(s.width, s.height) >= 56 for s in scenes)
    looks = [s.look for s in scenes]
    assert {look.antialias for look in looks} == {True, False}
    assert {bool(look.jpeg_quality) for look in looks} == {True, False}
    assert {look.texture for look in looks} == {"", "stripes", "checks", "field"}
    assert {look.start == look.end for look in looks} == {True, False}  # plain and gradients
    assert {look.noise > 0 for look in looks} == {True, False}
    assert len({look.start for look in looks}) > 100
    assert {s.shapes[0].outline is None for s in scenes} == {True, False}
    sides = [shape.size for s in scenes for shape in s.shapes]
    assert min(sides) <= 30 and max(sides) > 150
    assert len({round(shape.turn) for s in scenes for shape in s.shapes}) > 20


def test_varied_layout_is_inside_and_ordered_left_to_right():
    """Drawn pixels (the label map) of each shape lie inside the picture, left to right, never overlapping
    horizontally, so "left of" has one answer whatever the turn."""
    rng = random.Random(22)
    for _ in range(150):
        scene = synthetic.varied_scene(rng)
        labels = np.asarray(scene.render_mask())
        assert labels.shape == (scene.height, scene.width)
        spans = []
        for k, shape in enumerate(scene.shapes, start=1):
            ys, xs = np.nonzero(labels == k)
            assert len(xs) > 0.25 * shape.size**2 * 0.5, shape
            spans.append((xs.min(), xs.max()))
        for (_, right_end), (left_start, _) in zip(spans, spans[1:], strict=False):
            assert right_end < left_start
        assert len({s.kind for s in scene.shapes}) == len(scene.shapes)


def test_varied_pixels_match_the_scene():
    """On clean looks (no noise, texture, JPEG or outline), each shape's inside has its fill colour."""
    rng = random.Random(23)
    checked = 0
    while checked < 30:
        scene = synthetic.varied_scene(rng)
        look = scene.look
        if look.noise or look.texture or look.jpeg_quality or scene.shapes[0].outline is not None:
            continue
        img = np.asarray(scene.render(), dtype=np.int32)
        labels = np.asarray(scene.render_mask())
        for k, fill in enumerate(scene.fills, start=1):
            core = labels == k
            for _ in range(2):  # two pixels in from the edge (the label map is drawn aliased)
                core = np.pad(
                    core[1:-1, 1:-1] & core[:-2, 1:-1] & core[2:, 1:-1] & core[1:-1, :-2] & core[1:-1, 2:], 1
                )
            assert core.sum() > 0
            assert np.abs(img[core] - np.array(fill)).max() <= 1
        checked += 1


def test_fill_colours_stay_in_their_names():
    import colorsys

    rng = random.Random(24)
    centres = {"red": 0, "orange": 30, "yellow": 55, "green": 120, "blue": 220, "purple": 283}
    for colour in COLOURS:
        for _ in range(200):
            r, g, b = synthetic_looks.random_fill(rng, colour)
            h, s, v = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
            nearest = min(
                centres, key=lambda c: min(abs(h * 360 - centres[c]), 360 - abs(h * 360 - centres[c]))
            )
            assert nearest == colour, (colour, (r, g, b))
            assert s >= 0.5 and v >= 0.4


def test_crowds_and_empty_pictures_have_short_answers():
    samples = [make_sample(25, i, varied=True) for i in range(1500)]
    crowd = [s for s in samples if any(sc.content == "crowd" for sc in s.scenes)]
    empty = [s for s in samples if any(sc.content == "empty" for sc in s.scenes)]
    assert crowd and empty
    for sample in crowd + empty:
        assert sample.qtype in ("describe", "count", "two_images")
        if sample.qtype == "describe":
            assert sample.answer in ("There are many shapes.", "There are no shapes.")
        if sample.qtype == "count":
            assert sample.answer in ("There are many shapes.", "There are no shapes.")
    for sample in crowd:
        scene = next(sc for sc in sample.scenes if sc.content == "crowd")
        assert 4 <= len(scene.shapes) <= 6
    assert any("shows many shapes" in s.answer for s in crowd)
    assert all(not sc.shapes for s in empty for sc in s.scenes if sc.content == "empty")


def test_the_seed_prompt_is_among_the_two_image_questions():
    questions = {make_sample(26, i, "two_images", paraphrase=True).question for i in range(200)}
    assert synthetic.SEED_TWO_IMAGE_PROMPT in questions
    assert synthetic.CANONICAL_QUESTIONS["two_images"] in questions
