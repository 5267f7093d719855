"""Turn the ``image_url.url`` of a content part into the bytes of an image file.

``data:image/...;base64,...`` URLs are decoded; ``http(s)://`` URLs are fetched with httpx under a
deadline, a byte cap (enforced while streaming), a concurrency limit and manual redirects (each hop
re-checked). By default an SSRF guard refuses hosts that resolve to loopback, private, link-local,
reserved, multicast or otherwise non-global addresses, and connects to the very address it checked
(so a DNS answer cannot change between the check and the connection). An optional domain allow-list
restricts the hosts (and their subdomains) every hop may name. ``file://`` URLs are read only when a
local media folder is configured, and only for files whose real path (symlinks and ``..`` resolved)
lies inside it.

Whatever the source, the bytes must be an image Pillow can open (PNG, JPEG, GIF, WebP, BMP, TIFF),
no larger than the pixel limit, read from the image header before anything is decoded (decompression
bombs). Every failure is an :class:`~tritonvlm.frontend.errors.APIError` 400 whose ``param`` names the
content part and whose message names the URL.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import logging
import os
import re
import socket
import stat
import urllib.parse
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from tritonvlm.frontend.errors import APIError

if TYPE_CHECKING:
    from tritonvlm.frontend.metrics import FrontendMetrics

logger = logging.getLogger("tritonvlm.frontend.media")

MiB = 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 16_777_216  # 4096 x 4096, as the preprocess model's max_image_pixels
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_URL_SHOWN_CHARS = 120

try:  # Pillow is a project dependency; the magic-byte check still works without it.
    from PIL import Image as _PILImage
except ImportError:  # pragma: no cover - exercised only without pillow
    _PILImage = None


@dataclass(frozen=True)
class ImageRef:
    """An image of the request: its URL and the field path of its content part (for errors)."""

    url: str
    param: str


def describe_url(url: str) -> str:
    """The URL as shown in an error message (long ``data:`` URLs are cut)."""
    return url if len(url) <= _URL_SHOWN_CHARS else url[:_URL_SHOWN_CHARS] + "..."


def _bad(message: str, param: str | None, code: str = "invalid_image_url") -> APIError:
    return APIError(400, message, param=param, code=code)


# --------------------------------------------------------------------------- image bytes


def sniff_image_format(data: bytes) -> str | None:
    """The image format announced by the first bytes (``"png"``, ``"jpeg"``...), or ``None``."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"BM"):
        return "bmp"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    return None


def _open_and_verify(data: bytes, max_pixels: int | None) -> tuple[int, int] | None:
    """Open the image (its header only) and verify it; ``(width, height)`` if over ``max_pixels``."""
    assert _PILImage is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBombWarning: our own limit decides
        with _PILImage.open(io.BytesIO(data)) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                return width, height
            image.verify()
    return None


async def check_image(
    data: bytes, url: str, param: str | None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> None:
    """Raise a 400 unless ``data`` is an image file: known magic bytes, at most ``max_pixels`` pixels
    (read from the header, nothing decoded), and Pillow can verify it."""
    if not data:
        raise _bad(f"The image at {describe_url(url)} is empty.", param, "invalid_image")
    if sniff_image_format(data) is None:
        raise _bad(
            f"The content at {describe_url(url)} is not a supported image "
            "(expected PNG, JPEG, GIF, WebP, BMP or TIFF).",
            param,
            "invalid_image",
        )
    if _PILImage is None:
        return
    try:
        too_big = await asyncio.to_thread(_open_and_verify, data, max_pixels)
    except _PILImage.DecompressionBombError as exc:  # over Pillow's own hard limit: over ours too
        match = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{match.group(1)} pixels" if match else "too many pixels"
    except Exception as exc:  # Pillow raises many types for corrupt files
        raise _bad(
            f"The image at {describe_url(url)} could not be decoded: {exc}", param, "invalid_image"
        ) from None
    else:
        if too_big is None:
            return
        size = f"{too_big[0]}x{too_big[1]} pixels"
    raise _bad(
        f"The image at {describe_url(url)} is {size}, over the limit of {max_pixels} pixels.",
        param,
        "image_too_many_pixels",
    )


# --------------------------------------------------------------------------- data: URLs


def decode_data_url(url: str, param: str | None, max_bytes: int) -> bytes:
    """Decode a ``data:image/<type>;base64,<payload>`` URL (whitespace in the payload tolerated)."""
    header, sep, payload = url[len("data:") :].partition(",")
    if not sep:
        raise _bad("Invalid data URL: no ',' separates the header from the data.", param)
    fields = [f.strip().lower() for f in header.split(";")]
    media_type = fields[0]
    if not media_type.startswith("image/"):
        raise _bad(f"Invalid data URL: media type {media_type or '(none)'!r} is not an image type.", param)
    if "base64" not in fields[1:]:
        raise _bad("Invalid data URL: only base64-encoded data URLs are supported.", param)
    payload = "".join(payload.split())
    if len(payload) // 4 * 3 > max_bytes + 3:
        raise _bad(f"The image is larger than the limit of {max_bytes} bytes.", param, "image_too_large")
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise _bad("Invalid data URL: the payload is not valid base64.", param) from None
    if len(data) > max_bytes:
        raise _bad(f"The image is larger than the limit of {max_bytes} bytes.", param, "image_too_large")
    return data


# --------------------------------------------------------------------------- SSRF guard


def is_public_address(address: str) -> bool:
    """Whether ``address`` is a global unicast IP (not loopback/private/link-local/reserved/multicast)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and not is_public_address(str(embedded)):
            return False
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
    )


async def resolve_host(host: str, port: int) -> list[str]:
    """The IP addresses ``host`` resolves to (in resolver order, without duplicates)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def normalize_host(host: str) -> str:
    """A host name as compared with the allow-list: lower case, IDNA (punycode), no trailing dot,
    IPv6 without brackets."""
    host = host.strip().strip("[]").rstrip(".").lower()
    if not host:
        return ""
    try:
        return httpx.URL(f"http://{host if ':' not in host else f'[{host}]'}/").raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeError, ValueError):
        return host


def parse_domains(domains: Iterable[str] | str | None) -> tuple[str, ...]:
    """The allow-list from a comma-separated string or an iterable (``.a.com`` is ``a.com``)."""
    if domains is None:
        return ()
    items = domains.split(",") if isinstance(domains, str) else list(domains)
    out: list[str] = []
    for item in items:
        host = normalize_host(item.strip().lstrip("."))
        if host and host not in out:
            out.append(host)
    return tuple(out)


def host_allowed(host: str, domains: Sequence[str]) -> bool:
    """Whether ``host`` is one of ``domains`` or a subdomain of one (``img.a.com`` under ``a.com``)."""
    host = normalize_host(host)
    return any(host == d or host.endswith("." + d) for d in domains)


# --------------------------------------------------------------------------- the fetcher


class MediaFetcher:
    """Fetch and check the images of requests (one instance per app; shares an httpx client)."""

    def __init__(
        self,
        *,
        timeout_s: float = 10.0,
        max_bytes: int = 20 * MiB,
        max_concurrency: int = 16,
        max_redirects: int = 3,
        allow_private: bool = False,
        max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        allowed_local_path: str | os.PathLike[str] | None = None,
        allowed_domains: Iterable[str] | str | None = None,
        client: httpx.AsyncClient | None = None,
        metrics: FrontendMetrics | None = None,
    ) -> None:
        """``timeout_s`` bounds a whole fetch (redirects included) and each connect/read.

        ``max_pixels``: images with more pixels are refused (``None``: no limit). ``allowed_local_path``:
        the folder ``file://`` URLs may read from (``None``: ``file://`` is refused).
        ``allowed_domains``: if not empty, the only hosts (and their subdomains) ``http(s)://`` URLs and
        their redirects may name; the SSRF guard still applies to them. ``metrics``: where fetched and
        refused images are counted.
        """
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.allow_private = allow_private
        self.max_pixels = max_pixels
        self.allowed_local_path = (
            Path(os.path.realpath(allowed_local_path)) if allowed_local_path is not None else None
        )
        if self.allowed_local_path is not None and not self.allowed_local_path.is_dir():
            raise ValueError(f"the allowed local media path {allowed_local_path} is not a directory")
        self.allowed_domains = parse_domains(allowed_domains)
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=False,
            trust_env=False,  # a proxy would defeat the address check
            # Guarded requests go to an IP with the name in Host/SNI; pooled connections are keyed by
            # that IP, so a kept-alive TLS connection made for one name could carry another's request.
            limits=httpx.Limits(max_keepalive_connections=20 if allow_private else 0),
            headers={"User-Agent": "tritonvlm-frontend/0.1", "Accept": "image/*"},
        )

    async def aclose(self) -> None:
        """Close the HTTP client if this fetcher created it."""
        if self._own_client:
            await self._client.aclose()

    async def fetch_all(self, refs: Sequence[ImageRef]) -> list[bytes]:
        """Fetch every image concurrently, in order; the first failure cancels the others.

        A URL repeated in one request is fetched once.
        """
        tasks: dict[str, asyncio.Task[bytes]] = {}
        for ref in refs:
            if ref.url not in tasks:
                tasks[ref.url] = asyncio.ensure_future(self.fetch(ref.url, ref.param))
        try:
            await asyncio.gather(*tasks.values())
        except BaseException:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            raise
        return [tasks[ref.url].result() for ref in refs]

    async def fetch(self, url: str, param: str | None = None) -> bytes:
        """The checked image bytes behind ``url`` (``data:``, ``http(s)://`` or allowed ``file://``)."""
        try:
            data = await self._fetch_checked(url, param)
        except APIError as exc:
            if self.metrics is not None:
                self.metrics.image_failed(exc.code)
            raise
        if self.metrics is not None:
            self.metrics.image_fetched(url, len(data))
        return data

    async def _fetch_checked(self, url: str, param: str | None) -> bytes:
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            data = decode_data_url(url, param, self.max_bytes)
        elif scheme == "file" and self.allowed_local_path is not None:
            data = await asyncio.to_thread(self._read_local, url, param)
        elif scheme in ("http", "https"):
            async with self._semaphore:
                try:
                    data = await asyncio.wait_for(self._fetch_http(url, param), self.timeout_s)
                except asyncio.TimeoutError:
                    raise _bad(
                        f"Timed out after {self.timeout_s:g} s fetching the image at {describe_url(url)}.",
                        param,
                        "image_fetch_timeout",
                    ) from None
        else:
            disabled = " (file:// URLs are not enabled on this server)" if scheme == "file" else ""
            raise _bad(
                f"Unsupported image URL {describe_url(url)}: use an http(s):// or data:image/...;base64 "
                f"URL{disabled}.",
                param,
            )
        await check_image(data, url, param, self.max_pixels)
        return data

    def _read_local(self, url: str, param: str | None) -> bytes:
        """Read a ``file://`` URL below ``allowed_local_path`` (blocking: run in a thread).

        The path is resolved (symlinks, ``..``) before the check, opened without following a final
        symlink, and the opened file's own path is checked again (so a swap between the check and the
        open is caught where ``/proc/self/fd`` exists).
        """
        root = self.allowed_local_path
        assert root is not None
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise _bad(
                f"Invalid file URL {describe_url(url)}: use file:///absolute/path (no host, query or "
                "fragment).",
                param,
            )
        path = urllib.parse.unquote(parts.path)
        if not path.startswith("/") or "\0" in path:
            raise _bad(f"Invalid file URL {describe_url(url)}: the path must be absolute.", param)
        forbidden = _bad(
            f"The image URL {describe_url(url)} is outside the folder local images may be read from.",
            param,
            "image_url_forbidden",
        )
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(root):
            raise forbidden
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(real, flags | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise _bad(f"Could not read the image at {describe_url(url)}: {exc.strerror}.", param) from None
        too_large = _bad(
            f"The image at {describe_url(url)} is larger than the limit of {self.max_bytes} bytes.",
            param,
            "image_too_large",
        )
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise _bad(f"The image URL {describe_url(url)} is not a regular file.", param)
            proc_path = f"/proc/self/fd/{fd}"
            if os.path.exists(proc_path) and not Path(os.path.realpath(proc_path)).is_relative_to(root):
                raise forbidden
            if info.st_size > self.max_bytes:
                raise too_large
            data = bytearray()
            while len(data) <= self.max_bytes:
                block = os.read(fd, min(MiB, self.max_bytes + 1 - len(data)))
                if not block:
                    break
                data += block
        finally:
            os.close(fd)
        if len(data) > self.max_bytes:
            raise too_large
        return bytes(data)

    async def _checked_addresses(self, url: httpx.URL, original: str, param: str | None) -> list[str]:
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            addresses = await resolve_host(url.host, port)
        except (socket.gaierror, UnicodeError, OSError) as exc:
            raise _bad(
                f"Could not resolve the host of the image URL {describe_url(original)}: {exc}", param
            ) from None
        if not self.allow_private:
            refused = [a for a in addresses if not is_public_address(a)]
            if refused or not addresses:
                raise _bad(
                    f"The image URL {describe_url(original)} resolves to a non-public address "
                    f"({', '.join(refused) or 'none'}); fetching it is not allowed.",
                    param,
                    "image_url_forbidden",
                )
        return addresses

    async def _fetch_http(self, original: str, param: str | None) -> bytes:
        current = original
        for _hop in range(self.max_redirects + 1):
            try:
                url = httpx.URL(current)
            except (httpx.InvalidURL, ValueError) as exc:
                raise _bad(f"Invalid image URL {describe_url(current)}: {exc}", param) from None
            if url.scheme not in ("http", "https") or not url.host:
                raise _bad(
                    f"Unsupported image URL {describe_url(current)} (from {describe_url(original)}).", param
                )
            if self.allowed_domains and not host_allowed(url.host, self.allowed_domains):
                via = f" (redirected from {describe_url(original)})" if current != original else ""
                raise _bad(
                    f"The host of the image URL {describe_url(current)}{via} is not in the allowed media "
                    "domains of this server.",
                    param,
                    "image_url_forbidden",
                )
            addresses = await self._checked_addresses(url, current, param)
            response_or_location = await self._get(url, addresses, current, param)
            if isinstance(response_or_location, bytes):
                return response_or_location
            current = self._redirect_target(url, response_or_location, original, param)
            logger.debug("image URL %s redirects to %s", describe_url(original), describe_url(current))
        raise _bad(
            f"Too many redirects (more than {self.max_redirects}) "
            f"fetching the image at {describe_url(original)}.",
            param,
        )

    @staticmethod
    def _redirect_target(url: httpx.URL, location: str, original: str, param: str | None) -> str:
        """The absolute URL a redirect points to, checked before anything is requested: it must parse and
        be ``http(s)://`` with a host (``javascript:``, ``data:``, ``file:`` and malformed targets are a
        400). Its host and address are checked again by the next hop, like the first URL's."""
        try:
            target = url.join(location)
            scheme, host = target.scheme, target.host
        except (httpx.InvalidURL, ValueError, UnicodeError) as exc:  # IDNA errors are UnicodeErrors
            raise _bad(
                f"The image URL {describe_url(original)} redirects to an invalid URL "
                f"{describe_url(location)!r}: {exc}",
                param,
            ) from None
        if scheme not in ("http", "https") or not host:
            raise _bad(
                f"The image URL {describe_url(original)} redirects to {describe_url(location)!r}, "
                "which is not an http(s):// URL.",
                param,
            )
        return str(target)

    async def _get(self, url: httpx.URL, addresses: list[str], shown: str, param: str | None) -> bytes | str:
        """GET ``url``: the body, or the ``Location`` of a redirect.

        With the SSRF guard on, the connection goes to a checked address (``Host`` header and TLS SNI
        keep the name), trying the next address only when connecting fails.
        """
        if self.allow_private:
            targets: list[tuple[httpx.URL, dict[str, str], dict[str, str]]] = [(url, {}, {})]
        else:
            host_header = url.netloc.decode("ascii")
            sni = {"sni_hostname": url.host} if url.scheme == "https" else {}
            targets = [
                (url.copy_with(host=a.split("%", 1)[0]), {"Host": host_header}, sni) for a in addresses
            ]
        last_error: Exception | None = None
        for target, headers, extensions in targets:
            try:
                return await self._get_once(target, headers, extensions, shown, param)
            except httpx.ConnectError as exc:
                last_error = exc
            except httpx.TimeoutException:
                raise _bad(
                    f"Timed out fetching the image at {describe_url(shown)}.", param, "image_fetch_timeout"
                ) from None
            except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, ValueError, UnicodeError) as exc:
                raise _bad(f"Could not fetch the image at {describe_url(shown)}: {exc}", param) from None
        raise _bad(f"Could not connect to fetch the image at {describe_url(shown)}: {last_error}", param)

    async def _get_once(
        self,
        target: httpx.URL,
        headers: dict[str, str],
        extensions: dict[str, str],
        shown: str,
        param: str | None,
    ) -> bytes | str:
        request = self._client.build_request("GET", target, headers=headers, extensions=extensions)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.InvalidURL as exc:
            # httpx builds the next request of a redirect even when it does not follow it; a Location
            # such as "javascript:alert(1)" fails there, before this code can check it.
            raise _bad(
                f"The image URL {describe_url(shown)} redirects to a URL that is not a valid http(s):// "
                f"URL ({exc}).",
                param,
            ) from None
        try:
            if response.status_code in _REDIRECT_STATUSES:
                location = response.headers.get("location")
                if not location:
                    raise _bad(f"The image URL {describe_url(shown)} redirects without a Location.", param)
                return location
            if response.status_code != 200:
                raise _bad(
                    f"Could not fetch the image at {describe_url(shown)}: HTTP {response.status_code}.",
                    param,
                    "image_fetch_failed",
                )
            too_big = _bad(
                f"The image at {describe_url(shown)} is larger than the limit of {self.max_bytes} bytes.",
                param,
                "image_too_large",
            )
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise too_big
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > self.max_bytes:
                    raise too_big
            return bytes(body)
        finally:
            await response.aclose()
