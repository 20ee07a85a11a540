"""Evaluate a model on the papers' math benchmarks: greedy accuracy, mean accuracy and pass@k (one table).

The benchmarks that CoDistill-GRPO, KDRL and DPH-RL report (MATH-500, Minerva-Math, OlympiadBench,
AMC 2023, AIME 2024 and 2025, GSM8K), read from the hub copies their evaluation code reads
(tasks.BENCHMARKS), asked with the training scripts' prompt (tasks.format_prompt: the chat template,
then "... put your final answer within \\boxed{}") and graded by grading.is_correct (or by --reward's
function: a reward of at least 1 is correct). Any model the scripts load, read as a run holds its policy
(fp32 weights; a LoRA adapter unmerged on its base): a run's final/ (asked as the run asked: its config.json's
length, instruction and system prompt), a LoRA adapter directory, a hub id, a toy model; generation is the
scripts' (common.answers, --generation), and under torchrun each process answers its share of the questions.
Prints one markdown table (per benchmark: questions, greedy
accuracy, the mean accuracy of --pass-n answers sampled at --temperature, the unbiased pass@k of
each --pass-k, the answers whose grading ran out of time) and writes it as JSON to --out, with
every completion, its answer and its verdict in <out>.samples.jsonl beside it.

What departs from the papers' evaluation code (docs/evaluate.md):
1. One prompt for every benchmark and model, zero-shot: the training scripts' (harnesses such as
   Qwen2.5-Math's choose a template per model).
2. Sampled answers come from softmax(logits / T), as in training: no top-p (harnesses often add 0.95).
3. Exact grading: numbers are equal or not (Qwen2.5-Math's grader accepts answers within 1e-4
   relative, and 0.625 for 62.5); sets, tuples, intervals and expressions by math-verify.
4. --pass-n and --pass-k, the training scripts' names, for the --n and --k of the request: torchrun
   takes --n for an abbreviation of its own flags and stops.

CPU (toy world, seconds):  python evaluate.py --model toy-small
GPU:                       python evaluate.py --model runs/codistill-.../final/small --pass-n 8
"""

import json
import os
import shlex
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import common
import grading
import plumbing
import tasks
from common import arg

PAPERS_SUITE = ",".join(tasks.BENCHMARKS)
COUNTS = ("questions", "grade_errors")  # a benchmark's counts, not averaged


@dataclass
class Args:
    model: str = arg("toy-small", "a run's final/, any saved model or LoRA adapter, hub id, bare name or toy model")
    benchmarks: str = arg("", "comma-separated benchmarks, math, toy, toy-hard or .jsonl files (default: the papers' seven, "
                          f"{PAPERS_SUITE.replace(',', ', ')})")
    limit: int = arg(0, "the first N questions of each benchmark (0: all)")
    pass_n: int = arg(0, "answers sampled per question for the mean accuracy and pass@k (0: greedy only)", toy=16)
    pass_k: str = arg("", "the k of pass@k, comma-separated, each at most --pass-n (default: --pass-n)")
    temperature: float = arg(1.0, "sampling temperature of the --pass-n answers (the greedy answer takes the argmax)")
    max_new_tokens: int = arg(None, "completion length limit (default: a run's own for its final/ or adapter, else 4096; "
                              "toy models: 8)", toy=8)
    batch_size: int = arg(64, "questions per generation call (of the sampled answers: --batch-size / --pass-n questions)")
    out: str = arg("", "the table as JSON, the completions beside it in .samples.jsonl; a directory (DIR/): "
                       "DIR/evaluate-<time>.json (default: runs/evaluate-<time>.json)")
    seed: int = arg(1, "random seed of the sampled answers")
    device: str = arg("auto", "cuda, cpu, or auto")
    threads: int = arg(0, "CPU threads for torch (0: one per core that other work leaves free)", toy=1)
    instruction: str = arg(None, "text on a new line after each question ('' for none; default: each benchmark's own)")
    system_prompt: str = arg(None, "system message of the chat template (default: the template's own)")
    reward: str = arg("", "reward function FILE.py:NAME or module:NAME, called as TRL calls one (default: the grader)")
    generation: str = arg("auto", "sampler: auto (fastgen on CUDA, else generate), generate, static or fastgen",
                          choices=("auto", "generate", "static", "fastgen"))


def load(name: str, device: torch.device, generation: str):
    """The model as the run that trained it scored it (docs/precision.md): fp32 weights, under bf16 autocast on
    CUDA, as a run holds its policy (read frozen, in bf16, an fp32 final/ would lose most of its training). A
    LoRA adapter directory, or a LoRA run's final/ (adapter/ beside it): the base read as the run read it (bf16
    on CUDA), its fp32 adapters unmerged (merged into a bf16 base, most of the update rounds away)."""
    adapter = next((d for d in (name, os.path.join(name, "adapter"))
                    if os.path.isfile(os.path.join(d, "adapter_config.json"))), None)
    lora = None
    if adapter is not None:  # the load of a LoRA run's checkpoint
        import peft
        name, lora = adapter, peft.PeftConfig.from_pretrained(adapter)
        lora.init_seed = 0  # unused: the adapters are read, not drawn
    model, tok = common.load_model(name, device, lora=lora, generation=generation)
    return model.eval().requires_grad_(False), tok


RUN_SETTINGS = ("max_new_tokens", "instruction", "system_prompt")  # how a run asked its questions: evaluate.py's too


def run_settings(name: str) -> tuple:
    """(the run's directory, its RUN_SETTINGS from config.json) when `name` is a run's final/ (final/small, ...), its
    adapter or its checkpoint, else ("", {})."""
    parts = os.path.abspath(name).split(os.sep)
    at = max((i for i, p in enumerate(parts) if p in ("final", "checkpoint")), default=0)
    config = os.path.join(os.sep.join(parts[:at]) or os.sep, "config.json")
    run = json.load(open(config)) if at and os.path.isfile(config) else {}
    if not all(k in run for k in RUN_SETTINGS):  # a model's config.json, not a run's
        return "", {}
    return os.path.dirname(config), {k: run[k] for k in RUN_SETTINGS}


def graded(ro, row: int, correct) -> dict:
    text = ro.texts[row]
    return dict(completion=text, answer=grading.extract_answer(text), correct=bool(correct),
                truncated=bool(ro.truncated[row]))


def answer(model, tok, name: str, rows: list, args, reward=None) -> tuple:
    """This process's share of `rows` answered and graded: one record per question, its greedy answer
    and, with --pass-n, its n sampled ones; and how many answers' grading ran out of time (scored wrong)."""
    records, share, errors = {}, -(-len(rows) // plumbing.world_size()), 0
    passes = [("greedy", 1, args.batch_size)]
    if args.pass_n:
        passes.append(("sampled", args.pass_n, max(1, args.batch_size // args.pass_n)))
    for how, n, batch in passes:
        instruction = tasks.prompt_instruction(name) if args.instruction is None else args.instruction
        calls = common.answers(model, tok, rows, n, args.max_new_tokens, batch, temperature=args.temperature,
                               greedy=how == "greedy", instruction=instruction, system_prompt=args.system_prompt,
                               reward=reward)
        for part, ro, correct, grade_errors in tqdm(calls, total=-(-share // batch), desc=f"{name} {how}", leave=False,
                                                    disable=plumbing.rank() != 0):
            errors += grade_errors
            for j, i in enumerate(part):
                if i < 0:  # padding: every process makes as many calls
                    continue
                if how == "greedy":
                    records[i] = dict(benchmark=name, index=i, question=rows[i]["question"], gold=rows[i]["answer"],
                                      greedy=graded(ro, j, correct[j, 0]))
                else:
                    records[i]["samples"] = [graded(ro, j * n + s, correct[j, s]) for s in range(n)]
    return list(records.values()), errors


def score(records: list, n: int, ks: list) -> dict:
    """One benchmark's figures: greedy accuracy, and over the n sampled answers of each question (c of
    them correct) the mean accuracy c / n and the unbiased pass@k (common.pass_at_k), averaged."""
    q = len(records)
    out = dict(questions=q, greedy_accuracy=sum(r["greedy"]["correct"] for r in records) / q,
               greedy_truncated=sum(r["greedy"]["truncated"] for r in records) / q)
    if n:
        c = [sum(s["correct"] for s in r["samples"]) for r in records]
        out[f"mean_accuracy@{n}"] = sum(c) / (n * q)
        out.update({f"pass@{k}": sum(common.pass_at_k(n, ci, k) for ci in c) / q for k in ks})
    return out


def table(results: dict) -> str:
    columns = [k for k in next(iter(results.values())) if k not in COUNTS + ("greedy_truncated", "seconds")]
    head = ["benchmark", "questions"] + [c.replace("_accuracy", "") for c in columns] + ["grade errors"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, r in results.items():
        lines.append(f"| {name} | {r.get('questions', '')} | " + " | ".join(f"{r[c]:.3f}" for c in columns)
                     + f" | {r.get('grade_errors', '')} |")
    return "\n".join(lines)


def main():
    args = common.parse_args(Args)
    suite = args.benchmarks or tasks.TOY_MODELS.get(args.model) or PAPERS_SUITE  # a toy model: toy or toy-hard
    names = list(dict.fromkeys(b.strip() for b in suite.split(",") if b.strip()))
    ks = plumbing.parse_pass_k(args.pass_k or str(args.pass_n), args.pass_n) if args.pass_n > 0 else []
    run, settings = run_settings(args.model)
    taken = {k: v for k, v in settings.items() if getattr(args, k) is None and v is not None}  # a flag given wins
    for k, v in taken.items():
        setattr(args, k, v)
    args.max_new_tokens = 4096 if args.max_new_tokens is None else args.max_new_tokens
    if taken and plumbing.rank() == 0:
        print(f"as the run in '{run}' asked (its config.json): "
              + " ".join(f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in taken.items()), flush=True)
    for flag, bound in (("limit", 0), ("pass_n", 0), ("max_new_tokens", 1), ("batch_size", 1)):
        if getattr(args, flag) < bound:
            plumbing.die(f"--{flag.replace('_', '-')} must be at least {bound} (got {getattr(args, flag)})")
    if not names or args.temperature <= 0:
        plumbing.die(f"--benchmarks must name a benchmark and --temperature be positive (got '{suite}', {args.temperature})")
    out = args.out or "runs/"
    if out.endswith(("/", os.sep)) or os.path.isdir(out):  # a directory: the results in it, named as by default
        out = os.path.join(out, f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}.json")
    args.out = out
    samples_path = (out[:-len(".json")] if out.endswith(".json") else out) + ".samples.jsonl"
    common.check_available([args.model], "")  # offline: the model must be local or cached, or one line says so
    rows = {name: tasks.load_data(name, "eval")[:args.limit or None] for name in names}  # a missing one: one line
    reward = tasks.load_reward(args.reward, *rows.values())  # --reward's function, tried on a row of each (None: the grader)
    device = plumbing.init_distributed(args.device, args.threads)  # one process, or one rank of torchrun
    try:  # before the work, not after it
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    except OSError as e:
        plumbing.die(f"cannot write the results to '{out}' ({type(e).__name__}: {e.strerror or e})")
    if not os.access(os.path.dirname(os.path.abspath(out)), os.W_OK):
        plumbing.die(f"cannot write the results to '{out}': its directory is not writable")
    model, tok = load(args.model, device, args.generation)
    plumbing.seed_everything(args.seed + plumbing.rank())  # after loading; ranks sample different answers

    results, samples = {}, []
    for name, questions in rows.items():
        with plumbing.Timer() as t:
            shares = plumbing.all_gather(answer(model, tok, name, questions, args, reward))  # every process's
            records = sorted(sum((r for r, _ in shares), []), key=lambda r: r["index"])  # in the benchmark's order
        results[name] = dict(score(records, args.pass_n, ks), grade_errors=sum(e for _, e in shares),
                             seconds=round(t.seconds, 1))
        samples += records
    if len(results) > 1:  # the papers' average: each benchmark weighs the same
        results["average"] = {k: sum(r[k] for r in results.values()) / len(results)
                              for k in next(iter(results.values())) if k not in COUNTS + ("seconds",)}
    if plumbing.rank() != 0:
        return
    with open(samples_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in samples)
    with open(out, "w") as f:
        json.dump(dict(model=args.model, args=vars(args), results=results, samples=samples_path), f, indent=2)
    print(table(results))
    cut = {name: r["greedy_truncated"] for name, r in results.items() if r["greedy_truncated"] > 0 and name != "average"}
    if cut:
        print(f"\ngreedy answers cut at --max-new-tokens {args.max_new_tokens}: "
              + ", ".join(f"{name} {frac:.3f}" for name, frac in cut.items()))
    print(f"\n{args.model}: {out}, every completion in {samples_path}")


if __name__ == "__main__":
    main()
