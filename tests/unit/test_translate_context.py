"""Translation context: bounding, and its way from the request through the batcher to the backend."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from parley.translate.v1 import translate_pb2
from services.common.batching import BatchingConfig, DynamicBatcher
from services.translate.context import MAX_CONTEXT_CHARS, TranslationContext, bound_context, tail
from services.translate.engine import TranslationEngine, batch_key
from services.translate.servicer import TranslationServicer

pytestmark = pytest.mark.timeout(30)


class ContextBackend:
    """Records each call's sentences with their contexts; translates a sentence to ``fr<...>``."""

    model_name = "fake"
    workers = 1
    in_flight_batching = False

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, TranslationContext | None]]] = []

    def pairs(self):
        return [("en", "fr")]

    def resolve(self, source, target):
        return (source, target)

    def translate_sentences(self, sentences, pair, deadline, contexts=None):
        self.calls.append(list(zip(sentences, contexts or [None] * len(sentences), strict=True)))
        return [f"fr<{s}>" for s in sentences]

    def instance_fns(self, count=0):
        return [self.translate_sentences] * (count or self.workers)

    def close(self):
        pass


class FakeContext:
    """The part of a grpc.aio.ServicerContext the servicer reads."""

    def time_remaining(self) -> float | None:
        return None


def test_tail_keeps_the_end_of_a_text_from_a_word_on_with_white_space_folded():
    assert tail("  one\ntwo   three ", 100) == "one two three"
    assert tail("alpha beta gamma", 8) == "gamma"  # "a gamma" would start inside "beta"
    assert tail("alpha beta gamma", 10) == "beta gamma"  # the cut falls just after a space
    assert tail("x" * 20, 5) == "xxxxx"  # no white space: kept whole
    long = " ".join(f"word{i}" for i in range(200))
    assert len(tail(long, MAX_CONTEXT_CHARS)) <= MAX_CONTEXT_CHARS
    assert long.endswith(tail(long, MAX_CONTEXT_CHARS)) and tail(long, MAX_CONTEXT_CHARS).startswith("word")


def test_a_context_with_a_blank_side_is_dropped():
    assert bound_context("Hello,", "Bonjour,") == TranslationContext("Hello,", "Bonjour,")
    assert bound_context("Hello,", "  ") is None
    assert bound_context("", "Bonjour,") is None


def test_the_engine_bounds_the_context_and_gives_it_to_every_sentence():
    backend = ContextBackend()
    engine = TranslationEngine(backend, 8, 1000, 100)
    long_source = "blah " * 100 + "I missed the bus,"
    out = engine.translate(
        ["So I was late. Sorry."], "en", "fr", context=TranslationContext(long_source, "J'ai raté le bus,")
    )
    assert out == ["fr<So I was late.> fr<Sorry.>"]
    ((first, context), (second, same)) = backend.calls[0]
    assert (first, second) == ("So I was late.", "Sorry.") and context is same
    assert context is not None and context.translated_text == "J'ai raté le bus,"
    assert len(context.source_text) <= MAX_CONTEXT_CHARS and context.source_text.endswith("I missed the bus,")


async def test_the_servicer_passes_each_requests_context_to_the_backend_through_one_batch():
    backend = ContextBackend()
    engine = TranslationEngine(backend, 8, 1000, 100)
    config = dataclasses.replace(BatchingConfig(), max_batch_size=8, max_queue_delay_ms=200.0)
    batcher = DynamicBatcher("test-translate", engine.batch_fns(), config, batch_key=batch_key)
    servicer = TranslationServicer(engine, batcher)

    def request(
        text: str, context: translate_pb2.TranslationContext | None
    ) -> translate_pb2.TranslateRequest:
        return translate_pb2.TranslateRequest(
            texts=[text], source_language="en", target_language="fr", context=context
        )

    try:
        responses = await asyncio.gather(
            servicer.Translate(
                request(
                    "so I was late.",
                    translate_pb2.TranslationContext(
                        source_text="I missed the bus,", translated_text="J'ai raté le bus,"
                    ),
                ),
                FakeContext(),
            ),
            servicer.Translate(request("Thanks.", None), FakeContext()),
        )
    finally:
        await asyncio.to_thread(batcher.close)
    assert [list(r.translations) for r in responses] == [["fr<so I was late.>"], ["fr<Thanks.>"]]
    assert len(backend.calls) == 1, "different contexts still share a batch"
    assert sorted(backend.calls[0], key=lambda call: call[0]) == [
        ("Thanks.", None),
        ("so I was late.", TranslationContext("I missed the bus,", "J'ai raté le bus,")),
    ]
