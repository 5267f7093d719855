"""KV memory by use: fixed-size blocks of token positions, handed out as sequences grow and shared by
reference count (a prefix-cache entry and the sequences that start from it hold the same blocks).

Only the bookkeeping lives here: the tensors are the KV cache's, indexed by block id.
"""

from __future__ import annotations

from collections.abc import Iterable


class BlockAllocator:
    """A pool of ``num_blocks`` block ids with reference counts; a block is free at count zero.

    References taken with ``cached=True`` are the prefix cache's: :attr:`cache_only_blocks` counts the
    blocks only the cache holds, which dropping every cache entry would free."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("need at least one KV block")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.cache_refs = [0] * num_blocks
        self.cache_only_blocks = 0
        # Most recently freed last: reusing them first keeps the memory touched small (a CPU pool is
        # allocated lazily by the OS, page by page).
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks (reference count 1). Raises ``MemoryError`` when fewer are free."""
        if n > len(self._free):
            raise MemoryError(f"no room for {n} KV blocks ({len(self._free)} free)")
        taken = [self._free.pop() for _ in range(n)]
        for block in taken:
            self.ref_counts[block] = 1
        return taken

    def holders(self, block: int) -> int:
        """How many hold ``block`` (0: free)."""
        return self.ref_counts[block]

    def _cache_only(self, block: int) -> bool:
        return self.ref_counts[block] > 0 and self.ref_counts[block] == self.cache_refs[block]

    def share(self, blocks: Iterable[int], cached: bool = False) -> None:
        """One more holder for each of ``blocks`` (all in use); ``cached``: the prefix cache."""
        for block in blocks:
            if self.ref_counts[block] < 1:
                raise ValueError(f"block {block} is free: it cannot be shared")
            before = self._cache_only(block)
            self.ref_counts[block] += 1
            self.cache_refs[block] += cached
            self.cache_only_blocks += self._cache_only(block) - before

    def release(self, blocks: Iterable[int], cached: bool = False) -> None:
        """One holder fewer for each of ``blocks``; those no one holds become free."""
        for block in blocks:
            count = self.ref_counts[block]
            if count < 1 or (cached and self.cache_refs[block] < 1):
                raise ValueError(f"block {block} released more often than taken")
            before = self._cache_only(block)
            self.ref_counts[block] = count - 1
            self.cache_refs[block] -= cached
            self.cache_only_blocks += self._cache_only(block) - before
            if count == 1:
                self._free.append(block)
