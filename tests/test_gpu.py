"""The engine on a CUDA GPU (skipped without one): greedy tokens equal transformers' generate() on
the same device and dtype, with requests joining a running batch."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import make_image

from tritonvlm.engine import EngineConfig, LLMEngine, SamplingParams
from tritonvlm.modeling.vision import encode_images
from tritonvlm.preprocessing import ChatPreprocessor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MAX_NEW = 16


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def cuda_setup(request, tiny_model_dir, processor):
    from tritonvlm.modeling.processor import load_model

    dtype = getattr(torch, request.param)
    model = load_model(str(tiny_model_dir), device="cuda", dtype=dtype)
    pre = ChatPreprocessor(processor)
    cases = []
    for i, n_images in enumerate([0, 1, 2, 1]):
        images = [make_image(64 + 16 * i, 48, "red"), make_image(112, 56, "green", "square")][:n_images]
        parts = [{"type": "image"}] * n_images + [{"type": "text", "text": f"Case {i}: what is here?"}]
        inputs = pre([{"role": "user", "content": parts}], images)
        ids = torch.from_numpy(inputs.input_ids)[None].cuda()
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        embeds = grid = None
        if images:
            pixel_values = torch.from_numpy(inputs.pixel_values).cuda()
            grid = torch.from_numpy(inputs.image_grid_thw).cuda()
            kwargs.update(pixel_values=pixel_values, image_grid_thw=grid)
            kwargs["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
            embeds = encode_images(model.model.visual, pixel_values, grid)
        with torch.inference_mode():
            ref = model.generate(**kwargs, max_new_tokens=MAX_NEW, do_sample=False)
        cases.append((inputs.input_ids.tolist(), embeds, grid, ref[0, ids.shape[1] :].tolist()))
    return model, processor.tokenizer, cases, request.param


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
            i, (ids, embeds, grid, _) = pending.pop(0)
            engine.add_request(
                str(i), ids, SamplingParams(max_tokens=MAX_NEW, temperature=0), sink, embeds, grid
            )
        engine.step()
        step += 1
        assert step < 1000
    return tokens


def test_engine_on_cuda_matches_generate(cuda_setup):
    model, tokenizer, cases, dtype = cuda_setup
    engine = LLMEngine(model, tokenizer, EngineConfig(max_model_len=512, max_num_seqs=8))
    assert engine.runner.device.type == "cuda"
    tokens = run_staggered(engine, cases)
    mismatches = [i for i, case in enumerate(cases) if tokens[str(i)] != case[3]]
    if dtype == "float32":
        assert mismatches == []
    else:
        # bf16 rounding differs with batch shape; most requests must still agree exactly.
        assert len(mismatches) <= 1, mismatches


def test_gpu_decode_throughput_figure(tiny_model_dir, processor, capsys):
    """Prints batch-1 and batch-16 decode rates on the GPU (a figure, not a target)."""
    from tritonvlm.modeling.processor import load_model

    model = load_model(str(tiny_model_dir), device="cuda", dtype=torch.bfloat16)
    ids = ChatPreprocessor(processor)(
        [{"role": "user", "content": "Tell me a story."}], []
    ).input_ids.tolist()
    for batch in (1, 16):
        engine = LLMEngine(model, processor.tokenizer, EngineConfig(max_model_len=512, max_num_seqs=batch))
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
