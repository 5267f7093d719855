"""Loading the engine's Triton kernels (:mod:`tritonvlm.engine.triton_kernels`): compiled on CUDA,
run by Triton's interpreter (numpy, slow) on a CPU, which is how the tests check them without a GPU.

Triton decides between the two when it is first imported and again at every launch, from
``TRITON_INTERPRET``: on a CPU that must be set before anything imports triton (torch._dynamo does,
when triton is installed), so ``tests/conftest.py`` sets it at start-up where there is no GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from types import ModuleType

import torch


def available() -> bool:
    """Whether the ``triton`` package is installed (it comes with CUDA builds of torch). Not imported
    here: on a CPU its interpreter must be chosen before the first import."""
    return importlib.util.find_spec("triton") is not None


def interpreted(device: torch.device) -> bool:
    """Whether kernels for tensors on ``device`` run under the interpreter (anything but CUDA)."""
    return device.type != "cuda"


@functools.cache
def kernels(interpret: bool) -> ModuleType:
    """The kernels module; with ``interpret``, under Triton's interpreter (the process keeps
    ``TRITON_INTERPRET=1``: only tests run the kernels on a CPU)."""
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    from tritonvlm.engine import triton_kernels

    return triton_kernels


def pow2(n: int, least: int = 1) -> int:
    """The smallest power of two that is at least ``n`` and ``least`` (Triton block sizes)."""
    return max(least, 1 << (max(n, 1) - 1).bit_length())


def check_against_reference(
    deviation: Callable[[], float], tolerance: float, what: str = "deviation"
) -> str | None:
    """A kernel's start-up check: ``deviation()`` compiles and runs it on the device and returns how far
    it is from its plain-torch reference. None when within ``tolerance``; otherwise, or when it
    raises (a missing compiler, an unsupported GPU, ...), what went wrong."""
    try:
        error = deviation()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if error <= tolerance else f"largest {what} from the reference {error:.3g}"
