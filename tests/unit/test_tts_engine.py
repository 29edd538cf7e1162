"""TTS engine logic with fake voices: voice selection, validation, cache, streaming, WAV parsing."""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import time
import wave

import numpy as np
import pytest

from services.common.deadlines import Deadline
from services.common.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from services.common.inference import BatchedPool
from services.tts.cache import ByteLruCache
from services.tts.engine import (
    ESPEAK,
    PIPER,
    TtsEngine,
    VoiceInfo,
    _parse_wav_stream,
    normalize_language,
)


class FakeVoice:
    """Speaks 0.1 s of a constant per character, so audio length follows the text and rate."""

    def __init__(self, name: str, language: str, backend: str, rate_hz: int = 16000, delay_s: float = 0.0):
        self.info = VoiceInfo(name, language, backend, rate_hz)
        self.calls: list[tuple[str, float]] = []
        self.delay_s = delay_s
        self.threads: set[str] = set()

    def synthesize(self, text: str, rate: float) -> np.ndarray:
        self.calls.append((text, rate))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        n = 0 if text.strip(".!? ") == "" else int(len(text) * 0.1 * self.info.sample_rate_hz / rate)
        return np.full(n, 0.25, dtype=np.float32)


def make_engine(*voices: FakeVoice, **kwargs) -> TtsEngine:
    return TtsEngine([(v, BatchedPool(v.info.name)) for v in voices], **kwargs)


@pytest.fixture
def voices() -> tuple[FakeVoice, FakeVoice, FakeVoice]:
    return (
        FakeVoice("piper-en", "en-US", PIPER),
        FakeVoice("espeak-en-gb", "en-GB", ESPEAK),
        FakeVoice("espeak-fr-fr", "fr-FR", ESPEAK),
    )


def test_normalize_language():
    assert normalize_language("en_us") == "en-US"
    assert normalize_language("FR") == "fr"
    assert normalize_language("zh-hant-tw") == "zh-hant-TW"
    for bad in ("", "e", "english!", "12", "en--US"):
        with pytest.raises(InvalidArgument):
            normalize_language(bad)


def test_fallback_chain_prefers_piper_then_exact_region(voices):
    piper_en, espeak_en, espeak_fr = voices
    engine = make_engine(espeak_en, piper_en, espeak_fr)
    assert engine.select("en", "")[0] is piper_en
    assert engine.select("en-GB", "")[0] is piper_en  # Piper outranks a region match
    assert engine.select("fr-CA", "")[0] is espeak_fr
    assert engine.select("", "")[0] is piper_en  # default language en
    assert engine.select("", "espeak-en-gb")[0] is espeak_en
    no_piper = make_engine(espeak_en, FakeVoice("espeak-en-us", "en-US", ESPEAK))
    assert no_piper.select("en-US", "")[0].info.name == "espeak-en-us"
    assert no_piper.select("en", "")[0].info.name == "espeak-en-gb"  # load order breaks ties


def test_select_errors(voices):
    engine = make_engine(*voices, espeak_languages=("en", "fr"))
    with pytest.raises(InvalidArgument, match="unknown voice"):
        engine.select("", "nobody")
    with pytest.raises(InvalidArgument, match="speaks en-US, not fr"):
        engine.select("fr", "piper-en")
    with pytest.raises(InvalidArgument, match="BCP-47"):
        engine.select("français", "")
    with pytest.raises(FailedPrecondition, match="--espeak-languages"):
        engine.select("tr", "")
    missing = make_engine(voices[0], espeak_available=False)
    with pytest.raises(FailedPrecondition, match="espeak-ng"):
        missing.select("tr", "")


def test_no_voices_at_all_is_refused():
    with pytest.raises(FailedPrecondition, match="no voice loaded"):
        TtsEngine([])


def test_voices_filter(voices):
    engine = make_engine(*voices)
    assert [v.name for v in engine.voices()] == ["piper-en", "espeak-en-gb", "espeak-fr-fr"]
    assert [v.name for v in engine.voices("en-AU")] == ["piper-en", "espeak-en-gb"]
    assert [v.name for v in engine.voices("fr")] == ["espeak-fr-fr"]
    assert engine.voices("tr") == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": ""}, "empty"),
        ({"text": "  \n "}, "empty"),
        ({"text": "x" * 101}, "101 characters"),
        ({"text": "hi", "rate": -1.0}, "speaking_rate"),
        ({"text": "hi", "rate": 4.5}, "speaking_rate"),
        ({"text": "hi", "rate": float("nan")}, "speaking_rate"),
        ({"text": "hi", "rate": 0.01}, "speaking_rate 0.01 is out of range: use 0.25 to 4"),
        ({"text": "hi", "rate": 1e-30}, "speaking_rate"),
        ({"text": "Hello\x00there."}, "control character U\\+0000 at position 5"),
        ({"text": "Hello\x1b[31m"}, "control character U\\+001B"),
        ({"text": "x" * 100, "rate": 0.25}, "at least 16 s of audio.*--max-audio-s"),
        ({"text": "hi", "sample_rate_hz": 7999}, "sample_rate_hz"),
        ({"text": "hi", "sample_rate_hz": 192001}, "sample_rate_hz"),
        ({"text": "hi", "voice": "nobody"}, "unknown voice"),
        ({"text": "?!"}, "nothing to speak"),
    ],
)
async def test_bad_requests(voices, kwargs, message):
    engine = make_engine(*voices, max_text_chars=100, max_audio_s=15.0)
    with pytest.raises(InvalidArgument, match=message):
        await engine.synthesize(**kwargs)


async def test_tabs_and_line_breaks_are_plain_text(voices):
    engine = make_engine(*voices)
    result = await engine.synthesize("One\tline.\r\nAnother.", "en")
    assert result.duration_s > 0


async def test_audio_past_max_audio_s_is_refused_after_synthesis_and_ends_a_stream(voices):
    # The fake voice speaks 10 characters a second, slower than the up-front estimate assumes, so these
    # texts pass the estimate and are caught on the audio itself.
    engine = make_engine(*voices, max_audio_s=3.0)
    with pytest.raises(InvalidArgument, match="--max-audio-s"):
        await engine.synthesize("x" * 40, "en")
    stream = engine.synthesize_stream("One two three. Four five six. Seven eight nine.", "en")
    first = await stream.__anext__()
    assert first[1].duration_s == pytest.approx(1.4)
    assert (await stream.__anext__())[1].duration_s == pytest.approx(1.4)
    with pytest.raises(InvalidArgument, match="--max-audio-s"):
        await stream.__anext__()


async def test_rate_and_resampling(voices):
    engine = make_engine(*voices)
    normal = await engine.synthesize("hello", "en", rate=0.0)  # 0 reads as 1.0
    fast = await engine.synthesize("hello", "en", rate=2.0)
    assert normal.duration_s == pytest.approx(0.5)
    assert fast.duration_s == pytest.approx(0.25)
    up = await engine.synthesize("hello", "en", sample_rate_hz=48000)
    assert up.sample_rate_hz == 48000
    assert len(up.pcm) == 2 * 24000
    assert up.duration_s == pytest.approx(0.5)


async def test_cache_hits_on_identical_requests_only(voices):
    piper_en = voices[0]
    engine = make_engine(*voices)
    first = await engine.synthesize("hello there", "en")
    again = await engine.synthesize("  hello there ", "en-US")  # same text after strip, same voice
    assert again is first
    assert (engine.cache.hits, engine.cache.misses) == (1, 1)
    assert len(piper_en.calls) == 1
    await engine.synthesize("hello there", "en", rate=1.5)
    await engine.synthesize("hello there", "en", sample_rate_hz=8000)
    await engine.synthesize("hello there", "en", sample_rate_hz=16000)  # the voice's own rate: same key
    assert (engine.cache.hits, engine.cache.misses) == (2, 3)
    assert len(piper_en.calls) == 3


def test_byte_lru_cache_evicts_least_recently_used():
    cache: ByteLruCache[bytes] = ByteLruCache(10, len)
    cache.put("a", b"aaaa")
    cache.put("b", b"bbbb")
    assert cache.get("a") == b"aaaa"  # a is now more recent than b
    cache.put("c", b"cccc")
    assert cache.get("b") is None
    assert cache.get("a") == b"aaaa" and cache.get("c") == b"cccc"
    assert cache.bytes_used == 8
    cache.put("big", b"x" * 11)  # larger than the cache: not stored, nothing evicted
    assert cache.get("big") is None and len(cache) == 2
    cache.put("a", b"aaaaaa")  # replacing counts the new size
    assert cache.bytes_used == 10
    assert (cache.hits, cache.misses) == (3, 2)
    disabled: ByteLruCache[bytes] = ByteLruCache(0, len)
    disabled.put("a", b"a")
    assert disabled.get("a") is None


async def test_stream_yields_sentences_in_order_with_is_last(voices):
    piper_en = voices[0]
    engine = make_engine(*voices)
    chunks = [c async for c in engine.synthesize_stream("One. Two two! Three three three? Four", "en")]
    assert [s for s, _, _ in chunks] == ["One.", "Two two!", "Three three three?", "Four"]
    assert [last for _, _, last in chunks] == [False, False, False, True]
    assert [r.duration_s for _, r, _ in chunks] == pytest.approx([0.4, 0.8, 1.8, 0.4])
    assert all(t.startswith("piper-en") for t in piper_en.threads)  # ran on the voice's pool, not the loop


class GatedVoice(FakeVoice):
    """Speaks the first sentence at once; every later one waits until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__("gated", "en", PIPER)
        self.gate = threading.Event()

    def synthesize(self, text: str, rate: float) -> np.ndarray:
        if self.calls:
            assert self.gate.wait(30), "the gate was never opened"
        return super().synthesize(text, rate)


async def test_stream_first_chunk_before_the_rest_is_done():
    voice = GatedVoice()
    engine = make_engine(voice)
    stream = engine.synthesize_stream("One. Two. Three. Four.", "en")
    first = await asyncio.wait_for(stream.__anext__(), 30)  # while sentence two is still held back
    assert first[0] == "One." and not voice.gate.is_set()
    voice.gate.set()
    rest = [c async for c in stream]
    assert len(rest) == 3


async def test_stream_validates_before_first_sentence(voices):
    engine = make_engine(*voices)
    with pytest.raises(InvalidArgument):
        await engine.synthesize_stream("", "en").__anext__()
    with pytest.raises(FailedPrecondition):
        await engine.synthesize_stream("Bonjour.", "tr").__anext__()


async def test_abandoned_stream_cancels_cleanly(voices):
    engine = make_engine(*voices)
    stream = engine.synthesize_stream("One. Two. Three.", "en")
    await stream.__anext__()
    await stream.aclose()
    await asyncio.sleep(0)


def _wav(samples: np.ndarray, rate_hz: int, streamed: bool) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate_hz)
        w.writeframes(samples.astype("<i2").tobytes())
    data = bytearray(buf.getvalue())
    if streamed:  # espeak-ng writing to a pipe cannot seek back: its size fields are placeholders
        data[4:8] = struct.pack("<I", 0x7FFFFFFF)
        data[40:44] = struct.pack("<I", 0x7FFFFFFF)
    return bytes(data)


@pytest.mark.parametrize("streamed", [False, True])
def test_parse_wav_stream(streamed):
    samples = np.arange(-50, 50, dtype=np.int16)
    parsed, rate = _parse_wav_stream(_wav(samples, 22050, streamed))
    assert rate == 22050
    np.testing.assert_array_equal(parsed, samples)
    with pytest.raises(ValueError):
        _parse_wav_stream(b"not a wav file")


async def test_past_the_deadline_nothing_is_synthesized_and_a_stream_stops(voices):
    piper_en = voices[0]
    engine = make_engine(*voices)
    with pytest.raises(DeadlineExceeded):
        await engine.synthesize("hello", "en", deadline=Deadline.after(-1.0))
    assert piper_en.calls == []
    voice = GatedVoice()
    gated = make_engine(voice)
    stream = gated.synthesize_stream("One. Two. Three.", "en", deadline=Deadline.after(0.2))
    await stream.__anext__()  # sentence two waits at the gate until the deadline has passed
    await asyncio.sleep(0.3)
    voice.gate.set()
    with pytest.raises(DeadlineExceeded):
        [c async for c in stream]
    assert len(voice.calls) <= 2  # sentence three was never started
