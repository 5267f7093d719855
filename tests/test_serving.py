"""The plain-Python parts of the `vlm` model: admission through the stateless models, the response
streamer (order, coalescing when it falls behind, failures), the sender guard and the cancel monitor."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tritonvlm import wire
from tritonvlm.engine.sequence import EngineOutput
from tritonvlm.serving.admission import StageError, model_inputs
from tritonvlm.serving.senders import CancelMonitor, ResponseStreamer, TrackedSender, coalesce
from tritonvlm.wire import InvalidRequestError

FINAL = 1


def out(rid: str, text: str, tokens: list[int], finish: str | None = None, error: str | None = None):
    return EngineOutput(
        rid, text, tokens, finish, prompt_tokens=5, completion_tokens=len(tokens), error=error
    )


class FakeSender:
    def __init__(self, fail: bool = False, cancelled: bool = False) -> None:
        self.sent: list[tuple[object, int]] = []
        self.fail = fail
        self.cancelled = cancelled
        self.polls = 0

    def send(self, response=None, flags: int = 0) -> None:
        if self.fail:
            raise RuntimeError("client gone")
        self.sent.append((response, flags))

    def is_cancelled(self) -> bool:
        self.polls += 1
        return self.cancelled


# ---- admission -------------------------------------------------------------------------------------


def fake_models(mm: dict[str, np.ndarray], calls: list[str]):
    def call(name: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        calls.append(name)
        if name == wire.PREPROCESS_MODEL:
            return {wire.INPUT_IDS: np.array([1, 2, 3]), wire.MM_INPUTS: wire.pack_array(mm)}
        assert name == wire.VISION_ENCODER_MODEL
        assert inputs[wire.MM_INPUTS].dtype == np.uint8 and inputs[wire.MM_INPUTS].shape[0] == 1
        got = wire.unpack_tensors(inputs[wire.MM_INPUTS])
        embeds = {"image_embeds": got["pixel_values"] * 2}
        return {wire.MM_EMBEDS: wire.pack_array(embeds)[None]}

    return call


def test_messages_with_images_go_through_preprocess_and_the_encoder() -> None:
    calls: list[str] = []
    pixels = np.arange(6, dtype=np.float32).reshape(2, 3)
    given = {wire.MESSAGES: np.array([b"[]"], dtype=object), wire.IMAGES: np.array([b"png"], dtype=object)}
    ids, mm, _ = model_inputs(given, fake_models({"pixel_values": pixels}, calls))
    assert ids == [1, 2, 3] and calls == [wire.PREPROCESS_MODEL, wire.VISION_ENCODER_MODEL]
    np.testing.assert_array_equal(mm["image_embeds"], pixels * 2)


def test_text_only_skips_the_encoder_and_token_ids_skip_both() -> None:
    calls: list[str] = []
    ids, mm, _ = model_inputs({wire.PROMPT: np.array([b"hi"], dtype=object)}, fake_models({}, calls))
    assert (ids, mm, calls) == ([1, 2, 3], {}, [wire.PREPROCESS_MODEL])
    calls.clear()
    ids, mm, _ = model_inputs({wire.INPUT_IDS: np.array([7, 8])}, fake_models({}, calls))
    assert (ids, mm, calls) == ([7, 8], {}, [])


@pytest.mark.parametrize(
    "given",
    [
        {},
        {wire.PROMPT: np.array([b"a"], dtype=object), wire.MESSAGES: np.array([b"[]"], dtype=object)},
        {wire.INPUT_IDS: np.array([1]), wire.IMAGES: np.array([b"png"], dtype=object)},
    ],
)
def test_malformed_prompt_forms_are_client_errors(given) -> None:
    with pytest.raises(InvalidRequestError):
        model_inputs(given, fake_models({}, []))


def test_a_stage_error_carries_the_models_message() -> None:
    def call(name, inputs, outputs):
        raise StageError("[invalid_request] image 0 could not be decoded")

    with pytest.raises(StageError, match="could not be decoded"):
        model_inputs({wire.MESSAGES: np.array([b"[]"], dtype=object)}, call)


def test_packed_tensors_round_trip() -> None:
    tensors = {"a": np.ones((2, 3), dtype=np.float32), "b": np.array([[1, 2, 3]], dtype=np.int64)}
    back = wire.unpack_tensors(wire.pack_tensors(tensors))
    assert set(back) == {"a", "b"} and back["b"].dtype == np.int64
    np.testing.assert_array_equal(back["a"], tensors["a"])
    assert wire.pack_tensors({}) == b"" and wire.unpack_tensors(b"") == {}


# ---- senders ---------------------------------------------------------------------------------------


def test_coalesce_merges_each_sequences_outputs_in_order() -> None:
    a, b = TrackedSender(FakeSender(), "a", FINAL), TrackedSender(FakeSender(), "b", FINAL)
    entries = [
        (a, out("a", "He", [1])),
        (b, out("b", "x", [9])),
        (a, out("a", "llo", [2])),
        (a, out("a", "!", [3], finish="stop")),
    ]
    merged = coalesce(entries)
    assert [(t.engine_id, o.text, o.token_ids, o.finish_reason) for t, o in merged] == [
        ("a", "Hello!", [1, 2, 3], "stop"),
        ("b", "x", [9], None),
    ]
    assert merged[0][1].completion_tokens == 1  # the latest state (here the last output's count)


def test_coalesce_keeps_logprobs_aligned_and_never_merges_past_an_error() -> None:
    a = TrackedSender(FakeSender(), "a", FINAL)
    first, second = out("a", "x", [1]), out("a", "y", [2])
    first.logprobs, second.logprobs = [{"t": 1}], [{"t": 2}]
    (merged,) = coalesce([(a, first), (a, second)])
    assert merged[1].logprobs == [{"t": 1}, {"t": 2}]
    failed = out("a", "", [], finish="error", error="boom")
    assert len(coalesce([(a, failed), (a, out("a", "z", [3]))])) == 2


def test_streamer_delivers_in_order_and_reports_failures() -> None:
    delivered: list[tuple[str, str]] = []
    failed: list[str] = []
    gate = threading.Event()

    def deliver(tracked: TrackedSender, output: EngineOutput) -> None:
        gate.wait(5)  # hold the sender back so outputs queue up behind the first
        if tracked.engine_id == "bad":
            raise RuntimeError("gone")
        delivered.append((tracked.engine_id, output.text))

    streamer = ResponseStreamer(deliver, lambda t: failed.append(t.engine_id))
    good, bad = TrackedSender(FakeSender(), "good", FINAL), TrackedSender(FakeSender(), "bad", FINAL)
    for i in range(5):
        streamer.put(good, out("good", str(i), [i]))
    streamer.put(bad, out("bad", "x", [1]))
    time.sleep(0.1)
    gate.set()
    streamer.stop()
    assert "".join(text for _, text in delivered) == "01234"
    assert streamer.outputs == 6 and streamer.responses < 6  # the queued ones went out together
    assert failed == ["bad"]


def test_final_send_closes_the_sender_and_polls_stop() -> None:
    sender = FakeSender(cancelled=True)
    tracked = TrackedSender(sender, "r", FINAL)
    tracked.send("partial")
    tracked.send("last", final=True)
    tracked.send(final=True)  # a second final is ignored
    assert sender.sent == [("partial", 0), ("last", FINAL)]
    assert tracked.poll_cancelled() is False and sender.polls == 0


def test_cancel_monitor_reports_each_client_that_left_once() -> None:
    seen: list[str] = []
    monitor = CancelMonitor(3600, lambda t: seen.append(t.engine_id))
    try:
        gone, here = (
            TrackedSender(FakeSender(cancelled=True), "gone", FINAL),
            TrackedSender(FakeSender(), "here", FINAL),
        )
        monitor.watch(gone)
        monitor.watch(here)
        monitor.poll_once()
        monitor.poll_once()
        assert seen == ["gone"]
        monitor.forget("here")
        monitor.forget("gone")
        assert monitor.watched == 0
    finally:
        monitor.stop()


def test_cancel_monitor_stretches_its_interval_when_checks_are_slow() -> None:
    """Each check is an IPC round trip: when a round of them takes long, the monitor waits longer
    (at most a fifth of its time checking), never less than the configured interval."""
    monitor = CancelMonitor(0.02, lambda t: None)
    try:
        assert monitor.next_interval(0.001) == 0.02
        assert monitor.next_interval(0.05) == pytest.approx(0.2)

        class SlowSender(FakeSender):
            def is_cancelled(self) -> bool:
                time.sleep(0.01)
                return False

        for i in range(5):
            monitor.watch(TrackedSender(SlowSender(), f"r{i}", FINAL))
        deadline = time.monotonic() + 5
        while monitor.interval < 0.15 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert monitor.interval >= 0.15  # five 10 ms checks a round: ~200 ms between rounds
    finally:
        monitor.stop()
