"""Structured outputs and tool calls end to end: the OpenAI SDK → frontend → tritonserver, tiny model.

The tiny model has random weights: valid JSON, schema-valid objects and well-formed tool calls can only
come from the grammar the engine enforces. One request with ``n`` choices and a ``seed`` gives ``n``
seeded samples (choice ``i`` samples with ``seed + i``) decoded in one batch.
"""

from __future__ import annotations

import json
import threading
from typing import Literal

import jsonschema
import openai
import pytest
from conftest import make_image
from pydantic import BaseModel
from test_e2e import data_url, reference_text
from test_guided import SCHEMA, WEATHER

pytestmark = pytest.mark.e2e

SEEDS = 20
ASK = [{"role": "user", "content": "Answer in JSON."}]
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {
            "name": "count_shapes",
            "parameters": {
                "type": "object",
                "properties": {"colour": {"type": "string", "enum": ["red", "blue"]}},
                "required": ["colour"],
                "additionalProperties": False,
            },
        },
    },
]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


class Picture(BaseModel):
    shape: Literal["circle", "square", "triangle", "star"]
    colour: Literal["red", "green", "blue", "yellow", "purple", "orange"]


def test_json_object_for_20_seeds(client):
    r = client.chat.completions.create(
        model="tiny", messages=ASK, response_format={"type": "json_object"}, n=SEEDS, seed=0, max_tokens=48
    )
    parsed = 0
    for choice in r.choices:
        text = choice.message.content
        assert text.startswith("{"), text
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
            parsed += 1
        else:  # random weights may write one endless key: cut by max_tokens, never invalid before that
            assert choice.finish_reason == "length"
    print(f"json_object: {parsed}/{SEEDS} finished within 48 tokens")


def test_json_schema_strict_validates_for_20_seeds(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "record", "schema": SCHEMA, "strict": True},
        },
        n=SEEDS,
        seed=0,
        max_tokens=160,
    )
    assert len(r.choices) == SEEDS
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_parse_with_a_pydantic_model(client, image_server):
    url = image_server.add("/structured-red.png", make_image(64, 64, "red"))
    completion = client.chat.completions.parse(
        model="tiny",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Which shape?"},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
        response_format=Picture,
        seed=3,
        max_tokens=40,
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, Picture), message.content


def _required_call(client, **kw):
    return client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        seed=7,
        max_tokens=80,
        **kw,
    )


def test_tool_choice_required_gives_calls_whose_arguments_validate(client):
    r = _required_call(client, n=6)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls", choice.message
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_streamed_tool_calls_reassemble_to_the_non_streamed_ones(client):
    whole = _required_call(client).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in _required_call(client, stream=True):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls" == whole.finish_reason
    expected = [
        {"name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls
    ]
    assert [calls[i] for i in sorted(calls)] == expected


def test_named_tool_choice_calls_that_function(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Count the red shapes."}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "count_shapes"}},
        seed=1,
        n=3,
        max_tokens=120,
    )
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        assert {c.function.name for c in choice.message.tool_calls} == {"count_shapes"}
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), PARAMETERS["count_shapes"])


def test_conversation_with_tool_calls_results_and_images_is_served(client):
    png = make_image(56, 56, "blue", "square")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather?"},
                {"type": "image_url", "image_url": {"url": data_url(png)}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12 degrees"},
    ]
    with_tools = client.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, max_tokens=3, temperature=0
    )
    without = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0)
    assert with_tools.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the tool definitions are rendered into the prompt, the earlier call and its result in both
    assert with_tools.usage.prompt_tokens > without.usage.prompt_tokens > 20


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "frob"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
            "response_format.json_schema.schema",
        ),
    ],
)
def test_bad_structured_requests_are_400_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2, **body)
    assert info.value.body["param"] == param


def test_free_requests_stay_token_exact_beside_constrained_ones(client, hf_model, processor):
    """Constrained and free requests decode in the same steps; the free ones still match generate()."""
    free = [
        [{"role": "user", "content": "Tell me a story about a cat."}],
        [{"role": "user", "content": "Hi"}],
    ]
    expected = [reference_text(hf_model, processor, m, [], max_new=24)[0] for m in free]
    results: dict[str, object] = {}

    def constrained() -> None:
        results["json"] = client.chat.completions.create(
            model="tiny",
            messages=ASK,
            response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}},
            n=4,
            seed=11,
            max_tokens=160,
        )

    def unconstrained(i: int) -> None:
        r = client.chat.completions.create(model="tiny", messages=free[i], temperature=0, max_tokens=24)
        results[f"free{i}"] = r.choices[0].message.content

    threads = [threading.Thread(target=constrained)]
    threads += [threading.Thread(target=unconstrained, args=(i,)) for i in range(len(free))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [results.get(f"free{i}") for i in range(len(free))] == expected
    for choice in results["json"].choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
