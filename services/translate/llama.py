"""The embedded llm backend: llama.cpp in this process through llama-cpp-python's low-level C API.

:class:`EmbeddedLlamaBackend` is the CPU default (Gemma 3 270M, Q4_K_M GGUF, bundled), prompted in the
completion form of :mod:`services.translate.prompts`. The model is loaded once (:class:`GgufModel`); each
of the ``llm_instances`` instances is a llama.cpp context on it (:class:`LlamaContext`), warmed and decoded
on one thread of its own for its whole life (on a server, the batcher's instance threads hand their batches
to it). llama.cpp's OpenMP thread teams belong to the thread that computes: a context warmed on the loading
thread and then decoded on a batcher thread left two teams on 2 cores (libgomp's GOMP_SPINCOUNT
documentation: with more OpenMP threads than CPUs it spins far less before sleeping), and a sentence took
1.10 s instead of 0.45 s (Gemma 3 270M, 2 threads, measured in process). A batch is
decoded together (:func:`greedy_decode`): the few-shot prefix is evaluated once per language pair into
sequence 0 and its KV cells are shared by every sentence's sequence, the rest of each prompt (its context
example and its sentence) joins in one forward pass, then each step is one forward pass with one token per
running sentence. A context's ``llm_context_tokens`` KV cells are shared by its sentences; a sentence that
finds no room waits until others finish. A sentence stops at a line break, at its generation budget
(:func:`services.translate.prompts.max_new_tokens`) or as soon as its output falls into a repetition loop
(:func:`loop_length`).

``llama_cpp`` is imported only where a model is loaded, so importing this module costs nothing.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import logging
import os
import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from services.common.deadlines import Deadline
from services.common.errors import DeadlineExceeded, InvalidArgument, ParleyError
from services.translate.config import TranslateConfig
from services.translate.context import FinishedSentence, MoreSentences, SentenceContexts
from services.translate.prompts import (
    LanguageSet,
    LlmPair,
    clean_output,
    completion_prompt,
    few_shot_prefix,
    max_new_tokens,
)

logger = logging.getLogger(__name__)

# A repetition loop (see loop_length): a unit of at most this many tokens...
LOOP_MAX_UNIT_TOKENS = 8
# ...said at least this many times in a row...
LOOP_MIN_COPIES = 3
# ...whose copies after the first hold at least this many tokens.
LOOP_MIN_REPEATED_TOKENS = 12

# One forward-pass feed: (sequence id, tokens, position of the first token).
Feed = tuple[int, list[int], int]


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class TokenDecoder(Protocol):
    """A model context that decodes several sequences at once; what :func:`greedy_decode` drives.

    Sequence 0 holds the prompt prefix; sentences get sequence ids ``1..n_seq``.

    Attributes:
        n_ctx: KV cache cells, shared by all sequences (cells copied from sequence 0 are stored once).
        n_seq: Sentence sequences that may run at once.
    """

    n_ctx: int
    n_seq: int

    def load_prefix(self, tokens: list[int]) -> None:
        """Makes sequence 0 hold exactly ``tokens``; evaluates them unless it already does."""
        ...

    def fork(self, seq_id: int, n_tokens: int) -> None:
        """Gives the empty sequence ``seq_id`` the first ``n_tokens`` positions of sequence 0."""
        ...

    def step(self, feeds: list[Feed]) -> list[int]:
        """One forward pass over every ``(seq_id, tokens, first_position)`` feed.

        Returns:
            The most likely next token after each feed's last token, in feed order.
        """
        ...

    def release(self, seq_id: int) -> None:
        """Frees the cells of ``seq_id`` (cells shared with sequence 0 stay)."""
        ...

    def piece(self, token: int) -> bytes:
        """The UTF-8 bytes of a generated token (empty for a control token)."""
        ...

    def is_end(self, token: int) -> bool:
        """True for an end-of-generation token."""
        ...


def loop_length(tokens: list[int]) -> int:
    """How many tokens at the end of ``tokens`` repeat a unit just before them (a repetition loop).

    A loop is a unit of at most :data:`LOOP_MAX_UNIT_TOKENS` tokens followed at once by copies of itself,
    :data:`LOOP_MIN_COPIES` occurrences or more, whose copies after the first hold at least
    :data:`LOOP_MIN_REPEATED_TOKENS` tokens: "no, no, no" and "very very" are no loop, a phrase of three
    tokens said five times is. Only the end is checked (not
    :func:`services.common.text.tandem_repeats`, which scans a whole text for runs anywhere): called after
    every generated token, this finds a loop as soon as it forms, in a few list comparisons.

    Args:
        tokens: The tokens generated so far.

    Returns:
        The number of tokens of the copies after the unit's first occurrence; 0 when there is no loop.
    """
    for unit in range(1, LOOP_MAX_UNIT_TOKENS + 1):
        copies = max(LOOP_MIN_COPIES, 1 + -(-LOOP_MIN_REPEATED_TOKENS // unit))
        span = unit * copies
        if len(tokens) >= span and tokens[-span:] == tokens[-unit:] * copies:
            return span - unit
    return 0


@dataclass
class _Running:
    """A sentence being decoded: its batch position, next position, last token and what it generated.

    ``pieces`` holds the bytes of each token in ``tokens``.
    """

    index: int
    pos: int
    last: int = -1
    tokens: list[int] = field(default_factory=list)
    pieces: list[bytes] = field(default_factory=list)


def _common_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class _Batch:
    """The prompts of one :func:`greedy_decode` call: waiting, running (by sequence id) and their outputs.

    Raises:
        InvalidArgument: A prompt alone fills the context.
    """

    def __init__(
        self,
        decoder: TokenDecoder,
        prefix: list[int],
        prompts: list[list[int]],
        budgets: list[int],
        done: Callable[[int, bytes], None] | None = None,
    ):
        self.decoder = decoder
        self.done = done
        self.prefix = prefix
        self.capacity = decoder.n_ctx - len(prefix)  # cells beside the prefix
        self.room = self.capacity  # of which not reserved by a running sentence
        self.prompts: list[list[int]] = []
        self.shared: list[int] = []
        self.budgets: list[int] = []
        self.needs: list[int] = []
        self.waiting: collections.deque[int] = collections.deque()
        self.free_ids = list(range(decoder.n_seq, 0, -1))
        self.running: dict[int, _Running] = {}
        self.outputs: list[bytes] = []
        self.finished = 0
        for prompt, budget in zip(prompts, budgets, strict=True):
            self.add(prompt, budget)

    def add(self, prompt: list[int], budget: int) -> None:
        """Queues one more prompt (its output goes last); it joins at a step with a free id and room."""
        # At least the last prompt token is evaluated by the sentence's own sequence, for its logits.
        shared = min(_common_length(self.prefix, prompt), len(prompt) - 1)
        own = len(prompt) - shared
        if own >= self.capacity:
            raise InvalidArgument(
                f"a sentence's prompt of {own} tokens does not fit the {self.capacity} tokens of the "
                "llama.cpp context left after the few-shot prompt; cut it shorter (the server's "
                "--max-sentence-chars) or raise --llm-context-tokens"
            )
        # As llama-cpp-python's create_completion does, a budget never reaches past the context.
        budget = min(budget, self.capacity - own)
        self.waiting.append(len(self.prompts))
        self.prompts.append(prompt)
        self.shared.append(shared)
        self.budgets.append(budget)
        self.needs.append(own + budget)
        self.outputs.append(b"")

    @property
    def open_ids(self) -> int:
        """Sequence ids not taken by a running or waiting prompt: how many more prompts could start now."""
        return len(self.free_ids) - len(self.waiting)

    def feeds(self) -> list[Feed]:
        """Each running sentence's last token, then the prompts that join while ids and room are free."""
        feeds = [(seq_id, [run.last], run.pos) for seq_id, run in self.running.items()]
        while self.waiting and self.free_ids and self.needs[self.waiting[0]] <= self.room:
            index = self.waiting.popleft()
            seq_id = self.free_ids.pop()
            self.room -= self.needs[index]
            self.decoder.fork(seq_id, self.shared[index])
            self.running[seq_id] = _Running(index, self.shared[index])
            feeds.append((seq_id, self.prompts[index][self.shared[index] :], self.shared[index]))
        return feeds

    def advance(self, feeds: list[Feed], tokens: list[int]) -> None:
        """Takes each fed sequence's next token; a sentence that is done frees its sequence and room."""
        for (seq_id, fed, _), token in zip(feeds, tokens, strict=True):
            run = self.running[seq_id]
            run.pos += len(fed)
            if self._take(run, token):
                self._finish(seq_id)
            else:
                run.last = token

    def _take(self, run: _Running, token: int) -> bool:
        """Adds a generated token to ``run``; True when its sentence is done (see :func:`greedy_decode`)."""
        if self.decoder.is_end(token):
            return True
        piece = self.decoder.piece(token)
        cut = piece.find(b"\n")
        run.tokens.append(token)
        run.pieces.append(piece if cut < 0 else piece[:cut])
        if cut >= 0:
            return True
        looped = loop_length(run.tokens)
        if looped:
            del run.pieces[-looped:]
            return True
        return len(run.tokens) >= self.budgets[run.index]

    def _finish(self, seq_id: int) -> None:
        run = self.running.pop(seq_id)
        self.decoder.release(seq_id)
        self.free_ids.append(seq_id)
        self.room += self.needs[run.index]
        self.outputs[run.index] = b"".join(run.pieces)
        self.finished += 1
        if self.done is not None:
            self.done(run.index, self.outputs[run.index])

    def release_all(self) -> None:
        """Frees the sequences still running (after an error or a deadline)."""
        for seq_id in self.running:
            self.decoder.release(seq_id)


# In-flight batching: more(n) returns up to n more (prompt tokens, budget) pairs to decode with the batch.
MorePrompts = Callable[[int], list[tuple[list[int], int]]]


def greedy_decode(
    decoder: TokenDecoder,
    prefix: list[int],
    prompts: list[list[int]],
    budgets: list[int],
    deadline: Deadline,
    more: MorePrompts | None = None,
    done: Callable[[int, bytes], None] | None = None,
) -> list[bytes]:
    """Greedy continuations of prompts that share a prefix, decoded together.

    Sequence 0 holds ``prefix``; each prompt runs in a sequence of its own that starts as a copy of the
    prefix positions it shares, so only the rest of the prompt is evaluated. Each step is one forward pass
    with one token per running sequence (the rest of its prompt for a sequence that joins) and takes the
    most likely next token of each. A sequence stops at an end-of-generation token, at a generated line
    break (the bytes before it are kept), once its output ends in a repetition loop (:func:`loop_length`;
    the loop's copies are dropped, its first occurrence kept) or once it has generated its budget (cut to
    the room the context has beside the prompt). Prompts join in order while a sequence id and room in the
    context are free; each reserves its own prompt tokens plus its budget until it stops, so more prompts
    than the context holds wait for room instead of failing. With ``more``, before each step the batch takes
    up to as many new prompts as it has free sequence ids (in-flight batching: a sentence that arrives while
    others decode joins them at the next step instead of waiting for the whole batch).

    Args:
        decoder: The model context; used by this thread only.
        prefix: Tokens every prompt starts with (the model's BOS first, if it has one).
        prompts: Each prompt's tokens, prefix included.
        budgets: Most tokens generated per prompt, at least 1.
        deadline: Checked before every step.
        more: Called before every step for more prompts sharing ``prefix``; None for a static batch.
        done: Called with (prompt index, its bytes) as each prompt finishes, on this thread.

    Returns:
        The generated bytes of each prompt, then of each prompt ``more`` gave, in order, cut before the
        first line break.

    Raises:
        InvalidArgument: A prompt alone fills the context.
        DeadlineExceeded: The deadline passed before every prompt was done.
    """
    batch = _Batch(decoder, prefix, prompts, budgets, done)
    decoder.load_prefix(prefix)
    try:
        while True:
            if more is not None and batch.open_ids > 0:
                for prompt, budget in more(batch.open_ids):
                    batch.add(prompt, budget)
            if not (batch.waiting or batch.running):
                break
            if deadline.expired():
                raise DeadlineExceeded(
                    f"the caller's deadline passed with {batch.finished} of {len(batch.prompts)} sentences "
                    "translated"
                )
            feeds = batch.feeds()
            batch.advance(feeds, decoder.step(feeds))
    finally:
        batch.release_all()
    return batch.outputs


class GgufModel:
    """A GGUF model loaded by llama.cpp: weights and vocabulary, shared by every context decoding with it.

    Args:
        path: The GGUF file.

    Raises:
        ValueError: llama.cpp could not load the file.
    """

    def __init__(self, path: Path):
        import llama_cpp

        self._lib: Any = llama_cpp
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(
            str(path).encode(), llama_cpp.llama_model_default_params()
        )
        if not self.model:
            raise ValueError(f"llama.cpp could not load the GGUF model {path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self._vocab)

    def tokenize(self, text: str, *, bos: bool) -> list[int]:
        """Tokens of ``text``, after the model's BOS if ``bos``; special-token text is not parsed."""
        data = text.encode("utf-8")
        size = len(data) + 2
        while True:
            buffer = (self._lib.llama_token * size)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buffer, size, bos, False)
            if n >= 0:
                return list(buffer[:n])
            size = -n

    def piece(self, token: int) -> bytes:
        """The bytes of one token (empty for a control token)."""
        buffer = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
        return buffer.raw[:n]

    def is_end(self, token: int) -> bool:
        """True for an end-of-generation token (EOS, end of turn)."""
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    def close(self) -> None:
        """Frees the weights; close every context first."""
        if self.model:
            self._lib.llama_model_free(self.model)
            self.model = None


class LlamaContext:
    """A llama.cpp context over a shared :class:`GgufModel`: one model instance's :class:`TokenDecoder`.

    The KV cache is unified (``kv_unified``): all sequences share one buffer of ``n_ctx`` cells, so the
    prefix copied to each sequence is stored once, and the attention of each token is masked to its own
    sequence (flash attention, llama.cpp's default on CPU, skips the masked cells). The sliding-window
    layers keep a full-size cache (``swa_full``), so that ``n_ctx`` bounds them too and copying prefix
    cells stays valid. A step's tokens never exceed ``n_ctx`` (:func:`greedy_decode` reserves room for
    them), so ``n_batch = n_ctx`` lets one ``llama_decode`` take any step; llama.cpp splits it into
    ``n_ubatch`` pieces itself. Not thread-safe.

    Args:
        model: Weights and vocabulary, read-only while decoding.
        n_ctx: KV cache cells, shared by all sequences.
        n_seq: Sentences decoded at once.
        threads: CPU threads of a forward pass.

    Raises:
        ValueError: llama.cpp could not create the context.
    """

    def __init__(self, model: GgufModel, n_ctx: int, n_seq: int, threads: int):
        import llama_cpp

        lib: Any = llama_cpp
        self._lib = lib
        self._model = model
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_ctx
        params.n_seq_max = n_seq + 1
        params.kv_unified = True
        params.swa_full = True
        params.n_threads = threads
        params.n_threads_batch = threads
        self._ctx = lib.llama_init_from_model(model.model, params)
        if not self._ctx:
            raise ValueError(f"llama.cpp could not create a context of {n_ctx} tokens for {n_seq} sequences")
        self._memory = lib.llama_get_memory(self._ctx)
        # llama.cpp pads the cache to a multiple of 256 cells; a step may hold no more than n_batch tokens.
        self.n_ctx: int = min(lib.llama_n_ctx(self._ctx), lib.llama_n_batch(self._ctx))
        self.n_seq = n_seq
        self._batch = lib.llama_batch_init(self.n_ctx, 0, 1)
        self._prefix: list[int] = []

    def load_prefix(self, tokens: list[int]) -> None:
        """Makes sequence 0 hold exactly ``tokens`` (the cache is emptied when they change)."""
        if tokens == self._prefix:
            return
        self._lib.llama_memory_clear(self._memory, False)
        self._prefix = []
        self.step([(0, tokens, 0)])
        self._prefix = list(tokens)

    def fork(self, seq_id: int, n_tokens: int) -> None:
        """Adds ``seq_id`` to the cells of positions ``[0, n_tokens)`` of sequence 0 (no copy of data)."""
        self._lib.llama_memory_seq_cp(self._memory, 0, seq_id, 0, n_tokens)

    def step(self, feeds: list[Feed]) -> list[int]:
        """One ``llama_decode`` over the feeds; logits only for each feed's last token, greedy argmax.

        Raises:
            ParleyError: ``llama_decode`` failed; the cache is emptied (the prefix is evaluated again).
        """
        batch = self._batch
        n = 0
        for seq_id, tokens, first in feeds:
            for offset, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = first + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq_id
                batch.logits[n] = offset == len(tokens) - 1
                n += 1
        batch.n_tokens = n
        status = self._lib.llama_decode(self._ctx, batch)
        if status != 0:
            self._lib.llama_memory_clear(self._memory, False)
            self._prefix = []
            raise ParleyError(f"llama_decode failed with status {status} on a step of {n} tokens")
        next_tokens = []
        row = -1
        for _, tokens, _ in feeds:
            row += len(tokens)
            logits = np.ctypeslib.as_array(
                self._lib.llama_get_logits_ith(self._ctx, row), shape=(self._model.n_vocab,)
            )
            next_tokens.append(int(logits.argmax()))
        return next_tokens

    def release(self, seq_id: int) -> None:
        """Removes ``seq_id`` from the cache; cells it shares with sequence 0 stay."""
        self._lib.llama_memory_seq_rm(self._memory, seq_id, -1, -1)

    def piece(self, token: int) -> bytes:
        """See :meth:`GgufModel.piece`."""
        return self._model.piece(token)

    def is_end(self, token: int) -> bool:
        """See :meth:`GgufModel.is_end`."""
        return self._model.is_end(token)

    def close(self) -> None:
        """Frees the batch and the context."""
        if self._ctx:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
            self._ctx = None


class EmbeddedLlamaBackend:
    """A GGUF model run in-process by llama.cpp; the sentences of a batch are decoded together.

    Args:
        model: The loaded model: its tokenizer here; freed by :meth:`close`.
        decoders: One context per model instance, each used by one thread at a time.
        languages: Languages offered (keys of :data:`~services.translate.prompts.LANGUAGE_NAMES`).
        model_name: Reported in responses.
        max_tokens: Most tokens generated per sentence.
    """

    def __init__(
        self,
        model: GgufModel,
        decoders: list[LlamaContext],
        languages: tuple[str, ...],
        model_name: str,
        max_tokens: int,
    ):
        if not decoders:
            raise ValueError("at least one model instance is needed")
        self._model = model
        self._decoders = list(decoders)
        # Every llama.cpp call of a context runs on that context's own thread (the module docstring).
        self._owners = {
            id(decoder): ThreadPoolExecutor(1, thread_name_prefix=f"llama-{i}")
            for i, decoder in enumerate(decoders)
        }
        self._free: queue.Queue[LlamaContext] = queue.Queue()
        for decoder in decoders:
            self._free.put(decoder)
        self._languages = LanguageSet(languages)
        self.model_name = model_name
        self.workers = len(decoders)
        self.in_flight_batching = True  # greedy_decode takes sentences between steps
        self._max_tokens = max_tokens
        self._prefixes: dict[LlmPair, list[int]] = {}

    @classmethod
    def from_config(cls, config: TranslateConfig) -> EmbeddedLlamaBackend:
        """Loads the GGUF model once, opens ``config.llm_instances`` contexts on it and warms each one.

        Each context decodes up to ``config.max_batch_size`` sentences at once in a KV cache of
        ``config.llm_context_tokens`` tokens.

        Raises:
            FileNotFoundError: The GGUF file or the bundled model's packages are missing.
            ValueError: A language without prompt examples; a corrupt bundled model; a context too small
                for the longest few-shot prompt plus ``llm_max_tokens``; more sentences per batch than
                llama.cpp decodes at once.
        """
        import llama_cpp

        from services.common import models

        languages = LanguageSet(config.llm_languages)
        most = llama_cpp.llama_max_parallel_sequences() - 1  # one sequence holds the few-shot prefix
        if config.max_batch_size > most:
            raise ValueError(
                f"--max-batch-size {config.max_batch_size}: llama.cpp decodes at most {most} sentences "
                "at once"
            )
        path = Path(config.llm_model_path) if config.llm_model_path else models.gemma3_270m_path()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model {path} does not exist")
        instances = max(1, config.llm_instances)
        threads = config.llm_threads or max(1, _cpu_count() // instances)
        # llama.cpp logs through llama-cpp-python's logger: errors only, as Llama(verbose=False) sets it.
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        model = GgufModel(path)
        contexts: list[LlamaContext] = []
        try:
            _check_context(model, languages, config.llm_context_tokens, config.llm_max_tokens)
            for _ in range(instances):
                contexts.append(
                    LlamaContext(model, config.llm_context_tokens, config.max_batch_size, threads)
                )
            backend = cls(
                model, contexts, languages.languages, config.model_name or path.stem, config.llm_max_tokens
            )
            backend.warmup()
        except BaseException:
            for context in contexts:
                context.close()
            model.close()
            raise
        logger.info(
            "llm: %s, %d instance(s) of %d threads, each decoding up to %d sentences in %d tokens of context",
            path.name,
            instances,
            threads,
            config.max_batch_size,
            contexts[0].n_ctx,
        )
        return backend

    def warmup(self) -> None:
        """Translates one sentence on every instance, so the first request does not pay for the first call."""
        languages = self._languages.languages
        if len(languages) < 2:
            return
        pair = LlmPair(languages[0], languages[1])
        for decoder in self._decoders:
            self._translate_on(decoder, ["Good morning."], pair, Deadline(None))

    def pairs(self) -> list[tuple[str, str]]:
        """Every ordered pair of the configured languages."""
        return self._languages.pairs()

    def resolve(self, source: str, target: str) -> LlmPair:
        """Checks the pair; raises InvalidArgument for a language without prompt examples."""
        return self._languages.resolve(source, target, self.model_name)

    def _prefix_tokens(self, pair: LlmPair) -> list[int]:
        tokens = self._prefixes.get(pair)
        if tokens is None:
            tokens = self._model.tokenize(few_shot_prefix(pair.source, pair.target), bos=True)
            self._prefixes[pair] = tokens
        return tokens

    def _translate_on(
        self,
        decoder: LlamaContext,
        sentences: list[str],
        pair: LlmPair,
        deadline: Deadline,
        contexts: SentenceContexts | None = None,
        more: MoreSentences | None = None,
        finished: FinishedSentence | None = None,
    ) -> list[str]:
        sentences = list(sentences)
        prompts = [
            completion_prompt(s, pair.source, pair.target, c)
            for s, c in zip(sentences, contexts or [None] * len(sentences), strict=True)
        ]
        budgets = [
            max_new_tokens(len(self._model.tokenize(s, bos=False)), self._max_tokens) for s in sentences
        ]

        def more_prompts(limit: int) -> list[tuple[list[int], int]]:
            assert more is not None
            joined = []
            for sentence, context in more(limit):
                prompt = completion_prompt(sentence, pair.source, pair.target, context)
                sentences.append(sentence)
                prompts.append(prompt)
                budget = max_new_tokens(len(self._model.tokenize(sentence, bos=False)), self._max_tokens)
                joined.append((self._model.tokenize(prompt, bos=True), budget))
            return joined

        def clean(index: int, out: bytes) -> str:
            text = out.decode("utf-8", errors="ignore")
            return clean_output(text, sentences[index], pair.source, pair.target, prompts[index])

        def on_done(index: int, out: bytes) -> None:
            if finished is not None:
                finished(index, clean(index, out))

        raw = (
            self._owners[id(decoder)]
            .submit(
                greedy_decode,
                decoder,
                self._prefix_tokens(pair),
                [self._model.tokenize(p, bos=True) for p in prompts],
                budgets,
                deadline,
                more_prompts if more is not None else None,
                on_done if finished is not None else None,
            )
            .result()
        )
        return [clean(index, out) for index, out in enumerate(raw)]

    def translate_sentences(
        self,
        sentences: list[str],
        pair: LlmPair,
        deadline: Deadline,
        contexts: SentenceContexts | None = None,
    ) -> list[str]:
        """Translates the sentences together on one checked-out instance (:func:`greedy_decode`).

        The deadline is checked before every decoding step; a sentence's context (arguments as
        :class:`~services.translate.engine.TranslationBackend` documents) is its prompt's last example.

        Raises:
            DeadlineExceeded: The caller's deadline passed between two decoding steps.
            InvalidArgument: A sentence too long for the context.
        """
        decoder = self._free.get()
        try:
            return self._translate_on(decoder, sentences, pair, deadline, contexts)
        finally:
            self._free.put(decoder)

    def instance_fns(self, count: int = 0) -> list[Callable[..., list[str]]]:
        """One function per llama.cpp context, each bound to its own context (never shared between threads).

        A batch is decoded together (:func:`greedy_decode`): one forward pass per step for all its
        sentences; two more arguments, a :data:`~services.translate.context.MoreSentences` and a
        :data:`~services.translate.context.FinishedSentence`, add sentences to the running batch between
        steps and answer each as it is done (in-flight batching).

        Raises:
            ValueError: ``count`` is neither 0 nor the number of contexts.
        """
        if count not in (0, len(self._decoders)):
            raise ValueError(
                f"--instance-count {count}: {len(self._decoders)} llama instance(s) are loaded; "
                "set --llm-instances instead"
            )
        return [functools.partial(self._translate_on, decoder) for decoder in self._decoders]

    def close(self) -> None:
        """Frees every context on its own thread, then the model."""
        for decoder in self._decoders:
            owner = self._owners[id(decoder)]
            owner.submit(decoder.close).result()
            owner.shutdown()
        self._model.close()


def _check_context(model: GgufModel, languages: LanguageSet, context_tokens: int, max_tokens: int) -> None:
    """Raises ValueError unless the context holds the longest few-shot prompt plus one full generation."""
    longest, source, target = max(
        ((len(model.tokenize(few_shot_prefix(s, t), bos=True)), s, t) for s, t in languages.pairs()),
        default=(0, "", ""),
    )
    if context_tokens < longest + max_tokens:
        raise ValueError(
            f"--llm-context-tokens {context_tokens} is too small: the few-shot prompt of {source}->{target} "
            f"takes {longest} tokens and a sentence may generate --llm-max-tokens {max_tokens} more; the "
            f"context, shared by the sentences of a batch, needs at least {longest + max_tokens}"
        )
