#!/usr/bin/env python3
"""Soak test: N chat requests at concurrency C against a real ``tritonvlm serve``, with images, a share
of clients that drop their stream mid-way, and a share of poisoned requests.

Poisoned requests are the hostile inputs of issue 15 (a temperature of 1e-300, a repetition penalty
of 1e-45, a 2**70 seed, a lone surrogate, a numeric string for max_tokens, special tokens typed as
text, an image no processor takes, a huge text) and requests whose logits the sampler's fault hook
turns NaN mid-stream. Each kind's expected answer is checked; anything else is an error.

Prints: outcomes per kind, unexpected errors, latency percentiles of the normal requests, the RSS and
PSS of every server process (frontend, tritonserver, each Python stub) at the start, at each quarter
and at the end, and how ``serve`` stopped (exit code, seconds, whether it needed its SIGKILL
fallback). ``--kill vlm@500,preprocess@1000`` also kills a model's stub (kill -9) after that many
requests and reports how long until ``/health`` is 200 again and how many requests failed meanwhile.

    .venv/bin/python scripts/soak.py                       # 2,000 requests at c=16, tiny model
    .venv/bin/python scripts/soak.py --requests 600 --concurrency 8 --kill vlm@200
    .venv/bin/python scripts/soak.py --model GEMMA3_DIR --shared-prefix-words 40   # prefix cache under load
    .venv/bin/python scripts/soak.py --url http://127.0.0.1:8000 --model-name my-model   # a running server
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
FAULT_TAG = "soak-fault-nan"
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


def png(width: int, height: int, color: str, seed: int) -> bytes:
    img = Image.new("RGB", (width, height), "white")
    rng = random.Random(seed)
    x, y = rng.randint(0, width // 2), rng.randint(0, height // 2)
    ImageDraw.Draw(img).ellipse((x, y, x + width // 3, y + height // 3), fill=color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# --------------------------------------------------------------------------- the requests


def normal_body(model: str, rng: random.Random, i: int, with_image: bool, shared: str = "") -> dict:
    """A streamed chat request: ``shared`` text first (the same in every request), an image (new in
    each) and a short question."""
    content: list[dict] = [{"type": "text", "text": shared}] if shared else []
    if with_image:
        size = rng.choice([(64, 64), (112, 84), (224, 224)])
        content.append(
            {"type": "image_url", "image_url": {"url": data_url(png(*size, rng.choice(COLORS), i))}}
        )
    content.append(
        {"type": "text", "text": rng.choice(["What is in this image?", "Describe it.", "Colour?"])}
    )
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": rng.randint(8, 48),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if rng.random() < 0.5:
        body.update(temperature=0)
    else:
        body.update(temperature=0.8, seed=rng.randint(0, 2**32))
    return body


@dataclass
class Served:
    """What the poisons depend on in the served model: its image placeholder typed as text (refused:
    a placeholder without an image), and whether its processor refuses a 250:1 image (Qwen's does;
    the others' may resize it and answer)."""

    image_token: str = "<|vision_start|><|image_pad|><|vision_end|>"
    refuses_extreme_aspect: bool = True

    @classmethod
    def of(cls, model_dir: str) -> Served:
        """From the model directory's config and tokenizer (Qwen's defaults where they say nothing)."""
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(model_dir)
        token_id = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
        if token_id is None:
            return cls()
        token = AutoTokenizer.from_pretrained(model_dir).convert_ids_to_tokens(int(token_id))
        return cls(token, config.model_type.startswith("qwen"))


def poison_bodies(model: str, big_text: int, served: Served) -> dict[str, tuple[dict, set[int]]]:
    """kind -> (body, acceptable statuses): refused with a 400 (a 250:1 image: where the processor
    takes it, answered)."""

    def chat(content: object, **fields: object) -> dict:
        return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **fields}

    wide = data_url(png(2000, 8, "red", 0))  # aspect ratio 250: the Qwen2-VL processor refuses it
    wide_ok = {400} if served.refuses_extreme_aspect else {200, 400}
    return {
        "temperature-1e-300": (chat("hi", temperature=1e-300), {400}),
        "repetition-penalty-1e-45": (chat("hi", repetition_penalty=1e-45), {400}),
        "seed-2**70": (chat("hi", seed=2**70), {400}),
        "lone-surrogate": (chat([{"type": "text", "text": "a\ud800b"}]), {400}),
        "max-tokens-string": (chat("hi", max_tokens="10"), {400}),
        "huge-text": (chat("x" * big_text), {400}),
        "special-tokens": (chat(served.image_token), {400}),
        "aspect-ratio-250": (
            chat([{"type": "image_url", "image_url": {"url": wide}}, {"type": "text", "text": "?"}]),
            wide_ok,
        ),
    }


@dataclass
class Stats:
    outcomes: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    done: int = 0
    failed_after_kill: int = 0
    prompt_tokens: int = 0  # of completed normal streams, and how many of them the prefix cache gave
    cached_tokens: int = 0


async def run_normal(client: httpx.AsyncClient, body: dict, drop_after: int | None, stats: Stats) -> None:
    kind = "dropped" if drop_after is not None else "normal"
    start = time.perf_counter()
    chunks, finished, error, usage = 0, False, None, None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                stats.outcomes[kind][f"HTTP {response.status_code}"] += 1
                stats.errors.append(f"{kind}: HTTP {response.status_code} {text[:200]}")
                return
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    finished = True
                elif line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"]
                    elif event.get("choices"):
                        chunks += 1
                    elif event.get("usage"):
                        usage = event["usage"]
                if drop_after is not None and chunks >= drop_after:
                    stats.outcomes[kind]["dropped mid-stream"] += 1
                    return
    except httpx.HTTPError as exc:
        stats.outcomes[kind][type(exc).__name__] += 1
        stats.errors.append(f"{kind}: {exc!r}")
        return
    if error is not None:
        stats.outcomes[kind][f"error event {error.get('code')}"] += 1
        stats.errors.append(f"{kind}: error event {error}")
    elif finished:
        stats.outcomes[kind]["completed"] += 1
        if drop_after is None:
            stats.latencies.append(time.perf_counter() - start)
            if usage:
                stats.prompt_tokens += usage["prompt_tokens"]
                stats.cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    else:
        stats.outcomes[kind]["no [DONE]"] += 1
        stats.errors.append(f"{kind}: stream ended without [DONE]")


async def run_poison(client: httpx.AsyncClient, kind: str, body: dict, ok: set[int], stats: Stats) -> None:
    content = json.dumps(body).encode()  # ASCII JSON: the lone surrogate travels as an escape
    try:
        response = await client.post(
            "/v1/chat/completions", content=content, headers={"Content-Type": "application/json"}
        )
    except httpx.HTTPError as exc:
        stats.outcomes[kind][type(exc).__name__] += 1
        stats.errors.append(f"{kind}: {exc!r}")
        return
    stats.outcomes[kind][f"HTTP {response.status_code}"] += 1
    if response.status_code not in ok:
        stats.errors.append(f"{kind}: HTTP {response.status_code} {response.text[:200]}")


async def run_fault(client: httpx.AsyncClient, model: str, i: int, stats: Stats) -> None:
    """A stream whose logits turn NaN mid-way (the sampler's fault hook, via its request id)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 24,
        "stream": True,
        "temperature": 0,
    }
    try:
        async with client.stream(
            "POST", "/v1/chat/completions", json=body, headers={"x-request-id": f"{FAULT_TAG}-{i}"}
        ) as response:
            lines = [line async for line in response.aiter_lines()]
    except httpx.HTTPError as exc:
        stats.outcomes["nan-logits"][type(exc).__name__] += 1
        stats.errors.append(f"nan-logits: {exc!r}")
        return
    ended = "data: [DONE]" in lines
    errored = any(line.startswith("data: {") and '"error"' in line for line in lines)
    stats.outcomes["nan-logits"]["error event" if errored else "completed" if ended else "no [DONE]"] += 1
    if not ended:
        stats.errors.append("nan-logits: stream ended without [DONE]")


# --------------------------------------------------------------------------- the server and its memory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def session_processes(sid: int) -> dict[int, str]:
    """pid -> short name of every live process of serve's session ``sid`` and of the session of the
    tritonserver it started (which runs in a session of its own, with its stubs)."""
    sessions = {sid}
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text(errors="replace") if entry.isdigit() else ""
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split() if stat else []
        if len(fields) > 3 and int(fields[1]) == sid and int(fields[3]) == int(entry):
            sessions.add(int(entry))  # a child of serve leading its own session: tritonserver
    out: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text(errors="replace")
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] in "ZX" or int(fields[3]) not in sessions:
            continue
        if argv[0].endswith(b"triton_python_backend_stub"):
            name = "stub " + Path(argv[1].decode(errors="replace")).parts[-3]
        elif argv[0].endswith(b"tritonserver"):
            name = "tritonserver"
        else:
            name = "serve (frontend)"
        out[int(entry)] = name
    return out


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in KiB, from /proc/<pid>/smaps_rollup."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def memory_snapshot(sid: int | None) -> dict[str, tuple[int, int]]:
    """name -> (RSS MiB, PSS MiB), stubs of the same model numbered."""
    if sid is None:
        return {}
    seen: Counter = Counter()
    snap: dict[str, tuple[int, int]] = {}
    for pid, name in sorted(session_processes(sid).items(), key=lambda kv: kv[1]):
        seen[name] += 1
        key = name if seen[name] == 1 else f"{name} #{seen[name]}"
        rss, pss = memory_kib(pid)
        snap[key] = (rss // 1024, pss // 1024)
    return snap


def print_memory(snaps: list[tuple[str, dict[str, tuple[int, int]]]]) -> None:
    if not snaps or not snaps[0][1]:
        return
    names = sorted({name for _, snap in snaps for name in snap})

    def cell(pair: tuple[int, int] | None) -> str:
        return f"{pair[0]} / {pair[1]}" if pair is not None else "-"

    print("\nmemory, MiB (RSS / PSS)")
    print(f"{'process':26}" + "".join(f"{label:>16}" for label, _ in snaps))
    for name in names:
        cells = "".join(f"{cell(snap.get(name)):>16}" for _, snap in snaps)
        print(f"{name:26}{cells}")
    totals = "".join(
        f"{cell((sum(v[0] for v in s.values()), sum(v[1] for v in s.values()))):>16}" for _, s in snaps
    )
    print(f"{'all':26}{totals}")


def start_serve(model_dir: str, port: int, state_dir: str) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "tritonvlm.cli", "serve",
        "--model", model_dir, "--served-model-name", "soak",
        "--port", str(port), "--state-dir", state_dir, "--startup-timeout", "900",
    ]  # fmt: skip
    log = open(Path(state_dir) / "serve.log", "wb")  # noqa: SIM115 (for the process's life)
    env = {**os.environ, "TRITONVLM_FAULT_NAN_REQUESTS": FAULT_TAG}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)


async def wait_healthy(base_url: str, timeout: float, proc: subprocess.Popen | None = None) -> float:
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as client:
        while time.monotonic() - start < timeout:
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"serve exited with {proc.returncode}")
            try:
                if (await client.get("/health")).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"not healthy after {timeout}s")


async def kill_and_watch(base_url: str, sid: int, model: str, stats: Stats, report: list[str]) -> None:
    stubs = {pid: name for pid, name in session_processes(sid).items() if name == f"stub {model}"}
    if not stubs:
        report.append(f"kill {model}: no such stub")
        return
    victim = min(stubs)
    failed_before = sum(1 for e in stats.errors if "503" in e or "service_unavailable" in e)
    done_before = stats.done
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    saw_503 = False
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as client:
        while time.monotonic() - killed < 600:
            try:
                status = (await client.get("/health")).status_code
            except httpx.HTTPError:
                status = -1
            saw_503 = saw_503 or status == 503
            if saw_503 and status == 200:
                break
            await asyncio.sleep(0.2)
    back = time.monotonic() - killed
    failed = sum(1 for e in stats.errors if "503" in e or "service_unavailable" in e) - failed_before
    report.append(
        f"kill -9 stub {model} (pid {victim}) after {done_before} requests: /health 503 seen: {saw_503}, "
        f"200 again after {back:.1f}s; requests failed meanwhile: {failed} (503 or error event)"
    )


# --------------------------------------------------------------------------- main


async def soak(args: argparse.Namespace, base_url: str, sid: int | None, served: Served | None = None) -> int:
    rng = random.Random(args.seed)
    model = args.model_name
    poisons = poison_bodies(model, args.huge_text, served or Served())
    poison_kinds = sorted(poisons)
    words = ("river", "lantern", "copper", "meadow", "falcon", "glacier", "orchard", "ember")
    shared = " ".join(words[n % len(words)] for n in range(args.shared_prefix_words))
    kills = {}
    for item in filter(None, (args.kill or "").split(",")):
        name, _, at = item.partition("@")
        kills[int(at or args.requests // 2)] = name
    plan = []
    for i in range(args.requests):
        r = rng.random()
        if r < args.poison_share:
            plan.append(
                ("fault", i) if rng.random() < 0.3 else ("poison", poison_kinds[i % len(poison_kinds)])
            )
        elif r < args.poison_share + args.drop_share:
            plan.append(("drop", rng.randint(1, 6)))
        else:
            plan.append(("normal", None))

    stats = Stats()
    quarters = {args.requests * q // 4 for q in (1, 2, 3)}
    snaps = [("start", memory_snapshot(sid))]
    kill_report: list[str] = []
    queue: asyncio.Queue = asyncio.Queue()
    for i, item in enumerate(plan):
        queue.put_nowait((i, item))
    limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency)
    timeout = httpx.Timeout(args.request_timeout)
    kill_tasks: list[asyncio.Task] = []
    started = time.monotonic()

    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:

        async def worker() -> None:
            while True:
                try:
                    i, (kind, arg) = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                if kind == "poison":
                    body, ok = poisons[arg]
                    await run_poison(client, arg, body, ok, stats)
                elif kind == "fault":
                    await run_fault(client, model, i, stats)
                else:
                    body = normal_body(model, rng, i, rng.random() < args.image_share, shared)
                    await run_normal(client, body, arg if kind == "drop" else None, stats)
                stats.done += 1
                if stats.done in quarters:
                    snaps.append((f"{stats.done} req", memory_snapshot(sid)))
                if stats.done in kills and sid is not None:
                    model_name = kills.pop(stats.done)
                    kill_tasks.append(
                        asyncio.ensure_future(kill_and_watch(base_url, sid, model_name, stats, kill_report))
                    )
                if args.progress and stats.done % args.progress == 0:
                    elapsed = time.monotonic() - started
                    print(f"  {stats.done} requests in {elapsed:.0f}s", file=sys.stderr, flush=True)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        await asyncio.gather(*kill_tasks)
    elapsed = time.monotonic() - started
    snaps.append(("end", memory_snapshot(sid)))

    print(
        f"\n{args.requests} requests at concurrency {args.concurrency} in {elapsed:.1f}s "
        f"({args.requests / elapsed:.1f}/s)"
    )
    print("\noutcomes")
    for kind in sorted(stats.outcomes):
        cells = ", ".join(f"{k}: {v}" for k, v in stats.outcomes[kind].most_common())
        print(f"  {kind:26} {cells}")
    lat = sorted(stats.latencies)
    if lat:

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000

        print(
            f"\nlatency of completed normal streams (n={len(lat)}): p50 {pct(0.5):.0f} ms, "
            f"p90 {pct(0.9):.0f} ms, p99 {pct(0.99):.0f} ms, max {lat[-1] * 1000:.0f} ms; "
            f"{stats.cached_tokens} of their {stats.prompt_tokens} prompt tokens from the prefix cache"
        )
    for line in kill_report:
        print(line)
    print(f"\nunexpected errors: {len(stats.errors)}")
    for line in Counter(e[:160] for e in stats.errors).most_common(10):
        print(f"  {line[1]:5} x {line[0]}")
    print_memory(snaps)
    if len(snaps) >= 5:
        first = sum(v[0] for v in snaps[1][1].values())
        last = sum(v[0] for v in snaps[-1][1].values())
        if first:
            print(f"RSS growth from the first quarter to the end: {100 * (last - first) / first:+.1f}%")
    return len(stats.errors)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--drop-share", type=float, default=1 / 3, help="clients that leave mid-stream")
    parser.add_argument("--poison-share", type=float, default=0.05, help="hostile or NaN-fault requests")
    parser.add_argument("--image-share", type=float, default=0.7, help="normal requests with an image")
    parser.add_argument(
        "--shared-prefix-words",
        type=int,
        default=0,
        help="the same text of N words starts every normal request (the prefix cache under load)",
    )
    parser.add_argument("--huge-text", type=int, default=8 * 1024 * 1024, help="chars of the huge text")
    parser.add_argument("--kill", help="MODEL@N,...: kill -9 that model's stub after N requests")
    parser.add_argument("--url", help="a running server (default: start serve with --model)")
    parser.add_argument("--model", help="model directory (default: the tiny test model, built once)")
    parser.add_argument("--model-name", default="soak", help="the served model name (with --url)")
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", type=int, default=250, help="print progress every N requests")
    args = parser.parse_args()

    if args.url:
        return 1 if asyncio.run(soak(args, args.url.rstrip("/"), None)) else 0

    sys.path.insert(0, str(ROOT))
    model_dir = args.model
    if model_dir is None:
        from tritonvlm.modeling.testmodel import build_test_model

        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tritonvlm" / "models"
        target = cache / "tritonvlm-tiny-random"
        model_dir = str(
            target if (target / "config.json").exists() else build_test_model(target, size="tiny")
        )
    state = tempfile.mkdtemp(prefix="tritonvlm-soak-")
    port = free_port()
    args.model_name = "soak"
    proc = start_serve(model_dir, port, state)
    base_url = f"http://127.0.0.1:{port}"
    try:
        ready = asyncio.run(wait_healthy(base_url, 900, proc))
        print(f"serve ready in {ready:.0f}s (state {state})")
        errors = asyncio.run(soak(args, base_url, proc.pid, Served.of(model_dir)))
    finally:
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        took = time.monotonic() - t0
        log = (Path(state) / "serve.log").read_text(errors="replace")
        fallback = "killing it" in log
        print(
            f"\nserve stopped: exit {code} in {took:.1f}s; SIGKILL fallback for tritonserver: "
            f"{'yes' if fallback else 'no'}; leftovers: {sorted(session_processes(proc.pid).values())}"
        )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
