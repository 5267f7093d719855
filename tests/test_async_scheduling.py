"""Async scheduling: the next decode step is launched before the last one's tokens are read back (it
takes them on the device), and they are recorded while it runs. What a client receives must not
change: the same outputs, one by one, for every family, with sequences ended by a stop string, an
end-of-sequence token or their length while already in the next step, cancellations, preemption,
failures, and constrained requests (a grammar, whose mask needs each step's tokens on the host before
the next one is sampled). On a CPU the setting is forced on: the device is the host there, but every
step takes the same path as on a GPU. (A decode launch that raises while a step is in flight:
tests/test_async_output.py.)"""

from __future__ import annotations

import pytest
import torch
from family_harness import FAMILIES, cases_for, one_sequence_budget
from test_async_output import assert_same_streams, run, stop_after
from test_engine import Collector

import tritonvlm.engine.llm_engine as llm_engine
from tritonvlm.engine import EngineConfig, LLMEngine, SamplingParams, sampler
from tritonvlm.engine.cuda_graphs import take_previous
from tritonvlm.engine.device_sampling import sample_on_device
from tritonvlm.engine.engine_config import async_scheduling_wanted, engine_config
from tritonvlm.engine.sampler import row_probabilities


@pytest.fixture(scope="module", params=FAMILIES)
def kit(request, family_kit):
    return family_kit(request.param)


@pytest.fixture(scope="module")
def inputs(kit):
    return [kit.engine_inputs(case) for case in cases_for(kit.name)]


CONSTRAINT = {"type": "regex", "pattern": "[a-c]{4}"}


def engine_for(kit, scheduling: bool, **kw) -> LLMEngine:
    config = EngineConfig(
        max_model_len=512,
        async_output="true" if scheduling else "false",
        async_scheduling="true" if scheduling else "false",
        **kw,
    )
    return LLMEngine(kit.hf_model, kit.tokenizer, config, kit.family)


def spy_steps(engine: LLMEngine) -> list[str]:
    """Spy on the engine: "launch" for each decode step launched, "record" when its tokens are read."""
    events: list[str] = []
    decode, count = engine.runner.decode, engine._count_step

    def launch(seqs, *args):
        events.append("launch")
        return decode(seqs, *args)

    def record(batch, started):
        events.append("record")
        return count(batch, started)

    engine.runner.decode, engine._count_step = launch, record
    return events


def overlapped(events: list[str]) -> int:
    """Steps whose tokens were read after the next step had been launched."""
    launched = recorded = count = 0
    for event in events:
        if event == "launch":
            launched += 1
        else:
            count += launched - recorded >= 2
            recorded += 1
    return count


def run_on_the_device(kit, requests: list, monkeypatch) -> tuple[LLMEngine, Collector, list[str]]:
    """Run ``requests`` with async scheduling, the host's sampler raising if it is called (every
    token must be chosen on the device); the engine, its outputs and its steps (:func:`spy_steps`)."""

    def host_sample(*args):
        raise AssertionError("the host's sampler was called")

    engine = engine_for(kit, True)
    events = spy_steps(engine)
    monkeypatch.setattr(llm_engine, "sample", host_sample)
    return engine, run(engine, requests), events


def test_streams_are_the_same_with_async_scheduling(kit, inputs):
    """Greedy requests ended by a stop string, by an end-of-sequence token and by their length, in
    staggered arrivals, one cancelled mid-stream, one with logprobs, seeded sampled ones and penalised
    ones (all chosen on the device too; the penalised sampled one's prompt has an image, whose
    placeholder may lie past the logits), and a constrained one (a grammar: the step before is
    recorded before each step's sampling): every request gets the outputs it gets without, and most
    steps were launched before the one before was recorded."""
    plain = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = [(f"r{i}", ids, mm, plain) for i, (ids, mm) in enumerate(inputs)]
    reference = run(engine_for(kit, False), alone)
    ids, mm = inputs[0]
    image_ids, image_mm = inputs[1]
    requests = [
        ("constrained", ids, mm, SamplingParams(max_tokens=6, temperature=0.0, guided=CONSTRAINT)),
        ("penalised", ids, mm, SamplingParams(max_tokens=16, temperature=0.0, presence_penalty=0.5)),
        (
            "penalised_sampled",
            image_ids,
            image_mm,
            SamplingParams(
                max_tokens=16, temperature=0.9, repetition_penalty=1.3, frequency_penalty=0.4, seed=9
            ),
        ),
        ("logprobs", ids, mm, SamplingParams(max_tokens=16, temperature=0.0, logprobs=True, top_logprobs=2)),
        ("seeded", ids, mm, SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=3)),
        ("seeded_top_k", ids, mm, SamplingParams(max_tokens=16, temperature=1.2, top_k=7, seed=5)),
    ]
    for i, (ids_i, mm_i) in enumerate(inputs):
        k, stop = stop_after(kit, reference.tokens(f"r{i}"), first=12)
        params = SamplingParams(max_tokens=k + 2, temperature=0.0, ignore_eos=True, stop=[stop])
        requests.append((f"stop{i}", ids_i, mm_i, params))
    # An end-of-sequence token: the 12th token of r0 (made one of the model's stop ids below).
    eos_token = reference.tokens("r0")[11]
    requests += [
        ("eos", ids, mm, SamplingParams(max_tokens=24, temperature=0.0)),
        ("length", ids, mm, SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)),
        ("cancelled", ids, mm, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)),
        ("short", ids, mm, SamplingParams(max_tokens=1, temperature=0.0)),
    ]

    def engine_with_eos(scheduling: bool) -> LLMEngine:
        engine = engine_for(kit, scheduling)
        engine.stop_ids.add(eos_token)  # (the set the engine's outputs read)
        return engine

    expected = run(engine_with_eos(False), requests, cancel="cancelled")
    engine = engine_with_eos(True)
    events = spy_steps(engine)
    got = run(engine, requests, cancel="cancelled")
    assert_same_streams(got, expected)
    assert expected.outputs["eos"][-1].finish_reason == "stop"
    assert expected.outputs["length"][-1].finish_reason == "length"
    assert expected.outputs["cancelled"][-1].finish_reason == "cancelled"
    assert overlapped(events) >= 5, events
    assert engine._inflight is None and engine.scheduler.running == [] and engine.out.pending == []
    assert engine.stats.num_running == 0 and engine.stats.kv_tokens_used == 0
    engine.prefix_cache.clear()
    assert engine.runner.cache.allocator.free_blocks == engine.runner.cache.num_blocks


def test_a_step_is_launched_before_the_one_before_is_recorded(family_kit):
    """Without async scheduling each decode step is recorded before the next is launched; with it the
    next is launched first (the one in flight is recorded while it runs)."""
    kit = family_kit("qwen2_5_vl")
    ids, mm = kit.engine_inputs(cases_for(kit.name)[0])
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    orders = {}
    for scheduling in (False, True):
        engine = engine_for(kit, scheduling)
        events = spy_steps(engine)
        sink = Collector()
        engine.add_request("a", ids, params, sink, mm)
        while not sink.finished("a"):
            engine.step()
        engine.step()
        assert len(sink.tokens("a")) == 6 and engine._inflight is None
        orders[scheduling] = events
    assert orders[False] == ["launch", "record"] * 5
    # (the 6th launch is for a sequence its 5th step ended: its token there is dropped)
    assert orders[True] == ["launch"] + ["launch", "record"] * 5 + ["record"]


def test_constrained_rows_are_masked_and_sampled_on_the_device(family_kit, monkeypatch):
    """Constrained requests (greedy, seeded sampled, and one with logprobs) beside free ones: every
    step is launched before the one before is recorded (a constrained batch records it before its
    sampling, while the forward runs), every token is chosen on the device (the host's sampler is
    never called), each constrained output matches its grammar (which the model alone does not), and
    every request gets the outputs it gets without async scheduling."""
    import re

    kit = family_kit("qwen2_5_vl")
    ids, mm = kit.engine_inputs(cases_for(kit.name)[1])
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    free = run(engine_for(kit, False), [("free", ids, mm, greedy)])
    pattern = "[a-c]{4}( [a-c]{3})?"
    assert not re.fullmatch(pattern, free.text("free"))  # (the grammar is what makes the output match)
    guided = {"type": "regex", "pattern": pattern}
    requests = [
        ("free", ids, mm, greedy),
        ("constrained", ids, mm, SamplingParams(max_tokens=12, temperature=0.0, guided=guided)),
        ("sampled", ids, mm, SamplingParams(max_tokens=12, temperature=1.0, seed=4, guided=guided)),
        (
            "logprobs",
            ids,
            mm,
            SamplingParams(max_tokens=12, temperature=0.0, logprobs=True, top_logprobs=2, guided=guided),
        ),
        ("free_sampled", ids, mm, SamplingParams(max_tokens=12, temperature=1.0, seed=8, ignore_eos=True)),
    ]
    expected = run(engine_for(kit, False), requests)
    _, got, events = run_on_the_device(kit, requests, monkeypatch)
    assert_same_streams(got, expected)
    assert all(re.fullmatch(pattern, got.text(rid)) for rid in ("constrained", "sampled", "logprobs"))
    assert overlapped(events) == events.count("record") - 1, events


def test_a_constrained_row_is_not_sampled_before_its_last_token_is_recorded():
    guide = object()
    row = Row(SamplingParams(temperature=0.0))
    row.guide, row.inflight = guide, 1
    with pytest.raises(RuntimeError, match="last token is not recorded"):
        sample_on_device(torch.randn(1, 10), [row])
    row.closed = True  # (an ended sequence's row is dropped: not masked)
    assert sample_on_device(torch.randn(1, 10), [row]).result()[1] == {}


def test_sampled_rows_are_drawn_on_the_device_from_their_distribution(family_kit, monkeypatch):
    """Sampled rows (temperature, top-k, top-p) in a running batch: top-k 1 and a tiny top-p leave
    one token, the greedy one; the others draw tokens of their own distribution, max_tokens each.
    Every token, the first ones after each prefill included, is chosen on the device (the host's
    sampler is never called), and every step but the first is launched before the one before is
    recorded."""
    kit = family_kit("qwen2_5_vl")
    ids, mm = kit.engine_inputs(cases_for(kit.name)[1])
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    expected = run(engine_for(kit, False), [("g", ids, mm, greedy)]).tokens("g")
    requests = [
        ("top_k_1", ids, mm, SamplingParams(max_tokens=16, temperature=1.5, top_k=1, ignore_eos=True)),
        ("top_p_tiny", ids, mm, SamplingParams(max_tokens=16, temperature=1.5, top_p=1e-6, ignore_eos=True)),
        ("plain", ids, mm, SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)),
        ("top_k_5", ids, mm, SamplingParams(max_tokens=16, temperature=1.0, top_k=5, ignore_eos=True)),
    ]
    engine, got, events = run_on_the_device(kit, requests, monkeypatch)
    assert got.tokens("top_k_1") == expected and got.tokens("top_p_tiny") == expected
    assert all(len(got.tokens(rid)) == 16 for rid, *_ in requests)
    assert len(engine.stats.ttft_seconds) == len(requests)
    assert overlapped(events) == events.count("record") - 1, events


@pytest.mark.parametrize("kind", ["plain", "top_k", "sorted"])
def test_the_device_draw_follows_each_rows_distribution(kind):
    """Many draws of rows with different settings: each token's frequency is its probability under
    sampler.row_probabilities (within 4 standard errors). The shared generator is seeded here: it is
    otherwise seeded from entropy, and 18 comparisons at 4 standard errors fail now and then."""
    torch.manual_seed(0)
    sampler.shared_generator(torch.device("cpu")).manual_seed(0)
    vocab, draws = 6, 6000
    logits = torch.randn(3, vocab) * 1.5
    settings = {
        "plain": [SamplingParams(temperature=t) for t in (0.5, 1.0, 2.0)],
        "top_k": [
            SamplingParams(temperature=1.0, top_k=k, top_p=p) for k, p in ((2, 1.0), (4, 0.8), (3, 1.0))
        ],
        "sorted": [SamplingParams(temperature=t, top_p=p) for t, p in ((1.0, 0.5), (0.7, 0.9), (1.3, 0.75))],
    }[kind]
    params = [p for p in settings for _ in range(draws)]
    picked, ok = sampler.draw_shared(logits.repeat_interleave(draws, dim=0), params)
    assert bool(ok.all())
    for i, p in enumerate(settings):
        want = row_probabilities(logits[i], p)
        want = want / want.sum()  # (top-p leaves the kept mass as it is: a draw normalises it)
        freq = torch.bincount(picked[i * draws : (i + 1) * draws], minlength=vocab).float() / draws
        error = (want * (1 - want) / draws).sqrt() * 4 + 1e-9
        assert bool(((freq - want).abs() <= error).all()), (p, freq, want)
        assert bool((freq[want == 0] == 0).all())


class Row:
    """What device sampling reads of a sequence."""

    def __init__(self, params: SamplingParams, prompt: list[int] = (), output: list[int] = ()) -> None:
        self.params, self.request_id, self.inflight = params, "x", 0
        self.prompt_ids, self.output_ids = list(prompt), list(output)
        self.guide, self.closed = None, False
        self.generator = sampler.make_generator(params.seed, torch.device("cpu"))


def test_a_row_that_cannot_be_sampled_fails_alone():
    """NaN/inf logits of a greedy row and a sampled row, a seeded row's: each gets a failure reason
    with a stand-in token in the vocabulary; the other rows their own tokens."""
    logits = torch.randn(5, 10)
    logits[1] = float("nan")
    logits[3, 2] = float("inf")
    logits[4, 0] = float("nan")
    params = [SamplingParams(temperature=0.0)] * 2 + [SamplingParams()] * 2 + [SamplingParams(seed=1)]
    tokens, failures, logprobs = sample_on_device(logits, [Row(p) for p in params]).result()
    assert set(failures) == {1, 3, 4} and tokens[0] == int(logits[0].argmax()) and logprobs == {}
    assert all(0 <= t < 10 for t in tokens)
    assert all("NaN or inf" in failures[row] for row in (1, 3, 4))


def test_seeded_rows_and_logprobs_on_the_device_are_the_hosts():
    """Seeded rows drawn on the device take the token the host's sampler draws with the same
    generator (top-k, top-p, temperature; a batch of them, twice in a row); logprobs rows get
    token_logprobs' numbers."""
    from tritonvlm.engine.logprobs import token_logprobs

    torch.manual_seed(0)
    settings = [
        SamplingParams(temperature=0.9, seed=1),
        SamplingParams(temperature=1.3, top_k=5, seed=2),
        SamplingParams(temperature=0.7, top_p=0.8, seed=3),
        SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3),
        SamplingParams(temperature=1.0, top_p=0.9, seed=4, logprobs=True, top_logprobs=1),
    ]
    on_device, on_host = [Row(p) for p in settings], [Row(p) for p in settings]
    for _ in range(2):
        logits = torch.randn(len(settings), 50) * 3
        tokens, failures, logprobs = sample_on_device(logits, on_device).result()
        assert tokens == sampler.sample(logits, on_host) and failures == {}
        assert set(logprobs) == {3, 4}

        class Texts:
            def __call__(self, token_id):
                return str(token_id), [token_id]

        for row in (3, 4):
            top = settings[row].top_logprobs
            want = token_logprobs(logits[row], tokens[row], top, Texts())
            assert logprobs[row][0] == pytest.approx(want["logprob"], abs=1e-5)
            got = logprobs[row][1][:top]
            assert [t for _, t in got] == [int(e["token"]) for e in want["top_logprobs"]]


def test_penalised_rows_on_the_device_are_the_hosts():
    """Penalised rows (repetition over prompt and output, presence and frequency over the output;
    greedy, seeded and unseeded) drawn on the device, their last token still there: the token the
    host's sampler picks with every token recorded. Prompt ids past the logits' width (an image
    placeholder the model never writes) are not penalised, on either side."""
    torch.manual_seed(1)
    vocab = 40
    prompt, output, last = [3, 5, 5, 41, 7], [9, 3, 9], 11  # (41: past the width)
    settings = [
        SamplingParams(temperature=0.0, presence_penalty=1.5),
        SamplingParams(temperature=0.0, repetition_penalty=1.8, frequency_penalty=0.7),
        SamplingParams(temperature=0.9, repetition_penalty=1.3, seed=4),
        SamplingParams(temperature=1.1, top_k=6, frequency_penalty=-0.5, presence_penalty=0.3),
    ]
    on_device = [Row(p, prompt, output) for p in settings]
    on_host = [Row(p, prompt, [*output, last]) for p in settings]
    for row, host in zip(on_device, on_host, strict=True):
        row.inflight, row.inflight_row = 1, 2  # (its last token: row 2 of the step before)
        host.generator = sampler.make_generator(None, torch.device("cpu"))
        host.generator.set_state(row.generator.get_state())
    previous = torch.tensor([0, 1, last, 2])
    for _ in range(3):
        logits = torch.randn(len(settings), vocab) * 2
        logits[:, [3, 5, 9, 11]] += 3.0  # (the penalised tokens would often win)
        tokens, failures, _ = sample_on_device(logits, on_device, previous).result()
        assert failures == {} and tokens == sampler.sample(logits, on_host)


def test_take_previous_feeds_the_last_steps_tokens():
    previous = torch.tensor([40, 41, 42])
    tokens = torch.tensor([7, -1 - 2, -1 - 0, 9])
    assert take_previous(tokens, previous).tolist() == [7, 42, 40, 9]
    assert take_previous(tokens, None) is tokens


def test_preemption_under_async_scheduling(kit, inputs):
    """KV blocks run short while sequences decode: the steps that may preempt record the step in
    flight first; every request gets the tokens it gets alone."""
    params = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)
    requests = [(f"r{i}", *inputs[i % len(inputs)], params) for i in range(3)]
    expected = run(engine_for(kit, False), requests)
    budget = one_sequence_budget(kit.family, max_len=512, slots=8)
    engine = engine_for(kit, True, max_num_seqs=8, kv_cache_memory=str(budget), prefix_cache_slots=0)
    events = spy_steps(engine)
    got = run(engine, requests)
    assert engine.stats.preemptions >= 1
    assert all(got.tokens(rid) == expected.tokens(rid) for rid, *_ in requests)
    assert overlapped(events) >= 10
    assert engine.runner.cache.allocator.free_blocks == engine.runner.cache.num_blocks


def test_a_poisoned_row_fails_alone_under_async_scheduling(family_kit):
    kit = family_kit("qwen2_5_vl")
    ids, mm = kit.engine_inputs(cases_for(kit.name)[0])
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected = run(engine_for(kit, False), [("ok", ids, mm, params)]).tokens("ok")
    engine = engine_for(kit, True)
    sampler.set_fault_pattern("poisoned")
    try:
        got = run(engine, [("ok", ids, mm, params), ("poisoned", ids, mm, params), ("ok2", ids, mm, params)])
    finally:
        sampler.set_fault_pattern(None)
    last = got.outputs["poisoned"][-1]
    assert last.finish_reason == "error" and "NaN or inf" in last.error
    assert len(got.tokens("poisoned")) == sampler.FAULT_AFTER_TOKENS
    assert got.tokens("ok") == expected and got.tokens("ok2") == expected


def test_async_scheduling_setting(family_kit):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")

    def wanted(scheduling: str, output: str, device: torch.device) -> bool:
        return async_scheduling_wanted(EngineConfig(async_output=output, async_scheduling=scheduling), device)

    assert wanted("auto", "auto", cuda) and not wanted("auto", "auto", cpu)
    assert not wanted("auto", "false", cuda) and not wanted("false", "auto", cuda)
    assert wanted("true", "auto", cpu) and wanted("true", "true", cpu)
    with pytest.raises(ValueError, match="needs async output"):
        wanted("true", "false", cuda)
    with pytest.raises(ValueError, match="async_scheduling='yes'"):
        wanted("yes", "auto", cuda)
    assert engine_config({}, "cuda").async_scheduling == "auto"
    assert engine_config({"async_scheduling": " False "}, "cuda").async_scheduling == "false"
    kit = family_kit("qwen2_5_vl")
    forced = LLMEngine(
        kit.hf_model, kit.tokenizer, EngineConfig(max_model_len=512, async_scheduling="true"), kit.family
    )
    assert forced.async_scheduling and forced.async_output  # (async scheduling turns async output on)
    default = LLMEngine(kit.hf_model, kit.tokenizer, EngineConfig(max_model_len=512), kit.family)
    assert not default.async_scheduling  # auto, on a CPU


def test_serve_hands_the_async_scheduling_setting_to_the_triton_models():
    from tritonvlm import cli

    args = cli.build_parser().parse_args(["serve", "--async-scheduling", "false"])
    assert cli.triton_env(args, "some/model")["TRITONVLM_ASYNC_SCHEDULING"] == "false"
