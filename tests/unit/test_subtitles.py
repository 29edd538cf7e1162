"""Cue layout rules, SRT/WebVTT output parsed back with `srt` and `webvtt-py`, and the quality report."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest

from services import subtitles as subs
from services.gateway.file_job import make_chunks, merge_windows
from services.subtitles import layout

srt = pytest.importorskip("srt", reason="srt is in the dev extra")
webvtt = pytest.importorskip("webvtt", reason="webvtt-py is in the dev extra")

RULES = subs.LayoutRules()
TEXT = (
    "Printing, in the only sense with which we are at present concerned, differs from most if not from all "
    "the arts and crafts represented in the Exhibition. And so my fellow Americans, ask not what your "
    "country can do for you, ask what you can do for your country."
)


def speak(text: str, start_ms: int = 500, ms_per_char: int = 60, gap_ms: int = 40) -> list[subs.Word]:
    """Synthetic word timestamps: each word lasts 60 ms per character plus 80 ms."""
    words, t = [], start_ms
    for token in text.split():
        duration = ms_per_char * len(token) + 80
        words.append(subs.Word(t, t + duration, token))
        t += duration + gap_ms
    return words


def assert_rules(cues: list[subs.Cue], rules: subs.LayoutRules = RULES) -> None:
    previous = None
    for cue in cues:
        assert subs.violations(cue, previous, rules) == [], (cue, previous)
        previous = cue


def test_layout_keeps_every_rule_and_every_word():
    words = speak(TEXT)
    cues = subs.fix_timing(subs.layout_words(words))
    assert_rules(cues)
    assert " ".join(c.text for c in cues) == " ".join(TEXT.split())
    assert all(len(line) <= 42 for c in cues for line in c.lines)
    assert all(1 <= len(c.lines) <= 2 for c in cues)
    # A cue starts with its first word (timing to audio) and never leaves it before it is spoken.
    for cue in cues:
        assert cue.start_ms == cue.words[0].start_ms
        assert cue.end_ms >= cue.words[-1].end_ms or cue.end_ms + RULES.gap_ms <= cues[-1].end_ms


def test_cues_break_at_sentence_ends_and_punctuation():
    cues = subs.fix_timing(subs.layout_words(speak(TEXT)))
    ends = [c.text[-1] for c in cues]
    # Every cue ends at punctuation here: the text offers a comma or a period within reach of every limit.
    assert set(ends) <= set(".,"), [c.text for c in cues]
    assert any(c.text.endswith("Exhibition.") for c in cues)


def test_one_line_when_it_fits_two_balanced_lines_otherwise():
    assert subs.break_lines("ask what you can do for your country.") == [
        "ask what you can do for your country."
    ]
    lines = subs.break_lines("And so my fellow Americans, ask not what your country can do for you,")
    assert lines == ["And so my fellow Americans,", "ask not what your country can do for you,"]
    # Before a preposition rather than after an article: "the / arts" is never chosen.
    lines = subs.break_lines("differs from most if not from all the arts and crafts represented")
    assert len(lines) == 2 and not lines[0].endswith(" the")
    assert all(len(line) <= 42 for line in lines)


def test_never_breaks_after_an_article_or_pronoun():
    for text in (
        "We have been waiting for a very long time at the station for the train",
        "Nous avons attendu le train pendant une heure à la gare de Lyon hier",
    ):
        top, bottom = subs.break_lines(text)
        assert layout._bare(top.split()[-1]) not in layout._NO_BREAK_AFTER, (top, bottom)


def test_long_utterance_is_split_at_word_timestamps_within_max_duration():
    words = speak(" ".join(["alpha beta gamma delta"] * 12), ms_per_char=90)
    cues = subs.fix_timing(subs.layout_words(words))
    assert len(cues) > 3
    assert max(c.duration_ms for c in cues) <= RULES.max_duration_ms
    for a, b in zip(cues, cues[1:], strict=False):
        assert b.start_ms - a.end_ms >= RULES.gap_ms
        # Each cut falls between two words: the next cue starts exactly at a word's start time.
        assert b.start_ms in {w.start_ms for w in words}


def test_long_pause_always_ends_a_cue():
    first = speak("Good morning.", start_ms=0)
    second = speak("Hello.", start_ms=first[-1].end_ms + 900)
    cues = subs.layout_words(first + second)
    assert [c.text for c in cues] == ["Good morning.", "Hello."]


def test_short_cue_gets_minimum_duration_and_gap_is_kept():
    words = [subs.Word(1000, 1200, "Yes."), subs.Word(1300, 1500, "No.")]
    raw = [subs.Cue(1000, 1200, ["Yes."]), subs.Cue(1300, 1500, ["No."])]
    cues = subs.fix_timing(raw, RULES)
    assert cues[0].duration_ms >= RULES.min_duration_ms or cues[1].start_ms - cues[0].end_ms >= RULES.gap_ms
    assert cues[1].duration_ms >= RULES.min_duration_ms
    assert cues[1].start_ms - cues[0].end_ms >= RULES.gap_ms
    assert words  # the words themselves are untouched by timing


def test_fix_timing_removes_overlaps_and_respects_media_end():
    raw = [subs.Cue(0, 3000, ["one"]), subs.Cue(2000, 4000, ["two"]), subs.Cue(3900, 5000, ["three"])]
    cues = subs.fix_timing(raw, RULES, media_end_ms=4800)
    for a, b in zip(cues, cues[1:], strict=False):
        assert a.end_ms + RULES.gap_ms <= b.start_ms
    assert cues[-1].end_ms <= 4800


def test_reading_speed_extension_is_bounded_by_the_next_cue():
    # 50 characters spoken in 1.5 s (33 cps).
    text = "This sentence is exactly fifty characters in size."
    assert len(text) == 50
    cue = subs.Cue(0, 1500, subs.break_lines(text))
    # With time free after it, it stays until it reads at 20 cps, past the 12-frame linger.
    alone = subs.fix_timing([cue], RULES)[0]
    assert alone.end_ms == 2500 and subs.violations(alone, None) == []
    # Back to back with a slow cue, the slow cue gives up its first 484 ms.
    fixed = subs.fix_timing([cue, subs.Cue(2100, 4000, ["Next."])], RULES)
    assert [(c.start_ms, c.end_ms) for c in fixed] == [(0, 2500), (2584, 4000)]
    assert_rules(fixed)
    # Back to back with a cue that has no time to spare, the run ends at 24 cps: a violation, reported.
    squeezed = subs.fix_timing([cue, subs.Cue(1584, 3084, subs.break_lines(text))], RULES)
    assert [subs.violations(c, None) for c in squeezed] == [["reading_speed"]] * 2
    assert squeezed[0].cps() == pytest.approx(squeezed[1].cps(), rel=0.01)
    slow = subs.fix_timing([subs.Cue(0, 2000, ["Short and slow."])], RULES)[0]
    assert slow.cps() <= RULES.target_cps + 0.1


def test_translation_takes_the_source_timing():
    source = subs.fix_timing(subs.layout_words(speak(TEXT)))
    translation = (
        "L'impression, au seul sens qui nous intéresse actuellement, diffère de la plupart sinon de tous les "
        "arts et métiers représentés à l'exposition. Et donc, mes chers compatriotes américains, ne demandez "
        "pas ce que votre pays peut faire pour vous, demandez ce que vous pouvez faire pour votre pays."
    )
    target = subs.layout_translation(translation, source)
    assert [(c.start_ms, c.end_ms) for c in target] == [(c.start_ms, c.end_ms) for c in source]
    assert " ".join(c.text for c in target) == " ".join(translation.split())
    assert all(len(line) <= 42 and len(c.lines) <= 2 for c in target for line in c.lines)


def test_longer_translation_is_redistributed_within_the_utterance():
    source = [subs.Cue(1000, 2500, ["Hi there."], utterance=3)]
    long = "Bonjour à vous tous et à toutes, mesdames et messieurs, chers amis et chères amies de la musique."
    target = subs.layout_translation(long, source)
    assert len(target) >= 2
    assert target[0].start_ms == 1000 and target[-1].end_ms == 2500
    assert all(c.utterance == 3 for c in target)
    for a, b in zip(target, target[1:], strict=False):
        assert a.end_ms <= b.start_ms
    # Duration in proportion to length.
    shares = [c.duration_ms / len(c.text) for c in target]
    assert max(shares) - min(shares) < 2.0


def test_srt_parses_back_with_srt_library():
    cues = subs.fix_timing(subs.layout_words(speak(TEXT)))
    parsed = list(srt.parse(subs.to_srt(cues)))
    assert len(parsed) == len(cues)
    for number, (got, cue) in enumerate(zip(parsed, cues, strict=True), start=1):
        assert got.index == number
        assert got.start == timedelta(milliseconds=cue.start_ms)
        assert got.end == timedelta(milliseconds=cue.end_ms)
        assert got.content.split("\n") == cue.lines


def test_bilingual_srt_puts_the_translation_under_the_source():
    source = [subs.Cue(0, 2000, ["Hello."]), subs.Cue(2100, 4000, ["Good night."])]
    target = [subs.Cue(0, 2000, ["Bonjour."]), subs.Cue(2100, 4000, ["Bonne nuit."])]
    parsed = list(srt.parse(subs.to_srt(source, subs.align_second_track(source, target))))
    assert [p.content for p in parsed] == ["Hello.\nBonjour.", "Good night.\nBonne nuit."]


def test_vtt_parses_back_with_webvtt_and_escapes_markup():
    cues = [subs.Cue(0, 1500, ["Fish & chips <3"]), subs.Cue(3_723_004, 3_725_000, ["one", "two"])]
    text = subs.to_vtt(cues)
    assert text.startswith("WEBVTT\n")
    parsed = webvtt.from_buffer(io.StringIO(text))
    assert [c.start for c in parsed] == ["00:00:00.000", "01:02:03.004"]
    assert [c.end for c in parsed] == ["00:00:01.500", "01:02:05.000"]
    assert "&amp;" in text and "&lt;3" in text
    assert parsed[1].text == "one\ntwo"


def test_empty_track_writes_valid_empty_files():
    assert list(srt.parse(subs.to_srt([]))) == []
    assert list(webvtt.from_buffer(io.StringIO(subs.to_vtt([])))) == []


def test_repetition_loops_are_found():
    assert subs.repeated_ngrams("thank you thank you thank you so much") == ["thank you"]
    assert subs.repeated_ngrams("no no no no") == ["no"]
    assert subs.repeated_ngrams("ask not what your country can do for you, ask what you can do") == []


def test_quality_report_figures():
    source = [
        subs.Cue(
            0,
            2000,
            ["Hello there."],
            0,
            (subs.Word(0, 900, "Hello", 0.9), subs.Word(900, 2000, "there.", 0.2)),
        ),
        subs.Cue(2010, 2500, ["the the the the the the the the the the the the the the"], 1),
        subs.Cue(4000, 12000, ["a" * 50], 2),
    ]
    segments = [
        subs.SegmentScore(0, 2000, "Hello there.", -1.4, 0.1),
        subs.SegmentScore(4000, 12000, "a", -0.2, 0.7),
    ]
    dropped = [subs.SegmentScore(13000, 14000, "Thanks for watching!", -1.2, 0.9, 1.1)]
    report = subs.quality_report(source, "en", segments=segments, dropped=dropped)
    assert report.violation_counts["line_length"] == 2  # 54- and 50-character lines
    assert report.violation_counts["min_duration"] == 1
    assert report.violation_counts["max_duration"] == 1
    assert report.violation_counts["gap"] == 1  # 10 ms after the first cue
    assert report.violation_counts["reading_speed"] == 1  # 54 characters in 0.49 s
    assert report.repetition_cues == 1
    assert report.cues[0].low_confidence and report.cues[0].avg_logprob == pytest.approx(-1.4)
    assert report.cues[0].min_word_probability == pytest.approx(0.2)
    assert not report.cues[1].low_confidence
    assert report.cues[2].low_confidence  # no_speech_prob 0.7
    assert len(report.dropped_segments) == 1
    doc = report.to_json()
    assert doc["hallucinations_dropped"] == 1 and doc["violation_total"] == report.violation_total == 6
    table = subs.summary_table([report])
    assert "hallucination-filter hits" in table and "reading speed > 20 cps" in table


def test_length_ratio_flags_a_truncated_translation():
    target = [subs.Cue(0, 2000, ["Bonjour à tous."], 0), subs.Cue(3000, 5000, ["Oui."], 1)]
    source_texts = {0: "Hello everyone.", 1: "Yes, I think that this is what we should do today, all of us."}
    report = subs.quality_report(target, "fr", source_texts=source_texts)
    assert report.cues[0].length_ratio == pytest.approx(15 / 15)
    assert report.cues[1].length_ratio == pytest.approx(4 / len(source_texts[1]))
    assert report.length_ratio_outliers == 1
    assert report.length_ratio == pytest.approx(19 / (15 + len(source_texts[1])))


def test_chunks_merge_close_segments_up_to_the_limit():
    segments = [(0, 5000), (5500, 9000), (12000, 20000), (20300, 60000)]
    chunks = make_chunks(segments, max_chunk_ms=28000, max_pause_ms=2000)
    spans = [(c.start_ms, c.end_ms) for c in chunks]
    assert spans[0] == (0, 9000)  # 500 ms pause: merged
    assert spans[1][0] == 12000  # 3 s pause: a new chunk
    assert all(e - s <= 28000 for s, e in spans)
    assert spans[-1][1] == 60000
    assert sum(e - s for s, e in spans) >= 5000 + 3500 + 8000 + 39700


def test_vad_windows_are_stitched_at_their_border():
    windows = [(0, [(1000, 2000), (9950, 10000)]), (10000, [(0, 800), (3000, 4000)])]
    assert merge_windows(windows) == [(1000, 2000), (9950, 10800), (13000, 14000)]


def test_squeezed_short_cue_borrows_time_from_a_neighbour_with_spare():
    # "Hi." has 300 ms between two cues; the cue before it lingers well beyond what it needs.
    raw = [
        subs.Cue(0, 4000, ["Good."]),
        subs.Cue(4084, 4384, ["Hi."]),
        subs.Cue(4468, 8000, ["Fine, thanks."]),
    ]
    cues = subs.fix_timing(raw, RULES)
    assert len(cues) == 3
    assert_rules(cues)


def test_fast_cues_in_continuous_speech_are_retimed_within_the_run():
    first = "Those who make peaceful revolution impossible"
    raw = [
        subs.Cue(0, 2000, subs.break_lines(first)),  # 22.5 cps
        subs.Cue(2084, 2484, ["will make"]),  # too short
        subs.Cue(2568, 6000, subs.break_lines("violent revolution inevitable.")),  # 8.7 cps
    ]
    cues = subs.fix_timing(raw, RULES)
    assert_rules(cues)
    assert cues[0].start_ms == 0 and cues[-1].end_ms == 6000


def test_squeezed_short_cue_without_time_merges_with_a_neighbour():
    first = "Those who make peaceful revolution impossible"
    raw = [
        subs.Cue(0, 2300, subs.break_lines(first)),
        subs.Cue(2384, 2784, ["will make"]),
        subs.Cue(2868, 5000, subs.break_lines("violent revolution inevitable, every time.")),
    ]
    cues = subs.fix_timing(raw, RULES)
    assert len(cues) == 2
    assert " ".join(c.text for c in cues) == " ".join(c.text for c in raw)
    assert not any("min_duration" in subs.violations(c, None) for c in cues)


def test_tandem_repeats_are_cut_to_one_occurrence():
    text, loops = subs.cut_tandem_repeats(
        "It was like a phrase on the words on the words on the words, he said."
    )
    assert text == "It was like a phrase on the words, he said."
    assert loops == ["on the words"]
    assert subs.cut_tandem_repeats("He said it was very, very good.") == (
        "He said it was very, very good.",
        [],
    )
