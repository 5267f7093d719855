"""Next-token choice for a batch of sequences, each with its own sampling parameters.

Rows never mix: plain greedy rows share one argmax and unseeded sampled rows without penalties share
one temperature / top-k / top-p / draw pass over the batch (both row-wise operations: a GPU step at
batch 256 would otherwise spend tens of milliseconds in per-row kernels and host round trips); seeded
rows, whose draws must not depend on the rest of the batch, and rows with penalties are sampled row by
row with their own generator. A NaN or an inf in one row cannot change another row's token. A row
that cannot be sampled (its logits hold NaN or +inf, or its probabilities are not a distribution)
does not raise: it is reported in ``failures`` (row index →
reason) so that the engine ends that one sequence with an error, and gets a stand-in token so the
batch goes on.

Fault injection (tests only, off by default): when ``TRITONVLM_FAULT_NAN_REQUESTS`` is set in the
environment, the logits of every sequence whose request id contains that text are replaced by NaN
once it has generated :data:`FAULT_AFTER_TOKENS` tokens: one row of a running batch fails mid-stream.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from tritonvlm.engine.guided import mask_logits
from tritonvlm.engine.sequence import Sequence
from tritonvlm.modeling.device import device_tensor

log = logging.getLogger("tritonvlm.engine.sampler")

FAULT_ENV = "TRITONVLM_FAULT_NAN_REQUESTS"
FAULT_AFTER_TOKENS = 2
_fault_pattern: str | None = os.environ.get(FAULT_ENV) or None


def set_fault_pattern(pattern: str | None) -> None:
    """Poison the rows of requests whose id contains ``pattern`` (``None``: off). For tests."""
    global _fault_pattern
    _fault_pattern = pattern or None


def fault_pattern() -> str | None:
    """The fault-injection pattern in force (``None``: off)."""
    return _fault_pattern


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A per-request random stream: seeded requests reproduce whatever else shares the batch."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def has_penalties(p: Any) -> bool:
    """Whether sampling params ``p`` ask for a repetition, presence or frequency penalty."""
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)


def apply_penalties(
    logits: torch.Tensor, seq: Sequence, previous: torch.Tensor | None = None
) -> torch.Tensor:
    """Repetition (HF semantics, over prompt + output), presence and frequency (OpenAI, over output),
    with the tokens counted on the device: the recorded outputs, and the last one where it is still on
    the device (``Sequence.inflight``: its row in ``previous``, the step before's tokens). Prompt ids
    past the logits' width (tokens the model reads but never writes, e.g. Llama 3.2 Vision's
    ``<|image|>``) have no logit to penalise."""
    p, device, vocab = seq.params, logits.device, logits.shape[-1]
    outputs = device_tensor(seq.output_ids, torch.long, device)
    if seq.inflight:
        assert previous is not None
        outputs = torch.cat([outputs, previous[seq.inflight_row : seq.inflight_row + 1]])
    counts = torch.zeros(vocab, dtype=logits.dtype, device=device)
    counts.scatter_add_(0, outputs, torch.ones(outputs.shape, dtype=logits.dtype, device=device))
    if p.repetition_penalty != 1.0:
        prompt = device_tensor([t for t in seq.prompt_ids if t < vocab], torch.long, device)
        seen = counts.index_fill(0, prompt, 1.0) > 0
        r = p.repetition_penalty
        logits = torch.where(seen, torch.where(logits < 0, logits * r, logits / r), logits)
    if p.presence_penalty or p.frequency_penalty:
        logits = logits - (p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype))
    return logits


class RowSamplingError(ValueError):
    """One row of logits cannot be sampled."""


def pick_row(
    logits: torch.Tensor, seq: Sequence, previous: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's token on its device, without waiting for it: penalties, then the argmax (greedy) or
    the draw ``torch.multinomial(probs, 1, generator)`` makes from :func:`row_probabilities` with the
    row's own generator (its exponential race, the same token, without its host-side check);
    ``(token, whether the row could be picked)``. ``previous``: see :func:`apply_penalties`."""
    p = seq.params
    if has_penalties(p):
        logits = apply_penalties(logits, seq, previous)
    if p.greedy:
        return logits.argmax(), ~torch.isnan(logits).any()
    probs = row_probabilities(logits, p)
    ok = torch.isfinite(probs).all() & (probs.sum() > 0)
    probs = torch.where(ok, probs, torch.ones_like(probs))  # (a stand-in the draw can take)
    return (probs / torch.empty_like(probs).exponential_(generator=seq.generator)).argmax(), ok


def sample_row(logits: torch.Tensor, seq: Sequence) -> int:
    """Pick one token from a row of logits (float32, [vocab]) (:func:`pick_row`).

    Raises RowSamplingError when the row (after penalties and temperature) is not a distribution.
    """
    token, ok = pick_row(logits, seq)
    if not bool(ok):
        if seq.params.greedy:
            raise RowSamplingError("the logits hold NaN")
        raise RowSamplingError("the probabilities are not finite (NaN or inf in the logits)")
    return int(token)


def row_probabilities(logits: torch.Tensor, p: Any) -> torch.Tensor:
    """The distribution one row is drawn from: temperature, then top-k (ties at the k-th value kept),
    then top-p (the smallest prefix whose mass reaches it; always at least the most likely token)."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > p.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs


def shares_a_draw(p: Any) -> bool:
    """Whether a row may be sampled together with others: temperature > 0, no seed, no penalties."""
    return not p.greedy and p.seed is None and not has_penalties(p)


def picked_alone(p: Any) -> bool:
    """Whether a row is sampled on its own (with its own generator, or its penalties): neither plain
    greedy (one argmax for all such rows) nor sharing a draw."""
    return not (p.greedy and not has_penalties(p)) and not shares_a_draw(p)


_shared_generators: dict[str, torch.Generator] = {}


def shared_generator(device: torch.device) -> torch.Generator:
    """One random stream per device for the rows that share a draw (unseeded: no reproducibility owed)."""
    key = str(device)
    if key not in _shared_generators:
        _shared_generators[key] = make_generator(None, device)
    return _shared_generators[key]


def sample_shared(logits: torch.Tensor, params: list[Any]) -> dict[int, int]:
    """``{row: token}`` of :func:`draw_shared` for the rows whose probabilities were a distribution;
    the others are left to :func:`sample_row` (which reports them)."""
    picked, ok = draw_shared(logits, params)
    return {
        row: token for row, (token, good) in enumerate(zip(picked.tolist(), ok.tolist(), strict=True)) if good
    }


def draw_shared(logits: torch.Tensor, params: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, top-k, top-p and the draw for many rows at once (unseeded, no penalties: the shared
    generator), from the distribution :func:`row_probabilities` gives each row, without waiting for
    the device. Rows are grouped by what they need (nothing; top-k, over the largest k only; top-p
    alone, over the sorted vocabulary), one pass per group. ``(tokens, whether each row's
    probabilities were a distribution)``."""
    device, vocab = logits.device, logits.shape[-1]
    groups: dict[str, list[int]] = {"plain": [], "top_k": [], "sorted": []}
    for i, p in enumerate(params):
        groups["top_k" if 0 < p.top_k < vocab else "sorted" if p.top_p < 1.0 else "plain"].append(i)
    picked = torch.zeros(len(params), dtype=torch.long, device=device)
    ok = torch.zeros(len(params), dtype=torch.bool, device=device)
    for kind, rows in groups.items():
        if rows:
            index = device_tensor(rows, torch.long, device)
            tokens, good = _draw(logits.index_select(0, index), [params[i] for i in rows], kind)
            picked, ok = picked.index_copy(0, index, tokens), ok.index_copy(0, index, good)
    return picked, ok


def _draw(logits: torch.Tensor, params: list[Any], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One group of :func:`draw_shared`: ``(tokens, whether each row was a distribution)``."""
    device = logits.device
    temperature = device_tensor([p.temperature for p in params], logits.dtype, device)
    logits = logits / temperature[:, None]
    order = None
    if kind == "top_k":
        top_k = [p.top_k for p in params]
        logits, order = torch.topk(logits, max(top_k), dim=-1)  # sorted, largest first
        kth = logits.gather(1, device_tensor([k - 1 for k in top_k], torch.long, device)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    elif kind == "sorted":
        logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(logits, dim=-1)
    if kind != "plain" and any(p.top_p < 1.0 for p in params):
        limit = device_tensor([p.top_p for p in params], probs.dtype, device)[:, None]
        probs = probs.masked_fill(torch.cumsum(probs, dim=-1) - probs > limit, 0.0)
    ok = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)
    probs = torch.where(ok[:, None], probs, torch.ones_like(probs))  # (a stand-in the draw can take)
    race = torch.empty_like(probs).exponential_(generator=shared_generator(device))
    picked = (probs / race).argmax(dim=-1)  # (torch.multinomial's own form for one sample)
    if order is not None:
        picked = order.gather(1, picked[:, None])[:, 0]
    return picked, ok


def _stand_in(logits: torch.Tensor) -> int:
    """A token for a failed row, so that the batch can go on (the engine ends that sequence)."""
    finite = torch.nan_to_num(logits, nan=float("-inf"), posinf=float("-inf"))
    return int(torch.argmax(finite))


def poison(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """``logits`` with the rows of the fault pattern's requests NaN (see the module docstring)."""
    pattern = _fault_pattern
    rows = [  # (tokens before this one: those recorded and those still on the device)
        i
        for i, s in enumerate(seqs)
        if pattern and pattern in s.request_id and len(s.output_ids) + s.inflight >= FAULT_AFTER_TOKENS
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
        logits = poison(logits, seqs)
    # +inf and NaN are never valid logits (-inf is: a masked token). One batched check, row-wise.
    bad_rows = (torch.isnan(logits) | torch.isposinf(logits)).any(dim=-1)
    plain_greedy = [s.params.greedy and not has_penalties(s.params) for s in seqs]
    argmax = torch.argmax(logits, dim=-1).tolist() if any(plain_greedy) else None
    bad = bad_rows.tolist()
    if argmax is not None and all(plain_greedy) and not any(bad):
        return argmax  # (the common case at large batches: no per-row work after the device's)
    shared = [i for i, s in enumerate(seqs) if not bad[i] and shares_a_draw(s.params)]
    drawn = sample_shared(logits[shared], [seqs[i].params for i in shared]) if len(shared) > 1 else {}
    batched = {row: drawn[j] for j, row in enumerate(shared) if j in drawn}
    tokens: list[int] = []
    for i, seq in enumerate(seqs):
        reason: str | None = None
        if bad[i]:
            reason = "the model produced NaN or inf logits"
        elif plain_greedy[i]:
            assert argmax is not None
            tokens.append(argmax[i])
            continue
        elif i in batched:
            tokens.append(batched[i])
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
