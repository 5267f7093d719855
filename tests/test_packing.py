"""The packed tensor dicts between the Triton models: the safetensors layout, one copy each way."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load, save
from safetensors.torch import load as load_torch

from tritonvlm import packing

DTYPES = ["float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"]


def _tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for i, dtype in enumerate(DTYPES):
        shape = [(3, 5), (7,), (), (2, 0, 4), (1, 2, 3)][i % 5]
        out[f"t{i}_{dtype}"] = np.asarray(rng.standard_normal(shape) * 50).astype(dtype)
    return out


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(a[name], b[name])


def test_the_layout_is_safetensors_both_ways() -> None:
    tensors = _tensors(np.random.default_rng(0))
    _assert_same(load(packing.pack(tensors).tobytes()), tensors)
    _assert_same(packing.unpack(save(tensors)), tensors)
    _assert_same(packing.unpack(save(tensors, metadata={"format": "np"})), tensors)
    _assert_same(packing.unpack(packing.pack(tensors)), tensors)


def test_unpacked_arrays_are_their_own_copies() -> None:
    """The Triton tensor the bytes came in may be freed: nothing may point into it."""
    buffer = packing.pack({"x": np.arange(12, dtype=np.float32).reshape(3, 4), "y": np.ones(3)})
    out = packing.unpack(buffer)
    buffer[:] = 0
    np.testing.assert_array_equal(out["x"], np.arange(12, dtype=np.float32).reshape(3, 4))
    for array in out.values():
        assert array.flags.owndata and array.flags.writeable and array.flags.aligned


def test_any_input_shape_and_layout() -> None:
    """A UINT8 tensor of any shape (Triton's [1, -1]), bytes, strided and big-endian inputs."""
    strided = np.arange(20, dtype=np.int32).reshape(4, 5)[:, ::2]
    big = np.arange(6, dtype=">f4")
    packed = packing.pack({"s": strided, "b": big})
    for form in (packed[None], packed.tobytes(), bytearray(packed.tobytes())):
        out = packing.unpack(form)
        np.testing.assert_array_equal(out["s"], strided)
        np.testing.assert_array_equal(out["b"], big)
        assert out["b"].dtype == np.float32


def test_empty() -> None:
    assert packing.pack({}).size == 0 and packing.unpack(b"") == {}
    assert packing.unpack(np.empty((1, 0), dtype=np.uint8)) == {}


def test_malformed_buffers_are_refused() -> None:
    good = packing.pack({"x": np.ones(4, dtype=np.float32)}).tobytes()
    header = b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}}      '
    negative = len(header).to_bytes(8, "little") + header + bytes(4)
    for bad in (good[:5], good[:12], good[:-1], negative):
        with pytest.raises(ValueError, match="packed tensors"):
            packing.unpack(bad)
    with pytest.raises(TypeError, match="complex"):
        packing.pack({"c": np.ones(2, dtype=np.complex64)})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int64])
def test_tensors_travel_in_their_own_dtype(dtype: torch.dtype) -> None:
    """A bfloat16 model's embeddings arrive as the same bfloat16 values (half float32's bytes), in the
    layout safetensors' torch loader reads too."""
    tensor = (torch.randn(5, 7) * 1000).to(dtype)
    packed = packing.pack({"e": packing.to_numpy(tensor)})
    assert packed.size == 8 + packed[:8].view(np.int64)[0] + tensor.numel() * tensor.element_size()
    back = packing.to_torch(packing.unpack(packed)["e"])
    assert back.dtype == dtype and torch.equal(back, tensor)
    assert torch.equal(load_torch(packed.tobytes())["e"], tensor)


def test_to_torch_shares_memory_unless_read_only() -> None:
    """The image cache's arrays are read-only and shared: a tensor made from one gets its own copy."""
    array = np.arange(4, dtype=np.float32)
    assert packing.to_torch(array).data_ptr() == array.ctypes.data
    array.flags.writeable = False
    copy = packing.to_torch(array)
    assert copy.data_ptr() != array.ctypes.data and torch.equal(copy, torch.arange(4.0))
