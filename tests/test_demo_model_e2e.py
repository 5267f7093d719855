"""End to end with the built-in demo model (models/tritonvlm-shapes-demo): the answers must be right.

The OpenAI SDK talks to a real `tritonvlm serve` (tritonserver + uvicorn) started with no ``--model``,
so it serves its built-in default, the trained shapes model; the pictures are drawn by
:mod:`tritonvlm.synthetic`. Skipped when the model folder is missing (train it with
``python scripts/train_demo_model.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ServerProcess, serving

from tritonvlm import synthetic
from tritonvlm.cli import DEFAULT_MODEL_NAME, DEMO_MODEL_DIR
from tritonvlm.synthetic import COLOURS, SHAPES, make_scene

pytestmark = pytest.mark.e2e

DEMO_DIR = Path(__file__).resolve().parents[1] / "models" / "tritonvlm-shapes-demo"
MODEL = DEFAULT_MODEL_NAME
PAIR = re.compile(r"\b(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")\b")
TWO_IMAGE_PROMPT = (
    "describe the first image in one sentence, and then describe the second image in another sentence"
)


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


def ask(client, text: str, urls: list[str], max_tokens: int = 64) -> str:
    content = [{"type": "text", "text": text}]
    content += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=max_tokens
    )
    assert response.choices[0].finish_reason == "stop"
    return response.choices[0].message.content


def test_seed_request_single_image(demo_client, image_server):
    scene = make_scene([("red", "circle"), ("blue", "square")])
    url = image_server.add("/demo/red-circle-blue-square.png", png(scene))
    answer = ask(demo_client, "What is in this image?", [url])
    assert PAIR.findall(answer) == [("red", "circle"), ("blue", "square")], answer
    assert answer == "A red circle and a blue square."


def test_seed_request_two_images(demo_client, image_server):
    first = make_scene([("red", "circle")])
    second = make_scene([("green", "star"), ("blue", "square")], background="cream", noise_seed=5)
    urls = [
        image_server.add("/demo/first.png", png(first)),
        synthetic.to_data_url(second.render()),  # one by URL, one inline
    ]
    answer = ask(demo_client, TWO_IMAGE_PROMPT, urls)
    sentences = [s for s in re.split(r"(?<=\.)\s+", answer.strip()) if s]
    assert len(sentences) == 2, answer
    assert "first image" in sentences[0] and "second image" in sentences[1], answer
    assert PAIR.findall(sentences[0]) == [("red", "circle")], answer
    assert PAIR.findall(sentences[1]) == [("green", "star"), ("blue", "square")], answer


def test_same_question_different_images_different_right_answers(demo_client):
    scenes = [
        make_scene([("yellow", "triangle")], background="light grey"),
        make_scene([("purple", "star"), ("orange", "circle"), ("green", "square")]),
    ]
    answers = [
        ask(demo_client, "What is in this image?", [synthetic.to_data_url(s.render())]) for s in scenes
    ]
    assert answers[0] != answers[1]
    for scene, answer in zip(scenes, answers, strict=True):
        assert PAIR.findall(answer) == [(s.colour, s.kind) for s in scene.shapes], answer
    assert answers == ["A yellow triangle.", "A purple star, an orange circle and a green square."]


def test_held_out_questions_of_every_type(demo_client):
    """A small held-out sample of every question type, answered exactly (greedy) through the server."""
    wrong = []
    samples = [
        synthetic.make_sample(31_337, i, qtype) for qtype in synthetic.QUESTION_TYPES for i in range(6)
    ]
    for sample in samples:
        urls = [synthetic.to_data_url(im) for im in sample.images]
        answer = ask(demo_client, sample.question, urls)
        if answer != sample.answer:
            wrong.append((sample.question, answer, sample.answer))
    assert len(wrong) <= 2, wrong
