"""Whisper through faster-whisper (CTranslate2): the model wrapper of the speech-to-text server.

Imports no grpc: bad requests raise :class:`services.common.errors.InvalidArgument`. Every method that runs
the model blocks; call it on an :class:`services.common.inference.InferencePool` thread, never on the
event loop. faster-whisper decodes lazily while its segment generator is iterated, so
:meth:`WhisperEngine.transcribe` consumes the generator itself, on the calling (worker) thread.

Hallucination gates: faster-whisper applies the Whisper paper's no-speech rule itself while decoding (a
30 s window whose no-speech probability and mean log probability fail the gate is skipped before any text
is produced, which also keeps invented text out of the next window's prompt); the segments it returns then
go through :class:`services.stt.filters.HallucinationGates` (the same no-speech rule, the
compression-ratio gate and the phrase list), and what that drops is returned in ``Transcript.dropped``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

import numpy as np

from services.common.errors import InvalidArgument
from services.common.models import resolve_whisper, silero_vad_path
from services.stt.config import SttConfig
from services.stt.endpointing import SileroSession, StreamingSilero
from services.stt.filters import HallucinationGates, split_hallucinations

logger = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 16000
TRANSCRIBE = "transcribe"
TRANSLATE = "translate"

# Deprecated or non-Whisper spellings of languages Whisper knows under another code.
_LANGUAGE_ALIASES = {"iw": "he", "in": "id", "ji": "yi", "jv": "jw", "nb": "no", "fil": "tl"}
_BCP47 = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{1,8})*$")


@dataclass(frozen=True)
class Word:
    """One word with its timing; times in seconds from the start of the audio given to the model."""

    start_s: float
    end_s: float
    word: str
    probability: float


@dataclass(frozen=True)
class Segment:
    """One decoded segment; times in seconds from the start of the audio given to the model.

    Attributes:
        avg_logprob: Mean natural-log probability of its tokens (<= 0).
        no_speech_prob: Probability that its 30 s window held no speech, in [0, 1].
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
    if not _BCP47.match(tag):
        raise InvalidArgument(
            f"language {tag!r} is not a BCP-47 tag: send a code such as 'en', 'fr' or 'fr-FR', or leave it "
            "empty to detect the language"
        )
    primary = tag.replace("_", "-").split("-")[0].lower()
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


class WhisperEngine:
    """A faster-whisper ``WhisperModel`` plus the Silero VAD session used for streaming endpointing.

    Args:
        config: Server settings (model, device, compute type, threads, workers, gates).

    Raises:
        ValueError, RuntimeError: From CTranslate2 when the model or device cannot be loaded.
    """

    sample_rate_hz = SAMPLE_RATE_HZ

    def __init__(self, config: SttConfig):
        import ctranslate2
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        self.config = config
        compute_type = config.compute_type
        if compute_type == "auto":
            if config.device == "cpu":
                compute_type = "int8"
            else:
                supported = ctranslate2.get_supported_compute_types(config.device, config.device_index)
                compute_type = "float16" if "float16" in supported else "int8"
        cpu_threads = config.cpu_threads or max(1, _cpu_count() // max(1, config.num_workers))
        path = resolve_whisper(config.model)
        self.model = WhisperModel(
            path,
            device=config.device,
            device_index=config.device_index,
            compute_type=compute_type,
            cpu_threads=cpu_threads,
            num_workers=config.num_workers,
            local_files_only=True,
        )
        self.multilingual = bool(self.model.model.is_multilingual)
        self.known_languages = frozenset(_LANGUAGE_CODES)
        tokenizer = self.model.hf_tokenizer
        self.languages = (
            frozenset(code for code in _LANGUAGE_CODES if tokenizer.token_to_id(f"<|{code}|>") is not None)
            if self.multilingual
            else frozenset({"en"})
        )
        self.gates = HallucinationGates(
            no_speech_threshold=config.no_speech_threshold,
            log_prob_threshold=config.log_prob_threshold,
            compression_ratio_threshold=config.compression_ratio_threshold,
            phrases=config.hallucination_phrases,
        )
        self.vad = SileroSession(silero_vad_path())
        logger.info(
            "whisper %s loaded from %s: device %s:%d, %s, %d thread(s) x %d worker(s), %d language(s)",
            config.model,
            path,
            config.device,
            config.device_index,
            compute_type,
            cpu_threads,
            config.num_workers,
            len(self.languages),
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

    def transcribe(self, audio: np.ndarray, options: DecodeOptions) -> Transcript:
        """Transcribes (or translates) one clip; blocking, call it on a worker thread.

        Args:
            audio: float32 in [-1, 1], shape (n_samples,), 16 kHz mono.
            options: From :meth:`options`.

        Returns:
            The transcript, with hallucinated segments moved to ``dropped``.
        """
        duration_s = len(audio) / SAMPLE_RATE_HZ
        temperature = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) if options.temperature_fallback else 0.0
        segments, info = self.model.transcribe(
            audio,
            language=options.language,
            task=options.task,
            beam_size=options.beam_size,
            word_timestamps=options.word_timestamps,
            initial_prompt=options.initial_prompt,
            hotwords=options.hotwords,
            vad_filter=options.vad_filter,
            temperature=temperature,
            no_speech_threshold=self.gates.no_speech_threshold,
            log_prob_threshold=self.gates.log_prob_threshold,
            compression_ratio_threshold=self.gates.compression_ratio_threshold,
        )
        decoded = [_segment(s) for s in segments]  # decoding happens here, on this thread
        kept, dropped = split_hallucinations(decoded, self.gates)
        return Transcript(
            text="".join(s.text for s in kept).strip(),
            language=info.language,
            language_probability=float(info.language_probability),
            duration_s=duration_s,
            segments=kept,
            dropped=dropped,
        )

    def vad_stream(self) -> StreamingSilero:
        """A new incremental Silero VAD state for one stream."""
        return self.vad.stream()

    def warm(self) -> None:
        """Runs the encoder, decoder and both VADs once, so the first request pays no start-up cost."""
        t = np.arange(SAMPLE_RATE_HZ, dtype=np.float32) / SAMPLE_RATE_HZ
        tone = (0.1 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
        language = "en" if "en" in self.languages else None
        self.transcribe(
            tone, DecodeOptions(language=language, beam_size=self.config.beam_size, vad_filter=False)
        )
        self.transcribe(tone, DecodeOptions(language=language, beam_size=1, vad_filter=True))
        self.vad_stream()(tone)


def _segment(s) -> Segment:
    words = tuple(Word(float(w.start), float(w.end), w.word, float(w.probability)) for w in (s.words or ()))
    return Segment(
        start_s=float(s.start),
        end_s=float(s.end),
        text=s.text,
        avg_logprob=float(s.avg_logprob),
        no_speech_prob=float(s.no_speech_prob),
        compression_ratio=float(s.compression_ratio),
        words=words,
    )


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
