"""The llm backend over HTTP: an OpenAI-compatible ``/chat/completions`` endpoint.

:class:`HttpChatBackend` sends ``POST {base_url}/chat/completions`` (vLLM, llama.cpp ``llama-server``, any
OpenAI-compatible server) with the chat form of :mod:`services.translate.prompts`, with the standard
library's ``urllib`` (no third-party HTTP client is a project dependency). The sentences of a batch are
sent in parallel (``llm_concurrency``) so the server's continuous batching can run them together. Each
request's ``max_tokens`` is the sentence's budget (:func:`services.translate.prompts.max_new_tokens`).
Failures map to status codes as :mod:`services.common.http` documents: the endpoint's own timeout
(``llm_timeout_s``), a refused connection or HTTP 5xx are UNAVAILABLE, the caller's shorter deadline
DEADLINE_EXCEEDED, HTTP 429 RESOURCE_EXHAUSTED, another 4xx (bad key, unknown model) or a malformed
response INTERNAL.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from services.common.deadlines import Deadline
from services.common.errors import ParleyError
from services.common.http import post_json
from services.translate.config import TranslateConfig
from services.translate.context import SentenceContexts, TranslationContext
from services.translate.prompts import LanguageSet, LlmPair, chat_messages, clean_output, max_new_tokens


class HttpChatBackend:
    """An OpenAI-compatible ``/chat/completions`` endpoint (vLLM, llama.cpp server).

    Args:
        base_url: Base URL up to and including ``/v1``.
        model: Model name sent in each request.
        api_key: Bearer token; empty for none.
        timeout_s: Timeout of one HTTP call, in seconds.
        languages: Languages offered (keys of :data:`~services.translate.prompts.LANGUAGE_NAMES`).
        max_tokens: Most tokens generated per sentence.
        concurrency: HTTP calls in flight at once.
        model_name: Reported in responses; default ``model``.
    """

    # Batcher instances sending batches at once.
    HTTP_INSTANCES = 2

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str,
        timeout_s: float,
        languages: tuple[str, ...],
        max_tokens: int = 256,
        concurrency: int = 8,
        model_name: str = "",
    ):
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._model = model
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._languages = LanguageSet(languages)
        self._max_tokens = max_tokens
        self.model_name = model_name or model
        self.workers = max(1, concurrency)
        self.in_flight_batching = False  # one HTTP request per sentence
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="llm-http")

    @classmethod
    def from_config(cls, config: TranslateConfig) -> HttpChatBackend:
        """Builds the client; nothing is sent until the first request.

        Raises:
            ValueError: No model name, or a language without prompt examples.
        """
        if not config.llm_model:
            raise ValueError("--llm-model is required with --llm-transport http (the endpoint's model name)")
        return cls(
            config.llm_base_url,
            config.llm_model,
            os.environ.get(config.llm_api_key_env, ""),
            config.llm_timeout_s,
            config.llm_languages,
            config.llm_max_tokens,
            config.llm_concurrency,
            config.model_name,
        )

    def pairs(self) -> list[tuple[str, str]]:
        """Every ordered pair of the configured languages."""
        return self._languages.pairs()

    def resolve(self, source: str, target: str) -> LlmPair:
        """Checks the pair; raises InvalidArgument for a language without prompt examples."""
        return self._languages.resolve(source, target, self.model_name)

    def _translate_one(
        self, sentence: str, pair: LlmPair, deadline: Deadline, context: TranslationContext | None
    ) -> str:
        body = {
            "model": self._model,
            "messages": chat_messages(sentence, pair.source, pair.target, context),
            "temperature": 0.0,
            # About 4 characters per token: the same "twice the source plus 16" budget as embedded.
            "max_tokens": max_new_tokens(len(sentence) // 4 + 1, self._max_tokens),
            "stop": ["\n\n"],
            "stream": False,
        }
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        data = post_json(
            self._url,
            json.dumps(body).encode(),
            "application/json",
            headers,
            deadline,
            self._timeout_s,
            "LLM endpoint",
        )
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise ParleyError(
                f"LLM endpoint {self._url} returned a malformed response: no choices[0].message.content"
            ) from exc
        if not isinstance(content, str):
            raise ParleyError(f"LLM endpoint {self._url} returned a malformed response: content is not text")
        return clean_output(content, sentence, pair.source, pair.target)

    def translate_sentences(
        self,
        sentences: list[str],
        pair: LlmPair,
        deadline: Deadline,
        contexts: SentenceContexts | None = None,
    ) -> list[str]:
        """Sends every sentence as its own chat request, ``concurrency`` at a time.

        The caller's deadline caps each HTTP call's timeout; a sentence's context (arguments as
        :class:`~services.translate.engine.TranslationBackend` documents) is one more example turn.

        Raises:
            Unavailable, DeadlineExceeded, ResourceExhausted, ParleyError: See the module docstring; the
                first failing sentence decides.
        """
        futures = [
            self._executor.submit(self._translate_one, s, pair, deadline, c)
            for s, c in zip(sentences, contexts or [None] * len(sentences), strict=True)
        ]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def instance_fns(
        self, count: int = 0
    ) -> list[Callable[[list[str], LlmPair, Deadline, SentenceContexts | None], list[str]]]:
        """:meth:`translate_sentences` ``count`` times (0: ``HTTP_INSTANCES``); it is thread-safe.

        Two instances let the next batch form and go out while one waits for the endpoint; the calls of
        both share the ``concurrency`` HTTP threads, and the endpoint batches what arrives.
        """
        return [self.translate_sentences] * (count or self.HTTP_INSTANCES)

    def close(self) -> None:
        """Stops the HTTP threads."""
        self._executor.shutdown(wait=True, cancel_futures=True)
