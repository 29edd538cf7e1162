"""The speech-to-text server as a real process: Whisper base on CPU, real recordings, real references.

One server serves the whole module (model load is slow). Word error rates use benchmarks.metrics.wer
(Whisper's normalisers, corpus-level); the figures are printed (run with -s to see them).
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import soxr

from benchmarks.metrics import chrf, wer
from parley.audio.v1 import audio_pb2
from parley.stt.v1 import stt_pb2, stt_pb2_grpc
from services.harness import ENGLISH_SETS, read_wav, start_server
from tests.helpers import read_manifest, report

pytestmark = pytest.mark.timeout(600)

RATE = 16000
S16 = audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=RATE, channels=1)


@pytest.fixture(scope="module")
def server():
    process = start_server("stt")
    yield process
    fields = open(f"/proc/{process.process.pid}/stat").read().rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    report(f"\nstt server CPU time over this module: {cpu_s:.0f} s")
    assert process.terminate() == 0


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield stt_pb2_grpc.SpeechToTextStub(channel)


def transcribe(stub, pcm: bytes, fmt=S16, timeout=120, **config) -> stt_pb2.TranscribeResponse:
    request = stt_pb2.TranscribeRequest(
        request_id="t", audio=pcm, format=fmt, config=stt_pb2.RecognitionConfig(**config)
    )
    return stub.Transcribe(request, timeout=timeout)


def transcribe_rows(stub, rows, **config) -> list[str]:
    """Transcripts of manifest rows, two requests in flight so the server never waits for the client."""

    def one(row):
        pcm, rate = read_wav(row["path"])
        assert rate == RATE
        return transcribe(stub, pcm, language=row["language"], **config).text

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, rows))


def test_english_word_error_rate(stub):
    references, hypotheses = [], []
    for name in ENGLISH_SETS:
        rows = read_manifest(name)
        texts = transcribe_rows(stub, rows)
        refs = [r["reference_text"] for r in rows]
        report(f"\nWER {name}: {wer(refs, texts, 'en'):.1%} over {len(rows)} utterances")
        references += refs
        hypotheses += texts
    overall = wer(references, hypotheses, "en")
    report(f"WER English overall: {overall:.1%} over {len(references)} utterances")
    assert overall <= 0.10


def test_french_fleurs_word_error_rate(stub):
    rows = [r for r in read_manifest("fleurs") if r["language"] == "fr"]
    texts = transcribe_rows(stub, rows)
    score = wer([r["reference_text"] for r in rows], texts, "fr")
    report(f"\nWER FLEURS fr: {score:.1%} over {len(rows)} utterances")
    assert score <= 0.35


def test_commands_word_error_rate(stub):
    rows = read_manifest("commands")
    texts = transcribe_rows(stub, rows)
    for language in ("en", "fr"):
        pairs = [
            (r["reference_text"], t) for r, t in zip(rows, texts, strict=True) if r["language"] == language
        ]
        score = wer([p[0] for p in pairs], [p[1] for p in pairs], language)
        report(f"\nWER commands {language}: {score:.1%} over {len(pairs)} utterances")
        assert score < 0.6, "loose floor: only catches breakage"


def test_translate_task_gives_english(stub):
    rows = [r for r in read_manifest("fleurs") if r["language"] == "fr"][:3]
    texts = []
    for row in rows:
        pcm, _ = read_wav(row["path"])
        response = transcribe(stub, pcm, language="fr", task=stt_pb2.TRANSLATE)
        text = response.text
        texts.append(text)
        words = text.lower().replace(",", " ").replace(".", " ").split()
        assert len(words) >= 5, text
        assert sum(ch.isascii() for ch in text) / len(text) >= 0.97, text
        english = {"the", "a", "an", "of", "to", "in", "and", "is", "was", "it", "that", "by", "for", "on"}
        assert sum(w in english for w in words) >= 2, text
        assert not {"le", "la", "les", "des", "est", "et"} & set(words), text
    score = chrf([r["translation_en"] for r in rows], texts)
    report(f"\nchrF fr->en (Whisper TRANSLATE) vs FLEURS translation_en: {score:.1f} over {len(rows)} clips")
    assert score > 30


def test_response_fields_language_detection_and_word_timestamps(stub):
    row = [r for r in read_manifest("fleurs") if r["language"] == "fr"][0]
    pcm, _ = read_wav(row["path"])
    response = transcribe(stub, pcm, word_timestamps=True)
    assert response.request_id == "t"
    assert response.language == "fr" and 0.5 < response.language_probability <= 1.0
    assert response.duration_s == pytest.approx(len(pcm) / 2 / RATE, abs=0.01)
    assert response.segments and not response.dropped_segments
    words = [w for s in response.segments for w in s.words]
    assert len(words) >= 10
    starts = [w.start_ms for w in words]
    assert starts == sorted(starts)
    assert all(w.start_ms <= w.end_ms <= response.duration_s * 1000 + 50 for w in words)
    assert all(0 <= w.probability <= 1 for w in words)
    for segment in response.segments:
        assert segment.avg_logprob <= 0 and 0 <= segment.no_speech_prob <= 1 and segment.compression_ratio > 0
    assert response.text == "".join(s.text for s in response.segments).strip()


def test_silence_gives_no_text_and_other_rates_are_resampled(stub):
    silence = transcribe(stub, bytes(2 * RATE * 5), language="en")
    assert silence.text == "" and not silence.segments

    row = read_manifest("jfk")[0]
    pcm, _ = read_wav(row["path"])
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
    for rate in (8000, 44100):
        resampled = soxr.resample(samples, RATE, rate).astype("<f4")
        fmt = audio_pb2.AudioFormat(encoding=audio_pb2.PCM_F32LE, sample_rate_hz=rate, channels=1)
        response = transcribe(stub, resampled.tobytes(), fmt=fmt, language="en-US")
        assert wer([row["reference_text"]], [response.text], "en") <= 0.15, (rate, response.text)
    stereo = np.repeat(np.frombuffer(pcm, dtype="<i2")[:, None], 2, axis=1).tobytes()
    fmt = audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=RATE, channels=2)
    assert "country" in transcribe(stub, stereo, fmt=fmt, language="en").text.lower()


INVALID = grpc.StatusCode.INVALID_ARGUMENT
NAN = np.array([0.1, math.nan, 0.2], dtype="<f4").tobytes()
INF = np.array([0.1, math.inf, 0.2], dtype="<f4").tobytes()
HUGE = np.full(149, 1e30, dtype="<f4").tobytes()  # 596 bytes that cost 35 s of CPU when accepted
F32 = audio_pb2.AudioFormat(encoding=audio_pb2.PCM_F32LE, sample_rate_hz=RATE, channels=1)


def s16(rate: int) -> audio_pb2.AudioFormat:
    return audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=rate, channels=1)


BAD_TRANSCRIBE = {
    "empty": (b"", S16, {}, ("empty",)),
    "unknown-encoding": (
        bytes(3200),
        audio_pb2.AudioFormat(encoding=7, sample_rate_hz=RATE),
        {},
        ("encoding",),
    ),
    "unset-encoding": (bytes(3200), audio_pb2.AudioFormat(sample_rate_hz=RATE), {}, ("PCM_S16LE",)),
    "odd-bytes": (bytes(3201), S16, {}, ("3201 bytes", "whole number")),
    "nan": (NAN, F32, {}, ("NaN",)),
    "inf": (INF, F32, {}, ("infinite",)),
    "beyond-full-scale": (HUGE, F32, {}, ("1e+30", "outside [-1, 1]")),
    "undefined-task": (bytes(3200), S16, {"task": 99}, ("config.task 99", "TRANSLATE (2)")),
    "rate-too-low": (bytes(3200), s16(4000), {}, ("4000",)),
    "rate-too-high": (bytes(3200), s16(500000), {}, ("500000",)),
    "too-long": (bytes(2 * 8000 * 301), s16(8000), {}, ("301", "300")),
    "unknown-language": (bytes(3200), S16, {"language": "xx"}, ("'xx'", "BCP-47", "empty")),
    "malformed-language": (bytes(3200), S16, {"language": "not a tag"}, ("BCP-47",)),
    "beam-too-large": (bytes(3200), S16, {"beam_size": 99}, ("beam_size",)),
}


def assert_still_serving(stub):
    pcm, _ = read_wav(read_manifest("jfk")[0]["path"])
    assert "country" in transcribe(stub, pcm, language="en", beam_size=1).text.lower()


def test_bad_transcribe_requests_are_invalid_argument(stub):
    for name, (audio, fmt, config, snippets) in BAD_TRANSCRIBE.items():
        with pytest.raises(grpc.RpcError) as err:
            transcribe(stub, audio, fmt=fmt, **config)
        assert err.value.code() == INVALID, (name, err.value.code(), err.value.details())
        for snippet in snippets:
            assert snippet in err.value.details(), (name, err.value.details())
    assert_still_serving(stub)


def config_message(fmt=S16, interim=False, boundaries=False, **config) -> stt_pb2.StreamingRecognizeRequest:
    return stt_pb2.StreamingRecognizeRequest(
        streaming_config=stt_pb2.StreamingRecognitionConfig(
            request_id="s",
            format=fmt,
            config=stt_pb2.RecognitionConfig(**config),
            interim_results=interim,
            caller_endpointing=boundaries,
        )
    )


def audio_message(pcm: bytes) -> stt_pb2.StreamingRecognizeRequest:
    return stt_pb2.StreamingRecognizeRequest(audio_content=pcm)


def boundary_message(kind, at_ms: int) -> stt_pb2.StreamingRecognizeRequest:
    return stt_pb2.StreamingRecognizeRequest(boundary=stt_pb2.SpeechBoundary(kind=kind, at_ms=at_ms))


def test_bad_streams_are_invalid_argument(stub):
    cases = {
        "no-message": ([], "first message"),
        "audio-first": ([audio_message(bytes(3200))], "first message"),
        "second-config": (
            [config_message(language="en"), audio_message(bytes(3200)), config_message()],
            "sent again",
        ),
        "bad-format": ([config_message(fmt=audio_pb2.AudioFormat(sample_rate_hz=RATE))], "encoding"),
        "unknown-language": ([config_message(language="xx")], "'xx'"),
        "rate-too-low": ([config_message(fmt=s16(4000))], "4000"),
        "nan": ([config_message(fmt=F32), audio_message(NAN)], "NaN"),
        "beyond-full-scale": ([config_message(fmt=F32), audio_message(HUGE)], "outside [-1, 1]"),
        "undefined-task": ([config_message(task=99)], "streaming_config.config.task 99"),
        "boundary-not-announced": (
            [config_message(language="en"), boundary_message(stt_pb2.SpeechBoundary.START, 0)],
            "caller_endpointing",
        ),
    }
    for name, (messages, snippet) in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            list(stub.StreamingRecognize(iter(messages), timeout=60))
        assert err.value.code() == INVALID, (name, err.value.code(), err.value.details())
        assert snippet in err.value.details(), (name, err.value.details())
    assert_still_serving(stub)


def vad_messages(pcm: bytes, chunk_s: float, pause_ms: int = 200) -> list[stt_pb2.StreamingRecognizeRequest]:
    """Audio chunks with the speech boundaries the VAD server's endpointer decides, each boundary after the
    chunk that decided it (the order the gateway sends them in)."""
    from services.common.models import silero_vad_path
    from services.vad.engine import (
        SileroVad,
        SpeechEnd,
        SpeechPause,
        SpeechStart,
        StreamEndpointer,
        VadParams,
    )

    vad = SileroVad(silero_vad_path())
    endpointer = StreamEndpointer(VadParams(pause_ms=pause_ms).validate())
    kinds = stt_pb2.SpeechBoundary
    messages = []

    def boundaries(events):
        for event in events:
            if isinstance(event, SpeechStart):
                messages.append(boundary_message(kinds.START, event.start_ms))
            elif isinstance(event, SpeechPause):
                messages.append(boundary_message(kinds.PAUSE, event.end_ms))
            elif isinstance(event, SpeechEnd):
                messages.append(boundary_message(kinds.END, event.segment.end_ms))

    step = int(chunk_s * RATE) * 2
    for start in range(0, len(pcm), step):
        chunk = pcm[start : start + step]
        messages.append(audio_message(chunk))
        windows = endpointer.add(np.frombuffer(chunk, "<i2").astype(np.float32) / 32768)
        if windows is not None:
            boundaries(endpointer.accept(*vad.infer(windows, endpointer.state)))
    windows = endpointer.flush()
    if windows is not None:
        boundaries(endpointer.accept(*vad.infer(windows, endpointer.state)))
    boundaries(endpointer.finish())
    return messages


def stream(stub, pcm: bytes, chunk_s: float = 0.1, pace_s: float = 0.0, **config_fields):
    """Runs one StreamingRecognize call with the VAD's boundaries; returns its responses."""
    interim = config_fields.pop("interim", False)
    messages = vad_messages(pcm, chunk_s)

    def requests():
        yield config_message(interim=interim, boundaries=True, **config_fields)
        for message in messages:
            yield message
            if pace_s and message.WhichOneof("streaming_request") == "audio_content":
                time.sleep(pace_s)

    return list(stub.StreamingRecognize(requests(), timeout=300))


def results(responses, final):
    return [r for response in responses for r in response.results if r.is_final is final]


def check_commits(responses) -> dict[int, list]:
    """Asserts the incremental contract; returns each utterance's committed segments in order.

    Commits of an utterance are numbered from 0 without gaps, their words move forward in time, and the
    utterance's final transcript is its committed words joined, never anything else (no retraction).
    """
    commits: dict[int, list] = {}
    for r in results(responses, False):
        if r.HasField("committed"):
            assert r.commit_index == len(commits.setdefault(r.utterance_index, [])), "commits in order"
            commits[r.utterance_index].append(r.committed)
    for final in results(responses, True):
        segments = commits.get(final.utterance_index, [])
        words = [w for segment in segments for w in segment.words]
        assert [w.start_ms for w in words] == sorted(w.start_ms for w in words), "commits move forward"
        assert final.transcript == "".join(w.word for w in words).strip()
        assert [s.text for s in final.segments] == [s.text for s in segments if s.words]
    return commits


def test_streaming_commits_are_monotonic_and_the_final_is_the_commits(stub):
    row = [r for r in read_manifest("fleurs") if r["language"] == "fr"][0]
    pcm, _ = read_wav(row["path"])
    audio = pcm + bytes(2 * RATE)  # 1 s of silence after the speech
    # Paced at 2x real time, so decodes run while the audio still arrives, as on a live stream.
    responses = stream(stub, audio, pace_s=0.05, language="fr", interim=True)
    assert all(r.request_id == "s" for r in responses)
    interims, finals = results(responses, False), results(responses, True)
    assert interims, "no interim result"
    assert all(0.0 <= r.stability <= 1.0 for r in interims)
    assert all(r.stability == 1.0 for r in finals)
    indices = [r.utterance_index for r in finals]
    assert indices == list(range(len(finals))), "exactly one final per utterance, in order"
    order = [(r.utterance_index, r.is_final) for response in responses for r in response.results]
    for index in indices:
        final_at = order.index((index, True))
        assert all(not (i == index and not f) for i, f in order[final_at + 1 :])
    commits = check_commits(responses)
    assert sum(len(c) for c in commits.values()) > len(finals), "words were committed before the ends"
    assert all(a.end_ms <= b.start_ms for a, b in zip(finals, finals[1:], strict=False))
    assert all(r.language == "fr" for r in finals)
    streamed = " ".join(r.transcript for r in finals)
    whole = transcribe(stub, pcm, language="fr").text
    streamed_wer = wer([row["reference_text"]], [streamed], "fr")
    whole_wer = wer([row["reference_text"]], [whole], "fr")
    report(f"\nstreaming WER {streamed_wer:.1%} vs Transcribe {whole_wer:.1%}; {len(interims)} interims")
    report(f"commits: {[s.text for c in commits.values() for s in c]}")
    assert streamed_wer <= whole_wer + 0.10
    processed = [r.audio_processed_s for r in responses]
    assert processed == sorted(processed) and processed[-1] <= len(audio) / 2 / RATE + 0.01


def test_streaming_two_recordings_give_two_finals_in_order(stub):
    first, second = read_manifest("librispeech")[:2]
    pcm1, _ = read_wav(first["path"])
    pcm2, _ = read_wav(second["path"])
    audio = pcm1 + bytes(2 * int(1.5 * RATE)) + pcm2 + bytes(2 * RATE // 2)
    responses = stream(stub, audio, chunk_s=0.1, language="en")
    finals = results(responses, True)
    assert not [r for r in results(responses, False) if not r.HasField("committed")], "only commits"
    assert [r.utterance_index for r in finals] == [0, 1]
    check_commits(responses)
    assert wer([first["reference_text"]], [finals[0].transcript], "en") <= 0.2, finals[0].transcript
    assert wer([second["reference_text"]], [finals[1].transcript], "en") <= 0.3, finals[1].transcript
    gap_start_ms = len(pcm1) / 2 / RATE * 1000
    assert finals[0].end_ms <= gap_start_ms + 1000 and finals[1].start_ms >= gap_start_ms + 500
    # Segment and word times count from the start of the stream.
    words = [w for s in finals[1].segments for w in s.words]
    assert words and all(w.start_ms >= gap_start_ms for w in words)


def test_streaming_utterance_policy_commits_the_whole_utterance_at_its_end(stub):
    row = read_manifest("librispeech")[0]
    pcm, _ = read_wav(row["path"])
    messages = vad_messages(pcm + bytes(RATE), 0.1)
    first = config_message(boundaries=True, language="en")
    first.streaming_config.commit_policy = stt_pb2.UTTERANCE
    responses = list(stub.StreamingRecognize(iter([first, *messages]), timeout=300))
    finals = results(responses, True)
    assert len(finals) == 1
    check_commits(responses)
    committing = [r for r in responses if any(x.HasField("committed") for x in r.results)]
    assert len(committing) == 1, "everything is committed at once, at the end"
    assert wer([row["reference_text"]], [finals[0].transcript], "en") <= 0.2


def test_streaming_without_boundaries_is_one_utterance_and_any_chunk_size_works(stub):
    pcm, _ = read_wav(read_manifest("jfk")[0]["path"])
    # Odd chunk sizes split samples in two; no boundaries: the end of the stream ends the one utterance.
    chunks: queue.Queue = queue.Queue()
    sizes = [1, 777, 3, 4001, 12345]
    start, i = 0, 0
    while start < len(pcm):
        chunks.put(pcm[start : start + sizes[i % len(sizes)]])
        start += sizes[i % len(sizes)]
        i += 1

    def requests():
        yield config_message(language="en")
        while not chunks.empty():
            yield audio_message(chunks.get())

    responses = list(stub.StreamingRecognize(requests(), timeout=300))
    finals = results(responses, True)
    assert len(finals) == 1
    check_commits(responses)
    assert wer([read_manifest("jfk")[0]["reference_text"]], [finals[0].transcript], "en") <= 0.15


def test_english_only_model_refuses_other_languages_and_translation():
    english_only = start_server("stt", "--model", "tiny.en")
    try:
        with grpc.insecure_channel(english_only.address) as channel:
            tiny = stt_pb2_grpc.SpeechToTextStub(channel)
            for config in ({"language": "fr"}, {"task": stt_pb2.TRANSLATE}):
                with pytest.raises(grpc.RpcError) as err:
                    transcribe(tiny, bytes(3200), **config)
                assert err.value.code() == INVALID and "English-only" in err.value.details()
            pcm, _ = read_wav(read_manifest("jfk")[0]["path"])
            response = transcribe(tiny, pcm)
            assert response.language == "en" and "country" in response.text.lower()
    finally:
        assert english_only.terminate() == 0


def test_concurrent_streams_are_independent(stub):
    rows = read_manifest("librivox")[:2]
    pcms = [read_wav(r["path"])[0] + bytes(RATE) for r in rows]
    outputs: dict[int, list] = {}

    def run(i):
        outputs[i] = stream(stub, pcms[i], chunk_s=0.25, language="en")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for i, row in enumerate(rows):
        text = " ".join(r.transcript for r in results(outputs[i], True))
        assert wer([row["reference_text"]], [text], "en") <= 0.25, text


def test_concurrent_requests_with_different_prompts_are_not_batched_into_one_failure(stub):
    """CTranslate2 decodes a batch only when every prompt puts start-of-transcript at one position: windows
    with different prompts (each live stream prompts with its own committed text) must not share a batch."""
    pcm, _ = read_wav(read_manifest("jfk")[0]["path"])
    prompts = ["", "Kennedy.", "A speech given in Washington at the inauguration of the president, 1961."]
    with ThreadPoolExecutor(len(prompts) * 2) as pool:
        texts = list(
            pool.map(lambda p: transcribe(stub, pcm, language="en", initial_prompt=p).text, prompts * 2)
        )
    assert all("country" in text.lower() for text in texts), texts
