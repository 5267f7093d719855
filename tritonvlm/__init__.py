"""tritonvlm: an OpenAI-compatible vision chat API whose model runs inside NVIDIA Triton."""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``from tritonvlm import Engine`` (the offline API, :mod:`tritonvlm.offline`), imported lazily: the
    Triton models import ``tritonvlm`` and must not pay for it."""
    if name in ("Engine", "RequestFailed"):
        from tritonvlm import offline

        return getattr(offline, name)
    raise AttributeError(f"module 'tritonvlm' has no attribute {name!r}")
