"""The offline Qwen2.5-VL test model (tritonvlm.testmodels.qwen2_5_vl) and the torchvision-free processor."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer

from tritonvlm.modeling.processor import (
    ImageOnlyQwen2_5_VLProcessor,
    has_torchvision,
    load_model,
    load_processor,
    register,
)
from tritonvlm.testmodels.qwen2_5_vl import MAX_PIXELS, MIN_PIXELS, SIZES, build_test_model

REPO_ROOT = Path(__file__).resolve().parent.parent
SYSTEM_DEFAULT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def user(text: str, num_images: int) -> list[dict]:
    parts = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def picture(width: int, height: int, color: str) -> Image.Image:
    return Image.new("RGB", (width, height), color)


# ---- the files ---------------------------------------------------------------------------------------


def test_layout(tiny_model_dir: Path) -> None:
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
    } <= names
    assert not any(name.startswith(".") for name in names)  # no temporary leftovers


def test_config_and_generation_config(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    text = config["text_config"]
    size = SIZES["tiny"]

    assert config["model_type"] == "qwen2_5_vl"
    assert text["vocab_size"] == size.vocab_size == len(tok)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
    assert config["vision_config"]["out_hidden_size"] == text["hidden_size"]

    ids = tok.convert_tokens_to_ids
    assert config["image_token_id"] == ids("<|image_pad|>")
    assert config["video_token_id"] == ids("<|video_pad|>")
    assert config["vision_start_token_id"] == ids("<|vision_start|>")
    assert config["vision_end_token_id"] == ids("<|vision_end|>")
    assert gen["eos_token_id"] == [ids("<|im_end|>"), ids("<|endoftext|>")]
    assert gen["pad_token_id"] == ids("<|endoftext|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_tiny_is_about_a_million_parameters(hf_model) -> None:
    params = sum(p.numel() for p in hf_model.parameters())
    assert 0.5e6 < params < 2e6


def test_deterministic_across_processes(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Same command, same bytes: a build in a fresh interpreter matches the session's build file by file."""
    out = tmp_path / "again"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    code = "import sys; from tritonvlm.testmodels.qwen2_5_vl import build_test_model as b; b(sys.argv[1])"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "[build-test-model]" in proc.stdout
    assert digests(out) == digests(tiny_model_dir)


def test_rebuild_in_place_keeps_bytes_and_other_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    (out / "NOTES.txt").write_text("mine")
    (out / "config.json").write_text("{}")
    assert build_test_model(out) == out.resolve()
    assert (out / "NOTES.txt").read_text() == "mine"
    expected = digests(tiny_model_dir)
    assert {k: v for k, v in digests(out).items() if k != "NOTES.txt"} == expected


def test_unknown_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown test model size"):
        build_test_model(tmp_path / "x", size="huge")
    assert not (tmp_path / "x").exists()


# ---- the tokenizer -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.",
        "héllo wörld 你好",
        "  leading spaces, trailing tabs\t\n\nand numbers 3.14159 and 2024",
        "emoji 🙂 and Привет, мир! こんにちは",
        'code: def f(x):\n    return {"a": [1, 2]}',
    ],
)
def test_tokenizer_round_trip(processor, text: str) -> None:
    tok = processor.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert max(ids) < len(tok)


def test_special_tokens_are_single_tokens(processor) -> None:
    tok = processor.tokenizer
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>"):
        ids = tok.encode(f"a{token}b", add_special_tokens=False)
        assert tok.convert_tokens_to_ids(token) in ids
    assert tok.decode(tok.encode("<|im_start|>user\nhi<|im_end|>"), skip_special_tokens=True) == "user\nhi"


def test_english_compresses(processor) -> None:
    text = "What is in this picture? There is a red circle in the middle of a white square."
    assert len(processor.tokenizer.encode(text)) < len(text) / 2.5


# ---- the processor -------------------------------------------------------------------------------------


def test_processor_is_image_only(processor, tiny_model_dir: Path) -> None:
    assert isinstance(processor, ImageOnlyQwen2_5_VLProcessor)
    assert type(processor.image_processor).__name__.startswith("Qwen2VLImageProcessor")
    if not has_torchvision():
        assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert not hasattr(processor, "video_processor")
    ip = processor.image_processor
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (14, 2, 2)
    assert (ip.size["shortest_edge"], ip.size["longest_edge"]) == (MIN_PIXELS, MAX_PIXELS)


def test_register_is_idempotent_and_autoprocessor_uses_it(tiny_model_dir: Path) -> None:
    register()
    register()
    assert isinstance(AutoProcessor.from_pretrained(tiny_model_dir), ImageOnlyQwen2_5_VLProcessor)


def test_chat_template(processor) -> None:
    prompt = processor.apply_chat_template(
        user("What is this?", 1), tokenize=False, add_generation_prompt=True
    )
    assert prompt == (
        f"{SYSTEM_DEFAULT}<|im_start|>user\n{PLACEHOLDER}What is this?<|im_end|>\n<|im_start|>assistant\n"
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "image"}, {"type": "image"}]},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "C"},
    ]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\nA{PLACEHOLDER}{PLACEHOLDER}<|im_end|>\n"
        "<|im_start|>assistant\nB<|im_end|>\n"
        "<|im_start|>user\nC<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # The tokenizer carries the same template.
    tok_prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok_prompt == prompt


@pytest.mark.parametrize("return_tensors", ["pt", "np"])
def test_processor_outputs(processor, return_tensors: str) -> None:
    images = [picture(200, 150, "red"), picture(60, 300, "blue")]
    prompt = processor.apply_chat_template(user("Compare.", 2), tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=images, return_tensors=return_tensors)
    assert {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"} <= set(inputs.keys())
    grid = torch.as_tensor(inputs["image_grid_thw"])
    input_ids = torch.as_tensor(inputs["input_ids"])
    assert grid.shape == (2, 3)
    assert torch.as_tensor(inputs["pixel_values"]).shape == (int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    num_pads = int((input_ids == processor.image_token_id).sum())
    assert num_pads == int(grid.prod(-1).sum()) // 4
    if "mm_token_type_ids" in inputs:
        mm = torch.as_tensor(inputs["mm_token_type_ids"])
        assert int((mm != 0).sum()) == num_pads


def test_text_only_call(processor) -> None:
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    inputs = processor(text=[prompt], return_tensors="pt")
    assert "pixel_values" not in inputs
    assert processor.tokenizer.decode(inputs["input_ids"][0]) == prompt


@pytest.mark.parametrize(
    ("width", "height", "tokens"),
    [(4000, 3000, None), (10, 10, 4), (56, 56, 4), (448, 448, 256), (1000, 20, None), (30, 2000, None)],
)
def test_image_pixel_limits(processor, width: int, height: int, tokens: int | None) -> None:
    """Every image becomes 56*56 to 448*448 pixels: 4 to 256 ``<|image_pad|>`` tokens."""
    prompt = processor.apply_chat_template(user("?", 1), tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[picture(width, height, "green")], return_tensors="pt")
    _, h, w = inputs["image_grid_thw"][0].tolist()
    assert MIN_PIXELS <= h * w * 14 * 14 <= MAX_PIXELS
    assert 4 <= h * w // 4 <= 256
    if tokens is not None:
        assert h * w // 4 == tokens


def test_videos_are_refused(processor) -> None:
    with pytest.raises(ValueError, match="videos"):
        processor(text=["x"], videos=[[picture(56, 56, "red")]], return_tensors="pt")


def test_fallback_for_checkpoints_naming_qwen2_5_vl_processor(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Qwen's own checkpoints name Qwen2_5_VLProcessor (which needs torchvision) and keep the chat
    template in chat_template.json; load_processor still gives a working processor."""
    ckpt = tmp_path / "qwen-like"
    shutil.copytree(tiny_model_dir, ckpt)
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    pre.update({"processor_class": "Qwen2_5_VLProcessor", "min_pixels": 3136, "max_pixels": 12845056})
    pre.pop("size")
    (ckpt / "preprocessor_config.json").write_text(json.dumps(pre))
    template = (ckpt / "chat_template.jinja").read_text()
    (ckpt / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    (ckpt / "chat_template.jinja").unlink()

    proc = load_processor(str(ckpt))
    if not has_torchvision():
        assert isinstance(proc, ImageOnlyQwen2_5_VLProcessor)
    assert proc.image_processor.size["longest_edge"] == 12845056
    prompt = proc.apply_chat_template(user("?", 1), tokenize=False, add_generation_prompt=True)
    assert PLACEHOLDER in prompt
    inputs = proc(text=[prompt], images=[picture(1000, 800, "red")], return_tensors="pt")
    assert (
        int((inputs["input_ids"] == proc.image_token_id).sum()) == int(inputs["image_grid_thw"].prod()) // 4
    )


# ---- the model -----------------------------------------------------------------------------------------


def test_load_model(hf_model, tiny_model_dir: Path) -> None:
    assert not hf_model.training
    assert hf_model.dtype == torch.float32
    assert hf_model.device.type == "cpu"
    half = load_model(str(tiny_model_dir), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and not half.training


@pytest.mark.parametrize(
    "images",
    [
        [(200, 150, "red")],
        [(64, 48, "blue"), (300, 500, "green")],
    ],
    ids=["one image", "two images of different sizes"],
)
def test_generate(hf_model, processor, images: list[tuple[int, int, str]]) -> None:
    pil = [picture(*spec) for spec in images]
    prompt = processor.apply_chat_template(
        user("Describe the images.", len(pil)), tokenize=False, add_generation_prompt=True
    )
    inputs = processor(text=[prompt], images=pil, return_tensors="pt")
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == int(
        inputs["image_grid_thw"].prod(-1).sum() // 4
    )
    with torch.inference_mode():
        out = hf_model.generate(**inputs, max_new_tokens=8, do_sample=False)
        again = hf_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    new = out[0, prompt_len:]
    assert 1 <= new.numel() <= 8
    assert int(new.max()) < len(processor.tokenizer)
    assert torch.equal(out, again)  # greedy is deterministic
    assert isinstance(processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)[0], str)


def test_generate_text_only(hf_model, processor) -> None:
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": "Tell me a story."}], tokenize=False, add_generation_prompt=True
    )
    inputs = processor(text=[prompt], return_tensors="pt")
    with torch.inference_mode():
        out = hf_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
