"""``parley.translate.v1.Translation``: protos to engine calls and back."""

from __future__ import annotations

import logging

import grpc

from parley.translate.v1 import translate_pb2, translate_pb2_grpc
from services.common.errors import DeadlineExceeded
from services.common.inference import InferencePool
from services.common.resilience import Deadline
from services.common.telemetry import tracer
from services.translate.engine import TranslationEngine

logger = logging.getLogger(__name__)

SERVICE_NAME = translate_pb2.DESCRIPTOR.services_by_name["Translation"].full_name


class TranslationServicer(translate_pb2_grpc.TranslationServicer):
    """Translate and ListLanguagePairs on one shared :class:`TranslationEngine`.

    Errors are raised as :mod:`services.common.errors` exceptions; the server's interceptor maps them to
    status codes. ``priority`` is accepted and not yet used (requests run in arrival order).

    Args:
        engine: The loaded engine, shared by every call.
        pool: Threads that run the model, off the event loop.
    """

    def __init__(self, engine: TranslationEngine, pool: InferencePool):
        self._engine = engine
        self._pool = pool
        self._tracer = tracer(__name__)

    async def Translate(
        self, request: translate_pb2.TranslateRequest, context: grpc.aio.ServicerContext
    ) -> translate_pb2.TranslateResponse:
        """Translations of ``request.texts``, in order; an empty text comes back empty."""
        job = self._engine.prepare(list(request.texts), request.source_language, request.target_language)
        deadline = Deadline.after(context.time_remaining())
        if deadline.expired():
            raise DeadlineExceeded("the caller's deadline passed before translation started")
        with self._tracer.start_as_current_span(
            "translate.inference",
            attributes={
                "translate.texts": len(request.texts),
                "translate.sentences": len(job.sentences),
                "translate.chars": sum(len(t) for t in request.texts),
                "translate.pair": f"{request.source_language}-{request.target_language}",
            },
        ):
            translations = await self._pool.run(self._engine.run, job, deadline)
        return translate_pb2.TranslateResponse(
            request_id=request.request_id, translations=translations, model=self._engine.model_name
        )

    async def ListLanguagePairs(
        self, request: translate_pb2.ListLanguagePairsRequest, context: grpc.aio.ServicerContext
    ) -> translate_pb2.ListLanguagePairsResponse:
        """Every pair the loaded model translates."""
        pairs = [
            translate_pb2.LanguagePair(source_language=s, target_language=t) for s, t in self._engine.pairs()
        ]
        return translate_pb2.ListLanguagePairsResponse(pairs=pairs, model=self._engine.model_name)
