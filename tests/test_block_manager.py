"""KV blocks by use and the prefix cache's bookkeeping."""

from __future__ import annotations

import pytest

from tritonvlm.engine.block_manager import BlockManager


def test_blocks_follow_the_tokens_held_and_come_back_on_free() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    table = bm.allocate(10)
    assert len(table.blocks) == 3 and bm.free_blocks == 5 and table.cached_tokens == 0
    bm.append(table, 12)
    assert len(table.blocks) == 3  # still fits the third block
    bm.append(table, 13)
    assert len(table.blocks) == 4 and bm.used_blocks == 4
    bm.free(table)
    assert bm.free_blocks == 8 and table.blocks == []


def test_out_of_blocks_is_reported_not_overcommitted() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    assert not bm.can_allocate(9)
    with pytest.raises(MemoryError):
        bm.allocate(9)
    table = bm.allocate(8)
    assert not bm.can_append(table, 9)
    with pytest.raises(MemoryError):
        bm.append(table, 9)


def test_a_shared_prefix_reuses_full_blocks_only() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    system = list(range(100, 110))  # 10 tokens: two full blocks and a partial one
    first_ids = system + [1, 2, 3]
    hashes = bm.prompt_hashes(first_ids)
    assert len(hashes) == 3  # 13 tokens: three full blocks
    first = bm.allocate(len(first_ids), hashes, reusable_tokens=len(first_ids) - 1)
    assert first.cached_tokens == 0
    bm.register_prompt(first, hashes)
    second_ids = system + [7, 8, 9, 9]
    second_hashes = bm.prompt_hashes(second_ids)
    second = bm.allocate(len(second_ids), second_hashes, reusable_tokens=len(second_ids) - 1)
    assert second.cached_tokens == 8 and second.blocks[:2] == first.blocks[:2]
    assert second.blocks[2] != first.blocks[2]
    assert bm.blocks[first.blocks[0]].ref_count == 2
    assert bm.hits == 8 and bm.queries == len(first_ids) + len(second_ids)


def test_extras_such_as_image_hashes_change_the_identity() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    ids = [5, 5, 5, 5, 6, 6, 6, 6]
    assert bm.prompt_hashes(ids, [b"img-a"]) != bm.prompt_hashes(ids, [b"img-b"])
    assert bm.prompt_hashes(ids)[1:] != bm.prompt_hashes([9, 5, 5, 5, 6, 6, 6, 6])[1:]  # chained


def test_freed_cached_blocks_stay_findable_until_reused_least_recent_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    ids = [1, 2, 3, 4, 5]
    hashes = bm.prompt_hashes(ids)
    table = bm.allocate(len(ids), hashes, len(ids) - 1)
    bm.register_prompt(table, hashes)
    cached = list(table.blocks[:2])
    bm.free(table)
    again = bm.allocate(len(ids), hashes, len(ids) - 1)
    assert again.blocks[:2] == cached and again.cached_tokens == 4
    bm.free(again)
    # Use up every block with unrelated prompts: the cached ones are reused and forgotten.
    other = bm.allocate(8)
    assert bm.cached_prefix(hashes, len(ids) - 1) == []
    bm.free(other)


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    ids = [1, 2, 3, 4]
    hashes = bm.prompt_hashes(ids)
    bm.register_prompt(bm.allocate(4, hashes, 3), hashes)
    table = bm.allocate(4, hashes, reusable_tokens=3)
    assert table.cached_tokens == 2  # the block holding the last token is recomputed


def test_prefix_cache_off() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_cache=False)
    hashes = bm.prompt_hashes([1, 2, 3, 4])
    bm.register_prompt(bm.allocate(4, hashes, 3), hashes)
    assert bm.allocate(4, hashes, 3).cached_tokens == 0
