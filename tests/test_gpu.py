"""The engine on a CUDA GPU (skipped without one), for every model family: greedy tokens equal
transformers' generate() on the same device and dtype, with requests joining a running batch."""

from __future__ import annotations

import time

import pytest
import torch
from family_harness import FAMILIES, cases_for

from tritonvlm.engine import EngineConfig, LLMEngine, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MAX_NEW = 16


@pytest.fixture(scope="module", params=[(f, d) for f in FAMILIES for d in ("float32", "bfloat16")])
def cuda_setup(request, family_kit):
    name, dtype_name = request.param
    kit = family_kit(name)
    dtype = getattr(torch, dtype_name)
    model = kit.family_cls.load_model(str(kit.model_dir), device="cuda", dtype=dtype)
    family = kit.family_cls(model.config)
    cases = []
    for case in cases_for(name):
        processed = kit.preprocessor(case.messages, case.images)
        mm = {}
        if processed.mm:
            mm = family.encode(model, [{k: torch.from_numpy(v) for k, v in processed.mm.items()}])[0]
        inputs = {k: v.to("cuda") for k, v in kit.reference_inputs(case).items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.inference_mode():
            ref = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
        cases.append((processed.input_ids.tolist(), mm, ref[0, inputs["input_ids"].shape[1] :].tolist()))
    return model, family, kit.tokenizer, cases, dtype_name


def run_staggered(engine: LLMEngine, cases) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    done: set[str] = set()

    def sink(out) -> None:
        tokens.setdefault(out.request_id, []).extend(out.token_ids)
        if out.finished:
            done.add(out.request_id)

    pending = list(enumerate(cases))
    step = 0
    while pending or len(done) < len(cases):
        if pending and step % 2 == 0:
            i, (ids, mm, _) = pending.pop(0)
            engine.add_request(str(i), ids, SamplingParams(max_tokens=MAX_NEW, temperature=0), sink, mm)
        engine.step()
        step += 1
        assert step < 1000
    return tokens


def test_engine_on_cuda_matches_generate(cuda_setup):
    model, family, tokenizer, cases, dtype = cuda_setup
    engine = LLMEngine(model, tokenizer, EngineConfig(max_model_len=512, max_num_seqs=8), family)
    assert engine.runner.device.type == "cuda"
    tokens = run_staggered(engine, cases)
    mismatches = [i for i, case in enumerate(cases) if tokens[str(i)] != case[2]]
    if dtype == "float32":
        assert mismatches == []
    else:
        # bf16 rounding differs with batch shape; most requests must still agree exactly.
        assert len(mismatches) <= 1, mismatches


def test_gpu_decode_throughput_figure(family_kit, capsys):
    """Prints batch-1 and batch-16 decode rates on the GPU (a figure, not a target)."""
    kit = family_kit("qwen2_5_vl")
    model = kit.family_cls.load_model(str(kit.model_dir), device="cuda", dtype=torch.bfloat16)
    ids = kit.preprocessor([{"role": "user", "content": "Tell me a story."}], []).input_ids.tolist()
    for batch in (1, 16):
        config = EngineConfig(max_model_len=512, max_num_seqs=batch)
        engine = LLMEngine(model, kit.tokenizer, config, kit.family_cls(model.config))
        finished: list[str] = []
        params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
        for i in range(batch):
            engine.add_request(
                str(i), ids, params, lambda o, f=finished: o.finished and f.append(o.request_id)
            )
        torch.cuda.synchronize()
        start = time.perf_counter()
        while len(finished) < batch:
            engine.step()
        torch.cuda.synchronize()
        rate = batch * 128 / (time.perf_counter() - start)
        with capsys.disabled():
            print(f"\n[gpu] tiny model, batch {batch}: {rate:.0f} output tokens/s")
        assert rate > 0
