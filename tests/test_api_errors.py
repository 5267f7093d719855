"""Bad requests, table-driven: each row gets its documented status and OpenAI error body, and the very
next valid request still succeeds.

Rows marked ``e2e`` go to the shared real server (``tritonvlm serve`` with ``--allow-private-media-urls``).
Rows marked ``strict`` need settings that server does not have (an API key, the SSRF guard on, a
domain allow-list, a local media folder, a small body limit): they go to an in-process app built by
``create_app`` with the real ``MediaFetcher`` and a fake Triton client (Triton is not what they test).
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import threading
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port, make_image
from fastapi.testclient import TestClient

from tritonvlm.frontend import media
from tritonvlm.frontend.app import FrontendSettings, create_app
from tritonvlm.frontend.triton_client import StreamDelta

pytestmark = pytest.mark.e2e

KEY = "sk-strict-test-key"
STRICT_BODY_LIMIT = 64 * 1024
PUBLIC_ALIAS = "127.0.0.5"  # a loopback address the strict app treats as public (see ``strict``)


# --------------------------------------------------------------------------- request builders


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header announces ``width x height`` pixels (a decompression-bomb stand-in)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


PNG = make_image(32, 32, "red")
URL_PARAM = "messages[0].content[1].image_url.url"


def chat(content: Any = "hi", **fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": content}], **fields}


def with_image(url: str, **fields: Any) -> dict[str, Any]:
    return chat(
        [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": url}}], **fields
    )


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 2, **fields}


# --------------------------------------------------------------------------- the table


@dataclass
class Ctx:
    """What rows may need to build their request."""

    image_url: Callable[[str], str]  # path on the shared image server → its URL
    alias_url: Callable[[str], str]  # path on the strict "public" alias server → its URL
    loopback_url: Callable[[str], str]  # path on the alias server's twin bound to 127.0.0.1
    media_dir: Path
    closed_port: int


@dataclass
class Row:
    name: str
    body: Any  # a dict (JSON), str/bytes (raw), or a callable(Ctx) returning one of those
    status: int
    param: str | None
    code: str | None
    type: str = "invalid_request_error"
    target: str = "e2e"  # or "strict"
    path: str = "/v1/chat/completions"
    method: str = "POST"
    headers: dict[str, str] | None = None  # strict rows get the right API key unless they set this
    extra: dict[str, Any] = field(default_factory=dict)


def row(name: str, body: Any, status: int, param: str | None, code: str | None, **kw: Any) -> Any:
    return pytest.param(Row(name, body, status, param, code, **kw), id=name)


E2E_ROWS = [
    # ---- the body and its schema
    row("malformed_json", '{"model": "tiny", "messages": [', 400, None, None),
    row("body_is_a_list", "[1, 2]", 400, None, None),
    row("body_is_empty", "", 400, None, None),
    row("missing_messages", {"model": "tiny"}, 400, "messages", None),
    row("missing_model", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model", None),
    row("empty_messages", {"model": "tiny", "messages": []}, 400, "messages", "invalid_value"),
    row("function_role", {"model": "tiny", "messages": [{"role": "function", "content": "x"}]}, 400,
        "messages[0].role", "invalid_value"),
    row("tool_message_without_tool_call_id", {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]},  # noqa: E501
        400, "messages[0].tool_call_id", "invalid_value"),
    row("user_message_without_content", {"model": "tiny", "messages": [{"role": "user"}]}, 400,
        "messages[0].content", "invalid_value"),
    row("content_is_a_number", chat(5), 400, "messages[0].content", "invalid_value"),
    row("unknown_part_type", chat([{"type": "input_audio"}]), 400, "messages[0].content[0]", "invalid_value"),
    row("text_part_without_text", chat([{"type": "text"}]), 400, "messages[0].content[0].text", None),
    row("image_part_without_image_url", chat([{"type": "text", "text": "a"}, {"type": "image_url"}]), 400,
        "messages[0].content[1].image_url", None),
    row("image_url_without_url", chat([{"type": "image_url", "image_url": {"detail": "low"}}]), 400,
        "messages[0].content[0].image_url.url", None),
    row("bad_detail", chat([{"type": "image_url", "image_url": {"url": "x", "detail": "max"}}]), 400,
        "messages[0].content[0].image_url.detail", "invalid_value"),
    row("image_in_assistant_message",
        {"model": "tiny", "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_url(PNG)}}]}]},
        400, "messages[1].content[0]", "invalid_value"),
    row("tool_calls_in_message",
        {"model": "tiny", "messages": [{"role": "assistant", "content": "x", "tool_calls": []}]}, 400,
        "messages[0].tool_calls", "invalid_value"),
    # ---- image URLs and files
    row("ftp_url", with_image("ftp://example.com/cat.png"), 400, URL_PARAM, "invalid_image_url"),
    row("relative_url", with_image("cat.png"), 400, URL_PARAM, "invalid_image_url"),
    row("file_url_not_enabled", with_image("file:///etc/passwd"), 400, URL_PARAM, "invalid_image_url"),
    row("bad_base64", with_image("data:image/png;base64,@@not-base64@@"), 400, URL_PARAM,
        "invalid_image_url"),
    row("data_url_text_type", with_image("data:text/plain;base64,aGVsbG8="), 400, URL_PARAM,
        "invalid_image_url"),
    row("data_url_not_base64", with_image("data:image/png,rawbytes"), 400, URL_PARAM, "invalid_image_url"),
    row("data_url_without_comma", with_image("data:image/png;base64"), 400, URL_PARAM, "invalid_image_url"),
    row("data_url_empty", with_image("data:image/png;base64,"), 400, URL_PARAM, "invalid_image"),
    row("truncated_png", with_image(data_url(PNG[: len(PNG) // 2])), 400, URL_PARAM, "invalid_image"),
    row("text_as_image", with_image(data_url(b"just some text, not an image")), 400, URL_PARAM,
        "invalid_image"),
    row("png_magic_then_garbage", with_image(data_url(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)), 400, URL_PARAM,
        "invalid_image"),
    row("html_over_http", lambda c: with_image(c.image_url("/page.html")), 400, URL_PARAM, "invalid_image"),
    row("http_404", lambda c: with_image(c.image_url("/missing.png")), 400, URL_PARAM, "image_fetch_failed"),
    row("unreachable_host", lambda c: with_image(f"http://127.0.0.1:{c.closed_port}/x.png"), 400, URL_PARAM,
        "invalid_image_url"),
    row("image_over_byte_limit", lambda c: with_image(c.image_url("/huge.png")), 400, URL_PARAM,
        "image_too_large"),
    row("too_many_pixels", with_image(data_url(png_header_only(5000, 4000))), 400, URL_PARAM,
        "image_too_many_pixels"),
    row("bomb_over_pillow_limit", with_image(data_url(png_header_only(100000, 100000))), 400, URL_PARAM,
        "image_too_many_pixels"),
    row("too_many_images",
        chat([{"type": "image_url", "image_url": {"url": data_url(PNG)}}] * 9), 400, "messages",
        "too_many_images"),
    row("second_image_is_bad",
        chat([{"type": "text", "text": "two"},
              {"type": "image_url", "image_url": {"url": data_url(PNG)}},
              {"type": "image_url", "image_url": {"url": data_url(b"nope")}}]),
        400, "messages[0].content[2].image_url.url", "invalid_image"),
    # ---- parameter values
    row("temperature_too_high", chat(temperature=2.5), 400, "temperature", "invalid_value"),
    row("top_p_zero", chat(top_p=0), 400, "top_p", "invalid_value"),
    row("max_tokens_zero", chat(max_tokens=0), 400, "max_tokens", "invalid_value"),
    row("max_completion_tokens_negative", chat(max_completion_tokens=-1), 400, "max_completion_tokens",
        "invalid_value"),
    row("n_zero", chat(n=0), 400, "n", "invalid_value"),
    row("n_too_many", chat(n=129), 400, "n", "invalid_value"),
    row("top_logprobs_too_many", chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", "invalid_value"),
    row("top_logprobs_without_logprobs", chat(top_logprobs=2), 400, "top_logprobs", "invalid_value"),
    row("presence_penalty_too_high", chat(presence_penalty=3), 400, "presence_penalty", "invalid_value"),
    row("frequency_penalty_too_low", chat(frequency_penalty=-2.5), 400, "frequency_penalty", "invalid_value"),
    row("repetition_penalty_zero", chat(repetition_penalty=0), 400, "repetition_penalty", "invalid_value"),
    row("top_k_below_minus_one", chat(top_k=-2), 400, "top_k", "invalid_value"),
    row("five_stop_strings", chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", "invalid_value"),
    row("empty_stop_string", chat(stop=""), 400, "stop", "invalid_value"),
    row("seed_not_an_integer", chat(seed="abc"), 400, "seed", "invalid_type"),
    row("logprobs_not_a_bool", chat(logprobs={"x": 1}), 400, "logprobs", "invalid_type"),
    row("stream_options_without_stream", chat(stream_options={"include_usage": True}), 400, "stream_options",
        "unsupported_parameter"),
    row("stream_options_unknown_key", chat(stream=True, stream_options={"x": 1}), 400, "stream_options.x",
        "invalid_value"),
    row("tool_without_name", chat(tools=[{"type": "function", "function": {"description": "x"}}]), 400,
        "tools[0].function.name", None),
    row("tool_choice_unknown_function", chat(tools=[{"type": "function", "function": {"name": "f"}}],
        tool_choice={"type": "function", "function": {"name": "g"}}), 400, "tool_choice.function.name",
        "invalid_value"),
    row("tool_parameters_unsupported_keyword", chat(tools=[{"type": "function", "function": {"name": "f",
        "parameters": {"type": "object", "not": {"required": ["a"]}}}}]), 400, "tools[0].function.parameters",
        "invalid_value"),
    row("json_schema_uncompilable", chat(response_format={"type": "json_schema", "json_schema": {"name": "x",
        "schema": {"type": "frobnicate"}}}), 400, "response_format.json_schema.schema", "invalid_value"),
    row("json_schema_unsupported_keyword", chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}), 400,
        "response_format.json_schema.schema", "invalid_value"),
    row("response_format_unknown_type", chat(response_format={"type": "yaml"}), 400, "response_format.type",
        "invalid_value"),
    row("unknown_parameter", chat(frobnicate=1), 400, "frobnicate", "unsupported_parameter"),
    row("unknown_model", {**chat(), "model": "gpt-4o"}, 404, "model", "model_not_found"),
    row("over_context_length", chat(max_tokens=100000), 400, "max_tokens", "invalid_value"),
    row("over_context_length_streamed", chat(max_tokens=100000, stream=True), 400, "max_tokens",
        "invalid_value"),
    row("over_context_length_n", chat(max_tokens=100000, n=3), 400, "max_tokens", "invalid_value"),
    # ---- routes and transport
    row("wrong_method", None, 405, None, "method_not_allowed", method="GET"),
    row("unknown_route", chat(), 404, None, "not_found", path="/v1/chat/completion"),
    row("unknown_model_card", None, 404, "model", "model_not_found", method="GET", path="/v1/models/nope"),
    row("declared_body_over_50MiB", None, 413, None, "request_too_large", method="RAW"),
    # ---- /v1/completions
    row("completion_missing_prompt", {"model": "tiny"}, 400, "prompt", None, path="/v1/completions"),
    row("completion_empty_prompt", completion(prompt=""), 400, "prompt", "invalid_value",
        path="/v1/completions"),
    row("completion_prompt_object", completion(prompt={"text": "x"}), 400, "prompt", "invalid_value",
        path="/v1/completions"),
    row("completion_negative_token_id", completion(prompt=[1, -2]), 400, "prompt[1]", "invalid_value",
        path="/v1/completions"),
    row("completion_token_id_out_of_vocab", completion(prompt=[1, 10**9]), 400, "prompt", "invalid_value",
        path="/v1/completions"),
    row("completion_suffix", completion(suffix="The end."), 400, "suffix", "unsupported_parameter",
        path="/v1/completions"),
    row("completion_best_of", completion(best_of=3), 400, "best_of", "unsupported_parameter",
        path="/v1/completions"),
    row("completion_echo_token_ids", completion(prompt=[1, 2, 3], echo=True), 400, "echo",
        "unsupported_parameter", path="/v1/completions"),
    row("completion_logprobs_over_5", completion(logprobs=6), 400, "logprobs", "invalid_value",
        path="/v1/completions"),
    row("completion_logit_bias", completion(logit_bias={"1": 5}), 400, "logit_bias", "unsupported_parameter",
        path="/v1/completions"),
    row("completion_unknown_model", completion(model="davinci-002"), 404, "model", "model_not_found",
        path="/v1/completions"),
    row("completion_over_context_length", completion(max_tokens=5000), 400, "max_tokens", "invalid_value",
        path="/v1/completions"),
]  # fmt: skip

STRICT_ROWS = [
    # ---- API key
    row("missing_api_key", chat(), 401, None, "invalid_api_key", target="strict", headers={}),
    row("wrong_api_key", chat(), 401, None, "invalid_api_key", target="strict",
        headers={"Authorization": "Bearer sk-wrong"}),
    row("basic_auth_instead_of_bearer", chat(), 401, None, "invalid_api_key", target="strict",
        headers={"Authorization": f"Basic {KEY}"}),
    row("models_without_api_key", None, 401, None, "invalid_api_key", target="strict", method="GET",
        path="/v1/models", headers={}),
    row("completions_without_api_key", completion(), 401, None, "invalid_api_key", target="strict",
        path="/v1/completions", headers={}),
    # ---- body size
    row("declared_body_over_limit", chat(user="x" * STRICT_BODY_LIMIT), 413, None, "request_too_large",
        target="strict"),
    row("chunked_body_over_limit", chat(user="x" * STRICT_BODY_LIMIT), 413, None, "request_too_large",
        target="strict", extra={"chunked": True}),
    # ---- SSRF guard (hosts in the allow-list, so the address check is what refuses them)
    row("ssrf_loopback_ip", lambda c: with_image(c.loopback_url("/ok.png")), 400, URL_PARAM,
        "image_url_forbidden", target="strict"),
    row("ssrf_localhost_name",
        lambda c: with_image(c.loopback_url("/ok.png").replace("127.0.0.1", "localhost")), 400, URL_PARAM,
        "image_url_forbidden", target="strict"),
    row("ssrf_ipv6_loopback", with_image("http://[::1]:9/x.png"), 400, URL_PARAM, "image_url_forbidden",
        target="strict"),
    row("ssrf_private_network", with_image("http://10.0.0.1/x.png"), 400, URL_PARAM, "image_url_forbidden",
        target="strict"),
    row("ssrf_cloud_metadata", with_image("http://169.254.169.254/latest/meta-data/"), 400, URL_PARAM,
        "image_url_forbidden", target="strict"),
    row("ssrf_redirect_into_loopback", lambda c: with_image(c.alias_url("/to-loopback")), 400, URL_PARAM,
        "image_url_forbidden", target="strict"),
    # ---- domain allow-list
    row("domain_not_allowed", with_image("http://images.example.org/cat.png"), 400, URL_PARAM,
        "image_url_forbidden", target="strict"),
    row("lookalike_domain_not_allowed", with_image("http://allowed.test.evil.example/cat.png"), 400,
        URL_PARAM, "image_url_forbidden", target="strict"),
    row("redirect_to_domain_not_allowed", lambda c: with_image(c.alias_url("/to-elsewhere")), 400, URL_PARAM,
        "image_url_forbidden", target="strict"),
    # ---- file:// below the allowed folder only
    row("file_outside_folder", with_image("file:///etc/passwd"), 400, URL_PARAM, "image_url_forbidden",
        target="strict"),
    row("file_dotdot_escape", lambda c: with_image(f"file://{c.media_dir}/../secret.png"), 400, URL_PARAM,
        "image_url_forbidden", target="strict"),
    row("file_encoded_dotdot_escape", lambda c: with_image(f"file://{c.media_dir}/%2E%2E/secret.png"), 400,
        URL_PARAM, "image_url_forbidden", target="strict"),
    row("file_symlink_escape", lambda c: with_image(f"file://{c.media_dir}/escape.png"), 400, URL_PARAM,
        "image_url_forbidden", target="strict"),
    row("file_missing", lambda c: with_image(f"file://{c.media_dir}/missing.png"), 400, URL_PARAM,
        "invalid_image_url", target="strict"),
    row("file_is_a_folder", lambda c: with_image(f"file://{c.media_dir}/sub"), 400, URL_PARAM,
        "invalid_image_url", target="strict"),
    row("file_url_with_host", lambda c: with_image(f"file://fileserver{c.media_dir}/ok.png"), 400, URL_PARAM,
        "invalid_image_url", target="strict"),
    row("file_not_an_image", lambda c: with_image(f"file://{c.media_dir}/notes.txt"), 400, URL_PARAM,
        "invalid_image", target="strict"),
]  # fmt: skip


def test_table_is_big_enough() -> None:
    assert len(E2E_ROWS) + len(STRICT_ROWS) >= 40
    names = [p.values[0].name for p in E2E_ROWS + STRICT_ROWS]
    assert len(names) == len(set(names))


# --------------------------------------------------------------------------- fixtures


class _AliasHandler(BaseHTTPRequestHandler):
    loopback_port = 0

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        if self.path == "/ok.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)
            return
        targets = {
            "/to-loopback": f"http://127.0.0.1:{self.loopback_port}/ok.png",
            "/to-elsewhere": "http://images.example.org/cat.png",
        }
        if self.path in targets:
            self.send_response(302)
            self.send_header("Location", targets[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_error(404)


def _serve(host: str) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, 0), _AliasHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class _OneDelta:
    """The strict app's Triton: answers every request with one finished delta."""

    async def is_ready(self) -> bool:
        return True

    async def stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[StreamDelta]:
        yield StreamDelta("ok", [1], "stop", 5, 1)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("media")
    root = base / "allowed"
    (root / "sub").mkdir(parents=True)
    (root / "ok.png").write_bytes(PNG)
    (root / "notes.txt").write_text("not an image")
    (base / "secret.png").write_bytes(PNG)
    (root / "escape.png").symlink_to(base / "secret.png")
    return root


@pytest.fixture(scope="module")
def alias_servers() -> Iterator[tuple[ThreadingHTTPServer, ThreadingHTTPServer]]:
    loopback = _serve("127.0.0.1")
    _AliasHandler.loopback_port = loopback.server_address[1]
    alias = _serve(PUBLIC_ALIAS)
    try:
        yield alias, loopback
    finally:
        for server in (alias, loopback):
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def strict(media_dir: Path, alias_servers: Any) -> Iterator[TestClient]:
    """The app with every gate on; ``PUBLIC_ALIAS`` counts as a public address so that a redirect from a
    "public" host into loopback can be exercised on one machine."""
    real = media.is_public_address
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(media, "is_public_address", lambda address: address == PUBLIC_ALIAS or real(address))
        settings = FrontendSettings(
            served_model_name="tiny",
            api_key=KEY,
            allow_private_media_urls=False,
            allowed_media_domains=f"{PUBLIC_ALIAS},127.0.0.1,localhost,::1,10.0.0.1,169.254.169.254,allowed.test",
            allowed_local_media_path=str(media_dir),
            max_request_body_bytes=STRICT_BODY_LIMIT,
            media_fetch_timeout_s=5.0,
        )
        with TestClient(create_app(settings, client=_OneDelta()), raise_server_exceptions=False) as http:
            yield http


@pytest.fixture(scope="module")
def ctx(image_server: Any, media_dir: Path, alias_servers: Any) -> Ctx:
    image_server.add("/page.html", b"<html><body>not an image</body></html>", "text/html")
    image_server.add("/huge.png", PNG + b"\0" * (20 * 1024 * 1024 + 1))
    alias, loopback = alias_servers
    return Ctx(
        image_url=lambda path: f"http://127.0.0.1:{image_server.httpd.server_address[1]}{path}",
        alias_url=lambda path: f"http://{PUBLIC_ALIAS}:{alias.server_address[1]}{path}",
        loopback_url=lambda path: f"http://127.0.0.1:{loopback.server_address[1]}{path}",
        media_dir=media_dir,
        closed_port=free_port(),
    )


# --------------------------------------------------------------------------- running a row


def _raw_oversized(base_url: str) -> tuple[int, dict[str, Any]]:
    """Declare a 60 MB body, send a few bytes: the server must answer 413 from the header alone."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 60000000\r\n\r\n" + b'{"model": "tiny", "messages": ['
        )
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(payload)


def _content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


def _send(r: Row, c: Ctx, server: Any, strict: TestClient) -> tuple[int, Any]:
    payload = r.body(c) if callable(r.body) else r.body
    if r.method == "RAW":
        return _raw_oversized(server.base_url)
    kwargs: dict[str, Any] = {"headers": {"Content-Type": "application/json"}}
    if payload is not None:
        content = payload if isinstance(payload, str | bytes) else json.dumps(payload)
        content = content.encode() if isinstance(content, str) else content
        if r.extra.get("chunked"):
            kwargs["content"] = iter([content[i : i + 8192] for i in range(0, len(content), 8192)])
        else:
            kwargs["content"] = content
    if r.target == "strict":
        headers = {"Authorization": f"Bearer {KEY}"} if r.headers is None else r.headers
        kwargs["headers"].update(headers)
        response = strict.request(r.method, r.path, **kwargs)
    else:
        response = httpx.request(r.method, server.base_url + r.path, timeout=60, **kwargs)
    try:
        body = response.json()
    except ValueError:
        body = response.text
    return response.status_code, body


def _valid_request_succeeds(r: Row, c: Ctx, server: Any, strict: TestClient) -> None:
    if r.target == "strict":
        body = chat(
            [
                {"type": "text", "text": "two images"},
                {"type": "image_url", "image_url": {"url": f"file://{c.media_dir}/ok.png"}},
                {"type": "image_url", "image_url": {"url": c.alias_url("/ok.png")}},
            ]
        )
        response = strict.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    else:
        response = httpx.post(server.base_url + "/v1/chat/completions", json=chat(), timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] is not None


@pytest.mark.parametrize("r", E2E_ROWS + STRICT_ROWS)
def test_bad_request(r: Row, ctx: Ctx, server: Any, strict: TestClient) -> None:
    status, body = _send(r, ctx, server, strict)
    assert status == r.status, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"] and 'File "' not in error["message"]
    assert (error["type"], error["param"], error["code"]) == (r.type, r.param, r.code), error
    _valid_request_succeeds(r, ctx, server, strict)
