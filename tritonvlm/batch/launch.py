"""Start the Triton that an offline run uses, with the same model settings as ``tritonvlm serve``, and
open the frontend's request path in process around it."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tritonvlm.batch.inprocess import InProcessAPI

if TYPE_CHECKING:
    from tritonvlm.frontend.app import FrontendSettings
    from tritonvlm.launcher import TritonServer

log = logging.getLogger("tritonvlm.batch")


@dataclass
class TritonOptions:
    """What ``serve`` passes to the tritonserver it starts (``None``: the models' defaults)."""

    model: str | None = None
    log_level: str = "INFO"
    max_num_seqs: int | None = None
    max_model_len: int | None = None
    max_prefill_tokens: int | None = None
    prefill_chunk_tokens: int | None = None
    kv_cache_memory: str | None = None
    prefix_cache_slots: int | None = None
    cuda_graphs: str | None = None
    decode_attention: str | None = None
    fused_ops: str | None = None
    async_output: str | None = None
    async_scheduling: str | None = None
    image_cache_memory: str | None = None
    device: str | None = None
    dtype: str | None = None
    max_image_pixels: int | None = None
    model_repository: Path | None = None
    triton_host: str | None = None
    triton_http_port: int | None = None
    triton_grpc_port: int | None = None
    triton_metrics_port: int | None = None
    startup_timeout: float | None = None
    state_dir: Path | None = None


def default_max_num_seqs(device: str | None) -> int:
    """The engine's ``max_num_seqs`` when none is given, on the device it will run on (``--device``,
    ``auto``: CUDA when this machine has it): 256 on CUDA, 16 on CPU."""
    from tritonvlm.engine.engine_config import AUTO_MAX_NUM_SEQS
    from tritonvlm.modeling.device import resolve_device

    dev, _ = resolve_device(device or "auto")
    return AUTO_MAX_NUM_SEQS.get(dev.type, 16)


def resolve_model(model: str | None, served_model_name: str | None) -> tuple[str, str]:
    """(model path or id, served name) as ``serve`` picks them: no model is the built-in one."""
    from tritonvlm import cli

    if model is None:
        builtin = cli.default_model()
        return str(builtin), served_model_name or cli.default_model_name(builtin)
    return model, served_model_name or model


def start_triton(options: TritonOptions) -> TritonServer:
    """Start tritonserver on the project's model repository and wait until it is ready (stopped again
    if that fails). ``options.model`` must be resolved (see :func:`resolve_model`)."""
    from tritonvlm import cli
    from tritonvlm.launcher import TritonServer

    assert options.model is not None
    if cli.model_family(options.model) is None:  # an unsupported model_type (logged), as serve refuses it
        raise ValueError(f"{options.model} is not a model this server can serve")
    repository = options.model_repository or cli.DEFAULT_MODEL_REPOSITORY
    if not (repository / "vlm" / "config.pbtxt").exists():
        raise FileNotFoundError(f"no Triton model repository at {repository}")
    state = options.state_dir or cli.cache_dir() / "run" / str(os.getpid())
    state.mkdir(parents=True, exist_ok=True)
    triton = TritonServer(
        repository.resolve(),
        host=options.triton_host or cli.DEFAULT_TRITON_HOST,
        http_port=options.triton_http_port,
        grpc_port=options.triton_grpc_port,
        metrics_port=options.triton_metrics_port,
        state_dir=state,
        env=cli.triton_env(options, options.model),  # type: ignore[arg-type]  (reads the same attributes)
        startup_timeout=options.startup_timeout or cli.DEFAULT_STARTUP_TIMEOUT,
    )
    log.info("starting tritonserver (model %s; log: %s)", options.model, triton.log_file)
    try:
        triton.start()
        triton.wait_ready()
    except BaseException:
        triton.stop()
        raise
    log.info("tritonserver ready (grpc %s)", triton.grpc_url)
    return triton


def make_fetcher(settings: FrontendSettings) -> Any:
    """The media fetcher the frontend would build from ``settings``."""
    from tritonvlm.frontend.media import MediaFetcher

    return MediaFetcher(
        timeout_s=settings.media_fetch_timeout_s,
        max_bytes=settings.max_image_bytes,
        max_concurrency=settings.max_concurrent_media_fetches,
        allow_private=settings.allow_private_media_urls,
        max_pixels=settings.max_image_pixels,
        allowed_local_path=settings.allowed_local_media_path,
        allowed_domains=settings.allowed_media_domains,
    )


@contextlib.asynccontextmanager
async def open_api(settings: FrontendSettings) -> AsyncIterator[InProcessAPI]:
    """An :class:`InProcessAPI` with its own Triton client and media fetcher, closed on exit."""
    from tritonvlm.frontend.triton_client import TritonVLMClient

    client = TritonVLMClient(settings.triton_grpc_url)
    fetcher = make_fetcher(settings)
    api = InProcessAPI(settings, client, fetcher)
    try:
        yield api
    finally:
        await api.aclose()
        await fetcher.aclose()
        await client.close()
