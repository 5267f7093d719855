"""The engine's state on Triton's metrics port, through ``pb_utils.MetricFamily`` (custom metrics of a
Python-backend model). The tables name each series once: gauges and counters read fields of
:class:`~tritonvlm.engine.engine_stats.EngineStats` (the image cache's: of
:class:`~tritonvlm.serving.image_cache.ImageCacheStats`), histograms drain its sample lists.

Every ``set``/``increment``/``observe`` is an IPC round trip to the Triton process made while holding
the GIL (about 0.1 ms each on a CPU, measured with py-spy), so the engine thread publishes at most
every :data:`PUBLISH_INTERVAL` seconds, sets only the gauges that changed, and observes histograms
per step, never per token: what happens per response (sending it) is summed into two counters."""

from __future__ import annotations

import threading
import time
from typing import Any

from tritonvlm.engine.engine_stats import EngineStats
from tritonvlm.serving.image_cache import ImageCache

TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]

# family name -> (kind, description, {EngineStats field: extra labels})
GAUGES = {
    "tritonvlm_engine_sequences": (
        "Sequences in the engine by state (running, waiting)",
        {"num_running": {"state": "running"}, "num_waiting": {"state": "waiting"}},
    ),
    "tritonvlm_engine_kv_cache_tokens": (
        "Tokens held in the KV cache: now (used) and the most at once since start (peak)",
        {"kv_tokens_used": {"state": "used"}, "kv_tokens_peak": {"state": "peak"}},
    ),
    "tritonvlm_engine_kv_cache_bytes": (
        "KV cache memory: held by the running sequences now (used), the most at once since start (peak), "
        "and reserved (capacity)",
        {
            "kv_bytes_used": {"state": "used"},
            "kv_bytes_peak": {"state": "peak"},
            "kv_bytes_capacity": {"state": "capacity"},
        },
    ),
    "tritonvlm_engine_kv_cache_blocks": (
        "KV cache blocks (16 positions of the full-attention layers): held by sequences or prefix-cache "
        "entries (used), and free",
        {"kv_blocks_used": {"state": "used"}, "kv_blocks_free": {"state": "free"}},
    ),
    "tritonvlm_engine_extra_state_bytes": (
        "Per-sequence decoder state besides keys/values held by running sequences (e.g. Mllama's "
        "cross-attention states)",
        {"extra_state_bytes": {}},
    ),
    "tritonvlm_engine_prefix_cache_entries": (
        "Finished sequences whose keys/values the prefix cache keeps",
        {"prefix_cache_entries": {}},
    ),
    "tritonvlm_engine_prefix_cache_tokens": (
        "Tokens whose keys/values the prefix cache keeps",
        {"prefix_cache_tokens": {}},
    ),
}
COUNTERS = {
    "tritonvlm_engine_tokens_total": (
        "Tokens processed by the engine, by phase (prefill, decode)",
        {"prefill_tokens": {"phase": "prefill"}, "decode_tokens": {"phase": "decode"}},
    ),
    "tritonvlm_engine_steps_total": (
        "Forward passes of the engine, by phase (prefill, decode)",
        {"prefill_steps": {"phase": "prefill"}, "decode_steps": {"phase": "decode"}},
    ),
    "tritonvlm_engine_requests_total": (
        "Requests that left the engine, by outcome (finished, cancelled, error)",
        {
            "requests_finished": {"outcome": "finished"},
            "requests_cancelled": {"outcome": "cancelled"},
            "requests_failed": {"outcome": "error"},
        },
    ),
    "tritonvlm_engine_preemptions_total": (
        "Running sequences whose KV blocks were taken back for others (recomputed when resumed)",
        {"preemptions": {}},
    ),
    "tritonvlm_engine_prefix_cache_queries_total": (
        "Prompts looked up in the prefix cache, by result (hit: started from a cached prefix)",
        {"prefix_cache_queries": {"result": "all"}, "prefix_cache_hits": {"result": "hit"}},
    ),
    "tritonvlm_engine_prefix_cache_hit_tokens_total": (
        "Prompt tokens copied from the prefix cache instead of computed",
        {"prefix_cache_hit_tokens": {}},
    ),
}
HISTOGRAMS = {
    "tritonvlm_engine_time_to_first_token_seconds": (
        "From arrival in the engine to the first generated token",
        "ttft_seconds",
        TTFT_BUCKETS,
    ),
    "tritonvlm_engine_inter_token_latency_seconds": (
        "Time between decode steps (each running sequence gets one token per step)",
        "step_intervals",
        ITL_BUCKETS,
    ),
    "tritonvlm_engine_queue_seconds": (
        "From arrival in the engine to the start of the request's prefill (waiting for a slot)",
        "queue_seconds",
        TTFT_BUCKETS,
    ),
    "tritonvlm_engine_prefill_step_seconds": (
        "One prefill step (the forward over the new prompts and their first tokens)",
        "prefill_step_seconds",
        TTFT_BUCKETS,
    ),
    "tritonvlm_engine_decode_step_seconds": (
        "One decode step (the forward over every running sequence and sampling)",
        "decode_step_seconds",
        ITL_BUCKETS,
    ),
}

# The image-embedding cache of vlm (tritonvlm.serving.image_cache): {ImageCacheStats field: extra labels}
IMAGE_CACHE_GAUGES = {
    "tritonvlm_image_cache_bytes": (
        "Image-embedding cache memory: held by its entries (used) and its budget (capacity)",
        {"bytes_held": {"state": "used"}, "capacity_bytes": {"state": "capacity"}},
    ),
    "tritonvlm_image_cache_entries": ("Encoder outputs held in the image-embedding cache", {"entries": {}}),
}
IMAGE_CACHE_COUNTERS = {
    "tritonvlm_image_cache_hits_total": (
        "Images (image sets, for families that keep them as one entry) whose embeddings came from the "
        "image-embedding cache (no vision_encoder call)",
        {"hits": {}},
    ),
    "tritonvlm_image_cache_preprocess_skips_total": (
        "Cache hits found by the images' own bytes: no image decoded or processed, the prompt rebuilt from "
        "their recorded layout",
        {"preprocess_skips": {}},
    ),
    "tritonvlm_image_cache_misses_total": (
        "Images (image sets, for families that keep them as one entry) sent to vision_encoder while the "
        "image-embedding cache is on",
        {"misses": {}},
    ),
    "tritonvlm_image_cache_evictions_total": (
        "Entries dropped from the image-embedding cache to make room (least recently used first)",
        {"evictions": {}},
    ),
}


# Samples the vlm model records itself (from its worker threads): name -> (description, buckets)
PIPELINE_HISTOGRAMS = {
    "tritonvlm_vlm_admission_seconds": (
        "From a request's arrival in vlm to its engine queue: preprocess and vision_encoder (BLS calls, "
        "their queueing included)",
        TTFT_BUCKETS,
    ),
}
# Totals the vlm model adds to itself (from its sender thread), one sample per response: name -> description
PIPELINE_COUNTERS = {
    "tritonvlm_vlm_responses_total": "Responses sent to clients (streamed chunks and final responses)",
    "tritonvlm_vlm_response_send_seconds_total": (
        "Time spent sending responses to clients (IPC round trips to the Triton process)"
    ),
}
PUBLISH_INTERVAL = 0.25  # seconds between two publications (and whenever the engine falls idle)


class EngineMetrics:
    """Engine state on Triton's metrics port (pb_utils.MetricFamily), refreshed at most every
    :data:`PUBLISH_INTERVAL` seconds and when the engine falls idle."""

    def __init__(self, pb_utils: Any, model: str = "vlm", image_cache: ImageCache | None = None) -> None:
        labels = {"model": model}
        self.families = []  # must stay referenced for their metrics to live
        self.gauges, self.counters, self.histograms = {}, {}, {}
        self.image_cache = image_cache
        self.image_gauges, self.image_counters = {}, {}
        tables = [
            (pb_utils.MetricFamily.GAUGE, GAUGES, self.gauges),
            (pb_utils.MetricFamily.COUNTER, COUNTERS, self.counters),
        ]
        if image_cache is not None:
            tables += [
                (pb_utils.MetricFamily.GAUGE, IMAGE_CACHE_GAUGES, self.image_gauges),
                (pb_utils.MetricFamily.COUNTER, IMAGE_CACHE_COUNTERS, self.image_counters),
            ]
        for kind, table, target in tables:
            for name, (description, fields) in table.items():
                family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
                self.families.append(family)
                for field_name, extra in fields.items():
                    target[field_name] = family.Metric({**labels, **extra})
        for name, (description, field_name, buckets) in HISTOGRAMS.items():
            family = pb_utils.MetricFamily(
                name=name, description=description, kind=pb_utils.MetricFamily.HISTOGRAM
            )
            self.families.append(family)
            self.histograms[field_name] = family.Metric(labels, buckets=buckets)
        self.pipeline_histograms = {}
        for name, (description, buckets) in PIPELINE_HISTOGRAMS.items():
            family = pb_utils.MetricFamily(
                name=name, description=description, kind=pb_utils.MetricFamily.HISTOGRAM
            )
            self.families.append(family)
            self.pipeline_histograms[name] = family.Metric(labels, buckets=buckets)
        self._pipeline_samples: dict[str, list[float]] = {name: [] for name in PIPELINE_HISTOGRAMS}
        self.pipeline_counters = {}
        for name, description in PIPELINE_COUNTERS.items():
            family = pb_utils.MetricFamily(
                name=name, description=description, kind=pb_utils.MetricFamily.COUNTER
            )
            self.families.append(family)
            self.pipeline_counters[name] = family.Metric(labels)
        self._pipeline_totals = dict.fromkeys(PIPELINE_COUNTERS, 0.0)
        self._pipeline_published = dict.fromkeys(PIPELINE_COUNTERS, 0.0)
        self._totals_lock = threading.Lock()
        self._gauge_values: dict[int, float] = {}  # id(gauge) -> the value last set
        self._last = dict.fromkeys(self.counters, 0)
        self._image_last = dict.fromkeys(self.image_counters, 0)
        self._last_running = 0
        self._last_time = 0.0

    def record(self, name: str, value: float) -> None:
        """A sample of one of the pipeline histograms (any thread; published by the next update)."""
        self._pipeline_samples[name].append(value)

    def add_response(self, send_seconds: float) -> None:
        """One response sent, taking ``send_seconds`` (any thread; published by the next update)."""
        with self._totals_lock:
            self._pipeline_totals["tritonvlm_vlm_responses_total"] += 1
            self._pipeline_totals["tritonvlm_vlm_response_send_seconds_total"] += send_seconds

    def update(self, stats: EngineStats, force: bool = False) -> None:
        """Publish the stats (throttled; always when the engine falls idle)."""
        now = time.monotonic()
        idle_edge = stats.num_running == 0 and self._last_running != 0
        self._last_running = stats.num_running
        if not force and not idle_edge and now - self._last_time < PUBLISH_INTERVAL:
            return
        self._last_time = now
        publish(stats, self.gauges, self.counters, self._last, self._gauge_values)
        if self.image_cache is not None:
            stats_now = self.image_cache.stats()
            publish(stats_now, self.image_gauges, self.image_counters, self._image_last, self._gauge_values)
        with self._totals_lock:
            totals = dict(self._pipeline_totals)
        for name, counter in self.pipeline_counters.items():
            gained = totals[name] - self._pipeline_published[name]
            if gained > 0:
                counter.increment(gained)
                self._pipeline_published[name] = totals[name]
        for field_name, histogram in self.histograms.items():
            samples = getattr(stats, field_name)
            for value in samples:
                histogram.observe(value)
            samples.clear()
        for name, histogram in self.pipeline_histograms.items():
            samples, self._pipeline_samples[name] = self._pipeline_samples[name], []
            for value in samples:
                histogram.observe(value)


def publish(
    stats: Any,
    gauges: dict[str, Any],
    counters: dict[str, Any],
    last: dict[str, int],
    gauge_values: dict[int, float],
) -> None:
    """Set the gauges whose value changed since ``gauge_values`` (``id(gauge)`` → the value last set)
    and advance the counters (by what they gained since ``last``) from ``stats``."""
    for field_name, gauge in gauges.items():
        value = getattr(stats, field_name)
        if gauge_values.get(id(gauge)) != value:
            gauge_values[id(gauge)] = value
            gauge.set(value)
    for field_name, counter in counters.items():
        value = getattr(stats, field_name)
        if value != last[field_name]:
            counter.increment(value - last[field_name])
            last[field_name] = value
