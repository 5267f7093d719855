"""Unit tests of the operations side of the frontend (no Triton): /metrics, client request ids and the
serve flags (--triton-url, --shutdown-timeout, --log-level)."""

from __future__ import annotations

import asyncio
import base64
import re

import pytest
from conftest import make_image
from test_frontend_app import MODEL, FakeClient, body, make

from tritonvlm.cli import build_parser
from tritonvlm.frontend.access_log import new_request_id
from tritonvlm.frontend.errors import APIError
from tritonvlm.frontend.media import MediaFetcher
from tritonvlm.frontend.metrics import FrontendMetrics, image_source
from tritonvlm.frontend.triton_client import TritonUnavailableError


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus page (0 when absent)."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    return 0.0


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


# --------------------------------------------------------------------------- /metrics


def test_metrics_count_requests_by_route_and_status() -> None:
    http, _ = make()
    with http:
        assert http.post("/v1/chat/completions", json=body()).status_code == 200
        assert http.post("/v1/chat/completions", json=body(model="nope")).status_code == 404
        assert http.get("/v1/chat/completions").status_code == 405
        assert http.get(f"/v1/models/{MODEL}").status_code == 200
        assert http.get("/no/such/path/123").status_code == 404
        r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    chat = "/v1/chat/completions"
    assert sample(text, "tritonvlm_frontend_requests_total", route=chat, status="200") == 1
    assert sample(text, "tritonvlm_frontend_requests_total", route=chat, status="404") == 1
    assert sample(text, "tritonvlm_frontend_requests_total", route=chat, status="405") == 1
    # Path parameters and unknown paths do not make new series.
    assert sample(text, "tritonvlm_frontend_requests_total", route="/v1/models/{model_id:path}", status="200")
    assert sample(text, "tritonvlm_frontend_requests_total", route="other", status="404") == 1
    assert sample(text, "tritonvlm_frontend_request_duration_seconds_count", route=chat) == 3
    assert sample(text, "tritonvlm_frontend_requests_in_flight") == 0
    assert "# TYPE tritonvlm_frontend_time_to_first_token_seconds histogram" in text


def test_metrics_time_to_first_token_of_streams_only() -> None:
    http, _ = make()
    with http:
        http.post("/v1/chat/completions", json=body())
        http.post("/v1/chat/completions", json=body(stream=True))
        http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "stream": True})
        text = http.get("/metrics").text
    ttft = "tritonvlm_frontend_time_to_first_token_seconds_count"
    assert sample(text, ttft, route="/v1/chat/completions") == 1
    assert sample(text, ttft, route="/v1/completions") == 1


def test_metrics_count_images_and_fetch_failures() -> None:
    png = make_image(32, 32)
    http, fake = make()
    image = {"type": "image_url", "image_url": {"url": data_url(png)}}
    bad = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with http:
        ok = http.post("/v1/chat/completions", json=body(messages=[{"role": "user", "content": [image]}]))
        refused = http.post("/v1/chat/completions", json=body(messages=[{"role": "user", "content": [bad]}]))
        text = http.get("/metrics").text
    assert ok.status_code == 200 and refused.status_code == 400
    assert sample(text, "tritonvlm_frontend_images_fetched_total", source="data") == 1
    assert sample(text, "tritonvlm_frontend_image_bytes_total", source="data") == len(png)
    code = refused.json()["error"]["code"]
    assert sample(text, "tritonvlm_frontend_image_fetch_failures_total", reason=code) == 1


def test_fetcher_reports_to_its_metrics() -> None:
    metrics = FrontendMetrics(process=False)
    fetcher = MediaFetcher(metrics=metrics)

    async def run() -> None:
        await fetcher.fetch(data_url(make_image(16, 16)))
        with pytest.raises(APIError):
            await fetcher.fetch("ftp://example.com/a.png")
        await fetcher.aclose()

    asyncio.run(run())
    text = metrics.render()[0].decode()
    assert sample(text, "tritonvlm_frontend_images_fetched_total", source="data") == 1
    assert sample(text, "tritonvlm_frontend_image_fetch_failures_total", reason="invalid_image_url") == 1
    assert [image_source(u) for u in ("data:x", "HTTPS://a", "http://a", "file:///a", "ftp://a")] == [
        "data",
        "http",
        "http",
        "file",
        "other",
    ]


def test_health_and_metrics_need_no_api_key() -> None:
    http, _ = make(FakeClient(ready=False), api_key="secret")
    with http:
        assert http.get("/health").status_code == 503
        assert http.get("/metrics").status_code == 200
        assert http.get("/v1/models").status_code == 401


def test_unavailable_triton_is_counted_as_503() -> None:
    http, _ = make(FakeClient(deltas=[], error=TritonUnavailableError("down")))
    with http:
        assert http.post("/v1/chat/completions", json=body()).status_code == 503
        text = http.get("/metrics").text
    assert sample(text, "tritonvlm_frontend_requests_total", route="/v1/chat/completions", status="503") == 1


# --------------------------------------------------------------------------- request ids


@pytest.mark.parametrize(
    ("sent", "used"),
    [
        ("abc-123", True),
        ("0b7c4f7e-1d2a-4c1e-9a53-2f0e8c1d9b11", True),
        ("trace.id:42_x", True),
        ("x" * 64, True),
        ("x" * 65, False),
        ("has space", False),
        ("semi;colon", False),
        ("new\\nline", False),
        ("", False),
    ],
)
def test_client_request_id(sent: str, used: bool) -> None:
    http, fake = make()
    with http:
        r = http.post("/v1/chat/completions", json=body(), headers={"x-request-id": sent})
    request_id = r.json()["id"]
    assert r.headers["x-request-id"] == request_id == fake.calls[0]["id"]
    if used:
        assert request_id == f"chatcmpl-{sent}"
    else:
        assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", request_id), request_id


def test_client_request_id_on_other_routes() -> None:
    http, fake = make()
    with http:
        text = http.post(
            "/v1/completions", json={"model": MODEL, "prompt": "Hi", "n": 2}, headers={"x-request-id": "t1"}
        )
        health = http.get("/health", headers={"x-request-id": "t2"})
    assert text.json()["id"] == "cmpl-t1" and [c["id"] for c in fake.calls] == ["cmpl-t1-0", "cmpl-t1-1"]
    assert health.headers["x-request-id"] == "req-t2"
    assert new_request_id("req", "bad id").startswith("req-") and " " not in new_request_id("req", "bad id")


# --------------------------------------------------------------------------- serve flags


def test_serve_flags() -> None:
    parser = build_parser()
    args = parser.parse_args(["serve"])
    assert args.triton_url is None and args.shutdown_timeout == 30.0 and args.log_level == "INFO"
    args = parser.parse_args(
        ["serve", "--triton-url", "grpc://triton.default.svc:8001", "--log-level", "debug"]
    )
    assert args.triton_url == "triton.default.svc:8001" and args.log_level == "DEBUG"
    assert parser.parse_args(["--log-level", "warning", "serve"]).log_level == "WARNING"
    assert parser.parse_args(["serve", "--triton-url", "[::1]:8001"]).triton_url == "[::1]:8001"
    assert parser.parse_args(["serve", "--shutdown-timeout", "2.5"]).shutdown_timeout == 2.5


@pytest.mark.parametrize("bad", ["triton", "triton:", "triton:port", "http://a:1/path", ":8001", "a:99999"])
def test_serve_refuses_a_bad_triton_url(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--triton-url", bad])
    assert "--triton-url" in capsys.readouterr().err


def test_serve_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    serve = next(
        a for a in build_parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith("serve")
    )
    for action in serve._actions:
        for flag in action.option_strings:
            assert flag in out
        assert action.help, action.option_strings
