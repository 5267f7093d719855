"""Incremental detokenization: text deltas that never split a UTF-8 character, with stop strings."""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHAR = "\ufffd"
WINDOW_CONTEXT = 6  # tokens decoded before the new ones when the window path takes over mid-stream


def _decode_stream(tokenizer: Any) -> tuple[Any, Any] | None:
    """``(tokenizers' Rust DecodeStream, the backend tokenizer)`` for a fast tokenizer whose decode
    needs no Python post-processing, else None."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    try:
        from tokenizers import Tokenizer
        from tokenizers.decoders import DecodeStream
    except ImportError:  # tokenizers < 0.21
        return None
    if not isinstance(backend, Tokenizer):
        return None
    return DecodeStream(skip_special_tokens=True), backend


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decoding token by token breaks multi-byte characters that byte-level BPE splits across tokens, so
    each step decodes a short window of recent tokens and emits only the text past what the window's
    prefix already produced, holding back while the tail is an incomplete character (U+FFFD).
    Stop strings are matched on the whole text, so they are found across token boundaries, and any
    text that could still become a stop string is held back until it cannot.

    With a fast tokenizer the window work is done by tokenizers' own ``DecodeStream`` (Rust, ~1 µs a
    token instead of two Python ``decode`` calls, ~7 µs: at 256 sequences a step that is milliseconds).
    """

    def __init__(self, tokenizer: Any, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._parts: list[str] = []  # all decoded text (cut at a stop string once one is found)
        self._sent = 0  # characters of self.text already handed out
        self.stopped = False
        self._stream = _decode_stream(tokenizer)
        self._pending = 0  # with the stream: index of the first token not yet in self.text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add_token(self, token_id: int) -> str:
        """Feed one generated token; return the text that is now safe to send (possibly "")."""
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        if self._stream is not None:
            stream, backend = self._stream
            try:
                piece = stream.step(backend, token_id)
            except Exception:  # e.g. "Invalid prefix" after bytes that are not UTF-8: the window path
                self._stream = None
                self._read_offset = self._pending
                self._prefix_offset = max(0, self._pending - WINDOW_CONTEXT)
            else:
                if piece is None:  # (nothing new: nothing more to send)
                    return ""
                self._pending = len(self.token_ids)
                self._parts.append(piece)
                if not self.stop:  # (the common case, per token of every stream: all of it is sent)
                    self._sent += len(piece)
                    return piece
                return self._release(final=False)
        prefix_text = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.token_ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            self._parts.append(new_text[len(prefix_text) :])
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
        return self._release(final=False)

    @property
    def text(self) -> str:
        """All text decoded so far (appended piece by piece: one copy of it when it is read)."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @text.setter
    def text(self, value: str) -> None:
        self._parts = [value]

    def finish(self) -> str:
        """The text still held back, to be sent with the final response."""
        if not self.stopped and self._stream is not None:
            if self._pending < len(self.token_ids):  # an incomplete character: decoded as is
                whole = self._decode(self.token_ids)
                if whole.startswith(self.text):
                    self.text = whole
            self._check_stop()
        elif not self.stopped:
            # Whatever is left undecoded (an incomplete character) is decoded as is.
            tail = self._decode(self.token_ids[self._prefix_offset :])
            head = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
            if len(tail) > len(head):
                self._parts.append(tail[len(head) :])
                self._read_offset = len(self.token_ids)
                self._prefix_offset = self._read_offset
            self._check_stop()
        return self._release(final=True)

    def _check_stop(self) -> bool:
        if not self.stop or self.stopped:
            return self.stopped
        start = max(0, self._sent - self._max_stop)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
        return self.stopped

    def _release(self, final: bool) -> str:
        self._check_stop()
        end = len(self.text)
        if not final and not self.stopped and self.stop:
            end -= self._held_back()
        end = max(end, self._sent)
        delta = self.text[self._sent : end]
        self._sent = end
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        text = self.text
        for n in range(min(self._max_stop - 1, len(text) - self._sent), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
