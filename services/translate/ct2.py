"""CTranslate2 backend: NLLB-200, M2M100 and Marian/OPUS-MT models in CTranslate2 format.

A model directory holds what ``ct2-transformers-converter`` or ``ct2-opus-mt-converter`` writes
(``model.bin``, ``config.json``, ``shared_vocabulary.{json,txt}`` or ``source_/target_vocabulary``) plus the
model's SentencePiece model(s): ``source.spm`` and ``target.spm`` (OPUS-MT), or one ``*.model`` file
(``sentencepiece.bpe.model`` for NLLB and M2M100).

The family is detected from the target vocabulary: FLORES-200 tokens (``eng_Latn``) mean NLLB, ``__en__``
tokens mean M2M100, neither means a single-pair Marian model whose pair comes from the configuration.
Inputs are built as the models were trained (CTranslate2 ``docs/guides/transformers.md``):

* NLLB:    source ``[src_lang] + pieces + ["</s>"]``, target prefix ``[tgt_lang]``.
* M2M100:  source ``[__src__] + pieces + ["</s>"]``, target prefix ``[__tgt__]``.
* Marian:  source ``pieces + ["</s>"]``, no prefix.

The language token the decoder starts with is removed from the output before detokenising. A request's
translation context (:mod:`services.translate.context`) is ignored: these models translate each sentence
on its own.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.deadlines import Deadline
from services.common.devices import check_device
from services.common.errors import DeadlineExceeded, InvalidArgument
from services.translate.config import TranslateConfig
from services.translate.context import SentenceContexts
from services.translate.languages import (
    FLORES_TOKEN,
    M2M100_TOKEN,
    flores_tags,
    flores_token,
    m2m100_token,
    parse_tag,
)

logger = logging.getLogger(__name__)

NLLB = "nllb"
M2M100 = "m2m100"
MARIAN = "marian"


def read_vocabulary(model_dir: Path, side: str) -> list[str]:
    """Tokens of a CTranslate2 model's ``side`` ("source" or "target") vocabulary.

    Reads ``shared_vocabulary`` when present, else ``<side>_vocabulary``, as JSON (CTranslate2 >= 3.0) or
    text (one token per line).

    Raises:
        FileNotFoundError: No vocabulary file.
    """
    for stem in ("shared_vocabulary", f"{side}_vocabulary"):
        path = model_dir / f"{stem}.json"
        if path.is_file():
            return list(json.loads(path.read_text(encoding="utf-8")))
        path = model_dir / f"{stem}.txt"
        if path.is_file():
            return path.read_text(encoding="utf-8").splitlines()
    raise FileNotFoundError(f"{model_dir} has no shared_vocabulary or {side}_vocabulary (.json or .txt)")


def detect_family(target_vocabulary: list[str]) -> str:
    """``"nllb"``, ``"m2m100"`` or ``"marian"`` from the language tokens a target vocabulary holds."""
    if sum(1 for t in target_vocabulary if FLORES_TOKEN.match(t)) >= 2:
        return NLLB
    if sum(1 for t in target_vocabulary if M2M100_TOKEN.match(t)) >= 2:
        return M2M100
    return MARIAN


def find_sentencepiece(model_dir: Path) -> tuple[Path, Path]:
    """(source, target) SentencePiece models of a model directory.

    Raises:
        FileNotFoundError: None found, or several ``*.model`` files and no ``source.spm``/``target.spm``.
    """
    if (model_dir / "source.spm").is_file() and (model_dir / "target.spm").is_file():
        return model_dir / "source.spm", model_dir / "target.spm"
    models = sorted(model_dir.glob("*.model"))
    if len(models) == 1:
        return models[0], models[0]
    found = ", ".join(p.name for p in models) or "none"
    raise FileNotFoundError(
        f"{model_dir}: expected source.spm + target.spm, or exactly one SentencePiece *.model file "
        f"(found {found})"
    )


@dataclass(frozen=True)
class Ct2Pair:
    """Language tokens of one pair: the source token (or None) and the target prefix (or None)."""

    source_token: str | None
    target_token: str | None


class CTranslate2Backend:
    """Translates with a ``ctranslate2.Translator``; thread-safe (calls release the GIL, weights shared).

    Args:
        translator: The loaded ``ctranslate2.Translator``.
        source_sp: SentencePiece processor of the source side.
        target_sp: SentencePiece processor of the target side.
        family: ``"nllb"``, ``"m2m100"`` or ``"marian"``.
        target_vocabulary: The model's target tokens (the language tokens are read from it).
        model_name: Reported in responses.
        workers: Calls that may run at once (``inter_threads`` times the replicas).
        max_batch_size: Most sentences per model batch.
        beam_size: Beam width.
        max_decoding_length: Most tokens generated per sentence.
        marian_pair: (source, target) BCP-47 of a Marian model.
    """

    def __init__(
        self,
        translator: Any,
        source_sp: Any,
        target_sp: Any,
        family: str,
        target_vocabulary: list[str],
        model_name: str,
        workers: int = 1,
        max_batch_size: int = 32,
        beam_size: int = 2,
        max_decoding_length: int = 256,
        marian_pair: tuple[str, str] | None = None,
    ):
        self._translator = translator
        self._source_sp = source_sp
        self._target_sp = target_sp
        self.family = family
        self.model_name = model_name
        self.workers = max(1, workers)
        self.in_flight_batching = False  # CTranslate2 translates a batch in one call
        self._max_batch_size = max_batch_size
        self._beam_size = beam_size
        self._max_decoding_length = max_decoding_length
        self._marian_pair = marian_pair
        if family == NLLB:
            language_tokens = [t for t in target_vocabulary if FLORES_TOKEN.match(t)]
            self._tags = flores_tags(language_tokens)
        elif family == M2M100:
            language_tokens = [t for t in target_vocabulary if M2M100_TOKEN.match(t)]
            self._tags = {t: t.strip("_") for t in language_tokens}
        else:
            if marian_pair is None:
                raise ValueError(
                    "this model has no language tokens (Marian/OPUS-MT): set --source-language and "
                    "--target-language to the pair it translates"
                )
            language_tokens = []
            self._tags = {}
        self._vocabulary = frozenset(language_tokens)
        self._special = frozenset({"<s>", "</s>", "<pad>", "<unk>", *language_tokens})

    @classmethod
    def from_config(cls, config: TranslateConfig) -> CTranslate2Backend:
        """Loads the model named by ``config.model_path`` on the configured device.

        Raises:
            ValueError: No model path, or a Marian model without its pair in the configuration.
            FileNotFoundError: A missing model file.
            FailedPrecondition: The configured CUDA device or compute type is not available.
        """
        if not config.model_path:
            raise ValueError(
                "--model-path is required with --backend ctranslate2 (a CTranslate2 model directory)"
            )
        model_dir = Path(config.model_path)
        if not (model_dir / "model.bin").is_file():
            raise FileNotFoundError(f"{model_dir} holds no CTranslate2 model.bin")
        check_device(config.device, config.device_index, config.compute_type)

        import ctranslate2
        import sentencepiece as spm

        target_vocabulary = read_vocabulary(model_dir, "target")
        family = detect_family(target_vocabulary)
        source_spm, target_spm = find_sentencepiece(model_dir)
        marian_pair = None
        if family == MARIAN and config.source_language and config.target_language:
            marian_pair = (
                parse_tag(config.source_language, "--source-language").language,
                parse_tag(config.target_language, "--target-language").language,
            )
        translator = ctranslate2.Translator(
            str(model_dir),
            device=config.device,
            device_index=list(config.device_index),
            compute_type=config.compute_type,
            inter_threads=config.inter_threads,
            intra_threads=config.intra_threads,
        )
        replicas = len(config.device_index) if config.device != "cpu" else 1
        logger.info(
            "ctranslate2: %s model from %s on %s (%s), %d language tokens",
            family,
            model_dir,
            config.device,
            config.compute_type,
            sum(1 for t in target_vocabulary if FLORES_TOKEN.match(t) or M2M100_TOKEN.match(t)),
        )
        return cls(
            translator,
            spm.SentencePieceProcessor(model_file=str(source_spm)),
            spm.SentencePieceProcessor(model_file=str(target_spm)),
            family,
            target_vocabulary,
            config.model_name or model_dir.name,
            workers=config.inter_threads * replicas,
            max_batch_size=config.max_batch_size,
            beam_size=config.beam_size,
            max_decoding_length=config.max_decoding_length,
            marian_pair=marian_pair,
        )

    def pairs(self) -> list[tuple[str, str]]:
        """Every ordered pair of the model's languages (NLLB, M2M100), or the Marian model's one pair."""
        if self.family == MARIAN:
            assert self._marian_pair is not None
            return [self._marian_pair]
        tags = sorted(set(self._tags.values()))
        return [(s, t) for s in tags for t in tags if s != t]

    def _token(self, code: str, field: str) -> str:
        tag = parse_tag(code, field)
        token = flores_token(tag, self._vocabulary) if self.family == NLLB else m2m100_token(tag)
        if token is None or token not in self._vocabulary:
            raise InvalidArgument(
                f"{field} {code!r} is not a language of model {self.model_name}; ListLanguagePairs lists them"
            )
        return token

    def resolve(self, source: str, target: str) -> Ct2Pair:
        """Language tokens of a pair.

        Raises:
            InvalidArgument: A bad code, a language the model lacks, or source equal to target.
        """
        if self.family == MARIAN:
            assert self._marian_pair is not None
            pair = (
                parse_tag(source, "source_language").language,
                parse_tag(target, "target_language").language,
            )
            if pair != self._marian_pair:
                raise InvalidArgument(
                    f"model {self.model_name} translates only {self._marian_pair[0]} -> "
                    f"{self._marian_pair[1]}, not {source} -> {target}"
                )
            return Ct2Pair(None, None)
        source_token = self._token(source, "source_language")
        target_token = self._token(target, "target_language")
        if source_token == target_token:
            raise InvalidArgument(
                f"source_language and target_language are both {source!r}: nothing to translate"
            )
        return Ct2Pair(source_token, target_token)

    def tokenize(self, sentence: str, pair: Ct2Pair) -> list[str]:
        """Source tokens of one sentence, with the language token and end of sentence the model expects."""
        pieces = self._source_sp.encode(sentence, out_type=str)
        prefix = [pair.source_token] if pair.source_token else []
        return prefix + pieces + ["</s>"]

    def detokenize(self, tokens: list[str]) -> str:
        """Text of an output hypothesis, language and special tokens dropped."""
        return self._target_sp.decode([t for t in tokens if t not in self._special]).strip()

    def translate_sentences(
        self,
        sentences: list[str],
        pair: Ct2Pair,
        deadline: Deadline,
        contexts: SentenceContexts | None = None,
    ) -> list[str]:
        """Translates all sentences in one ``translate_batch`` call (CTranslate2 sorts and rebatches them).

        Args:
            sentences: Non-empty sentences.
            pair: From :meth:`resolve`.
            deadline: Checked once before the call (a running batch is not interrupted).
            contexts: Ignored: the models translate each sentence on its own.

        Returns:
            One translation per sentence, in order.
        """
        if deadline.expired():
            raise DeadlineExceeded("the caller's deadline passed before translation started")
        source = [self.tokenize(s, pair) for s in sentences]
        prefix = [[pair.target_token] for _ in sentences] if pair.target_token else None
        results = self._translator.translate_batch(
            source,
            target_prefix=prefix,
            max_batch_size=self._max_batch_size,
            batch_type="examples",
            beam_size=self._beam_size,
            max_decoding_length=self._max_decoding_length,
        )
        return [self.detokenize(r.hypotheses[0]) for r in results]

    def instance_fns(
        self, count: int = 0
    ) -> list[Callable[[list[str], Ct2Pair, Deadline, SentenceContexts | None], list[str]]]:
        """``translate_sentences`` ``count`` times (0: once per worker), as the translator is thread-safe.

        CTranslate2 releases the GIL and shares the weights; it runs ``workers`` batches at once.
        """
        return [self.translate_sentences] * (count or self.workers)

    def close(self) -> None:
        """Frees the model's memory."""
        self._translator.unload_model()
