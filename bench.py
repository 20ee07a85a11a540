"""Speed and memory of grpo.py steps: generation and update timed apart, peak memory.

Runs grpo.py in this process with the flags you give (after `--`), then reads its metrics.jsonl.
The first --warmup steps are left out of the means (allocator and kernel warm-up).

    python bench.py -- --steps 20 --prompts-per-step 8 --group-size 8 --max-new-tokens 16 --beta 0.04
    python bench.py -- --model Qwen2.5-0.5B-Instruct --dataset gsm8k --steps 10 --eval-every 1000 --eval-size 0
    python bench.py --trl -- --steps 20 ...   # the same step in TRL's GRPOTrainer (pip install trl)

Not a test: timings depend on the machine. Peak memory is torch.cuda.max_memory_allocated on a
GPU, the process's peak resident set on a CPU.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def summarize(metrics_path: str, warmup: int) -> dict:
    rows = [json.loads(line) for line in open(metrics_path)]
    train = [r for r in rows if "time/step" in r and r["step"] > warmup]
    mean = lambda k: sum(r[k] for r in train) / len(train)
    return dict(steps=len(train), step_s=mean("time/step"), generate_s=mean("time/generate"),
                update_s=mean("time/update"), completion_len=mean("train/completion_len"))


def bench_ours(flags: list, warmup: int) -> dict:
    import grpo
    out = tempfile.mkdtemp(prefix="bench-")
    sys.argv = ["grpo.py", *flags, "--out", os.path.join(out, "run"), "--eval-every", "1000000", "--eval-size", "0",
                "--save-every", "1000000"]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    grpo.main()
    res = summarize(os.path.join(out, "run", "metrics.jsonl"), warmup)
    res["peak_mem_gib"] = peak_memory_gib()
    return res


def bench_trl(flags: list, warmup: int) -> dict:
    """The same step (model, prompts, G, new tokens, beta, lr) in TRL's GRPOTrainer."""
    import common
    import grpo
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    args = common.parse_args(grpo.Args, flags)
    device = common.get_device(args.device)
    model, tok = common.load_model(args.model, device)
    rows = common.load_data(args.dataset, "train")
    ds = Dataset.from_list([dict(prompt=common.format_prompt(tok, r["question"], args.dataset), answer=r["answer"])
                            for r in rows])

    def reward(completions, answer, **kw):
        return common.rewards_for(completions, answer).tolist()

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    B = args.prompts_per_step * args.group_size
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=B,
                     gradient_accumulation_steps=1, num_generations=args.group_size, max_completion_length=args.max_new_tokens,
                     learning_rate=args.lr, beta=args.beta, max_steps=args.steps, logging_steps=10**6, save_strategy="no",
                     report_to=[], temperature=args.temperature, top_k=0, top_p=1.0, use_cpu=device.type == "cpu",
                     bf16=device.type == "cuda", disable_tqdm=True, seed=args.seed, loss_type="grpo")
    timer = StepTimes()
    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=reward, args=cfg, train_dataset=ds,
                          callbacks=[timer])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    t = timer.times[warmup:]
    return dict(steps=len(t), step_s=sum(t) / len(t), peak_mem_gib=peak_memory_gib())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trl", action="store_true", help="time TRL's GRPOTrainer instead of grpo.py")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the means")
    argv = sys.argv[1:]
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    opts = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    res = bench_trl(flags, opts.warmup) if opts.trl else bench_ours(flags, opts.warmup)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(json.dumps(dict(which="trl" if opts.trl else "grpo.py", device=dev, flags=" ".join(flags), **res), indent=1))


if __name__ == "__main__":
    main()
