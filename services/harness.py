"""Start a stage and measure it: what the tests, the benchmarks and ``make eval`` share.

- :func:`start_server`: a stage server as its own process (``python -m services.<stage>``) on a free port,
  returned once it has written its ready file.
- :func:`free_port`, :func:`batch_counts`: a port for ``--metrics-port``, and the dynamic batcher's
  request and execution counts scraped from ``/metrics`` (their ratio is the mean batch size).
- :data:`SHARED_DATA`, :func:`read_manifest`, :func:`read_wav`: the evaluation recordings in
  ``../shared/data`` beside the clone.

The tests wrap :func:`read_manifest` to skip (or fail under ``CI=true``) when the data is missing
(``tests/helpers.py``); here a missing folder raises.
"""

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

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
ENGLISH_SETS = ("ljspeech", "librispeech", "librivox", "jfk")  # the shared English speech set


def read_manifest(folder: str) -> list[dict[str, str]]:
    """Rows of ``speech/<folder>/manifest.tsv`` under :data:`SHARED_DATA`, with ``path`` added.

    The manifest is tab-separated without quoting; ``path`` is the absolute path of the row's ``file``.

    Raises:
        FileNotFoundError: The folder or its manifest is missing.
    """
    base = SHARED_DATA / "speech" / folder
    with (base / "manifest.tsv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    for row in rows:
        row["path"] = str(base / row["file"])
    return rows


def read_wav(path: str | Path) -> tuple[bytes, int]:
    """PCM_S16LE mono bytes and sample rate (Hz) of a 16-bit mono WAV file.

    Raises:
        ValueError: The file is not 16-bit mono.
    """
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"{path}: not 16-bit mono")
        return w.readframes(w.getnframes()), w.getframerate()


@dataclass
class ServerProcess:
    """A stage server started as its own process (``python -m services.<stage>``) on a free port.

    Attributes:
        stage: The stage's package name (vad, stt, translate, tts, gateway).
        process: The server process.
        address: ``host:port`` it serves on (from its ready file).
        log_path: File holding its stdout and stderr.
    """

    stage: str
    process: subprocess.Popen
    address: str
    log_path: Path

    def log(self) -> str:
        """Everything the server has logged so far."""
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (when still running), then waits at most ``timeout_s`` seconds; returns the exit code.

        Raises:
            subprocess.TimeoutExpired: It had not exited after ``timeout_s``.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)


def start_server(
    stage: str, *flags: str, timeout_s: float = 180.0, env: dict[str, str] | None = None
) -> ServerProcess:
    """Starts a stage server on port 0 and waits (bounded) until it has written its ready file.

    Args:
        stage: The stage's package name (vad, stt, translate, tts, gateway).
        flags: Extra command-line flags of the stage.
        timeout_s: Longest wait for the ready file, in seconds.
        env: Environment variables added to this process's.

    Raises:
        RuntimeError: The server exited before it was ready (the message holds its log).
        TimeoutError: It was not ready within ``timeout_s`` (it is killed; the message holds its log).
    """
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
        port: int = s.getsockname()[1]
        return port


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
