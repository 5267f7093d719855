"""Per-request sampling parameters, as carried in the PARAMETERS JSON of `vlm` and `llm` requests.

Every numeric parameter is checked into a range where the sampler's float32 arithmetic stays finite
(a temperature of 1e-300 or a repetition penalty of 1e-45 would turn logits into inf and NaN), and
types are strict: a JSON string is never taken for a number, nor a number for a boolean. The
frontend applies the same ranges (it imports the bounds below), so both refuse the same requests.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from tritonvlm.engine.grammar import check_constraint
from tritonvlm.wire import InvalidRequestError

DEFAULT_MAX_TOKENS = 256

# temperature is 0 (greedy) or in [MIN_TEMPERATURE, MAX_TEMPERATURE]: below 0.01 sampling is greedy in
# all but name, and dividing float32 logits by a tiny temperature overflows to inf.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 2.0
# repetition_penalty multiplies or divides logits: outside [0.01, 100] it is meaningless and can overflow.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
MAX_ABS_PENALTY = 2.0  # presence_penalty, frequency_penalty (OpenAI's range)
MAX_TOP_LOGPROBS = 20
MAX_STOP_SEQUENCES = 4
# The seed goes to torch.Generator.manual_seed, which takes any signed or unsigned 64-bit integer.
MIN_SEED = -(2**63)
MAX_SEED = 2**64 - 1
MAX_INT32 = 2**31 - 1  # max_tokens and top_k beyond this mean nothing (and would not fit the outputs)

_INT_FIELDS = ("max_tokens", "top_k", "top_logprobs")
_FLOAT_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
_BOOL_FIELDS = ("ignore_eos", "logprobs")


def wrap_seed(seed: int) -> int:
    """``seed`` brought back into the 64-bit range (``seed + i`` for the ``i``-th of ``n`` choices may
    pass the top): values above :data:`MAX_SEED` wrap around to 0 and up."""
    return seed - 2**64 if seed > MAX_SEED else seed


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to pick the next token and when to stop. ``temperature == 0`` means greedy."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    logprobs: bool = False  # report each generated token's log probability
    top_logprobs: int = 0  # and this many most likely alternatives (0-20)
    guided: dict[str, Any] | None = None  # an output constraint (tritonvlm.engine.grammar)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first field that is out of range (or of the wrong type)."""
        for name in _INT_FIELDS:
            if not _is_int(getattr(self, name)):
                raise InvalidRequestError(f"{name} must be an integer", name)
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise InvalidRequestError(f"{name} must be a finite number", name)
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"{name} must be a boolean", name)
        if not 1 <= self.max_tokens <= MAX_INT32:
            raise InvalidRequestError(f"max_tokens must be between 1 and {MAX_INT32}", "max_tokens")
        if not (self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            raise InvalidRequestError(
                f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g}",
                "temperature",
            )
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p must be in (0, 1]", "top_p")
        if not 0 <= self.top_k <= MAX_INT32:
            raise InvalidRequestError("top_k must be >= 0 (0 disables it)", "top_k")
        if self.seed is not None and not (_is_int(self.seed) and MIN_SEED <= self.seed <= MAX_SEED):
            raise InvalidRequestError(
                f"seed must be an integer between {MIN_SEED} and {MAX_SEED} (64 bits)", "seed"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_ABS_PENALTY <= getattr(self, name) <= MAX_ABS_PENALTY:
                raise InvalidRequestError(f"{name} must be between -2 and 2", name)
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            bounds = f"{MIN_REPETITION_PENALTY:g} and {MAX_REPETITION_PENALTY:g}"
            raise InvalidRequestError(f"repetition_penalty must be between {bounds}", "repetition_penalty")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError("top_logprobs must be between 0 and 20", "top_logprobs")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", "top_logprobs")
        if (
            not isinstance(self.stop, list)
            or len(self.stop) > MAX_STOP_SEQUENCES
            or any(not isinstance(s, str) or not s for s in self.stop)
        ):
            raise InvalidRequestError("stop must be up to 4 non-empty strings", "stop")
        if self.guided is not None:
            check_constraint(self.guided)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        """Build from a JSON object, ignoring keys that are not sampling parameters.

        Types are strict (an integer field takes an integer, a float field an integer or a float, a
        boolean field a boolean); ``stop`` may be one string. Raises InvalidRequestError naming the field.
        """
        if not isinstance(data, dict):
            raise InvalidRequestError("PARAMETERS must be a JSON object", "parameters")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known and v is not None}
        if isinstance(kwargs.get("stop"), str):
            kwargs["stop"] = [kwargs["stop"]]
        params = cls(**kwargs)
        params.validate()
        for name in _FLOAT_FIELDS:
            setattr(params, name, float(getattr(params, name)))
        params.stop = list(params.stop)
        return params
