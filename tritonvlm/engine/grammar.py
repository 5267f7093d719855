"""Output constraints as they travel in PARAMETERS (``"guided"``), turned into llguidance grammars.

A constraint is a JSON object with a ``type``:

- ``{"type": "json_object"}``: one JSON object, any keys;
- ``{"type": "json_schema", "schema": {...}}``: JSON that validates against the schema;
- ``{"type": "regex", "pattern": "..."}``: text matching the regular expression (whole output);
- ``{"type": "lark", "grammar": "..."}``: an llguidance Lark grammar;
- ``{"type": "tool_calls", "calls": [schema, ...], "begin": "<tool_call>\\n", "end": "\\n</tool_call>",
  "separator": "\\n", "parallel": true}``: one tool call (``parallel``: one or more, separated by
  ``separator``), each ``begin`` + JSON matching one of the ``calls`` schemas + ``end``.

JSON is generated compact (``", "`` and ``": "`` separators, no other whitespace: a model cannot stall
in whitespace), ``oneOf`` is read as ``anyOf``, and JSON-schema keywords llguidance does not implement
are refused, not ignored. This module needs no tokenizer and no torch: the frontend uses
:func:`check_constraint` to refuse a bad constraint before it reaches Triton; the engine builds its
matchers from :func:`grammar_for` (see :mod:`tritonvlm.engine.guided`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import Any

import llguidance

from tritonvlm.wire import InvalidRequestError

CONSTRAINT_TYPES = ("json_object", "json_schema", "regex", "lark", "tool_calls")
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "coerce_one_of": True,
}
PARAM = "guided"


def _text(value: str, special: Collection[str]) -> str:
    """A Lark expression for the literal ``value``; the tokenizer's added tokens it contains (e.g.
    ``<tool_call>``) may come as that one token or spelled out in ordinary tokens."""
    if not value:
        return '""'
    names = sorted((s for s in special if s and s in value), key=len, reverse=True)
    if not names:
        return json.dumps(value)
    parts = []
    for piece in re.split("(" + "|".join(re.escape(n) for n in names) + ")", value):
        if piece in names:
            parts.append(f"({piece} | {json.dumps(piece)})")
        elif piece:
            parts.append(json.dumps(piece))
    return " ".join(parts)


def _json_grammar(schema: Any) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)


def _tool_calls_lark(spec: dict[str, Any], special: Collection[str]) -> str:
    calls = spec.get("calls")
    if not isinstance(calls, list) or not calls or not all(isinstance(c, dict) for c in calls):
        raise InvalidRequestError("tool_calls constraints need a non-empty list of call schemas", PARAM)
    options = {k: v for k, v in JSON_OPTIONS.items() if k != "coerce_one_of"}
    schema = {"anyOf": calls, "x-guidance": {**options, "coerce_one_of": True}}
    begin, end, sep = (str(spec.get(k, "")) for k in ("begin", "end", "separator"))
    call = f"{_text(begin, special)} %json {json.dumps(schema)} {_text(end, special)}"
    more = f" ({_text(sep, special)} call)*" if spec.get("parallel", True) else ""
    return f"start: call{more}\ncall: {call}\n"


def grammar_for(spec: Any, special_tokens: Collection[str] = ()) -> str:
    """The llguidance grammar of a constraint (unchecked: see :func:`check_constraint`).

    ``special_tokens``: the tokenizer's added tokens, so tags such as ``<tool_call>`` may be produced as
    the single token a model was trained on.
    """
    if not isinstance(spec, dict):
        raise InvalidRequestError("guided must be a JSON object", PARAM)
    kind = spec.get("type")
    if kind == "json_object":
        return _json_grammar({"type": "object"})
    if kind == "json_schema":
        schema = spec.get("schema")
        if not isinstance(schema, dict | bool):
            raise InvalidRequestError("a json_schema constraint needs a schema object", PARAM)
        return _json_grammar(schema)
    if kind == "regex":
        pattern = spec.get("pattern")
        if not isinstance(pattern, str):
            raise InvalidRequestError("a regex constraint needs a pattern string", PARAM)
        return llguidance.LLMatcher.grammar_from_regex(pattern)
    if kind == "lark":
        grammar = spec.get("grammar")
        if not isinstance(grammar, str):
            raise InvalidRequestError("a lark constraint needs a grammar string", PARAM)
        return llguidance.LLMatcher.grammar_from_lark(grammar)
    if kind == "tool_calls":
        return llguidance.LLMatcher.grammar_from_lark(_tool_calls_lark(spec, special_tokens))
    raise InvalidRequestError(
        f"guided.type must be one of {', '.join(CONSTRAINT_TYPES)}, got {kind!r}", PARAM
    )


def check_grammar(grammar: str, param: str = PARAM) -> None:
    """Raise InvalidRequestError (naming ``param``) if llguidance cannot compile ``grammar``."""
    try:
        error = llguidance.LLMatcher.validate_grammar(grammar, None)
    except (ValueError, TypeError) as exc:
        error = str(exc)
    if error:
        raise InvalidRequestError(f"the output constraint cannot be compiled: {_first_line(error)}", param)


def check_constraint(spec: Any, param: str = PARAM) -> None:
    """Refuse a constraint that is malformed, uses an unsupported JSON-schema feature or does not
    compile; the error names ``param``."""
    try:
        grammar = grammar_for(spec)
    except InvalidRequestError as exc:
        raise InvalidRequestError(exc.message, param) from None
    except (ValueError, TypeError) as exc:  # llguidance refuses a schema that is not JSON
        raise InvalidRequestError(f"the output constraint is not valid: {exc}", param) from None
    check_grammar(grammar, param)


def _first_line(message: str) -> str:
    """llguidance errors carry a source excerpt after the first line; the first line says it."""
    return message.strip().splitlines()[0] if message.strip() else message
