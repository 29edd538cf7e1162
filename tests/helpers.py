"""Shared test helpers: the evaluation data, and stage servers run as real processes."""

from __future__ import annotations

import csv
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import wave
from dataclasses import dataclass
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
ENGLISH_SETS = ("ljspeech", "librispeech", "librivox", "jfk")  # the shared English speech set
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data; skips the test when it is missing, fails instead when CI=true."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        reason = f"{path} is missing: the evaluation data lives in ../shared/data beside the clone"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def read_manifest(folder: str) -> list[dict[str, str]]:
    """Rows of ``speech/<folder>/manifest.tsv`` (tab-separated, no quoting), with ``path`` added."""
    base = shared_data("speech", folder)
    with (base / "manifest.tsv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    for row in rows:
        row["path"] = str(base / row["file"])
    return rows


def read_wav(path: str | Path) -> tuple[bytes, int]:
    """PCM_S16LE mono bytes and sample rate of a 16-bit mono WAV file."""
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1, path
        return w.readframes(w.getnframes()), w.getframerate()


@dataclass
class ServerProcess:
    """A stage server started as its own process (``python -m services.<stage>``) on a free port."""

    stage: str
    process: subprocess.Popen
    address: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)


def start_server(
    stage: str, *flags: str, timeout_s: float = 180.0, env: dict[str, str] | None = None
) -> ServerProcess:
    """Starts a stage server on port 0 and waits (bounded) until it has written its ready file."""
    tmp = Path(tempfile.mkdtemp(prefix=f"parley-{stage}-"))
    ready = tmp / "ready"
    log_path = tmp / "server.log"
    cmd = [sys.executable, "-m", f"services.{stage}", "--port", "0", "--ready-file", str(ready), *flags]
    log = log_path.open("wb")
    process = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if process.poll() is not None:
            raise RuntimeError(f"{stage} server exited with {process.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"{stage} server not ready after {timeout_s} s:\n{log_path.read_text()}")
        time.sleep(0.05)
    return ServerProcess(stage, process, ready.read_text().strip(), log_path)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server's --metrics-port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch_counts(metrics_port: int, name: str) -> tuple[float, float]:
    """(requests, executions) of the dynamic batcher ``name``, scraped from a server's /metrics.

    The mean batch size over an interval is the ratio of the differences. A batcher that has not run yet
    counts (0, 0).
    """
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = []
    for metric in ("parley_batch_requests", "parley_batch_executions"):
        found = re.search(rf'^{metric}_total{{name="{name}"}} (\S+)$', text, re.MULTILINE)
        values.append(float(found.group(1)) if found else 0.0)
    return values[0], values[1]


def report(line: str) -> None:
    """Prints a measured figure (shown with -s, and in the captured output of a failure)."""
    print(line, flush=True)  # noqa: T201 - measured figures belong in the test output


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """In-test OTLP/gRPC trace receiver: keeps (service name, trace id, span name) of every span."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str]] = []

    def Export(self, request, context):  # noqa: N802 - gRPC method name
        for resource_spans in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            service = attrs.get("service.name", "")
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append((service, span.trace_id.hex(), span.name))
        return trace_service_pb2.ExportTraceServiceResponse()
