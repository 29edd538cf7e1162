"""The ``parley`` command: run stage servers, a local cluster, health checks and speech translation.

- ``parley serve STAGE [flags]``: one stage server (``parley serve STAGE --help`` lists its flags).
- ``parley up``: the five servers as local processes, each SERVING before it is reported; Ctrl-C stops all.
- ``parley health HOST:PORT [--service NAME]``: exit code 0 only when the server reports SERVING.
- ``parley translate-speech INPUT --source fr --target en``: streams an audio file through the gateway.
- ``health``, ``translate-speech`` and ``subtitles`` talk TLS with ``--tls-ca-file`` (mutual TLS with
  ``--tls-cert-file`` and ``--tls-key-file``); the last two send ``--token`` (env ``PARLEY_TOKEN``).
- ``parley demo [--input FILE]``: starts a cluster, translates a sample it makes itself, stops the cluster.
- ``parley subtitles INPUT --target en [-o out.srt] [--vtt out.vtt]``: subtitles for an audio or video file.
- ``parley doctor [--only vad stt translate piper espeak]``: a smoke inference of every bundled model, each in
  its own process; exit code 1, naming the model, library and signal or error, when one fails.

This is a command-line tool: it writes its results to stdout on purpose (``sys.stdout.write``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import wave
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.common.config import ConfigError
from services.common.processes import describe_exit
from services.common.tls import ClientTls, client_tls

STAGES = ("vad", "stt", "translate", "tts", "gateway")
BACKENDS = ("vad", "stt", "translate", "tts")
DEFAULT_PORTS = {"gateway": 50051, "vad": 50052, "stt": 50053, "translate": 50054, "tts": 50055}
DEFAULT_SERVER = f"127.0.0.1:{DEFAULT_PORTS['gateway']}"
_PR_SET_PDEATHSIG = 1
LOG_TAIL_LINES = 15


def _out(line: str, stream=None) -> None:
    stream = stream or sys.stdout
    stream.write(line + "\n")
    stream.flush()


def _serve(argv: Sequence[str]) -> int:
    if not argv or argv[0] not in STAGES:
        sys.stderr.write(f"usage: parley serve {{{','.join(STAGES)}}} [flags]; 'parley serve STAGE --help'\n")
        return 2
    stage, flags = argv[0], list(argv[1:])
    module = importlib.import_module(f"services.{stage}.__main__")
    module.main(flags, prog=f"parley serve {stage}")
    return 0


# -- client TLS and token -------------------------------------------------------------------------------


def add_client_security_args(parser: argparse.ArgumentParser, *, token: bool = True) -> None:
    """Adds the flags of a client's TLS (``--tls-*``) and, unless ``token`` is false, ``--token``."""
    parser.add_argument(
        "--tls-ca-file",
        default="",
        help="PEM CA bundle that verifies the server; set: TLS (default: plaintext)",
    )
    parser.add_argument("--tls-cert-file", default="", help="PEM client certificate, for a mutual-TLS server")
    parser.add_argument("--tls-key-file", default="", help="PEM private key of --tls-cert-file")
    parser.add_argument(
        "--tls-server-name", default="", help="name the server's certificate must carry; default: the host"
    )
    if token:
        parser.add_argument(
            "--token",
            default=os.environ.get("PARLEY_TOKEN", ""),
            help="bearer token for the gateway; default: env PARLEY_TOKEN, else none",
        )


def client_security(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ClientTls | None:
    """The TLS settings of :func:`add_client_security_args`'s flags; a usage error when they do not fit."""
    try:
        return client_tls(
            args.tls_ca_file,
            args.tls_cert_file,
            args.tls_key_file,
            args.tls_server_name,
            flag_prefix="--tls-",
        )
    except ConfigError as exc:
        parser.error(str(exc))


# -- health --------------------------------------------------------------------------------------------


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


def _health(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="parley health", description="Exit code 0 only when SERVING.")
    parser.add_argument("address", help="host:port of a Parley server")
    parser.add_argument("--service", default="", help="service name to check; empty for the whole server")
    parser.add_argument("--timeout", type=float, default=3.0, help="call timeout, in seconds")
    add_client_security_args(parser, token=False)
    args = parser.parse_args(argv)
    try:
        status = check_health(args.address, args.service, args.timeout, client_security(parser, args))
    except ConfigError as exc:
        _out(f"parley health: {exc}", sys.stderr)
        return 2
    _out(status)
    return 0 if status == "SERVING" else 1


# -- up ------------------------------------------------------------------------------------------------


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
            cwd=Path(__file__).resolve().parent.parent,
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


def _cluster_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address every server binds")
    for stage in STAGES:
        parser.add_argument(
            f"--{stage}-port", type=int, default=DEFAULT_PORTS[stage], help=f"gRPC port of {stage}"
        )
    parser.add_argument(
        "--metrics-port-base",
        type=int,
        default=0,
        help="Prometheus ports from this one up (gateway, vad, stt, translate, tts); 0: no metrics",
    )
    parser.add_argument("--start-timeout", type=float, default=300.0, help="time each server gets to load, s")


def _make_cluster(args: argparse.Namespace, log=None) -> LocalCluster:
    ports = {stage: getattr(args, f"{stage}_port") for stage in STAGES}
    metrics = (
        {stage: args.metrics_port_base + i for i, stage in enumerate(STAGES[-1:] + STAGES[:-1])}
        if args.metrics_port_base
        else {}
    )
    return LocalCluster(args.host, ports, metrics, log=log)


def _up(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="parley up", description="Run the five servers locally (CPU).")
    _cluster_args(parser)
    args = parser.parse_args(argv)
    cluster = _make_cluster(args)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        cluster.up(args.start_timeout)
        for stage in STAGES:
            _out(f"parley up: {stage:>9} SERVING on {cluster.address(stage)}")
        _out(f"parley up: gateway at {cluster.address('gateway')}; Ctrl-C stops the cluster")
        while not stop.is_set():
            exited = cluster.exited()
            if exited is not None:
                _out(f"parley up: {cluster.death_report(exited)}", sys.stderr)
                _out("parley up: stopping the cluster", sys.stderr)
                return 1
            stop.wait(0.5)
        return 0
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        _out(f"parley up: {exc}", sys.stderr)
        return 1
    finally:
        _out("parley up: stopping")
        cluster.stop()


# -- translate-speech ----------------------------------------------------------------------------------


def decode_audio(path: str | Path, sample_rate_hz: int = 16000) -> bytes:
    """Decodes any file PyAV reads (wav, flac, mp3, ogg, mp4...) to PCM_S16LE mono at ``sample_rate_hz``."""
    import av

    out = bytearray()
    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate_hz)
        for frame in container.decode(audio=0):
            if not isinstance(frame, av.AudioFrame):
                continue
            for resampled in resampler.resample(frame):
                out += resampled.to_ndarray().tobytes()
        for resampled in resampler.resample(None):
            out += resampled.to_ndarray().tobytes()
    return bytes(out)


def write_wav(path: str | Path, pcm: bytes, sample_rate_hz: int) -> None:
    """Writes PCM_S16LE mono as a WAV file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate_hz)
        w.writeframes(pcm)


async def translate_file(
    server: str,
    pcm: bytes,
    *,
    source: str,
    target: str,
    synthesize: bool = True,
    realtime: bool = False,
    mode: str = "",
    interim: bool = False,
    live: bool = True,
    timeout_s: float | None = None,
    tls: ClientTls | None = None,
    token: str = "",
) -> dict:
    """Streams 16 kHz PCM_S16LE mono through the gateway; returns the JSON document of the results.

    ``tls`` verifies the gateway (``None``: plaintext); ``token`` is sent as a bearer token (empty: none).
    """
    from parley.audio.v1 import audio_pb2
    from parley.gateway.v1 import gateway_pb2
    from services.gateway.client import Collector, GatewayClient, paced, split_pcm

    config = gateway_pb2.TranslateSpeechConfig(
        request_id=f"cli-{os.getpid()}-{int(time.time())}",
        source_language=source,
        target_language=target,
        input_format=audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=16000, channels=1),
        synthesize_speech=synthesize and bool(target),
        interim_results=interim,
        mode=gateway_pb2.TranslationMode.Value(mode.upper())
        if mode
        else gateway_pb2.TRANSLATION_MODE_UNSPECIFIED,
    )
    chunks = split_pcm(pcm, 100)
    audio = paced(chunks) if realtime else chunks
    collector = Collector()
    started = time.monotonic()
    async with GatewayClient(server, tls=tls, token=token) as client:
        async for event in client.translate_speech(config, audio, timeout_s=timeout_s):
            result = collector.add(event)
            kind = event.WhichOneof("event")
            if not live or result is None:
                continue
            if kind == "transcript":
                t = event.transcript
                label = "transcript" if t.is_final else "interim   "
                _out(
                    f"[{event.utterance_index}] {label} ({t.language}) {t.start_ms / 1000:.2f}-"
                    f"{t.end_ms / 1000:.2f} s: {t.text}"
                )
            elif kind == "translation":
                _out(
                    f"[{event.utterance_index}] translation ({event.translation.target_language}): "
                    f"{event.translation.text}"
                )
            elif kind == "error":
                e = event.error
                _out(f"[{event.utterance_index}] error in {e.stage} (code {e.code}): {e.message}")
            elif kind == "timings":
                t = event.timings
                _out(
                    f"[{event.utterance_index}] timings: end of speech -> transcript "
                    f"{t.end_of_speech_to_transcript_ms:.0f} ms, -> translation "
                    f"{t.end_of_speech_to_translation_ms:.0f} ms, -> first audio "
                    f"{t.end_of_speech_to_first_audio_ms:.0f} ms"
                )
    audio_out = bytearray()
    rate = 0
    for u in collector.utterances.values():
        audio_out += u.audio
        rate = rate or u.audio_rate_hz
    return {
        "server": server,
        "source_language": source,
        "target_language": target,
        "audio_in_s": round(len(pcm) / 32000, 3),
        "wall_s": round(time.monotonic() - started, 3),
        "utterances": [u.to_json() for u in collector.utterances.values()],
        "end_of_stream": bool(collector.end),
        "_audio": bytes(audio_out),
        "_audio_rate_hz": rate,
    }


def _translate_speech_args(parser: argparse.ArgumentParser, input_required: bool = True) -> None:
    if input_required:
        parser.add_argument("input", help="audio file: wav, flac, mp3, ogg, mp4 (anything PyAV decodes)")
    parser.add_argument("--source", default="", help="spoken language (BCP-47); empty to detect")
    parser.add_argument("--target", default="en", help="target language (BCP-47); empty: transcribe only")
    parser.add_argument("--out", default="translated.wav", help="WAV file for the translated speech")
    parser.add_argument("--no-speech", action="store_true", help="text only: no synthesized audio")
    parser.add_argument("--mode", choices=["", "cascade", "direct"], default="", help="default: server's")
    parser.add_argument("--interim", action="store_true", help="ask for interim transcripts")
    parser.add_argument("--json", action="store_true", help="print one JSON document at the end")
    parser.add_argument("--realtime", action="store_true", help="send audio at real time, like a microphone")
    parser.add_argument("--timeout", type=float, default=None, help="call deadline, in seconds")


def _run_translate(
    args: argparse.Namespace, server: str, input_path: str, tls: ClientTls | None = None, token: str = ""
) -> int:
    import grpc

    pcm = decode_audio(input_path)
    try:
        doc = asyncio.run(
            translate_file(
                server,
                pcm,
                source=args.source,
                target=args.target,
                synthesize=not args.no_speech,
                realtime=args.realtime,
                mode=args.mode,
                interim=args.interim,
                live=not args.json,
                timeout_s=args.timeout,
                tls=tls,
                token=token,
            )
        )
    except grpc.aio.AioRpcError as exc:
        _out(f"translate-speech: {exc.code().name}: {exc.details()}", sys.stderr)
        return 1
    except ConfigError as exc:
        _out(f"translate-speech: {exc}", sys.stderr)
        return 2
    audio, rate = doc.pop("_audio"), doc.pop("_audio_rate_hz")
    if audio and rate:
        write_wav(args.out, audio, rate)
        doc["audio_out"] = str(Path(args.out).resolve())
        doc["audio_out_s"] = round(len(audio) / 2 / rate, 3)
    if args.json:
        _out(json.dumps(doc, ensure_ascii=False, indent=2))
    elif audio and rate:
        _out(f"translated speech: {doc['audio_out_s']:.1f} s written to {doc['audio_out']}")
    else:
        _out("no translated speech came back")
    return 0


def _translate_speech(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="parley translate-speech", description="Translate an audio file.")
    _translate_speech_args(parser)
    parser.add_argument("--server", default=DEFAULT_SERVER, help="gateway host:port")
    add_client_security_args(parser)
    args = parser.parse_args(argv)
    return _run_translate(args, args.server, args.input, client_security(parser, args), args.token)


# -- demo ----------------------------------------------------------------------------------------------

DEMO_TEXT = {
    "en": "Good morning everyone. The train to Lyon will leave twenty minutes late, from platform four.",
    "fr": "Bonjour à tous. Le train pour Lyon partira avec vingt minutes de retard, du quai numéro quatre.",
}


def _synthesize_sample(tts_address: str, text: str, language: str, path: Path) -> None:
    """Makes the demo's input with the cluster's own TTS server, resampled to 16 kHz."""
    import grpc
    import numpy as np

    from parley.tts.v1 import tts_pb2, tts_pb2_grpc

    with grpc.insecure_channel(tts_address) as channel:
        response = tts_pb2_grpc.SpeechSynthesisStub(channel).Synthesize(
            tts_pb2.SynthesizeRequest(text=text, language=language, sample_rate_hz=16000), timeout=60
        )
    silence = np.zeros(8000, dtype="<i2").tobytes()
    write_wav(path, silence + response.audio + silence, response.format.sample_rate_hz or 16000)


def _demo(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="parley demo", description="Start a local cluster, translate a sample, stop the cluster."
    )
    parser.add_argument("--input", default="", help="audio file; default: a sample made with the TTS server")
    _translate_speech_args(parser, input_required=False)
    _cluster_args(parser)
    parser.set_defaults(source=None, target=None, out="out/demo/translated.wav")
    args = parser.parse_args(argv)
    # Our own sample is English spoken by the Piper voice (natural speech) translated into French; a given
    # file has its language detected and is translated into English.
    args.source = args.source if args.source is not None else ("" if args.input else "en")
    args.target = args.target if args.target is not None else ("en" if args.input else "fr")
    log_path = Path(tempfile.mkdtemp(prefix="parley-demo-")) / "cluster.log"
    with log_path.open("w") as log:
        cluster = _make_cluster(args, log=log)
        try:
            _out(f"demo: starting the local cluster (logs: {log_path})")
            cluster.up(args.start_timeout)
            _out(f"demo: cluster SERVING, gateway at {cluster.address('gateway')}")
            input_path = args.input
            if not input_path:
                language = args.source or "en"
                input_path = str(Path(args.out).parent / f"sample-{language}.wav")
                _synthesize_sample(
                    cluster.address("tts"),
                    DEMO_TEXT.get(language, DEMO_TEXT["en"]),
                    language,
                    Path(input_path),
                )
                _out(f"demo: made the {language} sample {input_path} with the TTS server")
            code = _run_translate(args, cluster.address("gateway"), input_path)
            exited = cluster.exited()
            if exited is not None:
                raise RuntimeError(cluster.death_report(exited))
            return code
        except RuntimeError as exc:
            _out(f"demo: {exc} (logs: {log_path})", sys.stderr)
            return 1
        finally:
            _out("demo: stopping the cluster")
            with contextlib.suppress(Exception):
                cluster.stop()


def _doctor(argv: Sequence[str]) -> int:
    from services.doctor import main as run

    return run(argv)


def _subtitles(argv: Sequence[str]) -> int:
    from services.gateway.subtitles_cli import main as run

    return run(argv)


COMMANDS = {
    "serve": _serve,
    "up": _up,
    "health": _health,
    "translate-speech": _translate_speech,
    "demo": _demo,
    "subtitles": _subtitles,
    "doctor": _doctor,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``parley`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="parley", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=list(COMMANDS), help="see the list above")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        parser.error(f"unknown command {command!r}")
    return COMMANDS[command](rest)


if __name__ == "__main__":
    sys.exit(main())
