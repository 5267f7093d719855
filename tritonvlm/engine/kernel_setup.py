"""Which of the engine's Triton kernels a model runs with, and setting them up.

``decode_attention``: "triton" reads each row's own KV blocks in a kernel (:mod:`paged_attention`),
"gather" copies the rows' blocks into one tensor padded to the longest row for SDPA, "auto" is
"triton" on CUDA when the kernel passes its check, else "gather". ``fused_ops``: the language model's
RMSNorm layers (:mod:`fused_norm`) and rotary embeddings (:mod:`fused_rotary`) as one kernel each,
"true", "false", or "auto" (on CUDA when the kernels pass their checks). The checks compile and run
each kernel once on the device for the model's own geometry against plain torch; where one fails,
"auto" logs a warning and does without, an explicit request raises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tritonvlm.engine import fused_norm, fused_rotary, paged_attention, triton_runtime

log = logging.getLogger("tritonvlm.engine")

DECODE_ATTENTION = ("auto", "triton", "gather")
FUSED_OPS = ("auto", "true", "false")


@dataclass(frozen=True)
class KernelSetup:
    decode_attention: str  # "triton" or "gather"
    fused_norms: int  # RMSNorm modules computed by the kernel
    fused_rotary: int  # modeling modules whose rotary function is the kernel's


def set_up_kernels(
    language_model: torch.nn.Module,
    family: Any,
    cache: Any,
    device: torch.device,
    dtype: torch.dtype,
    decode_attention: str = "auto",
    fused_ops: str = "auto",
) -> KernelSetup:
    """Undo what an earlier engine set up on ``language_model``, then set up what the two settings
    ask for (see the module docstring)."""
    if decode_attention not in DECODE_ATTENTION:
        raise ValueError(
            f"decode_attention={decode_attention!r}: expected one of {', '.join(DECODE_ATTENTION)}"
        )
    if fused_ops not in FUSED_OPS:
        raise ValueError(f"fused_ops={fused_ops!r}: expected one of {', '.join(FUSED_OPS)}")
    paged_attention.uninstall(language_model)
    fused_norm.restore(language_model)
    fused_rotary.restore()
    heads = int(getattr(language_model.config, "num_attention_heads", cache.heads))
    geometry = (heads, cache.heads, cache.head_dim)

    attention = "gather"
    forced = decode_attention == "triton"
    if _wanted(
        "decode_attention", decode_attention, forced, device, dtype, paged_attention.self_check, geometry
    ):
        if paged_attention.install(language_model, cache):
            attention = "triton"
        else:
            log.warning("%s: the Triton decode-attention kernel does not serve this model", family.name)

    widths = fused_norm.widths(language_model, family)

    def check_ops(device: torch.device, dtype: torch.dtype) -> str | None:
        return fused_norm.self_check(device, dtype, widths) or fused_rotary.self_check(
            device, dtype, *geometry
        )

    norms = rotary = 0
    if _wanted("fused_ops", fused_ops, fused_ops == "true", device, dtype, check_ops):
        norms, rotary = fused_norm.fuse(language_model, family), fused_rotary.install(language_model)
    return KernelSetup(attention, norms, rotary)


def _wanted(
    setting: str,
    choice: str,
    forced: bool,
    device: torch.device,
    dtype: torch.dtype,
    check: Callable[..., str | None],
    args: tuple = (),
) -> bool:
    """Whether to use a kernel that ``setting=choice`` asks for: ``forced`` (wherever: a ValueError if
    it cannot run) or "auto" (on CUDA, if triton is installed and ``check`` passes; a warning
    otherwise)."""
    if not forced and (choice != "auto" or device.type != "cuda"):
        return False
    problem = "the triton package is missing" if not triton_runtime.available() else None
    problem = problem or check(device, dtype, *args)
    if problem is None:
        return True
    if forced:
        hint = " (on a CPU, Triton's interpreter needs TRITON_INTERPRET=1 set before start)"
        raise ValueError(f"{setting}={choice}: the Triton kernel cannot run here: {problem}{hint}")
    log.warning("%s: the Triton kernel cannot run here (%s); not using it", setting, problem)
    return False
