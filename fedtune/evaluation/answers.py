"""Answer extraction and normalisation for metrics scored on generated text.

Rules (the same for a reference and for a model's generation):

* :func:`extract_answer`: the text after the first ``####`` (GSM8K's answer marker), up to the
  end of that line, and within it the first number if there is one; without ``####``, the
  last number in the text; without any number, the whole text.
* :func:`normalize_number`: ``$``, ``%``, ``+`` and thousands separators go (``$1,234`` →
  ``1234``); the value is then written as a plain decimal, so a trailing period, trailing
  fractional zeros and leading zeros go too (``42.`` → ``42``, ``3.50`` → ``3.5``,
  ``18.00`` → ``18``, ``-0`` → ``0``). Equal values compare equal: ``3.50`` matches ``3.5``.
* :func:`normalize_text` (answers that are not numbers): case-folded, inner whitespace
  collapsed, surrounding whitespace, quotes and punctuation (``.,;:!?``) stripped.
* :func:`extract_choice`: the earliest whole-word occurrence of one of the choices (a
  one-character choice such as ``A`` must match in its case; a longer one, such as a class
  word, in any case), the longer choice when two start at the same place; ``None`` when
  no choice occurs. So ``"(B) because"`` → ``B`` and ``"Answer: C. Not A"`` → ``C``, but
  ``"A dog, so B"`` → ``A``: the first choice wins, even where it is only a word.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation

GSM8K_MARKER = "####"
# A sign only where it cannot be a hyphen ("3-4" is 3 and 4); thousands separators only in
# groups of three ("1,234" is one number, "1,2,3" three).
NUMBER = re.compile(r"(?:(?<![\w.])-)?[$]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?|(?:(?<![\w.])-)?\.\d+%?")
_PUNCTUATION = " \t\n\r.,;:!?\"'`"


def normalize_number(text: str) -> str:
    """A number as a plain decimal string: ``"$1,234.50"`` → ``"1234.5"``.

    Parameters
    ----------
    text : str
        A number as written, possibly with ``$``, ``%``, ``+``, commas or a trailing period.

    Returns
    -------
    str
        The normalised value; ``text`` stripped when it is not a number.
    """
    cleaned = text.strip().replace(",", "").replace("$", "").replace("%", "").lstrip("+").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return text.strip()
    if not value.is_finite():
        return text.strip()
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def normalize_text(text: str) -> str:
    """Case-folded, whitespace collapsed, surrounding punctuation and quotes stripped."""
    return " ".join(text.split()).strip(_PUNCTUATION).casefold()


def extract_answer(text: str) -> str:
    """The normalised final answer of a reference or a generation (rules in the module docstring).

    Parameters
    ----------
    text : str
        A GSM8K reference (``"... #### 42"``) or a model's generated text.

    Returns
    -------
    str
        A normalised number (``"42"``) when one is found, else the normalised text.

    Examples
    --------
    >>> extract_answer("She pays 3 * 4 = 12 dollars.\\n#### 1,212")
    '1212'
    >>> extract_answer("So the total is $18.00.")
    '18'
    >>> extract_answer("Paris.")
    'paris'
    """
    if GSM8K_MARKER in text:
        segment = text.split(GSM8K_MARKER, 1)[1].strip().split("\n", 1)[0]
        found = NUMBER.search(segment)
        return normalize_number(found.group()) if found else normalize_text(segment)
    numbers = NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else normalize_text(text)


def extract_choice(text: str, choices: Iterable[str]) -> str | None:
    """The first of ``choices`` that the text names (rules in the module docstring).

    Parameters
    ----------
    text : str
        A model's generated text.
    choices : iterable of str
        The possible answers, e.g. ``["A", "B", "C", "D"]`` or ``["negative", "positive"]``.

    Returns
    -------
    str or None
        The choice as given in ``choices``, or ``None`` when the text names none.
    """
    best: tuple[int, int, str] | None = None
    for choice in choices:
        label = choice.strip()
        if not label:
            continue
        flags = 0 if len(label) == 1 else re.IGNORECASE
        found = re.search(rf"(?<![^\W_]){re.escape(label)}(?![^\W_])", text, flags)
        if found is not None:
            key = (found.start(), -len(label), choice)
            best = key if best is None or key < best else best
    return best[2] if best is not None else None


__all__ = ["GSM8K_MARKER", "extract_answer", "extract_choice", "normalize_number", "normalize_text"]
