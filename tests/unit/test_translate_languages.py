"""BCP-47 parsing and the language tokens of NLLB, M2M100 and Marian models."""

from __future__ import annotations

import json

import pytest

from services.common.errors import InvalidArgument
from services.translate.ct2 import M2M100, MARIAN, NLLB, detect_family, find_sentencepiece, read_vocabulary
from services.translate.languages import FLORES200, LanguageTag, flores_tags, flores_token, parse_tag


@pytest.mark.parametrize(
    ("code", "tag"),
    [
        ("fr", LanguageTag("fr")),
        ("EN", LanguageTag("en")),
        ("pt-BR", LanguageTag("pt", "", "BR")),
        ("zh-hant", LanguageTag("zh", "Hant")),
        ("zh-Hant-TW", LanguageTag("zh", "Hant", "TW")),
        ("no", LanguageTag("nb")),
        ("ace", LanguageTag("ace")),
        ("es-419", LanguageTag("es", "", "419")),
    ],
)
def test_parse_tag(code, tag):
    assert parse_tag(code, "source_language") == tag


@pytest.mark.parametrize("code", ["", "  ", "fra_Latn", "__fr__", "f", "french", "en-", "e1"])
def test_parse_tag_rejects_what_is_not_bcp47(code):
    with pytest.raises(InvalidArgument, match="source_language"):
        parse_tag(code, "source_language")


VOCAB = frozenset({"eng_Latn", "fra_Latn", "zho_Hans", "zho_Hant", "ace_Arab", "ace_Latn", "fur_Latn"})


@pytest.mark.parametrize(
    ("code", "token"),
    [
        ("en", "eng_Latn"),
        ("en-US", "eng_Latn"),
        ("fra", "fra_Latn"),
        ("zh", "zho_Hans"),
        ("zh-TW", "zho_Hant"),
        ("zh-Hant", "zho_Hant"),
        ("ace-Arab", "ace_Arab"),
        ("ace", None),  # two scripts: ambiguous without one
        ("fur", "fur_Latn"),
        ("de", None),
        ("en-Cyrl", None),
    ],
)
def test_flores_token(code, token):
    assert flores_token(parse_tag(code, "f"), VOCAB) == token


def test_flores_tags_invert_flores_token():
    tags = flores_tags(sorted(VOCAB))
    assert tags == {
        "eng_Latn": "en",
        "fra_Latn": "fr",
        "zho_Hans": "zh",
        "zho_Hant": "zh-Hant",
        "ace_Arab": "ace-Arab",
        "ace_Latn": "ace-Latn",
        "fur_Latn": "fur",
    }
    for token, tag in tags.items():
        assert flores_token(parse_tag(tag, "f"), VOCAB) == token


def test_flores_table_codes_are_well_formed_and_unique():
    assert len(set(FLORES200.values())) == len(FLORES200)
    assert all(len(lang) == 2 and len(code) == 8 and code[3] == "_" for lang, code in FLORES200.items())


def test_family_detection_from_the_vocabulary():
    assert detect_family(["<s>", "</s>", "▁a", "eng_Latn", "fra_Latn"]) == NLLB
    assert detect_family(["<s>", "</s>", "▁a", "__en__", "__fr__"]) == M2M100
    assert detect_family(["<s>", "</s>", "▁a", "▁fr"]) == MARIAN


def test_vocabulary_and_sentencepiece_files_are_found(tmp_path):
    (tmp_path / "shared_vocabulary.json").write_text(json.dumps(["<s>", "eng_Latn"]))
    assert read_vocabulary(tmp_path, "target") == ["<s>", "eng_Latn"]
    (tmp_path / "shared_vocabulary.json").unlink()
    (tmp_path / "target_vocabulary.txt").write_text("<s>\n__en__\n")
    assert read_vocabulary(tmp_path, "target") == ["<s>", "__en__"]
    with pytest.raises(FileNotFoundError):
        read_vocabulary(tmp_path, "source")
    with pytest.raises(FileNotFoundError, match="found none"):
        find_sentencepiece(tmp_path)
    (tmp_path / "sentencepiece.bpe.model").write_bytes(b"x")
    assert find_sentencepiece(tmp_path) == (tmp_path / "sentencepiece.bpe.model",) * 2
    (tmp_path / "source.spm").write_bytes(b"x")
    (tmp_path / "target.spm").write_bytes(b"x")
    assert find_sentencepiece(tmp_path) == (tmp_path / "source.spm", tmp_path / "target.spm")
