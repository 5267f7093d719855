"""The engine on a CUDA GPU (skipped without one), for every model family: greedy tokens equal
transformers' generate() on the same device and dtype, with requests joining a running batch."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import make_image
from family_harness import FAMILIES, cases_for, one_sequence_budget

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


@pytest.mark.parametrize(
    "chunk,tight", [(0, False), (8, False), (0, True)], ids=["whole prefill", "8-token chunks", "tight KV"]
)
def test_engine_on_cuda_matches_generate(cuda_setup, chunk, tight):
    """Staggered arrivals join a running batch; with 8-token chunks every later prompt is prefilled in
    chunks between the running sequences' decode steps (every family); with a
    tight KV budget (blocks for one 512-token sequence) running sequences are preempted and resumed."""
    model, family, tokenizer, cases, dtype = cuda_setup
    budget = str(one_sequence_budget(family, getattr(torch, dtype))) if tight else ""
    config = EngineConfig(
        max_model_len=512, max_num_seqs=8, prefill_chunk_tokens=chunk, kv_cache_memory=budget
    )
    engine = LLMEngine(model, tokenizer, config, family)
    assert engine.runner.device.type == "cuda"
    assert engine.runner.decode_attention == "triton"  # the kernel passed its check and serves the family
    assert engine.runner.fused_norms > 0 and engine.runner.fused_rotary > 0  # and the fused ops
    assert engine.async_output and engine.async_scheduling  # (on by default on CUDA)
    tokens = run_staggered(engine, cases)
    if tight:
        print(f"\n{family.name} {dtype}: {engine.stats.preemptions} preemptions")
    graphs = engine.runner.graphs
    if graphs is not None:  # the decode steps came from CUDA graphs (capture did not fall back)
        assert not graphs.failed and graphs.replays > 0
    mismatches = [i for i, case in enumerate(cases) if tokens[str(i)] != case[2]]
    if dtype == "float32":
        assert mismatches == []
    else:
        # bf16 rounding differs with batch shape; most requests must still agree exactly.
        assert len(mismatches) <= 1, mismatches


def test_async_output_on_cuda_sends_what_it_sends_without(family_kit):
    """With CUDA graphs, async output (the next step launched before a step's text is made) and async
    scheduling (launched before its tokens are read back, taking them on the device), the streams
    equal those without, stop strings met mid-stream, a seeded request with logprobs, a penalised
    one and a constrained one included; a sampled top-k 1 row drawn on the device gives the greedy
    tokens."""
    from test_async_output import assert_same_streams, run, stop_after

    kit = family_kit("qwen2_5_vl")
    # float32: a sequence that ended stays a step longer in the batch with async output or scheduling,
    # and bfloat16 rows round differently in batches of other shapes.
    model = kit.family_cls.load_model(str(kit.model_dir), device="cuda", dtype=torch.float32)
    family = kit.family_cls(model.config)

    def engine(async_output: str, async_scheduling: str = "false") -> LLMEngine:
        config = EngineConfig(
            max_model_len=512, max_num_seqs=8, async_output=async_output, async_scheduling=async_scheduling
        )
        return LLMEngine(model, kit.tokenizer, config, family)

    inputs = [kit.engine_inputs(case) for case in cases_for(kit.name)]
    inputs = [(ids, {k: v.to("cuda") for k, v in mm.items()}) for ids, mm in inputs]
    plain = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    reference = run(engine("false"), [(f"r{i}", ids, mm, plain) for i, (ids, mm) in enumerate(inputs)])
    requests = []
    for i, (ids, mm) in enumerate(inputs):
        k, stop = stop_after(kit, reference.tokens(f"r{i}"), first=12)
        params = SamplingParams(max_tokens=k + 2, temperature=0, ignore_eos=True, stop=[stop])
        requests += [(f"stop{i}", ids, mm, params), (f"plain{i}", ids, mm, plain)]
    expected = run(engine("false"), requests)
    overlapped = engine("true")
    assert overlapped.async_output and not overlapped.async_scheduling
    assert overlapped.runner.graphs is not None
    assert_same_streams(run(overlapped, requests), expected)
    assert overlapped.runner.graphs.replays > 0
    scheduled = engine("auto", "auto")
    assert scheduled.async_scheduling
    top_k_1 = SamplingParams(max_tokens=24, temperature=1.5, top_k=1, ignore_eos=True)
    seeded = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=11, logprobs=True, top_logprobs=2)
    penalised = SamplingParams(max_tokens=24, temperature=0, repetition_penalty=1.3, presence_penalty=0.4)
    constrained = SamplingParams(
        max_tokens=12, temperature=0, guided={"type": "regex", "pattern": "[a-c]{4,9}"}
    )
    requests += [
        ("seeded", *inputs[0], seeded),
        ("penalised", *inputs[1], penalised),
        ("constrained", *inputs[1], constrained),
    ]
    expected = run(engine("false"), requests)
    assert_same_streams(run(scheduled, requests), expected)  # (the seeded draws and logprobs included)
    assert scheduled.runner.graphs.replays > 0
    # (each alone: the same batch shapes)
    greedy = run(engine("auto", "auto"), [("x", *inputs[0], plain)])
    assert run(engine("auto", "auto"), [("x", *inputs[0], top_k_1)]).tokens("x") == greedy.tokens("x")


def test_an_overlapped_decode_launch_does_not_wait_for_the_device(family_kit):
    """Async scheduling launches a decode step while the one before runs: the launch (inputs, the
    tokens taken from the step before on the device, the graph replay) and the device-side sampling
    of greedy, sampled, seeded, penalised and constrained rows with logprobs must not synchronise with
    the device (torch's sync debug mode raises on any that does). (A constrained batch's sampling
    follows the recording of the step before, which waits for that step alone.)"""
    from test_engine import Collector

    from tritonvlm.engine.device_sampling import sample_on_device

    kit = family_kit("qwen2_5_vl")
    model = kit.family_cls.load_model(str(kit.model_dir), device="cuda", dtype=torch.bfloat16)
    family = kit.family_cls(model.config)
    config = EngineConfig(max_model_len=512, max_num_seqs=8)
    engine = LLMEngine(model, kit.tokenizer, config, family)
    ids, mm = kit.engine_inputs(cases_for(kit.name)[0])
    sink = Collector()
    settings = [
        SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=0.8, ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=0.8, top_k=5, ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=0.8, top_p=0.9, ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=0.8, seed=3, logprobs=True, top_logprobs=2),
        SamplingParams(max_tokens=40, temperature=0.0, repetition_penalty=1.2, frequency_penalty=0.3),
        SamplingParams(max_tokens=40, temperature=0.8, guided={"type": "regex", "pattern": "[a-z ]{1,60}"}),
    ]
    for i, params in enumerate(settings):
        engine.add_request(str(i), ids, params, sink)
    for _ in range(4):  # (the graph for this batch captured; a step in flight)
        engine.step()
    assert engine._inflight is not None and len(engine.scheduler.running) == len(settings)
    batch = list(engine.scheduler.running)
    step = engine._inflight
    previous = step.tokens
    torch.cuda.synchronize()

    def without_waiting(launch):
        torch.cuda._sleep(100_000_000)  # the device busy: anything that waits for it would wait here
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    logits = without_waiting(lambda: engine.runner.decode(batch, previous))
    engine._inflight = None
    engine._record_step(step)  # (the constrained row's grammar takes its last token)
    without_waiting(lambda: sample_on_device(logits, batch, previous))
    torch.cuda.synchronize()


def test_a_host_table_edit_waits_until_the_device_has_copied_the_table():
    """The block table is copied to the device asynchronously from pinned memory; the engine edits the
    host's table while a forward may still run (async output): the edit must wait for the copy, or the
    forward would read the edit."""
    from tritonvlm.engine.kv_cache import PagedKVCache

    device = torch.device("cuda")
    cache = PagedKVCache(1, 2, 16, 2, 256, torch.float32, device, None, num_blocks=32, block_size=16)
    cache.grow(0, 40)  # three blocks for slot 0
    before = cache.slot_blocks[0][:]
    torch.cuda._sleep(200_000_000)  # the device busy for a while: the copy waits behind it
    cache.sync_tables()
    cache.grow(1, 20)  # a host edit while the copy is still queued
    cache.release(0)
    torch.cuda.synchronize()
    assert cache.tables[0, :3].tolist() == before  # the copy read the table as it was at sync time


SHARED = "Look at the picture carefully and think about its colours and shapes before you answer."


@pytest.mark.parametrize(
    "name,texts",
    [
        ("qwen2_5_vl", ["What is in this image? One sentence.", "What is in this image?"]),
        ("gemma3", ["What is in this image? One sentence."] * 2),
        ("gemma3", [f"{SHARED} Now name its colour.", f"{SHARED} Now describe it.", f"{SHARED} Now count."]),
    ],
    ids=["qwen2_5_vl", "gemma3-same", "gemma3-branch"],
)
def test_prefix_cache_hit_on_cuda_matches_generate(family_kit, name, texts):
    """A prompt that starts from cached keys/values (same image, another question; Gemma 3, whose
    window is shorter than the prompt: the same prompt again, from its entry's ring copy, and a third
    question after the same long start, from the ring copy the second kept where it left the first)
    gets generate()'s tokens on the GPU too (float32; attention lengths rounded up to CUDA's buckets)."""
    from family_harness import Case, conversation

    kit = family_kit(name)
    model = kit.family_cls.load_model(str(kit.model_dir), device="cuda", dtype=torch.float32)
    family = kit.family_cls(model.config)
    engine = LLMEngine(model, kit.tokenizer, EngineConfig(max_model_len=512), family)
    image = make_image(64, 48, "red")
    cached = []
    for n, text in enumerate(texts):
        case = Case(f"r{n}", conversation(text, 1), [image])
        processed = kit.preprocessor(case.messages, case.images)
        mm = family.encode(model, [{k: torch.from_numpy(v) for k, v in processed.mm.items()}])[0]
        inputs = {k: v.to("cuda") for k, v in kit.reference_inputs(case).items()}
        with torch.inference_mode():
            ref = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
        outs = []
        engine.add_request(
            case.name,
            processed.input_ids.tolist(),
            SamplingParams(max_tokens=MAX_NEW, temperature=0),
            outs.append,
            mm,
        )
        while not (outs and outs[-1].finished):
            engine.step()
        assert [t for o in outs for t in o.token_ids] == ref[0, inputs["input_ids"].shape[1] :].tolist(), text
        cached.append(outs[-1].cached_tokens)
    assert cached[0] == 0 and cached[-1] > 0, cached


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_attention_kernel_on_cuda_matches_a_softmax_over_each_rows_blocks(dtype):
    """The compiled kernel (the CPU tests run it interpreted): mixed lengths, an empty row, 1 and 8
    splits, Qwen2.5-VL-7B's head grouping, against the plain reference."""
    from test_paged_attention import paged_inputs

    from tritonvlm.engine import paged_attention as pa

    inputs = paged_inputs([1, 17, 0, 150, 64, 2000], 28, 4, 128, dtype)
    query, keys, values, tables, lengths = (t.cuda() for t in inputs)
    want = pa.reference_decode_attention(query.float(), keys.float(), values.float(), tables, lengths, 0.088)
    for splits in (1, 8):
        got = pa.paged_decode_attention(query, keys, values, tables, lengths, 0.088, splits)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_fused_ops_on_cuda_rounds_as_the_modules_do(style):
    """Compiled, the kernel rounds to bfloat16 where transformers' modules round (the CPU tests run it
    interpreted, which rounds toward zero): nearly every element is the same bfloat16."""
    from tritonvlm.engine import fused_norm

    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(64, 3584, generator=gen) * 3).bfloat16().cuda()
    weight = torch.randn(3584, generator=gen).bfloat16().cuda()
    got = fused_norm.rms_norm(x, weight, 1e-6, style)
    want = fused_norm.reference_rms_norm(x, weight, 1e-6, style)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=1e-2)
    assert (got == want).float().mean() > 0.95


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_rotary_on_cuda_is_transformers_arithmetic_bit_for_bit(dtype):
    from tritonvlm.engine import fused_rotary

    gen = torch.Generator().manual_seed(2)
    q = torch.randn(3, 5, 28, 128, generator=gen).to("cuda", dtype).transpose(1, 2)
    k = torch.randn(3, 5, 4, 128, generator=gen).to("cuda", dtype).transpose(1, 2)
    cos, sin = (torch.randn(3, 5, 128, generator=gen).to("cuda", dtype) for _ in range(2))
    got, want = fused_rotary.rotary(q, k, cos, sin), fused_rotary.reference_rotary(q, k, cos, sin)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_gpu_decode_throughput_figure(family_kit, capsys):
    """Prints batch-1 and batch-16 decode rates on the GPU: CUDA graphs with the decode-attention
    kernel, with gathered blocks, and eager (a figure)."""
    kit = family_kit("qwen2_5_vl")
    model = kit.family_cls.load_model(str(kit.model_dir), device="cuda", dtype=torch.bfloat16)
    ids = kit.preprocessor([{"role": "user", "content": "Tell me a story."}], []).input_ids.tolist()
    runs = [(b, g, a) for b in (1, 16) for g, a in ((True, "triton"), (True, "gather"), (False, "triton"))]
    for batch, graphs, attention in runs:
        config = EngineConfig(
            max_model_len=512, max_num_seqs=batch, cuda_graphs=graphs, decode_attention=attention
        )
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
            mode = "CUDA graphs" if graphs else "eager"
            print(f"\n[gpu] tiny model, batch {batch}, {mode}, {attention}: {rate:.0f} output tokens/s")
        assert rate > 0


@pytest.mark.parametrize("name", [f for f in FAMILIES if f in ("qwen2_5_vl", "gemma3")])
def test_images_encoded_alone_match_encoded_together_on_cuda(name, family_kit):
    """The image cache keeps each image's embeddings apart and encodes a request's new images without
    the others (``Family.split_images``): on the GPU, an image encoded alone must give what it gives
    encoded with others, within float32 rounding (kernels may differ with the batch's size); the bf16
    deviation is printed."""
    import numpy as np

    kit = family_kit(name)
    images = [make_image(64, 48, "red"), make_image(56, 84, "blue", "square")]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]}
    ]
    processed = kit.preprocessor(messages, images)
    for dtype in (torch.float32, torch.bfloat16):
        model = kit.family_cls.load_model(str(kit.model_dir), device="cuda", dtype=dtype)
        family = kit.family_cls(model.config)

        def encode(tensors, family=family, model=model):
            out = family.encode(model, [{k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}])[0]
            return {k: (v.float() if v.is_floating_point() else v).cpu().numpy() for k, v in out.items()}

        together = encode(processed.mm)
        parts = family.split_images(processed.mm)
        alone = family.join_images([encode(part) for part in parts])
        for key in together:
            deviation = float(np.abs(together[key].astype(np.float64) - alone[key]).max())
            print(f"\n{name} {dtype}: {key} encoded alone vs together, max |diff| {deviation:.3g}")
            if dtype == torch.float32:
                np.testing.assert_allclose(alone[key], together[key], rtol=1e-4, atol=1e-5)
