"""Questions in, rewards out: the datasets, the toy world, prompts, and grading.

A dataset is a list of {question, answer} rows (`load_data`): GSM8K, MATH (MATH-500 held out),
the toy sums, or a .jsonl file. `format_prompt` turns a row into the model's prompt,
`PromptSampler` draws a step's questions, and `rewards_for` grades completions against the gold
answers as the MATH and GSM8K benchmarks do (`is_correct`). Nothing here knows about models
beyond their tokenizer.
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
HUB_DATASETS = {"gsm8k": ("openai/gsm8k",), "math": ("DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500")}  # load_data reads these
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def load_data(name: str, split: str) -> list:
    """[{question, answer}] for split 'train' or 'eval'. gsm8k: openai/gsm8k main (train/test);
    math: MATH train (the lighteval copy, config default) and MATH-500 for eval; toy; or a .jsonl
    path with question/answer fields (a GSM8K-style '... #### n' answer is cut to n; both splits are
    the whole file), and optionally a 'prompt' field: the user message verbatim (`format_prompt`),
    the question then defaulting to it. Rows whose gold answer is empty (a MATH solution without
    \\boxed{}) are dropped: any answer would match nothing, and an empty one must never earn the reward."""
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
    if name not in DATASETS:
        plumbing.die(f"unknown dataset '{name}': use one of {', '.join(DATASETS)} or a path to a .jsonl file "
                     "with 'question' and 'answer' fields")
    from datasets import load_dataset
    try:
        if name == "gsm8k":
            ds = load_dataset(HUB_DATASETS["gsm8k"][0], "main", split="train" if split == "train" else "test")
            rows = [dict(question=r["question"], answer=gold_answer(r["answer"])) for r in ds]
        elif split == "train":
            ds = load_dataset(HUB_DATASETS["math"][0], "default", split="train")
            rows = [dict(question=r["problem"], answer=last_boxed(r["solution"]) or "") for r in ds]
        else:
            ds = load_dataset(HUB_DATASETS["math"][1], "default", split="test")
            rows = [dict(question=r["problem"], answer=r["answer"]) for r in ds]
    except Exception as e:  # datasets raises many types when offline
        plumbing.die(f"cannot load dataset '{name}' ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                     "offline, use --dataset toy or a local .jsonl file")
    return drop_empty_golds(rows, f"{name} {split}")


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
# ####, else the answer sentence's number) is compared with the gold by an exact match of the
# tidied text, as exact rationals when both are plain numbers or fractions (never through floats:
# '35625' is not '.35625'), and otherwise by math-verify (the grader of TRL and open-r1), with
# the normalisation that reads \frac43, \sqrt2 and units. One CPU-time limit covers each check.

GRADE_TIMEOUT_S = 1.0  # a check taking more CPU seconds than this scores 0 and counts in train/grade_errors
logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout is disabled" warning: the limit is ours


class GradingError(Exception):
    """A completion could not be graded (time limit): scored as wrong and counted."""


class _Deadline(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in sympy or math-verify
    swallows it."""


def last_boxed(text: str) -> Optional[str]:
    """Contents of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
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


NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")  # 1,072  $18.50  14/3  .5
ANSWER_PHRASE = re.compile(r"answer\s*(?:is\b|:|=)", re.IGNORECASE)
INLINE_MATH = re.compile(r"\s*(?:\$([^$]*\\[^$]*)\$|\\\((.*?)\\\))")  # $...$ holding LaTeX, or \(...\)
THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
DECIMAL = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
RATIO = re.compile(r"(-?)(?:\\frac\{(\d+)\}\{(\d+)\}|\\frac(\d)(\d)|(\d+)/(\d+))")  # \frac{a}{b}  \frac43  a/b


def gold_answer(text: str) -> str:
    """A GSM8K-style solution ('... #### 72') gives the text after ####; anything else as it is."""
    return text.split("####")[-1].strip() if "####" in text else text.strip()


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a completion: the last \\boxed{}; else the first number after the last
    ####, when that line has one (a line without one is a markdown heading); else what follows
    the last 'answer is' / 'answer:' (LaTeX in $...$, or its first number: words or a second
    number after it are no answer); else the last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    text = text.replace("{,}", ",")
    if "####" in text:
        nums = NUMBER.findall(text.split("####")[-1].split("\n")[0])
        if nums:
            return nums[0]
    phrase = list(ANSWER_PHRASE.finditer(text))
    if phrase:
        tail = text[phrase[-1].end():]
        m = INLINE_MATH.match(tail)
        if m:
            return m.group(1) if m.group(1) is not None else m.group(2)
        nums = NUMBER.findall(tail)
        if nums:
            return nums[0]
    nums = NUMBER.findall(text)
    return nums[-1] if nums else None


def tidy_answer(s: str) -> str:
    """What an answer's text means, for the exact match: '$1{,}000.$' and '\\$1,000' become
    '1000'; \\dfrac and \\tfrac are \\frac; \\left, \\right, LaTeX spacing and spaces go."""
    s = s.strip().replace("{,}", ",").replace("\\$", "").replace("$", "")
    for a, b in (("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", ""), ("\\left", ""), ("\\right", ""),
                 ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), (" ", "")):
        s = s.replace(a, b)
    s = s.rstrip(".,")
    return s.replace(",", "") if THOUSANDS.fullmatch(s) else s


def _rational(s: str) -> Optional[fractions.Fraction]:
    """The exact value of a tidied plain number or fraction of integers; None for anything else."""
    if DECIMAL.fullmatch(s):
        return fractions.Fraction(s)
    m = RATIO.fullmatch(s)
    if m is None:
        return None
    a, b = [int(x) for x in m.groups()[1:] if x is not None]
    return fractions.Fraction(-a if m.group(1) else a, b) if b else None


@functools.lru_cache(maxsize=1 << 14)
def _parsed(answer: str):
    """math-verify's reading of one answer (cached: a group's golds repeat, and so do answers).
    Its own timeouts are off (whole seconds, main thread only, and silent): is_correct times."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    return parse("\\boxed{" + answer + "}", [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
                 parsing_timeout=None)


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
    """Whether the completion's final answer equals the gold; an empty gold or answer never does.
    Raises GradingError when the check takes more than GRADE_TIMEOUT_S of CPU time."""
    pred = extract_answer(completion)
    if pred is None:
        return False
    p, g = tidy_answer(pred), tidy_answer(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    p_num, g_num = _rational(p), _rational(g)
    if p_num is not None and g_num is not None:  # exact: '.35625' is not '35625', 2**53 + 1 is not 2**53
        return p_num == g_num
    from math_verify import verify
    try:
        with _time_limit(GRADE_TIMEOUT_S):
            return verify(_parsed(gold.strip()), _parsed(pred.strip()), timeout_seconds=None)
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
