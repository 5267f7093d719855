"""Process faults end to end: kill -9 of a Triton model's stub process while requests run.

Triton 2.51's python backend does not restart a dead stub; ``serve``'s watchdog reloads the model.
For each model of the repository: a stream in flight ends (completes, or gets an error event: never a
hang), ``/health`` turns 503 while the model is reloaded and 200 once it is back, and then a request
that goes through every stage (an image) succeeds, all without restarting ``serve``. The recovery
times are printed (``-s``); ``scripts/soak.py --kill`` measures them under load. Last, kill -9 of
``tritonserver`` itself: ``serve`` starts it again.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ServerProcess, make_image, serving

from tritonvlm.launcher import find_stubs, launcher_shm_prefix

pytestmark = pytest.mark.e2e

REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"
MODELS = [
    m for m in ("preprocess", "vision_encoder", "vlm", "llm") if (REPOSITORY / m / "config.pbtxt").exists()
]
RECOVERY_TIMEOUT_S = 600.0  # a reload is a model load: minutes on a loaded 2-core machine
PNG_URL = "data:image/png;base64," + base64.b64encode(make_image(64, 64, "green")).decode()


@pytest.fixture(scope="module")
def fault_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    # A killed decoupled stub leaves requests Triton never releases: no clean-unload check.
    yield from serving(ServerProcess(tiny_model_dir, tmp_path_factory.mktemp("faults")), clean_unload=False)


def _stream(server: Any, outcome: dict[str, Any], started: threading.Event) -> None:
    body = {
        "model": "tiny",
        "stream": True,
        "max_tokens": 3000,
        "temperature": 0,
        "ignore_eos": True,
        "messages": [{"role": "user", "content": "A very long story, please."}],
    }
    try:
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=120) as r:
            outcome["status"] = r.status_code
            for line in r.iter_lines():
                started.set()
                if line.startswith("data: {") and '"error"' in line:
                    outcome["error"] = json.loads(line[6:])["error"]
                if line == "data: [DONE]":
                    outcome["done"] = True
    except httpx.HTTPError as exc:
        outcome["exception"] = repr(exc)
    finally:
        started.set()
        outcome["ended_at"] = time.monotonic()


def _health(server: Any) -> int:
    try:
        return httpx.get(server.base_url + "/health", timeout=5).status_code
    except httpx.HTTPError:
        return -1


def _wait_for_recovery(server: Any, killed_at: float, what: str) -> float:
    """When ``/health``, after turning 503, was 200 again."""
    seen_503 = False
    while time.monotonic() - killed_at < RECOVERY_TIMEOUT_S:
        status = _health(server)
        seen_503 = seen_503 or status == 503
        if seen_503 and status == 200:
            return time.monotonic()
        time.sleep(0.2)
    assert seen_503, f"/health never turned 503 after {what}"
    raise AssertionError(f"/health not back after {what}:\n{server.log_tail()}")


def _assert_image_request_succeeds(server: Any) -> None:
    content = [{"type": "image_url", "image_url": {"url": PNG_URL}}, {"type": "text", "text": "What is it?"}]
    after = httpx.post(
        server.base_url + "/v1/chat/completions",
        json={"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": content}]},
        timeout=120,
    )
    assert after.status_code == 200, after.text


@pytest.mark.parametrize("model", MODELS)
def test_kill_9_of_a_stub_is_survived(model: str, fault_server: Any) -> None:
    server = fault_server
    stubs = find_stubs(launcher_shm_prefix(server.proc.pid))
    victim = min(pid for pid, name in stubs.items() if name == model)
    outcome: dict[str, Any] = {}
    started = threading.Event()
    thread = threading.Thread(target=_stream, args=(server, outcome, started), daemon=True)
    thread.start()
    assert started.wait(60)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    recovered_at = _wait_for_recovery(server, killed_at, "the stub died")
    thread.join(60)
    assert not thread.is_alive(), "the stream in flight hung"
    assert outcome.get("status") == 200 and outcome.get("done"), outcome
    _assert_image_request_succeeds(server)
    ended = "failed: " + outcome["error"]["message"] if "error" in outcome else "ok"
    print(
        f"\n{model}: stream in flight {ended} ({outcome['ended_at'] - killed_at:+.1f}s), "
        f"/health back after {recovered_at - killed_at:.1f}s"
    )


def _tritonserver_pid(parent: int) -> int:
    """The tritonserver process ``serve`` (pid ``parent``) started."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == parent and name == "tritonserver":
            return int(entry.name)
    raise AssertionError(f"no tritonserver child of {parent}")


def test_kill_9_of_tritonserver_itself_is_survived(fault_server: Any) -> None:
    """The whole server dies (its python backend can abort when a stub dies holding a shared lock):
    ``serve`` starts it again on the same ports and requests go through once it is back."""
    server = fault_server
    victim = _tritonserver_pid(server.proc.pid)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    recovered_at = _wait_for_recovery(server, killed_at, "tritonserver died")
    assert _tritonserver_pid(server.proc.pid) != victim
    _assert_image_request_succeeds(server)
    print(f"\ntritonserver: /health back after {recovered_at - killed_at:.1f}s")
