"""One request's state inside the engine: its prompt, its multimodal tensors, what it has generated."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tritonvlm.engine.detokenizer import IncrementalDetokenizer
from tritonvlm.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class EngineOutput:
    """What the engine reports for one sequence after a step (streamed to the client as one response)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None  # None while running; "stop", "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    error: str | None = None
    logprobs: list[dict] | None = None  # one OpenAI logprobs entry per token in token_ids, if asked

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


OutputCallback = Callable[[EngineOutput], None]


@dataclass
class Sequence:
    """A request in the engine. ``slot`` is its row in the KV cache while it runs."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_output: OutputCallback
    detokenizer: IncrementalDetokenizer
    # The family's multimodal tensors from the vision encoder ("image_embeds" [tokens, hidden], ...).
    mm: dict[str, torch.Tensor] = field(default_factory=dict)
    is_cancelled: Callable[[], bool] | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    slot: int = -1
    next_position: int = 0  # rope position of the next token (M-RoPE: the same on every axis)
    generator: torch.Generator | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    cancel_requested: bool = False
    closed: bool = False  # its final output went out: nothing more is sent for it
    sent_tokens: int = 0  # output tokens sent to the client (with async output, some may be recorded only)
    # Async scheduling: decode steps launched whose token for this sequence is not recorded yet (their
    # keys count as held), and its row in the latest of them (where the next step takes its token).
    inflight: int = 0
    inflight_row: int = -1
    guide: Any = None  # a constrained sequence's grammar state (tritonvlm.engine.guided.Guide)
    # Prefix cache: where each image's placeholders start and its digest (set when the cache is on;
    # see prefix_cache.ImageMarks), and how many leading prompt tokens were copied from a cached prefix
    # instead of computed.
    image_marks: tuple[tuple[int, bytes], ...] = ()
    cached_len: int = 0
    # Prefill progress: tokens whose keys/values are in the slot, and where the next prefill forward
    # stops (``prefill_target`` unless a long prompt is prefilled in chunks).
    prefilled: int = 0
    prefill_end: int = 0
    # Where the prefill ends a chunk for the prefix cache to keep the prompt's start with the sliding
    # layers' rings there (0: nowhere; see prefix_cache.RingBranches).
    branch_at: int = 0

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def prefill_target(self) -> int:
        """Tokens a prefill must put in the cache: the prompt; for a sequence resumed after preemption,
        the prompt and every output token but the last (which the next decode step feeds)."""
        return self.prompt_len + max(0, len(self.output_ids) - 1)

    @property
    def resumed(self) -> bool:
        """A preempted sequence being brought back (its prefill recomputes, it samples nothing)."""
        return bool(self.output_ids)

    @property
    def context_ids(self) -> list[int]:
        """The ``prefill_target`` tokens."""
        return self.prompt_ids + self.output_ids[:-1] if self.output_ids else self.prompt_ids

    @property
    def prefill_range(self) -> tuple[int, int]:
        """The tokens the next prefill forward computes: ``[start, end)``."""
        return self.prefilled, self.prefill_end or self.prefill_target

    @property
    def num_tokens(self) -> int:
        """Tokens held in the KV cache once the last output token (recorded or still on the device)
        has been fed back."""
        return len(self.prompt_ids) + len(self.output_ids) + self.inflight

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    def wants_cancel(self) -> bool:
        """True once the client has gone away or the engine was told to drop this request."""
        if self.cancel_requested:
            return True
        if self.is_cancelled is not None and self.is_cancelled():
            self.cancel_requested = True
        return self.cancel_requested
