"""Every model family through the whole real pipeline: OpenAI SDK → uvicorn → tritonserver (vlm with
the engine → preprocess → vision_encoder), one server per family with that family's tiny test model.

Greedy answers must be token-identical to the family's own ``generate()`` for text-only, one-image
and two-image prompts sent with staggered arrivals (later requests join a running batch), and the
prompt token counts must equal the family's processor's."""

from __future__ import annotations

import base64
import threading
import time

import httpx
import pytest
from conftest import ServerProcess, make_image, serving
from family_harness import FAMILIES, Case, cases_for, conversation
from test_e2e import metric

pytestmark = pytest.mark.e2e

MAX_NEW = 16
# Not training sizes of anything, and different from each other.
SEED_FIRST, SEED_SECOND = make_image(96, 64, "red"), make_image(72, 120, "blue", "square")
SEED_TWO_IMAGE_PROMPT = (
    "I have two very different images. They are not related at all. Please describe the first image in "
    "one sentence, and then describe the second image in another sentence."
)


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def openai_messages(case: Case) -> list[dict]:
    """The case as an OpenAI chat request, images as data URLs in order."""
    images = iter(case.images)
    out = []
    for msg in case.messages:
        content = msg["content"]
        if isinstance(content, list):
            content = [
                {"type": "image_url", "image_url": {"url": data_url(next(images))}}
                if p["type"] == "image"
                else p
                for p in content
            ]
        out.append({"role": msg["role"], "content": content})
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family_server(request, family_kit, tmp_path_factory):
    kit = family_kit(request.param)
    proc = ServerProcess(kit.model_dir, tmp_path_factory.mktemp(f"serve-{kit.name}"))
    for server in serving(proc, clean_unload=False):
        import openai

        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", timeout=120, max_retries=0)
        yield kit, server, client


@pytest.fixture(scope="module")
def references(family_server):
    """Per case: the tokens generate() gives it alone and its prompt length per the processor."""
    kit, _, _ = family_server
    return {
        case.name: (
            kit.reference_tokens(case, MAX_NEW),
            int(kit.reference_inputs(case)["input_ids"].shape[1]),
        )
        for case in cases_for(kit.name)
    }


def test_staggered_greedy_requests_match_generate(family_server, references):
    kit, _, client = family_server
    cases = cases_for(kit.name) * 2
    results: list = [None] * len(cases)

    def one(i: int) -> None:
        time.sleep(0.15 * i)  # staggered: later requests join a batch that is decoding
        try:
            results[i] = client.chat.completions.create(
                model="tiny", messages=openai_messages(cases[i]), temperature=0, max_tokens=MAX_NEW
            )
        except Exception as exc:  # asserted below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for case, response in zip(cases, results, strict=True):
        assert not isinstance(response, Exception), (case.name, response)
        tokens, prompt_len = references[case.name]
        expected = kit.tokenizer.decode(tokens, skip_special_tokens=True)
        assert response.choices[0].message.content == expected, case.name
        assert response.usage.prompt_tokens == prompt_len, case.name
        assert response.usage.completion_tokens == len(tokens), case.name


def test_stream_equals_non_streamed_and_usage_matches(family_server):
    kit, _, client = family_server
    case = cases_for(kit.name)[1]  # one image
    kwargs = {"model": "tiny", "messages": openai_messages(case), "temperature": 0, "max_tokens": MAX_NEW}
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_long_shared_start_is_served_from_the_prefix_cache(family_server):
    """Three questions after the same image and long text: the third starts from the cached keys and
    values of the shared start (Gemma 3, whose tiny window is shorter than it: from the entry the
    second kept where the first two branch), and every answer is generate()'s."""
    kit, _, client = family_server
    long_text = " ".join(["The quick brown fox jumps over the lazy dog."] * 6)
    questions = ["Now name the colour of the image.", "Now describe the image.", "Now count the shapes."]
    cases = [Case(q, conversation(f"{long_text} {q}", 1), [make_image(64, 48, "green")]) for q in questions]
    ids = [kit.engine_inputs(case)[0] for case in cases]
    shared = next(i for i, (a, b) in enumerate(zip(ids[0], ids[1], strict=False)) if a != b)
    assert shared == next(i for i, (a, b) in enumerate(zip(ids[0], ids[2], strict=False)) if a != b)
    cached = []
    for case in cases:
        response = client.chat.completions.create(
            model="tiny", messages=openai_messages(case), temperature=0, max_tokens=MAX_NEW
        )
        expected = kit.tokenizer.decode(kit.reference_tokens(case, MAX_NEW), skip_special_tokens=True)
        assert response.choices[0].message.content == expected, case.name
        cached.append(response.usage.prompt_tokens_details.cached_tokens)
    assert cached[2] >= shared, cached


def test_seeded_sampling_is_reproducible(family_server):
    kit, _, client = family_server
    case = cases_for(kit.name)[1]
    kwargs = {"model": "tiny", "messages": openai_messages(case), "temperature": 1.0, "max_tokens": 12}
    first = client.chat.completions.create(seed=7, **kwargs).choices[0].message.content
    again = client.chat.completions.create(seed=7, **kwargs).choices[0].message.content
    assert first == again


def test_images_change_the_answer(family_server):
    """The random weights must let the picture matter (some families zero-initialise projectors)."""
    kit, _, client = family_server
    answers = set()
    for color in ("red", "blue", "green"):
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(make_image(64, 64, color))}},
                    {"type": "text", "text": "What is in this image?"},
                ],
            }
        ]
        response = client.chat.completions.create(
            model="tiny", messages=messages, temperature=0, max_tokens=8
        )
        answers.add(response.choices[0].message.content)
    assert len(answers) > 1, answers


def test_seed_examples_answer(family_server):
    """The seed's two requests (one image; two images + the two-image question) answer on every family,
    or, where the family takes one image per prompt, the second is refused with a 400 that says so."""
    kit, server, client = family_server
    one = client.chat.completions.create(
        model="tiny",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": data_url(SEED_FIRST)}},
                ],
            }
        ],
        max_tokens=24,
    )
    assert one.choices[0].finish_reason in ("stop", "length")
    body = {
        "model": "tiny",
        "max_tokens": 24,
        "temperature": 0,  # (sampled, a random model's answer may be one end-of-sequence token)
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(SEED_FIRST)}},
                    {"type": "image_url", "image_url": {"url": data_url(SEED_SECOND)}},
                    {"type": "text", "text": SEED_TWO_IMAGE_PROMPT},
                ],
            }
        ],
    }
    response = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)
    limit = kit.family_cls.max_images_per_prompt
    if limit is not None and limit < 2:
        assert response.status_code == 400, response.text
        assert "at most" in response.json()["error"]["message"]
    else:
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["choices"][0]["message"]["content"] and answer["usage"]["completion_tokens"] >= 1


def test_dropped_stream_frees_its_sequence(family_server):
    kit, server, _ = family_server
    body = {
        "model": "tiny",
        "stream": True,
        "max_tokens": 2000,
        "temperature": 0,
        "ignore_eos": True,
        "messages": openai_messages(cases_for(kit.name)[1]),
    }
    cancelled = metric(server, "tritonvlm_engine_requests_total", outcome="cancelled")
    with (
        httpx.Client(base_url=server.base_url, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        for n, _ in enumerate(response.iter_lines()):
            if n > 4:
                break
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done = metric(server, "tritonvlm_engine_requests_total", outcome="cancelled") > cancelled
        if done and metric(server, "tritonvlm_engine_sequences", state="running") == 0:
            break
        time.sleep(0.2)
    assert metric(server, "tritonvlm_engine_requests_total", outcome="cancelled") > cancelled
    assert metric(server, "tritonvlm_engine_sequences", state="running") == 0
    assert metric(server, "tritonvlm_engine_extra_state_bytes") == 0
