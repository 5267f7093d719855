"""Triton adapter: PIXEL_VALUES + IMAGE_GRID_THW -> IMAGE_EMBEDS, one tower forward per batch of requests."""

import logging

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from tritonvlm import wire
from tritonvlm.modeling.device import resolve_device
from tritonvlm.modeling.processor import load_model
from tritonvlm.modeling.vision import encode_images, tokens_per_image, vision_tower
from tritonvlm.triton_utils import model_parameters, resolve_model_path, setup_stub_process

log = logging.getLogger("tritonvlm.vision_encoder")


class TritonPythonModel:
    def initialize(self, args):
        setup_stub_process()
        params = model_parameters(args)
        device, dtype = resolve_device(params.get("device", "auto"), params.get("dtype", "auto"))
        model = load_model(resolve_model_path(args), device=str(device), dtype=dtype)
        self.visual = vision_tower(model)
        self.merge = int(model.config.vision_config.spatial_merge_size)
        # Only the vision tower is used here: let the language model's weights go.
        model.model.language_model = None
        model.lm_head = None
        log.info("vision encoder ready on %s (%s)", device, dtype)

    def execute(self, requests):
        pixels, grids = [], []
        for request in requests:
            pixels.append(pb_utils.get_input_tensor_by_name(request, wire.PIXEL_VALUES).as_numpy()[0])
            grids.append(pb_utils.get_input_tensor_by_name(request, wire.IMAGE_GRID_THW).as_numpy()[0])
        try:
            grid_all = torch.from_numpy(np.concatenate(grids)).long()
            embeds = encode_images(self.visual, torch.from_numpy(np.concatenate(pixels)), grid_all)
            embeds = embeds.float().cpu().numpy()
        except Exception as exc:
            log.exception("vision encoder failed")
            error = pb_utils.TritonError(f"vision encoder failed: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses, start = [], 0
        for grid in grids:
            n = sum(tokens_per_image(torch.from_numpy(grid), self.merge))
            responses.append(
                pb_utils.InferenceResponse(
                    [pb_utils.Tensor(wire.IMAGE_EMBEDS, embeds[None, start : start + n])]
                )
            )
            start += n
        return responses
