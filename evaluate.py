"""Evaluate a model on the papers' math benchmarks: greedy accuracy, mean accuracy and pass@k (one table).

The benchmarks that CoDistill-GRPO, KDRL and DPH-RL report (MATH-500, Minerva-Math, OlympiadBench,
AMC 2023, AIME 2024 and 2025, GSM8K), read from the hub copies their evaluation code reads
(tasks.BENCHMARKS), asked with the training scripts' prompt (tasks.format_prompt: the chat template,
then "... put your final answer within \\boxed{}") and graded by grading.is_correct (or by --reward's
function: a reward of at least 1 is correct). Any model the
scripts load: a run's final/, a LoRA adapter directory (merged into its base), a hub id, a toy
model; generation is the scripts' (common.answers, --generation), and under torchrun each process
answers its share of the questions. Prints one markdown table (per benchmark: questions, greedy
accuracy, the mean accuracy of --pass-n answers sampled at --temperature, the unbiased pass@k of
each --pass-k) and writes it as JSON to --out, with every completion, its answer and its verdict in
<out>.samples.jsonl beside it.

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
import time
import warnings
from dataclasses import dataclass

import torch
from tqdm import tqdm

import common
import grading
import plumbing
import tasks
from common import arg

PAPERS_SUITE = ",".join(tasks.BENCHMARKS)


@dataclass
class Args:
    model: str = arg("toy-small", "a run's final/, any saved model or LoRA adapter, hub id, bare name or toy model")
    benchmarks: str = arg("", "comma-separated benchmarks, math, toy, toy-hard or .jsonl files (default: the papers' seven)")
    limit: int = arg(0, "the first N questions of each benchmark (0: all)")
    pass_n: int = arg(0, "answers sampled per question for the mean accuracy and pass@k (0: greedy only)", toy=16)
    pass_k: str = arg("", "the k of pass@k, comma-separated, each at most --pass-n (default: --pass-n)")
    temperature: float = arg(1.0, "sampling temperature of the --pass-n answers (the greedy answer takes the argmax)")
    max_new_tokens: int = arg(4096, "completion length limit", toy=8)
    batch_size: int = arg(64, "questions per generation call (of the sampled answers: --batch-size / --pass-n questions)")
    out: str = arg("", "the table as JSON; the completions beside it in .samples.jsonl (default: runs/evaluate-<time>.json)")
    seed: int = arg(1, "random seed of the sampled answers")
    device: str = arg("auto", "cuda, cpu, or auto")
    threads: int = arg(0, "CPU threads for torch (0: torch's default, one per core)", toy=1)
    instruction: str = arg(None, "text on a new line after each question ('' for none; default: each benchmark's own)")
    system_prompt: str = arg(None, "system message of the chat template (default: the template's own)")
    reward: str = arg("", "reward function FILE.py:NAME or module:NAME, called as TRL calls one (default: the grader)")
    generation: str = arg("auto", "sampler: auto (fastgen on CUDA, else generate), generate, static or fastgen",
                          choices=("auto", "generate", "static", "fastgen"))


def load(name: str, device: torch.device, generation: str):
    """common.load_model's frozen model and tokenizer; a LoRA adapter directory loads onto the base it
    names, the adapters merged in (peft)."""
    config = os.path.join(name, "adapter_config.json")
    if not os.path.isfile(config):
        return common.load_model(name, device, frozen=True, generation=generation)
    import peft
    model, tok = common.load_model(json.load(open(config))["base_model_name_or_path"], device, frozen=True,
                                   generation=generation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft's own use of a deprecated transformers name
        return peft.PeftModel.from_pretrained(model, name).merge_and_unload(), tok


def graded(ro, row: int, correct) -> dict:
    text = ro.texts[row]
    return dict(completion=text, answer=grading.extract_answer(text), correct=bool(correct),
                truncated=bool(ro.truncated[row]))


def answer(model, tok, name: str, rows: list, args, reward=None) -> list:
    """This process's share of `rows` answered and graded: one record per question, its greedy answer
    and, with --pass-n, its n sampled ones."""
    records, share = {}, -(-len(rows) // plumbing.world_size())
    passes = [("greedy", 1, args.batch_size)]
    if args.pass_n:
        passes.append(("sampled", args.pass_n, max(1, args.batch_size // args.pass_n)))
    for how, n, batch in passes:
        instruction = tasks.prompt_instruction(name) if args.instruction is None else args.instruction
        calls = common.answers(model, tok, rows, n, args.max_new_tokens, batch, temperature=args.temperature,
                               greedy=how == "greedy", instruction=instruction, system_prompt=args.system_prompt,
                               reward=reward)
        for part, ro, correct in tqdm(calls, total=-(-share // batch), desc=f"{name} {how}", leave=False,
                                      disable=plumbing.rank() != 0):
            for j, i in enumerate(part):
                if i < 0:  # padding: every process makes as many calls
                    continue
                if how == "greedy":
                    records[i] = dict(benchmark=name, index=i, question=rows[i]["question"], gold=rows[i]["answer"],
                                      greedy=graded(ro, j, correct[j, 0]))
                else:
                    records[i]["samples"] = [graded(ro, j * n + s, correct[j, s]) for s in range(n)]
    return list(records.values())


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
    columns = [k for k in next(iter(results.values())) if k not in ("questions", "greedy_truncated", "seconds")]
    head = ["benchmark", "questions"] + [c.replace("_accuracy", "") for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, r in results.items():
        lines.append(f"| {name} | {r['questions'] if 'questions' in r else ''} | "
                     + " | ".join(f"{r[c]:.3f}" for c in columns) + " |")
    return "\n".join(lines)


def main():
    args = common.parse_args(Args)
    suite = args.benchmarks or tasks.TOY_MODELS.get(args.model) or PAPERS_SUITE  # a toy model: toy or toy-hard
    names = list(dict.fromkeys(b.strip() for b in suite.split(",") if b.strip()))
    ks = plumbing.parse_pass_k(args.pass_k or str(args.pass_n), args.pass_n) if args.pass_n > 0 else []
    for flag, bound in (("limit", 0), ("pass_n", 0), ("max_new_tokens", 1), ("batch_size", 1)):
        if getattr(args, flag) < bound:
            plumbing.die(f"--{flag.replace('_', '-')} must be at least {bound} (got {getattr(args, flag)})")
    if not names or args.temperature <= 0:
        plumbing.die(f"--benchmarks must name a benchmark and --temperature be positive (got '{suite}', {args.temperature})")
    out = args.out = args.out or os.path.join("runs", f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}.json")
    samples_path = (out[:-len(".json")] if out.endswith(".json") else out) + ".samples.jsonl"
    common.check_available([args.model], "")  # offline: the model must be local or cached, or one line says so
    rows = {name: tasks.load_data(name, "eval")[:args.limit or None] for name in names}  # a missing one: one line
    reward = tasks.load_reward(args.reward, *rows.values())  # --reward's function, tried on a row of each (None: the grader)
    device = plumbing.init_distributed(args.device, args.threads)  # one process, or one rank of torchrun
    try:  # before the work, not after it
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    except OSError as e:
        plumbing.die(f"cannot write the results to '{out}' ({type(e).__name__}: {e.strerror or e})")
    if os.path.isdir(out) or not os.access(os.path.dirname(os.path.abspath(out)), os.W_OK):
        plumbing.die(f"cannot write the results to '{out}': it is a directory, or its directory is not writable")
    model, tok = load(args.model, device, args.generation)
    plumbing.seed_everything(args.seed + plumbing.rank())  # after loading; ranks sample different answers

    results, samples = {}, []
    for name, questions in rows.items():
        with plumbing.Timer() as t:
            records = sorted(sum(plumbing.all_gather(answer(model, tok, name, questions, args, reward)), []),
                             key=lambda r: r["index"])  # every process's share, in the benchmark's order
        results[name] = dict(score(records, args.pass_n, ks), seconds=round(t.seconds, 1))
        samples += records
    if len(results) > 1:  # the papers' average: each benchmark weighs the same
        results["average"] = {k: sum(r[k] for r in results.values()) / len(results)
                              for k in next(iter(results.values())) if k not in ("questions", "seconds")}
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
