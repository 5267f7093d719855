#!/usr/bin/env python
"""The vision encoder alone: ms per image of a Qwen2.5-VL vision tower at 448², 896² and 1344², with
transformers' per-window attention loop and with the one-call-per-length varlen attention the server
uses (:mod:`tritonvlm.modeling.varlen_attention`), side by side, plus a batch of images of several
requests encoded together.

The tower is Qwen2.5-VL-7B's (32 blocks, width 1280, 112-pixel windows; random weights built on the
device, no download) on a GPU, or the medium test model's small tower on CPU. The FLOP count is that
of the tower's matrix multiplications and attention; the last column is what the time achieves.

    python scripts/bench_vision.py                              # CPU: medium tower
    python scripts/bench_vision.py --shape qwen2.5-vl-7b        # GPU (bf16)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import add_device_arguments, log, setup_device, sync, tokenizer_dir  # noqa: E402

VISION_7B = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
}


def build_tower(shape: str, device: torch.device, dtype: torch.dtype, workdir: Path) -> Any:
    """A Qwen2.5-VL vision tower: the 7B shape with random weights, or the medium test model's."""
    from transformers import AutoConfig
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    if shape == "medium":
        config = AutoConfig.from_pretrained(tokenizer_dir(workdir)).vision_config
    else:
        config = Qwen2_5_VLVisionConfig(**VISION_7B)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, torch_dtype=dtype)
    return tower.eval()


def tower_flops(config: Any, grids: torch.Tensor) -> float:
    """Matmul and attention FLOPs of one forward over images of ``grids`` ``[n, 3]`` (t, h, w patches)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    patch_in = config.in_channels * config.temporal_patch_size * config.patch_size**2
    tokens = int(grids.prod(-1).sum())
    per_token = 2 * (patch_in * hidden + 4 * hidden * hidden + 3 * hidden * inter) * config.depth
    window = (config.window_size // config.patch_size) ** 2
    attention = 0.0
    for t, h, w in grids.tolist():
        n = t * h * w
        full = len(config.fullatt_block_indexes)
        attention += 4 * hidden * n * (n * full + min(window, n) * (config.depth - full))
    merged = hidden * config.spatial_merge_size**2
    merger = (
        2 * (tokens // config.spatial_merge_size**2) * (merged * merged + merged * config.out_hidden_size)
    )
    return tokens * per_token + attention + merger


@torch.inference_mode()
def time_forward(
    tower: Any, grids: torch.Tensor, device: torch.device, dtype: torch.dtype, repeat: int
) -> float:
    """Seconds per forward over random patches of ``grids`` (after one warm-up forward)."""
    config = tower.config
    patch_in = config.in_channels * config.temporal_patch_size * config.patch_size**2
    pixels = torch.randn(int(grids.prod(-1).sum()), patch_in, device=device, dtype=dtype)
    grids = grids.to(device)
    tower(pixels, grid_thw=grids)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        tower(pixels, grid_thw=grids)
    sync(device)
    return (time.perf_counter() - start) / repeat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default=None, help="qwen2.5-vl-7b (GPU default) or medium (CPU default)")
    parser.add_argument("--sizes", default="448,896,1344", help="square image sides in pixels")
    parser.add_argument("--batch", type=int, default=4, help="images of 448² encoded together (0: skip)")
    parser.add_argument("--repeat", type=int, default=None, help="timed forwards per case (GPU 10, CPU 1)")
    add_device_arguments(parser)
    args = parser.parse_args(argv)

    from tritonvlm.modeling.varlen_attention import NAME, use_varlen_attention

    device, dtype, gpu = setup_device(args)
    args.shape = args.shape or ("qwen2.5-vl-7b" if gpu else "medium")
    repeat = args.repeat or (10 if gpu else 1)
    log(f"building the {args.shape} vision tower on {device} ({dtype})")
    with tempfile.TemporaryDirectory() as tmp:
        tower = build_tower(args.shape, device, dtype, args.workdir or Path(tmp))
    patch = tower.config.patch_size * tower.config.spatial_merge_size
    cases = []
    for side in (int(s) for s in args.sizes.split(",")):
        n = side // patch * tower.config.spatial_merge_size
        cases.append((f"{side}²", 1, torch.tensor([[1, n, n]])))
    if args.batch:
        n = 448 // patch * tower.config.spatial_merge_size
        cases.append((f"{args.batch} × 448² together", args.batch, torch.tensor([[1, n, n]] * args.batch)))
    rows = []
    for label, images, grids in cases:
        row: dict[str, Any] = {
            "case": label,
            "images": images,
            "gflop": tower_flops(tower.config, grids) / 1e9,
        }
        for impl in ("sdpa", NAME):
            tower.config._attn_implementation = "sdpa"
            if impl == NAME:
                use_varlen_attention(tower.config)
            log(f"{label}: {'per-window loop' if impl == 'sdpa' else 'varlen'}")
            row["loop_ms" if impl == "sdpa" else "varlen_ms"] = 1000 * time_forward(
                tower, grids, device, dtype, repeat
            )
        rows.append(row)
        log(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}))
    print(f"\n{args.shape} vision tower on {device} ({dtype}), ms per image (a batch: per image of it)")
    print("| image | GFLOP per image | per-window loop ms | varlen ms | speed-up | varlen TFLOP/s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        n = row["images"]
        loop, varlen = row["loop_ms"] / n, row["varlen_ms"] / n
        tflops = row["gflop"] / row["varlen_ms"]
        print(
            f"| {row['case']} | {row['gflop'] / n:,.0f} | {loop:,.1f} | {varlen:,.1f} | {loop / varlen:.2f}x "
            f"| {tflops:,.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "device": str(device), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
