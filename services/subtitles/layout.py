"""Cue layout: line breaking, cutting an utterance's words into cues, and laying out its translation.

Layout of one utterance: its words (with Whisper's word timestamps) are cut into cues by dynamic
programming over the word boundaries. A cut is forced at pauses of ``pause_break_ms`` or more; a cue must fit
in 2 lines of 42 characters and last at most 7 s; among the cuts that fit, the cheapest favours sentence
ends and other punctuation, pauses, cuts before conjunctions and prepositions, reading speeds under 17 cps,
and avoids cuts after articles, pronouns and auxiliaries. A translation takes the timing of the source
speech: when it fits in as many cues as the source, cue i of the translation takes source cue i's times
(its words shared out in proportion to the source cues' lengths); when it needs more cues, the utterance's
time span is shared out in proportion to their lengths.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from services.subtitles.cues import Cue, LayoutRules, Word

# -- line breaking --------------------------------------------------------------------------------------

# Words a line should start with rather than end with (Netflix: break before conjunctions and prepositions).
_BREAK_BEFORE = frozenset(
    (
        "and but or nor so yet because although though while whereas if unless until when whenever where "
        "that which who whom whose than as after before since once "
        "of in on at to for from with without by about into onto over under between through during "
        "against among toward towards upon within across behind beyond around near "
        "et ou mais donc or ni car que qui quand lorsque puisque comme si parce quoique dont où "
        "de du des à au aux en dans sur sous pour par avec sans chez vers entre pendant depuis contre "
        "ve veya ama fakat çünkü ile için gibi kadar"
    ).split()
)
# Words a line must not end with (Netflix: never separate an article from its noun, a subject pronoun from
# its verb, an auxiliary or negation from its verb; a preposition stays with its object).
_NO_BREAK_AFTER = frozenset(
    (
        "a an the this that these those my your his her its our their some any no every each "
        "i you he she it we they i'm you're he's she's it's we're they're "
        "is are was were be been am has have had do does did will would shall should can could may might "
        "must not don't doesn't didn't won't can't isn't aren't wasn't weren't to very "
        "le la les l' un une des du au aux ce cet cette ces mon ma mes ton ta tes son sa ses notre nos "
        "votre vos leur leurs je tu il elle on nous vous ils elles ne n' j' c' s' qu' d' "
        "est sont était être avoir ai as a avons avez ont "
        "bir bu şu o"
    ).split()
)
_SENTENCE_END = re.compile(r"""[.!?\u2026]["'\u2019\u201d\u00bb)\]]*$""")
_CLAUSE_END = re.compile(r"""[,;:\u2014-]["'\u2019\u201d\u00bb)\]]*$""")


def _bare(word: str) -> str:
    return word.strip(".,;:!?\"'()[]\u00ab\u00bb\u201c\u201d\u2019\u2018\u2026-").lower()


def boundary_cost(before: str, after: str) -> float:
    """Cost of a break (a line break or a cue break) between two words; lower is better.

    Negative after sentence ends and punctuation and before conjunctions or prepositions, high after an
    article, a subject pronoun, an auxiliary, a negation or a preposition.
    """
    cost = 0.0
    if _SENTENCE_END.search(before):
        cost -= 30.0
    elif _CLAUSE_END.search(before):
        cost -= 18.0
    elif _bare(before) in _NO_BREAK_AFTER or before.endswith("'"):
        cost += 40.0
    elif _bare(before) in _BREAK_BEFORE:
        cost += 25.0  # a preposition or conjunction left dangling at the end of the line
    if _bare(after) in _BREAK_BEFORE and not _SENTENCE_END.search(before):
        cost -= 10.0
    return cost


def break_lines(text: str, rules: LayoutRules = LayoutRules()) -> list[str]:
    """Splits a cue's text into lines.

    One line when the text fits in ``max_line_chars``; otherwise two lines, broken at the word boundary
    that keeps both lines within the limit with the best :func:`boundary_cost` plus line-length imbalance.
    Text that cannot fit in two lines is wrapped greedily into as many lines as it needs (a violation the
    quality report shows; the layout never produces it except for a single over-long word).

    Args:
        text: The cue's text; white space is collapsed.
        rules: The line limits.

    Returns:
        The lines, none empty (an empty text gives no lines).
    """
    words = text.split()
    joined = " ".join(words)
    if len(joined) <= rules.max_line_chars:
        return [joined] if joined else []
    best: tuple[float, int] | None = None
    for i in range(1, len(words)):
        top, bottom = " ".join(words[:i]), " ".join(words[i:])
        if len(top) > rules.max_line_chars or len(bottom) > rules.max_line_chars:
            continue
        cost = abs(len(top) - len(bottom)) * 0.6 + boundary_cost(words[i - 1], words[i])
        if best is None or cost < best[0]:
            best = (cost, i)
    if best is not None and rules.max_lines >= 2:
        return [" ".join(words[: best[1]]), " ".join(words[best[1] :])]
    lines: list[str] = []
    for word in words:
        if lines and len(lines[-1]) + 1 + len(word) <= rules.max_line_chars:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def fits(text: str, rules: LayoutRules) -> bool:
    """Whether ``text`` can be shown in one cue within the line limits."""
    lines = break_lines(text, rules)
    return len(lines) <= rules.max_lines and all(len(line) <= rules.max_line_chars for line in lines)


# -- cue layout of the source -----------------------------------------------------------------------------


def _split_at_pauses(words: Sequence[Word], pause_ms: int) -> list[list[Word]]:
    blocks: list[list[Word]] = []
    for word in words:
        if blocks and word.start_ms - blocks[-1][-1].end_ms < pause_ms:
            blocks[-1].append(word)
        else:
            blocks.append([word])
    return blocks


def _partition(words: Sequence[Word], rules: LayoutRules) -> list[tuple[int, int]]:
    """Cheapest cut of ``words`` (one block, no long pause inside) into cues; returns [start, stop) pairs."""
    n = len(words)
    texts = [w.text.strip() for w in words]
    best = [math.inf] * (n + 1)
    back = [0] * (n + 1)
    best[0] = 0.0
    max_words = rules.max_cue_chars // 2 + 1
    for j in range(1, n + 1):
        length = -1
        for i in range(j - 1, max(-1, j - 1 - max_words), -1):
            length += len(texts[i]) + 1
            single = i == j - 1
            if length > rules.max_cue_chars and not single:
                break
            duration_ms = words[j - 1].end_ms - words[i].start_ms
            if duration_ms > rules.max_duration_ms and not single:
                break
            if best[i] == math.inf:
                continue
            if not single and not fits(" ".join(texts[i:j]), rules):
                continue
            shown_ms = max(duration_ms + rules.max_linger_ms // 2, rules.min_duration_ms)
            cps = length * 1000 / shown_ms
            cost = 10.0 + 4.0 * max(0.0, cps - rules.target_cps) ** 2
            if duration_ms < rules.min_duration_ms:
                cost += 15.0
            if length < 12 and n > 1:
                cost += 8.0
            if j < n:
                # Every cut costs at least 0 (after a sentence end), so cuts are made only where they pay.
                pause_ms = words[j].start_ms - words[j - 1].end_ms
                cost += 30.0 + boundary_cost(texts[j - 1], texts[j]) - min(max(pause_ms, 0), 500) / 25
            total = best[i] + cost
            if total < best[j]:
                best[j], back[j] = total, i
    cuts: list[tuple[int, int]] = []
    j = n
    while j > 0:
        cuts.append((back[j], j))
        j = back[j]
    return cuts[::-1]


def layout_words(words: Sequence[Word], utterance: int = 0, rules: LayoutRules = LayoutRules()) -> list[Cue]:
    """Lays out one utterance's words as cues (times not yet adjusted; see :func:`fix_timing`).

    Args:
        words: The words in time order, times in ms from the start of the media; empty words are skipped.
        utterance: Index stored in every cue.
        rules: Layout limits.

    Returns:
        Cues in time order, each starting at its first word and ending at its last word.
    """
    kept = [w for w in words if w.text.strip()]
    cues: list[Cue] = []
    for block in _split_at_pauses(kept, rules.pause_break_ms):
        for i, j in _partition(block, rules):
            group = block[i:j]
            text = " ".join(w.text.strip() for w in group)
            cues.append(
                Cue(
                    start_ms=group[0].start_ms,
                    end_ms=max(group[-1].end_ms, group[0].start_ms + 1),
                    lines=break_lines(text, rules),
                    utterance=utterance,
                    words=tuple(group),
                )
            )
    return cues


def words_from_text(text: str, start_ms: int, end_ms: int) -> list[Word]:
    """Words of a segment that has no word timestamps: its span shared out in proportion to word length."""
    tokens = text.split()
    if not tokens:
        return []
    total = sum(len(t) + 1 for t in tokens)
    span = max(end_ms - start_ms, 1)
    out, at = [], 0
    for token in tokens:
        begin = start_ms + span * at // total
        at += len(token) + 1
        out.append(Word(begin, start_ms + span * at // total, token))
    return out


# -- translated cues ---------------------------------------------------------------------------------------


def _share_words(
    words: list[str],
    shares: Sequence[float],
    rules: LayoutRules,
    durations_ms: Sequence[int] | None = None,
) -> list[list[str]] | None:
    """Cuts ``words`` into ``len(shares)`` non-empty pieces that each fit a cue, sized like ``shares``.

    With ``durations_ms`` (the display time of each piece), pieces read faster than the target reading
    speed cost more. Returns None when no cut fits.
    """
    k, n = len(shares), len(words)
    if n < k:
        return None
    total_chars = sum(len(w) + 1 for w in words)
    share_sum = sum(shares) or 1.0
    targets = [s / share_sum * total_chars for s in shares]
    prefix = [0]
    for w in words:
        prefix.append(prefix[-1] + len(w) + 1)
    inf = math.inf
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    back = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for piece in range(1, k + 1):
        for j in range(piece, n - (k - piece) + 1):
            for i in range(j - 1, piece - 2, -1):
                chars = prefix[j] - prefix[i] - 1
                if chars > rules.max_cue_chars and j - i > 1:
                    break
                if best[piece - 1][i] == inf:
                    continue
                if j - i > 1 and not fits(" ".join(words[i:j]), rules):
                    continue
                cost = ((chars + 1 - targets[piece - 1]) / 10) ** 2
                if durations_ms is not None:
                    shown_ms = max(durations_ms[piece - 1] + rules.max_linger_ms // 2, rules.min_duration_ms)
                    cost += 4.0 * max(0.0, chars * 1000 / shown_ms - rules.target_cps) ** 2
                if j < n:
                    cost += boundary_cost(words[j - 1], words[j])
                total = best[piece - 1][i] + cost
                if total < best[piece][j]:
                    best[piece][j], back[piece][j] = total, i
    if best[k][n] == inf:
        return None
    pieces, j = [], n
    for piece in range(k, 0, -1):
        i = back[piece][j]
        pieces.append(words[i:j])
        j = i
    return pieces[::-1]


def layout_translation(
    text: str, source_cues: Sequence[Cue], rules: LayoutRules = LayoutRules()
) -> list[Cue]:
    """Lays out one utterance's translation on the timing of its source cues.

    Args:
        text: The translation of the whole utterance.
        source_cues: The utterance's source cues, in time order (at least one).
        rules: Layout limits.

    Returns:
        The translated cues: as many as the source cues, with their times, when the translation fits them
        within the maximum reading speed; otherwise as many cues as needed (at least as many as the source)
        sharing the utterance's span in proportion to their length. Empty when ``text``
        is blank or there are no source cues.
    """
    words = text.split()
    if not words or not source_cues:
        return []
    utterance = source_cues[0].utterance
    pieces = _share_words(
        words, [max(len(c.text), 1) for c in source_cues], rules, [c.duration_ms for c in source_cues]
    )
    if pieces is not None and all(
        len(" ".join(p)) * 1000 <= rules.max_cps * (c.duration_ms + rules.max_linger_ms)
        for c, p in zip(source_cues, pieces, strict=True)
    ):
        return [
            Cue(c.start_ms, c.end_ms, break_lines(" ".join(p), rules), utterance)
            for c, p in zip(source_cues, pieces, strict=True)
        ]
    # Too long for the source cues' times (or for their number): the utterance's span is shared out in
    # proportion to length, so every cue of the utterance reads at the same speed.
    count = len(source_cues)
    while (pieces := _share_words(words, [1.0] * count, rules)) is None and count < len(words):
        count += 1
    if pieces is None:
        pieces = [[w] for w in words]
    start, end = source_cues[0].start_ms, source_cues[-1].end_ms
    total = sum(len(" ".join(p)) for p in pieces)
    cues, at = [], 0
    for piece in pieces:
        begin = start + (end - start) * at // total
        at += len(" ".join(piece))
        cues.append(
            Cue(begin, start + (end - start) * at // total, break_lines(" ".join(piece), rules), utterance)
        )
    return cues


def align_second_track(first: Sequence[Cue], second: Sequence[Cue]) -> list[Cue]:
    """One cue of ``second`` per cue of ``first``, for bilingual files.

    Each cue of ``second`` goes under the cue of ``first`` it overlaps most (the nearest when it overlaps
    none); the texts gathered under one cue are joined and broken into lines again.
    """
    texts: list[list[str]] = [[] for _ in first]
    for cue in second:
        if not first:
            break
        overlaps = [min(cue.end_ms, f.end_ms) - max(cue.start_ms, f.start_ms) for f in first]
        best = max(range(len(first)), key=lambda i: overlaps[i])
        if overlaps[best] <= 0:
            middle = (cue.start_ms + cue.end_ms) / 2
            best = min(
                range(len(first)), key=lambda i: abs((first[i].start_ms + first[i].end_ms) / 2 - middle)
            )
        texts[best].append(cue.text)
    return [
        Cue(f.start_ms, f.end_ms, break_lines(" ".join(t)), f.utterance)
        for f, t in zip(first, texts, strict=True)
    ]
