"""Cue timing: in- and out-times adjusted to the duration, reading-speed and gap rules."""

from __future__ import annotations

import math
from collections.abc import Sequence

from services.subtitles.cues import Cue, LayoutRules
from services.subtitles.layout import break_lines, fits


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
