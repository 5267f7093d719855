"""Attention over many variable-length sequences packed into one, in a single SDPA call.

The Qwen-VL vision towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) pack the patches of every image of a batch
into one sequence and attend within each image (and, in Qwen2.5-VL, within each 112×112-pixel
window) given the boundaries ``cu_seqlens``. Without flash-attention, transformers runs one SDPA call
per window or image from a Python loop: a 1344×1344 image is 144 windows, so ~4,600 small attention
calls per image on a 7B tower. Here the sequences of each length are gathered into one batch
``[sequences, heads, length, dim]`` (windows come in a few lengths: full ones and edge ones; images
in one per size), attended in one call per length without padding or masks, and scattered back.

transformers sends ``cu_seqlens`` only to implementations whose name contains "flash"
(``is_flash_attention_requested``), hence :data:`NAME`. :func:`use_varlen_attention` switches a vision
tower's config to it; the function falls back to plain SDPA when no boundaries are given.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "tritonvlm_flash_varlen_sdpa"


def varlen_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    is_causal: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``query``/``key``/``value`` ``[1, heads, tokens, dim]`` packed sequences with boundaries
    ``cu_seq_lens_q`` (the same for keys; not causal) → ``[1, tokens, heads, dim]``, as the flash
    implementations return it."""
    if cu_seq_lens_q is None or query.shape[0] != 1 or is_causal:
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal
        )
        return out, None
    if cu_seq_lens_k is not None and not torch.equal(cu_seq_lens_k, cu_seq_lens_q):
        raise ValueError("varlen attention here needs the same boundaries for queries and keys")
    tokens = query.shape[2]
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    if len(lengths) == 1:  # one sequence: nothing to keep apart
        out = F.scaled_dot_product_attention(query, key, value, scale=scaling)
        return out.transpose(1, 2), None
    # One call per distinct length (windows: the full ones and a few edge sizes; images: one per size),
    # so nothing is padded or masked.
    starts: dict[int, list[int]] = {}
    for start, length in zip(cu_seq_lens_q[:-1].tolist(), lengths, strict=True):
        if length:
            starts.setdefault(length, []).append(start)
    q, k, v = query[0], key[0], value[0]  # [heads, tokens, dim]
    heads, dim = q.shape[0], q.shape[2]
    out = torch.empty(tokens, heads, dim, dtype=query.dtype, device=query.device)
    for length, firsts in starts.items():
        n = len(firsts)
        first = firsts[0]
        if firsts == list(range(first, first + n * length, length)):  # back to back: views, no copies
            span = slice(first, first + n * length)
            parts = [x[:, span].view(heads, n, length, dim).transpose(0, 1) for x in (q, k, v)]
            attended = F.scaled_dot_product_attention(*parts, scale=scaling)
            out[span] = attended.transpose(1, 2).reshape(n * length, heads, dim)
            continue
        flat = (
            torch.tensor(firsts, device=query.device)[:, None] + torch.arange(length, device=query.device)
        ).view(-1)
        parts = [x.index_select(1, flat).view(heads, n, length, dim).transpose(0, 1) for x in (q, k, v)]
        attended = F.scaled_dot_product_attention(*parts, scale=scaling)
        out.index_copy_(0, flat, attended.transpose(1, 2).reshape(n * length, heads, dim))
    return out.unsqueeze(0), None


AttentionInterface.register(NAME, varlen_sdpa_forward)


def use_varlen_attention(vision_config: Any) -> bool:
    """Route a vision tower's attention through :func:`varlen_sdpa_forward` (instead of its per-window
    loop) when it uses SDPA (not eager, not a flash implementation). Returns whether it was switched."""
    if getattr(vision_config, "_attn_implementation", None) != "sdpa":
        return False
    vision_config._attn_implementation = NAME
    return True
