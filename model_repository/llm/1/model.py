"""Triton adapter around the in-flight batching engine (decoupled: one response per decode step).

execute() only queues: the engine thread decodes every running request together and streams each
step's result through the request's response sender.
"""

import json
import logging
import queue
import threading
import time
import uuid

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from tritonvlm import wire
from tritonvlm.engine import EngineConfig, EngineOutput, EngineStats, LLMEngine, SamplingParams
from tritonvlm.triton_utils import (
    bytes_tensor,
    model_parameters,
    parse_json_input,
    resolve_model_path,
    setup_stub_process,
)

log = logging.getLogger("tritonvlm.llm")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def output_response(out: EngineOutput):
    """The Triton response for one engine output."""
    if out.error is not None:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(out.error))
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor(wire.TEXT_DELTA, bytes_tensor([out.text])),
            pb_utils.Tensor(wire.TOKEN_IDS, np.asarray(out.token_ids, dtype=np.int64)),
            pb_utils.Tensor(wire.FINISH_REASON, bytes_tensor([out.finish_reason or ""])),
            pb_utils.Tensor(wire.PROMPT_TOKENS, np.asarray([out.prompt_tokens], dtype=np.int32)),
            pb_utils.Tensor(wire.COMPLETION_TOKENS, np.asarray([out.completion_tokens], dtype=np.int32)),
            pb_utils.Tensor(wire.LOGPROBS, bytes_tensor([json.dumps(out.logprobs) if out.logprobs else ""])),
        ]
    )


def send_output(sender, out: EngineOutput) -> None:
    """Stream one engine output; a cancelled request only gets its closing flag."""
    if out.finish_reason == "cancelled":
        sender.send(flags=FINAL)
    else:
        sender.send(output_response(out), flags=FINAL if out.finished else 0)


class ResponseStreamer:
    """Sends the engine's outputs from a thread of its own, in the order they were produced.

    Each ``send`` is a round trip to the Triton process; made from the engine thread, a batch of 16
    sequences would wait for 16 of them after every step. Here the engine goes on with the next step
    while the previous step's tokens are sent (sends and torch both run without the GIL). A send that
    fails (the client is gone) cancels its request in the engine.
    """

    def __init__(self, engine: LLMEngine):
        self._engine = engine
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="llm-sender", daemon=True)
        self._thread.start()

    def put(self, sender, out: EngineOutput) -> None:
        self._queue.put((sender, out))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            sender, out = item
            try:
                send_output(sender, out)
            except Exception:
                log.info("could not send to %s (client gone?): cancelling it", out.request_id)
                if not out.finished:
                    self._engine.cancel(out.request_id)

    def stop(self) -> None:
        """Send what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout=10)


def throttled(check, interval_s: float = 0.02):
    """``check`` called at most every ``interval_s`` (else answered ``False``): a client's
    ``is_cancelled()`` is a round trip to the Triton process, too slow for every sequence every step."""
    last = [0.0]

    def poll() -> bool:
        now = time.monotonic()
        if now - last[0] < interval_s:
            return False
        last[0] = now
        return check()

    return poll


# family name -> (kind, description, {EngineStats field: extra labels})
GAUGES = {
    "tritonvlm_engine_sequences": (
        "Sequences in the engine by state (running, waiting)",
        {"num_running": {"state": "running"}, "num_waiting": {"state": "waiting"}},
    ),
    "tritonvlm_engine_kv_cache_tokens": ("Tokens held in the KV cache", {"kv_tokens_used": {}}),
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
        "Requests that left the engine, by outcome (finished, cancelled)",
        {"requests_finished": {"outcome": "finished"}, "requests_cancelled": {"outcome": "cancelled"}},
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
}


class EngineMetrics:
    """Engine state on Triton's metrics port (pb_utils.MetricFamily), refreshed at most every 50 ms."""

    def __init__(self):
        labels = {"model": "llm"}
        self.families = []  # must stay referenced for their metrics to live
        self.gauges, self.counters, self.histograms = {}, {}, {}
        for kind, table, target in (
            (pb_utils.MetricFamily.GAUGE, GAUGES, self.gauges),
            (pb_utils.MetricFamily.COUNTER, COUNTERS, self.counters),
        ):
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
        self._last = dict.fromkeys(self.counters, 0)
        self._last_running = 0
        self._last_time = 0.0

    def update(self, stats: EngineStats, force: bool = False) -> None:
        """Publish the stats (throttled; always when the engine falls idle)."""
        now = time.monotonic()
        idle_edge = stats.num_running == 0 and self._last_running != 0
        self._last_running = stats.num_running
        if not force and not idle_edge and now - self._last_time < 0.05:
            return
        self._last_time = now
        for field_name, gauge in self.gauges.items():
            gauge.set(getattr(stats, field_name))
        for field_name, counter in self.counters.items():
            value = getattr(stats, field_name)
            if value != self._last[field_name]:
                counter.increment(value - self._last[field_name])
                self._last[field_name] = value
        for field_name, histogram in self.histograms.items():
            samples = getattr(stats, field_name)
            for value in samples:
                histogram.observe(value)
            samples.clear()


class TritonPythonModel:
    def initialize(self, args):
        setup_stub_process()
        params = model_parameters(args)
        config = EngineConfig(
            max_num_seqs=int(params.get("max_num_seqs") or 16),
            max_model_len=int(params.get("max_model_len") or 4096),
            max_prefill_tokens=int(params.get("max_prefill_tokens") or 8192),
            kv_cache_memory=params.get("kv_cache_memory", ""),
        )
        self.engine = LLMEngine.from_pretrained(
            resolve_model_path(args),
            config,
            device=params.get("device", "auto"),
            dtype=params.get("dtype", "auto"),
        )
        self.metrics = EngineMetrics()
        self.engine.on_step_end = self.metrics.update
        self.streamer = ResponseStreamer(self.engine)
        self.engine.start()
        self._lock = threading.Lock()
        log.info("llm engine ready: %s on %s", config, self.engine.runner.device)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._submit(request, sender)
            except wire.InvalidRequestError as exc:
                sender.send(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(exc.to_wire())), flags=FINAL
                )
            except Exception as exc:
                log.exception("could not queue a request")
                sender.send(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(f"llm: {exc}")), flags=FINAL
                )
        return None

    def _submit(self, request, sender):
        params = parse_json_input(_input(request, wire.PARAMETERS), {})
        if not isinstance(params, dict):
            raise wire.InvalidRequestError("PARAMETERS must be a JSON object", "parameters")
        if wire.CANCEL in params:
            self.engine.cancel(str(params[wire.CANCEL]))
            sender.send(flags=FINAL)
            return
        input_ids = _input(request, wire.INPUT_IDS)
        if input_ids is None:
            raise wire.InvalidRequestError("INPUT_IDS is required", "input_ids")
        embeds = _input(request, wire.IMAGE_EMBEDS)
        grid = _input(request, wire.IMAGE_GRID_THW)
        # The vlm model names its requests and cancels them itself when its client leaves; others get a
        # unique id here, and their own client's cancellation is polled.
        managed = bool(params.get(wire.ENGINE_REQUEST_ID))
        request_id = str(params.get(wire.ENGINE_REQUEST_ID) or f"{request.request_id()}#{uuid.uuid4().hex}")
        self.engine.add_request(
            request_id,
            input_ids.reshape(-1).tolist(),
            SamplingParams.from_dict(params),
            on_output=lambda out, s=sender: self.streamer.put(s, out),
            image_embeds=None
            if embeds is None
            else torch.from_numpy(embeds.reshape(-1, embeds.shape[-1]).copy()),
            image_grid_thw=None if grid is None else torch.from_numpy(grid.reshape(-1, 3).copy()),
            is_cancelled=None if managed else throttled(sender.is_cancelled),
        )

    def finalize(self):
        self.engine.shutdown()
        self.streamer.stop()
