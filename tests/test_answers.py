"""Answer extraction, worked by hand: GSM8K references, model outputs, numbers, choices."""

from __future__ import annotations

import pytest

from fedtune.evaluation.answers import extract_answer, extract_choice, normalize_number, normalize_text


@pytest.mark.parametrize(("text", "expected"), [
    # GSM8K references: the text after ####.
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
    ("He makes 1,000 * 2 = 2,000.\n#### 2,125", "2125"),
    ("#### -3", "-3"),
    # Generations with ####: the first number after the first ####, on its line.
    ("So she has 5.\n#### 42 dollars.\nQuestion: how many? #### 17", "42"),
    ("#### $18.00", "18"),
    # Without ####: the last number in the text.
    ("3 + 4 = 7, and 7 * 6 = 42. The answer is 42.", "42"),
    ("It costs $1,234.50 in total", "1234.5"),
    ("She keeps 50% of it", "50"),
    ("Steps 3-4 give 12", "12"),
    ("Pages 3-4", "4"),  # a hyphen between numbers is not a minus sign
    ("x = -5", "-5"),
    ("1,2,3", "3"),  # commas not in groups of three separate numbers
    ("about .5 of it", "0.5"),
    # Without a number: the text, normalised.
    ("  Paris. ", "paris"),
    ("", ""),
])
def test_extract_answer(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("42.", "42"),
    ("1,234", "1234"),
    ("$1,234", "1234"),
    ("3.50", "3.5"),
    ("3.5", "3.5"),
    ("18.00", "18"),
    ("007", "7"),
    ("+4", "4"),
    ("-0", "0"),
    ("100", "100"),  # not 1E+2
    ("25%", "25"),
    ("twelve", "twelve"),  # not a number: returned stripped
])
def test_normalize_number(text: str, expected: str) -> None:
    assert normalize_number(text) == expected


def test_equal_values_written_differently_match() -> None:
    assert extract_answer("The total is $3.50.") == extract_answer("#### 3.5")
    assert extract_answer("#### 1,212") == extract_answer("so 1212 in all")
    assert extract_answer("#### 7") != extract_answer("#### 70")


def test_normalize_text_folds_case_whitespace_and_edge_punctuation() -> None:
    assert normalize_text('  "New\n  York!" ') == "new york"


CHOICES = ["A", "B", "C", "D"]


@pytest.mark.parametrize(("text", "expected"), [
    ("B", "B"),
    ("(B) because it is red", "B"),
    ("Answer: C. Not A", "C"),
    ("The answer is D", "D"),
    ("A dog, so B", "A"),  # the first choice named wins, even as a word
    ("a cat, so b", None),  # one-letter choices match in their own case only
    ("BAD", None),  # whole words only
    ("no idea", None),
])
def test_extract_letter_choice(text: str, expected: str | None) -> None:
    assert extract_choice(text, CHOICES) == expected


def test_extract_word_choice_in_any_case_and_longest_at_a_tie() -> None:
    labels = ["positive", "negative", "very negative"]
    assert extract_choice("It is POSITIVE, not negative.", labels) == "positive"
    assert extract_choice("Sentiment: very negative", labels) == "very negative"
    assert extract_choice("nonnegative", labels) is None
