"""Evaluation metrics shared by tests, benchmarks and the evaluation report.

Text normaliser (documented, so figures are comparable with published Whisper results): OpenAI Whisper's
own normalisers from the ``whisper-normalizer`` package (Radford et al. 2022, appendix C):
``EnglishTextNormalizer`` for English (lower case, punctuation removed, British spellings and spoken
numbers standardised), ``BasicTextNormalizer`` for every other language (lower case, punctuation and
diacritic-free symbols removed, whitespace collapsed). Word error rate is jiwer's, over the whole corpus
(total edits / total reference words), not a mean of per-utterance rates. chrF and BLEU are sacrebleu's.
"""

from __future__ import annotations

from collections.abc import Sequence

import jiwer
import sacrebleu
from whisper_normalizer.basic import BasicTextNormalizer
from whisper_normalizer.english import EnglishTextNormalizer

from services.common.text import primary_language

_ENGLISH = EnglishTextNormalizer()
_BASIC = BasicTextNormalizer()


def normalize(text: str, language: str) -> str:
    """Whisper's normaliser for ``language`` (ISO 639-1): English rules for "en", basic rules otherwise."""
    return (_ENGLISH if primary_language(language) == "en" else _BASIC)(text).strip()


def wer(references: Sequence[str], hypotheses: Sequence[str], language: str) -> float:
    """Corpus word error rate in [0, inf) after :func:`normalize`; empty references are skipped."""
    pairs = [
        (normalize(r, language), normalize(h, language)) for r, h in zip(references, hypotheses, strict=True)
    ]
    pairs = [(r, h) for r, h in pairs if r]
    return jiwer.wer([r for r, _ in pairs], [h for _, h in pairs])


def chrf(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2), in [0, 100]."""
    return sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score


def bleu(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults, 13a tokeniser), in [0, 100]."""
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score
