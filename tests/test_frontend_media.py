"""Tests for tritonvlm.frontend.media: data: URLs, http(s) fetching from a loopback server, SSRF guard."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tritonvlm.frontend import media
from tritonvlm.frontend.app import FrontendSettings, create_app
from tritonvlm.frontend.errors import APIError
from tritonvlm.frontend.media import (
    ImageRef,
    MediaFetcher,
    decode_data_url,
    is_public_address,
    sniff_image_format,
)
from tritonvlm.frontend.triton_client import StreamDelta


def make_png(color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def make_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(buf, format="JPEG")
    return buf.getvalue()


PNG = make_png()
JPEG = make_jpeg()
BIG = PNG + b"\0" * 5000


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


# --------------------------------------------------------------------------- loopback image server


class _Handler(BaseHTTPRequestHandler):
    hosts: list[str] = []

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Content-Length" not in (headers or {}) and status != 204:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        _Handler.hosts.append(self.headers.get("Host", ""))
        path = self.path
        port = self.server.server_address[1]
        if path == "/ok.png":
            self._send(200, PNG, {"Content-Type": "image/png"})
        elif path == "/ok.jpg":
            self._send(200, JPEG, {"Content-Type": "image/jpeg"})
        elif path == "/missing":
            self._send(404, b"not here")
        elif path == "/text":
            self._send(200, b"hello, not an image", {"Content-Type": "image/png"})
        elif path == "/big-declared":
            self._send(200, BIG, {"Content-Type": "image/png"})
        elif path == "/big-undeclared":  # no Content-Length: the cap must hold while streaming
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(BIG)
            self.close_connection = True
        elif path.startswith("/redirect/"):  # /redirect/<n>: n more hops, then /ok.png
            hops = int(path.rsplit("/", 1)[1])
            target = "/ok.png" if hops <= 1 else f"/redirect/{hops - 1}"
            self._send(302, b"", {"Location": target})
        elif path == "/redirect-absolute-private":
            self._send(302, b"", {"Location": f"http://127.0.0.2:{port}/ok.png"})
        elif path == "/redirect-ftp":
            self._send(302, b"", {"Location": "ftp://example.com/x.png"})
        elif path == "/slow":
            time.sleep(1.5)
            self._send(200, PNG)
        else:
            self._send(404)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that stop reading (size cap, timeout) break the pipe: expected here


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    server = _QuietServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def fetch(url: str, **kwargs: Any) -> bytes:
    async def run() -> bytes:
        fetcher = MediaFetcher(**{"allow_private": True, "timeout_s": 5.0, **kwargs})
        try:
            return await fetcher.fetch(url, "messages[0].content[0].image_url.url")
        finally:
            await fetcher.aclose()

    return asyncio.run(run())


def fetch_error(url: str, **kwargs: Any) -> APIError:
    with pytest.raises(APIError) as info:
        fetch(url, **kwargs)
    assert info.value.status_code == 400
    assert info.value.param == "messages[0].content[0].image_url.url"
    return info.value


# --------------------------------------------------------------------------- data: URLs


def test_data_url_png_roundtrip() -> None:
    assert fetch(data_url(PNG)) == PNG
    assert fetch(data_url(JPEG, "image/jpeg")) == JPEG


def test_data_url_tolerates_whitespace_and_missing_padding() -> None:
    encoded = base64.b64encode(PNG).decode().rstrip("=")
    wrapped = "\n".join(encoded[i : i + 60] for i in range(0, len(encoded), 60))
    assert decode_data_url(f"data:image/png;base64,{wrapped}", "p", 10_000) == PNG


def test_data_url_bad_base64() -> None:
    error = fetch_error("data:image/png;base64,@@@not-base64@@@")
    assert "base64" in error.message


def test_data_url_non_image_bytes() -> None:
    error = fetch_error(data_url(b"just some text, clearly not an image"))
    assert "not a supported image" in error.message


def test_data_url_corrupt_image() -> None:
    error = fetch_error(data_url(PNG[:40]))  # PNG magic, truncated body: pillow refuses it
    assert "could not be decoded" in error.message


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("data:text/plain;base64,aGVsbG8=", "not an image type"),
        ("data:image/png,rawdata", "base64"),
        ("data:image/png;base64", "separates"),
    ],
)
def test_data_url_malformed(url: str, needle: str) -> None:
    assert needle in fetch_error(url).message


def test_data_url_too_big() -> None:
    error = fetch_error(data_url(BIG), max_bytes=1000)
    assert error.code == "image_too_large"


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.png", "image.png", "gopher://x"])
def test_unsupported_schemes(url: str) -> None:
    assert "Unsupported image URL" in fetch_error(url).message


def test_sniff_image_format() -> None:
    assert sniff_image_format(PNG) == "png"
    assert sniff_image_format(JPEG) == "jpeg"
    assert sniff_image_format(b"GIF89a....") == "gif"
    assert sniff_image_format(b"RIFF\0\0\0\0WEBPVP8 ") == "webp"
    assert sniff_image_format(b"<html>") is None


# --------------------------------------------------------------------------- http(s)


def test_http_fetch_ok(image_server: str) -> None:
    assert fetch(f"{image_server}/ok.png") == PNG
    assert fetch(f"{image_server}/ok.jpg") == JPEG


def test_http_404_names_url(image_server: str) -> None:
    url = f"{image_server}/missing"
    error = fetch_error(url)
    assert url in error.message and "404" in error.message


def test_http_non_image(image_server: str) -> None:
    assert "not a supported image" in fetch_error(f"{image_server}/text").message


@pytest.mark.parametrize("path", ["/big-declared", "/big-undeclared"])
def test_http_too_big(image_server: str, path: str) -> None:
    error = fetch_error(f"{image_server}{path}", max_bytes=1000)
    assert error.code == "image_too_large" and path in error.message


def test_http_redirect_chain_within_limit(image_server: str) -> None:
    assert fetch(f"{image_server}/redirect/3") == PNG  # 3 redirects, then the image


def test_http_too_many_redirects(image_server: str) -> None:
    assert "Too many redirects" in fetch_error(f"{image_server}/redirect/4").message


def test_http_redirect_to_other_scheme(image_server: str) -> None:
    assert "ftp://example.com/x.png" in fetch_error(f"{image_server}/redirect-ftp").message


def test_http_timeout(image_server: str) -> None:
    start = time.monotonic()
    error = fetch_error(f"{image_server}/slow", timeout_s=0.3)
    assert error.code == "image_fetch_timeout"
    assert time.monotonic() - start < 1.2


def test_unreachable_host_names_url() -> None:
    error = fetch_error("http://127.0.0.1:9/nothing.png")  # discard port: connection refused
    assert "http://127.0.0.1:9/nothing.png" in error.message


# --------------------------------------------------------------------------- SSRF guard


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "192.168.0.1", "172.16.0.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
     "224.0.0.1", "::1", "fe80::1", "fd00::1", "::ffff:127.0.0.1", "2002:7f00:1::", "240.0.0.1"],
)  # fmt: skip
def test_non_public_addresses(address: str) -> None:
    assert not is_public_address(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111"])
def test_public_addresses(address: str) -> None:
    assert is_public_address(address)


def test_ssrf_guard_refuses_loopback(image_server: str) -> None:
    error = fetch_error(f"{image_server}/ok.png", allow_private=False)
    assert error.code == "image_url_forbidden" and "127.0.0.1" in error.message


def test_ssrf_guard_refuses_names_resolving_to_loopback() -> None:
    error = fetch_error("http://localhost:1/ok.png", allow_private=False)
    assert error.code == "image_url_forbidden"


def _pretend_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """127.0.0.1 counts as public, and images.test resolves to it: exercises the guarded path."""
    real_resolve = media.resolve_host

    async def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.1"] if host == "images.test" else await real_resolve(host, port)

    monkeypatch.setattr(media, "is_public_address", lambda address: address == "127.0.0.1")
    monkeypatch.setattr(media, "resolve_host", resolve)


def test_ssrf_guard_pins_checked_address_and_keeps_host_header(
    image_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pretend_public(monkeypatch)
    port = image_server.rsplit(":", 1)[1]
    _Handler.hosts.clear()
    assert fetch(f"http://images.test:{port}/ok.png", allow_private=False) == PNG
    assert _Handler.hosts == [f"images.test:{port}"]


def test_ssrf_guard_rechecks_every_redirect_hop(image_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend_public(monkeypatch)
    assert fetch(f"{image_server}/redirect/2", allow_private=False) == PNG  # hops stay on "public" host
    error = fetch_error(f"{image_server}/redirect-absolute-private", allow_private=False)
    assert error.code == "image_url_forbidden" and "127.0.0.2" in error.message


# --------------------------------------------------------------------------- fetch_all


def test_fetch_all_keeps_order_and_fetches_repeats_once(image_server: str) -> None:
    refs = [
        ImageRef(f"{image_server}/ok.jpg", "a"),
        ImageRef(data_url(PNG), "b"),
        ImageRef(f"{image_server}/ok.jpg", "c"),
    ]

    async def run() -> list[bytes]:
        fetcher = MediaFetcher(allow_private=True)
        try:
            return await fetcher.fetch_all(refs)
        finally:
            await fetcher.aclose()

    _Handler.hosts.clear()
    assert asyncio.run(run()) == [JPEG, PNG, JPEG]
    assert len(_Handler.hosts) == 1


def test_fetch_all_failure_names_the_failing_part(image_server: str) -> None:
    refs = [ImageRef(f"{image_server}/slow", "messages[0].content[0].image_url.url"),
            ImageRef(f"{image_server}/missing", "messages[1].content[2].image_url.url")]  # fmt: skip

    async def run() -> None:
        fetcher = MediaFetcher(allow_private=True)
        try:
            await fetcher.fetch_all(refs)
        finally:
            await fetcher.aclose()

    start = time.monotonic()
    with pytest.raises(APIError) as info:
        asyncio.run(run())
    assert info.value.param == "messages[1].content[2].image_url.url"
    assert time.monotonic() - start < 1.2  # the slow fetch was cancelled, not awaited


# --------------------------------------------------------------------------- through the app


class RecordingClient:
    def __init__(self) -> None:
        self.images: list[list[bytes]] = []

    async def is_ready(self) -> bool:
        return True

    async def stream(self, messages: Any, images: list[bytes], parameters: Any, request_id: str) -> Any:
        self.images.append(images)
        yield StreamDelta("ok", [1], "stop", 3, 1)


def _image_request(*urls: str) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"model": "m", "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "?"}]}]}


def test_app_fetches_images_in_order(image_server: str) -> None:
    client = RecordingClient()
    app = create_app(FrontendSettings(served_model_name="m", allow_private_media_urls=True), client=client)
    with TestClient(app) as http:
        r = http.post("/v1/chat/completions", json=_image_request(f"{image_server}/ok.jpg", data_url(PNG)))
    assert r.status_code == 200, r.text
    assert client.images == [[JPEG, PNG]]


def test_app_refuses_private_urls_by_default(image_server: str) -> None:
    client = RecordingClient()
    app = create_app(FrontendSettings(served_model_name="m"), client=client)
    with TestClient(app) as http:
        r = http.post("/v1/chat/completions", json=_image_request(data_url(PNG), f"{image_server}/ok.png"))
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "messages[0].content[1].image_url.url"
    assert error["type"] == "invalid_request_error" and "non-public" in error["message"]
    assert client.images == []


def test_app_http_404_is_400_naming_url(image_server: str) -> None:
    app = create_app(
        FrontendSettings(served_model_name="m", allow_private_media_urls=True), client=RecordingClient()
    )
    with TestClient(app) as http:
        r = http.post("/v1/chat/completions", json=_image_request(f"{image_server}/missing"))
    assert r.status_code == 400
    assert f"{image_server}/missing" in r.json()["error"]["message"]


def test_app_limits_images_per_request() -> None:
    app = create_app(
        FrontendSettings(served_model_name="m", max_images_per_request=2), client=RecordingClient()
    )
    with TestClient(app) as http:
        r = http.post("/v1/chat/completions", json=_image_request(*[data_url(PNG)] * 3))
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_images"


# --------------------------------------------------------------------------- image formats, pixels


def encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header announces ``width x height`` pixels, with a token IDAT: a decompression
    bomb stand-in that only a header check can refuse cheaply."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


RGB = Image.new("RGB", (16, 12), (10, 200, 30))


@pytest.mark.parametrize(
    ("data", "media_type"),
    [
        (encode(RGB, "WEBP"), "image/webp"),
        (encode(RGB, "WEBP", lossless=True), "image/webp"),
        (encode(RGB.convert("P"), "GIF"), "image/gif"),
        (encode(RGB, "BMP"), "image/bmp"),
        (encode(RGB, "TIFF"), "image/tiff"),
        (encode(RGB.convert("RGBA"), "PNG"), "image/png"),
        (encode(RGB.convert("L").convert("P"), "PNG"), "image/png"),
        (encode(RGB, "JPEG"), "image/jpg"),  # a common misspelling of the media type
    ],
)
def test_data_url_image_formats(data: bytes, media_type: str) -> None:
    assert fetch(data_url(data, media_type)) == data


@pytest.mark.parametrize(
    ("fmt", "name"), [("WEBP", "webp"), ("GIF", "gif"), ("BMP", "bmp"), ("TIFF", "tiff")]
)
def test_sniff_more_formats(fmt: str, name: str) -> None:
    assert sniff_image_format(encode(RGB, fmt)) == name


def test_too_many_pixels_refused_from_the_header() -> None:
    bomb = png_header_only(20000, 20000)
    assert len(bomb) < 100
    error = fetch_error(data_url(bomb))
    assert error.code == "image_too_many_pixels" and "400000000 pixels" in error.message
    error = fetch_error(data_url(png_header_only(5000, 4000)))
    assert error.code == "image_too_many_pixels" and "5000x4000" in error.message
    assert fetch(data_url(PNG), max_pixels=64) == PNG  # 8x8 = 64: at the limit
    assert fetch_error(data_url(PNG), max_pixels=63).code == "image_too_many_pixels"


def test_over_pillows_own_bomb_limit_is_too_many_pixels() -> None:
    error = fetch_error(data_url(png_header_only(100000, 100000)), max_pixels=None)
    assert error.code == "image_too_many_pixels"


def test_pixel_limit_from_settings_reaches_the_fetcher() -> None:
    app = create_app(FrontendSettings(served_model_name="m", max_image_pixels=63), client=RecordingClient())
    with TestClient(app) as http:
        r = http.post("/v1/chat/completions", json=_image_request(data_url(PNG)))
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_too_many_pixels"


# --------------------------------------------------------------------------- file:// URLs


@pytest.fixture
def media_dir(tmp_path: Any) -> Any:
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "ok.png").write_bytes(PNG)
    (root / "sub" / "deep.jpg").write_bytes(JPEG)
    (root / "notes.txt").write_text("not an image")
    (tmp_path / "secret.png").write_bytes(PNG)
    (root / "escape.png").symlink_to(tmp_path / "secret.png")
    (root / "inside-link.png").symlink_to(root / "ok.png")
    (root / "dirlink").symlink_to(tmp_path)
    return root


def test_file_url_inside_allowed_folder(media_dir: Any) -> None:
    assert fetch(f"file://{media_dir}/ok.png", allowed_local_path=media_dir) == PNG
    assert fetch(f"file://localhost{media_dir}/sub/deep.jpg", allowed_local_path=media_dir) == JPEG
    assert fetch(f"file://{media_dir}/inside-link.png", allowed_local_path=media_dir) == PNG
    assert fetch(f"file://{media_dir}/sub/../ok.png", allowed_local_path=media_dir) == PNG
    assert fetch(f"file://{str(media_dir).replace('/', '%2F')}%2Fok.png".replace("%2F", "/", 1),
                 allowed_local_path=media_dir) == PNG  # fmt: skip


@pytest.mark.parametrize(
    "path",
    ["{root}/../secret.png", "{root}/escape.png", "{root}/dirlink/secret.png", "/etc/passwd",
     "{root}/sub/../../secret.png", "{root}%2F..%2Fsecret.png"],
)  # fmt: skip
def test_file_url_outside_allowed_folder_is_forbidden(media_dir: Any, path: str) -> None:
    error = fetch_error("file://" + path.format(root=media_dir), allowed_local_path=media_dir)
    assert error.code == "image_url_forbidden"


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("{root}/missing.png", "Could not read"),
        ("{root}/sub", "not a regular file"),
        ("{root}/notes.txt", "not a supported image"),
    ],
)
def test_file_url_bad_files(media_dir: Any, path: str, needle: str) -> None:
    error = fetch_error("file://" + path.format(root=media_dir), allowed_local_path=media_dir)
    assert needle in error.message and error.code in ("invalid_image_url", "invalid_image")


def test_file_url_with_host_or_relative_path(media_dir: Any) -> None:
    assert (
        "Invalid file URL"
        in fetch_error(f"file://example.com{media_dir}/ok.png", allowed_local_path=media_dir).message
    )
    assert fetch_error("file:ok.png", allowed_local_path=media_dir).code == "invalid_image_url"


def test_file_url_size_cap(media_dir: Any) -> None:
    assert (
        fetch_error(f"file://{media_dir}/ok.png", allowed_local_path=media_dir, max_bytes=10).code
        == "image_too_large"
    )


def test_file_urls_are_off_by_default(media_dir: Any) -> None:
    error = fetch_error(f"file://{media_dir}/ok.png")
    assert "not enabled" in error.message


def test_allowed_local_path_must_be_a_folder(media_dir: Any) -> None:
    with pytest.raises(ValueError):
        MediaFetcher(allowed_local_path=media_dir / "ok.png")


# --------------------------------------------------------------------------- domain allow-list


def test_parse_and_match_domains() -> None:
    domains = media.parse_domains(" Example.COM, .img.org.,, bücher.de ,127.0.0.1")
    assert domains == ("example.com", "img.org", "xn--bcher-kva.de", "127.0.0.1")
    assert media.host_allowed("example.com", domains) and media.host_allowed("CDN.Example.com.", domains)
    assert media.host_allowed("bücher.de", domains) and media.host_allowed("127.0.0.1", domains)
    assert not media.host_allowed("badexample.com", domains)
    assert not media.host_allowed("example.com.evil.net", domains)
    assert not media.host_allowed("127.0.0.2", domains)


def test_domain_allow_list_refuses_other_hosts_before_any_connection(image_server: str) -> None:
    _Handler.hosts.clear()
    error = fetch_error(f"{image_server}/ok.png", allowed_domains="example.com")
    assert error.code == "image_url_forbidden" and "allowed media domains" in error.message
    assert _Handler.hosts == []
    assert fetch(f"{image_server}/ok.png", allowed_domains="example.com,127.0.0.1") == PNG


def test_domain_allow_list_checks_every_redirect(image_server: str) -> None:
    assert fetch(f"{image_server}/redirect/2", allowed_domains="127.0.0.1") == PNG
    error = fetch_error(f"{image_server}/redirect-absolute-private", allowed_domains="127.0.0.1")
    assert (
        error.code == "image_url_forbidden" and "127.0.0.2" in error.message and "redirected" in error.message
    )


def test_domain_allow_list_does_not_lift_the_ssrf_guard(image_server: str) -> None:
    error = fetch_error(f"{image_server}/ok.png", allowed_domains="127.0.0.1", allow_private=False)
    assert "non-public" in error.message
