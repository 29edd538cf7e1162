"""Subtitle cue layout, SRT and WebVTT writing, and the subtitle quality report. Pure: no grpc, no model.

Rules followed: the Netflix Timed Text Style Guide (partnerhelp.netflixstudios.com):

- General Requirements: minimum duration 5/6 s per event (20 frames at 24 fps), maximum 7 s; a gap of at
  least 2 frames between events; 2 lines at most, text kept on one line unless it exceeds the limit;
  lines broken after punctuation, before conjunctions and before prepositions, never between an article
  and its noun, a subject pronoun and its verb, a verb and its auxiliary or negation.
- English Template guide: 42 characters per line; reading speed 17 characters per second for adult
  programmes (the layout's target). The English (USA) guide allows up to 20 characters per second for adult
  programmes: that is the hard limit the quality report checks.
- Timing to audio: a cue starts with its first word; its out-time may run up to 12 frames (0.5 s) past the
  end of speech to approach the 17 cps target, and further only into silence to reach the minimum duration
  or to keep within 20 cps (a translation longer than its speech: a human subtitler would condense it).

Characters are counted as the viewer reads them: the cue's lines joined by one space, punctuation and spaces
included. Times are integer milliseconds from the start of the media. Frame-based limits are rounded up to
whole milliseconds at 24 fps (2 frames = 84 ms, 5/6 s = 834 ms) so a file that passes here passes a
frame-accurate checker too.

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
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.common.text import tandem_repeats

FRAME_RATE_FPS = 24.0


@dataclass(frozen=True)
class LayoutRules:
    """Limits of the layout, from the Netflix Timed Text Style Guide (see the module docstring).

    Attributes:
        max_line_chars: Characters per line.
        max_lines: Lines per cue.
        target_cps: Reading speed the layout aims for, in characters per second.
        max_cps: Reading speed above which a cue is a violation, in characters per second.
        min_duration_ms: Shortest cue, in ms (5/6 s rounded up).
        max_duration_ms: Longest cue, in ms.
        gap_ms: Shortest gap between two cues, in ms (2 frames at 24 fps rounded up).
        max_linger_ms: How far a cue may stay on screen past the end of its speech to lower its reading
            speed, in ms (12 frames at 24 fps).
        pause_break_ms: A pause this long between two words always ends a cue, in ms.
    """

    max_line_chars: int = 42
    max_lines: int = 2
    target_cps: float = 17.0
    max_cps: float = 20.0
    min_duration_ms: int = math.ceil(1000 * 5 / 6)
    max_duration_ms: int = 7000
    gap_ms: int = math.ceil(1000 * 2 / FRAME_RATE_FPS)
    max_linger_ms: int = math.ceil(1000 * 12 / FRAME_RATE_FPS)
    pause_break_ms: int = 700

    @property
    def max_cue_chars(self) -> int:
        """Most characters a cue can hold (lines joined by a space)."""
        return self.max_lines * self.max_line_chars + self.max_lines - 1


@dataclass(frozen=True)
class Word:
    """One recognised word with its time span, in ms from the start of the media."""

    start_ms: int
    end_ms: int
    text: str
    probability: float = 1.0


@dataclass(frozen=True)
class SegmentScore:
    """Decoder scores of one STT segment (or of one segment its hallucination filter dropped).

    Attributes:
        start_ms: Start, in ms from the start of the media.
        end_ms: End, in ms from the start of the media.
        text: Its text.
        avg_logprob: Mean natural-log probability of its tokens (<= 0).
        no_speech_prob: Probability that its window held no speech, in [0, 1].
        compression_ratio: gzip compression ratio of its text (high: repetition loop).
    """

    start_ms: int
    end_ms: int
    text: str
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    compression_ratio: float = 1.0


@dataclass
class Cue:
    """One subtitle event.

    Attributes:
        start_ms: In-time, in ms from the start of the media.
        end_ms: Out-time, in ms from the start of the media.
        lines: The text as displayed, one string per line.
        utterance: Index of the utterance (the stretch of speech) it comes from.
        words: The recognised words it shows (source cues only).
    """

    start_ms: int
    end_ms: int
    lines: list[str]
    utterance: int = 0
    words: tuple[Word, ...] = ()

    @property
    def text(self) -> str:
        """The lines joined by a space: what the reading speed counts."""
        return " ".join(self.lines)

    @property
    def duration_ms(self) -> int:
        """Display time, in ms."""
        return self.end_ms - self.start_ms

    def cps(self) -> float:
        """Reading speed, in characters per second (infinite for an empty duration)."""
        if self.duration_ms <= 0:
            return math.inf
        return len(self.text) * 1000 / self.duration_ms


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


# -- timing ------------------------------------------------------------------------------------------------


def fix_timing(
    cues: Sequence[Cue], rules: LayoutRules = LayoutRules(), media_end_ms: int | None = None
) -> list[Cue]:
    """Adjusts in- and out-times to the duration, reading-speed and gap rules.

    In order: cues are sorted by in-time; each out-time is extended towards the minimum duration and the
    maximum reading speed (as far as the next cue allows: both are hard limits, so they override the
    12-frame linger) and towards the target reading speed (by at most ``max_linger_ms`` past its
    speech); it is cut back to leave ``gap_ms`` before the next cue and to ``max_duration_ms``; a cue still
    shorter than the minimum then starts earlier, into the gap before it. Runs of back-to-back cues in which
    a cue is still too short or too fast are then re-timed as a whole (see :func:`_balance_runs`), and a
    cue still too short borrows from a neighbour or merges with it.

    Args:
        cues: Cues with their speech times.
        rules: Layout limits.
        media_end_ms: End of the media; no out-time goes past it.

    Returns:
        New cues in time order, none overlapping.
    """
    ordered = sorted(
        (Cue(c.start_ms, c.end_ms, list(c.lines), c.utterance, c.words) for c in cues),
        key=lambda c: c.start_ms,
    )
    for k, cue in enumerate(ordered):
        chars = len(cue.text)
        want_end = max(
            cue.end_ms,
            cue.start_ms + rules.min_duration_ms,
            min(cue.start_ms + math.ceil(chars * 1000 / rules.target_cps), cue.end_ms + rules.max_linger_ms),
            cue.start_ms + math.ceil(chars * 1000 / rules.max_cps),
        )
        limit = cue.start_ms + rules.max_duration_ms
        if k + 1 < len(ordered):
            limit = min(limit, ordered[k + 1].start_ms - rules.gap_ms)
        if media_end_ms is not None:
            limit = min(limit, media_end_ms)
        cue.end_ms = max(min(want_end, limit), cue.start_ms + 1)
        if cue.duration_ms < rules.min_duration_ms:
            floor = ordered[k - 1].end_ms + rules.gap_ms if k else 0
            cue.start_ms = max(min(cue.start_ms, cue.end_ms - rules.min_duration_ms), floor)
    return _fix_short(_balance_runs(ordered, rules, media_end_ms), rules, media_end_ms)


def _needed_ms(cue: Cue, rules: LayoutRules) -> int:
    """Display time a cue needs for its minimum duration and maximum reading speed."""
    return max(rules.min_duration_ms, math.ceil(len(cue.text) * 1000 / rules.max_cps))


def _spare_ms(cue: Cue, rules: LayoutRules) -> int:
    """Display time a cue can give up and still keep its minimum duration and maximum reading speed."""
    return max(0, cue.duration_ms - _needed_ms(cue, rules))


def _balance_runs(cues: list[Cue], rules: LayoutRules, media_end_ms: int | None) -> list[Cue]:
    """Re-times runs of back-to-back cues (continuous speech) in which a cue is too short or too fast.

    The run keeps its span, extended into the silence after it (then up to 1 s into the silence before it)
    when the text needs more time. Every cue
    gets the time it needs (minimum duration, maximum reading speed) and the rest is shared out in
    proportion to what each cue had beyond its need, so cues move as little as possible. When even the
    extended span is too short for the text, time is shared in proportion to need, which keeps the fastest
    cue as slow as it can be.
    """
    start = 0
    while start < len(cues):
        stop = start + 1
        while stop < len(cues) and cues[stop].start_ms - cues[stop - 1].end_ms <= rules.gap_ms + 20:
            stop += 1
        run = cues[start:stop]
        if len(run) > 1 and any(c.duration_ms < _needed_ms(c, rules) for c in run):
            span = run[-1].end_ms - run[0].start_ms - rules.gap_ms * (len(run) - 1)
            needed = [_needed_ms(c, rules) for c in run]
            # Too little time for the text: the run may run on into the silence after it.
            room = (cues[stop].start_ms - rules.gap_ms if stop < len(cues) else media_end_ms) or run[
                -1
            ].end_ms
            span += max(0, min(sum(needed) - span, room - run[-1].end_ms))
            # Still too little: it may also start up to 1 s early, into the silence before it.
            floor = cues[start - 1].end_ms + rules.gap_ms if start else 0
            early = max(0, min(sum(needed) - span, run[0].start_ms - floor, 1000))
            run[0].start_ms -= early
            span += early
            if sum(needed) <= span:
                extra = [max(c.duration_ms - n, 0) for c, n in zip(run, needed, strict=True)]
                weights = extra if sum(extra) else [len(c.text) for c in run]
                slack = span - sum(needed)
                durations = [n + slack * w / sum(weights) for n, w in zip(needed, weights, strict=True)]
            else:
                durations = [span * n / sum(needed) for n in needed]
            at = float(run[0].start_ms)
            for cue, duration in zip(run, durations, strict=True):
                cue.start_ms = round(at)
                at += duration
                cue.end_ms = round(at)
                at += rules.gap_ms
        start = stop
    return cues


def _fix_short(cues: list[Cue], rules: LayoutRules, media_end_ms: int | None) -> list[Cue]:
    """Gives cues still under the minimum duration time from a neighbour, or merges them into one.

    A short cue borrows from a neighbour with time to spare (the previous cue ends earlier, or the next starts
    later); failing that, it merges with a neighbour when the joined text fits in one cue.
    """
    k = 0
    while k < len(cues):
        cue = cues[k]
        short = rules.min_duration_ms - cue.duration_ms
        if short > 0 and k > 0:
            take = min(short, _spare_ms(cues[k - 1], rules))
            cues[k - 1].end_ms -= take
            cue.start_ms = max(cues[k - 1].end_ms + rules.gap_ms, cue.start_ms - take)
            short = rules.min_duration_ms - cue.duration_ms
        if short > 0 and k + 1 < len(cues):
            take = min(short, _spare_ms(cues[k + 1], rules))
            cues[k + 1].start_ms += take
            cue.end_ms = min(cues[k + 1].start_ms - rules.gap_ms, cue.end_ms + take)
            short = rules.min_duration_ms - cue.duration_ms
        if short > 0:
            for other in (k - 1, k + 1):
                if not 0 <= other < len(cues):
                    continue
                first, second = sorted((k, other))
                a, b = cues[first], cues[second]
                text = f"{a.text} {b.text}"
                if fits(text, rules) and b.end_ms - a.start_ms <= rules.max_duration_ms:
                    cues[first : second + 1] = [
                        Cue(a.start_ms, b.end_ms, break_lines(text, rules), a.utterance, a.words + b.words)
                    ]
                    k = max(first - 1, 0)
                    break
            else:
                k += 1
            continue
        k += 1
    if media_end_ms is not None:
        for cue in cues:
            cue.end_ms = min(cue.end_ms, media_end_ms)
    return cues


# -- writers -----------------------------------------------------------------------------------------------


def _timestamp(ms: int, separator: str) -> str:
    ms = max(0, int(ms))
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}{separator}{millis:03d}"


def _numbered_blocks(
    cues: Sequence[Cue], second: Sequence[Cue] | None, separator: str, escape: Callable[[str], str]
) -> list[str]:
    """The cue blocks SRT and WebVTT share: number, ``start --> end``, the lines (``second``'s under them)."""
    pairs = list(zip(cues, second, strict=True)) if second is not None else [(c, None) for c in cues]
    blocks: list[str] = []
    for cue, extra in pairs:
        lines = [line for c in (cue, extra) if c is not None for line in c.lines if line.strip()]
        if not lines:
            continue
        stamp = f"{_timestamp(cue.start_ms, separator)} --> {_timestamp(cue.end_ms, separator)}"
        blocks.append("\n".join([str(len(blocks) + 1), stamp, *(escape(line) for line in lines)]) + "\n")
    return blocks


def to_srt(cues: Sequence[Cue], second: Sequence[Cue] | None = None) -> str:
    """SubRip text: numbered cues, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, the lines, a blank line.

    Args:
        cues: Cues in time order; cues without text are left out.
        second: For bilingual files, one cue per cue of ``cues`` whose lines go under them.
    """
    return "\n".join(_numbered_blocks(cues, second, ",", lambda line: line))


def _vtt_escape(line: str) -> str:
    return line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_vtt(cues: Sequence[Cue], second: Sequence[Cue] | None = None) -> str:
    """WebVTT text (W3C WebVTT): the ``WEBVTT`` header, then cues ``HH:MM:SS.mmm --> HH:MM:SS.mmm``.

    ``&``, ``<`` and ``>`` in the text are escaped as the format requires.

    Args:
        cues: Cues in time order; cues without text are left out.
        second: For bilingual files, one cue per cue of ``cues`` whose lines go under them.
    """
    return "\n".join(["WEBVTT\n", *_numbered_blocks(cues, second, ".", _vtt_escape)])


# -- quality report -----------------------------------------------------------------------------------------

LOW_LOGPROB = -1.0
HIGH_NO_SPEECH = 0.6
LOW_WORD_PROBABILITY = 0.5
LENGTH_RATIO_RANGE = (0.5, 2.0)
VIOLATIONS = (
    "line_length",
    "line_count",
    "reading_speed",
    "min_duration",
    "max_duration",
    "overlap",
    "gap",
    "empty",
)


def violations(cue: Cue, previous: Cue | None, rules: LayoutRules = LayoutRules()) -> list[str]:
    """Names of the rules ``cue`` breaks (see :data:`VIOLATIONS`), given the cue shown before it."""
    found = []
    if any(len(line) > rules.max_line_chars for line in cue.lines):
        found.append("line_length")
    if len(cue.lines) > rules.max_lines:
        found.append("line_count")
    if not cue.text.strip():
        found.append("empty")
    elif cue.cps() > rules.max_cps + 1e-9:
        found.append("reading_speed")
    if cue.duration_ms < rules.min_duration_ms:
        found.append("min_duration")
    if cue.duration_ms > rules.max_duration_ms:
        found.append("max_duration")
    if previous is not None:
        if cue.start_ms < previous.end_ms:
            found.append("overlap")
        elif cue.start_ms - previous.end_ms < rules.gap_ms:
            found.append("gap")
    return found


def _tokens(text: str) -> list[str]:
    decomposed = unicodedata.normalize("NFKC", text.casefold())
    return re.findall(r"\w+", decomposed)


def cut_tandem_repeats(text: str, max_n: int = 8, min_repeats: int = 3) -> tuple[str, list[str]]:
    """Cuts repetition loops: a run of words repeated ``min_repeats`` times or more in a row is kept once.

    "on the words on the words on the words" -> "on the words". Natural text almost never says the same
    phrase three times in a row; a decoder stuck in a loop does (Whisper and small translation models).

    Returns:
        The text with each loop cut to one occurrence, and the loops found (lower-cased phrases).
    """
    words = text.split()
    keys = [" ".join(_tokens(w)) or None for w in words]
    out: list[str] = []
    loops: list[str] = []
    done = 0
    for start, n, copies in tandem_repeats(keys, lambda _, copies: copies >= min_repeats, max_n):
        # The last occurrence's final word keeps the punctuation that follows the loop.
        out += [*words[done:start], *words[start : start + n - 1], words[start + copies * n - 1]]
        loops.append(" ".join(k for k in keys[start : start + n] if k))
        done = start + copies * n
    return " ".join(out + words[done:]), loops


def repeated_ngrams(text: str, max_n: int = 4, min_count: int = 3, min_run: int = 4) -> list[str]:
    """Repetition loops in ``text`` (Whisper's and a translation model's typical failure).

    Returns:
        The n-grams (2 <= n <= ``max_n`` words, lower-cased) found ``min_count`` times or more, longest
        first, each once (an n-gram inside a longer reported one is left out); plus any single word repeated
        ``min_run`` times or more in a row.
    """
    tokens = _tokens(text)
    found: list[str] = []
    for n in range(max_n, 1, -1):
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        for gram, count in counts.items():
            phrase = " ".join(gram)
            if len(set(gram)) == 1:
                continue  # one word over and over: reported once, as a run, below
            if count >= min_count and not any(phrase in longer for longer in found):
                found.append(phrase)
    run = 1
    for prev, cur in zip(tokens, tokens[1:], strict=False):
        run = run + 1 if cur == prev else 1
        if run == min_run and not any(cur in longer.split() for longer in found):
            found.append(cur)
    return found


@dataclass
class CueReport:
    """Quality figures of one cue."""

    index: int
    start_ms: int
    end_ms: int
    text: str
    lines: int
    max_line_chars: int
    cps: float
    violations: list[str]
    repeated: list[str] = field(default_factory=list)
    avg_logprob: float | None = None
    no_speech_prob: float | None = None
    min_word_probability: float | None = None
    low_confidence: bool = False
    length_ratio: float | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        doc = dict(self.__dict__)
        doc["cps"] = round(self.cps, 2) if math.isfinite(self.cps) else None
        for key in ("avg_logprob", "no_speech_prob", "min_word_probability", "length_ratio"):
            if doc[key] is not None:
                doc[key] = round(doc[key], 3)
        return doc


@dataclass
class QualityReport:
    """Quality of one subtitle track (source or translation) of a file.

    Attributes:
        language: Language of the track.
        cues: Per-cue figures, in time order.
        violation_counts: Cues breaking each rule (every rule listed, zeros included).
        repetition_cues: Cues with a repetition loop.
        low_confidence_cues: Cues whose speech the recogniser was unsure of.
        dropped_segments: Segments the STT hallucination filter removed (source track only).
        length_ratio: Characters of the translation over characters of the source (translation track).
        length_ratio_outliers: Utterances whose ratio is outside :data:`LENGTH_RATIO_RANGE` (a translation
            that lost or invented content).
        max_cps: Highest reading speed of any cue, in characters per second.
    """

    language: str
    cues: list[CueReport]
    violation_counts: dict[str, int]
    repetition_cues: int
    low_confidence_cues: int
    dropped_segments: list[SegmentScore] = field(default_factory=list)
    length_ratio: float | None = None
    length_ratio_outliers: int = 0
    max_cps: float = 0.0

    @property
    def violation_total(self) -> int:
        """Cue-rule violations over all rules."""
        return sum(self.violation_counts.values())

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "language": self.language,
            "cue_count": len(self.cues),
            "violations": self.violation_counts,
            "violation_total": self.violation_total,
            "repetition_cues": self.repetition_cues,
            "low_confidence_cues": self.low_confidence_cues,
            "hallucinations_dropped": len(self.dropped_segments),
            "dropped_segments": [s.__dict__ for s in self.dropped_segments],
            "length_ratio": None if self.length_ratio is None else round(self.length_ratio, 3),
            "length_ratio_outliers": self.length_ratio_outliers,
            "max_cps": round(self.max_cps, 2),
            "cues": [c.to_json() for c in self.cues],
        }


def _overlapping(segments: Sequence[SegmentScore], cue: Cue) -> list[SegmentScore]:
    return [s for s in segments if s.start_ms < cue.end_ms and s.end_ms > cue.start_ms]


def quality_report(
    cues: Sequence[Cue],
    language: str,
    *,
    rules: LayoutRules = LayoutRules(),
    segments: Sequence[SegmentScore] = (),
    dropped: Sequence[SegmentScore] = (),
    source_texts: dict[int, str] | None = None,
    loops: dict[int, list[str]] | None = None,
) -> QualityReport:
    """Checks a track against the layout rules and flags doubtful text.

    Args:
        cues: The track's cues, in time order.
        language: Its language.
        rules: Limits to check.
        segments: STT segments kept (source track): confidence of the cues they overlap.
        dropped: STT segments its hallucination filter removed.
        source_texts: For a translation track, the source text of each utterance (by index): the length
            ratio of each utterance's translation.
        loops: Repetition loops already cut from each utterance's text (by index; see
            :func:`cut_tandem_repeats`): reported on every cue of the utterance.

    Returns:
        The report.
    """
    reports: list[CueReport] = []
    counts = dict.fromkeys(VIOLATIONS, 0)
    ratios: dict[int, float] = {}
    if source_texts is not None:
        target_texts: dict[int, list[str]] = {}
        for cue in cues:
            target_texts.setdefault(cue.utterance, []).append(cue.text)
        for utterance, source in source_texts.items():
            target = " ".join(target_texts.get(utterance, []))
            if source.strip():
                ratios[utterance] = len(target) / len(source)
    previous: Cue | None = None
    for index, cue in enumerate(cues, start=1):
        broken = violations(cue, previous, rules)
        for name in broken:
            counts[name] += 1
        near = _overlapping(segments, cue)
        avg_logprob = min((s.avg_logprob for s in near), default=None)
        no_speech = max((s.no_speech_prob for s in near), default=None)
        word_probability = min((w.probability for w in cue.words), default=None)
        mean_word = sum(w.probability for w in cue.words) / len(cue.words) if cue.words else None
        low = (
            (avg_logprob is not None and avg_logprob < LOW_LOGPROB)
            or (no_speech is not None and no_speech > HIGH_NO_SPEECH)
            or (mean_word is not None and mean_word < LOW_WORD_PROBABILITY)
        )
        reports.append(
            CueReport(
                index=index,
                start_ms=cue.start_ms,
                end_ms=cue.end_ms,
                text=cue.text,
                lines=len(cue.lines),
                max_line_chars=max((len(line) for line in cue.lines), default=0),
                cps=cue.cps(),
                violations=broken,
                repeated=repeated_ngrams(cue.text) + (loops or {}).get(cue.utterance, []),
                avg_logprob=avg_logprob,
                no_speech_prob=no_speech,
                min_word_probability=word_probability,
                low_confidence=bool(low),
                length_ratio=ratios.get(cue.utterance),
            )
        )
        previous = cue
    total_source = sum(len(t) for t in (source_texts or {}).values() if t.strip())
    total_target = sum(len(c.text) for c in cues)
    low_ratio, high_ratio = LENGTH_RATIO_RANGE
    return QualityReport(
        language=language,
        cues=reports,
        violation_counts=counts,
        repetition_cues=sum(1 for r in reports if r.repeated),
        low_confidence_cues=sum(1 for r in reports if r.low_confidence),
        dropped_segments=list(dropped),
        length_ratio=total_target / total_source if source_texts is not None and total_source else None,
        length_ratio_outliers=sum(1 for r in ratios.values() if not low_ratio <= r <= high_ratio),
        max_cps=max((r.cps for r in reports if math.isfinite(r.cps)), default=0.0),
    )


def summary_table(reports: Sequence[QualityReport]) -> str:
    """A short plain-text table of one or more tracks' reports, for the terminal."""
    rows = [
        ("cues", lambda r: str(len(r.cues))),
        ("rule violations", lambda r: str(r.violation_total)),
        (
            "  line > 42 chars / > 2 lines",
            lambda r: f"{r.violation_counts['line_length']} / {r.violation_counts['line_count']}",
        ),
        ("  reading speed > 20 cps", lambda r: str(r.violation_counts["reading_speed"])),
        (
            "  shorter than 5/6 s / over 7 s",
            lambda r: f"{r.violation_counts['min_duration']} / {r.violation_counts['max_duration']}",
        ),
        (
            "  overlap / gap < 2 frames",
            lambda r: f"{r.violation_counts['overlap']} / {r.violation_counts['gap']}",
        ),
        ("max reading speed (cps)", lambda r: f"{r.max_cps:.1f}"),
        ("repetition loops (cues)", lambda r: str(r.repetition_cues)),
        ("low-confidence cues", lambda r: str(r.low_confidence_cues)),
        ("hallucination-filter hits", lambda r: str(len(r.dropped_segments))),
        (
            "length ratio target/source",
            lambda r: (
                "-"
                if r.length_ratio is None
                else f"{r.length_ratio:.2f} ({r.length_ratio_outliers} outliers)"
            ),
        ),
    ]
    headers = ["", *(r.language or "?" for r in reports)]
    table = [headers] + [[name, *(fn(r) for r in reports)] for name, fn in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
        for row in table
    )


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
