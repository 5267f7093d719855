"""Gemma 3 specifics, on its tiny test model (window 16; one image = 16 soft tokens): sliding-window layers
over prompts and generations longer than the window, the prefix cache keeping the rings, image tokens
attending to each other both ways at prefill, one BOS, the batched vision encoder, no final
soft-capping, and what the window ring saves."""

from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_image
from family_harness import Case, cases_for, conversation
from transformers import Gemma3Config
from transformers.models.gemma3.modeling_gemma3 import (
    create_masks_for_vision_model,
    get_block_sequence_ids_for_mask,
)

from tritonvlm.engine import EngineConfig, LLMEngine, SamplingParams
from tritonvlm.engine.engine_config import sequence_bytes
from tritonvlm.families.base import IMAGE_EMBEDS, Family, LayerKind
from tritonvlm.families.gemma3 import Gemma3Family
from tritonvlm.testmodels.gemma3 import SIZES

TINY = SIZES["tiny"]
WINDOW = TINY.sliding_window  # 16
SHORT_WINDOW = 5  # shorter than one image's run of soft tokens: the sliding mask cuts into it
NEW_TOKENS = 40
LONG_TEXT = " ".join(["The quick brown fox jumps over the lazy dog."] * 6)


@pytest.fixture(scope="module")
def kit(family_kit):
    return family_kit("gemma3")


def long_cases() -> list[Case]:
    """Prompts longer than the window (text, image + text, two images) and one shorter than it."""
    return [
        Case("long text", conversation(LONG_TEXT, 0)),
        Case("image and long text", conversation(LONG_TEXT, 1), [make_image(64, 48, "red")]),
        Case(
            "two images",
            conversation("Describe the first image, then the second.", 2),
            [make_image(56, 84, "blue", "square"), make_image(112, 56, "green")],
        ),
        Case("short", [{"role": "user", "content": "Hi"}]),
    ]


def with_text_config(kit, **overrides) -> torch.nn.Module:
    """The tiny model's weights under a text config with ``overrides`` (e.g. another window)."""
    config = copy.deepcopy(kit.hf_model.config)
    for key, value in overrides.items():
        setattr(config.text_config, key, value)
    return kit.family_cls.model_class.from_pretrained(str(kit.model_dir), config=config).eval()


@torch.inference_mode()
def generate(kit, model, case: Case, max_new_tokens: int) -> list[int]:
    inputs = kit.reference_inputs(case)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def run_staggered(engine: LLMEngine, requests: list[tuple[list[int], dict]], params: SamplingParams):
    """Requests joining the running batch one per step; ``{index: tokens}``."""
    tokens: dict[str, list[int]] = {}
    done: set[str] = set()

    def sink(out) -> None:
        tokens.setdefault(out.request_id, []).extend(out.token_ids)
        if out.finished:
            done.add(out.request_id)

    for i, (ids, mm) in enumerate(requests):
        engine.add_request(str(i), ids, params, sink, mm)
        engine.step()
    steps = 0
    while len(done) < len(requests):
        engine.step()
        steps += 1
        assert steps < 1000
    return [tokens[str(i)] for i in range(len(requests))]


@pytest.mark.parametrize("window", [WINDOW, SHORT_WINDOW])
def test_prompts_and_generations_longer_than_the_window_match_generate(kit, window):
    model = kit.hf_model if window == WINDOW else with_text_config(kit, sliding_window=window)
    family = kit.family_cls(model.config)
    engine = LLMEngine(model, kit.tokenizer, EngineConfig(max_model_len=256, max_num_seqs=4), family)
    cache = engine.runner.cache
    for kind, keys in zip(family.layer_kinds(), cache.keys, strict=True):
        if kind.is_sliding:  # sliding layers: a ring of the window per slot
            assert keys.shape == (4, cache.heads, window, cache.head_dim)
        else:  # full layers: blocks taken by use
            assert keys.shape == (cache.num_blocks + 1, cache.block_size, cache.heads, cache.head_dim)
    cases = long_cases()
    requests = [kit.engine_inputs(case) for case in cases]
    prompt_lens = {case.name: len(ids) for case, (ids, _) in zip(cases, requests, strict=True)}
    # The window is crossed in prefill by all but "short", which (at window 16) crosses it while decoding.
    assert all(n > window for name, n in prompt_lens.items() if name != "short")
    if window == WINDOW:
        assert prompt_lens["short"] < window
    got = run_staggered(engine, requests, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
    for case, tokens in zip(cases, got, strict=True):
        want = generate(kit, model, case, NEW_TOKENS)
        assert len(want) > window  # the generation alone is longer than the window
        assert tokens == want, case.name


def test_the_window_changes_the_answer(kit):
    """The parity above can fail: with the same weights, a window as long as the context answers otherwise."""
    case = long_cases()[0]
    wide = with_text_config(kit, sliding_window=4096)
    assert generate(kit, kit.hf_model, case, NEW_TOKENS) != generate(kit, wide, case, NEW_TOKENS)


def first_token_logprobs(kit, family: Family, case: Case) -> list[dict]:
    """The engine's top-20 log-probabilities of the first generated token, most likely first."""
    ids, mm = kit.engine_inputs(case)
    engine = LLMEngine(kit.hf_model, kit.tokenizer, EngineConfig(max_model_len=256), family)
    outputs = []
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=True, top_logprobs=20)
    engine.add_request("r", ids, params, outputs.append, mm)
    while not (outputs and outputs[-1].finished):
        engine.step()
    entry = next(e for o in outputs for e in (o.logprobs or []))
    return entry["top_logprobs"]


@torch.inference_mode()
def reference_logprobs(kit, model, case: Case) -> torch.Tensor:
    logits = model(**kit.reference_inputs(case)).logits[0, -1].float()
    return logits.log_softmax(-1)


def assert_logprobs_match(tops: list[dict], reference: torch.Tensor, atol: float = 1e-4) -> None:
    """The engine's top log-probabilities equal the reference's most likely ones."""
    want = reference.topk(len(tops)).values
    got = torch.tensor([top["logprob"] for top in tops])
    torch.testing.assert_close(got, want, rtol=0, atol=atol)


def run_one(engine: LLMEngine, case: Case, kit) -> tuple[list[int], int]:
    """``(tokens, cached prompt tokens)`` of ``case`` run alone to the end (greedy)."""
    ids, mm = kit.engine_inputs(case)
    outputs = []
    engine.add_request(
        case.name, ids, SamplingParams(max_tokens=NEW_TOKENS, temperature=0), outputs.append, mm
    )
    while not (outputs and outputs[-1].finished):
        engine.step()
    assert outputs[-1].error is None
    return [t for out in outputs for t in out.token_ids], outputs[-1].cached_tokens


def test_the_prefix_cache_keeps_the_rings_and_starts_only_where_they_can_continue(kit):
    """Prompts longer than the window (16): an entry keeps a copy of the sliding layers' rings at its
    end, so it serves a prompt only from where they can continue: the same prompt again from all but
    its last token (the prompt's entry, copied right after its prefill), the next turn of the
    conversation from the whole first turn (the finished sequence's entry), a prompt sharing only the
    image and the start of the question from nothing (the rings hold the other prompt's last 16
    positions). Each gets generate()'s tokens; clearing the cache gives every ring block back."""
    engine = LLMEngine(kit.hf_model, kit.tokenizer, EngineConfig(max_model_len=1024), kit.family)
    image = make_image(64, 48, "red")
    first = Case("first", conversation("What is in this image? Answer in one short sentence.", 1), [image])
    ids_first, _ = kit.engine_inputs(first)
    assert len(ids_first) > WINDOW
    tokens, cached = run_one(engine, first, kit)
    assert tokens == generate(kit, kit.hf_model, first, NEW_TOKENS) and cached == 0
    assert all(entry.ring for entry in engine.prefix_cache.entries)

    same = Case("same", first.messages, [image])
    tokens, cached = run_one(engine, same, kit)
    assert tokens == generate(kit, kit.hf_model, same, NEW_TOKENS) and cached == len(ids_first) - 1

    other = Case("other", conversation("What is in this image? Name its colour.", 1), [image])
    tokens, cached = run_one(engine, other, kit)
    assert tokens == generate(kit, kit.hf_model, other, NEW_TOKENS) and cached == 0

    answer = kit.tokenizer.decode(run_one(engine, first, kit)[0], skip_special_tokens=True)
    turn2 = Case(
        "turn2",
        [*first.messages, {"role": "assistant", "content": answer}, {"role": "user", "content": "Sure?"}],
        [image],
    )
    tokens, cached = run_one(engine, turn2, kit)
    assert tokens == generate(kit, kit.hf_model, turn2, NEW_TOKENS)
    assert cached >= len(ids_first) + NEW_TOKENS // 2  # (the first turn and most of its answer)

    cache = engine.runner.cache
    entries = engine.prefix_cache.entries
    rings = {block for entry in entries for block in entry.ring}
    assert rings and cache.allocator.used_blocks == len(rings | {b for e in entries for b in e.blocks})
    engine.prefix_cache.clear()
    assert cache.allocator.used_blocks == 0


def test_finished_prompts_own_entries_go_before_their_conversations(kit):
    """Past the window a prompt's own entry serves only that prompt again, its finished sequence's
    entry the next turn: under memory pressure the prompts' entries go first, even a newer one."""
    engine = LLMEngine(kit.hf_model, kit.tokenizer, EngineConfig(max_model_len=1024), kit.family)
    image = make_image(64, 48, "red")
    first = Case("first", conversation("What is in this image? Answer in one short sentence.", 1), [image])
    second = Case("second", conversation(LONG_TEXT, 0))
    (ids_first, _), (ids_second, _) = kit.engine_inputs(first), kit.engine_inputs(second)
    assert min(len(ids_first), len(ids_second)) > WINDOW
    tokens, _ = run_one(engine, first, kit)
    run_one(engine, second, kit)
    lengths = {len(ids_first), len(ids_second)}
    finished = {n + NEW_TOKENS - 1 for n in lengths}
    assert sorted(len(e.tokens) for e in engine.prefix_cache.entries) == sorted(lengths | finished)
    assert engine.prefix_cache.evict() and engine.prefix_cache.evict()  # (entries with rings go whole)
    assert {len(e.tokens) for e in engine.prefix_cache.entries} == finished
    answer = kit.tokenizer.decode(tokens, skip_special_tokens=True)
    turn2 = Case(
        "turn2",
        [*first.messages, {"role": "assistant", "content": answer}, {"role": "user", "content": "Sure?"}],
        [image],
    )
    tokens, cached = run_one(engine, turn2, kit)
    assert tokens == generate(kit, kit.hf_model, turn2, NEW_TOKENS) and cached >= len(ids_first)


def shared_start_cases() -> list[Case]:
    """Prompts sharing an image and a long text (past the window), then asking different questions:
    the first two branch after "Now", the third agrees with the second further, the fourth branches
    from them before "Now", the fifth agrees with the fourth a token further ("What")."""
    image = make_image(64, 48, "red")
    questions = [
        "Now name the colour of the image.",
        "Now describe the image.",
        "Now describe the image in one word.",
        "What shape is in the image?",
        "What colour is the image?",
    ]
    return [Case(f"q{n}", conversation(f"{LONG_TEXT} {q}", 1), [image]) for n, q in enumerate(questions)]


def agreement(a: list[int], b: list[int]) -> int:
    return next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)


def test_a_shared_start_longer_than_the_window_is_kept_where_prompts_branch(kit):
    """An entry's rings are of its end, so a prompt that leaves a cached one past the window (16) is
    served nothing; its prefill then stops where it leaves it and the cache keeps that start with the
    rings there: the next prompts branching there start from it. Each gets generate()'s tokens."""
    engine = LLMEngine(kit.hf_model, kit.tokenizer, EngineConfig(max_model_len=1024), kit.family)
    cases = shared_start_cases()
    ids = [kit.engine_inputs(case)[0] for case in cases]
    after_now, start = agreement(ids[0], ids[1]), agreement(ids[0], ids[3])
    assert WINDOW < start < after_now
    cached = []
    for case in cases:
        tokens, n = run_one(engine, case, kit)
        assert tokens == generate(kit, kit.hf_model, case, NEW_TOKENS), case.name
        cached.append(n)
    # q1 leaves q0 at after_now (kept there), q2 starts from that; q3 leaves them all at start (kept),
    # q4 starts from that (its one more token shared with q3 is not worth a branch of its own).
    assert cached == [0, 0, after_now, 0, start]
    lengths = sorted(len(entry.tokens) for entry in engine.prefix_cache.entries)
    assert lengths.count(after_now) == lengths.count(start) == 1


@pytest.mark.parametrize("scheduling", ["false", "true"])
def test_prompts_branching_past_the_window_while_others_decode_match_generate(kit, scheduling):
    """The same prompts arriving one a step while the earlier ones decode (prefills in chunks of 16,
    stops at branch points, and prompts waiting for them), with async scheduling off and on (a branch's
    ring copy is queued while a decode step is in flight): each gets generate()'s tokens."""
    config = EngineConfig(max_model_len=1024, prefill_chunk_tokens=16, async_scheduling=scheduling)
    engine = LLMEngine(kit.hf_model, kit.tokenizer, config, kit.family)
    assert engine.async_scheduling == (scheduling == "true")
    cases = shared_start_cases()
    requests = [kit.engine_inputs(case) for case in cases]
    got = run_staggered(engine, requests, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
    assert got == [generate(kit, kit.hf_model, case, NEW_TOKENS) for case in cases]
    assert engine.prefix_cache.hit_tokens > 0


def test_within_the_window_any_shared_start_is_served(kit):
    """A window longer than the prompts (the tiny weights, window 512): the rings hold every position,
    so a prompt sharing the image and the start of the question starts from the other's entry, and
    gets what generate() of that model gives."""
    wide = with_text_config(kit, sliding_window=512)
    engine = LLMEngine(wide, kit.tokenizer, EngineConfig(max_model_len=1024), kit.family_cls(wide.config))
    image = make_image(64, 48, "red")
    first = Case("first", conversation("What is in this image? Answer in one short sentence.", 1), [image])
    other = Case("other", conversation("What is in this image? Name its colour.", 1), [image])
    assert run_one(engine, first, kit)[0] == generate(kit, wide, first, NEW_TOKENS)
    tokens, cached = run_one(engine, other, kit)
    ids_first, ids_other = kit.engine_inputs(first)[0], kit.engine_inputs(other)[0]
    shared = next(i for i, (a, b) in enumerate(zip(ids_first, ids_other, strict=False)) if a != b)
    assert tokens == generate(kit, wide, other, NEW_TOKENS) and cached == shared


def test_image_tokens_attend_to_each_other_both_ways_at_prefill(kit):
    case = long_cases()[2]  # two images: two runs of soft tokens
    reference = reference_logprobs(kit, kit.hf_model, case)
    family = kit.family_cls(kit.hf_model.config)
    assert_logprobs_match(first_token_logprobs(kit, family, case), reference)
    # Without the family's mask (causal image tokens) the logits move: the hook is what makes them match.
    causal = kit.family_cls(kit.hf_model.config)
    causal.attention_mask = lambda masks, seqs, prefill: masks
    with pytest.raises(AssertionError):
        assert_logprobs_match(first_token_logprobs(kit, causal, case), reference, atol=1e-3)


@pytest.mark.parametrize("window", [2, 3, 16])
def test_prefill_masks_equal_transformers_image_masks(window):
    """The hook's prefill masks, over a right-padded row, equal transformers' own (``token_type_ids``
    path): full = causal OR same image; sliding = (causal OR same image) AND key > query - window."""
    config = Gemma3Config(
        text_config={
            "num_hidden_layers": 2,
            "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": window,
        },
        image_token_index=9,
    )
    config.text_config._attn_implementation = "sdpa"
    family = Gemma3Family(config)
    ids = [1, 9, 9, 9, 2, 9, 9, 3]  # two image runs: positions 1-3 and 5-6

    class Seq:
        prompt_ids = ids
        prefill_range = (0, len(ids))

    n = len(ids)
    length = n + 2  # right padding, as in a batch with a longer prompt
    cols = torch.arange(length)
    causal = (cols[None, :] <= cols[:, None]) & (cols[None, :] < n)
    near = cols[:, None] - cols[None, :] < window
    masks = {"full_attention": causal[None, None], "sliding_attention": (causal & near)[None, None]}
    got = family.attention_mask(masks, [Seq()], prefill=True)

    token_type_ids = (torch.tensor([ids]) == 9).long()
    want = create_masks_for_vision_model(
        config=config.text_config,
        inputs_embeds=torch.zeros(1, n, 4),
        attention_mask=torch.ones(1, n, dtype=torch.long),
        past_key_values=None,
        position_ids=torch.arange(n)[None],
        block_sequence_ids=get_block_sequence_ids_for_mask(token_type_ids),
    )
    for kind in ("full_attention", "sliding_attention"):
        assert torch.equal(got[kind][0, 0, :n, :n], want[kind][0, 0]), kind
        assert not got[kind][0, 0, :, n:].any()  # never the padding
    assert got["full_attention"][0, 0, 1, 3] and not got["full_attention"][0, 0, 1, 5]
    assert family.attention_mask(masks, [Seq()], prefill=False) is masks  # decode steps: causal only


def test_one_bos_and_image_tokens_per_image(kit):
    bos = kit.tokenizer.bos_token_id
    image_token = kit.family.image_token_id
    for case in cases_for("gemma3"):
        ids, mm = kit.engine_inputs(case)
        assert ids[0] == bos and ids.count(bos) == 1, case.name  # the template's BOS only
        assert ids.count(image_token) == TINY.mm_tokens_per_image * len(case.images)
        if case.images:
            assert mm[IMAGE_EMBEDS].shape == (ids.count(image_token), TINY.hidden_size)


def test_encoder_batches_requests_of_different_image_counts(kit):
    cases = [c for c in cases_for("gemma3") if c.images]
    mms = []
    for case in cases:
        processed = kit.preprocessor(case.messages, case.images)
        mms.append({k: torch.from_numpy(v) for k, v in processed.mm.items()})
    together = kit.family.encode(kit.hf_model, mms)
    for mm, batched in zip(mms, together, strict=True):
        alone = kit.family.encode(kit.hf_model, [mm])[0]
        torch.testing.assert_close(batched[IMAGE_EMBEDS], alone[IMAGE_EMBEDS], rtol=1e-4, atol=1e-5)
    # Different images give different embeddings (the projector is not left at zero).
    first_of_second = together[1][IMAGE_EMBEDS][: TINY.mm_tokens_per_image]
    assert not torch.allclose(together[0][IMAGE_EMBEDS], first_of_second)


def test_no_final_soft_capping_as_in_transformers(kit):
    """``Gemma3ForConditionalGeneration`` returns the LM head's logits even where the text config sets
    ``final_logit_softcapping``; the engine's log-probabilities follow it."""
    capped = with_text_config(kit, final_logit_softcapping=2.0)
    case = long_cases()[0]
    reference = reference_logprobs(kit, capped, case)
    torch.testing.assert_close(reference, reference_logprobs(kit, kit.hf_model, case))
    family = kit.family_cls(capped.config)
    assert family.final_logits(torch.tensor([100.0])).item() == 100.0
    assert_logprobs_match(first_token_logprobs(kit, family, case), reference)


def gemma3_4b_text_config() -> Gemma3Config:
    """google/gemma-3-4b-it's text shape (no weights): 34 layers, every 6th global, window 1024."""
    return Gemma3Config(
        text_config={
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "num_hidden_layers": 34,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "sliding_window": 1024,
        }
    )


def test_kv_bytes_per_sequence_count_the_window_ring(kit):
    kinds = kit.family.layer_kinds()
    assert kinds == [LayerKind("sliding", WINDOW)] * 2 + [LayerKind()] + [LayerKind("sliding", WINDOW)]
    per_column = 2 * TINY.num_key_value_heads * TINY.head_dim * 4  # keys + values, float32
    assert sequence_bytes(kit.family, 1024, torch.float32) == (1024 + 3 * WINDOW) * per_column

    family = Gemma3Family(gemma3_4b_text_config())
    kinds = family.layer_kinds()
    assert sum(k.is_sliding for k in kinds) == 29 and kinds[5] == LayerKind()
    per_column = 2 * 4 * 256 * 2  # 4 KiB per token per layer in bfloat16
    for context in (4096, 8192, 32768):
        ring = sequence_bytes(family, context, torch.bfloat16)
        assert ring == (5 * context + 29 * 1024) * per_column
        assert ring < 34 * context * per_column


def test_logprob_bytes_of_sentencepiece_pieces(kit):
    """Gemma's pieces are text with ``▁`` for spaces and ``<0xNN>`` byte-fallback pieces, not GPT-2 byte
    symbols: the bytes reported per token must still join to the text's UTF-8."""
    from tritonvlm.engine.logprobs import TokenTexts

    texts = TokenTexts(kit.tokenizer)
    assert not texts.byte_level
    text = "Les enfants, café crème brûlée 你好 🐱 Grüße"
    ids = kit.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any(kit.tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids)  # 🐱 falls back
    assert b"".join(bytes(texts(i)[1]) for i in ids) == text.encode()


def test_test_model_files_and_determinism(kit, tmp_path):
    """Laid out like google/gemma-3-4b-it (GemmaTokenizer, Gemma3Processor, the image-only Pil image
    processor without torchvision), and the same bytes from a fresh interpreter."""
    names = sorted(p.name for p in kit.model_dir.iterdir())
    assert names == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert type(kit.tokenizer).__name__ == "GemmaTokenizer"
    assert kit.tokenizer.image_token == "<image_soft_token>" and kit.tokenizer.boi_token == "<start_of_image>"
    assert kit.processor.image_seq_length == TINY.mm_tokens_per_image
    assert kit.hf_model.generation_config.eos_token_id == [
        kit.tokenizer.eos_token_id,
        kit.tokenizer.convert_tokens_to_ids("<end_of_turn>"),
    ]

    def digests(directory: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}

    out = tmp_path / "again"
    env = {**os.environ, "PYTHONHASHSEED": "4321"}
    code = "import sys; from tritonvlm.testmodels.gemma3 import build_test_model as b; b(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert digests(out) == digests(kit.model_dir)
