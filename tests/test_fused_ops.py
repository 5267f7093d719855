"""The fused RMSNorm and rotary kernels (run by Triton's interpreter on the CPU): the arithmetic of
transformers' RMSNorm modules in both styles and of its rotary function, and the engine with every
family's norms and rotary embeddings fused gives generate()'s tokens (generate() run before fusing,
on transformers' own modules)."""

from __future__ import annotations

import pytest
import torch
from family_harness import FAMILIES, Case, conversation
from test_engine import Collector

from tritonvlm.engine import (
    EngineConfig,
    LLMEngine,
    SamplingParams,
    fused_norm,
    fused_rotary,
    paged_attention,
    triton_runtime,
)

pytestmark = pytest.mark.skipif(not triton_runtime.available(), reason="needs the triton package")


@pytest.mark.parametrize("style", fused_norm.STYLES)
@pytest.mark.parametrize("width", [64, 80, 3584])
def test_kernel_computes_what_the_modules_compute(style, width):
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(3, 5, width, generator=gen) * 3
    weight = torch.randn(width, generator=gen)
    got = fused_norm.rms_norm(x, weight, 1e-6, style)
    want = fused_norm.reference_rms_norm(x, weight, 1e-6, style)
    assert got.shape == x.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_kernel_in_bfloat16_stays_within_rounding():
    # Triton's interpreter rounds float32 to bfloat16 toward zero where a GPU rounds to nearest even,
    # so here the results agree within a rounding (tests/test_gpu.py checks the compiled kernel's).
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(64, 128, generator=gen) * 3).bfloat16()
    weight = torch.randn(128, generator=gen).bfloat16()
    for style in fused_norm.STYLES:
        got = fused_norm.rms_norm(x, weight, 1e-6, style)
        want = fused_norm.reference_rms_norm(x, weight, 1e-6, style)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    fp32_weight = torch.randn(128, generator=gen)  # a float32 weight makes a Llama-style norm float32
    assert fused_norm.rms_norm(x, fp32_weight, 1e-6, "llama").dtype == torch.float32


def test_non_contiguous_rows_and_no_rows():
    x = torch.randn(4, 6, 32).transpose(0, 1)  # [6, 4, 32], rows not in memory order
    weight = torch.randn(32)
    torch.testing.assert_close(
        fused_norm.rms_norm(x, weight, 1e-5, "llama"), fused_norm.reference_rms_norm(x, weight, 1e-5, "llama")
    )
    assert fused_norm.rms_norm(torch.empty(0, 32), weight, 1e-5, "gemma").shape == (0, 32)


@pytest.mark.parametrize(
    ("batch", "q_heads", "k_heads", "seq", "dim"), [(2, 4, 2, 5, 16), (1, 28, 4, 1, 128), (3, 3, 1, 7, 80)]
)
def test_rotary_kernel_is_transformers_arithmetic_bit_for_bit(batch, q_heads, k_heads, seq, dim):
    # float32 (bfloat16 rounds toward zero in the interpreter; test_gpu.py checks it compiled)
    gen = torch.Generator().manual_seed(dim)
    q = torch.randn(batch, seq, q_heads, dim, generator=gen).transpose(1, 2)  # as the layers hand them
    k = torch.randn(batch, seq, k_heads, dim, generator=gen).transpose(1, 2)
    cos, sin = (torch.randn(batch, seq, dim, generator=gen) for _ in range(2))
    got_qk, want_qk = fused_rotary.rotary(q, k, cos, sin), fused_rotary.reference_rotary(q, k, cos, sin)
    for got, want in zip(got_qk, want_qk, strict=True):
        assert got.shape == want.shape and torch.equal(got, want)


def test_rotary_install_replaces_only_the_standard_function_and_restores_it(family_kit):
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling

    original = modeling.apply_rotary_pos_emb
    kit = family_kit("qwen2_5_vl")
    language_model = kit.family.language_model(kit.hf_model)
    try:
        assert fused_rotary.install(language_model) == 1
        assert modeling.apply_rotary_pos_emb is not original
        q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
        cos, sin = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
        pairs = zip(modeling.apply_rotary_pos_emb(q, k, cos, sin), original(q, k, cos, sin), strict=True)
        for got, want in pairs:
            assert torch.equal(got, want)
        odd = modeling.apply_rotary_pos_emb(q, k, cos[:, None], sin[:, None], unsqueeze_dim=0)  # falls back
        assert torch.equal(odd[0], original(q, k, cos[:, None], sin[:, None], unsqueeze_dim=0)[0])
    finally:
        fused_rotary.restore()
    assert modeling.apply_rotary_pos_emb is original


@pytest.fixture(scope="module", params=FAMILIES)
def kit(request, family_kit):
    return family_kit(request.param)


def test_engine_with_fused_ops_is_token_exact(kit, monkeypatch):
    cases = [
        Case("story", conversation("Tell me a story about a cat.", 0)),
        Case("short", [{"role": "user", "content": "Hi"}]),
    ]
    wanted = [kit.reference_tokens(case, n) for case, n in zip(cases, (12, 7), strict=True)]
    # Everything a CUDA engine runs in Triton: the fused ops and the decode-attention kernel.
    config = EngineConfig(
        max_model_len=512, prefix_cache_slots=0, fused_ops="true", decode_attention="triton"
    )
    engine = LLMEngine(kit.hf_model, kit.tokenizer, config, kit.family)
    calls = []
    kernel, rotary = fused_norm.rms_norm, fused_rotary.rotary
    monkeypatch.setattr(fused_norm, "rms_norm", lambda *a, **k: calls.append(a[-1]) or kernel(*a, **k))
    monkeypatch.setattr(fused_rotary, "rotary", lambda *a, **k: calls.append("rotary") or rotary(*a, **k))
    language_model = engine.runner.language_model
    try:
        layers = kit.hf_model.config.get_text_config().num_hidden_layers
        assert engine.runner.fused_norms >= 2 * layers + 1  # two a layer and the final one, at least
        assert engine.runner.fused_rotary == 1  # the family's modeling module
        sink = Collector()
        for case, n in zip(cases, (12, 7), strict=True):
            ids, mm = kit.engine_inputs(case)
            engine.add_request(case.name, ids, SamplingParams(max_tokens=n, temperature=0.0), sink, mm)
        while not all(sink.finished(c.name) for c in cases):
            engine.step()
        assert [sink.tokens(c.name) for c in cases] == wanted
        style = "gemma" if kit.name == "gemma3" else "llama"
        assert calls and set(calls) == {style, "rotary"}
    finally:
        fused_norm.restore(language_model)
        fused_rotary.restore()
        paged_attention.uninstall(language_model)
    assert not any(hasattr(m, "_tritonvlm_fused_norm") for m in language_model.modules())


def test_kernel_settings_on_a_cpu(family_kit, monkeypatch):
    """auto: none of the Triton kernels on a CPU; an unknown setting, or a kernel asked for where it
    cannot run, is an error at start-up rather than a warning."""
    kit = family_kit("qwen2_5_vl")

    def engine(**settings) -> LLMEngine:
        return LLMEngine(kit.hf_model, kit.tokenizer, EngineConfig(max_model_len=128, **settings), kit.family)

    runner = engine().runner
    assert (runner.decode_attention, runner.fused_norms, runner.fused_rotary) == ("gather", 0, 0)
    with pytest.raises(ValueError, match="decode_attention='paged'"):
        engine(decode_attention="paged")
    with pytest.raises(ValueError, match="fused_ops='yes'"):
        engine(fused_ops="yes")
    monkeypatch.setattr(triton_runtime, "available", lambda: False)
    with pytest.raises(ValueError, match="triton package is missing"):
        engine(fused_ops="true")
    assert engine(fused_ops="auto").runner.fused_norms == 0
