"""Text helpers shared by the stages: language tags, sentence splitting, repetition loops."""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence

# Terminal punctuation (Latin, CJK, Arabic, Devanagari), then any closing quotes or brackets, then a French
# closing guillemet after a (no-break) space.
_END = re.compile(
    r"""[.!?\u2026\u3002\uff01\uff1f\u061f\u0964]+["'\u2019\u201d\u00bb)\]]*(?:[ \u00a0\u202f]\u00bb)?"""
)
# Lower-cased words ending in a period that do not end a sentence (English, French, Turkish).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs e.g i.e cf fig approx dept inc ltd".split()
    + "mme mlle mm av bd p.ex cie sn bkz".split()
)


# The shape of a BCP-47 tag as the stages take it: a 2-3 letter language, then subtags joined by "-" or "_".
LANGUAGE_TAG = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{1,8})*$")


def primary_language(tag: str) -> str:
    """Primary subtag of a BCP-47 tag, lower case: "en-US" -> "en", "pt_BR" -> "pt"."""
    return tag.replace("_", "-").split("-")[0].lower()


def _is_abbreviation(before: str) -> bool:
    """Whether the word just before a period is an abbreviation or an initial ("J." in "J. Smith")."""
    word = before.rsplit(None, 1)[-1] if before.strip() else ""
    word = word.lstrip("\"'(\u201c\u00ab[").lower()
    if len(word) == 1 and word.isalpha():
        return True
    return word in _ABBREVIATIONS


def split_sentences(text: str) -> list[str]:
    """Splits text into sentences, for sentence-by-sentence synthesis or translation.

    A sentence ends at terminal punctuation (``. ! ? …`` and their CJK and Arabic forms, with any closing
    quotes or brackets after them) followed by white space or the end of the text, and at every line break.
    A period after a known abbreviation ("Dr.", "e.g.", "Mme.") or a single-letter initial does not end a
    sentence; a period inside a token ("3.14", "example.com") never does. CJK full stops end a sentence even
    without a following space. A closing guillemet after a space ("non. »") stays with its sentence; a
    piece with no letter or digit ("...") joins its neighbour.

    Args:
        text: Any text; may be empty.

    Returns:
        The sentences, stripped of surrounding white space, in order; none empty. Joining them with spaces
        gives back the text up to white space.
    """
    sentences: list[str] = []
    for line in text.splitlines():
        start = 0
        for match in _END.finditer(line):
            end = match.end()
            cjk = match.group()[0] in "\u3002\uff01\uff1f"
            if not cjk and end < len(line) and not line[end].isspace():
                continue
            if match.group() == "." and _is_abbreviation(line[start : match.start()]):
                continue
            _append(sentences, line[start:end].strip())
            start = end
        _append(sentences, line[start:].strip())
    return sentences


def _append(sentences: list[str], sentence: str) -> None:
    """Appends a sentence; a piece without a letter or digit ("...") is joined to its neighbour."""
    if not sentence:
        return
    if sentences and not (any(ch.isalnum() for ch in sentence) and any(ch.isalnum() for ch in sentences[-1])):
        sentences[-1] += " " + sentence
    else:
        sentences.append(sentence)


def tandem_repeats(
    keys: Sequence[Hashable | None], is_loop: Callable[[int, int], bool], max_unit: int | None = None
) -> list[tuple[int, int, int]]:
    """Runs in which a unit of keys is followed at once by copies of itself (a decoder's repetition loop).

    Scans left to right; at each position the shortest unit (at most ``max_unit`` keys) with
    ``is_loop(unit_length, copies)`` wins and the scan resumes after its run. A unit of ``None`` keys only
    (punctuation, say) never loops.

    Args:
        keys: Comparable keys (normalised words); ``None`` for one that carries no text.
        is_loop: Whether ``copies`` (>= 2) consecutive occurrences of a unit of ``unit_length`` keys are a
            loop.
        max_unit: Longest unit; ``None`` for half of what remains.

    Returns:
        (start, unit_length, copies) per run, in order, not overlapping.
    """
    runs = []
    i = 0
    while i < len(keys):
        step = 1
        longest = (len(keys) - i) // 2  # a unit and at least one copy fit in what remains
        if max_unit is not None:
            longest = min(longest, max_unit)
        for n in range(1, longest + 1):
            unit = keys[i : i + n]
            if all(key is None for key in unit):
                continue
            copies = 1
            while keys[i + copies * n : i + (copies + 1) * n] == unit:
                copies += 1
            if copies > 1 and is_loop(n, copies):
                runs.append((i, n, copies))
                step = copies * n
                break
        i += step
    return runs
