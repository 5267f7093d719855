"""The `tritonvlm` command: `serve` (Triton + the OpenAI frontend) and `build-test-model`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

log = logging.getLogger("tritonvlm")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "model_repository"
DEFAULT_MODEL_NAME = "tritonvlm-tiny-random"


def cache_dir() -> Path:
    """Where built models and server state live ($TRITONVLM_CACHE, default ~/.cache/tritonvlm)."""
    return Path(os.environ.get("TRITONVLM_CACHE", Path.home() / ".cache" / "tritonvlm")).expanduser()


def default_model() -> Path:
    """The built-in model: the tiny random-weight test model, built once and cached."""
    from tritonvlm.modeling.testmodel import build_test_model

    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if not (target / "config.json").exists():
        log.info("building the built-in tiny test model into %s (once)", target)
        build_test_model(target, size="tiny")
    return target


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tritonvlm", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("TRITONVLM_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start tritonserver and the OpenAI-compatible frontend")
    serve.add_argument(
        "--model",
        help="model directory or hub id (default: the built-in tiny test model, built on first use)",
    )
    serve.add_argument("--served-model-name", help="model name clients send (default: the --model value)")
    serve.add_argument("--host", default="127.0.0.1", help="frontend address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="frontend port (default 8000)")
    serve.add_argument(
        "--model-repository",
        type=Path,
        default=DEFAULT_MODEL_REPOSITORY,
        help="Triton model repository (default: the project's model_repository/)",
    )
    serve.add_argument(
        "--triton-host", default="127.0.0.1", help="address Triton's own ports bind to (default 127.0.0.1)"
    )
    serve.add_argument("--triton-http-port", type=int, help="Triton HTTP port (default: a free port)")
    serve.add_argument("--triton-grpc-port", type=int, help="Triton gRPC port (default: a free port)")
    serve.add_argument("--triton-metrics-port", type=int, help="Triton metrics port (default: a free port)")
    serve.add_argument("--max-num-seqs", type=int, help="sequences decoded together (llm, default 16)")
    serve.add_argument("--max-model-len", type=int, help="prompt + max_tokens per request (default 4096)")
    serve.add_argument(
        "--max-prefill-tokens", type=int, help="prompt tokens prefilled together in one step (default 8192)"
    )
    serve.add_argument(
        "--kv-cache-memory",
        help='KV cache budget: a size ("4GiB") or a fraction of free device memory ("0.5"); caps the '
        "sequences that run at once (default: max-num-seqs slots of max-model-len tokens)",
    )
    serve.add_argument("--device", help="auto (cuda if available), cpu or cuda[:N] (default auto)")
    serve.add_argument("--dtype", help="auto, float32, bfloat16 or float16 (default auto)")
    serve.add_argument(
        "--allow-private-media-urls",
        action="store_true",
        help="let image URLs point at loopback/private addresses (refused by default: SSRF)",
    )
    serve.add_argument(
        "--allowed-media-domains",
        default="",
        metavar="A.COM,B.ORG",
        help="if set, image URLs (and their redirects) may only name these hosts and their subdomains",
    )
    serve.add_argument(
        "--allowed-local-media-path",
        metavar="DIR",
        help="let file:// image URLs read files below DIR (symlinks and .. resolved; default: refused)",
    )
    serve.add_argument(
        "--max-images-per-request", type=int, default=8, help="images in one request (default 8)"
    )
    serve.add_argument(
        "--max-image-bytes",
        type=int,
        default=20 * 1024 * 1024,
        help="size of one encoded image in bytes (default 20971520, 20 MiB)",
    )
    serve.add_argument(
        "--max-image-pixels",
        type=int,
        default=16777216,
        help="width x height of one image, checked before decoding (frontend and Triton; default 16777216)",
    )
    serve.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=50 * 1024 * 1024,
        help="HTTP request body size, else 413 (default 52428800, 50 MiB)",
    )
    serve.add_argument(
        "--media-fetch-timeout",
        type=float,
        default=10.0,
        help="seconds to fetch one image URL, redirects included (default 10)",
    )
    serve.add_argument(
        "--api-key",
        default=os.environ.get("TRITONVLM_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $TRITONVLM_API_KEY; unset: open)",
    )
    serve.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for Triton")
    serve.add_argument("--state-dir", type=Path, help="server logs and runtime files (default: a cache dir)")

    build = sub.add_parser("build-test-model", help="write a random-weight Qwen2.5-VL model (offline)")
    build.add_argument("out_dir", type=Path)
    build.add_argument("--size", choices=["tiny", "medium"], default="tiny")
    return parser


def triton_env(args: argparse.Namespace, model: str) -> dict[str, str]:
    """Launch-time settings for the Triton models (they override config.pbtxt parameters)."""
    from tritonvlm.triton_utils import env_name

    env = {env_name("model_path"): model, "TRITONVLM_LOG_LEVEL": args.log_level.upper()}
    keys = ("max_num_seqs", "max_model_len", "max_prefill_tokens", "kv_cache_memory", "device", "dtype")
    for key in (*keys, "max_image_pixels"):
        value = getattr(args, key)
        if value is not None:
            env[env_name(key)] = str(value)
    return env


class Terminated(Exception):
    """SIGTERM arrived: leave through the cleanup path like Ctrl-C does."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def serve(args: argparse.Namespace) -> int:
    """Start tritonserver, wait until it is ready, then run the frontend until Ctrl-C/SIGTERM."""
    import uvicorn

    from tritonvlm.frontend.app import FrontendSettings, create_app
    from tritonvlm.launcher import TritonServer, TritonStartError

    # uvicorn captures SIGINT/SIGTERM while it runs and re-raises them once it has shut down: with
    # SIGTERM's default action that would kill this process before it stops tritonserver.
    signal.signal(signal.SIGTERM, _raise_terminated)
    model = args.model or str(default_model())
    served_name = args.served_model_name or (args.model or DEFAULT_MODEL_NAME)
    state = args.state_dir or cache_dir() / "run" / str(os.getpid())
    state.mkdir(parents=True, exist_ok=True)
    if not (args.model_repository / "vlm" / "config.pbtxt").exists():
        log.error("no Triton model repository at %s (pass --model-repository)", args.model_repository)
        return 2

    triton = TritonServer(
        args.model_repository.resolve(),
        host=args.triton_host,
        http_port=args.triton_http_port,
        grpc_port=args.triton_grpc_port,
        metrics_port=args.triton_metrics_port,
        state_dir=state,
        env=triton_env(args, model),
        startup_timeout=args.startup_timeout,
    )
    started = time.monotonic()
    log.info("starting tritonserver on %s (model %s; log: %s)", args.model_repository, model, triton.log_file)
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
    try:
        settings = FrontendSettings(
            triton_grpc_url=triton.grpc_url,
            served_model_name=served_name,
            allow_private_media_urls=args.allow_private_media_urls,
            allowed_media_domains=args.allowed_media_domains,
            allowed_local_media_path=args.allowed_local_media_path,
            max_images_per_request=args.max_images_per_request,
            max_image_bytes=args.max_image_bytes,
            max_image_pixels=args.max_image_pixels,
            max_request_body_bytes=args.max_request_body_bytes,
            media_fetch_timeout_s=args.media_fetch_timeout,
            api_key=args.api_key,
        )
        app = create_app(settings)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower())
        server = uvicorn.Server(config)
        log.info("OpenAI API at http://%s:%d/v1 (model %r)", args.host, args.port, served_name)
        server.run()  # returns on Ctrl-C / SIGTERM after draining
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
        from tritonvlm.modeling.testmodel import build_test_model

        print(build_test_model(args.out_dir, size=args.size))
        return 0
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
