"""Prefix cache: the keys/values of recent prompts (from their prefill on) and finished sequences, kept
as the KV blocks they wrote, so a new request whose prompt starts with the same tokens (a system
prompt, the same image, the earlier turns of a conversation) starts from them instead of computing
them again.

An entry holds a reference to the blocks of the tokens whose keys/values it keeps (the prompt and the
generated tokens fed back) and a digest of the sequence's multimodal tensors. A new sequence shares
the matched prefix's full blocks (no copy; nothing writes to them again) and copies the positions of
a partly matched last block into a block of its own. Image placeholder tokens are the same ids
whatever the image, so each entry keeps its *image marks*: where each image's placeholders start and a
digest of that image (or one mark for all of a request's images, where they cannot be told apart). A
match runs past an image's placeholders only when both prompts carry the same image there: a later
turn that adds an image reuses everything before the new image.

The cache never holds back a request: when a new sequence needs the blocks its entries hold, the
least recently used entry lets go of its last block, then the one before, and so on (``evict``): as
in vLLM and SGLang, the tail of a conversation goes first and the rest of it stays a usable prefix.
Storing past ``capacity`` entries drops the least recently used entry whole.

Entries are found through their blocks, not by comparing prompts with each entry: every full block of
an entry is indexed by a hash chained over the blocks before it (vLLM's automatic prefix caching does
the same), so a lookup costs one hash per block of the prompt whatever the number of entries (the
first key covers the first :data:`MIN_MATCH_TOKENS` tokens, for matches shorter than a block). A key
hashes the digests of the images that start in its tokens too. The match then runs on, token
by token, into the next block (of the most recent entries found at the deepest block) and is checked
against the entry's tokens, so a hash collision can never give wrong keys/values.

A model with sliding-window layers (Gemma 3) keeps only a ring of the last ``window`` keys/values per
sequence there, so an entry keeps a copy of the rings as they were at its end too (in blocks of the
same pool), and serves only the matches those rings can continue: of at least ``ring_from`` tokens
(all of them while its tokens fit in the window; else its whole length, or all but its last token
where the copy was taken right after the prompt's prefill). Such an entry is not cut short by
eviction (its rings would no longer fit its end): it goes whole. A prompt that leaves a cached one
past the window has its prefill stop there, and that start is kept with its rings as an entry of its
own (:class:`RingBranches`).
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

# A shorter match saves less than the copy costs (and every chat prompt shares its first few tokens).
MIN_MATCH_TOKENS = 8
# Entries whose next block is compared token by token at the deepest matched block, newest first.
MAX_TAIL_CANDIDATES = 64
# A waiting prompt sharing at least this many uncached tokens with one already in the prefill batch
# waits for the next step, to start from its keys/values (:class:`BatchSharing`).
DEFER_MIN_TOKENS = 32


# Where each image's placeholder tokens start in a prompt and a digest of that image, in prompt order.
ImageMarks = tuple[tuple[int, bytes], ...]


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


def image_marks(
    ids: list[int],
    placeholder_ids: frozenset[int],
    digest: bytes | None,
    per_image: Sequence[tuple[int, bytes]] | None = None,
) -> ImageMarks:
    """The image marks of a prompt: with ``per_image`` (each image's number of placeholder tokens and
    its digest, in prompt order), a mark where each image's placeholders start; otherwise (or when the
    counts do not add up to the prompt's placeholders) one mark with ``digest`` at the first one."""
    if per_image:
        starts = [n for n, token in enumerate(ids) if token in placeholder_ids]
        if sum(count for count, _ in per_image) == len(starts) and all(c > 0 for c, _ in per_image):
            marks, seen = [], 0
            for count, image_digest in per_image:
                marks.append((starts[seen], image_digest))
                seen += count
            return tuple(marks)
        digest = hashlib.blake2b(b"".join(d for _, d in per_image), digest_size=16).digest()
    if digest is None:
        return ()
    return ((first_placeholder(ids, placeholder_ids), digest),)


def ring_start(length: int, window: int, exact: bool) -> int:
    """The shortest match that rings copied at the end of ``length`` tokens can continue (a prefill
    from position m attends to the ``window - 1`` positions before m in the sliding layers).
    ``exact``: nothing was written past them (a copy right after the prompt's prefill); else the step
    after may have fed one more token, overwriting the oldest position of the ring."""
    if length < window or (exact and length == window):
        return 0  # (the rings hold every position)
    return length - 1 if exact else length


def marks_within(marks: ImageMarks, length: int) -> ImageMarks:
    """The marks of images that start in the first ``length`` tokens."""
    return tuple(mark for mark in marks if mark[0] < length)


def marks_differ_at(a: ImageMarks, b: ImageMarks) -> int | None:
    """The first prompt position from which two prompts' images may differ (None: nowhere)."""
    for (pos_a, digest_a), (pos_b, digest_b) in zip(a, b, strict=False):
        if pos_a != pos_b or digest_a != digest_b:
            return min(pos_a, pos_b)
    if len(a) != len(b):
        return (a if len(a) > len(b) else b)[min(len(a), len(b))][0]
    return None


class Blocks(Protocol):
    """Reference counting of KV blocks (the KV cache's allocator)."""

    def share(self, blocks: Sequence[int], cached: bool = False) -> None: ...
    def release(self, blocks: Sequence[int], cached: bool = False) -> None: ...
    def holders(self, block: int) -> int: ...


@dataclass(eq=False)
class PrefixEntry:
    blocks: list[int]  # KV blocks holding the keys/values of ``tokens`` (one reference held by the entry)
    tokens: list[int]
    marks: ImageMarks  # the images that start in ``tokens``
    chain: list[int] = field(default_factory=list)  # its index keys (:func:`block_chain`)
    ring: list[int] = field(default_factory=list)  # blocks holding the sliding layers' rings at its end
    ring_from: int = 0  # the shortest match its rings can continue


@dataclass
class PrefixMatch:
    entry: PrefixEntry
    length: int  # leading prompt tokens whose keys/values the entry's blocks hold


def common_prefix(a: list[int], b: list[int], start: int = 0, stop: int | None = None) -> int:
    """How far ``a`` and ``b`` agree from ``start`` (compared up to ``stop``)."""
    n = min(len(a), len(b)) if stop is None else min(len(a), len(b), stop)
    i = start
    while i < n and a[i] == b[i]:
        i += 1
    return i


def block_chain(tokens: list[int], block_size: int, marks: ImageMarks) -> list[int]:
    """Index keys of ``tokens``: first one of its first :data:`MIN_MATCH_TOKENS` tokens (none if it is
    shorter), then one per full block, each hashing the previous key and the block's tokens. A key
    hashes the digests of the images starting in its tokens too (the ones before: through the chain)."""
    if len(tokens) < MIN_MATCH_TOKENS:
        return []
    covered = MIN_MATCH_TOKENS
    key = hash((tuple(tokens[:covered]), tuple(d for p, d in marks if p < covered)))
    chain = [key]
    for end in range(block_size, len(tokens) + 1, block_size):
        starting = tuple(d for p, d in marks if covered <= p < end) if end > covered else ()
        covered = max(covered, end)
        key = hash((key, tuple(tokens[end - block_size : end]), starting))
        chain.append(key)
    return chain


class PrefixCache:
    """At most ``capacity`` entries whose blocks are counted by ``blocks`` (0: the cache is off)."""

    def __init__(self, capacity: int, blocks: Blocks, block_size: int) -> None:
        self.capacity = max(0, capacity)
        self.blocks = blocks
        self.block_size = block_size
        self._entries: dict[int, PrefixEntry] = {}  # by id(), in the order they were stored
        self._lru: OrderedDict[int, PrefixEntry] = OrderedDict()  # least recently used first
        self._index: dict[int, dict[int, PrefixEntry]] = {}  # chain key -> entries with that block
        self.tokens_held = 0  # tokens the entries hold
        self.queries = 0
        self.hits = 0
        self.hit_tokens = 0
        self.query_tokens = 0

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @property
    def num_entries(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> list[PrefixEntry]:
        """The entries, in the order they were stored."""
        return list(self._entries.values())

    def _touch(self, entry: PrefixEntry) -> None:
        self._lru.move_to_end(id(entry))

    def lookup(self, prompt: list[int], marks: ImageMarks) -> PrefixMatch | None:
        """The longest usable cached prefix of ``prompt`` (at most all but its last token, which must
        be computed for its logits); None below :data:`MIN_MATCH_TOKENS`. Changes nothing."""
        return self._served(self._levels(prompt, marks), prompt, marks)

    def branch_point(self, prompt: list[int], marks: ImageMarks) -> tuple[int, int]:
        """``(served, agreed)``: how many leading tokens of ``prompt`` :meth:`lookup` serves, and how
        many it shares with some entry (both at most all but its last token). They differ only where
        an entry's rings cannot continue the shared tokens (they are of its end): a prompt that
        leaves a cached one past the window."""
        levels = self._levels(prompt, marks)
        match = self._served(levels, prompt, marks)
        served = match.length if match is not None else 0
        if not levels:
            return served, served
        depth = len(levels) - 1
        longest = max(self._agreements(levels[depth], depth, prompt, marks), key=lambda a: a[1], default=None)
        if longest is None or not self._verified(PrefixMatch(*longest), prompt):
            return served, served
        return served, max(served, longest[1])

    def _served(
        self, levels: list[dict[int, PrefixEntry]], prompt: list[int], marks: ImageMarks
    ) -> PrefixMatch | None:
        """:meth:`lookup` over the entries found at each depth (:meth:`_levels`)."""
        # The deepest level's entries match longest; shallower ones are tried only where rings made
        # entries there unusable.
        for depth in range(len(levels) - 1, -1, -1):
            best, ring_bound = self._best_at(levels[depth], depth, prompt, marks)
            if best is not None or not ring_bound:
                return best
        return None

    def _levels(self, prompt: list[int], marks: ImageMarks) -> list[dict[int, PrefixEntry]]:
        """The entries holding the prompt's first key, its first block, ... as deep as any goes."""
        if not self._entries:
            return []
        chain = block_chain(prompt, self.block_size, marks)
        found = self._index.get(chain[0]) if chain else None
        if not found:
            return []
        levels = [found]
        for key in chain[1:]:
            holders = self._index.get(key)
            if not holders:
                break
            levels.append(holders)
        return levels

    def _agreements(
        self, found: dict[int, PrefixEntry], depth: int, prompt: list[int], marks: ImageMarks
    ) -> Iterator[tuple[PrefixEntry, int]]:
        """Each of ``found`` (entries that hold ``depth`` full blocks of ``prompt``; the most recent
        first, at most :data:`MAX_TAIL_CANDIDATES`) with how many leading prompt tokens it holds the
        keys/values of: their tokens and images agree, all but the prompt's last token (a hash
        collision can make the count wrong: see :meth:`_verified`)."""
        start, stop = depth * self.block_size, (depth + 1) * self.block_size
        for entry in itertools.islice(reversed(found.values()), MAX_TAIL_CANDIDATES):
            n = common_prefix(entry.tokens, prompt, start, stop)
            differ = marks_differ_at(entry.marks, marks_within(marks, len(entry.tokens)))
            if differ is not None:
                n = min(n, differ)
            yield entry, min(n, len(prompt) - 1)

    def _best_at(
        self, found: dict[int, PrefixEntry], depth: int, prompt: list[int], marks: ImageMarks
    ) -> tuple[PrefixMatch | None, bool]:
        """The longest usable match among ``found``, entries that hold ``depth`` full blocks of it, and
        whether some entry there could not serve its match because of its rings."""
        best: PrefixMatch | None = None
        ring_bound = False
        for entry, n in self._agreements(found, depth, prompt, marks):
            if n < entry.ring_from:  # its rings cannot continue from there
                ring_bound = True
            elif best is None or n > best.length:
                best = PrefixMatch(entry, n)
        if best is None or best.length < MIN_MATCH_TOKENS or not self._verified(best, prompt):
            return None, ring_bound
        return best, ring_bound

    @staticmethod
    def _verified(match: PrefixMatch, prompt: list[int]) -> bool:
        """The entry's tokens are the prompt's up to the match (not so only after a hash collision)."""
        return match.entry.tokens[: match.length] == prompt[: match.length]

    def record(self, prompt_len: int, match: PrefixMatch | None) -> None:
        """A prompt of ``prompt_len`` tokens started from ``match`` (None: from nothing)."""
        if not self.enabled:
            return
        self.queries += 1
        self.query_tokens += prompt_len
        if match is not None:
            if self.holds(match.entry):
                self._touch(match.entry)
            self.hits += 1
            self.hit_tokens += match.length

    def store(
        self,
        blocks: Sequence[int],
        tokens: list[int],
        marks: ImageMarks,
        keep_ring: Callable[[], list[int] | None] | None = None,
        ring_from: int = 0,
    ) -> None:
        """Keep the keys/values of ``tokens``, held in ``blocks`` (position order), as an entry, unless
        an entry already covers them; an entry they extend, or the least recently used one when the
        cache is full, makes room. With sliding-window layers, ``keep_ring()`` copies the rings into
        blocks it takes for the cache (None: no room, no entry), and the entry serves matches of at
        least ``ring_from`` tokens."""
        if not self.enabled or len(tokens) < MIN_MATCH_TOKENS:
            return
        marks = marks_within(marks, len(tokens))
        chain = block_chain(tokens, self.block_size, marks)
        for entry in self._index.get(chain[-1], {}).values():
            if (
                entry.tokens[: len(tokens)] == tokens
                and marks_within(entry.marks, len(tokens)) == marks
                and entry.ring_from <= ring_from
            ):
                self._touch(entry)
                return
        superseded = [
            entry
            for depth, key in enumerate(chain, start=1)
            for entry in self._index.get(key, {}).values()
            if len(entry.chain) == depth
            and tokens[: len(entry.tokens)] == entry.tokens
            and entry.marks == marks_within(marks, len(entry.tokens))
            and ring_from <= entry.ring_from
        ]
        ring: list[int] = []
        if keep_ring is not None:
            kept = keep_ring()  # (may evict entries to make room)
            if kept is None:
                return
            ring = kept
        for entry in superseded:
            if self.holds(entry):
                self._drop(entry)
        while len(self._entries) >= self.capacity:
            self._drop(next(iter(self._lru.values())))
        held = list(blocks[: -(-len(tokens) // self.block_size)])
        self.blocks.share(held, cached=True)
        entry = PrefixEntry(held, list(tokens), marks, chain, ring, ring_from)
        self._entries[id(entry)] = entry
        self._lru[id(entry)] = entry
        for key in chain:
            self._index.setdefault(key, {})[id(entry)] = entry
        self.tokens_held += len(tokens)

    def demote(self, tokens: list[int], marks: ImageMarks) -> None:
        """Entries holding exactly ``tokens`` go first in the eviction order: with rings, a prompt's own
        entry serves only that prompt again once its tokens are past the window, while its finished
        sequence's entry (stored then) serves the next turn; under memory pressure the former goes
        first. A hit touches it again."""
        if not self.enabled or len(tokens) < MIN_MATCH_TOKENS:
            return
        marks = marks_within(marks, len(tokens))
        key = block_chain(tokens, self.block_size, marks)[-1]
        for entry in self._index.get(key, {}).values():
            if entry.tokens == tokens and entry.marks == marks:
                self._lru.move_to_end(id(entry), last=False)

    def evict(self, keep: PrefixEntry | None = None) -> bool:
        """Let go of the last block of the least recently used entry whose last block that frees (held
        by it alone, not by a running sequence or a longer entry), else of the least recently used
        entry's (``keep``'s last of all); an entry left with fewer than :data:`MIN_MATCH_TOKENS` tokens
        goes, and so does an entry with rings, whole (the least recently used, whatever its last
        block: its rings are freed). False when there is none."""
        if not self._lru:
            return False
        entries = self._lru.values()
        # (an entry with rings frees them whatever its last block: the least recently used goes)
        frees = (e for e in entries if e is not keep and (e.ring or self.blocks.holders(e.blocks[-1]) == 1))
        victim = next(frees, None)
        victim = victim or next((e for e in entries if e is not keep), keep)
        assert victim is not None
        if victim.ring:  # (its rings are of its end)
            self._drop(victim)
            return True
        kept_blocks = len(victim.blocks) - 1
        kept_tokens = min(len(victim.tokens), kept_blocks * self.block_size)
        if kept_tokens < MIN_MATCH_TOKENS:
            self._drop(victim)
            return True
        kept_keys = 1 + kept_tokens // self.block_size  # (chain: the first tokens' key, then one a block)
        for key in victim.chain[kept_keys:]:
            self._unindex(victim, key)
        released = victim.blocks[kept_blocks:]
        self.tokens_held -= len(victim.tokens) - kept_tokens
        victim.chain = victim.chain[:kept_keys]
        victim.blocks = victim.blocks[:kept_blocks]
        victim.tokens = victim.tokens[:kept_tokens]
        victim.marks = marks_within(victim.marks, kept_tokens)
        self.blocks.release(released, cached=True)
        return True

    def still_valid(self, match: PrefixMatch) -> bool:
        """Whether ``match`` can still be used: its entry is held and still holds the matched tokens."""
        return self.holds(match.entry) and match.length <= len(match.entry.tokens)

    def has_block(self, key: int) -> bool:
        """True while some entry holds the block with index key ``key`` (:func:`block_chain`)."""
        return key in self._index

    def holds(self, entry: PrefixEntry) -> bool:
        """True while ``entry`` is in the cache."""
        return self._entries.get(id(entry)) is entry

    def clear(self) -> None:
        for entry in list(self._entries.values()):
            self._drop(entry)

    def _drop(self, entry: PrefixEntry) -> None:
        del self._entries[id(entry)]
        del self._lru[id(entry)]
        for key in entry.chain:
            self._unindex(entry, key)
        self.tokens_held -= len(entry.tokens)
        self.blocks.release(entry.blocks + entry.ring, cached=True)

    def _unindex(self, entry: PrefixEntry, key: int) -> None:
        holders = self._index[key]
        del holders[id(entry)]
        if not holders:
            del self._index[key]


class BatchSharing:
    """Whether a waiting prompt shares at least ``min_tokens`` not yet cached with a prompt already
    chosen for the prefill batch being built (``sequence, batch -> bool``, the scheduler's ``defer``).

    Prompts prefilled in the same step cannot share keys/values: each computes the common prefix
    (the same system prompt and image sent by many clients at once, the same conversation resent).
    Such a prompt is better left for the next step: the batch's prompts are cached by then, and it
    starts from them. SGLang's scheduler does the same (in-batch prefix caching). The comparison uses
    the cache's own block keys: one hash per block, and the keys of the batch are kept across the calls
    for one batch (the scheduler only appends to it)."""

    def __init__(self, cache: PrefixCache, min_tokens: int = DEFER_MIN_TOKENS) -> None:
        self.cache = cache
        self.min_blocks = -(-min_tokens // cache.block_size)
        self._batch: list | None = None
        self._seen = 0
        self._keys: set[int] = set()

    def _chain(self, seq) -> list[int]:
        return block_chain(seq.context_ids, self.cache.block_size, seq.image_marks)[1:]

    def __call__(self, seq, batch: list) -> bool:
        if not self.cache.enabled or not batch:
            return False
        if batch is not self._batch or len(batch) < self._seen:  # another batch: start over
            self._batch, self._seen, self._keys = batch, 0, set()
        for member in batch[self._seen :]:
            self._keys.update(self._chain(member))
        self._seen = len(batch)
        shared = 0
        for key in self._chain(seq):
            if self.cache.has_block(key):  # cached already: the batch's prompts find it too
                continue
            if key not in self._keys:
                break
            shared += 1
        return shared >= self.min_blocks


class RingBranches:
    """Whether a waiting prompt is to be prefilled alone, ending a chunk where it leaves a cached
    prompt that no entry can serve it from (``sequence -> bool``, the scheduler's ``alone``; sets
    ``seq.branch_at``): with sliding-window layers, where their rings were copied only at each entry's
    end, so a prompt sharing a start longer than the window with another (a long system prompt) is
    served nothing. Its prefill stops there and the cache keeps that start with the rings as they are
    at that point (the engine's part), so the prompts that branch there next start from it: the second
    prompt with that start computes it again, and the third on do not (SGLang's radix cache splits
    its nodes where prompts branch the same way). Only where the shared start is at least
    ``min_tokens`` longer than what is served."""

    def __init__(self, cache: PrefixCache, sliding: bool, min_tokens: int = DEFER_MIN_TOKENS) -> None:
        self.cache = cache
        self.sliding = sliding
        self.min_tokens = min_tokens

    def __call__(self, seq) -> bool:
        seq.branch_at = 0
        if not self.sliding or not self.cache.enabled or seq.resumed:
            return False
        served, agreed = self.cache.branch_point(seq.context_ids, seq.image_marks)
        if agreed - served >= self.min_tokens:
            seq.branch_at = agreed
        return bool(seq.branch_at)
