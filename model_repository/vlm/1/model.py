"""Triton adapter: the pipeline entry point, hosting the in-flight batching engine (decoupled).

execute() only queues. A worker thread per request runs preprocess and vision_encoder (plain BLS
requests) and hands the prompt to the engine thread, which decodes every running request together;
each step's output goes back through the request's response sender (from a sender thread). A monitor
thread polls the senders and drops from the engine the requests whose client left. No decoupled BLS
stream is used: python_backend 2.51 deadlocks when one stream's iterator wakes while another thread
opens a new stream.
"""

import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from tritonvlm import wire
from tritonvlm.engine import EngineOutput, LLMEngine, SamplingParams
from tritonvlm.engine.engine_config import engine_config
from tritonvlm.modeling.device import resolve_device
from tritonvlm.packing import to_torch
from tritonvlm.serving.admission import StageError, model_inputs
from tritonvlm.serving.engine_metrics import EngineMetrics
from tritonvlm.serving.image_cache import (
    DEFAULT_IMAGE_CACHE_MEMORY,
    ImageCache,
    available_host_memory,
    parse_cache_memory,
)
from tritonvlm.serving.senders import CancelMonitor, ResponseStreamer, TrackedSender
from tritonvlm.triton_utils import (
    bytes_tensor,
    model_parameters,
    parse_json_input,
    resolve_model_path,
    setup_stub_process,
)

log = logging.getLogger("tritonvlm.vlm")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
PROMPT_INPUTS = (wire.MESSAGES, wire.PROMPT, wire.INPUT_IDS, wire.IMAGES, wire.TOOLS)


def _numpy(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def call_model(model_name, inputs, output_names):
    """One plain (non-decoupled) BLS request; a model's error becomes a StageError."""
    response = pb_utils.InferenceRequest(
        model_name=model_name,
        inputs=[pb_utils.Tensor(name, value) for name, value in inputs.items()],
        requested_output_names=output_names,
    ).exec()
    if response.has_error():
        raise StageError(response.error().message())
    return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in output_names}


def error_response(message):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))


def output_response(out: EngineOutput):
    """The Triton response for one engine output."""
    if out.error is not None:
        return error_response(out.error)
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor(wire.TEXT_DELTA, bytes_tensor([out.text])),
            pb_utils.Tensor(wire.TOKEN_IDS, np.asarray(out.token_ids, dtype=np.int64)),
            pb_utils.Tensor(wire.FINISH_REASON, bytes_tensor([out.finish_reason or ""])),
            pb_utils.Tensor(wire.PROMPT_TOKENS, np.asarray([out.prompt_tokens], dtype=np.int32)),
            pb_utils.Tensor(wire.COMPLETION_TOKENS, np.asarray([out.completion_tokens], dtype=np.int32)),
            pb_utils.Tensor(wire.LOGPROBS, bytes_tensor([json.dumps(out.logprobs) if out.logprobs else ""])),
            pb_utils.Tensor(wire.CACHED_TOKENS, np.asarray([out.cached_tokens], dtype=np.int32)),
        ]
    )


class TritonPythonModel:
    def initialize(self, args):
        setup_stub_process()
        params = model_parameters(args)
        device, _ = resolve_device(params.get("device", "auto"), params.get("dtype", "auto"))
        config = engine_config(params, device.type)
        cache_memory = params.get("image_cache_memory") or DEFAULT_IMAGE_CACHE_MEMORY
        self.image_cache = ImageCache(parse_cache_memory(cache_memory, available_host_memory()))
        self.metrics = EngineMetrics(pb_utils, model="vlm", image_cache=self.image_cache)

        def build():  # on the engine's own thread: all its torch work stays on one thread
            engine = LLMEngine.from_pretrained(
                resolve_model_path(args),
                config,
                device=params.get("device", "auto"),
                dtype=params.get("dtype", "auto"),
            )
            engine.on_step_end = self.metrics.update
            return engine

        self.engine = LLMEngine.launch(build)
        self.streamer = ResponseStreamer(self._deliver, self._drop)
        poll_ms = float(params.get("cancel_poll_ms") or 20)
        self.monitor = CancelMonitor(poll_ms / 1000, self._drop)
        self.pool = ThreadPoolExecutor(
            max_workers=int(params.get("max_concurrency") or 64), thread_name_prefix="vlm"
        )
        self._started = {}  # engine id -> (client request id, start time), for the log line
        self._lock = threading.Lock()
        log.info(
            "vlm ready: %s %s on %s, image cache %d bytes",
            self.engine.family.name,
            config,
            self.engine.runner.device,
            self.image_cache.capacity_bytes,
        )

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._admit, request, request.get_response_sender())
        return None

    def _admit(self, request, sender):
        """Preprocess + encode one request and queue it in the engine (a worker thread)."""
        # The frontend sends its completion id as the Triton request id: the same id in both logs.
        client_id = request.request_id() or "-"
        engine_id = f"{client_id}#{uuid.uuid4().hex}"
        tracked = TrackedSender(sender, engine_id, FINAL)
        with self._lock:
            self._started[engine_id] = (client_id, time.monotonic())
        try:
            params = parse_json_input(_numpy(request, wire.PARAMETERS), {})
            if not isinstance(params, dict):
                raise wire.InvalidRequestError("PARAMETERS must be a JSON object", "parameters")
            sampling = SamplingParams.from_dict(params)
            given = {name: _numpy(request, name) for name in PROMPT_INPUTS}
            ids, mm, digests = model_inputs(given, call_model, self.image_cache, self.engine.family)
            if tracked.poll_cancelled():
                self._close(tracked, "cancelled before decoding")
                return
            self.monitor.watch(tracked)
            self.metrics.record(
                "tritonvlm_vlm_admission_seconds", time.monotonic() - self._started[engine_id][1]
            )
            self.engine.add_request(
                engine_id,
                ids,
                sampling,
                on_output=lambda out: self.streamer.put(tracked, out),
                mm={name: to_torch(value) for name, value in mm.items()},
                image_digests=digests,
            )
        except wire.InvalidRequestError as exc:
            self._fail(tracked, exc.to_wire(), f"rejected: {exc.message}")
        except StageError as exc:
            self._fail(tracked, str(exc), f"failed: {exc}")
        except Exception as exc:
            log.exception("vlm could not admit request %s", client_id)
            self._fail(tracked, f"vlm failed: {exc}", f"failed: {exc}")

    def _deliver(self, tracked, out: EngineOutput):
        """Send one engine output (the sender thread); the final one closes the request."""
        started = time.monotonic()
        if not out.finished:
            tracked.send(output_response(out))
            self.metrics.add_response(time.monotonic() - started)
            return
        self.monitor.forget(tracked.engine_id)
        if out.finish_reason == "cancelled":
            tracked.send(final=True)
        else:
            tracked.send(output_response(out), final=True)
        self._log_done(tracked.engine_id, f"failed: {out.error}" if out.error else "ok")

    def _drop(self, tracked):
        """The client left (a failed send or a cancelled stream): free the request's engine slot."""
        tracked.cancelled = True
        self.engine.cancel(tracked.engine_id)

    def _fail(self, tracked, message, outcome):
        self.monitor.forget(tracked.engine_id)
        try:
            tracked.send(error_response(message), final=True)
        except Exception:  # the client may already be gone
            log.debug("could not send error response", exc_info=True)
        self._log_done(tracked.engine_id, outcome)

    def _close(self, tracked, outcome):
        try:
            tracked.send(final=True)
        except Exception:
            log.debug("could not close %s", tracked.engine_id, exc_info=True)
        self._log_done(tracked.engine_id, outcome)

    def _log_done(self, engine_id, outcome):
        with self._lock:
            client_id, started = self._started.pop(engine_id, ("-", time.monotonic()))
        log.info("request %s done in %.3fs (%s)", client_id, time.monotonic() - started, outcome)

    def finalize(self):
        self.monitor.stop()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.engine.shutdown()
        self.streamer.stop()
