"""Write the perf_analyzer input-data file for the Triton pipeline model `vlm`.

    python bench/perf_analyzer/make_input.py [OUT.json] [--size 64]

One request: MESSAGES (a user turn with one image placeholder part and a short text), IMAGES (one
small PNG drawn here) and PARAMETERS (32 tokens, greedy, ``ignore_eos`` so every request decodes
exactly 32 tokens). perf_analyzer's JSON format for BYTES tensors: a string element may be written as
is (MESSAGES, PARAMETERS); binary data goes in ``{"b64": ...}``, and for BYTES the base64 payload is
the *serialized* tensor, i.e. each element prefixed with its length as a 4-byte little-endian
unsigned integer. The checked-in ``vlm_input.json`` is this script's output with the defaults.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import struct
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent

MESSAGES = [
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "Describe this image in one sentence."}],
    }
]
PARAMETERS = {"max_tokens": 32, "temperature": 0, "ignore_eos": True}


def png(size: int) -> bytes:
    """A red circle on white, ``size`` x ``size`` pixels, PNG-encoded (deterministic bytes)."""
    img = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(img).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill="red")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def serialize_bytes_tensor(elements: list[bytes]) -> bytes:
    """Triton's wire form of a BYTES tensor: ``<uint32 little-endian length><bytes>`` per element."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def input_data(size: int) -> dict:
    images = [png(size)]
    return {
        "data": [
            {
                "MESSAGES": {"content": [json.dumps(MESSAGES)], "shape": [1]},
                "IMAGES": {
                    "content": {"b64": base64.b64encode(serialize_bytes_tensor(images)).decode()},
                    "shape": [len(images)],
                },
                "PARAMETERS": {"content": [json.dumps(PARAMETERS)], "shape": [1]},
            }
        ]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=HERE / "vlm_input.json")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    args = parser.parse_args()
    args.out.write_text(json.dumps(input_data(args.size), indent=2) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
