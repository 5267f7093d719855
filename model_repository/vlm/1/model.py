"""Triton adapter: the pipeline entry point (decoupled BLS).

Each request runs in a worker thread: preprocess -> vision_encoder (when there are images) -> llm,
whose stream is forwarded response by response. A monitor thread polls the senders of the requests
in the llm stage; when a client cancels (a dropped gRPC stream) it asks the llm engine to drop that
request, whether it is decoding or still waiting for a slot, and the worker drains llm's stream to
its end (an abandoned BLS stream blocks model unload).
"""

import collections
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import triton_python_backend_utils as pb_utils

from tritonvlm import wire
from tritonvlm.triton_utils import bytes_tensor, model_parameters, parse_json_input, setup_stub_process

log = logging.getLogger("tritonvlm.vlm")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_POLL_SECONDS = 0.02


class Watched:
    """A request in the llm stage, as the monitor and its worker thread share it."""

    def __init__(self, sender, engine_id):
        self.sender = sender
        self.engine_id = engine_id
        self.cancelled = False  # the client left and the engine side was told to drop it
        self.closed = False  # the final response went out: the sender must not be touched again
        self.lock = threading.Lock()

    def send(self, response=None, final=False):
        """Send a response; the final one under the lock, so no is_cancelled() poll races it."""
        flags = FINAL if final else 0
        if not final:
            self.sender.send(response, flags=flags)
            return
        with self.lock:
            self.closed = True
            if response is None:
                self.sender.send(flags=flags)
            else:
                self.sender.send(response, flags=flags)

    def poll_cancelled(self):
        """True the first time the client is seen gone (after which the caller cancels the engine)."""
        with self.lock:
            if self.closed or self.cancelled:
                return False
            try:
                self.cancelled = self.sender.is_cancelled()
            except Exception:
                self.cancelled = True
            return self.cancelled


class StreamGraveyard:
    """Keeps finished BLS response streams referenced from Python for a few seconds.

    When a decoupled BLS stream ends, the stub (python_backend 2.51) queues a cleanup that, on its own
    IPC thread and without the GIL, erases the stream from its id map. If Python has already dropped
    the stream, that erase destroys it there: its responses' tensors, with the numpy arrays Python made
    of them, are freed without the GIL, which corrupts the heap under load (seen as "double free" and
    segfaults in ``InferResponse`` disposal after a few hundred concurrent requests). Holding the
    stream here until the cleanup has surely run makes the last release happen in Python.
    """

    KEEP_SECONDS = 5.0

    def __init__(self):
        self._held = collections.deque()  # (monotonic time, stream), oldest first
        self._lock = threading.Lock()

    def keep(self, stream):
        now = time.monotonic()
        expired = []
        with self._lock:
            self._held.append((now, stream))
            while self._held and now - self._held[0][0] > self.KEEP_SECONDS:
                expired.append(self._held.popleft())
        del expired  # released here, in Python, with the GIL

    def clear(self):
        with self._lock:
            self._held.clear()


GRAVEYARD = StreamGraveyard()


class CancelMonitor:
    """Watches the requests whose llm stream is open and cancels the engine side of those the
    client abandoned. One thread for all requests: no per-token cancellation check on the hot path."""

    def __init__(self, poll_seconds=CANCEL_POLL_SECONDS):
        self._poll_seconds = poll_seconds
        self._active = {}  # engine request id -> Watched
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlm-cancel-monitor", daemon=True)
        self._thread.start()

    def watch(self, engine_id, sender):
        watched = Watched(sender, engine_id)
        with self._lock:
            self._active[engine_id] = watched
        return watched

    def forget(self, engine_id):
        with self._lock:
            self._active.pop(engine_id, None)

    def _run(self):
        while not self._stop.wait(self._poll_seconds):
            with self._lock:
                items = list(self._active.items())
            for engine_id, watched in items:
                if watched.poll_cancelled():
                    try:
                        cancel_llm(engine_id)
                    except Exception:
                        log.exception("could not cancel %s in the llm engine", engine_id)

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)


def cancel_llm(engine_id):
    """Tell the llm engine to drop a request (it answers with a bare final flag)."""
    params = pb_utils.Tensor(wire.PARAMETERS, bytes_tensor([json.dumps({wire.CANCEL: engine_id})]))
    cancel = pb_utils.InferenceRequest(
        model_name=wire.LLM_MODEL, inputs=[params], requested_output_names=list(wire.STREAM_OUTPUTS)
    )
    stream = cancel.exec(decoupled=True)
    for _ in stream:
        pass
    GRAVEYARD.keep(stream)


class StageError(Exception):
    """A downstream model answered with an error; its message goes to the client unchanged."""


def _exec(model_name, inputs, outputs):
    response = pb_utils.InferenceRequest(
        model_name=model_name, inputs=inputs, requested_output_names=outputs
    ).exec()
    if response.has_error():
        raise StageError(response.error().message())
    return {name: pb_utils.get_output_tensor_by_name(response, name) for name in outputs}


class TritonPythonModel:
    def initialize(self, args):
        setup_stub_process()
        params = model_parameters(args)
        workers = int(params.get("max_concurrency") or 256)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlm")
        poll_ms = float(params.get("cancel_poll_ms") or CANCEL_POLL_SECONDS * 1000)
        self.monitor = CancelMonitor(poll_ms / 1000) if poll_ms > 0 else None

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._run, request)
        return None

    def _run(self, request):
        # The frontend sends its completion id as the Triton request id: the same id in both logs.
        request_id = request.request_id() or "-"
        sender = request.get_response_sender()
        started = time.monotonic()
        outcome = "ok"
        try:
            self._pipeline(request, sender)
        except wire.InvalidRequestError as exc:
            outcome = f"rejected: {exc.message}"
            self._fail(sender, exc.to_wire())
        except StageError as exc:
            outcome = f"failed: {exc}"
            self._fail(sender, str(exc))
        except Exception as exc:
            log.exception("vlm pipeline failed for request %s", request_id)
            outcome = f"failed: {exc}"
            self._fail(sender, f"vlm pipeline failed: {exc}")
        log.info("request %s done in %.3fs (%s)", request_id, time.monotonic() - started, outcome)

    @staticmethod
    def _fail(sender, message):
        try:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)
        except Exception:  # the client may already be gone
            log.debug("could not send error response", exc_info=True)

    def _pipeline(self, request, sender):
        params = parse_json_input(_numpy(request, wire.PARAMETERS), {})
        if not isinstance(params, dict):
            raise wire.InvalidRequestError("PARAMETERS must be a JSON object", "parameters")
        llm_inputs = self._model_inputs(request)
        if sender.is_cancelled():
            sender.send(flags=FINAL)
            return

        engine_id = f"{request.request_id()}#{uuid.uuid4().hex}"
        params = {**params, wire.ENGINE_REQUEST_ID: engine_id}
        llm_inputs.append(pb_utils.Tensor(wire.PARAMETERS, bytes_tensor([json.dumps(params)])))
        watched = self.monitor.watch(engine_id, sender) if self.monitor else Watched(sender, engine_id)
        try:
            stream = pb_utils.InferenceRequest(
                model_name=wire.LLM_MODEL, inputs=llm_inputs, requested_output_names=list(wire.STREAM_OUTPUTS)
            ).exec(decoupled=True)
            try:
                self._forward(stream, watched)
            finally:
                GRAVEYARD.keep(stream)
        finally:
            if self.monitor:
                self.monitor.forget(engine_id)

    @staticmethod
    def _model_inputs(request):
        """INPUT_IDS (+ IMAGE_EMBEDS, IMAGE_GRID_THW) for llm, from whichever prompt form came in."""
        given = {
            name: pb_utils.get_input_tensor_by_name(request, name)
            for name in (wire.MESSAGES, wire.PROMPT, wire.INPUT_IDS, wire.IMAGES)
        }
        forms = [name for name in (wire.MESSAGES, wire.PROMPT, wire.INPUT_IDS) if given[name] is not None]
        if len(forms) != 1:
            raise wire.InvalidRequestError("send exactly one of MESSAGES, PROMPT or INPUT_IDS", "messages")
        if forms[0] == wire.INPUT_IDS:
            if given[wire.IMAGES] is not None:
                raise wire.InvalidRequestError("INPUT_IDS cannot carry images", "images")
            ids = given[wire.INPUT_IDS].as_numpy().reshape(-1)
            return [pb_utils.Tensor(wire.INPUT_IDS, ids.astype("int64"))]
        pre_inputs = [t for t in (given[forms[0]], given[wire.IMAGES]) if t is not None]
        pre = _exec(
            wire.PREPROCESS_MODEL, pre_inputs, [wire.INPUT_IDS, wire.PIXEL_VALUES, wire.IMAGE_GRID_THW]
        )
        grid = pre[wire.IMAGE_GRID_THW]
        llm_inputs = [pre[wire.INPUT_IDS]]
        if grid.as_numpy().shape[0] > 0:
            enc = _exec(
                wire.VISION_ENCODER_MODEL,
                [
                    pb_utils.Tensor(wire.PIXEL_VALUES, pre[wire.PIXEL_VALUES].as_numpy()[None]),
                    pb_utils.Tensor(wire.IMAGE_GRID_THW, grid.as_numpy()[None]),
                ],
                [wire.IMAGE_EMBEDS],
            )
            llm_inputs += [pb_utils.Tensor(wire.IMAGE_EMBEDS, enc[wire.IMAGE_EMBEDS].as_numpy()[0]), grid]
        return llm_inputs

    def _forward(self, stream, watched):
        done = False  # the client got its final response (or left): only drain from here on
        for response in stream:
            if done:
                continue
            if watched.cancelled:  # the monitor saw the client leave and cancelled the engine side
                done = True
                continue
            if response.has_error():
                with watched.lock:
                    watched.closed = True
                self._fail(watched.sender, response.error().message())
                done = True
                continue
            outputs = response.output_tensors()
            if not outputs:
                continue  # llm's closing flag without data
            finish = (
                pb_utils.get_output_tensor_by_name(response, wire.FINISH_REASON).as_numpy().reshape(-1)[0]
            )
            final = bool(finish)
            try:
                watched.send(pb_utils.InferenceResponse(output_tensors=outputs), final=final)
            except Exception:  # the client is gone: stop the engine side, keep draining
                log.info("client of %s went away", watched.engine_id)
                watched.cancelled = True
                cancel_llm(watched.engine_id)
                final = True
            done = final
        if not watched.closed:
            # Also after a cancellation: the final flag is what releases the request in Triton.
            try:
                watched.send(final=True)
            except Exception:
                log.debug("could not close %s", watched.engine_id, exc_info=True)

    def finalize(self):
        if self.monitor:
            self.monitor.stop()
        self.pool.shutdown(wait=True, cancel_futures=True)
        GRAVEYARD.clear()


def _numpy(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()
