"""The CTranslate2 backend with tiny models built here (random weights, real SentencePiece, real runtime).

The NLLB-layout model is served by a real server process; the M2M100 and Marian layouts are loaded by the
engine in-process. Translations are nonsense (random weights): the tests check the mechanics, the dynamic
batcher's included: sentences of concurrent requests share model batches, the results must be exactly
those of translating each sentence alone, and the batcher's Prometheus counters must show batches larger
than one.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from parley.translate.v1 import translate_pb2, translate_pb2_grpc
from services.common.errors import InvalidArgument
from services.harness import batch_counts, free_port, start_server
from services.translate.config import Backend, TranslateConfig
from services.translate.engine import load_engine
from tests.fixtures.tiny_ct2 import build_tiny_model
from tests.helpers import shared_data

pytestmark = [pytest.mark.timeout(300), pytest.mark.asyncio(loop_scope="session")]

MAX_TEXTS = 40
MAX_CHARS = 10000
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
        "--max-texts",
        str(MAX_TEXTS),
        "--max-chars",
        str(MAX_CHARS),
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


async def translate(stub, texts, source="en", target="fr", request_id="r", priority=0):
    request = translate_pb2.TranslateRequest(
        request_id=request_id, texts=texts, source_language=source, target_language=target, priority=priority
    )
    return await asyncio.wait_for(stub.Translate(request), 60)


def mixed_texts(text_dir, n: int) -> list[str]:
    """n real sentences of varied length (a few words to a few sentences), from FLORES and Tatoeba."""
    rows = []
    for name in ("tatoeba-test.en-fr.tsv", "flores200-devtest-half.en-fr.tsv"):
        with (text_dir / name).open(encoding="utf-8", newline="") as f:
            rows += [r["src"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][:n]
    texts = []
    for i in range(n):
        if i % 4 == 3:
            texts.append(" ".join(rows[n + i : n + i + 3]))  # three FLORES sentences in one text
        else:
            texts.append(rows[i] if i % 2 else rows[n + i])
    return texts


async def test_a_batch_of_32_comes_back_in_order_and_equal_to_one_by_one(stub, text_dir):
    texts = mixed_texts(text_dir, 32)
    assert len({len(t) for t in texts}) > 20, "lengths are mixed"
    batch = await translate(stub, texts, request_id="batch")
    assert batch.request_id == "batch" and batch.model == "tiny-nllb"
    assert len(batch.translations) == 32
    alone = [(await translate(stub, [t])).translations[0] for t in texts]
    assert list(batch.translations) == alone
    assert all(batch.translations), "every non-empty text gets a non-empty translation"
    assert len(set(batch.translations)) >= 30, (
        "outputs depend on the input (so the order check means something)"
    )
    for out in batch.translations:
        assert "fra_Latn" not in out and "eng_Latn" not in out and "</s>" not in out


async def test_the_target_language_token_steers_the_decoder(stub):
    text = ["The meeting was postponed until next week."]
    to_fr = (await translate(stub, text, "en", "fr")).translations[0]
    to_tr = (await translate(stub, text, "en", "tr")).translations[0]
    from_fr = (await translate(stub, text, "fr", "tr")).translations[0]
    assert to_fr != to_tr
    assert from_fr != to_tr, "the source language token is fed to the encoder"


async def test_empty_strings_come_back_empty_in_place(stub):
    response = await translate(stub, ["", "Hello there.", "   ", "Good night.", ""])
    out = list(response.translations)
    assert out[0] == "" and out[2] == "" and out[4] == ""
    assert out[1] and out[3]
    assert out[1] == (await translate(stub, ["Hello there."])).translations[0]


async def test_list_language_pairs_is_exactly_what_the_model_has(stub):
    response = await asyncio.wait_for(stub.ListLanguagePairs(translate_pb2.ListLanguagePairsRequest()), 10)
    pairs = {(p.source_language, p.target_language) for p in response.pairs}
    assert len(response.pairs) == 6
    assert pairs == {("en", "fr"), ("en", "tr"), ("fr", "en"), ("fr", "tr"), ("tr", "en"), ("tr", "fr")}
    assert response.model == "tiny-nllb"


async def test_multi_sentence_text_is_split_and_joined(stub):
    two = (await translate(stub, ["Where is the station? It is near the bridge."])).translations[0]
    first = (await translate(stub, ["Where is the station?"])).translations[0]
    second = (await translate(stub, ["It is near the bridge."])).translations[0]
    assert two == f"{first} {second}"


@pytest.mark.parametrize(
    ("texts", "source", "target", "detail"),
    [
        (["Hello."], "en", "de", "target_language 'de' is not a language of model tiny-nllb"),
        (["Hello."], "xx", "fr", "source_language 'xx' is not a language"),
        (["Hello."], "eng_Latn", "fr", "not a BCP-47 language code"),
        (["Hello."], "", "fr", "source_language is empty"),
        (["Hello."], "en", "en-GB", "both"),
        ([], "en", "fr", "texts is empty"),
        (["a"] * (MAX_TEXTS + 1), "en", "fr", f"{MAX_TEXTS + 1} texts is more than the {MAX_TEXTS}"),
        (["x" * (MAX_CHARS + 1)], "en", "fr", f"more than the {MAX_CHARS}"),
    ],
)
async def test_bad_inputs_are_invalid_argument_and_the_server_keeps_serving(
    stub, server, texts, source, target, detail
):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await translate(stub, texts, source, target)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in err.value.details()
    assert (await translate(stub, ["Still here?"])).translations[0]
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_concurrent_requests_are_all_answered(stub):
    texts = [[f"Sentence number {i} is here."] for i in range(12)]
    responses = await asyncio.gather(*(translate(stub, t, request_id=str(i)) for i, t in enumerate(texts)))
    assert [r.request_id for r in responses] == [str(i) for i in range(12)]
    alone = [(await translate(stub, t)).translations[0] for t in texts[:3]]
    assert [r.translations[0] for r in responses[:3]] == alone


def unbatched(nllb_dir, texts: list[str], pairs: list[tuple[str, str]]) -> list[str]:
    """Each text translated in-process with CTranslate2 batches of one sentence (no batching at all)."""
    config = TranslateConfig(
        backend=Backend.CTRANSLATE2,
        model_path=str(nllb_dir),
        max_decoding_length=DECODE_TOKENS,
        intra_threads=1,
        max_batch_size=1,
    )
    engine = load_engine(config)
    try:
        return [engine.translate([t], s, d)[0] for t, (s, d) in zip(texts, pairs, strict=True)]
    finally:
        engine.close()


async def test_concurrent_requests_share_batches_and_equal_unbatched_results(
    stub, nllb_dir, text_dir, metrics_port
):
    texts = mixed_texts(text_dir, REQUESTS)
    # Two language pairs interleaved: a batch must never mix them (the batch key).
    pairs = [("en", "fr") if i % 3 else ("en", "tr") for i in range(REQUESTS)]
    expected = await asyncio.to_thread(unbatched, nllb_dir, texts, pairs)
    assert len(set(expected)) >= REQUESTS - 2, "outputs depend on the input: the comparison means something"

    requests_before, executions_before = await asyncio.to_thread(batch_counts, metrics_port, "translate")
    responses = await asyncio.gather(
        *(
            translate(stub, [t], s, d, priority=1 + i % 3)
            for i, (t, (s, d)) in enumerate(zip(texts, pairs, strict=True))
        )
    )
    requests_after, executions_after = await asyncio.to_thread(batch_counts, metrics_port, "translate")

    assert [r.translations[0] for r in responses] == expected
    items = requests_after - requests_before
    executions = executions_after - executions_before
    assert items >= REQUESTS, "one batcher item per sentence (a text may hold several)"
    assert executions < items, f"mean batch size {items / executions:.2f}: sentences shared batches"


async def test_sequential_requests_equal_unbatched_results(stub, nllb_dir, text_dir):
    texts = mixed_texts(text_dir, 6)
    expected = await asyncio.to_thread(unbatched, nllb_dir, texts, [("en", "fr")] * len(texts))
    assert [(await translate(stub, [t])).translations[0] for t in texts] == expected


@pytest.mark.parametrize("priority", [4, 100])
async def test_a_priority_beyond_the_configured_levels_is_invalid_argument(stub, priority):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await translate(stub, ["Hello there."], priority=priority)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"priority {priority} is out of range" in err.value.details()
    assert (await translate(stub, ["Hello there."], priority=3)).translations[0]


def check_family(model_dir, family: str) -> None:
    config = TranslateConfig(
        backend=Backend.CTRANSLATE2,
        model_path=str(model_dir),
        max_decoding_length=DECODE_TOKENS,
        intra_threads=1,
    )
    if family == "marian":
        with pytest.raises(ValueError, match="--source-language and --target-language"):
            load_engine(config)
        config = dataclasses.replace(config, source_language="en", target_language="fr")
    engine = load_engine(config)
    try:
        expected_pairs = 6 if family == "m2m100" else 1
        assert len(engine.pairs()) == expected_pairs and ("en", "fr") in engine.pairs()
        out = engine.translate(["Hello there.", "", "Good night, see you tomorrow."], "en", "fr")
        assert out[0] and out[1] == "" and out[2] and out[0] != out[2]
        assert "__fr__" not in out[0]
        with pytest.raises(InvalidArgument):
            engine.translate(["Hello."], "fr", "de")
    finally:
        engine.close()


@pytest.mark.parametrize("family", ["m2m100", "marian"])
async def test_m2m100_and_marian_layouts_load_and_translate(tmp_path_factory, text_dir, family):
    model_dir = build_tiny_model(tmp_path_factory.mktemp(family) / f"tiny-{family}", text_dir, family)
    await asyncio.to_thread(check_family, model_dir, family)


def check_on_gpu(model_dir) -> None:
    config = TranslateConfig(
        backend=Backend.CTRANSLATE2,
        model_path=str(model_dir),
        device="cuda",
        compute_type="float16",
        max_decoding_length=DECODE_TOKENS,
    )
    engine = load_engine(config)
    try:
        out = engine.translate(["Hello there.", "", "Good night, see you tomorrow."], "en", "fr")
        assert out[0] and out[1] == "" and out[2] and out[0] != out[2]
    finally:
        engine.close()


@pytest.mark.gpu
async def test_the_model_runs_on_a_cuda_device(nllb_dir):
    import ctranslate2

    if ctranslate2.get_cuda_device_count() == 0:
        pytest.skip("no CUDA device")
    await asyncio.to_thread(check_on_gpu, nllb_dir)
