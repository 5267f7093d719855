"""Tool calling around the engine: planning a request, parsing calls (whole and streamed), rendering
tools into the prompt for templates with and without tool support."""

from __future__ import annotations

import json

import pytest

from tritonvlm.frontend.errors import APIError
from tritonvlm.frontend.protocol import ChatCompletionRequest
from tritonvlm.frontend.tools import ToolCallStreamParser, ToolPlan, plan_tools, to_message
from tritonvlm.tool_format import prepare_tools, template_handles_tools

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "ping"}},
]


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **fields)


def test_plans() -> None:
    assert plan_tools(request()) == ToolPlan()
    auto = plan_tools(request(tools=TOOLS))
    assert auto.constraint is None and auto.names == {"get_weather", "ping"} and len(auto.tools) == 2
    none = plan_tools(request(tools=TOOLS, tool_choice="none"))
    assert none.tools is None and not none.parses
    required = plan_tools(request(tools=TOOLS, tool_choice="required", parallel_tool_calls=False))
    assert required.constraint["type"] == "tool_calls" and required.constraint["parallel"] is False
    assert [c["properties"]["name"]["const"] for c in required.constraint["calls"]] == ["get_weather", "ping"]
    named = plan_tools(request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "ping"}}))
    assert [c["properties"]["name"]["const"] for c in named.constraint["calls"]] == ["ping"]
    assert named.constraint["parallel"] is True


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
        ({"tools": [TOOLS[1], TOOLS[1]]}, "tools[1].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}]},
            "tools[0].function.parameters",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice.function.name",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_bad_tools_are_400_naming_the_field(fields, param) -> None:
    with pytest.raises(APIError) as info:
        plan_tools(request(**fields))
    assert info.value.status_code == 400 and info.value.param == param


OUTPUT = (
    'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>'
)


def test_output_with_calls_becomes_tool_calls() -> None:
    plan = plan_tools(request(tools=TOOLS))
    content, calls, finish = to_message(OUTPUT, "stop", plan)
    assert content == "Let me check." and finish == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"}),
        ("ping", {}),
    ]
    assert calls[0].id != calls[1].id
    # not calls, unknown functions, or no tools: the text stays content
    for text in (
        "just text",
        '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',
        "<tool_call>{oops",
    ):
        assert to_message(text, "stop", plan) == (text, None, "stop")
    assert to_message(OUTPUT, "stop", ToolPlan()) == (OUTPUT, None, "stop")


@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_stream_parser_gives_the_same_calls(piece: int) -> None:
    plan = plan_tools(request(tools=TOOLS))
    parser = ToolCallStreamParser(plan)
    content, calls = "", []
    for i in range(0, len(OUTPUT), piece):
        text, deltas = parser.feed(OUTPUT[i : i + piece])
        assert "<tool" not in text
        content += text
        calls += deltas
    text, deltas = parser.finish()
    content += text
    calls += deltas
    _, whole, _ = to_message(OUTPUT, "stop", plan)
    assert content == "Let me check." and parser.called
    assert [(d["index"], d["function"]["name"], d["function"]["arguments"]) for d in calls] == [
        (i, c.function.name, c.function.arguments) for i, c in enumerate(whole)
    ]


def test_stream_parser_releases_text_that_was_not_a_call() -> None:
    parser = ToolCallStreamParser(plan_tools(request(tools=TOOLS)))
    sent = parser.feed("a <tool")[0] + parser.feed("box> and <tool_call> nonsense")[0]
    rest, calls = parser.finish()
    assert sent + rest == "a <toolbox> and <tool_call> nonsense" and calls == [] and not parser.called


def test_unterminated_last_call_is_still_a_call() -> None:
    plan = plan_tools(request(tools=TOOLS))
    text = '<tool_call>\n{"name": "ping", "arguments": {}}'
    assert to_message(text, "stop", plan)[1][0].function.name == "ping"
    parser = ToolCallStreamParser(plan)
    assert parser.feed(text) == ("", [])
    assert parser.finish()[1][0]["function"]["name"] == "ping"


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Weather?"}]},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "12 C"},
    {"role": "tool", "tool_call_id": "c2", "content": "sunny"},
]


def test_template_without_tool_support_gets_the_conversation_as_text() -> None:
    messages, kwargs = prepare_tools(CONVERSATION, TOOLS, "{{ messages }}")
    assert kwargs == {}
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.\n\n# Tools")
    assert json.dumps(TOOLS[0]) in messages[0]["content"]
    assert messages[1] == CONVERSATION[1]
    assert messages[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
    }
    assert messages[3] == {
        "role": "user",
        "content": "<tool_response>\n12 C\n</tool_response>\n<tool_response>\nsunny\n</tool_response>",
    }
    assert len(messages) == 4


def test_template_with_tool_support_renders_them_itself() -> None:
    template = "{% for t in tools %}{{ t }}{% endfor %}{% if message.tool_calls %}<tool_call>{% endif %}"
    assert template_handles_tools(template)
    assert prepare_tools(CONVERSATION, TOOLS, template) == (CONVERSATION, {"tools": TOOLS})
    assert prepare_tools(CONVERSATION[:2], None, "{{ x }}") == (CONVERSATION[:2], {})


def test_preprocess_renders_tools_into_the_prompt(hf_model, processor) -> None:
    from tritonvlm.families.qwen2_5_vl import Qwen2_5_VLFamily
    from tritonvlm.preprocessing import ChatPreprocessor

    pre = ChatPreprocessor(Qwen2_5_VLFamily(hf_model.config), processor)
    plain = pre([{"role": "user", "content": "hi"}], [])
    with_tools = pre([{"role": "user", "content": "hi"}], [], tools=TOOLS)
    text = processor.tokenizer.decode(with_tools.input_ids)
    assert "<tools>" in text and "get_weather" in text and len(with_tools.input_ids) > len(plain.input_ids)
    turns = [{"role": "user", "content": "Weather?"}, *CONVERSATION[2:]]
    followup = processor.tokenizer.decode(pre(turns, []).input_ids)
    assert "<tool_call>" in followup and "<tool_response>\n12 C" in followup
