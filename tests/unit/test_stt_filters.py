"""The STT hallucination filter and language mapping, on fake segments."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from services.common.errors import InvalidArgument
from services.stt.config import DEFAULT_HALLUCINATION_PHRASES, SttConfig
from services.stt.engine import whisper_language
from services.stt.filters import HallucinationGates, normalize_text, split_hallucinations


@dataclass
class FakeSegment:
    text: str
    avg_logprob: float = -0.3
    no_speech_prob: float = 0.05
    compression_ratio: float = 1.3


GATES = HallucinationGates(phrases=DEFAULT_HALLUCINATION_PHRASES)


def test_default_phrases_hold_the_required_ones():
    for phrase in (
        "merci d'avoir regardé",
        "sous-titres réalisés par",
        "thanks for watching",
        "subtitles by",
    ):
        assert phrase in SttConfig().hallucination_phrases
    assert "amara.org" in SttConfig().hallucination_phrases


def test_normalize_text_ignores_case_accents_and_punctuation():
    assert normalize_text("Sous-titres réalisés par la communauté d'Amara.org") == (
        "sous titres realises par la communaute d amara org"
    )
    assert normalize_text("  MERCI d’avoir REGARDÉ !!! ") == "merci d avoir regarde"
    assert normalize_text("...") == ""


@pytest.mark.parametrize(
    ("no_speech_prob", "avg_logprob", "dropped"),
    [
        (0.9, -1.5, True),  # the Whisper paper's rule: both conditions
        (0.9, -0.5, False),  # confident text despite a high no-speech probability is kept
        (0.3, -1.5, False),  # low confidence alone is not silence
        (0.6, -1.5, False),  # thresholds are strict inequalities
        (0.61, -1.0, False),
    ],
)
def test_no_speech_gate_needs_both_conditions(no_speech_prob, avg_logprob, dropped):
    segment = FakeSegment(" Hello there.", avg_logprob=avg_logprob, no_speech_prob=no_speech_prob)
    assert (GATES.drop_reason(segment) == "no_speech") is dropped


def test_compression_ratio_gate_drops_repetition_loops():
    looping = FakeSegment(" the the the the the the the the the the the the", compression_ratio=3.1)
    assert GATES.drop_reason(looping) == "compression_ratio"
    assert GATES.drop_reason(FakeSegment(" normal speech", compression_ratio=2.4)) is None


@pytest.mark.parametrize(
    "text",
    [
        " Merci d'avoir regardé cette vidéo !",
        " Sous-titres réalisés par la communauté d'Amara.org",
        " Thanks for watching!",
        " THANK YOU FOR WATCHING.",
        " Subtitles by the Amara.org community",
        " amara.org",
        " Sous-titrage ST' 501",
    ],
)
def test_phrase_gate_drops_known_hallucinations(text):
    assert GATES.drop_reason(FakeSegment(text)) == "phrase"


@pytest.mark.parametrize(
    "text",
    [
        " And thanks for watching over the children during the long and hot summer holidays.",
        " He watched the subtitles of the film.",
        " Merci beaucoup, à demain.",
    ],
)
def test_phrase_gate_keeps_real_speech(text):
    assert GATES.drop_reason(FakeSegment(text)) is None


def test_phrase_list_is_configurable():
    gates = HallucinationGates(phrases=("bonne nuit les petits",))
    assert gates.drop_reason(FakeSegment(" Bonne nuit, les petits !")) == "phrase"
    assert gates.drop_reason(FakeSegment(" Thanks for watching!")) is None


def test_split_keeps_order_and_returns_dropped():
    segments = [
        FakeSegment(" First sentence."),
        FakeSegment(" Thanks for watching!"),
        FakeSegment(" Second sentence."),
        FakeSegment(" you you you you you you you", compression_ratio=4.0),
        FakeSegment(" ..."),
        FakeSegment(" Hmm.", no_speech_prob=0.95, avg_logprob=-1.3),
    ]
    kept, dropped = split_hallucinations(segments, GATES)
    assert [s.text for s in kept] == [" First sentence.", " Second sentence."]
    assert [s.text for s in dropped] == [
        " Thanks for watching!",
        " you you you you you you you",
        " ...",
        " Hmm.",
    ]


LANGS = frozenset({"en", "fr", "de", "he", "jw", "no", "tl"})
KNOWN = LANGS | {"tr"}


@pytest.mark.parametrize(
    ("tag", "code"),
    [
        ("", None),
        ("  ", None),
        ("en", "en"),
        ("fr-FR", "fr"),
        ("FR", "fr"),
        ("fr_CA", "fr"),
        ("de-Latn-DE", "de"),
        ("iw", "he"),
        ("jv", "jw"),
        ("nb-NO", "no"),
        ("fil", "tl"),
    ],
)
def test_bcp47_tags_map_to_whisper_codes(tag, code):
    assert whisper_language(tag, LANGS, KNOWN, english_only=False) == code


@pytest.mark.parametrize("tag", ["xx", "klingon", "12", "fr FR", "tr"])
def test_unknown_language_says_how_to_fix_it(tag):
    with pytest.raises(InvalidArgument) as err:
        whisper_language(tag, LANGS, KNOWN, english_only=False)
    assert "BCP-47" in str(err.value)
    assert "empty" in str(err.value)


def test_english_only_model_refuses_other_languages():
    english = frozenset({"en"})
    assert whisper_language("en-US", english, KNOWN, english_only=True) == "en"
    with pytest.raises(InvalidArgument, match="English-only"):
        whisper_language("fr", english, KNOWN, english_only=True)
    with pytest.raises(InvalidArgument, match="unknown language"):
        whisper_language("xx", english, KNOWN, english_only=True)
