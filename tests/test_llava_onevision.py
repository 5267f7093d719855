"""What is specific to LLaVA-OneVision: anyres token counts (the prompt's ``<image>`` tokens must equal
the tower's embeddings for every image size and aspect ratio, one image or several per prompt), the
cross-request encoder batching of different tile counts, the processor loaded without torchvision with
its own processor_config.json, and plain-string contents kept in the prompt."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from tritonvlm.families import family_for_model
from tritonvlm.families.base import IMAGE_EMBEDS, image_only_processor
from tritonvlm.families.llava_onevision import PIXELS, LlavaOnevisionFamily
from tritonvlm.testmodels.llava_onevision import CHAT_TEMPLATE, SIZES, build_test_model

NAME = "llava_onevision"
TINY = SIZES["tiny"]
# (width, height): square, landscape, portrait, extreme strips, tiny, one grid tile, the full 3x3 grid
# (whose features are interpolated down: anyres_max_4), odd sizes.
IMAGE_SIZES = [
    (32, 32),
    (64, 48),
    (48, 64),
    (112, 56),
    (56, 84),
    (300, 2),
    (2, 300),
    (1, 1),
    (200, 20),
    (96, 96),
    (640, 480),
    (97, 33),
]


@pytest.fixture(scope="module")
def kit(family_kit):
    return family_kit(NAME)


def conversation(num_images: int, text: str = "Describe.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}]


def picture(width: int, height: int, color: str = "red") -> Image.Image:
    return Image.new("RGB", (width, height), color)


def encoded(family, processor, model, images: list[Image.Image]) -> tuple[int, dict, torch.Tensor]:
    """Prompt placeholder count, the multimodal dict and the tower's embeddings for one prompt."""
    processed = family.process(processor, conversation(len(images)), images)
    mm = {k: torch.from_numpy(v) for k, v in processed.mm.items()}
    embeds = family.encode(model, [mm])[0][IMAGE_EMBEDS]
    return int((processed.input_ids == family.image_token_id).sum()), mm, embeds


# ---- the checkpoint's files --------------------------------------------------------------------------


def test_files_mimic_the_checkpoint(kit) -> None:
    config = json.loads((kit.model_dir / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(kit.model_dir)
    assert config["model_type"] == NAME and config["text_config"]["model_type"] == "qwen2"
    assert config["vision_config"]["model_type"] == "siglip_vision_model"
    assert config["image_token_index"] == tok.convert_tokens_to_ids("<image>")
    assert config["video_token_index"] == tok.convert_tokens_to_ids("<video>")
    assert tok.eos_token == "<|im_end|>" and tok.bos_token is None and len(tok) == TINY.vocab_size
    proc = json.loads((kit.model_dir / "processor_config.json").read_text())
    assert proc["num_image_tokens"] == TINY.tokens_per_tile
    pre = json.loads((kit.model_dir / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "LlavaOnevisionImageProcessor"  # the checkpoint's name
    assert pre["image_grid_pinpoints"] == config["image_grid_pinpoints"]
    assert family_for_model(str(kit.model_dir)).name == NAME


def test_processor_loads_without_torchvision_with_its_config(kit) -> None:
    processor = kit.processor
    assert isinstance(processor.image_processor, LlavaOnevisionImageProcessorPil)
    # The image-only subclass must keep what processor_config.json says (it used to drop these).
    assert processor.num_image_tokens == TINY.tokens_per_tile
    assert processor.vision_feature_select_strategy == "full"
    assert processor.vision_aspect_ratio == kit.hf_model.config.vision_aspect_ratio == "anyres_max_4"
    with pytest.raises(ValueError, match="videos are not supported"):
        processor(text=["<video>"], videos=[[picture(8, 8)]])


def test_chat_template_and_string_contents(kit) -> None:
    prompt = kit.family.render_prompt(kit.processor, conversation(2, "Compare."))
    assert prompt == "<|im_start|>user\n<image>\n<image>\nCompare.<|im_end|>\n<|im_start|>assistant\n"
    # The checkpoint's template renders only list contents: a plain string must not vanish.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    prompt = kit.family.render_prompt(kit.processor, messages)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "Hi there" not in kit.processor.apply_chat_template(messages, tokenize=False)


def test_builds_are_deterministic(kit, tmp_path: Path) -> None:
    def digests(directory: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}

    assert digests(build_test_model(tmp_path / "again")) == digests(kit.model_dir)


# ---- anyres token counts -----------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), IMAGE_SIZES)
def test_one_image_token_count_equals_tower_output(kit, width: int, height: int) -> None:
    placeholders, mm, embeds = encoded(kit.family, kit.processor, kit.hf_model, [picture(width, height)])
    assert embeds.shape == (placeholders, kit.hf_model.config.text_config.hidden_size)
    # Alone in its prompt the image is its base tile plus an anyres grid of tiles.
    assert mm[PIXELS].shape[0] == kit.family.tiles_per_image(mm["image_sizes"])[0] >= 2


def test_token_count_depends_on_size_and_aspect_ratio(kit) -> None:
    counts = {}
    for width, height in IMAGE_SIZES:
        processed = kit.family.process(kit.processor, conversation(1), [picture(width, height)])
        counts[width, height] = int((processed.input_ids == kit.family.image_token_id).sum())
    assert len(set(counts.values())) >= 6, counts
    assert counts[64, 48] != counts[48, 64]  # the aspect ratio matters, not just the area


@pytest.mark.parametrize(("width", "height"), [(64, 48), (2, 300), (96, 96)])
def test_embeddings_match_transformers_own_path(kit, width: int, height: int) -> None:
    """The family's unpadded tiles give what ``get_image_features`` gives on the processor's padded
    5-D pixel values."""
    _, _, embeds = encoded(kit.family, kit.processor, kit.hf_model, [picture(width, height)])
    ref = kit.processor(text=["<image>"], images=[[picture(width, height)]], return_tensors="pt")
    with torch.inference_mode():
        features = kit.hf_model.model.get_image_features(
            pixel_values=ref["pixel_values"],
            image_sizes=ref["image_sizes"],
            batch_num_images=ref["batch_num_images"],
        )
    assert torch.allclose(torch.cat(list(features.pooler_output)), embeds, atol=1e-6)


@pytest.mark.parametrize("num_images", [2, 3])
def test_several_images_per_prompt(kit, num_images: int) -> None:
    sizes = [(64, 48), (20, 200), (300, 300)][:num_images]
    images = [picture(w, h, c) for (w, h), c in zip(sizes, ("red", "green", "blue"), strict=False)]
    placeholders, mm, embeds = encoded(kit.family, kit.processor, kit.hf_model, images)
    # With other images in its prompt each image is its base tile alone plus one newline.
    assert mm[PIXELS].shape[0] == num_images
    assert placeholders == embeds.shape[0] == num_images * (TINY.tokens_per_tile + 1)


def test_real_checkpoint_anyres_geometry(kit) -> None:
    """The real checkpoints' anyres (384-pixel tiles of 27x27 patches, 36 grid layouts, anyres_max_9) on
    a tower a few units wide: the processor's count equals the tower's for several sizes, including one
    whose grid features are interpolated down."""
    tok = kit.tokenizer
    narrow = {"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1}
    config = LlavaOnevisionConfig(
        text_config={**narrow, "model_type": "qwen2", "vocab_size": len(tok), "num_key_value_heads": 1},
        vision_config={
            **narrow,
            "model_type": "siglip_vision_model",
            "image_size": 384,
            "patch_size": 14,
            "vision_use_head": False,
        },
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaOnevisionForConditionalGeneration(config).eval()
    processor = image_only_processor(LlavaOnevisionFamily.processor_class)(
        image_processor=LlavaOnevisionImageProcessorPil(),  # the checkpoint's 384 px, 36 layouts
        tokenizer=tok,
        chat_template=CHAT_TEMPLATE,
        num_image_tokens=729,
        vision_feature_select_strategy="full",
    )
    family = LlavaOnevisionFamily(config)
    counts = []
    for width, height in [(480, 640), (3000, 200), (1920, 1080)]:
        placeholders, _, embeds = encoded(family, processor, model, [picture(width, height)])
        assert embeds.shape[0] == placeholders
        counts.append(placeholders)
    assert counts == [2943, 2522, 7269]  # 729 base + un-padded grid + newlines (the last interpolated)
    placeholders, _, embeds = encoded(family, processor, model, [picture(480, 640), picture(99, 55)])
    assert placeholders == embeds.shape[0] == 2 * 730


# ---- the vision encoder's batching -------------------------------------------------------------------


def test_requests_with_different_tile_counts_encode_together(kit) -> None:
    """Requests of 10, 2, 4 and 1+1+1 tiles in one encode call give what each gives alone, whether they
    share one tower forward or are split into capped groups."""
    prompts = [
        [picture(300, 300)],
        [picture(32, 32, "blue")],
        [picture(200, 20, "green")],
        [picture(64, 48), picture(20, 200, "blue"), picture(50, 50, "green")],
    ]
    batch, alone = [], []
    for images in prompts:
        processed = kit.family.process(kit.processor, conversation(len(images)), images)
        mm = {k: torch.from_numpy(v) for k, v in processed.mm.items()}
        batch.append(mm)
        alone.append(kit.family.encode(kit.hf_model, [mm])[0][IMAGE_EMBEDS])
    assert [int(mm[PIXELS].shape[0]) for mm in batch] == [10, 2, 4, 3]

    family = LlavaOnevisionFamily(kit.hf_model.config)
    assert [len(g) for g in family.groups(batch)] == [4]  # 19 tiles: one forward
    together = family.encode(kit.hf_model, batch)
    family.max_tiles_per_forward = 6
    assert [len(g) for g in family.groups(batch)] == [1, 2, 1]  # 10 alone (never split), 2+4, 3
    capped = family.encode(kit.hf_model, batch)
    for one, both, split in zip(alone, together, capped, strict=True):
        assert torch.allclose(one, both[IMAGE_EMBEDS], atol=1e-5)
        assert torch.allclose(one, split[IMAGE_EMBEDS], atol=1e-5)
