"""What is specific to the Qwen-VL families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): several requests' images
in one tower forward, prompts with and without images prefilled together, Qwen3-VL's DeepStack levels
reaching the decoder, and the test models' likeness to the real checkpoints."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import make_image
from family_harness import Case, cases_for

from tritonvlm.engine import EngineConfig, LLMEngine, SamplingParams
from tritonvlm.engine.sequence import Sequence
from tritonvlm.families.base import IMAGE_EMBEDS
from tritonvlm.families.qwen3_vl import DEEPSTACK, Qwen3VLFamily
from tritonvlm.wire import InvalidRequestError

QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
MAX_NEW = 8


def run_engine(kit, requests: list[tuple[list[int], dict]], max_new: int = MAX_NEW) -> list[list[int]]:
    """Greedy tokens of each request, all queued before the first step (so they prefill together: no
    prefix cache, which would leave a repeated prompt for the next step to start from the first)."""
    config = EngineConfig(max_model_len=1024, prefix_cache_slots=0)
    engine = LLMEngine(kit.hf_model, kit.tokenizer, config, kit.family)
    outputs: dict[str, list] = {}
    for i, (ids, mm) in enumerate(requests):
        params = SamplingParams(max_tokens=max_new, temperature=0.0)
        engine.add_request(str(i), ids, params, lambda o: outputs.setdefault(o.request_id, []).append(o), mm)
    steps = 0
    while not all(outputs.get(str(i)) and outputs[str(i)][-1].finished for i in range(len(requests))):
        engine.step()
        steps += 1
        assert steps < 200
    assert engine.stats.prefill_steps == 1, "the requests should have been prefilled in one batch"
    return [[t for o in outputs[str(i)] for t in o.token_ids] for i in range(len(requests))]


@pytest.mark.parametrize("name", QWEN)
def test_one_tower_forward_for_several_requests_equals_one_per_request(family_kit, name):
    """The vision encoder's dynamic batch: every request's images in one forward, split back exactly."""
    kit = family_kit(name)
    batch = []
    for case in cases_for(name):
        if case.images:
            processed = kit.preprocessor(case.messages, case.images)
            batch.append({k: torch.from_numpy(v) for k, v in processed.mm.items()})
    batch = batch + batch[::-1]  # requests of 1, 2, 2, 1 images
    together = kit.family.encode(kit.hf_model, batch)
    alone = [kit.family.encode(kit.hf_model, [mm])[0] for mm in batch]
    assert len(together) == len(batch)
    for joint, single in zip(together, alone, strict=True):
        assert joint.keys() == single.keys()
        for key in joint:
            torch.testing.assert_close(joint[key], single[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", QWEN)
def test_prompts_with_and_without_images_prefilled_together_match_generate(family_kit, name):
    """One prefill batch mixing text-only rows with rows of one and two images: M-RoPE positions per
    row and, for Qwen3-VL, DeepStack rows in batch order."""
    kit = family_kit(name)
    cases = cases_for(name)
    order = [cases[2], cases[0], cases[1], cases[3], cases[1]]  # two images, text, image, short, image
    requests = [kit.engine_inputs(case) for case in order]
    expected = {case.name: kit.reference_tokens(case, MAX_NEW) for case in cases}
    got = run_engine(kit, requests)
    assert got == [expected[case.name] for case in order]


@pytest.mark.parametrize("name", QWEN)
def test_images_in_several_turns(family_kit, name):
    """Images in the first and the third turn of a conversation: the prompt equals the processor's and
    the greedy answer generate()'s (M-RoPE positions continue across both images)."""
    kit = family_kit(name)
    images = [make_image(64, 96, "red"), make_image(96, 64, "blue", "square")]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image"}]},
    ]
    case = Case("two turns", messages, images)
    ids, mm = kit.engine_inputs(case)
    assert ids == kit.reference_inputs(case)["input_ids"][0].tolist()
    assert run_engine(kit, [(ids, mm)]) == [kit.reference_tokens(case, MAX_NEW)]


# ---- Qwen3-VL DeepStack ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3(family_kit):
    return family_kit("qwen3_vl")


def test_qwen3_vl_encoder_ships_every_deepstack_level(qwen3):
    levels = len(qwen3.hf_model.config.vision_config.deepstack_visual_indexes)
    assert levels == qwen3.family.deepstack_levels >= 2
    ids, mm = qwen3.engine_inputs(cases_for("qwen3_vl")[2])  # two images
    placeholders = sum(1 for t in ids if t == qwen3.family.image_token_id)
    assert mm[IMAGE_EMBEDS].shape[0] == placeholders
    for level in range(levels):
        rows = mm[DEEPSTACK.format(level)]
        assert rows.shape == mm[IMAGE_EMBEDS].shape
        assert not torch.equal(rows, mm[IMAGE_EMBEDS])


def test_qwen3_vl_prefill_kwargs_cover_the_padded_batch_in_row_order(qwen3):
    family = qwen3.family
    family.bind(qwen3.hf_model)
    cases = cases_for("qwen3_vl")
    inputs = [qwen3.engine_inputs(cases[i]) for i in (2, 0, 1)]  # two images, text, one image
    seqs = [Sequence(str(i), ids, SamplingParams(), print, None, mm) for i, (ids, mm) in enumerate(inputs)]
    length = max(s.prompt_len for s in seqs) + 5  # right padding, as with bucketed lengths
    kwargs = family.prefill_kwargs(seqs, length, torch.device("cpu"))
    mask = kwargs["visual_pos_masks"]
    assert mask.shape == (3, length) and mask.dtype == torch.bool
    for row, seq in enumerate(seqs):
        image_rows = torch.tensor(seq.prompt_ids) == family.image_token_id
        assert torch.equal(mask[row, : seq.prompt_len], image_rows)
        assert not mask[row, seq.prompt_len :].any()
    levels = kwargs["deepstack_visual_embeds"]
    assert len(levels) == family.deepstack_levels
    for k, level in enumerate(levels):
        key = DEEPSTACK.format(k)
        assert torch.equal(level, torch.cat([seqs[0].mm[key], seqs[2].mm[key]]))
    # A batch without images passes nothing: decode-like text rows take the plain path.
    assert family.prefill_kwargs([seqs[1]], length, torch.device("cpu")) == {}


def test_qwen3_vl_answers_depend_on_the_deepstack_levels(qwen3, monkeypatch):
    """generate() adds the DeepStack levels; an engine that dropped them would answer differently
    (so the parity tests of test_engine.py would catch a regression)."""
    cases = [c for c in cases_for("qwen3_vl") if c.images]
    requests = [qwen3.engine_inputs(case) for case in cases]
    expected = [qwen3.reference_tokens(case, MAX_NEW) for case in cases]
    assert run_engine(qwen3, requests) == expected
    monkeypatch.setattr(Qwen3VLFamily, "prefill_kwargs", lambda self, seqs, length, device: {})
    dropped = run_engine(qwen3, requests)
    assert all(d != e for d, e in zip(dropped, expected, strict=True)), dropped


def test_qwen3_vl_refuses_image_embeddings_without_their_deepstack_levels(qwen3):
    ids, mm = qwen3.engine_inputs(cases_for("qwen3_vl")[1])
    qwen3.family.validate(ids, mm)
    partial = {k: v for k, v in mm.items() if k != DEEPSTACK.format(1)}
    with pytest.raises(InvalidRequestError, match="deepstack level 1"):
        qwen3.family.validate(ids, partial)
    short = dict(mm, **{DEEPSTACK.format(0): mm[DEEPSTACK.format(0)][:-1]})
    with pytest.raises(InvalidRequestError, match="deepstack level 0"):
        qwen3.family.validate(ids, short)


def test_qwen3_vl_text_model_takes_a_tensor_mask_not_a_dict(qwen3):
    """Why ``mask_as_dict = False``: the text model's create_causal_mask reads the mask's ``ndim``."""
    lm = qwen3.family.language_model(qwen3.hf_model)
    embeds = torch.zeros(1, 3, qwen3.hf_model.config.text_config.hidden_size)
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool).tril()
    lm(inputs_embeds=embeds, attention_mask=mask)
    with pytest.raises(AttributeError):
        lm(inputs_embeds=embeds, attention_mask={"full_attention": mask})


# ---- the test models look like the real checkpoints --------------------------------------------------


def test_qwen3_vl_test_model_files(family_model_dir, qwen3):
    path = family_model_dir("qwen3_vl")
    template = (path / "chat_template.jinja").read_bytes()
    # Qwen/Qwen3-VL-8B-Instruct's chat template, byte for byte.
    assert hashlib.sha256(template).hexdigest() == (
        "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"
    )
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl"
    assert config["text_config"]["rope_parameters"]["mrope_interleaved"] is True
    pre = json.loads((path / "preprocessor_config.json").read_text())
    assert (pre["patch_size"], pre["merge_size"], pre["image_mean"]) == (16, 2, [0.5, 0.5, 0.5])
    tok = qwen3.tokenizer
    for token in ("<|image_pad|>", "<|vision_start|>", "<think>", "</tool_response>"):
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1
    # One image token per 32x32 pixels (patch 16, merge 2); no default system prompt.
    rendered = qwen3.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    )
    processed = qwen3.preprocessor(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
        [cases_for("qwen3_vl")[2].images[1]],  # 112x56 pixels
    )
    assert int((processed.input_ids == qwen3.family.image_token_id).sum()) == (128 // 32) * (64 // 32)


def test_qwen2_vl_test_model_files(family_model_dir, family_kit):
    kit = family_kit("qwen2_vl")
    config = json.loads((family_model_dir("qwen2_vl") / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl"
    assert config["vision_config"]["hidden_size"] == config["text_config"]["hidden_size"]
    vocab = kit.tokenizer.get_vocab()
    assert "<|video_pad|>" in vocab and "<tool_call>" not in vocab  # Qwen2-VL's 14 added tokens
    assert kit.tokenizer.convert_ids_to_tokens(len(vocab) - 1) == "<|video_pad|>"
    rendered = kit.processor.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
