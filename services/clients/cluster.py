"""The five servers as local processes (``parley up``, ``parley demo``, benchmarks), and health checks."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from services.common.config import DEFAULT_PORTS
from services.common.processes import describe_exit
from services.common.tls import ClientTls

STAGES = ("vad", "stt", "translate", "tts", "gateway")
BACKENDS = ("vad", "stt", "translate", "tts")
_PR_SET_PDEATHSIG = 1
LOG_TAIL_LINES = 15


def check_health(
    address: str, service: str = "", timeout_s: float = 3.0, tls: ClientTls | None = None
) -> str:
    """The ``grpc.health.v1`` status name of ``service`` at ``address`` (or the error code's name).

    Args:
        address: ``host:port`` of the server.
        service: Service name to check; empty for the whole server.
        timeout_s: Call timeout, in seconds.
        tls: How to verify the server; ``None``: plaintext.

    Raises:
        ConfigError: A TLS file cannot be read or holds no PEM certificate (key).
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.common.tls import open_sync_channel

    with open_sync_channel(address, tls) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies (Linux), so no server is orphaned."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Member:
    """One server process of a local cluster."""

    stage: str
    address: str
    process: subprocess.Popen
    pump: threading.Thread
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_TAIL_LINES))


class LocalCluster:
    """The five servers as child processes on fixed ports, logs prefixed with the stage name.

    Args:
        host: Address every server binds.
        ports: Port per stage.
        metrics_ports: Prometheus port per stage (absent: metrics off).
        log: Where prefixed log lines go.
        extra_flags: Extra flags per stage.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        ports: dict[str, int] | None = None,
        metrics_ports: dict[str, int] | None = None,
        log=None,
        extra_flags: dict[str, list[str]] | None = None,
    ):
        self.host = host
        self.ports = {**DEFAULT_PORTS, **(ports or {})}
        self.metrics_ports = metrics_ports or {}
        self.log = log or sys.stdout
        self.extra_flags = extra_flags or {}
        self.members: dict[str, Member] = {}
        self._lock = threading.Lock()

    def address(self, stage: str) -> str:
        """host:port of a stage."""
        return f"{self.host}:{self.ports[stage]}"

    def _pump(self, stage: str, process: subprocess.Popen, tail: deque[str]) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            tail.append(line)
            with self._lock:
                self.log.write(f"[{stage:>9}] {line}\n")
                self.log.flush()

    def start(self, stage: str) -> None:
        """Starts one server (does not wait for it)."""
        flags = ["--host", self.host, "--port", str(self.ports[stage])]
        if stage in self.metrics_ports:
            flags += ["--metrics-port", str(self.metrics_ports[stage])]
        if stage == "gateway":
            for backend in BACKENDS:
                flags += [f"--{backend}-address", self.address(backend)]
        flags += self.extra_flags.get(stage, [])
        self.launch(stage, [sys.executable, "-m", f"services.{stage}", *flags])

    def launch(self, stage: str, command: list[str]) -> None:
        """Runs ``command`` as ``stage``'s process, its output prefixed into the log and kept for reports."""
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only prctl, async-signal-safe enough
            cwd=Path(__file__).resolve().parents[2],
        )
        tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        pump = threading.Thread(target=self._pump, args=(stage, process, tail), daemon=True)
        pump.start()
        self.members[stage] = Member(stage, self.address(stage), process, pump, tail)

    def death_report(self, stage: str) -> str:
        """Why a stage's process ended: the stage, how (signal by name or exit code), its last log lines."""
        member = self.members[stage]
        member.pump.join(timeout=2.0)  # the rest of its output, up to its end
        lines = "\n".join(f"  [{stage:>9}] {line}" for line in member.tail)
        how = describe_exit(member.process.returncode)
        return f"the {stage} server died ({how}); the last lines of its log:\n{lines}"

    def wait_serving(self, stage: str, timeout_s: float) -> None:
        """Waits (bounded) until a server's health check says SERVING.

        Raises:
            RuntimeError: The process exited, or it was not SERVING in time.
        """
        member = self.members[stage]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if member.process.poll() is not None:
                raise RuntimeError(self.death_report(stage))
            if check_health(member.address, timeout_s=1.0) == "SERVING":
                return
            time.sleep(0.2)
        raise RuntimeError(f"{stage} is not SERVING on {member.address} after {timeout_s:.0f} s")

    def up(self, timeout_s: float = 300.0) -> None:
        """Starts the four stages, then the gateway, each SERVING before this returns."""
        for stage in BACKENDS:
            self.start(stage)
        for stage in BACKENDS:
            self.wait_serving(stage, timeout_s)
        self.start("gateway")
        self.wait_serving("gateway", timeout_s)

    def exited(self) -> str | None:
        """A stage whose process has exited, if any."""
        for stage, member in self.members.items():
            if member.process.poll() is not None:
                return stage
        return None

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to every server (gateway first), then SIGKILL to those still running after ``grace_s``."""
        order = sorted(self.members.values(), key=lambda m: m.stage != "gateway")
        for member in order:
            if member.process.poll() is None:
                member.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for member in order:
            try:
                member.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                member.process.kill()
                member.process.wait()
            member.pump.join(timeout=1.0)
