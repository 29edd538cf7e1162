"""The ``parley`` command: health exit codes, audio decoding with PyAV, and translate-speech's output
against a scripted gateway (the real cluster is exercised by tests/integration/test_gateway.py)."""

from __future__ import annotations

import json
import wave
from concurrent import futures

import av
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from parley.audio.v1 import audio_pb2
from parley.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.clients.cli import main
from services.clients.media import decode_audio

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def health_server():
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_health_exit_code_is_zero_only_when_serving(health_server, capsys):
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("parley.stt.v1.SpeechToText", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main(["health", address]) == 0
    assert main(["health", address, "--service", "parley.stt.v1.SpeechToText"]) == 1
    assert main(["health", address, "--service", "no.such.Service"]) == 1
    assert capsys.readouterr().out.split() == ["SERVING", "NOT_SERVING", "NOT_FOUND"]
    assert main(["health", "127.0.0.1:1", "--timeout", "0.5"]) == 1


@pytest.mark.parametrize(
    ("container", "codec", "rate"),
    [("flac", "flac", 44100), ("mp3", "mp3", 44100), ("ogg", "libopus", 48000), ("mp4", "aac", 22050)],
)
def test_decode_audio_any_format_to_16k_mono_pcm16(tmp_path, container, codec, rate):
    path = tmp_path / f"tone.{container}"
    seconds = 1.0
    t = np.arange(int(rate * seconds)) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(
            np.stack([tone, tone], axis=1).reshape(1, -1), format="flt", layout="stereo"
        )
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    pcm = np.frombuffer(decode_audio(path), "<i2").astype(np.float32) / 32768
    assert abs(len(pcm) / 16000 - seconds) < 0.08
    spectrum = np.abs(np.fft.rfft(pcm[2000:14000]))
    peak_hz = np.argmax(spectrum) * 16000 / 12000
    assert abs(peak_hz - 440) < 5
    assert 0.25 < np.abs(pcm[2000:14000]).max() < 0.7


class ScriptedGateway(gateway_pb2_grpc.GatewayServicer):
    def __init__(self):
        self.audio_bytes = 0

    def TranslateSpeech(self, request_iterator, context):
        first = next(request_iterator)
        rid = first.config.request_id
        for request in request_iterator:
            self.audio_bytes += len(request.audio)
        fmt = audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=22050, channels=1)
        yield gateway_pb2.TranslateSpeechResponse(
            request_id=rid, speech_started=gateway_pb2.SpeechStarted(start_ms=100)
        )
        yield gateway_pb2.TranslateSpeechResponse(
            request_id=rid,
            transcript=gateway_pb2.Transcript(
                text="bonjour", is_final=True, start_ms=100, end_ms=900, language="fr"
            ),
        )
        yield gateway_pb2.TranslateSpeechResponse(
            request_id=rid, translation=gateway_pb2.Translation(text="hello", target_language="en")
        )
        for i in range(2):
            yield gateway_pb2.TranslateSpeechResponse(
                request_id=rid,
                audio=gateway_pb2.SynthesizedAudio(audio=b"\x10\x00" * 11025, format=fmt, sentence_index=i),
            )
        yield gateway_pb2.TranslateSpeechResponse(
            request_id=rid, timings=gateway_pb2.UtteranceTimings(end_of_speech_to_first_audio_ms=420.0)
        )
        yield gateway_pb2.TranslateSpeechResponse(
            request_id=rid, utterance_index=1, end_of_stream=gateway_pb2.EndOfStream(utterances=1)
        )


def test_translate_speech_prints_json_and_writes_the_translated_wav(tmp_path, capsys):
    servicer = ScriptedGateway()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        wav_in = tmp_path / "in.wav"
        with wave.open(str(wav_in), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(8000)
            w.writeframes(np.zeros(8000, "<i2").tobytes())
        out = tmp_path / "out.wav"
        code = main(
            [
                "translate-speech",
                str(wav_in),
                "--source",
                "fr",
                "--target",
                "en",
                "--server",
                f"127.0.0.1:{port}",
                "--json",
                "--out",
                str(out),
            ]
        )
    finally:
        server.stop(0)
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert servicer.audio_bytes == 32000  # 1 s at 8 kHz, resampled to 16 kHz PCM16
    (utterance,) = doc["utterances"]
    assert utterance["transcript"] == "bonjour" and utterance["translation"] == "hello"
    assert utterance["start_ms"] == 100 and utterance["end_ms"] == 900
    assert utterance["timings_ms"]["end_of_speech_to_first_audio_ms"] == 420.0
    assert doc["audio_out_s"] == 1.0
    with wave.open(str(out), "rb") as w:
        assert w.getframerate() == 22050 and w.getnframes() == 22050
