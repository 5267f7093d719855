"""Triton adapter: conversation + image bytes (or a raw prompt) -> INPUT_IDS, MM_INPUTS (packed)."""

import logging

import numpy as np
import triton_python_backend_utils as pb_utils

from tritonvlm import wire
from tritonvlm.preprocessing import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_PROMPT_CHARS, ChatPreprocessor
from tritonvlm.triton_utils import (
    first_bytes,
    model_parameters,
    parse_json_input,
    resolve_model_path,
    setup_stub_process,
)

log = logging.getLogger("tritonvlm.preprocess")


class TritonPythonModel:
    def initialize(self, args):
        setup_stub_process()
        params = model_parameters(args)
        self.preprocessor = ChatPreprocessor.from_pretrained(
            resolve_model_path(args),
            max_image_pixels=int(params.get("max_image_pixels") or 0) or DEFAULT_MAX_IMAGE_PIXELS,
            max_prompt_chars=int(params.get("max_prompt_chars") or 0) or DEFAULT_MAX_PROMPT_CHARS,
        )
        log.info("preprocess ready (%s)", self.preprocessor.family.name)

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        try:
            prompt = pb_utils.get_input_tensor_by_name(request, wire.PROMPT)
            images_t = pb_utils.get_input_tensor_by_name(request, wire.IMAGES)
            images = [bytes(x) for x in images_t.as_numpy().reshape(-1)] if images_t is not None else []
            if prompt is not None:
                if images:
                    raise wire.InvalidRequestError("a raw PROMPT cannot carry images", "images")
                text = first_bytes(prompt.as_numpy()).decode("utf-8", "replace")
                out = self.preprocessor.encode_prompt(text)
            else:
                messages_t = pb_utils.get_input_tensor_by_name(request, wire.MESSAGES)
                if messages_t is None:
                    raise wire.InvalidRequestError("one of MESSAGES or PROMPT is required", "messages")
                tools_t = pb_utils.get_input_tensor_by_name(request, wire.TOOLS)
                tools = parse_json_input(tools_t.as_numpy(), None) if tools_t is not None else None
                out = self.preprocessor(parse_json_input(messages_t.as_numpy(), None), images, tools)
        except wire.InvalidRequestError as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(exc.to_wire()))
        except Exception as exc:
            log.exception("preprocess failed")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"preprocess failed: {exc}"))
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(wire.INPUT_IDS, np.asarray(out.input_ids, dtype=np.int64)),
                pb_utils.Tensor(wire.MM_INPUTS, wire.pack_array(out.mm)),
            ]
        )
