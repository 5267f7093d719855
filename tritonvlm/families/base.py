"""The model-family seam: everything the server knows about one family of vision-language models.

The engine, scheduler, KV cache, Triton models, wire format and frontend are family-agnostic; they call
the hooks of a :class:`Family` and nothing else. One module per family subclasses it and overrides only
what differs from the defaults here (vLLM's multimodal interface in spirit):

- **loading**: the model class, a torchvision-free processor (:func:`image_only_processor`);
- **preprocessing** (the ``preprocess`` model, CPU, no weights): conversation + PIL images → prompt ids
  and a dict of multimodal tensors (:meth:`Family.process`), with the family's chat template;
- **vision** (the ``vision_encoder`` model): the multimodal tensors of several requests → per request,
  the image embeddings in prompt order plus anything else the decoder needs (:meth:`Family.encode`);
- **decoder** (the engine): the prompt's input embeddings with the images merged at the placeholder
  positions (:meth:`Family.prompt_embeds`), positions (1-D, or 3-D M-RoPE:
  :meth:`Family.prompt_positions`), the kinds of attention layers (full, sliding window) that decide
  the KV layout and masks, the mask format the text model accepts (:meth:`Family.attention_mask`),
  and extra forward arguments (:meth:`Family.prefill_kwargs`, :meth:`Family.decode_kwargs`).

Multimodal tensors travel between the Triton models as one packed dict per request
(:func:`tritonvlm.wire.pack_tensors`): their keys are the family's business.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from tritonvlm.tool_format import QWEN_TOOL_CALLS, ToolCallFormat
from tritonvlm.wire import InvalidRequestError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from tritonvlm.engine.sequence import Sequence

log = logging.getLogger(__name__)

# Keys of the multimodal dict that the engine itself reads.
IMAGE_EMBEDS = "image_embeds"  # [num_image_tokens, hidden]: merged at the placeholder positions


@dataclass(frozen=True)
class LayerKind:
    """How one decoder layer attends: ``full`` (all previous tokens), ``sliding`` (the last ``window``
    tokens, the query included) or ``cross`` (a fixed set of encoder states, e.g. image states, that a
    sequence writes at prefill and reads at every step). Sliding layers keep only ``window`` keys per
    sequence; cross layers keep at most ``states`` keys per sequence whatever its length."""

    kind: str = "full"
    window: int | None = None
    states: int | None = None  # cross: the most encoder states one sequence holds

    @property
    def is_sliding(self) -> bool:
        return self.kind == "sliding"

    @property
    def is_cross(self) -> bool:
        return self.kind == "cross"

    @property
    def is_full(self) -> bool:
        return self.kind == "full"


FULL = LayerKind()


@dataclass
class ProcessedPrompt:
    """What the preprocess model produces for one request."""

    input_ids: np.ndarray  # int64 [prompt_len]
    mm: dict[str, np.ndarray]  # the family's multimodal tensors (empty without images)
    num_images: int = 0
    layout: bytes | None = None  # the images as the processor saw them (tritonvlm.image_layout)


def has_torchvision() -> bool:
    """Whether torchvision can be imported (many processors' video halves need it)."""
    return importlib.util.find_spec("torchvision") is not None


@cache
def image_only_processor(processor_cls: type) -> type:
    """A subclass of ``processor_cls`` that takes only an image processor and a tokenizer.

    transformers' VLM processors that also handle video want a video processor, and those need
    torchvision. ``from_pretrained`` loads the components named in ``__init__``'s signature, so a
    subclass whose ``__init__`` has no ``video_processor`` loads without it; calls, chat templates and
    outputs are the parent's. Videos are refused.
    """
    skip = {"self", "video_processor", "args", "kwargs"}
    init_params = [p for p in inspect.signature(processor_cls.__init__).parameters if p not in skip]

    class ImageOnly(processor_cls):  # type: ignore[misc, valid-type]
        def __init__(
            self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any
        ) -> None:
            super().__init__(
                image_processor=image_processor,
                tokenizer=tokenizer,
                video_processor=None,
                chat_template=chat_template,
                **kwargs,
            )

        @classmethod
        def validate_init_kwargs(cls, processor_config: dict, valid_kwargs: Any) -> Any:
            # from_pretrained passes on only the processor_config.json keys that __init__ names
            # positionally; this __init__ names three, so also accept the parent's own (LLaVA-OneVision's
            # num_image_tokens, vision_feature_select_strategy, ...), which reach it through **kwargs.
            return super().validate_init_kwargs(processor_config, [*valid_kwargs, *init_params])

        def __call__(self, images: Any = None, text: Any = None, videos: Any = None, **kwargs: Any) -> Any:
            if videos is not None:
                raise ValueError(f"{type(self).__name__} handles text and images; videos are not supported")
            return super().__call__(images=images, text=text, **kwargs)

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"ImageOnly{processor_cls.__name__}"
    return ImageOnly


class Family:
    """The defaults: a LLaVA-style model (placeholder merge, 1-D positions, full attention)."""

    # ---- identity -----------------------------------------------------------------------------------
    name: ClassVar[str] = ""  # the --family name, e.g. "qwen2_5_vl"
    model_types: ClassVar[tuple[str, ...]] = ()  # config.json model_type values served by this family
    model_class: ClassVar[Any] = None  # the transformers *ForConditionalGeneration class
    processor_class: ClassVar[Any] = None  # the transformers processor class (loaded image-only)
    checkpoints: ClassVar[tuple[str, ...]] = ()  # real checkpoint ids, for the docs and errors
    max_images_per_prompt: ClassVar[int | None] = None  # None: no limit of the family's own
    position_dims: ClassVar[int] = 1  # 1: [batch, len] positions; 3: M-RoPE [3, batch, len]
    mask_as_dict: ClassVar[bool] = True  # text model takes {"full_attention": m, ...}; else a tensor
    tool_format: ClassVar[ToolCallFormat] = QWEN_TOOL_CALLS  # how the family writes tool calls
    # Multimodal tensors that depend on the prompt, not the images (the vision encoder passes them
    # through): the image cache keys on the others and takes these from each request.
    prompt_mm_tensors: ClassVar[tuple[str, ...]] = ()
    # Whether the processor's image processor handles each image on its own: its output for several
    # images is each image's output alone, concatenated along the first axis, and ``split_images``
    # gives one part per image. An image file seen before then skips decoding and preprocessing
    # whatever images come with it (tritonvlm.image_layout); otherwise only with the same set.
    per_image_preprocessing: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        self.config = config
        self.text_config = config.get_text_config()
        self.image_token_id = self._image_token_id(config)

    @staticmethod
    def _image_token_id(config: Any) -> int | None:
        for attr in ("image_token_id", "image_token_index"):
            value = getattr(config, attr, None)
            if value is not None:
                return int(value)
        return None

    # ---- loading ------------------------------------------------------------------------------------
    @classmethod
    def load_processor(cls, path_or_id: str, **kwargs: Any) -> Any:
        """The processor, torchvision-free: ``AutoProcessor`` where that works, else the image-only
        subclass of the family's processor class on the same files."""
        from transformers import AutoProcessor

        if cls.processor_class is None:
            return AutoProcessor.from_pretrained(path_or_id, **kwargs)
        if has_torchvision():
            return cls.processor_class.from_pretrained(path_or_id, **kwargs)
        return image_only_processor(cls.processor_class).from_pretrained(path_or_id, **kwargs)

    @classmethod
    def load_model(cls, path_or_id: str, device: str | torch.device = "cpu", dtype: Any = None) -> Any:
        """``model_class.from_pretrained(path_or_id)`` on ``device`` in eval mode (``dtype=None``: the
        checkpoint's own)."""
        model = cls.model_class.from_pretrained(path_or_id, dtype="auto" if dtype is None else dtype)
        return model.to(device).eval()

    @classmethod
    def build_test_model(cls, out_dir: str, size: str = "tiny") -> Any:
        """Write a random-weight checkpoint of this family (``tiny`` or ``medium``); see testmodels."""
        raise NotImplementedError(f"no test model builder for {cls.name}")

    # ---- preprocessing (no weights) -----------------------------------------------------------------
    def render_prompt(
        self,
        processor: Any,
        conversation: list[dict[str, Any]],
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The prompt text of a conversation (images as ``{"type": "image"}`` parts); ``template_kwargs``
        go to the chat template (``tools``)."""
        return processor.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
        )

    def check_images(self, num_images: int) -> None:
        """Refuse more images than the family handles in one prompt."""
        limit = self.max_images_per_prompt
        if limit is not None and num_images > limit:
            raise InvalidRequestError(
                f"{self.name} models take at most {limit} image{'s' if limit > 1 else ''} per request; "
                f"this request has {num_images}",
                "messages",
            )

    def process(
        self,
        processor: Any,
        conversation: list[dict[str, Any]],
        images: list[Image.Image],
        template_kwargs: dict[str, Any] | None = None,
    ) -> ProcessedPrompt:
        """Chat template + processor: prompt ids and the family's multimodal tensors."""
        self.check_images(len(images))
        prompt = self.render_prompt(processor, conversation, template_kwargs)
        return self.process_text(processor, prompt, images)

    def process_text(self, processor: Any, prompt: str, images: list[Image.Image]) -> ProcessedPrompt:
        """Run the processor on a rendered prompt. A template that already starts with the BOS token
        must not get a second one from the tokenizer."""
        bos = getattr(processor.tokenizer, "bos_token", None)
        add_special = not (bos and prompt.startswith(bos))
        encoded = processor(
            text=[prompt], images=images or None, return_tensors="np", add_special_tokens=add_special
        )
        ids = np.asarray(encoded["input_ids"][0], dtype=np.int64)
        mm = self.multimodal_inputs(encoded) if images else {}
        return ProcessedPrompt(input_ids=ids, mm=mm, num_images=len(images))

    def multimodal_inputs(self, encoded: Any) -> dict[str, np.ndarray]:
        """The processor outputs the vision encoder and decoder need (default: ``pixel_values``)."""
        return {"pixel_values": np.asarray(encoded["pixel_values"], dtype=np.float32)}

    def encode_raw_prompt(self, processor: Any, prompt: str) -> ProcessedPrompt:
        """A raw text prompt (``/v1/completions``): tokenized as is, with the tokenizer's own special
        tokens (BOS where the model has one), no template, no images."""
        ids = processor.tokenizer(prompt)["input_ids"]
        return ProcessedPrompt(input_ids=np.asarray(ids, dtype=np.int64), mm={})

    # ---- vision encoder -----------------------------------------------------------------------------
    def strip_for_vision(self, model: Any) -> Any:
        """Drop the language model's weights from a model loaded only to encode images."""
        inner = model.model
        for attr in ("language_model", "text_model"):
            if getattr(inner, attr, None) is not None:
                setattr(inner, attr, None)
        model.lm_head = None
        return model

    @torch.inference_mode()
    def encode(self, model: Any, batch: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Image embeddings for each request of ``batch`` (its multimodal dict), in prompt order:
        ``[{IMAGE_EMBEDS: [num_image_tokens, hidden], ...}]``. Default: one tower forward per request."""
        return [self.encode_one(model, mm) for mm in batch]

    def encode_one(self, model: Any, mm: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One request's image embeddings (default: ``model.model.get_image_features(pixel_values)``)."""
        features = model.model.get_image_features(pixel_values=self.to_model(model, mm["pixel_values"]))
        return {IMAGE_EMBEDS: self.flatten_features(features)}

    @staticmethod
    def to_model(model: Any, tensor: torch.Tensor) -> torch.Tensor:
        """A float input on the model's device and dtype."""
        param = next(model.parameters())
        return tensor.to(param.device, param.dtype)

    @staticmethod
    def flatten_features(features: Any) -> torch.Tensor:
        """``get_image_features`` output (a tensor, a tuple/list per image, or a model output whose
        ``pooler_output`` is either) → one ``[tokens, hidden]`` tensor."""
        features = getattr(features, "pooler_output", features)
        if isinstance(features, tuple | list):
            features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
        return features.reshape(-1, features.shape[-1])

    # ---- per-image cache entries ----------------------------------------------------------------------
    def split_images(self, inputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]] | None:
        """One request's encoder input (``multimodal_inputs``) as one input per image, in prompt order,
        where each image's embeddings depend on its own input alone (an image may also be a crop or a
        tile the encoder takes on its own). The image cache then keeps each image apart, and a prefix
        match runs up to the first image that differs. None (the default): the family cannot split
        them, and a request's images are kept, and matched, as one set."""
        return None

    def image_tokens(self, image: dict[str, np.ndarray]) -> int:
        """The number of placeholder tokens (and ``IMAGE_EMBEDS`` rows) of one image from
        :meth:`split_images` (families that split must say)."""
        raise NotImplementedError

    def join_images(self, parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Several images' encoder inputs (or their encoder outputs) as one request's: each tensor
        concatenated along its first axis, in order."""
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def split_encoded(
        self, encoded: dict[str, np.ndarray], images: list[dict[str, np.ndarray]]
    ) -> list[dict[str, np.ndarray]]:
        """The encoder output of the joined ``images`` back per image: a tensor with a row per image
        token is split by each image's :meth:`image_tokens`, one with a row per image row by row."""
        tokens = [self.image_tokens(image) for image in images]
        out: list[dict[str, np.ndarray]] = [{} for _ in images]
        for name, array in encoded.items():
            if array.shape[0] == sum(tokens):
                bounds = np.cumsum(tokens)[:-1]
            elif array.shape[0] == len(images):
                bounds = np.arange(1, len(images))
            else:
                raise ValueError(f"encoder output {name} {array.shape} splits by neither token nor image")
            for part, rows in zip(out, np.split(array, bounds), strict=True):
                part[name] = rows
        return out

    # ---- decoder ------------------------------------------------------------------------------------
    def bind(self, model: Any) -> None:
        """Called once by the engine with the loaded model: keep whatever the decoder hooks need."""

    def strip_for_decoder(self, model: Any) -> Any:
        """Drop the vision tower from a model loaded to decode (images arrive as embeddings)."""
        inner = model.model
        for attr in ("visual", "vision_tower", "vision_model", "multi_modal_projector"):
            if getattr(inner, attr, None) is not None:
                setattr(inner, attr, None)
        return model

    def norm_style(self, module: torch.nn.Module) -> str | None:
        """How :mod:`tritonvlm.engine.fused_norm` may compute ``module`` of the language model in one
        kernel: "llama" (transformers' Llama-style RMSNorm: ``weight * normalised.to(input dtype)``),
        "gemma" (``(normalised * (1 + weight)).to(input dtype)``), or None (leave it alone). By default
        the modules named ``...RMSNorm`` with a ``variance_epsilon`` and a weight vector are Llama's."""
        weight = getattr(module, "weight", None)
        llama = type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
        return "llama" if llama and isinstance(weight, torch.Tensor) and weight.dim() == 1 else None

    def language_model(self, model: Any) -> torch.nn.Module:
        return model.model.language_model

    def embed_tokens(self, model: Any) -> torch.nn.Module:
        return model.model.get_input_embeddings()

    def lm_head(self, model: Any) -> torch.nn.Module:
        return model.lm_head

    def layer_kinds(self) -> list[LayerKind]:
        """The attention kind of each decoder layer (``text_config.layer_types`` where present)."""
        cfg = self.text_config
        n = int(cfg.num_hidden_layers)
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * n
        window = getattr(cfg, "sliding_window", None)
        kinds = []
        for layer_type in types:
            if layer_type == "sliding_attention" and window:
                kinds.append(LayerKind("sliding", int(window)))
            else:
                kinds.append(FULL)
        return kinds

    def kv_geometry(self) -> tuple[int, int]:
        """``(num_kv_heads, head_dim)`` of the self-attention layers."""
        cfg = self.text_config
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        return kv_heads, head_dim

    def extra_state_bytes(self, dtype: torch.dtype) -> int:
        """Memory one sequence needs besides its keys/values (counted in the KV budget). The keys/values
        of ``cross`` layers are not extra: the KV cache holds and counts them."""
        return 0

    @property
    def supports_prefix_cache(self) -> bool:
        """Whether a prompt may start from another sequence's cached keys/values (and sliding layers'
        rings; cross layers' states are written again by the prefill from the request's own images).
        The family must honour ``seq.prefill_range`` (see :attr:`supports_chunked_prefill`)."""
        return True

    @property
    def supports_chunked_prefill(self) -> bool:
        """Whether a long prompt may be prefilled a chunk per step, each chunk after the keys its slot
        holds (a sliding layer's ring holds the window the next chunk attends to; cross layers' states
        are written by every chunk). A family whose ``attention_mask`` or ``prefill_kwargs`` assume a
        prefill of the whole prompt from position 0 must honour ``seq.prefill_range`` (the prompt
        tokens a prefill computes) or say False; one whose prompt tokens attend to later ones sets
        where chunks end (:meth:`chunk_end`)."""
        return True

    def chunk_end(self, seq: Sequence, end: int) -> int:
        """Where a chunk of ``seq``'s prompt that would end before token ``end`` ends instead (a chunk
        must not split tokens that attend to each other both ways)."""
        return end

    def cross_state_length(self, seq: Sequence) -> int:
        """How many encoder states ``seq`` keeps in each ``cross`` layer (0: none, e.g. a text-only
        prompt); at most the layers' ``states``."""
        return 0

    def validate(self, prompt_ids: list[int], mm: dict[str, torch.Tensor]) -> None:
        """Refuse engine inputs whose images do not match the prompt's placeholders."""
        if self.image_token_id is None:
            return
        placeholders = sum(1 for t in prompt_ids if t == self.image_token_id)
        embeds = mm.get(IMAGE_EMBEDS)
        n_embeds = 0 if embeds is None else int(embeds.shape[0])
        if placeholders != n_embeds:
            raise InvalidRequestError(
                f"the prompt has {placeholders} image placeholder tokens but {n_embeds} image embeddings "
                "were given",
                "messages",
            )

    def prompt_embeds(self, seq: Sequence, embed: torch.nn.Module, device: torch.device) -> torch.Tensor:
        """Token embeddings of a prompt with the image embeddings at its placeholder positions."""
        ids = torch.tensor(seq.prompt_ids, device=device)
        embeds = embed(ids)
        image_embeds = seq.mm.get(IMAGE_EMBEDS)
        if image_embeds is not None and image_embeds.numel():
            embeds[ids == self.image_token_id] = image_embeds.to(device, embeds.dtype)
        return embeds

    def prompt_positions(self, seq: Sequence, device: torch.device) -> tuple[torch.Tensor, int]:
        """Positions of the prompt, ``[position_dims, prompt_len]``, and the next token's position."""
        n = seq.prompt_len
        return torch.arange(n, device=device).expand(self.position_dims, n), n

    def attention_mask(self, masks: dict[str, torch.Tensor], seqs: list[Sequence], prefill: bool) -> Any:
        """What the text model gets as ``attention_mask``. ``masks`` maps ``"full_attention"`` (and
        ``"sliding_attention"`` when the model has sliding layers) to boolean ``[rows, 1, query, key]``
        masks in the KV cache's column layout."""
        return masks if self.mask_as_dict else masks["full_attention"]

    def final_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's own post-processing of the LM head's output (``final_logit_softcapping``)."""
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def prefill_kwargs(self, seqs: list[Sequence], length: int, device: torch.device) -> dict[str, Any]:
        """Extra keyword arguments of the prefill forward (prompts right-padded to ``length``)."""
        return {}

    def decode_kwargs(self, seqs: list[Sequence], device: torch.device) -> dict[str, Any]:
        """Extra keyword arguments of the text model's decode forward."""
        return {}
