"""How a model family writes tool calls: the per-family hook, with Qwen's (Hermes) format as the default.

Qwen2/2.5/3(-VL) write each call as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``.
A :class:`ToolCallFormat` says three things about a family's format:

- how a call is written, as a JSON object between ``begin`` and ``end`` (which the engine's grammar
  enforces for ``tool_choice`` ``required`` or a named function: :meth:`ToolCallFormat.constraint`);
- how to find the calls in the model's output (:meth:`ToolCallFormat.parse`, and
  :class:`tritonvlm.frontend.tools.ToolCallStreamParser` while streaming);
- how to show tools, earlier calls and their results to a model whose chat template does not take
  ``tools=`` (:meth:`ToolCallFormat.render_conversation`, the text Qwen2.5's own template writes).
  Qwen2.5-VL's published template is such a template; a template that handles ``tools`` renders them
  itself (:func:`prepare_tools`).

A family module supplies its own instance (Llama 3.2 writes bare ``{"name", "parameters"}`` JSON, for
example: ``ToolCallFormat("llama3_json", begin="", end="", arguments_key="parameters")``) and registers
it in :data:`TOOL_CALL_FORMATS`.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from typing import Any

from tritonvlm.wire import InvalidRequestError

QWEN_TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
QWEN_TOOLS_INSTRUCTIONS = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>"
)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True)
class ParsedCall:
    """One tool call found in the model's output: its function name and JSON arguments (a string)."""

    name: str
    arguments: str


@dataclass(frozen=True)
class ToolCallFormat:
    """A family's tool-call syntax (defaults: Qwen's ``<tool_call>`` JSON)."""

    name: str = "qwen"
    begin: str = "<tool_call>\n"
    end: str = "\n</tool_call>"
    separator: str = "\n"
    name_key: str = "name"
    arguments_key: str = "arguments"

    # ---- the grammar (engine side) --------------------------------------------------------------
    def call_schema(self, function_name: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
        """The JSON schema of one call of ``function_name`` (its arguments follow ``parameters``)."""
        arguments = parameters if parameters else {"type": "object"}
        return {
            "type": "object",
            "properties": {self.name_key: {"const": function_name}, self.arguments_key: arguments},
            "required": [self.name_key, self.arguments_key],
            "additionalProperties": False,
        }

    def constraint(
        self, functions: list[tuple[str, dict[str, Any] | None]], parallel: bool
    ) -> dict[str, Any]:
        """The engine constraint (PARAMETERS ``guided``): only calls of ``functions`` (one, or with
        ``parallel`` one or more)."""
        return {
            "type": "tool_calls",
            "calls": [self.call_schema(name, params) for name, params in functions],
            "begin": self.begin,
            "end": self.end,
            "separator": self.separator,
            "parallel": parallel,
        }

    # ---- parsing (frontend side) ----------------------------------------------------------------
    @property
    def begin_tag(self) -> str:
        """What marks the start of a call in the text (``begin`` without surrounding whitespace)."""
        return self.begin.strip()

    @property
    def end_tag(self) -> str:
        return self.end.strip()

    def parse_call(self, body: str) -> ParsedCall | None:
        """One call from the JSON between the tags, or None if it is not a call."""
        try:
            data = json.loads(body)
        except ValueError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get(self.name_key), str):
            return None
        arguments = data.get(self.arguments_key, {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        return ParsedCall(data[self.name_key], json.dumps(arguments, ensure_ascii=False))

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]] | None:
        """``(content before the calls or None, calls)`` if ``text`` holds tool calls, else None.

        All blocks must parse; the last one may lack its end tag (output stopped right after the JSON).
        """
        if not self.begin_tag:
            call = self.parse_call(text.strip())
            return (None, [call]) if call else None
        start = text.find(self.begin_tag)
        if start < 0:
            return None
        content = text[:start].strip() or None
        calls = []
        pattern = re.escape(self.begin_tag) + r"(.*?)(?:" + re.escape(self.end_tag) + r"|\Z)"
        for match in re.finditer(pattern, text[start:], flags=re.DOTALL):
            call = self.parse_call(match.group(1).strip())
            if call is None:
                return None
            calls.append(call)
        return (content, calls) if calls else None

    # ---- rendering for templates without tool support (preprocess side) -------------------------
    def render_call(self, name: str, arguments: Any) -> str:
        """One call as the model writes it."""
        if isinstance(arguments, str):
            with contextlib.suppress(ValueError):
                arguments = json.loads(arguments)
        body = json.dumps({self.name_key: name, self.arguments_key: arguments}, ensure_ascii=False)
        return f"{self.begin}{body}{self.end}"

    def render_tools(self, tools: list[dict[str, Any]]) -> str:
        """The system-prompt section that lists the tools (Qwen2.5's wording)."""
        lines = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
        return QWEN_TOOLS_PREAMBLE + lines + QWEN_TOOLS_INSTRUCTIONS

    def render_conversation(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> list[dict[str, Any]]:
        """The conversation with tools, calls and results written as text in ordinary messages, for a
        chat template that knows nothing of tools (what Qwen2.5's template would have written)."""
        out: list[dict[str, Any]] = []
        if tools:
            section = self.render_tools(tools)
            if messages and messages[0].get("role") == "system":
                first = messages[0]
                out.append({"role": "system", "content": _text_of(first.get("content")) + "\n\n" + section})
                messages = messages[1:]
            else:
                out.append({"role": "system", "content": DEFAULT_SYSTEM_PROMPT + "\n\n" + section})
        for message in messages:
            role = message.get("role")
            if role == "assistant" and message.get("tool_calls"):
                calls = [
                    self.render_call(c["function"]["name"], c["function"].get("arguments"))
                    for c in message["tool_calls"]
                ]
                text = _text_of(message.get("content"))
                out.append({"role": "assistant", "content": "\n".join(([text] if text else []) + calls)})
            elif role == "tool":
                response = f"<tool_response>\n{_text_of(message.get('content'))}\n</tool_response>"
                if out and out[-1].get("role") == "user" and out[-1].get("_tool_responses"):
                    out[-1]["content"] += "\n" + response
                else:
                    out.append({"role": "user", "content": response, "_tool_responses": True})
            else:
                out.append({k: v for k, v in message.items() if k not in ("tool_calls", "tool_call_id")})
        for message in out:
            message.pop("_tool_responses", None)
        return out


def _text_of(content: Any) -> str:
    """The text of a message's content (a string, or the text parts of a list)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


QWEN_TOOL_CALLS = ToolCallFormat()
TOOL_CALL_FORMATS: dict[str, ToolCallFormat] = {"qwen": QWEN_TOOL_CALLS, "hermes": QWEN_TOOL_CALLS}


def template_handles_tools(template: str | None) -> bool:
    """Whether a chat template renders ``tools`` and the ``tool`` role itself (it names them)."""
    return bool(template) and "tools" in template and "tool_call" in template


def prepare_tools(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    template: str | None,
    tool_format: ToolCallFormat = QWEN_TOOL_CALLS,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(messages, extra apply_chat_template kwargs)``: the template's own ``tools=`` where it takes
    them, else the conversation rendered as text by ``tool_format``."""
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise InvalidRequestError("tools must be a list of tool objects", "tools")
    has_tool_turns = any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
    if not tools and not has_tool_turns:
        return messages, {}
    if template_handles_tools(template):
        return messages, ({"tools": tools} if tools else {})
    return tool_format.render_conversation(messages, tools), {}
