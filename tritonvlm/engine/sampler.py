"""Next-token choice for a batch of sequences, each with its own sampling parameters.

Rows never mix: penalties, temperature, top-k/top-p and the draw are computed row by row, and the
batched argmax of plain greedy rows is a row-wise reduction, so a NaN or an inf in one row cannot
change another row's token. A row that cannot be sampled (its logits hold NaN or +inf, or its
probabilities are not a distribution) does not raise: it is reported in ``failures`` (row index →
reason) so that the engine ends that one sequence with an error, and gets a stand-in token so the
batch goes on.

Fault injection (tests only, off by default): when ``TRITONVLM_FAULT_NAN_REQUESTS`` is set in the
environment, the logits of every sequence whose request id contains that text are replaced by NaN
once it has generated :data:`FAULT_AFTER_TOKENS` tokens: one row of a running batch fails mid-stream.
"""

from __future__ import annotations

import logging
import os

import torch

from tritonvlm.engine.guided import mask_logits
from tritonvlm.engine.sequence import Sequence

log = logging.getLogger("tritonvlm.engine.sampler")

FAULT_ENV = "TRITONVLM_FAULT_NAN_REQUESTS"
FAULT_AFTER_TOKENS = 2
_fault_pattern: str | None = os.environ.get(FAULT_ENV) or None


def set_fault_pattern(pattern: str | None) -> None:
    """Poison the rows of requests whose id contains ``pattern`` (``None``: off). For tests."""
    global _fault_pattern
    _fault_pattern = pattern or None


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A per-request random stream: seeded requests reproduce whatever else shares the batch."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """Repetition (HF semantics, over prompt + output), presence and frequency (OpenAI, over output)."""
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.prompt_ids) | set(seq.output_ids)), device=logits.device)
        picked = logits[seen]
        logits[seen] = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.output_ids:
        ids, counts = torch.tensor(seq.output_ids, device=logits.device).unique(return_counts=True)
        logits[ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty
    return logits


class RowSamplingError(ValueError):
    """One row of logits cannot be sampled."""


def sample_row(logits: torch.Tensor, seq: Sequence) -> int:
    """Pick one token from a row of logits (float32, [vocab]).

    Raises RowSamplingError when the row (after penalties and temperature) is not a distribution.
    """
    p = seq.params
    if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
        logits = apply_penalties(logits.clone(), seq)
    if p.greedy:
        if torch.isnan(logits).any():
            raise RowSamplingError("the logits hold NaN")
        return int(torch.argmax(logits))
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
        drop = cumulative - sorted_probs > p.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0.0:
        raise RowSamplingError("the probabilities are not finite (NaN or inf in the logits)")
    return int(torch.multinomial(probs, 1, generator=seq.generator))


def _stand_in(logits: torch.Tensor) -> int:
    """A token for a failed row, so that the batch can go on (the engine ends that sequence)."""
    finite = torch.nan_to_num(logits, nan=float("-inf"), posinf=float("-inf"))
    return int(torch.argmax(finite))


def _poison(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    pattern = _fault_pattern
    rows = [
        i
        for i, s in enumerate(seqs)
        if pattern and pattern in s.request_id and len(s.output_ids) >= FAULT_AFTER_TOKENS
    ]
    if rows:
        logits = logits.clone()
        logits[rows] = float("nan")
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence], failures: dict[int, str] | None = None) -> list[int]:
    """One token per row. Greedy rows without penalties share a single argmax.

    A row that cannot be sampled gets a stand-in token and, when ``failures`` is given, an entry
    ``row index → reason`` there: the caller must end that sequence with an error (the stand-in token
    is not a sample). Rows never affect one another.
    """
    logits = mask_logits(logits.float(), [s.guide for s in seqs])  # constrained rows only
    if _fault_pattern:
        logits = _poison(logits, seqs)
    # +inf and NaN are never valid logits (-inf is: a masked token). One batched check, row-wise.
    bad_rows = (torch.isnan(logits) | torch.isposinf(logits)).any(dim=-1)
    plain_greedy = [
        s.params.greedy
        and s.params.repetition_penalty == 1.0
        and not s.params.presence_penalty
        and not s.params.frequency_penalty
        for s in seqs
    ]
    argmax = torch.argmax(logits, dim=-1).tolist() if any(plain_greedy) else None
    bad = bad_rows.tolist()
    tokens: list[int] = []
    for i, seq in enumerate(seqs):
        reason: str | None = None
        if bad[i]:
            reason = "the model produced NaN or inf logits"
        elif plain_greedy[i]:
            assert argmax is not None
            tokens.append(argmax[i])
            continue
        else:
            try:
                tokens.append(sample_row(logits[i], seq))
                continue
            except Exception as exc:  # noqa: BLE001 - one row's failure must not end the batch
                reason = f"sampling failed: {exc}"
        log.error("request %s: %s; ending it", seq.request_id, reason)
        if failures is not None:
            failures[i] = reason
        tokens.append(_stand_in(logits[i]))
    return tokens
