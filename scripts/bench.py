#!/usr/bin/env python
"""Benchmark: this server vs `transformers serve` vs the engine's raw batched loop, on one model.

Sweeps concurrency levels with streaming chat requests, each carrying one generated image (a
224x224 PNG as a ``data:`` URL) and a fixed number of output tokens, and prints per level: output
tokens/s, time to first token (TTFT) p50/p99, inter-token latency (ITL) p50/p99 and the peak memory
of the system's process tree (RSS and PSS summed, sampled from /proc: RSS every ~200 ms, PSS every ~2 s).

Systems (``--systems``):

  a  ``tritonvlm serve`` (tritonserver + its Python stubs + the OpenAI frontend) over the OpenAI API
  b  ``transformers serve`` on the same model directory (its OpenAI API)
  c  the engine's raw batched loop, no server: ``LLMEngine.step()`` in a worker process with each
     round's requests added at once; each request's image is decoded, processed and encoded (one
     vision forward per round) as in the server, without HTTP, gRPC or Triton: the ceiling

Clients are closed-loop: ``level`` workers each send their next request as soon as the previous one
ends, until ``--requests-per-level`` requests are done. Every server this script starts is stopped
at the end, on errors and on Ctrl-C too. System b needs ``transformers[serving]``: the script installs
it into its venv (pinned to the installed transformers) the first time.

    python scripts/bench.py                            # all systems, levels 1,2,4,8,16
    python scripts/bench.py --systems a,c --levels 1,8 --max-tokens 32 --json out.json

``--guided`` measures something else and exits: the cost of grammar-constrained decoding (structured
outputs, tool calls) in the engine alone, no server. At each level in ``--levels`` (default 8) it
decodes ``level`` text requests of ``--max-tokens`` tokens (sampled, temperature 1) free, then
constrained (``json_object``, and the nested JSON schema of the tests), then half and half, and prints
the mean decode step time of each, the overhead, and the mask's own share (fill + apply):

    python scripts/bench.py --guided --levels 8 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Describe this image in detail."
SYSTEM_NAMES = {"a": "tritonvlm", "b": "transformers serve", "c": "raw batched loop"}
SERVED_NAME = "bench"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
TARGETS = (
    "targets (issues): at 8 clients tok/s a >= 4x b and a >= 85% of c, TTFT p50 at 1 client a <= 1.3x b "
    "(the server's first); at 1 client TTFT p50 a <= 1.5x c, at 8 clients tok/s a >= 0.8x c (fast where "
    "users run it)"
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- inputs ------------------------------------------------------------------------------------------


def make_png(size: int = 224) -> bytes:
    """A deterministic test picture (shapes on white), PNG-encoded."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    draw.ellipse((size // 8, size // 8, size // 2, size // 2), fill="red")
    draw.rectangle((size // 2, size // 2, 7 * size // 8, 7 * size // 8), fill="blue")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def chat_messages(png: bytes) -> list[dict[str, Any]]:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": {"url": url}}],
        }
    ]


def request_body(system: str, model: str, messages: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """A streaming chat request that asks for exactly ``max_tokens`` greedy tokens."""
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    if system == "a":
        body["stream_options"] = {"include_usage": True}
        body["ignore_eos"] = True  # our extension
    else:
        # transformers serve refuses unknown fields (no ignore_eos) and ignores stream_options, but
        # takes a generation config (JSON); min_new_tokens forces the length. Tokens are counted from
        # the usage it sends with the last chunk anyway.
        gen = {"max_new_tokens": max_tokens, "min_new_tokens": max_tokens, "do_sample": False}
        body["generation_config"] = json.dumps(gen)
    return body


def ensure_model(model_dir: Path | None) -> Path:
    """The model to serve: ``--model-dir``, or the medium test model built once into the cache."""
    if model_dir is not None:
        if not (model_dir / "config.json").exists():
            raise SystemExit(f"--model-dir {model_dir} has no config.json")
        return model_dir
    from tritonvlm.cli import cache_dir

    target = cache_dir() / "models" / "tritonvlm-medium-random"
    if not (target / "config.json").exists():
        log(f"building the medium test model into {target} (once)")
        from tritonvlm.testmodels.qwen2_5_vl import build_test_model

        build_test_model(target, size="medium")
    return target


# ---- statistics --------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


@dataclass
class RequestRecord:
    start: float = 0.0
    end: float = 0.0
    token_times: list[float] = field(default_factory=list)  # arrival of each chunk carrying text/tokens
    tokens: int | None = None  # completion tokens (usage), when the server says
    error: str | None = None
    usage: dict[str, Any] | None = None  # the usage chunk, when the server sends one
    text: str = ""  # the streamed content


def summarize(records: list[RequestRecord], wall: float) -> dict[str, Any]:
    """Per-level figures from the requests' timestamps (seconds in, milliseconds out)."""
    ok = [r for r in records if r.error is None and r.token_times]
    tokens = sum(r.tokens if r.tokens is not None else len(r.token_times) for r in ok)
    ttft = [r.token_times[0] - r.start for r in ok]
    itl = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:], strict=False)]
    e2e = [r.end - r.start for r in ok]

    def ms(values: list[float], q: float) -> float | None:
        p = percentile(values, q)
        return None if p is None else round(p * 1000.0, 2)

    errors = [r.error for r in records if r.error is not None]
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "output_tokens": tokens,
        "chunks": sum(len(r.token_times) for r in ok),
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "ttft_p50_ms": ms(ttft, 50),
        "ttft_p99_ms": ms(ttft, 99),
        "itl_p50_ms": ms(itl, 50),
        "itl_p99_ms": ms(itl, 99),
        "e2e_p50_ms": ms(e2e, 50),
    }


# ---- processes and memory ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time) of a process from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[19])


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (by walking /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                children.setdefault(st[0], []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def memory_of(pid: int, pss: bool) -> tuple[int, int]:
    """(RSS, PSS) bytes of one process (PSS 0 when not read or not readable)."""
    rss = pss_bytes = 0
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * PAGE_SIZE
        if pss:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss_bytes = int(line.split()[1]) * 1024
                        break
    except (OSError, ValueError, IndexError):
        pass
    return rss, pss_bytes


class MemorySampler:
    """Samples the summed RSS of a process tree every ``interval`` seconds in a thread, and its PSS every
    ``pss_every`` samples; keeps the peaks since the last :meth:`reset` and every (pid, start time) it
    saw (for cleanup).

    PSS is read sparingly because ``/proc/<pid>/smaps_rollup`` is expensive: for the six processes of
    `tritonvlm serve` one PSS sample costs ~25 ms of CPU (RSS alone: 1.5 ms), so PSS every 200 ms took
    ~12% of a core from the server under test (and less from the one-process raw loop it is compared
    with)."""

    def __init__(self, root: int, interval: float = 0.2, pss: bool = True, pss_every: int = 10) -> None:
        self.root, self.interval, self.pss, self.pss_every = root, interval, pss, pss_every
        self._samples = 0
        self.seen: dict[int, int] = {}
        self.peak_rss = self.peak_pss = 0
        self.last_pids: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mem-sampler", daemon=True)
        self._thread.start()

    def sample(self) -> tuple[int, int]:
        pids = process_tree(self.root)
        with_pss = self.pss and self._samples % self.pss_every == 0
        self._samples += 1
        rss = pss = 0
        for pid in pids:
            st = _stat(pid)
            if st is not None:
                self.seen.setdefault(pid, st[1])
            r, p = memory_of(pid, with_pss)
            rss, pss = rss + r, pss + p
        with self._lock:
            self.last_pids = pids
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        return rss, pss

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self.sample()

    def reset(self) -> None:
        with self._lock:
            self.peak_rss = self.peak_pss = 0
            self._samples = 0  # (the next sample reads PSS)

    def peaks_mib(self) -> tuple[float, float | None]:
        with self._lock:
            return round(self.peak_rss / 2**20, 1), (round(self.peak_pss / 2**20, 1) if self.pss else None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def alive(pid: int, start_time: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] == start_time and not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
        return text[text.rindex(")") + 2] == "Z"
    except OSError:
        return True


CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_label(pid: int) -> str:
    """A short name for a process of a system's tree (a Triton stub by its model instance)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return str(pid)
    if not argv:
        return str(pid)
    exe = os.path.basename(argv[0])
    if exe == "triton_python_backend_stub" and len(argv) >= 3:
        return f"stub {argv[-2]}"  # e.g. "stub llm_0_0"
    if exe == "tritonserver":
        return "tritonserver"
    if "tritonvlm.cli" in argv or "serve" in argv:
        return "frontend" if "tritonvlm.cli" in argv else "server"
    return exe


def cpu_seconds(pids: list[int]) -> dict[str, float]:
    """CPU time (user + system) consumed so far by each process, by label."""
    out: dict[str, float] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        label = process_label(pid)
        out[label] = out.get(label, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    delta = {k: round(v - before.get(k, 0.0), 2) for k, v in after.items()}
    return dict(sorted(((k, v) for k, v in delta.items() if v > 0), key=lambda kv: -kv[1]))


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def thread_env_report(pids: list[int], threads: int) -> str:
    """How many of the processes carry OMP_NUM_THREADS=<threads> in their environment."""
    good = total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        total += 1
        good += f"OMP_NUM_THREADS={threads}".encode() in env
    return f"OMP_NUM_THREADS={threads} in {good}/{total} processes of the tree"


class Managed:
    """A subprocess in its own session whose whole tree (including grandchildren that start their
    own sessions, like tritonserver) is stopped by :meth:`stop`."""

    registry: list[Managed] = []

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path, **kw: Any) -> None:
        self.name, self.log_path = name, log_path
        self.metrics_url: str | None = None
        self.triton_url: str | None = None
        self._log = open(log_path, "wb")  # noqa: SIM115 (open for the process's life)
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=kw.pop("stdout", self._log), stderr=self._log, start_new_session=True, **kw
        )
        Managed.registry.append(self)
        self.sampler = MemorySampler(self.proc.pid)

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, grace: float = 60.0) -> None:
        """SIGTERM the root (servers shut their children down), then SIGKILL whatever is left."""
        if self not in Managed.registry:
            return
        Managed.registry.remove(self)
        with contextlib.suppress(Exception):
            self.sampler.sample()  # the freshest view of the tree before anything exits
        self.sampler.stop()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop in {grace:.0f}s after SIGTERM: killing its process tree")
        leftovers = [pid for pid, start in self.sampler.seen.items() if alive(pid, start)]
        if leftovers:
            groups = set()
            for pid in leftovers:
                with contextlib.suppress(OSError):
                    groups.add(os.getpgid(pid))
            for pgid in groups - {os.getpgid(0)}:
                with contextlib.suppress(OSError):
                    os.killpg(pgid, signal.SIGKILL)
            for pid in leftovers:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._log.close()
        if leftovers:
            # Shared-memory regions of a killed tritonserver are named after the serve process's pid.
            from tritonvlm.launcher import SHM_DIR, launcher_shm_prefix

            for path in Path(SHM_DIR).glob(launcher_shm_prefix(self.proc.pid) + "*"):
                with contextlib.suppress(OSError):
                    path.unlink()
            log(f"{self.name}: killed {len(leftovers)} leftover process(es)")

    @classmethod
    def stop_all(cls) -> None:
        for managed in list(reversed(cls.registry)):
            managed.stop(grace=30.0)


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def wait_healthy(server: Managed, url: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{server.name} not healthy after {timeout:.0f}s:\n{server.log_tail()}")


def engine_metrics(url: str | None) -> dict[str, float]:
    """The ``tritonvlm_*`` series of Triton's metrics endpoint (name{labels} -> value)."""
    if not url:
        return {}
    import httpx

    out: dict[str, float] = {}
    with contextlib.suppress(httpx.HTTPError, ValueError):
        for line in httpx.get(url, timeout=5).text.splitlines():
            if line.startswith("tritonvlm_"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
    return out


def triton_stats(url: str | None) -> dict[str, dict[str, float]]:
    """Triton's per-model statistics (``/v2/models/stats``): counts and cumulative ns per model."""
    if not url:
        return {}
    import httpx

    out: dict[str, dict[str, float]] = {}
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        for model in httpx.get(url + "/v2/models/stats", timeout=5).json()["model_stats"]:
            inf = model["inference_stats"]
            out[model["name"]] = {
                "requests": float(inf["success"]["count"]),
                "executions": float(model.get("execution_count", 0)),
                "queue_ns": float(inf["queue"]["ns"]),
                "compute_ns": sum(
                    float(inf[k]["ns"]) for k in ("compute_input", "compute_infer", "compute_output")
                ),
            }
    return out


def stage_view(
    before: dict[str, float],
    after: dict[str, float],
    stats_before: dict[str, dict[str, float]],
    stats_after: dict[str, dict[str, float]],
    requests: int,
) -> dict[str, Any]:
    """Where a request's time goes, in mean ms per request (or per step): Triton's own per-model
    statistics for the stateless models, the vlm model's and the engine's histograms for the rest."""

    def delta(prefix: str) -> float:
        return sum(v - before.get(k, 0.0) for k, v in after.items() if k.startswith(prefix))

    def mean_ms(histogram: str) -> float | None:
        n = delta(histogram + "_count")
        return round(1000 * delta(histogram + "_sum") / n, 2) if n else None

    view: dict[str, Any] = {}
    for model in ("preprocess", "vision_encoder"):
        a, b = stats_after.get(model), stats_before.get(model, {})
        if not a:
            continue
        n = a["requests"] - b.get("requests", 0.0)
        execs = a["executions"] - b.get("executions", 0.0)
        if n:
            view[f"{model}_queue_ms"] = round((a["queue_ns"] - b.get("queue_ns", 0.0)) / n / 1e6, 2)
            view[f"{model}_compute_ms"] = round((a["compute_ns"] - b.get("compute_ns", 0.0)) / n / 1e6, 2)
            if execs:
                view[f"{model}_mean_batch"] = round(n / execs, 2)
    view["vlm_admission_ms"] = mean_ms("tritonvlm_vlm_admission_seconds")
    view["engine_queue_ms"] = mean_ms("tritonvlm_engine_queue_seconds")
    view["prefill_step_ms"] = mean_ms("tritonvlm_engine_prefill_step_seconds")
    view["decode_step_ms"] = mean_ms("tritonvlm_engine_decode_step_seconds")
    sends = delta("tritonvlm_vlm_responses_total")
    send_seconds = delta("tritonvlm_vlm_response_send_seconds_total")
    view["send_ms"] = round(1000 * send_seconds / sends, 2) if sends else None
    view["responses_per_request"] = round(sends / requests, 1) if requests else None
    view["send_ms_per_request"] = round(1000 * send_seconds / requests, 2) if requests else None
    return {k: v for k, v in view.items() if v is not None}


KV_SERIES = 'tritonvlm_engine_kv_cache_{kind}{{model="vlm",state="{state}"}}'


def engine_view(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the engine saw during a level (from the metrics' deltas): steps, batch, step time, TTFT."""

    def delta(prefix: str) -> float:
        return sum(v - before.get(k, 0.0) for k, v in after.items() if k.startswith(prefix))

    decode_steps = delta('tritonvlm_engine_steps_total{model="vlm",phase="decode"}')
    decode_tokens = delta('tritonvlm_engine_tokens_total{model="vlm",phase="decode"}')
    itl_n = delta("tritonvlm_engine_inter_token_latency_seconds_count")
    ttft_n = delta("tritonvlm_engine_time_to_first_token_seconds_count")
    if not decode_steps:
        return {}
    itl_sum = delta("tritonvlm_engine_inter_token_latency_seconds_sum")
    ttft_sum = delta("tritonvlm_engine_time_to_first_token_seconds_sum")
    return {
        "prefill_steps": int(delta('tritonvlm_engine_steps_total{model="vlm",phase="prefill"}')),
        "decode_steps": int(decode_steps),
        "mean_decode_batch": round(decode_tokens / decode_steps, 2),
        "mean_step_interval_ms": round(1000 * itl_sum / itl_n, 2) if itl_n else None,
        "mean_engine_ttft_ms": round(1000 * ttft_sum / ttft_n, 2) if ttft_n else None,
        # High-water marks since the server started (levels run in increasing concurrency).
        "kv_peak_tokens": int(after.get('tritonvlm_engine_kv_cache_tokens{model="vlm",state="peak"}', 0)),
        "kv_peak_mib": round(
            after.get('tritonvlm_engine_kv_cache_bytes{model="vlm",state="peak"}', 0) / 2**20, 1
        ),
        "kv_capacity_mib": round(
            after.get('tritonvlm_engine_kv_cache_bytes{model="vlm",state="capacity"}', 0) / 2**20, 1
        ),
    }


def start_tritonvlm(model_dir: Path, args: argparse.Namespace, logs: Path) -> tuple[Managed, str]:
    port = free_port()
    metrics_port = free_port()
    http_port = free_port()
    state = logs / "tritonvlm-state"
    state.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "tritonvlm.cli", "--log-level", args.server_log_level, "serve",
        "--model", str(model_dir),
        "--model-repository", str(args.model_repository.resolve()),
        "--served-model-name", SERVED_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--max-num-seqs", str(args.max_num_seqs),
        "--state-dir", str(state),
        "--triton-metrics-port", str(metrics_port),
        "--triton-http-port", str(http_port),
        "--startup-timeout", str(args.startup_timeout),
    ]  # fmt: skip
    cmd += shlex.split(getattr(args, "serve_flags", "") or "")  # (scripts that build on this one)
    server = Managed(
        "tritonvlm serve", cmd, child_env(args.threads), logs / "tritonvlm-serve.log", cwd=REPO_ROOT
    )
    server.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    server.triton_url = f"http://127.0.0.1:{http_port}"
    base = f"http://127.0.0.1:{port}"
    wait_healthy(server, base + "/health", args.startup_timeout + 30)
    return server, base


TRANSFORMERS_SERVE = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
import tritonvlm.modeling.processor  # registers the torchvision-free Qwen2.5-VL processor
from transformers.cli.transformers import app
app(args=sys.argv[2:], prog_name="transformers")
"""


def ensure_transformers_serving() -> None:
    """Install ``transformers[serving]`` (the peer's extras: accelerate, rich) into this venv, pinned to
    the transformers already installed, so the comparison runs on a fresh setup too."""
    import importlib.util

    if importlib.util.find_spec("accelerate") is not None and importlib.util.find_spec("rich") is not None:
        return
    import transformers

    spec = f"transformers[serving]=={transformers.__version__}"
    log(f"installing the peer's extras into {sys.prefix}: {spec} (once)")
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", spec]
    if subprocess.run(cmd).returncode != 0:
        raise RuntimeError(f"could not install {spec}: transformers serve cannot run")


def start_transformers(model_dir: Path, args: argparse.Namespace, logs: Path) -> tuple[Managed, str]:
    ensure_transformers_serving()
    port = free_port()
    cmd = [
        sys.executable, "-c", TRANSFORMERS_SERVE, str(args.threads),
        "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
    ]  # fmt: skip
    server = Managed("transformers serve", cmd, child_env(args.threads), logs / "transformers-serve.log")
    base = f"http://127.0.0.1:{port}"
    wait_healthy(server, base + "/health", args.startup_timeout)
    return server, base


# ---- the HTTP load generator -------------------------------------------------------------------------


async def stream_one(client: Any, url: str, body: dict[str, Any], rec: RequestRecord) -> None:
    """One streaming chat completion; timestamps every chunk that carries text."""
    rec.start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                obj = json.loads(data)
                if "error" in obj:
                    rec.error = f"stream error: {str(obj['error'])[:300]}"
                    return
                if obj.get("usage"):
                    rec.usage = obj["usage"]
                    rec.tokens = int(obj["usage"].get("completion_tokens") or 0)
                for choice in obj.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        rec.token_times.append(now)
                        rec.text += choice["delta"]["content"]
    except asyncio.CancelledError:  # the level ran out of time
        rec.error = "timed out"
        raise
    except Exception as exc:  # a failed request is counted, not fatal
        rec.error = f"{type(exc).__name__}: {exc}"
    finally:
        rec.end = time.perf_counter()


async def run_level_http(
    label: str,
    url: str,
    body: dict[str, Any],
    level: int,
    n_requests: int,
    timeout: float,
    quiet: bool = False,
) -> tuple[list[RequestRecord], float, bool]:
    """``level`` closed-loop clients until ``n_requests`` are done (or ``timeout`` passes)."""
    import httpx

    records: list[RequestRecord] = []
    counter = iter(range(n_requests))
    limits = httpx.Limits(max_connections=level + 4, max_keepalive_connections=level + 4)
    request_timeout = httpx.Timeout(timeout, connect=30.0)
    async with httpx.AsyncClient(timeout=request_timeout, limits=limits) as client:

        async def worker() -> None:
            for _ in counter:
                rec = RequestRecord()
                records.append(rec)
                await stream_one(client, url, body, rec)

        async def progress(started: float) -> None:
            while True:
                await asyncio.sleep(10)
                done = sum(1 for r in records if r.end)
                log(f"  {label}: {done}/{n_requests} requests done, {time.perf_counter() - started:.0f}s")

        started = time.perf_counter()
        ticker = None if quiet else asyncio.create_task(progress(started))
        tasks = [asyncio.create_task(worker()) for _ in range(level)]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if ticker is not None:
            ticker.cancel()
        timed_out = bool(pending)
        ends = [r.end for r in records if r.end]
        wall = (max(ends) if ends else time.perf_counter()) - started
    return records, wall, timed_out


def bench_server(system: str, model_dir: Path, messages: list, args: argparse.Namespace, logs: Path) -> dict:
    name = SYSTEM_NAMES[system]
    t0 = time.monotonic()
    log(f"[{system}] starting {name} ...")
    starter = start_tritonvlm if system == "a" else start_transformers
    server, base = starter(model_dir, args, logs)
    results: dict[str, Any] = {"system": name, "levels": {}}
    try:
        server.sampler.sample()
        results["startup_s"] = round(time.monotonic() - t0, 1)
        results["threads_env"] = thread_env_report(server.sampler.last_pids, args.threads)
        results["idle_rss_mib"], results["idle_pss_mib"] = server.sampler.peaks_mib()
        log(f"[{system}] {name} ready in {results['startup_s']}s ({results['threads_env']})")
        url = base + "/v1/chat/completions"
        model = SERVED_NAME if system == "a" else str(model_dir)
        warm = request_body(system, model, messages, min(8, args.max_tokens))
        records, _, _ = asyncio.run(run_level_http(f"[{system}] warm-up", url, warm, 2, 2, 300, quiet=True))
        if any(r.error for r in records):
            raise RuntimeError(f"{name}: warm-up request failed: {records[0].error}\n{server.log_tail()}")
        body = request_body(system, model, messages, args.max_tokens)
        for level in args.levels:
            n = args.requests_per_level or max(4, 2 * level)
            label = f"[{system}] {name} level {level}"
            log(f"{label}: {n} requests, {level} concurrent ...")
            server.sampler.reset()
            server.sampler.sample()
            before = engine_metrics(server.metrics_url)
            stats_before = triton_stats(getattr(server, "triton_url", None))
            cpu_before, client_before = cpu_seconds(server.sampler.last_pids), own_cpu()
            records, wall, timed_out = asyncio.run(
                run_level_http(label, url, body, level, n, args.level_timeout)
            )
            server.sampler.sample()
            summary = summarize(records, wall)
            summary["cpu_s"] = cpu_delta(cpu_before, cpu_seconds(server.sampler.last_pids))
            summary["client_cpu_s"] = round(own_cpu() - client_before, 2)
            after = engine_metrics(server.metrics_url)
            view = engine_view(before, after)
            if view:
                summary["engine"] = view
                log(f"{label}: engine view {view}")
                stages = stage_view(
                    before, after, stats_before, triton_stats(server.triton_url), summary["requests"]
                )
                summary["stages"] = stages
                log(f"{label}: stages (mean ms per request) {stages}")
            summary["peak_rss_mib"], summary["peak_pss_mib"] = server.sampler.peaks_mib()
            summary["timed_out"] = timed_out
            summary["loadavg_1m"] = round(os.getloadavg()[0], 2)
            results["levels"][level] = summary
            log(f"{label}: {fmt_summary(summary)} ({time.monotonic() - t0:.0f}s since start)")
            log(
                f"{label}: CPU seconds {summary['cpu_s']} (client {summary['client_cpu_s']}, wall {wall:.1f})"
            )
            if summary["errors"]:
                log(f"{label}: {summary['errors']} failed, first: {summary['first_error']}")
            if timed_out:
                log(f"{label}: timed out after {args.level_timeout:.0f}s: skipping {name}'s other levels")
                break
    finally:
        log(f"[{system}] stopping {name}")
        server.stop()
    return results


def fmt_summary(s: dict[str, Any]) -> str:
    return (
        f"{s['tokens_per_s']} tok/s, TTFT p50 {s['ttft_p50_ms']} ms, ITL p50 {s['itl_p50_ms']} ms, "
        f"peak RSS {s['peak_rss_mib']} MiB"
    )


# ---- c: the raw batched loop (worker process) --------------------------------------------------------


def raw_worker(args: argparse.Namespace) -> int:
    """Runs in a child process: the engine with no server. Speaks JSON lines on stdout."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from tritonvlm.engine import EngineConfig, LLMEngine, SamplingParams
    from tritonvlm.preprocessing import ChatPreprocessor

    def emit(**event: Any) -> None:
        print(json.dumps(event), flush=True)

    model_dir = str(args.model_dir)
    preprocess = ChatPreprocessor.from_pretrained(model_dir)
    family = preprocess.family
    wire_messages = [{"role": "user", "content": [{"type": "text", "text": PROMPT}, {"type": "image"}]}]
    png = make_png()
    model = family.load_model(model_dir)
    encoder = family.load_model(model_dir)  # the server's vision_encoder has its own copy too
    family.strip_for_vision(encoder)
    family.strip_for_decoder(model)
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=4096)
    engine = LLMEngine(model, preprocess.processor.tokenizer, config, family)
    seq = [0]

    def encode_round(n: int) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
        """Each request's own image work, as the server does it: decode + processor per request,
        then one family encode for the whole round (the server batches its encoder too)."""
        inputs = [preprocess(wire_messages, [png]) for _ in range(n)]
        batch = [{k: torch.from_numpy(np.asarray(v)) for k, v in x.mm.items()} for x in inputs]
        return [
            (x.input_ids.tolist(), mm) for x, mm in zip(inputs, family.encode(encoder, batch), strict=True)
        ]

    def run_round(n: int, max_tokens: int, records: list[RequestRecord], deadline: float) -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        pending = {}
        new = [RequestRecord(start=time.perf_counter()) for _ in range(n)]
        records.extend(new)
        for rec, (prompt_ids, mm) in zip(new, encode_round(n), strict=True):
            seq[0] += 1
            request_id = f"r{seq[0]}"
            pending[request_id] = rec

            def on_output(out: Any, rec: RequestRecord = rec) -> None:
                now = time.perf_counter()
                if out.token_ids:
                    rec.token_times.extend([now] * len(out.token_ids))
                if out.error:
                    rec.error = out.error
                if out.finished:
                    rec.end, rec.tokens = now, out.completion_tokens
                    pending.pop(out.request_id, None)

            engine.add_request(request_id, prompt_ids, params, on_output, mm)
        while pending:
            if time.perf_counter() > deadline:
                for request_id in list(pending):
                    engine.cancel(request_id)
                    pending[request_id].error = "timed out"
                engine.step()
                pending.clear()
                break
            engine.step()

    run_round(2, min(8, args.max_tokens), [], time.perf_counter() + 300)  # warm-up
    probe_ids, probe_mm = encode_round(1)[0]
    emit(event="ready", prompt_tokens=len(probe_ids), image_tokens=int(probe_mm["image_embeds"].shape[0]))
    for level in args.levels:
        n = args.requests_per_level or max(4, 2 * level)
        emit(event="level_start", level=level)
        records: list[RequestRecord] = []
        started = time.perf_counter()
        deadline = started + args.level_timeout
        while len(records) < n and time.perf_counter() < deadline:
            run_round(min(level, n - len(records)), args.max_tokens, records, deadline)
            print(f"[bench] [c] level {level}: {len(records)}/{n} requests", file=sys.stderr, flush=True)
        wall = max(r.end for r in records) - started if records else 0.0
        emit(event="level_end", level=level, summary=summarize(records, wall))
    return 0


def bench_raw(model_dir: Path, args: argparse.Namespace, logs: Path) -> dict:
    name = SYSTEM_NAMES["c"]
    t0 = time.monotonic()
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--raw-worker",
        "--model-dir", str(model_dir),
        "--levels", ",".join(map(str, args.levels)),
        "--max-tokens", str(args.max_tokens),
        "--threads", str(args.threads),
        "--max-num-seqs", str(args.max_num_seqs),
        "--level-timeout", str(args.level_timeout),
    ]  # fmt: skip
    if args.requests_per_level:
        cmd += ["--requests-per-level", str(args.requests_per_level)]
    log(f"[c] starting the {name} worker ...")
    worker = Managed(
        name, cmd, child_env(args.threads), logs / "raw-loop.log", stdout=subprocess.PIPE, text=True
    )
    results: dict[str, Any] = {"system": name, "levels": {}}
    try:
        assert worker.proc.stdout is not None
        for line in worker.proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event["event"] == "ready":
                worker.sampler.sample()
                results["startup_s"] = round(time.monotonic() - t0, 1)
                results["idle_rss_mib"], results["idle_pss_mib"] = worker.sampler.peaks_mib()
                results["prompt_tokens"], results["image_tokens"] = (
                    event["prompt_tokens"],
                    event["image_tokens"],
                )
                log(f"[c] ready in {results['startup_s']}s (prompt {event['prompt_tokens']} tokens)")
            elif event["event"] == "level_start":
                worker.sampler.reset()
                worker.sampler.sample()
                cpu_before = cpu_seconds(worker.sampler.last_pids)
                log(f"[c] {name} level {event['level']} ...")
            elif event["event"] == "level_end":
                worker.sampler.sample()
                summary = event["summary"]
                summary["peak_rss_mib"], summary["peak_pss_mib"] = worker.sampler.peaks_mib()
                summary["timed_out"] = False
                summary["cpu_s"] = cpu_delta(cpu_before, cpu_seconds(worker.sampler.last_pids))
                summary["loadavg_1m"] = round(os.getloadavg()[0], 2)
                results["levels"][event["level"]] = summary
                log(f"[c] {name} level {event['level']}: {fmt_summary(summary)}")
        if worker.proc.wait() != 0:
            raise RuntimeError(f"the raw-loop worker failed ({worker.proc.returncode}):\n{worker.log_tail()}")
    finally:
        worker.stop(grace=10)
    return results


# ---- report ------------------------------------------------------------------------------------------


def _f(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(x: float | None, y: float | None) -> float | None:
    return None if not x or not y else x / y


def report(results: dict[str, dict], levels: list[int]) -> str:
    header = (
        f"{'system':<20} {'conc':>4} {'reqs':>5} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'ITL p50':>8} {'ITL p99':>8} {'RSS MiB':>8} {'PSS MiB':>8} {'err':>4}"
    )
    lines = ["", "times in ms; memory = peak over the level, summed over the system's process tree", header]
    lines.append("-" * len(header))
    for level in levels:
        for key in ("a", "b", "c"):
            s = results.get(key, {}).get("levels", {}).get(level)
            if s is None:
                continue
            lines.append(
                f"{SYSTEM_NAMES[key]:<20} {level:>4} {s['requests']:>5} {_f(s['tokens_per_s']):>8} "
                f"{_f(s['ttft_p50_ms']):>9} {_f(s['ttft_p99_ms']):>9} {_f(s['itl_p50_ms']):>8} "
                f"{_f(s['itl_p99_ms']):>8} {_f(s['peak_rss_mib'], 0):>8} {_f(s['peak_pss_mib'], 0):>8} "
                f"{s['errors']:>4}"
            )
    stage_rows = [(lvl, results.get("a", {}).get("levels", {}).get(lvl, {}).get("stages")) for lvl in levels]
    if any(stages for _, stages in stage_rows):
        lines += ["", "tritonvlm: where a request's time goes (mean ms; per request unless marked per step)"]
        for level, stages in stage_rows:
            if stages:
                lines.append(f"  conc {level:>3}: " + ", ".join(f"{k}={v}" for k, v in stages.items()))
    if "a" in results and ("b" in results or "c" in results):
        lines += [
            "",
            f"{'conc':>4} {'tok/s a/b':>10} {'tok/s a/c':>10} {'TTFT p50 a/b':>13} {'TTFT p50 a/c':>13}",
        ]
        for level in levels:
            a = results["a"]["levels"].get(level, {})
            b = results.get("b", {}).get("levels", {}).get(level, {})
            c = results.get("c", {}).get("levels", {}).get(level, {})
            lines.append(
                f"{level:>4} {_f(ratio(a.get('tokens_per_s'), b.get('tokens_per_s')), 2):>10} "
                f"{_f(ratio(a.get('tokens_per_s'), c.get('tokens_per_s')), 2):>10} "
                f"{_f(ratio(a.get('ttft_p50_ms'), b.get('ttft_p50_ms')), 2):>13} "
                f"{_f(ratio(a.get('ttft_p50_ms'), c.get('ttft_p50_ms')), 2):>13}"
            )
        lines += ["", TARGETS]

        def get(system: str, level: int, key: str) -> float | None:
            return results.get(system, {}).get("levels", {}).get(level, {}).get(key)

        # (metric, label, level, other system, bound, higher is better): a's metric over the other's
        checks = [
            ("tokens_per_s", "tok/s", 8, "b", 4.0, True),
            ("tokens_per_s", "tok/s", 8, "c", 0.85, True),
            ("ttft_p50_ms", "TTFT p50", 1, "b", 1.3, False),
            ("ttft_p50_ms", "TTFT p50", 1, "c", 1.5, False),
            ("tokens_per_s", "tok/s", 8, "c", 0.8, True),
        ]
        for key, name, level, other, bound, higher in checks:
            label = f"{name} a/{other} at {level} {'>=' if higher else '<='} {bound:g}"
            value = ratio(get("a", level, key), get(other, level, key))
            if value is None:
                verdict = "not measured"
            else:
                met = value >= bound if higher else value <= bound
                verdict = f"{value:.2f} -> {'met' if met else 'MISSED'}"
            lines.append(f"  {label}: {verdict}")
    return "\n".join(lines)


def busy_processes() -> list[str]:
    """Other processes that used >= 20% of a CPU on average over their life (ps pcpu)."""
    ps = subprocess.run(["ps", "-eo", "pid=,pcpu=,args="], capture_output=True, text=True).stdout
    busy = []
    for line in ps.splitlines():
        pid, pcpu, command = (line.split(None, 2) + ["", ""])[:3]
        if pid.isdigit() and int(pid) != os.getpid() and float(pcpu or 0) >= 20.0:
            busy.append(f"{pcpu}% {command[:100]}")
    return busy


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    busy = busy_processes()
    git = ["git", "-C", str(REPO_ROOT)]
    head = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    )
    return {
        "git": f"{head or '?'}{' (modified files)' if dirty.stdout.strip() else ''}",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "busy_processes": busy,
        "python": platform.python_version(),
        "threads": args.threads,
    }


# ---- main --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--levels", default="1,2,4,8,16", help="concurrency levels (default 1,2,4,8,16)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (default 64)")
    parser.add_argument(
        "--requests-per-level",
        type=int,
        default=0,
        help="requests per level (default: 2 x level, at least 4)",
    )
    parser.add_argument("--systems", default="a,b,c", help="a: tritonvlm, b: transformers serve, c: raw loop")
    parser.add_argument(
        "--model-dir", type=Path, help="model directory (default: the medium test model, cached)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads for every system (default 2)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument(
        "--max-num-seqs", type=int, default=0, help="engine batch size (default max(16, level))"
    )
    parser.add_argument("--level-timeout", type=float, default=600.0, help="seconds per level (default 600)")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to start a server")
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=REPO_ROOT / "model_repository",
        help="Triton model repository for system a (default: the project's)",
    )
    parser.add_argument("--server-log-level", default="WARNING", help="tritonvlm serve --log-level (WARNING)")
    parser.add_argument("--logs", type=Path, help="where server logs go (default: a new temporary folder)")
    parser.add_argument("--raw-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--guided", action="store_true", help="measure constrained decoding's step overhead (engine only)"
    )
    args = parser.parse_args(argv)
    try:
        args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    except ValueError:
        parser.error("--levels must be comma-separated integers")
    if not args.levels or min(args.levels) < 1:
        parser.error("--levels must be positive")
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not set(args.systems) <= set(SYSTEM_NAMES):
        parser.error("--systems takes a comma-separated subset of a,b,c")
    args.max_num_seqs = args.max_num_seqs or max(16, *args.levels)
    if args.max_tokens < 2:
        parser.error("--max-tokens must be at least 2 (ITL needs two tokens)")
    return args


GUIDED_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "integer"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "score", "colour", "tags", "address"],
}


def bench_guided(model_dir: Path, args: argparse.Namespace) -> int:
    """Decode step time, free vs grammar-constrained, in the engine alone (see ``--guided``)."""
    import torch

    torch.set_num_threads(args.threads)
    from tritonvlm.engine import EngineConfig, LLMEngine, SamplingParams
    from tritonvlm.engine import guided as guided_module
    from tritonvlm.preprocessing import ChatPreprocessor

    preprocess = ChatPreprocessor.from_pretrained(str(model_dir))
    model = preprocess.family.load_model(str(model_dir))
    preprocess.family.strip_for_decoder(model)
    config = EngineConfig(max_num_seqs=max(args.levels), max_model_len=1024)
    engine = LLMEngine(model, preprocess.processor.tokenizer, config, preprocess.family)
    prompt = preprocess([{"role": "user", "content": PROMPT + " Answer in JSON."}], [])
    ids = [int(t) for t in prompt.input_ids]
    mask_time = [0.0]
    original = guided_module.GuidedDecoding.apply_masks

    def timed(self: Any, logits: Any, guides: Any) -> Any:
        t = time.perf_counter()
        out = original(self, logits, guides)
        mask_time[0] += time.perf_counter() - t
        return out

    guided_module.GuidedDecoding.apply_masks = timed  # type: ignore[method-assign]
    constraints = {
        "json_object": {"type": "json_object"},
        "schema": {"type": "json_schema", "schema": GUIDED_SCHEMA},
    }

    def run(level: int, guided: list[dict | None]) -> tuple[float, float, int]:
        """Mean decode step time (s) while all ``level`` sequences run, mask seconds per such step."""
        for i, spec in enumerate(guided):
            params = SamplingParams(
                max_tokens=args.max_tokens, temperature=1.0, seed=i, ignore_eos=True, guided=spec
            )
            engine.add_request(f"g{time.monotonic_ns()}-{i}", ids, params, lambda out: None)
        engine.step()  # prefill + first decode
        times, masks = [], []
        while engine.scheduler.running and len(engine.scheduler.running) == level:
            mask_time[0] = 0.0
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
            masks.append(mask_time[0])
        while engine.scheduler.has_work():
            engine.step()
        return sum(times) / max(1, len(times)), sum(masks) / max(1, len(masks)), len(times)

    engine.guided.start(constraints["schema"])  # the tokenizer's one-off set-up, outside the timings
    run(2, [None, constraints["schema"]])  # warm-up

    def say(line: str) -> None:
        print(line, flush=True)

    say(f"constrained decoding, {model_dir.name}, vocab {engine.vocab_size}, threads {args.threads}")
    say(f"{'level':>5} {'requests':<24} {'steps':>5} {'ms/step':>8} {'overhead':>9} {'mask ms':>8}")
    for level in args.levels:
        base, _, steps = run(level, [None] * level)
        say(f"{level:>5} {'free':<24} {steps:>5} {base * 1e3:8.2f} {'':>9} {'':>8}")
        cases = [(name, [spec] * level) for name, spec in constraints.items()]
        cases.append(
            ("half schema, half free", [constraints["schema"], None] * (level // 2) + [None] * (level % 2))
        )
        for name, guided in cases:
            step, mask, steps = run(level, guided)
            over = f"{(step - base) * 1e3:+.2f} ms"
            say(f"{level:>5} {name:<24} {steps:>5} {step * 1e3:8.2f} {over:>9} {mask * 1e3:8.2f}")
    return 0


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.raw_worker:
        return raw_worker(args)
    if args.guided:
        return bench_guided(ensure_model(args.model_dir).resolve(), args)
    signal.signal(signal.SIGTERM, _terminate)
    os.environ.update(OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    model_dir = ensure_model(args.model_dir).resolve()
    logs = args.logs or Path(tempfile.mkdtemp(prefix="tritonvlm-bench-"))
    logs.mkdir(parents=True, exist_ok=True)
    info = machine_info(args)
    log(f"model {model_dir}; levels {args.levels}; {args.max_tokens} tokens/request; threads {args.threads}")
    log(f"machine: {info['cpus']} CPUs, load {info['loadavg']}; code {info['git']}; logs in {logs}")
    if info["busy_processes"]:
        log("other busy processes (figures will be distorted): " + "; ".join(info["busy_processes"]))
    messages = chat_messages(make_png())
    results: dict[str, dict] = {}
    started = time.monotonic()
    failed = False
    try:
        for system in args.systems:
            try:
                if system == "c":
                    results["c"] = bench_raw(model_dir, args, logs)
                else:
                    results[system] = bench_server(system, model_dir, messages, args, logs)
            except Exception as exc:  # one system failing does not stop the others
                failed = True
                log(f"[{system}] {SYSTEM_NAMES[system]} failed: {exc}")
                results[system] = {"system": SYSTEM_NAMES[system], "error": str(exc), "levels": {}}
            finally:
                Managed.stop_all()
    except KeyboardInterrupt:
        log("interrupted: stopping servers")
        failed = True
    finally:
        Managed.stop_all()
        if results:
            print(report(results, args.levels), flush=True)
            info_end = {
                "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                "busy_processes_end": busy_processes(),
            }
            print(
                f"\nrun {info['time_utc']}, {time.monotonic() - started:.0f}s; code {info['git']}; "
                f"{info['cpus']} CPUs, torch threads {args.threads}; load {info['loadavg']} at start, "
                f"{info_end['loadavg_end']} at end",
                flush=True,
            )
            for when, busy in (("start", info["busy_processes"]), ("end", info_end["busy_processes_end"])):
                if busy:
                    print(
                        f"other busy processes at {when} (figures distorted): {'; '.join(busy)}", flush=True
                    )
            for key, res in results.items():
                if res.get("error"):
                    print(f"{SYSTEM_NAMES[key]} failed: {res['error'][:500]}", flush=True)
            if args.json:
                payload = {
                    "config": {
                        "model_dir": str(model_dir),
                        "levels": args.levels,
                        "max_tokens": args.max_tokens,
                        "requests_per_level": args.requests_per_level or "max(4, 2*level)",
                        "threads": args.threads,
                        "max_num_seqs": args.max_num_seqs,
                        "image": "224x224 PNG (data: URL)",
                        "prompt": PROMPT,
                    },
                    "machine": {**info, **info_end},
                    "results": results,
                }
                args.json.write_text(json.dumps(payload, indent=2))
                log(f"results written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
