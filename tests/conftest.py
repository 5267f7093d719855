"""Shared fixtures: the tiny test model (built once per session) and the reference transformers model."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernels run under Triton's interpreter on a CPU, which must be chosen before anything
    # imports triton (torch._dynamo does, when it is installed).
    os.environ.setdefault("TRITON_INTERPRET", "1")
from PIL import Image, ImageDraw


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2.5-VL test model (the default family)."""
    from tritonvlm.testmodels.qwen2_5_vl import build_test_model

    return build_test_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny")


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir: Path):
    from tritonvlm.families.qwen2_5_vl import Qwen2_5_VLFamily

    return Qwen2_5_VLFamily.load_model(str(tiny_model_dir))


@pytest.fixture(scope="session")
def processor(tiny_model_dir: Path):
    from tritonvlm.families.qwen2_5_vl import Qwen2_5_VLFamily

    return Qwen2_5_VLFamily.load_processor(str(tiny_model_dir))


@pytest.fixture(scope="session")
def family_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """``family_model_dir(name)``: that family's tiny test model, built once per session."""
    from tritonvlm.families import get_family

    built: dict[str, Path] = {"qwen2_5_vl": tiny_model_dir}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = Path(get_family(name).build_test_model(tmp_path_factory.mktemp("models") / name))
        return built[name]

    return get


@pytest.fixture(scope="session")
def family_kit(family_model_dir):
    """``family_kit(name)``: a :class:`family_harness.FamilyKit` (model, processor, references), cached."""
    from family_harness import FamilyKit

    kits: dict = {}

    def get(name: str):
        if name not in kits:
            kits[name] = FamilyKit(name, family_model_dir(name))
        return kits[name]

    return get


def make_image(width: int, height: int, color: str = "red", shape: str = "circle", fmt: str = "PNG") -> bytes:
    """A small synthetic picture, encoded."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    box = (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    else:
        draw.rectangle(box, fill=color)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# ---- end-to-end: a real `tritonvlm serve` (tritonserver + uvicorn) shared by the whole session ----


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`tritonvlm serve` in a subprocess on loopback; stopped with SIGTERM like a user's Ctrl-C."""

    def __init__(
        self,
        model_dir: Path | None,
        state_dir: Path,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        """``model_dir=None``: no ``--model`` and no ``--served-model-name`` (the built-in default).
        ``env``: extra environment variables for serve (and so for Triton's models)."""
        import os
        import subprocess
        import sys

        self.port = free_port()
        self.metrics_port = free_port()
        self.state_dir = state_dir
        self.log_path = state_dir / "serve.log"
        cmd = [
            sys.executable, "-m", "tritonvlm.cli", "serve",
            *(() if model_dir is None else ("--model", str(model_dir), "--served-model-name", "tiny")),
            "--port", str(self.port),
            "--triton-metrics-port", str(self.metrics_port),
            "--state-dir", str(state_dir),
            "--allow-private-media-urls",
            "--startup-timeout", "900",  # a loaded 2-core machine can take minutes to load 5 stubs
            *extra,
        ]  # fmt: skip
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (kept open for the process's life)
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def wait_healthy(self, timeout: float = 900.0) -> None:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonvlm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"tritonvlm serve not healthy after {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> int | None:
        import os
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def leftovers(self) -> list[str]:
        """Processes or shared-memory files this server left behind (its state dir names them all)."""
        import subprocess

        ps = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True).stdout
        procs = [line for line in ps.splitlines() if str(self.state_dir) in line and not line.startswith("Z")]
        # The launcher names its shared-memory regions after its own pid (the serve process).
        from tritonvlm.launcher import SHM_DIR, launcher_shm_prefix

        shm = [str(p) for p in Path(SHM_DIR).glob(launcher_shm_prefix(self.proc.pid) + "*")]
        return procs + shm


def serving(proc: ServerProcess, clean_unload: bool = True):
    """A fixture's body for a server: wait until healthy, yield it, then stop it and check that it
    exited cleanly and left nothing behind. ``clean_unload``: also check that tritonserver unloaded
    its models by itself (Triton 2.51 may not, once clients cancelled streams mid-way: serve then
    kills it after its grace period)."""
    try:
        proc.wait_healthy()
        yield proc
    finally:
        proc.stop()
    # SIGTERM (what Ctrl-C or a supervisor sends) must stop tritonserver and its stubs too, and
    # tritonserver must unload its models by itself (not be killed after serve's grace period).
    assert proc.proc.returncode == 0, proc.log_tail()
    assert proc.leftovers() == [], proc.leftovers()
    if clean_unload:
        assert "killing it" not in proc.log_path.read_text(errors="replace"), proc.log_tail()


# Requests whose id holds this text get NaN logits mid-stream in the shared server (the sampler's fault
# hook, off unless the variable is set): test_e2e_robust.py poisons one row of a running batch with it.
FAULT_TAG = "tritonvlm-fault-nan"


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    # The shared server also serves the tests that drop streams mid-way: no clean_unload check.
    proc = ServerProcess(
        tiny_model_dir, tmp_path_factory.mktemp("serve"), env={"TRITONVLM_FAULT_NAN_REQUESTS": FAULT_TAG}
    )
    yield from serving(proc, clean_unload=False)


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", timeout=120, max_retries=0)


class ImageServer:
    """A loopback HTTP server that serves test images by path."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        files: dict[str, tuple[bytes, str]] = {}
        self.files = files

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                if self.path not in files:
                    self.send_error(404)
                    return
                body, ctype = files[self.path]
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def add(self, path: str, body: bytes, content_type: str = "image/png") -> str:
        self.files[path] = (body, content_type)
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="session")
def image_server():
    srv = ImageServer()
    yield srv
    srv.close()
