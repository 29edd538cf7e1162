"""The subtitle data: layout limits, recognised words and cues. Pure: no grpc, no model.

Characters are counted as the viewer reads them: the cue's lines joined by one space, punctuation and spaces
included. Times are integer milliseconds from the start of the media. Frame-based limits are rounded up to
whole milliseconds at 24 fps (2 frames = 84 ms, 5/6 s = 834 ms) so a file that passes here passes a
frame-accurate checker too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
