"""Math answer extraction and verification rewards.

The reward for a response is decided in two steps:

1. :func:`extract_answer` pulls the final answer out of free text (the last ``\\boxed{}``,
   else an "answer is X" phrase).
2. :func:`math_reward` checks it against the ground truth: plain integers are compared directly
   (the fast path), everything else goes through math-verify (``parse`` + ``verify``), which knows
   that ``3/4``, ``0.75``, ``\\frac{3}{4}`` and ``\\dfrac34`` are the same number.
"""

from __future__ import annotations

import logging
import re
from typing import Callable

from math_verify import parse, verify
from math_verify.errors import TimeoutException

from m2flow.rewards.limits import call_with_limit

# math-verify warns on every call made without its own (signal-based) timeouts; ours covers them (see math_reward)
logging.getLogger("math_verify").setLevel(logging.ERROR)

# `\boxed{` / `\fbox{` openers, escaped braces (literal, not grouping), and plain braces.
_BRACE_TOKENS = re.compile(r"\\(?:boxed|fbox)\s*\{|\\[{}]|[{}]")
# "the answer is X" / "answer: X": the phrase; X runs to the end of the sentence (". ") or line (see
# _answer_phrases: one regex with a lazy X and an end-of-line alternative backtracked quadratically over long
# runs of spaces, 42 s on "the answer is 1" + 80k spaces + "x").
_ANSWER_PREFIX = re.compile(r"\banswer(?:\s+is\b\s*:?|\s*:)[ \t]*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.\s")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_PLAIN_INT = re.compile(r"-?\d+")


def _last_boxed(text: str) -> str | None:
    """Content of the last-opened, properly closed ``\\boxed{}``/``\\fbox{}`` (one linear pass).

    Nested boxes: the inner box opens last, so ``\\boxed{x=\\boxed{5}}`` gives ``5``.
    An unclosed trailing box is ignored in favour of the last closed one.
    """
    stack: list[tuple[bool, int, int]] = []  # (is_box, box_start, content_start)
    best: tuple[int, str] | None = None
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
        else:
            stack.append((tok != "{", m.start(), m.end()))
    return None if best is None else best[1]


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
         last box means "no answer" and gives ``None``);
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


def _as_plain_int(s: str) -> str | None:
    """Canonical form of ``s`` if it is a plain integer (spaces and a leading ``+`` ignored)."""
    s = "".join(s.split()).lstrip("+")
    if not _PLAIN_INT.fullmatch(s):
        return None
    sign, digits = ("-", s[1:]) if s.startswith("-") else ("", s)
    digits = digits.lstrip("0") or "0"
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
    a, g = _as_plain_int(answer), _as_plain_int(ground_truth)
    if a is not None and g is not None:
        return float(a == g)
    try:
        return float(_is_equivalent(answer, ground_truth))
    except (Exception, TimeoutException):
        return 0.0


def boxed_format_reward(response: str, ground_truth: str | None = None, **_options: object) -> float:
    """1.0 if the response contains a closed ``\\boxed{}`` (even empty), else 0.0."""
    return float(_last_boxed(response) is not None)


def score_responses(responses: list[str], ground_truths: list[str],
                    reward_fn: Callable[..., float] = math_reward, **kwargs) -> list[float]:
    """Apply ``reward_fn(response, ground_truth, **kwargs)`` pairwise over two equal-length lists."""
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    return [float(reward_fn(r, g, **kwargs)) for r, g in zip(responses, ground_truths)]
