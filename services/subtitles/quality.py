"""The subtitle quality report: rule violations, repetition loops, recogniser confidence, length ratios."""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from services.common.text import tandem_repeats
from services.subtitles.cues import Cue, LayoutRules


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


def _length_ratios(cues: Sequence[Cue], source_texts: dict[int, str]) -> dict[int, float]:
    """Characters of each utterance's translation over characters of its source, by utterance index."""
    target_texts: dict[int, list[str]] = {}
    for cue in cues:
        target_texts.setdefault(cue.utterance, []).append(cue.text)
    ratios: dict[int, float] = {}
    for utterance, source in source_texts.items():
        target = " ".join(target_texts.get(utterance, []))
        if source.strip():
            ratios[utterance] = len(target) / len(source)
    return ratios


def _cue_report(
    index: int,
    cue: Cue,
    broken: list[str],
    segments: Sequence[SegmentScore],
    repeated: list[str],
    length_ratio: float | None,
) -> CueReport:
    """Figures of one cue: ``broken`` rules, ``repeated`` loops, the confidence of what it shows."""
    near = _overlapping(segments, cue)
    avg_logprob = min((s.avg_logprob for s in near), default=None)
    no_speech = max((s.no_speech_prob for s in near), default=None)
    mean_word = sum(w.probability for w in cue.words) / len(cue.words) if cue.words else None
    low = (
        (avg_logprob is not None and avg_logprob < LOW_LOGPROB)
        or (no_speech is not None and no_speech > HIGH_NO_SPEECH)
        or (mean_word is not None and mean_word < LOW_WORD_PROBABILITY)
    )
    return CueReport(
        index=index,
        start_ms=cue.start_ms,
        end_ms=cue.end_ms,
        text=cue.text,
        lines=len(cue.lines),
        max_line_chars=max((len(line) for line in cue.lines), default=0),
        cps=cue.cps(),
        violations=broken,
        repeated=repeated,
        avg_logprob=avg_logprob,
        no_speech_prob=no_speech,
        min_word_probability=min((w.probability for w in cue.words), default=None),
        low_confidence=bool(low),
        length_ratio=length_ratio,
    )


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
    ratios = _length_ratios(cues, source_texts) if source_texts is not None else {}
    previous: Cue | None = None
    for index, cue in enumerate(cues, start=1):
        broken = violations(cue, previous, rules)
        for name in broken:
            counts[name] += 1
        repeated = repeated_ngrams(cue.text) + (loops or {}).get(cue.utterance, [])
        reports.append(_cue_report(index, cue, broken, segments, repeated, ratios.get(cue.utterance)))
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
