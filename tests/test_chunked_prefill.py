"""Chunked prefill: while other sequences decode, a long prompt is prefilled a chunk per step between
their decode steps, and every sequence still gets exactly the tokens transformers' generate() gives it
alone, for every model family."""

from __future__ import annotations

import pytest
from conftest import make_image
from family_harness import FAMILIES, Case, conversation
from test_engine import Collector

from tritonvlm.engine import EngineConfig, LLMEngine, SamplingParams

CHUNK = 16
RUNNER = Case("runner", conversation("Tell me a story about a cat.", 0))
LONG_TEXT = (
    "Here are two pictures from my holiday. Please look at both of them carefully, then describe the "
    "first image in one sentence, and then describe the second image in another sentence."
)


@pytest.fixture(scope="module", params=FAMILIES)
def kit(request, family_kit):
    return family_kit(request.param)


def long_case(kit) -> Case:
    """A prompt many chunks long, with images (where the family takes them) inside the chunks."""
    limit = kit.family.max_images_per_prompt
    n = 1 if limit == 1 else 2
    images = [make_image(56, 84, "blue", "square"), make_image(112, 56, "green")][:n]
    return Case("long", conversation(LONG_TEXT, n), images)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0)


def engine_for(kit, **config) -> LLMEngine:
    config.setdefault("max_model_len", 1024)
    return LLMEngine(
        kit.hf_model, kit.tokenizer, EngineConfig(prefill_chunk_tokens=CHUNK, **config), kit.family
    )


def add(engine: LLMEngine, sink: Collector, case: Case, kit, max_tokens: int, rid: str | None = None) -> None:
    ids, mm = kit.engine_inputs(case)
    engine.add_request(rid or case.name, ids, greedy(max_tokens), sink, mm)


def drain(engine: LLMEngine, sink: Collector, rids: list[str]) -> list[tuple[bool, int]]:
    """Step until ``rids`` finish; per step: was a prompt mid-chunks after it, and the decode batch."""
    trace = []
    while not all(sink.finished(r) for r in rids):
        engine.step()
        trace.append((engine.scheduler.prefilling is not None, len(engine.scheduler.running)))
        assert len(trace) < 500
    return trace


def test_long_prompt_is_chunked_between_decode_steps_and_token_exact(kit):
    engine = engine_for(kit, prefix_cache_slots=0)
    sink = Collector()
    long = long_case(kit)
    add(engine, sink, RUNNER, kit, 24)
    engine.step()  # the runner is decoding
    add(engine, sink, long, kit, 8)
    prompt_len = len(kit.engine_inputs(long)[0])
    assert prompt_len > 3 * CHUNK
    before = len(sink.tokens("runner"))
    trace = drain(engine, sink, ["runner", "long"])
    assert sink.tokens("runner") == kit.reference_tokens(RUNNER, 24)
    assert sink.tokens("long") == kit.reference_tokens(long, 8)
    chunk_steps = sum(mid for mid, _ in trace)
    if kit.family.supports_chunked_prefill:
        # One chunk per step while the runner decodes: it gets a token in each of those steps.
        assert chunk_steps >= prompt_len // CHUNK - 1
        assert len(sink.tokens("runner")) - before >= chunk_steps
        assert engine.stats.prefill_tokens == len(kit.engine_inputs(RUNNER)[0]) + prompt_len
    else:
        assert chunk_steps == 0


def test_running_sequences_leaving_mid_chunks_and_a_cached_start(kit):
    """Two runners, one finishing while the long prompt is half prefilled (its keys move down to the
    next running slot when it joins); then the same long prompt again, starting from the prefix cache
    and chunked from there."""
    engine = engine_for(kit)
    sink = Collector()
    long = long_case(kit)
    short_runner = Case("short runner", conversation("Write a poem about the sea.", 0))
    add(engine, sink, RUNNER, kit, 30)
    add(engine, sink, short_runner, kit, 3)
    engine.step()
    add(engine, sink, long, kit, 8)
    drain(engine, sink, ["runner", "short runner", "long"])
    reference = kit.reference_tokens(long, 8)
    assert sink.tokens("long") == reference
    assert sink.tokens("short runner") == kit.reference_tokens(short_runner, 3)
    assert sink.tokens("runner") == kit.reference_tokens(RUNNER, 30)

    add(engine, sink, RUNNER, kit, 30, rid="runner 2")
    engine.step()
    add(engine, sink, long, kit, 8, rid="long again")
    drain(engine, sink, ["runner 2", "long again"])
    assert sink.tokens("long again") == reference
    if kit.family.supports_prefix_cache:
        assert sink.outputs["long again"][-1].cached_tokens > 0


def test_a_prompt_cancelled_mid_chunks_frees_its_slot(kit):
    if not kit.family.supports_chunked_prefill:
        pytest.skip("this family prefills whole prompts")
    engine = engine_for(kit, prefix_cache_slots=0, max_num_seqs=2)
    sink = Collector()
    long = long_case(kit)
    add(engine, sink, RUNNER, kit, 24)
    engine.step()
    add(engine, sink, long, kit, 8)
    engine.step()
    assert engine.scheduler.prefilling is not None
    engine.cancel("long")
    engine.step()
    assert sink.finished("long") and sink.outputs["long"][-1].finish_reason == "cancelled"
    assert engine.scheduler.prefilling is None
    add(engine, sink, long, kit, 8, rid="long 2")
    drain(engine, sink, ["runner", "long 2"])
    assert sink.tokens("long 2") == kit.reference_tokens(long, 8)
    assert sink.tokens("runner") == kit.reference_tokens(RUNNER, 24)


def test_alone_a_long_prompt_is_prefilled_in_one_pass(kit):
    engine = engine_for(kit, prefix_cache_slots=0)
    sink = Collector()
    add(engine, sink, long_case(kit), kit, 4)
    engine.step()
    assert engine.scheduler.prefilling is None and engine.stats.prefill_steps == 1


def test_the_last_chunks_log_probabilities_equal_a_whole_prefills(kit):
    """Closer than tokens: the first token's log probabilities (its own and the top 20) after a prompt
    prefilled in chunks equal those after one whole prefill (float32, on the CPU: within 1e-4). The
    image comes last, in a later chunk, close enough to the end for the last token to see it through
    every layer (a sliding window of 16 in the tiny Gemma 3)."""
    if not kit.family.supports_chunked_prefill:
        pytest.skip("this family prefills whole prompts")
    parts = [{"type": "text", "text": LONG_TEXT}, {"type": "image"}]
    long = Case("long", [{"role": "user", "content": parts}], [make_image(56, 84, "blue", "square")])
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=20)

    def first_entry(chunked: bool) -> tuple[dict, int]:
        engine = engine_for(kit, prefix_cache_slots=0)
        sink = Collector()
        if chunked:  # (a prompt is chunked while others decode)
            add(engine, sink, RUNNER, kit, 24)
            engine.step()
        ids, mm = kit.engine_inputs(long)
        engine.add_request("long", ids, params, sink, mm)
        trace = drain(engine, sink, ["long"])
        return sink.outputs["long"][-1].logprobs[0], sum(mid for mid, _ in trace)

    whole, no_chunks = first_entry(chunked=False)
    chunked, chunks = first_entry(chunked=True)
    assert no_chunks == 0 and chunks >= 3
    assert chunked["token"] == whole["token"]
    got = [chunked["logprob"]] + [t["logprob"] for t in chunked["top_logprobs"]]
    want = [whole["logprob"]] + [t["logprob"] for t in whole["top_logprobs"]]
    assert [t["token"] for t in chunked["top_logprobs"]] == [t["token"] for t in whole["top_logprobs"]]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4
