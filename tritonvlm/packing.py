"""A dict of numpy arrays as one flat byte buffer in the safetensors layout, with one copy each way.

The multimodal tensors between the Triton models travel this way (:func:`tritonvlm.wire.pack_array`).
They are large: Llama 3.2 Vision's projected states for one image are 6,404 x 4,096 values. The
``safetensors`` package's own numpy ``save`` / ``load`` copy the data two to three times each way,
plus the copies to and from the ``bytes`` they take and give (measured here: 143 ms to pack and
132 ms to unpack 105 MB). This module writes the same layout into one preallocated buffer and reads
each tensor with one copy out of whatever holds the bytes. The copy matters: a Triton tensor's
memory belongs to its request or response, which may be gone while the arrays live on.

Floating-point tensors keep their dtype: a bfloat16 model's image embeddings travel as bfloat16 (half
the bytes of float32, the values the decoder would round them to anyway), as numpy arrays of
``ml_dtypes.bfloat16`` (:func:`to_numpy`, :func:`to_torch`).

Layout (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON
header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` padded with spaces to a multiple
of 8 bytes, then the data, each tensor's bytes C-contiguous and little-endian.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch  # (imported where used: the frontend packs no tensors and has no torch loaded)

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def _dtype_name(array: np.ndarray) -> str:
    name = _NAMES.get(array.dtype.newbyteorder("<"))
    if name is None:
        raise TypeError(f"cannot pack an array of dtype {array.dtype}")
    return name


def pack(tensors: dict[str, np.ndarray]) -> np.ndarray:
    """``tensors`` as one UINT8 ``[-1]`` array (empty for an empty dict): each array's bytes are
    copied once, into it."""
    if not tensors:
        return np.empty(0, dtype=np.uint8)
    arrays = {name: np.asarray(value) for name, value in tensors.items()}
    header: dict[str, dict] = {}
    offset = 0
    for name, array in arrays.items():
        header[name] = {
            "dtype": _dtype_name(array),
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    out = np.empty(start + offset, dtype=np.uint8)
    out[:8] = np.frombuffer(len(text).to_bytes(8, "little"), dtype=np.uint8)
    out[8:start] = np.frombuffer(text, dtype=np.uint8)
    for name, array in arrays.items():
        begin, end = header[name]["data_offsets"]
        target = out[start + begin : start + end].view(_DTYPES[header[name]["dtype"]])
        target.reshape(array.shape)[...] = array  # (converts a big-endian array on the way)
    return out


def unpack(data: bytes | bytearray | memoryview | np.ndarray) -> dict[str, np.ndarray]:
    """The dict :func:`pack` (or ``safetensors``' ``save``) packed, each array a copy of its bytes
    (its own, writable, aligned); empty for no bytes. Raises ValueError on a malformed buffer."""
    if isinstance(data, np.ndarray):
        buffer = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    else:
        buffer = np.frombuffer(data, dtype=np.uint8)
    if not buffer.size:
        return {}
    if buffer.size < 8:
        raise ValueError("packed tensors: shorter than their header length")
    length = int.from_bytes(buffer[:8].tobytes(), "little")
    start = 8 + length
    if start > buffer.size:
        raise ValueError("packed tensors: the header runs past the end")
    header = json.loads(buffer[8:start].tobytes())
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"packed tensors: {name} has dtype {info['dtype']}, which numpy cannot hold")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if begin < 0 or end - begin != size or min(shape, default=0) < 0 or start + end > buffer.size:
            raise ValueError(f"packed tensors: {name}'s bytes do not match its shape")
        array = np.empty(shape, dtype=dtype.newbyteorder("="))
        array.reshape(-1).view(np.uint8)[:] = buffer[start + begin : start + end]
        out[name] = array
    return out


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array of the same dtype and values, on the host (bfloat16 as
    ``ml_dtypes.bfloat16``); a view of a CPU tensor's memory where the dtypes allow."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def to_torch(array: np.ndarray) -> torch.Tensor:
    """:func:`to_numpy` undone: a CPU tensor sharing the array's memory (copied first if the array is
    read-only, e.g. shared by the image cache: a tensor's user may write into it)."""
    import torch

    if not array.flags.writeable:
        array = array.copy()
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)
