"""The Triton decode-attention kernel (run by Triton's interpreter on the CPU): each row attends to its
own blocks up to its own length, as a plain softmax over them does; and the engine decoding with it
gives generate()'s tokens for every model family."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from family_harness import FAMILIES, Case, conversation
from test_engine import Collector

from tritonvlm.engine import EngineConfig, LLMEngine, SamplingParams, triton_runtime
from tritonvlm.engine import paged_attention as pa

pytestmark = pytest.mark.skipif(not triton_runtime.available(), reason="needs the triton package")

PAGE = 16


def paged_inputs(lengths: list[int], q_heads: int, kv_heads: int, dim: int, dtype: torch.dtype):
    """Pools with each row's blocks scattered (shuffled block numbers), its table, a query per row."""
    gen = torch.Generator().manual_seed(0)
    blocks = sum(-(-n // PAGE) for n in lengths) + 3
    pools = [torch.randn(blocks + 1, PAGE, kv_heads, dim, generator=gen).to(dtype) for _ in range(2)]
    order = torch.randperm(blocks, generator=gen).tolist()
    width = max(-(-n // PAGE) for n in lengths) + 1
    tables = torch.full((len(lengths), width), blocks, dtype=torch.long)  # the rest: the scratch block
    for row, n in enumerate(lengths):
        held = -(-n // PAGE)
        tables[row, :held] = torch.tensor(order[:held], dtype=torch.long)
        order = order[held:]
    query = torch.randn(len(lengths), q_heads, dim, generator=gen).to(dtype)
    return query, *pools, tables, torch.tensor(lengths)


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "dim"), [(4, 2, 16), (7, 1, 64), (8, 8, 80), (28, 4, 128)], ids=str
)
@pytest.mark.parametrize("splits", [1, 3])
def test_kernel_matches_a_softmax_over_each_rows_own_blocks(q_heads, kv_heads, dim, splits):
    lengths = [1, 17, 0, 150, 64]
    query, keys, values, tables, lengths = paged_inputs(lengths, q_heads, kv_heads, dim, torch.float32)
    got = pa.paged_decode_attention(query, keys, values, tables, lengths, dim**-0.5, splits)
    want = pa.reference_decode_attention(query, keys, values, tables, lengths, dim**-0.5)
    assert got.shape == query.shape
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    assert got[2].abs().max() == 0  # a row of length 0 (a CUDA graph's dummy row) attends to nothing


def test_kernel_reads_only_each_rows_own_positions():
    # Poison everything a row must not read: positions past its length in its last block, the blocks
    # after its last (scratch) and other rows' blocks; its output must not move.
    query, keys, values, tables, lengths = paged_inputs([5, 40], 4, 2, 32, torch.float32)
    before = pa.paged_decode_attention(query, keys, values, tables, lengths, 0.2, splits=2)
    for pool in (keys, values):
        pool[tables[0, 0], 5:] = 1e4
        pool[tables[1, 2], 40 % PAGE :] = -1e4
        pool[-1] = float("nan")
    after = pa.paged_decode_attention(query, keys, values, tables, lengths, 0.2, splits=2)
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_kernel_in_bfloat16_stays_within_rounding():
    query, keys, values, tables, lengths = paged_inputs([3, 100, 33], 8, 2, 64, torch.bfloat16)
    got = pa.paged_decode_attention(query, keys, values, tables, lengths, 0.125, splits=2)
    want = pa.reference_decode_attention(query.float(), keys.float(), values.float(), tables, lengths, 0.125)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_splits_fill_the_device_but_not_below_a_share_of_the_longest_row():
    cpu = torch.device("cpu")
    assert pa.choose_splits(1, 4, 100, cpu) == 1  # shorter than two splits' share
    assert pa.choose_splits(1, 4, 1024, cpu) == 4
    assert pa.choose_splits(64, 4, 100_000, cpu) == 4


AOT_COMPILE = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tritonvlm.engine import triton_kernels as kernels

def build(fn, types, constants, capability):
    names = fn.arg_names
    signature = dict(zip(names, types + ["constexpr"] * len(constants)))
    consts = {(names.index(k),): v for k, v in constants.items()}
    source = ASTSource(fn=fn, signature=signature, constexprs=consts)
    triton.compile(source, target=GPUTarget("cuda", capability, 32))

for capability in (80, 90):
    for dtype in ("bf16", "fp16", "fp32"):
        split_types = [f"*{dtype}"] * 3 + ["*i64", "*i64", "*fp32", "*fp32", "fp32"] + ["i32"] * 13
        split_consts = dict(GROUP=7, HEAD_DIM=128, PAGE=16, BLOCK_H=16, BLOCK_N=32, BLOCK_D=128,
                            IEEE=dtype == "fp32", UPCAST=False)
        build(kernels.decode_split, split_types, split_consts, capability)
        merge_types = ["*fp32", "*fp32", f"*{dtype}"] + ["i32"] * 8
        build(kernels.decode_merge, merge_types, dict(HEAD_DIM=128, BLOCK_S=8, BLOCK_D=128), capability)
        norm_types = [f"*{dtype}", f"*{dtype}", f"*{dtype}", "i32", "i32", "fp32"]
        build(kernels.rms_norm, norm_types, dict(N=3584, BLOCK=4096, GEMMA=False), capability)
        build(kernels.rms_norm, norm_types, dict(N=128, BLOCK=128, GEMMA=True), capability)
        rotary_types = [f"*{dtype}"] * 6 + ["i32"] * 15
        rotary_consts = dict(Q_HEADS=28, K_HEADS=4, DIM=128, BLOCK_H=32, BLOCK_D=128)
        build(kernels.rotary, rotary_types, rotary_consts, capability)
print("compiled")
"""


def test_kernels_compile_for_ampere_and_hopper_gpus():
    # The tests above run the kernels interpreted; this compiles them for real GPUs (sm_80, sm_90:
    # A100, H100/H200) ahead of time, without one, as Triton would at start-up on a GPU machine.
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run(
        [sys.executable, "-c", AOT_COMPILE], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


@pytest.fixture(scope="module", params=FAMILIES)
def kit(request, family_kit):
    return family_kit(request.param)


def test_engine_decoding_with_the_kernel_is_token_exact(kit, monkeypatch):
    engine = LLMEngine(
        kit.hf_model,
        kit.tokenizer,
        EngineConfig(max_model_len=512, prefix_cache_slots=0, decode_attention="triton"),
        kit.family,
    )
    assert engine.runner.decode_attention == "triton"
    calls = []
    kernel = pa.paged_decode_attention
    monkeypatch.setattr(pa, "paged_decode_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    sink = Collector()
    cases = [
        Case("story", conversation("Tell me a story about a cat.", 0)),
        Case("short", [{"role": "user", "content": "Hi"}]),
    ]
    for case, n in zip(cases, (12, 7), strict=True):  # different lengths in one batch
        ids, mm = kit.engine_inputs(case)
        engine.add_request(case.name, ids, SamplingParams(max_tokens=n, temperature=0.0), sink, mm)
    while not all(sink.finished(c.name) for c in cases):
        engine.step()
    for case, n in zip(cases, (12, 7), strict=True):
        assert sink.tokens(case.name) == kit.reference_tokens(case, n)
    assert calls  # decode attention went through the kernel


@pytest.mark.parametrize("name", ["qwen2_5_vl", "gemma3"])
def test_with_the_kernel_in_every_layer_one_cuda_graph_serves_every_length(name, family_kit):
    """Graphs are keyed by batch and attention length; where the kernel attends in every layer (it
    reads each row up to its own length) the length key is the full one, so one graph per batch
    bucket serves all lengths. Gemma 3's sliding layers still attend over a length-sized ring."""
    kit = family_kit(name)
    config = EngineConfig(
        max_model_len=256, prefix_cache_slots=0, decode_attention="triton", async_scheduling="false"
    )
    engine = LLMEngine(kit.hf_model, kit.tokenizer, config, kit.family)
    keys: list[int] = []

    class GraphKeys:  # stands in for DecodeGraphs (CUDA only): records the key, lets the step run eagerly
        def run(self, tokens, cache_pos, rope, kv_len, previous=None):
            keys.append(kv_len)

    engine.runner.graphs = GraphKeys()
    sink = Collector()
    ids, mm = kit.engine_inputs(Case("story", conversation("Tell me a story about a cat.", 0)))
    engine.add_request("a", ids, SamplingParams(max_tokens=6, temperature=0.0), sink, mm)
    while not sink.finished("a"):
        engine.step()
    assert len(keys) == 5
    if name == "gemma3":
        assert keys == list(range(len(ids) + 1, len(ids) + 6))
    else:
        assert set(keys) == {256}
