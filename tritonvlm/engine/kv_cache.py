"""A preallocated KV cache with one slot (row) per running sequence.

Running sequences always occupy slots ``0 .. n-1``: a leaving sequence's slot is filled by moving the
last one into it. A decode step then attends over the view ``keys[:n, :, :kv_len]`` of the buffer,
so neither a join nor a decode step copies the other sequences' cache (a join-by-padding cache
rebuilds every running sequence's cache on each join, and a concatenating cache copies it every step).

Layers of a sliding-window kind (Gemma 3's local layers) keep only their window: a ring of ``window``
columns where the key of position ``p`` lives in column ``p % window``. Attention does not care about
the order of keys (their positions are already rotated in), so the ring is attended as is, with a
mask of the columns written so far.

Layers of the ``cross`` kind (Mllama's cross-attention layers) hold a fixed set of encoder states per
sequence (its image's keys/values, up to ``states`` columns) instead of one column per token. They are
written once, at prefill, and read at every decode step. Each slot records how many such columns it
holds (0 for a text-only prompt) and columns past that count are kept zero, so one batch can mix rows
with and without images: a row with fewer states sees zero keys and values there (the family's mask
decides what they weigh). They move with their slot and are released with it.

The object plays the role of transformers' ``Cache`` for the decoder layers, which call
``update(key_states, value_states, layer_idx)`` and, for cross layers, read ``layers[i].keys`` /
``.values`` (the current batch's view): before each forward the runner says where the new keys go
(``prepare_prefill`` / ``prepare_decode``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tritonvlm.families.base import FULL, LayerKind


class CacheLayerView:
    """``cache.layers[i]`` as transformers' cache layers expose it: the keys/values of layer ``i`` that
    the next forward attends over (decode: the running slots; prefill: the prompts' slots)."""

    def __init__(self, cache: SlotKVCache, layer_idx: int) -> None:
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


class SlotKVCache:
    """Key/value buffers of shape ``[max_slots, kv_heads, columns, head_dim]`` for every layer:
    ``columns`` is ``max_len`` for full-attention layers, ``min(window, max_len)`` for sliding ones and
    ``states`` for cross layers."""

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
    ) -> None:
        self.kinds = list(layer_kinds) if layer_kinds is not None else [FULL] * num_layers
        if len(self.kinds) != num_layers:
            raise ValueError(f"{len(self.kinds)} layer kinds for {num_layers} layers")
        self.columns = [self.layer_columns(kind, max_len) for kind in self.kinds]
        self.keys = [
            torch.zeros((max_slots, num_kv_heads, cols, head_dim), dtype=dtype, device=device)
            for cols in self.columns
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.layers = [CacheLayerView(self, i) for i in range(num_layers)]
        self._per_column = 2 * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
        self.max_slots = max_slots
        self.max_len = max_len
        self.device = device
        self.sliding_window = min((k.window for k in self.kinds if k.is_sliding), default=None)
        self.cross_layers = [i for i, kind in enumerate(self.kinds) if kind.is_cross]
        self.max_states = min((self.columns[i] for i in self.cross_layers), default=0)
        self._token_columns = [c for c, k in zip(self.columns, self.kinds, strict=True) if not k.is_cross]
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

    @staticmethod
    def layer_columns(kind: LayerKind, max_len: int) -> int:
        """Cache columns one sequence holds in a layer of ``kind``."""
        if kind.is_cross:
            return int(kind.states or 0)
        return min(kind.window, max_len) if kind.is_sliding and kind.window else max_len

    @staticmethod
    def bytes_per_sequence(
        kinds: Sequence[LayerKind], num_kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype
    ) -> int:
        """Memory of one slot across all layers (keys and values; cross layers' states included)."""
        per_column = 2 * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
        return sum(SlotKVCache.layer_columns(kind, max_len) for kind in kinds) * per_column

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Memory one cached token takes across ``num_layers`` full-attention layers (keys and values)."""
        return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def bytes_held(self, num_tokens: int) -> int:
        """Memory the keys/values of a sequence of ``num_tokens`` tokens occupy across the token layers
        (full and sliding; cross layers' states: :meth:`state_bytes_held`)."""
        return sum(min(num_tokens, cols) for cols in self._token_columns) * self._per_column

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
        ``first_slot ..``; attention sees only the prompts' own keys.

        With ``offsets`` (a prefix-cache hit), row i's slot already holds the keys of its first
        ``offsets[i]`` prompt tokens: the new tokens' keys go after them and attention spans the slot's
        columns ``0 .. kv_len-1`` (full-attention layers only)."""
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
        if self._offsets is not None and any(not kind.is_full for kind in self.kinds):
            raise ValueError("a prefill after cached keys needs full-attention layers only")
        self._kv_len = kv_len

    def prepare_decode(self, positions: torch.Tensor, kv_len: int) -> None:
        """The next forward decodes one token for slots ``0 .. len(positions)-1``; row i's new key is
        at cache position ``positions[i]`` and attention spans positions ``0 .. kv_len-1``."""
        self._mode = "decode"
        self._num_rows = int(positions.shape[0])
        self._rows = torch.arange(self._num_rows, device=self.device)
        self._positions = positions.to(self.device)
        self._length = kv_len
        self._state_width = max(self.state_lengths[: self._num_rows], default=0)

    def view(self, buffer: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """What attention sees of ``buffer`` (a layer's keys or values) in the prepared forward."""
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
        k, v = self.keys[layer_idx], self.values[layer_idx]
        cols = self.columns[layer_idx]
        sliding = self.kinds[layer_idx].is_sliding and cols < self.max_len
        if self._mode == "prefill":
            first = self._first_slot
            if self._offsets is not None:
                for i, (start, n) in enumerate(zip(self._offsets, self._lengths, strict=True)):
                    k[first + i, :, start : start + n] = key_states[i, :, :n]
                    v[first + i, :, start : start + n] = value_states[i, :, :n]
                rows = slice(first, first + self._num_rows)
                return k[rows, :, : self._kv_len], v[rows, :, : self._kv_len]
            if not sliding:
                rows = slice(first, first + self._num_rows)
                k[rows, :, : self._length] = key_states
                v[rows, :, : self._length] = value_states
            else:
                for i, n in enumerate(self._lengths):
                    keep = torch.arange(max(0, n - cols), n, device=self.device)
                    k[first + i, :, keep % cols] = key_states[i, :, keep]
                    v[first + i, :, keep % cols] = value_states[i, :, keep]
            return key_states, value_states
        if self._mode == "decode":
            n = self._num_rows
            span = self._length
            if sliding:
                k[self._rows, :, self._positions % cols] = key_states[:, :, 0]
                v[self._rows, :, self._positions % cols] = value_states[:, :, 0]
                span = self.sliding_columns(self._length)
            else:
                k[self._rows, :, self._positions] = key_states[:, :, 0]
                v[self._rows, :, self._positions] = value_states[:, :, 0]
            return k[:n, :, :span], v[:n, :, :span]
        raise RuntimeError("SlotKVCache.update called before prepare_prefill/prepare_decode")

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
        """Copy slot ``src``'s cache of a sequence holding ``length`` tokens into slot ``dst``."""
        if src == dst:
            return
        n = self.state_lengths[src]
        self._set_state_length(dst, n)
        for layer in self.cross_layers:
            self.keys[layer][dst, :, :n] = self.keys[layer][src, :, :n]
            self.values[layer][dst, :, :n] = self.values[layer][src, :, :n]
        if length <= 0:
            return
        for k, v, cols, kind in zip(self.keys, self.values, self.columns, self.kinds, strict=True):
            if kind.is_cross:
                continue
            used = min(length, cols)
            k[dst, :, :used] = k[src, :, :used]
            v[dst, :, :used] = v[src, :, :used]
