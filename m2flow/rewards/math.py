"""Math answer extraction and verification rewards.

The reward for a response is decided in two steps:

1. :func:`extract_answer` pulls the final answer out of free text (the last ``\\boxed{}`` or ``\\boxed 5``,
   else an "answer is X" phrase).
2. :func:`math_reward` checks it against the ground truth (:func:`answers_equivalent`): both are first put in
   one written form (:func:`normalize_answer`: trailing punctuation, thousands separators, spacing commands,
   units in ``\\text{}``, degree signs, repeating decimals, ``\\dfrac``, ``\\left(``), then plain integers are
   compared directly (the fast path) and everything else goes through math-verify (``parse`` + ``verify``),
   which knows that ``3/4``, ``0.75``, ``\\frac{3}{4}`` and ``\\dfrac34`` are the same number.

Every step is linear in the length of the text (no regex here can backtrack more than a bounded amount per
position); docs/rewards.md lists the forms that count and those that do not.
"""

from __future__ import annotations

import logging
import re
from math import gcd
from typing import Callable

from math_verify import parse, verify
from math_verify.errors import TimeoutException

from m2flow.rewards.limits import call_with_limit

# math-verify warns on every call made without its own (signal-based) timeouts; ours covers them (see math_reward)
logging.getLogger("math_verify").setLevel(logging.ERROR)

# `\boxed{` / `\fbox{` openers, `\boxed 5` / `\boxed5` (no brace: the opener without `{`), escaped braces
# (literal, not grouping), and plain braces. `\boxedx` is another command, not a box.
_BRACE_TOKENS = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*\{?|\\[{}]|[{}]")
# "the answer is X" / "answer: X": the phrase; X runs to the end of the sentence (". ") or line (see
# _answer_phrases: one regex with a lazy X and an end-of-line alternative backtracked quadratically over long
# runs of spaces, 42 s on "the answer is 1" + 80k spaces + "x").
_ANSWER_PREFIX = re.compile(r"\banswer(?:\s+is\b\s*:?|\s*:)[ \t]*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.\s")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_PLAIN_INT = re.compile(r"\d+")


def _last_boxed(text: str) -> str | None:
    """Content of the last-opened box: a properly closed ``\\boxed{}``/``\\fbox{}``, or ``\\boxed 5`` without
    braces (one linear pass).

    Nested boxes: the inner box opens last, so ``\\boxed{x=\\boxed{5}}`` gives ``5``.
    An unclosed trailing box is ignored in favour of the last closed one.
    """
    stack: list[tuple[bool, int, int]] = []  # (is_box, box_start, content_start)
    best: tuple[int, str] | None = None
    bare: tuple[int, int] | None = None  # (box_start, content_start) of the last brace-less box
    for m in _BRACE_TOKENS.finditer(text):
        tok = m.group()
        if tok[0] == "\\" and len(tok) == 2:  # \{ or \}: literal brace
            continue
        if tok == "}":
            if not stack:
                continue
            is_box, start, content_start = stack.pop()
            if is_box and (best is None or start > best[0]):
                best = (start, text[content_start:m.start()])
        elif tok[-1] != "{":  # \boxed 5: only the last one can win, read once after the pass (linear)
            bare = (m.start(), m.end())
        else:
            stack.append((tok != "{", m.start(), m.end()))
    if bare is not None and (best is None or bare[0] > best[0]):
        token = _bare_box_token(text, bare[1])
        if token:
            return token
    return None if best is None else best[1]


def _bare_box_token(text: str, start: int) -> str:
    """What ``\\boxed 5`` boxes as its writer meant it: from ``start`` to the first whitespace or ``$`` outside
    braces, or an unmatched ``}`` (``\\boxed 42.`` gives ``42.``; ``\\boxed \\frac{1}{2} is`` gives
    ``\\frac{1}{2}``)."""
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            if depth == 0:
                break
            depth -= 1
        elif depth == 0 and (c.isspace() or c == "$"):
            break
        i += 1
    return text[start:i]


def _answer_phrases(text: str) -> list[str]:
    """Every "answer is X" / "answer: X" in order, in one linear pass. X (one character at least) ends before
    the first ". " of its line or at the line's end, trailing spaces/tabs and one period dropped; a phrase
    with nothing after it on its line gives ""."""
    phrases, pos = [], 0
    while m := _ANSWER_PREFIX.search(text, pos):
        start = m.end()
        line_end = text.find("\n", start)
        line_end = len(text) if line_end < 0 else line_end
        if start == line_end:
            phrases.append("")
            pos = max(start, m.start() + 1)
            continue
        stop = len(text[start:line_end].rstrip(" \t"))  # relative end of X before trailing blanks
        stop = max(stop - (stop > 1 and text[start + stop - 1] == "."), 1)
        end = start + stop
        dot = _SENTENCE_END.search(text, start + 1, min(line_end + 1, len(text)))
        if dot and dot.start() <= end:
            end, pos = dot.start(), dot.end()
        else:
            pos = line_end
        phrases.append(text[start:end])
    return phrases


def _clean(answer: str) -> str:
    """Strip whitespace, markdown bold, surrounding ``$`` and a trailing period."""
    answer = answer.strip().strip("*").strip()
    answer = answer[:-1] if answer.endswith(".") else answer
    return answer.strip().strip("$").strip()


def extract_answer(text: str, *, last_number_fallback: bool = False) -> str | None:
    """Extract the final answer from a model response.

    In order:
      1. the content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (brace-balanced; an empty
         last box means "no answer" and gives ``None``), or of ``\\boxed 5`` written without braces (up to
         the next space or ``$``) when that comes last;
      2. the last "the answer is X" / "answer: X" (case-insensitive; X ends at the end of its
         sentence or line, trailing period and ``$`` stripped);
      3. only if ``last_number_fallback``: the last number in the text (off by default because it
         rewards unformatted guesses);
      4. ``None``.
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        boxed = boxed.strip()
        return boxed or None
    phrases = _answer_phrases(text)
    if phrases:
        answer = _clean(phrases[-1])
        if answer:
            return answer
    if last_number_fallback:
        numbers = _NUMBER.findall(text)
        if numbers:
            return numbers[-1]
    return None


# Forms of the same answer (normalize_answer). Each regex matches at a bounded set of places with bounded
# backtracking: no nested quantifiers, digit runs matched only from their first digit.
_FRAC_VARIANTS = re.compile(r"\\[dt]frac(?![A-Za-z])")
_DELIMITER_SIZES = re.compile(r"\\(?:left|right|[bB]igg?[lr]?)(?![A-Za-z])")
# Spacing: `\,` `\;` `\:` `\>` `\!` `\ ` `~` `\quad` `\qquad`, and no-break / thin / narrow spaces.
_SPACING = re.compile(r"\\[,;:>! ]|\\q?quad(?![A-Za-z])|~|[\u00a0\u2002-\u200a\u202f\u205f]")
_DEGREES = re.compile(r"\^(?:\\circ(?![A-Za-z])|\{\s*\\circ\s*\})|°|\\degree(?![A-Za-z])")
_REPEATING = re.compile(r"(?<![\d.])(\d*)\.(\d*)\\(?:overline|dot)\s*\{(\d+)\}")
_MAX_REPEATING_DIGITS = 60  # longer repeating decimals are left alone (no huge integers built from untrusted text)
# Thousands groups: a first group of 1-3 digits (not starting with 0), then groups of exactly 3 digits behind one
# kind of separator, and no further digit or half group after them (so "1,2" and "1,000,00" are not numbers).
_COMMA_GROUPS = re.compile(r"(?<![\d.,])[1-9]\d{0,2}(?:,\d{3})+(?!\d|,\d)")
_SPACE_GROUPS = re.compile(r"(?<![\d.])(?<!\d )[1-9]\d{0,2}(?: \d{3})+(?!\d| \d)")
_TEXT_COMMANDS = ("\\text", "\\textrm", "\\textnormal", "\\textup", "\\textit", "\\textbf", "\\mbox")
_UNIT_WORD = re.compile(r"[A-Za-z][A-Za-z.'/-]*(?:\^\{?\d\}?)?")
_TRAILING_POWER = re.compile(r"\^\{?[23]\}?$")
_TRAILING_PUNCTUATION = ".,;:"


def normalize_answer(answer: str) -> str:
    """One written form for an extracted answer (or a ground truth), so that the forms people and models write
    compare equal. In order:

    - ``$`` and outer whitespace dropped; ``\\dfrac``/``\\tfrac`` -> ``\\frac``; ``\\left``/``\\right``/``\\big``
      sizes dropped;
    - spacing commands (``\\,`` ``\\;`` ``\\!`` ``\\ `` ``~`` ``\\quad``) and no-break/thin spaces (U+00A0, U+2009,
      U+202F, ...) -> one space; ``{,}`` -> ``,``;
    - degree signs dropped (``30^\\circ``, ``30^{\\circ}``, ``30°``, ``30\\degree`` -> ``30``);
    - words at the end of the answer inside ``\\text{}``/``\\mbox{}`` (units: ``5\\text{ cm}^2``,
      ``\\text{5 apples}`` -> ``5``), only when a number is left;
    - repeating decimals -> fractions (``0.\\overline{3}`` -> ``\\frac{1}{3}``, ``0.1\\dot{6}`` -> ``\\frac{1}{6}``);
    - thousands separators dropped where every group after the first has exactly 3 digits (``1,000``,
      ``1{,}000``, ``1\\,000``, ``12 345 678``); ``1,2`` and ``1,23`` stay lists, and so do commas in brackets
      (``[1,100]``) or in ``\\{...\\}``;
    - trailing ``.`` ``,`` ``;`` ``:`` dropped (not ``!``: a factorial); whitespace runs -> one space.
    """
    s = answer.strip().strip("$").strip()
    s = _FRAC_VARIANTS.sub(r"\\frac", s)
    s = _DELIMITER_SIZES.sub("", s)
    s = _SPACING.sub(" ", s).replace("{,}", ",")
    s = _DEGREES.sub("", s)
    s = _strip_trailing_punctuation(" ".join(s.split()))
    s = _strip_text_units(s)
    if "\\overline" in s or "\\dot" in s:
        s = _REPEATING.sub(_repeating_to_fraction, s)
    if not any(c in s for c in "()[]") and "\\{" not in s:  # in a tuple, interval or set: two numbers
        s = _COMMA_GROUPS.sub(lambda m: m.group().replace(",", ""), s)
    s = _SPACE_GROUPS.sub(lambda m: m.group().replace(" ", ""), s)
    return _strip_trailing_punctuation(s)


def _strip_trailing_punctuation(s: str) -> str:
    return s.rstrip(_TRAILING_PUNCTUATION + " ").strip("$").strip()


def _strip_text_units(s: str) -> str:
    """Drop unit words at the end of ``s`` that sit in a trailing ``\\text{}`` (see normalize_answer); ``s`` as
    it was if none, or if no digit would be left."""
    power = _TRAILING_POWER.search(s)  # 5\text{ cm}^2: the power belongs to the unit
    body = s[:power.start()] if power else s
    if not body.endswith("}"):
        return s
    depth, i = 0, len(body) - 1  # the `{` matching the last `}`: one backwards pass over the group
    while i >= 0:
        if body[i] == "}" and not (i > 0 and body[i - 1] == "\\"):
            depth += 1
        elif body[i] == "{" and not (i > 0 and body[i - 1] == "\\"):
            depth -= 1
            if depth == 0:
                break
        i -= 1
    if i < 0:
        return s
    command = next((c for c in _TEXT_COMMANDS if body.endswith(c, 0, i)), None)
    if command is None:
        return s
    words = body[i + 1:-1].split()
    keep = len(words)
    while keep and _UNIT_WORD.fullmatch(words[keep - 1]):
        keep -= 1
    if keep == len(words):  # no unit word at the end (e.g. \text{5}, \text{(C)}): not a unit
        return s
    stripped = _strip_trailing_punctuation(f"{body[:i - len(command)]} {' '.join(words[:keep])}".strip())
    return stripped if any(c.isdigit() for c in stripped) else s


def _repeating_to_fraction(m: re.Match) -> str:
    """``I.N\\overline{R}`` -> ``\\frac{p}{q}``: (INR - IN) / (10^len(N) * (10^len(R) - 1)), reduced."""
    whole, fixed, repeat = m.groups()
    if len(whole) + len(fixed) + len(repeat) > _MAX_REPEATING_DIGITS:
        return m.group()
    p = int(whole + fixed + repeat) - int(whole + fixed or "0")
    q = 10 ** len(fixed) * (10 ** len(repeat) - 1)
    g = gcd(p, q)
    p, q = p // g, q // g
    return str(p) if q == 1 else f"\\frac{{{p}}}{{{q}}}"


def _as_plain_int(s: str) -> str | None:
    """Canonical form of ``s`` if it is a plain integer (a sign, spaces after it and a leading ``+`` allowed;
    ``1 2`` is not the integer 12)."""
    s = s.strip()
    sign = ""
    if s and s[0] in "+-":
        sign, s = s[0].replace("+", ""), s[1:].lstrip()
    if not _PLAIN_INT.fullmatch(s):
        return None
    digits = s.lstrip("0") or "0"
    return "0" if digits == "0" else sign + digits  # -0 == 0; no int(), so no digit-count limit


def _for_parse(s: str) -> str:
    """Wrap a bare answer so math-verify's LaTeX extractor picks up exactly this expression."""
    s = s.strip().strip("$").strip()
    return s if re.search(r"\\(?:boxed|fbox)\b", s) else f"\\boxed{{{s}}}"


def _is_equivalent(answer: str, ground_truth: str) -> bool:
    """math-verify equivalence, without its own (signal-based, whole-second) timeouts: the caller's limit
    (`call_with_limit`) covers extraction and verification together."""
    gold = parse(_for_parse(ground_truth), parsing_timeout=None)
    pred = parse(_for_parse(answer), parsing_timeout=None)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=None))


def answers_equivalent_unlimited(answer: str, ground_truth: str) -> bool:
    """Whether two extracted answers are the same mathematically: both normalised (`normalize_answer`), then
    plain integers compared directly, everything else by math-verify (an error there means "not equivalent").
    No time limit: see `answers_equivalent`."""
    answer, ground_truth = normalize_answer(answer), normalize_answer(ground_truth)
    a, g = _as_plain_int(answer), _as_plain_int(ground_truth)
    if a is not None and g is not None:
        return a == g
    if not answer or not ground_truth:
        return False
    try:
        return _is_equivalent(answer, ground_truth)
    except (Exception, TimeoutException):
        return False


def _equivalence_score(answer: str, other: str, **_options) -> float:
    return float(answers_equivalent_unlimited(answer, other))


def answers_equivalent(answer: str, other: str, *, timeout_s: float = 2.0) -> bool:
    """`answers_equivalent_unlimited` under a hard time limit (`call_with_limit`); past it, not equivalent."""
    return call_with_limit(_equivalence_score, answer, other, timeout_s=timeout_s) == 1.0


def math_reward(response: str, ground_truth: str, *, format_penalty: float = 0.0,
                timeout_s: float = 2.0) -> float:
    """Score a response against a ground-truth answer.

    Returns 1.0 if the extracted answer equals ``ground_truth`` mathematically, 0.0 if it does not
    (or verification errors), and ``-format_penalty`` if no answer can be extracted or scoring (extraction
    included) runs past ``timeout_s``: a pathological response never pays more than no answer. The limit
    holds in every calling context (`m2flow.rewards.limits.call_with_limit`: SIGALRM in a main thread, a
    killable worker process in other threads). Fast path: when both are plain integers (e.g. ``"42"``,
    ``"- 5"``, ``"+7"``) they are compared directly without math-verify (~2 us vs ~400 us per call here).
    """
    score = call_with_limit(math_reward_unlimited, response, ground_truth, timeout_s=timeout_s,
                            format_penalty=format_penalty)
    return timeout_score(format_penalty) if score is None else score


def timeout_score(format_penalty: float) -> float:
    """What a response whose scoring timed out gets: the same as no answer."""
    return -float(format_penalty) or 0.0


def math_reward_unlimited(response: str, ground_truth: str, *, format_penalty: float = 0.0, **_options) -> float:
    """`math_reward` without a time limit: for callers that enforce one (RewardPool workers)."""
    answer = extract_answer(response)
    if answer is None:
        return -format_penalty
    return float(answers_equivalent_unlimited(answer, ground_truth))


def boxed_format_reward(response: str, ground_truth: str | None = None, **_options: object) -> float:
    """1.0 if the response contains a closed ``\\boxed{}`` (even empty), else 0.0."""
    return float(_last_boxed(response) is not None)


def score_responses(responses: list[str], ground_truths: list[str],
                    reward_fn: Callable[..., float] = math_reward, **kwargs) -> list[float]:
    """Apply ``reward_fn(response, ground_truth, **kwargs)`` pairwise over two equal-length lists."""
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    return [float(reward_fn(r, g, **kwargs)) for r, g in zip(responses, ground_truths)]
