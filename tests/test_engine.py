"""The engine against transformers itself, for every model family: same model, same inputs, greedy →
identical tokens."""

from __future__ import annotations

import threading

import pytest
import torch
from family_harness import FAMILIES, cases_for, one_sequence_budget

from tritonvlm.engine import EngineConfig, EngineOutput, LLMEngine, SamplingParams

MAX_NEW = 12


@pytest.fixture(scope="module", params=FAMILIES)
def kit(request, family_kit):
    return family_kit(request.param)


@pytest.fixture(scope="module")
def prepared(kit):
    """Per case: ``(name, prompt ids, multimodal tensors, the tokens generate() gives it alone)``."""
    out = []
    for case in cases_for(kit.name):
        ids, mm = kit.engine_inputs(case)
        ref = kit.reference_tokens(case, MAX_NEW)
        assert ids == kit.reference_inputs(case)["input_ids"][0].tolist(), f"{case.name}: prompt ids differ"
        out.append((case.name, ids, mm, ref))
    return out


class Collector:
    def __init__(self) -> None:
        self.outputs: dict[str, list[EngineOutput]] = {}
        self.done = threading.Event()

    def __call__(self, out: EngineOutput) -> None:
        self.outputs.setdefault(out.request_id, []).append(out)

    def tokens(self, rid: str) -> list[int]:
        return [t for o in self.outputs[rid] for t in o.token_ids]

    def text(self, rid: str) -> str:
        return "".join(o.text for o in self.outputs[rid])

    def finished(self, rid: str) -> bool:
        return bool(self.outputs.get(rid)) and self.outputs[rid][-1].finished


def make_engine(kit, **kw) -> LLMEngine:
    return LLMEngine(kit.hf_model, kit.tokenizer, EngineConfig(max_model_len=1024, **kw), kit.family)


def greedy() -> SamplingParams:
    return SamplingParams(max_tokens=MAX_NEW, temperature=0.0)


def test_each_request_alone_matches_generate(kit, prepared):
    engine = make_engine(kit)
    sink = Collector()
    for name, ids, mm, ref in prepared:
        engine.add_request(name, ids, greedy(), sink, mm)
        while not sink.finished(name):
            engine.step()
        assert sink.tokens(name) == ref, name


def test_staggered_arrivals_join_running_batch_token_exact(kit, prepared):
    """Requests join a batch that is mid-decode; every request still gets generate()'s tokens."""
    engine = make_engine(kit, max_num_seqs=8)
    sink = Collector()
    batch_sizes = []
    pending = [(f"{name}#{k}", case) for k in range(2) for name, *case in prepared]
    added: list[str] = []
    steps = 0
    while pending or not all(sink.finished(rid) for rid in added):
        if pending and steps % 2 == 0:  # a new request every other step
            rid, (ids, mm, _) = pending.pop(0)
            engine.add_request(rid, ids, greedy(), sink, mm)
            added.append(rid)
        engine.step()
        batch_sizes.append(len(engine.scheduler.running))
        steps += 1
        assert steps < 500
    assert max(batch_sizes) >= 3, "requests should have shared decode steps"
    for name, _, _, ref in prepared:
        for k in range(2):
            assert sink.tokens(f"{name}#{k}") == ref, name
    assert engine.scheduler.running == [] and engine.stats.requests_finished == 2 * len(prepared)


def test_streamed_text_equals_decode_of_tokens(kit, prepared):
    engine = make_engine(kit)
    sink = Collector()
    name, ids, mm, _ = prepared[0]
    engine.add_request("r", ids, SamplingParams(max_tokens=40, temperature=0.0), sink, mm)
    while not sink.finished("r"):
        engine.step()
    assert sink.text("r") == kit.tokenizer.decode(sink.tokens("r"), skip_special_tokens=True)
    last = sink.outputs["r"][-1]
    assert last.prompt_tokens == len(ids) and last.completion_tokens == len(sink.tokens("r"))


def test_seeded_sampling_reproducible_whatever_the_batch(kit, prepared):
    def run(extra: int) -> list[int]:
        engine = make_engine(kit)
        sink = Collector()
        _, ids, mm, _ = prepared[1]
        params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
        engine.add_request("seeded", ids, params, sink, mm)
        for k in range(extra):
            other = SamplingParams(max_tokens=10, temperature=1.0, seed=k)
            engine.add_request(f"other{k}", prepared[0][1], other, sink)
        while not sink.finished("seeded"):
            engine.step()
        return sink.tokens("seeded")

    assert run(0) == run(3)


def test_cancel_frees_the_slot_and_others_continue(kit, prepared):
    engine = make_engine(kit)
    sink = Collector()
    _, ids, mm, ref = prepared[1]
    engine.add_request("keep", ids, greedy(), sink, mm)
    engine.add_request("drop", prepared[0][1], SamplingParams(max_tokens=100, temperature=0.0), sink)
    engine.step()
    engine.step()
    assert len(engine.scheduler.running) == 2
    engine.cancel("drop")
    engine.step()
    assert [s.request_id for s in engine.scheduler.running] == ["keep"]
    assert sink.outputs["drop"][-1].finish_reason == "cancelled"
    while not sink.finished("keep"):
        engine.step()
    assert sink.tokens("keep") == ref


def test_too_long_request_is_refused(kit, prepared):
    from tritonvlm.wire import InvalidRequestError

    engine = make_engine(kit)
    with pytest.raises(InvalidRequestError, match="maximum context length") as info:
        engine.add_request("x", prepared[0][1], SamplingParams(max_tokens=5000), Collector())
    assert info.value.param == "max_tokens"


def test_memory_budget_sizes_the_blocks(kit):
    from tritonvlm.engine.engine_config import kv_layout, kv_slots, parse_memory, sequence_bytes

    assert parse_memory("", 1000) is None
    assert parse_memory("0.5", 1000) == 500
    assert parse_memory("4GiB", 0) == 4 * 2**30 and parse_memory("512MB", 0) == 512 * 10**6
    per_seq = sequence_bytes(kit.family, 512, torch.float32)
    budget = per_seq * 3 + 1
    config = EngineConfig(max_num_seqs=16, max_model_len=512, kv_cache_memory=str(budget))
    slots, blocks = kv_layout(kit.hf_model, kit.family, config)
    engine = LLMEngine(kit.hf_model, kit.tokenizer, config, kit.family)
    cache = engine.runner.cache
    assert cache.max_slots == slots == engine.scheduler.max_num_seqs and cache.num_blocks == blocks
    assert cache.nbytes <= budget
    if any(not kind.is_full for kind in kit.family.layer_kinds()):
        # Each slot's window / cross rows are fixed: the slots come first, the blocks get the rest
        # (at least a max-length sequence's worth).
        assert 3 <= slots <= 16 and 512 <= blocks * cache.block_size < 3 * 512
    else:  # blocks only: as many sequences as hold what they write
        assert slots == 16 and blocks == 3 * 512 // cache.block_size - 1  # (one: the scratch block)
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        kv_slots(kit.hf_model, kit.family, EngineConfig(max_model_len=512, kv_cache_memory="100"))


def one_sequence_engine(kit, max_len: int = 512, **kw) -> LLMEngine:
    """An engine whose KV blocks hold one sequence of ``max_len`` tokens (8 slots)."""
    budget = one_sequence_budget(kit.family, max_len=max_len, slots=8)
    config = EngineConfig(max_num_seqs=8, max_model_len=max_len, kv_cache_memory=str(budget), **kw)
    engine = LLMEngine(kit.hf_model, kit.tokenizer, config, kit.family)
    assert engine.runner.cache.max_slots == 8 and engine.runner.cache.num_blocks * 16 == max_len
    return engine


def test_sequences_hold_blocks_by_use_and_wait_for_room(kit, prepared):
    """Blocks for one sequence of max_model_len: short requests run together holding what they wrote.
    A long one (which may need every block) is admitted once its prompt fits (running sequences can be
    preempted); every request gets generate()'s tokens and all blocks come back."""
    engine = one_sequence_engine(kit, prefix_cache_slots=0)
    cache = engine.runner.cache
    sink = Collector()
    name, ids, mm, ref = prepared[0]
    long_tokens = 512 - len(ids)
    for k in range(3):
        engine.add_request(f"short{k}", ids, greedy(), sink, mm)
    engine.add_request("long", ids, SamplingParams(max_tokens=long_tokens, temperature=0.0), sink, mm)
    engine.add_request("after", ids, greedy(), sink, mm)
    engine.step()
    expected = {"short0", "short1", "short2", "long", "after"}
    assert {s.request_id for s in engine.scheduler.running} == expected
    held = sum(len(cache.slot_blocks[s.slot]) for s in engine.scheduler.running)
    assert held == len(expected) * cache.blocks_for(len(ids) + 1)  # what they wrote, not max_model_len
    steps = 0
    while not all(sink.finished(r) for r in ("short0", "short1", "short2", "long", "after")):
        engine.step()
        steps += 1
        assert steps < 2000
    for rid in ("short0", "short1", "short2", "after"):
        assert sink.tokens(rid) == ref, rid
    assert sink.tokens("long")[: len(ref)] == ref
    assert cache.allocator.free_blocks == cache.num_blocks


def test_preempted_sequences_resume_token_exact(kit, prepared):
    """Four requests that together outgrow the blocks of one max-length sequence: running sequences
    are preempted and recomputed (images, several outputs, a seeded sampled one included) and each
    gets exactly what it gets with room for all: the same tokens, and the same logprobs (which a
    recompute at wrong positions changes even where the tiny model's argmax does not)."""
    new = 150
    requests = [(f"r{i}", *prepared[i % len(prepared)][1:3]) for i in range(3)]
    params = [
        SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, logprobs=True) for _ in requests
    ]
    requests.append(("seeded", *prepared[0][1:3]))
    params.append(SamplingParams(max_tokens=new, temperature=1.0, seed=7, ignore_eos=True, logprobs=True))

    def run_all(engine: LLMEngine) -> tuple[dict[str, list[int]], dict[str, torch.Tensor]]:
        sink = Collector()
        for (rid, ids, mm), p in zip(requests, params, strict=True):
            engine.add_request(rid, ids, p, sink, mm)
        steps = 0
        while not all(sink.finished(rid) for rid, *_ in requests):
            engine.step()
            steps += 1
            assert steps < 5000
        assert all(sink.outputs[rid][-1].error is None for rid, *_ in requests)
        logprobs = {
            rid: torch.tensor([e["logprob"] for o in sink.outputs[rid] for e in o.logprobs or []])
            for rid, *_ in requests
        }
        return {rid: sink.tokens(rid) for rid, *_ in requests}, logprobs

    roomy = make_engine(kit, max_num_seqs=8)
    expected, expected_logprobs = run_all(roomy)
    assert roomy.stats.preemptions == 0
    tight = one_sequence_engine(kit)
    got, got_logprobs = run_all(tight)
    assert tight.stats.preemptions >= 1
    assert got == expected
    for rid, logprobs in got_logprobs.items():
        assert logprobs.shape == (new,) and torch.allclose(logprobs, expected_logprobs[rid], atol=1e-4), rid
    for i in range(3):  # and greedy rows agree with generate() as far as it was asked
        ref = prepared[i % len(prepared)][3]
        assert got[f"r{i}"][: len(ref)] == ref
    tight.prefix_cache.clear()
    assert tight.runner.cache.allocator.free_blocks == tight.runner.cache.num_blocks


def test_requests_wait_for_a_free_slot_and_all_finish_correctly(kit, prepared):
    engine = make_engine(kit, max_num_seqs=2)
    sink = Collector()
    for k in range(5):
        name, ids, mm, _ = prepared[k % len(prepared)]
        engine.add_request(f"{k}", ids, greedy(), sink, mm)
    steps = 0
    while not all(sink.finished(f"{k}") for k in range(5)):
        engine.step()
        assert len(engine.scheduler.running) <= 2
        steps += 1
        assert steps < 500
    for k in range(5):
        assert sink.tokens(f"{k}") == prepared[k % len(prepared)][3]


def test_cancel_of_a_waiting_or_not_yet_arrived_request(kit, prepared):
    engine = make_engine(kit, max_num_seqs=1)
    sink = Collector()
    ids = prepared[0][1]
    engine.cancel("early")  # the cancel overtakes the request
    engine.add_request("early", ids, greedy(), sink)
    engine.add_request("running", ids, greedy(), sink)
    engine.add_request("waiting", ids, greedy(), sink)
    engine.step()
    assert sink.outputs["early"][-1].finish_reason == "cancelled"
    assert [s.request_id for s in engine.scheduler.running] == ["running"]
    engine.cancel("waiting")
    engine.step()
    assert sink.outputs["waiting"][-1].finish_reason == "cancelled"
    assert sink.outputs["waiting"][-1].completion_tokens == 0
    while not sink.finished("running"):
        engine.step()
    assert sink.tokens("running") == prepared[0][3]


def test_logprobs_of_greedy_tokens(kit, prepared):
    engine = make_engine(kit)
    sink = Collector()
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=True, top_logprobs=3)
    engine.add_request("lp", prepared[0][1], params, sink)
    while not sink.finished("lp"):
        engine.step()
    entries = [e for o in sink.outputs["lp"] for e in (o.logprobs or [])]
    assert len(entries) == len(sink.tokens("lp")) == 6
    for entry in entries:
        tops = entry["top_logprobs"]
        assert len(tops) == 3 and tops == sorted(tops, key=lambda t: -t["logprob"])
        # greedy: the chosen token is the most likely one
        assert entry["logprob"] == pytest.approx(tops[0]["logprob"]) and entry["logprob"] <= 0.0
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
    # the tokens' raw bytes, joined, decode to the generated text
    joined = b"".join(bytes(e["bytes"]) for e in entries)
    assert joined.decode("utf-8", "replace") == kit.tokenizer.decode(sink.tokens("lp"))


def test_bucketed_lengths_keep_tokens_exact(kit, prepared):
    """CUDA rounds attention lengths up to buckets (masked padding); the tokens must not change."""
    engine = make_engine(kit, max_num_seqs=8)
    engine.runner.length_bucket = 64
    sink = Collector()
    for k, (name, ids, mm, _) in enumerate(prepared):
        engine.add_request(name, ids, greedy(), sink, mm)
        engine.step()
        assert k == 0 or len(engine.scheduler.running) > 1
    while not all(sink.finished(name) for name, *_ in prepared):
        engine.step()
    for name, _, _, ref in prepared:
        assert sink.tokens(name) == ref, name


def test_a_row_that_fails_to_sample_ends_alone_with_an_error(kit, prepared):
    """The sampler's fault hook poisons one running row mid-stream: that request ends with an error,
    every other row of the same steps keeps generate()'s tokens."""
    from tritonvlm.engine import sampler

    engine = make_engine(kit)
    sink = Collector()
    sampler.set_fault_pattern("poisoned")
    try:
        for name, ids, mm, _ in prepared:
            engine.add_request(name, ids, greedy(), sink, mm)
        engine.add_request("poisoned", prepared[0][1], SamplingParams(max_tokens=40, temperature=0.0), sink)
        steps = 0
        while not all(sink.finished(name) for name, *_ in prepared) or not sink.finished("poisoned"):
            engine.step()
            steps += 1
            assert steps < 200
    finally:
        sampler.set_fault_pattern(None)
    last = sink.outputs["poisoned"][-1]
    assert last.finish_reason == "error" and "sampling failed" in last.error
    assert len(sink.tokens("poisoned")) == sampler.FAULT_AFTER_TOKENS
    for name, _, _, ref in prepared:
        assert sink.tokens(name) == ref, name
    assert engine.stats.requests_failed == 1 and engine.scheduler.running == []
