"""Small helpers shared by the Triton `model.py` adapters (imported only inside the Python backend stub)."""

from __future__ import annotations

import contextlib
import json
import locale
import logging
import os
import sys
from typing import Any

import numpy as np

ENV_PREFIX = "TRITONVLM_"


def setup_stub_process() -> None:
    """Make the stub's embedded Python behave: UTF-8 text (its default is ASCII, and LC_ALL and
    PYTHONUTF8 are ignored there) and log lines on stderr that land in the server log."""
    with contextlib.suppress(locale.Error):
        locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8", errors="replace")
    level = os.environ.get("TRITONVLM_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def env_name(key: str) -> str:
    """The environment variable that overrides a config.pbtxt parameter (``model_path`` →
    ``TRITONVLM_MODEL_PATH``). `tritonvlm serve` sets these, so each setting is given once, at launch."""
    return ENV_PREFIX + key.upper()


def model_parameters(args: dict[str, Any]) -> dict[str, str]:
    """The ``parameters`` block of a model's config.pbtxt as a dict of strings, each overridden by
    its ``TRITONVLM_<KEY>`` environment variable when that is set and not empty."""
    config = json.loads(args["model_config"])
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    for key in params:
        override = os.environ.get(env_name(key), "").strip()
        if override:
            params[key] = override
    return params


def resolve_model_path(args: dict[str, Any]) -> str:
    """The checkpoint to load (a local directory or a hub id)."""
    path = model_parameters(args).get("model_path", "").strip()
    if not path:
        variable = env_name("model_path")
        raise RuntimeError(f"no model configured: set 'model_path' in config.pbtxt or ${variable}")
    return path


def bytes_tensor(values: list[bytes] | list[str]) -> np.ndarray:
    """A numpy array Triton sends as a BYTES tensor."""
    return np.array([v.encode() if isinstance(v, str) else v for v in values], dtype=np.object_)


def first_bytes(array: np.ndarray) -> bytes:
    """The first element of a BYTES tensor (any shape) as bytes (``b""`` for an empty tensor)."""
    flat = np.asarray(array, dtype=np.object_).reshape(-1)
    if flat.size == 0:
        return b""
    value = flat[0]
    return value if isinstance(value, bytes) else str(value).encode()


def parse_json_input(array: np.ndarray | None, default: Any) -> Any:
    """Decode the JSON held in a one-element BYTES tensor (``default`` when the input is absent)."""
    if array is None or array.size == 0:
        return default
    from tritonvlm.wire import InvalidRequestError

    raw = first_bytes(array)
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"input is not valid JSON: {exc}") from exc
