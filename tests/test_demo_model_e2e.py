"""End to end with the built-in demo model (models/tritonvlm-shapes-demo): the answers must be right.

The OpenAI SDK talks to a real `tritonvlm serve` (tritonserver + uvicorn) started with no ``--model``,
so it serves its built-in default, the trained shapes model. Most pictures come from the separate
evaluation renderer (:mod:`tritonvlm.eval_renderer`: another rasteriser, palette, proportions, sizes and
layout than the training pictures), a few from the training renderer (:mod:`tritonvlm.synthetic`).
Skipped when the model folder is missing (train it with ``python scripts/train_demo_model.py``).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from conftest import ServerProcess, serving

from tritonvlm import eval_renderer, synthetic
from tritonvlm.cli import DEFAULT_MODEL_NAME, DEMO_MODEL_DIR
from tritonvlm.eval_renderer import SEED_TWO_IMAGE_PROMPT, Figure, Picture
from tritonvlm.synthetic import COLOURS, SHAPES, make_scene

pytestmark = pytest.mark.e2e

DEMO_DIR = Path(__file__).resolve().parents[1] / "models" / "tritonvlm-shapes-demo"
MODEL = DEFAULT_MODEL_NAME
PAIR = re.compile(r"\b(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")\b")
WHITE, LIGHT_BLUE, ALICE_BLUE = (255, 255, 255), (173, 216, 230), (240, 248, 255)


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory: pytest.TempPathFactory):
    if not (DEMO_DIR / "config.json").exists() or not (DEMO_DIR / "model.safetensors").exists():
        pytest.skip(f"no demo model at {DEMO_DIR} (run scripts/train_demo_model.py)")
    assert DEMO_MODEL_DIR == DEMO_DIR
    yield from serving(ServerProcess(None, tmp_path_factory.mktemp("serve-demo")))  # no --model: the default


@pytest.fixture(scope="session")
def demo_client(demo_server):
    import openai

    return openai.OpenAI(base_url=demo_server.base_url + "/v1", api_key="unused", timeout=120, max_retries=0)


def png(scene: synthetic.Scene) -> bytes:
    import io

    buf = io.BytesIO()
    scene.render().save(buf, format="PNG")
    return buf.getvalue()


def data_url(picture: Picture) -> str:
    import base64

    data, mime = picture.encoded()
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def ask(client, text: str, urls: list[str], max_tokens: int = 64, text_first: bool = True) -> str:
    """The greedy answer; it must end with a stop (the end of the answer), not the token limit."""
    images = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    text_part = [{"type": "text", "text": text}]
    content = text_part + images if text_first else images + text_part
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=max_tokens
    )
    assert response.choices[0].finish_reason == "stop", response.choices[0].message.content
    return response.choices[0].message.content


def test_seed_request_single_image(demo_client, image_server):
    scene = make_scene([("red", "circle"), ("blue", "square")])
    url = image_server.add("/demo/red-circle-blue-square.png", png(scene))
    answer = ask(demo_client, "What is in this image?", [url])
    assert PAIR.findall(answer) == [("red", "circle"), ("blue", "square")], answer
    assert answer == "A red circle and a blue square."


def test_seed_request_two_images_of_sizes_it_was_not_trained_on(demo_client, image_server):
    """The seed's second example verbatim: two images (640x480 and 301x227, drawn by the separate
    renderer, off the processor's 28-pixel grid), then its request; one image by URL, one inline."""
    first = Picture(
        640, 480, ALICE_BLUE, ALICE_BLUE, 0.0, 0, (Figure("triangle", "green", (34, 139, 34), 420, 250, 150),)
    )
    second = Picture(
        301,
        227,
        WHITE,
        WHITE,
        0.0,
        0,
        (
            Figure("square", "red", (255, 0, 0), 80, 120, 70, 6.0),
            Figure("circle", "blue", (0, 0, 255), 215, 100, 64),
        ),
    )
    urls = [image_server.add("/demo/first.png", first.encoded()[0]), data_url(second)]
    answer = ask(demo_client, SEED_TWO_IMAGE_PROMPT, urls, text_first=False)
    assert (
        answer
        == "The first image shows a green triangle. The second image shows a red square and a blue circle."
    )
    # The same two images the other way round: the answer follows the order of the images.
    answer = ask(demo_client, SEED_TWO_IMAGE_PROMPT, urls[::-1], text_first=False)
    assert (
        answer
        == "The first image shows a red square and a blue circle. The second image shows a green triangle."
    )


def test_the_issue_640x480_picture(demo_client):
    """The issue's babble case: 640x480, light-blue background, a green square and a yellow circle."""
    picture = Picture(
        640,
        480,
        LIGHT_BLUE,
        LIGHT_BLUE,
        0.0,
        0,
        (
            Figure("square", "green", (0, 128, 0), 180, 300, 140),
            Figure("circle", "yellow", (255, 255, 0), 470, 170, 130),
        ),
    )
    assert (
        ask(demo_client, "What is in this image?", [data_url(picture)])
        == "A green square and a yellow circle."
    )


def test_same_question_different_images_different_right_answers(demo_client):
    scenes = [
        make_scene([("yellow", "triangle")], background="light grey"),
        make_scene([("purple", "star"), ("orange", "circle"), ("green", "square")]),
    ]
    answers = [
        ask(demo_client, "What is in this image?", [synthetic.to_data_url(s.render())]) for s in scenes
    ]
    assert answers == ["A yellow triangle.", "A purple star, an orange circle and a green square."]


def test_separate_renderer_every_question_type(demo_client):
    """Four pictures of every question type from the separate renderer, answered exactly through the
    server (the full evaluation is scripts/eval_demo_model.py)."""
    wrong = []
    for sample in eval_renderer.eval_set(97_531, 4):
        urls = [data_url(p) for p in sample.pictures]
        answer = ask(demo_client, sample.question, urls, text_first=sample.text_first)
        if answer != sample.answer:
            wrong.append((sample.qtype, answer, sample.answer))
    assert len(wrong) <= 2, wrong


def test_training_renderer_held_out_questions(demo_client):
    """A few held-out pictures of the training renderer's classic style, every question type."""
    wrong = []
    samples = [
        synthetic.make_sample(31_337, i, qtype) for qtype in synthetic.QUESTION_TYPES for i in range(3)
    ]
    for sample in samples:
        answer = ask(demo_client, sample.question, [synthetic.to_data_url(im) for im in sample.images])
        if answer != sample.answer:
            wrong.append((sample.question, answer, sample.answer))
    assert len(wrong) <= 1, wrong


def test_pictures_outside_its_world_get_short_well_formed_answers(demo_client):
    """Four to six shapes on coloured, noisy backgrounds, up to 1024x1024: a stop (checked by ``ask``)
    and no word or phrase more than twice in a row, for one image and for the seed's two-image request."""
    rng = random.Random(2024)
    pictures = [eval_renderer.outside_picture(rng) for _ in range(4)]
    pictures.append(eval_renderer.outside_picture(rng, size=(1024, 1024)))
    urls = [data_url(p) for p in pictures]
    answers = [ask(demo_client, "What is in this image?", [url]) for url in urls]
    answers.append(ask(demo_client, SEED_TWO_IMAGE_PROMPT, urls[:2], text_first=False))
    for answer in answers:
        assert answer and not eval_renderer.repeats_too_much(answer), answers
        assert len(answer.split()) <= 30, answers


def test_structured_output_reads_the_picture(demo_client):
    """A JSON schema with the shape and colour enums (issue 13's demo case), through the SDK's
    ``parse``: the values are the drawn ones, on the separate renderer's pictures."""
    from typing import Literal

    from pydantic import BaseModel

    class Shape(BaseModel):
        shape: Literal["circle", "square", "triangle", "star"]
        colour: Literal["red", "green", "blue", "yellow", "purple", "orange"]

    wrong = []
    samples = [eval_renderer.eval_sample(77, i, "json") for i in range(6)]
    for sample in samples:
        (picture,) = sample.pictures
        (figure,) = picture.figures
        content = [
            {"type": "image_url", "image_url": {"url": data_url(picture)}},
            {"type": "text", "text": sample.question},
        ]
        completion = demo_client.beta.chat.completions.parse(
            model=MODEL,
            messages=[{"role": "user", "content": content}],
            response_format=Shape,
            temperature=0,
            max_tokens=32,
        )
        parsed = completion.choices[0].message.parsed
        if (parsed.shape, parsed.colour) != (figure.kind, figure.colour):
            wrong.append((figure.colour, figure.kind, parsed))
    assert len(wrong) <= 1, wrong
