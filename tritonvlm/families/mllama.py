"""Llama 3.2 Vision (``meta-llama/Llama-3.2-{11,90}B-Vision-Instruct``, ``model_type`` ``mllama``).

No placeholder merge: the prompt keeps one ``<|image|>`` token per image (an ordinary embedding row,
past the LM head's vocabulary) and the image reaches the text model only through the cross-attention
layers (``text_config.cross_attention_layers``), which attend over the image's projected vision
states. The image processor cuts an image into up to ``max_image_tiles`` tiles (an aspect-ratio id
names the arrangement) and pads to that many tiles, so every image gives ``tiles * (patches + 1)``
states (6404 for the 11B: 4 x 1601). A 0/1 mask over ``[prompt token, image, tile]`` from the processor
says which tiles each token sees (none before the image).

Where each part lives here:

- ``vision_encoder``: ``vision_model`` + ``multi_modal_projector`` → ``cross_attention_states``
  ``[images * tiles * patches, hidden]``, passed on with the processor's ``cross_attention_mask``;
  requests whose pixel tensors have the same shape (always, with one image padded to the same tiles)
  share one tower forward.
- decoder: the cross layers are ``cross`` layers of the slot KV cache, written at prefill and read at
  every step (``cache.layers[i].keys/values``); a text-only row holds no states (zeros in a mixed
  batch, which, with a zero mask and a zero row gate, leave its hidden state exactly unchanged, as
  ``generate()`` skipping those layers does). Every forward gets the additive cross-attention mask and
  ``full_text_row_masked_out_mask`` built as transformers builds them (rows that see no tile attend
  uniformly and have their MLP gated to zero); decode repeats the prompt's last row as ``generate()``
  does.

The real model takes one image per prompt (Meta: it "doesn't work reliably well with multiple
images"); more are refused with a 400. Its chat template refuses a system message together with an
image (a 400 too, as every template refusal). This depends on transformers' private Mllama
internals (checked on 5.23): ``tests/test_mllama.py`` pins the behaviour.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import MllamaForConditionalGeneration

from tritonvlm.families.base import FULL, Family, LayerKind
from tritonvlm.wire import InvalidRequestError

if TYPE_CHECKING:  # pragma: no cover
    from tritonvlm.engine.sequence import Sequence

STATES = "cross_attention_states"  # [images * tiles * patches, hidden]: projected vision states
MASK = "cross_attention_mask"  # int [prompt_len, images, tiles]: 1 where a prompt token sees a tile
# Set at prefill for the decode steps (the sequence's own mm dict): the prompt's last mask row.
_DECODE_MASK = "_cross_decode_mask"  # additive [states], the model's dtype and device
_DECODE_GATE = "_cross_decode_gate"  # 0-d: full_text_row_masked_out_mask of that row
PIXEL_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")


class MllamaFamily(Family):
    name = "mllama"
    model_types = ("mllama",)
    model_class = MllamaForConditionalGeneration
    processor_class = None  # AutoProcessor: MllamaProcessor + MllamaImageProcessorPil (no torchvision)
    checkpoints = (
        "meta-llama/Llama-3.2-11B-Vision-Instruct",
        "meta-llama/Llama-3.2-90B-Vision-Instruct",
    )
    max_images_per_prompt = 1
    mask_as_dict = False  # Mllama's text model takes a plain 4-D mask
    prompt_mm_tensors = (MASK,)  # the prompt's cross-attention mask: the same image in a later turn hits

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        vision = config.vision_config
        self.num_tiles = int(vision.max_num_tiles)
        self.patches_per_tile = (int(vision.image_size) // int(vision.patch_size)) ** 2 + 1
        self.states_per_image = self.num_tiles * self.patches_per_tile
        self.cross_layers = {int(i) for i in self.text_config.cross_attention_layers}
        self._dtype = torch.float32

    @classmethod
    def build_test_model(cls, out_dir: str, size: str = "tiny") -> Any:
        from tritonvlm.testmodels.mllama import build_test_model

        return build_test_model(out_dir, size=size)

    # ---- preprocessing ------------------------------------------------------------------------------
    def check_images(self, num_images: int) -> None:
        if num_images > self.max_images_per_prompt:
            raise InvalidRequestError(
                f"Llama 3.2 Vision (mllama) models take at most {self.max_images_per_prompt} image per "
                f"request (max_images_per_prompt); this request has {num_images}",
                "messages",
            )

    def multimodal_inputs(self, encoded: Any) -> dict[str, np.ndarray]:
        return {
            "pixel_values": np.asarray(encoded["pixel_values"], dtype=np.float32),
            "aspect_ratio_ids": np.asarray(encoded["aspect_ratio_ids"], dtype=np.int64),
            "aspect_ratio_mask": np.asarray(encoded["aspect_ratio_mask"], dtype=np.int64),
            MASK: np.asarray(encoded[MASK], dtype=np.int64)[0],
        }

    # ---- vision encoder -----------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, model: Any, batch: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Requests whose pixel tensors have the same shape (images x tiles x channels x tile size: all
        one-image requests) share one tower forward; each gets its states and its prompt mask."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, mm in enumerate(batch):
            groups.setdefault(tuple(mm["pixel_values"].shape[1:]), []).append(i)
        out: list[dict[str, torch.Tensor]] = [{} for _ in batch]
        for members in groups.values():
            inputs = [torch.cat([batch[i][key] for i in members]) for key in PIXEL_KEYS]
            states = self.vision_states(model, *inputs)  # [requests, images, tiles, patches, hidden]
            for row, i in enumerate(members):
                out[i] = {STATES: states[row].reshape(-1, states.shape[-1]), MASK: batch[i][MASK]}
        return out

    def vision_states(
        self, model: Any, pixels: torch.Tensor, ratio_ids: torch.Tensor, ratio_mask: torch.Tensor
    ) -> torch.Tensor:
        """``vision_model`` + ``multi_modal_projector``, as ``MllamaModel.forward`` runs them."""
        inner = model.model
        device = next(model.parameters()).device
        vision = inner.vision_model(
            pixel_values=self.to_model(model, pixels),
            aspect_ratio_ids=ratio_ids.to(device),
            aspect_ratio_mask=ratio_mask.to(device),
        )
        return inner.multi_modal_projector(vision.last_hidden_state)

    # ---- decoder ------------------------------------------------------------------------------------
    def bind(self, model: Any) -> None:
        self._dtype = next(model.parameters()).dtype

    def layer_kinds(self) -> list[LayerKind]:
        """Self-attention layers are full; cross-attention layers hold one prompt's image states."""
        cross = LayerKind("cross", states=self.max_images_per_prompt * self.states_per_image)
        n = int(self.text_config.num_hidden_layers)
        return [cross if i in self.cross_layers else FULL for i in range(n)]

    def cross_state_length(self, seq: Sequence) -> int:
        mask = seq.mm.get(MASK)
        return 0 if mask is None else int(mask.shape[1]) * self.states_per_image

    def validate(self, prompt_ids: list[int], mm: dict[str, torch.Tensor]) -> None:
        """One ``<|image|>`` token per image; the encoder's states and mask fit the prompt."""
        tokens = sum(1 for t in prompt_ids if t == self.image_token_id)
        mask, states = mm.get(MASK), mm.get(STATES)
        images = 0 if mask is None else int(mask.shape[1])
        if tokens != images:
            raise InvalidRequestError(
                f"the prompt has {tokens} <|image|> tokens but {images} images were given", "messages"
            )
        if not images:
            return
        self.check_images(images)
        hidden = int(self.text_config.hidden_size)
        if (
            mask.dim() != 3
            or tuple(mask.shape) != (len(prompt_ids), images, self.num_tiles)
            or states is None
            or tuple(states.shape) != (images * self.states_per_image, hidden)
        ):
            raise InvalidRequestError("the image inputs do not match the prompt", "messages")

    def cross_masks(self, mask01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' ``_prepare_cross_attention_mask`` for one prompt: ``[rows, images, tiles]``
        0/1 → the additive mask over the states ``[rows, states]`` (0: attend, the dtype's minimum: not;
        a row that sees no tile becomes all 0) and each row's gate (1 if it sees a tile, else 0)."""
        rows = mask01.shape[0]
        seen = mask01.repeat_interleave(self.patches_per_tile, dim=2).reshape(rows, -1)
        lowest = torch.finfo(self._dtype).min
        inverted = (1.0 - seen).to(self._dtype)
        additive = inverted.masked_fill(inverted.to(torch.bool), lowest)
        gate = (additive != lowest).any(dim=-1).to(self._dtype)
        # A fully masked row times 0 is 0 here (finite minimum, never -inf: -inf * 0 would be NaN).
        return additive * gate[:, None], gate

    def prefill_kwargs(self, seqs: list[Sequence], length: int, device: torch.device) -> dict[str, Any]:
        """The prompts' states (zeros for text-only rows), additive cross masks and row gates, for the
        rows each prefill computes (``seq.prefill_range``: after cached keys, a chunk). The states are
        written to the cache by every prefill of a prompt (a prefix-cache hit, a later chunk or a
        sequence recomputed after preemption needs them in its slot too: the sequence keeps them, as
        the other families keep their image embeddings). Rows past the prompt (a recomputed
        sequence's outputs) take the prompt's last mask row, as ``generate()``'s decode steps do."""
        widths = [self.cross_state_length(s) for s in seqs]
        width = max(widths)
        if width == 0:
            return {}  # no image in the batch: the text model skips its cross layers
        rows, hidden = len(seqs), int(self.text_config.hidden_size)
        states = torch.zeros(rows, width, hidden, dtype=self._dtype, device=device)
        mask = torch.zeros(rows, 1, length, width, dtype=self._dtype, device=device)
        gate = torch.zeros(rows, 1, length, 1, dtype=self._dtype, device=device)
        lowest = torch.finfo(self._dtype).min
        for i, (seq, n) in enumerate(zip(seqs, widths, strict=True)):
            if n == 0:
                continue
            start, end = seq.prefill_range
            states[i, :n] = seq.mm[STATES].to(device, self._dtype)
            additive, row_gate = self.cross_masks(seq.mm[MASK].to(device))
            prompt_rows = torch.arange(start, end, device=device).clamp_(max=seq.prompt_len - 1)
            mask[i, 0, : end - start, :n] = additive[prompt_rows]
            mask[i, 0, : end - start, n:] = lowest
            gate[i, 0, : end - start, 0] = row_gate[prompt_rows]
            if end >= seq.prefill_target:
                seq.mm[_DECODE_MASK], seq.mm[_DECODE_GATE] = additive[-1], row_gate[-1]
        return {
            "cross_attention_states": states,
            "cross_attention_mask": mask,
            "full_text_row_masked_out_mask": gate,
        }

    def decode_kwargs(self, seqs: list[Sequence], device: torch.device) -> dict[str, Any]:
        """Each row's prompt's last cross-mask row (``generate()`` repeats it for every new token);
        zeros for text-only rows, whose states in the cache are zero."""
        widths = [self.cross_state_length(s) for s in seqs]
        width = max(widths, default=0)
        if width == 0:
            return {}  # the cache's cross layers are empty: the text model skips them
        mask = torch.zeros(len(seqs), width, dtype=self._dtype, device=device)
        gate = torch.zeros(len(seqs), dtype=self._dtype, device=device)
        rows = [i for i, n in enumerate(widths) if n]
        # One copy for all image rows (a few kernels per step, not a few per row).
        index = torch.tensor(rows, device=device)
        gate[index] = torch.stack([seqs[i].mm[_DECODE_GATE] for i in rows])
        full = [i for i in rows if widths[i] == width]
        if full:
            mask[torch.tensor(full, device=device)] = torch.stack([seqs[i].mm[_DECODE_MASK] for i in full])
        for i in rows:
            if widths[i] < width:  # fewer states than the widest row: the rest weigh nothing
                mask[i, : widths[i]] = seqs[i].mm[_DECODE_MASK]
                mask[i, widths[i] :] = torch.finfo(self._dtype).min
        return {
            "cross_attention_mask": mask[:, None, None],
            "full_text_row_masked_out_mask": gate[:, None, None, None],
        }
