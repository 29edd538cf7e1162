"""The translation engine: request limits, sentence splitting and rejoining, over one backend.

A backend (:mod:`services.translate.ct2`, :mod:`services.translate.llama` or
:mod:`services.translate.http_chat`) translates a flat list of sentences for one language pair.
:class:`TranslationEngine` turns a request's texts into that list and back:

* every text is split into lines, and each line into sentences (:func:`services.common.text.split_sentences`);
  a sentence longer than ``max_sentence_chars`` is cut at white space into pieces no longer than that;
* all sentences of all texts go to the backend in ONE call (CTranslate2 batches them itself), or, on a
  server, each sentence becomes one :class:`SentenceItem` for the dynamic batcher
  (:mod:`services.common.batching`), so that the sentences of concurrent requests for the same language
  pair share one model batch (:meth:`TranslationEngine.batch_fns`, :meth:`TranslationEngine.join`);
* translations are joined back: sentences with a space (no space for Chinese, Japanese and Thai
  targets), lines with a line break. An empty or blank text comes back empty and never reaches the model.

A request may carry a :class:`~services.translate.context.TranslationContext`: the text just before its
texts in the same document, and its translation. It is cut to the last 300 characters of each side, at a
word boundary (:func:`~services.translate.context.bound_context`), and goes with every sentence of the
request to the backend: the llm backends continue it (it is their prompt's last example), CTranslate2
ignores it. It travels with each batcher item, so requests with different contexts still share a batch.

Nothing here imports grpc; errors are :mod:`services.common.errors` exceptions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from services.common.deadlines import Deadline
from services.common.errors import InvalidArgument, ParleyError
from services.common.text import primary_language, split_sentences
from services.translate.config import Backend, LlmTransport, TranslateConfig
from services.translate.context import SentenceContexts, TranslationContext, bound_context

logger = logging.getLogger(__name__)

# Targets written without spaces between sentences.
_NO_SPACE_TARGETS = frozenset({"zh", "ja", "th", "lo", "km", "my"})


# A backend's batch function: sentences, pair handle, deadline, contexts (see translate_sentences), and
# with in_flight_batching two more: a MoreSentences it calls between decoding steps and a FinishedSentence
# it calls as each sentence is done.
TranslateFn = Callable[..., list[str]]


class TranslationBackend(Protocol):
    """A model that translates sentences. Implementations: CTranslate2, llm (embedded or HTTP).

    Attributes:
        model_name: Reported in responses.
        workers: Calls of :meth:`translate_sentences` that may run at once (threads to give it).
        in_flight_batching: Its instance functions take two more arguments, a
            :data:`~services.translate.context.MoreSentences` called between decoding steps (sentences
            queued meanwhile join the running batch) and a
            :data:`~services.translate.context.FinishedSentence` called as each sentence is done (the
            embedded llm).
    """

    model_name: str
    workers: int
    in_flight_batching: bool

    def pairs(self) -> list[tuple[str, str]]:
        """Every (source, target) BCP-47 pair the loaded model translates, sorted."""
        ...

    def resolve(self, source: str, target: str) -> Any:
        """The backend's handle for a pair (its language tokens); raises InvalidArgument if unsupported."""
        ...

    def translate_sentences(
        self, sentences: list[str], pair: Any, deadline: Deadline, contexts: SentenceContexts | None = None
    ) -> list[str]:
        """Translates non-empty sentences (blocking); returns one translation per sentence, in order.

        Args:
            sentences: Non-empty sentences of one language pair.
            pair: From :meth:`resolve`.
            deadline: The caller's; past it the backend raises DeadlineExceeded.
            contexts: Per sentence, the text before it and its translation (bounded), or None; None for no
                context at all. The llm backends continue it; CTranslate2 ignores it.
        """
        ...

    def instance_fns(self, count: int = 0) -> list[TranslateFn]:
        """One ``translate_sentences``-like function per model instance, for a dynamic batcher.

        Each function is called from one thread only; the list's length is the batcher's instance count.

        Args:
            count: Instances wanted; 0 for the backend's own number.

        Raises:
            ValueError: The backend cannot run ``count`` instances.
        """
        ...

    def close(self) -> None:
        """Releases the model."""
        ...


@dataclass(frozen=True)
class SentenceItem:
    """One sentence queued for the dynamic batcher.

    Attributes:
        text: A non-empty sentence.
        pair: The backend's handle for the language pair (hashable: the batch key).
        deadline: The caller's deadline.
        context: The request's context (bounded), or None.
    """

    text: str
    pair: Any
    deadline: Deadline
    context: TranslationContext | None = None


def batch_key(item: SentenceItem) -> Any:
    """The batcher's key: sentences of different language pairs never share a batch.

    Contexts are not part of the key: each item carries its own to the backend.
    """
    return item.pair


def _latest(deadlines: list[Deadline]) -> Deadline:
    """The latest of several deadlines (no deadline wins), so no item is cut short before its own."""
    if any(d.at_s is None for d in deadlines):
        return Deadline(None)
    return max(deadlines, key=lambda d: d.at_s or 0.0)


@dataclass(frozen=True)
class Job:
    """A validated request, ready for :meth:`TranslationEngine.run`.

    Attributes:
        layout: Per text, per line, the number of sentences it was split into.
        sentences: All non-empty sentences, flat, in order.
        pair: The backend's handle for the language pair.
        target: Target language as requested (BCP-47).
        context: The request's context, bounded by :func:`bound_context`; None without one.
    """

    layout: list[list[int]]
    sentences: list[str]
    pair: Any
    target: str
    context: TranslationContext | None = None


def cut_long(sentence: str, max_chars: int) -> list[str]:
    """Cuts a sentence into pieces of at most ``max_chars`` characters, at white space where possible.

    Args:
        sentence: Stripped, non-empty text.
        max_chars: Longest piece, at least 1.

    Returns:
        Stripped non-empty pieces whose space-joined text is ``sentence`` up to white space.
    """
    pieces = []
    rest = sentence
    while len(rest) > max_chars:
        cut = rest.rfind(" ", 0, max_chars + 1)
        if cut <= 0:
            cut = max_chars
        pieces.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        pieces.append(rest)
    return [p for p in pieces if p]


class TranslationEngine:
    """Validates requests and translates them with a backend.

    Args:
        backend: The loaded model.
        max_texts: Most texts per request.
        max_chars: Most characters per request, all texts together.
        max_sentence_chars: Longest sentence handed to the model, in characters.
    """

    def __init__(self, backend: TranslationBackend, max_texts: int, max_chars: int, max_sentence_chars: int):
        self.backend = backend
        self.max_texts = max_texts
        self.max_chars = max_chars
        self.max_sentence_chars = max(1, max_sentence_chars)

    @property
    def model_name(self) -> str:
        """Name of the loaded model."""
        return self.backend.model_name

    def pairs(self) -> list[tuple[str, str]]:
        """Every (source, target) BCP-47 pair the loaded model translates."""
        return self.backend.pairs()

    def prepare(
        self, texts: list[str], source: str, target: str, context: TranslationContext | None = None
    ) -> Job:
        """Checks a request and splits it into sentences; cheap, no model call.

        Args:
            texts: Texts to translate; empty strings allowed.
            source: Source language, BCP-47.
            target: Target language, BCP-47.
            context: The text just before ``texts`` and its translation, as the caller sent them; cut to the
                last 300 characters of each side at a word boundary, dropped when a side is blank.

        Raises:
            InvalidArgument: No texts, too many texts or characters, a bad or unsupported language code,
                source equal to target, or an unsupported pair.
        """
        if not texts:
            raise InvalidArgument("texts is empty: send at least one text to translate")
        if len(texts) > self.max_texts:
            raise InvalidArgument(
                f"{len(texts)} texts is more than the {self.max_texts} this server accepts per request: "
                "split the request"
            )
        total = sum(len(t) for t in texts)
        if total > self.max_chars:
            raise InvalidArgument(
                f"the texts hold {total} characters, more than the {self.max_chars} this server accepts per "
                "request: split the request"
            )
        pair = self.backend.resolve(source, target)
        layout: list[list[int]] = []
        sentences: list[str] = []
        for text in texts:
            lines = []
            for line in text.split("\n"):
                pieces = [p for s in split_sentences(line) for p in cut_long(s, self.max_sentence_chars)]
                lines.append(len(pieces))
                sentences += pieces
            layout.append(lines)
        bounded = bound_context(context.source_text, context.translated_text) if context else None
        return Job(layout, sentences, pair, target, bounded)

    def run(self, job: Job, deadline: Deadline | None = None) -> list[str]:
        """Translates a prepared request (blocking: call it on an inference thread).

        Args:
            job: From :meth:`prepare`.
            deadline: The caller's deadline; the backend stops early and raises DeadlineExceeded past it.

        Returns:
            One translation per text, in order; "" for an empty or blank text.

        Raises:
            ParleyError: From the backend (UNAVAILABLE, DEADLINE_EXCEEDED, ...).
        """
        translated: list[str] = []
        if job.sentences:
            translated = self.backend.translate_sentences(
                job.sentences, job.pair, deadline or Deadline(None), [job.context] * len(job.sentences)
            )
        return self.join(job, translated)

    def items(self, job: Job, deadline: Deadline) -> list[SentenceItem]:
        """The batcher items of a prepared request: one per sentence, in order."""
        return [SentenceItem(text, job.pair, deadline, job.context) for text in job.sentences]

    def batch_fns(self, count: int = 0) -> list[Callable[..., list[str]]]:
        """One batch function per model instance: sentences of one language pair in, translations out.

        Args:
            count: Instances wanted; 0 for the backend's own number (see ``instance_fns``).

        Raises:
            ValueError: The backend cannot run ``count`` instances.

        Every item of a batch has the same pair (:func:`batch_key`); the batch goes to the backend in one
        call, under the latest of its items' deadlines, each sentence with its own request's context. Each
        function also takes the batcher's ``join`` (in-flight batching, when the backend's
        ``in_flight_batching``): sentences it takes join the running batch and extend its deadline, and
        ``done``, which answers each sentence as soon as it is translated.
        """

        def bind(fn: TranslateFn) -> Callable[..., list[str]]:
            def translate_batch(
                items: list[SentenceItem],
                join: Callable[[int], list[SentenceItem]] | None = None,
                done: Callable[[int, str], None] | None = None,
            ) -> list[str]:
                pair = items[0].pair
                if any(item.pair != pair for item in items):
                    raise ParleyError("a translation batch mixed language pairs")
                texts, contexts = [item.text for item in items], [item.context for item in items]
                latest = _latest([item.deadline for item in items])
                if join is None:
                    return fn(texts, pair, latest, contexts)
                deadline = Deadline(latest.at_s, latest.clock)  # extended by the sentences that join

                def more(limit: int) -> list[tuple[str, TranslationContext | None]]:
                    joined = join(limit)
                    for item in joined:
                        deadline.extend_to(item.deadline)
                    return [(item.text, item.context) for item in joined]

                return fn(texts, pair, deadline, contexts, more, done)

            return translate_batch

        return [bind(fn) for fn in self.backend.instance_fns(count)]

    def join(self, job: Job, translated: list[str]) -> list[str]:
        """Joins sentence translations back into one translation per text.

        Args:
            job: From :meth:`prepare`.
            translated: One translation per ``job.sentences`` item, in order.

        Returns:
            One translation per text, in order; "" for an empty or blank text.

        Raises:
            ParleyError: ``translated`` does not hold one translation per sentence.
        """
        if len(translated) != len(job.sentences):
            raise ParleyError(
                f"backend returned {len(translated)} translations for {len(job.sentences)} sentences"
            )
        joiner = "" if primary_language(job.target) in _NO_SPACE_TARGETS else " "
        results = []
        position = 0
        for lines in job.layout:
            out_lines = []
            for count in lines:
                out_lines.append(
                    joiner.join(t.strip() for t in translated[position : position + count]).strip()
                )
                position += count
            results.append("\n".join(out_lines).strip())
        return results

    def translate(
        self,
        texts: list[str],
        source: str,
        target: str,
        deadline: Deadline | None = None,
        context: TranslationContext | None = None,
    ) -> list[str]:
        """:meth:`prepare` then :meth:`run` (blocking)."""
        return self.run(self.prepare(texts, source, target, context), deadline)

    def close(self) -> None:
        """Releases the backend."""
        self.backend.close()


def load_backend(config: TranslateConfig) -> TranslationBackend:
    """Loads the configured backend; heavy libraries are imported only in the branch that needs them.

    Raises:
        ValueError: A configuration that cannot work (missing model path, unknown language, ...).
        FileNotFoundError: The model is missing.
    """
    if config.backend is Backend.CTRANSLATE2:
        from services.translate.ct2 import CTranslate2Backend

        return CTranslate2Backend.from_config(config)
    if config.llm_transport is LlmTransport.HTTP:
        from services.translate.http_chat import HttpChatBackend

        return HttpChatBackend.from_config(config)
    from services.translate.llama import EmbeddedLlamaBackend

    return EmbeddedLlamaBackend.from_config(config)


def load_engine(config: TranslateConfig) -> TranslationEngine:
    """Loads the backend and wraps it with the configured request limits."""
    backend = load_backend(config)
    logger.info("translate: %s loaded, %d language pairs", backend.model_name, len(backend.pairs()))
    return TranslationEngine(backend, config.max_texts, config.max_chars, config.max_sentence_chars)
