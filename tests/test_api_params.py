"""Every request parameter of the API through the official OpenAI SDK, streamed and not, against the
shared real server (tritonserver + uvicorn, tiny test model)."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
import torch
from conftest import make_image
from PIL import Image, ImageDraw
from test_e2e import reference_text

from tritonvlm.engine.prefix_cache import MIN_MATCH_TOKENS

pytestmark = pytest.mark.e2e

FINGERPRINT = "tritonvlm-0.1.0"
PROMPT = [{"role": "user", "content": "Tell me a story about a red fox."}]


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def stream_text(chunks: list[Any], index: int = 0) -> str:
    return "".join(
        c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index
    )


def finishes(chunks: list[Any], index: int = 0) -> list[str]:
    return [
        c.choices[0].finish_reason
        for c in chunks
        if c.choices and c.choices[0].index == index and c.choices[0].finish_reason
    ]


def counts(usage: Any) -> tuple[int, int, int]:
    """Usage without ``cached_tokens`` (a repeated prompt is served from the prefix cache)."""
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


def both(client: Any, **kwargs: Any) -> tuple[Any, list[Any]]:
    """The same request whole and streamed (with usage)."""
    whole = client.chat.completions.create(model="tiny", **kwargs)
    chunks = list(
        client.chat.completions.create(
            model="tiny", stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    return whole, chunks


# --------------------------------------------------------------------------- response shape


def test_response_fields_match_streamed_and_not(client: Any) -> None:
    whole, chunks = both(client, messages=PROMPT, temperature=0, max_tokens=12)
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion"
    assert whole.model == "tiny" and isinstance(whole.created, int) and whole.created > 0
    assert whole.system_fingerprint == FINGERPRINT
    assert 0 <= whole.usage.prompt_tokens_details.cached_tokens < whole.usage.prompt_tokens
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert {c.system_fingerprint for c in chunks} == {FINGERPRINT}
    assert {c.model for c in chunks} == {"tiny"} and len({c.created for c in chunks}) == 1
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and counts(chunks[-1].usage) == counts(whole.usage)
    assert stream_text(chunks) == whole.choices[0].message.content
    assert finishes(chunks) == [whole.choices[0].finish_reason]
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stream_without_include_usage_has_no_usage(client: Any) -> None:
    chunks = list(client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=4, stream=True))
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
    assert finishes(chunks) == ["length"] or finishes(chunks) == ["stop"]


# --------------------------------------------------------------------------- sampling parameters


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0},
        {"temperature": 0.7, "seed": 1},
        {"top_p": 0.5, "seed": 2},
        {"seed": 3, "extra_body": {"top_k": 5}},
        {"temperature": 0, "presence_penalty": 1.5},
        {"temperature": 0, "frequency_penalty": 1.5},
        {"temperature": 0, "extra_body": {"repetition_penalty": 1.3}},
        {"temperature": 0, "max_completion_tokens": 5, "extra_body": {"ignore_eos": True}},
        {"temperature": 0, "user": "user-1234", "stop": ["\n\n", "zzz"]},
        {"seed": 4, "max_tokens": 9, "extra_body": {"ignore_eos": True}},
    ],
    ids=lambda p: ",".join(sorted({**p, **p.get("extra_body", {})}.keys() - {"extra_body"})),
)
def test_sampling_parameter_is_applied_streamed_and_not(client: Any, params: dict[str, Any]) -> None:
    kwargs = {"max_tokens": 20, **params}
    whole, chunks = both(client, messages=PROMPT, **kwargs)
    assert stream_text(chunks) == whole.choices[0].message.content  # seeded or greedy: reproducible
    assert counts(chunks[-1].usage) == counts(whole.usage)
    if "max_completion_tokens" in params:
        assert whole.usage.completion_tokens == 5 and whole.choices[0].finish_reason == "length"
    if params.get("max_tokens") == 9:
        assert whole.usage.completion_tokens == 9


def test_penalties_and_sampling_change_the_output(client: Any) -> None:
    def text(**kwargs: Any) -> str:
        response = client.chat.completions.create(
            model="tiny", messages=PROMPT, max_tokens=40, extra_body={"ignore_eos": True}, **kwargs
        )
        return response.choices[0].message.content

    greedy = text(temperature=0)
    assert text(temperature=0, frequency_penalty=2.0) != greedy
    assert text(temperature=0, presence_penalty=2.0) != greedy
    assert text(temperature=1.0, seed=11) == text(temperature=1.0, seed=11)
    assert text(temperature=1.0, seed=11) != text(temperature=1.0, seed=12)


# --------------------------------------------------------------------------- n


def test_n_two_non_streamed_uses_consecutive_seeds(client: Any) -> None:
    kwargs = {"model": "tiny", "messages": PROMPT, "temperature": 1.0, "max_tokens": 16}
    pair = client.chat.completions.create(n=2, seed=21, **kwargs)
    assert [c.index for c in pair.choices] == [0, 1]
    singles = [client.chat.completions.create(seed=seed, **kwargs) for seed in (21, 22)]
    assert [c.message.content for c in pair.choices] == [s.choices[0].message.content for s in singles]
    assert pair.usage.prompt_tokens == singles[0].usage.prompt_tokens  # counted once
    assert pair.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)


def test_n_two_streamed_chunks_carry_index(client: Any) -> None:
    kwargs = {"messages": PROMPT, "temperature": 1.0, "max_tokens": 16, "seed": 5, "n": 2}
    whole, chunks = both(client, **kwargs)
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    for index in (0, 1):
        first = next(c for c in chunks if c.choices and c.choices[0].index == index)
        assert first.choices[0].delta.role == "assistant"
        assert stream_text(chunks, index) == whole.choices[index].message.content
        assert finishes(chunks, index) == [whole.choices[index].finish_reason]
    assert counts(chunks[-1].usage) == counts(whole.usage)


# --------------------------------------------------------------------------- logprobs


def _clean(token: str) -> bool:
    return bool(token) and token.isascii() and token.isprintable() and not token.startswith("<|")


def test_logprobs_with_top_logprobs(client: Any) -> None:
    kwargs = {
        "messages": PROMPT,
        "temperature": 0,
        "max_tokens": 12,
        "logprobs": True,
        "top_logprobs": 5,
        "extra_body": {"ignore_eos": True},
    }
    whole, chunks = both(client, **kwargs)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 12
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 5
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.token == entry.top_logprobs[0].token  # greedy: the chosen token is the likeliest
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.bytes is not None and bytes(entry.bytes).decode("utf-8", "replace")
    raw = b"".join(bytes(e.bytes) for e in content if not e.token.startswith("<|"))
    assert raw.decode("utf-8", "replace") == whole.choices[0].message.content
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)


def test_logprobs_without_top_logprobs(client: Any) -> None:
    response = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=4, logprobs=True)
    assert all(e.top_logprobs == [] for e in response.choices[0].logprobs.content)
    plain = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=4)
    assert plain.choices[0].logprobs is None


# --------------------------------------------------------------------------- stop across tokens


def test_stop_string_across_a_token_boundary(client: Any) -> None:
    base = {"messages": PROMPT, "temperature": 0, "max_tokens": 40, "extra_body": {"ignore_eos": True}}
    greedy = client.chat.completions.create(model="tiny", logprobs=True, **base)
    text = greedy.choices[0].message.content
    tokens = [e.token for e in greedy.choices[0].logprobs.content]
    stop, cut = None, None
    offset = 0
    for k in range(len(tokens) - 1):
        if not (_clean(tokens[k]) and _clean(tokens[k + 1])):
            break  # offsets into the text are exact only over clean tokens
        offset += len(tokens[k])
        candidate = tokens[k][-1] + tokens[k + 1][0]
        if text.find(candidate) == offset - 1 and candidate.strip():
            stop, cut = candidate, offset - 1
            break
    assert stop is not None, f"no usable token boundary in {tokens}"
    assert "".join(tokens[: k + 2]) == text[: offset + len(tokens[k + 1])]
    whole, chunks = both(client, stop=stop, **base)
    assert whole.choices[0].message.content == text[:cut]
    assert whole.choices[0].finish_reason == "stop"
    assert stream_text(chunks) == text[:cut] and finishes(chunks) == ["stop"]


# --------------------------------------------------------------------------- images


def _image_message(*urls: str, text: str = "Describe the picture.") -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": parts}]


def test_multi_turn_with_an_image_in_an_earlier_turn(client: Any, hf_model: Any, processor: Any) -> None:
    png = make_image(64, 48, "red")
    messages = [
        *_image_message(data_url(png), text="What is in this image?"),
        {"role": "assistant", "content": "A red circle on a white background."},
        {"role": "user", "content": "And what colour was the circle?"},
    ]
    expected, prompt_len = reference_text(hf_model, processor, messages, [png], max_new=20)
    whole, chunks = both(client, messages=messages, temperature=0, max_tokens=20)
    assert whole.choices[0].message.content == expected
    assert whole.usage.prompt_tokens == prompt_len
    assert stream_text(chunks) == expected
    text_only = client.chat.completions.create(model="tiny", messages=messages[1:], max_tokens=1)
    assert whole.usage.prompt_tokens > text_only.usage.prompt_tokens + 4  # the image tokens count


def _encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _rgba_on_transparent_black() -> bytes:
    """make_image(72, 56, "red")'s circle on a transparent *black* canvas: only correct alpha compositing
    (onto white, as the preprocessing does) gives back make_image's white background."""
    img = Image.new("RGBA", (72, 56), (0, 0, 0, 0))
    ImageDraw.Draw(img).ellipse((72 // 4, 56 // 4, 3 * 72 // 4, 3 * 56 // 4), fill=(255, 0, 0, 255))
    return _encode(img, "PNG")


BASE = Image.open(io.BytesIO(make_image(72, 56, "red")))
FORMATS = {
    # name: (bytes sent, media type, the bytes transformers' reference gets)
    "jpeg": (make_image(72, 56, "red", fmt="JPEG"), "image/jpeg", None),
    "grayscale_palette_png": (_encode(BASE.convert("L").convert("P"), "PNG"), "image/png", None),
    "rgba_png": (_rgba_on_transparent_black(), "image/png", make_image(72, 56, "red")),
    "webp": (_encode(BASE, "WEBP", lossless=True), "image/webp", None),
    "gif": (_encode(BASE, "GIF"), "image/gif", None),
    "bmp": (_encode(BASE, "BMP"), "image/bmp", None),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_image_formats(client: Any, hf_model: Any, processor: Any, image_server: Any, name: str) -> None:
    data, media_type, reference = FORMATS[name]
    messages = _image_message(data_url(data, media_type))
    expected, prompt_len = reference_text(hf_model, processor, messages, [reference or data], max_new=16)
    whole = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=16)
    assert whole.choices[0].message.content == expected
    assert whole.usage.prompt_tokens == prompt_len
    url = image_server.add(f"/format-{name}", data, media_type)  # the same bytes over http, streamed
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=_image_message(url), temperature=0, max_tokens=16, stream=True
        )
    )
    assert stream_text(chunks) == expected


@pytest.mark.parametrize("detail", ["low", "high"])
def test_image_detail_is_accepted_and_has_no_effect(client: Any, detail: str) -> None:
    url = data_url(make_image(80, 64, "blue", "square"))
    auto = _image_message(url)
    part = {"type": "image_url", "image_url": {"url": url, "detail": detail}}
    other = [{"role": "user", "content": [auto[0]["content"][0], part]}]
    a = client.chat.completions.create(model="tiny", messages=auto, temperature=0, max_tokens=10)
    b = client.chat.completions.create(model="tiny", messages=other, temperature=0, max_tokens=10)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


# --------------------------------------------------------------------------- /v1/completions

TEXT_PROMPT = "Once upon a time, in a small village,"


def _generate_ids(hf_model: Any, ids: list[int], max_new: int) -> list[int]:
    with torch.inference_mode():
        out = hf_model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
        )
    return out[0, len(ids) :].tolist()


def test_completions_text_and_token_ids(client: Any, hf_model: Any, processor: Any) -> None:
    ids = processor.tokenizer(TEXT_PROMPT, add_special_tokens=False)["input_ids"]
    expected = processor.tokenizer.decode(_generate_ids(hf_model, ids, 16), skip_special_tokens=True)
    by_text = client.completions.create(model="tiny", prompt=TEXT_PROMPT, temperature=0)  # max_tokens: 16
    by_ids = client.completions.create(model="tiny", prompt=ids, temperature=0)
    # The second request's prompt is the first's: all of it but its last token comes from the cache.
    assert len(ids) > MIN_MATCH_TOKENS and by_ids.usage.prompt_tokens_details.cached_tokens == len(ids) - 1
    for response in (by_text, by_ids):
        assert response.object == "text_completion" and response.id.startswith("cmpl-")
        assert response.system_fingerprint == FINGERPRINT and response.model == "tiny"
        assert response.usage.prompt_tokens == len(ids)
        if response.choices[0].finish_reason == "length":
            assert response.usage.completion_tokens == 16  # OpenAI's default max_tokens
    assert by_text.choices[0].text == by_ids.choices[0].text == expected
    for prompt in (TEXT_PROMPT, ids):
        chunks = list(
            client.completions.create(
                model="tiny",
                prompt=prompt,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
            by_text.choices[0].finish_reason
        ]
        assert chunks[-1].choices == [] and counts(chunks[-1].usage) == counts(by_text.usage)
        assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "text_completion"


def test_completions_echo_n_logprobs_and_batches(client: Any) -> None:
    echoed = client.completions.create(
        model="tiny", prompt=TEXT_PROMPT, echo=True, max_tokens=5, temperature=0
    )
    plain = client.completions.create(model="tiny", prompt=TEXT_PROMPT, max_tokens=5, temperature=0)
    assert echoed.choices[0].text == TEXT_PROMPT + plain.choices[0].text

    scored = client.completions.create(
        model="tiny",
        prompt=TEXT_PROMPT,
        max_tokens=6,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    lp = scored.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert all(
        max(top.values()) == pytest.approx(v)
        for top, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=TEXT_PROMPT,
            max_tokens=6,
            temperature=0,
            logprobs=3,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    streamed = [
        t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens
    ]
    assert streamed == lp.tokens

    pair = client.completions.create(
        model="tiny", prompt=TEXT_PROMPT, n=2, seed=9, max_tokens=8, temperature=1
    )
    single = client.completions.create(model="tiny", prompt=TEXT_PROMPT, seed=10, max_tokens=8, temperature=1)
    assert [c.index for c in pair.choices] == [0, 1] and pair.choices[1].text == single.choices[0].text

    batch = client.completions.create(
        model="tiny", prompt=[TEXT_PROMPT, "Hello"], max_tokens=3, temperature=0
    )
    assert [c.index for c in batch.choices] == [0, 1]
    hello = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0)
    assert batch.choices[1].text == hello.choices[0].text
    assert batch.usage.prompt_tokens == plain.usage.prompt_tokens + hello.usage.prompt_tokens


def test_completion_stop_and_sampling_parameters(client: Any) -> None:
    base = {"model": "tiny", "prompt": TEXT_PROMPT, "max_tokens": 24, "extra_body": {"ignore_eos": True}}
    greedy = client.completions.create(temperature=0, **base).choices[0].text
    stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 2]
    stopped = client.completions.create(temperature=0, stop=stop, **base)
    assert (
        stopped.choices[0].text == greedy[: greedy.find(stop)] and stopped.choices[0].finish_reason == "stop"
    )
    sampled = {
        "temperature": 0.8, "top_p": 0.9, "seed": 3, "presence_penalty": 0.5, "frequency_penalty": 0.5,
        "user": "u", "extra_body": {"top_k": 20, "repetition_penalty": 1.1, "ignore_eos": True},
    }  # fmt: skip
    whole = client.completions.create(model="tiny", prompt=TEXT_PROMPT, max_tokens=12, **sampled)
    chunks = list(
        client.completions.create(model="tiny", prompt=TEXT_PROMPT, max_tokens=12, stream=True, **sampled)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert whole.usage.completion_tokens == 12
