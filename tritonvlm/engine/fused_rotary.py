"""Rotary position embedding of queries and keys in one Triton kernel per layer.

In transformers 5 every family this server serves applies rotary embeddings in its decoder layers
with the same function, ``apply_rotary_pos_emb(q, k, cos, sin)`` of its modeling module
(``q * cos + rotate_half(q) * sin``, the same for ``k``; Qwen-VL's multimodal sections are folded
into ``cos``/``sin`` once per forward): about ten elementwise kernels a layer. :func:`install`
replaces that function, in the modeling modules of the language model's layers whose function has
exactly that body, by one that launches one kernel for both (the same products and sum, rounded as
transformers rounds them), falling back to the original for any other shapes. The replacement is
module-wide (process-wide), as a transformers kernel from its hub would be; :func:`restore` undoes it.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from tritonvlm.engine import triton_runtime

# The body transformers' function must have for the kernel to stand in for it.
STANDARD_BODY = (
    "q_embed = (q * cos) + (rotate_half(q) * sin)",
    "k_embed = (k * cos) + (rotate_half(k) * sin)",
)
_ORIGINALS: dict[ModuleType, Callable] = {}


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)`` for ``q`` ``[batch, heads,
    seq, dim]``, ``k`` ``[batch, kv_heads, seq, dim]``, ``cos``/``sin`` ``[batch, seq, dim]`` (any
    strides with the last dimension dense), in one kernel."""
    batch, q_heads, seq, dim = q.shape
    k_heads = k.shape[1]
    if any(t.stride(-1) != 1 for t in (q, k, cos, sin)) or cos.stride() != sin.stride():
        q, k = q.contiguous(), k.contiguous()
        cos, sin = cos.contiguous(), sin.contiguous()
    out_q, out_k = torch.empty_like(q), torch.empty_like(k)
    if batch * seq == 0:
        return out_q, out_k
    interpret = triton_runtime.interpreted(q.device)
    options = {} if interpret else {"enable_fp_fusion": False}
    triton_runtime.kernels(interpret).rotary[(batch * seq,)](
        q, k, cos, sin, out_q, out_k,
        *(q.stride(i) for i in range(3)), *(k.stride(i) for i in range(3)),
        cos.stride(0), cos.stride(1),
        *(out_q.stride(i) for i in range(3)), *(out_k.stride(i) for i in range(3)),
        seq, Q_HEADS=q_heads, K_HEADS=k_heads, DIM=dim,
        BLOCK_H=triton_runtime.pow2(max(q_heads, k_heads)), BLOCK_D=triton_runtime.pow2(dim),
        **options,
    )  # fmt: skip
    return out_q, out_k


def reference_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' arithmetic (what :func:`rotary` computes)."""

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _fits(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int) -> bool:
    return (
        unsqueeze_dim == 1
        and q.dim() == k.dim() == 4
        and cos.dim() == sin.dim() == 3
        and cos.shape == sin.shape == (q.shape[0], q.shape[2], q.shape[3])
        and k.shape[0] == q.shape[0]
        and k.shape[2:] == q.shape[2:]
        and q.shape[3] % 2 == 0
        and q.dtype == k.dtype == cos.dtype == sin.dtype
        and q.device == k.device == cos.device
    )


def _standard(module: ModuleType, function: Any) -> bool:
    """Whether ``function`` and the module's ``rotate_half`` are transformers' standard ones."""
    try:
        source = inspect.getsource(function) + inspect.getsource(module.rotate_half)
    except (AttributeError, OSError, TypeError):
        return False
    return all(line in source for line in (*STANDARD_BODY, "torch.cat((-x2, x1), dim=-1)"))


def install(language_model: torch.nn.Module) -> int:
    """Replace ``apply_rotary_pos_emb`` in the modeling modules of ``language_model``'s submodules
    where it has transformers' standard body; returns how many modules were changed."""
    modules = {sys.modules.get(type(m).__module__) for m in language_model.modules()}
    changed = 0
    for module in modules:
        original = _ORIGINALS.get(module, getattr(module, "apply_rotary_pos_emb", None))
        if module is None or original is None or not _standard(module, original):
            continue

        def fused(q, k, cos, sin, unsqueeze_dim: int = 1, _original: Callable = original):  # noqa: ANN001
            if _fits(q, k, cos, sin, unsqueeze_dim):
                return rotary(q, k, cos, sin)
            return _original(q, k, cos, sin, unsqueeze_dim)

        _ORIGINALS[module] = original
        module.apply_rotary_pos_emb = fused
        changed += 1
    return changed


def restore() -> None:
    """Put transformers' functions back."""
    while _ORIGINALS:
        module, original = _ORIGINALS.popitem()
        module.apply_rotary_pos_emb = original


@functools.cache
def self_check(
    device: torch.device, dtype: torch.dtype, heads: int = 28, kv_heads: int = 4, dim: int = 128
) -> str | None:
    """Compile and run the kernel once on ``device`` for a model's head geometry against
    :func:`reference_rotary` (inputs transposed as the attention layers hand them over). Returns what
    went wrong, or None."""

    def deviation() -> float:
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(2, 3, heads, dim, generator=gen).to(device, dtype).transpose(1, 2)
        k = torch.randn(2, 3, kv_heads, dim, generator=gen).to(device, dtype).transpose(1, 2)
        cos, sin = (torch.randn(2, 3, dim, generator=gen).to(device, dtype) for _ in range(2))
        got, want = rotary(q, k, cos, sin), reference_rotary(q, k, cos, sin)
        return max((g.float() - w.float()).abs().max().item() for g, w in zip(got, want, strict=True))

    tolerance = 1e-6 if dtype == torch.float32 else 7e-2
    return triton_runtime.check_against_reference(deviation, tolerance)
