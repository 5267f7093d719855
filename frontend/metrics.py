"""Prometheus metrics of the frontend, served at ``GET /metrics`` (text exposition format).

One :class:`FrontendMetrics` per app, each with its own registry (so several apps in one process, as
in tests, do not collide). The access-log middleware reports every HTTP request, the completion
routes the time to the first token of a stream, and the media fetcher every image it fetched or
refused. Triton's own metrics (engine, per-model inference counts) stay on Triton's metrics port.

Series (all prefixed ``tritonvlm_frontend_``):

* ``requests_total{route,status}``: finished HTTP requests; ``route`` is the route template
  (``/v1/models/{model_id}``) or ``other`` for unknown paths, ``status`` the HTTP status sent (499 for a
  client that left, ``none`` when no response was started, e.g. a stream cancelled at shutdown);
* ``request_duration_seconds{route}``: request latency, until the last byte of a stream;
* ``time_to_first_token_seconds{route}``: streamed completions, from the request's arrival until
  the first generated token is ready to be sent;
* ``requests_in_flight``: HTTP requests being served (``/metrics`` scrapes not counted);
* ``images_fetched_total{source}`` and ``image_bytes_total{source}``: images fetched and checked,
  and their encoded size, by URL scheme (``data``, ``http``, ``file``; ``https`` counts as ``http``);
* ``image_fetch_failures_total{reason}``: images refused, by error code (``image_fetch_failed``,
  ``image_fetch_timeout``, ``image_too_large``, ``invalid_image``, ``invalid_image_url``...).

Plus the ``process_*`` series of the frontend process.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from starlette.routing import Match
from starlette.types import Scope

METRICS_PATH = "/metrics"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SOURCES = {"data": "data", "http": "http", "https": "http", "file": "file"}


def route_label(scope: Scope) -> str:
    """The route template the request matched (by path; a wrong method still names the route), else
    ``other``: keeps the label set bounded whatever paths clients try."""
    app = scope.get("app")
    router = getattr(app, "router", None)
    for route in getattr(router, "routes", ()):
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return str(getattr(route, "path", "other"))
    return "other"


def image_source(url: str) -> str:
    """``data``, ``http`` or ``file`` for an image URL (``other`` for anything else)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    return _SOURCES.get(scheme, "other")


class FrontendMetrics:
    """The frontend's series in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        if process:
            ProcessCollector(registry=self.registry)
        prefix = "tritonvlm_frontend_"
        self.requests = Counter(
            prefix + "requests",
            "HTTP requests served, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            prefix + "request_duration_seconds",
            "HTTP request latency (until the last byte of a stream), by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            prefix + "time_to_first_token_seconds",
            "Streamed completions: time from the request's arrival to its first token",
            ["route"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            prefix + "requests_in_flight",
            "HTTP requests being served (/metrics not counted)",
            registry=self.registry,
        )
        self.images = Counter(
            prefix + "images_fetched",
            "Images fetched and checked, by source (data, http, file)",
            ["source"],
            registry=self.registry,
        )
        self.image_bytes = Counter(
            prefix + "image_bytes",
            "Bytes of the images fetched (encoded), by source",
            ["source"],
            registry=self.registry,
        )
        self.fetch_failures = Counter(
            prefix + "image_fetch_failures",
            "Images refused or that could not be fetched, by reason (the error code)",
            ["reason"],
            registry=self.registry,
        )

    # ------------------------------------------------------------------ hooks
    def request_started(self, scope: Scope) -> None:
        if scope.get("path") != METRICS_PATH:
            self.in_flight.inc()

    def request_finished(self, scope: Scope, status: int, seconds: float) -> None:
        if scope.get("path") != METRICS_PATH:
            self.in_flight.dec()
        route = route_label(scope)
        self.requests.labels(route=route, status=str(status) if status else "none").inc()
        self.latency.labels(route=route).observe(seconds)

    def first_token(self, route: str, seconds: float) -> None:
        self.ttft.labels(route=route).observe(seconds)

    def image_fetched(self, url: str, size: int) -> None:
        source = image_source(url)
        self.images.labels(source=source).inc()
        self.image_bytes.labels(source=source).inc(size)

    def image_failed(self, reason: str | None) -> None:
        self.fetch_failures.labels(reason=reason or "error").inc()

    # ------------------------------------------------------------------ exposition
    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
