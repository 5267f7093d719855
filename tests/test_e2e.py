"""End to end: the official OpenAI SDK → uvicorn frontend → real tritonserver (vlm → preprocess →
vision_encoder → llm), on loopback, with the tiny test model."""

from __future__ import annotations

import base64
import io
import json
import os
import threading

import httpx
import pytest
import torch
from conftest import make_image
from PIL import Image

pytestmark = pytest.mark.e2e


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def metric(server, name: str, **labels: str) -> float:
    """Sum of a Prometheus series on Triton's metrics port, filtered by labels."""
    total = 0.0
    for line in httpx.get(server.metrics_url, timeout=10).text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def reference_text(
    hf_model, processor, messages: list[dict], images: list[bytes], max_new: int
) -> tuple[str, int]:
    """What transformers' own processor + generate() say for the same conversation (greedy)."""
    conv = []
    for msg in messages:
        content = msg["content"]
        if isinstance(content, list):
            content = [{"type": "image"} if p["type"] == "image_url" else p for p in content]
        conv.append({"role": msg["role"], "content": content})
    prompt = processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    inputs = processor(text=[prompt], images=pil or None, return_tensors="pt")
    with torch.inference_mode():
        out = hf_model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    return processor.tokenizer.decode(new, skip_special_tokens=True), int(inputs["input_ids"].shape[1])


def test_seed_request_single_image(client, image_server):
    url = image_server.add("/cat.png", make_image(96, 64, "orange"))
    response = client.chat.completions.create(
        model="tiny",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
        max_tokens=300,
        temperature=0,  # (sampled, a random model's answer may be one end-of-sequence token)
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.completion_tokens <= 300
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_seed_request_two_images(client, image_server):
    first = image_server.add("/first.png", make_image(64, 64, "red"))
    second = image_server.add("/second.jpg", make_image(80, 56, "blue", "square", fmt="JPEG"), "image/jpeg")
    response = client.chat.completions.create(
        model="tiny",
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "text",
                        "text": "describe the first image in one sentence, "
                        "and then describe the second image in another sentence",
                    },
                    {"type": "image_url", "image_url": {"url": first}},
                    {"type": "image_url", "image_url": {"url": second}},
                ],
            }
        ],
        temperature=0,
        max_tokens=40,
    )
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content
    # two images at 64x64 and 80x56 → (4*4 + 6*4)... the prompt must include the image placeholder tokens
    assert response.usage.prompt_tokens > 20


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_greedy_matches_transformers_generate(client, hf_model, processor, num_images):
    images = [make_image(64, 48, "red"), make_image(112, 56, "green", "square")][:num_images]
    content = [{"type": "text", "text": "Tell me what you see, héllo wörld 你好."}]
    content += [{"type": "image_url", "image_url": {"url": data_url(png)}} for png in images]
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": content},
    ]
    expected, prompt_len = reference_text(hf_model, processor, messages, images, max_new=24)
    response = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=24)
    assert response.choices[0].message.content == expected
    assert response.usage.prompt_tokens == prompt_len


def test_stream_concatenates_to_non_streamed(client, image_server):
    url = image_server.add("/stream.png", make_image(72, 72, "purple"))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "Describe it."},
            ],
        }
    ]
    whole = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=50)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            temperature=0,
            max_tokens=50,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_concurrent_requests_share_decode_batches(client, server):
    steps_before = metric(server, "tritonvlm_engine_steps_total", phase="decode")
    tokens_before = metric(server, "tritonvlm_engine_tokens_total", phase="decode")
    results: list[object] = [None] * 8
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            png = make_image(48 + 8 * i, 48, ["red", "green", "blue", "orange"][i % 4])
            results[i] = client.chat.completions.create(
                model="tiny",
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": f"Request {i}: what is this?"},
                            {"type": "image_url", "image_url": {"url": data_url(png)}},
                        ],
                    }
                ],
                max_tokens=64,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
        except Exception as exc:  # collected and asserted below
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for r in results:
        assert not isinstance(r, Exception), r
        assert r is not None and r.choices[0].message.content is not None
    # Triton refreshes engine metrics at most every 250 ms; the idle edge forces a final refresh.
    steps = metric(server, "tritonvlm_engine_steps_total", phase="decode") - steps_before
    tokens = metric(server, "tritonvlm_engine_tokens_total", phase="decode") - tokens_before
    assert steps > 0
    # 8 x 64 tokens decoded one request at a time would take one step per token.
    print(f"decode batch averaged {tokens / steps:.2f} sequences per step over {steps:.0f} steps")
    assert tokens / steps >= 2.0, f"decode batch averaged {tokens / steps:.2f} sequences per step"


def openai_error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


def chat(server, payload: dict | str) -> httpx.Response:
    content = payload if isinstance(payload, str) else json.dumps(payload)
    return httpx.post(
        server.base_url + "/v1/chat/completions",
        content=content,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )


def image_request(url: str) -> dict:
    return {
        "model": "tiny",
        "max_tokens": 8,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
    }


@pytest.mark.parametrize(
    "case",
    ["not_an_image", "truncated_png", "unreachable_url", "missing_url", "malformed_json", "unknown_model"],
)
def test_bad_requests_get_openai_errors_and_server_keeps_serving(server, image_server, client, case):
    png = make_image(64, 64)
    if case == "not_an_image":
        response = chat(server, image_request(data_url(b"this is not an image at all")))
    elif case == "truncated_png":
        response = chat(server, image_request(data_url(png[: len(png) // 2])))
    elif case == "unreachable_url":
        response = chat(server, image_request(f"http://127.0.0.1:{_closed_port()}/x.png"))
    elif case == "missing_url":
        response = chat(
            server, image_request(image_server.add("/exists.png", png)[: -len("exists.png")] + "nope.png")
        )
    elif case == "malformed_json":
        response = chat(server, '{"model": "tiny", "messages": [')
    else:
        response = chat(server, {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    error = openai_error(response)
    assert error["message"]
    if case == "unknown_model":
        assert response.status_code == 404
    else:
        assert response.status_code == 400
    ok = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert ok.choices[0].message.content is not None


def test_error_raised_inside_triton_reaches_client_as_400(server):
    """A prompt + max_tokens over the engine's context limit is refused by the llm model itself."""
    response = chat(
        server, {"model": "tiny", "max_tokens": 100000, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert response.status_code == 400, response.text
    error = openai_error(response)
    assert "context length" in error["message"]
    assert error["param"] == "max_tokens"


def test_models_and_health(server):
    models = httpx.get(server.base_url + "/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200


def _closed_port() -> int:
    from conftest import free_port

    return free_port()


def _mixed_requests() -> list[tuple[list[dict], list[bytes]]]:
    """Text-only, one-image and two-image conversations (images of different sizes)."""
    out = []
    for i in range(6):
        images = [make_image(48 + 16 * i, 64, "red"), make_image(96, 40 + 8 * i, "blue", "square")][: i % 3]
        content = [{"type": "text", "text": f"Question {i}: what do you see?"}]
        content += [{"type": "image_url", "image_url": {"url": data_url(png)}} for png in images]
        out.append(([{"role": "user", "content": content}], images))
    return out


def test_staggered_mixed_requests_each_match_generate_alone(client, hf_model, processor):
    """Requests join a batch mid-decode; every one still gets the tokens generate() gives it alone."""
    import time

    requests = _mixed_requests()
    expected = [reference_text(hf_model, processor, m, imgs, max_new=40)[0] for m, imgs in requests]
    results: list[object] = [None] * len(requests)

    def worker(i: int) -> None:
        time.sleep(0.03 * i)  # staggered: later requests arrive while earlier ones decode
        try:
            r = client.chat.completions.create(
                model="tiny", messages=requests[i][0], temperature=0, max_tokens=40
            )
            results[i] = r.choices[0].message.content
        except Exception as exc:  # asserted below
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == expected


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(client):
    messages = [{"role": "user", "content": "Say something random."}]
    kwargs = {"model": "tiny", "messages": messages, "temperature": 1.0, "top_p": 0.9, "max_tokens": 24}
    alone = client.chat.completions.create(seed=42, **kwargs).choices[0].message.content
    crowd: list[object] = []

    def noise(i: int) -> None:
        crowd.append(client.chat.completions.create(seed=1000 + i, **kwargs).choices[0].message.content)

    threads = [threading.Thread(target=noise, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    together = client.chat.completions.create(seed=42, **kwargs).choices[0].message.content
    for t in threads:
        t.join(60)
    assert together == alone
    assert len(set(crowd)) > 1, "different seeds should give different samples"


N_REQUESTS = int(os.environ.get("TRITONVLM_TEST_STRESS_REQUESTS", "1500"))


def test_hundreds_of_concurrent_requests_keep_the_pipeline_alive(client, server):
    """Regression: the vlm stub used to crash (heap corruption in python_backend's BLS stream cleanup)
    after a few hundred concurrent image requests. All must succeed and the server stay healthy."""
    from concurrent.futures import ThreadPoolExecutor

    urls = [
        data_url(make_image(40 + 8 * (i % 5), 48, color)) for i, color in enumerate(["red", "green", "blue"])
    ]

    def one(i: int) -> int:
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": urls[i % len(urls)]}},
                    {"type": "text", "text": f"Request {i}"},
                ],
            }
        ]
        if i % 2:
            stream = client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True
            )
            return sum(1 for chunk in stream if chunk.choices and chunk.choices[0].finish_reason)
        response = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=6, temperature=0
        )
        return int(response.choices[0].finish_reason in ("stop", "length"))

    with ThreadPoolExecutor(12) as pool:
        finished = list(pool.map(one, range(N_REQUESTS)))
    assert finished == [1] * N_REQUESTS
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
