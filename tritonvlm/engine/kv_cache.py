"""A preallocated KV cache with one slot (row) per running sequence.

Running sequences always occupy slots ``0 .. n-1``: a leaving sequence's slot is filled by moving the
last one into it. A decode step then attends over the view ``keys[:n, :, :kv_len]`` of the buffer,
so neither a join nor a decode step copies the other sequences' cache (a join-by-padding cache
rebuilds every running sequence's cache on each join, and a concatenating cache copies it every step).

The object plays the role of transformers' ``Cache`` for the decoder layers, which only call
``update(key_states, value_states, layer_idx)``: before each forward the runner says where the new
keys go (``prepare_prefill`` / ``prepare_decode``).
"""

from __future__ import annotations

import torch


class SlotKVCache:
    """Key/value buffers of shape ``[max_slots, kv_heads, max_len, head_dim]`` for every layer."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (max_slots, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_slots = max_slots
        self.max_len = max_len
        self.device = device
        self._mode = ""
        self._first_slot = 0
        self._num_rows = 0
        self._length = 0
        self._rows: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Memory one cached token takes across all layers (keys and values)."""
        return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def prepare_prefill(self, first_slot: int, num_rows: int, length: int) -> None:
        """The next forward is a prefill of ``num_rows`` prompts (right-padded to ``length``) whose
        keys go to slots ``first_slot ..``; attention sees only the prompts' own keys."""
        self._mode = "prefill"
        self._first_slot, self._num_rows, self._length = first_slot, num_rows, length

    def prepare_decode(self, positions: torch.Tensor, kv_len: int) -> None:
        """The next forward decodes one token for slots ``0 .. len(positions)-1``; row i's new key is
        written at column ``positions[i]`` and attention spans columns ``0 .. kv_len-1``."""
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
        if self._mode == "prefill":
            rows = slice(self._first_slot, self._first_slot + self._num_rows)
            k[rows, :, : self._length] = key_states
            v[rows, :, : self._length] = value_states
            return key_states, value_states
        if self._mode == "decode":
            k[self._rows, :, self._positions] = key_states[:, :, 0]
            v[self._rows, :, self._positions] = value_states[:, :, 0]
            return k[: self._num_rows, :, : self._length], v[: self._num_rows, :, : self._length]
        raise RuntimeError("SlotKVCache.update called before prepare_prefill/prepare_decode")

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` cached tokens of slot ``src`` into slot ``dst``."""
        if src == dst or length <= 0:
            return
        for k, v in zip(self.keys, self.values, strict=True):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]
