"""End to end with a small KV budget: the OpenAI SDK streams from a server whose KV blocks hold one
512-token sequence while six requests that together need far more run at once. Running requests are
preempted and resumed inside the engine; every client still gets exactly the text it gets alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ServerProcess, make_image, serving
from family_harness import one_sequence_budget
from test_e2e import data_url, metric

from tritonvlm.families import family_for_model

pytestmark = pytest.mark.e2e

MAX_LEN = 512
NEW_TOKENS = 120


@pytest.fixture(scope="module")
def tight_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    extra = (
        "--max-model-len", str(MAX_LEN),
        "--kv-cache-memory", str(one_sequence_budget(family_for_model(str(tiny_model_dir)), max_len=MAX_LEN)),
        "--max-num-seqs", "8",
    )  # fmt: skip
    yield from serving(ServerProcess(tiny_model_dir, tmp_path_factory.mktemp("tight-kv"), extra))


def messages(i: int) -> list[dict]:
    text = f"Tell me story number {i} about a {['red', 'blue', 'green'][i % 3]} shape."
    if i % 2:
        return [{"role": "user", "content": text}]
    image = data_url(make_image(64, 48, ["red", "blue", "green"][i % 3]))
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": text}],
        }
    ]


def published_preemptions(server: Any) -> float:
    """The preemption counter once the engine has published it (every 250 ms, and when idle)."""
    deadline = time.monotonic() + 10
    value = metric(server, "tritonvlm_engine_preemptions_total")
    while value < 1 and time.monotonic() < deadline:
        time.sleep(0.25)
        value = metric(server, "tritonvlm_engine_preemptions_total")
    return value


def test_preempted_streams_are_exactly_what_they_are_alone(tight_server: Any) -> None:
    import openai

    client = openai.OpenAI(
        base_url=tight_server.base_url + "/v1", api_key="unused", timeout=300, max_retries=0
    )

    def ask(i: int, stream: bool) -> str:
        kwargs: dict[str, Any] = {
            "model": "tiny",
            "messages": messages(i),
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "extra_body": {"ignore_eos": True},
        }
        if not stream:
            return client.chat.completions.create(**kwargs).choices[0].message.content or ""
        parts = []
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        return "".join(parts)

    together: dict[int, str] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            together[i] = ask(i, stream=True)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    preempted = published_preemptions(tight_server)
    assert preempted >= 1, "six requests of ~200 tokens in 512 tokens of KV must preempt"
    for i in range(6):  # one at a time: nothing is preempted
        assert ask(i, stream=False) == together[i], i
    assert metric(tight_server, "tritonvlm_engine_preemptions_total") == preempted
    assert httpx.get(tight_server.base_url + "/health", timeout=10).status_code == 200
