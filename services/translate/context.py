"""Translation context: the text just before a request's texts, and its translation.

A live caller translating clause by clause sends the previous clauses and their translations with each
request (``TranslateRequest.context``), so that the translation reads as one text. The llm backends use
the pair as the last example of their few-shot prompt (:mod:`services.translate.prompts`); CTranslate2
ignores it. :func:`bound_context` keeps a prompt's size bounded whatever the caller sends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Most characters kept of each side of a context.
MAX_CONTEXT_CHARS = 300


@dataclass(frozen=True)
class TranslationContext:
    """Text that came just before a request's texts, and its translation.

    Attributes:
        source_text: In the source language; one line, non-empty.
        translated_text: Its translation; one line, non-empty.
    """

    source_text: str
    translated_text: str


# A backend call's contexts: one per sentence, None for a sentence without one.
SentenceContexts = Sequence[TranslationContext | None]
# In-flight batching: more(n) returns up to n more (sentence, its context) to translate with a running batch.
MoreSentences = Callable[[int], list[tuple[str, TranslationContext | None]]]
# In-flight batching: finished(i, translation) answers sentence i (the batch's, then those joined) early.
FinishedSentence = Callable[[int, str], None]


def tail(text: str, max_chars: int) -> str:
    """The end of ``text``, at most ``max_chars`` characters, starting at a word.

    White space runs (line breaks included) become one space. A text longer than ``max_chars`` is cut after
    the first white space of its last ``max_chars`` characters, so no word is cut in two; a tail without
    white space is kept whole.
    """
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    end = text[-max_chars:]
    if text[-max_chars - 1] != " ":
        space = end.find(" ")
        if space >= 0:
            end = end[space + 1 :]
    return end


def bound_context(
    source_text: str, translated_text: str, max_chars: int = MAX_CONTEXT_CHARS
) -> TranslationContext | None:
    """A request's context, each side cut to its last ``max_chars`` characters by :func:`tail`.

    Returns:
        None when either side is blank (a pair with one side missing would teach the model to drop or
        invent text).
    """
    source, translated = tail(source_text, max_chars), tail(translated_text, max_chars)
    if not source or not translated:
        return None
    return TranslationContext(source, translated)
