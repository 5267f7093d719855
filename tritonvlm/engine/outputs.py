"""The way out of the engine: a chosen token recorded in its sequence (with its grammar, the end of the
sequence by token or length, its logprobs), its text made, and both sent through the request's
callback as one :class:`EngineOutput`."""

from __future__ import annotations

import logging

import torch

from tritonvlm.engine.engine_stats import EngineStats
from tritonvlm.engine.logprobs import LogprobsRow, TokenTexts, logprobs_entry, token_logprobs
from tritonvlm.engine.overlap import PendingOutput
from tritonvlm.engine.sequence import EngineOutput, Sequence

log = logging.getLogger("tritonvlm.engine")


class OutputPath:
    """The requests not finished yet (``open``, by id), the recorded tokens whose text has not gone out
    (``pending``: with async output it is made while the device computes the next step), and the running
    sequences their text has ended (``stopped``: the engine retires them once the device is done with
    their slots). Everything here runs on the engine's thread."""

    def __init__(self, stop_ids: set[int], token_texts: TokenTexts, stats: EngineStats) -> None:
        self.stop_ids = stop_ids
        self.token_texts = token_texts
        self.stats = stats
        self.open: dict[str, Sequence] = {}
        self.pending: list[PendingOutput] = []
        self.stopped: list[tuple[Sequence, bool]] = []  # (sequence, ended without an error)

    def record(
        self, seq: Sequence, token: int, logits: torch.Tensor | None, row: LogprobsRow | None = None
    ) -> PendingOutput:
        """Append ``token`` to ``seq`` (and its grammar); whether the token alone ends it; its logprobs
        (from its row of ``logits``, or ``row`` computed on the device)."""
        seq.output_ids.append(token)
        guided_end = seq.guide is not None and seq.guide.advance(token)  # its grammar is complete
        eos = token in self.stop_ids and (guided_end or not seq.params.ignore_eos)
        finish = None
        if eos or guided_end:
            finish = "stop"
        elif len(seq.output_ids) >= seq.params.max_tokens:
            finish = "length"
        logprobs = None
        if seq.params.logprobs and row is not None:
            logprobs = [logprobs_entry(token, row, seq.params.top_logprobs, self.token_texts)]
        elif seq.params.logprobs and logits is not None:
            logprobs = [token_logprobs(logits, token, seq.params.top_logprobs, self.token_texts)]
        return PendingOutput(seq, token, finish, eos, logprobs)

    def publish(self, only: Sequence | None = None) -> bool:
        """Make the text of the pending tokens (of ``only``, if given) and send it. Running sequences
        that their text ends (a stop string, an error) join ``stopped`` (but ``only``: returns whether
        it ended, for the caller to retire)."""
        if not self.pending:
            return False
        if only is None:
            entries, self.pending = self.pending, []
        else:
            entries = [e for e in self.pending if e.seq is only]
            self.pending = [e for e in self.pending if e.seq is not only]
        ended = False
        for entry in entries:
            if entry.seq.closed:  # cancelled or failed since
                continue
            reason = self.publish_one(entry)
            if reason is not None and entry.finish is None:  # it was still running
                ended = True
                if only is None:
                    self.stopped.append((entry.seq, reason != "error"))
        return ended

    def publish_one(self, entry: PendingOutput) -> str | None:
        """Send one recorded token's text; the finish reason when this ends its sequence."""
        seq, finish = entry.seq, entry.finish
        try:
            if entry.eos:
                text = seq.detokenizer.finish()
            else:
                text = seq.detokenizer.add_token(entry.token)
                if seq.detokenizer.stopped:
                    finish = "stop"
                if finish:
                    text += seq.detokenizer.finish()
        except Exception as exc:
            log.exception("could not turn a token of %s into text", seq.request_id)
            self.finish(seq, "error", error=f"internal error while decoding this request: {exc}")
            return "error"
        self.emit(seq, text, [entry.token], finish, logprobs=entry.logprobs)
        if finish:
            self.open.pop(seq.request_id, None)
            self.stats.requests_finished += 1
        return finish

    def take_stopped(self) -> list[tuple[Sequence, bool]]:
        """The sequences :meth:`publish` found ended since the last call."""
        stopped, self.stopped = self.stopped, []
        return stopped

    def emit(
        self,
        seq: Sequence,
        text: str,
        token_ids: list[int],
        finish: str | None,
        error: str | None = None,
        logprobs: list[dict] | None = None,
    ) -> None:
        """Send ``seq`` one output (nothing once its final one has gone out). A callback that raises
        cancels its request; the batch goes on."""
        if seq.closed:
            return
        seq.sent_tokens += len(token_ids)
        out = EngineOutput(
            request_id=seq.request_id,
            text=text,
            token_ids=token_ids,
            finish_reason=finish,
            prompt_tokens=seq.prompt_len,
            completion_tokens=seq.sent_tokens,
            cached_tokens=seq.cached_len,
            error=error,
            logprobs=logprobs,
        )
        if finish is not None:
            seq.closed = True
        try:
            seq.on_output(out)
        except Exception:  # a broken response channel must not take the batch down
            log.exception("output callback failed for %s; cancelling it", seq.request_id)
            seq.cancel_requested = True

    def finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """End ``seq`` with ``reason`` ("cancelled", "error") and no more text."""
        if seq.closed:
            return
        if reason == "cancelled":
            self.stats.requests_cancelled += 1
        elif reason == "error":
            self.stats.requests_failed += 1
        self.open.pop(seq.request_id, None)
        self.emit(seq, "", [], reason, error)
