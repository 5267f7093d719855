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
