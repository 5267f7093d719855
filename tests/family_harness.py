"""What the tests need to run the same checks on every model family: its tiny test model, the test
conversations (text only, one image, two images of different sizes where the family takes two), the
engine's inputs made the way the server makes them, and transformers' own answer to compare with."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from conftest import make_image
from PIL import Image

from tritonvlm.families import family_names, get_family
from tritonvlm.preprocessing import ChatPreprocessor

FAMILIES = family_names()


@dataclass
class Case:
    """One test conversation: OpenAI-style messages whose image parts are ``{"type": "image"}``."""

    name: str
    messages: list[dict[str, Any]]
    images: list[bytes] = field(default_factory=list)


def one_sequence_budget(
    family: Any, dtype: torch.dtype = torch.float32, max_len: int = 512, slots: int = 8
) -> int:
    """A KV budget in bytes: ``slots`` slots' fixed rows (sliding rings, cross states, the family's
    state) and the blocks of one ``max_len``-token sequence plus the pool's scratch block."""
    from tritonvlm.engine.kv_cache import DEFAULT_BLOCK_SIZE, PagedKVCache

    kinds, (heads, dim) = family.layer_kinds(), family.kv_geometry()
    per_slot = PagedKVCache.slot_bytes(kinds, heads, dim, max_len, dtype) + family.extra_state_bytes(dtype)
    per_block = PagedKVCache.bytes_per_block(kinds, heads, dim, dtype)
    return slots * per_slot + (max_len // DEFAULT_BLOCK_SIZE + 1) * per_block


def conversation(text: str, num_images: int) -> list[dict[str, Any]]:
    parts = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def cases_for(family_name: str) -> list[Case]:
    """Text only, one image, two images of different sizes (where the family takes two), a short one."""
    cases = [
        Case("text only", conversation("Tell me a story about a cat.", 0)),
        Case("one image", conversation("What is in this image?", 1), [make_image(64, 48, "red")]),
    ]
    limit = get_family(family_name).max_images_per_prompt
    if limit is None or limit >= 2:
        images = [make_image(56, 84, "blue", "square"), make_image(112, 56, "green")]
        cases.append(
            Case("two images", conversation("Describe the first image, then the second.", 2), images)
        )
    cases.append(Case("short", [{"role": "user", "content": "Hi"}]))
    return cases


class FamilyKit:
    """One family's tiny test model, loaded the ways the server and transformers load it."""

    def __init__(self, name: str, model_dir: Path) -> None:
        self.name = name
        self.model_dir = model_dir
        self.family_cls = get_family(name)

    @cached_property
    def hf_model(self) -> Any:
        return self.family_cls.load_model(str(self.model_dir))

    @cached_property
    def family(self) -> Any:
        return self.family_cls(self.hf_model.config)

    @cached_property
    def processor(self) -> Any:
        return self.family_cls.load_processor(str(self.model_dir))

    @cached_property
    def preprocessor(self) -> ChatPreprocessor:
        return ChatPreprocessor(self.family, self.processor)

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def engine_inputs(self, case: Case) -> tuple[list[int], dict[str, torch.Tensor]]:
        """Prompt ids and multimodal tensors, as preprocess + vision_encoder make them."""
        processed = self.preprocessor(case.messages, case.images)
        mm: dict[str, torch.Tensor] = {}
        if processed.mm:
            batch = [{k: torch.from_numpy(v) for k, v in processed.mm.items()}]
            mm = self.family.encode(self.hf_model, batch)[0]
        return processed.input_ids.tolist(), mm

    def reference_inputs(self, case: Case) -> dict[str, torch.Tensor]:
        """The model inputs as transformers' processor makes them from the chat (its own template path)."""
        images = iter(Image.open(io.BytesIO(b)).convert("RGB") for b in case.images)
        conv = []
        for msg in case.messages:
            content = msg["content"]
            if isinstance(content, str):
                # An OpenAI string content is one text part (templates that render only parts, like
                # LLaVA-OneVision's, would drop a string; for the others the two render alike).
                content = [{"type": "text", "text": content}]
            if isinstance(content, list):
                content = [
                    {"type": "image", "image": next(images)} if p["type"] == "image" else p for p in content
                ]
            conv.append({"role": msg["role"], "content": content})
        return self.processor.apply_chat_template(
            conv, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt"
        )

    @torch.inference_mode()
    def reference_tokens(self, case: Case, max_new_tokens: int) -> list[int]:
        """What ``generate()`` answers to the case alone (greedy)."""
        inputs = self.reference_inputs(case)
        out = self.hf_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, inputs["input_ids"].shape[1] :].tolist()
