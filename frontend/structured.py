"""``response_format`` → the engine's output constraint (PARAMETERS ``guided``).

``text`` adds nothing; ``json_object`` asks for one JSON object; ``json_schema`` for JSON that validates
against ``json_schema.schema`` (``strict`` or not: the grammar always enforces the whole schema). A
schema the grammar library cannot compile, or that uses a JSON-schema keyword it does not implement, is
a 400 naming ``response_format.json_schema.schema``.
"""

from __future__ import annotations

from typing import Any

from tritonvlm.engine.grammar import check_constraint
from tritonvlm.frontend.errors import APIError
from tritonvlm.frontend.protocol import ResponseFormat
from tritonvlm.wire import InvalidRequestError

SCHEMA_PARAM = "response_format.json_schema.schema"


def invalid(message: str, param: str) -> APIError:
    """A 400 for a bad constraint, naming the field."""
    return APIError(400, message, param=param, code="invalid_value")


def checked(constraint: dict[str, Any], param: str) -> dict[str, Any]:
    """``constraint`` if the grammar library compiles it, else a 400 naming ``param``."""
    try:
        check_constraint(constraint, param)
    except InvalidRequestError as exc:
        raise invalid(exc.message, param) from None
    return constraint


def response_format_constraint(response_format: ResponseFormat | None) -> dict[str, Any] | None:
    """The constraint for ``response_format`` (None for ``text`` or no format)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "json_object"}
    spec = response_format.json_schema
    if spec is None:
        raise invalid("response_format of type 'json_schema' needs a 'json_schema' object", "response_format")
    if spec.schema_ is None:
        raise invalid("response_format.json_schema needs a 'schema'", SCHEMA_PARAM)
    return checked({"type": "json_schema", "schema": spec.schema_}, SCHEMA_PARAM)
