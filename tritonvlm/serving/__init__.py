"""The parts of the `vlm` Triton model that are plain Python: request admission through the stateless
models, sending the engine's outputs, watching for cancelled clients, and engine metrics. Triton's
``pb_utils`` is passed in where needed, so all of it is testable without a Triton server."""
