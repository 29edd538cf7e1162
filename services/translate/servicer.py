"""``parley.translate.v1.Translation``: protos to engine calls and back."""

from __future__ import annotations

import asyncio
import logging

import grpc

from parley.translate.v1 import translate_pb2, translate_pb2_grpc
from services.common.batching import DynamicBatcher
from services.common.deadlines import Deadline
from services.common.errors import DeadlineExceeded, InvalidArgument
from services.common.telemetry import tracer
from services.translate.context import TranslationContext
from services.translate.engine import SentenceItem, TranslationEngine

logger = logging.getLogger(__name__)


def batch_priority(priority: int, levels: int) -> int | None:
    """The batcher level of a request's ``priority`` field.

    Args:
        priority: The proto field: 0 for the server default, 1 the highest, larger values later.
        levels: The batcher's ``priority_levels``.

    Returns:
        None (the lowest level) for 0, else ``priority - 1``.

    Raises:
        InvalidArgument: ``priority`` above ``levels``.
    """
    if priority == 0:
        return None
    if priority > levels:
        raise InvalidArgument(
            f"priority {priority} is out of range: this server accepts 0 (default) or 1 (highest) to {levels}"
        )
    return priority - 1


async def submit_all(
    batcher: DynamicBatcher[SentenceItem, str],
    items: list[SentenceItem],
    timeout_s: float | None,
    priority: int | None,
) -> list[str]:
    """Submits every item and gathers the outputs in order; the first failure cancels the rest.

    Raises:
        ParleyError: The first error of any item (its queued siblings are withdrawn).
    """
    tasks = [
        asyncio.ensure_future(batcher.submit(item, timeout_s=timeout_s, priority=priority)) for item in items
    ]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class TranslationServicer(translate_pb2_grpc.TranslationServicer):
    """Translate and ListLanguagePairs on one shared :class:`TranslationEngine`.

    Each sentence of a request is one item of the dynamic batcher, so sentences of concurrent requests for
    the same language pair are translated in one model batch, and a high-priority request passes queued
    low-priority sentences. Errors are raised as :mod:`services.common.errors` exceptions; the server's
    interceptor maps them to status codes.

    Args:
        engine: The loaded engine, shared by every call.
        batcher: Runs :meth:`TranslationEngine.batch_fns` on the model instances.
    """

    def __init__(self, engine: TranslationEngine, batcher: DynamicBatcher[SentenceItem, str]):
        self._engine = engine
        self._batcher = batcher
        self._tracer = tracer(__name__)

    async def Translate(
        self, request: translate_pb2.TranslateRequest, context: grpc.aio.ServicerContext
    ) -> translate_pb2.TranslateResponse:
        """Translations of ``request.texts``, in order; an empty text comes back empty.

        ``request.context``, when set, goes with every sentence (the engine bounds it; CTranslate2 ignores
        it).
        """
        preceding = (
            TranslationContext(request.context.source_text, request.context.translated_text)
            if request.HasField("context")
            else None
        )
        job = self._engine.prepare(
            list(request.texts), request.source_language, request.target_language, preceding
        )
        priority = batch_priority(request.priority, self._batcher.config.priority_levels)
        timeout_s = context.time_remaining()
        deadline = Deadline.after(timeout_s)
        if deadline.expired():
            raise DeadlineExceeded("the caller's deadline passed before translation started")
        with self._tracer.start_as_current_span(
            "translate.inference",
            attributes={
                "translate.texts": len(request.texts),
                "translate.sentences": len(job.sentences),
                "translate.chars": sum(len(t) for t in request.texts),
                "translate.pair": f"{request.source_language}-{request.target_language}",
                "translate.priority": request.priority,
                "translate.context_chars": len(job.context.source_text) if job.context else 0,
            },
        ):
            translated = await submit_all(
                self._batcher, self._engine.items(job, deadline), timeout_s, priority
            )
        return translate_pb2.TranslateResponse(
            request_id=request.request_id,
            translations=self._engine.join(job, translated),
            model=self._engine.model_name,
        )

    async def ListLanguagePairs(
        self, request: translate_pb2.ListLanguagePairsRequest, context: grpc.aio.ServicerContext
    ) -> translate_pb2.ListLanguagePairsResponse:
        """Every pair the loaded model translates."""
        pairs = [
            translate_pb2.LanguagePair(source_language=s, target_language=t) for s, t in self._engine.pairs()
        ]
        return translate_pb2.ListLanguagePairsResponse(pairs=pairs, model=self._engine.model_name)
