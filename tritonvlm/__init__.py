"""tritonvlm: an OpenAI-compatible vision chat API whose model runs inside NVIDIA Triton."""

__version__ = "0.1.0"
