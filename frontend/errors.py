"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` for every failure.

:class:`APIError` is what the rest of the frontend raises; :func:`install_exception_handlers` makes
FastAPI answer malformed JSON, validation errors, HTTP exceptions (unknown route, wrong method) and
unexpected exceptions in that same shape. An unexpected exception is logged with its traceback and
answered with a 500 whose body carries no trace of it. Error bodies are written as ASCII JSON
(:class:`ErrorJSONResponse`): a message that quotes the client's input stays writable even when that
input holds text UTF-8 cannot encode.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("tritonvlm.frontend.errors")

# Tags of pydantic union members that may appear in an error location but are not field names.
_UNION_MEMBER_NAMES = frozenset({"str", "int", "float", "bool", "bytes", "none", "list", "dict"})
# pydantic error types for a value of the wrong JSON type, and what OpenAI says it expected.
_EXPECTED_TYPES = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "a boolean",
    "bool_parsing": "a boolean",
    "string_type": "a string",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def json_type_name(value: Any) -> str:
    """How OpenAI names the JSON type of ``value`` in its errors ("a string", "an integer"...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class ErrorJSONResponse(JSONResponse):
    """A JSON response written as ASCII (``\\uXXXX`` escapes), so that any text, lone surrogates
    included, can be sent back."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def default_error_type(status_code: int) -> str:
    """The OpenAI error ``type`` that goes with an HTTP status."""
    if status_code == 401:
        return "authentication_error"
    if status_code == 403:
        return "permission_error"
    if status_code == 429:
        return "rate_limit_error"
    if status_code >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error body as a dict."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class APIError(Exception):
    """A request that ends in an OpenAI error response (``status_code`` and body fields)."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type or default_error_type(status_code)
        self.param = param
        self.code = code

    def to_body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return error_body(self.message, self.type, self.param, self.code)

    def to_response(self, headers: Mapping[str, str] | None = None) -> JSONResponse:
        """The error as a FastAPI response."""
        return ErrorJSONResponse(self.to_body(), status_code=self.status_code, headers=headers)

    def __repr__(self) -> str:
        return f"APIError({self.status_code}, {self.message!r}, param={self.param!r}, code={self.code!r})"


def internal_error() -> APIError:
    """The 500 sent for an unexpected exception (its details go to the log only)."""
    return APIError(
        500, "The server had an internal error while processing the request.", code="internal_error"
    )


def loc_to_param(loc: Sequence[str | int]) -> str | None:
    """Turn a pydantic error location into the field path the client wrote.

    ``("body", "messages", 0, "content", "content-parts", 1, "image_url-part", "image_url")`` becomes
    ``"messages[0].content[1].image_url"``: the leading ``body`` and union-member tags are dropped.
    """
    items = list(loc)
    if items and items[0] == "body":
        items = items[1:]
    path = ""
    for item in items:
        if isinstance(item, int):
            path += f"[{item}]"
        elif item.isidentifier() and item not in _UNION_MEMBER_NAMES:
            path += f".{item}" if path else item
    return path or None


def _describe_validation_error(error: Mapping[str, Any]) -> APIError:
    kind = str(error.get("type", ""))
    loc = error.get("loc", ())
    param = loc_to_param(loc)
    if kind == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "invalid JSON")
        return APIError(400, f"We could not parse the JSON body of your request: {detail}.")
    if kind == "string_unicode":  # a key or text with a lone surrogate, refused by pydantic itself
        where = f" in '{param}'" if param else ""
        return APIError(
            400, f"The request holds text that is not valid Unicode (a lone surrogate){where}.", param=param
        )
    if param is None:
        if kind == "missing":
            return APIError(400, "The request body is missing: a JSON object is expected.")
        return APIError(400, "The request body must be a JSON object.")
    msg = str(error.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    code: str | None = "invalid_value"
    if kind == "missing":
        message, code = f"Missing required parameter: '{param}'.", None
    elif kind == "extra_forbidden":
        message = f"Unrecognized parameter: '{param}' is not supported."
    elif kind in _EXPECTED_TYPES and "input" in error:
        message = (
            f"Invalid type for '{param}': expected {_EXPECTED_TYPES[kind]}, "
            f"but got {json_type_name(error['input'])} instead."
        )
        code = "invalid_type"
    else:
        message = f"Invalid value for '{param}': {msg}"
    return APIError(400, message, param=param, code=code)


def validation_error_to_api_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """The 400 for a failed request validation: the first error, its field path in ``param``."""
    if not errors:
        return APIError(400, "The request is invalid.")
    return _describe_validation_error(errors[0])


async def _api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.to_response()


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_error_to_api_error(exc.errors()).to_response()


async def _http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    error = APIError(exc.status_code, message, code=code)
    return error.to_response(headers=getattr(exc, "headers", None))


async def _unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
    request_id = getattr(request.state, "request_id", "-")
    logger.error(
        "unhandled error in %s %s (request %s)",
        request.method,
        request.url.path,
        request_id,
        exc_info=(type(exc), exc, exc.__traceback__),
    )
    return internal_error().to_response()


def install_exception_handlers(app: FastAPI) -> None:
    """Make every error ``app`` can produce an OpenAI error body."""
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
