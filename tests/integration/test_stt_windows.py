"""STT windowing: packing speech into windows, bucket choice, timestamp tokens, time mapping, merging."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from faster_whisper.transcribe import get_compression_ratio
from hypothesis import given
from hypothesis import strategies as st

from services.stt.engine import (
    DecodeOptions,
    Segment,
    Transcript,
    Window,
    _Decoded,
    _without_loops,
    bucket_s,
    cut_repetition_loops,
    merge_transcripts,
    pack_spans,
    segments_from_tokens,
)

TB = 50364  # <|0.00|> of the multilingual vocabulary
EOT = 50257  # <|endoftext|>: text tokens are below it


@st.composite
def speech_spans(draw):
    """Ordered, non-overlapping sample ranges."""
    edges = sorted(draw(st.sets(st.integers(0, 2_000_000), min_size=0, max_size=20)))
    pairs = list(zip(edges[::2], edges[1::2], strict=False))
    return [(a, b) for a, b in pairs if b > a]


@given(speech_spans(), st.integers(1000, 480_000))
def test_packing_keeps_every_sample_in_order_and_no_window_overflows(speech, max_samples):
    windows = pack_spans(speech, max_samples)
    flat = [span for window in windows for span in window]
    assert sum(b - a for a, b in flat) == sum(b - a for a, b in speech)
    assert flat == sorted(flat) and all(b > a for a, b in flat)
    assert all(sum(b - a for a, b in w) <= max_samples for w in windows)
    assert all(w for w in windows)
    # a span is cut only when it alone is longer than a window
    cut_starts = {a for a, _ in flat} - {a for a, _ in speech}
    assert all(any(a < s < b and b - a > max_samples for a, b in speech) for s in cut_starts)


def test_packing_fills_a_window_before_starting_the_next():
    assert pack_spans([(0, 10), (20, 25), (30, 40)], 16) == [[(0, 10), (20, 25)], [(30, 40)]]
    assert pack_spans([(0, 40)], 16) == [[(0, 16)], [(16, 32)], [(32, 40)]]
    assert pack_spans([], 16) == []


@pytest.mark.parametrize(
    ("duration_s", "expected_s"),
    [(0.5, 10.0), (9.0, 10.0), (9.5, 15.0), (14.0, 15.0), (18.9, 20.0), (19.1, 30.0), (29.9, 30.0)],
)
def test_bucket_is_the_shortest_that_holds_the_audio_and_margin(duration_s, expected_s):
    assert bucket_s(duration_s, (10.0, 15.0, 20.0, 30.0), 1.0) == expected_s


def test_bucket_falls_back_to_the_longest():
    assert bucket_s(29.9, (30.0,), 1.0) == 30.0
    assert bucket_s(12.0, (10.0,), 0.0) == 10.0


def test_timestamp_tokens_split_segments():
    tokens = [TB + 0, 100, 101, TB + 120, TB + 120, 102, TB + 250]
    assert segments_from_tokens(tokens, TB, 6.0) == [
        (0.0, 2.4, [TB, 100, 101, TB + 120]),
        (2.4, 5.0, [TB + 120, 102, TB + 250]),
    ]


def test_text_after_the_last_timestamp_ends_at_the_window_audio_end():
    assert segments_from_tokens([TB + 50, 100, 101], TB, 3.5) == [(1.0, 3.5, [TB + 50, 100, 101])]
    assert segments_from_tokens([TB, TB + 10], TB, 3.5) == []  # timestamps without text
    assert segments_from_tokens([TB, 100, TB + 400], TB, 3.5)[0][1] == 3.5  # clamped to the audio


@functools.cache
def whisper_tokenizer():
    """Whisper base's tokenizer (its tokenizer.json only; no model is loaded)."""
    import tokenizers
    from faster_whisper.tokenizer import Tokenizer

    from services.common.models import resolve_whisper

    hf = tokenizers.Tokenizer.from_file(f"{resolve_whisper('base')}/tokenizer.json")
    return Tokenizer(hf, True, task="transcribe", language="en")


@pytest.fixture
def tokenizer():
    return whisper_tokenizer()


def decode(tokenizer, tokens) -> str:
    return tokenizer.decode([t for t in tokens if t < tokenizer.eot])


SAID = (
    " The Middle Ages brought calligraphy to perfection, and it was natural therefore that the forms of"
    " printed letters should follow more or less closely those of the written character, and they"
    " followed them very closely."
)
AFTER = " The first books were printed in black letter."


def test_the_looped_sentence_of_a_subtitle_job_is_kept_once_with_the_speech_after_it(tokenizer):
    """The loops CI runs of the 10-minute subtitle test got from Whisper base on an LJSpeech sentence.

    Once the sentence came three times, once twice with a comma and a capital missing from the copy.
    """
    ts = tokenizer.timestamp_begin
    copy = SAID.replace("character,", "character").replace(" The Middle Ages", " The middle ages")
    for copies in ([SAID, SAID, SAID], [SAID, copy]):
        tokens = [ts]
        for k, text in enumerate(copies):
            tokens += [*tokenizer.encode(text), ts + 300 * (k + 1), ts + 300 * (k + 1)]
        tokens += [*tokenizer.encode(AFTER), ts + 1100]
        looped = decode(tokenizer, tokens)
        assert get_compression_ratio(looped) > 2.4  # what sends a window through the cut
        cut = cut_repetition_loops(tokens, tokenizer)
        assert decode(tokenizer, cut) == SAID + AFTER
        # One segment over the audio all copies were given, then the speech after it.
        end = 300 * len(copies) * 0.02
        assert [(a, b) for a, b, _ in segments_from_tokens(cut, ts, 24.0)] == [(0.0, end), (end, 22.0)]

    # The engine cuts only a decode that still fails the compression-ratio gate after the fallback.
    decoded = _Decoded(tokens, looped.strip(), -0.2, 0.01, get_compression_ratio(looped.strip()))
    kept = _without_loops(decoded, tokenizer, 2.4)
    assert (kept.tokens, kept.text) == (cut, (SAID + AFTER).strip())
    assert kept.compression_ratio < 2.4
    assert _without_loops(kept, tokenizer, 2.4) is kept
    assert _without_loops(decoded, tokenizer, decoded.compression_ratio) is decoded  # passes the gate


@pytest.mark.parametrize(
    "text",
    [
        " I think that that was good.",
        " It was very, very good.",
        " Thank you, thank you.",  # two words said twice: fewer than three repeated
        SAID + AFTER,
    ],
)
def test_repeats_of_natural_speech_are_not_loops(tokenizer, text):
    tokens = [tokenizer.timestamp_begin, *tokenizer.encode(text), tokenizer.timestamp_begin + 100]
    assert cut_repetition_loops(tokens, tokenizer) == tokens


def test_one_word_over_and_over_is_a_loop(tokenizer):
    tokens = tokenizer.encode(" No, no, no, no. Stop.")
    assert decode(tokenizer, cut_repetition_loops(tokens, tokenizer)) == " No. Stop."


@given(st.lists(st.sampled_from([" the", " cat", ",", " sat", "."]), max_size=30), st.integers(1, 6))
def test_cutting_loops_only_removes_whole_copies(words, min_cut):
    tokenizer = whisper_tokenizer()
    tokens = [t for w in words for t in tokenizer.encode(w)]
    cut = cut_repetition_loops(tokens, tokenizer, min_cut)
    rest = iter(tokens)
    assert all(token in rest for token in cut)  # a subsequence of the decode

    def word_count(ids):
        return sum(decode(tokenizer, [t]).strip() not in ",." for t in ids)

    assert len(cut) == len(tokens) or word_count(tokens) - word_count(cut) >= min_cut


def window(spans_s, window_s=10.0):
    samples = int(sum(b - a for a, b in spans_s) * 16000)
    return Window(np.zeros(samples, np.float32), tuple(spans_s), window_s, DecodeOptions(language="en"))


def test_window_times_map_back_across_removed_silence():
    w = window([(2.0, 4.0), (10.0, 11.5)])
    assert w.request_time_s(0.0) == 2.0
    assert w.request_time_s(1.5) == 3.5
    assert w.request_time_s(2.5) == 10.5
    assert w.request_time_s(3.5) == 11.5
    assert w.request_time_s(4.0) == 12.0  # past the end: extends the last span


def segment(start_s, end_s, text):
    return Segment(start_s, end_s, text, -0.2, 0.01, 1.2)


def test_merge_keeps_window_order_and_the_first_window_language():
    parts = [
        Transcript("Hello there.", "fr", 0.7, 5.0, [segment(0.5, 2.0, " Hello there.")]),
        Transcript("General Kenobi.", "en", 0.9, 4.0, [segment(31.0, 33.0, " General Kenobi.")]),
    ]
    merged = merge_transcripts(parts, 60.0, "")
    assert merged.text == "Hello there. General Kenobi."
    assert [s.start_s for s in merged.segments] == [0.5, 31.0]
    assert (merged.language, merged.language_probability, merged.duration_s) == ("fr", 0.7, 60.0)


def test_merge_of_no_window_is_empty_in_the_requested_language():
    merged = merge_transcripts([], 4.0, "de")
    assert (merged.text, merged.language, merged.segments, merged.duration_s) == ("", "de", [], 4.0)
