#!/usr/bin/env python3
"""Host time of one image's encoder output between the Triton models: packing it in `vision_encoder`,
unpacking it in `vlm` and making the engine's tensor, with this project's packing
(:mod:`tritonvlm.packing`) and, side by side, the ``safetensors`` package's numpy functions as the
wire used them before (float32 only: numpy has no bfloat16 of its own).

    .venv/bin/python scripts/bench_packing.py [--repeats 5]

Shapes: Llama 3.2 Vision 11B (one image: 4 tiles x 1,601 states x 4,096) and Qwen2.5-VL-7B (a
1344x1344 image: 2,304 tokens x 3,584). Prints the best of ``--repeats`` runs, in ms.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from safetensors.numpy import load, save

from tritonvlm import packing

SHAPES = {
    "llama-3.2-11b-vision, 1 image": (6404, 4096),
    "qwen2.5-vl-7b, 1344x1344 image": (2304, 3584),
}


def best_ms(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3, out


def safetensors_way(tensors: dict[str, np.ndarray], repeats: int) -> tuple[float, float]:
    """As the wire did before: save to bytes, a UINT8 view; tobytes, bytes(), load, np.array copy."""
    pack_ms, packed = best_ms(lambda: np.frombuffer(save(tensors), dtype=np.uint8), repeats)

    def unpack():
        data = np.ascontiguousarray(packed, dtype=np.uint8).tobytes()
        return {k: torch.from_numpy(np.array(v)) for k, v in load(bytes(data)).items()}

    unpack_ms, _ = best_ms(unpack, repeats)
    return pack_ms, unpack_ms


def packing_way(tensors: dict[str, torch.Tensor], repeats: int) -> tuple[float, float]:
    pack_ms, packed = best_ms(
        lambda: packing.pack({k: packing.to_numpy(v) for k, v in tensors.items()}), repeats
    )

    def unpack():
        return {k: packing.to_torch(v) for k, v in packing.unpack(packed[None]).items()}

    unpack_ms, back = best_ms(unpack, repeats)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    return pack_ms, unpack_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("| one image's encoder output | dtype | MB | pack ms | unpack + tensor ms |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, shape in SHAPES.items():
        states = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        for way, dtype in (
            ("safetensors (before)", torch.float32),
            ("packing", torch.float32),
            ("packing", torch.bfloat16),
        ):
            tensor = states.to(dtype)
            if way.startswith("safetensors"):
                pack_ms, unpack_ms = safetensors_way({"embeds": tensor.numpy()}, args.repeats)
            else:
                pack_ms, unpack_ms = packing_way({"embeds": tensor}, args.repeats)
            mb = tensor.numel() * tensor.element_size() / 1e6
            dname = str(dtype).removeprefix("torch.")
            print(f"| {name}, {way} | {dname} | {mb:.0f} | {pack_ms:.1f} | {unpack_ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
