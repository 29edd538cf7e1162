"""The llm backend's HTTP transport against a real local HTTP server speaking the OpenAI chat protocol.

The fake endpoint answers from a scripted table keyed by the last user message; some keys trigger
failures (slow answers, HTTP 5xx/429/401, bodies that are not JSON or lack a message). The translation
server runs as a real process pointed at it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from parley.translate.v1 import translate_pb2, translate_pb2_grpc
from services.common.deadlines import Deadline
from services.common.errors import DeadlineExceeded, ParleyError, Unavailable
from services.harness import start_server
from services.translate.http_chat import HttpChatBackend
from services.translate.prompts import LlmPair

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="session")]

TIMEOUT_S = 1.0
SLOW_S = 3.0
API_KEY = "test-key-123"

# Last user message -> raw assistant content (noise included, to check the cleaning).
SCRIPT = {
    "Good morning.": '  "Bonjour."\nEnglish: Where is it?',
    "How are you?": "French: Comment allez-vous ?",
    "Thank you.": "Merci.",
}


class FakeOpenAI(BaseHTTPRequestHandler):
    """POST /v1/chat/completions, answering from SCRIPT or failing on the trigger keys."""

    requests: list[dict] = []

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, code: int, body: bytes, content_type: str = "application/json") -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout tests)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.requests.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
        )
        if self.path != "/v1/chat/completions":
            self._send(404, b'{"error": "not found"}')
            return
        text = body["messages"][-1]["content"]
        if text == "__slow__":
            time.sleep(SLOW_S)
            self._send(200, json.dumps({"choices": [{"message": {"content": "Lent."}}]}).encode())
        elif text == "__500__":
            self._send(500, b'{"error": "engine crashed"}')
        elif text == "__429__":
            self._send(429, b'{"error": "too many requests"}')
        elif text == "__401__":
            self._send(401, b'{"error": "bad key"}')
        elif text == "__badjson__":
            self._send(200, b"<html>proxy error</html>", "text/html")
        elif text == "__nochoices__":
            self._send(200, b'{"id": "x", "object": "chat.completion"}')
        else:
            content = SCRIPT.get(text, f"<{text}>")
            self._send(200, json.dumps({"choices": [{"index": 0, "message": {"content": content}}]}).encode())


@pytest.fixture(scope="module")
def fake_endpoint() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def server(fake_endpoint):
    proc = start_server(
        "translate",
        "--backend",
        "llm",
        "--llm-transport",
        "http",
        "--llm-base-url",
        fake_endpoint,
        "--llm-model",
        "fake-instruct",
        "--llm-timeout-s",
        str(TIMEOUT_S),
        "--llm-languages",
        "en,fr,tr",
        env={"PARLEY_LLM_API_KEY": API_KEY},
    )
    yield proc
    assert proc.terminate() == 0, proc.log()


@pytest.fixture
async def stub(server):
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield translate_pb2_grpc.TranslationStub(channel)


async def translate(stub, texts, source="en", target="fr", timeout_s=30.0):
    request = translate_pb2.TranslateRequest(
        request_id="h", texts=texts, source_language=source, target_language=target
    )
    return await stub.Translate(request, timeout=timeout_s)


async def test_translations_are_cleaned_and_in_order(stub):
    FakeOpenAI.requests.clear()
    response = await translate(stub, ["Good morning. How are you?", "", "Thank you.", "Bye now."])
    assert list(response.translations) == ["Bonjour. Comment allez-vous ?", "", "Merci.", "<Bye now.>"]
    assert response.model == "fake-instruct"
    sent = FakeOpenAI.requests
    assert len(sent) == 4, "one chat request per sentence; empty texts send nothing"
    for request in sent:
        assert request["path"] == "/v1/chat/completions"
        assert request["auth"] == f"Bearer {API_KEY}"
        body = request["body"]
        assert body["model"] == "fake-instruct" and body["temperature"] == 0.0 and body["stream"] is False
        assert [m["role"] for m in body["messages"]] == ["system"] + ["user", "assistant"] * 3 + ["user"]
        assert "English text to French" in body["messages"][0]["content"]
        assert 16 <= body["max_tokens"] <= 256
    assert sorted(r["body"]["messages"][-1]["content"] for r in sent) == sorted(
        ["Good morning.", "How are you?", "Thank you.", "Bye now."]
    )


async def test_a_requests_context_is_one_more_example_turn_of_every_sentence(stub):
    FakeOpenAI.requests.clear()
    request = translate_pb2.TranslateRequest(
        texts=["Thank you. Good morning."],
        source_language="en",
        target_language="fr",
        context=translate_pb2.TranslationContext(
            source_text="It was\na long day,", translated_text="Ce fut une longue journée,"
        ),
    )
    response = await stub.Translate(request, timeout=30)
    assert list(response.translations) == ["Merci. Bonjour."]
    assert len(FakeOpenAI.requests) == 2
    for sent in FakeOpenAI.requests:
        messages = sent["body"]["messages"]
        assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 4 + ["user"]
        assert messages[-3:-1] == [
            {"role": "user", "content": "It was a long day,"},
            {"role": "assistant", "content": "Ce fut une longue journée,"},
        ]


async def test_list_language_pairs_are_the_configured_languages(stub):
    response = await stub.ListLanguagePairs(translate_pb2.ListLanguagePairsRequest(), timeout=10)
    pairs = [(p.source_language, p.target_language) for p in response.pairs]
    assert pairs == [("en", "fr"), ("en", "tr"), ("fr", "en"), ("fr", "tr"), ("tr", "en"), ("tr", "fr")]
    assert response.model == "fake-instruct"


@pytest.mark.parametrize(
    ("text", "code", "detail"),
    [
        ("__500__", grpc.StatusCode.UNAVAILABLE, "failed with HTTP 500"),
        ("__429__", grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded (HTTP 429)"),
        ("__401__", grpc.StatusCode.INTERNAL, "rejected the request with HTTP 401"),
        ("__badjson__", grpc.StatusCode.INTERNAL, "malformed response (not JSON)"),
        ("__nochoices__", grpc.StatusCode.INTERNAL, "malformed response: no choices[0].message.content"),
        ("__slow__", grpc.StatusCode.UNAVAILABLE, f"did not answer within {TIMEOUT_S:.1f} s"),
    ],
)
async def test_endpoint_failures_map_to_clear_statuses_and_the_server_keeps_serving(stub, text, code, detail):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await translate(stub, ["Thank you.", text])
    assert err.value.code() == code
    assert detail in err.value.details()
    assert list((await translate(stub, ["Thank you."])).translations) == ["Merci."]


async def test_a_caller_deadline_shorter_than_the_endpoint_timeout_is_deadline_exceeded(stub):
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await translate(stub, ["__slow__"], timeout_s=0.4)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < TIMEOUT_S
    assert list((await translate(stub, ["Thank you."])).translations) == ["Merci."]


async def test_unsupported_language_is_invalid_argument(stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await translate(stub, ["Hallo."], "de", "fr")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'de' is not a language of fake-instruct" in err.value.details()


def _backend(url: str, timeout_s: float = TIMEOUT_S) -> HttpChatBackend:
    return HttpChatBackend(url, "fake-instruct", "", timeout_s, ("en", "fr"), concurrency=2)


async def test_the_caller_deadline_caps_the_http_timeout_in_process(fake_endpoint):
    backend = _backend(fake_endpoint, timeout_s=10.0)
    try:
        with pytest.raises(DeadlineExceeded, match="caller's deadline"):
            await asyncio.to_thread(
                backend.translate_sentences, ["__slow__"], LlmPair("en", "fr"), Deadline.after(0.3)
            )
        with pytest.raises(DeadlineExceeded):
            backend.translate_sentences(["Thank you."], LlmPair("en", "fr"), Deadline.after(0.0))
    finally:
        backend.close()


async def test_an_unreachable_endpoint_is_unavailable():
    backend = _backend("http://127.0.0.1:9/v1")  # discard port: nothing listens
    try:
        with pytest.raises(Unavailable, match="cannot reach LLM endpoint"):
            await asyncio.to_thread(
                backend.translate_sentences, ["Thank you."], LlmPair("en", "fr"), Deadline(None)
            )
    finally:
        backend.close()


async def test_a_wrong_path_is_an_internal_error(fake_endpoint):
    backend = _backend(fake_endpoint.removesuffix("/v1"))
    try:
        with pytest.raises(ParleyError, match="HTTP 404"):
            await asyncio.to_thread(
                backend.translate_sentences, ["Thank you."], LlmPair("en", "fr"), Deadline(None)
            )
    finally:
        backend.close()
