"""Where a model runs: CUDA when available (bf16 by default), else CPU (float32)."""

from __future__ import annotations

from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Turn the ``device``/``dtype`` settings (``auto`` or explicit names) into torch objects."""
    if device in ("", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dtype in ("", "auto"):
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or auto")
    return dev, DTYPES[dtype]


def device_tensor(values: list[Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` on ``device`` without waiting for the device (from pinned memory on CUDA)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
