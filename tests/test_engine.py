"""The engine against transformers itself: same model, same inputs, greedy → identical tokens."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import make_image

from tritonvlm.engine import EngineConfig, EngineOutput, LLMEngine, SamplingParams
from tritonvlm.modeling.vision import encode_images
from tritonvlm.preprocessing import ChatPreprocessor

MAX_NEW = 12


def conversation(text: str, num_images: int) -> list[dict]:
    parts = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


CASES = [
    ("text only", conversation("Tell me a story about a cat.", 0), []),
    ("one image", conversation("What is in this image?", 1), [make_image(64, 48, "red")]),
    (
        "two images",
        conversation("Describe the first image, then the second.", 2),
        [make_image(56, 84, "blue", "square"), make_image(112, 56, "green")],
    ),
    ("short", [{"role": "user", "content": "Hi"}], []),
]


@pytest.fixture(scope="module")
def prepared(hf_model, processor):
    """Per case: engine inputs and the tokens generate() gives that request alone."""
    pre = ChatPreprocessor(processor)
    out = []
    for name, messages, images in CASES:
        inputs = pre(messages, images)
        ids = torch.from_numpy(inputs.input_ids)[None]
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        embeds = grid = None
        if images:
            pixel_values = torch.from_numpy(inputs.pixel_values)
            grid = torch.from_numpy(inputs.image_grid_thw)
            kwargs.update(pixel_values=pixel_values, image_grid_thw=grid)
            kwargs["mm_token_type_ids"] = (ids == hf_model.config.image_token_id).int()
            embeds = encode_images(hf_model.model.visual, pixel_values, grid)
        with torch.inference_mode():
            ref = hf_model.generate(**kwargs, max_new_tokens=MAX_NEW, do_sample=False)
        out.append((name, inputs.input_ids.tolist(), embeds, grid, ref[0, ids.shape[1] :].tolist()))
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


def make_engine(hf_model, processor, **kw) -> LLMEngine:
    return LLMEngine(hf_model, processor.tokenizer, EngineConfig(max_model_len=1024, **kw))


def greedy() -> SamplingParams:
    return SamplingParams(max_tokens=MAX_NEW, temperature=0.0)


def test_each_request_alone_matches_generate(hf_model, processor, prepared):
    engine = make_engine(hf_model, processor)
    sink = Collector()
    for name, ids, embeds, grid, ref in prepared:
        engine.add_request(name, ids, greedy(), sink, embeds, grid)
        while not sink.finished(name):
            engine.step()
        assert sink.tokens(name) == ref, name


def test_staggered_arrivals_join_running_batch_token_exact(hf_model, processor, prepared):
    """Requests join a batch that is mid-decode; every request still gets generate()'s tokens."""
    engine = make_engine(hf_model, processor, max_num_seqs=8)
    sink = Collector()
    batch_sizes = []
    pending = [(f"{name}#{k}", case) for k in range(2) for name, *case in prepared]
    added: list[str] = []
    steps = 0
    while pending or not all(sink.finished(rid) for rid in added):
        if pending and steps % 2 == 0:  # a new request every other step
            rid, (ids, embeds, grid, _) = pending.pop(0)
            engine.add_request(rid, ids, greedy(), sink, embeds, grid)
            added.append(rid)
        engine.step()
        batch_sizes.append(len(engine.scheduler.running))
        steps += 1
        assert steps < 500
    assert max(batch_sizes) >= 3, "requests should have shared decode steps"
    for name, _, _, _, ref in prepared:
        for k in range(2):
            assert sink.tokens(f"{name}#{k}") == ref, name
    assert engine.scheduler.running == [] and engine.stats.requests_finished == 2 * len(prepared)


def test_streamed_text_equals_decode_of_tokens(hf_model, processor, prepared):
    engine = make_engine(hf_model, processor)
    sink = Collector()
    name, ids, embeds, grid, _ = prepared[0]
    engine.add_request("r", ids, SamplingParams(max_tokens=40, temperature=0.0), sink, embeds, grid)
    while not sink.finished("r"):
        engine.step()
    assert sink.text("r") == processor.tokenizer.decode(sink.tokens("r"), skip_special_tokens=True)
    last = sink.outputs["r"][-1]
    assert last.prompt_tokens == len(ids) and last.completion_tokens == len(sink.tokens("r"))


def test_seeded_sampling_reproducible_whatever_the_batch(hf_model, processor, prepared):
    def run(extra: int) -> list[int]:
        engine = make_engine(hf_model, processor)
        sink = Collector()
        _, ids, embeds, grid, _ = prepared[1]
        params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
        engine.add_request("seeded", ids, params, sink, embeds, grid)
        for k in range(extra):
            other = SamplingParams(max_tokens=10, temperature=1.0, seed=k)
            engine.add_request(f"other{k}", prepared[0][1], other, sink)
        while not sink.finished("seeded"):
            engine.step()
        return sink.tokens("seeded")

    assert run(0) == run(3)


def test_cancel_frees_the_slot_and_others_continue(hf_model, processor, prepared):
    engine = make_engine(hf_model, processor)
    sink = Collector()
    _, ids, embeds, grid, ref = prepared[1]
    engine.add_request("keep", ids, greedy(), sink, embeds, grid)
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


def test_too_long_request_is_refused(hf_model, processor, prepared):
    from tritonvlm.wire import InvalidRequestError

    engine = make_engine(hf_model, processor)
    with pytest.raises(InvalidRequestError, match="maximum context length") as info:
        engine.add_request("x", prepared[0][1], SamplingParams(max_tokens=5000), Collector())
    assert info.value.param == "max_tokens"


def test_memory_budget_caps_the_slots(hf_model, processor):
    from tritonvlm.engine.kv_cache import SlotKVCache
    from tritonvlm.engine.llm_engine import kv_slots, parse_memory

    assert parse_memory("", 1000) is None
    assert parse_memory("0.5", 1000) == 500
    assert parse_memory("4GiB", 0) == 4 * 2**30 and parse_memory("512MB", 0) == 512 * 10**6
    text = hf_model.config.get_text_config()
    heads = text.num_attention_heads
    per_token = SlotKVCache.bytes_per_token(
        text.num_hidden_layers, text.num_key_value_heads, text.hidden_size // heads, torch.float32
    )
    config = EngineConfig(max_num_seqs=16, max_model_len=512, kv_cache_memory=str(per_token * 512 * 3 + 1))
    assert kv_slots(hf_model, config) == 3
    engine = LLMEngine(hf_model, processor.tokenizer, config)
    assert engine.runner.cache.max_slots == 3 and engine.scheduler.max_num_seqs == 3
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        kv_slots(hf_model, EngineConfig(max_model_len=512, kv_cache_memory="100"))


def test_requests_wait_for_a_free_slot_and_all_finish_correctly(hf_model, processor, prepared):
    engine = make_engine(hf_model, processor, max_num_seqs=2)
    sink = Collector()
    for k in range(5):
        name, ids, embeds, grid, _ = prepared[k % len(prepared)]
        engine.add_request(f"{k}", ids, greedy(), sink, embeds, grid)
    steps = 0
    while not all(sink.finished(f"{k}") for k in range(5)):
        engine.step()
        assert len(engine.scheduler.running) <= 2
        steps += 1
        assert steps < 500
    for k in range(5):
        assert sink.tokens(f"{k}") == prepared[k % len(prepared)][4]


def test_cancel_of_a_waiting_or_not_yet_arrived_request(hf_model, processor, prepared):
    engine = make_engine(hf_model, processor, max_num_seqs=1)
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
    assert sink.tokens("running") == prepared[0][4]


def test_logprobs_of_greedy_tokens(hf_model, processor, prepared):
    engine = make_engine(hf_model, processor)
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
    assert joined.decode("utf-8", "replace") == processor.tokenizer.decode(sink.tokens("lp"))


def test_bucketed_lengths_keep_tokens_exact(hf_model, processor, prepared):
    """CUDA rounds attention lengths up to buckets (masked padding); the tokens must not change."""
    engine = make_engine(hf_model, processor, max_num_seqs=8)
    engine.runner.length_bucket = 64
    sink = Collector()
    for k, (name, ids, embeds, grid, _) in enumerate(prepared):
        engine.add_request(name, ids, greedy(), sink, embeds, grid)
        engine.step()
        assert k == 0 or len(engine.scheduler.running) > 1
    while not all(sink.finished(name) for name, *_ in prepared):
        engine.step()
    for name, _, _, _, ref in prepared:
        assert sink.tokens(name) == ref, name
