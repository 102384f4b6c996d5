"""Multiple-choice reward: the chosen letter (A-J) against the ground-truth letter.

:func:`extract_choice` finds the letter a response chose, in order of how deliberately it was written:

1. the last box (``\\boxed{C}``, ``\\boxed{(C)}``, ``\\boxed{\\text{C}}``, ``\\boxed{C) 42}``) that holds a letter;
2. the last "the answer is X" / "answer: X" phrase that starts with a letter (``Answer: C``,
   ``the answer is (C)``, ``the correct answer is option B because ...``);
3. the last letter in parentheses, ``(C)``, that is not a function argument (``f(a)`` is not a choice).

Upper case counts everywhere; lower case only where it cannot be an ordinary word: alone in a box, in
parentheses, or as the whole phrase (``Answer: c``); never "the answer is a bit..." or "the answer is I think".
A box or phrase that holds no single letter (``\\boxed{42}``, ``\\boxed{A, C}``) gives no letter, and the next
step is tried. Every step is linear in the length of the response.
"""

from __future__ import annotations

import re

from m2flow.rewards.math import _answer_phrases, _last_boxed

LETTERS = "ABCDEFGHIJ"
_COMMAND = re.compile(r"\\[A-Za-z]+")  # \text, \textbf, \mathrm, ...: their braces and names are dropped
_BOX_LETTER = re.compile(r"\(?([A-Ja-j])\)?")  # the whole box: C, (C), c, (c)
_BOX_LEADING = re.compile(r"(?:\(([A-Ja-j])\)|([A-J])[).:])(?:\s|$)")  # the box starts with one: "(C) 42", "C) 42"
_PHRASE_OPTION = re.compile(r"(?:option|choice)\s+", re.IGNORECASE)
_PHRASE_PAREN = re.compile(r"\(([A-Ja-j])\)")
_PHRASE_UPPER = re.compile(r"([A-J])(?![A-Za-z0-9])")
_PAREN_LETTER = re.compile(r"(?<![A-Za-z0-9_\\])\(([A-Ja-j])\)")


def _plain(text: str) -> str:
    """LaTeX commands, braces, ``$`` and markdown ``*`` dropped; outer whitespace and trailing ``.`` ``,`` ``:`` too."""
    text = _COMMAND.sub("", text)
    for c in "{}$*":
        text = text.replace(c, "")
    return text.strip().rstrip(".,:;").strip()


def _letter_in_box(content: str) -> str | None:
    content = _plain(content)
    if m := _BOX_LETTER.fullmatch(content):
        return m.group(1).upper()
    if m := _BOX_LEADING.match(content):
        return (m.group(1) or m.group(2)).upper()
    return None


def _letter_in_phrase(phrase: str) -> str | None:
    """The letter an "answer is X" phrase starts with, if it starts with one."""
    text = _plain(phrase)
    if m := _PHRASE_OPTION.match(text):
        text = text[m.end():]
    if len(text) == 1 and text.upper() in LETTERS:  # "Answer: c"
        return text.upper()
    if m := _PHRASE_PAREN.match(text):
        return m.group(1).upper()
    if m := _PHRASE_UPPER.match(text):
        rest = text[m.end():]
        if m.group(1) == "I" and rest[:1].isspace() and rest.lstrip()[:1].islower():  # "I think ..."
            return None
        return m.group(1)
    return None


def extract_choice(response: str) -> str | None:
    """The letter (``"A"``-``"J"``) the response chose, or None (see the module docstring for the order)."""
    boxed = _last_boxed(response)
    if boxed is not None and (letter := _letter_in_box(boxed)):
        return letter
    for phrase in reversed(_answer_phrases(response)):
        if letter := _letter_in_phrase(phrase):
            return letter
    last = None
    for m in _PAREN_LETTER.finditer(response):
        last = m
    return last.group(1).upper() if last else None


def normalize_choice(ground_truth: str) -> str:
    """The ground-truth letter: ``"C"``, ``"c"``, ``"(C)"`` and ``"\\text{C}"`` give ``"C"``; anything else raises
    ValueError (a data error, not a wrong answer)."""
    letter = _plain(ground_truth).strip("()").strip().upper()
    if len(letter) != 1 or letter not in LETTERS:
        raise ValueError(f"a multiple-choice ground truth is one letter A-J, got {ground_truth!r}")
    return letter


def multiple_choice_reward(response: str, ground_truth: str, *, format_penalty: float = 0.0,
                           timeout_s: float = 2.0, **_options) -> float:
    """1.0 if the response chose the ground-truth letter, 0.0 if it chose another, ``-format_penalty`` if it
    chose none. Linear-time string work only, so ``timeout_s`` (accepted like every reward's) is not needed."""
    truth = normalize_choice(ground_truth)
    choice = extract_choice(response)
    if choice is None:
        return -float(format_penalty) or 0.0
    return float(choice == truth)
