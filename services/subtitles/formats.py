r"""SRT and WebVTT files of a track, written by pysubs2; a bilingual file puts a second track under the first.

pysubs2 writes the numbering, the ``HH:MM:SS,mmm`` (SRT) and ``HH:MM:SS.mmm`` (WebVTT) timestamps and the
``WEBVTT`` header. Lines go to it as SubStation text joined by ``\N`` and are written with
``keep_ssa_tags=True``, so text in braces is kept as written rather than read as an override tag.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pysubs2

from services.subtitles.cues import Cue


def _events(
    cues: Sequence[Cue], second: Sequence[Cue] | None, escape: Callable[[str], str]
) -> pysubs2.SSAFile:
    """One event per cue with text, its lines (``second``'s under them) escaped by ``escape``."""
    pairs = list(zip(cues, second, strict=True)) if second is not None else [(c, None) for c in cues]
    track = pysubs2.SSAFile()
    for cue, extra in pairs:
        lines = [line for c in (cue, extra) if c is not None for line in c.lines if line.strip()]
        if lines:
            text = r"\N".join(escape(line) for line in lines)
            track.append(pysubs2.SSAEvent(start=cue.start_ms, end=cue.end_ms, text=text))
    return track


def to_srt(cues: Sequence[Cue], second: Sequence[Cue] | None = None) -> str:
    """SubRip text: numbered cues, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, the lines, a blank line.

    Args:
        cues: Cues in time order; cues without text are left out.
        second: For bilingual files, one cue per cue of ``cues`` whose lines go under them.
    """
    return _events(cues, second, lambda line: line).to_string("srt", keep_ssa_tags=True)


def _vtt_escape(line: str) -> str:
    return line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_vtt(cues: Sequence[Cue], second: Sequence[Cue] | None = None) -> str:
    """WebVTT text (W3C WebVTT): the ``WEBVTT`` header, then cues ``HH:MM:SS.mmm --> HH:MM:SS.mmm``.

    ``&``, ``<`` and ``>`` in the text are escaped as the format requires.

    Args:
        cues: Cues in time order; cues without text are left out.
        second: For bilingual files, one cue per cue of ``cues`` whose lines go under them.
    """
    return _events(cues, second, _vtt_escape).to_string("vtt", keep_ssa_tags=True)
