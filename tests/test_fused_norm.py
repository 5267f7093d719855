"""The fused RMSNorm kernel (run by Triton's interpreter on the CPU): the arithmetic of transformers'
RMSNorm modules in both styles, and the engine with every family's norms fused gives generate()'s
tokens (generate() run before fusing, on transformers' own modules)."""

from __future__ import annotations

import pytest
import torch
from family_harness import FAMILIES, Case, conversation
from test_engine import Collector

from tritonvlm.engine import EngineConfig, LLMEngine, SamplingParams, fused_norm, triton_runtime

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


@pytest.fixture(scope="module", params=FAMILIES)
def kit(request, family_kit):
    return family_kit(request.param)


def test_engine_with_fused_norms_is_token_exact(kit, monkeypatch):
    cases = [
        Case("story", conversation("Tell me a story about a cat.", 0)),
        Case("short", [{"role": "user", "content": "Hi"}]),
    ]
    wanted = [kit.reference_tokens(case, n) for case, n in zip(cases, (12, 7), strict=True)]
    config = EngineConfig(max_model_len=512, prefix_cache_slots=0, fused_rms_norm="true")
    engine = LLMEngine(kit.hf_model, kit.tokenizer, config, kit.family)
    calls = []
    kernel = fused_norm.rms_norm
    monkeypatch.setattr(fused_norm, "rms_norm", lambda *a, **k: calls.append(a[-1]) or kernel(*a, **k))
    language_model = engine.runner.language_model
    try:
        layers = kit.hf_model.config.get_text_config().num_hidden_layers
        assert engine.runner.fused_norms >= 2 * layers + 1  # two a layer and the final one, at least
        sink = Collector()
        for case, n in zip(cases, (12, 7), strict=True):
            ids, mm = kit.engine_inputs(case)
            engine.add_request(case.name, ids, SamplingParams(max_tokens=n, temperature=0.0), sink, mm)
        while not all(sink.finished(c.name) for c in cases):
            engine.step()
        assert [sink.tokens(c.name) for c in cases] == wanted
        style = "gemma" if kit.name == "gemma3" else "llama"
        assert calls and set(calls) == {style}
    finally:
        fused_norm.restore(language_model)
    assert not any(hasattr(m, "_tritonvlm_fused_norm") for m in language_model.modules())
