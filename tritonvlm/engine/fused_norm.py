"""The language model's RMSNorm layers in one Triton kernel each.

transformers' RMSNorm modules are half a dozen elementwise kernels each (casts, square, mean, rsqrt,
two products): two per decoder layer, four in Qwen3-VL's (its per-head query/key norms), so a 7B decode
step runs hundreds of kernels that each read a few kilobytes. On a GPU a small kernel costs a few
microseconds even replayed from a CUDA graph, which at batch 1 adds up to a good part of a step that
should take the time of reading the weights. :func:`fuse` gives each norm module of the language model
a forward that does the same arithmetic (float32, the same order of roundings) in one kernel.

Which modules, and in which style, is the family's to say (:meth:`Family.norm_style`): "llama"
(``weight * normalised.to(input dtype)``: Qwen2/2.5/3-VL, LLaVA-OneVision's Qwen2, Llama 3.2 Vision)
or "gemma" (``(normalised * (1 + weight)).to(input dtype)``: Gemma 3).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from tritonvlm.engine import triton_runtime

STYLES = ("llama", "gemma")
_FUSED = "_tritonvlm_fused_norm"  # set on the modules fuse() changed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, style: str) -> torch.Tensor:
    """RMSNorm of ``x`` over its last dimension in one kernel, as the ``style`` module computes it."""
    if style not in STYLES:
        raise ValueError(f"unknown RMSNorm style {style!r}")
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    dtype = x.dtype if style == "gemma" else torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(rows.shape, dtype=dtype, device=x.device)
    if rows.shape[0]:
        block = triton_runtime.pow2(n)
        kernels = triton_runtime.kernels(triton_runtime.interpreted(x.device))
        kernels.rms_norm[(rows.shape[0],)](
            rows, weight, out, rows.stride(0), out.stride(0), float(eps),
            N=n, BLOCK=block, GEMMA=style == "gemma", num_warps=8 if block >= 4096 else 4,
        )  # fmt: skip
    return out.view(*x.shape[:-1], n)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, style: str) -> torch.Tensor:
    """The arithmetic of transformers' RMSNorm modules of ``style`` (what :func:`rms_norm` computes)."""
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    if style == "gemma":
        return (y * (1.0 + weight.float())).type_as(x)
    return weight * y.to(x.dtype)


def _epsilon(module: torch.nn.Module) -> float:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if eps is None:
        raise ValueError(f"{type(module).__name__} has no epsilon")
    return float(eps)


def _fused_forward(module: torch.nn.Module, style: str, eps: float, hidden: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden, module.weight, eps, style)


def widths(language_model: torch.nn.Module, family: Any) -> tuple[int, ...]:
    """The widths of the norms :func:`fuse` would fuse (what :func:`self_check` should try)."""
    found = {m.weight.numel() for m in language_model.modules() if family.norm_style(m) is not None}
    return tuple(sorted(found))


def fuse(language_model: torch.nn.Module, family: Any) -> int:
    """Give the RMSNorm modules of ``language_model`` the one-kernel forward (in the style the family
    names for each); returns how many. :func:`restore` undoes it."""
    restore(language_model)
    count = 0
    for module in language_model.modules():
        style = family.norm_style(module)
        if style is None:
            continue
        if style not in STYLES:
            raise ValueError(f"{family.name}: unknown RMSNorm style {style!r}")
        module.forward = functools.partial(_fused_forward, module, style, _epsilon(module))
        setattr(module, _FUSED, True)
        count += 1
    return count


def restore(language_model: torch.nn.Module) -> None:
    """Give the modules :func:`fuse` changed their own forward back."""
    for module in language_model.modules():
        if getattr(module, _FUSED, False):
            del module.forward
            delattr(module, _FUSED)


@functools.cache
def self_check(device: torch.device, dtype: torch.dtype, widths: tuple[int, ...] = (3584,)) -> str | None:
    """Compile and run the kernel once on ``device`` for each of a model's norm ``widths`` against
    :func:`reference_rms_norm` (both styles). Returns what went wrong, or None."""

    def deviation() -> float:
        gen = torch.Generator().manual_seed(0)
        error = 0.0
        for width, style in ((w, s) for w in widths for s in STYLES):
            x = torch.randn(5, 3, width, generator=gen).to(device, dtype)
            weight = torch.randn(width, generator=gen).to(device, dtype)
            got = rms_norm(x, weight, 1e-6, style).float()
            want = reference_rms_norm(x, weight, 1e-6, style).float()
            error = max(error, ((got - want).abs() / (want.abs() + 1)).max().item())
        return error

    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    return triton_runtime.check_against_reference(deviation, tolerance, "relative deviation")
