#!/usr/bin/env python
"""Benchmark: time to first token of a request whose image the server has seen before vs the first time
(the image-embedding cache of the `vlm` model).

Starts ``tritonvlm serve`` on the medium test model (built once, as ``scripts/bench.py`` does) and, for
``--images`` distinct images of ``--size`` x ``--size`` pixels (default 448, the most the medium model's
processor takes: 1,024 patches, 256 image tokens), sends one streaming chat request with the image, then
the same request again, one at a time. The prefix cache is off by default (``--serve-flags``), so the
repeat saves what the image cache saves and not its prefill too. It prints TTFT (client side, first
content chunk) of first and repeated requests, the reduction, and the cache's hit/miss counters from
Triton's metrics port. The issue's target: a repeated image's TTFT at least 40% lower.

With ``--conversation N`` it measures a conversation instead: N turns, each re-sending the earlier
turns (their images and the answers) and adding a new image, with the prefix cache on. Per turn it
prints TTFT, the images encoded, the prompt tokens and how many came from the prefix cache: where a
family keeps each image apart (``Family.split_images``), a turn encodes only its new image and starts
from the earlier turns' keys/values.

    python scripts/bench_image_cache.py                      # 5 images, 448x448, medium model
    python scripts/bench_image_cache.py --images 10 --size 896 --image-cache-memory 0   # the cache off
    python scripts/bench_image_cache.py --conversation 4     # 4 turns, one more image each
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import shlex
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import (
    REPO_ROOT,
    Managed,
    RequestRecord,
    child_env,
    engine_metrics,
    ensure_model,
    free_port,
    log,
    stage_view,
    stream_one,
    triton_stats,
    wait_healthy,
)

SERVED_NAME = "bench"
DEFAULT_SERVE_FLAGS = "--prefix-cache-slots 0"
PROMPT = "Describe this image in detail."


def noise_png(size: int, seed: int) -> bytes:
    """A distinct image per seed: random pixels (the worst case for PNG decoding), PNG-encoded."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def user_turn(png: bytes, text: str = PROMPT) -> dict[str, Any]:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return {
        "role": "user",
        "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}],
    }


def body(png: bytes, max_tokens: int, history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "model": SERVED_NAME,
        "messages": [*(history or []), user_turn(png)],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }


def start_server(model_dir: Path, args: argparse.Namespace, logs: Path) -> tuple[Managed, str]:
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    state = logs / "tritonvlm-state"
    state.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "tritonvlm.cli", "--log-level", "WARNING", "serve",
        "--model", str(model_dir),
        "--served-model-name", SERVED_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--state-dir", str(state),
        "--triton-metrics-port", str(metrics_port),
        "--triton-http-port", str(http_port),
        "--startup-timeout", str(args.startup_timeout),
    ]  # fmt: skip
    if args.image_cache_memory is not None:
        cmd += ["--image-cache-memory", args.image_cache_memory]
    cmd += shlex.split(args.serve_flags)
    server = Managed("tritonvlm serve", cmd, child_env(args.threads), logs / "serve.log", cwd=REPO_ROOT)
    server.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    server.triton_url = f"http://127.0.0.1:{http_port}"
    base = f"http://127.0.0.1:{port}"
    wait_healthy(server, base + "/health", args.startup_timeout + 30)
    return server, base


async def streamed(url: str, request: dict[str, Any]) -> RequestRecord:
    """One streamed request's record (raises if it failed)."""
    import httpx

    rec = RequestRecord()
    async with httpx.AsyncClient(timeout=300) as client:
        await stream_one(client, url, request, rec)
    if rec.error or not rec.token_times:
        raise RuntimeError(f"request failed: {rec.error or 'no tokens'}")
    return rec


async def ttft(url: str, request: dict[str, Any]) -> float:
    """Seconds from sending ``request`` to its first content chunk."""
    rec = await streamed(url, request)
    return rec.token_times[0] - rec.start


def cache_counts(metrics_url: str) -> tuple[float, float]:
    series = engine_metrics(metrics_url)
    pick = {"hits": 0.0, "misses": 0.0}
    for key, value in series.items():
        for name in pick:
            if key.startswith(f"tritonvlm_image_cache_{name}_total"):
                pick[name] += value
    return pick["hits"], pick["misses"]


def ms(values: list[float]) -> str:
    return f"{1000 * statistics.median(values):8.1f} {1000 * statistics.fmean(values):8.1f}"


STAGES = (
    "preprocess_compute_ms",
    "vision_encoder_compute_ms",
    "vlm_admission_ms",
    "engine_queue_ms",
    "prefill_step_ms",
)


def measured(server: Managed, url: str, request: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """TTFT of one request and where its time went (:func:`bench.stage_view` over this request)."""
    rec, view = measured_record(server, url, request)
    return rec.token_times[0] - rec.start, view


def measured_record(
    server: Managed, url: str, request: dict[str, Any]
) -> tuple[RequestRecord, dict[str, Any]]:
    """One request's record and where its time went; the view also has the image-cache misses
    (``images_encoded``)."""
    before, stats_before = engine_metrics(server.metrics_url), triton_stats(server.triton_url)
    misses_before = cache_counts(server.metrics_url)[1]
    rec = asyncio.run(streamed(url, request))
    time.sleep(0.3)  # the vlm series are published after the engine's steps
    after, stats_after = engine_metrics(server.metrics_url), triton_stats(server.triton_url)
    view = stage_view(before, after, stats_before, stats_after, requests=1)
    view["images_encoded"] = cache_counts(server.metrics_url)[1] - misses_before
    return rec, view


def mean_stages(views: list[dict[str, Any]]) -> dict[str, float]:
    """Per stage, the mean over the requests (a stage a request skipped counts as 0 ms)."""
    return {name: statistics.fmean(view.get(name, 0.0) for view in views) for name in STAGES}


def run_conversation(args: argparse.Namespace, server: Managed, url: str) -> dict[str, Any]:
    """``--conversation N``: N turns, each adding an image to the conversation so far."""
    history: list[dict[str, Any]] = []
    turns = []
    for turn in range(args.conversation):
        request = body(noise_png(args.size, seed=100 + turn), args.max_tokens, history)
        rec, view = measured_record(server, url, request)
        usage = rec.usage or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        row = {
            "turn": turn + 1,
            "images": turn + 1,
            "ttft_ms": 1000 * (rec.token_times[0] - rec.start),
            "images_encoded": view["images_encoded"],
            "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": cached,
            **{name: view.get(name, 0.0) for name in STAGES},
        }
        turns.append(row)
        log(f"turn {turn + 1}: TTFT {row['ttft_ms']:.1f} ms, {row['images_encoded']:.0f} image-cache misses, "
            f"{cached}/{row['prompt_tokens']} prompt tokens cached")  # fmt: skip
        history += [request["messages"][-1], {"role": "assistant", "content": rec.text}]
    print(f"\nA conversation adding one {args.size}x{args.size} image per turn, medium model (ms)")
    print(f"{'turn':>4} {'images':>6} {'misses':>7} {'prompt':>6} {'cached':>6} {'TTFT':>8} "
          f"{'preproc':>8} {'encoder':>8} {'prefill':>8}")  # fmt: skip
    for row in turns:
        print(f"{row['turn']:>4} {row['images']:>6} {row['images_encoded']:>7.0f} {row['prompt_tokens']:>6} "
              f"{row['cached_tokens']:>6} {row['ttft_ms']:8.1f} {row['preprocess_compute_ms']:8.1f} "
              f"{row['vision_encoder_compute_ms']:8.1f} {row['prefill_step_ms']:8.1f}")  # fmt: skip
    return {"conversation": turns}


def run(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = ensure_model(args.model_dir).resolve()
    logs = args.logs or Path(tempfile.mkdtemp(prefix="tritonvlm-bench-imgcache-"))
    logs.mkdir(parents=True, exist_ok=True)
    log(f"model {model_dir}; {args.images} images of {args.size}x{args.size}; logs in {logs}")
    server, base = start_server(model_dir, args, logs)
    url = base + "/v1/chat/completions"
    try:
        asyncio.run(ttft(url, body(noise_png(args.size, seed=10_000), args.max_tokens)))  # warm-up
        time.sleep(0.3)
        if args.conversation:
            return run_conversation(args, server, url)
        before = cache_counts(server.metrics_url)
        first, repeat, first_stages, repeat_stages = [], [], [], []
        for i in range(args.images):
            request = body(noise_png(args.size, seed=i), args.max_tokens)
            for times, stages in ((first, first_stages), (repeat, repeat_stages)):
                seconds, view = measured(server, url, request)
                times.append(seconds)
                stages.append(view)
            log(f"image {i}: first {1000 * first[-1]:.1f} ms, repeat {1000 * repeat[-1]:.1f} ms")
        after = cache_counts(server.metrics_url)
    finally:
        server.stop()
    hits, misses = after[0] - before[0], after[1] - before[1]
    reduction = 1 - statistics.median(repeat) / statistics.median(first)
    stages = {"first": mean_stages(first_stages), "repeat": mean_stages(repeat_stages)}
    print(f"\nTTFT, {args.images} images of {args.size}x{args.size} px, medium model, 1 client (ms)")
    print(f"{'request':<22}{'p50':>8} {'mean':>8}")
    print(f"{'first time (miss)':<22}{ms(first)}")
    print(f"{'seen before (repeat)':<22}{ms(repeat)}")
    print(f"repeat TTFT p50 {100 * reduction:.1f}% lower (target >= 40%); image cache: {hits:.0f} hits, "
          f"{misses:.0f} misses")  # fmt: skip
    print("\nwhere a request's time goes before its first token (mean ms; Triton's per-model statistics")
    print("and the vlm/engine histograms; vlm_admission spans preprocess and encoder calls)")
    print(f"{'stage':<28}{'first':>8} {'repeat':>8}")
    for name in STAGES:
        print(f"{name:<28}{stages['first'][name]:8.1f} {stages['repeat'][name]:8.1f}")
    return {
        "first_s": first,
        "repeat_s": repeat,
        "reduction_p50": reduction,
        "hits": hits,
        "misses": misses,
        "stages_ms": stages,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, help="model to serve (default: the medium test model)")
    parser.add_argument("--images", type=int, default=5, help="distinct images, each sent twice (default 5)")
    parser.add_argument(
        "--size", type=int, default=448, help="image width and height in pixels (default 448)"
    )
    parser.add_argument("--max-tokens", type=int, default=4, help="output tokens per request (default 4)")
    parser.add_argument(
        "--conversation",
        type=int,
        default=0,
        help="measure a conversation of this many turns, one new image each (prefix cache on)",
    )
    parser.add_argument("--image-cache-memory", help="serve --image-cache-memory (default: serve's, 1GiB)")
    parser.add_argument(
        "--serve-flags",
        default=DEFAULT_SERVE_FLAGS,
        help="more serve flags (default: --prefix-cache-slots 0, so that the prefix cache does not also "
        "skip the repeat's prefill; \"\" for serve's defaults, which --conversation uses)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server (default 2)")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to start the server")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument(
        "--logs", type=Path, help="where the server log goes (default: a new temporary folder)"
    )
    return parser.parse_args(argv)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.conversation and args.serve_flags == DEFAULT_SERVE_FLAGS:
        args.serve_flags = ""  # a conversation is what the prefix cache is for
    signal.signal(signal.SIGTERM, _terminate)
    try:
        result = run(args)
    finally:
        Managed.stop_all()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
