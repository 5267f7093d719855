"""Tensors in, logits out: prefill (image embeddings merged at their placeholders, the family's
positions) and batched decode over the paged KV cache. Everything family-specific is a hook of the
model's :class:`~tritonvlm.families.base.Family`."""

from __future__ import annotations

from typing import Any

import torch

from tritonvlm.engine.cuda_graphs import DecodeGraphs, take_previous
from tritonvlm.engine.kernel_setup import set_up_kernels
from tritonvlm.engine.kv_cache import PagedKVCache
from tritonvlm.engine.sequence import Sequence
from tritonvlm.families.base import Family
from tritonvlm.modeling.device import device_tensor


class ModelRunner:
    """Runs the language model of a vision-language model for the engine.

    The runner builds the attention masks and positions itself and hands transformers 4-D masks, which
    transformers uses as they are: this is what lets sequences of different lengths share a batch.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        family: Family,
        max_slots: int,
        max_len: int,
        max_batch: int | None = None,
        cuda_graphs: bool = True,
        num_blocks: int | None = None,
        decode_attention: str = "auto",
        fused_ops: str = "auto",
    ) -> None:
        self.model = model
        self.family = family
        family.bind(model)
        self.language_model = family.language_model(model)
        self.embed_tokens = family.embed_tokens(model)
        self.lm_head = family.lm_head(model)
        self.layer_kinds = family.layer_kinds()
        self.num_kv_heads, self.head_dim = family.kv_geometry()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_len = max_len
        # CUDA attention kernels (cuDNN's in particular) plan per shape: a length that grows by one
        # every step would re-plan every step (~30 ms each on an H100). Rounding lengths up to a
        # bucket, with the padding masked, keeps the shapes few and the plans cached.
        self.length_bucket = 128 if self.device.type == "cuda" else 1
        self.cache = PagedKVCache(
            len(self.layer_kinds),
            self.num_kv_heads,
            self.head_dim,
            max_slots,
            max_len,
            self.dtype,
            self.device,
            self.layer_kinds,
            num_blocks=num_blocks,
        )
        kernels = set_up_kernels(
            self.language_model, family, self.cache, self.device, self.dtype, decode_attention, fused_ops
        )
        self.decode_attention = kernels.decode_attention
        self.fused_norms, self.fused_rotary = kernels.fused_norms, kernels.fused_rotary
        # With the kernel attending in every layer, a decode step's work no longer depends on the
        # attention length it is given (each row reads up to its own): one CUDA graph per batch bucket,
        # captured at the full length, serves every length.
        self.one_graph_per_batch = self.decode_attention == "triton" and all(self.cache.paged)
        # Decode steps from CUDA graphs where the family's decode forward depends on nothing but the
        # tokens and positions (a family with per-step extra inputs, e.g. Mllama's cross-attention
        # masks, decodes eagerly).
        self.graphs: DecodeGraphs | None = None
        plain_decode = type(family).decode_kwargs is Family.decode_kwargs
        if cuda_graphs and self.device.type == "cuda" and plain_decode:
            self.graphs = DecodeGraphs(self._decode_forward, max_batch or max_slots, self.device, max_len)

    def _bucket(self, length: int) -> int:
        bucket = self.length_bucket
        return min(self.max_len, -(-length // bucket) * bucket)

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence], first_slot: int) -> torch.Tensor:
        """Run the prompts of ``seqs`` (right-padded into one batch) and store their keys/values in
        slots ``first_slot ..`` (which hold the blocks for them). Returns the logits of each row's last
        computed token, ``[len(seqs), vocab]``.

        Row i computes tokens ``seqs[i].prefill_range`` ``[k, e)``: with k > 0 its first k keys/values
        are in its slot already (shared from the prefix cache, or an earlier chunk of a long prompt) and
        the new tokens attend to them; with e < ``prefill_target`` the rest comes in a later call. Past
        the prompt (a sequence resumed after preemption) the tokens are its outputs, at text positions."""
        ranges = [s.prefill_range for s in seqs]
        starts = [k for k, _ in ranges]
        lens = [e - k for k, e in ranges]  # tokens computed now
        lengths = torch.tensor(lens, device=self.device)
        length = self._bucket(max(lens))
        hidden = self.embed_tokens.embedding_dim
        embeds = torch.zeros(len(seqs), length, hidden, dtype=self.dtype, device=self.device)
        dims = self.family.position_dims
        positions = torch.zeros(dims, len(seqs), length, dtype=torch.long, device=self.device)
        for i, (seq, (k, e)) in enumerate(zip(seqs, ranges, strict=True)):
            pos, seq.next_position = self.family.prompt_positions(seq, self.device)
            n = seq.prompt_len
            if k < n:
                prompt = self.family.prompt_embeds(seq, self.embed_tokens, self.device)
                embeds[i, : min(e, n) - k] = prompt[k:e]
                positions[:, i, : min(e, n) - k] = pos[:, k:e]
            if e > n:  # a resumed sequence's output tokens: text after the prompt
                first = max(k, n)
                ids = torch.tensor(seq.output_ids[first - n : e - n], device=self.device)
                embeds[i, first - k : e - k] = self.embed_tokens(ids)
                after = torch.arange(first - n, e - n, device=self.device)
                positions[:, i, first - k : e - k] = seq.next_position + after
                seq.next_position += e - n
        if any(starts):
            masks, kv_len = self._offset_prefill_masks(ranges, length)
        else:
            masks, kv_len = self._prefill_masks(lengths, length), 0
        states = [self.family.cross_state_length(s) for s in seqs]
        self.cache.prepare_prefill(first_slot, len(seqs), length, lens, states, starts, kv_len)
        try:
            out = self.language_model(
                inputs_embeds=embeds,
                attention_mask=self.family.attention_mask(masks, seqs, prefill=True),
                position_ids=positions[0] if dims == 1 else positions,
                past_key_values=self.cache,
                use_cache=True,
                **self.family.prefill_kwargs(seqs, length, self.device),
            )
        finally:
            self.cache.end_forward()
        last = out.last_hidden_state[torch.arange(len(seqs), device=self.device), lengths - 1]
        return self.logits(last)

    def _prefill_masks(self, lengths: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
        """Causal masks ``[rows, 1, query, key]`` over the prompts alone (row i: ``lengths[i]`` tokens)."""
        cols = torch.arange(length, device=self.device)
        causal = cols[None, :] <= cols[:, None]  # [query, key]
        valid_key = cols[None, :] < lengths[:, None]  # [row, key]
        full = (causal[None] & valid_key[:, None, :])[:, None]  # [rows, 1, query, key]
        masks = {"full_attention": full}
        if self.cache.has_sliding:
            near = cols[:, None] - cols[None, :] < self.cache.sliding_window  # [query, key]
            masks["sliding_attention"] = full & near[None, None]
        return masks

    def _offset_prefill_masks(
        self, ranges: list[tuple[int, int]], length: int
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Masks for a prefill after keys already in the slots: row i's query j is prompt position
        ``ranges[i][0] + j`` and attends to the slot's columns up to it; and the key span."""
        kv_len = self._bucket(max(e for _, e in ranges))
        start = torch.tensor([k for k, _ in ranges], device=self.device)
        end = torch.tensor([e for _, e in ranges], device=self.device)
        query_pos = start[:, None] + torch.arange(length, device=self.device)[None, :]  # [rows, query]
        cols = torch.arange(kv_len, device=self.device)
        keys = cols[None, None, :]
        allowed = (keys <= query_pos[:, :, None]) & (keys < end[:, None, None])
        masks = {"full_attention": allowed[:, None]}
        if self.cache.has_sliding:
            masks["sliding_attention"] = self._offset_sliding_mask(start, end, query_pos)
        return masks, kv_len

    def _offset_sliding_mask(
        self, start: torch.Tensor, end: torch.Tensor, query_pos: torch.Tensor
    ) -> torch.Tensor:
        """``[rows, 1, query, ring + query]`` for the sliding layers of a prefill after keys in the slots:
        the ring's columns as they were (column c holds the last position before the row's start that
        is c modulo the ring; none where that is negative), then the new keys; each within the window
        behind the query."""
        window, ring = int(self.cache.sliding_window), self.cache.ring_columns
        last = start[:, None] - 1
        held = last - (last - torch.arange(ring, device=self.device)[None, :]) % ring  # [rows, ring]
        query = query_pos[:, :, None]
        in_ring = (held[:, None, :] >= 0) & (held[:, None, :] > query - window)
        new = query_pos[:, None, :]  # the new keys' positions
        in_new = (new <= query) & (new < end[:, None, None]) & (new > query - window)
        return torch.cat([in_ring, in_new], dim=-1)[:, None]

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], previous: torch.Tensor | None = None) -> torch.Tensor:
        """Feed each running sequence's last token (``seqs[i]`` lives in slot i); ``[len(seqs), vocab]``.

        A sequence whose last token is still on the device (``Sequence.inflight``: async scheduling)
        takes it from ``previous``, the tokens the step before sampled, at its row there; nothing here
        waits for the device."""
        tokens = [-1 - s.inflight_row if s.inflight else s.last_token for s in seqs]
        cache_pos = [s.num_tokens - 1 for s in seqs]  # row i has written cache positions 0 .. cache_pos[i]
        rope = [s.next_position for s in seqs]
        kv_len = self._bucket(max(cache_pos) + 1)
        self.cache.sync_tables()
        logits = None
        if self.graphs is not None:
            graph_len = self.max_len if self.one_graph_per_batch else kv_len
            logits = self.graphs.run(tokens, cache_pos, rope, graph_len, previous)
        if logits is None:
            device = self.device
            extra = self.family.decode_kwargs(seqs, device)
            logits = self._decode_forward(
                take_previous(device_tensor(tokens, torch.long, device), previous),
                device_tensor(cache_pos, torch.long, device),
                device_tensor(rope, torch.long, device),
                kv_len,
                seqs,
                extra,
            )
        for s in seqs:
            s.next_position += 1
        return logits

    def _decode_forward(
        self,
        tokens: torch.Tensor,
        cache_pos: torch.Tensor,
        rope: torch.Tensor,
        kv_len: int,
        seqs: list[Sequence] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """One decode forward from tensors alone (no host synchronisation: CUDA graphs capture it)."""
        written = cache_pos[:, None]
        masks: dict[str, Any] = {
            "full_attention": (torch.arange(kv_len, device=self.device)[None, :] <= written)[:, None, None, :]
        }
        if self.cache.has_sliding:
            ring = self.cache.sliding_columns(kv_len)
            masks["sliding_attention"] = (torch.arange(ring, device=self.device)[None, :] <= written)[
                :, None, None, :
            ]
        dims = self.family.position_dims
        positions = rope.view(1, -1, 1).expand(dims, -1, 1)
        self.cache.prepare_decode(cache_pos, kv_len)
        try:
            out = self.language_model(
                inputs_embeds=self.embed_tokens(tokens)[:, None],
                attention_mask=self.family.attention_mask(masks, seqs or [], prefill=False),
                position_ids=positions[0] if dims == 1 else positions,
                past_key_values=self.cache,
                use_cache=True,
                **(extra or {}),
            )
        finally:
            self.cache.end_forward()
        return self.logits(out.last_hidden_state[:, -1])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 next-token logits (with the family's final soft-capping, if any)."""
        return self.family.final_logits(self.lm_head(hidden).float())
