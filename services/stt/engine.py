"""Whisper through CTranslate2 (faster-whisper's model): the speech-to-text server's batched decoder.

Imports no grpc: bad requests raise :class:`services.common.errors.InvalidArgument`. Every method that runs
a model blocks; call it on a batcher or pool thread, never on the event loop.

How audio is decoded (faster-whisper's ``BatchedInferencePipeline``, with adaptive window lengths):

1. :meth:`WhisperEngine.windows` cuts a request's audio into :class:`Window` s: with ``vad_filter`` the
   speech found by Silero VAD (faster-whisper's ``get_speech_timestamps``) packed into windows of at most
   the longest bucket (silence between speech removed, times mapped back); without it, fixed cuts of that
   length. Each window is given the shortest bucket (``window_buckets_s``) that holds it plus
   ``window_margin_s``: a 4 s utterance is encoded as a 10 s mel window instead of Whisper's padded 30 s,
   which doubled throughput on the shared English set (2.11x at batch 1, WER 6.1% vs 5.8%; measured
   with ``benchmarks/bench_stt.py``, CPU, int8, 2 threads).
   CTranslate2's Whisper encoder takes any length up to 3000 frames (30 s).
2. :meth:`WhisperEngine.transcribe_batch` decodes windows of one bucket together: one stacked mel batch,
   one encoder pass, language detection where the language was not given, one ``generate`` with a prompt
   per window (language, task, initial prompt, hotwords), Whisper's temperature fallback for the windows
   that fail the compression-ratio or log-probability test (re-decoded together by sampling at rising
   temperatures, as faster-whisper's ``generate_with_fallback``), repetition loops cut from a decode that
   still fails the compression-ratio test (:func:`cut_repetition_loops`), then word timestamps by
   cross-attention alignment (faster-whisper's ``add_word_timestamps``).
3. The servicer merges the windows' transcripts (:func:`merge_transcripts`).

Windows are decoded independently (no previous-text conditioning across windows, as in faster-whisper's
batched pipeline). Hallucination gates: each window's segments go through
:class:`services.stt.filters.HallucinationGates` (the Whisper paper's no-speech rule, the compression-ratio
gate and the phrase list); what they drop is returned in ``Transcript.dropped``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import _LANGUAGE_CODES, Tokenizer
from faster_whisper.transcribe import get_compression_ratio, get_suppressed_tokens
from faster_whisper.vad import VadOptions, get_speech_timestamps

from services.common.audio import SAMPLE_RATE_HZ
from services.common.deadlines import Deadline
from services.common.devices import check_device
from services.common.errors import InvalidArgument
from services.common.models import resolve_whisper
from services.common.text import LANGUAGE_TAG, primary_language, tandem_repeats
from services.stt.config import SttConfig
from services.stt.filters import HallucinationGates, normalize_text, split_hallucinations

logger = logging.getLogger(__name__)

TRANSCRIBE = "transcribe"
TRANSLATE = "translate"
MAX_WINDOW_S = 30.0  # Whisper's encoder input: 3000 mel frames of 10 ms
FRAMES_PER_SECOND = 100  # mel frames (hop of 160 samples at 16 kHz)
TIME_PRECISION_S = 0.02  # one timestamp token
TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # Whisper's fallback schedule
BEST_OF = 5  # hypotheses sampled per window at a fallback temperature (faster-whisper's best_of)
MAX_INITIAL_TIMESTAMP_S = 1.0
# A decode's token budget: these plus TOKENS_PER_S per second of the window's audio (Whisper's own cap, 448
# decoder positions, still applies). Generous: fast speech is 4-5 words/s, under 2 tokens a word in the
# languages measured, with 2 timestamp tokens per segment. Streaming agreement decodes of 1-5 s of audio took
# 2-3 s instead of ~0.4 s (seen in the STT log), as a decode run on to 448 tokens would; a 3 s tail now stops
# at 80.
MIN_BUDGET_TOKENS = 32
TOKENS_PER_S = 16
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"

# Deprecated or non-Whisper spellings of languages Whisper knows under another code.
_LANGUAGE_ALIASES = {"iw": "he", "in": "id", "ji": "yi", "jv": "jw", "nb": "no", "fil": "tl"}


@dataclass(frozen=True)
class Word:
    """One word with its timing; times in seconds from the start of the request's audio."""

    start_s: float
    end_s: float
    word: str
    probability: float


@dataclass(frozen=True)
class Segment:
    """One decoded segment; times in seconds from the start of the request's audio.

    Attributes:
        avg_logprob: Mean natural-log probability of its window's tokens (<= 0).
        no_speech_prob: Probability that its window held no speech, in [0, 1].
        compression_ratio: gzip compression ratio of its text.
        words: Filled when word timestamps were requested.
    """

    start_s: float
    end_s: float
    text: str
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    words: tuple[Word, ...] = ()


@dataclass(frozen=True)
class Transcript:
    """Result of one transcription.

    Attributes:
        text: The kept segments' text joined, stripped.
        language: ISO 639-1 code (Whisper's), given or detected.
        language_probability: Probability of the detected language; 1.0 when it was given.
        duration_s: Duration of the audio given, in seconds.
        segments: Segments kept.
        dropped: Segments dropped by the hallucination filter.

    Times are seconds from the start of the request's audio.
    """

    text: str
    language: str
    language_probability: float
    duration_s: float
    segments: list[Segment] = field(default_factory=list)
    dropped: list[Segment] = field(default_factory=list)


@dataclass(frozen=True)
class DecodeOptions:
    """Validated decoding options (build them with :meth:`WhisperEngine.options`).

    Attributes:
        language: Whisper language code, or None to detect it.
        task: "transcribe" or "translate" (into English).
        beam_size: Beam size at temperature 0.
        word_timestamps: Return word timings.
        initial_prompt: Previous-context text for the decoder, or None.
        hotwords: Words to favour, or None.
        vad_filter: Drop non-speech with Silero VAD before decoding.
        temperature_fallback: Re-decode at higher temperatures when a window fails the compression-ratio
            or log-probability test (Whisper's fallback); off for cheap interim results.
    """

    language: str | None
    task: str = TRANSCRIBE
    beam_size: int = 5
    word_timestamps: bool = False
    initial_prompt: str | None = None
    hotwords: str | None = None
    vad_filter: bool = True
    temperature_fallback: bool = True


def whisper_language(
    tag: str, supported: frozenset[str], known: frozenset[str], english_only: bool
) -> str | None:
    """Maps a BCP-47 tag ("fr-FR", "en", "") to the model's language code, or None to detect it.

    Args:
        tag: BCP-47 language tag; empty to detect the language.
        supported: Codes the model can decode.
        known: Every Whisper language code (to tell an unknown code from one this model lacks).
        english_only: The model is English-only.

    Raises:
        InvalidArgument: Not a BCP-47 tag, a language Whisper does not know, or a language other than
            English for an English-only model.
    """
    tag = tag.strip()
    if not tag:
        return None
    if not LANGUAGE_TAG.match(tag):
        raise InvalidArgument(
            f"language {tag!r} is not a BCP-47 tag: send a code such as 'en', 'fr' or 'fr-FR', or leave it "
            "empty to detect the language"
        )
    primary = primary_language(tag)
    primary = _LANGUAGE_ALIASES.get(primary, primary)
    if primary in supported:
        return primary
    if english_only and primary in known:
        raise InvalidArgument(
            f"language {tag!r}: this server's model is English-only; send 'en' or leave the language empty, "
            "or run the server with a multilingual model (--model base)"
        )
    raise InvalidArgument(
        f"unknown language code {tag!r}: send a BCP-47 tag whose primary subtag is one of the model's "
        f"languages ({', '.join(sorted(supported))}), or leave it empty to detect the language"
    )


@dataclass(frozen=True)
class Window:
    """One model input: speech cut from a request's audio, decoded in a mel window of ``window_s``.

    Attributes:
        audio: float32 in [-1, 1], shape (n,), 16 kHz, n <= window_s * 16000: the ``spans`` concatenated.
        spans_s: (start_s, end_s) of each piece of the request's audio in ``audio``, in order.
        window_s: Mel window length (the batch bucket), in seconds.
        options: Decoding options.
        deadline: When the caller gives up; a backend that calls out (HTTP) bounds its call by it.
    """

    audio: np.ndarray
    spans_s: tuple[tuple[float, float], ...]
    window_s: float
    options: DecodeOptions
    deadline: Deadline = field(default_factory=lambda: Deadline(None))

    def request_time_s(self, t_s: float) -> float:
        """Maps a time in ``audio`` (s) to the request's audio (s); later times extend the last span."""
        elapsed_s = 0.0
        for start_s, end_s in self.spans_s:
            length_s = end_s - start_s
            if t_s <= elapsed_s + length_s:
                return start_s + max(0.0, t_s - elapsed_s)
            elapsed_s += length_s
        start_s, end_s = self.spans_s[-1]
        return end_s + (t_s - elapsed_s)


class SttBackend(Protocol):
    """What the speech-to-text servicer needs from a backend (Whisper here, or an HTTP transcription server).

    The servicer cuts audio with ``windows`` (on a pool thread), batches windows of equal ``batch_key``
    through its dynamic batcher into ``transcribe_batch`` (on ``workers`` instance threads).
    """

    sample_rate_hz: int
    workers: int
    # The backend returns word timings (streaming commits need words; without them, a segment's words are
    # spread over its span).
    word_timestamps: bool

    def options(
        self,
        *,
        language: str = "",
        translate: bool = False,
        beam_size: int = 0,
        word_timestamps: bool = False,
        initial_prompt: str = "",
        hotwords: str = "",
        vad_filter: bool | None = None,
    ) -> DecodeOptions:
        """Validates request settings; raises InvalidArgument."""

    def windows(self, audio: np.ndarray, options: DecodeOptions) -> list[Window]:
        """Cuts float32 16 kHz audio into model inputs, in time order."""

    def batch_key(self, window: Window) -> Hashable:
        """Windows with different keys never share a batch."""

    def transcribe_batch(self, windows: Sequence[Window]) -> list[Transcript]:
        """One transcript per window, times in the request's audio; blocking."""

    def warm(self) -> None:
        """Pays start-up costs before the first request."""

    def close(self) -> None:
        """Releases what the backend holds (threads, connections)."""


def pack_spans(speech: Sequence[tuple[int, int]], max_window_samples: int) -> list[list[tuple[int, int]]]:
    """Packs speech spans (sample ranges, in order) into windows of at most ``max_window_samples`` of speech.

    A span is never cut unless it alone is longer than a window (then it is cut at the window length).
    Unlike faster-whisper's ``collect_chunks``, every span is kept with the window that holds its audio.
    """
    windows: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    filled = 0
    for start, end in speech:
        while end - start > 0:
            take = min(end - start, max_window_samples)
            if filled + take > max_window_samples:
                windows.append(current)
                current, filled = [], 0
            current.append((start, start + take))
            filled += take
            start += take
    if current:
        windows.append(current)
    return windows


def bucket_s(duration_s: float, buckets_s: Sequence[float], margin_s: float) -> float:
    """The shortest bucket holding ``duration_s + margin_s``; the longest bucket when none does."""
    fitting = [b for b in buckets_s if b >= duration_s + margin_s]
    return min(fitting) if fitting else max(buckets_s)


def segments_from_tokens(
    tokens: Sequence[int], timestamp_begin: int, duration_s: float
) -> list[tuple[float, float, list[int]]]:
    """Splits Whisper output tokens at timestamp tokens into (start_s, end_s, tokens) segments.

    Whisper writes ``<|t0|> text <|t1|>`` per segment (consecutive segments give ``<|t1|><|t1|>``); a
    timestamp token ``k`` is ``k * 0.02`` s into the window. Text after the last timestamp ends at
    ``duration_s``. The returned token lists keep their timestamp tokens (word alignment drops them).
    """
    segments: list[tuple[float, float, list[int]]] = []
    start_s: float | None = None
    current: list[int] = []
    for token in tokens:
        if token >= timestamp_begin:
            time_s = (token - timestamp_begin) * TIME_PRECISION_S
            if any(t < timestamp_begin for t in current):
                segments.append((start_s or 0.0, min(time_s, duration_s), current + [token]))
                current, start_s = [], None
            else:
                start_s, current = time_s, [token]
        else:
            current.append(token)
    if any(t < timestamp_begin for t in current):
        segments.append((start_s or 0.0, duration_s, current))
    return segments


def cut_repetition_loops(tokens: Sequence[int], tokenizer: Tokenizer, min_cut_words: int = 3) -> list[int]:
    """Cuts Whisper's repetition loops from decoded tokens: words said again at once are kept once.

    Words are compared after :func:`services.stt.filters.normalize_text` (case and punctuation ignored, so
    "character and they" repeats "character, and they"); punctuation-only words are skipped. A unit of
    ``n`` words followed at once by ``copies - 1`` copies of itself loses the copies when they hold at least
    ``min_cut_words`` words ("very, very" stays; a sentence said twice over becomes one). Timestamp tokens
    inside a cut stretch go with it, so the kept copy's words are aligned over the audio all copies were
    given. Runs are found by :func:`services.common.text.tandem_repeats`.

    Args:
        tokens: One decode's token ids, timestamps included.
        tokenizer: The decode's tokenizer (text tokens are those below its ``eot``).
        min_cut_words: Fewest repeated words that make a loop.

    Returns:
        The tokens with each loop's copies removed (the same list contents when there is no loop).
    """
    positions = [k for k, token in enumerate(tokens) if token < tokenizer.eot]
    words, word_tokens = tokenizer.split_to_word_tokens([tokens[k] for k in positions])
    ends = []  # index in ``positions`` of the last token of each word that has letters or digits
    keys = []
    at = 0
    for word, pieces in zip(words, word_tokens, strict=True):
        at += len(pieces)
        if key := normalize_text(word):
            ends.append(at - 1)
            keys.append(key)
    runs = tandem_repeats(keys, lambda n, copies: n * (copies - 1) >= min_cut_words)
    # From after the unit's last word to the last copy's last word: the punctuation after the loop stays.
    removed = {
        k
        for i, n, copies in runs
        for k in range(positions[ends[i + n - 1]] + 1, positions[ends[i + copies * n - 1]] + 1)
    }
    return [token for k, token in enumerate(tokens) if k not in removed]


def merge_transcripts(parts: Sequence[Transcript], duration_s: float, language: str) -> Transcript:
    """Joins the transcripts of one request's windows, in order.

    Args:
        parts: One transcript per window, times already in the request's audio.
        duration_s: The request's audio duration, in seconds.
        language: Reported when no window was decoded (no speech): the requested language or "".
    """
    if not parts:
        return Transcript(text="", language=language, language_probability=0.0, duration_s=duration_s)
    segments = [s for p in parts for s in p.segments]
    return Transcript(
        text=" ".join(p.text for p in parts if p.text),
        language=parts[0].language,
        language_probability=parts[0].language_probability,
        duration_s=duration_s,
        segments=segments,
        dropped=[s for p in parts for s in p.dropped],
    )


@dataclass
class _Decoded:
    """One window's best decode so far."""

    tokens: list[int]
    text: str
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float


def _without_loops(d: _Decoded, tokenizer: Tokenizer, compression_ratio_threshold: float) -> _Decoded:
    """``d`` with its repetition loops cut when its compression ratio is above the threshold.

    A decode still failing Whisper's loop test after the fallback is a loop kept for want of better (seen
    as a sentence tripled in a 10-minute subtitle job); below the threshold, repeats are real speech.
    Text and compression ratio are redone after :func:`cut_repetition_loops`.
    """
    if d.compression_ratio <= compression_ratio_threshold:
        return d
    tokens = cut_repetition_loops(d.tokens, tokenizer)
    if len(tokens) == len(d.tokens):
        return d
    text = tokenizer.decode([t for t in tokens if t < tokenizer.eot]).strip()
    ratio = get_compression_ratio(text)
    logger.info(
        "cut a repetition loop: %d of %d tokens removed, compression ratio %.2f -> %.2f",
        len(d.tokens) - len(tokens),
        len(d.tokens),
        d.compression_ratio,
        ratio,
    )
    return replace(d, tokens=tokens, text=text, compression_ratio=ratio)


class WhisperEngine:
    """A CTranslate2 Whisper model (loaded by faster-whisper) that decodes batches of windows.

    ``transcribe_batch`` may be called from ``instance_count`` threads at once: CTranslate2 runs that many
    batches in parallel (``inter_threads``) on shared weights, and releases the GIL.

    Args:
        config: Server settings (model, device, compute type, threads, instances, windows, gates).

    Raises:
        FailedPrecondition: The configured CUDA device or compute type is not available here.
        ValueError: A window bucket outside (0, 30] s.
        RuntimeError: From CTranslate2 when the model cannot be loaded.
    """

    sample_rate_hz = SAMPLE_RATE_HZ
    word_timestamps = True

    def __init__(self, config: SttConfig):
        bad = [b for b in config.window_buckets_s if not 0 < b <= MAX_WINDOW_S]
        if bad or not config.window_buckets_s:
            raise ValueError(
                f"--window-buckets-s must list lengths in (0, {MAX_WINDOW_S:g}] s (Whisper's window), got "
                f"{list(config.window_buckets_s)}"
            )
        check_device(config.device, config.device_index, config.compute_type)
        self.config = config
        self.workers = config.instance_count
        compute_type = config.compute_type
        if compute_type == "auto":
            if config.device == "cpu":
                compute_type = "int8"
            else:
                supported = ctranslate2.get_supported_compute_types(config.device, config.device_index)
                compute_type = "float16" if "float16" in supported else "int8"
        cpu_threads = config.cpu_threads or max(1, _cpu_count() // max(1, config.instance_count))
        path = resolve_whisper(config.model)
        self.model = WhisperModel(
            path,
            device=config.device,
            device_index=config.device_index,
            compute_type=compute_type,
            cpu_threads=cpu_threads,
            num_workers=config.instance_count,
            local_files_only=True,
        )
        self.multilingual = bool(self.model.model.is_multilingual)
        self.known_languages = frozenset(_LANGUAGE_CODES)
        hf_tokenizer = self.model.hf_tokenizer
        self.languages = (
            frozenset(code for code in _LANGUAGE_CODES if hf_tokenizer.token_to_id(f"<|{code}|>") is not None)
            if self.multilingual
            else frozenset({"en"})
        )
        self._tokenizers: dict[tuple[str, str], Tokenizer] = {}
        self._tokenizers_lock = threading.Lock()
        self.gates = HallucinationGates(
            no_speech_threshold=config.no_speech_threshold,
            log_prob_threshold=config.log_prob_threshold,
            compression_ratio_threshold=config.compression_ratio_threshold,
            phrases=config.hallucination_phrases,
        )
        self.buckets_s = tuple(sorted(set(config.window_buckets_s)))
        self.max_window_s = self.buckets_s[-1]
        logger.info(
            "whisper %s loaded from %s: device %s:%d, %s, %d thread(s) x %d instance(s), %d language(s), "
            "windows %s s",
            config.model,
            path,
            config.device,
            config.device_index,
            compute_type,
            cpu_threads,
            config.instance_count,
            len(self.languages),
            ",".join(f"{b:g}" for b in self.buckets_s),
        )

    def options(
        self,
        *,
        language: str = "",
        translate: bool = False,
        beam_size: int = 0,
        word_timestamps: bool = False,
        initial_prompt: str = "",
        hotwords: str = "",
        vad_filter: bool | None = None,
    ) -> DecodeOptions:
        """Validates request settings; 0, empty and None take the server defaults.

        Raises:
            InvalidArgument: Unknown language, a language or task an English-only model cannot do, or a
                beam size out of range.
        """
        code = whisper_language(language, self.languages, self.known_languages, not self.multilingual)
        if translate and not self.multilingual:
            raise InvalidArgument(
                "task TRANSLATE needs a multilingual model; this server's model is English-only "
                "(run it with --model base)"
            )
        if beam_size > 16:
            raise InvalidArgument(
                f"beam_size {beam_size} is more than 16: send 1 to 16, or 0 for the default"
            )
        return DecodeOptions(
            language=code,
            task=TRANSLATE if translate else TRANSCRIBE,
            beam_size=beam_size or self.config.beam_size,
            word_timestamps=word_timestamps,
            initial_prompt=initial_prompt or None,
            hotwords=hotwords or None,
            vad_filter=self.config.vad_filter if vad_filter is None else vad_filter,
        )

    def windows(self, audio: np.ndarray, options: DecodeOptions) -> list[Window]:
        """Cuts a request's audio into windows (see the module docstring); blocking (runs Silero VAD).

        Args:
            audio: float32 in [-1, 1], shape (n_samples,), 16 kHz mono.
            options: From :meth:`options`; ``vad_filter`` chooses speech windows or fixed cuts.

        Returns:
            The windows in time order; empty when there is no audio or no speech.
        """
        # Speech running to the very end of a window makes Whisper stop early (it learnt that a window's
        # last words continue in the next one): every window keeps the margin after its speech.
        max_speech_s = max(1.0, self.max_window_s - self.config.window_margin_s)
        max_samples = int(max_speech_s * SAMPLE_RATE_HZ)
        if options.vad_filter:
            vad = VadOptions(max_speech_duration_s=max_speech_s, min_silence_duration_ms=160)
            speech = [(ts["start"], ts["end"]) for ts in get_speech_timestamps(audio, vad)]
        else:
            speech = [(0, len(audio))] if len(audio) else []
        windows = []
        for spans in pack_spans(speech, max_samples):
            pieces = np.concatenate([audio[start:end] for start, end in spans])
            duration_s = len(pieces) / SAMPLE_RATE_HZ
            windows.append(
                Window(
                    audio=pieces,
                    spans_s=tuple((start / SAMPLE_RATE_HZ, end / SAMPLE_RATE_HZ) for start, end in spans),
                    window_s=bucket_s(duration_s, self.buckets_s, self.config.window_margin_s),
                    options=options,
                )
            )
        return windows

    @staticmethod
    def batch_key(window: Window) -> Hashable:
        """Windows sharing a batch share a bucket, beam size and fallback; word alignment also a language.

        They also share their initial prompt and hotwords (the decoder's previous-text section): CTranslate2's
        Whisper ``generate`` needs the start-of-transcript token at one position in the whole batch, so
        windows whose prompts differ in length cannot be decoded together (seen as INTERNAL errors when
        streams, each with its own committed text as prompt, were batched).
        """
        o = window.options
        return (
            window.window_s,
            o.beam_size,
            o.temperature_fallback,
            o.word_timestamps and o.language,
            o.initial_prompt,
            o.hotwords,
        )

    def transcribe_batch(self, windows: Sequence[Window]) -> list[Transcript]:
        """Decodes windows of one :meth:`batch_key` together; blocking, call it on an instance thread.

        Args:
            windows: 1..max_batch_size windows with equal :meth:`batch_key`.

        Returns:
            One transcript per window, in order, times in the request's audio, hallucinated segments moved
            to ``dropped``. ``duration_s`` is the window's speech duration.
        """
        window_s = windows[0].window_s
        frames = int(round(window_s * FRAMES_PER_SECOND))
        features = np.stack([self._features(w.audio, window_s, frames) for w in windows])
        encoder_output = self.model.encode(features)
        languages = self._languages(windows, encoder_output)
        tokenizers = [
            self._tokenizer(w.options.task, lang) for w, (lang, _) in zip(windows, languages, strict=True)
        ]
        prompts = [self._prompt(w.options, t) for w, t in zip(windows, tokenizers, strict=True)]
        options = windows[0].options
        budget = MIN_BUDGET_TOKENS + int(TOKENS_PER_S * max(len(w.audio) for w in windows) / SAMPLE_RATE_HZ)
        decoded = self._generate(
            encoder_output, prompts, tokenizers, budget, beam_size=options.beam_size, temperature=0.0
        )
        if options.temperature_fallback:
            self._fall_back(decoded, features, prompts, tokenizers, budget)
        threshold = self.gates.compression_ratio_threshold
        decoded = [_without_loops(d, t, threshold) for d, t in zip(decoded, tokenizers, strict=True)]
        splits = [
            segments_from_tokens(d.tokens, t.timestamp_begin, len(w.audio) / SAMPLE_RATE_HZ)
            for d, t, w in zip(decoded, tokenizers, windows, strict=True)
        ]
        words = (
            self._words(splits, tokenizers[0], encoder_output, features, windows)
            if options.word_timestamps
            else [[() for _ in split] for split in splits]
        )
        return [
            self._transcript(*item)
            for item in zip(windows, decoded, tokenizers, splits, words, languages, strict=True)
        ]

    def _transcript(
        self,
        window: Window,
        decoded: _Decoded,
        tokenizer: Tokenizer,
        split: list[tuple[float, float, list[int]]],
        split_words: Sequence[tuple[Word, ...]],
        language: tuple[str, float],
    ) -> Transcript:
        """One window's transcript: its segments in request time, hallucinated ones moved to ``dropped``."""
        segments = []
        for (start_s, end_s, tokens), segment_words in zip(split, split_words, strict=True):
            text = tokenizer.decode([t for t in tokens if t < tokenizer.eot])
            segments.append(
                Segment(
                    start_s=round(window.request_time_s(start_s), 3),
                    end_s=round(window.request_time_s(end_s), 3),
                    text=text,
                    avg_logprob=decoded.avg_logprob,
                    no_speech_prob=decoded.no_speech_prob,
                    compression_ratio=get_compression_ratio(text),
                    words=tuple(
                        replace(
                            w, start_s=window.request_time_s(w.start_s), end_s=window.request_time_s(w.end_s)
                        )
                        for w in segment_words
                    ),
                )
            )
        kept, dropped = split_hallucinations(segments, self.gates)
        return Transcript(
            text="".join(s.text for s in kept).strip(),
            language=language[0],
            language_probability=language[1],
            duration_s=len(window.audio) / SAMPLE_RATE_HZ,
            segments=kept,
            dropped=dropped,
        )

    def _features(self, audio: np.ndarray, window_s: float, frames: int) -> np.ndarray:
        """Log-mel features of ``audio`` zero-padded to ``window_s``: shape (n_mels, frames), float32."""
        padded = np.zeros(int(round(window_s * SAMPLE_RATE_HZ)), dtype=np.float32)
        padded[: len(audio)] = audio[: len(padded)]
        return self.model.feature_extractor(padded, padding=0)[:, :frames].astype(np.float32, copy=False)

    def _languages(self, windows: Sequence[Window], encoder_output) -> list[tuple[str, float]]:
        """(code, probability) per window: the requested language, or Whisper's detection."""
        if all(w.options.language for w in windows) or not self.multilingual:
            return [(w.options.language or "en", 1.0) for w in windows]
        detected = self.model.model.detect_language(encoder_output)
        languages = []
        for window, ranked in zip(windows, detected, strict=True):
            if window.options.language:
                languages.append((window.options.language, 1.0))
                continue
            token, probability = next(
                ((tok, p) for tok, p in ranked if tok[2:-2] in self.languages), (ranked[0][0], ranked[0][1])
            )
            languages.append((token[2:-2], float(probability)))
        return languages

    def _tokenizer(self, task: str, language: str):
        key = (task, language)
        with self._tokenizers_lock:
            if key not in self._tokenizers:
                self._tokenizers[key] = Tokenizer(
                    self.model.hf_tokenizer, self.multilingual, task=task, language=language
                )
            return self._tokenizers[key]

    def _prompt(self, options: DecodeOptions, tokenizer) -> list[int]:
        previous = tokenizer.encode(" " + options.initial_prompt.strip()) if options.initial_prompt else []
        return self.model.get_prompt(tokenizer, previous, without_timestamps=False, hotwords=options.hotwords)

    def _generate(
        self, encoder_output, prompts, tokenizers, budget: int, *, beam_size: int, temperature: float
    ) -> list[_Decoded]:
        """Decodes a batch; at most ``budget`` tokens after each prompt (``MIN_BUDGET_TOKENS``)."""
        if temperature > 0:
            search = {
                "beam_size": 1,
                "num_hypotheses": BEST_OF,
                "sampling_topk": 0,
                "sampling_temperature": temperature,
            }
        else:
            search = {"beam_size": beam_size}
        results = self.model.model.generate(
            encoder_output,
            prompts,
            max_length=min(self.model.max_length, max(len(p) for p in prompts) + budget),
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=list(get_suppressed_tokens(tokenizers[0], [-1])),
            max_initial_timestamp_index=int(round(MAX_INITIAL_TIMESTAMP_S / TIME_PRECISION_S)),
            **search,
        )
        decoded = []
        for result, tokenizer in zip(results, tokenizers, strict=True):
            tokens = result.sequences_ids[0]
            # faster-whisper recovers the mean log probability from CTranslate2's length-normalised score.
            avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
            text = tokenizer.decode([t for t in tokens if t < tokenizer.eot]).strip()
            decoded.append(
                _Decoded(tokens, text, avg_logprob, result.no_speech_prob, get_compression_ratio(text))
            )
        return decoded

    def _needs_fallback(self, d: _Decoded) -> bool:
        """Whisper's fallback test: too repetitive or too unlikely, unless the window is silence."""
        g = self.gates
        failed = d.compression_ratio > g.compression_ratio_threshold or d.avg_logprob < g.log_prob_threshold
        silent = d.no_speech_prob > g.no_speech_threshold and d.avg_logprob < g.log_prob_threshold
        return failed and not silent

    def _fall_back(
        self, decoded: list[_Decoded], features: np.ndarray, prompts, tokenizers, budget: int
    ) -> None:
        """Re-decodes failing windows by sampling at rising temperatures, in place.

        faster-whisper's rule: the first decode that passes, else the most likely one under the
        compression-ratio limit, else the most likely one.
        """
        attempts: dict[int, list[_Decoded]] = {}
        for temperature in TEMPERATURES[1:]:
            failing = [i for i, d in enumerate(decoded) if self._needs_fallback(d)]
            if not failing:
                break
            for i in failing:
                attempts.setdefault(i, [decoded[i]])
            encoder_output = self.model.encode(features[failing])
            retried = self._generate(
                encoder_output,
                [prompts[i] for i in failing],
                [tokenizers[i] for i in failing],
                budget,
                beam_size=1,
                temperature=temperature,
            )
            for i, d in zip(failing, retried, strict=True):
                attempts[i].append(d)
                decoded[i] = d
        for i, tried in attempts.items():
            if self._needs_fallback(decoded[i]):
                readable = [d for d in tried if d.compression_ratio <= self.gates.compression_ratio_threshold]
                decoded[i] = max(readable or tried, key=lambda d: d.avg_logprob)

    def _words(self, splits, tokenizer, encoder_output, features, windows) -> list[list[tuple[Word, ...]]]:
        """Word timings per segment per window, in window time (faster-whisper's alignment)."""
        aligned = [i for i, split in enumerate(splits) if split]
        words: list[list[tuple[Word, ...]]] = [[] for _ in splits]
        if not aligned:
            return words
        if len(aligned) < len(splits):
            encoder_output = self.model.encode(features[aligned])
        segments = [
            [
                {"tokens": tokens, "start": start_s, "end": end_s, "seek": 0}
                for start_s, end_s, tokens in splits[i]
            ]
            for i in aligned
        ]
        frames = [int(np.ceil(len(windows[i].audio) / SAMPLE_RATE_HZ) * FRAMES_PER_SECOND) for i in aligned]
        self.model.add_word_timestamps(
            segments, tokenizer, encoder_output, frames, PREPEND_PUNCTUATIONS, APPEND_PUNCTUATIONS, 0.0
        )
        for i, window_segments in zip(aligned, segments, strict=True):
            words[i] = [
                tuple(
                    Word(float(w["start"]), float(w["end"]), w["word"], float(w["probability"]))
                    for w in s["words"]
                )
                for s in window_segments
            ]
        return words

    def warm(self) -> None:
        """Decodes a tone and runs the windowing VAD, so the first request pays no start-up cost."""
        t = np.arange(SAMPLE_RATE_HZ, dtype=np.float32) / SAMPLE_RATE_HZ
        tone = (0.1 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
        language = "en" if "en" in self.languages else None
        options = DecodeOptions(language=language, beam_size=self.config.beam_size, vad_filter=False)
        self.transcribe_batch(self.windows(tone, options))
        self.windows(tone, replace(options, vad_filter=True))

    def close(self) -> None:
        """Nothing to release beyond what garbage collection frees (the stage's ``close`` hook)."""


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load(config: SttConfig) -> WhisperEngine:
    """Loads and warms the engine (the stage's ``load``)."""
    engine = WhisperEngine(config)
    engine.warm()
    return engine
