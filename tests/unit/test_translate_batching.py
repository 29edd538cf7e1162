"""Translation through the dynamic batcher with a fake backend: batches across requests, pairs, priorities."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from services.common.batching import BatchError, BatchingConfig, DynamicBatcher
from services.common.deadlines import Deadline
from services.common.errors import InvalidArgument, ResourceExhausted
from services.translate.engine import TranslationEngine, batch_key
from services.translate.servicer import batch_priority, submit_all

pytestmark = pytest.mark.timeout(30)


class FakeBackend:
    """Brackets each sentence with its pair; records every call's sentences."""

    model_name = "fake"
    workers = 1
    in_flight_batching = False

    def __init__(self, gate: threading.Event | None = None):
        self.calls: list[tuple[tuple[str, str], list[str]]] = []
        self.gate = gate
        self.entered = threading.Event()

    def pairs(self):
        return [("en", "fr"), ("en", "tr")]

    def resolve(self, source, target):
        if (source, target) not in self.pairs():
            raise InvalidArgument("unsupported")
        return (source, target)

    def translate_sentences(self, sentences, pair, deadline, contexts=None):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(5)
        self.calls.append((pair, list(sentences)))
        return [f"{pair[1]}<{s}>" for s in sentences]

    def instance_fns(self, count=0):
        return [self.translate_sentences] * (count or self.workers)

    def close(self):
        pass


async def until(predicate, timeout_s: float = 5.0) -> None:
    """Polls ``predicate`` (the batcher's queue is only observable by polling) until true or timeout."""
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


def batcher(engine, **settings):
    config = dataclasses.replace(BatchingConfig(), **settings)
    return DynamicBatcher(
        "test-translate", engine.batch_fns(config.instance_count), config, batch_key=batch_key
    )


async def translate(engine, b, texts, source="en", target="fr", priority=None):
    job = engine.prepare(texts, source, target)
    out = await submit_all(b, engine.items(job, Deadline(None)), None, priority)
    return engine.join(job, out)


@pytest.mark.parametrize(("proto", "level"), [(0, None), (1, 0), (2, 1), (3, 2)])
def test_proto_priority_maps_to_batcher_levels(proto, level):
    assert batch_priority(proto, 3) == level


def test_a_priority_above_the_levels_is_invalid_argument():
    with pytest.raises(InvalidArgument, match="priority 4 is out of range"):
        batch_priority(4, 3)


async def test_sentences_of_concurrent_requests_share_one_model_call_and_split_back():
    backend = FakeBackend()
    engine = TranslationEngine(backend, 8, 1000, 100)
    b = batcher(engine, max_batch_size=16, max_queue_delay_ms=200.0)
    try:
        first, second = await asyncio.gather(
            translate(engine, b, ["One. Two.", "", "Three."]), translate(engine, b, ["Four."])
        )
    finally:
        await asyncio.to_thread(b.close)
    assert first == ["fr<One.> fr<Two.>", "", "fr<Three.>"]
    assert second == ["fr<Four.>"]
    assert len(backend.calls) == 1
    assert sorted(backend.calls[0][1]) == ["Four.", "One.", "Three.", "Two."]


async def test_language_pairs_never_share_a_batch():
    backend = FakeBackend()
    engine = TranslationEngine(backend, 8, 1000, 100)
    b = batcher(engine, max_batch_size=16, max_queue_delay_ms=100.0)
    try:
        to_fr, to_tr = await asyncio.gather(
            translate(engine, b, ["A.", "B."], "en", "fr"), translate(engine, b, ["C."], "en", "tr")
        )
    finally:
        await asyncio.to_thread(b.close)
    assert to_fr == ["fr<A.>", "fr<B.>"] and to_tr == ["tr<C.>"]
    assert sorted((pair, sorted(s)) for pair, s in backend.calls) == [
        (("en", "fr"), ["A.", "B."]),
        (("en", "tr"), ["C."]),
    ]


async def test_a_high_priority_request_passes_queued_low_priority_sentences():
    gate = threading.Event()
    backend = FakeBackend(gate)
    engine = TranslationEngine(backend, 8, 1000, 100)
    b = batcher(engine, max_batch_size=1, max_queue_delay_ms=0.0, priority_levels=2)
    try:
        low = asyncio.create_task(translate(engine, b, ["L1. L2. L3."], priority=1))
        await until(lambda: b.queue_depth == 2)  # L1 is computing (held at the gate), L2 and L3 queued
        high = asyncio.create_task(translate(engine, b, ["H."], priority=0))
        await until(lambda: b.queue_depth == 3)
        gate.set()
        assert await high == ["fr<H.>"]
        assert await low == ["fr<L1.> fr<L2.> fr<L3.>"]
    finally:
        gate.set()
        await asyncio.to_thread(b.close)
    assert [s for _, s in backend.calls] == [["L1."], ["H."], ["L2."], ["L3."]]


async def test_a_rejected_sentence_withdraws_its_queued_siblings():
    gate = threading.Event()
    backend = FakeBackend(gate)
    engine = TranslationEngine(backend, 8, 1000, 100)
    b = batcher(engine, max_batch_size=1, max_queue_delay_ms=0.0, max_queue_size=2)
    try:
        blocker = asyncio.create_task(translate(engine, b, ["Busy."]))
        await asyncio.to_thread(backend.entered.wait, 5)
        with pytest.raises(ResourceExhausted):
            await translate(engine, b, ["A.", "B.", "C.", "D."])
        assert b.queue_depth == 0, "the queued sentences of the failed request were withdrawn"
        gate.set()
        assert await blocker == ["fr<Busy.>"]
    finally:
        gate.set()
        await asyncio.to_thread(b.close)
    assert [s for _, s in backend.calls] == [["Busy."]]


class OomBackend(FakeBackend):
    """Runs out of GPU memory (as CTranslate2 reports it) on calls of more than two sentences."""

    def translate_sentences(self, sentences, pair, deadline, contexts=None):
        if len(sentences) > 2:
            self.calls.append((pair, list(sentences)))
            raise RuntimeError("CUDA failed with error out of memory")
        return super().translate_sentences(sentences, pair, deadline)


@pytest.mark.parametrize(("backend", "split"), [("ctranslate2", True), ("llm", False)])
async def test_the_ctranslate2_batcher_splits_batches_that_run_out_of_memory(backend, split):
    from services.translate.__main__ import batcher_for
    from services.translate.config import Backend, LlmTransport, TranslateConfig

    fake = OomBackend()
    engine = TranslationEngine(fake, max_texts=64, max_chars=10000, max_sentence_chars=600)
    config = TranslateConfig(
        backend=Backend(backend),
        llm_transport=LlmTransport.HTTP,
        max_batch_size=8,
        max_queue_delay_ms=2000,
        preferred_batch_sizes=(5,),
    )
    b = batcher_for(engine, config)
    texts = ["One. Two. Three.", "Four. Five."]
    try:
        if split:
            assert await translate(engine, b, texts) == [
                "fr<One.> fr<Two.> fr<Three.>",
                "fr<Four.> fr<Five.>",
            ]
            assert [len(sentences) for _, sentences in fake.calls] == [5, 2, 3, 1, 2]
        else:
            with pytest.raises(BatchError, match="out of memory"):
                await translate(engine, b, texts)
    finally:
        await asyncio.to_thread(b.close)
