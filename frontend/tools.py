"""Tool calling: ``tools``, ``tool_choice`` and ``parallel_tool_calls`` of a chat completion.

:func:`plan_tools` checks the tools (a name each, unique, a parameters schema the grammar library
compiles) and the choice, and decides three things: the tools sent to Triton for the chat template
(``TOOLS``; none for ``tool_choice: "none"``), the engine constraint (``required`` or a named function:
only calls, each validating against its function's parameters; ``auto``: none), and whether the output
is parsed into ``message.tool_calls``. The call syntax is the model family's
(:class:`tritonvlm.tool_format.ToolCallFormat`, Qwen's ``<tool_call>`` JSON by default).

:func:`to_message` turns a finished output into the assistant message (``tool_calls``, finish reason
``tool_calls``); :class:`ToolCallStreamParser` does the same while streaming, as ``delta.tool_calls``
chunks (one per call, sent whole as soon as the call is complete) and content deltas for the text
around them.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from tritonvlm.frontend.errors import APIError
from tritonvlm.frontend.protocol import ChatCompletionRequest, FunctionCall, ToolCall
from tritonvlm.frontend.structured import checked, invalid
from tritonvlm.tool_format import QWEN_TOOL_CALLS, ParsedCall, ToolCallFormat

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


@dataclass
class ToolPlan:
    """What a request's tools mean for its prompt, its decoding and its answer."""

    tools: list[dict[str, Any]] | None = None  # for the chat template (TOOLS); None: no tools shown
    constraint: dict[str, Any] | None = None  # the engine constraint for required/named choices
    names: frozenset[str] = frozenset()  # functions the output may call (parsed only when non-empty)
    tool_format: ToolCallFormat = field(default=QWEN_TOOL_CALLS)

    @property
    def parses(self) -> bool:
        return bool(self.names)


def _check_tools(request: ChatCompletionRequest) -> list[tuple[str, dict[str, Any] | None]]:
    functions: list[tuple[str, dict[str, Any] | None]] = []
    seen: set[str] = set()
    for i, tool in enumerate(request.tools or []):
        name = tool.function.name
        if not _NAME.fullmatch(name):
            raise invalid(
                "A function name must be 1-64 characters of a-z, A-Z, 0-9, underscores and dashes.",
                f"tools[{i}].function.name",
            )
        if name in seen:
            raise invalid(f"Two tools are named {name!r}.", f"tools[{i}].function.name")
        seen.add(name)
        params = tool.function.parameters
        if params is not None:
            checked({"type": "json_schema", "schema": params}, f"tools[{i}].function.parameters")
        functions.append((name, params))
    return functions


def plan_tools(request: ChatCompletionRequest, tool_format: ToolCallFormat = QWEN_TOOL_CALLS) -> ToolPlan:
    """Check ``tools``/``tool_choice`` (400 naming the field) and plan the request."""
    functions = _check_tools(request)
    choice = request.tool_choice
    if not functions:
        if choice not in (None, "none", "auto"):
            raise invalid("'tool_choice' needs 'tools'.", "tool_choice")
        return ToolPlan(tool_format=tool_format)
    if choice == "none":
        return ToolPlan(tool_format=tool_format)
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools or []]
    names = frozenset(name for name, _ in functions)
    parallel = request.parallel_tool_calls is not False
    if choice is None or choice == "auto":
        return ToolPlan(tools=tools, names=names, tool_format=tool_format)
    if choice == "required":
        chosen = functions
    else:
        chosen = [f for f in functions if f[0] == choice.function.name]
        if not chosen:
            raise invalid(
                f"tool_choice names the function {choice.function.name!r}, which is not in 'tools'.",
                "tool_choice.function.name",
            )
    constraint = checked(tool_format.constraint(chosen, parallel), "tools")
    return ToolPlan(tools=tools, constraint=constraint, names=names, tool_format=tool_format)


def new_call_id() -> str:
    """A tool call id in OpenAI's shape."""
    return "call_" + uuid.uuid4().hex[:24]


def _known(calls: list[ParsedCall], plan: ToolPlan) -> bool:
    return bool(calls) and all(call.name in plan.names for call in calls)


def to_message(
    text: str, finish_reason: str | None, plan: ToolPlan
) -> tuple[str | None, list[ToolCall] | None, str | None]:
    """``(content, tool_calls, finish_reason)`` of a finished choice. Output that is not a complete set
    of calls to known functions stays content."""
    if not plan.parses:
        return text, None, finish_reason
    parsed = plan.tool_format.parse(text)
    if parsed is None or not _known(parsed[1], plan):
        return text, None, finish_reason
    content, calls = parsed
    tool_calls = [
        ToolCall(id=new_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls
    ]
    return content, tool_calls, ("tool_calls" if finish_reason == "stop" else finish_reason)


class ToolCallStreamParser:
    """Splits a streamed choice's text into content deltas and whole tool calls.

    Text that might be the start of a call tag is held back until it is known not to be; after the
    first tag everything is buffered, and each call goes out as one ``delta.tool_calls`` entry once its
    end tag arrives (the last one also at the end of the stream, when the output stopped right after
    its JSON). If the calls do not parse, the held text goes out as content at the end.
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.fmt = plan.tool_format
        self.tag = self.fmt.begin_tag
        self.pending = ""  # text not sent yet
        self.in_calls = False
        self.sent_calls = 0
        self.failed = False

    @property
    def called(self) -> bool:
        """Whether tool calls were sent (the finish reason is then ``tool_calls``)."""
        return self.sent_calls > 0

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """``(content to send, tool call deltas)`` after ``text``."""
        if not self.plan.parses or self.failed:
            return text, []
        self.pending += text
        content = ""
        if not self.in_calls:
            start = self.pending.find(self.tag)
            if start < 0:
                keep = _partial_suffix(self.pending, self.tag)
                content, self.pending = (
                    self.pending[: len(self.pending) - keep],
                    self.pending[len(self.pending) - keep :],
                )
                return content, []
            content, self.pending = self.pending[:start], self.pending[start:]
            self.in_calls = True
        return content, self._complete_calls(final=False)

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """What is still held, at the end of the stream."""
        if not self.plan.parses or self.failed:
            rest, self.pending = self.pending, ""
            return rest, []
        if not self.in_calls:
            rest, self.pending = self.pending, ""
            return rest, []
        deltas = self._complete_calls(final=True)
        rest, self.pending = ("" if self.pending.strip() == "" else self.pending), ""
        return rest, deltas

    def _complete_calls(self, final: bool) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        end = self.fmt.end_tag
        while True:
            body_start = self.pending.find(self.tag)
            if body_start < 0:
                return deltas
            stop = self.pending.find(end, body_start + len(self.tag)) if end else -1
            if stop < 0 and not final:
                return deltas
            body_end = stop if stop >= 0 else len(self.pending)
            call = self.fmt.parse_call(self.pending[body_start + len(self.tag) : body_end].strip())
            if call is None or call.name not in self.plan.names:
                if not self.called:
                    self.failed = True  # not a call after all: everything held goes out as content
                return deltas
            deltas.append(
                {
                    "index": self.sent_calls,
                    "id": new_call_id(),
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
            )
            self.sent_calls += 1
            self.pending = self.pending[body_end + (len(end) if stop >= 0 else 0) :]
            if not self.pending.strip():
                self.pending = ""


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def parsed_arguments(arguments: str) -> Any:
    """Tool call arguments for a chat template: the JSON object when they parse, else the string."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def wire_tool_fields(message: Any, index: int) -> dict[str, Any]:
    """The tool fields of a message in the wire form (``tool_calls`` with parsed arguments,
    ``tool_call_id``); 400 for a tool message without ``tool_call_id``."""
    fields: dict[str, Any] = {}
    if message.role == "tool":
        if not message.tool_call_id:
            raise APIError(
                400,
                "A tool message needs 'tool_call_id'.",
                param=f"messages[{index}].tool_call_id",
                code="invalid_value",
            )
        fields["tool_call_id"] = message.tool_call_id
    elif message.tool_call_id is not None:
        raise invalid("Only tool messages carry 'tool_call_id'.", f"messages[{index}].tool_call_id")
    if message.tool_calls:
        if message.role != "assistant":
            raise invalid("Only assistant messages carry 'tool_calls'.", f"messages[{index}].tool_calls")
        fields["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {
                    "name": call.function.name,
                    "arguments": parsed_arguments(call.function.arguments),
                },
            }
            for call in message.tool_calls
        ]
    return fields
