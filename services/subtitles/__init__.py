"""Subtitles: cue layout, timing, SRT and WebVTT files, and the quality report. Pure: no grpc, no model.

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

Modules: :mod:`.cues` (the data and the limits), :mod:`.layout` (line breaks, cues of an utterance and of
its translation), :mod:`.timing` (in- and out-times), :mod:`.formats` (SRT and WebVTT, by pysubs2),
:mod:`.quality` (the report) and :mod:`.table` (the report as a terminal table). The names below are the
package's public API.
"""

from services.subtitles.cues import FRAME_RATE_FPS, Cue, LayoutRules, Word
from services.subtitles.formats import to_srt, to_vtt
from services.subtitles.layout import (
    align_second_track,
    boundary_cost,
    break_lines,
    fits,
    layout_translation,
    layout_words,
    words_from_text,
)
from services.subtitles.quality import (
    HIGH_NO_SPEECH,
    LENGTH_RATIO_RANGE,
    LOW_LOGPROB,
    LOW_WORD_PROBABILITY,
    VIOLATIONS,
    CueReport,
    QualityReport,
    SegmentScore,
    cut_tandem_repeats,
    quality_report,
    repeated_ngrams,
    violations,
)
from services.subtitles.table import summary_table
from services.subtitles.timing import fix_timing

__all__ = [
    "FRAME_RATE_FPS",
    "HIGH_NO_SPEECH",
    "LENGTH_RATIO_RANGE",
    "LOW_LOGPROB",
    "LOW_WORD_PROBABILITY",
    "VIOLATIONS",
    "Cue",
    "CueReport",
    "LayoutRules",
    "QualityReport",
    "SegmentScore",
    "Word",
    "align_second_track",
    "boundary_cost",
    "break_lines",
    "cut_tandem_repeats",
    "fits",
    "fix_timing",
    "layout_translation",
    "layout_words",
    "quality_report",
    "repeated_ngrams",
    "summary_table",
    "to_srt",
    "to_vtt",
    "violations",
    "words_from_text",
]
