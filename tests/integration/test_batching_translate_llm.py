"""Batching on the translation server's embedded llm backend, and its batched decoding in process.

Server, one llama instance, batches of up to 4 sentences: a long low-priority request queues its
sentences; a short high-priority request sent meanwhile waits for the batch being computed and then runs
in the next one, never behind the rest of the long request. In process: a deadline that passes mid-batch
stops it and leaves the instance clean; a context too small for a whole batch makes sentences wait for
room instead of failing; a context too small for one sentence is refused at start.
"""

from __future__ import annotations

import asyncio
import csv
import time

import grpc
import pytest

from benchmarks.metrics import chrf
from parley.translate.v1 import translate_pb2, translate_pb2_grpc
from services.common.deadlines import Deadline
from services.common.errors import DeadlineExceeded
from services.harness import batch_counts, free_port, start_server
from services.translate.config import TranslateConfig
from services.translate.llama import EmbeddedLlamaBackend
from services.translate.prompts import LlmPair
from tests.helpers import shared_data

pytestmark = pytest.mark.timeout(300)

LONG_SENTENCES = 20
MAX_BATCH = 4
MAX_TOKENS = 48
QUEUE_DELAY_MS = 5.0
MARGIN_S = 1.0
EN_FR = LlmPair("en", "fr")


@pytest.fixture(scope="module")
def metrics_port():
    return free_port()


@pytest.fixture(scope="module")
def server(metrics_port):
    proc = start_server(
        "translate",
        "--llm-instances",
        "1",
        "--llm-max-tokens",
        str(MAX_TOKENS),
        "--max-batch-size",
        str(MAX_BATCH),
        "--max-queue-delay-ms",
        str(QUEUE_DELAY_MS),
        "--metrics-port",
        str(metrics_port),
    )
    yield proc
    assert proc.terminate() == 0, proc.log()


@pytest.fixture
async def stub(server):
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield translate_pb2_grpc.TranslationStub(channel)


@pytest.fixture(scope="module")
def backend():
    llm = EmbeddedLlamaBackend.from_config(TranslateConfig(llm_languages=("en", "fr"), max_batch_size=8))
    yield llm
    llm.close()


def sources(name: str, n: int) -> list[str]:
    with shared_data("text", name).open(encoding="utf-8", newline="") as f:
        return [r["src"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][:n]


async def timed(stub, texts: list[str], priority: int) -> tuple[float, list[str]]:
    request = translate_pb2.TranslateRequest(
        request_id="p", texts=texts, source_language="en", target_language="fr", priority=priority
    )
    started = time.perf_counter()
    response = await asyncio.wait_for(stub.Translate(request), 240)
    return time.perf_counter() - started, list(response.translations)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_short_high_priority_request_passes_a_long_low_priority_one(stub, metrics_port):
    # One long sentence, many times: every batch of long items costs the same, so the batch the short
    # request may wait for (a computing batch is not preempted) costs what one batch costs alone.
    longest = max(sources("flores200-devtest-half.en-fr.tsv", 20), key=len)
    long_texts = [longest] * LONG_SENTENCES
    short_text = sources("tatoeba-test.en-fr.tsv", 1)
    short_alone_s = min([(await timed(stub, short_text, 1))[0] for _ in range(2)])
    one_batch_s, _ = await timed(stub, [longest] * MAX_BATCH, 3)
    # The rest of the batch in progress, then its own batch (shared with long sentences).
    bound_s = short_alone_s + QUEUE_DELAY_MS / 1000 + 2 * one_batch_s + MARGIN_S

    before = batch_counts(metrics_port, "translate")
    long_task = asyncio.create_task(timed(stub, long_texts, 3))
    await asyncio.sleep(one_batch_s / 2)  # the long request is computing its first batch
    short_s, short_out = await timed(stub, short_text, 1)
    assert not long_task.done(), "the short request finished before the long one"
    long_s, long_out = await long_task
    after = batch_counts(metrics_port, "translate")

    assert short_out[0] and all(long_out)
    assert short_s <= bound_s, (
        f"short request took {short_s:.2f} s behind a long one; alone {short_alone_s:.2f} s, one batch "
        f"of long sentences {one_batch_s:.2f} s, whole long request {long_s:.2f} s"
    )
    assert short_s < long_s / 2
    requests, executions = after[0] - before[0], after[1] - before[1]
    assert requests / executions > MAX_BATCH - 1, "the llm backend's batches hold several sentences"


def test_a_deadline_passing_mid_batch_raises_and_leaves_the_instance_clean(backend):
    long_sentences = sources("flores200-devtest-half.en-fr.tsv", 6)
    first_alone = backend.translate_sentences(long_sentences[:1], EN_FR, Deadline(None))
    # The prompts of the six sentences take one long first step; the deadline passes during it.
    with pytest.raises(DeadlineExceeded, match="of 6 sentences translated"):
        backend.translate_sentences(long_sentences, EN_FR, Deadline.after(0.2))
    assert backend.translate_sentences(long_sentences[:1], EN_FR, Deadline(None)) == first_alone


def test_a_context_smaller_than_the_batch_makes_sentences_wait_for_room():
    # The en->fr few-shot prompt takes 89 tokens; these sentences' own prompts 10 to 18 plus generation
    # budgets of 26 to 40 (measured): about three at a time fit in 256 tokens, so eight run in waves.
    config = TranslateConfig(
        llm_languages=("en", "fr"), llm_context_tokens=256, llm_max_tokens=MAX_TOKENS, max_batch_size=8
    )
    small = EmbeddedLlamaBackend.from_config(config)
    try:
        texts = sources("tatoeba-test.en-fr.tsv", 8)
        alone = [small.translate_sentences([t], EN_FR, Deadline(None))[0] for t in texts]
        batched = small.translate_sentences(texts, EN_FR, Deadline(None))
    finally:
        small.close()
    assert all(batched)
    for i, out in enumerate(batched):
        scores = [chrf([other], [out]) for other in alone]
        assert max(range(len(alone)), key=scores.__getitem__) == i, (texts[i], out, alone[i])


def test_a_context_too_small_for_one_sentence_is_refused_at_start():
    config = TranslateConfig(llm_languages=("en", "fr"), llm_context_tokens=128)
    with pytest.raises(ValueError, match="--llm-context-tokens 128 is too small: the few-shot prompt"):
        EmbeddedLlamaBackend.from_config(config)
