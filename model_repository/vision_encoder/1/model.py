"""Triton adapter: MM_INPUTS -> MM_EMBEDS (packed tensor dicts), one family encode per batch of requests."""

import logging

import triton_python_backend_utils as pb_utils

from tritonvlm import wire
from tritonvlm.families import family_for_model
from tritonvlm.modeling.device import resolve_device
from tritonvlm.packing import to_numpy, to_torch
from tritonvlm.triton_utils import model_parameters, resolve_model_path, setup_stub_process

log = logging.getLogger("tritonvlm.vision_encoder")


class TritonPythonModel:
    def initialize(self, args):
        setup_stub_process()
        params = model_parameters(args)
        path = resolve_model_path(args)
        device, dtype = resolve_device(params.get("device", "auto"), params.get("dtype", "auto"))
        self.family = family_for_model(path)
        # Only the vision tower is used here: let the language model's weights go.
        self.model = self.family.strip_for_vision(
            self.family.load_model(path, device=str(device), dtype=dtype)
        )
        log.info("vision encoder ready (%s) on %s (%s)", self.family.name, device, dtype)

    def execute(self, requests):
        try:
            batch = []
            for request in requests:
                packed = pb_utils.get_input_tensor_by_name(request, wire.MM_INPUTS).as_numpy()
                batch.append({k: to_torch(v) for k, v in wire.unpack_tensors(packed).items()})
            results = self.family.encode(self.model, batch)
        except Exception as exc:
            log.exception("vision encoder failed")
            error = pb_utils.TritonError(f"vision encoder failed: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses = []
        for result in results:
            # (in the model's dtype: a bfloat16 model's embeddings travel as bfloat16)
            packed = wire.pack_array({k: to_numpy(v) for k, v in result.items()})
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(wire.MM_EMBEDS, packed[None])]))
        return responses
