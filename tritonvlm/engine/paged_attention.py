"""Decode attention straight from the KV blocks: a Triton kernel that reads each sequence's own keys.

The default decode path gathers every running row's blocks into one tensor per layer, padded to the
longest row (rounded up to a bucket), and hands it to SDPA with a mask: on a GPU that reads the live
keys, writes them again, reads them a second time, and spends the same work on every row as on the
longest. This kernel instead walks each row's block-table entries up to that row's own length.

It is split-KV ("flash decoding", as in lightllm / SGLang's decode kernels): program ``(row, kv_head,
split)`` takes a contiguous share of the row's positions, computes the attention of the kv head's
group of query heads over it with an online softmax, and writes its partial output and log-sum-exp;
a second kernel merges a row's splits. A short row's later splits are empty (they write a zero weight),
so one grid serves a batch of mixed lengths and a CUDA graph can replay it as lengths grow.

The kernels are ``decode_split`` and ``decode_merge`` in :mod:`tritonvlm.engine.triton_kernels`; on a
CPU they run under Triton's interpreter (see :mod:`tritonvlm.engine.triton_runtime`): that is how the
tests check them against :func:`reference_decode_attention` without a GPU.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from tritonvlm.engine import triton_runtime

BLOCK_N = 32  # positions per inner step (spanning several KV blocks)
MIN_SPLIT_TOKENS = 64  # a split gets at least this many positions of the longest row (2 steps)
NAME_PREFIX = "tritonvlm_paged_decode_"  # attention implementations install() registers


def choose_splits(batch: int, kv_heads: int, max_length: int, device: torch.device) -> int:
    """Splits per row, a power of two: enough programs to fill the GPU's multiprocessors twice, each
    split spanning at least ``MIN_SPLIT_TOKENS`` positions of the longest row (on a CPU: up to 4)."""
    by_length = max(1, max_length // MIN_SPLIT_TOKENS)
    wanted = -(-2 * _multiprocessors(device) // max(1, batch * kv_heads)) if device.type == "cuda" else 4
    splits = max(1, min(wanted, by_length, 64))
    return 1 << (splits.bit_length() - 1)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def paged_decode_attention(
    query: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    splits: int = 1,
) -> torch.Tensor:
    """Attention of one new token per row over that row's own cached positions.

    ``query`` ``[rows, q_heads, dim]``; ``key_pool`` / ``value_pool`` ``[blocks, page, kv_heads, dim]``
    (position ``p`` of row ``r`` at block ``tables[r, p // page]``, offset ``p % page``); ``lengths``
    ``[rows]``: how many positions row ``r`` attends to (0: its output is zeros). Returns ``[rows,
    q_heads, dim]`` in the query's dtype. No host synchronisation (a CUDA graph can capture it)."""
    rows, q_heads, dim = query.shape
    _, page, kv_heads, _ = key_pool.shape
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads are not a multiple of {kv_heads} key/value heads")
    group = q_heads // kv_heads
    query = query.contiguous()
    block_d = triton_runtime.pow2(dim, 16)
    part_out = torch.empty(rows, q_heads, splits, block_d, dtype=torch.float32, device=query.device)
    part_lse = torch.empty(rows, q_heads, splits, dtype=torch.float32, device=query.device)
    out = torch.empty(rows, q_heads, dim, dtype=query.dtype, device=query.device)
    if rows == 0:
        return out
    interpret = triton_runtime.interpreted(query.device)
    kernels = triton_runtime.kernels(interpret)
    keys = key_pool.view(-1, kv_heads, dim)
    values = value_pool.view(-1, kv_heads, dim)
    kernels.decode_split[(rows, kv_heads, splits)](
        query, keys, values, tables, lengths, part_out, part_lse, float(scale),
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        tables.stride(0), part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1), splits,
        GROUP=group, HEAD_DIM=dim, PAGE=page, BLOCK_H=triton_runtime.pow2(group, 16), BLOCK_N=BLOCK_N,
        BLOCK_D=block_d, IEEE=query.dtype == torch.float32, UPCAST=interpret,
    )  # fmt: skip
    kernels.decode_merge[(rows, q_heads)](
        part_out, part_lse, out, part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1), out.stride(0), out.stride(1), splits,
        HEAD_DIM=dim, BLOCK_S=triton_runtime.pow2(splits), BLOCK_D=block_d,
    )  # fmt: skip
    return out


def reference_decode_attention(
    query: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """What :func:`paged_decode_attention` computes, in plain torch (row by row, float32)."""
    rows, q_heads, dim = query.shape
    page, kv_heads = key_pool.shape[1], key_pool.shape[2]
    out = torch.zeros(rows, q_heads, dim, dtype=torch.float32, device=query.device)
    for r in range(rows):
        n = int(lengths[r])
        if n == 0:
            continue
        blocks = tables[r, : -(-n // page)]
        k = key_pool[blocks].reshape(-1, kv_heads, dim)[:n].float()  # [n, kv_heads, dim]
        v = value_pool[blocks].reshape(-1, kv_heads, dim)[:n].float()
        k = k.repeat_interleave(q_heads // kv_heads, dim=1)
        v = v.repeat_interleave(q_heads // kv_heads, dim=1)
        scores = torch.einsum("hd,nhd->hn", query[r].float(), k) * scale
        out[r] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v)
    return out.to(query.dtype)


@functools.cache
def self_check(
    device: torch.device, dtype: torch.dtype, heads: int = 8, kv_heads: int = 2, dim: int = 128
) -> str | None:
    """Compile and run the kernels once on ``device`` for a model's head geometry against
    :func:`reference_decode_attention` (mixed lengths, several splits). Returns what went wrong, or
    None."""

    def deviation() -> float:
        gen = torch.Generator(device="cpu").manual_seed(0)
        page, blocks = 16, 24
        shape = (blocks + 1, page, kv_heads, dim)
        pools = [torch.randn(shape, generator=gen).to(device, dtype) for _ in range(2)]
        tables = torch.randperm(blocks, generator=gen).view(3, 8).to(device)
        lengths = torch.tensor([1, 77, 128], device=device)
        query = torch.randn(3, heads, dim, generator=gen).to(device, dtype)
        got = paged_decode_attention(query, *pools, tables, lengths, dim**-0.5, splits=3)
        want = reference_decode_attention(query, *pools, tables, lengths, dim**-0.5)
        return (got.float() - want.float()).abs().max().item()

    tolerance = 1e-3 if dtype == torch.float32 else 3e-2
    return triton_runtime.check_against_reference(deviation, tolerance)


def install(language_model: torch.nn.Module, cache: Any) -> bool:
    """Route the attention of ``language_model`` (an SDPA one) through ``cache.decode_attention``
    in decode steps, SDPA otherwise. Returns False (nothing changed) for a model it cannot serve."""
    config = language_model.config
    uninstall(language_model)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "attn_logit_softcapping", None):  # not in the kernel
        return False
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = cache.decode_attention(module.layer_idx, query, scale)
        if out is not None:
            return out, None
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    name = f"{NAME_PREFIX}{id(cache):x}"
    AttentionInterface.register(name, attention)
    # transformers makes masks only for implementations it knows the masks of (generate() on the same
    # model would otherwise attend without any).
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    config._attn_implementation = name
    cache.decode_kernel = True
    return True


def uninstall(language_model: torch.nn.Module) -> None:
    """Undo :func:`install` (back to SDPA), if it was done."""
    config = language_model.config
    if str(getattr(config, "_attn_implementation", "")).startswith(NAME_PREFIX):
        config._attn_implementation = "sdpa"
