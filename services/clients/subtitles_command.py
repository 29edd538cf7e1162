"""``parley subtitles INPUT``: subtitles (SRT, WebVTT) for an audio or video file, translated or not.

The file is decoded with PyAV (any container and codec FFmpeg reads) to 16 kHz mono, sent to the gateway's
``TranslateFile`` RPC (``--server``, default the ``parley up`` address), or, when ``--vad``, ``--stt`` and
``--translate`` name the stage servers, processed in-process against them. A progress bar on stderr shows
the audio done and the speed (times real time). The quality report is printed as a table (or as JSON with
``--json``). ``--target`` empty (the default) or equal to the spoken language gives same-language subtitles.
``--tls-ca-file`` (with ``--tls-cert-file`` and ``--tls-key-file``: mutual TLS) turns on TLS to the gateway
or the stage servers; ``--token`` (env ``PARLEY_TOKEN``) is sent to the gateway.
With ``--bilingual``, each cue shows the source lines with the translation's lines under them (a study aid:
up to four lines; each track is checked against the rules on its own).

This is a command-line tool: it writes its results to stdout and its progress to stderr on purpose.

Exit codes: 0 on success (an all-silent file gives an empty subtitle file and a note); 1 when the input
cannot be decoded or a server fails; 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from services.clients.flags import DEFAULT_SERVER, add_client_security_args, client_security
from services.clients.media import MediaError, decode_audio
from services.common.audio import SAMPLE_RATE_HZ
from services.common.auth import bearer_metadata
from services.common.tls import ClientTls, open_channel

_CHUNK_BYTES = 64 * 1024
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


class ProgressBar:
    """A one-line progress bar on a terminal (a line per update otherwise): audio done and speed."""

    def __init__(self, total_s: float, stream: TextIO, enabled: bool = True):
        self.total_s = total_s
        self.stream = stream
        self.enabled = enabled
        self.started = time.monotonic()
        self.tty = stream.isatty()

    def update(self, stage: str, done_s: float) -> None:
        """Shows ``done_s`` of ``total_s`` seconds of audio done, in ``stage``."""
        if not self.enabled:
            return
        elapsed = max(time.monotonic() - self.started, 1e-6)
        share = done_s / self.total_s if self.total_s else 1.0
        filled = int(30 * min(max(share, 0.0), 1.0))
        line = (
            f"[{'#' * filled}{'.' * (30 - filled)}] {done_s:7.1f}/{self.total_s:.1f} s audio  "
            f"{stage:<9} {done_s / elapsed:5.1f}x real time"
        )
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Ends the bar's line."""
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parley subtitles",
        description="Subtitles (SRT and WebVTT) for an audio or video file, with a quality report.",
    )
    parser.add_argument("input", help="audio or video file (anything PyAV/FFmpeg decodes)")
    parser.add_argument("--source", default="auto", help="spoken language (BCP-47) or 'auto' (default)")
    parser.add_argument(
        "--target", default="", help="subtitle language (BCP-47); empty: subtitles in the spoken language"
    )
    parser.add_argument("-o", "--output", default="", help="SRT file to write (default: INPUT with .srt)")
    parser.add_argument("--vtt", default="", help="WebVTT file to write as well")
    parser.add_argument(
        "--bilingual", action="store_true", help="source lines with the translation under them"
    )
    parser.add_argument("--json", action="store_true", help="print the result and quality report as JSON")
    parser.add_argument("--server", default=DEFAULT_SERVER, help="gateway host:port (default: %(default)s)")
    parser.add_argument("--vad", default="", help="VAD server host:port: run in-process, without a gateway")
    parser.add_argument("--stt", default="", help="STT server host:port (with --vad)")
    parser.add_argument(
        "--translate",
        default="",
        help="translation server host:port (with --vad and --stt, when --target is set)",
    )
    parser.add_argument("--beam-size", type=int, default=0, help="STT beam size; 0: the server's default")
    parser.add_argument("--timeout", type=float, default=None, help="deadline of the whole job, in seconds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_client_security_args(parser)
    return parser


async def _via_gateway(
    args: argparse.Namespace, tls: ClientTls | None, pcm: bytes, config: Any, bar: ProgressBar
) -> Any:
    from parley.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    async def requests() -> AsyncIterator[Any]:
        yield gateway_pb2.TranslateFileRequest(config=config)
        for at in range(0, len(pcm), _CHUNK_BYTES):
            yield gateway_pb2.TranslateFileRequest(audio=pcm[at : at + _CHUNK_BYTES])

    async with open_channel(args.server, tls, options=_CHANNEL_OPTIONS) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).TranslateFile(
            requests(), timeout=args.timeout, metadata=bearer_metadata(args.token)
        )
        async for response in call:
            if response.WhichOneof("event") == "progress":
                bar.update(response.progress.stage, response.progress.audio_processed_s)
            elif response.WhichOneof("event") == "result":
                return response.result
    raise RuntimeError("the gateway closed the call without a result")


async def _in_process(
    args: argparse.Namespace, tls: ClientTls | None, samples: np.ndarray, bar: ProgressBar
) -> Any:
    from services.common.deadlines import Deadline
    from services.gateway.config import GatewayConfig
    from services.gateway.downstream import Downstream
    from services.gateway.file_job import FileTranslator, result_to_proto

    stage_tls = tls or ClientTls("")
    config = GatewayConfig(
        vad_address=args.vad,
        stt_address=args.stt,
        translate_address=args.translate or args.stt,  # no --target: the translation stub is unused
        stage_tls_ca_file=stage_tls.ca_file,
        stage_tls_cert_file=stage_tls.cert_file,
        stage_tls_key_file=stage_tls.key_file,
        stage_tls_server_name=stage_tls.server_name,
    )
    downstream = Downstream(config)
    try:
        job = FileTranslator(downstream)
        result = await job.run(
            samples,
            source_language=_source(args.source),
            target_language=args.target,
            beam_size=args.beam_size,
            request_id=f"subtitles-{os.getpid()}",
            deadline=Deadline.after(args.timeout),
            progress=bar.update,
        )
        return result_to_proto(result)
    finally:
        await downstream.close()


def _source(value: str) -> str:
    return "" if value.lower() in ("", "auto") else value


def _write(path: str, text: str) -> str:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return str(out)


def _file_config(args: argparse.Namespace) -> Any:
    """The ``TranslateFileConfig`` of the job: 16 kHz PCM_S16LE mono, the languages and beam size asked."""
    from parley.audio.v1 import audio_pb2
    from parley.gateway.v1 import gateway_pb2

    return gateway_pb2.TranslateFileConfig(
        request_id=f"subtitles-{os.getpid()}",
        source_language=_source(args.source),
        target_language=args.target,
        input_format=audio_pb2.AudioFormat(
            encoding=audio_pb2.PCM_S16LE, sample_rate_hz=SAMPLE_RATE_HZ, channels=1
        ),
        beam_size=args.beam_size,
    )


def _failure(exc: Exception, args: argparse.Namespace, in_process: bool) -> str:
    """The one line a failed job prints: the status code and details, with a hint for a missing gateway."""
    import grpc

    if isinstance(exc, grpc.aio.AioRpcError):
        hint = ""
        if exc.code() is grpc.StatusCode.UNAVAILABLE and not in_process:
            hint = f" (is a gateway running at {args.server}? start one with `parley up`)"
        return f"parley subtitles: {exc.code().name}: {exc.details()}{hint}\n"
    code = getattr(exc, "code", None)
    prefix = f"{code}: " if isinstance(code, str) else ""
    return f"parley subtitles: {prefix}{exc}\n"


def _write_files(args: argparse.Namespace, result: Any) -> list[str]:
    """Writes the SRT file (and the WebVTT file with ``--vtt``) of ``result``; returns their paths."""
    from services import subtitles as subs
    from services.gateway.file_job import cues_from_proto

    source_cues = cues_from_proto(result.source_cues)
    target_cues = cues_from_proto(result.target_cues)
    shown = target_cues if result.target_language else source_cues
    second = None
    if args.bilingual and result.target_language:
        shown, second = source_cues, subs.align_second_track(source_cues, target_cues)
    output = args.output or str(Path(args.input).with_suffix(".srt"))
    written = [_write(output, subs.to_srt(shown, second))]
    if args.vtt:
        written.append(_write(args.vtt, subs.to_vtt(shown, second)))
    return written


def _print_report(
    args: argparse.Namespace, result: Any, written: list[str], duration_s: float, wall_s: float
) -> None:
    """The quality report on stdout: a table and one summary line, or one JSON document with ``--json``."""
    from google.protobuf.json_format import MessageToDict

    from services import subtitles as subs
    from services.gateway.file_job import report_from_proto

    if args.json:
        doc = MessageToDict(
            result, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        doc["files"] = written
        doc["wall_s"] = round(wall_s, 3)
        doc["speed_x_realtime"] = round(duration_s / wall_s, 2) if wall_s else None
        sys.stdout.write(json.dumps(doc, ensure_ascii=False, indent=2) + "\n")
        return
    reports = [report_from_proto(result.source_quality, result.source_cues)]
    if result.target_language:
        reports.append(report_from_proto(result.target_quality, result.target_cues))
    sys.stdout.write(subs.summary_table(reports) + "\n")
    speed = duration_s / wall_s if wall_s else 0.0
    sys.stdout.write(
        f"{duration_s:.1f} s of audio ({result.speech_duration_s:.1f} s speech) in {wall_s:.1f} s "
        f"({speed:.1f}x real time); wrote {', '.join(written)}\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``parley subtitles``; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    tls = client_security(parser, args)
    stderr = sys.stderr
    in_process = [bool(args.vad), bool(args.stt), bool(args.translate or not args.target)]
    if any(in_process[:2] + [bool(args.translate)]) and not all(in_process):
        stderr.write(
            "parley subtitles: --vad and --stt go together, with --translate when --target is set "
            "(or use --server)\n"
        )
        return 2
    try:
        samples = decode_audio(args.input)
    except MediaError as exc:
        stderr.write(f"parley subtitles: {exc}\n")
        return 1
    duration_s = len(samples) / SAMPLE_RATE_HZ
    bar = ProgressBar(duration_s, stderr, enabled=not args.no_progress)
    started = time.monotonic()
    try:
        if all(in_process):
            result = asyncio.run(_in_process(args, tls, samples, bar))
        else:
            result = asyncio.run(_via_gateway(args, tls, samples.tobytes(), _file_config(args), bar))
    except Exception as exc:  # noqa: BLE001 - a command-line tool reports every failure as one line
        bar.close()
        stderr.write(_failure(exc, args, all(in_process)))
        return 1
    bar.close()
    wall_s = time.monotonic() - started
    written = _write_files(args, result)
    _print_report(args, result, written, duration_s, wall_s)
    if not result.source_cues:
        stderr.write(
            "parley subtitles: no speech found in the file: the subtitle file is empty"
            f" ({', '.join(written)})\n"
        )
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
