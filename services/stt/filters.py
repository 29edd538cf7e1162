"""Hallucination filter for Whisper segments.

Pure functions over plain data: no model, no grpc.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

_NON_WORD = re.compile(r"[^\w]+|_")


def normalize_text(text: str) -> str:
    """Lower case, accents and punctuation removed, whitespace collapsed.

    "Sous-titres réalisés par la communauté d'Amara.org" ->
    "sous titres realises par la communaute d amara org".
    """
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(_NON_WORD.sub(" ", stripped).split())


class ScoredSegment(Protocol):
    """What the filter reads from a segment."""

    @property
    def text(self) -> str: ...  # noqa: D102 - the segment's text
    @property
    def avg_logprob(self) -> float: ...  # noqa: D102 - mean natural-log token probability
    @property
    def no_speech_prob(self) -> float: ...  # noqa: D102 - no-speech probability in [0, 1]
    @property
    def compression_ratio(self) -> float: ...  # noqa: D102 - gzip compression ratio of the text


S = TypeVar("S", bound=ScoredSegment)


@dataclass(frozen=True)
class HallucinationGates:
    """Thresholds of the hallucination filter.

    Attributes:
        no_speech_threshold: A segment is dropped when its no-speech probability is above this AND its mean
            token log probability is below ``log_prob_threshold`` (Radford et al. 2022, section 4.5).
        log_prob_threshold: Natural-log mean token probability of the no-speech gate.
        compression_ratio_threshold: A segment whose gzip compression ratio is above this is dropped
            (Whisper's repetition-loop test).
        phrases: Known hallucinated phrases. A segment is dropped when, after :func:`normalize_text`, the
            phrases it contains (as whole words) cover at least half of its words: "Thanks for watching!"
            is dropped, "thanks for watching over the children all summer long" is kept.
    """

    no_speech_threshold: float = 0.6
    log_prob_threshold: float = -1.0
    compression_ratio_threshold: float = 2.4
    phrases: tuple[str, ...] = ()

    def drop_reason(self, segment: ScoredSegment) -> str | None:
        """Why ``segment`` is a hallucination ("no_speech", "compression_ratio", "phrase"), or None."""
        if (
            segment.no_speech_prob > self.no_speech_threshold
            and segment.avg_logprob < self.log_prob_threshold
        ):
            return "no_speech"
        if segment.compression_ratio > self.compression_ratio_threshold:
            return "compression_ratio"
        if self._phrase_share(segment.text) >= 0.5:
            return "phrase"
        return None

    def _phrase_share(self, text: str) -> float:
        words = normalize_text(text).split()
        if not words:
            return 0.0
        covered = [False] * len(words)
        for phrase in self.phrases:
            target = normalize_text(phrase).split()
            if not target:
                continue
            for start in range(len(words) - len(target) + 1):
                if words[start : start + len(target)] == target:
                    covered[start : start + len(target)] = [True] * len(target)
        return sum(covered) / len(words)


def split_hallucinations(segments: Sequence[S], gates: HallucinationGates) -> tuple[list[S], list[S]]:
    """Splits segments into (kept, dropped), each in the original order.

    Segments with no text after normalisation are dropped too (nothing to show, nothing to translate).
    """
    kept: list[S] = []
    dropped: list[S] = []
    for segment in segments:
        if not normalize_text(segment.text) or gates.drop_reason(segment) is not None:
            dropped.append(segment)
        else:
            kept.append(segment)
    return kept, dropped
