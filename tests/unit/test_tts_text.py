"""Sentence splitting (services.common.text), which streaming synthesis relies on."""

from __future__ import annotations

import pytest

from services.common.text import split_sentences


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("   \n  ", []),
        ("No stop at the end", ["No stop at the end"]),
        ("One. Two! Three? Four", ["One.", "Two!", "Three?", "Four"]),
        ("Wait... what?! Fine.", ["Wait...", "what?!", "Fine."]),
        ('He said "Stop." Then left.', ['He said "Stop."', "Then left."]),
        ("Dr. Smith met J. Doe. They talked.", ["Dr. Smith met J. Doe.", "They talked."]),
        ("Pi is 3.14 and example.com is a site.", ["Pi is 3.14 and example.com is a site."]),
        ("Mme. Dupont est là. Bonjour !", ["Mme. Dupont est là.", "Bonjour !"]),
        ("Nasılsın? İyiyim.", ["Nasılsın?", "İyiyim."]),
        ("Il a dit « non. » Puis il est parti.", ["Il a dit « non. »", "Puis il est parti."]),
        ("... Oui.", ["... Oui."]),
        ("First line\nSecond line.", ["First line", "Second line."]),
        ("你好。世界！", ["你好。", "世界！"]),
    ],
)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


def test_split_keeps_every_word():
    text = "A short one. Then a longer sentence, with a comma; and more! Is it? Yes (it is.) Done"
    assert " ".join(split_sentences(text)).split() == text.split()
