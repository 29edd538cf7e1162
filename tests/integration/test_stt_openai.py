"""The STT ``openai`` backend against a real local HTTP server speaking OpenAI's transcription protocol.

The fake endpoint parses each multipart form with the standard library's ``email`` package, checks that the
file is a 16 kHz mono 16-bit WAV, and answers in vLLM's ``verbose_json`` shape with a text derived from
what it received ("heard 1.50 s of fr at peak 0.50 (transcribe)"), so the tests see the audio, the language
and the task go through. The request's ``prompt`` (``initial_prompt``) selects failures: HTTP 429 or 500,
a body that is not JSON, a slow answer, a hallucinated segment. The backend is tested in process and
through a real ``parley serve stt --backend openai`` process over gRPC.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import json
import logging
import re
import threading
import time
import wave
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import numpy as np
import pytest

from parley.audio.v1 import audio_pb2
from parley.stt.v1 import stt_pb2, stt_pb2_grpc
from services.common.audio import float_to_pcm16
from services.common.deadlines import Deadline
from services.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ParleyError,
    ResourceExhausted,
    Unavailable,
)
from services.common.http import multipart_form, post_json
from services.harness import read_wav, start_server
from services.stt.config import DEFAULT_HALLUCINATION_PHRASES, VOXTRAL_LANGUAGES
from services.stt.filters import HallucinationGates
from services.stt.openai_backend import OpenAiTranscriptionBackend, wav_bytes
from tests.helpers import read_manifest

pytestmark = pytest.mark.timeout(120)

RATE = 16000
MODEL = "mistralai/Voxtral-Mini-3B-2507"
API_KEY = "stt-key-42"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TIMEOUT_S = 2.0  # the server process's --openai-timeout-s
HANG_S = 3.0  # a "__hang__" request is answered after this long
DELAY_S = 0.5  # a "__delay__" request is answered after this long
HEARD = re.compile(r"heard (\d+\.\d\d) s of (\w+) at peak (\d\.\d\d) \((\w+)\)")
VLLM_REFUSAL = "Currently only support response_format `text` or `json`"  # vLLM before segment timestamps


def parse_form(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """multipart/form-data -> {name: (file name or None, content)}, by the stdlib email parser."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    assert message.is_multipart(), content_type
    form = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        form[str(name)] = (part.get_filename(), part.get_payload(decode=True))
    return form


class FakeTranscriptions(BaseHTTPRequestHandler):
    """``POST /v1/audio/transcriptions`` and ``/v1/audio/translations``, ``GET /v1/models``."""

    received: list[dict[str, Any]] = []
    verbose_json = True  # False: refuse it as vLLM versions without segment timestamps do

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, code: int, body: dict[str, Any] | bytes) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout tests)

    def _error(self, code: int, message: str) -> None:
        self._send(code, {"object": "error", "message": message, "type": "BadRequestError", "code": code})

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        else:
            self._error(404, "not found")

    def do_POST(self) -> None:
        form = parse_form(self.headers["Content-Type"], self.rfile.read(int(self.headers["Content-Length"])))
        fields = {name: content.decode() for name, (filename, content) in form.items() if filename is None}
        filename, wav_data = form.get("file", (None, b""))
        with wave.open(io.BytesIO(wav_data), "rb") as w:
            fmt = (w.getframerate(), w.getnchannels(), w.getsampwidth())
            samples = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        record = {"path": self.path, "auth": self.headers.get("Authorization"), "fields": fields, "fmt": fmt}
        FakeTranscriptions.received.append({**record, "filename": filename, "frames": len(samples)})
        task = {"/v1/audio/transcriptions": "transcribe", "/v1/audio/translations": "translate"}.get(
            self.path
        )
        if task is None:
            return self._error(404, "not found")
        if self.headers.get("Authorization") != f"Bearer {API_KEY}":
            return self._error(401, "bad key")
        if fields.get("model") != MODEL:
            return self._error(404, f"The model `{fields.get('model')}` does not exist.")
        if fmt != (RATE, 1, 2):
            return self._error(400, f"expected 16 kHz mono s16, got {fmt}")
        response_format = fields.get("response_format", "json")
        if response_format == "verbose_json" and not FakeTranscriptions.verbose_json:
            return self._error(400, VLLM_REFUSAL)
        prompt = fields.get("prompt", "")
        if prompt == "__429__":
            return self._error(429, "too many requests")
        if prompt == "__500__":
            return self._error(500, "engine crashed")
        if prompt == "__badjson__":
            return self._send(200, b"<html>proxy error</html>")
        if prompt == "__hang__":
            time.sleep(HANG_S)
        if prompt == "__delay__":
            time.sleep(DELAY_S)
        duration_s = len(samples) / RATE
        language = fields.get("language")
        peak = float(np.abs(samples.astype(np.int32)).max()) / 32767 if len(samples) else 0.0
        pieces = [f" heard {duration_s:.2f} s", f" of {language or 'unknown'} at peak {peak:.2f} ({task})"]
        if response_format != "verbose_json":
            return self._send(200, {"text": "".join(pieces), "usage": {"type": "duration", "seconds": 2}})
        half_s = duration_s / 2
        segments = [segment(0, 0.0, half_s, pieces[0]), segment(1, half_s, duration_s, pieces[1])]
        if prompt == "__hallucinate__":
            # A credit on the trailing silence, running past the audio (Whisper's end timestamps do).
            segments.append(segment(2, duration_s - 0.2, duration_s + 1.0, " Thanks for watching!"))
        body = {
            "text": "".join(s["text"] for s in segments),
            "language": language,
            "duration": str(duration_s),  # vLLM sends a string
            "segments": segments,
        }
        self._send(200, body)


def segment(index: int, start_s: float, end_s: float, text: str) -> dict[str, Any]:
    """One segment as vLLM's verbose_json writes it."""
    return {
        "id": index,
        "seek": 0,
        "start": start_s,
        "end": end_s,
        "text": text,
        "tokens": [1, 2, 3],
        "temperature": 0.0,
        "avg_logprob": -0.25,
        "compression_ratio": 1.1,
        "no_speech_prob": None if index == 0 else 0.01,
    }


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeTranscriptions)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def fresh_endpoint_state() -> Iterator[None]:
    FakeTranscriptions.received.clear()
    FakeTranscriptions.verbose_json = True
    yield
    FakeTranscriptions.verbose_json = True


def make_backend(url: str, timeout_s: float = TIMEOUT_S, **kwargs) -> OpenAiTranscriptionBackend:
    settings: dict[str, Any] = {
        "model": MODEL,
        "api_key": API_KEY,
        "timeout_s": timeout_s,
        "languages": VOXTRAL_LANGUAGES,
        "concurrency": 4,
        "gates": HallucinationGates(phrases=DEFAULT_HALLUCINATION_PHRASES),
        **kwargs,
    }
    return OpenAiTranscriptionBackend(url, **settings)


@pytest.fixture
def backend(endpoint) -> Iterator[OpenAiTranscriptionBackend]:
    b = make_backend(endpoint)
    yield b
    b.close()


def tone(duration_s: float, amplitude: float = 0.5, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(duration_s * rate), dtype=np.float32) / rate
    return (amplitude * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)


def transcribe(backend: OpenAiTranscriptionBackend, audio: np.ndarray, **options):
    windows = backend.windows(audio, backend.options(**options))
    return backend.transcribe_batch(windows)


def heard(text: str) -> tuple[float, str, float, str]:
    match = HEARD.search(text)
    assert match, text
    return float(match[1]), match[2], float(match[3]), match[4]


# --------------------------------------------------------------------------------------------------
# The backend in process.


def test_one_window_per_request_sent_as_a_16k_mono_wav_form(backend):
    windows = backend.windows(tone(1.5), backend.options(language="fr-FR", initial_prompt="Bonjour."))
    assert [(w.spans_s, w.window_s) for w in windows] == [(((0.0, 1.5),), 1.5)]
    (result,) = backend.transcribe_batch(windows)
    assert heard(result.text) == (1.5, "fr", 0.5, "transcribe")
    assert (result.language, result.language_probability, result.duration_s) == ("fr", 1.0, 1.5)
    assert [(s.start_s, s.end_s) for s in result.segments] == [(0.0, 0.75), (0.75, 1.5)]
    assert [(s.avg_logprob, s.no_speech_prob, s.compression_ratio) for s in result.segments] == [
        (-0.25, 0.0, 1.1),  # a null no_speech_prob reads 0
        (-0.25, 0.01, 1.1),
    ]
    (sent,) = FakeTranscriptions.received
    assert sent["path"] == "/v1/audio/transcriptions" and sent["auth"] == f"Bearer {API_KEY}"
    assert sent["fields"] == {
        "model": MODEL,
        "temperature": "0",
        "response_format": "verbose_json",
        "language": "fr",
        "prompt": "Bonjour.",
    }
    assert (sent["fmt"], sent["frames"], sent["filename"]) == ((RATE, 1, 2), 24000, "audio.wav")


def test_an_empty_language_is_left_to_the_server_and_translate_posts_to_translations(backend):
    (result,) = transcribe(backend, tone(0.8), translate=True)
    assert heard(result.text) == (0.8, "unknown", 0.5, "translate")
    assert (result.language, result.language_probability) == ("", 0.0)
    (sent,) = FakeTranscriptions.received
    assert sent["path"] == "/v1/audio/translations"
    assert "language" not in sent["fields"] and "prompt" not in sent["fields"]


def test_no_audio_makes_no_window(backend):
    assert backend.windows(np.zeros(0, dtype=np.float32), backend.options()) == []


def test_a_batch_goes_out_in_parallel_and_comes_back_in_order(backend):
    durations = [0.5, 1.0, 1.5, 2.0]
    options = backend.options(language="en", initial_prompt="__delay__")
    windows = [w for d in durations for w in backend.windows(tone(d), options)]
    started = time.monotonic()
    results = backend.transcribe_batch(windows)
    elapsed_s = time.monotonic() - started
    assert [heard(r.text)[0] for r in results] == durations
    assert elapsed_s < 2 * DELAY_S, f"{len(windows)} requests of {DELAY_S} s took {elapsed_s:.2f} s"


def test_hallucinated_segments_are_dropped_and_clamped_to_the_audio(backend):
    (result,) = transcribe(backend, tone(2.0), language="en", initial_prompt="__hallucinate__")
    assert heard(result.text) == (2.0, "en", 0.5, "transcribe")
    assert "Thanks" not in result.text
    assert [(s.text, s.start_s, s.end_s) for s in result.dropped] == [(" Thanks for watching!", 1.8, 2.0)]


def test_without_verbose_json_the_text_is_one_segment_and_json_is_kept(endpoint):
    FakeTranscriptions.verbose_json = False
    backend = make_backend(endpoint)
    try:
        for duration_s in (1.0, 1.25):
            (result,) = transcribe(backend, tone(duration_s), language="de")
            assert heard(result.text) == (duration_s, "de", 0.5, "transcribe")
            assert [(s.start_s, s.end_s, s.text) for s in result.segments] == [
                (0.0, duration_s, " " + result.text)
            ]
    finally:
        backend.close()
    formats = [r["fields"]["response_format"] for r in FakeTranscriptions.received]
    assert formats == ["verbose_json", "json", "json"], "refused once, then json for good"


@pytest.mark.parametrize(
    ("settings", "snippet"),
    [
        ({"language": "ja"}, "'ja'"),
        ({"language": "not a tag"}, "not a BCP-47 tag"),
        ({"word_timestamps": True}, "openai backend"),
        ({"hotwords": "Parley"}, "openai backend"),
    ],
)
def test_settings_the_endpoint_cannot_honour_are_invalid_argument(backend, settings, snippet):
    with pytest.raises(InvalidArgument, match=re.escape(snippet)):
        backend.options(**settings)


def test_beam_size_is_ignored(backend):
    assert backend.options(language="en", beam_size=20).language == "en"


@pytest.mark.parametrize(
    ("prompt", "error", "snippet"),
    [
        ("__429__", ResourceExhausted, "overloaded (HTTP 429)"),
        ("__500__", Unavailable, "failed with HTTP 500"),
        ("__badjson__", ParleyError, "malformed response (not JSON)"),
        ("__hang__", Unavailable, "did not answer within 0.5 s"),
    ],
)
def test_endpoint_failures_raise_mapped_errors(endpoint, prompt, error, snippet):
    backend = make_backend(endpoint, timeout_s=0.5)
    try:
        with pytest.raises(error, match=re.escape(snippet)):
            transcribe(backend, tone(0.5), initial_prompt=prompt)
        assert heard(transcribe(backend, tone(0.5))[0].text)[0] == 0.5
    finally:
        backend.close()


def test_wrong_model_and_unreachable_endpoint(endpoint):
    wrong = make_backend(endpoint, model="whisper-large")
    unreachable = make_backend("http://127.0.0.1:9/v1")  # discard port: nothing listens
    try:
        with pytest.raises(ParleyError, match="HTTP 404: .*whisper-large"):
            transcribe(wrong, tone(0.5))
        with pytest.raises(Unavailable, match="cannot reach transcription endpoint"):
            transcribe(unreachable, tone(0.5))
    finally:
        wrong.close()
        unreachable.close()


def test_the_caller_deadline_caps_the_shared_http_timeout(endpoint):
    files = {"file": ("a.wav", "audio/wav", wav_bytes(tone(0.1)))}
    body, content_type = multipart_form({"model": MODEL, "prompt": "__hang__"}, files)
    url = endpoint + "/audio/transcriptions"
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="caller's deadline"):
        post_json(url, body, content_type, AUTH, Deadline.after(0.3), 10.0, "transcription endpoint")
    assert time.monotonic() - started < 1.0
    with pytest.raises(DeadlineExceeded, match="margin"):
        post_json(url, body, content_type, AUTH, Deadline.after(0.0), 10.0, "transcription endpoint")


def test_warm_needs_no_endpoint(endpoint, caplog):
    caplog.set_level(logging.INFO, logger="services.stt.openai_backend")
    for url, level, snippet in (
        (endpoint, logging.INFO, f"serves {MODEL}"),
        ("http://127.0.0.1:9/v1", logging.WARNING, "requests fail until it answers"),
    ):
        caplog.clear()
        backend = make_backend(url)
        try:
            backend.warm()
        finally:
            backend.close()
        assert [(r.levelno, snippet in r.getMessage()) for r in caplog.records] == [(level, True)]


# --------------------------------------------------------------------------------------------------
# A real `parley serve stt --backend openai` process over gRPC.


@pytest.fixture(scope="module")
def server(endpoint):
    process = start_server(
        "stt",
        "--backend",
        "openai",
        "--openai-base-url",
        endpoint,
        "--openai-timeout-s",
        str(TIMEOUT_S),
        timeout_s=60,
        env={"PARLEY_OPENAI_API_KEY": API_KEY},
    )
    yield process
    assert process.terminate() == 0, process.log()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield stt_pb2_grpc.SpeechToTextStub(channel)


def grpc_transcribe(stub, audio: np.ndarray, rate: int = RATE, timeout: float = 30.0, **config):
    request = stt_pb2.TranscribeRequest(
        request_id="o",
        audio=float_to_pcm16(audio),
        format=audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=rate, channels=1),
        config=stt_pb2.RecognitionConfig(**config),
    )
    return stub.Transcribe(request, timeout=timeout)


def assert_still_serving(stub) -> None:
    response = grpc_transcribe(stub, tone(1.0), language="en")
    assert heard(response.text) == (1.0, "en", 0.5, "transcribe")


def test_transcribe_over_grpc(server, stub):
    assert f"serves {MODEL}" in server.log(), "warm looked at the endpoint at start"
    # 48 kHz in: the server resamples, the endpoint gets 16 kHz.
    response = grpc_transcribe(
        stub, tone(1.5, rate=48000), rate=48000, language="it", initial_prompt="__hallucinate__"
    )
    assert heard(response.text) == (1.5, "it", 0.5, "transcribe")
    assert (response.language, response.language_probability) == ("it", 1.0)
    assert response.duration_s == pytest.approx(1.5, abs=1e-3)
    assert [(s.start_ms, s.end_ms) for s in response.segments] == [(0, 750), (750, 1500)]
    assert [(s.text, s.start_ms, s.end_ms) for s in response.dropped_segments] == [
        (" Thanks for watching!", 1300, 1500)
    ]
    translated = grpc_transcribe(stub, tone(1.0), task=stt_pb2.TRANSLATE)
    assert heard(translated.text) == (1.0, "unknown", 0.5, "translate")
    assert [r["fmt"] for r in FakeTranscriptions.received] == [(RATE, 1, 2)] * 2


@pytest.mark.parametrize(
    ("config", "snippet"),
    [({"language": "ja"}, "'ja'"), ({"word_timestamps": True}, "openai backend")],
)
def test_settings_the_endpoint_cannot_honour_are_invalid_argument_over_grpc(stub, config, snippet):
    with pytest.raises(grpc.RpcError) as err:
        grpc_transcribe(stub, tone(0.5), **config)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert snippet in err.value.details()
    assert not FakeTranscriptions.received, "refused before any HTTP request"
    assert_still_serving(stub)


@pytest.mark.parametrize(
    ("prompt", "code", "snippet"),
    [
        ("__429__", grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded (HTTP 429)"),
        ("__500__", grpc.StatusCode.UNAVAILABLE, "failed with HTTP 500"),
        ("__badjson__", grpc.StatusCode.INTERNAL, "malformed response (not JSON)"),
    ],
)
def test_endpoint_failures_map_to_status_codes_and_the_server_keeps_serving(stub, prompt, code, snippet):
    with pytest.raises(grpc.RpcError) as err:
        grpc_transcribe(stub, tone(0.5), language="en", initial_prompt=prompt)
    assert err.value.code() == code
    assert snippet in err.value.details()
    assert_still_serving(stub)


def test_a_hung_endpoint_and_a_short_deadline_is_deadline_exceeded(stub):
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        grpc_transcribe(stub, tone(0.5), language="en", initial_prompt="__hang__", timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < TIMEOUT_S
    # The hung HTTP call holds one batcher instance until --openai-timeout-s; the other one serves.
    assert_still_serving(stub)


def test_streaming_recognize_finals_carry_each_utterance(stub):
    """The endpoint gives segment times only: commits come from words spread over their segment."""
    row = read_manifest("jfk")[0]
    pcm, rate = read_wav(row["path"])
    assert rate == RATE
    step = 2 * RATE // 10
    boundary = stt_pb2.SpeechBoundary
    utterances_ms = [(0, 4000), (5000, 9000)]

    def requests():
        yield stt_pb2.StreamingRecognizeRequest(
            streaming_config=stt_pb2.StreamingRecognitionConfig(
                request_id="s",
                format=audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=RATE, channels=1),
                config=stt_pb2.RecognitionConfig(language="en"),
                commit_policy=stt_pb2.UTTERANCE,
                caller_endpointing=True,
            )
        )
        for start in range(0, len(pcm), step):
            yield stt_pb2.StreamingRecognizeRequest(audio_content=pcm[start : start + step])
            position_ms = (start + step) // 2 * 1000 // RATE
            for start_ms, end_ms in utterances_ms:
                if position_ms - step // 2 * 1000 // RATE < start_ms + 1 <= position_ms:
                    yield stt_pb2.StreamingRecognizeRequest(
                        boundary=boundary(kind=boundary.START, at_ms=start_ms)
                    )
                if position_ms - step // 2 * 1000 // RATE < end_ms <= position_ms:
                    yield stt_pb2.StreamingRecognizeRequest(
                        boundary=boundary(kind=boundary.END, at_ms=end_ms)
                    )

    responses = list(stub.StreamingRecognize(requests(), timeout=60))
    finals = [r for response in responses for r in response.results if r.is_final]
    assert [(r.start_ms, r.end_ms) for r in finals] == utterances_ms
    for result in finals:
        duration_s, language, _, task = heard(result.transcript)
        assert (language, task) == ("en", "transcribe")
        # The endpoint heard exactly the utterance's audio, once (utterance policy: one decode at the end).
        assert duration_s == pytest.approx((result.end_ms - result.start_ms) / 1000, abs=0.011)
        words = [w for s in result.segments for w in s.words]
        assert words and words[0].start_ms >= result.start_ms and words[-1].end_ms <= result.end_ms + 1
    assert len(FakeTranscriptions.received) == len(finals)
