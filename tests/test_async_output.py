"""Async output: a decode step's text is made and sent while the next step runs. What a client receives
must not change: the same outputs, one by one, for every family, with stop strings (which end a
sequence that is already in the next step), cancellations, preemption and errors in between."""

from __future__ import annotations

import pytest
import torch
from family_harness import FAMILIES, cases_for, one_sequence_budget
from test_engine import Collector

from tritonvlm.engine import EngineConfig, EngineOutput, LLMEngine, SamplingParams
from tritonvlm.engine.engine_config import async_output_wanted, engine_config


@pytest.fixture(scope="module", params=FAMILIES)
def kit(request, family_kit):
    return family_kit(request.param)


@pytest.fixture(scope="module")
def inputs(kit):
    return [kit.engine_inputs(case) for case in cases_for(kit.name)]


def engine_for(kit, async_output: bool, **kw) -> LLMEngine:
    """An engine with async output on or off, without async scheduling (tests/test_async_scheduling.py)."""
    kw.setdefault("async_scheduling", "false")
    config = EngineConfig(max_model_len=512, async_output="true" if async_output else "false", **kw)
    return LLMEngine(kit.hf_model, kit.tokenizer, config, kit.family)


def run(engine: LLMEngine, requests: list, cancel: str | None = None) -> Collector:
    """Add ``(id, ids, mm, params)`` requests one per step (staggered arrivals), cancel ``cancel``
    after its third output, step until every request has finished."""
    sink = Collector()
    queue = list(requests)
    steps = 0
    while queue or not all(sink.finished(rid) for rid, *_ in requests):
        if queue:
            rid, ids, mm, params = queue.pop(0)
            engine.add_request(rid, ids, params, sink, mm)
        if cancel and len(sink.outputs.get(cancel, [])) == 3:
            engine.cancel(cancel)
        engine.step()
        steps += 1
        assert steps < 1000
    return sink


def assert_same_streams(got: Collector, expected: Collector) -> None:
    """Output by output, equal (logprobs within float rounding: the batches differ by a row)."""
    assert got.outputs.keys() == expected.outputs.keys()
    for rid, outs in expected.outputs.items():
        assert len(got.outputs[rid]) == len(outs), rid
        for a, b in zip(got.outputs[rid], outs, strict=True):
            assert _without_logprobs(a) == _without_logprobs(b), rid
            if b.logprobs is not None:
                assert a.logprobs is not None
                assert [e["token"] for e in a.logprobs] == [e["token"] for e in b.logprobs]
                ours = torch.tensor([e["logprob"] for e in a.logprobs])
                theirs = torch.tensor([e["logprob"] for e in b.logprobs])
                assert torch.allclose(ours, theirs, atol=1e-4), rid


def _without_logprobs(out: EngineOutput) -> tuple:
    return (out.text, out.token_ids, out.finish_reason, out.completion_tokens, out.cached_tokens, out.error)


def stop_after(kit, tokens: list[int], first: int) -> tuple[int, str]:
    """``(k, stop)``: a stop string first met with ``tokens[k]`` (``k >= first``): the shortest end of
    the text of ``tokens[: k + 1]`` that is not in the text before it (where no character is cut)."""

    def text(n: int) -> str:
        return kit.tokenizer.decode(tokens[:n], skip_special_tokens=True)

    for k in range(first, len(tokens)):
        full, before = text(k + 1), text(k)
        if full != before and "\ufffd" not in full[len(before) - 8 :]:  # (no partial character)
            return k, next(full[-n:] for n in range(1, len(full) + 1) if full[-n:] not in before)
    raise AssertionError("no token adds whole characters to the text")


def requests_params(requests: list, rid: str) -> SamplingParams:
    return next(params for r, _, _, params in requests if r == rid)


def count_dropped_rows(engine: LLMEngine) -> list[int]:
    """Spy on the engine: how many rows of each decode step were dropped (ended by their text)."""
    dropped: list[int] = []
    commit = engine._commit

    def spy(seqs, tokens, logits, failures):
        dropped.append(sum(1 for seq in seqs if seq.closed))
        return commit(seqs, tokens, logits, failures)

    engine._commit = spy
    return dropped


def test_streams_are_the_same_with_async_output(kit, inputs):
    """Greedy requests (some ended by a stop string from their own text, mid-stream), one with
    logprobs, a sampled seeded one, one cancelled mid-stream: with async output every request gets
    the outputs it gets without, and rows a stop string ended were dropped from a step."""
    plain = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True) for _ in inputs]
    alone = [(f"r{i}", ids, mm, p) for i, ((ids, mm), p) in enumerate(zip(inputs, plain, strict=True))]
    reference = run(engine_for(kit, False), alone)
    requests = []
    for i, (ids, mm) in enumerate(inputs):
        # A stop string met with token k, after the arrivals; max_tokens one past the token the next
        # step gives it, which must be dropped (not end the sequence a second time).
        k, stop = stop_after(kit, reference.tokens(f"r{i}"), first=12)
        params = SamplingParams(max_tokens=k + 2, temperature=0.0, ignore_eos=True, stop=[stop])
        requests.append((f"stop{i}", ids, mm, params))
    ids, mm = inputs[0]
    requests += [
        ("logprobs", ids, mm, SamplingParams(max_tokens=10, temperature=0.0, logprobs=True, top_logprobs=2)),
        ("seeded", ids, mm, SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=3)),
        ("cancelled", ids, mm, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)),
        ("short", ids, mm, SamplingParams(max_tokens=1, temperature=0.0)),
    ]
    expected = run(engine_for(kit, False), requests, cancel="cancelled")
    engine = engine_for(kit, True)
    dropped = count_dropped_rows(engine)
    got = run(engine, requests, cancel="cancelled")
    assert_same_streams(got, expected)
    for rid in (rid for rid in expected.outputs if rid.startswith("stop")):
        last = expected.outputs[rid][-1]
        assert (
            last.finish_reason == "stop"
            and last.completion_tokens < requests_params(requests, rid).max_tokens
        )
    assert sum(dropped) >= 1  # (a stop string met in a step that prefills is handled before it)
    assert expected.outputs["cancelled"][-1].finish_reason == "cancelled"
    assert engine.scheduler.running == [] and engine.out.pending == [] and engine.out.stopped == []
    assert engine.stats.num_running == 0 and engine.stats.kv_tokens_used == 0  # (gauges at the end)
    assert engine.stats.requests_finished == len(requests) - 1


def test_a_finished_requests_last_output_does_not_wait_for_the_next_step(family_kit):
    """A request that ends by length (or end of sequence) while others run gets its last output in the
    step that ends it, as without async output."""
    kit = family_kit("qwen2_5_vl")
    ids, mm = kit.engine_inputs(cases_for(kit.name)[0])

    def steps_until_done(async_output: bool) -> int:
        engine = engine_for(kit, async_output, prefix_cache_slots=0)
        sink = Collector()
        engine.add_request("long", ids, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True), sink)
        engine.add_request("short", ids, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True), sink)
        steps = 0
        while not sink.finished("short"):
            engine.step()
            steps += 1
        assert not sink.finished("long") and len(sink.tokens("short")) == 5
        return steps

    assert steps_until_done(True) == steps_until_done(False)


def test_a_sequence_preempted_before_its_text_is_sent(kit, inputs):
    """A running sequence is preempted while its last token's text is still to be sent: the text goes
    out first; where it holds the stop string the sequence ends there and does not come back."""
    ids, mm = inputs[0]
    long = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    reference = run(engine_for(kit, False), [("ref", ids, mm, long)])
    tokens = reference.tokens("ref")
    k, stop = stop_after(kit, tokens, first=4)
    budget = one_sequence_budget(kit.family, max_len=512, slots=8)
    engine = engine_for(kit, True, max_num_seqs=8, kv_cache_memory=str(budget))
    sink = Collector()
    engine.add_request("keep", ids, long, sink, mm)
    engine.add_request("victim", ids, SamplingParams(max_tokens=30, temperature=0.0, stop=[stop]), sink, mm)
    engine.step()
    engine.step()  # (the second waits a step to share the first's prompt from the prefix cache)
    victim = next(s for s in engine.scheduler.running if s.request_id == "victim")
    while len(victim.output_ids) < k + 1:
        engine.step()
    assert [e.seq for e in engine.out.pending if e.seq is victim], "its last token should still be pending"
    assert not sink.finished("victim")
    engine._preempt(victim)  # (what kv.grow does when blocks run out)
    assert sink.finished("victim") and sink.outputs["victim"][-1].finish_reason == "stop"
    before_stop = kit.tokenizer.decode(tokens[: k + 1], skip_special_tokens=True)[: -len(stop)]
    assert sink.text("victim") == before_stop and victim not in engine.scheduler.waiting
    while not sink.finished("keep"):
        engine.step()
    assert sink.tokens("keep") == tokens
    assert sink.tokens("victim") == tokens[: k + 1]
    engine.prefix_cache.clear()
    assert engine.runner.cache.allocator.free_blocks == engine.runner.cache.num_blocks


def test_a_token_whose_text_fails_ends_its_sequence_alone(kit, inputs, monkeypatch):
    """Making the text of one row's token raises while the next step runs: that request ends with an
    error (its slot given back after the step), the others keep their tokens."""
    ids, mm = inputs[0]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = run(engine_for(kit, False), [("a", ids, mm, params), ("b", ids, mm, params)])
    engine = engine_for(kit, True)
    sink = Collector()
    engine.add_request("a", ids, params, sink, mm)
    engine.add_request("bad", ids, params, sink, mm)
    engine.add_request("b", ids, params, sink, mm)
    engine.step()
    engine.step()  # (the others wait a step to share the first's prompt from the prefix cache)
    bad = next(s for s in engine.scheduler.running if s.request_id == "bad")
    calls = {"n": 0}
    add_token = bad.detokenizer.add_token

    def failing(token: int) -> str:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("no text for this token")
        return add_token(token)

    monkeypatch.setattr(bad.detokenizer, "add_token", failing)
    while not (sink.finished("a") and sink.finished("b") and sink.finished("bad")):
        engine.step()
    last = sink.outputs["bad"][-1]
    assert last.finish_reason == "error" and "no text for this token" in last.error
    assert sink.tokens("a") == expected.tokens("a") and sink.tokens("b") == expected.tokens("b")
    assert engine.stats.requests_failed == 1 and engine.scheduler.running == []
    engine.prefix_cache.clear()
    assert engine.runner.cache.allocator.free_blocks == engine.runner.cache.num_blocks


def test_async_output_setting(family_kit):
    assert async_output_wanted("auto", torch.device("cuda")) is True
    assert async_output_wanted("auto", torch.device("cpu")) is False
    assert async_output_wanted("true", torch.device("cpu")) is True
    assert async_output_wanted("false", torch.device("cuda")) is False
    with pytest.raises(ValueError, match="async_output='yes'"):
        async_output_wanted("yes", torch.device("cpu"))
    assert engine_config({}, "cuda").async_output == "auto"
    assert engine_config({"async_output": " FALSE "}, "cuda").async_output == "false"
    kit = family_kit("qwen2_5_vl")
    assert engine_for(kit, True).async_output and not engine_for(kit, False).async_output
    default = LLMEngine(kit.hf_model, kit.tokenizer, EngineConfig(max_model_len=512), kit.family)
    assert default.async_output is False  # auto, on a CPU


def test_serve_hands_the_async_output_setting_to_the_triton_models():
    from tritonvlm import cli

    args = cli.build_parser().parse_args(["serve", "--async-output", "false"])
    assert cli.triton_env(args, "some/model")["TRITONVLM_ASYNC_OUTPUT"] == "false"
    defaults = cli.triton_env(cli.build_parser().parse_args(["serve"]), "some/model")
    assert "TRITONVLM_ASYNC_OUTPUT" not in defaults


@pytest.mark.parametrize("setting", ["off", "async output", "async scheduling"])
def test_a_failing_step_ends_the_running_requests_and_the_engine_goes_on(family_kit, setting):
    """A decode forward raises in the engine's own thread (with async scheduling: while the step
    before is in flight): the running requests get every token the steps before recorded, then an
    error; the next request is served as if nothing happened."""
    import threading

    kit = family_kit("qwen2_5_vl")
    ids, mm = kit.engine_inputs(cases_for(kit.name)[0])
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    expected = run(engine_for(kit, False), [("ref", ids, mm, params)]).tokens("ref")
    scheduling = "true" if setting == "async scheduling" else "false"
    engine = engine_for(kit, setting != "off", async_scheduling=scheduling)
    decode = engine.runner.decode
    calls = {"n": 0}
    decoded: dict[str, int] = {}  # successful decode steps of each request

    def failing(seqs, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("the device fell over")
        for seq in seqs:
            decoded[seq.request_id] = decoded.get(seq.request_id, 0) + 1
        return decode(seqs, *args)

    engine.runner.decode = failing
    sink = Collector()
    done = threading.Event()

    def collect(out: EngineOutput) -> None:
        sink(out)
        if out.finished and all(sink.finished(r) for r in ("a", "b")):
            done.set()

    engine.start()
    try:
        engine.add_request("a", ids, params, collect, mm)
        engine.add_request("b", ids, params, collect, mm)
        assert done.wait(60)
        for rid in ("a", "b"):
            last = sink.outputs[rid][-1]
            assert last.finish_reason == "error" and last.error == "internal error in the decoding engine"
            got = sink.tokens(rid)
            assert len(got) == 1 + decoded[rid] and got == expected[: len(got)]  # (1: the prefill's)
            assert last.completion_tokens == len(got)
        assert calls["n"] >= 5 and engine.stats.requests_failed == 2
        after = threading.Event()
        engine.add_request("after", ids, params, lambda out: (sink(out), out.finished and after.set()), mm)
        assert after.wait(60) and sink.tokens("after") == expected
    finally:
        engine.shutdown()


def test_host_overhead_script_runs(capsys):
    """scripts/bench_host_overhead.py (it reaches into the engine's steps and stands in for the
    device): its table, a row per setting, each step at least the simulated device's time."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_host_overhead.py"
    spec = importlib.util.spec_from_file_location("bench_host_overhead", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    try:
        assert script.main(["--batches", "8", "--steps", "20", "--device-ms", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| 8 |")]
    assert [row[1].strip() for row in rows] == ["off", "async output", "async scheduling"]
    assert all(float(row[3]) >= 1.6 and float(row[2]) > 0 for row in rows)  # (1.6: edge steps)
