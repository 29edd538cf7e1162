"""The incremental commit policy (LocalAgreement-2, clause cuts, boundaries) on recorded hypothesis sequences.

No model: each test scripts what the decoder returns for each job and checks what is committed.
"""

from __future__ import annotations

import numpy as np

from services.stt.streaming import (
    SAMPLES_PER_MS,
    BoundaryKind,
    Policy,
    StreamingParams,
    StreamRecognizer,
    TimedWord,
)


def words(*spec: tuple[str, int, int]) -> list[TimedWord]:
    return [TimedWord(f" {w}", start, end) for w, start, end in spec]


def feed_ms(rec: StreamRecognizer, ms: int) -> None:
    rec.add_audio(np.zeros(ms * SAMPLES_PER_MS, dtype=np.float32))


def committed(updates) -> list[str]:
    return [c.text for u in updates for c in u.commits]


# A recorded sequence of growing hypotheses of "the cat sat on the mat. it was happy" (times in ms).
H1 = words(("the", 100, 300), ("cat", 300, 600), ("sad", 600, 900))
H2 = words(("the", 100, 300), ("cat", 300, 600), ("sat", 600, 900), ("on", 900, 1100))
H3 = words(("the", 100, 300), ("Cat", 300, 600), ("sat", 600, 900), ("on", 900, 1100), ("the", 1100, 1300))
H4 = words(("on", 900, 1100), ("the", 1100, 1300), ("mat.", 1300, 1700), ("It", 1800, 2000))


def test_local_agreement_commits_what_two_hypotheses_agree_on_and_never_retracts():
    rec = StreamRecognizer(StreamingParams(min_chunk_s=0.5), language="en")
    rec.boundary(BoundaryKind.START, 0)
    out = []
    for hypothesis in (H1, H2, H3, H4):
        feed_ms(rec, 600)
        job = rec.next_job()
        assert job is not None and not job.final
        out.append(rec.apply(job, hypothesis, "en"))
    assert committed(out[0]) == []
    assert committed(out[1]) == ["the cat"]  # "sad" vs "sat": disagreement stops the prefix
    assert committed(out[2]) == ["sat on"]  # case does not matter; committed words are not repeated
    # H4 starts inside the committed audio: "on" is dropped by time, "the mat." agreed with H3's "the"?
    # Only "the" was in H3's uncommitted tail; "mat." is new: "the" commits, "mat." waits.
    assert committed(out[3]) == ["the"]
    texts = [u.transcript for batch in out for u in batch]
    assert texts[-1].startswith("the cat sat on the")
    for batch in out:
        for update in batch:
            assert 0.0 <= update.stability <= 1.0


def test_a_clause_closing_word_splits_the_commit_and_cuts_the_buffer_at_its_end():
    rec = StreamRecognizer(StreamingParams(min_chunk_s=0.5, context_s=0.0), language="en")
    rec.boundary(BoundaryKind.START, 0)
    first = words(("Hello,", 0, 400), ("my", 500, 700), ("friend", 700, 1000))
    feed_ms(rec, 1000)
    rec.apply(rec.next_job(), first, "en")
    feed_ms(rec, 600)
    job = rec.next_job()
    assert job.offset_ms == 0
    updates = rec.apply(job, first + words(("how", 1100, 1300)), "en")
    commits = [c for u in updates for c in u.commits]
    assert [(c.text, c.closes_clause, c.clause_index) for c in commits] == [
        ("Hello,", True, 0),
        ("my friend", False, 1),
    ]
    feed_ms(rec, 600)
    job = rec.next_job()
    assert job.offset_ms == 400  # cut after "Hello,": the next decode starts there
    assert job.prompt == "Hello,"


def test_pause_commits_the_whole_tail_as_a_clause_and_end_needs_no_second_decode():
    rec = StreamRecognizer(StreamingParams(), language="fr")
    rec.boundary(BoundaryKind.START, 200)
    feed_ms(rec, 2000)
    assert rec.boundary(BoundaryKind.PAUSE, 1800) == []
    job = rec.next_job()
    assert job.final and job.boundary is BoundaryKind.PAUSE
    assert job.offset_ms == 200 and len(job.audio) == 1600 * SAMPLES_PER_MS
    updates = rec.apply(job, words(("bonjour", 300, 800), ("à", 900, 1000), ("tous", 1000, 1700)), "fr")
    assert [(c.text, c.closes_clause, c.end_ms) for u in updates for c in u.commits] == [
        ("bonjour à tous", True, 1800)  # a pause's commit ends at the pause, not at its last word
    ]
    feed_ms(rec, 300)
    final = rec.boundary(BoundaryKind.END, 1810)  # no speech since the pause: no decode
    assert rec.next_job() is None
    assert [u.is_final for u in final] == [True]
    assert final[0].transcript == "bonjour à tous" and final[0].stability == 1.0
    assert [c.text for c in final[0].all_commits] == ["bonjour à tous"]


def test_speech_after_a_pause_is_a_new_clause_and_the_final_is_all_commits():
    rec = StreamRecognizer(StreamingParams(context_s=0.0), language="en")
    rec.boundary(BoundaryKind.START, 0)
    feed_ms(rec, 1000)
    rec.boundary(BoundaryKind.PAUSE, 900)
    rec.apply(rec.next_job(), words(("one", 100, 800)), "en")
    feed_ms(rec, 1500)
    rec.boundary(BoundaryKind.END, 2400)
    job = rec.next_job()
    assert job.final and job.boundary is BoundaryKind.END and job.offset_ms == 900
    updates = rec.apply(job, words(("two", 1500, 2300)), "en")
    assert [c.clause_index for u in updates for c in u.commits] == [1]
    final = updates[-1]
    assert final.is_final and final.transcript == "one two"
    assert [c.text for c in final.all_commits] == ["one", "two"]


def test_an_end_closes_the_open_clause_even_when_agreement_committed_its_words():
    rec = StreamRecognizer(StreamingParams(min_chunk_s=0.5), language="en")
    rec.boundary(BoundaryKind.START, 0)
    hyp = words(("good", 0, 300), ("morning", 300, 800))
    feed_ms(rec, 900)
    rec.apply(rec.next_job(), hyp, "en")
    feed_ms(rec, 600)
    agreed = rec.apply(rec.next_job(), hyp, "en")
    # Both hypotheses end with "morning": the last word waits for more audio; "good" is committed.
    assert [(c.text, c.closes_clause) for u in agreed for c in u.commits] == [("good", False)]
    rec.boundary(BoundaryKind.END, 1400)
    updates = rec.apply(rec.next_job(), words(("good", 0, 300)), "en")  # the tail decode finds nothing new
    closing = [c for u in updates for c in u.commits]
    assert [(c.words, c.closes_clause) for c in closing] == [((), True)]
    assert updates[-1].is_final and updates[-1].transcript == "good"


def test_the_last_word_of_a_hypothesis_waits_for_more_audio():
    rec = StreamRecognizer(StreamingParams(min_chunk_s=0.5), language="en")
    rec.boundary(BoundaryKind.START, 0)
    feed_ms(rec, 1000)
    rec.apply(rec.next_job(), words(("it", 0, 200), ("ends.", 200, 900)), "en")
    feed_ms(rec, 600)
    # Whisper closed the buffer's last word with a full stop both times; the speaker goes on.
    updates = rec.apply(rec.next_job(), words(("it", 0, 200), ("ends.", 200, 900)), "en")
    assert [(c.text, c.closes_clause) for u in updates for c in u.commits] == [("it", False)]
    feed_ms(rec, 600)
    updates = rec.apply(
        rec.next_job(), words(("ends", 200, 900), ("here", 900, 1300), ("now", 1300, 1600)), "en"
    )
    assert [(c.text, c.closes_clause) for u in updates for c in u.commits] == [("ends", False)]


def test_utterance_policy_commits_nothing_before_the_end_and_ignores_pauses():
    rec = StreamRecognizer(StreamingParams(policy=Policy.UTTERANCE, interim_results=True), language="en")
    rec.boundary(BoundaryKind.START, 0)
    feed_ms(rec, 1500)
    rec.boundary(BoundaryKind.PAUSE, 1000)
    job = rec.next_job()
    assert not job.final
    hyp = words(("hi", 0, 400), ("there", 500, 900))
    interim = rec.apply(job, hyp, "en")
    assert committed(interim) == [] and interim[0].stability == 0.0 and interim[0].transcript == "hi there"
    feed_ms(rec, 1500)
    rec.apply(rec.next_job(), hyp, "en")
    rec.boundary(BoundaryKind.END, 2500)
    job = rec.next_job()
    assert job.final and job.offset_ms == 0 and len(job.audio) == 2500 * SAMPLES_PER_MS
    final = rec.apply(job, hyp + words(("friend", 1200, 1800)), "en")
    assert final[-1].is_final and final[-1].transcript == "hi there friend"


def test_flushes_run_in_utterance_order_and_audio_is_kept_until_committed():
    rec = StreamRecognizer(StreamingParams(lookback_s=1.0), language="en")
    feed_ms(rec, 3000)  # silence: only the lookback is kept
    assert rec.end_ms == 3000 and rec.backlog_s == 0.0
    rec.boundary(BoundaryKind.START, 1500)  # older than the lookback: starts where the audio does
    feed_ms(rec, 1000)
    rec.boundary(BoundaryKind.END, 3800)
    rec.boundary(BoundaryKind.START, 3900)
    feed_ms(rec, 1000)
    rec.boundary(BoundaryKind.END, 4900)
    assert rec.backlog_s == 3.0  # both utterances wait: audio from the first one's start on is kept
    first = rec.next_job()
    assert first.utterance_index == 0 and first.offset_ms == 2000
    updates = rec.apply(first, words(("a", 2100, 3500)), "en")
    assert [u.utterance_index for u in updates] == [0, 0]
    second = rec.next_job()
    assert second.utterance_index == 1 and second.offset_ms == 3900 and second.prompt == "a"
    assert rec.apply(second, [], "en")[-1].transcript == ""


def test_whole_stream_without_boundaries_is_one_utterance_ended_by_finish():
    rec = StreamRecognizer(StreamingParams(), language="en")
    rec.start_whole_stream()
    feed_ms(rec, 1200)
    job = rec.next_job()
    assert not job.final
    rec.apply(job, words(("yes", 100, 500)), "en")
    rec.finish()
    job = rec.next_job()
    assert job.final and job.boundary is BoundaryKind.END
    final = rec.apply(job, words(("yes", 100, 500)), "en")
    assert final[-1].is_final and final[-1].transcript == "yes"


def test_decodes_hear_the_committed_audio_before_the_cut_without_committing_it_again():
    rec = StreamRecognizer(StreamingParams(context_s=1.0), language="en")
    rec.boundary(BoundaryKind.START, 0)
    feed_ms(rec, 3000)
    rec.boundary(BoundaryKind.PAUSE, 2900)
    first = words(("one", 100, 900), ("two", 1000, 1800), ("three", 1900, 2800))
    rec.apply(rec.next_job(), first, "en")
    feed_ms(rec, 1500)
    rec.boundary(BoundaryKind.END, 4400)
    job = rec.next_job()
    # One second of context before the pause's cut; the prompt holds only what was said before it.
    assert job.offset_ms == 1900 and job.prompt == "one two"
    updates = rec.apply(job, words(("three", 1900, 2800), ("four", 3000, 4300)), "en")
    assert [c.text for u in updates for c in u.commits] == ["four"]
    assert updates[-1].transcript == "one two three four"


def feed_level(rec: StreamRecognizer, ms: int, amplitude: float) -> None:
    """``ms`` of a 200 Hz tone at ``amplitude`` (speech to the quiet-tail test), or silence at 0."""
    t = np.arange(ms * SAMPLES_PER_MS) / (SAMPLES_PER_MS * 1000)
    rec.add_audio((amplitude * np.sin(2 * np.pi * 200 * t)).astype(np.float32))


def test_an_agreement_decode_waits_while_the_newest_audio_is_quiet_at_most_400_ms():
    rec = StreamRecognizer(StreamingParams(min_chunk_s=1.0), language="en")
    rec.boundary(BoundaryKind.START, 0)
    feed_level(rec, 900, 0.3)
    feed_level(rec, 200, 0.001)  # 1.1 s in, the speaker is silent: no agreement decode yet
    assert rec.next_job() is None
    rec.boundary(BoundaryKind.PAUSE, 1100)  # the pause came: its final decode goes first
    job = rec.next_job()
    assert job is not None and job.final

    rec = StreamRecognizer(StreamingParams(min_chunk_s=1.0), language="en")
    rec.boundary(BoundaryKind.START, 0)
    feed_level(rec, 900, 0.3)
    feed_level(rec, 400, 0.001)
    assert rec.next_job() is None  # 300 ms past due
    feed_level(rec, 100, 0.001)  # 400 ms past due: the caller sends no pause; decode anyway
    job = rec.next_job()
    assert job is not None and not job.final

    rec = StreamRecognizer(StreamingParams(min_chunk_s=1.0), language="en")
    rec.boundary(BoundaryKind.START, 0)
    feed_level(rec, 900, 0.3)
    feed_level(rec, 200, 0.001)
    assert rec.next_job() is None
    feed_level(rec, 100, 0.2)  # speech again
    job = rec.next_job()
    assert job is not None and not job.final and job.offset_ms == 0
