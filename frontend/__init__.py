"""OpenAI-compatible HTTP frontend (FastAPI) in front of the Triton `vlm` pipeline model."""
