"""A bfloat16 model through the whole real pipeline on the CPU (`--dtype bfloat16`): the image
embeddings travel from `vision_encoder` to `vlm` and sit in the image cache as bfloat16 (half the
bytes of float32), and the greedy answers are those of the same model's ``generate()`` in bfloat16."""

from __future__ import annotations

import pytest
import torch
from conftest import ServerProcess, serving
from family_harness import cases_for
from test_e2e import metric
from test_families_e2e import openai_messages

from tritonvlm.packing import to_numpy

pytestmark = pytest.mark.e2e

FAMILY = "qwen2_5_vl"
MAX_NEW = 16


@pytest.fixture(scope="module")
def bf16(family_kit):
    """The family's tiny test model in bfloat16 on the CPU, and the kit."""
    kit = family_kit(FAMILY)
    return kit, kit.family_cls.load_model(str(kit.model_dir), device="cpu", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def bf16_server(bf16, tmp_path_factory):
    kit, _ = bf16
    proc = ServerProcess(kit.model_dir, tmp_path_factory.mktemp("serve-bf16"), extra=("--dtype", "bfloat16"))
    for server in serving(proc, clean_unload=False):
        import openai

        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", timeout=120, max_retries=0)
        yield server, client


@torch.inference_mode()
def reference(kit, model, case) -> str:
    inputs = dict(kit.reference_inputs(case))
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    return kit.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_image_embeddings_travel_and_are_cached_as_bfloat16(bf16, bf16_server):
    """The first request's image is the cache's only entry: its bytes are the bfloat16 encoder output's."""
    kit, model = bf16
    server, client = bf16_server
    case = next(c for c in cases_for(FAMILY) if len(c.images) == 1)
    response = client.chat.completions.create(
        model="tiny", messages=openai_messages(case), temperature=0, max_tokens=MAX_NEW
    )
    assert response.choices[0].message.content == reference(kit, model, case)
    processed = kit.preprocessor(case.messages, case.images)
    family = kit.family_cls(model.config)
    encoded = family.encode(model, [{k: torch.from_numpy(v) for k, v in processed.mm.items()}])[0]
    arrays = {name: to_numpy(tensor) for name, tensor in encoded.items()}
    assert any(a.dtype.name == "bfloat16" for a in arrays.values())
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert metric(server, "tritonvlm_image_cache_bytes", state="used") == sum(
        a.nbytes for a in arrays.values()
    )


def test_greedy_answers_are_generates_in_bfloat16(bf16, bf16_server):
    """Text-only, one-image and two-image prompts, twice each (the second time from the image cache)."""
    kit, model = bf16
    _, client = bf16_server
    for case in cases_for(FAMILY) * 2:
        response = client.chat.completions.create(
            model="tiny", messages=openai_messages(case), temperature=0, max_tokens=MAX_NEW
        )
        assert response.choices[0].message.content == reference(kit, model, case), case.name
