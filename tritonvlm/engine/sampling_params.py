"""Per-request sampling parameters, as carried in the PARAMETERS JSON of `vlm` and `llm` requests."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from tritonvlm.wire import InvalidRequestError

DEFAULT_MAX_TOKENS = 256


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

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first out-of-range field."""
        if self.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1", "max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequestError("temperature must be between 0 and 2", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p must be in (0, 1]", "top_p")
        if self.top_k < 0:
            raise InvalidRequestError("top_k must be >= 0 (0 disables it)", "top_k")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequestError(f"{name} must be between -2 and 2", name)
        if self.repetition_penalty <= 0.0:
            raise InvalidRequestError("repetition_penalty must be > 0", "repetition_penalty")
        if not 0 <= self.top_logprobs <= 20:
            raise InvalidRequestError("top_logprobs must be between 0 and 20", "top_logprobs")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", "top_logprobs")
        if len(self.stop) > 4 or any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop must be up to 4 non-empty strings", "stop")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        """Build from a JSON object, ignoring keys that are not sampling parameters."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known and v is not None}
        if isinstance(kwargs.get("stop"), str):
            kwargs["stop"] = [kwargs["stop"]]
        try:
            params = cls(**kwargs)
            params.max_tokens = int(params.max_tokens)
            params.temperature = float(params.temperature)
            params.top_p = float(params.top_p)
            params.top_k = int(params.top_k)
            params.presence_penalty = float(params.presence_penalty)
            params.frequency_penalty = float(params.frequency_penalty)
            params.repetition_penalty = float(params.repetition_penalty)
            params.seed = None if params.seed is None else int(params.seed)
            params.stop = list(params.stop)
            params.top_logprobs = int(params.top_logprobs)
            params.logprobs = bool(params.logprobs)
            params.ignore_eos = bool(params.ignore_eos)
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(f"bad sampling parameter: {exc}", "parameters") from exc
        params.validate()
        return params
