"""Questions in, rewards out: the datasets, the toy world, prompts, and grading.

A dataset is a list of {question, answer} rows (`load_data`): GSM8K, MATH (MATH-500 held out),
the toy sums, a .jsonl file, or for evaluation one of the papers' benchmarks (`BENCHMARKS`).
`format_prompt` turns a row into the model's prompt, `PromptSampler` draws a step's questions,
and `rewards_for` grades completions against the gold answers as the benchmarks do
(`is_correct`); `sample_rows` shows what the grader made of each completion (DIR/samples.jsonl).
Nothing here knows about models beyond their tokenizer.
"""

import bisect
import functools
import importlib
import importlib.util
import json
import os
import random
import re
import sys
from typing import NamedTuple, Optional

import torch

import plumbing
from grading import extract_answer, gold_answer, is_correct, last_boxed

# ----------------------------------------------------------------------------------------------
# The toy world: tiny Qwen2-architecture models on addition, shipped in toy/<name>/.
#
# toy (toy-small, toy-large): "a+b" with a, b in 0..99, answered at a fixed width ("05+68=073",
# then EOS). toy-hard (toy-hard-small, toy-hard-large): "a+b" with a, b in 0..999 and a + b >= 1000
# ("417+817=1234"), where the small model is rarely right. Held out: 500 fixed questions each. The
# models are loaded like any local directory, so every machine starts from the same weights;
# toy/build.py is the recipe that made them (and rebuilds and compares).

TOY_MODELS = {"toy-small": "toy", "toy-large": "toy", "toy-hard-small": "toy-hard", "toy-hard-large": "toy-hard"}
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
    message verbatim (`format_prompt`), the question then defaulting to it; a line's other fields stay
    in its row (a --reward function's columns). Rows whose gold answer is
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
                rows.append({**r, "question": q, "answer": gold})  # every other field as it is: --reward's columns
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


def check_encodable(tok, prompts: list):
    """One line instead of a prompt that the tokenizer would encode without some of its characters (the toy's
    knows the digits, + and = alone, and drops every other one): the model would be asked another question."""
    chars = sorted(set("".join(prompts)))
    lost = [c for c, ids in zip(chars, tok(chars, add_special_tokens=False).input_ids) if ids in ([], [tok.unk_token_id])]
    if lost:
        prompt = next(p for p in prompts if any(c in p for c in lost))
        plumbing.die(f"the tokenizer of '{tok.name_or_path}' cannot encode {''.join(lost)!r} of the prompt {prompt[:80]!r}: "
                     "it would drop them and ask another question; write prompts from the characters it knows "
                     "(a toy model's: the digits, + and =)")


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
# Rewards: the grader's verdicts (grading.py) as the training loop takes them

class Scores(NamedTuple):
    """What grading a batch of completions gives the training loop."""
    reward: torch.Tensor   # (B,) float: correctness plus the format bonus
    correct: torch.Tensor  # (B,) bool: the final answer is right (the bonus alone never counts)
    grade_errors: int      # completions whose grading failed (scored as wrong)


def rewards_for(completions: list, rows: list, format_coef: float = 0.0, reward=None, prompts=None) -> Scores:
    """Reward 1 for a correct final answer, plus `format_coef` when the answer is given in the
    asked-for form (\\boxed{} or ####). A completion whose grading raises scores 0 and is counted.
    `rows`: the dataset rows asked (or their gold answers), each len(completions) / len(rows) times
    in a row (a group), and `prompts` the prompts the model saw, one a row. `reward` (--reward,
    `load_reward`): the user's function gives the reward instead, and a completion is correct when
    its reward is at least 1; a None, or a call that fails, scores 0 and is counted."""
    n = len(completions) // max(len(rows), 1)
    rows = [r if isinstance(r, dict) else dict(answer=r) for r in rows for _ in range(n)]  # (B,)
    if reward is not None:
        values, errors = call_reward(reward, completions, rows, [p for p in prompts or [] for _ in range(n)])
        value = torch.tensor(values, dtype=torch.float32)  # (B,)
        fmt = torch.tensor([float(last_boxed(c) is not None or "####" in c) for c in completions])
        return Scores(value + format_coef * fmt, value >= 1, errors)
    correct, errors = [], 0
    for c, r in zip(completions, rows):
        try:
            correct.append(is_correct(c, r["answer"]))
        except Exception:  # a strange completion must never stop a run
            correct.append(False)
            errors += 1
    fmt = [float(last_boxed(c) is not None or "####" in c) for c in completions]
    correct = torch.tensor(correct, dtype=torch.bool)
    return Scores(correct.float() + format_coef * torch.tensor(fmt), correct, errors)


# --reward FILE.py:NAME or module:NAME: a reward function in TRL's convention (docs/forking.md),
#     fn(completions=[str], prompts=[str], **columns) -> [float or None],
# one value a completion; each column is a field of the rows (answer, question, a .jsonl line's own).


def load_reward(spec: str, *datasets):
    """The function --reward names (None for ''), called once here on the first row of each of `datasets`
    (its gold answer as the completion), so that a missing file or name, a function that raises and one
    that returns the wrong number of values are each one line before anything trains."""
    if not spec:
        return None
    where, _, name = spec.rpartition(":")
    if not where or not name.isidentifier():
        plumbing.die(f"--reward {spec}: name a function as FILE.py:NAME or module:NAME")
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                plumbing.die(f"--reward {spec}: there is no file '{where}'")
            found = importlib.util.spec_from_file_location(os.path.basename(where)[:-3], where)
            module = importlib.util.module_from_spec(found)
            found.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except Exception as e:  # the user's code: its error in one line
        plumbing.die(f"--reward {spec}: importing '{where}' raised {type(e).__name__}: {first_line(e)}")
    fn = getattr(module, name, None)
    if not callable(fn):
        plumbing.die(f"--reward {spec}: '{where}' has no function '{name}'")
    fn = functools.partial(fn)  # named in its errors by `spec`
    fn.spec = spec
    for rows in datasets:
        for r in rows[:1]:
            call_reward(fn, [str(r["answer"])], [r], [r.get("prompt", r["question"])], strict=True)
    return fn


_warned = set()  # the reward functions that failed once in this process


def first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0][:160]


def call_reward(fn, completions: list, rows: list, prompts: list, strict: bool = False):
    """(values, failures) of fn on the completions of `rows` (B each): None and NaN score 0 and are counted,
    and so is every completion of a call that raises or returns other than B numbers (a warning line, once);
    `strict`: such a call is one error line instead."""
    columns = {k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r) if k != "prompt"}
    try:
        got = list(fn(completions=list(completions), prompts=list(prompts), **columns))
        if len(got) != len(completions):
            raise ValueError(f"it returned {len(got)} values for {len(completions)} completions")
        values = [None if v is None else float(v) for v in got]
    except Exception as e:  # the user's code must never stop a run: its completions are grading errors
        why = f"--reward {getattr(fn, 'spec', None) or fn}: {type(e).__name__}: {first_line(e)}"
        if strict:
            plumbing.die(why)
        if fn not in _warned:
            _warned.add(fn)
            print(f"warning: {why}; its completions score 0 and count as grading errors", file=sys.stderr, flush=True)
        return [0.0] * len(completions), len(completions)
    return [0.0 if v is None or v != v else v for v in values], sum(v is None or v != v for v in values)


def sample_rows(row: dict, completions: list, correct, **columns) -> list:
    """What the model wrote, as rows of DIR/samples.jsonl (rundir.Run.log_samples): one per completion of the
    question `row`, with the answer the grader extracted from it, its verdict `correct` (B,) and its value in
    each of `columns` (each a (B,) tensor or list, e.g. reward=..., advantage=...)."""
    return [dict(question=row["question"], gold=row["answer"], completion=c, answer=extract_answer(c), correct=bool(ok),
                 **{k: v[i] for k, v in columns.items()}) for i, (c, ok) in enumerate(zip(completions, correct))]


def answer_mask(tok, rollout) -> torch.Tensor:
    """(B, T) float: the tokens of each completion that write its final answer (extract_answer, its last
    occurrence in the text) and what comes next, up to the token that writes the character after it or EOS
    ('}' after \\boxed{14}): their probability is the model's confidence in that answer, not a longer one.
    Every token of a completion that names no answer. On the toy, where the completion is the answer and
    EOS, the mask is rollout.mask."""
    mask = torch.zeros_like(rollout.mask)
    for r, text in enumerate(rollout.texts):
        ids, answer = rollout.completion_ids[r, :int(rollout.lengths[r])].tolist(), extract_answer(text)
        a = text.rfind(answer) if answer else -1
        if a < 0:
            mask[r] = rollout.mask[r]
            continue
        written = lambda t: len(tok.decode(ids[:t], skip_special_tokens=True))  # noqa: E731  what t tokens write
        first = bisect.bisect_right(range(len(ids) + 1), a, key=written) - 1  # the token that starts the answer
        end = bisect.bisect_right(range(len(ids) + 1), a + len(answer), key=written)  # tokens to the one past it
        mask[r, first:min(end, len(ids))] = 1.0
    return mask
