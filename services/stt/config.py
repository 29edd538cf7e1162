"""Configuration of the speech-to-text server."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from services.common.batching import BatchingConfig
from services.common.config import ServerConfig, StreamLimitsConfig, option
from services.stt.streaming import Policy

# Whisper's best-known hallucinations on silence and noise: subtitle credits and video outros learnt from
# the web captions it was trained on. Matched on normalised text (see services.stt.filters).
DEFAULT_HALLUCINATION_PHRASES = (
    "merci d'avoir regardé",
    "sous-titres réalisés par",
    "sous-titrage",
    "amara.org",
    "thanks for watching",
    "thank you for watching",
    "subtitles by",
    "please subscribe",
    "like and subscribe",
)


class Backend(enum.Enum):
    """Which backend transcribes."""

    WHISPER = "whisper"
    OPENAI = "openai"


# The languages Voxtral (Mistral, 2025) is documented for.
VOXTRAL_LANGUAGES = ("en", "es", "fr", "pt", "hi", "de", "nl", "it")


@dataclass(frozen=True)
class SttConfig(StreamLimitsConfig, BatchingConfig, ServerConfig):
    """Speech-to-text server: Whisper on CTranslate2, or an OpenAI-compatible endpoint (vLLM Voxtral).

    ``backend`` whisper (the default) decodes in this process; ``backend`` openai posts each request to a
    transcription endpoint. StreamingRecognize does incremental recognition on either
    (:mod:`services.stt.streaming`); its utterances come from the caller's VAD boundaries.

    For Whisper, audio is cut into windows (speech found by Silero VAD, at most the longest window
    bucket); each window is padded to the shortest bucket that holds it plus ``window_margin_s`` and goes
    through one dynamic batcher (:class:`BatchingConfig`), batched only with windows of the same bucket and
    decoding settings. The batcher's ``instance_count`` is the number of batches decoded at once
    (CTranslate2 ``inter_threads``, weights shared); its ``priority_levels`` is fixed at 3 (stream finals,
    stream interims, Transcribe). StreamingRecognize calls are bounded by :class:`StreamLimitsConfig`
    (streams at once, idle timeout, longest stream).
    """

    max_batch_size: int = option(8, "Most windows decoded in one batch (one encoder and decoder pass).")
    max_queue_delay_ms: float = option(
        10.0, "Longest time the oldest queued window waits for company while a model instance is idle, in ms."
    )
    max_queue_size: int = option(
        256, "Windows that may wait in the queue; when full, requests fail RESOURCE_EXHAUSTED. 0 = unbounded."
    )
    window_buckets_s: tuple[float, ...] = option(
        (10.0, 15.0, 20.0, 30.0),
        "Model input lengths (mel windows) a window is padded to, in s, comma-separated; at most 30 "
        "(Whisper's window). Shorter windows cost less encoder time; '30' alone is Whisper's fixed window.",
    )
    window_margin_s: float = option(
        1.0, "Silence kept after a window's last sample when choosing its bucket, in s (never cuts speech)."
    )
    max_windows_in_flight: int = option(
        2,
        "Windows of one request queued or decoding at once; a short request sent during a long "
        "transcription waits behind at most this many of its windows.",
    )

    model: str = option(
        "base",
        "Whisper model: 'base' (bundled, multilingual), 'tiny.en' (bundled, English only), a directory "
        "holding a CTranslate2 Whisper model, or a faster-whisper hub name already in the local "
        "Hugging Face cache (nothing is downloaded).",
    )
    device: str = option("cpu", "CTranslate2 device: cpu or cuda.")
    device_index: int = option(0, "CTranslate2 device index (GPU number when device is cuda).")
    compute_type: str = option(
        "auto",
        "CTranslate2 compute type (int8, int8_float16, float16, float32, ...); auto: int8 on CPU, "
        "float16 on CUDA where the runtime supports it, else int8.",
    )
    cpu_threads: int = option(
        0, "CTranslate2 threads per model instance on CPU; 0: the machine's cores divided by instance_count."
    )
    beam_size: int = option(
        5,
        "Default beam size when a request leaves it at 0. 5 (Whisper's own default): on a 5 s utterance in "
        "a 10 s window it took 343 ms against 279 ms greedy (medians in process, CPU, int8, 2 threads, "
        "benchmarks/bench_stt.py); kept for the accuracy of Whisper's reference decoding.",
    )
    max_audio_s: float = option(300.0, "Longest audio accepted by Transcribe, in seconds.")
    vad_filter: bool = option(
        True, "Drop non-speech with Silero VAD before decoding when a request leaves vad_filter unset."
    )
    no_speech_threshold: float = option(
        0.6,
        "Hallucination gate (Whisper paper): drop a segment whose no-speech probability is above this "
        "AND whose mean token log probability is below log_prob_threshold.",
    )
    log_prob_threshold: float = option(
        -1.0, "Mean token log probability (natural log) below which the no-speech gate may drop a segment."
    )
    compression_ratio_threshold: float = option(
        2.4,
        "Hallucination gate: drop a segment whose gzip compression ratio is above this (repetition loops).",
    )
    hallucination_phrases: tuple[str, ...] = option(
        DEFAULT_HALLUCINATION_PHRASES,
        "Phrases Whisper invents on silence, comma-separated; a segment made mostly of them is dropped "
        "(matched ignoring case, accents and punctuation). Empty to disable.",
    )
    commit_policy: Policy = option(
        Policy.LOCAL_AGREEMENT,
        "Streaming default when a call leaves commit_policy unset: local_agreement (commit what two "
        "successive decodes agree on, and everything at each pause) or utterance (decode each utterance "
        "once, at its end).",
    )
    min_chunk_s: float = option(
        1.0,
        "Streaming: new audio that triggers another decode of the uncommitted audio, in seconds "
        "(whisper_streaming's min-chunk-size).",
    )
    buffer_trim_s: float = option(
        6.0,
        "Streaming: uncommitted audio longer than this is cut at the last committed word, in seconds, so "
        "each decode stays short (it is cut at every committed clause end anyway).",
    )
    context_s: float = option(
        2.0,
        "Streaming: committed audio before the uncommitted part that each decode still gets, in seconds "
        "(its words are dropped from the result): the model hears what came just before.",
    )
    interim_beam_size: int = option(
        1,
        "Streaming: beam size of the decodes between pauses (greedy is cheapest); pauses and ends use "
        "beam_size.",
    )
    backend: Backend = option(
        Backend.WHISPER,
        "whisper: faster-whisper in this process; openai: an OpenAI-compatible transcription endpoint "
        "(vLLM serving Voxtral or Whisper) at openai_base_url.",
    )
    openai_base_url: str = option(
        "http://localhost:8000/v1",
        "openai: base URL up to and including /v1 (POST .../audio/transcriptions).",
    )
    openai_model: str = option("mistralai/Voxtral-Mini-3B-2507", "openai: model name sent with each request.")
    openai_api_key_env: str = option(
        "PARLEY_OPENAI_API_KEY", "openai: environment variable holding the API key (Bearer); unset for none."
    )
    openai_timeout_s: float = option(
        60.0,
        "openai: timeout of one HTTP call, in seconds; 0 for none.",
    )
    openai_concurrency: int = option(
        8, "openai: HTTP requests in flight at once (the windows of a batch are sent in parallel)."
    )
    openai_languages: tuple[str, ...] = option(
        VOXTRAL_LANGUAGES,
        "openai: languages accepted (ISO 639-1, comma-separated); default Voxtral's. Empty language in a "
        "request: the server detects it.",
    )
