"""What the engine's overlap of host and device work leaves outstanding: with async output, tokens
recorded whose text is not sent yet (:class:`PendingOutput`); with async scheduling, tokens the device
has chosen that are not recorded yet (:class:`InflightStep`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tritonvlm.engine.device_sampling import DeviceSample
from tritonvlm.engine.sequence import Sequence


@dataclass(slots=True)
class PendingOutput:
    """A token recorded in its sequence whose text has not been made and sent yet. ``finish``: the
    reason the token alone ends the sequence (end of sequence, max_tokens, the grammar complete; a stop
    string is found with the text); ``eos``: it is an end-of-sequence token (no text of its own)."""

    seq: Sequence
    token: int
    finish: str | None
    eos: bool
    logprobs: list | None


@dataclass
class InflightPart:
    """Tokens chosen on the device (async scheduling) and not recorded yet: of a decode step, or the
    first tokens of prompts just prefilled (``prefill``); row i is ``batch[i]``'s."""

    batch: list[Sequence]
    sample: DeviceSample
    started: float
    prefill: bool = False


@dataclass
class InflightStep:
    """What the device computes and the host has not recorded: a decode step, the first tokens of a
    prefill, or both. Row ``i`` of :attr:`tokens` is part by part, batch by batch."""

    parts: list[InflightPart]

    @property
    def tokens(self) -> torch.Tensor:
        if len(self.parts) == 1:
            return self.parts[0].sample.tokens
        return torch.cat([part.sample.tokens for part in self.parts])

    @property
    def rows(self) -> int:
        return sum(len(part.batch) for part in self.parts)
