"""End to end: the image-embedding cache in the shared server (OpenAI SDK → uvicorn → tritonserver). A
repeated image skips vision_encoder (the hit counter on Triton's metrics port moves, the encoder's
own request count does not), and, sent as the same file, its preprocessing (the skip counter moves:
preprocess rebuilt the prompt from the image's layout); a turn adding an image processes and encodes
the new one alone and reuses the earlier turn's keys/values; the answer is token for token what transformers'
generate() says."""

from __future__ import annotations

import time

import pytest
from conftest import make_image
from test_e2e import data_url, metric, reference_text

pytestmark = pytest.mark.e2e

HITS, MISSES = "tritonvlm_image_cache_hits_total", "tritonvlm_image_cache_misses_total"
SKIPS = "tritonvlm_image_cache_preprocess_skips_total"
ENCODER_CALLS = "nv_inference_request_success"


def counts(server) -> tuple[float, float, float, float]:
    return (
        metric(server, HITS, model="vlm"),
        metric(server, MISSES, model="vlm"),
        metric(server, SKIPS, model="vlm"),
        metric(server, ENCODER_CALLS, model="vision_encoder"),
    )


def moved(server, before: tuple[float, ...], hits: int, misses: int) -> tuple[float, ...]:
    """The (hits, misses, preprocess skips, encoder calls) gained since ``before``, once hits and
    misses reach the expected values or after 10 s (the vlm series are published after the engine's
    next step)."""
    deadline = time.monotonic() + 10
    while True:
        gained = tuple(now - then for now, then in zip(counts(server), before, strict=True))
        if gained[:2] == (hits, misses) or time.monotonic() > deadline:
            return gained
        time.sleep(0.1)


def ask(client, messages: list[dict]) -> tuple[str, int, int]:
    response = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=16)
    usage = response.usage
    return response.choices[0].message.content, usage.prompt_tokens, usage.completion_tokens


def test_a_repeated_image_hits_the_cache_and_answers_the_same(server, client, hf_model, processor):
    # Images no other test sends: the first request must be the cache's first sight of them.
    seen, other = make_image(88, 60, "#3a7b9c"), make_image(88, 60, "#9c3a7b", "square")
    turn = {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": data_url(seen)}},
        ],
    }
    expected, prompt_len = reference_text(hf_model, processor, [turn], [seen], max_new=16)

    before = counts(server)
    first = ask(client, [turn])
    assert moved(server, before, hits=0, misses=1) == (0, 1, 0, 1)
    assert first[:2] == (expected, prompt_len)

    before = counts(server)
    again = ask(client, [turn])
    assert moved(server, before, hits=1, misses=0) == (1, 0, 1, 0)  # no vision_encoder request
    assert again == first

    # A later turn of the conversation re-sends the image: a hit too, and still generate()'s answer.
    conversation = [turn, {"role": "assistant", "content": first[0]}, {"role": "user", "content": "Again?"}]
    expected, prompt_len = reference_text(hf_model, processor, conversation, [seen], max_new=16)
    before = counts(server)
    later = ask(client, conversation)
    assert later[:2] == (expected, prompt_len)
    assert moved(server, before, hits=1, misses=0) == (1, 0, 1, 0)

    # A turn adding a new image: the first image hits its own entry by its file (neither processed nor
    # encoded) and only the new one is processed and encoded; the prompt starts from the cached
    # keys/values past the first image, up to the new one.
    added = make_image(60, 88, "#7b9c3a", "square")
    longer = conversation + [
        {"role": "assistant", "content": later[0]},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(added)}},
                {"type": "text", "text": "And this one?"},
            ],
        },
    ]
    expected, prompt_len = reference_text(hf_model, processor, longer, [seen, added], max_new=16)
    before = counts(server)
    response = client.chat.completions.create(model="tiny", messages=longer, temperature=0, max_tokens=16)
    assert (response.choices[0].message.content, response.usage.prompt_tokens) == (expected, prompt_len)
    assert moved(server, before, hits=1, misses=1) == (1, 1, 1, 1)
    assert response.usage.prompt_tokens_details.cached_tokens >= later[1]  # all of the earlier turn

    different = [
        {
            **turn,
            "content": [turn["content"][0], {"type": "image_url", "image_url": {"url": data_url(other)}}],
        }
    ]
    before = counts(server)
    ask(client, different)
    assert moved(server, before, hits=0, misses=1) == (0, 1, 0, 1)


def test_concurrent_conversations_sharing_images_answer_as_generate_does(server, client, hf_model, processor):
    """Six conversations at once, three turns each, every turn adding an image from a pool of four
    that they share (so images are looked up, remembered, encoded and waited for across requests, in
    every combination): each answer is what generate() says for that conversation."""
    from concurrent.futures import ThreadPoolExecutor

    pool = [make_image(72 + 8 * i, 56, color, "square" if i % 2 else "circle") for i, color in
            enumerate(("#1f6f8b", "#8b1f6f", "#6f8b1f", "#99582a"))]  # fmt: skip

    def converse(n: int) -> list[tuple[list[dict], list[bytes], str, int]]:
        messages: list[dict] = []
        images: list[bytes] = []
        turns = []
        for turn in range(3):
            image = pool[(n + turn * (1 + n % 2)) % len(pool)]
            images.append(image)
            messages.append({
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(image)}},
                    {"type": "text", "text": f"Turn {turn}: what is new?"},
                ],
            })  # fmt: skip
            response = client.chat.completions.create(
                model="tiny", messages=messages, temperature=0, max_tokens=8
            )
            answer = response.choices[0].message.content
            turns.append((list(messages), list(images), answer, response.usage.prompt_tokens))
            messages.append({"role": "assistant", "content": answer})
        return turns

    with ThreadPoolExecutor(6) as workers:
        conversations = list(workers.map(converse, range(6)))
    for n, turns in enumerate(conversations):
        for turn, (messages, images, answer, prompt_len) in enumerate(turns):
            expected = reference_text(hf_model, processor, messages, images, max_new=8)
            assert (answer, prompt_len) == expected, (n, turn)
