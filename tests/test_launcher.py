"""Tests for tritonvlm.launcher: a real tritonserver on a throwaway Python-backend repository."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tritonvlm import launcher
from tritonvlm.launcher import (
    TritonNotFoundError,
    TritonServer,
    TritonStartError,
    find_tritonserver,
    free_ports,
    server_environment,
)

IDENTITY_CONFIG = """
name: "identity"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

IDENTITY_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out = pb_utils.Tensor("OUTPUT0", np.asarray(x, dtype=np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
"""

BROKEN_ERROR = "tritonvlm-test deliberate initialize failure 4242"

BROKEN_MODEL = f"""
import numpy as np  # noqa: F401


class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("{BROKEN_ERROR}")

    def execute(self, requests):
        return []
"""


def _write_model(repo: Path, name: str, model_py: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(IDENTITY_CONFIG.replace('"identity"', f'"{name}"'))
    (repo / name / "1" / "model.py").write_text(textwrap.dedent(model_py))


def _session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes in session ``sid``, read from /proc independently of the launcher."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] not in ("Z", "X") and int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (stubs get the shm region name as argv)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = (
                Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
            state = Path(f"/proc/{entry}/stat").read_text(errors="replace")
        except OSError:
            continue
        if text in cmdline and state[state.rfind(")") + 2] not in "ZX":
            found.append(int(entry))
    return found


def _shm_files(prefix: str) -> list[str]:
    return [f for f in os.listdir("/dev/shm") if f.startswith(prefix)]


def _assert_all_gone(server: TritonServer, sid: int) -> None:
    assert not server.is_running()
    assert not Path(f"/proc/{sid}").exists() or Path(f"/proc/{sid}/stat").read_text().split()[2] == "Z"
    assert _session_pids(sid) == []
    assert _processes_mentioning(server.shm_prefix) == []
    assert _shm_files(server.shm_prefix) == []


@pytest.fixture(scope="module")
def triton_available() -> None:
    try:
        find_tritonserver()
    except TritonNotFoundError as exc:
        pytest.skip(f"no tritonserver: {exc}")


# --------------------------------------------------------------------------- no server needed


def test_free_ports_distinct() -> None:
    ports = free_ports(3)
    assert len(set(ports)) == 3
    assert all(0 < p < 65536 for p in ports)


def test_server_environment(triton_available: None) -> None:
    install = find_tritonserver()
    env = server_environment(install, {"TRITONVLM_MODEL": "/x"})
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    ld = env["LD_LIBRARY_PATH"].split(os.pathsep)
    for d in install.lib_dirs:
        assert str(d) in ld
    assert env["TRITONVLM_MODEL"] == "/x"


def test_thread_settings_pass_through_to_the_models(triton_available: None, monkeypatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    env = server_environment(find_tritonserver())
    assert (env["OMP_WAIT_POLICY"], env["OMP_NUM_THREADS"]) == ("PASSIVE", "1")


def test_backend_directory_symlinks_idempotent(triton_available: None, tmp_path: Path) -> None:
    install = find_tritonserver()
    if not install.from_wheel:
        pytest.skip("backend directory is only built for the nvidia-pytriton wheel")
    first = install.backend_directory(tmp_path)
    second = install.backend_directory(tmp_path)
    assert first == second == tmp_path.resolve() / "backends"
    python_dir = first / "python"
    names = {"libtriton_python.so", "triton_python_backend_utils.py", "triton_python_backend_stub"}
    assert {p.name for p in python_dir.iterdir()} == names
    for name in names:
        link = python_dir / name
        assert link.is_symlink() and link.resolve().is_file()
    assert (python_dir / "triton_python_backend_stub").resolve() == install.stub.resolve()


def test_find_prefers_tritonserver_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An NGC-like layout: <root>/bin/tritonserver and <root>/backends/python/.
    binary = tmp_path / "opt" / "bin" / "tritonserver"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    stub = tmp_path / "opt" / "backends" / "python" / "triton_python_backend_stub"
    stub.parent.mkdir(parents=True)
    stub.write_text("")
    monkeypatch.setenv("PATH", str(binary.parent))
    install = find_tritonserver()
    assert install.binary == binary.resolve()
    assert not install.from_wheel
    assert install.stub == stub.resolve()
    assert install.backend_directory(tmp_path / "state") == (tmp_path / "opt" / "backends").resolve()


def test_find_reports_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(launcher.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TritonNotFoundError, match=r"pip install --no-deps nvidia-pytriton"):
        find_tritonserver()


def test_model_repository_must_exist(tmp_path: Path) -> None:
    server = TritonServer(tmp_path / "missing", state_dir=tmp_path / "state")
    with pytest.raises(TritonStartError, match="not a directory"):
        server.start()
    assert server.stop() is None  # never started: a no-op


# --------------------------------------------------------------------------- real tritonserver


@pytest.mark.e2e
def test_start_infer_stop(triton_available: None, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _write_model(repo, "identity", IDENTITY_MODEL)
    server = TritonServer(repo, state_dir=tmp_path / "state", startup_timeout=60)
    t0 = time.monotonic()
    with server:
        assert time.monotonic() - t0 < 60
        sid = server.pid
        assert sid is not None and server.is_running()
        assert server.grpc_url == f"127.0.0.1:{server.grpc_port}"
        # The Python backend's shared-memory regions carry this instance's prefix.
        assert _shm_files(server.shm_prefix)
        assert _processes_mentioning(server.shm_prefix), "no triton_python_backend_stub running"

        body = {"inputs": [{"name": "INPUT0", "shape": [3], "datatype": "FP32", "data": [1.5, -2.0, 3.25]}]}
        request = urllib.request.Request(
            f"{server.http_url}/v2/models/identity/infer",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            result = json.loads(resp.read())
        (output,) = result["outputs"]
        assert output["name"] == "OUTPUT0"
        assert output["data"] == [1.5, -2.0, 3.25]

        with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
            assert b"nv_inference_request_success" in resp.read()
    _assert_all_gone(server, sid)
    assert server.stop() == server.stop()  # idempotent
    assert (tmp_path / "state" / "tritonserver.log").read_text()


@pytest.mark.e2e
def test_failing_model_raises_with_log_tail(triton_available: None, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _write_model(repo, "identity", IDENTITY_MODEL)
    _write_model(repo, "broken", BROKEN_MODEL)
    server = TritonServer(repo, state_dir=tmp_path / "state", startup_timeout=60)
    t0 = time.monotonic()
    with pytest.raises(TritonStartError) as info, server:
        pytest.fail("server became ready despite a failing model")
    elapsed = time.monotonic() - t0
    assert elapsed < 45, f"failure took {elapsed:.1f} s to surface"
    message = str(info.value)
    assert BROKEN_ERROR in message
    assert "exited with code" in message
    sid = server.pid
    assert sid is not None
    _assert_all_gone(server, sid)


SLOW_MODEL = """
import time


class TritonPythonModel:
    def initialize(self, args):
        time.sleep(120)

    def execute(self, requests):
        return []
"""


@pytest.mark.e2e
def test_startup_timeout_stops_everything(triton_available: None, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _write_model(repo, "slow", SLOW_MODEL)
    server = TritonServer(repo, state_dir=tmp_path / "state", startup_timeout=4)
    t0 = time.monotonic()
    server.start()
    sid = server.pid
    assert sid is not None
    with pytest.raises(TritonStartError, match="not ready after 4 s"):
        server.wait_ready()
    assert time.monotonic() - t0 < 25
    _assert_all_gone(server, sid)


def _infer_identity(server: TritonServer) -> tuple[int, str]:
    body = {"inputs": [{"name": "INPUT0", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]}
    request = urllib.request.Request(
        f"{server.http_url}/v2/models/identity/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.e2e
def test_a_killed_stub_is_brought_back(triton_available: None, tmp_path: Path) -> None:
    """Triton 2.51 does not restart a dead stub (requests to it fail, the model stays "ready"): the
    watchdog reloads the model, and it answers again."""
    import signal

    repo = tmp_path / "repo"
    _write_model(repo, "identity", IDENTITY_MODEL)
    server = TritonServer(repo, state_dir=tmp_path / "state", startup_timeout=60, restart_dead_stubs=True)
    with server:
        assert server.watchdog is not None
        (pid,) = launcher.find_stubs(server.shm_prefix)
        assert launcher.find_stubs(server.shm_prefix) == {pid: "identity"}
        assert _infer_identity(server)[0] == 200
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not server.watchdog.recoveries and time.monotonic() < deadline:
            time.sleep(0.1)
        (recovery,) = server.watchdog.recoveries
        assert (recovery.model, recovery.pid, recovery.error) == ("identity", pid, None)
        assert recovery.ready_after_s is not None
        status, body = _infer_identity(server)
        assert status == 200, body
        (new_pid,) = launcher.find_stubs(server.shm_prefix)
        assert new_pid != pid
        sid = server.pid
    assert sid is not None
    _assert_all_gone(server, sid)


def test_stale_shared_memory_of_launchers_that_are_gone_is_removed(tmp_path: Path) -> None:
    import mmap
    import subprocess

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid no process has now
    ns = launcher.pid_namespace()
    names = {
        "stale": f"{launcher.launcher_shm_prefix(gone.pid)}0a1b2c3d_region-a",
        "mapped": f"{launcher.launcher_shm_prefix(gone.pid)}0a1b2c3d_region-b",  # launcher gone, still mapped
        "alive": f"{launcher.launcher_shm_prefix(os.getpid())}0a1b2c3d_region-c",  # this process launched it
        "elsewhere": f"tritonvlm_{ns}1_{gone.pid}_0a1b2c3d_region-d",  # another PID namespace's pid
        "other": "someone-else",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"\0" * 4096)
    with open(tmp_path / names["mapped"], "r+b") as f, mmap.mmap(f.fileno(), 4096):
        removed = launcher.remove_stale_shm(str(tmp_path))
        assert removed == {os.path.realpath(tmp_path / names["stale"]): 4096}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for k, n in names.items() if k != "stale")
