"""KV memory by use: fixed-size blocks of token positions, handed out as sequences grow and shared by
reference count (a prefix-cache entry and the sequences that start from it hold the same blocks).

Only the bookkeeping lives here: the tensors are the KV cache's, indexed by block id.
"""

from __future__ import annotations

from collections.abc import Iterable


class BlockAllocator:
    """A pool of ``num_blocks`` block ids with reference counts; a block is free at count zero."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("need at least one KV block")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
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

    def share(self, blocks: Iterable[int]) -> None:
        """One more holder for each of ``blocks`` (all in use)."""
        for block in blocks:
            if self.ref_counts[block] < 1:
                raise ValueError(f"block {block} is free: it cannot be shared")
            self.ref_counts[block] += 1

    def release(self, blocks: Iterable[int]) -> None:
        """One holder fewer for each of ``blocks``; those no one holds become free."""
        for block in blocks:
            count = self.ref_counts[block]
            if count < 1:
                raise ValueError(f"block {block} released more often than taken")
            self.ref_counts[block] = count - 1
            if count == 1:
                self._free.append(block)
