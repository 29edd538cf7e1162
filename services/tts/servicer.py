"""gRPC servicer for ``parley.tts.v1.SpeechSynthesis``: proto messages to and from :class:`TtsEngine`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from parley.audio.v1 import audio_pb2
from parley.tts.v1 import tts_pb2, tts_pb2_grpc
from services.common.deadlines import Deadline
from services.tts.engine import Synthesis, TtsEngine

SERVICE_NAME = tts_pb2.DESCRIPTOR.services_by_name["SpeechSynthesis"].full_name


def _format(result: Synthesis) -> audio_pb2.AudioFormat:
    return audio_pb2.AudioFormat(
        encoding=audio_pb2.PCM_S16LE, sample_rate_hz=result.sample_rate_hz, channels=1
    )


def _speech(request: tts_pb2.SynthesizeRequest) -> tuple[str, str, str, float, int]:
    """The engine's (text, language, voice, rate, sample_rate_hz) arguments of a request."""
    return request.text, request.language, request.voice, request.speaking_rate, request.sample_rate_hz


class SpeechSynthesisServicer(tts_pb2_grpc.SpeechSynthesisServicer):
    """Serves synthesis from one :class:`TtsEngine`. Engine errors become status codes in the interceptor.

    Every call passes its deadline (``context.time_remaining()``) to the engine: a sentence still queued
    when it passes is never synthesized, and a stream ends there with DEADLINE_EXCEEDED.

    Args:
        engine: The loaded voices and result cache.
    """

    def __init__(self, engine: TtsEngine):
        self._engine = engine

    async def Synthesize(  # noqa: N802 - gRPC method name
        self, request: tts_pb2.SynthesizeRequest, context: grpc.aio.ServicerContext
    ) -> tts_pb2.SynthesizeResponse:
        """Speaks the whole text; PCM_S16LE mono audio in one response."""
        deadline = Deadline.after(context.time_remaining())
        result = await self._engine.synthesize(*_speech(request), deadline)
        return tts_pb2.SynthesizeResponse(
            request_id=request.request_id,
            audio=result.pcm,
            format=_format(result),
            duration_s=result.duration_s,
            voice=result.voice,
        )

    async def SynthesizeStream(  # noqa: N802 - gRPC method name
        self, request: tts_pb2.SynthesizeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tts_pb2.SynthesizeStreamResponse]:
        """Speaks the text sentence by sentence; one response per sentence, ``is_last`` on the final one."""
        deadline = Deadline.after(context.time_remaining())
        stream = self._engine.synthesize_stream(*_speech(request), deadline)
        index = 0
        async for sentence, result, is_last in stream:
            yield tts_pb2.SynthesizeStreamResponse(
                request_id=request.request_id,
                audio=result.pcm,
                format=_format(result),
                sentence_index=index,
                sentence=sentence,
                duration_s=result.duration_s,
                is_last=is_last,
                voice=result.voice,
            )
            index += 1

    async def ListVoices(  # noqa: N802 - gRPC method name
        self, request: tts_pb2.ListVoicesRequest, context: grpc.aio.ServicerContext
    ) -> tts_pb2.ListVoicesResponse:
        """The voices really loaded, optionally only those for one language."""
        return tts_pb2.ListVoicesResponse(
            voices=[
                tts_pb2.Voice(
                    name=v.name, language=v.language, backend=v.backend, sample_rate_hz=v.sample_rate_hz
                )
                for v in self._engine.voices(request.language)
            ]
        )
