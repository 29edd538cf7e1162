"""Batched greedy decoding of the embedded llm backend (:func:`greedy_decode`) over a scripted fake model."""

from __future__ import annotations

import threading

import pytest

from services.common.deadlines import Deadline
from services.common.errors import DeadlineExceeded, InvalidArgument
from services.translate.llama import EmbeddedLlamaBackend, greedy_decode, loop_length

END = 1  # end of generation
NEWLINE = 10  # the piece b"\n"
SPLIT = 11  # the piece b"x\ny": a line break inside a token
PREFIX = [2, 50, 51, 52]  # BOS and three few-shot tokens


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


class ScriptedDecoder:
    """A model whose next token is scripted per prompt, checking what a llama.cpp context requires.

    ``replies`` maps a prompt's own tokens (after the prefix) to the tokens it generates. The fake checks
    that positions follow on, that no more than ``n_seq`` sequences run, that the cells in use never
    exceed ``n_ctx`` (the prefix once, then each sequence's own tokens), and that sequence 0 is only
    loaded when the prefix changes.
    """

    def __init__(self, replies: dict[tuple[int, ...], list[int]], n_ctx: int = 1000, n_seq: int = 8):
        self.replies = replies
        self.n_ctx = n_ctx
        self.n_seq = n_seq
        self.prefix: list[int] = []
        self.prefix_loads = 0
        self.history: dict[int, list[int]] = {}
        self.shared: dict[int, int] = {}
        self.steps: list[list[tuple[int, int]]] = []  # per step: (seq_id, tokens fed)
        self.clock: FakeClock | None = None

    def load_prefix(self, tokens: list[int]) -> None:
        if tokens != self.prefix:
            assert not self.history, "the prefix changed under running sequences"
            self.prefix = list(tokens)
            self.prefix_loads += 1

    def fork(self, seq_id: int, n_tokens: int) -> None:
        assert 1 <= seq_id <= self.n_seq and seq_id not in self.history
        self.history[seq_id] = self.prefix[:n_tokens]
        self.shared[seq_id] = n_tokens

    def step(self, feeds: list[tuple[int, list[int], int]]) -> list[int]:
        out = []
        for seq_id, tokens, first in feeds:
            history = self.history[seq_id]
            assert first == len(history), "positions must follow on"
            history.extend(tokens)
            own = tuple(history[len(self.prefix) :])
            prompt = next(p for p in self.replies if own[: len(p)] == p)
            reply = self.replies[prompt]
            generated = len(own) - len(prompt)
            out.append(reply[generated] if generated < len(reply) else END)
        used = len(self.prefix) + sum(len(h) - self.shared[s] for s, h in self.history.items())
        assert used <= self.n_ctx, f"{used} cells in use, the context has {self.n_ctx}"
        assert len(self.history) <= self.n_seq
        self.steps.append([(seq_id, len(tokens)) for seq_id, tokens, _ in feeds])
        if self.clock:
            self.clock.now += 1.0
        return out

    def release(self, seq_id: int) -> None:
        del self.history[seq_id]

    def piece(self, token: int) -> bytes:
        return {NEWLINE: b"\n", SPLIT: b"x\ny"}.get(token, f"w{token} ".encode())

    def is_end(self, token: int) -> bool:
        return token == END


def decode(decoder, prompts, budgets=None, deadline=None):
    full = [PREFIX + list(p) for p in prompts]
    return greedy_decode(decoder, PREFIX, full, budgets or [50] * len(prompts), deadline or Deadline(None))


def test_each_prompt_gets_its_own_continuation_in_order_with_one_token_per_sequence_per_step():
    replies = {(100,): [101, 102, END], (200, 201): [202, NEWLINE, 999], (300,): [301, 302, 303, 304, END]}
    decoder = ScriptedDecoder(replies)
    out = decode(decoder, [(100,), (200, 201), (300,)])
    assert out == [b"w101 w102 ", b"w202 ", b"w301 w302 w303 w304 "]
    # One pass for all three prompts, then one token per running sequence; finished ones drop out.
    assert [len(step) for step in decoder.steps] == [3, 3, 2, 1, 1]
    assert decoder.steps[0] == [(1, 1), (2, 2), (3, 1)]
    assert all(n == 1 for step in decoder.steps[1:] for _, n in step)
    assert decoder.history == {} and decoder.prefix_loads == 1


def test_prompts_from_more_join_the_running_batch_at_the_next_step():
    """In-flight batching: a sentence that arrives while another decodes joins it, output after it."""
    replies = {(100,): [101, 102, 103, 104, END], (200,): [201, END], (300,): [301, END]}
    decoder = ScriptedDecoder(replies, n_seq=2)
    queued: list[tuple[list[int], int]] = []
    asked: list[int] = []

    def more(limit: int) -> list[tuple[list[int], int]]:
        asked.append(limit)
        if len(decoder.steps) == 2:  # two sentences arrive before step 2
            queued.extend([(PREFIX + [200], 50), (PREFIX + [300], 50)])
        taken = queued[:limit]
        del queued[:limit]
        return taken

    finished: list[tuple[int, bytes]] = []
    out = greedy_decode(
        decoder, PREFIX, [PREFIX + [100]], [50], Deadline(None), more, lambda i, b: finished.append((i, b))
    )
    assert out == [b"w101 w102 w103 w104 ", b"w201 ", b"w301 "]
    assert finished == [(1, b"w201 "), (0, b"w101 w102 w103 w104 "), (2, b"w301 ")]  # each as it ends
    # Step 2 feeds the first sentence's token and the second's prompt together; the third waits for an id.
    assert decoder.steps[2] == [(1, 1), (2, 1)]
    assert asked[:3] == [1, 1, 1]
    assert decoder.history == {}


def test_generation_stops_at_an_end_token_a_line_break_or_the_budget():
    replies = {(100,): [END], (101,): [7, SPLIT, 8], (102,): [7, 8, 9, 12, 13]}
    out = decode(ScriptedDecoder(replies), [(100,), (101,), (102,)], budgets=[5, 5, 3])
    assert out == [b"", b"w7 x", b"w7 w8 w9 "]


def test_prompts_wait_for_a_free_sequence_and_for_room_in_the_context():
    replies = {(100 + i,): [200 + 10 * i, 201 + 10 * i, END] for i in range(5)}
    prompts = [(100 + i,) for i in range(5)]
    expected = [f"w{200 + 10 * i} w{201 + 10 * i} ".encode() for i in range(5)]

    few_ids = ScriptedDecoder(replies, n_seq=2)
    assert decode(few_ids, prompts, budgets=[3] * 5) == expected
    assert max(len(step) for step in few_ids.steps) == 2

    # Each prompt reserves its own token plus a budget of 3: room for two after the 4 prefix tokens.
    little_room = ScriptedDecoder(replies, n_ctx=len(PREFIX) + 9)
    assert decode(little_room, prompts, budgets=[3] * 5) == expected
    assert max(len(step) for step in little_room.steps) == 2


def test_a_budget_is_cut_to_the_room_left_and_a_prompt_that_fills_the_context_is_rejected():
    decoder = ScriptedDecoder({(100, 100, 100): [7] * 20}, n_ctx=len(PREFIX) + 10)
    assert decode(decoder, [(100, 100, 100)], budgets=[50]) == [b"w7 " * 7]
    steps = len(decoder.steps)
    with pytest.raises(InvalidArgument, match="prompt of 10 tokens does not fit the 10 tokens"):
        decode(decoder, [(100, 100, 100), (100,) * 10])
    assert len(decoder.steps) == steps, "nothing of the batch is decoded"


def test_the_deadline_is_checked_between_steps_and_frees_every_sequence():
    replies = {(100,): [7] * 40, (101,): [END], (102,): [8] * 40}
    decoder = ScriptedDecoder(replies)
    decoder.clock = FakeClock()
    deadline = Deadline(2.5, decoder.clock)
    with pytest.raises(DeadlineExceeded, match="with 1 of 3 sentences translated"):
        decode(decoder, [(100,), (101,), (102,)], deadline=deadline)
    assert len(decoder.steps) == 3
    assert decoder.history == {}


def test_the_prefix_is_evaluated_once_and_shared_up_to_where_a_prompt_departs_from_it():
    replies = {(100,): [7, END], (): [9, END]}
    decoder = ScriptedDecoder(replies)
    decode(decoder, [(100,)])
    decode(decoder, [(100,)])
    assert decoder.prefix_loads == 1
    # A prompt that departs from the prefix after two tokens evaluates the rest itself.
    departing = [PREFIX[:2] + [60, 61]]
    out = greedy_decode(decoder, PREFIX, departing, [5], Deadline(None))
    assert out == [b"w9 "]
    assert decoder.steps[-2:] == [[(1, 2)], [(1, 1)]]
    assert decoder.prefix_loads == 1


def test_loop_length_finds_a_loop_only_at_the_end_and_only_past_the_thresholds():
    assert loop_length([5] * 12) == 0 and loop_length([5] * 13) == 12  # one token: 13 times
    assert loop_length([4] + [7, 8] * 7) == 12 and loop_length([7, 8] * 6) == 0  # two tokens: 7 times
    assert loop_length([1, 2, 3, 4, 5, 6, 7, 8] * 3) == 16 and loop_length([1, 2, 3, 4, 5, 6, 7, 8] * 2) == 0
    assert loop_length([7, 8] * 7 + [9]) == 0, "a loop that ended is not at the end"
    assert loop_length(list(range(30))) == 0


def test_a_sentence_that_falls_into_a_repetition_loop_stops_early_and_keeps_one_copy():
    looping = [20, 21] + [30, 31, 32] * 30  # a three-token phrase again and again, never an end token
    replies = {(100,): looping, (200,): [40] * 5 + [END]}
    decoder = ScriptedDecoder(replies)
    out = decode(decoder, [(100,), (200,)], budgets=[200, 200])
    assert out == [b"w20 w21 w30 w31 w32 ", b"w40 " * 5], "a short repetition is no loop"
    # The loop is seen once the phrase has come five times (12 repeated tokens): 2 + 15 tokens generated.
    assert len(decoder.steps) == 17
    assert decoder.history == {}


class ThreadRecordingDecoder:
    """A context that ends every sentence at once and records the thread of each llama.cpp-like call."""

    n_ctx = 1000
    n_seq = 4

    def __init__(self) -> None:
        self.threads: set[int] = set()

    def _called(self) -> None:
        self.threads.add(threading.get_ident())

    def load_prefix(self, tokens: list[int]) -> None:
        self._called()

    def fork(self, seq_id: int, n_tokens: int) -> None:
        self._called()

    def step(self, feeds: list[tuple[int, list[int], int]]) -> list[int]:
        self._called()
        return [END] * len(feeds)

    def release(self, seq_id: int) -> None:
        self._called()

    def piece(self, token: int) -> bytes:
        return b""

    def is_end(self, token: int) -> bool:
        return token == END

    def close(self) -> None:
        self._called()


class CharModel:
    """A tokenizer: one token per character (BOS 2 first)."""

    def tokenize(self, text: str, *, bos: bool) -> list[int]:
        return [2] * bos + [100 + ord(c) % 50 for c in text]

    def close(self) -> None:
        pass


def test_a_context_is_warmed_decoded_and_closed_on_one_thread_of_its_own():
    """llama.cpp's OpenMP teams belong to the calling thread: two callers made it 2.4x slower (llama.py)."""
    decoder = ThreadRecordingDecoder()
    backend = EmbeddedLlamaBackend(CharModel(), [decoder], ("en", "fr"), "fake", 16)  # type: ignore[arg-type]
    backend.warmup()
    pair = backend.resolve("en", "fr")
    callers = [threading.Thread(target=backend.translate_sentences, args=(["Hi."], pair, Deadline(None)))]
    callers += [
        threading.Thread(target=fn, args=(["Yes."], pair, Deadline(None))) for fn in backend.instance_fns()
    ]
    for caller in callers:
        caller.start()
        caller.join()
    backend.close()
    assert len(decoder.threads) == 1
    assert decoder.threads.isdisjoint({threading.get_ident(), *(c.ident for c in callers)})
