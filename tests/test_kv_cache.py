"""The KV cache on its own: full layers hold every position in blocks taken as sequences grow (shared
by reference, moved between slots without a copy), sliding-window layers a ring of the last ``window``
positions per slot, and attention over either (with the runner's masks) equals attention over the
whole history (restricted to the window)."""

from __future__ import annotations

import pytest
import torch

from tritonvlm.engine.kv_cache import PagedKVCache
from tritonvlm.families.base import FULL, LayerKind

HEADS, DIM, WINDOW, MAX_LEN, BLOCK = 2, 8, 4, 32, 4
CPU = torch.device("cpu")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [heads, dim], k/v [heads, n, dim], mask [n] bool → [heads, dim]."""
    scores = (q[:, None, :] * k).sum(-1).masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1)[..., None] * v).sum(1)


def test_sliding_ring_matches_windowed_attention_over_the_whole_history() -> None:
    torch.manual_seed(0)
    kinds = [FULL, LayerKind("sliding", WINDOW)]
    cache = PagedKVCache(2, HEADS, DIM, 2, MAX_LEN, torch.float32, CPU, kinds, block_size=BLOCK)
    assert cache.keys[0].shape == (2 * MAX_LEN // BLOCK + 1, BLOCK, HEADS, DIM)  # blocks (+ scratch)
    assert cache.keys[1].shape[2] == WINDOW
    lengths = [6, 3]
    for slot, n in enumerate(lengths):
        cache.grow(slot, n)
    history = [torch.randn(HEADS, n, DIM) for n in lengths]  # keys; values = keys * 2
    padded = torch.zeros(2, HEADS, 6, DIM)
    for i, h in enumerate(history):
        padded[i, :, : h.shape[1]] = h
    cache.prepare_prefill(0, 2, 6, lengths)
    for layer in range(2):
        k, _ = cache.update(padded, padded * 2, layer)
        assert torch.equal(k, padded)  # prefill attends over the prompt's own keys
    for _ in range(7):
        new = torch.randn(2, HEADS, 1, DIM)
        positions = torch.tensor([h.shape[1] for h in history])
        kv_len = int(positions.max()) + 1
        for slot, p in enumerate(positions.tolist()):
            cache.grow(slot, p + 1)
        cache.sync_tables()
        cache.prepare_decode(positions, kv_len)
        full_k, full_v = cache.update(new, new * 2, 0)
        ring_k, ring_v = cache.update(new, new * 2, 1)
        assert ring_k.shape[2] == min(WINDOW, kv_len)
        history = [torch.cat([h, new[i]], dim=1) for i, h in enumerate(history)]
        for i, h in enumerate(history):
            n = h.shape[1]
            q = torch.randn(HEADS, DIM)
            cols = torch.arange(ring_k.shape[2])
            got = attend(q, ring_k[i], ring_v[i], cols <= n - 1)  # the runner's decode mask
            want = attend(q, h[:, -WINDOW:], h[:, -WINDOW:] * 2, torch.ones(min(n, WINDOW), dtype=torch.bool))
            assert torch.allclose(got, want, atol=1e-5)
            got_full = attend(q, full_k[i], full_v[i], torch.arange(kv_len) <= n - 1)
            assert torch.allclose(got_full, attend(q, h, h * 2, torch.ones(n, dtype=torch.bool)), atol=1e-5)


def test_blocks_are_taken_by_use_shared_by_reference_and_moved_without_a_copy() -> None:
    torch.manual_seed(0)
    cache = PagedKVCache(1, HEADS, DIM, 3, MAX_LEN, torch.float32, torch.device("cpu"), None, 6, BLOCK)
    # Two sequences growing in turn: their blocks interleave in the pool.
    for n in range(1, 9):
        cache.grow(0, n)
        cache.grow(2, n)
    assert cache.slot_blocks[0] == [0, 2] and cache.slot_blocks[2] == [1, 3]
    assert cache.allocator.free_blocks == 2 and cache.bytes_held(5) == 2 * cache.block_bytes
    history = torch.randn(1, HEADS, 8, DIM)
    cache.prepare_prefill(2, 1, 8, [8])
    cache.update(history, history * 2, 0)
    assert torch.equal(cache.keys[0][1].transpose(0, 1), history[0, :, :4])  # positions 0-3: block 1
    # A prefill after the slot's first 4 positions attends over them, read from the blocks in order.
    cache.prepare_prefill(2, 1, 4, [4], offsets=[4], kv_len=8)
    k, v = cache.update(history[:, :, 4:], history[:, :, 4:] * 2, 0)
    assert torch.equal(k, history) and torch.equal(v, history * 2)
    # Moving slot 2 into slot 0 hands over the table row and releases slot 0's blocks.
    cache.move(2, 0, 8)
    assert cache.slot_blocks[0] == [1, 3] and cache.slot_blocks[2] == []
    assert cache.allocator.free_blocks == 4
    assert cache.tables[2].tolist() == [cache.scratch] * (MAX_LEN // BLOCK)
    # Sharing: another slot adopts the first block, copies 2 positions of the second into its own.
    cache.adopt(1, [1])
    cache.grow(1, 7)
    cache.copy_positions(3, cache.slot_blocks[1][1], 2)
    assert cache.allocator.ref_counts[1] == 2
    cache.sync_tables()
    cache.prepare_decode(torch.tensor([8, 6]), 7)
    k, _ = cache.update(torch.zeros(2, HEADS, 1, DIM), torch.zeros(2, HEADS, 1, DIM), 0)
    assert torch.equal(k[1, :, :6], history[0, :, :6])  # 4 shared + 2 copied positions
    cache.release(0)
    assert cache.allocator.ref_counts[1] == 1 and cache.slot_blocks[1][0] == 1
    cache.release(1)
    assert cache.allocator.free_blocks == 6
    with pytest.raises(MemoryError):
        cache.grow(0, 7 * BLOCK)


def test_sizes_count_blocks_and_the_window_and_a_move_copies_the_ring() -> None:
    kinds = [FULL, LayerKind("sliding", WINDOW)]
    cache = PagedKVCache(2, HEADS, DIM, 3, MAX_LEN, torch.float32, CPU, kinds, block_size=BLOCK)
    cache.keys[1][2].normal_()
    cache.values[1][2].normal_()
    cache.move(2, 0, 10)
    assert torch.equal(cache.keys[1][0], cache.keys[1][2])
    assert torch.equal(cache.values[1][0], cache.values[1][2])
    per_seq = PagedKVCache.bytes_per_sequence(kinds, HEADS, DIM, MAX_LEN, torch.float32)
    assert per_seq == 2 * HEADS * DIM * 4 * (MAX_LEN + WINDOW)
    assert PagedKVCache.slot_bytes(kinds, HEADS, DIM, MAX_LEN, torch.float32) == 2 * HEADS * DIM * 4 * WINDOW
    assert cache.nbytes == 3 * per_seq + cache.block_bytes  # three sequences' blocks by default, scratch
    # Held: whole blocks in the full layer, at most the window in the sliding one; the gauge's sum over
    # sequences is the sum of each one's.
    per_column = 2 * HEADS * DIM * 4
    assert cache.bytes_held(5) == per_column * (2 * BLOCK + WINDOW)
    assert cache.bytes_held(3) == per_column * (BLOCK + 3)
    assert cache.total_bytes_held([5, 3, 0]) == per_column * (3 * BLOCK + WINDOW + 3)
    assert cache.total_bytes_held([]) == 0


STATES = 6


def test_cross_layers_hold_each_slots_states_and_zeros_past_them() -> None:
    """Cross layers: written at prefill (row i's first ``state_lengths[i]`` columns), seen whole by every
    later step, zero past a row's own states (a text-only row holds none), moved with the slot."""
    torch.manual_seed(0)
    kinds = [FULL, LayerKind("cross", states=STATES)]
    cache = PagedKVCache(2, HEADS, DIM, 3, MAX_LEN, torch.float32, torch.device("cpu"), kinds)
    assert cache.keys[1].shape == (3, HEADS, STATES, DIM) and cache.max_states == STATES
    # A previous occupant left states in slot 1: a text-only prompt there must not see them.
    cache.keys[1][1].normal_()
    cache.values[1][1].normal_()
    cache.state_lengths[1] = STATES
    image = torch.randn(1, HEADS, STATES, DIM)
    states = torch.cat([image, torch.randn(1, HEADS, STATES, DIM)])  # row 1's are padding: not stored
    cache.grow(0, 6)
    cache.grow(1, 6)
    cache.grow(2, 6)
    cache.prepare_prefill(0, 2, 5, [5, 3], [STATES, 0])
    assert cache.layers[1].is_initialized and cache.layers[1].keys.shape == (2, HEADS, STATES, DIM)
    k, v = cache.update(states, states * 2, 1)
    assert torch.equal(k[0], image[0]) and torch.equal(v[0], image[0] * 2)
    assert not k[1].any() and not v[1].any()
    assert cache.state_lengths[:2] == [STATES, 0]
    # Decode: the text model reads layers[i] (no update() for cross layers).
    cache.prepare_decode(torch.tensor([5, 3]), 6)
    assert torch.equal(cache.layers[1].keys[0], image[0]) and not cache.layers[1].values[1].any()
    with pytest.raises(RuntimeError, match="prefill only"):
        cache.update(states, states, 1)
    # Slot 0 leaves: slot 1 (text only) moves into it; the image's states are gone from slot 0.
    cache.move(1, 0, 4)
    cache.prepare_decode(torch.tensor([4]), 5)
    assert cache.layers[1].keys.numel() == 0  # only text-only rows: the model skips its cross layers
    assert not cache.keys[1][0].any() and cache.state_lengths[0] == 0
    # An image prompt moving into a slot keeps its states.
    cache.grow(1, 4)
    cache.prepare_prefill(1, 1, 4, [4], [STATES])
    cache.update(image, image * 2, 1)
    cache.move(1, 0, 4)
    assert torch.equal(cache.keys[1][0], image[0]) and cache.state_lengths[0] == STATES


def test_cross_states_count_in_the_budget_and_the_held_bytes() -> None:
    kinds = [FULL, LayerKind("cross", states=STATES), FULL]
    per_seq = PagedKVCache.bytes_per_sequence(kinds, HEADS, DIM, MAX_LEN, torch.float32)
    per_column = 2 * HEADS * DIM * 4
    assert per_seq == per_column * (2 * MAX_LEN + STATES)
    cache = PagedKVCache(3, HEADS, DIM, 2, MAX_LEN, torch.float32, torch.device("cpu"), kinds)
    assert cache.nbytes == 2 * per_seq + cache.block_bytes  # (the scratch block)
    assert cache.bytes_held(16) == per_column * 2 * 16  # token layers only: one block of 16
    cache.grow(0, 4)
    cache.grow(1, 4)
    cache.prepare_prefill(0, 2, 4, [4, 4], [STATES, 0])
    assert cache.state_bytes_held(2) == per_column * STATES and cache.state_bytes_held(0) == 0
    with pytest.raises(ValueError, match="cross-attention states"):
        cache.prepare_prefill(0, 1, 4, [4], [STATES + 1])


def test_a_ring_saved_into_blocks_loads_into_another_slot_as_it_was() -> None:
    """The rings of a slot (every sliding layer) go into pool blocks (a prefix-cache entry keeps them)
    and come back into another slot unchanged; the blocks are taken from the full layers' pool, a
    block holding one block of columns of one sliding layer per full layer."""
    torch.manual_seed(0)
    window = 2 * BLOCK + 1  # (a last block of columns only partly used)
    kinds = [LayerKind("sliding", window), FULL, LayerKind("sliding", window), LayerKind("sliding", window)]
    cache = PagedKVCache(4, HEADS, DIM, 3, MAX_LEN, torch.float32, CPU, kinds, block_size=BLOCK)
    assert cache.ring_columns == window
    assert cache.ring_blocks_for(window) == 3 * 3  # 3 sliding layers x 3 blocks of columns, 1 full layer
    assert cache.ring_blocks_for(BLOCK) == 3
    for layer in (0, 2, 3):
        cache.keys[layer].normal_()
        cache.values[layer].normal_()
    for columns in (window, BLOCK + 1):
        blocks = cache.allocator.allocate(cache.ring_blocks_for(columns))
        cache.save_ring(1, columns, blocks)
        cache.load_ring(2, columns, blocks)
        for layer in (0, 2, 3):
            assert torch.equal(cache.keys[layer][2, :, :columns], cache.keys[layer][1, :, :columns])
            assert torch.equal(cache.values[layer][2, :, :columns], cache.values[layer][1, :, :columns])
        assert not torch.equal(cache.keys[0][2], cache.keys[0][0])  # (slot 0 is another ring)
        cache.allocator.release(blocks)
