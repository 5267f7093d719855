"""Prefix cache: the keys/values of recent prompts (from their prefill on) and finished sequences, kept
as the KV blocks they wrote, so a new request whose prompt starts with the same tokens (a system
prompt, the same image, the earlier turns of a conversation) starts from them instead of computing
them again.

An entry holds a reference to the blocks of the tokens whose keys/values it keeps (the prompt and the
generated tokens fed back) and a digest of the sequence's multimodal tensors. A new sequence shares
the matched prefix's full blocks (no copy; nothing writes to them again) and copies the positions of
a partly matched last block into a block of its own. Image placeholder tokens are the same ids
whatever the image, so a match may run past a prompt's first placeholder only when both requests
carry the same images (same digest); otherwise it stops there.

The cache never holds back a request: when a new sequence needs the blocks its entries hold, the
least recently used entries let go of them (``evict``), and storing past ``capacity`` entries does the
same.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

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


class Blocks(Protocol):
    """Reference counting of KV blocks (the KV cache's allocator)."""

    def share(self, blocks: Sequence[int]) -> None: ...
    def release(self, blocks: Sequence[int]) -> None: ...


@dataclass
class PrefixEntry:
    blocks: list[int]  # KV blocks holding the keys/values of ``tokens`` (one reference held by the entry)
    tokens: list[int]
    digest: bytes | None
    first_image: int  # index of the first image placeholder in ``tokens`` (len(tokens) if none)
    last_used: int = 0


@dataclass
class PrefixMatch:
    entry: PrefixEntry
    length: int  # leading prompt tokens whose keys/values the entry's blocks hold


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """At most ``capacity`` entries whose blocks are counted by ``blocks`` (0: the cache is off)."""

    def __init__(self, capacity: int, blocks: Blocks, block_size: int) -> None:
        self.capacity = max(0, capacity)
        self.blocks = blocks
        self.block_size = block_size
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

    def lookup(self, prompt: list[int], digest: bytes | None, first_image: int) -> PrefixMatch | None:
        """The longest usable cached prefix of ``prompt`` (at most all but its last token, which must
        be computed for its logits); None below :data:`MIN_MATCH_TOKENS`. Changes nothing."""
        if not self.enabled:
            return None
        best: PrefixMatch | None = None
        for entry in self.entries:
            n = common_prefix(entry.tokens, prompt)
            if entry.digest != digest:
                n = min(n, entry.first_image, first_image)
            n = min(n, len(prompt) - 1)
            if n >= MIN_MATCH_TOKENS and (best is None or n > best.length):
                best = PrefixMatch(entry, n)
        return best

    def record(self, prompt_len: int, match: PrefixMatch | None) -> None:
        """A prompt of ``prompt_len`` tokens started from ``match`` (None: from nothing)."""
        if not self.enabled:
            return
        self.queries += 1
        self.query_tokens += prompt_len
        if match is not None:
            match.entry.last_used = self._tick()
            self.hits += 1
            self.hit_tokens += match.length

    def store(self, blocks: Sequence[int], tokens: list[int], digest: bytes | None, first_image: int) -> None:
        """Keep the keys/values of ``tokens``, held in ``blocks`` (position order), as an entry, unless
        an entry already covers them; an entry they extend, or the least recently used one when the
        cache is full, makes room."""
        if not self.enabled or len(tokens) < MIN_MATCH_TOKENS:
            return
        for entry in self.entries:
            if entry.digest == digest and common_prefix(entry.tokens, tokens) == len(tokens):
                entry.last_used = self._tick()
                return
        superseded = [
            e for e in self.entries if e.digest == digest and common_prefix(e.tokens, tokens) == len(e.tokens)
        ]
        for entry in superseded:
            self._drop(entry)
        while len(self.entries) >= self.capacity:
            self._drop(min(self.entries, key=lambda e: e.last_used))
        held = list(blocks[: -(-len(tokens) // self.block_size)])
        self.blocks.share(held)
        first_image = min(first_image, len(tokens))
        self.entries.append(PrefixEntry(held, list(tokens), digest, first_image, self._tick()))

    def evict(self, keep: PrefixEntry | None = None) -> bool:
        """Let go of the least recently used entry (``keep`` last of all); False when there is none."""
        if not self.entries:
            return False
        others = [e for e in self.entries if e is not keep]
        self._drop(min(others or self.entries, key=lambda e: e.last_used))
        return True

    def clear(self) -> None:
        for entry in list(self.entries):
            self._drop(entry)

    def _drop(self, entry: PrefixEntry) -> None:
        self.entries.remove(entry)
        self.blocks.release(entry.blocks)

    @property
    def tokens_held(self) -> int:
        return sum(len(e.tokens) for e in self.entries)
