"""Sampling that leaves its tokens on the device, for async scheduling: the next decode step takes
them from there, and the host reads them (one copy, waited for later) while that step runs.

Nothing here waits for the device: inputs built on the host go over from pinned memory without
blocking, and the draw of a sampled row is the exponential-race form of a multinomial draw
(``argmax(probs / Exponential(1))``, the form ``torch.multinomial`` itself uses for one sample, less its
host-side check of the probabilities). Rows whose logits hold NaN or +inf, or whose probabilities are
not a distribution, get a stand-in token and a status the engine reads with the tokens (it then ends
that sequence alone with an error, as :func:`tritonvlm.engine.sampler.sample` reports them).

Every row is sampled here: greedy rows together; temperature / top-k / top-p rows without a seed or
penalties together; a seeded or penalised row alone, with its own generator, drawing exactly the token
``torch.multinomial`` draws from it on the host (penalties counted on the device, the last token, still
on the device, included); and the log probabilities of rows that ask for them. A constrained row (a
grammar) is masked first, as the host sampler masks it: its grammar must have seen its last token, so
the engine records the step before (while this step's forward runs) before it samples such a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tritonvlm.engine import sampler
from tritonvlm.engine.guided import mask_logits
from tritonvlm.engine.logprobs import LogprobsRow
from tritonvlm.engine.sequence import Sequence
from tritonvlm.modeling.device import device_tensor

SAMPLED, BAD_LOGITS, NOT_A_DISTRIBUTION = 0, 1, 2
REASONS = {
    BAD_LOGITS: "the model produced NaN or inf logits",
    NOT_A_DISTRIBUTION: "sampling failed: the probabilities are not finite (NaN or inf in the logits)",
}


def awaits_its_grammar(seq: Sequence) -> bool:
    """Whether ``seq``'s row cannot be masked yet: it has a grammar (and has not ended) and its last
    token is still on the device; the engine must record it first."""
    return seq.guide is not None and not seq.closed and bool(seq.inflight)


@dataclass
class DeviceSample:
    """One step's tokens on the device (``tokens`` [rows], long), and their copy on its way to the host
    (with the log probabilities of the rows that asked for them: ``_logprob_rows``)."""

    tokens: torch.Tensor
    _host: torch.Tensor  # [2, rows]: tokens, status
    _copied: torch.cuda.Event | None
    _logprob_rows: list[int] = field(default_factory=list)
    _logprobs: tuple[torch.Tensor, ...] = ()  # on the host: chosen [k], top values and ids [k, top]

    def result(self) -> tuple[list[int], dict[int, str], dict[int, LogprobsRow]]:
        """The tokens as a list, ``{row: reason}`` for rows that could not be sampled, and ``{row:
        (the token's logprob, [(logprob, token), ...] of the most likely ones)}`` for rows with
        logprobs (waits for the device to finish the step)."""
        if self._copied is not None:
            self._copied.synchronize()
        tokens, status = self._host.tolist()
        failures = {row: REASONS[code] for row, code in enumerate(status) if code != SAMPLED}
        logprobs: dict[int, LogprobsRow] = {}
        if self._logprob_rows:
            chosen, values, ids = (t.tolist() for t in self._logprobs)
            for j, row in enumerate(self._logprob_rows):
                logprobs[row] = (chosen[j], list(zip(values[j], ids[j], strict=True)))
        return tokens, failures, logprobs


def sample_on_device(
    logits: torch.Tensor, seqs: list[Sequence], previous: torch.Tensor | None = None
) -> DeviceSample:
    """One token per row of ``logits``, left on the device. ``previous``: the tokens of the step before,
    where a sequence's last token still is (``Sequence.inflight``; penalties count it). A constrained
    row's grammar must have seen its last token (raises RuntimeError if it is still on the device);
    rows of sequences already ended are not masked (their tokens are dropped)."""
    logits = raw = logits.float()
    if any(awaits_its_grammar(seq) for seq in seqs):
        raise RuntimeError("a constrained row's last token is not recorded: its grammar cannot mask it")
    logits = mask_logits(logits, [None if seq.closed else seq.guide for seq in seqs])
    if sampler.fault_pattern():
        logits = sampler.poison(logits, seqs)
    device = logits.device
    status = (torch.isnan(logits) | torch.isposinf(logits)).any(dim=-1).to(torch.long) * BAD_LOGITS
    tokens = torch.argmax(logits, dim=-1)
    shared = [i for i, seq in enumerate(seqs) if sampler.shares_a_draw(seq.params)]
    if shared:
        rows = device_tensor(shared, torch.long, device)
        picked, ok = sampler.draw_shared(logits.index_select(0, rows), [seqs[i].params for i in shared])
        tokens, status = _place(tokens, status, rows, picked, ok)
    alone = [i for i, seq in enumerate(seqs) if sampler.picked_alone(seq.params)]
    if alone:
        drawn_alone = [sampler.pick_row(logits[i], seqs[i], previous) for i in alone]
        picked, ok = (torch.stack(t) for t in zip(*drawn_alone, strict=True))
        tokens, status = _place(tokens, status, device_tensor(alone, torch.long, device), picked, ok)
    with_logprobs = [i for i, seq in enumerate(seqs) if seq.params.logprobs]
    on_device = [torch.stack([tokens, status])]
    if with_logprobs:
        top = max(seqs[i].params.top_logprobs for i in with_logprobs)
        on_device += _logprobs(raw, tokens, with_logprobs, top)
    if device.type != "cuda":
        return DeviceSample(tokens, on_device[0], None, with_logprobs, tuple(on_device[1:]))
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in on_device]
    for copy, t in zip(host, on_device, strict=True):
        copy.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return DeviceSample(tokens, host[0], copied, with_logprobs, tuple(host[1:]))


def _place(
    tokens: torch.Tensor, status: torch.Tensor, rows: torch.Tensor, picked: torch.Tensor, ok: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens`` with ``picked`` at ``rows``; ``status`` with rows whose draw was not a distribution
    (``~ok``) marked so (a row already marked keeps its mark)."""
    failed = torch.zeros_like(status).index_copy(0, rows, (~ok).to(torch.long) * NOT_A_DISTRIBUTION)
    return tokens.index_copy(0, rows, picked), torch.where(status == SAMPLED, failed, status)


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: list[int], top: int) -> list[torch.Tensor]:
    """For ``rows``: each one's token's log probability, and the ``top`` most likely tokens' (values
    and ids), as ``logprobs.token_logprobs`` computes them."""
    index = device_tensor(rows, torch.long, logits.device)
    logp = torch.log_softmax(logits.index_select(0, index), dim=-1)
    chosen = logp.gather(1, tokens.index_select(0, index)[:, None])[:, 0]
    top = min(top, logp.shape[-1])
    if top == 0:
        empty = logp.new_empty(len(rows), 0)
        return [chosen, empty, empty.long()]
    values, ids = torch.topk(logp, top, dim=-1)
    return [chosen, values, ids]
