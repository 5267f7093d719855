"""The container and deployment files: Dockerfile, compose.yaml and deploy/kubernetes/*.yaml.

No Docker engine or cluster is needed: the files are parsed and checked for what the README promises
(the NGC base image matching the Triton the local launcher runs, a non-root user, a health check, the
ports, a GPU, a model volume, probes on /health, Prometheus annotations).
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
K8S_DIR = ROOT / "deploy" / "kubernetes"

# NGC container release -> the Triton server version inside it (Triton's release notes).
NGC_TO_TRITON = {
    "24.08": "2.49",
    "24.09": "2.50",
    "24.10": "2.51",
    "24.11": "2.52",
    "24.12": "2.53",
    "25.01": "2.54",
    "25.02": "2.55",
}
EXPECTED_NGC_RELEASE = "24.10"
API_PORT = 8000


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, comments dropped and ``\\`` continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            instructions.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def instruction_args(keyword: str) -> list[str]:
    return [args for kw, args in dockerfile_instructions() if kw == keyword]


def base_image() -> str:
    froms = instruction_args("FROM")
    assert froms, "no FROM"
    return froms[-1].split()[0]  # the final stage's image


def exposed_ports() -> set[int]:
    ports: set[int] = set()
    for args in instruction_args("EXPOSE"):
        for item in args.split():
            ports.add(int(item.split("/")[0]))
    return ports


def entrypoint_args() -> list[str]:
    (args,) = instruction_args("ENTRYPOINT")
    return json.loads(args)


def k8s_documents() -> list[dict]:
    docs: list[dict] = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None)
    return docs


def k8s_kind(kind: str) -> list[dict]:
    return [doc for doc in k8s_documents() if doc.get("kind") == kind]


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_base_image_is_ngc_tritonserver_24_10() -> None:
    image = base_image()
    repo, _, tag = image.partition(":")
    assert repo == "nvcr.io/nvidia/tritonserver"
    assert re.fullmatch(r"\d\d\.\d\d-py3", tag), tag
    assert tag.split("-")[0] == EXPECTED_NGC_RELEASE


def triton_version_of_local_launcher(tmp_path: Path) -> str:
    """Start the ``tritonserver`` the launcher finds (empty repository) and read its version from ``/v2``."""
    from tritonvlm.launcher import TritonNotFoundError, TritonServer, TritonStartError, find_tritonserver

    try:
        install = find_tritonserver()
    except TritonNotFoundError as exc:
        pytest.skip(f"no local tritonserver: {exc}")
    repo = tmp_path / "empty_repository"
    repo.mkdir()
    server = TritonServer(repo, state_dir=tmp_path / "state", install=install, startup_timeout=120)
    try:
        with server, urllib.request.urlopen(f"{server.http_url}/v2", timeout=10) as resp:
            return json.load(resp)["version"]
    except TritonStartError as exc:  # a binary that is there but cannot run here is a real failure
        pytest.fail(f"the local tritonserver did not start: {exc}")


def test_dockerfile_triton_matches_the_local_launcher(tmp_path: Path) -> None:
    ngc_release = base_image().split(":")[1].split("-")[0]
    assert ngc_release in NGC_TO_TRITON, f"add {ngc_release} to NGC_TO_TRITON"
    local = triton_version_of_local_launcher(tmp_path)
    major_minor = ".".join(local.split(".")[:2])
    assert major_minor == NGC_TO_TRITON[ngc_release], (
        f"the Dockerfile's base image {base_image()} has Triton {NGC_TO_TRITON[ngc_release]}, "
        f"the local launcher runs Triton {local}"
    )


def test_dockerfile_runs_as_non_root() -> None:
    users = instruction_args("USER")
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    kinds = [kw for kw, _ in dockerfile_instructions()]
    assert kinds.index("USER") > kinds.index("FROM")


def test_dockerfile_healthcheck_probes_health() -> None:
    (check,) = instruction_args("HEALTHCHECK")
    assert "CMD" in check.split()
    assert f"127.0.0.1:{API_PORT}/health" in check


def test_dockerfile_exposes_api_and_triton_ports() -> None:
    ports = exposed_ports()
    assert API_PORT in ports
    assert {8001, 8002} <= ports  # Triton gRPC and metrics


def test_dockerfile_entrypoint_binds_the_exposed_ports() -> None:
    args = entrypoint_args()
    assert args[:2] == ["tritonvlm", "serve"]

    def flag(name: str) -> str:
        return args[args.index(name) + 1]

    assert flag("--host") == "0.0.0.0"
    bound = {int(flag("--port"))}
    for name in ("--triton-grpc-port", "--triton-metrics-port", "--triton-http-port"):
        bound.add(int(flag(name)))
    assert bound == exposed_ports()


# ---------------------------------------------------------------- compose.yaml


def compose_service() -> dict:
    compose = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(compose, dict)
    services = compose["services"]
    assert list(services) == ["tritonvlm"]
    return services["tritonvlm"]


def test_compose_builds_and_names_the_image() -> None:
    service = compose_service()
    assert service["build"] in (".", {"context": "."})
    assert service["image"].split(":")[0] == "tritonvlm"


def test_compose_mounts_a_model_and_serves_it() -> None:
    service = compose_service()
    mounts = service["volumes"]
    model_mounts = [m for m in mounts if isinstance(m, dict) and m.get("target") == "/model"]
    assert len(model_mounts) == 1, mounts
    assert model_mounts[0]["read_only"] is True
    assert "TRITONVLM_MODEL_DIR" in model_mounts[0]["source"]
    command = service["command"]
    assert command[command.index("--model") + 1] == "/model"


def test_compose_reserves_gpus_and_publishes_the_api() -> None:
    service = compose_service()
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    published = {int(str(p).split(":")[-1].split("/")[0]) for p in service["ports"]}
    assert API_PORT in published
    assert published <= exposed_ports()
    assert service.get("shm_size"), "Triton's Python backend needs more than Docker's 64 MiB /dev/shm"


# ---------------------------------------------------------------- deploy/kubernetes


def test_k8s_documents_have_the_expected_kinds() -> None:
    docs = k8s_documents()
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), doc
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds.count("Deployment") == 1
    assert "Service" in kinds
    assert "PersistentVolumeClaim" in kinds
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def deployment_container() -> tuple[dict, dict]:
    (deployment,) = k8s_kind("Deployment")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    return pod, container


def resolve_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container["ports"] if "name" in p}
    return named[port]


def test_k8s_container_ports_match_the_dockerfile() -> None:
    _, container = deployment_container()
    ports = {p["containerPort"] for p in container["ports"]}
    assert ports == exposed_ports()


def test_k8s_probes_check_health_on_the_api_port() -> None:
    _, container = deployment_container()
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        http = container[probe]["httpGet"]
        assert http["path"] == "/health", probe
        assert resolve_port(container, http["port"]) == API_PORT, probe


def test_k8s_requests_a_gpu_and_mounts_the_model() -> None:
    pod, container = deployment_container()
    resources = container["resources"]
    assert int(resources["requests"]["nvidia.com/gpu"]) == 1
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1  # extended resources need limits == requests
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    model_arg = container["args"][container["args"].index("--model") + 1]
    (model_mount,) = [m for path, m in mounts.items() if model_arg.startswith(path.rstrip("/") + "/")]
    model_volume = volumes[model_mount["name"]]
    assert "persistentVolumeClaim" in model_volume or "hostPath" in model_volume
    if "persistentVolumeClaim" in model_volume:
        claims = {doc["metadata"]["name"] for doc in k8s_kind("PersistentVolumeClaim")}
        assert model_volume["persistentVolumeClaim"]["claimName"] in claims
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"


def test_k8s_runs_as_the_image_user() -> None:
    pod, container = deployment_container()
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_k8s_prometheus_scrapes_frontend_and_triton_metrics() -> None:
    pod, container = deployment_container()
    scraped: set[int] = set()
    annotated = [pod["metadata"].get("annotations", {})]
    annotated += [svc["metadata"].get("annotations", {}) for svc in k8s_kind("Service")]
    for notes in annotated:
        if notes.get("prometheus.io/scrape") == "true":
            assert notes["prometheus.io/path"] == "/metrics"
            scraped.add(int(notes["prometheus.io/port"]))
    assert scraped == {API_PORT, 8002}
    assert scraped <= {p["containerPort"] for p in container["ports"]}


def test_k8s_services_select_the_pod_and_target_its_ports() -> None:
    pod, container = deployment_container()
    labels = pod["metadata"]["labels"]
    for service in k8s_kind("Service"):
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert resolve_port(container, port.get("targetPort", port["port"])) in exposed_ports()
    api = [s for s in k8s_kind("Service") if any(p["port"] == API_PORT for p in s["spec"]["ports"])]
    assert api, "no Service for the OpenAI API"


def test_k8s_args_are_serve_flags() -> None:
    """The container args go after the image's ENTRYPOINT (`tritonvlm serve ...`): serve must accept them."""
    from tritonvlm.cli import build_parser

    _, container = deployment_container()
    args = build_parser().parse_args(["serve", *entrypoint_args()[2:], *container["args"]])
    assert args.model.startswith("/models/")
    compose_args = compose_service()["command"]
    resolved = [re.sub(r"\$\{[^}]*:-([^}]*)\}", r"\1", a) for a in compose_args]
    assert not any("${" in a for a in resolved)
    assert build_parser().parse_args(["serve", *resolved]).model == "/model"
