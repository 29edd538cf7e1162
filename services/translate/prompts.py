"""The llm backends' prompt: language names, few-shot examples, prompts, output cleaning, budgets.

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

A request's :class:`~services.translate.context.TranslationContext` (the text just before it and its
translation, bounded by :func:`~services.translate.context.bound_context`) is one more example after the
three: an ``English: <context source>`` line and a ``French: <context translation>`` line before the
sentence in the completion form, one more user/assistant turn in the chat form. The model continues the
context, and the fixed part (:func:`few_shot_prefix`) stays the same for every sentence of a language pair,
so the embedded backend still evaluates it once and each sentence evaluates only its context and itself.

Decoding is greedy (temperature 0) and each sentence is its own prompt, so a translation never depends on
the text of the other sentences of a request or batch. (Embedded, the sentences of a batch share forward
passes, whose arithmetic rounds differently from a sentence's pass alone, so where the model hesitates
between two tokens a batched translation may differ from the same sentence translated alone; its test
bounds the chrF loss at 5 points, see ``tests/integration/test_translate_llm.py``.) The output is cleaned by
:func:`clean_output`: an echoed prompt is removed, then a leading ``French:`` or ``Translation:`` label,
only the first line is kept, anything from the next source label (``English:``) on is cut, and quotes
around the whole translation are removed unless the source sentence itself was quoted.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import InvalidArgument
from services.translate.context import TranslationContext
from services.translate.languages import parse_tag

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


def few_shot_prefix(source: str, target: str) -> str:
    """The part of :func:`completion_prompt` before the sentence: instruction and examples.

    It is the same for every sentence of a language pair, so the embedded backend evaluates it once.
    """
    src, tgt = LANGUAGE_NAMES[source], LANGUAGE_NAMES[target]
    parts = [f"Translate {src} to {tgt}.\n\n"]
    for example_src, example_tgt in zip(EXAMPLES[source], EXAMPLES[target], strict=True):
        parts.append(f"{src}: {example_src}\n{tgt}: {example_tgt}\n\n")
    return "".join(parts)


def completion_prompt(text: str, source: str, target: str, context: TranslationContext | None = None) -> str:
    """The completion-form prompt for one sentence (see the module docstring).

    Args:
        text: One sentence.
        source: Source language, ISO 639-1 key of :data:`LANGUAGE_NAMES`.
        target: Target language, same form.
        context: The text before the sentence and its translation, the last example; None for none.
    """
    src, tgt = LANGUAGE_NAMES[source], LANGUAGE_NAMES[target]
    shown = f"{src}: {context.source_text}\n{tgt}: {context.translated_text}\n\n" if context else ""
    return f"{few_shot_prefix(source, target)}{shown}{src}: {text}\n{tgt}:"


def chat_messages(
    text: str, source: str, target: str, context: TranslationContext | None = None
) -> list[dict[str, str]]:
    """The chat-form prompt for one sentence: system instruction, example turns, the sentence.

    Args:
        text: One sentence.
        source: Source language, key of :data:`LANGUAGE_NAMES`.
        target: Target language, same form.
        context: The text before the sentence and its translation, one more example turn; None for none.
    """
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
    if context:
        messages += [
            {"role": "user", "content": context.source_text},
            {"role": "assistant", "content": context.translated_text},
        ]
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


class LanguageSet:
    """The languages an llm backend offers, and request validation against them.

    Args:
        languages: Keys of :data:`LANGUAGE_NAMES`; duplicates are dropped.

    Raises:
        ValueError: A language without few-shot examples.
    """

    def __init__(self, languages: tuple[str, ...]):
        unknown = [code for code in languages if code not in LANGUAGE_NAMES]
        if unknown:
            raise ValueError(
                f"--llm-languages: {', '.join(unknown)} has no few-shot examples in the prompt; "
                f"choose among {', '.join(LANGUAGE_NAMES)}"
            )
        self.languages = tuple(dict.fromkeys(languages))

    def pairs(self) -> list[tuple[str, str]]:
        """Every ordered pair of two different languages, sorted."""
        ordered = sorted(self.languages)
        return [(s, t) for s in ordered for t in ordered if s != t]

    def resolve(self, source: str, target: str, model_name: str) -> LlmPair:
        """The pair of two BCP-47 tags (only the primary language counts).

        Raises:
            InvalidArgument: A malformed tag, a language not offered (the message names ``model_name``), or
                source equal to target.
        """
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
