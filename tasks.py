"""Questions in, rewards out: the datasets, the toy world, prompts, and grading.

A dataset is a list of {question, answer} rows (`load_data`): GSM8K, MATH (MATH-500 held out),
the toy sums, a .jsonl file, or for evaluation one of the papers' benchmarks (`BENCHMARKS`).
`format_prompt` turns a row into the model's prompt, `PromptSampler` draws a step's questions,
and `rewards_for` grades completions against the gold answers as the benchmarks do
(`is_correct`); `sample_rows` shows what the grader made of each completion (DIR/samples.jsonl).
Nothing here knows about models beyond their tokenizer.
"""

import contextlib
import fractions
import functools
import json
import logging
import os
import random
import re
import signal
import sys
import threading
from typing import NamedTuple, Optional

import torch

import plumbing

# ----------------------------------------------------------------------------------------------
# The toy world: tiny Qwen2-architecture models on addition, shipped in toy/<name>/.
#
# toy (toy-small, toy-large): "a+b" with a, b in 0..99, answered at a fixed width ("05+68=073",
# then EOS). toy-hard (toy-hard-small, toy-hard-large): "a+b" with a, b in 0..999 and a + b >= 1000
# ("417+817=1234"), where the small model is rarely right. Held out: 500 fixed questions each. The
# models are loaded like any local directory, so every machine starts from the same weights;
# toy/build.py is the recipe that made them (and rebuilds and compares).

TOY_MODELS = {"toy-small": "toy", "toy-large": "toy", "toy-hard-small": "toy-hard", "toy-hard-large": "toy-hard"}  # name: its dataset
TOY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy")
TOY_EVAL_PAIRS = 500


def toy_problems(split: str):
    """All (a, b) pairs, 0..99 each: 500 fixed ones are the eval split, the rest train."""
    pairs = [(a, b) for a in range(100) for b in range(100)]
    random.Random(1234).shuffle(pairs)
    return pairs[:TOY_EVAL_PAIRS] if split == "eval" else pairs[TOY_EVAL_PAIRS:]


TOY_HARD_TRAIN = 50_000


def toy_hard_problems(split: str):
    """(a, b) pairs, 0..999 each, whose sum reaches 1000 (the last column carries), drawn once with a
    fixed seed: 500 for eval, the next TOY_HARD_TRAIN for training."""
    rng, seen, pairs = random.Random(4321), set(), []
    while len(pairs) < TOY_EVAL_PAIRS + TOY_HARD_TRAIN:
        ab = (rng.randrange(1000), rng.randrange(1000))
        if ab not in seen and sum(ab) >= 1000:
            seen.add(ab)
            pairs.append(ab)
    return pairs[:TOY_EVAL_PAIRS] if split == "eval" else pairs[TOY_EVAL_PAIRS:]


def is_toy(name: str) -> bool:
    return name in TOY_MODELS


def toy_path(name: str) -> str:
    path = os.path.join(TOY_DIR, name)
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        plumbing.die(f"the toy model '{name}' is missing from {path}: it ships with the repository (restore it with "
                     f"`git checkout -- toy/`, or rebuild it with `python -m toy.build {name} --write`)")
    return path


# ----------------------------------------------------------------------------------------------
# Data and prompts

DATASETS = ("gsm8k", "math", "toy", "toy-hard")


class Benchmark(NamedTuple):
    """Where a benchmark's rows are: the hub copy that the papers' evaluation code reads, and its fields."""
    repo: str
    config: str
    split: str
    question: str
    answer: str  # a string, a number (AMC's 27.0) or a list of strings (OlympiadBench's final_answer)


BENCHMARKS = {  # evaluation only: load_data(name, "eval"), evaluate.py; fields checked on real rows (docs/evaluate.md)
    "math500": Benchmark("HuggingFaceH4/MATH-500", "default", "test", "problem", "answer"),
    "minerva": Benchmark("math-ai/minervamath", "default", "test", "question", "answer"),
    "olympiadbench": Benchmark("math-ai/olympiadbench", "default", "test", "question", "final_answer"),
    "amc23": Benchmark("math-ai/amc23", "default", "test", "question", "answer"),
    "aime24": Benchmark("HuggingFaceH4/aime_2024", "default", "train", "problem", "answer"),
    "aime25": Benchmark("math-ai/aime25", "default", "test", "problem", "answer"),
    "gsm8k": Benchmark("openai/gsm8k", "main", "test", "question", "answer"),
}
BENCHMARK_DIR = "BENCHMARK_DIR"  # environment variable: a directory of <name>.jsonl copies of benchmarks' rows
HUB_DATASETS = {"gsm8k": ("openai/gsm8k",), "math": ("DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500"),
                **{name: (b.repo,) for name, b in BENCHMARKS.items() if name != "gsm8k"}}  # load_data reads these
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def load_data(name: str, split: str) -> list:
    """[{question, answer}] for split 'train' or 'eval'. gsm8k: openai/gsm8k main (train/test);
    math: MATH train (the lighteval copy, config default) and MATH-500 for eval; toy; a benchmark
    (BENCHMARKS, eval only); or a .jsonl path with question/answer fields (a GSM8K-style '... #### n'
    answer is cut to n; both splits are the whole file), and optionally a 'prompt' field: the user
    message verbatim (`format_prompt`), the question then defaulting to it. Rows whose gold answer is
    empty (a MATH solution without \\boxed{}) are dropped: any answer would match nothing, and an
    empty one must never earn the reward."""
    if name == "toy":
        return [dict(question=f"{a:02d}+{b:02d}", answer=str(a + b)) for a, b in toy_problems(split)]
    if name == "toy-hard":
        return [dict(question=f"{a:03d}+{b:03d}", answer=str(a + b)) for a, b in toy_hard_problems(split)]
    if name.endswith(".jsonl") or os.path.exists(name):
        if not os.path.isfile(name):
            plumbing.die(f"dataset file '{name}' does not exist")
        rows = []
        with open(name) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    q, a, p = r["question"] if "question" in r else r["prompt"], r["answer"], r.get("prompt")
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                    plumbing.die(f"{name}:{n}: each line must be a JSON object with 'question' (or 'prompt') and 'answer'")
                if not isinstance(q, str) or not isinstance(a, (str, int, float)) or isinstance(a, bool):
                    plumbing.die(f"{name}:{n}: 'question' must be a string and 'answer' a string or a number, "
                                 f"not {type(q).__name__} and {type(a).__name__}")
                if p is not None and not isinstance(p, str):
                    plumbing.die(f"{name}:{n}: 'prompt' must be a string, not {type(p).__name__}")
                gold = gold_answer(str(a))
                if gold.count("{") != gold.count("}"):
                    plumbing.die(f"{name}:{n}: the gold answer {gold[:60]!r} cannot be parsed: its braces are unbalanced")
                rows.append(dict(question=q, answer=gold, **({} if p is None else dict(prompt=p))))
        if not rows:
            plumbing.die(f"dataset file '{name}' holds no rows")
        return drop_empty_golds(rows, name)
    if split == "eval" and (name in BENCHMARKS or name == "math"):  # gsm8k: its test split; math: MATH-500
        return load_benchmark("math500" if name == "math" else name)
    if name not in DATASETS:
        said = (f"'{name}' is a benchmark, for evaluation only: train on" if name in BENCHMARKS else
                f"unknown dataset '{name}' (benchmarks, for evaluation: {', '.join(BENCHMARKS)}): use")
        plumbing.die(f"{said} one of {', '.join(DATASETS)} or a path to a .jsonl file with 'question' and 'answer' fields")
    from datasets import load_dataset
    try:
        if name == "gsm8k":
            ds = load_dataset(HUB_DATASETS["gsm8k"][0], "main", split="train")
            rows = [dict(question=r["question"], answer=gold_answer(r["answer"])) for r in ds]
        else:
            ds = load_dataset(HUB_DATASETS["math"][0], "default", split="train")
            rows = [dict(question=r["problem"], answer=last_boxed(r["solution"]) or "") for r in ds]
    except Exception as e:  # datasets raises many types when offline
        plumbing.die(f"cannot load dataset '{name}' ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                     "offline, use --dataset toy or a local .jsonl file")
    return drop_empty_golds(rows, f"{name} {split}")


def benchmark_gold(value) -> str:
    """A benchmark row's gold as text: a list (OlympiadBench's final_answer, each item in $...$) joined by
    ', '; a whole float (AMC's 27.0) as an integer; a GSM8K solution cut after ####."""
    if isinstance(value, list):
        return ", ".join(re.sub(r"(?<!\\)\$", "", str(v)).strip() for v in value)
    return str(int(value)) if isinstance(value, float) and value.is_integer() else gold_answer(str(value))


def load_benchmark(name: str) -> list:
    """[{question, answer}] of a benchmark (BENCHMARKS): from $BENCHMARK_DIR/<name>.jsonl when there is one
    (rows as the hub holds them), else from the hub, or from the datasets cache when the hub is unreachable."""
    b, folder = BENCHMARKS[name], os.environ.get(BENCHMARK_DIR, "")
    if folder and os.path.isfile(os.path.join(folder, f"{name}.jsonl")):
        rows = [json.loads(line) for line in open(os.path.join(folder, f"{name}.jsonl")) if line.strip()]
    else:
        online = plumbing.offline_unless_reachable()
        from datasets import load_dataset
        try:
            rows = load_dataset(b.repo, b.config, split=b.split)
        except Exception as e:  # datasets raises many types when offline
            get = f"datasets.load_dataset('{b.repo}', '{b.config}', split='{b.split}')"
            plumbing.die(f"cannot load benchmark '{name}' ({b.repo}, split {b.split}; {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]})" + ("" if online else
                         f": offline it must be in the datasets cache. To get it: where the hub is reachable, run "
                         f"`python -c \"import datasets; {get}\"` once with the same HF_HOME, or put a copy of its rows "
                         f"in ${BENCHMARK_DIR}/{name}.jsonl"))
    try:
        rows = [dict(question=r[b.question], answer=benchmark_gold(r[b.answer])) for r in rows]
    except (KeyError, TypeError) as e:  # a local copy in another format
        plumbing.die(f"benchmark '{name}': a row without the field {e} (its rows have '{b.question}' and '{b.answer}')")
    return drop_empty_golds(rows, name)


def drop_empty_golds(rows: list, name: str) -> list:
    kept = [r for r in rows if r["answer"].strip()]
    if len(kept) < len(rows) and plumbing.rank() == 0:
        print(f"{name}: dropped {len(rows) - len(kept)} of {len(rows)} rows whose gold answer is empty",
              file=sys.stderr)
    if not kept:
        plumbing.die(f"dataset '{name}' has no row with a gold answer")
    return kept


def prompt_instruction(dataset: str) -> str:
    """A dataset's own instruction (--instruction's default), so the reward can parse the answer: a
    \\boxed{} answer for real data; the toy's answer is the bare number after '='."""
    return "" if dataset in ("toy", "toy-hard") else BOXED_INSTRUCTION


def format_prompt(tok, row, *, instruction: str, system_prompt: Optional[str] = None) -> str:
    """The prompt of a dataset row (or of a question string). The user message is the row's 'prompt'
    verbatim when it has one, else its question with `instruction` on a new line (none when empty).
    It goes through the tokenizer's chat template when it has one (Qwen's, SmolLM2's, the toy's),
    after a system message `system_prompt`; None leaves the template's own (Qwen: "You are Qwen,
    ..."). Without a template: 'Question: ... Answer:', the system prompt on a line before it."""
    row = dict(question=row) if isinstance(row, str) else row
    content = row["prompt"] if "prompt" in row else row["question"] + (f"\n{instruction}" if instruction else "")
    system = [] if system_prompt is None else [dict(role="system", content=system_prompt)]
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template([*system, dict(role="user", content=content)], tokenize=False,
                                       add_generation_prompt=True)
    return ("" if system_prompt is None else f"{system_prompt}\n") + f"Question: {content}\nAnswer:"


def end_of_turn_id(tok) -> Optional[int]:
    """The token the chat template writes right after an assistant message, when it is an added
    token (Qwen: <|im_end|>, Llama 3: <|eot_id|>); None without a template or such a token."""
    if not getattr(tok, "chat_template", None):
        return None
    mark = "ANSWER-END-MARK"
    try:
        text = tok.apply_chat_template([dict(role="user", content="Q"), dict(role="assistant", content=mark)],
                                       tokenize=False)
    except Exception:  # a template may refuse this conversation: then it names no end of turn
        return None
    after = text.split(mark, 1)[1] if isinstance(text, str) and mark in text else ""
    ids = tok(after, add_special_tokens=False).input_ids if after else []
    return ids[0] if ids and ids[0] in tok.get_added_vocab().values() else None


def eos_ids(model, tok) -> list:
    """Every id that ends a completion: the tokenizer's EOS, the generation_config's and the chat
    template's end of turn. Prompts use the chat template, so a base model (whose EOS is
    <|endoftext|> only) that closes its turn with <|im_end|> must stop there too, not write and
    answer a question of its own."""
    ids = {tok.eos_token_id, end_of_turn_id(tok)}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return sorted(i for i in ids if i is not None)


class PromptSampler:
    """Questions without replacement, reshuffled each epoch, from a seeded generator (resumable)."""

    def __init__(self, rows: list, seed: int):
        self.rows, self.rng, self.order = rows, random.Random(seed), []

    def next(self, n: int) -> list:
        out = []
        while len(out) < n:
            if not self.order:
                self.order = list(range(len(self.rows)))
                self.rng.shuffle(self.order)
            out.append(self.rows[self.order.pop()])
        return out

    def state_dict(self):
        return dict(rng=self.rng.getstate(), order=list(self.order))

    def load_state_dict(self, s):
        self.rng.setstate(s["rng"])
        self.order = list(s["order"])


# ----------------------------------------------------------------------------------------------
# Answers and rewards
#
# Graded as the benchmarks grade: the final answer of a completion (last \boxed{}, else after
# ####, else the answer sentence's number or equation's result) is compared with the gold by an
# exact match of the cleaned text (no $, spacing, degree signs, units after a number, final %), as
# exact rationals when both are plain numbers, fractions or powers of ten (never through floats:
# '35625' is not '.35625', 62.5 is not 0.625; Minerva's 1e-5 is 0.00001), and otherwise by
# math-verify (the grader of TRL and open-r1), which reads \frac43, \sqrt2, sets, tuples and
# intervals; its own unit stripping is off (it takes a final t, m, s or c for a unit: 2t would be 2).
# One CPU-time limit covers each check.

GRADE_TIMEOUT_S = 1.0  # a check taking more CPU seconds than this scores 0 and counts in train/grade_errors
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
INLINE_MATH = re.compile(r"\s*(?:\$([^$]*\\[^$]*)\$|\\\((.*?)\\\))")  # $...$ holding LaTeX, or \(...\)
EQUATION = re.compile(r"(?:[-+*/^.,$\d \t]|\\times|\\cdot|\\div)*=")  # '7 + 5 =' opening a line: its result follows
THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
DECIMAL = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
E_NOTATION = re.compile(r"(-?(?:\d+(?:\.\d*)?|\.\d+))[eE]([-+]?\d+)")  # Minerva's golds: 4.5e33, 1e-5
SCIENTIFIC = re.compile(r"(-?)(?:(\d+(?:\.\d*)?|\.\d+)(?:[eE]|(?:\\times|\\cdot|\*)10\^)|10\^)\{?([-+]?\d+)\}?")
RATIO = re.compile(r"(-?)(?:\\frac\{(-?\d+)\}\{(-?\d+)\}|\\frac(\d)(\d)|(-?\d+)/(-?\d+))")  # \frac{a}{b}  \frac43  a/b
UNIT = re.compile(r"(?<=[\d}])\s*(?:\\(?:text|mbox|mathrm)\s*\{[^{}]*\}|(?:sq(?:uare)?\s+)?(?:inch|inches|feet|foot|"
                  r"ft|yards?|miles?|mm|cm|km|meters?|metres?|kg|grams?|pounds?|dollars?|cents?|hours?|minutes?|"
                  r"seconds?|days?|weeks?|years?|degrees?|units?))(?:\^\{?\d\}?)?$")  # 42 \text{ inches}, 1.6 \mathrm{~cm}
DEGREES = re.compile(r"\^\s*\{?\\circ\}?")


def gold_answer(text: str) -> str:
    """A GSM8K-style solution ('... #### 72') gives the text after ####; anything else as it is."""
    return text.split("####")[-1].strip() if "####" in text else text.strip()


def _answer_in(tail: str) -> Optional[str]:
    """The answer written after 'answer is' or ####: LaTeX in $...$ or \\(...\\) (of an equation, its right
    side), else the first number, after any equation that opens the text ('7 + 5 = 12' gives 12, '122 * 4 ='
    gives '': no answer); None when there is neither."""
    m = INLINE_MATH.match(tail)
    if m:
        math = m.group(1) if m.group(1) is not None else m.group(2)
        return math.rsplit("=", 1)[-1].strip() if "=" in math and "," not in math else math
    opened = False
    while EQUATION.match(tail):
        tail, opened = tail[EQUATION.match(tail).end():].split("\n")[0], True
    nums = NUMBER.findall(tail)
    return nums[0] if nums else ("" if opened else None)


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a completion: the last \\boxed{}; else what the last #### line gives, when it
    gives one (a line without one is a markdown heading); else what follows the last 'answer is' /
    'answer:' (LaTeX in $...$, or its first number: words or a second number after it are no answer;
    an equation there gives its result, one without a result no answer); else the last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    text = text.replace("{,}", ",")
    phrase = list(ANSWER_PHRASE.finditer(text))
    tails = [text.split("####")[-1].split("\n")[0]] if "####" in text else []
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


class Scores(NamedTuple):
    """What grading a batch of completions gives the training loop."""
    reward: torch.Tensor   # (B,) float: correctness plus the format bonus
    correct: torch.Tensor  # (B,) bool: the final answer is right (the bonus alone never counts)
    grade_errors: int      # completions whose grading failed (scored as wrong)


def rewards_for(completions: list, golds: list, format_coef: float = 0.0) -> Scores:
    """Reward 1 for a correct final answer, plus `format_coef` when the answer is given in the
    asked-for form (\\boxed{} or ####). A completion whose grading raises scores 0 and is counted."""
    correct, errors = [], 0
    for c, g in zip(completions, golds):
        try:
            correct.append(is_correct(c, g))
        except Exception:  # a strange completion must never stop a run
            correct.append(False)
            errors += 1
    fmt = [float(last_boxed(c) is not None or "####" in c) for c in completions]
    correct = torch.tensor(correct, dtype=torch.bool)
    return Scores(correct.float() + format_coef * torch.tensor(fmt), correct, errors)


def sample_rows(row: dict, completions: list, correct, **columns) -> list:
    """What the model wrote, as rows of DIR/samples.jsonl (rundir.Run.log_samples): one per completion of the
    question `row`, with the answer the grader extracted from it, its verdict `correct` (B,) and its value in
    each of `columns` (each a (B,) tensor or list, e.g. reward=..., advantage=...)."""
    return [dict(question=row["question"], gold=row["answer"], completion=c, answer=extract_answer(c), correct=bool(ok),
                 **{k: v[i] for k, v in columns.items()}) for i, (c, ok) in enumerate(zip(completions, correct))]
