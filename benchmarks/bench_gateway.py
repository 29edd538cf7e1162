"""Live speech translation, incremental vs utterance at a time: latency, lag and quality, side by side.

Starts the four stage servers as local processes (CPU; TTS cache off, ``--cache-mb 0``, so no cache hit
makes a figure look better) and two gateways on them: ``--live-commit-policy local_agreement`` (words are
committed while the speaker talks, each clause is translated and spoken at once: the live path) and
``--live-commit-policy utterance`` (each utterance is transcribed, translated and spoken after it ends:
the baseline). Every set is streamed at real time in 100 ms chunks, one stream at a time, through each
gateway in turn:

- ``fleurs-en`` (en->fr) and ``fleurs-fr`` (fr->en, CASCADE: the gateway's default): each recording its own
  stream, with 0.5 s of silence before and 1.5 s after; ``fleurs-fr-direct``: the same in DIRECT mode
  (Whisper's translate task per clause), the measurement behind the default;
- ``english``: the shared English sets other than LJSpeech (LibriSpeech, LibriVox, JFK), same way (en->fr);
- ``ljspeech-long``: the LJSpeech sentences joined by 0.3 s pauses into one stream (en->fr); utterances run
  to the VAD's 30 s cap: the long-utterance case.

Then the FLEURS sets at 4 concurrent streams with interim results asked for, both gateways (figures, no
goal: what degrades first).

Every figure is on the client's clock. Audio time t (ms) of a stream is sent at wall time start + t / 1000.

- eos: an utterance's end of speech, its final transcript's end_ms (the VAD's segment end, 30 ms padding).
- eos->audio: eos to the first audio byte of the utterance's last spoken clause (the translation of the
  words said last begins). eos->any audio: to its first audio byte of any clause (negative: the
  translation began to sound before the speaker stopped).
- eos->text: eos to the last commit that carried words (commits are never retracted: the transcript is
  final then); eos->final event: to the final transcript event (sent at the VAD's endpoint).
- lag: for each source word of utterances of 8 s or more, when its clause's translation starts to sound
  minus when the word ended; sound start from a playback queue (chunks play in arrival order at their
  duration, none before it arrived).
- WER and chrF: transcripts and translations of a set joined, against its references (chrF where the set
  has human translations: FLEURS).

Goals (issue 12): eos->audio p95 <= 1.2 s and p50 <= 0.8 s for en->fr and fr->en, eos->text p95 <= 0.5 s,
WER within +1.0 point and chrF within 1.0 of the utterance path. Environment: PARLEY_BENCH_LIMIT=N takes the
first N recordings of each set (quick runs).
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from dataclasses import dataclass, field

import numpy as np

from benchmarks.metrics import chrf, wer
from parley.audio.v1 import audio_pb2
from parley.gateway.v1 import gateway_pb2
from services.clients.gateway_client import GatewayClient, paced, split_pcm
from services.common.audio import SAMPLE_RATE_HZ
from services.harness import SHARED_DATA, ServerProcess, read_manifest, read_wav, start_server

POLICIES = ("local_agreement", "utterance")
TARGETS = {"en": "fr", "fr": "en"}
CHUNK_MS = 100
LONG_UTTERANCE_MS = 8000
GOAL_AUDIO_P95_S, GOAL_AUDIO_P50_S, GOAL_TEXT_P95_S = 1.2, 0.8, 0.5


@dataclass
class Recording:
    """One stream to send: PCM_S16LE 16 kHz mono, its language and references."""

    name: str
    language: str
    pcm: bytes
    reference: str
    translation: str = ""  # human translation into TARGETS[language]; empty when the set has none
    mode: int = gateway_pb2.TRANSLATION_MODE_UNSPECIFIED


@dataclass
class Utterance:
    """What the client saw of one utterance, times on the client's wall clock (s)."""

    end_ms: int = 0
    start_ms: int = 0
    transcript: str = ""
    translation: list[str] = field(default_factory=list)
    final_at_s: float = 0.0
    last_words_at_s: float = 0.0
    words: list[tuple[int, int]] = field(default_factory=list)  # (word end ms, clause index)
    audio: list[tuple[float, int, float]] = field(default_factory=list)  # (arrival s, clause, duration s)
    interims: int = 0
    errors: list[str] = field(default_factory=list)  # "stage CODE"
    gateway_audio_s: float | None = None  # the gateway's own end_of_speech_to_first_audio_ms, in s


@dataclass
class StreamResult:
    """One stream's utterances, with the wall time its audio time 0 was sent."""

    recording: Recording
    started_s: float
    utterances: dict[int, Utterance] = field(default_factory=dict)
    sound_start: dict[tuple[int, int], float] = field(default_factory=dict)  # (utterance, clause) -> s


def fleurs_latency(address: str) -> dict[str, list[float]]:
    """eos->audio of the FLEURS sets (one stream at real time) on the client's and the gateway's clock, in s.

    For ``make eval``; the first recording of each language warms up and is not counted.
    """
    sets = _sets(0)
    recordings = sets["fleurs-en"] + sets["fleurs-fr"]
    asyncio.run(_level(address, [sets["fleurs-en"][0], sets["fleurs-fr"][0]], 1))
    figures = _figures(asyncio.run(_level(address, recordings, 1)))
    return {"client_s": figures["audio"], "gateway_s": figures["gateway"]}


def _sets(limit: int) -> dict[str, list[Recording]]:
    rows = read_manifest("fleurs")
    sets: dict[str, list[Recording]] = {}
    for language in ("en", "fr"):
        sets[f"fleurs-{language}"] = [
            Recording(
                r["file"],
                language,
                read_wav(r["path"])[0],
                r["reference_text"],
                r[f"translation_{TARGETS[language]}"],
            )
            for r in rows
            if r["language"] == language
        ][: limit or None]
    sets["fleurs-fr-direct"] = [
        Recording(r.name, r.language, r.pcm, r.reference, r.translation, gateway_pb2.DIRECT)
        for r in sets["fleurs-fr"]
    ]
    english = [r for name in ("librispeech", "librivox", "jfk") for r in read_manifest(name)]
    sets["english"] = [
        Recording(r["file"], "en", read_wav(r["path"])[0], r["reference_text"]) for r in english
    ][: limit or None]
    lj = read_manifest("ljspeech")[: limit or None]
    pause = np.zeros(int(0.3 * SAMPLE_RATE_HZ), "<i2").tobytes()
    sets["ljspeech-long"] = [
        Recording(
            "ljspeech-joined",
            "en",
            pause.join(read_wav(r["path"])[0] for r in lj),
            " ".join(r["reference_text"] for r in lj),
        )
    ]
    return sets


def _config(recording: Recording, interim: bool) -> gateway_pb2.TranslateSpeechConfig:
    return gateway_pb2.TranslateSpeechConfig(
        request_id=f"bench-{recording.name}",
        source_language=recording.language,
        target_language=TARGETS[recording.language],
        input_format=audio_pb2.AudioFormat(
            encoding=audio_pb2.PCM_S16LE, sample_rate_hz=SAMPLE_RATE_HZ, channels=1
        ),
        synthesize_speech=True,
        interim_results=interim,
        mode=recording.mode,
    )


def _record(result: StreamResult, event: gateway_pb2.TranslateSpeechResponse, now_s: float) -> None:
    u = result.utterances.setdefault(event.utterance_index, Utterance())
    kind = event.WhichOneof("event")
    if kind == "commit" and event.commit.words:
        u.last_words_at_s = now_s
        u.words += [(w.end_ms, event.commit.clause_index) for w in event.commit.words]
    elif kind == "transcript" and event.transcript.is_final:
        u.transcript, u.final_at_s = event.transcript.text, now_s
        u.start_ms, u.end_ms = event.transcript.start_ms, event.transcript.end_ms
    elif kind == "transcript":
        u.interims += 1
    elif kind == "error":
        u.errors.append(f"{event.error.stage} {event.error.code}: {event.error.message[:80]}")
    elif kind == "translation":
        u.translation.append(event.translation.text)
    elif kind == "timings" and event.timings.end_of_speech_to_first_audio_ms:
        u.gateway_audio_s = event.timings.end_of_speech_to_first_audio_ms / 1000
    elif kind == "audio" and event.audio.audio:
        rate = event.audio.format.sample_rate_hz or 22050
        u.audio.append((now_s, event.audio.clause_index, len(event.audio.audio) / 2 / rate))


async def _stream(address: str, recording: Recording, interim: bool = False) -> StreamResult:
    before = np.zeros(SAMPLE_RATE_HZ // 2, "<i2").tobytes()
    after = np.zeros(SAMPLE_RATE_HZ * 3 // 2, "<i2").tobytes()
    chunks = split_pcm(before + recording.pcm + after, CHUNK_MS)
    result = StreamResult(recording, started_s=0.0)
    playhead_s = 0.0
    async with GatewayClient(address) as client:
        result.started_s = time.monotonic()
        async for event in client.translate_speech(_config(recording, interim), paced(chunks), timeout_s=900):
            now_s = time.monotonic()
            _record(result, event, now_s)
            if event.WhichOneof("event") == "audio" and event.audio.audio:
                key = (event.utterance_index, event.audio.clause_index)
                start_s = max(now_s, playhead_s)
                result.sound_start.setdefault(key, start_s)
                playhead_s = start_s + result.utterances[event.utterance_index].audio[-1][2]
    return result


def _figures(results: list[StreamResult]) -> dict[str, list[float]]:
    """Per-utterance latencies (s) and per-word lags (s) of some streams."""
    out: dict[str, list[float]] = {
        "audio": [],
        "any_audio": [],
        "text": [],
        "final": [],
        "lag": [],
        "gateway": [],
    }
    for result in results:
        for index, u in result.utterances.items():
            if not u.final_at_s or not u.transcript:
                continue
            eos_s = result.started_s + u.end_ms / 1000
            out["final"].append(u.final_at_s - eos_s)
            if u.last_words_at_s:
                out["text"].append(u.last_words_at_s - eos_s)
            if u.gateway_audio_s is not None:
                out["gateway"].append(u.gateway_audio_s)
            if u.audio:
                last_clause = max(clause for _, clause, _ in u.audio)
                out["audio"].append(min(t for t, c, _ in u.audio if c == last_clause) - eos_s)
                out["any_audio"].append(min(t for t, _, _ in u.audio) - eos_s)
            if u.end_ms - u.start_ms >= LONG_UTTERANCE_MS:
                for end_ms, clause in u.words:
                    sound_s = result.sound_start.get((index, clause))
                    if sound_s is not None:
                        out["lag"].append(sound_s - (result.started_s + end_ms / 1000))
    return out


def _quality(results: list[StreamResult]) -> tuple[float, float]:
    """(WER, chrF) of the streams' joined transcripts and translations; chrF is NaN without references."""
    language = results[0].recording.language
    references = [r.recording.reference for r in results]
    transcripts = [" ".join(u.transcript for _, u in sorted(r.utterances.items())) for r in results]
    score_wer = wer(references, transcripts, language)
    translated = [r for r in results if r.recording.translation]
    if not translated:
        return score_wer, float("nan")
    hypotheses = [
        " ".join(" ".join(u.translation) for _, u in sorted(r.utterances.items())) for r in translated
    ]
    return score_wer, chrf([r.recording.translation for r in translated], hypotheses)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _row(name: str, policy: str, results: list[StreamResult]) -> str:
    f = _figures(results)
    score_wer, score_chrf = _quality(results)
    lag = f"{np.mean(f['lag']):>5.2f} {_pct(f['lag'], 95):>5.2f}" if f["lag"] else f"{'-':>5} {'-':>5}"
    return (
        f"{name:<17} {policy:<15} {len(f['final']):>3} "
        f"{_pct(f['audio'], 50):>6.2f} {_pct(f['audio'], 95):>6.2f} "
        f"{_pct(f['any_audio'], 50):>6.2f} {_pct(f['text'], 50):>6.2f} {_pct(f['text'], 95):>6.2f} "
        f"{_pct(f['final'], 50):>6.2f} {lag} {100 * score_wer:>5.1f} {score_chrf:>5.1f}"
    ) + _errors(results)


def _errors(results: list[StreamResult]) -> str:
    """The error events of the streams, counted by stage and code (empty when none)."""
    counts = collections.Counter(
        e.split(":")[0] for r in results for u in r.utterances.values() for e in u.errors
    )
    first = next((e for r in results for u in r.utterances.values() for e in u.errors), "")
    return f"  errors {dict(counts)}, first: {first}" if counts else ""


async def _level(address: str, recordings: list[Recording], concurrency: int) -> list[StreamResult]:
    lanes = [recordings[i::concurrency] for i in range(concurrency)]
    results: list[StreamResult] = []

    async def lane(items: list[Recording]) -> None:
        for recording in items:
            results.append(await _stream(address, recording, interim=concurrency > 1))

    await asyncio.gather(*(lane(items) for items in lanes if items))
    return results


def _start(policy: str, stages: dict[str, ServerProcess]) -> ServerProcess:
    addresses = [arg for stage, p in stages.items() for arg in (f"--{stage}-address", p.address)]
    return start_server(
        "gateway", *addresses, "--live-commit-policy", policy, "--max-streams-per-caller", "0"
    )


def main() -> None:
    if not (SHARED_DATA / "speech" / "fleurs").exists():
        print(f"skipped: {SHARED_DATA / 'speech' / 'fleurs'} is missing")
        return
    sets = _sets(int(os.environ.get("PARLEY_BENCH_LIMIT", "0")))
    stages = {stage: start_server(stage, timeout_s=300) for stage in ("vad", "stt", "translate")}
    stages["tts"] = start_server("tts", "--cache-mb", "0", timeout_s=300)
    gateways = {policy: _start(policy, stages) for policy in POLICIES}
    try:
        for gateway in gateways.values():  # warm-up, not counted
            asyncio.run(_level(gateway.address, sets["fleurs-en"][:1] + sets["fleurs-fr"][:1], 1))
        seconds = sum(len(r.pcm) for recordings in sets.values() for r in recordings) / 2 / SAMPLE_RATE_HZ
        print(f"{seconds:.0f} s of speech per policy, streamed at real time in {CHUNK_MS} ms chunks")
        print(
            f"{'set':<17} {'policy':<15} {'n':>3} {'audio':>6} {'p95':>6} {'any':>6} {'text':>6} {'p95':>6} "
            f"{'final':>6} {'lag':>5} {'p95':>5} {'WER%':>5} {'chrF':>5}   (s; medians unless p95)"
        )
        by_set: dict[tuple[str, str], list[StreamResult]] = {}
        for name, recordings in sets.items():
            for policy, gateway in gateways.items():
                by_set[(name, policy)] = asyncio.run(_level(gateway.address, recordings, 1))
                print(_row(name, policy, by_set[(name, policy)]), flush=True)
        _verdicts(by_set)
        fleurs = sets["fleurs-en"] + sets["fleurs-fr"]
        for policy, gateway in gateways.items():
            results = asyncio.run(_level(gateway.address, fleurs, 4))
            interims = [u.interims for r in results for u in r.utterances.values() if u.transcript]
            print(_row("fleurs x4", policy, results) + f"  interims/utt {np.mean(interims):.1f}", flush=True)
    finally:
        for process in [*gateways.values(), *stages.values()]:
            process.terminate()


def _goal(value_s: float, goal_s: float) -> str:
    return f"goal {goal_s}: {'met' if value_s <= goal_s else 'missed'}"


def _verdicts(by_set: dict[tuple[str, str], list[StreamResult]]) -> None:
    """Prints each goal of issue 12 against the figures, with the ratio to the utterance path."""
    for name in ("fleurs-en", "fleurs-fr", "fleurs-fr-direct"):
        live = _figures(by_set[(name, "local_agreement")])
        base = _figures(by_set[(name, "utterance")])
        p95, p50 = _pct(live["audio"], 95), _pct(live["audio"], 50)
        text95 = _pct(live["text"], 95)
        print(
            f"{name}: eos->audio p95 {p95:.2f} s ({_goal(p95, GOAL_AUDIO_P95_S)}; "
            f"{_pct(base['audio'], 95) / p95:.1f}x faster than utterance at a time), "
            f"p50 {p50:.2f} s ({_goal(p50, GOAL_AUDIO_P50_S)}), "
            f"eos->text p95 {text95:.2f} s ({_goal(text95, GOAL_TEXT_P95_S)})"
        )
    for name in ("english", "fleurs-fr", "ljspeech-long"):
        live_wer, live_chrf = _quality(by_set[(name, "local_agreement")])
        base_wer, base_chrf = _quality(by_set[(name, "utterance")])
        print(
            f"{name}: WER {100 * live_wer:.1f}% vs {100 * base_wer:.1f}% "
            f"({100 * (live_wer - base_wer):+.1f} points; goal <= +1.0)"
            + (
                f", chrF {live_chrf:.1f} vs {base_chrf:.1f} ({live_chrf - base_chrf:+.1f}; goal >= -1.0)"
                if live_chrf == live_chrf
                else ""
            )
        )


if __name__ == "__main__":
    main()
