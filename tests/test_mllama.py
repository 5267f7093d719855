"""What is specific to Llama 3.2 Vision (``mllama``): its test model mimics the real checkpoint, one image
per prompt, the cross-attention states held in the KV cache (counted, freed on finish and cancel),
text-only and image rows decoding in one batch token-exact, and the memory of the real 11B's shape.
The checks every family gets (parity, staggered joins, e2e) are in test_engine.py / test_families_e2e.py."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image
from family_harness import Case, conversation

from tritonvlm.engine import EngineConfig, LLMEngine, SamplingParams
from tritonvlm.engine.engine_config import sequence_bytes
from tritonvlm.engine.kv_cache import PagedKVCache
from tritonvlm.families.mllama import MASK, STATES, MllamaFamily
from tritonvlm.testmodels.mllama import IMAGE_TOKEN, SIZES
from tritonvlm.wire import InvalidRequestError

NEW = 10


@pytest.fixture(scope="module")
def kit(family_kit):
    return family_kit("mllama")


def image_case(color: str, width: int = 64, height: int = 48) -> Case:
    images = [make_image(width, height, color)]
    return Case(f"{color} image", conversation("What is in this image?", 1), images)


def text_case() -> Case:
    return Case("text", conversation("Tell me a story about a cat.", 0))


def per_state_bytes(family: MllamaFamily, dtype: torch.dtype) -> int:
    """Bytes one cross-attention state takes across all cross layers (keys and values)."""
    kv_heads, head_dim = family.kv_geometry()
    return len(family.cross_layers) * 2 * kv_heads * head_dim * torch.finfo(dtype).bits // 8


# ---- the test model is shaped like the real checkpoint ----------------------------------------------


def test_test_model_mimics_the_checkpoint(kit) -> None:
    tok, config = kit.tokenizer, kit.hf_model.config
    size = SIZES["tiny"]
    # <|image|> is the first id past the LM head's vocabulary (128256 in the real one).
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == config.image_token_id == size.vocab_size
    assert len(tok) == size.vocab_size + 1 and kit.hf_model.lm_head.out_features == size.vocab_size
    assert kit.hf_model.get_input_embeddings().num_embeddings == size.vocab_size + 8
    # The tokenizer prepends BOS; the template emits it; the processor output has exactly one.
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    ids = kit.reference_inputs(image_case("red"))["input_ids"][0].tolist()
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids.count(config.image_token_id) == 1
    # A text-only prompt gets the default system block (knowledge cut-off, date); an image prompt none.
    text, image = (kit.family.render_prompt(kit.processor, conversation("Hi", n)) for n in (0, 1))
    assert "Cutting Knowledge Date" in text and "system" not in image
    assert image.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_zero_initialised_gates_are_random(kit) -> None:
    """transformers starts the cross-attention and tile gates at 0: the image would change nothing."""
    gates = {n: p.item() for n, p in kit.hf_model.named_parameters() if n.endswith("gate")}
    assert len(gates) == 2 * len(kit.family.cross_layers) + 3
    assert all(abs(g) > 0.1 for g in gates.values()), gates


def test_processor_outputs_and_encoder_outputs(kit) -> None:
    processed = kit.preprocessor(image_case("red").messages, image_case("red").images)
    tiles = kit.family.num_tiles
    assert processed.mm["pixel_values"].shape == (1, 1, tiles, 3, 56, 56)
    assert processed.mm[MASK].shape == (len(processed.input_ids), 1, tiles)
    ids, mm = kit.engine_inputs(image_case("red"))
    assert set(mm) == {STATES, MASK}
    assert mm[STATES].shape == (kit.family.states_per_image, kit.hf_model.config.text_config.hidden_size)


def test_requests_share_one_tower_forward_with_the_same_states(kit) -> None:
    """Two requests with different tile arrangements in one encode call = each alone."""
    cases = [image_case("red", 64, 48), image_case("blue", 40, 120)]
    batch = []
    for case in cases:
        mm = kit.preprocessor(case.messages, case.images).mm
        batch.append({k: torch.from_numpy(v) for k, v in mm.items()})
    assert not torch.equal(batch[0]["aspect_ratio_ids"], batch[1]["aspect_ratio_ids"])
    together = kit.family.encode(kit.hf_model, batch)
    for mm, out in zip(batch, together, strict=True):
        alone = kit.family.encode(kit.hf_model, [mm])[0]
        assert torch.allclose(out[STATES], alone[STATES], atol=1e-5)
        assert torch.equal(out[MASK], mm[MASK])


# ---- what is refused ----------------------------------------------------------------------------------


def test_one_image_per_prompt(kit) -> None:
    two = conversation("Compare them.", 2)
    with pytest.raises(InvalidRequestError, match=r"at most 1 image .*max_images_per_prompt.*has 2") as info:
        kit.preprocessor(two, [make_image(64, 48, "red"), make_image(48, 64, "blue")])
    assert info.value.param == "messages"


def test_system_message_with_an_image_is_a_clear_400(kit) -> None:
    messages = [{"role": "system", "content": "Be brief."}, *conversation("What is it?", 1)]
    with pytest.raises(InvalidRequestError, match="incompatible with system messages"):
        kit.preprocessor(messages, [make_image(64, 48, "red")])
    kit.preprocessor([{"role": "system", "content": "Be brief."}, *conversation("Hi", 0)], [])  # fine


def test_engine_refuses_image_tokens_without_images(kit) -> None:
    engine = LLMEngine(kit.hf_model, kit.tokenizer, EngineConfig(max_model_len=256), kit.family)
    ids, mm = kit.engine_inputs(image_case("red"))
    params = SamplingParams(max_tokens=4)
    with pytest.raises(InvalidRequestError, match="1 <|image|> tokens but 0 images"):
        engine.add_request("a", ids, params, lambda o: None)
    with pytest.raises(InvalidRequestError, match="do not match the prompt"):
        engine.add_request("b", ids[1:] + ids[:1], params, lambda o: None, {**mm, MASK: mm[MASK][1:]})
    engine.add_request("c", ids, params, lambda o: None, mm)  # the real thing is accepted


# ---- the cross-attention state in the engine ------------------------------------------------------------


def multi_turn_case() -> Case:
    """The image in the first user turn; the later turns' tokens attend to it too."""
    messages = [
        *conversation("What is this?", 1),
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": "And the background?"},
    ]
    return Case("multi-turn", messages, [make_image(80, 30, "green")])


def test_text_and_image_rows_share_prefill_and_decode_token_exact_and_states_are_freed(kit) -> None:
    cases = [text_case(), image_case("red"), multi_turn_case(), image_case("blue", 40, 120), text_case()]
    inputs = [kit.engine_inputs(case) for case in cases]
    refs = [kit.reference_tokens(case, NEW) for case in cases]
    # (no prefix cache: the second text prompt would wait a step to start from the first's keys)
    config = EngineConfig(max_model_len=256, prefix_cache_slots=0)
    engine = LLMEngine(kit.hf_model, kit.tokenizer, config, kit.family)
    tokens: dict[str, list[int]] = {}
    finished: set[str] = set()

    def sink(out) -> None:
        tokens.setdefault(out.request_id, []).extend(out.token_ids)
        if out.finished:
            finished.add(out.request_id)

    for i, (ids, mm) in enumerate(inputs):
        engine.add_request(str(i), ids, SamplingParams(max_tokens=NEW, temperature=0), sink, mm)
    engine.step()  # all five prefill together, then decode together
    assert engine.stats.prefill_steps == 1 and len(engine.scheduler.running) == 5
    one_image = kit.family.states_per_image * per_state_bytes(kit.family, torch.float32)
    assert engine.stats.extra_state_bytes == 3 * one_image
    # Cancel an image row in the middle of the batch: the last row (text only) moves into its slot.
    engine.cancel("1")
    engine.step()
    assert [s.request_id for s in engine.scheduler.running] == ["0", "4", "2", "3"]
    assert engine.runner.cache.state_lengths[:4] == [0, 0, 68, 68]
    assert engine.stats.extra_state_bytes == 2 * one_image
    assert not engine.runner.cache.keys[1][1].any()  # the cancelled image's states are gone
    while len(finished) < 5:
        engine.step()
    for i in (0, 2, 3, 4):
        assert tokens[str(i)] == refs[i], cases[i].name
    assert engine.stats.extra_state_bytes == 0 and engine.stats.kv_bytes_used == 0


def test_image_sequences_preempted_and_recomputed_resume_exactly(kit) -> None:
    """Admission takes only the prompt's blocks (not prompt + max_tokens): image requests that outgrow
    one sequence's blocks together are preempted and recomputed, their image states written again
    from what the sequence kept and their outputs' rows given the prompt's last cross-mask row (as
    generate()'s decode steps have it); each gets the tokens and logprobs it gets with room for all."""
    from family_harness import one_sequence_budget

    cases = [image_case("red"), image_case("blue", 40, 120), image_case("green", 120, 40)]
    inputs = [kit.engine_inputs(case) for case in cases]
    params = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True, logprobs=True)

    def run_all(config: EngineConfig) -> tuple[LLMEngine, dict[str, list[int]], dict[str, list[float]]]:
        engine = LLMEngine(kit.hf_model, kit.tokenizer, config, kit.family)
        outputs: dict[str, list] = {}
        for i, (ids, mm) in enumerate(inputs):
            engine.add_request(
                str(i), ids, params, lambda out: outputs.setdefault(out.request_id, []).append(out), mm
            )
        steps = 0
        while sum(1 for outs in outputs.values() if outs[-1].finished) < len(inputs):
            engine.step()
            steps += 1
            assert steps < 3000
        assert all(outs[-1].error is None for outs in outputs.values())
        tokens = {rid: [t for o in outs for t in o.token_ids] for rid, outs in outputs.items()}
        logprobs = {
            rid: [e["logprob"] for o in outs for e in o.logprobs or []] for rid, outs in outputs.items()
        }
        return engine, tokens, logprobs

    _, want, want_logprobs = run_all(EngineConfig(max_model_len=256, prefix_cache_slots=0))
    budget = one_sequence_budget(kit.family, max_len=256, slots=4)
    tight = EngineConfig(max_model_len=256, max_num_seqs=4, kv_cache_memory=str(budget), prefix_cache_slots=0)
    engine, got, got_logprobs = run_all(tight)
    assert engine.stats.preemptions >= 1
    assert got == want
    for rid, logprobs in got_logprobs.items():
        torch.testing.assert_close(
            torch.tensor(logprobs), torch.tensor(want_logprobs[rid]), rtol=0, atol=1e-4
        )
    assert engine.stats.kv_bytes_used == 0


def test_images_change_the_logits(kit) -> None:
    engine = LLMEngine(kit.hf_model, kit.tokenizer, EngineConfig(max_model_len=256), kit.family)
    firsts = []
    for color in ("red", "blue"):
        ids, mm = kit.engine_inputs(image_case(color))
        engine.runner.cache.release(0)
        engine.runner.cache.grow(0, len(ids))
        seq_logits = engine.runner.prefill([_seq(engine, ids, mm)], 0)
        firsts.append(seq_logits[0])
    assert not torch.allclose(firsts[0], firsts[1])


def _seq(engine: LLMEngine, ids: list[int], mm: dict) -> object:
    from tritonvlm.engine.detokenizer import IncrementalDetokenizer
    from tritonvlm.engine.sequence import Sequence

    params = SamplingParams(max_tokens=1)
    return Sequence("x", ids, params, lambda o: None, IncrementalDetokenizer(engine.tokenizer, []), dict(mm))


# ---- memory: the tiny model and the real 11B's shape --------------------------------------------------


def test_kv_budget_counts_the_cross_states(kit) -> None:
    family = kit.family
    kv_heads, head_dim = family.kv_geometry()
    self_layers = len(family.layer_kinds()) - len(family.cross_layers)
    per_token = PagedKVCache.bytes_per_token(self_layers, kv_heads, head_dim, torch.float32)
    cross = family.states_per_image * per_state_bytes(family, torch.float32)
    assert (per_token, cross) == (1024, 69632)  # tiny, float32: 2 self layers; 2 cross layers x 68 states
    assert sequence_bytes(family, 512, torch.float32) == 512 * per_token + cross


def test_llama_3_2_11b_shape() -> None:
    """The real checkpoint's shape (config only, no weights): KV bytes per token and per sequence."""
    from transformers import MllamaConfig

    family = MllamaFamily(MllamaConfig(vision_config={"image_size": 560}, text_config={}))
    kinds = family.layer_kinds()
    assert [i for i, k in enumerate(kinds) if k.is_cross] == [3, 8, 13, 18, 23, 28, 33, 38]
    assert family.states_per_image == 4 * 1601 and kinds[3].states == 6404
    assert family.kv_geometry() == (8, 128)
    per_token = PagedKVCache.bytes_per_token(32, 8, 128, torch.bfloat16)
    assert per_token == 131072  # 128 KiB per token (32 self-attention layers)
    cross = family.states_per_image * per_state_bytes(family, torch.bfloat16)
    assert cross == 209_846_272  # 200.1 MiB of image keys/values per sequence
    assert sequence_bytes(family, 4096, torch.bfloat16) == 4096 * per_token + cross


def test_builds_are_deterministic(tmp_path, family_model_dir) -> None:
    import hashlib

    from tritonvlm.testmodels.mllama import build_test_model

    def digests(directory):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}

    assert digests(build_test_model(tmp_path / "again")) == digests(family_model_dir("mllama"))
