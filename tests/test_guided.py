"""Constrained decoding in the engine (llguidance): the grammar decides what random weights may say.

The tiny test model has random weights, so whatever valid structure comes out was put there by the
grammar; free sequences sharing the batch must still get exactly generate()'s tokens.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from tritonvlm.engine import EngineConfig, EngineOutput, LLMEngine, SamplingParams
from tritonvlm.engine.grammar import check_constraint, grammar_for
from tritonvlm.engine.guided import GuidedDecoding
from tritonvlm.families.qwen2_5_vl import Qwen2_5_VLFamily
from tritonvlm.preprocessing import ChatPreprocessor
from tritonvlm.tool_format import QWEN_TOOL_CALLS
from tritonvlm.wire import InvalidRequestError

# Nested objects, arrays, enums, required fields, numbers; bounded so random weights finish it.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "integer", "minimum": 0, "maximum": 99999},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "score", "colour", "tags", "address"],
    "additionalProperties": False,
}
SHAPES = {
    "type": "object",
    "properties": {
        "shape": {"type": "string", "enum": ["circle", "square", "triangle", "star"]},
        "colour": {"type": "string", "enum": ["red", "green", "blue", "yellow", "purple", "orange"]},
    },
    "required": ["shape", "colour"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"type": "string", "enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}


# ---- constraints without a tokenizer (what the frontend checks) ------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "json_schema", "schema": {"type": "frobnicate"}},
        {"type": "json_schema", "schema": {"type": "array", "uniqueItems": True}},  # not implemented
        {"type": "json_schema", "schema": {"not": {"type": "string"}}},
        {"type": "json_schema", "schema": {"$ref": "#/$defs/missing"}},
        {"type": "json_schema", "schema": {"type": "integer", "minimum": 5, "maximum": 1}},
        {"type": "json_schema"},
        {"type": "regex", "pattern": "(unclosed"},
        {"type": "lark", "grammar": "start: undefined_rule"},
        {"type": "tool_calls", "calls": []},
        {"type": "yaml"},
        "json",
    ],
)
def test_bad_constraints_are_refused_naming_the_field(spec) -> None:
    with pytest.raises(InvalidRequestError) as info:
        check_constraint(spec, "response_format.json_schema.schema")
    assert info.value.param == "response_format.json_schema.schema"


def test_sampling_params_check_the_constraint() -> None:
    assert SamplingParams.from_dict({"guided": {"type": "json_object"}}).guided == {"type": "json_object"}
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams.from_dict({"guided": {"type": "json_schema", "schema": {"type": "frobnicate"}}})
    assert info.value.param == "guided"


def test_tool_call_tags_may_be_the_added_token_or_spelled_out() -> None:
    lark = grammar_for(
        QWEN_TOOL_CALLS.constraint([("f", None)], parallel=False), ["<tool_call>", "</tool_call>"]
    )
    assert '(<tool_call> | \\"<tool_call>\\")' in lark or '(<tool_call> | "<tool_call>")' in lark


# ---- the engine ------------------------------------------------------------------------------------


class Collector:
    def __init__(self) -> None:
        self.outputs: dict[str, list[EngineOutput]] = {}

    def __call__(self, out: EngineOutput) -> None:
        self.outputs.setdefault(out.request_id, []).append(out)

    def text(self, rid: str) -> str:
        return "".join(o.text for o in self.outputs[rid])

    def tokens(self, rid: str) -> list[int]:
        return [t for o in self.outputs[rid] for t in o.token_ids]

    def finish(self, rid: str) -> str | None:
        return self.outputs[rid][-1].finish_reason


@pytest.fixture(scope="module")
def engine(hf_model, processor) -> LLMEngine:
    config = EngineConfig(max_model_len=512, max_num_seqs=32)
    return LLMEngine(hf_model, processor.tokenizer, config, Qwen2_5_VLFamily(hf_model.config))


@pytest.fixture(scope="module")
def prompt(hf_model, processor) -> list[int]:
    messages = [{"role": "user", "content": "Describe the weather as JSON."}]
    return ChatPreprocessor(Qwen2_5_VLFamily(hf_model.config), processor)(messages, []).input_ids.tolist()


def run(engine: LLMEngine, requests: list[tuple[str, list[int], SamplingParams]]) -> Collector:
    sink = Collector()
    for rid, ids, params in requests:
        engine.add_request(rid, ids, params, sink)
    steps = 0
    while engine.scheduler.has_work() or not engine._incoming.empty():
        engine.step()
        steps += 1
        assert steps < 1000
    return sink


def test_mixed_batch_free_rows_token_exact_and_constrained_rows_valid(engine, hf_model, prompt) -> None:
    """Constrained and free sequences share every step; the free ones still match generate()."""
    free_prompts = [prompt, prompt[:-3] + prompt[-2:]]
    refs = []
    for ids in free_prompts:
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = hf_model.generate(
                input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False
            )
        refs.append(out[0, x.shape[1] :].tolist())
    schema = {"type": "json_schema", "schema": SCHEMA}
    requests = [
        (f"free{i}", ids, SamplingParams(max_tokens=24, temperature=0.0))
        for i, ids in enumerate(free_prompts)
    ]
    requests += [
        (f"json{s}", prompt, SamplingParams(max_tokens=200, temperature=1.0, seed=s, guided=schema))
        for s in range(6)
    ]
    # greedy and constrained too (a schema whose every value is an enum: greedy random weights would
    # repeat one digit forever in a free number)
    shapes = {"type": "json_schema", "schema": SHAPES}
    requests.insert(1, ("greedy-json", prompt, SamplingParams(max_tokens=40, temperature=0.0, guided=shapes)))
    sink = run(engine, requests)
    for i, ref in enumerate(refs):
        assert sink.tokens(f"free{i}") == ref
    for rid in [f"json{s}" for s in range(6)]:
        assert sink.finish(rid) == "stop", sink.text(rid)
        jsonschema.validate(json.loads(sink.text(rid)), SCHEMA)
    assert sink.finish("greedy-json") == "stop"
    jsonschema.validate(json.loads(sink.text("greedy-json")), SHAPES)


def test_required_tool_calls_parse_and_validate(engine, prompt) -> None:
    # Bounded arguments: with free-form ones ("noop", None) a random model may write a string that never
    # closes within max_tokens, and the call would end with "length".
    noop = {"type": "object", "properties": {"verbose": {"type": "boolean"}}, "additionalProperties": False}
    spec = QWEN_TOOL_CALLS.constraint([("get_weather", WEATHER), ("noop", noop)], parallel=False)
    sink = run(
        engine,
        [
            (f"t{s}", prompt, SamplingParams(max_tokens=80, temperature=1.0, seed=s, guided=spec))
            for s in range(6)
        ],
    )
    for s in range(6):
        parsed = QWEN_TOOL_CALLS.parse(sink.text(f"t{s}"))
        assert sink.finish(f"t{s}") == "stop" and parsed is not None, sink.text(f"t{s}")
        content, calls = parsed
        assert content is None and len(calls) == 1 and calls[0].name in ("get_weather", "noop")
        if calls[0].name == "get_weather":
            jsonschema.validate(json.loads(calls[0].arguments), WEATHER)


def test_complete_grammar_ends_even_with_ignore_eos(engine, prompt) -> None:
    spec = {"type": "regex", "pattern": "(yes|no)"}
    sink = run(
        engine,
        [("r", prompt, SamplingParams(max_tokens=30, temperature=1.0, seed=1, ignore_eos=True, guided=spec))],
    )
    assert sink.text("r") in ("yes", "no") and sink.finish("r") == "stop"


def test_grammar_that_cannot_finish_in_time_ends_with_length(engine, prompt) -> None:
    spec = {"type": "json_schema", "schema": {"type": "string", "minLength": 200}}
    sink = run(engine, [("long", prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=0, guided=spec))])
    assert sink.finish("long") == "length" and len(sink.tokens("long")) == 8
    assert sink.text("long").startswith('"')


def test_json_object_output_is_always_json_so_far(engine, prompt) -> None:
    """json_object: every token keeps the output a JSON object prefix; the finished ones parse."""
    spec = {"type": "json_object"}
    sink = run(
        engine,
        [
            (f"o{s}", prompt, SamplingParams(max_tokens=40, temperature=1.0, seed=s, guided=spec))
            for s in range(4)
        ],
    )
    for s in range(4):
        text = sink.text(f"o{s}")
        assert text.startswith("{")
        if sink.finish(f"o{s}") == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert len(sink.tokens(f"o{s}")) == 40


def test_bad_constraint_is_refused_at_add_request(engine, prompt) -> None:
    params = SamplingParams(max_tokens=4)
    params.guided = {"type": "lark", "grammar": "start: nope"}
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("bad", prompt, params, lambda out: None)
    assert info.value.param == "guided"


def test_compiled_grammars_are_cached_by_constraint(processor) -> None:
    guided = GuidedDecoding(processor.tokenizer, len(processor.tokenizer), [0], cache_size=2)
    a = {"type": "json_schema", "schema": SCHEMA}
    first = guided.start(a)
    second = guided.start(json.loads(json.dumps(a)))
    assert first.matcher is not second.matcher and len(guided._cache) == 1
    guided.start({"type": "json_object"})
    guided.start({"type": "regex", "pattern": "x"})
    assert len(guided._cache) == 2  # least recently used dropped


def test_masks_touch_only_constrained_rows(processor) -> None:
    vocab = len(processor.tokenizer)
    guided = GuidedDecoding(processor.tokenizer, vocab, [0])
    guide = guided.start({"type": "regex", "pattern": "yes"})
    logits = torch.randn(3, vocab + 5)  # wider than the tokenizer, as real LM heads often are
    masked = guided.apply_masks(logits, [None, guide, None])
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    allowed = torch.isfinite(masked[1]).nonzero().flatten().tolist()
    assert allowed and all("yes".startswith(processor.tokenizer.decode([t])) for t in allowed)
    assert not torch.isfinite(masked[1, vocab:]).any()
    assert guided.apply_masks(logits, [None, None, None]) is logits


def test_a_row_its_grammar_allows_nothing_may_only_stop(processor) -> None:
    """A matcher in error (it was fed a token its grammar forbids) allows no token: its row gets the
    stop tokens alone (the sequence ends rather than fails); the row beside it is masked as usual."""
    vocab = len(processor.tokenizer)
    guided = GuidedDecoding(processor.tokenizer, vocab, [0])
    broken, fine = (
        guided.start({"type": "regex", "pattern": "yes"}),
        guided.start({"type": "regex", "pattern": "yes"}),
    )
    assert broken.advance(processor.tokenizer.encode("no", add_special_tokens=False)[0])  # (it must end)
    masked = guided.apply_masks(torch.randn(2, vocab), [broken, fine])
    assert torch.isfinite(masked[0]).nonzero().flatten().tolist() == [0]
    allowed = torch.isfinite(masked[1]).nonzero().flatten().tolist()
    assert allowed and 0 not in allowed


def test_a_tokenizer_with_ids_past_the_logits_takes_constraints(family_kit) -> None:
    """Llama 3.2 Vision's tokenizer knows an id past its LM head's width (``<|image|>``): constraints
    still compile, and a constrained request with an image gets output its grammar allows."""
    from family_harness import cases_for
    from test_engine import Collector

    kit = family_kit("mllama")
    engine = LLMEngine(kit.hf_model, kit.tokenizer, EngineConfig(max_model_len=256), kit.family)
    assert len(kit.tokenizer) > engine.vocab_size
    ids, mm = kit.engine_inputs(cases_for("mllama")[1])
    sink = Collector()
    spec = {"type": "regex", "pattern": "(yes|no)"}
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=0, guided=spec)
    engine.add_request("r", ids, params, sink, mm)
    steps = 0
    while not sink.finished("r"):
        engine.step()
        steps += 1
        assert steps < 50
    assert sink.outputs["r"][-1].error is None and sink.text("r") in ("yes", "no")
