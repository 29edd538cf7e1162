"""Translation by a language model: a fixed few-shot prompt, two transports, cleaned output.

The prompt
----------
One fixed prompt, documented here so results can be reproduced. It has an instruction line and three
example pairs (the same three sentences in every supported language, written for this module: a question,
a polite request and a longer sentence with a subordinate clause), then the sentence to translate:

* Completion form (:func:`completion_prompt`, for the embedded model, a *base* model without a chat
  template)::

      Translate English to French.

      English: Where is the train station?
      French: Où est la gare ?

      English: ... (two more examples) ...

      English: <sentence>
      French:

  The model continues after ``French:``; generation stops at the first line break.
* Chat form (:func:`chat_messages`, for an OpenAI-compatible ``/chat/completions`` endpoint serving an
  instruction-tuned model): a system message with the same instruction ("Translate the user's English
  text to French. Reply with the French translation only, on one line."), the three examples as
  user/assistant turns, then the sentence as the last user turn.

Decoding is greedy (temperature 0) and each sentence is its own prompt, so a translation never depends on
the text of the other sentences of a request or batch. (Embedded, the sentences of a batch share forward
passes, whose arithmetic rounds differently from a sentence's pass alone, so where the model hesitates
between two tokens a batched translation may differ from the same sentence translated alone; its test
bounds the chrF loss at 5 points, see ``tests/integration/test_translate_llm.py``.) The output is cleaned by
:func:`clean_output`: an echoed prompt is removed, then a leading ``French:`` or ``Translation:`` label,
only the first line is kept, anything from the next source label (``English:``) on is cut, and quotes
around the whole translation are removed unless the source sentence itself was quoted.

Transports
----------
* :class:`EmbeddedLlamaBackend`: llama.cpp in this process through llama-cpp-python's low-level
  bindings, the CPU default (Gemma 3 270M, Q4_K_M GGUF, bundled). The model is loaded once; each of the
  ``llm_instances`` instances is a llama.cpp context on it, used by one thread at a time (on a server,
  one model instance of the dynamic batcher, fed from the shared queue). A batch is decoded together
  (:func:`greedy_decode`): the few-shot prefix is evaluated once per language pair into sequence 0 and
  its KV cells are shared by every sentence's sequence, the prompts join in one forward pass, then each
  step is one forward pass with one token per running sentence. A context's ``llm_context_tokens`` KV
  cells are shared by its sentences; a sentence that finds no room waits until others finish.
* :class:`HttpChatBackend`: ``POST {base_url}/chat/completions`` (vLLM, llama.cpp ``llama-server``, any
  OpenAI-compatible server), with the standard library's ``urllib`` (no third-party HTTP client is a
  project dependency). The sentences of a batch are sent in parallel (``llm_concurrency``) so the
  server's continuous batching can run them together. Failures map to status codes as
  :mod:`services.common.http` documents: the endpoint's own timeout (``llm_timeout_s``), a refused
  connection or HTTP 5xx are UNAVAILABLE, the caller's shorter deadline DEADLINE_EXCEEDED, HTTP 429
  RESOURCE_EXHAUSTED, another 4xx (bad key, unknown model) or a malformed response INTERNAL.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import json
import logging
import os
import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from services.common.deadlines import Deadline
from services.common.errors import DeadlineExceeded, InvalidArgument, ParleyError
from services.common.http import post_json
from services.translate.config import TranslateConfig
from services.translate.languages import parse_tag

logger = logging.getLogger(__name__)

LANGUAGE_NAMES = {
    "en": "English",
    "fr": "French",
    "tr": "Turkish",
    "de": "German",
    "es": "Spanish",
    "it": "Italian",
    "pt": "Portuguese",
}

# The few-shot examples: example i is the same sentence in every language.
EXAMPLES = {
    "en": (
        "Where is the train station?",
        "I would like a cup of coffee, please.",
        "The meeting was postponed until next week because of the storm.",
    ),
    "fr": (
        "Où est la gare ?",
        "Je voudrais une tasse de café, s'il vous plaît.",
        "La réunion a été reportée à la semaine prochaine à cause de la tempête.",
    ),
    "tr": (
        "Tren istasyonu nerede?",
        "Bir fincan kahve istiyorum, lütfen.",
        "Toplantı fırtına nedeniyle gelecek haftaya ertelendi.",
    ),
    "de": (
        "Wo ist der Bahnhof?",
        "Ich hätte gern eine Tasse Kaffee, bitte.",
        "Die Besprechung wurde wegen des Sturms auf nächste Woche verschoben.",
    ),
    "es": (
        "¿Dónde está la estación de tren?",
        "Quisiera una taza de café, por favor.",
        "La reunión se aplazó hasta la próxima semana debido a la tormenta.",
    ),
    "it": (
        "Dov'è la stazione ferroviaria?",
        "Vorrei una tazza di caffè, per favore.",
        "La riunione è stata rinviata alla settimana prossima a causa della tempesta.",
    ),
    "pt": (
        "Onde fica a estação de trem?",
        "Eu gostaria de uma xícara de café, por favor.",
        "A reunião foi adiada para a próxima semana por causa da tempestade.",
    ),
}

_QUOTES = (
    ('"', '"'),
    ("\u201c", "\u201d"),
    ("\u00ab", "\u00bb"),
    ("'", "'"),
    ("\u2018", "\u2019"),
    ("\u201e", "\u201c"),
)
_OPENING_QUOTES = "\"'\u201c\u00ab\u2018\u201e"


def few_shot_prefix(source: str, target: str) -> str:
    """The part of :func:`completion_prompt` before the sentence: instruction and examples.

    It is the same for every sentence of a language pair, so the embedded backend evaluates it once.
    """
    src, tgt = LANGUAGE_NAMES[source], LANGUAGE_NAMES[target]
    parts = [f"Translate {src} to {tgt}.\n\n"]
    for example_src, example_tgt in zip(EXAMPLES[source], EXAMPLES[target], strict=True):
        parts.append(f"{src}: {example_src}\n{tgt}: {example_tgt}\n\n")
    return "".join(parts)


def completion_prompt(text: str, source: str, target: str) -> str:
    """The completion-form prompt for one sentence (see the module docstring).

    Args:
        text: One sentence.
        source: Source language, ISO 639-1 key of :data:`LANGUAGE_NAMES`.
        target: Target language, same form.
    """
    return f"{few_shot_prefix(source, target)}{LANGUAGE_NAMES[source]}: {text}\n{LANGUAGE_NAMES[target]}:"


def chat_messages(text: str, source: str, target: str) -> list[dict[str, str]]:
    """The chat-form prompt for one sentence: system instruction, three example turns, the sentence."""
    src, tgt = LANGUAGE_NAMES[source], LANGUAGE_NAMES[target]
    messages = [
        {
            "role": "system",
            "content": (
                f"Translate the user's {src} text to {tgt}. "
                f"Reply with the {tgt} translation only, on one line."
            ),
        }
    ]
    for example_src, example_tgt in zip(EXAMPLES[source], EXAMPLES[target], strict=True):
        messages += [{"role": "user", "content": example_src}, {"role": "assistant", "content": example_tgt}]
    messages.append({"role": "user", "content": text})
    return messages


def _strip_quotes(text: str) -> str:
    for opening, closing in _QUOTES:
        if len(text) >= 2 and text.startswith(opening) and text.endswith(closing):
            return text[len(opening) : len(text) - len(closing)].strip()
    return text


def clean_output(raw: str, source_text: str, source: str, target: str, prompt: str = "") -> str:
    """The translation in a model's raw output (rules in the module docstring).

    Args:
        raw: Generated text.
        source_text: The sentence that was translated (its quotes decide whether quotes are kept).
        source: Source language key of :data:`LANGUAGE_NAMES`.
        target: Target language key.
        prompt: The prompt, removed when the output starts by echoing it.

    Returns:
        One line, stripped; may be empty when the model produced nothing usable.
    """
    text = raw
    if prompt and text.startswith(prompt):
        text = text[len(prompt) :]
    text = text.strip()
    source_label, target_label = LANGUAGE_NAMES[source] + ":", LANGUAGE_NAMES[target] + ":"
    if text.startswith(source_label):
        # The model replayed the example pattern: the translation follows the target label.
        start = text.find(target_label)
        text = text[start + len(target_label) :] if start >= 0 else ""
    text = text.strip()
    for label in (target_label, "Translation:"):
        if text.lower().startswith(label.lower()):
            text = text[len(label) :].strip()
    text = text.split("\n", 1)[0]
    cut = text.find(source_label)
    if cut >= 0:
        text = text[:cut]
    text = text.strip()
    if not source_text.lstrip().startswith(tuple(_OPENING_QUOTES)):
        text = _strip_quotes(text)
    return text


def max_new_tokens(n_source_tokens: int, cap: int) -> int:
    """Generation budget for a sentence: twice its length plus 16 tokens, at most ``cap``.

    A translation is rarely more than twice as long as its source in tokens; the bound stops a
    degenerate repetition early instead of running to ``cap``.
    """
    return max(1, min(cap, 2 * n_source_tokens + 16))


@dataclass(frozen=True)
class LlmPair:
    """Source and target language keys of :data:`LANGUAGE_NAMES`."""

    source: str
    target: str


class _LanguageSet:
    """The languages an llm backend offers, and request validation against them."""

    def __init__(self, languages: tuple[str, ...]):
        unknown = [code for code in languages if code not in LANGUAGE_NAMES]
        if unknown:
            raise ValueError(
                f"--llm-languages: {', '.join(unknown)} has no few-shot examples in the prompt; "
                f"choose among {', '.join(LANGUAGE_NAMES)}"
            )
        self.languages = tuple(dict.fromkeys(languages))

    def pairs(self) -> list[tuple[str, str]]:
        ordered = sorted(self.languages)
        return [(s, t) for s in ordered for t in ordered if s != t]

    def resolve(self, source: str, target: str, model_name: str) -> LlmPair:
        src = parse_tag(source, "source_language").language
        tgt = parse_tag(target, "target_language").language
        for code, field, lang in ((source, "source_language", src), (target, "target_language", tgt)):
            if lang not in self.languages:
                raise InvalidArgument(
                    f"{field} {code!r} is not a language of {model_name}: it translates between "
                    f"{', '.join(sorted(self.languages))}"
                )
        if src == tgt:
            raise InvalidArgument(
                f"source_language and target_language are both {source!r}: nothing to translate"
            )
        return LlmPair(src, tgt)


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

    def step(self, feeds: list[tuple[int, list[int], int]]) -> list[int]:
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


@dataclass
class _Running:
    """A sentence being decoded: its batch position, next position, last token and tokens generated."""

    index: int
    pos: int
    last: int = -1
    generated: int = 0


def _common_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def greedy_decode(
    decoder: TokenDecoder, prefix: list[int], prompts: list[list[int]], budgets: list[int], deadline: Deadline
) -> list[bytes]:
    """Greedy continuations of prompts that share a prefix, decoded together.

    Sequence 0 holds ``prefix``; each prompt runs in a sequence of its own that starts as a copy of the
    prefix positions it shares, so only the rest of the prompt is evaluated. Each step is one forward pass
    with one token per running sequence (the rest of its prompt for a sequence that joins) and takes the
    most likely next token of each. A sequence stops at an end-of-generation token, at a generated line
    break (the bytes before it are kept) or once it has generated its budget (cut to the room the context
    has beside the prompt). Prompts join in order while a sequence id and room in the context are free;
    each reserves its own prompt tokens plus its budget until it stops, so more prompts than the context
    holds wait for room instead of failing.

    Args:
        decoder: The model context; used by this thread only.
        prefix: Tokens every prompt starts with (the model's BOS first, if it has one).
        prompts: Each prompt's tokens, prefix included.
        budgets: Most tokens generated per prompt, at least 1.
        deadline: Checked before every step.

    Returns:
        The generated bytes of each prompt, in order, cut before the first line break.

    Raises:
        InvalidArgument: A prompt alone fills the context.
        DeadlineExceeded: The deadline passed before every prompt was done.
    """
    # At least the last prompt token is evaluated by the sentence's own sequence, for its logits.
    shared = [min(_common_length(prefix, p), len(p) - 1) for p in prompts]
    own = [len(p) - s for p, s in zip(prompts, shared, strict=True)]
    room = decoder.n_ctx - len(prefix)
    for n in own:
        if n >= room:
            raise InvalidArgument(
                f"a sentence's prompt of {n} tokens does not fit the {room} tokens of the llama.cpp context "
                "left after the few-shot prompt; cut it shorter (the server's --max-sentence-chars) or raise "
                "--llm-context-tokens"
            )
    # As llama-cpp-python's create_completion does, a budget never reaches past the context.
    budgets = [min(b, room - n) for b, n in zip(budgets, own, strict=True)]
    needs = [n + b for n, b in zip(own, budgets, strict=True)]
    decoder.load_prefix(prefix)
    waiting = collections.deque(range(len(prompts)))
    free_ids = list(range(decoder.n_seq, 0, -1))
    running: dict[int, _Running] = {}
    outputs = [bytearray() for _ in prompts]
    finished = 0
    try:
        while waiting or running:
            if deadline.expired():
                raise DeadlineExceeded(
                    f"the caller's deadline passed with {finished} of {len(prompts)} sentences translated"
                )
            feeds = [(seq_id, [run.last], run.pos) for seq_id, run in running.items()]
            while waiting and free_ids and needs[waiting[0]] <= room:
                index = waiting.popleft()
                seq_id = free_ids.pop()
                room -= needs[index]
                decoder.fork(seq_id, shared[index])
                running[seq_id] = _Running(index, shared[index])
                feeds.append((seq_id, prompts[index][shared[index] :], shared[index]))
            for (seq_id, fed, _), token in zip(feeds, decoder.step(feeds), strict=True):
                run = running[seq_id]
                run.pos += len(fed)
                done = decoder.is_end(token)
                if not done:
                    piece = decoder.piece(token)
                    cut = piece.find(b"\n")
                    outputs[run.index] += piece if cut < 0 else piece[:cut]
                    run.generated += 1
                    done = cut >= 0 or run.generated >= budgets[run.index]
                if done:
                    decoder.release(seq_id)
                    del running[seq_id]
                    free_ids.append(seq_id)
                    room += needs[run.index]
                    finished += 1
                else:
                    run.last = token
    finally:
        for seq_id in running:
            decoder.release(seq_id)
    return [bytes(out) for out in outputs]


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

    def step(self, feeds: list[tuple[int, list[int], int]]) -> list[int]:
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
        languages: Languages offered (keys of :data:`LANGUAGE_NAMES`).
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
        self._free: queue.Queue[LlamaContext] = queue.Queue()
        for decoder in decoders:
            self._free.put(decoder)
        self._languages = _LanguageSet(languages)
        self.model_name = model_name
        self.workers = len(decoders)
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

        languages = _LanguageSet(config.llm_languages)
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
        self, decoder: LlamaContext, sentences: list[str], pair: LlmPair, deadline: Deadline
    ) -> list[str]:
        prompts = [completion_prompt(s, pair.source, pair.target) for s in sentences]
        budgets = [
            max_new_tokens(len(self._model.tokenize(s, bos=False)), self._max_tokens) for s in sentences
        ]
        raw = greedy_decode(
            decoder,
            self._prefix_tokens(pair),
            [self._model.tokenize(p, bos=True) for p in prompts],
            budgets,
            deadline,
        )
        return [
            clean_output(out.decode("utf-8", errors="ignore"), sentence, pair.source, pair.target, prompt)
            for out, sentence, prompt in zip(raw, sentences, prompts, strict=True)
        ]

    def translate_sentences(self, sentences: list[str], pair: LlmPair, deadline: Deadline) -> list[str]:
        """Translates the sentences together on one checked-out instance (:func:`greedy_decode`).

        Raises:
            DeadlineExceeded: The caller's deadline passed between two decoding steps.
            InvalidArgument: A sentence too long for the context.
        """
        decoder = self._free.get()
        try:
            return self._translate_on(decoder, sentences, pair, deadline)
        finally:
            self._free.put(decoder)

    def instance_fns(self, count: int = 0) -> list[Callable[[list[str], LlmPair, Deadline], list[str]]]:
        """One function per llama.cpp context, each bound to its own context (never shared between threads).

        A batch is decoded together (:func:`greedy_decode`): one forward pass per step for all its
        sentences.

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
        """Frees every context, then the model."""
        for decoder in self._decoders:
            decoder.close()
        self._model.close()


def _check_context(model: GgufModel, languages: _LanguageSet, context_tokens: int, max_tokens: int) -> None:
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


class HttpChatBackend:
    """An OpenAI-compatible ``/chat/completions`` endpoint (vLLM, llama.cpp server).

    Args:
        base_url: Base URL up to and including ``/v1``.
        model: Model name sent in each request.
        api_key: Bearer token; empty for none.
        timeout_s: Timeout of one HTTP call, in seconds.
        languages: Languages offered (keys of :data:`LANGUAGE_NAMES`).
        max_tokens: Most tokens generated per sentence.
        concurrency: HTTP calls in flight at once.
        model_name: Reported in responses; default ``model``.
    """

    # Batcher instances sending batches at once.
    HTTP_INSTANCES = 2

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str,
        timeout_s: float,
        languages: tuple[str, ...],
        max_tokens: int = 256,
        concurrency: int = 8,
        model_name: str = "",
    ):
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._model = model
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._languages = _LanguageSet(languages)
        self._max_tokens = max_tokens
        self.model_name = model_name or model
        self.workers = max(1, concurrency)
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="llm-http")

    @classmethod
    def from_config(cls, config: TranslateConfig) -> HttpChatBackend:
        """Builds the client; nothing is sent until the first request.

        Raises:
            ValueError: No model name, or a language without prompt examples.
        """
        if not config.llm_model:
            raise ValueError("--llm-model is required with --llm-transport http (the endpoint's model name)")
        return cls(
            config.llm_base_url,
            config.llm_model,
            os.environ.get(config.llm_api_key_env, ""),
            config.llm_timeout_s,
            config.llm_languages,
            config.llm_max_tokens,
            config.llm_concurrency,
            config.model_name,
        )

    def pairs(self) -> list[tuple[str, str]]:
        """Every ordered pair of the configured languages."""
        return self._languages.pairs()

    def resolve(self, source: str, target: str) -> LlmPair:
        """Checks the pair; raises InvalidArgument for a language without prompt examples."""
        return self._languages.resolve(source, target, self.model_name)

    def _translate_one(self, sentence: str, pair: LlmPair, deadline: Deadline) -> str:
        body = {
            "model": self._model,
            "messages": chat_messages(sentence, pair.source, pair.target),
            "temperature": 0.0,
            # About 4 characters per token: the same "twice the source plus 16" budget as embedded.
            "max_tokens": max_new_tokens(len(sentence) // 4 + 1, self._max_tokens),
            "stop": ["\n\n"],
            "stream": False,
        }
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        data = post_json(
            self._url,
            json.dumps(body).encode(),
            "application/json",
            headers,
            deadline,
            self._timeout_s,
            "LLM endpoint",
        )
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise ParleyError(
                f"LLM endpoint {self._url} returned a malformed response: no choices[0].message.content"
            ) from exc
        if not isinstance(content, str):
            raise ParleyError(f"LLM endpoint {self._url} returned a malformed response: content is not text")
        return clean_output(content, sentence, pair.source, pair.target)

    def translate_sentences(self, sentences: list[str], pair: LlmPair, deadline: Deadline) -> list[str]:
        """Sends every sentence as its own chat request, ``concurrency`` at a time.

        Raises:
            Unavailable, DeadlineExceeded, ResourceExhausted, ParleyError: See the module docstring; the
                first failing sentence decides.
        """
        futures = [self._executor.submit(self._translate_one, s, pair, deadline) for s in sentences]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def instance_fns(self, count: int = 0) -> list[Callable[[list[str], LlmPair, Deadline], list[str]]]:
        """:meth:`translate_sentences` ``count`` times (0: ``HTTP_INSTANCES``); it is thread-safe.

        Two instances let the next batch form and go out while one waits for the endpoint; the calls of
        both share the ``concurrency`` HTTP threads, and the endpoint batches what arrives.
        """
        return [self.translate_sentences] * (count or self.HTTP_INSTANCES)

    def close(self) -> None:
        """Stops the HTTP threads."""
        self._executor.shutdown(wait=True, cancel_futures=True)
