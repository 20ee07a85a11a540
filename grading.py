"""The grader: a completion's final answer, and whether it equals the gold (`is_correct`).

Graded as the benchmarks grade: the final answer of a completion (last \\boxed{}, else after ####,
else the math, number or equation's result that opens the answer sentence) is compared with the
gold by an exact match of the cleaned text (no $, spacing, degree signs, units after a number or
\\pi, final %), as exact rationals when both are plain numbers, fractions or powers of ten (never through floats:
'35625' is not '.35625', 62.5 is not 0.625; Minerva's 1e-5 is 0.00001), and otherwise by
math-verify (the grader of TRL and open-r1), which reads \\frac43, \\sqrt2, sets, tuples and
intervals; its own unit stripping is off (it takes a final t, m, s or c for a unit: 2t would be 2).
One CPU-time limit covers each check. tasks.rewards_for turns verdicts into rewards; what was
measured on the public sets is in docs/grading.md and docs/evaluate.md.
"""

import contextlib
import fractions
import functools
import logging
import re
import signal
import threading
from typing import Optional

GRADE_TIMEOUT_S = 1.0  # a check taking more CPU seconds than this scores 0 and counts in train/ (eval/)grade_errors
logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout is disabled" warning: the limit is ours


class GradingError(Exception):
    """A completion could not be graded (time limit): scored as wrong and counted."""


class _Deadline(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in sympy or math-verify
    swallows it."""


def last_boxed(text: str) -> Optional[str]:
    """Contents of the last \\boxed{...} (or \\fbox{...}, \\framebox{...}), braces balanced."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"), text.rfind("\\framebox"))
    if i < 0:
        return None
    j = text.find("{", i)
    if j < 0:
        return None
    depth = 0
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j + 1:k]
    return None


NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+|/\d+)?|-?\.\d+")  # 1,072  $18.50  14/3  .5  3.3e-10
ANSWER_PHRASE = re.compile(r"answer\s*(?:is\b|:|=)", re.IGNORECASE)
LEAD = re.compile(r"(?:\s|[*_:\"]|\\\$)*(?:[a-zA-Z]\s*=\s*)?")  # what may precede it: '**Answer:** ', ': x = ', '\$'
# $$x$$, \[x\], \(x\) or $x$ (Pandoc's rule: '$18 and $20' is no math)
MATH = re.compile(r"\$\$(.+?)\$\$|\\\[(.+?)\\\]|\\\((.+?)\\\)|\$(?!\s)([^$\n]+?)(?<!\s)\$(?!\d)", re.DOTALL)
HEADING = re.compile(r"\s*\d+[.):]\s*[a-zA-Z]")  # '#### 2. Money', '#### 2: Money', not '#### 18 dollars'
LATEX = re.compile(r"-?(?:\d+(?:\.\d+)?)?\\[a-zA-Z]+(?:\{(?:[^{}]|\{[^{}]*\})*\}|\\[a-zA-Z]+|[\d.^/+*-])*")  # -\frac{1}{2}
EQUATION = re.compile(r"(?:[-+*/^.,$\d \t]|\\times|\\cdot|\\div)*=")  # '7 + 5 =' opening a line: its result follows
THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
DECIMAL = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
E_NOTATION = re.compile(r"(-?(?:\d+(?:\.\d*)?|\.\d+))[eE]([-+]?\d+)")  # Minerva's golds: 4.5e33, 1e-5
SCIENTIFIC = re.compile(r"(-?)(?:(\d+(?:\.\d*)?|\.\d+)(?:[eE]|(?:\\times|\\cdot|\*)10\^)|10\^)\{?([-+]?\d+)\}?")
RATIO = re.compile(r"(-?)(?:\\frac\{(-?\d+)\}\{(-?\d+)\}|\\frac(\d)(\d)|(-?\d+)/(-?\d+))")  # \frac{a}{b}  \frac43  a/b
# a unit after a number or \pi: 42 \text{ inches}, 1.6 \mathrm{~cm}, 36\pi \text{ cm}^3, 8\pi square units
UNIT = re.compile(r"(?:(?<=[\d}])|(?<=\\pi))\s*(?:\\(?:text|mbox|mathrm)\s*\{[^{}]*\}|(?:sq(?:uare)?\s+)?"
                  r"(?:inch|inches|feet|foot|ft|yards?|miles?|mm|cm|km|meters?|metres?|kg|grams?|pounds?|dollars?|cents?|"
                  r"hours?|minutes?|seconds?|days?|weeks?|years?|degrees?|units?))(?:\^\{?\d\}?)?$")
DEGREES = re.compile(r"\^\s*\{?\\circ\}?")


def gold_answer(text: str) -> str:
    """A GSM8K-style solution ('... #### 72') gives the text after ####; anything else as it is."""
    return text.split("####")[-1].strip() if "####" in text else text.strip()


def _answer_in(tail: str) -> Optional[str]:
    """The answer that opens `tail` (the text after 'answer is' or ####, past any '**', ':' or 'x ='): math in
    $...$, $$...$$, \\(...\\) or \\[...\\] (of an equation, its right side), LaTeX such as -\\frac{1}{2}, or a
    number, after any equation that opens it ('7 + 5 = 12' gives 12, '122 * 4 =' gives '': no answer); None
    when it opens with none of these ('the answer is right: 2 + 3 = 5' names no answer)."""
    tail = tail[LEAD.match(tail).end():]
    m = MATH.match(tail)
    if m:
        math = next(g for g in m.groups() if g is not None).strip()
        return math.rsplit("=", 1)[-1].strip() if "=" in math and "," not in math else math
    opened = False
    while EQUATION.match(tail):
        tail, opened = tail[EQUATION.match(tail).end():].split("\n")[0].lstrip(), True
    m = LATEX.match(tail) or NUMBER.match(tail)
    return m.group().rstrip(".") if m else ("" if opened else None)


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a completion: the last \\boxed{}; else the number the last #### line opens with
    (GSM8K's '#### 18'; a markdown heading such as '#### Final answer', '#### Step 2: Money' or '#### 2. Money'
    gives none); else what opens the text after the last 'answer is' / 'answer:' (_answer_in: math, LaTeX or a
    number; words or a second number after it are no answer, and words before it mean no answer there);
    else the last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    text = text.replace("{,}", ",")
    phrase = list(ANSWER_PHRASE.finditer(text))
    tails = [text.split("####")[-1].split("\n")[0]] if "####" in text else []
    tails = [t for t in tails if not HEADING.match(t)]
    for tail in tails + [text[phrase[-1].end():] for _ in phrase[-1:]]:
        found = _answer_in(tail)
        if found is not None:
            return found or None
    nums = NUMBER.findall(text)
    return nums[-1] if nums else None


def _clean(s: str) -> str:
    """An answer's text without what never changes its value: $ signs, \\left and \\right, LaTeX spacing,
    degree signs, a unit after a number, a final % or period ('-3./2' is -3/2); \\dfrac is \\frac,
    '4.5e33' is 4.5\\times 10^{33} (math-verify reads e as Euler's number), np.arcsin is \\arcsin."""
    s = s.strip().replace("{,}", ",").replace("\\$", "").replace("$", "")
    s = re.sub(r"(?<!\\)\\[,; ]|~", " ", re.sub(r"(?<!\\)\\!", "", s))  # not the \\ of a matrix's rows
    for a, b in (("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("np.", "\\")):
        s = s.replace(a, b)
    s = UNIT.sub("", DEGREES.sub("", s)).strip()
    s = re.sub(r"(?<=\d)\.(?=/)", "", re.sub(r"\\?%$", "", s)).strip().rstrip(".,").strip()
    m = E_NOTATION.fullmatch(s)
    return f"{m.group(1)}\\times 10^{{{int(m.group(2))}}}" if m else s


def _readings(answer: str) -> list:
    """The cleaned answer; twice when '45,135' may be a number or a list (MATH writes lists so too)."""
    s = _clean(answer)
    return [s.replace(",", ""), s.replace(",", ", ")] if THOUSANDS.fullmatch(s) else [s]


def tidy_answer(s: str) -> str:
    """What an answer's text means, for the exact match: '$1{,}000.$' and '\\$1,000' become '1000',
    '\\text{B, E, G}' 'B,E,G'; \\dfrac and \\tfrac are \\frac; spaces go (_clean says what else)."""
    return _tight(_readings(s)[0])


def _rational(s: str) -> Optional[fractions.Fraction]:
    """The exact value of a tidied plain number, fraction of integers or power of ten (3\\times10^{-5});
    None for anything else."""
    if DECIMAL.fullmatch(s):
        return fractions.Fraction(s)
    m = SCIENTIFIC.fullmatch(s)
    if m and abs(int(m.group(3))) <= 400:
        return (-1 if m.group(1) else 1) * fractions.Fraction(m.group(2) or 1) * fractions.Fraction(10) ** int(m.group(3))
    m = RATIO.fullmatch(s)
    if m is None:
        return None
    a, b = [int(x) for x in m.groups()[1:] if x is not None]
    return fractions.Fraction(-a if m.group(1) else a, b) if b else None


def _tight(reading: str) -> str:
    """A cleaned reading for the exact match: no spaces, '\\text{B, E, G}' is 'B,E,G', '(C)' is 'C', E_{1} is E_1."""
    s = re.sub(r"([_^])\{(\w)\}", r"\1\2", reading.replace(" ", ""))
    m = re.fullmatch(r"\\text(?:bf)?\{(.*)\}", s)
    s = m.group(1) if m else s
    return s[1:-1] if s[:1] + s[-1:] == "()" and "," not in s else s


@functools.lru_cache(maxsize=1 << 14)
def _parsed(answer: str):
    """math-verify's reading of one answer (cached: a group's golds repeat, and so do answers).
    Its own timeouts are off (whole seconds, main thread only, and silent): is_correct times."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, LatexNormalizationConfig, parse
    latex = LatexExtractionConfig(boxed_match_priority=0, normalization_config=LatexNormalizationConfig(
        basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="all", equations=False))
    return parse("\\boxed{" + answer + "}", [latex, ExprExtractionConfig()], parsing_timeout=None)


@contextlib.contextmanager
def _time_limit(seconds: float):
    """A signal after `seconds` of the process's CPU time (not wall time: a busy machine must not
    turn right answers into timeouts). Python runs signal handlers only in a process's main thread
    (each torchrun rank is one): in any other thread the check runs without a limit rather than
    failing, as math-verify's own signal.alarm timeouts would."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return
    armed = [True]

    def on_alarm(signum, frame):
        if armed:
            raise _Deadline

    old = signal.signal(signal.SIGVTALRM, on_alarm)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        armed.clear()
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, old)


def is_correct(completion: str, gold: str) -> bool:
    """Whether the completion's final answer equals the gold, in either reading of '45,135' (_readings); an
    empty gold or answer never does. Raises GradingError when the check takes more than GRADE_TIMEOUT_S of
    CPU time."""
    pred = extract_answer(completion)
    if pred is None:
        return False
    pairs = [(p, g) for g in _readings(gold) for p in _readings(pred)]
    if not _tight(pairs[0][0]) or not _tight(pairs[0][1]):
        return False
    undecided = []
    for p, g in pairs:
        tp, tg = _tight(p), _tight(g)
        p_num, g_num = _rational(tp), _rational(tg)
        if tp == tg or (p_num is not None and p_num == g_num):
            return True
        if p_num is None or g_num is None:  # two numbers are exact: '.35625' is not '35625', 2**53 + 1 not 2**53
            undecided.append((p, g))
    from math_verify import verify
    try:
        with _time_limit(GRADE_TIMEOUT_S):
            return any(verify(_parsed(g), _parsed(p), timeout_seconds=None) for p, g in undecided)
    except _Deadline:
        raise GradingError(f"grading took more than {GRADE_TIMEOUT_S} s of CPU time") from None
