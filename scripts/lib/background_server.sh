# shellcheck shell=bash
# Sourced by perf_analyzer.sh and genai_perf.sh: start `tritonvlm serve` on free loopback ports in the
# background, wait until it is healthy, and stop it when the calling script exits.
#
#   start_background_server VENV OUT_DIR [more serve flags]
#
# Sets server_pid, api_port and grpc_port. The server's output goes to OUT_DIR/serve.log and its
# state (tritonserver.log) to OUT_DIR/server. Log lines are prefixed with $LOG_PREFIX.

server_pid=""

# shellcheck disable=SC2317  # called by the EXIT trap
stop_background_server() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    echo "${LOG_PREFIX:-server}: stopping the server (pid $server_pid)" >&2
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true  # serve stops tritonserver and its stubs itself
  fi
}

start_background_server() {
  local venv=$1 out=$2
  shift 2
  trap stop_background_server EXIT
  trap 'exit 130' INT TERM
  local http_port metrics_port
  read -r api_port grpc_port http_port metrics_port < <("$venv/bin/python" - <<'PY'
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks:
    s.close()
PY
  )
  local serve_args=(serve --host 127.0.0.1 --port "$api_port" --triton-host 127.0.0.1
    --triton-grpc-port "$grpc_port" --triton-http-port "$http_port" --triton-metrics-port "$metrics_port"
    --state-dir "$out/server" "$@")
  echo "${LOG_PREFIX:-server}: starting tritonvlm ${serve_args[*]} (log: $out/serve.log)" >&2
  "$venv/bin/tritonvlm" "${serve_args[@]}" > "$out/serve.log" 2>&1 &
  server_pid=$!
  "$venv/bin/python" - "$api_port" "$server_pid" <<'PY' || { tail -n 30 "$out/serve.log" >&2; exit 1; }
import os, sys, time, urllib.request
url, pid = f"http://127.0.0.1:{sys.argv[1]}/health", int(sys.argv[2])
deadline = time.monotonic() + 600
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("the server exited before becoming healthy")
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(1)
sys.exit("the server was not healthy after 600 s")
PY
}
