"""LLMEngine.launch: the engine is built on the thread that then runs its loop (what the vlm model
does), so all of its torch work stays on one thread (one OpenMP team on CPU)."""

from __future__ import annotations

import threading

import pytest
from family_harness import cases_for

from tritonvlm.engine import EngineConfig, LLMEngine, SamplingParams


def test_built_on_the_loop_thread_and_serves_token_exact(family_kit):
    kit = family_kit("qwen2_5_vl")
    case = next(c for c in cases_for(kit.name) if c.images)
    ids, mm = kit.engine_inputs(case)
    reference = kit.reference_tokens(case, 8)
    build_thread: list[int] = []
    step_threads: set[int] = set()

    def build() -> LLMEngine:
        build_thread.append(threading.get_ident())
        engine = LLMEngine.from_pretrained(str(kit.model_dir), EngineConfig(max_model_len=512))
        engine.on_step_end = lambda stats: step_threads.add(threading.get_ident())
        return engine

    engine = LLMEngine.launch(build)
    try:
        tokens: list[int] = []
        done = threading.Event()

        def on_output(out) -> None:
            tokens.extend(out.token_ids)
            if out.finished:
                done.set()

        engine.add_request("r", ids, SamplingParams(max_tokens=8, temperature=0.0), on_output, mm)
        assert done.wait(60), "the launched engine did not finish the request"
        assert tokens == reference
        assert build_thread[0] != threading.get_ident(), "built on the caller's thread"
        assert step_threads == {build_thread[0]}, "stepped on another thread than the one that built it"
    finally:
        engine.shutdown()
    assert not any(t.name == "llm-engine" and t.ident == build_thread[0] for t in threading.enumerate())


def test_a_failed_build_raises_in_the_caller():
    def build() -> LLMEngine:
        raise OSError("no such checkpoint: /nowhere")

    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(OSError, match="no such checkpoint"):
        LLMEngine.launch(build)
    leftover = [t for t in threading.enumerate() if t.ident not in before and t.name == "llm-engine"]
    assert not leftover
