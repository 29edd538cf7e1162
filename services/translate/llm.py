"""Translation by a language model: a fixed few-shot prompt, two transports, cleaned output.

The prompt
----------
One fixed prompt, documented here so results can be reproduced. It has an instruction line and three
example pairs (the same three sentences in every supported language, written for this module: a question,
a polite request and a longer sentence with a subordinate clause), then the sentence to translate:

* Completion form (:func:`completion_prompt`, for the embedded model, a *base* model without a chat
  template)::

      Translate English to French.

      English: Where is the train station?
      French: Où est la gare ?

      English: ... (two more examples) ...

      English: <sentence>
      French:

  The model continues after ``French:``; generation stops at the first line break.
* Chat form (:func:`chat_messages`, for an OpenAI-compatible ``/chat/completions`` endpoint serving an
  instruction-tuned model): a system message with the same instruction ("Translate the user's English
  text to French. Reply with the French translation only, on one line."), the three examples as
  user/assistant turns, then the sentence as the last user turn.

Decoding is greedy (temperature 0) and each sentence is its own prompt, so a translation never depends on
the other sentences of the request. The output is cleaned by :func:`clean_output`: an echoed prompt is
removed, then a leading ``French:`` or ``Translation:`` label, only the first line is kept, anything from
the next source label (``English:``) on is cut, and quotes around the whole translation are removed
unless the source sentence itself was quoted.

Transports
----------
* :class:`EmbeddedLlamaBackend`: llama-cpp-python in this process, the CPU default (Gemma 3 270M,
  Q4_K_M GGUF, bundled). A ``Llama`` object is not thread-safe: each instance is checked out by one
  thread at a time (``llm_instances`` instances, one inference thread each: on a server, each instance is
  one model instance of the dynamic batcher, fed from the shared queue). llama.cpp keeps the KV cache
  of the previous prompt, so the shared few-shot prefix is evaluated once per language pair, not per call.
* :class:`HttpChatBackend`: ``POST {base_url}/chat/completions`` (vLLM, llama.cpp ``llama-server``, any
  OpenAI-compatible server), with the standard library's ``urllib`` (no third-party HTTP client is a
  project dependency). The sentences of a batch are sent in parallel (``llm_concurrency``) so the
  server's continuous batching can run them together. Failures map to status codes as
  :mod:`services.common.http` documents: the endpoint's own timeout (``llm_timeout_s``), a refused
  connection or HTTP 5xx are UNAVAILABLE, the caller's shorter deadline DEADLINE_EXCEEDED, HTTP 429
  RESOURCE_EXHAUSTED, another 4xx (bad key, unknown model) or a malformed response INTERNAL.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.errors import DeadlineExceeded, InvalidArgument, ParleyError
from services.common.http import post_json
from services.common.resilience import Deadline
from services.translate.config import TranslateConfig
from services.translate.languages import parse_tag

logger = logging.getLogger(__name__)

LANGUAGE_NAMES = {
    "en": "English",
    "fr": "French",
    "tr": "Turkish",
    "de": "German",
    "es": "Spanish",
    "it": "Italian",
    "pt": "Portuguese",
}

# The few-shot examples: example i is the same sentence in every language.
EXAMPLES = {
    "en": (
        "Where is the train station?",
        "I would like a cup of coffee, please.",
        "The meeting was postponed until next week because of the storm.",
    ),
    "fr": (
        "Où est la gare ?",
        "Je voudrais une tasse de café, s'il vous plaît.",
        "La réunion a été reportée à la semaine prochaine à cause de la tempête.",
    ),
    "tr": (
        "Tren istasyonu nerede?",
        "Bir fincan kahve istiyorum, lütfen.",
        "Toplantı fırtına nedeniyle gelecek haftaya ertelendi.",
    ),
    "de": (
        "Wo ist der Bahnhof?",
        "Ich hätte gern eine Tasse Kaffee, bitte.",
        "Die Besprechung wurde wegen des Sturms auf nächste Woche verschoben.",
    ),
    "es": (
        "¿Dónde está la estación de tren?",
        "Quisiera una taza de café, por favor.",
        "La reunión se aplazó hasta la próxima semana debido a la tormenta.",
    ),
    "it": (
        "Dov'è la stazione ferroviaria?",
        "Vorrei una tazza di caffè, per favore.",
        "La riunione è stata rinviata alla settimana prossima a causa della tempesta.",
    ),
    "pt": (
        "Onde fica a estação de trem?",
        "Eu gostaria de uma xícara de café, por favor.",
        "A reunião foi adiada para a próxima semana por causa da tempestade.",
    ),
}

_QUOTES = (
    ('"', '"'),
    ("\u201c", "\u201d"),
    ("\u00ab", "\u00bb"),
    ("'", "'"),
    ("\u2018", "\u2019"),
    ("\u201e", "\u201c"),
)
_OPENING_QUOTES = "\"'\u201c\u00ab\u2018\u201e"


def completion_prompt(text: str, source: str, target: str) -> str:
    """The completion-form prompt for one sentence (see the module docstring).

    Args:
        text: One sentence.
        source: Source language, ISO 639-1 key of :data:`LANGUAGE_NAMES`.
        target: Target language, same form.
    """
    src, tgt = LANGUAGE_NAMES[source], LANGUAGE_NAMES[target]
    parts = [f"Translate {src} to {tgt}.\n\n"]
    for example_src, example_tgt in zip(EXAMPLES[source], EXAMPLES[target], strict=True):
        parts.append(f"{src}: {example_src}\n{tgt}: {example_tgt}\n\n")
    parts.append(f"{src}: {text}\n{tgt}:")
    return "".join(parts)


def chat_messages(text: str, source: str, target: str) -> list[dict[str, str]]:
    """The chat-form prompt for one sentence: system instruction, three example turns, the sentence."""
    src, tgt = LANGUAGE_NAMES[source], LANGUAGE_NAMES[target]
    messages = [
        {
            "role": "system",
            "content": (
                f"Translate the user's {src} text to {tgt}. "
                f"Reply with the {tgt} translation only, on one line."
            ),
        }
    ]
    for example_src, example_tgt in zip(EXAMPLES[source], EXAMPLES[target], strict=True):
        messages += [{"role": "user", "content": example_src}, {"role": "assistant", "content": example_tgt}]
    messages.append({"role": "user", "content": text})
    return messages


def _strip_quotes(text: str) -> str:
    for opening, closing in _QUOTES:
        if len(text) >= 2 and text.startswith(opening) and text.endswith(closing):
            return text[len(opening) : len(text) - len(closing)].strip()
    return text


def clean_output(raw: str, source_text: str, source: str, target: str, prompt: str = "") -> str:
    """The translation in a model's raw output (rules in the module docstring).

    Args:
        raw: Generated text.
        source_text: The sentence that was translated (its quotes decide whether quotes are kept).
        source: Source language key of :data:`LANGUAGE_NAMES`.
        target: Target language key.
        prompt: The prompt, removed when the output starts by echoing it.

    Returns:
        One line, stripped; may be empty when the model produced nothing usable.
    """
    text = raw
    if prompt and text.startswith(prompt):
        text = text[len(prompt) :]
    text = text.strip()
    source_label, target_label = LANGUAGE_NAMES[source] + ":", LANGUAGE_NAMES[target] + ":"
    if text.startswith(source_label):
        # The model replayed the example pattern: the translation follows the target label.
        start = text.find(target_label)
        text = text[start + len(target_label) :] if start >= 0 else ""
    text = text.strip()
    for label in (target_label, "Translation:"):
        if text.lower().startswith(label.lower()):
            text = text[len(label) :].strip()
    text = text.split("\n", 1)[0]
    cut = text.find(source_label)
    if cut >= 0:
        text = text[:cut]
    text = text.strip()
    if not source_text.lstrip().startswith(tuple(_OPENING_QUOTES)):
        text = _strip_quotes(text)
    return text


def max_new_tokens(n_source_tokens: int, cap: int) -> int:
    """Generation budget for a sentence: twice its length plus 16 tokens, at most ``cap``.

    A translation is rarely more than twice as long as its source in tokens; the bound stops a
    degenerate repetition early instead of running to ``cap``.
    """
    return max(1, min(cap, 2 * n_source_tokens + 16))


@dataclass(frozen=True)
class LlmPair:
    """Source and target language keys of :data:`LANGUAGE_NAMES`."""

    source: str
    target: str


class _LanguageSet:
    """The languages an llm backend offers, and request validation against them."""

    def __init__(self, languages: tuple[str, ...]):
        unknown = [code for code in languages if code not in LANGUAGE_NAMES]
        if unknown:
            raise ValueError(
                f"--llm-languages: {', '.join(unknown)} has no few-shot examples in the prompt; "
                f"choose among {', '.join(LANGUAGE_NAMES)}"
            )
        self.languages = tuple(dict.fromkeys(languages))

    def pairs(self) -> list[tuple[str, str]]:
        ordered = sorted(self.languages)
        return [(s, t) for s in ordered for t in ordered if s != t]

    def resolve(self, source: str, target: str, model_name: str) -> LlmPair:
        src = parse_tag(source, "source_language").language
        tgt = parse_tag(target, "target_language").language
        for code, field, lang in ((source, "source_language", src), (target, "target_language", tgt)):
            if lang not in self.languages:
                raise InvalidArgument(
                    f"{field} {code!r} is not a language of {model_name}: it translates between "
                    f"{', '.join(sorted(self.languages))}"
                )
        if src == tgt:
            raise InvalidArgument(
                f"source_language and target_language are both {source!r}: nothing to translate"
            )
        return LlmPair(src, tgt)


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class EmbeddedLlamaBackend:
    """A GGUF model run in-process by llama-cpp-python.

    Args:
        instances: Loaded ``llama_cpp.Llama`` objects; each is used by one thread at a time.
        languages: Languages offered (keys of :data:`LANGUAGE_NAMES`).
        model_name: Reported in responses.
        max_tokens: Most tokens generated per sentence.
    """

    def __init__(self, instances: list[Any], languages: tuple[str, ...], model_name: str, max_tokens: int):
        if not instances:
            raise ValueError("at least one model instance is needed")
        self._instances = list(instances)
        self._free: queue.Queue[Any] = queue.Queue()
        for llama in instances:
            self._free.put(llama)
        self._languages = _LanguageSet(languages)
        self.model_name = model_name
        self.workers = len(instances)
        self._max_tokens = max_tokens

    @classmethod
    def from_config(cls, config: TranslateConfig) -> EmbeddedLlamaBackend:
        """Loads ``config.llm_instances`` copies of the GGUF model and warms each one.

        Raises:
            FileNotFoundError: The GGUF file or the bundled model's packages are missing.
            ValueError: A language without prompt examples; a corrupt bundled model.
        """
        from llama_cpp import Llama

        from services.common import models

        path = Path(config.llm_model_path) if config.llm_model_path else models.gemma3_270m_path()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model {path} does not exist")
        instances = max(1, config.llm_instances)
        threads = config.llm_threads or max(1, _cpu_count() // instances)
        llamas = [
            Llama(
                model_path=str(path),
                n_ctx=config.llm_context_tokens,
                n_threads=threads,
                n_threads_batch=threads,
                seed=0,
                verbose=False,
            )
            for _ in range(instances)
        ]
        backend = cls(llamas, config.llm_languages, config.model_name or path.stem, config.llm_max_tokens)
        backend.warmup()
        logger.info("llm: %s, %d instance(s) of %d threads", path.name, instances, threads)
        return backend

    def warmup(self) -> None:
        """Translates one sentence on every instance, so the first request does not pay for the first call."""
        languages = self._languages.languages
        if len(languages) < 2:
            return
        pair = LlmPair(languages[0], languages[1])
        for llama in self._instances:
            self._generate(llama, "Good morning.", pair)

    def pairs(self) -> list[tuple[str, str]]:
        """Every ordered pair of the configured languages."""
        return self._languages.pairs()

    def resolve(self, source: str, target: str) -> LlmPair:
        """Checks the pair; raises InvalidArgument for a language without prompt examples."""
        return self._languages.resolve(source, target, self.model_name)

    def _generate(self, llama: Any, sentence: str, pair: LlmPair) -> str:
        prompt = completion_prompt(sentence, pair.source, pair.target)
        n_source = len(llama.tokenize(sentence.encode("utf-8"), add_bos=False))
        out = llama.create_completion(
            prompt,
            max_tokens=max_new_tokens(n_source, self._max_tokens),
            temperature=0.0,
            repeat_penalty=1.0,
            stop=["\n"],
        )
        return clean_output(out["choices"][0]["text"], sentence, pair.source, pair.target, prompt)

    def _translate_on(self, llama: Any, sentences: list[str], pair: LlmPair, deadline: Deadline) -> list[str]:
        results: list[str] = []
        for sentence in sentences:
            if deadline.expired():
                raise DeadlineExceeded(
                    f"the caller's deadline passed after {len(results)} of {len(sentences)} sentences"
                )
            results.append(self._generate(llama, sentence, pair))
        return results

    def translate_sentences(self, sentences: list[str], pair: LlmPair, deadline: Deadline) -> list[str]:
        """Translates sentence by sentence on one checked-out instance.

        Raises:
            DeadlineExceeded: The caller's deadline passed between two sentences.
        """
        llama = self._free.get()
        try:
            return self._translate_on(llama, sentences, pair, deadline)
        finally:
            self._free.put(llama)

    def instance_fns(self, count: int = 0) -> list[Callable[[list[str], LlmPair, Deadline], list[str]]]:
        """One function per ``Llama`` instance, each bound to its own instance (never shared between threads).

        A batch runs sentence by sentence: the high-level llama-cpp-python API generates one sequence at a
        time, so a batch brings no speed-up here, only the instance group does.

        Raises:
            ValueError: ``count`` is neither 0 nor the number of loaded instances.
        """
        if count not in (0, len(self._instances)):
            raise ValueError(
                f"--instance-count {count}: {len(self._instances)} llama instance(s) are loaded; "
                "set --llm-instances instead"
            )
        return [functools.partial(self._translate_on, llama) for llama in self._instances]

    def close(self) -> None:
        """Frees every instance."""
        for llama in self._instances:
            llama.close()


class HttpChatBackend:
    """An OpenAI-compatible ``/chat/completions`` endpoint (vLLM, llama.cpp server).

    Args:
        base_url: Base URL up to and including ``/v1``.
        model: Model name sent in each request.
        api_key: Bearer token; empty for none.
        timeout_s: Timeout of one HTTP call, in seconds.
        languages: Languages offered (keys of :data:`LANGUAGE_NAMES`).
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
        self._languages = _LanguageSet(languages)
        self._max_tokens = max_tokens
        self.model_name = model_name or model
        self.workers = max(1, concurrency)
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

    def _translate_one(self, sentence: str, pair: LlmPair, deadline: Deadline) -> str:
        body = {
            "model": self._model,
            "messages": chat_messages(sentence, pair.source, pair.target),
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

    def translate_sentences(self, sentences: list[str], pair: LlmPair, deadline: Deadline) -> list[str]:
        """Sends every sentence as its own chat request, ``concurrency`` at a time.

        Raises:
            Unavailable, DeadlineExceeded, ResourceExhausted, ParleyError: See the module docstring; the
                first failing sentence decides.
        """
        futures = [self._executor.submit(self._translate_one, s, pair, deadline) for s in sentences]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def instance_fns(self, count: int = 0) -> list[Callable[[list[str], LlmPair, Deadline], list[str]]]:
        """:meth:`translate_sentences` ``count`` times (0: ``HTTP_INSTANCES``); it is thread-safe.

        Two instances let the next batch form and go out while one waits for the endpoint; the calls of
        both share the ``concurrency`` HTTP threads, and the endpoint batches what arrives.
        """
        return [self.translate_sentences] * (count or self.HTTP_INSTANCES)

    def close(self) -> None:
        """Stops the HTTP threads."""
        self._executor.shutdown(wait=True, cancel_futures=True)
