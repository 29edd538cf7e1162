"""The dynamic batcher on the translation server's CTranslate2 backend (tiny random-weight model).

Sentences of concurrent requests share model batches; the results must be exactly those of translating
each sentence alone, and the batcher's Prometheus counters must show batches larger than one.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses

import grpc
import pytest

from parley.translate.v1 import translate_pb2, translate_pb2_grpc
from services.translate.config import Backend, TranslateConfig
from services.translate.engine import load_engine
from tests.fixtures.tiny_ct2 import build_tiny_model
from tests.helpers import batch_counts, free_port, shared_data, start_server

pytestmark = [pytest.mark.timeout(300), pytest.mark.asyncio(loop_scope="session")]

DECODE_TOKENS = 24
QUEUE_DELAY_MS = 20.0
REQUESTS = 24


@pytest.fixture(scope="module")
def text_dir():
    return shared_data("text")


@pytest.fixture(scope="module")
def nllb_dir(tmp_path_factory, text_dir):
    return build_tiny_model(tmp_path_factory.mktemp("ct2") / "tiny-nllb", text_dir, "nllb")


@pytest.fixture(scope="module")
def metrics_port():
    return free_port()


@pytest.fixture(scope="module")
def server(nllb_dir, metrics_port):
    proc = start_server(
        "translate",
        "--backend",
        "ctranslate2",
        "--model-path",
        str(nllb_dir),
        "--max-decoding-length",
        str(DECODE_TOKENS),
        "--intra-threads",
        "1",
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


def texts_of(text_dir, n: int) -> list[str]:
    """n real texts of varied length: Tatoeba one-liners and FLORES sentences, alternately."""
    with (text_dir / "tatoeba-test.en-fr.tsv").open(encoding="utf-8", newline="") as f:
        short = [r["src"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][:n]
    with (text_dir / "flores200-devtest-half.en-fr.tsv").open(encoding="utf-8", newline="") as f:
        long = [r["src"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][:n]
    return [short[i] if i % 2 else long[i] for i in range(n)]


def unbatched(nllb_dir, texts: list[str], pairs: list[tuple[str, str]]) -> list[str]:
    """Each text translated in-process with CTranslate2 batches of one sentence (no batching at all)."""
    config = TranslateConfig(
        backend=Backend.CTRANSLATE2,
        model_path=str(nllb_dir),
        max_decoding_length=DECODE_TOKENS,
        intra_threads=1,
    )
    engine = load_engine(dataclasses.replace(config, max_batch_size=1))
    try:
        return [engine.translate([t], s, d)[0] for t, (s, d) in zip(texts, pairs, strict=True)]
    finally:
        engine.close()


async def translate(stub, text, source="en", target="fr", priority=0):
    request = translate_pb2.TranslateRequest(
        request_id="b", texts=[text], source_language=source, target_language=target, priority=priority
    )
    return (await asyncio.wait_for(stub.Translate(request), 60)).translations[0]


async def test_concurrent_requests_share_batches_and_equal_unbatched_results(
    stub, nllb_dir, text_dir, metrics_port
):
    texts = texts_of(text_dir, REQUESTS)
    # Two language pairs interleaved: a batch must never mix them (the batch key).
    pairs = [("en", "fr") if i % 3 else ("en", "tr") for i in range(REQUESTS)]
    expected = await asyncio.to_thread(unbatched, nllb_dir, texts, pairs)
    assert len(set(expected)) >= REQUESTS - 2, "outputs depend on the input: the comparison means something"

    requests_before, executions_before = await asyncio.to_thread(batch_counts, metrics_port, "translate")
    got = await asyncio.gather(
        *(
            translate(stub, t, s, d, priority=1 + i % 3)
            for i, (t, (s, d)) in enumerate(zip(texts, pairs, strict=True))
        )
    )
    requests_after, executions_after = await asyncio.to_thread(batch_counts, metrics_port, "translate")

    assert got == expected
    items = requests_after - requests_before
    executions = executions_after - executions_before
    assert items >= REQUESTS, "one batcher item per sentence (a text may hold several)"
    assert executions < items, f"mean batch size {items / executions:.2f}: sentences shared batches"


async def test_sequential_requests_equal_unbatched_results(stub, nllb_dir, text_dir):
    texts = texts_of(text_dir, 6)
    pairs = [("en", "fr")] * len(texts)
    expected = await asyncio.to_thread(unbatched, nllb_dir, texts, pairs)
    assert [await translate(stub, t) for t in texts] == expected


@pytest.mark.parametrize("priority", [4, 100])
async def test_a_priority_beyond_the_configured_levels_is_invalid_argument(stub, priority):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await translate(stub, "Hello there.", priority=priority)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"priority {priority} is out of range" in err.value.details()
    assert await translate(stub, "Hello there.", priority=3)
