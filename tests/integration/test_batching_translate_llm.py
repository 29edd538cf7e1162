"""Priorities through the dynamic batcher on the translation server's embedded llm backend.

One llama instance: a long low-priority request queues its sentences; a short high-priority request sent
meanwhile waits only for the sentence being computed, never for the rest of the long request.
"""

from __future__ import annotations

import asyncio
import csv
import time

import grpc
import pytest

from parley.translate.v1 import translate_pb2, translate_pb2_grpc
from tests.helpers import shared_data, start_server

pytestmark = [pytest.mark.timeout(300), pytest.mark.asyncio(loop_scope="session")]

LONG_SENTENCES = 12
MAX_TOKENS = 48
QUEUE_DELAY_MS = 5.0
MARGIN_S = 1.0


@pytest.fixture(scope="module")
def server():
    proc = start_server(
        "translate",
        "--llm-instances",
        "1",
        "--llm-max-tokens",
        str(MAX_TOKENS),
        "--max-queue-delay-ms",
        str(QUEUE_DELAY_MS),
    )
    yield proc
    assert proc.terminate() == 0, proc.log()


@pytest.fixture
async def stub(server):
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield translate_pb2_grpc.TranslationStub(channel)


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


async def test_a_short_high_priority_request_passes_a_long_low_priority_one(stub):
    # One long sentence, many times: each long item costs the same, so the one the short request may wait
    # for (a computing batch is not preempted) costs what it costs alone.
    longest = max(sources("flores200-devtest-half.en-fr.tsv", 20), key=len)
    long_texts = [longest] * LONG_SENTENCES
    short_text = sources("tatoeba-test.en-fr.tsv", 1)
    short_alone_s = min([(await timed(stub, short_text, 1))[0] for _ in range(2)])
    one_long_s, _ = await timed(stub, [longest], 3)
    bound_s = short_alone_s + QUEUE_DELAY_MS / 1000 + one_long_s + MARGIN_S

    long_task = asyncio.create_task(timed(stub, long_texts, 3))
    await asyncio.sleep(one_long_s / 2)  # the long request is computing its first sentences
    short_s, short_out = await timed(stub, short_text, 1)
    assert not long_task.done(), "the short request finished before the long one"
    long_s, long_out = await long_task

    assert short_out[0] and all(long_out)
    assert short_s <= bound_s, (
        f"short request took {short_s:.2f} s behind a long one; alone {short_alone_s:.2f} s, one long "
        f"sentence {one_long_s:.2f} s, whole long request {long_s:.2f} s"
    )
    assert short_s < long_s / 3
