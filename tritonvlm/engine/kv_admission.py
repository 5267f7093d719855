"""Who holds KV blocks: admission of a waiting sequence (its prompt's blocks, the longest cached prefix
shared), growth of the running ones step by step, and where blocks run out, preemption.

A sequence is admitted when its prompt's blocks are free, with a margin of 1% of the pool while
others run; prefix-cache entries give theirs back for it only when that can make the room (the
allocator counts the blocks only the cache holds), so a request that waits anyway leaves the cache
alone. When a running sequence needs a block and none is free, prefix-cache entries give theirs
back first, then the most recently admitted sequence is preempted: it gives its blocks back, waits
first in line and is recomputed when resumed (a prefill over its prompt and outputs so far; see
``Sequence.prefill_target``; a family's prefill hooks must be able to run again over a prompt and
outputs: every family keeps its image inputs for it).
"""

from __future__ import annotations

from collections.abc import Callable

from tritonvlm.engine.kv_cache import PagedKVCache
from tritonvlm.engine.prefix_cache import PrefixCache
from tritonvlm.engine.sequence import Sequence


class KVAdmission:
    """The KV blocks of ``cache`` held by sequences (``reserve`` / ``grow`` / ``release``)."""

    def __init__(self, cache: PagedKVCache, prefix_cache: PrefixCache) -> None:
        self.cache = cache
        self.prefix_cache = prefix_cache
        self.margin = max(1, cache.num_blocks // 100)
        self.holders: dict[int, Sequence] = {}  # sequences holding blocks, by id()

    def outstanding(self) -> int:
        """Blocks kept free for the holders' growth: the margin, while any holds blocks (beyond it a
        running sequence that needs a block takes it from the prefix cache or by preemption)."""
        return self.margin if self.holders else 0

    def reserve(self, seq: Sequence, slot: int) -> bool:
        """Give ``seq`` slot ``slot`` and the blocks of its ``prefill_target`` tokens (the longest
        cached prefix shared, the positions of a partly matched block copied) if what it needs is free
        besides ``outstanding``; prefix-cache entries give theirs back, least recently used first,
        until it is. False: not now. Sets ``seq.prefilled`` (and, first time, ``seq.cached_len``)."""
        cache, allocator = self.cache, self.cache.allocator
        context = seq.context_ids
        held = seq.prefill_target + 1
        match = self.prefix_cache.lookup(context, seq.image_marks)
        while True:
            shared = match.length // cache.block_size if match else 0
            need = cache.blocks_for(held) - shared
            room = allocator.free_blocks - self.outstanding()
            if need <= room:
                break
            # Entries give their blocks back only where that can make the room: a request that waits
            # anyway leaves the cache alone.
            if need > room + allocator.cache_only_blocks:
                return False
            if not self.prefix_cache.evict(keep=match.entry if match else None):
                return False
            if match is not None and not self.prefix_cache.still_valid(match):
                match = self.prefix_cache.lookup(context, seq.image_marks)
        if not seq.resumed:  # (a resumed sequence reports its first admission's cached tokens)
            self.prefix_cache.record(seq.prompt_len, match)
            seq.cached_len = match.length if match is not None else 0
        seq.slot = slot
        self.holders[id(seq)] = seq
        start = match.length if match is not None else 0
        if match is not None:
            cache.adopt(slot, match.entry.blocks[:shared])
        cache.grow(slot, seq.prefill_target)
        tail = start - shared * cache.block_size
        if tail:
            cache.copy_positions(match.entry.blocks[shared], cache.slot_blocks[slot][shared], tail)
        if match is not None and match.entry.ring:
            cache.load_ring(slot, min(len(match.entry.tokens), cache.ring_columns), match.entry.ring)
        seq.prefilled = start
        return True

    def keep_ring(self, slot: int, length: int) -> list[int] | None:
        """Copy ``slot``'s rings (of a sequence that has written ``length`` positions) into blocks held
        by the prefix cache alone. Older entries give theirs back (least recently used first) where
        taking them would leave fewer free than the running sequences may need this step and the
        margin; None where even that cannot make the room."""
        cache, allocator = self.cache, self.cache.allocator
        columns = min(length, cache.ring_columns)
        need = cache.ring_blocks_for(columns)
        while allocator.free_blocks - need < self.margin + len(self.holders):
            if need > allocator.free_blocks + allocator.cache_only_blocks or not self.prefix_cache.evict():
                return None
        blocks = allocator.allocate(need)
        cache.save_ring(slot, columns, blocks)
        allocator.share(blocks, cached=True)
        allocator.release(blocks)  # (now the cache's alone)
        return blocks

    def grow(self, running: list[Sequence], preempt: Callable[[Sequence], None]) -> None:
        """Give each of ``running`` the block for the key it writes this step; where none is free,
        prefix-cache entries give theirs back, then ``preempt(running[-1])`` (which removes it from
        ``running``) until there is one."""
        cache, allocator = self.cache, self.cache.allocator
        size, held = cache.block_size, cache.slot_blocks
        i = 0
        while i < len(running):
            seq = running[i]
            # (inline: at batch 256 this loop is a host cost of every step)
            held_tokens = len(seq.prompt_ids) + len(seq.output_ids) + seq.inflight  # (seq.num_tokens)
            need = -(-held_tokens // size) - len(held[seq.slot])
            if need <= 0:
                i += 1
            elif need <= allocator.free_blocks:
                cache.grow(seq.slot, seq.num_tokens)
                i += 1
            elif allocator.cache_only_blocks and self.prefix_cache.evict():
                continue
            else:
                preempt(running[-1])

    def release(self, seq: Sequence) -> None:
        """``seq`` gives its blocks back (it is leaving or preempted; its slot is still set)."""
        if self.holders.pop(id(seq), None) is not None:
            self.cache.release(seq.slot)
