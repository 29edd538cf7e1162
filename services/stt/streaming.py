"""Incremental recognition of a stream: LocalAgreement-2 commits, clause cuts, the caller's speech boundaries.

The policy is whisper_streaming's (Machacek, Dabre and Bojar, "Turning Whisper into Real-Time Transcription
System", IJCNLP-AACL 2023 demo track; its ``OnlineASRProcessor`` and ``HypothesisBuffer``), with the
caller's VAD boundaries added:

- The *buffer* is the open utterance's audio from ``cut_ms`` on. Whenever ``min_chunk_s`` of new audio has
  arrived and nothing else waits, the buffer is decoded again (an *agreement* decode: cheap options), with
  the committed text as the decoder's prompt; while the newest audio is quiet, up to 400 ms longer (a
  pause may be coming, and its final decode must not wait behind this one).
- A hypothesis is the decode's words, times in the stream, less the words that start before the last
  committed word ends (they were committed already) and less a head that repeats the committed tail
  (an n-gram of 1 to 5 words, whisper_streaming's rule).
- LocalAgreement-2: the words the previous and the current hypothesis agree on, from their start, are
  committed (compared without case and punctuation; the current hypothesis's spelling and times are
  kept), except the current hypothesis's last word: at the end of the audio Whisper often cuts it or closes
  it with a full stop that more audio takes back. Committed words are never retracted.
- After a commit the buffer is cut at the end of the last committed word when that word closes a clause
  (punctuation) or when the buffer is longer than ``buffer_trim_s``, so the next decode stays short.
- A PAUSE boundary (the VAD saw a short silence) decodes the buffer up to the pause with the final options
  and commits all of it: no word is cut at a pause, so the decode needs no second opinion. It is the
  speculative final decode of the tail: if the END follows with no speech in between, the utterance's
  final result is ready at once; if speech resumes, it is a new clause of the same utterance.
- An END boundary does the same for what the pauses left, then gives the final result: the commits joined.

With the ``utterance`` policy nothing is committed before the END, which decodes the whole utterance at
once (the comparison baseline); agreement decodes then run only for interim results.

Stability of an interim result (one measure, used everywhere): the share of its words that are committed.

This module runs no model: :meth:`StreamRecognizer.next_job` says what to decode, the caller decodes it
(off the event loop, through the batcher) and hands the words to :meth:`StreamRecognizer.apply`.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from services.common.audio import SAMPLE_RATE_HZ

SAMPLES_PER_MS = SAMPLE_RATE_HZ // 1000
# whisper_streaming: words starting this long before the last committed end may still be new.
_COMMITTED_SLACK_MS = 100
# whisper_streaming: the committed tail and a hypothesis head are compared over 1..5 words.
_MAX_OVERLAP_WORDS = 5
# ... and only when the hypothesis starts within 1 s of the last committed end.
_OVERLAP_WINDOW_MS = 1000
# Whisper's prompt is at most 224 tokens; the last 200 characters of committed text are plenty of context.
_PROMPT_CHARS = 200
# A tail shorter than this after the last cut holds no word worth a decode (the VAD pads ends by ~30 ms).
_MIN_TAIL_MS = 150
# An agreement decode is put off while the newest _QUIET_TAIL_MS of audio is quiet: its RMS under
# _QUIET_RATIO of the loudest such block of the audio to decode (speech). The speaker may be pausing, and a
# decode running when the pause arrives cannot be stopped: the pause's final decode waited behind it in 7 of
# 20 FLEURS clauses, 20-260 ms, most of those decodes started in the last 200 ms before the pause arrived.
# It is put off by at most _MAX_QUIET_DEFER_MS past the time it was due. Noise floors (10th percentile of
# the 100 ms blocks) of the first 12 recordings of each shared set: 0.01-0.48 of their overall RMS, medians
# per set 0.05-0.15; where the floor is that high, the tail is never quiet and decodes run as before.
_QUIET_TAIL_MS = 100
_QUIET_RATIO = 0.1
_MAX_QUIET_DEFER_MS = 400
_CLAUSE_END = re.compile(r"[.!?;:,\u2026\u3002\uff01\uff1f\uff0c]['\")\]\u00bb\u201d]*$")
_NORMALIZE = re.compile(r"[^\w']+")


class Policy(enum.Enum):
    """When words are committed (``parley.stt.v1.CommitPolicy``)."""

    LOCAL_AGREEMENT = "local_agreement"
    UTTERANCE = "utterance"


class BoundaryKind(enum.Enum):
    """A speech boundary from the caller's VAD (``parley.stt.v1.SpeechBoundary.Kind``)."""

    START = 1
    PAUSE = 2
    END = 3


@dataclass(frozen=True)
class StreamingParams:
    """Settings of incremental recognition.

    Attributes:
        policy: When words are committed.
        min_chunk_s: New audio that triggers an agreement decode, in seconds (whisper_streaming's
            ``--min-chunk-size``, 1 s).
        buffer_trim_s: A buffer longer than this is cut at the last committed word, in seconds.
        lookback_s: Audio kept before an utterance starts, for a START that refers to the past, in seconds.
        context_s: Committed audio before the cut that each decode still gets, in seconds (its words are
            dropped from the hypothesis): the model hears the words before the ones it decodes.
        interim_results: The caller wants results whose only news is unstable text.
    """

    policy: Policy = Policy.LOCAL_AGREEMENT
    min_chunk_s: float = 1.0
    buffer_trim_s: float = 6.0
    lookback_s: float = 3.0
    context_s: float = 2.0
    interim_results: bool = False


@dataclass(frozen=True)
class TimedWord:
    """A decoded word, times in milliseconds from the start of the stream.

    Attributes:
        word: As decoded, with its leading space.
        start_ms: Start of the word.
        end_ms: End of the word.
        probability: Probability of its tokens, in [0, 1].
    """

    word: str
    start_ms: int
    end_ms: int
    probability: float = 1.0

    @property
    def key(self) -> str:
        """The word compared across hypotheses: case-folded, punctuation removed."""
        return _NORMALIZE.sub("", self.word).casefold()

    @property
    def closes_clause(self) -> bool:
        """The word ends with clause or sentence punctuation."""
        return bool(_CLAUSE_END.search(self.word.strip()))


def join_words(words: Sequence[TimedWord]) -> str:
    """The words' text: their spellings concatenated (each carries its leading space), stripped."""
    return "".join(w.word for w in words).strip()


@dataclass(frozen=True)
class DecodeJob:
    """Audio to decode now.

    Attributes:
        utterance_index: The utterance, from 0 in the stream.
        audio: float32 in [-1, 1], shape (n,), 16 kHz.
        offset_ms: Stream time of ``audio[0]``, in ms.
        prompt: Committed text before the audio, for the decoder's prompt (may be empty).
        final: A PAUSE or END flush (final decoding options; everything decoded is committed); else an
            agreement decode.
        boundary: The boundary flushed (final jobs).
        language: The utterance's language once known (Whisper code), else None to detect it.
    """

    utterance_index: int
    audio: np.ndarray
    offset_ms: int
    prompt: str
    final: bool
    boundary: BoundaryKind | None = None
    language: str | None = None


@dataclass(frozen=True)
class Commit:
    """Words committed in one result; a commit never spans two clauses.

    Attributes:
        commit_index: From 0 within the utterance.
        clause_index: From 0 within the utterance.
        words: The words (possibly none: a pause or an end that closes a clause whose words were all
            committed by agreement).
        closes_clause: The words end the clause (punctuation, a pause or the end).
        end_ms: Audio committed up to here, in stream ms: the last word's end, or the boundary's time for a
            commit made at a pause or the end.
    """

    commit_index: int
    clause_index: int
    words: tuple[TimedWord, ...]
    closes_clause: bool
    end_ms: int

    @property
    def text(self) -> str:
        """The words' text."""
        return join_words(self.words)


@dataclass(frozen=True)
class Update:
    """One result for the caller.

    Attributes:
        utterance_index: From 0 in the stream.
        start_ms: Utterance start, in stream ms.
        end_ms: Utterance end (final), or end of the audio decoded (interim), in stream ms.
        transcript: Committed words, then the rest of the latest hypothesis (interim); committed words
            (final).
        stability: Share of the transcript's words that are committed, in [0, 1].
        commits: Words committed by this update, one entry per clause they touch.
        is_final: The utterance is over; ``transcript`` is final.
        language: Whisper language code, or "" when not yet known.
        all_commits: Final updates: every commit of the utterance, in order.
    """

    utterance_index: int
    start_ms: int
    end_ms: int
    transcript: str
    stability: float
    commits: tuple[Commit, ...] = ()
    is_final: bool = False
    language: str = ""
    all_commits: tuple[Commit, ...] = ()


@dataclass
class _Utterance:
    index: int
    start_ms: int
    cut_ms: int  # audio before this is committed and cut from the buffer
    end_ms: int | None = None  # set by END
    language: str | None = None
    commits: list[Commit] = field(default_factory=list)
    committed: list[TimedWord] = field(default_factory=list)
    hypothesis: list[TimedWord] = field(default_factory=list)  # previous hypothesis, uncommitted part
    decoded_to_ms: int = 0  # end of the audio the last decode covered
    clause_index: int = 0
    clause_has_words: bool = False
    flushes: deque[tuple[BoundaryKind, int]] = field(default_factory=deque)

    @property
    def last_committed_ms(self) -> int:
        return self.committed[-1].end_ms if self.committed else self.cut_ms

    def transcript(self, tail: Sequence[TimedWord] = ()) -> str:
        return join_words([*self.committed, *tail])


class StreamRecognizer:
    """The state of one stream's incremental recognition (see the module docstring). Not thread-safe.

    Args:
        params: Settings.
        initial_prompt: The caller's own prompt, put before the committed text.
        language: The stream's Whisper language code, or None to detect it per utterance.
    """

    def __init__(self, params: StreamingParams, initial_prompt: str = "", language: str | None = None):
        self.params = params
        self._initial_prompt = initial_prompt.strip()
        self._language = language
        self._audio = np.zeros(0, dtype=np.float32)
        self._base = 0  # stream sample index of self._audio[0]
        self._open: _Utterance | None = None
        self._waiting: deque[_Utterance] = deque()  # ended, final flush still to run
        self._next_index = 0
        self._history = ""  # committed text of earlier utterances, for the prompt

    # -- input ------------------------------------------------------------------------------------------

    @property
    def end_ms(self) -> int:
        """Audio received, in stream ms."""
        return (self._base + len(self._audio)) // SAMPLES_PER_MS

    @property
    def backlog_s(self) -> float:
        """Audio received but not yet committed, in seconds: the work still ahead."""
        oldest = self._waiting[0] if self._waiting else self._open
        return 0.0 if oldest is None else max(0, self.end_ms - oldest.cut_ms) / 1000

    def add_audio(self, samples: np.ndarray) -> None:
        """Appends float32 16 kHz samples, shape (n,), and drops audio no utterance can need any more."""
        self._audio = np.concatenate([self._audio, samples.astype(np.float32, copy=False)])
        oldest = self._waiting[0] if self._waiting else self._open
        keep_ms = (
            self._decode_from_ms(oldest)
            if oldest is not None
            else self.end_ms - int(self.params.lookback_s * 1000)
        )
        drop = max(0, keep_ms * SAMPLES_PER_MS - self._base)
        if drop:
            self._audio = self._audio[drop:]
            self._base += drop

    def boundary(self, kind: BoundaryKind, at_ms: int) -> list[Update]:
        """Takes a speech boundary from the caller's VAD, sent after the audio up to ``at_ms``.

        A START while an utterance is open ends that one first (at ``at_ms``); a PAUSE or END without an
        open utterance is ignored. Returns the updates decided without a decode (a final result whose
        tail was already committed at a pause).
        """
        if kind is BoundaryKind.START:
            updates = self._close(at_ms) if self._open is not None else []
            start_ms = max(at_ms, self._base // SAMPLES_PER_MS)
            self._open = _Utterance(self._next_index, start_ms, cut_ms=start_ms, decoded_to_ms=start_ms)
            self._next_index += 1
            return updates
        if self._open is None:
            return []
        if kind is BoundaryKind.END:
            return self._close(at_ms)
        if self.params.policy is Policy.LOCAL_AGREEMENT:
            self._open.flushes.append((BoundaryKind.PAUSE, at_ms))
        return self._settle()

    def finish(self) -> list[Update]:
        """The stream ended: the open utterance ends with the audio."""
        return self._close(self.end_ms) if self._open is not None else []

    def start_whole_stream(self) -> None:
        """Without caller endpointing: the whole stream is one utterance, from 0."""
        self.boundary(BoundaryKind.START, 0)

    def _close(self, end_ms: int) -> list[Update]:
        utterance = self._open
        assert utterance is not None
        self._open = None
        utterance.end_ms = max(end_ms, utterance.start_ms)
        utterance.flushes.append((BoundaryKind.END, utterance.end_ms))
        self._waiting.append(utterance)
        return self._settle()

    # -- scheduling -------------------------------------------------------------------------------------

    def next_job(self) -> DecodeJob | None:
        """What to decode now: the oldest pending flush, else an agreement decode of the open utterance."""
        for utterance in (*self._waiting, self._open):
            if utterance is not None and utterance.flushes:
                kind, at_ms = utterance.flushes[0]
                return self._job(utterance, at_ms, final=True, boundary=kind)
        utterance = self._open
        if utterance is None or self._waiting:
            return None
        if self.params.policy is Policy.UTTERANCE and not self.params.interim_results:
            return None
        if self.end_ms - utterance.decoded_to_ms < self.params.min_chunk_s * 1000:
            return None
        if self.end_ms - utterance.last_committed_ms < self.params.min_chunk_s * 500:
            return None  # almost everything is committed: wait for more speech
        due_for_ms = self.end_ms - utterance.decoded_to_ms - self.params.min_chunk_s * 1000
        if due_for_ms < _MAX_QUIET_DEFER_MS and self._quiet_tail(utterance):
            return None  # the speaker may be pausing: leave the model free for the pause's final decode
        return self._job(utterance, self.end_ms, final=False)

    def _quiet_tail(self, utterance: _Utterance) -> bool:
        """Whether the newest audio is quiet next to the speech of the utterance's audio to decode.

        RMS of the last :data:`_QUIET_TAIL_MS` under :data:`_QUIET_RATIO` of the loudest block of that
        length (blocks counted back from the end); digital silence throughout is not quiet (nothing to
        compare with).
        """
        block = _QUIET_TAIL_MS * SAMPLES_PER_MS
        start = max(0, self._decode_from_ms(utterance) * SAMPLES_PER_MS - self._base)
        usable = (len(self._audio) - start) // block * block
        if usable < 2 * block:
            return False
        blocks = self._audio[len(self._audio) - usable :].reshape(-1, block)
        rms = np.sqrt(np.mean(blocks**2, axis=1))
        return bool(rms[-1] < _QUIET_RATIO * rms.max())

    def _job(
        self, utterance: _Utterance, to_ms: int, final: bool, boundary: BoundaryKind | None = None
    ) -> DecodeJob:
        start = max(0, self._decode_from_ms(utterance) * SAMPLES_PER_MS - self._base)
        stop = max(start, to_ms * SAMPLES_PER_MS - self._base)
        return DecodeJob(
            utterance_index=utterance.index,
            audio=self._audio[start:stop].copy(),
            offset_ms=(self._base + start) // SAMPLES_PER_MS,
            prompt=self._prompt(utterance, (self._base + start) // SAMPLES_PER_MS),
            final=final,
            boundary=boundary,
            language=utterance.language or self._language,
        )

    def _decode_from_ms(self, utterance: _Utterance) -> int:
        """Where a decode of the utterance starts: ``context_s`` of committed audio before the cut."""
        return max(utterance.start_ms, utterance.cut_ms - int(self.params.context_s * 1000))

    def _prompt(self, utterance: _Utterance, audio_from_ms: int) -> str:
        """Committed text said before ``audio_from_ms`` (the decode's audio holds the rest)."""
        before = [w for w in utterance.committed if w.end_ms <= audio_from_ms]
        text = " ".join(t for t in (self._initial_prompt, self._history, join_words(before)) if t)
        return text[-_PROMPT_CHARS:].lstrip()

    def _settle(self) -> list[Update]:
        """Runs the flushes that need no decode (an END right after a pause); returns their updates.

        Oldest first, up to the first flush that needs a decode, so updates keep the utterances' order.
        """
        updates: list[Update] = []
        for utterance in (*self._waiting, self._open):
            while utterance is not None and utterance.flushes:
                kind, at_ms = utterance.flushes[0]
                if at_ms - utterance.cut_ms >= _MIN_TAIL_MS:
                    return updates
                utterance.flushes.popleft()
                updates += self._flushed(utterance, kind, at_ms, [])
        return updates

    # -- results ----------------------------------------------------------------------------------------

    def apply(self, job: DecodeJob, words: Sequence[TimedWord], language: str) -> list[Update]:
        """Takes the decode of ``job``: its words with stream times, and the language decoded.

        Returns:
            The updates to send, in order (the settled flushes that follow included).
        """
        utterance = self._find(job.utterance_index)
        if utterance is None:
            return []
        utterance.language = utterance.language or language or None
        end_ms = job.offset_ms + len(job.audio) // SAMPLES_PER_MS
        utterance.decoded_to_ms = max(utterance.decoded_to_ms, end_ms)
        hypothesis = self._hypothesis(utterance, words)
        if job.final:
            kind, at_ms = utterance.flushes.popleft()
            return self._flushed(utterance, kind, at_ms, hypothesis) + self._settle()
        agreed: list[TimedWord] = []
        if self.params.policy is Policy.LOCAL_AGREEMENT:
            # The hypothesis's last word waits: at the end of the audio Whisper often cuts it or ends it
            # with a full stop that more audio takes back, which would close a clause too early.
            for old, new in zip(utterance.hypothesis, hypothesis[:-1], strict=False):
                if old.key != new.key:
                    break
                agreed.append(new)
        tail = hypothesis[len(agreed) :]
        utterance.hypothesis = tail
        commits = self._commit(utterance, agreed)
        if not commits and not self.params.interim_results:
            return []
        return [self._interim(utterance, commits, tail, end_ms)]

    def _find(self, index: int) -> _Utterance | None:
        for utterance in (*self._waiting, self._open):
            if utterance is not None and utterance.index == index:
                return utterance
        return None

    def _hypothesis(self, utterance: _Utterance, words: Sequence[TimedWord]) -> list[TimedWord]:
        """The decode's new words: those committed already removed (whisper_streaming's ``insert``)."""
        last_ms = utterance.last_committed_ms
        new = [w for w in words if w.start_ms > last_ms - _COMMITTED_SLACK_MS and w.key]
        if new and utterance.committed and abs(new[0].start_ms - last_ms) < _OVERLAP_WINDOW_MS:
            committed = utterance.committed
            for n in range(min(len(committed), len(new), _MAX_OVERLAP_WORDS), 0, -1):
                if [w.key for w in committed[-n:]] == [w.key for w in new[:n]]:
                    return new[n:]
        return new

    def _flushed(
        self, utterance: _Utterance, kind: BoundaryKind, at_ms: int, hypothesis: list[TimedWord]
    ) -> list[Update]:
        """Commits everything decoded up to a PAUSE or END; the END also gives the final result."""
        words = [w for w in hypothesis if w.start_ms < at_ms]
        utterance.hypothesis = []
        commits = self._commit(utterance, words, at_ms=at_ms)
        utterance.cut_ms = max(utterance.cut_ms, at_ms)
        utterance.decoded_to_ms = max(utterance.decoded_to_ms, at_ms)
        updates = [self._interim(utterance, commits, [], at_ms)] if commits else []
        if kind is BoundaryKind.END:
            self._waiting.remove(utterance)
            text = utterance.transcript()
            if text:
                self._history = text
            updates.append(
                Update(
                    utterance_index=utterance.index,
                    start_ms=utterance.start_ms,
                    end_ms=at_ms,
                    transcript=text,
                    stability=1.0,
                    is_final=True,
                    language=utterance.language or "",
                    all_commits=tuple(utterance.commits),
                )
            )
        return updates

    def _commit(
        self, utterance: _Utterance, words: Sequence[TimedWord], at_ms: int | None = None
    ) -> list[Commit]:
        """Commits ``words``, split after each clause-closing word; cuts the buffer (module docstring).

        ``at_ms`` is the time of the pause or end being flushed (everything before it is committed and the
        last commit closes the clause there); ``None`` for an agreement commit.
        """
        commits: list[Commit] = []
        run: list[TimedWord] = []
        for word in words:
            run.append(word)
            if word.closes_clause:
                commits.append(self._add_commit(utterance, run, closes=True, end_ms=word.end_ms))
                run = []
        if at_ms is not None:
            if run or utterance.clause_has_words:
                commits.append(self._add_commit(utterance, run, closes=True, end_ms=at_ms))
            return commits
        if run:
            commits.append(self._add_commit(utterance, run, closes=False, end_ms=run[-1].end_ms))
        if not words:
            return commits
        closing = [w for w in words if w.closes_clause]
        if closing:
            utterance.cut_ms = max(utterance.cut_ms, closing[-1].end_ms)
        elif (self.end_ms - utterance.cut_ms) / 1000 > self.params.buffer_trim_s:
            utterance.cut_ms = max(utterance.cut_ms, words[-1].end_ms)
        return commits

    def _add_commit(self, utterance: _Utterance, words: list[TimedWord], closes: bool, end_ms: int) -> Commit:
        commit = Commit(len(utterance.commits), utterance.clause_index, tuple(words), closes, end_ms)
        utterance.commits.append(commit)
        utterance.committed += words
        utterance.clause_has_words = utterance.clause_has_words or bool(words)
        if closes:
            utterance.clause_index += 1
            utterance.clause_has_words = False
        return commit

    def _interim(
        self, utterance: _Utterance, commits: list[Commit], tail: Sequence[TimedWord], end_ms: int
    ) -> Update:
        n_committed = len(utterance.committed)
        n_words = n_committed + len(tail)
        return Update(
            utterance_index=utterance.index,
            start_ms=utterance.start_ms,
            end_ms=end_ms,
            transcript=utterance.transcript(tail),
            stability=n_committed / n_words if n_words else 1.0,
            commits=tuple(commits),
            language=utterance.language or "",
        )
