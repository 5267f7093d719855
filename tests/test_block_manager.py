"""KV block bookkeeping: reference counts, free blocks, no overcommit."""

from __future__ import annotations

import pytest

from tritonvlm.engine.block_manager import BlockAllocator


def test_blocks_come_back_when_their_last_holder_releases_them() -> None:
    pool = BlockAllocator(4)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.free_blocks == 1 and pool.used_blocks == 3
    pool.share(a[:2])  # a second holder (a prefix-cache entry, a sequence starting from it)
    pool.release(a)
    assert pool.free_blocks == 2 and [pool.ref_counts[b] for b in a] == [1, 1, 0]
    pool.release(a[:2])
    assert pool.free_blocks == 4 and pool.used_blocks == 0


def test_the_most_recently_freed_block_is_reused_first() -> None:
    pool = BlockAllocator(4)
    a = pool.allocate(2)
    pool.release([a[1]])
    assert pool.allocate(1) == [a[1]]


def test_no_overcommit_and_no_double_release() -> None:
    pool = BlockAllocator(2)
    with pytest.raises(MemoryError):
        pool.allocate(3)
    blocks = pool.allocate(2)
    assert pool.free_blocks == 0
    with pytest.raises(MemoryError):
        pool.allocate(1)
    pool.release(blocks)
    with pytest.raises(ValueError, match="released more often"):
        pool.release(blocks[:1])
    with pytest.raises(ValueError, match="is free"):
        pool.share(blocks[:1])
    with pytest.raises(ValueError):
        BlockAllocator(0)


def test_blocks_only_the_prefix_cache_holds_are_counted() -> None:
    pool = BlockAllocator(8)
    seq = pool.allocate(3)
    pool.share(seq[:2], cached=True)  # an entry keeps the first two blocks of a running sequence
    assert pool.cache_only_blocks == 0
    pool.release(seq)  # the sequence leaves: two blocks are the entry's alone, one is free
    assert pool.cache_only_blocks == 2 and pool.free_blocks == 6
    pool.share(seq[:1])  # a new sequence starts from the entry's first block
    assert pool.cache_only_blocks == 1
    pool.release(seq[:2], cached=True)  # the entry goes
    assert pool.cache_only_blocks == 0 and pool.free_blocks == 7
    with pytest.raises(ValueError, match="released more often"):
        pool.release(seq[:1], cached=True)
