"""A plain-text table of quality reports, for the terminal."""

from __future__ import annotations

from collections.abc import Sequence

from services.subtitles.quality import QualityReport


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
