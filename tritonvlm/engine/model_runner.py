"""Tensors in, logits out: prefill (image embeddings scattered into placeholder positions, Qwen2.5-VL's
3-D rope positions) and batched decode over the slot KV cache."""

from __future__ import annotations

import torch

from tritonvlm.engine.kv_cache import SlotKVCache
from tritonvlm.engine.sequence import Sequence


class ModelRunner:
    """Runs the language model of a ``Qwen2_5_VLForConditionalGeneration`` for the engine.

    The runner builds the attention masks and positions itself and hands transformers a 4-D mask,
    which transformers uses as is: this is what lets sequences of different lengths share a batch.
    """

    def __init__(self, model: torch.nn.Module, max_slots: int, max_len: int) -> None:
        self.model = model
        self.language_model = model.model.language_model
        self.embed_tokens = model.model.get_input_embeddings()
        self.lm_head = model.lm_head
        self.image_token_id = int(model.config.image_token_id)
        text_cfg = model.config.get_text_config()
        self.num_layers = int(text_cfg.num_hidden_layers)
        num_heads = int(text_cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(text_cfg, "num_key_value_heads", None) or num_heads)
        self.head_dim = int(getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // num_heads)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_len = max_len
        # CUDA attention kernels (cuDNN's in particular) plan per shape: a length that grows by one
        # every step would re-plan every step (~30 ms each on an H100). Rounding lengths up to a
        # bucket, with the padding masked, keeps the shapes few and the plans cached.
        self.length_bucket = 128 if self.device.type == "cuda" else 1
        self.cache = SlotKVCache(
            self.num_layers, self.num_kv_heads, self.head_dim, max_slots, max_len, self.dtype, self.device
        )

    def _bucket(self, length: int) -> int:
        bucket = self.length_bucket
        return min(self.max_len, -(-length // bucket) * bucket)

    def rope_positions(self, seq: Sequence) -> tuple[torch.Tensor, int]:
        """3-D rope positions ``[3, prompt_len]`` of a prompt and the position of the next token."""
        n = seq.prompt_len
        if seq.image_grid_thw is None or seq.image_grid_thw.numel() == 0:
            return torch.arange(n, device=self.device).expand(3, n), n
        ids = torch.tensor([seq.prompt_ids], device=self.device)
        positions, _ = self.model.model.get_rope_index(
            ids,
            mm_token_type_ids=(ids == self.image_token_id).int(),
            image_grid_thw=seq.image_grid_thw.to(self.device),
        )
        return positions[:, 0], int(positions.max()) + 1

    def prompt_embeds(self, seq: Sequence) -> torch.Tensor:
        """Token embeddings of a prompt with the image embeddings in its placeholder positions."""
        ids = torch.tensor(seq.prompt_ids, device=self.device)
        embeds = self.embed_tokens(ids)
        if seq.image_embeds is not None and seq.image_embeds.numel():
            embeds[ids == self.image_token_id] = seq.image_embeds.to(self.device, embeds.dtype)
        return embeds

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence], first_slot: int) -> torch.Tensor:
        """Run the prompts of ``seqs`` (right-padded into one batch) and store their keys/values in
        slots ``first_slot ..``. Returns the logits of each prompt's last token, ``[len(seqs), vocab]``."""
        lengths = torch.tensor([s.prompt_len for s in seqs], device=self.device)
        length = self._bucket(max(s.prompt_len for s in seqs))
        hidden = self.embed_tokens.embedding_dim
        embeds = torch.zeros(len(seqs), length, hidden, dtype=self.dtype, device=self.device)
        positions = torch.zeros(3, len(seqs), length, dtype=torch.long, device=self.device)
        for i, seq in enumerate(seqs):
            embeds[i, : seq.prompt_len] = self.prompt_embeds(seq)
            pos, seq.next_position = self.rope_positions(seq)
            positions[:, i, : seq.prompt_len] = pos
        cols = torch.arange(length, device=self.device)
        causal = cols[None, :] <= cols[:, None]  # [query, key]
        valid_key = cols[None, :] < lengths[:, None]  # [row, key]
        mask = (causal[None] & valid_key[:, None, :])[:, None]  # [rows, 1, query, key]
        self.cache.prepare_prefill(first_slot, len(seqs), length)
        out = self.language_model(
            inputs_embeds=embeds,
            attention_mask={"full_attention": mask},
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        last = out.last_hidden_state[torch.arange(len(seqs), device=self.device), lengths - 1]
        return self.lm_head(last).float()

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feed each running sequence's last token (``seqs[i]`` lives in slot i); ``[len(seqs), vocab]``."""
        tokens = torch.tensor([s.last_token for s in seqs], device=self.device)
        cache_pos = torch.tensor([s.num_tokens - 1 for s in seqs], device=self.device)
        kv_len = self._bucket(max(s.num_tokens for s in seqs))
        mask = (torch.arange(kv_len, device=self.device)[None, :] <= cache_pos[:, None])[:, None, None, :]
        rope = torch.tensor([s.next_position for s in seqs], device=self.device)
        positions = rope.view(1, -1, 1).expand(3, -1, 1)
        self.cache.prepare_decode(cache_pos, kv_len)
        out = self.language_model(
            inputs_embeds=self.embed_tokens(tokens)[:, None],
            attention_mask={"full_attention": mask},
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        for s in seqs:
            s.next_position += 1
        return self.lm_head(out.last_hidden_state[:, -1]).float()
