"""The KV cache: full-attention layers in blocks held by use, window and cross layers in per-slot rows.

Running sequences occupy slots ``0 .. n-1`` (a leaving sequence's slot is taken by the last one). A
slot is a row of the block table and, for the layers whose memory per sequence is bounded anyway, a
row of their buffers:

- **Full-attention layers** keep keys/values in a pool of blocks of ``block_size`` positions,
  ``[num_blocks + 1, block_size, kv_heads, head_dim]``. A sequence holds the blocks its tokens need
  (``grow``), listed in its slot's row of the block table; the key of position ``p`` lives at
  ``table[p // block_size]``, offset ``p % block_size``. Blocks are reference counted: a prefix-cache
  entry and the sequences that start from it share the blocks of their common start (never written
  again: a sequence writes only past its shared blocks). Attention reads a row's blocks gathered in
  position order. Table entries a slot does not hold point at the pool's last block, a scratch block
  that belongs to no one (CUDA-graph dummy rows write there).
- **Sliding-window layers** (Gemma 3's local layers) keep only their window: a ring of ``window``
  columns per slot where position ``p`` lives in column ``p % window``, attended as is with a mask of
  the columns written so far (attention does not care about key order; positions are rotated in).
- **Cross layers** (Mllama's cross-attention layers) hold a fixed set of encoder states per slot (its
  image's keys/values, up to ``states`` columns), written once at prefill and read at every decode
  step. Each slot records how many it holds (0 for a text-only prompt) and columns past that count are
  kept zero, so one batch can mix rows with and without images.

The object plays the role of transformers' ``Cache`` for the decoder layers, which call
``update(key_states, value_states, layer_idx)`` and, for cross layers, read ``layers[i].keys`` /
``.values``: before each forward the runner says where the new keys go (``prepare_prefill`` /
``prepare_decode``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tritonvlm.engine import paged_attention
from tritonvlm.engine.block_manager import BlockAllocator
from tritonvlm.families.base import FULL, LayerKind
from tritonvlm.modeling.device import device_tensor

DEFAULT_BLOCK_SIZE = 16


class CacheLayerView:
    """``cache.layers[i]`` as transformers' cache layers expose it: the keys/values of layer ``i`` that
    the next forward attends over (decode: the running slots; prefill: the prompts' slots)."""

    def __init__(self, cache: PagedKVCache, layer_idx: int) -> None:
        self._cache = cache
        self._layer = layer_idx

    @property
    def is_initialized(self) -> bool:
        return bool(self._cache._mode)

    @property
    def keys(self) -> torch.Tensor:
        return self._cache.view(self._cache.keys[self._layer], self._layer)

    @property
    def values(self) -> torch.Tensor:
        return self._cache.view(self._cache.values[self._layer], self._layer)


class PagedKVCache:
    """Keys/values of every layer for up to ``max_slots`` sequences of at most ``max_len`` tokens, the
    full-attention layers' in ``num_blocks`` shared blocks (see the module docstring)."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        layer_kinds: Sequence[LayerKind] | None = None,
        num_blocks: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        self.kinds = list(layer_kinds) if layer_kinds is not None else [FULL] * num_layers
        if len(self.kinds) != num_layers:
            raise ValueError(f"{len(self.kinds)} layer kinds for {num_layers} layers")
        self.block_size = block_size
        self.max_blocks = -(-max_len // block_size)  # table columns: blocks of a max_len sequence
        if num_blocks is None:
            num_blocks = max_slots * self.max_blocks
        self.num_blocks = num_blocks
        self.scratch = num_blocks  # the pool's extra last block
        self.heads, self.head_dim = num_kv_heads, head_dim
        self.columns = [self.layer_columns(kind, max_len) for kind in self.kinds]
        self.paged = [kind.is_full for kind in self.kinds]
        self.keys = [
            torch.zeros(
                (num_blocks + 1, block_size, num_kv_heads, head_dim)
                if paged
                else (max_slots, num_kv_heads, cols, head_dim),
                dtype=dtype,
                device=device,
            )
            for cols, paged in zip(self.columns, self.paged, strict=True)
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.layers = [CacheLayerView(self, i) for i in range(num_layers)]
        self._per_column = 2 * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
        self.max_slots = max_slots
        self.max_len = max_len
        self.device = device
        self.allocator = BlockAllocator(num_blocks)
        self.slot_blocks: list[list[int]] = [[] for _ in range(max_slots)]
        self.tables = torch.full((max_slots, self.max_blocks), self.scratch, dtype=torch.long, device=device)
        # Edited on the host, copied to the device before a forward that reads it (sync_tables).
        self._host_tables = self.tables if device.type == "cpu" else self.tables.cpu().pin_memory()
        # The same memory as numpy: an edit of a few entries costs ~0.1 µs instead of torch's ~5 µs
        # (the engine grows some slot by a block at nearly every step of a large batch).
        self._table_rows = self._host_tables.numpy()
        self._tables_dirty = False
        self._tables_copied: torch.cuda.Event | None = None  # the last copy's end (it reads the host's)
        self.sliding_window = min((k.window for k in self.kinds if k.is_sliding), default=None)
        self.cross_layers = [i for i, kind in enumerate(self.kinds) if kind.is_cross]
        self._ring_layers = [i for i, kind in enumerate(self.kinds) if kind.is_sliding]
        self._full_layers = [i for i, paged in enumerate(self.paged) if paged]
        self.max_states = min((self.columns[i] for i in self.cross_layers), default=0)
        self._sliding_columns = [c for c, k in zip(self.columns, self.kinds, strict=True) if k.is_sliding]
        # Cross-layer columns each slot holds; in a free slot, the columns it may still hold (not zero).
        self.state_lengths = [0] * max_slots
        self._mode = ""
        self._first_slot = 0
        self._num_rows = 0
        self._length = 0
        self._state_width = 0
        self._lengths: list[int] = []
        self._offsets: list[int] | None = None
        self._kv_len = 0
        self._rows: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._write_at: torch.Tensor | None = None  # flat pool index of each new key (full layers)
        self._prompt_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # (row, token) of each prompt key
        self._read_blocks: torch.Tensor | None = None  # [rows, blocks] attended in position order
        # Decode attention over the full layers by paged_attention's kernel (set by the runner): their
        # update then only writes, and attention reads each row's own blocks up to its own length.
        self.decode_kernel = False
        self._decode_lengths: torch.Tensor | None = None
        self._splits = 1

    # ---- sizes -------------------------------------------------------------------------------------------
    @staticmethod
    def layer_columns(kind: LayerKind, max_len: int) -> int:
        """Cache columns one sequence holds at most in a layer of ``kind``."""
        if kind.is_cross:
            return int(kind.states or 0)
        return min(kind.window, max_len) if kind.is_sliding and kind.window else max_len

    @staticmethod
    def bytes_per_sequence(
        kinds: Sequence[LayerKind], num_kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype
    ) -> int:
        """Memory a sequence of ``max_len`` tokens holds across all layers (keys and values; cross
        layers' states included)."""
        per_column = 2 * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
        return sum(PagedKVCache.layer_columns(kind, max_len) for kind in kinds) * per_column

    @staticmethod
    def slot_bytes(
        kinds: Sequence[LayerKind], num_kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype
    ) -> int:
        """Memory each slot reserves whatever it holds: its sliding rings and cross-layer states."""
        rows = [kind for kind in kinds if not kind.is_full]
        return PagedKVCache.bytes_per_sequence(rows, num_kv_heads, head_dim, max_len, dtype)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Memory one cached token takes across ``num_layers`` full-attention layers (keys and values)."""
        return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    @staticmethod
    def bytes_per_block(
        kinds: Sequence[LayerKind],
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> int:
        """Memory of one block across the full-attention layers of ``kinds``."""
        full = sum(1 for kind in kinds if kind.is_full)
        return block_size * PagedKVCache.bytes_per_token(full, num_kv_heads, head_dim, dtype)

    @property
    def block_bytes(self) -> int:
        """Memory of one block across the full-attention layers."""
        return self.block_size * sum(self.paged) * self._per_column

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def bytes_held(self, num_tokens: int) -> int:
        """Memory the keys/values of a sequence of ``num_tokens`` tokens occupy across the token layers:
        its blocks in the full layers, the used part of its ring in the sliding ones (cross layers'
        states: :meth:`state_bytes_held`)."""
        return self.total_bytes_held([num_tokens])

    def total_bytes_held(self, token_counts: list[int]) -> int:
        """:meth:`bytes_held` summed over sequences of ``token_counts`` tokens (the engine's gauge, every
        step: one pass per kind of layer, no call per sequence)."""
        size = self.block_size
        blocks = sum([(n + size - 1) // size for n in token_counts])
        sliding = sum(sum([min(n, cols) for n in token_counts]) for cols in self._sliding_columns)
        return blocks * self.block_bytes + sliding * self._per_column

    def state_bytes_held(self, num_rows: int) -> int:
        """Memory the cross layers' states of the sequences in slots ``0 .. num_rows-1`` occupy."""
        return sum(self.state_lengths[:num_rows]) * len(self.cross_layers) * self._per_column

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def has_sliding(self) -> bool:
        return self.sliding_window is not None

    def sliding_columns(self, kv_len: int) -> int:
        """Ring columns a decode step over ``kv_len`` tokens attends in the sliding layers."""
        return min(self.sliding_window or kv_len, kv_len)

    # ---- sliding rings kept with prefix-cache entries ---------------------------------------------------
    @property
    def ring_columns(self) -> int:
        """Columns of each slot's ring in the sliding layers (0: no sliding layers)."""
        return min(self.sliding_window, self.max_len) if self.sliding_window else 0

    def ring_blocks_for(self, columns: int) -> int:
        """Pool blocks that hold ``columns`` ring columns of every sliding layer: one block holds
        ``block_size`` columns of one sliding layer in each full layer's pool."""
        chunks = len(self._ring_layers) * self.blocks_for(columns)
        return -(-chunks // max(1, len(self._full_layers)))

    def save_ring(self, slot: int, columns: int, blocks: Sequence[int]) -> None:
        """Copy the first ``columns`` ring columns of ``slot`` in every sliding layer into ``blocks``
        (:meth:`ring_blocks_for` of them)."""
        wheres = self._ring_block_indices(columns, blocks)
        for pools in (self.keys, self.values):
            chunks = self._ring_chunks(torch.stack([pools[i][slot, :, :columns] for i in self._ring_layers]))
            for k, (layer, where) in enumerate(zip(self._full_layers, wheres, strict=True)):
                pools[layer].index_copy_(0, where, chunks[k :: len(self._full_layers)])

    def load_ring(self, slot: int, columns: int, blocks: Sequence[int]) -> None:
        """Fill the first ``columns`` ring columns of ``slot`` in every sliding layer from ``blocks``
        (written by :meth:`save_ring`)."""
        full, sliding, per_layer = len(self._full_layers), len(self._ring_layers), self.blocks_for(columns)
        shape = (sliding, per_layer, self.block_size, self.heads, self.head_dim)
        wheres = self._ring_block_indices(columns, blocks)
        for pools in (self.keys, self.values):
            chunks = pools[self._full_layers[0]].new_empty(sliding * per_layer, *shape[2:])
            for k, (layer, where) in enumerate(zip(self._full_layers, wheres, strict=True)):
                chunks[k::full] = pools[layer].index_select(0, where)
            rings = chunks.view(shape).permute(0, 3, 1, 2, 4).reshape(sliding, self.heads, -1, self.head_dim)
            for j, layer in enumerate(self._ring_layers):
                pools[layer][slot, :, :columns] = rings[j, :, :columns]

    def _ring_block_indices(self, columns: int, blocks: Sequence[int]) -> list[torch.Tensor]:
        """Per full layer, the blocks of ``blocks`` its pool holds ring chunks in (chunk i: full layer
        ``i % full``, block ``i // full``), on the device (one copy for keys and values)."""
        chunks, full = len(self._ring_layers) * self.blocks_for(columns), len(self._full_layers)
        return [
            device_tensor(list(blocks[: len(range(k, chunks, full))]), torch.long, self.device)
            for k in range(full)
        ]

    def _ring_chunks(self, rings: torch.Tensor) -> torch.Tensor:
        """``[sliding, heads, columns, dim]`` rings as ``[sliding * blocks, block_size, heads, dim]``
        chunks, block by block of columns (the last one padded)."""
        count, heads, columns, dim = rings.shape
        per_layer = self.blocks_for(columns)
        padded = rings.new_zeros(count, heads, per_layer * self.block_size, dim)
        padded[:, :, :columns] = rings
        chunks = padded.view(count, heads, per_layer, self.block_size, dim).permute(0, 2, 3, 1, 4)
        return chunks.reshape(count * per_layer, self.block_size, heads, dim)

    # ---- blocks of a slot ------------------------------------------------------------------------------
    def grow(self, slot: int, num_tokens: int) -> None:
        """Give ``slot`` the blocks to hold ``num_tokens`` positions. Raises ``MemoryError`` if too few
        are free (the engine reserves them before it admits a sequence)."""
        held = self.slot_blocks[slot]
        need = self.blocks_for(num_tokens) - len(held)
        if need > 0:
            new = self.allocator.allocate(need)
            self._edit_tables()
            self._table_rows[slot, len(held) : len(held) + need] = new
            held.extend(new)

    def adopt(self, slot: int, blocks: Sequence[int]) -> None:
        """``slot`` (empty) starts with ``blocks`` (shared: never written through this slot)."""
        if self.slot_blocks[slot]:
            raise ValueError(f"slot {slot} already holds blocks")
        self.allocator.share(blocks)
        self.slot_blocks[slot] = list(blocks)
        if blocks:
            self._edit_tables()
            self._table_rows[slot, : len(blocks)] = blocks

    def release(self, slot: int) -> None:
        """``slot``'s sequence is gone: its blocks lose a holder; its table row points at scratch."""
        held = self.slot_blocks[slot]
        if held:
            self.allocator.release(held)
            self._edit_tables()
            self._table_rows[slot, : len(held)] = self.scratch
            self.slot_blocks[slot] = []

    def copy_positions(self, src_block: int, dst_block: int, n: int) -> None:
        """Copy the first ``n`` positions of block ``src_block`` into ``dst_block`` in every full layer."""
        for layer, paged in enumerate(self.paged):
            if paged:
                self.keys[layer][dst_block, :n] = self.keys[layer][src_block, :n]
                self.values[layer][dst_block, :n] = self.values[layer][src_block, :n]

    def sync_tables(self) -> None:
        """Make the device's block table match the host's edits (before a forward reads it)."""
        if self._tables_dirty:
            if self.tables is not self._host_tables:
                self.tables.copy_(self._host_tables, non_blocking=True)
                self._tables_copied = torch.cuda.Event()
                self._tables_copied.record(torch.cuda.current_stream(self.device))
            self._tables_dirty = False

    def _edit_tables(self) -> None:
        """Before the host edits its table (which the next :meth:`sync_tables` then copies): the
        device's last copy of it must have been read (the copy runs when the device gets to it, and
        the engine edits tables while a forward may still run)."""
        if self._tables_copied is not None:
            self._tables_copied.synchronize()
            self._tables_copied = None
        self._tables_dirty = True

    # ---- forwards ----------------------------------------------------------------------------------------
    def prepare_prefill(
        self,
        first_slot: int,
        num_rows: int,
        length: int,
        lengths: list[int],
        state_lengths: list[int] | None = None,
        offsets: list[int] | None = None,
        kv_len: int = 0,
    ) -> None:
        """The next forward is a prefill of ``num_rows`` prompts (right-padded to ``length``; row i has
        ``lengths[i]`` real tokens and ``state_lengths[i]`` cross-layer states) whose keys go to slots
        ``first_slot ..`` (which hold the blocks for them); attention sees only the prompts' own keys.

        With ``offsets`` (a prefix-cache hit, a later chunk), row i's slot already holds the keys of its
        first ``offsets[i]`` prompt tokens: the new tokens' keys go after them and attention spans
        positions ``0 .. kv_len-1`` of the slot in the full layers, the ring as it was (the window
        before the new tokens) and the new keys in the sliding ones (cross layers: their states, written
        again)."""
        states = list(state_lengths) if state_lengths is not None else [0] * num_rows
        for i, n in enumerate(states):
            if not 0 <= n <= self.max_states:
                raise ValueError(f"row {i} has {n} cross-attention states; a slot holds {self.max_states}")
            self._set_state_length(first_slot + i, n)
        self._mode = "prefill"
        self._first_slot, self._num_rows, self._length = first_slot, num_rows, length
        self._lengths = list(lengths)
        self._state_width = max(states, default=0)
        self._offsets = list(offsets) if offsets is not None and any(offsets) else None
        self._kv_len = kv_len
        starts = self._offsets or [0] * num_rows
        rows, tokens, write_at = [], [], []
        for i, (start, n) in enumerate(zip(starts, lengths, strict=True)):
            positions = torch.arange(start, start + n)
            table = self._host_tables[first_slot + i]
            if self.blocks_for(start + n) > len(self.slot_blocks[first_slot + i]):
                raise RuntimeError(f"slot {first_slot + i} holds too few blocks for {start + n} tokens")
            rows.append(torch.full((n,), i))
            tokens.append(torch.arange(n))
            block = table[positions // self.block_size]
            write_at.append(block * self.block_size + positions % self.block_size)
        self._prompt_rows = (torch.cat(rows).to(self.device), torch.cat(tokens).to(self.device))
        self._write_at = torch.cat(write_at).to(self.device)
        self.sync_tables()
        if self._offsets is not None:
            blocks = self.blocks_for(kv_len)
            self._read_blocks = self.tables[first_slot : first_slot + num_rows, :blocks]

    def prepare_decode(self, positions: torch.Tensor, kv_len: int) -> None:
        """The next forward decodes one token for slots ``0 .. len(positions)-1``; row i's new key is
        at cache position ``positions[i]`` and attention spans positions ``0 .. kv_len-1``. Tensor
        operations only (a CUDA graph records them): the block table must be synced before."""
        self._mode = "decode"
        n = int(positions.shape[0])
        self._num_rows = n
        self._rows = torch.arange(n, device=self.device)
        self._positions = positions.to(self.device)
        self._length = kv_len
        self._state_width = max(self.state_lengths[:n], default=0)
        tables = self.tables[:n]
        block = tables.gather(1, (self._positions // self.block_size)[:, None])[:, 0]
        self._write_at = block * self.block_size + self._positions % self.block_size
        self._read_blocks = tables[:, : self.blocks_for(kv_len)]
        if self.decode_kernel:
            # A CUDA graph's dummy rows write at max_len - 1 (no sequence feeds that position back):
            # they attend to nothing.
            spare = self._positions >= self.max_len - 1
            self._decode_lengths = torch.where(spare, 0, self._positions + 1)
            self._splits = paged_attention.choose_splits(n, self.heads, kv_len, self.device)

    def _gather(self, pool: torch.Tensor, kv_len: int) -> torch.Tensor:
        """``[rows, heads, kv_len, dim]``: the prepared rows' blocks of ``pool`` in position order."""
        blocks = self._read_blocks
        rows, count = blocks.shape
        # index_select: half the time of pool[blocks] on a CPU
        flat = pool.index_select(0, blocks.reshape(-1)).view(
            rows, count * self.block_size, self.heads, self.head_dim
        )
        return flat[:, :kv_len].transpose(1, 2)

    def view(self, buffer: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """What attention sees of ``buffer`` (a layer's keys or values) in the prepared forward."""
        if self.paged[layer_idx]:
            span = self._kv_len if self._mode == "prefill" else self._length
            if self._read_blocks is None or (self._mode == "prefill" and self._offsets is None):
                return buffer.new_zeros(self._num_rows, self.heads, 0, self.head_dim)
            return self._gather(buffer, span)
        if self._mode == "prefill":
            rows = slice(self._first_slot, self._first_slot + self._num_rows)
        else:
            rows = slice(0, self._num_rows)
        if self.kinds[layer_idx].is_cross:
            return buffer[rows, :, : self._state_width]
        return buffer[rows, :, : min(self._length, self.columns[layer_idx])]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values of one layer and return what attention must see."""
        if self.kinds[layer_idx].is_cross:
            return self._update_cross(key_states, value_states, layer_idx)
        if not self._mode:
            raise RuntimeError("PagedKVCache.update called before prepare_prefill/prepare_decode")
        if self.paged[layer_idx]:
            return self._update_paged(key_states, value_states, layer_idx)
        return self._update_ring(key_states, value_states, layer_idx)

    def _update_paged(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.keys[layer_idx].view(-1, self.heads, self.head_dim)
        v = self.values[layer_idx].view(-1, self.heads, self.head_dim)
        if self._mode == "decode":
            k.index_copy_(0, self._write_at, key_states[:, :, 0])
            v.index_copy_(0, self._write_at, value_states[:, :, 0])
            if self.decode_kernel:  # attention reads the blocks itself (decode_attention)
                return key_states, value_states
            return (
                self._gather(self.keys[layer_idx], self._length),
                self._gather(self.values[layer_idx], self._length),
            )
        rows, tokens = self._prompt_rows
        k.index_copy_(0, self._write_at, key_states.transpose(1, 2)[rows, tokens])
        v.index_copy_(0, self._write_at, value_states.transpose(1, 2)[rows, tokens])
        if self._offsets is None:
            return key_states, value_states
        return (
            self._gather(self.keys[layer_idx], self._kv_len),
            self._gather(self.values[layer_idx], self._kv_len),
        )

    def end_forward(self) -> None:
        """The prepared forward is over: until the next ``prepare_*``, nothing is attended through the
        cache (a forward of the same model elsewhere, e.g. ``generate()``, must not find it prepared)."""
        self._mode = ""

    def decode_attention(self, layer_idx: int, query: torch.Tensor, scale: float) -> torch.Tensor | None:
        """With ``decode_kernel``, a decode step's attention output ``[rows, 1, q_heads, dim]`` in a
        full-attention layer, read from the blocks (``query``: ``[rows, q_heads, 1, dim]``); None where
        the layer's attention is to be computed over what :meth:`update` returned."""
        if not (self.decode_kernel and self._mode == "decode" and self.paged[layer_idx]):
            return None
        out = paged_attention.paged_decode_attention(
            query[:, :, 0],
            self.keys[layer_idx],
            self.values[layer_idx],
            self.tables[: self._num_rows],
            self._decode_lengths,
            scale,
            self._splits,
        )
        return out[:, None]

    def _update_ring(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A sliding layer: the last ``window`` positions of each slot, position p in column p % window."""
        k, v = self.keys[layer_idx], self.values[layer_idx]
        cols = self.columns[layer_idx]
        if self._mode == "prefill":
            first = self._first_slot
            starts = self._offsets
            if starts is not None:  # attention sees the ring as it was, then the new keys
                rows = slice(first, first + self._num_rows)
                ring_k, ring_v = k[rows].clone(), v[rows].clone()
            for i, n in enumerate(self._lengths):
                keep = torch.arange(max(0, n - cols), n, device=self.device)
                at = (keep + (starts[i] if starts else 0)) % cols
                k[first + i, :, at] = key_states[i, :, keep]
                v[first + i, :, at] = value_states[i, :, keep]
            if starts is None:
                return key_states, value_states
            return torch.cat([ring_k, key_states], dim=2), torch.cat([ring_v, value_states], dim=2)
        k[self._rows, :, self._positions % cols] = key_states[:, :, 0]
        v[self._rows, :, self._positions % cols] = value_states[:, :, 0]
        span = self.sliding_columns(self._length)
        return k[: self._num_rows, :, :span], v[: self._num_rows, :, :span]

    def _update_cross(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A cross layer's states (``[rows, heads, width, dim]``, row i's first ``state_lengths`` real):
        stored at prefill; attention sees the slots' states, zero past each row's own."""
        if self._mode != "prefill":
            raise RuntimeError("cross-attention states are written at prefill only")
        k, v = self.keys[layer_idx], self.values[layer_idx]
        first = self._first_slot
        for i in range(self._num_rows):
            n = self.state_lengths[first + i]
            if n:
                k[first + i, :, :n] = key_states[i, :, :n]
                v[first + i, :, :n] = value_states[i, :, :n]
        return self.view(k, layer_idx), self.view(v, layer_idx)

    def _set_state_length(self, slot: int, n: int) -> None:
        """Slot ``slot`` now holds ``n`` cross-layer states: zero what it held past them."""
        held = self.state_lengths[slot]
        if held > n:
            for layer in self.cross_layers:
                self.keys[layer][slot, :, n:held] = 0
                self.values[layer][slot, :, n:held] = 0
        self.state_lengths[slot] = n

    def move(self, src: int, dst: int, length: int) -> None:
        """Slot ``src``'s sequence (holding ``length`` tokens) moves to slot ``dst``: its blocks change
        rows in the table (no copy; what ``dst`` held is released), its rings and states are copied."""
        if src == dst:
            return
        self.release(dst)
        blocks = self.slot_blocks[src]
        self.slot_blocks[dst], self.slot_blocks[src] = blocks, []
        if blocks:
            self._edit_tables()
            self._table_rows[dst, : len(blocks)] = self._table_rows[src, : len(blocks)]
            self._table_rows[src, : len(blocks)] = self.scratch
        n = self.state_lengths[src]
        self._set_state_length(dst, n)
        for layer in self.cross_layers:
            self.keys[layer][dst, :, :n] = self.keys[layer][src, :, :n]
            self.values[layer][dst, :, :n] = self.values[layer][src, :, :n]
        if length <= 0:
            return
        for k, v, cols, kind in zip(self.keys, self.values, self.columns, self.kinds, strict=True):
            if kind.is_sliding:
                used = min(length, cols)
                k[dst, :, :used] = k[src, :, :used]
                v[dst, :, :used] = v[src, :, :used]
