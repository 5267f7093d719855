"""The offline Python API: batch inference without a server.

::

    from tritonvlm import Engine

    with Engine(model="/models/Qwen2.5-VL-7B-Instruct") as engine:
        results = engine.chat(
            [
                [{"role": "user", "content": [
                    {"type": "text", "text": "Caption this photo."},
                    {"type": "image", "image": "photos/0001.jpg"},   # a path, bytes or a PIL image
                ]}],
                ...
            ],
            max_tokens=64,
            temperature=0,
        )
    print(results[0].choices[0].message.content)

:class:`Engine` starts its own tritonserver with the same model settings as ``tritonvlm serve`` (or uses a
running one: ``triton_url``) and sends each conversation through the frontend's request path in
process, many at a time, so every conversation gets exactly what ``/v1/chat/completions`` would answer
(a :class:`~tritonvlm.frontend.protocol.ChatCompletion`), in input order. Sampling parameters are the
request fields of that endpoint (``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``n``,
``logprobs``...). Besides OpenAI's ``image_url`` parts, a content part ``{"type": "image", "image": X}``
takes a PIL image, the bytes of an image file, a local path or a URL.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import threading
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal, TypeVar

from tritonvlm.batch.inprocess import InProcessAPI, ReadyGate, execute_line
from tritonvlm.batch.lines import CHAT_URL, COMPLETIONS_URL, BatchLine, record_ok, request_tokens
from tritonvlm.batch.progress import BatchStats, ProgressBar
from tritonvlm.batch.scheduler import FixedLimit, run_jobs

T = TypeVar("T")
log = logging.getLogger("tritonvlm.offline")

_URL_SCHEMES = ("http://", "https://", "data:", "file://")


class RequestFailed(Exception):
    """A request the API answered with an error: ``index`` in the input, the HTTP ``status_code`` and the
    OpenAI ``error`` object (``message``, ``type``, ``param``, ``code``)."""

    def __init__(self, index: int, status_code: int, error: dict[str, Any]) -> None:
        super().__init__(f"request {index}: {status_code} {error.get('message', '')}")
        self.index = index
        self.status_code = status_code
        self.error = error


def image_url(image: Any) -> str:
    """The ``image_url.url`` for a PIL image, image file bytes, a local path or a URL (kept as is)."""
    from tritonvlm.frontend.media import sniff_image_format

    if isinstance(image, str) and image.startswith(_URL_SCHEMES):
        return image
    if isinstance(image, str | Path):
        data = Path(image).expanduser().read_bytes()
    elif isinstance(image, bytes | bytearray):
        data = bytes(image)
    elif hasattr(image, "save"):  # a PIL image
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        raise TypeError(f"an image must be a PIL image, bytes, a path or a URL, not {type(image).__name__}")
    kind = sniff_image_format(data) or "png"
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def _part(part: Any) -> Any:
    if not isinstance(part, dict):
        return part
    if part.get("type") == "image" and "image" in part:
        return {"type": "image_url", "image_url": {"url": image_url(part["image"])}}
    if part.get("type") == "image_url" and isinstance(part.get("image_url"), str):
        return {"type": "image_url", "image_url": {"url": part["image_url"]}}
    return part


def to_openai_messages(conversation: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A conversation with ``{"type": "image", "image": X}`` parts turned into OpenAI ``image_url`` parts."""
    messages = []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, list):
            message = {**message, "content": [_part(p) for p in content]}
        messages.append(message)
    return messages


class Engine:
    """Offline batch inference through the Triton pipeline (see the module docstring)."""

    def __init__(
        self,
        model: str | None = None,
        *,
        served_model_name: str | None = None,
        triton_url: str | None = None,
        concurrency: int | None = None,
        max_num_seqs: int | None = None,
        max_model_len: int | None = None,
        max_prefill_tokens: int | None = None,
        kv_cache_memory: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        allowed_local_media_path: str | None = None,
        allow_private_media_urls: bool = False,
        max_images_per_request: int = 8,
        media_fetch_timeout: float = 10.0,
        state_dir: str | Path | None = None,
        startup_timeout: float | None = None,
        log_level: str = "WARNING",
    ) -> None:
        """Start tritonserver with ``model`` (default: the built-in demo model) and the engine settings
        of ``tritonvlm serve`` (``None``: their defaults), or use the Triton at ``triton_url``
        (``HOST:PORT``, gRPC). ``concurrency``: requests in flight (default 2 x ``max_num_seqs``)."""
        from tritonvlm.batch.launch import TritonOptions, default_max_num_seqs, resolve_model, start_triton
        from tritonvlm.frontend.app import FrontendSettings

        logging.getLogger("tritonvlm.frontend").setLevel(max(logging.ERROR, logging.getLogger().level))
        self._triton = None
        if triton_url is None:
            model, served = resolve_model(model, served_model_name)
            options = TritonOptions(
                model=model,
                log_level=log_level,
                max_num_seqs=max_num_seqs,
                max_model_len=max_model_len,
                max_prefill_tokens=max_prefill_tokens,
                kv_cache_memory=kv_cache_memory,
                device=device,
                dtype=dtype,
                state_dir=Path(state_dir) if state_dir is not None else None,
                startup_timeout=startup_timeout,
            )
            self._triton = start_triton(options)
            triton_url = self._triton.grpc_url
        else:
            served = served_model_name or model or "tritonvlm"
        self.model = served
        self.concurrency = concurrency or 2 * (max_num_seqs or default_max_num_seqs(device))
        self.settings = FrontendSettings(
            triton_grpc_url=triton_url,
            served_model_name=served,
            allowed_local_media_path=allowed_local_media_path,
            allow_private_media_urls=allow_private_media_urls,
            max_images_per_request=max_images_per_request,
            media_fetch_timeout_s=media_fetch_timeout,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tritonvlm-engine", daemon=True)
        self._thread.start()
        self._api: InProcessAPI | None = None
        self._api_cm: Any = None
        try:
            self._call(self._open())
        except BaseException:
            self.close()
            raise

    async def _open(self) -> None:
        from tritonvlm.batch.launch import open_api

        self._api_cm = open_api(self.settings)
        self._api = await self._api_cm.__aenter__()
        await ReadyGate(self._api.is_ready, interval_s=0.5).wait(since=time.monotonic(), timeout_s=120)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            raise

    # ------------------------------------------------------------------ requests
    def chat(
        self,
        conversations: Sequence[Sequence[dict[str, Any]]] | Sequence[dict[str, Any]],
        *,
        errors: Literal["raise", "return"] = "raise",
        progress: bool = False,
        **params: Any,
    ) -> list[Any]:
        """Answer each conversation (a list of OpenAI messages; one conversation alone is accepted too) as
        ``/v1/chat/completions`` would, with the request fields ``params``; results in input order.

        A request that fails raises :class:`RequestFailed` once all are done (``errors="raise"``), or
        takes its place in the list (``errors="return"``).
        """
        from tritonvlm.frontend.protocol import ChatCompletion

        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        bodies = [
            {"model": self.model, "messages": to_openai_messages(c), **params}
            for c in conversations  # type: ignore[union-attr]
        ]
        return self._run(CHAT_URL, bodies, ChatCompletion, errors, progress)

    def complete(
        self,
        prompts: Sequence[str] | str,
        *,
        errors: Literal["raise", "return"] = "raise",
        progress: bool = False,
        **params: Any,
    ) -> list[Any]:
        """Complete each raw text prompt (no chat template, no images) as ``/v1/completions`` would."""
        from tritonvlm.frontend.protocol import Completion

        if isinstance(prompts, str):
            prompts = [prompts]
        bodies = [{"model": self.model, "prompt": p, **params} for p in prompts]
        return self._run(COMPLETIONS_URL, bodies, Completion, errors, progress)

    def _run(
        self, url: str, bodies: list[dict[str, Any]], model: Any, errors: str, progress: bool
    ) -> list[Any]:
        if errors not in ("raise", "return"):
            raise ValueError("errors must be 'raise' or 'return'")
        if any(b.get("stream") for b in bodies):
            raise ValueError("stream is not supported by Engine (results come back whole)")
        records = self._call(self._run_all(url, bodies, progress))
        results: list[Any] = []
        for index, record in enumerate(records):
            response = record["response"]
            if record_ok(record):
                results.append(model.model_validate(response["body"]))
            else:
                error = (response or {}).get("body", {}).get("error") or record.get("error") or {}
                results.append(RequestFailed(index, (response or {}).get("status_code", 400), error))
        if errors == "raise":
            failures = [r for r in results if isinstance(r, RequestFailed)]
            if failures:
                raise failures[0]
        return results

    async def _run_all(self, url: str, bodies: list[dict[str, Any]], progress: bool) -> list[dict[str, Any]]:
        assert self._api is not None
        api = self._api
        gate = ReadyGate(api.is_ready)
        records: list[dict[str, Any]] = [{} for _ in bodies]
        stats = BatchStats(total=len(bodies))
        bar = ProgressBar(stats, enabled=progress, label="engine")
        jobs = (BatchLine(i + 1, str(i), url, body) for i, body in enumerate(bodies))

        async def work(item: BatchLine) -> dict[str, Any]:
            return await execute_line(api, item, gate, 120.0)

        def done(item: BatchLine, record: dict[str, Any]) -> None:
            records[item.line - 1] = record
            stats.add(record_ok(record), *request_tokens((record.get("response") or {}).get("body")))
            bar.update()

        try:
            await run_jobs(jobs, work, done, FixedLimit(self.concurrency))
        finally:
            bar.close()
        return records

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the client and stop the tritonserver this engine started (idempotent)."""
        if self._loop.is_running():
            if self._api_cm is not None:
                cm, self._api_cm = self._api_cm, None
                asyncio.run_coroutine_threadsafe(cm.__aexit__(None, None, None), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if self._triton is not None:
            triton, self._triton = self._triton, None
            triton.stop()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
