"""The `tritonvlm` command: `serve` (Triton + the OpenAI frontend), `run-batch` (an OpenAI Batch file
offline) and `build-test-model`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
import urllib.parse
from pathlib import Path

log = logging.getLogger("tritonvlm")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "model_repository"
# The built-in model: the shapes demo trained by scripts/train_demo_model.py, committed in the checkout.
DEMO_MODEL_DIR = REPO_ROOT / "models" / "tritonvlm-shapes-demo"
DEFAULT_MODEL_NAME = "tritonvlm-shapes-demo"
FALLBACK_MODEL_NAME = "tritonvlm-tiny-random"


def cache_dir() -> Path:
    """Where built models and server state live ($TRITONVLM_CACHE, default ~/.cache/tritonvlm)."""
    return Path(os.environ.get("TRITONVLM_CACHE", Path.home() / ".cache" / "tritonvlm")).expanduser()


def default_model() -> Path:
    """The built-in model: the shapes demo model of the checkout (a tiny Qwen2.5-VL trained on
    synthetic pictures of shapes); without it (an install without ``models/``), the tiny random-weight
    test model, built once and cached."""
    if (DEMO_MODEL_DIR / "config.json").exists() and (DEMO_MODEL_DIR / "model.safetensors").exists():
        return DEMO_MODEL_DIR
    from tritonvlm.modeling.testmodel import build_test_model

    target = cache_dir() / "models" / FALLBACK_MODEL_NAME
    log.warning("no demo model at %s: serving the tiny random-weight test model instead", DEMO_MODEL_DIR)
    if not (target / "config.json").exists():
        log.info("building the tiny test model into %s (once)", target)
        build_test_model(target, size="tiny")
    return target


def default_model_name(model_dir: Path) -> str:
    """The name clients send for the built-in model."""
    return DEFAULT_MODEL_NAME if model_dir == DEMO_MODEL_DIR else FALLBACK_MODEL_NAME


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_TRITON_HOST = "127.0.0.1"
DEFAULT_STARTUP_TIMEOUT = 300.0
# --max-prompt-chars defaults to this many characters per token of --max-model-len: ordinary text runs
# about 4 characters per token, so any prompt that fits the context fits this bound.
PROMPT_CHARS_PER_TOKEN = 32
# serve flags that only configure the tritonserver `serve` starts (and its models): unused with
# --triton-url. All default to None, so that a given one can be reported as ignored.
# The model and engine settings `serve` hands to the Triton models (TRITONVLM_<KEY> variables).
ENGINE_SETTINGS = (
    "max_num_seqs",
    "max_model_len",
    "max_prefill_tokens",
    "prefill_chunk_tokens",
    "kv_cache_memory",
    "prefix_cache_slots",
    "cuda_graphs",
    "decode_attention",
    "fused_ops",
    "async_output",
    "async_scheduling",
    "image_cache_memory",
    "device",
    "dtype",
)
TRITON_LAUNCH_FLAGS = (
    "model_repository",
    "triton_host",
    "triton_http_port",
    "triton_grpc_port",
    "triton_metrics_port",
    "startup_timeout",
    "state_dir",
    *ENGINE_SETTINGS,
)


def triton_address(value: str) -> str:
    """``HOST:PORT`` of a Triton gRPC endpoint (``grpc://`` accepted, IPv6 as ``[::1]:8001``)."""
    target = value.strip().removeprefix("grpc://").rstrip("/")
    try:
        parts = urllib.parse.urlsplit("//" + target)
        port = parts.port
    except ValueError:
        port = None
        parts = None
    if parts is None or not parts.hostname or port is None or parts.path or parts.username:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT (e.g. triton:8001, 127.0.0.1:8001)")
    return target


def image_cache_size(value: str) -> str:
    """``--image-cache-memory``: checked here, passed on as given (the vlm model parses it again)."""
    from tritonvlm.serving.image_cache import parse_cache_memory

    try:
        parse_cache_memory(value, 0)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    from tritonvlm.batch.cli import add_run_batch_parser, add_serve_batch_flags

    parser = argparse.ArgumentParser(prog="tritonvlm", description=__doc__)
    log_level = {
        "type": str.upper,
        "choices": LOG_LEVELS,
        "metavar": "LEVEL",
        "help": "log level of tritonvlm, the frontend, uvicorn and the Triton models: DEBUG, INFO, "
        "WARNING, ERROR or CRITICAL (default: $TRITONVLM_LOG_LEVEL, else INFO)",
    }
    parser.add_argument("--log-level", default=os.environ.get("TRITONVLM_LOG_LEVEL", "INFO"), **log_level)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="start tritonserver and the OpenAI-compatible frontend",
        description="Start tritonserver with the project's models, wait until it is ready, then serve the "
        "OpenAI-compatible API until Ctrl-C or SIGTERM (in-flight requests get --shutdown-timeout "
        "seconds to finish, then tritonserver is stopped). With --triton-url, only the frontend runs, "
        "in front of a Triton started elsewhere.",
    )
    api = serve.add_argument_group("OpenAI API (the frontend)")
    api.add_argument(
        "--host", metavar="HOST", default="127.0.0.1", help="address the API listens on (default 127.0.0.1)"
    )
    api.add_argument(
        "--port", metavar="PORT", type=int, default=8000, help="port the API listens on (default 8000)"
    )
    api.add_argument(
        "--served-model-name", metavar="NAME", help="the model name clients send (default: the --model value)"
    )
    api.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("TRITONVLM_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $TRITONVLM_API_KEY; unset: open). "
        "/health and /metrics stay open",
    )
    api.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on Ctrl-C/SIGTERM, stop accepting connections and let in-flight requests (streams "
        "included) finish for up to this long, then cancel the rest (default 30)",
    )
    # Also accepted after `serve` (`tritonvlm serve --log-level DEBUG`); SUPPRESS keeps the global value.
    api.add_argument("--log-level", default=argparse.SUPPRESS, **log_level)

    triton = serve.add_argument_group("Triton (started by serve, unless --triton-url)")
    triton.add_argument(
        "--triton-url",
        type=triton_address,
        metavar="HOST:PORT",
        help="use the Triton already serving this gRPC address (the project's model repository, e.g. "
        "another serve's Triton or a Kubernetes Service) instead of starting one; /health then reports "
        "that Triton's readiness. The flags that configure a started Triton are ignored",
    )
    triton.add_argument(
        "--model-repository",
        metavar="DIR",
        type=Path,
        help="Triton model repository (default: the project's model_repository/)",
    )
    triton.add_argument(
        "--triton-host",
        metavar="HOST",
        help=f"address Triton's own ports bind to (default {DEFAULT_TRITON_HOST})",
    )
    triton.add_argument(
        "--triton-http-port", metavar="PORT", type=int, help="Triton's HTTP port (default: a free port)"
    )
    triton.add_argument(
        "--triton-grpc-port", metavar="PORT", type=int, help="Triton's gRPC port (default: a free port)"
    )
    triton.add_argument(
        "--triton-metrics-port",
        metavar="PORT",
        type=int,
        help="Triton's Prometheus metrics port (default: a free port)",
    )
    triton.add_argument(
        "--startup-timeout",
        type=float,
        metavar="SECONDS",
        help=f"seconds to wait for Triton to be ready (default {DEFAULT_STARTUP_TIMEOUT:g})",
    )
    triton.add_argument(
        "--state-dir",
        metavar="DIR",
        type=Path,
        help="Triton's log (tritonserver.log) and runtime files (default ~/.cache/tritonvlm/run/<pid>)",
    )

    model = serve.add_argument_group("model and engine (settings of the Triton models that serve starts)")
    model.add_argument(
        "--model",
        metavar="PATH_OR_ID",
        help="model directory or hub id (default: the built-in shapes demo model, "
        "models/tritonvlm-shapes-demo); "
        "with --triton-url only the default of --served-model-name",
    )
    model.add_argument(
        "--max-num-seqs",
        metavar="N",
        type=int,
        help="sequences decoded together (default 256 on CUDA, 16 on CPU)",
    )
    model.add_argument(
        "--max-model-len", metavar="TOKENS", type=int, help="prompt + max_tokens per request (default 4096)"
    )
    model.add_argument(
        "--max-prefill-tokens",
        metavar="TOKENS",
        type=int,
        help="prompt tokens prefilled together in one step (default 8192)",
    )
    model.add_argument(
        "--prefill-chunk-tokens",
        metavar="TOKENS",
        type=int,
        help="while other requests decode, prompt tokens prefilled per step: a longer prompt is prefilled "
        "in chunks between their steps (default 2048 on CUDA, 512 on CPU; 0: whole prompts)",
    )
    model.add_argument(
        "--kv-cache-memory",
        metavar="SIZE",
        help='KV cache budget: a size ("4GiB") or a fraction of free device memory ("0.5"), in blocks of '
        "16 tokens that requests take as they grow (a request waits until its prompt fits; when blocks "
        "run out the latest request is preempted and recomputed later) "
        "(default on CUDA: 0.6 of the free memory after the weights; on CPU: room for max-num-seqs + 4 "
        "sequences of max-model-len tokens, + 0 with the prefix cache off)",
    )
    model.add_argument(
        "--prefix-cache-slots",
        metavar="N",
        type=int,
        help="prompts and finished sequences whose keys/values (KV blocks) are kept for prompts that start "
        "the same way, given back when a new request needs the blocks; 0 turns the prefix cache off "
        "(default: 1024 on CUDA, 256 on CPU)",
    )
    model.add_argument(
        "--cuda-graphs",
        choices=("true", "false"),
        help="on CUDA, replay decode steps from CUDA graphs (default true); false decodes eagerly",
    )
    model.add_argument(
        "--decode-attention",
        choices=("auto", "triton", "gather"),
        help="how decode steps attend over the KV blocks: triton (a kernel reading each sequence's own "
        "blocks), gather (the blocks copied into one tensor padded to the longest sequence, for SDPA); "
        "auto (default): triton on CUDA when its start-up check passes, gather otherwise",
    )
    model.add_argument(
        "--fused-ops",
        choices=("auto", "true", "false"),
        help="compute the language model's RMSNorm layers and rotary embeddings in one Triton kernel "
        "each instead of transformers' half a dozen or more; auto (default): on CUDA when their "
        "start-up checks pass",
    )
    model.add_argument(
        "--async-output",
        choices=("auto", "true", "false"),
        help="turn a decode step's tokens into text and send them while the device computes the next "
        "step (the next step is launched first); auto (default): on CUDA",
    )
    model.add_argument(
        "--async-scheduling",
        choices=("auto", "true", "false"),
        help="launch the next decode step before the last one's tokens are read back (it takes them "
        "on the device) and record them while it runs; steps with a constrained request (a grammar) "
        "run without; true turns async output on too; auto (default): on CUDA "
        "unless --async-output is false",
    )
    model.add_argument(
        "--image-cache-memory",
        metavar="SIZE",
        type=image_cache_size,
        help='image-embedding cache of the vlm model (host memory): a size ("1GiB", "512MB"), a fraction '
        'of available memory below 1 ("0.05"), or "0" to turn it off; a repeated image skips the vision '
        "encoder (default 1GiB)",
    )
    model.add_argument(
        "--device", metavar="DEVICE", help="auto (cuda if available), cpu or cuda[:N] (default auto)"
    )
    model.add_argument("--dtype", metavar="DTYPE", help="auto, float32, bfloat16 or float16 (default auto)")

    media = serve.add_argument_group("request and image limits")
    media.add_argument(
        "--max-request-body-bytes",
        metavar="BYTES",
        type=int,
        default=50 * 1024 * 1024,
        help="HTTP request body size, else 413 (default 52428800, 50 MiB)",
    )
    media.add_argument(
        "--max-prompt-chars",
        metavar="CHARS",
        type=int,
        help="characters of text in one request, checked before tokenizing, else 400 "
        "(default 32 x --max-model-len: 131072)",
    )
    media.add_argument(
        "--max-images-per-request", metavar="N", type=int, default=8, help="images in one request (default 8)"
    )
    media.add_argument(
        "--max-image-bytes",
        metavar="BYTES",
        type=int,
        default=20 * 1024 * 1024,
        help="size of one encoded image in bytes (default 20971520, 20 MiB)",
    )
    media.add_argument(
        "--max-image-pixels",
        metavar="PIXELS",
        type=int,
        default=16777216,
        help="width x height of one image, checked before decoding (frontend, and the Triton that serve "
        "starts; default 16777216)",
    )
    media.add_argument(
        "--media-fetch-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds to fetch one image URL, redirects included (default 10)",
    )
    media.add_argument(
        "--allow-private-media-urls",
        action="store_true",
        help="let image URLs point at loopback/private addresses (refused by default: SSRF)",
    )
    media.add_argument(
        "--allowed-media-domains",
        default="",
        metavar="A.COM,B.ORG",
        help="if set, image URLs (and their redirects) may only name these hosts and their subdomains",
    )
    media.add_argument(
        "--allowed-local-media-path",
        metavar="DIR",
        help="let file:// image URLs read files below DIR (symlinks and .. resolved; default: refused)",
    )

    add_serve_batch_flags(serve)
    add_run_batch_parser(sub, serve)

    from tritonvlm.families import family_names

    build = sub.add_parser(
        "build-test-model",
        help="write a random-weight test model of a model family (offline)",
        description="Write a random-weight checkpoint of a model family, laid out like the real one "
        "(config, safetensors weights, tokenizer with the family's special tokens, chat template, "
        "processor config), built offline and deterministically.",
    )
    build.add_argument("out_dir", type=Path)
    build.add_argument("--size", choices=["tiny", "medium"], default="tiny")
    build.add_argument(
        "--family",
        choices=family_names(),
        default="qwen2_5_vl",
        help="model family (default: qwen2_5_vl)",
    )
    return parser


def triton_env(args: argparse.Namespace, model: str) -> dict[str, str]:
    """Launch-time settings for the Triton models (they override config.pbtxt parameters)."""
    from tritonvlm.triton_utils import env_name

    env = {env_name("model_path"): model, "TRITONVLM_LOG_LEVEL": args.log_level.upper()}
    for key in (*ENGINE_SETTINGS, "max_image_pixels"):  # the pixel limit is the frontend's too
        value = getattr(args, key)
        if value is not None:
            env[env_name(key)] = str(value)
    return env


class Terminated(Exception):
    """SIGTERM arrived: leave through the cleanup path like Ctrl-C does."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _frontend_settings(args: argparse.Namespace, grpc_url: str, served_name: str):
    from tritonvlm.frontend.app import FrontendSettings

    return FrontendSettings(
        triton_grpc_url=grpc_url,
        served_model_name=served_name,
        allow_private_media_urls=args.allow_private_media_urls,
        allowed_media_domains=args.allowed_media_domains,
        allowed_local_media_path=args.allowed_local_media_path,
        max_images_per_request=args.max_images_per_request,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        max_request_body_bytes=args.max_request_body_bytes,
        max_prompt_chars=args.max_prompt_chars or PROMPT_CHARS_PER_TOKEN * (args.max_model_len or 4096),
        media_fetch_timeout_s=args.media_fetch_timeout,
        api_key=args.api_key,
        batch_state_dir=str(args.batch_state_dir) if getattr(args, "batch_state_dir", None) else None,
        batch_concurrency=getattr(args, "batch_concurrency", None) or 16,
        batch_busy_concurrency=getattr(args, "batch_busy_concurrency", 1),
    )


class _ShutdownCancelFilter(logging.Filter):
    """uvicorn logs a request task it cancels at the end of the graceful shutdown as "Exception in ASGI
    application" with a CancelledError traceback: say what happened in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, asyncio.CancelledError):
            record.msg, record.args, record.exc_info, record.exc_text = (
                "a request still running after --shutdown-timeout was cancelled",
                (),
                None,
                None,
            )
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def run_frontend(args: argparse.Namespace, grpc_url: str, served_name: str) -> None:
    """Serve the OpenAI API until Ctrl-C/SIGTERM; returns once in-flight requests are done (or cancelled
    after ``--shutdown-timeout``) and the app is shut down."""
    import uvicorn

    from tritonvlm.frontend.app import create_app

    app = create_app(_frontend_settings(args, grpc_url, served_name))
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        log_config=None,  # uvicorn's loggers go through this process's logging setup (format, level)
        access_log=False,  # the frontend logs each request itself (tritonvlm.frontend.access, with its id)
        timeout_graceful_shutdown=args.shutdown_timeout,
    )
    logging.getLogger("uvicorn.error").addFilter(_ShutdownCancelFilter())
    log.info(
        "OpenAI API at http://%s:%d/v1 (model %r, Triton %s)", args.host, args.port, served_name, grpc_url
    )
    # uvicorn re-raises the signal it handled once it is done: the shutdown has already happened then.
    with contextlib.suppress(KeyboardInterrupt, Terminated):
        uvicorn.Server(config).run()  # returns on Ctrl-C / SIGTERM after draining


async def _triton_ready(grpc_url: str) -> bool:
    from tritonvlm.frontend.triton_client import TritonVLMClient

    client = TritonVLMClient(grpc_url)
    try:
        return await client.is_ready()
    finally:
        await client.close()


def model_family(model: str) -> str | None:
    """The family serving ``model`` (from its ``config.json``), or None after logging why there is none:
    an unsupported ``model_type`` stops ``serve`` before Triton starts, naming the supported ones."""
    from tritonvlm.families import UnsupportedModelError, family_for_model

    try:
        return family_for_model(model).name
    except UnsupportedModelError as exc:
        log.error("cannot serve %s: %s", model, exc)
    except (OSError, ValueError) as exc:
        log.error("cannot read the model config of %s: %s", model, exc)
    return None


def serve(args: argparse.Namespace) -> int:
    """Start tritonserver (unless ``--triton-url``), wait until it is ready, then run the frontend until
    Ctrl-C/SIGTERM, then stop tritonserver."""
    from tritonvlm.launcher import TritonServer, TritonStartError

    # uvicorn captures SIGINT/SIGTERM while it runs and re-raises them once it has shut down: with
    # SIGTERM's default action that would kill this process before it stops tritonserver.
    signal.signal(signal.SIGTERM, _raise_terminated)
    served_name = args.served_model_name or (args.model or DEFAULT_MODEL_NAME)

    if args.triton_url:
        ignored = [
            f"--{name.replace('_', '-')}" for name in TRITON_LAUNCH_FLAGS if getattr(args, name) is not None
        ]
        if ignored:
            log.warning(
                "ignored with --triton-url (they configure the tritonserver serve would start): %s",
                " ".join(ignored),
            )
        try:
            ready = asyncio.run(_triton_ready(args.triton_url))
        except (KeyboardInterrupt, Terminated):
            return 130
        if ready:
            log.info("using the Triton at %s (ready)", args.triton_url)
        else:
            log.warning(
                "the Triton at %s is not ready (yet): /health answers 503 until it is", args.triton_url
            )
        args.batch_state_dir = args.batch_state_dir or cache_dir() / "run" / str(os.getpid()) / "batches"
        with contextlib.suppress(KeyboardInterrupt, Terminated):
            run_frontend(args, args.triton_url, served_name)
        return 0

    if args.model is None:
        builtin = default_model()
        model, served_name = str(builtin), args.served_model_name or default_model_name(builtin)
    else:
        model = args.model
    family = model_family(model)
    if family is None:
        return 2
    log.info("model family: %s", family)
    repository = args.model_repository or DEFAULT_MODEL_REPOSITORY
    state = args.state_dir or cache_dir() / "run" / str(os.getpid())
    state.mkdir(parents=True, exist_ok=True)
    if not (repository / "vlm" / "config.pbtxt").exists():
        log.error("no Triton model repository at %s (pass --model-repository)", repository)
        return 2

    triton = TritonServer(
        repository.resolve(),
        host=args.triton_host or DEFAULT_TRITON_HOST,
        http_port=args.triton_http_port,
        grpc_port=args.triton_grpc_port,
        metrics_port=args.triton_metrics_port,
        state_dir=state,
        env=triton_env(args, model),
        startup_timeout=args.startup_timeout or DEFAULT_STARTUP_TIMEOUT,
        restart_dead_stubs=True,
    )
    started = time.monotonic()
    log.info("starting tritonserver on %s (model %s; log: %s)", repository, model, triton.log_file)
    try:
        triton.start()
        triton.wait_ready()
    except TritonStartError as exc:
        log.error("tritonserver failed to start: %s", exc)
        triton.stop()
        return 1
    except (KeyboardInterrupt, Terminated):
        triton.stop()
        return 130
    log.info(
        "tritonserver ready in %.1fs (grpc %s, http %s, metrics %s)",
        time.monotonic() - started,
        triton.grpc_url,
        triton.http_url,
        triton.metrics_url,
    )
    args.batch_state_dir = args.batch_state_dir or state / "batches"
    if not args.batch_concurrency:
        from tritonvlm.batch.launch import default_max_num_seqs

        args.batch_concurrency = args.max_num_seqs or default_max_num_seqs(args.device)
    try:
        run_frontend(args, triton.grpc_url, served_name)
    except (KeyboardInterrupt, Terminated):
        pass
    finally:
        log.info("stopping tritonserver")
        triton.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=args.log_level.upper(), format=log_format, stream=sys.stderr)
    if args.command == "build-test-model":
        from tritonvlm.families import get_family

        print(get_family(args.family).build_test_model(args.out_dir, size=args.size))
        return 0
    if args.command == "run-batch":
        from tritonvlm.batch.cli import run_batch_command

        return run_batch_command(args)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
