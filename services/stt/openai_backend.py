"""Speech-to-text over an OpenAI-compatible transcription endpoint: vLLM serving Voxtral or Whisper.

``--backend openai``. Each window is one ``POST {base_url}/audio/transcriptions`` (task TRANSLATE:
``/audio/translations``), a ``multipart/form-data`` form as vLLM and OpenAI define it:

* ``file``: the window's audio as a 16 kHz mono 16-bit PCM WAV file;
* ``model``, ``temperature`` = 0, ``language`` (ISO 639-1; left out to let the server detect it) and
  ``prompt`` (the request's ``initial_prompt``, when given);
* ``response_format`` = ``verbose_json``: the text with ``segments`` (``start``/``end`` in seconds,
  ``text``, ``avg_logprob``, ``no_speech_prob``, ``compression_ratio``), ``language`` and ``duration``.
  vLLM answers HTTP 400 to ``verbose_json`` where a model has no segment timestamps (Voxtral) or its
  version predates them (``"Currently only support response_format `text` or `json`"``); the backend
  then switches to ``json`` for good, and the text comes back as one segment spanning the window.

The server cuts long audio itself, so a request's audio is one window. Segments go through the same
hallucination gates as Whisper's (:mod:`services.stt.filters`); what they drop is in ``Transcript.dropped``.
The windows of a batch are sent in parallel (``openai_concurrency``) so the server's continuous batching
runs them together. HTTP failures map to status codes as :mod:`services.common.http` documents (HTTP 429
RESOURCE_EXHAUSTED, 5xx or no answer within ``openai_timeout_s`` UNAVAILABLE, other 4xx and malformed
answers INTERNAL).

Not supported by the endpoint, refused with INVALID_ARGUMENT: ``word_timestamps`` and ``hotwords``.
``beam_size`` is ignored (the server decodes as it is configured); ``vad_filter`` is the server's business.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from faster_whisper.transcribe import get_compression_ratio

from services.common.audio import float_to_pcm16, pcm16_to_wav
from services.common.deadlines import Deadline
from services.common.errors import InvalidArgument, ParleyError
from services.common.http import HttpRejected, get_json, multipart_form, post_json
from services.stt.config import SttConfig
from services.stt.engine import (
    SAMPLE_RATE_HZ,
    TRANSCRIBE,
    TRANSLATE,
    DecodeOptions,
    Segment,
    Transcript,
    Window,
    whisper_language,
)
from services.stt.filters import HallucinationGates, split_hallucinations

logger = logging.getLogger(__name__)

_ENDPOINT = "transcription endpoint"
_LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}$")


def wav_bytes(audio: np.ndarray, sample_rate_hz: int = SAMPLE_RATE_HZ) -> bytes:
    """A WAV file of float32 samples in [-1, 1], shape (n,): mono, 16-bit PCM, ``sample_rate_hz``."""
    return pcm16_to_wav(float_to_pcm16(audio), sample_rate_hz)


def _number(value: Any, default: float | None = None) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if value is None and default is not None:
        return default
    raise ValueError(f"expected a number, got {value!r}")


class OpenAiTranscriptionBackend:
    """An OpenAI-compatible ``/audio/transcriptions`` endpoint as the STT backend (:class:`SttBackend`).

    ``transcribe_batch`` is thread-safe: the batcher's ``workers`` instance threads share the
    ``concurrency`` HTTP threads.

    Args:
        base_url: Base URL up to and including ``/v1``.
        model: Model name sent in each request.
        api_key: Bearer token; empty for none.
        timeout_s: Timeout of one HTTP call, in seconds; 0 for none.
        languages: ISO 639-1 codes a request may name.
        concurrency: HTTP requests in flight at once.
        gates: Hallucination filter thresholds.
        vad_filter: Reported in the options when a request leaves ``vad_filter`` unset.

    Raises:
        ValueError: No language, or a language that is not an ISO 639-1/639-3 code.
    """

    sample_rate_hz = SAMPLE_RATE_HZ
    word_timestamps = False
    # Batcher instances sending batches at once: the next batch forms and goes out while one waits.
    HTTP_INSTANCES = 2
    # Timeout of the start-up look at ``GET {base_url}/models``, in seconds.
    WARM_TIMEOUT_S = 2.0

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str,
        timeout_s: float,
        languages: Sequence[str],
        concurrency: int,
        gates: HallucinationGates,
        vad_filter: bool = True,
    ):
        bad = [code for code in languages if not _LANGUAGE_CODE.match(code)]
        if bad or not languages:
            raise ValueError(
                f"--openai-languages must list ISO 639-1 codes such as en,fr, got {list(languages)}"
            )
        self._base_url = base_url.rstrip("/")
        self.model_name = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout_s = timeout_s
        self.languages = frozenset(languages)
        self._gates = gates
        self._vad_filter = vad_filter
        self._verbose = True
        self.workers = self.HTTP_INSTANCES
        self._executor = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="stt-http")

    @classmethod
    def from_config(cls, config: SttConfig) -> OpenAiTranscriptionBackend:
        """Builds the client; nothing is sent until :meth:`warm`.

        Raises:
            ValueError: A bad ``openai_languages`` list.
        """
        return cls(
            config.openai_base_url,
            config.openai_model,
            os.environ.get(config.openai_api_key_env, ""),
            config.openai_timeout_s,
            config.openai_languages,
            config.openai_concurrency,
            HallucinationGates(
                no_speech_threshold=config.no_speech_threshold,
                log_prob_threshold=config.log_prob_threshold,
                compression_ratio_threshold=config.compression_ratio_threshold,
                phrases=config.hallucination_phrases,
            ),
            config.vad_filter,
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
        """Validates request settings; ``beam_size`` is ignored.

        Raises:
            InvalidArgument: A language outside ``languages`` or not BCP-47, word timestamps or hotwords.
        """
        if word_timestamps:
            raise InvalidArgument(
                f"word_timestamps: this server's openai backend ({self.model_name}) returns no word "
                "timings; send word_timestamps false, or use a server running --backend whisper"
            )
        if hotwords:
            raise InvalidArgument(
                f"hotwords: this server's openai backend ({self.model_name}) takes no hotwords; put the "
                "words in initial_prompt instead"
            )
        code = whisper_language(language, self.languages, self.languages, english_only=False)
        return DecodeOptions(
            language=code,
            task=TRANSLATE if translate else TRANSCRIBE,
            initial_prompt=initial_prompt or None,
            vad_filter=self._vad_filter if vad_filter is None else vad_filter,
        )

    def windows(self, audio: np.ndarray, options: DecodeOptions) -> list[Window]:
        """The whole audio as one window (the server cuts long audio itself); none for no audio.

        Args:
            audio: float32 in [-1, 1], shape (n_samples,), 16 kHz mono.
            options: From :meth:`options`.
        """
        if not len(audio):
            return []
        duration_s = len(audio) / SAMPLE_RATE_HZ
        return [Window(audio=audio, spans_s=((0.0, duration_s),), window_s=duration_s, options=options)]

    @staticmethod
    def batch_key(window: Window) -> Hashable:
        """Any windows may share a batch: each is its own HTTP request."""
        return None

    def transcribe_batch(self, windows: Sequence[Window]) -> list[Transcript]:
        """Sends every window as its own request, ``concurrency`` at a time; blocking.

        Returns:
            One transcript per window, in order, times in the request's audio.

        Raises:
            ResourceExhausted, Unavailable, ParleyError: See the module docstring; the first failing
                window decides for the batch.
        """
        futures = [self._executor.submit(self._transcribe, w) for w in windows]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def _post(self, window: Window, response_format: str) -> dict[str, Any]:
        options = window.options
        fields = {"model": self.model_name, "temperature": "0", "response_format": response_format}
        if options.language:
            fields["language"] = options.language
        if options.initial_prompt:
            fields["prompt"] = options.initial_prompt
        body, content_type = multipart_form(
            fields, {"file": ("audio.wav", "audio/wav", wav_bytes(window.audio))}
        )
        path = "/audio/translations" if options.task == TRANSLATE else "/audio/transcriptions"
        return post_json(
            self._base_url + path,
            body,
            content_type,
            self._headers,
            window.deadline,
            self._timeout_s,
            _ENDPOINT,
        )

    def _transcribe(self, window: Window) -> Transcript:
        if self._verbose:
            try:
                return self._transcript(window, self._post(window, "verbose_json"))
            except HttpRejected as exc:
                if exc.status != 400 or not ("verbose_json" in exc.detail or "response_format" in exc.detail):
                    raise
                self._verbose = False
                logger.info("stt: %s refuses verbose_json (%s); using json, without segments", _ENDPOINT, exc)
        return self._transcript(window, self._post(window, "json"))

    def _transcript(self, window: Window, data: dict[str, Any]) -> Transcript:
        text = data.get("text")
        if not isinstance(text, str):
            raise ParleyError(f"{_ENDPOINT} {self._base_url} returned a malformed response: no text")
        duration_s = len(window.audio) / SAMPLE_RATE_HZ
        raw = data.get("segments")
        if isinstance(raw, list) and raw:
            segments = [self._segment(window, item, i, duration_s) for i, item in enumerate(raw)]
        elif text.strip():
            segments = [
                Segment(
                    start_s=0.0,
                    end_s=round(window.request_time_s(duration_s), 3),
                    text=text,
                    avg_logprob=0.0,
                    no_speech_prob=0.0,
                    compression_ratio=get_compression_ratio(text),
                )
            ]
        else:
            segments = []
        kept, dropped = split_hallucinations(segments, self._gates)
        reported = data.get("language")
        detected = (
            reported.lower() if isinstance(reported, str) and _LANGUAGE_CODE.match(reported.lower()) else ""
        )
        return Transcript(
            text="".join(s.text for s in kept).strip(),
            language=window.options.language or detected,
            language_probability=1.0 if window.options.language else 0.0,
            duration_s=duration_s,
            segments=kept,
            dropped=dropped,
        )

    def _segment(self, window: Window, item: Any, index: int, duration_s: float) -> Segment:
        try:
            if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                raise ValueError("no text")
            start_s = min(max(0.0, _number(item.get("start"))), duration_s)
            end_s = min(max(start_s, _number(item.get("end"))), duration_s)
            text = item["text"]
            return Segment(
                start_s=round(window.request_time_s(start_s), 3),
                end_s=round(window.request_time_s(end_s), 3),
                text=text,
                avg_logprob=_number(item.get("avg_logprob"), 0.0),
                no_speech_prob=_number(item.get("no_speech_prob"), 0.0),
                compression_ratio=_number(item.get("compression_ratio"), get_compression_ratio(text)),
            )
        except ValueError as exc:
            raise ParleyError(
                f"{_ENDPOINT} {self._base_url} returned a malformed response: segment {index}: {exc}"
            ) from exc

    def warm(self) -> None:
        """Looks at ``GET {base_url}/models``; an endpoint that is down is logged.

        The stage may start before its vLLM server (which takes minutes to load a model): requests fail
        UNAVAILABLE until the endpoint answers, and the server serves once it does.
        """
        url = self._base_url + "/models"
        try:
            data = get_json(url, self._headers, Deadline(None), self.WARM_TIMEOUT_S, _ENDPOINT)
        except ParleyError as exc:
            logger.warning("stt: %s; requests fail until it answers", exc)
            return
        listed = data.get("data")
        served = [m.get("id") for m in listed if isinstance(m, dict)] if isinstance(listed, list) else []
        if self.model_name in served:
            logger.info("stt: %s %s serves %s", _ENDPOINT, self._base_url, self.model_name)
        else:
            logger.warning(
                "stt: %s %s does not list model %s (it lists %s); set --openai-model",
                _ENDPOINT,
                self._base_url,
                self.model_name,
                ", ".join(str(s) for s in served) or "none",
            )

    def close(self) -> None:
        """Stops the HTTP threads."""
        self._executor.shutdown(wait=True, cancel_futures=True)
