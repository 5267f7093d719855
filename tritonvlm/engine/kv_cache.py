"""A preallocated KV cache with one slot (row) per running sequence.

Running sequences always occupy slots ``0 .. n-1``: a leaving sequence's slot is filled by moving the
last one into it. A decode step then attends over the view ``keys[:n, :, :kv_len]`` of the buffer,
so neither a join nor a decode step copies the other sequences' cache (a join-by-padding cache
rebuilds every running sequence's cache on each join, and a concatenating cache copies it every step).

Layers of a sliding-window kind (Gemma 3's local layers) keep only their window: a ring of ``window``
columns where the key of position ``p`` lives in column ``p % window``. Attention does not care about
the order of keys (their positions are already rotated in), so the ring is attended as is, with a
mask of the columns written so far.

The object plays the role of transformers' ``Cache`` for the decoder layers, which only call
``update(key_states, value_states, layer_idx)``: before each forward the runner says where the new
keys go (``prepare_prefill`` / ``prepare_decode``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tritonvlm.families.base import FULL, LayerKind


class SlotKVCache:
    """Key/value buffers of shape ``[max_slots, kv_heads, columns, head_dim]`` for every layer:
    ``columns`` is ``max_len`` for full-attention layers and ``min(window, max_len)`` for sliding ones."""

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
        self._per_column = 2 * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
        self.max_slots = max_slots
        self.max_len = max_len
        self.device = device
        self.sliding_window = min((k.window for k in self.kinds if k.is_sliding), default=None)
        self._mode = ""
        self._first_slot = 0
        self._num_rows = 0
        self._length = 0
        self._lengths: list[int] = []
        self._rows: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None

    @staticmethod
    def layer_columns(kind: LayerKind, max_len: int) -> int:
        """Cache columns one sequence holds in a layer of ``kind``."""
        return min(kind.window, max_len) if kind.is_sliding and kind.window else max_len

    @staticmethod
    def bytes_per_sequence(
        kinds: Sequence[LayerKind], num_kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype
    ) -> int:
        """Memory of one slot across all layers (keys and values)."""
        per_column = 2 * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
        return sum(SlotKVCache.layer_columns(kind, max_len) for kind in kinds) * per_column

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Memory one cached token takes across ``num_layers`` full-attention layers (keys and values)."""
        return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def bytes_held(self, num_tokens: int) -> int:
        """Memory the keys/values of a sequence of ``num_tokens`` tokens occupy across all layers."""
        return sum(min(num_tokens, cols) for cols in self.columns) * self._per_column

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def has_sliding(self) -> bool:
        return self.sliding_window is not None

    def sliding_columns(self, kv_len: int) -> int:
        """Ring columns a decode step over ``kv_len`` tokens attends in the sliding layers."""
        return min(self.sliding_window or kv_len, kv_len)

    def prepare_prefill(self, first_slot: int, num_rows: int, length: int, lengths: list[int]) -> None:
        """The next forward is a prefill of ``num_rows`` prompts (right-padded to ``length``; row i has
        ``lengths[i]`` real tokens) whose keys go to slots ``first_slot ..``; attention sees only the
        prompts' own keys."""
        self._mode = "prefill"
        self._first_slot, self._num_rows, self._length = first_slot, num_rows, length
        self._lengths = list(lengths)

    def prepare_decode(self, positions: torch.Tensor, kv_len: int) -> None:
        """The next forward decodes one token for slots ``0 .. len(positions)-1``; row i's new key is
        at cache position ``positions[i]`` and attention spans positions ``0 .. kv_len-1``."""
        self._mode = "decode"
        self._num_rows = int(positions.shape[0])
        self._rows = torch.arange(self._num_rows, device=self.device)
        self._positions = positions.to(self.device)
        self._length = kv_len

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values of one layer and return what attention must see."""
        k, v = self.keys[layer_idx], self.values[layer_idx]
        cols = self.columns[layer_idx]
        sliding = self.kinds[layer_idx].is_sliding and cols < self.max_len
        if self._mode == "prefill":
            first = self._first_slot
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

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s cache of a sequence holding ``length`` tokens into slot ``dst``."""
        if src == dst or length <= 0:
            return
        for k, v, cols in zip(self.keys, self.values, self.columns, strict=True):
            used = min(length, cols)
            k[dst, :, :used] = k[src, :, :used]
            v[dst, :, :used] = v[src, :, :used]
