"""TranslationEngine with a fake backend: limits, sentence splitting and rejoining, empty texts."""

from __future__ import annotations

import pytest

from services.common.deadlines import Deadline
from services.common.errors import DeadlineExceeded, InvalidArgument, ParleyError
from services.translate.engine import TranslationEngine, cut_long


class RecordingBackend:
    """Upper-cases each sentence and wraps it in brackets; records every call."""

    model_name = "fake"
    workers = 1
    in_flight_batching = False

    def __init__(self, drop_one: bool = False):
        self.calls: list[list[str]] = []
        self.drop_one = drop_one

    def pairs(self):
        return [("en", "fr"), ("fr", "en")]

    def resolve(self, source, target):
        if (source, target) not in self.pairs():
            raise InvalidArgument(f"unsupported {source}->{target}")
        return (source, target)

    def translate_sentences(self, sentences, pair, deadline, contexts=None):
        if deadline.expired():
            raise DeadlineExceeded("late")
        self.calls.append(list(sentences))
        out = [f"[{s.upper()}]" for s in sentences]
        return out[:-1] if self.drop_one else out

    def close(self):
        pass


def make(backend=None, max_texts=8, max_chars=1000, max_sentence_chars=100):
    return TranslationEngine(backend or RecordingBackend(), max_texts, max_chars, max_sentence_chars)


def test_all_sentences_of_all_texts_go_to_the_backend_in_one_call_and_come_back_in_order():
    backend = RecordingBackend()
    engine = make(backend)
    out = engine.translate(["Hello there. Dr. Smith is here!", "", "One.\nTwo? Three.", "   "], "en", "fr")
    assert backend.calls == [["Hello there.", "Dr. Smith is here!", "One.", "Two?", "Three."]]
    assert out == ["[HELLO THERE.] [DR. SMITH IS HERE!]", "", "[ONE.]\n[TWO?] [THREE.]", ""]


def test_only_empty_texts_never_reach_the_backend():
    backend = RecordingBackend()
    assert make(backend).translate(["", " ", "\n"], "en", "fr") == ["", "", ""]
    assert backend.calls == []


def test_sentences_join_without_spaces_for_chinese_and_japanese_targets():
    class ToCjk(RecordingBackend):
        def pairs(self):
            return [("en", "zh"), ("en", "ja")]

    engine = make(ToCjk())
    assert engine.translate(["One. Two."], "en", "zh") == ["[ONE.][TWO.]"]
    assert engine.translate(["One. Two."], "en", "ja") == ["[ONE.][TWO.]"]


def test_long_sentences_are_cut_at_white_space():
    backend = RecordingBackend()
    engine = make(backend, max_sentence_chars=10)
    engine.translate(["aaaa bbbb cccc dddd"], "en", "fr")
    assert backend.calls == [["aaaa bbbb", "cccc dddd"]]
    assert all(len(p) <= 10 for p in cut_long("x" * 25, 10)) and "".join(cut_long("x" * 25, 10)) == "x" * 25
    assert " ".join(cut_long("one two three four five six", 7)) == "one two three four five six"


@pytest.mark.parametrize(
    ("texts", "source", "target", "message"),
    [
        ([], "en", "fr", "texts is empty"),
        (["a"] * 9, "en", "fr", "9 texts is more than the 8"),
        (["x" * 600, "y" * 401], "en", "fr", "1001 characters, more than the 1000"),
        (["a"], "en", "de", "unsupported"),
    ],
)
def test_bad_requests_are_invalid_arguments(texts, source, target, message):
    with pytest.raises(InvalidArgument, match=message):
        make().prepare(texts, source, target)


def test_a_backend_returning_the_wrong_count_is_an_internal_error():
    with pytest.raises(ParleyError, match="1 translations for 2 sentences"):
        make(RecordingBackend(drop_one=True)).translate(["One. Two."], "en", "fr")


def test_the_deadline_reaches_the_backend():
    engine = make()
    with pytest.raises(DeadlineExceeded):
        engine.run(engine.prepare(["A."], "en", "fr"), Deadline.after(-1.0))
