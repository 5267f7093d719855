"""Start and stop a real ``tritonserver`` process for this project.

Two installations are supported:

* a ``tritonserver`` on ``PATH`` (the NGC container ``nvcr.io/nvidia/tritonserver:24.10-py3``), whose
  backends live next to it (``/opt/tritonserver/backends``);
* the binary shipped in the ``nvidia-pytriton`` wheel (``pip install --no-deps nvidia-pytriton==0.7.0``).
  Only its binary, Python backend, stubs and bundled libraries are used; pytriton's Python API is
  never imported. A backend directory of *symlinks* is built under a state directory (a copied stub
  no longer finds its bundled libraries through its ``$ORIGIN`` rpath and the server hangs un-ready).

Typical use::

    with TritonServer("models/", state_dir=".state/triton") as server:
        client = InferenceServerClient(server.grpc_url)

With ``restart_dead_stubs=True`` the server runs with explicit model control and a
:class:`StubWatchdog` brings back any model whose Python-backend stub process dies (kill -9, the OOM
killer, a segfault): Triton 2.51's python backend no longer restarts stubs itself.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import importlib.util
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

logger = logging.getLogger("tritonvlm.launcher")

NGC_BACKENDS_DIR = Path("/opt/tritonserver/backends")
_PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
_STUB_NAME = "triton_python_backend_stub"
# Error-level lines a CPU-only server always logs; they do not explain a failure.
_HARMLESS_ERRORS = (
    "CudaDriverHelper has not been initialized",
    "Failed to initialize NVML",
    "DCGM unable to start",
)
# Printed by a stub whose libraries cannot be found: the server then waits forever, un-ready.
_FATAL_TEXT = "error while loading shared libraries"
_ERROR_LINE = re.compile(rf"^E\d{{4}} |failed to load|^error: |{_FATAL_TEXT}")
_INSTALL_HINT = (
    "No tritonserver found. Either run inside the NGC container "
    "(nvcr.io/nvidia/tritonserver:24.10-py3, which puts tritonserver on PATH) or install the "
    "wheel that ships the binary into this environment without its dependencies: "
    "`pip install --no-deps nvidia-pytriton==0.7.0`."
)


class TritonNotFoundError(RuntimeError):
    """No usable ``tritonserver`` installation was found."""


class TritonStartError(RuntimeError):
    """The server exited or did not become ready in time; the message carries the log tail."""


@dataclass(frozen=True)
class TritonInstall:
    """Where a ``tritonserver`` installation lives.

    Attributes:
        binary: the ``tritonserver`` executable.
        backend_source: for a PATH install, the ready backend directory (holding ``python/``); for the
            wheel, the wheel's ``backends/python`` folder whose files are linked into a state dir.
        stub: the ``triton_python_backend_stub`` matching the running interpreter (None if unknown).
        lib_dirs: extra folders to put on ``LD_LIBRARY_PATH`` (the wheel's ``nvidia_pytriton.libs``).
        from_wheel: True when the installation is the ``nvidia-pytriton`` wheel.
    """

    binary: Path
    backend_source: Path
    stub: Path | None
    lib_dirs: tuple[Path, ...] = field(default_factory=tuple)
    from_wheel: bool = False

    def backend_directory(self, state_dir: str | os.PathLike[str]) -> Path:
        """Return the ``--backend-directory`` to use, building the wheel's symlink folder if needed.

        For the wheel this creates ``<state_dir>/backends/python/`` with symlinks to
        ``libtriton_python.so``, ``triton_python_backend_utils.py`` and the stub (idempotent, safe to
        call concurrently). A PATH install's backend directory is returned unchanged.
        """
        if not self.from_wheel:
            return self.backend_source
        if self.stub is None:
            raise TritonNotFoundError("the nvidia-pytriton wheel has no stub for this Python")
        backends = Path(state_dir).resolve() / "backends"
        python_dir = backends / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        targets = {name: self.backend_source / name for name in _PYTHON_BACKEND_FILES}
        targets[_STUB_NAME] = self.stub
        for name, target in targets.items():
            _ensure_symlink(python_dir / name, target.resolve())
        return backends


def _ensure_symlink(link: Path, target: Path) -> None:
    """Make ``link`` a symlink to ``target``, replacing anything else atomically."""
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}.{secrets.token_hex(4)}")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def find_tritonserver() -> TritonInstall:
    """Locate a ``tritonserver``: the one on ``PATH`` first, else the ``nvidia-pytriton`` wheel's.

    Raises:
        TritonNotFoundError: neither exists (the message says how to install one), or the wheel has no
            stub for the running Python version.
    """
    on_path = shutil.which("tritonserver")
    if on_path:
        binary = Path(on_path).resolve()
        # /opt/tritonserver/bin/tritonserver -> /opt/tritonserver/backends
        backends = binary.parent.parent / "backends"
        if not backends.is_dir():
            backends = NGC_BACKENDS_DIR
        stub = backends / "python" / _STUB_NAME
        return TritonInstall(
            binary=binary,
            backend_source=backends,
            stub=stub if stub.exists() else None,
        )

    # find_spec on a top-level package does not import it (pytriton's Python API is never loaded).
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotFoundError(_INSTALL_HINT)
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    root = package_dir / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonNotFoundError(f"{binary} is missing (broken nvidia-pytriton install?). {_INSTALL_HINT}")
    stubs_dir = root / "python_backend_stubs"
    stub = stubs_dir / _python_version() / _STUB_NAME
    if not stub.is_file():
        have = sorted(p.name for p in stubs_dir.iterdir()) if stubs_dir.is_dir() else []
        raise TritonNotFoundError(
            f"nvidia-pytriton has no Python backend stub for Python {_python_version()} "
            f"(available: {', '.join(have) or 'none'})"
        )
    libs = package_dir.parent / "nvidia_pytriton.libs"
    return TritonInstall(
        binary=binary,
        backend_source=root / "backends" / "python",
        stub=stub,
        lib_dirs=(libs,) if libs.is_dir() else (),
        from_wheel=True,
    )


def _prepend(paths: Iterable[str], existing: str | None) -> str:
    """Join ``paths`` then ``existing`` with ``os.pathsep``, dropping empties and duplicates."""
    out: list[str] = []
    for entry in [*paths, *(existing or "").split(os.pathsep)]:
        if entry and entry not in out:
            out.append(entry)
    return os.pathsep.join(out)


def server_environment(install: TritonInstall, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Build the environment for ``tritonserver`` and its Python-backend stubs.

    The stub runs an embedded Python in isolated mode (``PYTHONPATH`` is ignored): putting the venv's
    ``bin/`` first on ``PATH`` makes it find and use this virtualenv; the interpreter's ``LIBDIR`` on
    ``LD_LIBRARY_PATH`` makes it load the matching ``libpython``; the wheel's ``nvidia_pytriton.libs``
    is added too. Thread settings (``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``: see the README's
    Benchmarking section for when ``PASSIVE`` helps) pass through from this environment. ``extra``
    entries override the result.
    """
    env = dict(os.environ)
    env["PATH"] = _prepend([os.path.dirname(sys.executable)], env.get("PATH"))
    lib_dirs: list[str] = []
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        lib_dirs.append(str(libdir))
    lib_dirs.extend(str(d) for d in install.lib_dirs)
    env["LD_LIBRARY_PATH"] = _prepend(lib_dirs, env.get("LD_LIBRARY_PATH"))
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Return ``count`` distinct TCP ports that were free on ``host`` a moment ago."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _session_processes(sid: int) -> list[int]:
    """PIDs of live (non-zombie) processes whose session id is ``sid`` (Linux ``/proc``)."""
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        # fields after the ")" closing the command name: state ppid pgrp session ...
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 4 and fields[0] not in ("Z", "X") and int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


def _process_state(pid: int) -> str | None:
    """The state letter of a process (``R``, ``S``, ``Z``...), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[0] if fields else None


SHM_DIR = "/dev/shm"
# tritonvlm_<pid namespace>_<launcher pid>_<random>_...: see TritonServer.shm_prefix
_SHM_NAME = re.compile(r"tritonvlm_(\d+)_(\d+)_[0-9a-f]+_")


def pid_namespace() -> str:
    """This process's PID namespace (its inode number; "0" where /proc does not say). A pid means a
    process only within its namespace: containers sharing /dev/shm (``--ipc=host``) do not share it."""
    try:
        return re.sub(r"\D", "", os.readlink("/proc/self/ns/pid")) or "0"
    except OSError:
        return "0"


def _mapped_files(directory: str) -> set[str]:
    """The files in ``directory`` some live process maps or holds open (Linux ``/proc``)."""
    held: set[str] = set()
    prefix = os.path.realpath(directory) + "/"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry}/maps", "rb") as f:
            for line in f:
                fields = line.split(maxsplit=5)  # address perms offset dev inode path
                path = fields[5].strip().decode(errors="replace") if len(fields) == 6 else ""
                if path.startswith(prefix):
                    held.add(path.removesuffix(" (deleted)"))
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{entry}/fd/{fd}")
                    if target.startswith(prefix):
                        held.add(target)
    return held


def launcher_shm_prefix(launcher_pid: int) -> str:
    """The start of the names of every shared-memory region the servers started by the launcher
    process ``launcher_pid`` (of this PID namespace) create; the trailing "_" keeps pid 12 from
    matching 123."""
    return f"tritonvlm_{pid_namespace()}_{launcher_pid}_"


def remove_stale_shm(shm_dir: str = SHM_DIR) -> dict[str, int]:
    """Remove the shared-memory regions that a ``tritonvlm`` launcher of this PID namespace which is
    gone left behind (its tritonserver killed with it, e.g. by SIGKILL) and that no live process maps
    or holds open. ``/dev/shm`` is memory, and in a container often only 64 MiB of it: leftovers of a
    few crashes could keep the next tritonserver from starting. Returns path -> bytes removed."""
    namespace = pid_namespace()
    candidates = []
    for name in os.listdir(shm_dir) if os.path.isdir(shm_dir) else ():
        found = _SHM_NAME.match(name)
        if found and found.group(1) == namespace and _process_state(int(found.group(2))) in (None, "Z", "X"):
            candidates.append(os.path.join(os.path.realpath(shm_dir), name))
    if not candidates:
        return {}
    held = _mapped_files(shm_dir)
    removed: dict[str, int] = {}
    for path in candidates:
        if path in held:
            continue
        with contextlib.suppress(OSError):
            size = os.stat(path).st_size
            os.unlink(path)
            removed[path] = size
    return removed


def find_stubs(shm_prefix: str) -> dict[int, str]:
    """``pid -> model name`` of the live Python-backend stubs whose shared-memory region starts with
    ``shm_prefix`` (the stubs of one :class:`TritonServer`). A stub's command line is ``stub
    <repository>/<model>/<version>/model.py <shm region> ...``."""
    stubs: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if len(argv) < 3 or not argv[0].endswith(_STUB_NAME.encode()):
            continue
        if not argv[2].decode(errors="replace").startswith(shm_prefix):
            continue
        if _process_state(int(entry)) in (None, "Z", "X"):
            continue
        parts = Path(argv[1].decode(errors="replace")).parts
        stubs[int(entry)] = parts[-3] if len(parts) >= 3 else parts[-1]
    return stubs


@dataclass
class StubRecovery:
    """One dead stub and how its model was brought back (times in seconds from its death being seen)."""

    model: str
    pid: int
    unloaded_after_s: float | None = None
    ready_after_s: float | None = None
    error: str | None = None


class StubWatchdog:
    """Brings back the model of a Python-backend stub process that died.

    python_backend 2.51 does not restart a dead stub (the restart was removed in 24.08): every later
    request to that model instance fails after about a second with "Stub process ... is not healthy",
    requests that were inside a decoupled model never get a final response, and Triton keeps reporting
    the model ready. This thread polls the server's stubs every ``poll_s`` seconds; when one is gone (or a
    zombie) it unloads its model and loads it again through Triton's model repository API, which starts
    fresh stubs. The model is not ready in between, which is what the frontend's ``/health`` and its
    stall check see. The server must run with ``--model-control-mode=explicit``.

    If ``tritonserver`` itself exits while it should run (its python backend can abort when a stub dies
    holding a lock shared with it: ``boost::interprocess::lock_exception``), the watchdog starts it
    again on the same ports; the new server gets a watchdog of its own.
    """

    def __init__(
        self,
        server: TritonServer,
        poll_s: float = 0.5,
        load_timeout_s: float = 600.0,
        on_recovery: Callable[[StubRecovery], None] | None = None,
    ) -> None:
        self.server = server
        self.poll_s = poll_s
        self.load_timeout_s = load_timeout_s
        self.on_recovery = on_recovery
        self.recoveries: list[StubRecovery] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._known: dict[int, str] = {}

    def start(self) -> StubWatchdog:
        """Start watching the stubs running now."""
        if self._thread is None:
            self._known = find_stubs(self.server.shm_prefix)
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="stub-watchdog", daemon=True)
            self._thread.start()
            models = sorted(self._known.values())
            logger.debug("watching %d Python-backend stubs: %s", len(models), models)
        return self

    def stop(self) -> None:
        """Stop watching. A recovery under way is abandoned: its HTTP call to Triton ends when the server
        stops (the thread is a daemon), so stopping never waits for a model load."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=1.0)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._check()
            except Exception:  # noqa: BLE001 - the watchdog must outlive any one failure
                logger.exception("stub watchdog check failed")

    def _check(self) -> None:
        if self.server.has_died():
            self._restart_server()
            return
        alive = find_stubs(self.server.shm_prefix)
        dead = {pid: model for pid, model in self._known.items() if pid not in alive}
        if not dead or not self.server.is_running():
            self._known = alive
            return
        for model in sorted(set(dead.values())):
            if self._stop.is_set():
                return
            pid = min(p for p, m in dead.items() if m == model)
            self._recover(model, pid)
        self._known = find_stubs(self.server.shm_prefix)

    def _restart_server(self) -> None:
        server = self.server
        record = StubRecovery("tritonserver", server.pid or -1)
        started = time.monotonic()
        logger.error(
            "tritonserver (pid %s) exited with code %s: starting it again", server.pid, server.exit_code
        )
        server.stop()  # cleans up its stubs and shared memory; stops this watchdog (ends its loop)
        try:
            server.start()
            server.wait_ready(self.load_timeout_s)  # starts the new server's watchdog
            record.ready_after_s = time.monotonic() - started
            logger.warning("tritonserver is back %.1fs after it died", record.ready_after_s)
        except Exception as exc:  # noqa: BLE001 - reported; nothing more can be done here
            record.error = str(exc)
            logger.error("could not start tritonserver again: %s", exc)
        self.recoveries.append(record)
        if self.on_recovery is not None:
            self.on_recovery(record)

    def _recover(self, model: str, pid: int) -> None:
        record = StubRecovery(model, pid)
        started = time.monotonic()
        logger.error("the Python-backend stub of model %r (pid %d) died: reloading the model", model, pid)
        try:
            self.server.unload_model(model, timeout=60.0)
            record.unloaded_after_s = time.monotonic() - started
            self.server.load_model(model, timeout=self.load_timeout_s)
            record.ready_after_s = time.monotonic() - started
            logger.warning("model %r is back %.1fs after its stub died", model, record.ready_after_s)
        except Exception as exc:  # noqa: BLE001 - reported; the next death is watched all the same
            record.error = str(exc)
            logger.error("could not bring model %r back: %s", model, exc)
        self.recoveries.append(record)
        if self.on_recovery is not None:
            self.on_recovery(record)


def _connect_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class TritonServer:
    """A ``tritonserver`` child process serving ``model_repository`` (a context manager).

    ``start()`` launches it in its own session (so stopping also kills the Python-backend stubs),
    ``wait_ready()`` blocks until ``/v2/health/ready`` answers 200, ``stop()`` terminates it and removes
    this instance's ``/dev/shm`` regions. ``with TritonServer(...) as s:`` does start + wait_ready and
    stop.
    """

    def __init__(
        self,
        model_repository: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        state_dir: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        log_file: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 120.0,
        log_verbose: int = 0,
        install: TritonInstall | None = None,
        restart_dead_stubs: bool = False,
    ) -> None:
        """Configure (but do not start) a server; ``None`` ports are picked free automatically.

        ``install`` defaults to :func:`find_tritonserver` (resolved at ``start()``).
        ``restart_dead_stubs``: run with explicit model control (every model loaded at start) and a
        :class:`StubWatchdog` from the moment the server is ready until it is stopped.
        """
        self.model_repository = Path(model_repository).resolve()
        self.host = host
        self.state_dir = Path(state_dir).resolve()
        self.env = dict(env or {})
        self.log_file = Path(log_file).resolve() if log_file else self.state_dir / "tritonserver.log"
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self.log_verbose = log_verbose
        self.install = install
        self.restart_dead_stubs = restart_dead_stubs
        self.watchdog: StubWatchdog | None = None
        auto = iter(free_ports(3, "127.0.0.1" if host in ("", "0.0.0.0") else host))
        self.http_port: int = http_port or next(auto)
        self.grpc_port: int = grpc_port or next(auto)
        self.metrics_port: int = metrics_port or next(auto)
        # Unique per launcher process and instance; the PID namespace tells whose pid it is
        # (remove_stale_shm).
        self.shm_prefix = f"{launcher_shm_prefix(os.getpid())}{secrets.token_hex(4)}_"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._started_at = 0.0

    # ------------------------------------------------------------------ properties
    @property
    def http_url(self) -> str:
        """Base URL of the HTTP/REST endpoint, e.g. ``http://127.0.0.1:8000``."""
        return f"http://{_connect_host(self.host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint (the form ``tritonclient.grpc`` expects)."""
        return f"{_connect_host(self.host)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """URL of the Prometheus metrics page, e.g. ``http://127.0.0.1:8002/metrics``."""
        return f"http://{_connect_host(self.host)}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        """PID of the server process (also its session/process-group id), None before ``start()``."""
        return self._proc.pid if self._proc else None

    def is_running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def has_died(self) -> bool:
        """Whether the server was started and its process has exited since (not through :meth:`stop`,
        which stops the watchdog that asks first)."""
        return self._proc is not None and not self.is_running()

    def command(self, backend_directory: str | os.PathLike[str]) -> list[str]:
        """The full ``tritonserver`` command line for this instance."""
        assert self.install is not None
        return [
            str(self.install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={Path(backend_directory).resolve()}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--log-verbose={self.log_verbose}",
            *(("--model-control-mode=explicit", "--load-model=*") if self.restart_dead_stubs else ()),
            *self.extra_args,
        ]

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> TritonServer:
        """Launch ``tritonserver`` (non-blocking; see :meth:`wait_ready`). Returns ``self``."""
        if self.is_running():
            return self
        if not self.model_repository.is_dir():
            raise TritonStartError(f"model repository {self.model_repository} is not a directory")
        if self.install is None:
            self.install = find_tritonserver()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        stale = remove_stale_shm()
        if stale:
            logger.warning(
                "removed %d shared-memory regions (%.1f MiB freed) left in %s by tritonvlm servers that "
                "are gone",
                len(stale),
                sum(stale.values()) / 2**20,
                SHM_DIR,
            )
        backend_dir = self.install.backend_directory(self.state_dir)
        cmd = self.command(backend_dir)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self._log_offset = log.tell()
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=server_environment(self.install, self.env),
                cwd=self.state_dir,
                start_new_session=True,
            )
        self._started_at = time.monotonic()
        atexit.register(self.stop)
        logger.info(
            "started tritonserver pid %d (%s, http %d, grpc %d, metrics %d, log %s)",
            self._proc.pid,
            self.model_repository,
            self.http_port,
            self.grpc_port,
            self.metrics_port,
            self.log_file,
        )
        logger.debug("command: %s", " ".join(cmd))
        return self

    def is_ready(self) -> bool:
        """One probe of ``/v2/health/ready``: True on HTTP 200."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2.0) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_ready(self, timeout: float | None = None) -> TritonServer:
        """Block until the server is ready; returns ``self``.

        Raises:
            TritonStartError: the process exited or ``timeout`` (default ``startup_timeout``) passed;
                the server is stopped first and the message has the exit code and the log's last lines.
        """
        if self._proc is None:
            raise TritonStartError("wait_ready() called before start()")
        timeout = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        delay = 0.05
        next_log_check = time.monotonic() + 1.0
        while True:
            code = self._proc.poll()
            if code is not None:
                self.stop()
                raise TritonStartError(
                    f"tritonserver exited with code {code} before becoming ready.\n{self._failure_report()}"
                )
            if self.is_ready():
                logger.info(
                    "tritonserver ready in %.1f s at %s", time.monotonic() - self._started_at, self.http_url
                )
                if self.restart_dead_stubs and self.watchdog is None:
                    self.watchdog = StubWatchdog(self).start()
                return self
            if time.monotonic() >= next_log_check:
                next_log_check = time.monotonic() + 1.0
                if _FATAL_TEXT in self._log_text():
                    self.stop()
                    raise TritonStartError(
                        "a Python backend stub could not load its shared libraries (the server would "
                        f"hang un-ready; is LD_LIBRARY_PATH complete?).\n{self._failure_report()}"
                    )
            if time.monotonic() >= deadline:
                self.stop()
                raise TritonStartError(
                    f"tritonserver was not ready after {timeout:.0f} s (stopped it).\n"
                    f"{self._failure_report()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _repository_call(self, model: str, action: str, timeout: float) -> None:
        request = urllib.request.Request(
            f"{self.http_url}/v2/repository/models/{model}/{action}", data=b"{}", method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise RuntimeError(f"{action} of model {model!r} failed: HTTP {exc.code} {detail}") from None

    def unload_model(self, model: str, timeout: float = 60.0) -> None:
        """Unload ``model`` (explicit model control); returns once Triton has unloaded it."""
        self._repository_call(model, "unload", timeout)

    def load_model(self, model: str, timeout: float = 600.0) -> None:
        """Load ``model`` (explicit model control); returns once it is ready. A model already loaded with
        the same configuration is left as it is (unload it first to restart its stubs)."""
        self._repository_call(model, "load", timeout)

    def _log_text(self) -> str:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError as exc:
            return f"<cannot read {self.log_file}: {exc}>"

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines this instance wrote to its log file."""
        return "\n".join(self._log_text().splitlines()[-lines:])

    def log_errors(self, limit: int = 20) -> list[str]:
        """Error lines of this run's log (``E…`` lines, "failed to load"), minus the CPU-only noise."""
        found = [
            line.strip()
            for line in self._log_text().splitlines()
            if _ERROR_LINE.search(line) and not any(h in line for h in _HARMLESS_ERRORS)
        ]
        return found[:limit]

    def _failure_report(self) -> str:
        errors = self.log_errors()
        head = "Errors in the log:\n" + "\n".join(f"  {e}" for e in errors) + "\n" if errors else ""
        return f"{head}Last lines of {self.log_file}:\n{self.log_tail()}"

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop the server and its stubs, then remove this instance's ``/dev/shm`` regions.

        Sends SIGTERM to the server's process group, waits up to ``timeout`` seconds, then SIGKILLs the
        group (and any straggler of its session). Idempotent. Returns the server's exit code (None if it
        was never started).
        """
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        proc = self._proc
        if proc is None:
            self._remove_shm()
            return None
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        pgid = proc.pid
        if proc.poll() is None:
            logger.info("stopping tritonserver pid %d", pgid)
            self._signal_group(pgid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("tritonserver pid %d ignored SIGTERM for %.0f s: killing it", pgid, timeout)
                self._signal_group(pgid, signal.SIGKILL)
                proc.wait()
        # Stubs normally exit with the server; anything of its session still alive after a grace
        # period is killed.
        deadline = time.monotonic() + min(timeout, 5.0)
        while _session_processes(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        leftovers = _session_processes(pgid)
        if leftovers:
            logger.warning("killing leftover processes of tritonserver session %d: %s", pgid, leftovers)
            self._signal_group(pgid, signal.SIGKILL)
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        self._remove_shm()
        return proc.returncode

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    def shm_files(self) -> list[str]:
        """This instance's shared-memory files (``/dev/shm/<shm_prefix>*``)."""
        return glob.glob(os.path.join(SHM_DIR, glob.escape(self.shm_prefix) + "*"))

    def _remove_shm(self) -> None:
        for path in self.shm_files():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                logger.debug("removed %s", path)

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"TritonServer({str(self.model_repository)!r}, http={self.http_port}, pid={self.pid}, {state})"
