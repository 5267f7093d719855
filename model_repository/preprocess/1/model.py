"""Triton adapter: conversation + image bytes or their layout (or a raw prompt) -> INPUT_IDS, MM_INPUTS
(packed), IMAGE_LAYOUT (tritonvlm.serving.preprocess_io)."""

import logging

import triton_python_backend_utils as pb_utils

from tritonvlm import wire
from tritonvlm.preprocessing import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_PROMPT_CHARS, ChatPreprocessor
from tritonvlm.serving.preprocess_io import preprocess_outputs
from tritonvlm.triton_utils import model_parameters, resolve_model_path, setup_stub_process

log = logging.getLogger("tritonvlm.preprocess")
INPUTS = (wire.MESSAGES, wire.PROMPT, wire.IMAGES, wire.TOOLS, wire.CACHED_LAYOUT)


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
            inputs = {name: pb_utils.get_input_tensor_by_name(request, name) for name in INPUTS}
            outputs = preprocess_outputs(
                self.preprocessor, {k: v.as_numpy() for k, v in inputs.items() if v is not None}
            )
        except wire.InvalidRequestError as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(exc.to_wire()))
        except Exception as exc:
            log.exception("preprocess failed")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"preprocess failed: {exc}"))
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(name, value) for name, value in outputs.items()]
        )
