"""Varlen attention for the Qwen-VL vision towers: one SDPA call per sequence length equals the
per-window loop transformers runs, and the families' encoders use it with unchanged outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from tritonvlm.modeling.varlen_attention import NAME, use_varlen_attention, varlen_sdpa_forward


def per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    outs = [
        F.scaled_dot_product_attention(a, b, c, scale=0.125)
        for a, b, c in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2), strict=True)
    ]
    return torch.cat(outs, 2).transpose(1, 2)


@pytest.mark.parametrize(
    "lengths",
    [
        [64] * 6,  # full windows, back to back: views
        [64, 64, 24, 64, 64, 24, 40, 40, 15],  # rows of windows with edge windows: gathered
        [300, 120, 300],  # images of two sizes
        [77],  # one image
        [16, 0, 16],  # an empty window
    ],
)
def test_one_call_per_length_equals_the_per_sequence_loop(lengths):
    torch.manual_seed(0)
    total = sum(lengths)
    q, k, v = (torch.randn(1, 4, total, 16) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out, _ = varlen_sdpa_forward(None, q, k, v, cu_seq_lens_q=cu, cu_seq_lens_k=cu, scaling=0.125)
    assert out.shape == (1, total, 4, 16)
    expected = per_sequence(q, k, v, [n for n in lengths if n])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # A mix-up of sequences would show: attention across the whole packed sequence differs.
    if len([n for n in lengths if n]) > 1:
        assert not torch.allclose(out, per_sequence(q, k, v, [total]), atol=1e-3)


def test_without_boundaries_it_is_plain_sdpa():
    q, k, v = (torch.randn(2, 4, 10, 8) for _ in range(3))
    out, _ = varlen_sdpa_forward(torch.nn.Module(), q, k, v, scaling=None)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v).transpose(1, 2))


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_encoders_use_it_and_embed_images_as_before(name, family_kit):
    kit = family_kit(name)
    from conftest import make_image

    processed = kit.preprocessor(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Hi"}]}],
        [make_image(112, 84, "blue", "square"), make_image(56, 140, "green")],
    )
    batch = [{key: torch.from_numpy(value) for key, value in processed.mm.items()}]
    reference = kit.family.encode(kit.hf_model, batch)[0]  # transformers' own per-window loop
    encoder = kit.family.strip_for_vision(kit.family_cls.load_model(str(kit.model_dir)))
    assert encoder.model.visual.config._attn_implementation == NAME
    got = kit.family.encode(encoder, batch)[0]
    assert got.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(got[key], reference[key], rtol=1e-5, atol=1e-5)


def test_eager_or_flash_towers_are_left_alone():
    class Config:
        _attn_implementation = "flash_attention_2"

    config = Config()
    assert not use_varlen_attention(config) and config._attn_implementation == "flash_attention_2"
    config._attn_implementation = "eager"
    assert not use_varlen_attention(config)
