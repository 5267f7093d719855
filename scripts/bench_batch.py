#!/usr/bin/env python
"""Benchmark batch inference: ``run-batch`` throughput vs the same requests through
``/v1/chat/completions``, and interactive TTFT while a Batch API batch runs.

Starts one ``tritonvlm serve`` (medium test model by default, built once and cached; its own Triton,
free loopback ports) and stops it at the end, on errors and Ctrl-C too.

throughput  N chat requests, each with a 224x224 PNG (``data:`` URL) and exactly ``--max-tokens`` greedy
            output tokens (``ignore_eos``). (a) sent to ``/v1/chat/completions`` (whole, not streamed) by
            closed-loop clients at each ``--levels`` concurrency; (b) the same requests as a batch file
            through run-batch's runner (:func:`tritonvlm.batch.run_batch.run_batch_file`, in this process,
            against the server's Triton, default concurrency). Output tokens/s of each; run-batch over the
            best level is the figure (target >= 0.95x).
ttft        time to first token of streamed chat requests at concurrency 4 (same requests, fewer
            tokens), in windows that alternate between an idle server and one running a Batch API batch
            (``client.batches.create``, cancelled after its window); the median TTFT with a batch
            running over the idle one (target <= 1.5x).

    python scripts/bench_batch.py                          # both parts (~10 min on a 2-core CPU)
    python scripts/bench_batch.py --parts throughput --requests 64 --levels 8,16,32
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVED = "bench"
COLORS = ("red", "green", "blue", "orange", "purple", "yellow")


def log(msg: str) -> None:
    print(f"[bench-batch {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_model(model_dir: Path | None) -> Path:
    if model_dir is not None:
        return model_dir
    from tritonvlm.cli import cache_dir
    from tritonvlm.testmodels.qwen2_5_vl import build_test_model

    target = cache_dir() / "models" / "tritonvlm-medium-random"
    if not (target / "config.json").exists():
        log(f"building the medium test model into {target} (once)")
        build_test_model(target, size="medium")
    return target


def png(i: int, size: int = 224) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    draw.ellipse((size // 8, size // 8, size // 2, size // 2), fill=COLORS[i % len(COLORS)])
    draw.rectangle((size // 2, size // 2, 7 * size // 8, 7 * size // 8), fill=COLORS[(i // 6) % len(COLORS)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def chat_body(i: int, max_tokens: int, stream: bool = False) -> dict[str, Any]:
    url = "data:image/png;base64," + base64.b64encode(png(i)).decode()
    body: dict[str, Any] = {
        "model": SERVED,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": f"Describe picture {i} in detail."},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    if stream:
        body["stream"] = True
    return body


def write_batch_file(path: Path, n: int, max_tokens: int, offset: int = 0) -> None:
    with open(path, "w") as f:
        for i in range(n):
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
            line["body"] = chat_body(offset + i, max_tokens)  # type: ignore[assignment]
            f.write(json.dumps(line) + "\n")


class Server:
    """``tritonvlm serve`` in its own session; stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, model: Path, state: Path, max_num_seqs: int, threads: int, busy: int) -> None:
        self.port, self.grpc_port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        cmd = [
            sys.executable, "-m", "tritonvlm.cli", "--log-level", "WARNING", "serve",
            "--model", str(model), "--served-model-name", SERVED, "--port", str(self.port),
            "--triton-grpc-port", str(self.grpc_port), "--max-num-seqs", str(max_num_seqs),
            "--state-dir", str(state), "--batch-busy-concurrency", str(busy), "--startup-timeout", "1200",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.log = open(state / "serve.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def wait(self, timeout: float = 1260) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise SystemExit("serve did not become healthy")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


async def closed_loop(base: str, bodies: list[dict[str, Any]], concurrency: int) -> tuple[float, int, int]:
    """(seconds, completion tokens, errors) for ``bodies`` sent by ``concurrency`` closed-loop clients."""
    import httpx

    queue = list(reversed(bodies))
    tokens = errors = 0
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:

        async def worker() -> None:
            nonlocal tokens, errors
            while queue:
                body = queue.pop()
                response = await client.post("/v1/chat/completions", json=body)
                if response.status_code == 200:
                    tokens += response.json()["usage"]["completion_tokens"]
                else:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, tokens, errors


async def run_batch_once(
    grpc_url: str, path: Path, out: Path, concurrency: int | None
) -> tuple[float, int, int]:
    from tritonvlm.batch.launch import default_max_num_seqs, open_api
    from tritonvlm.batch.run_batch import run_batch_file
    from tritonvlm.frontend.app import FrontendSettings

    out.unlink(missing_ok=True)
    settings = FrontendSettings(triton_grpc_url=grpc_url, served_model_name=SERVED)
    async with open_api(settings) as api:
        stats = await run_batch_file(
            api, path, out, concurrency=concurrency or 2 * default_max_num_seqs("cpu"), progress=False
        )
    return stats.elapsed, stats.completion_tokens, stats.failed


def bench_throughput(server: Server, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    bodies = [chat_body(i, args.max_tokens) for i in range(args.requests)]
    batch_file = work / "throughput.jsonl"
    write_batch_file(batch_file, args.requests, args.max_tokens)
    rows: list[dict[str, Any]] = []

    def run_batch(label: str) -> None:
        seconds, tokens, failed = asyncio.run(
            run_batch_once(server.grpc_url, batch_file, work / "out.jsonl", args.batch_concurrency)
        )
        rows.append(
            {
                "system": label,
                "concurrency": args.batch_concurrency or 32,
                "seconds": seconds,
                "tokens": tokens,
                "errors": failed,
            }
        )
        log(f"{label}: {tokens} tokens in {seconds:.1f}s = {tokens / seconds:.1f} tok/s")

    asyncio.run(closed_loop(server.base, bodies[: args.warmup], 4))  # warm-up (first requests are slow)
    run_batch("run-batch")
    for level in args.levels:
        seconds, tokens, errors = asyncio.run(closed_loop(server.base, bodies, level))
        rows.append(
            {
                "system": "chat completions",
                "concurrency": level,
                "seconds": seconds,
                "tokens": tokens,
                "errors": errors,
            }
        )
        log(f"chat completions c={level}: {tokens} tokens in {seconds:.1f}s = {tokens / seconds:.1f} tok/s")
    run_batch("run-batch (again)")
    for row in rows:
        row["tok_s"] = row["tokens"] / row["seconds"]
    best = max((r for r in rows if r["system"] == "chat completions"), key=lambda r: r["tok_s"])
    batch = [r["tok_s"] for r in rows if r["system"].startswith("run-batch")]
    print(f"\nthroughput: {args.requests} requests x {args.max_tokens} tokens, one 224x224 image each")
    print(f"{'system':<20} {'conc':>5} {'seconds':>8} {'tokens':>7} {'tok/s':>8} {'err':>4}")
    for r in rows:
        cells = (
            f"{r['concurrency']:>5} {r['seconds']:>8.1f} {r['tokens']:>7} {r['tok_s']:>8.1f} {r['errors']:>4}"
        )
        print(f"{r['system']:<20} {cells}")
    ratio = statistics.mean(batch) / best["tok_s"]
    print(
        f"run-batch (mean of {len(batch)}) {statistics.mean(batch):.1f} tok/s vs best chat completions "
        f"(c={best['concurrency']}) {best['tok_s']:.1f} tok/s: {ratio:.2f}x (target >= 0.95x)"
    )
    return {"rows": rows, "ratio": ratio, "best_level": best["concurrency"]}


async def ttft_run(base: str, n: int, max_tokens: int, offset: int, concurrency: int = 4) -> list[float]:
    """TTFTs (seconds) of ``n`` streamed requests sent by ``concurrency`` closed-loop clients."""
    import httpx

    queue = list(range(n))
    ttfts: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:

        async def worker() -> None:
            while queue:
                i = queue.pop()
                start = time.perf_counter()
                first = None
                async with client.stream(
                    "POST", "/v1/chat/completions", json=chat_body(offset + i, max_tokens, True)
                ) as r:
                    async for line in r.aiter_lines():
                        if (
                            first is None
                            and line.startswith("data: ")
                            and '"content":"' in line
                            and '"content":""' not in line
                        ):
                            first = time.perf_counter() - start
                if first is not None:
                    ttfts.append(first)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ttfts


def bench_ttft(server: Server, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Alternate idle and batch-running windows (``--ttft-rounds``), so that a change of the machine's
    load over time hits both alike; each window has ``--ttft-requests`` requests."""
    import openai

    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    asyncio.run(ttft_run(server.base, 8, args.ttft_tokens, 10_000))  # warm-up
    path = work / "ttft-batch.jsonl"
    write_batch_file(path, args.ttft_batch_requests, args.max_tokens, offset=30_000)
    with open(path, "rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    idle: list[float] = []
    loaded: list[float] = []
    progressed = 0
    windows = [w for r in range(args.ttft_rounds) for w in (("idle", r), ("batch", r))] + [
        ("idle", args.ttft_rounds)
    ]
    for kind, r in windows:
        offset = 100_000 * (r + 1) + (50_000 if kind == "batch" else 0)
        if kind == "idle":
            window = asyncio.run(ttft_run(server.base, args.ttft_requests, args.ttft_tokens, offset))
            idle += window
            log(f"idle window {r}: TTFT p50 {1000 * statistics.median(window):.0f} ms")
            continue
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 600
        while client.batches.retrieve(batch.id).request_counts.completed < args.max_num_seqs:
            if time.monotonic() > deadline:
                raise SystemExit("the batch did not get going")
            time.sleep(0.2)
        before = client.batches.retrieve(batch.id).request_counts.completed
        window = asyncio.run(ttft_run(server.base, args.ttft_requests, args.ttft_tokens, offset))
        progressed += client.batches.retrieve(batch.id).request_counts.completed - before
        loaded += window
        log(f"batch window {r}: TTFT p50 {1000 * statistics.median(window):.0f} ms")
        client.batches.cancel(batch.id)
        while client.batches.retrieve(batch.id).status != "cancelled":
            time.sleep(0.2)
    ratio = statistics.median(loaded) / statistics.median(idle)
    p = lambda xs, q: 1000 * sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    shape = f"{args.ttft_requests} streamed requests per window, one image, {args.ttft_tokens} tokens"
    print(f"\nTTFT at concurrency 4 ({shape}; {args.ttft_rounds} batch windows between idle ones)")
    print(f"{'server':<16} {'n':>4} {'p50 ms':>8} {'p90 ms':>8} {'mean ms':>8}")
    for name, xs in (("idle", idle), ("batch running", loaded)):
        mean = 1000 * statistics.mean(xs)
        print(f"{name:<16} {len(xs):>4} {p(xs, 0.5):>8.0f} {p(xs, 0.9):>8.0f} {mean:>8.0f}")
    print(
        f"TTFT p50 with a batch running / idle: {ratio:.2f}x (target <= 1.5x); --batch-busy-concurrency "
        f"{args.busy_concurrency}; the batches completed {progressed} requests during the batch windows"
    )
    ms = lambda xs: [1000 * x for x in xs]  # noqa: E731
    return {"idle_ms": ms(idle), "loaded_ms": ms(loaded), "ratio": ratio, "batch_progress": progressed}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, help="default: the medium test model (cached)")
    parser.add_argument("--parts", default="throughput,ttft")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--levels", default="8,16,32", help="chat completions concurrency levels")
    parser.add_argument("--batch-concurrency", type=int, help="run-batch concurrency (default: its own)")
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--ttft-requests", type=int, default=16, help="per window")
    parser.add_argument("--ttft-rounds", type=int, default=3)
    parser.add_argument("--ttft-tokens", type=int, default=16)
    parser.add_argument("--ttft-batch-requests", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--busy-concurrency", type=int, default=1, help="serve --batch-busy-concurrency")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    parts = set(args.parts.split(","))
    model = ensure_model(args.model_dir)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        work = Path(tmp)
        server = Server(model, work, args.max_num_seqs, args.threads, args.busy_concurrency)
        try:
            server.wait()
            log(f"serve ready ({model.name})")
            if "throughput" in parts:
                results["throughput"] = bench_throughput(server, args, work)
            if "ttft" in parts:
                results["ttft"] = bench_ttft(server, args, work)
        finally:
            server.stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
