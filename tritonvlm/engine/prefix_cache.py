"""Prefix cache: the keys/values of recently finished sequences, kept in spare rows of the KV cache, so
a new request whose prompt starts with the same tokens (a system prompt, the same image, the earlier
turns of a conversation) copies them instead of computing them again.

An entry remembers the tokens whose keys/values its row holds (the prompt and the generated tokens
fed back) and a digest of the sequence's multimodal tensors. Image placeholder tokens are the same
ids whatever the image, so a match may run past a prompt's first placeholder only when both
requests carry the same images (same digest); otherwise it stops there.

The cache never holds back a request: its rows are its own (counted in the KV budget), and storing a
finished sequence overwrites the least recently used entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

# A shorter match saves less than the copy costs (and every chat prompt shares its first few tokens).
MIN_MATCH_TOKENS = 8


def mm_digest(mm: dict[str, torch.Tensor]) -> bytes | None:
    """A digest of a request's multimodal tensors (None without any): equal digests, equal images."""
    if not mm:
        return None
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(mm):
        tensor = mm[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.digest()


def first_placeholder(ids: list[int], placeholder_ids: frozenset[int]) -> int:
    """Index of the first image placeholder token in ``ids`` (``len(ids)`` when there is none)."""
    for n, token in enumerate(ids):
        if token in placeholder_ids:
            return n
    return len(ids)


@dataclass
class PrefixEntry:
    row: int  # KV cache row holding the keys/values of ``tokens``
    tokens: list[int]
    digest: bytes | None
    first_image: int  # index of the first image placeholder in ``tokens`` (len(tokens) if none)
    last_used: int = 0


@dataclass
class PrefixMatch:
    row: int
    length: int  # leading prompt tokens whose keys/values the row holds


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """Entries in KV rows ``rows``; ``copy(src_row, dst_row, length)`` copies a row's first ``length``
    columns in every layer (the KV cache's ``move``)."""

    def __init__(self, rows: Iterable[int], copy: Callable[[int, int, int], None]) -> None:
        self.free_rows = list(rows)
        self.capacity = len(self.free_rows)
        self.copy = copy
        self.entries: list[PrefixEntry] = []
        self._clock = 0
        self.queries = 0
        self.hits = 0
        self.hit_tokens = 0
        self.query_tokens = 0

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def match(self, prompt: list[int], digest: bytes | None, first_image: int) -> PrefixMatch | None:
        """The longest usable cached prefix of ``prompt`` (at most all but its last token, which must
        be computed for its logits); None below :data:`MIN_MATCH_TOKENS`."""
        if not self.enabled:
            return None
        self.queries += 1
        self.query_tokens += len(prompt)
        best: PrefixMatch | None = None
        best_entry: PrefixEntry | None = None
        for entry in self.entries:
            n = common_prefix(entry.tokens, prompt)
            if entry.digest != digest:
                n = min(n, entry.first_image, first_image)
            n = min(n, len(prompt) - 1)
            if n >= MIN_MATCH_TOKENS and (best is None or n > best.length):
                best, best_entry = PrefixMatch(entry.row, n), entry
        if best_entry is not None:
            best_entry.last_used = self._tick()
            self.hits += 1
            self.hit_tokens += best.length
        return best

    def store(self, src_row: int, tokens: list[int], digest: bytes | None, first_image: int) -> None:
        """Keep the keys/values of ``tokens`` (held in KV row ``src_row``) as an entry, unless an entry
        already covers them; the least recently used entry makes room."""
        if not self.enabled or len(tokens) < MIN_MATCH_TOKENS:
            return
        for entry in self.entries:
            if entry.digest == digest and common_prefix(entry.tokens, tokens) == len(tokens):
                entry.last_used = self._tick()
                return
        # An entry that is a prefix of the new tokens is superseded: reuse its row first.
        superseded = [
            e for e in self.entries if e.digest == digest and common_prefix(e.tokens, tokens) == len(e.tokens)
        ]
        if superseded:
            victim = superseded[0]
            self.entries.remove(victim)
            row = victim.row
        elif self.free_rows:
            row = self.free_rows.pop()
        else:
            victim = min(self.entries, key=lambda e: e.last_used)
            self.entries.remove(victim)
            row = victim.row
        self.copy(src_row, row, len(tokens))
        first_image = min(first_image, len(tokens))
        self.entries.append(PrefixEntry(row, list(tokens), digest, first_image, self._tick()))

    @property
    def tokens_held(self) -> int:
        return sum(len(e.tokens) for e in self.entries)
