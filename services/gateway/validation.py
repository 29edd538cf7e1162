"""Checks of a call's config before its first audio is read.

Two steps, so that a caller learns at once, not utterance by utterance, that its stream cannot work:

1. :func:`check_speech_config` and :func:`check_file_config`: malformed fields (audio format, language
   tags, output sample rate, a DIRECT mode into a language other than English) raise INVALID_ARGUMENT. An
   undefined enum value (``mode = 99``) never gets this far: the server's interceptor refuses it
   (:mod:`services.common.messages`).
2. :class:`StageCatalog`: a well-formed language or voice the cluster cannot serve raises
   FAILED_PRECONDITION, checked against the translation server's ``ListLanguagePairs`` and the TTS server's
   ``ListVoices``, cached for ``catalog_ttl_s``. A listing that cannot be had (the stage down, its breaker
   open) is not cached and its check is skipped: the stream starts, and its utterances report the stage's
   errors as before.

Not checked up front: whether the STT model knows the spoken language (no RPC lists Whisper's languages);
an unknown one fails each utterance with the STT server's INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from parley.gateway.v1 import gateway_pb2
from parley.translate.v1 import translate_pb2
from parley.tts.v1 import tts_pb2
from services.common.audio import MAX_SAMPLE_RATE_HZ, MIN_SAMPLE_RATE_HZ, check_format
from services.common.deadlines import Deadline
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.text import LANGUAGE_TAG, primary_language
from services.gateway.downstream import Downstream
from services.gateway.session import plan_mode
from services.translate.languages import parse_tag

logger = logging.getLogger(__name__)


def _check_language(tag: str, field: str, empty_means: str) -> None:
    if tag and not LANGUAGE_TAG.match(tag):
        raise InvalidArgument(
            f"{field} {tag!r} is not a BCP-47 language tag such as 'en', 'fr' or 'pt-BR'; leave it empty "
            f"{empty_means}"
        )


def check_speech_config(config: gateway_pb2.TranslateSpeechConfig, direct_to_english: bool) -> int:
    """Checks a TranslateSpeech config's fields; returns the translation mode the stream will use.

    Raises:
        InvalidArgument: A bad audio format, a malformed language tag, an output sample rate outside
            8000..192000 Hz (0 keeps the voice's rate), or DIRECT mode into a language other than English.
    """
    fmt = config.input_format
    check_format(fmt.encoding, fmt.sample_rate_hz, fmt.channels)
    _check_language(config.source_language, "source_language", "to detect the language")
    _check_language(config.target_language, "target_language", "for transcription only")
    rate_hz = config.output_sample_rate_hz
    if rate_hz and not MIN_SAMPLE_RATE_HZ <= rate_hz <= MAX_SAMPLE_RATE_HZ:
        raise InvalidArgument(
            f"output_sample_rate_hz {rate_hz} is out of range: use {MIN_SAMPLE_RATE_HZ} to "
            f"{MAX_SAMPLE_RATE_HZ} Hz, or 0 for the voice's own rate"
        )
    return plan_mode(config, direct_to_english)


def check_file_config(config: gateway_pb2.TranslateFileConfig) -> None:
    """Checks a TranslateFile config's fields.

    Raises:
        InvalidArgument: A bad audio format or a malformed language tag.
    """
    fmt = config.input_format
    check_format(fmt.encoding, fmt.sample_rate_hz, fmt.channels)
    _check_language(config.source_language, "source_language", "to detect the language")
    _check_language(config.target_language, "target_language", "for subtitles in the spoken language only")


def _translation_language(tag: str, field: str) -> str:
    """The language the translation server resolves ``tag`` to (aliases such as "iw" -> "he" applied)."""
    return parse_tag(tag.replace("_", "-"), field).language


class StageCatalog:
    """The language pairs and voices the cluster serves, from the stages' listings, cached for ``ttl_s``.

    Args:
        downstream: The stages' stubs and guards (a listing call goes through the stage's guard).
        ttl_s: How long a listing is reused, in seconds.
    """

    def __init__(self, downstream: Downstream, ttl_s: float):
        self._down = downstream
        self._ttl_s = ttl_s
        self._cache: dict[str, tuple[float, Any]] = {}
        self._locks = {"translate": asyncio.Lock(), "tts": asyncio.Lock()}

    async def _listing(
        self, stage: str, fetch: Callable[[float | None], Awaitable[Any]], deadline: Deadline
    ) -> Any | None:
        """The stage's listing, cached; ``None`` when it cannot be had now (the check is then skipped)."""
        async with self._locks[stage]:
            now_s = self._down.clock.monotonic()
            cached = self._cache.get(stage)
            if cached is not None and now_s - cached[0] < self._ttl_s:
                return cached[1]
            try:
                listing = await self._down.guards[stage].call(fetch, deadline)
            except Exception as exc:  # noqa: BLE001 - no listing, no check: the utterances report the stage
                logger.debug("%s listing unavailable, config not checked against it: %r", stage, exc)
                return None
            self._cache[stage] = (now_s, listing)
            return listing

    async def check_translation(self, source: str, target: str, deadline: Deadline) -> None:
        """Checks that the translation server translates ``source`` (any language when empty) into ``target``.

        Languages are compared as the translation server resolves them: primary subtag, aliases applied.

        Raises:
            InvalidArgument: A tag the translation server would refuse as malformed.
            FailedPrecondition: The server lists no such pair.
        """
        src = _translation_language(source, "source_language") if source else ""
        tgt = _translation_language(target, "target_language")
        listing = await self._listing("translate", self._pairs, deadline)
        if listing is None:
            return
        model, pairs = listing
        if any(t == tgt and (not src or s == src) for s, t in pairs):
            return
        raise FailedPrecondition(
            f"the translation server (model {model or 'unnamed'}) does not translate "
            f"{source or 'any language'} into {target}: ListLanguagePairs lists what it does"
        )

    async def _pairs(self, timeout_s: float | None) -> tuple[str, frozenset[tuple[str, str]]]:
        """The translation model's name and its pairs, as resolved languages."""
        response = await self._down.translation.ListLanguagePairs(
            translate_pb2.ListLanguagePairsRequest(), timeout=timeout_s
        )
        pairs = frozenset(
            (
                _translation_language(p.source_language, "source_language"),
                _translation_language(p.target_language, "target_language"),
            )
            for p in response.pairs
        )
        return response.model, pairs

    async def check_voice(self, language: str, voice: str, deadline: Deadline) -> None:
        """Checks that the TTS server has ``voice`` (by name), or else a voice for ``language``.

        Raises:
            InvalidArgument: ``voice`` speaks a language other than ``language`` (the TTS server's own
                verdict on such a request).
            FailedPrecondition: No voice of that name is loaded, or none speaks ``language``.
        """
        listing = await self._listing(
            "tts",
            lambda timeout_s: self._down.tts.ListVoices(tts_pb2.ListVoicesRequest(), timeout=timeout_s),
            deadline,
        )
        if listing is None:
            return
        if voice:
            found = next((v for v in listing.voices if v.name == voice), None)
            if found is None:
                names = ", ".join(v.name for v in listing.voices)
                raise FailedPrecondition(f"voice {voice!r} is not loaded on the TTS server (loaded: {names})")
            if primary_language(found.language) != primary_language(language):
                raise InvalidArgument(f"voice {voice!r} speaks {found.language}, not {language}")
            return
        if not any(primary_language(v.language) == primary_language(language) for v in listing.voices):
            raise FailedPrecondition(
                f"no TTS voice speaks {language}: synthesize_speech needs one (ListVoices lists those loaded)"
            )

    async def check_speech(
        self, config: gateway_pb2.TranslateSpeechConfig, mode: int, deadline: Deadline
    ) -> None:
        """Checks a checked TranslateSpeech config against what the cluster serves (see the class).

        Raises:
            InvalidArgument, FailedPrecondition: As :meth:`check_translation` and :meth:`check_voice`.
        """
        target = config.target_language
        if not target:
            return
        same = config.source_language and primary_language(config.source_language) == primary_language(target)
        if mode == gateway_pb2.CASCADE and not same:
            await self.check_translation(config.source_language, target, deadline)
        if config.synthesize_speech:
            await self.check_voice(target, config.voice, deadline)

    async def check_file(self, config: gateway_pb2.TranslateFileConfig, deadline: Deadline) -> None:
        """Checks a checked TranslateFile config's language pair against the translation server.

        Raises:
            InvalidArgument, FailedPrecondition: As :meth:`check_translation`.
        """
        target, source = config.target_language, config.source_language
        if target and not (source and primary_language(source) == primary_language(target)):
            await self.check_translation(source, target, deadline)
