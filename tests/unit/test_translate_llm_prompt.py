"""The llm backend's fixed prompt, output cleaning and language checks (no model)."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.translate.context import TranslationContext
from services.translate.llama import EmbeddedLlamaBackend
from services.translate.prompts import (
    EXAMPLES,
    LANGUAGE_NAMES,
    chat_messages,
    clean_output,
    completion_prompt,
    few_shot_prefix,
    max_new_tokens,
)


def test_completion_prompt_is_the_documented_few_shot_text():
    prompt = completion_prompt("Good night.", "en", "fr")
    assert prompt.startswith(
        "Translate English to French.\n\nEnglish: Where is the train station?\nFrench: Où est"
    )
    assert prompt.endswith("\n\nEnglish: Good night.\nFrench:")
    assert prompt.count("English: ") == 4 and prompt.count("French: ") == 3
    # The embedded backend evaluates this part once per language pair and shares it between sentences.
    assert prompt == few_shot_prefix("en", "fr") + "English: Good night.\nFrench:"


def test_chat_messages_carry_the_same_examples_as_turns():
    messages = chat_messages("Good night.", "fr", "tr")
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert "French text to Turkish" in messages[0]["content"]
    assert messages[1]["content"] == EXAMPLES["fr"][0] and messages[2]["content"] == EXAMPLES["tr"][0]
    assert messages[-1]["content"] == "Good night."


def test_every_language_has_every_example():
    assert set(EXAMPLES) == set(LANGUAGE_NAMES)
    assert {len(v) for v in EXAMPLES.values()} == {3}


@pytest.mark.parametrize(
    ("raw", "source_text", "expected"),
    [
        (" Bonne nuit.", "Good night.", "Bonne nuit."),
        (" Bonne nuit.\n\nEnglish: Where is it?\nFrench: Où ?", "Good night.", "Bonne nuit."),
        ("Bonne nuit. English: next", "Good night.", "Bonne nuit."),
        ('"Bonne nuit."', "Good night.", "Bonne nuit."),
        ("« Bonne nuit. »", "Good night.", "Bonne nuit."),
        ('"Bonne nuit", dit-il.', '"Good night," he said.', '"Bonne nuit", dit-il.'),
        ("French: Bonne nuit.", "Good night.", "Bonne nuit."),
        ("Translation: Bonne nuit.", "Good night.", "Bonne nuit."),
        ("English: Good night.\nFrench: Bonne nuit.", "Good night.", "Bonne nuit."),
        ("\n\n  Bonne nuit.  \nautre ligne", "Good night.", "Bonne nuit."),
        ("", "Good night.", ""),
    ],
)
def test_clean_output(raw, source_text, expected):
    assert clean_output(raw, source_text, "en", "fr") == expected


def test_clean_output_removes_an_echoed_prompt():
    prompt = completion_prompt("Good night.", "en", "fr")
    assert clean_output(prompt + " Bonne nuit.\nEnglish:", "Good night.", "en", "fr", prompt) == "Bonne nuit."


def test_generation_budget_grows_with_the_source_and_is_capped():
    assert max_new_tokens(10, 256) == 36
    assert max_new_tokens(1000, 256) == 256
    assert max_new_tokens(0, 256) == 16


def test_languages_are_checked_against_the_prompt_examples():
    backend = EmbeddedLlamaBackend(object(), [object()], ("en", "fr", "tr"), "m", 64)
    assert backend.pairs() == [
        ("en", "fr"),
        ("en", "tr"),
        ("fr", "en"),
        ("fr", "tr"),
        ("tr", "en"),
        ("tr", "fr"),
    ]
    assert backend.resolve("en-GB", "fr-CA").target == "fr"
    with pytest.raises(InvalidArgument, match="'de' is not a language of m"):
        backend.resolve("en", "de")
    with pytest.raises(InvalidArgument, match="both"):
        backend.resolve("fr", "fr-FR")
    with pytest.raises(ValueError, match="xx has no few-shot examples"):
        EmbeddedLlamaBackend(object(), [object()], ("en", "xx"), "m", 64)


CONTEXT = TranslationContext("I missed the bus this morning,", "J'ai raté le bus ce matin,")


def test_a_context_is_the_last_example_of_the_completion_prompt_after_the_shared_prefix():
    prompt = completion_prompt("so I was late.", "en", "fr", CONTEXT)
    assert prompt == (
        few_shot_prefix("en", "fr")
        + "English: I missed the bus this morning,\nFrench: J'ai raté le bus ce matin,\n\n"
        + "English: so I was late.\nFrench:"
    )
    assert completion_prompt("so I was late.", "en", "fr", None) == completion_prompt(
        "so I was late.", "en", "fr"
    )


def test_a_context_is_one_more_chat_turn_before_the_sentence():
    messages = chat_messages("so I was late.", "en", "fr", CONTEXT)
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 4 + ["user"]
    assert messages[-3:] == [
        {"role": "user", "content": CONTEXT.source_text},
        {"role": "assistant", "content": CONTEXT.translated_text},
        {"role": "user", "content": "so I was late."},
    ]
    assert messages[:7] == chat_messages("so I was late.", "en", "fr")[:7]
