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
import importlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.clients.cluster import STAGES, LocalCluster, check_health
from services.clients.flags import DEFAULT_SERVER, add_client_security_args, client_security
from services.clients.media import MediaError, decode_audio, write_wav
from services.common.audio import SAMPLE_RATE_HZ
from services.common.config import DEFAULT_PORTS, ConfigError
from services.common.tls import ClientTls


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


def _show(event: Any) -> None:
    """Prints one event of a TranslateSpeech stream as a line (transcripts, translations, errors, timings)."""
    kind = event.WhichOneof("event")
    if kind == "transcript":
        t = event.transcript
        label = "transcript" if t.is_final else "interim   "
        _out(
            f"[{event.utterance_index}] {label} ({t.language}) {t.start_ms / 1000:.2f}-"
            f"{t.end_ms / 1000:.2f} s: {t.text}"
        )
    elif kind == "commit" and event.commit.words:
        c = event.commit
        _out(f"[{event.utterance_index}] committed {c.start_ms / 1000:.2f}-{c.end_ms / 1000:.2f} s: {c.text}")
    elif kind == "translation":
        _out(
            f"[{event.utterance_index}] translation ({event.translation.target_language}) clause "
            f"{event.translation.clause_index}: {event.translation.text}"
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


def _speech_config(source: str, target: str, *, synthesize: bool, interim: bool, mode: str) -> Any:
    """The ``TranslateSpeechConfig`` of a CLI stream (16 kHz PCM_S16LE mono); ``mode``: a TranslationMode."""
    from parley.audio.v1 import audio_pb2
    from parley.gateway.v1 import gateway_pb2

    return gateway_pb2.TranslateSpeechConfig(
        request_id=f"cli-{os.getpid()}-{int(time.time())}",
        source_language=source,
        target_language=target,
        input_format=audio_pb2.AudioFormat(
            encoding=audio_pb2.PCM_S16LE, sample_rate_hz=SAMPLE_RATE_HZ, channels=1
        ),
        synthesize_speech=synthesize and bool(target),
        interim_results=interim,
        mode=gateway_pb2.TranslationMode.Value(mode.upper())
        if mode
        else gateway_pb2.TRANSLATION_MODE_UNSPECIFIED,
    )


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
    from services.clients.gateway_client import Collector, GatewayClient, paced, split_pcm

    config = _speech_config(source, target, synthesize=synthesize, interim=interim, mode=mode)
    chunks = split_pcm(pcm, 100)
    audio = paced(chunks) if realtime else chunks
    collector = Collector()
    started = time.monotonic()
    async with GatewayClient(server, tls=tls, token=token) as client:
        async for event in client.translate_speech(config, audio, timeout_s=timeout_s):
            result = collector.add(event)
            if live and result is not None:
                _show(event)
    audio_out = bytearray()
    rate = 0
    for u in collector.utterances.values():
        audio_out += u.audio
        rate = rate or u.audio_rate_hz
    return {
        "server": server,
        "source_language": source,
        "target_language": target,
        "audio_in_s": round(len(pcm) / 2 / SAMPLE_RATE_HZ, 3),
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

    try:
        pcm = decode_audio(input_path).tobytes()
    except MediaError as exc:
        _out(f"translate-speech: {exc}", sys.stderr)
        return 1
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
            tts_pb2.SynthesizeRequest(text=text, language=language, sample_rate_hz=SAMPLE_RATE_HZ), timeout=60
        )
    silence = np.zeros(SAMPLE_RATE_HZ // 2, dtype="<i2").tobytes()
    write_wav(path, silence + response.audio + silence, response.format.sample_rate_hz or SAMPLE_RATE_HZ)


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
    from services.clients.subtitles_command import main as run

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
