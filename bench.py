"""Speed and memory of training steps: generation and update timed apart, peak memory.

Runs a script (--script, default grpo) in this process with the flags you give (after `--`),
then reads its metrics.jsonl. The first --warmup steps are left out of the means (allocator and
kernel warm-up). --random-model H,L writes a random-weight Qwen2 (hidden H, L layers, the toy
tokenizer) to a temporary directory and passes it as --model: a model larger than the toys that
still fits a CPU (its completions are random, so every reward is 0; the timings are real).

    python bench.py -- --steps 20 --prompts-per-step 8 --group-size 8 --max-new-tokens 16 --beta 0.04
    python bench.py --script cppo -- --group-size 16 --prune-rate 0.875 --steps 10
    python bench.py --script cppo --warmup 1 --random-model 512,8 -- --dataset toy --group-size 16 --prompts-per-step 2 \
        --max-new-tokens 32 --steps 5 --micro-batch-size 32 --beta 0 --num-iterations 1 --prune-rate 0.875
    python bench.py -- --model Qwen2.5-0.5B-Instruct --dataset gsm8k --steps 10 --eval-every 1000 --eval-size 0
    python bench.py --trl -- --steps 20 ...   # the same step in TRL's GRPOTrainer (pip install trl)
    python bench.py --logprob-memory          # chunked vs naive log-probs at Qwen's vocabulary size
    python bench.py --logprob-memory --modes chunked bdkd sinkhorn --chunk 256   # + each full-vocabulary KD term
    python bench.py --gpu-check               # every script on random-weight Qwen2.5-0.5B/1.5B, offline (below)
    python bench.py --memory-table            # which command fits which GPU, full fine-tuning and LoRA, counted
    torchrun --nproc_per_node 2 bench.py --random-model 1024,12 -- --dataset toy --fsdp ...   # per-rank peak

--gpu-check needs no network: it builds random-weight Qwen2.5-0.5B and -1.5B (the real configs,
full depth, and tests/qwen_like.py's tokenizer with Qwen's special tokens and chat template), a
dataset of prompts of about --check-prompt-tokens tokens, runs each script --check-steps steps at
its GPU defaults with --check-prompts questions x --check-group completions of --check-new-tokens
(random models almost never sample EOS: every completion runs to the limit), each in a fresh
process, then TRL's GRPOTrainer on grpo.py's run when trl is importable, and prints a table.
--check-layers and --check-hidden cut the models (the vocabulary stays 151,936) to run it on a CPU.

Not a test: timings depend on the machine. Peak memory is torch.cuda.max_memory_allocated on a
GPU, the process's peak resident set on a CPU.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests")  # qwen_like.py and reference.py live there


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def summarize(metrics_path: str, warmup: int) -> dict:
    rows = [json.loads(line) for line in open(metrics_path)]
    train = [r for r in rows if "time/step" in r and r["step"] > warmup]
    mean = lambda k: sum(r[k] for r in train) / len(train)
    first = [r["time/step"] for r in rows if "time/step" in r][0]  # the warm-up: compilation and CUDA-graph capture
    return dict(steps=len(train), step_s=mean("time/step"), first_step_s=first, generate_s=mean("time/generate"),
                update_s=mean("time/update"), trained_tokens=mean("train/tokens"),
                update_ms_per_trained_token=1000 * mean("time/update") / mean("train/tokens"),
                completion_len=mean("train/completion_len"),
                questions=mean("cppo/questions") if "cppo/questions" in train[0] else None)


def random_model(spec: str) -> str:
    """A random-weight Qwen2 with hidden size H and L layers ('H,L') and the toy tokenizer, saved."""
    import tasks
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    hidden, layers = map(int, spec.split(","))
    tok = AutoTokenizer.from_pretrained(tasks.toy_path("toy-small"))
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    path = tempfile.mkdtemp(prefix=f"bench-random-{hidden}x{layers}-")
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def bench_ours(script: str, flags: list, warmup: int) -> dict:
    import importlib
    module = importlib.import_module(script)
    out = tempfile.mkdtemp(prefix="bench-")
    sys.argv = [f"{script}.py", *flags, "--out", os.path.join(out, "run"), "--eval-every", "1000000", "--eval-size", "0",
                "--save-every", "0"]  # no checkpoint: gigabytes at Qwen sizes, not what is timed
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    module.main()
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:  # rank 0 alone wrote metrics
        return dict(peak_mem_gib=peak_memory_gib())
    res = summarize(os.path.join(out, "run", "metrics.jsonl"), warmup)
    res["peak_mem_gib"] = peak_memory_gib()
    shutil.rmtree(out, ignore_errors=True)  # checkpoint and final model: gigabytes at Qwen sizes
    return res


def bench_trl(flags: list, warmup: int) -> dict:
    """The same step (model, prompts, G, new tokens, beta, lr) in TRL's GRPOTrainer."""
    import common
    import plumbing
    import tasks
    import grpo
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    args = common.parse_args(grpo.Args, flags)
    device = plumbing.init_distributed(args.device)
    model, tok = common.load_model(args.model, device)
    rows = tasks.load_data(args.dataset, "train")
    prompts = [tasks.format_prompt(tok, r, instruction=args.instruction, system_prompt=args.system_prompt) for r in rows]
    ds = Dataset.from_list([dict(prompt=p, answer=r["answer"]) for p, r in zip(prompts, rows)])

    def reward(completions, answer, **kw):
        return tasks.rewards_for(completions, answer).reward.tolist()

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
                     bf16=device.type == "cuda", disable_tqdm=True, seed=args.seed, loss_type="grpo",
                     gradient_checkpointing=args.gradient_checkpointing)  # TRL's default is on; ours off
    timer = StepTimes()
    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=reward, args=cfg, train_dataset=ds,
                          callbacks=[timer])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    t = timer.times[warmup:]
    return dict(steps=len(t), step_s=sum(t) / len(t), peak_mem_gib=peak_memory_gib())


def current_rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def logprob_pass(mode: str, batch: int, positions: int, vocab: int, hidden: int, chunk: int) -> dict:
    """One forward + backward of the sampled tokens' log-probs, as in a training step, on a
    random-weight Qwen2 with a `vocab`-row LM head: common.token_logprobs (chunked) or the full
    log_softmax (naive); bdkd and sinkhorn add, on the same forward, bdkd.py's BD-KD loss or
    sinkd.py's SinKD term (script defaults) against a second random model's full distributions (a
    frozen teacher, loaded before the measurement). Memory is what the pass adds to the models':
    peak minus the level before."""
    import common
    import plumbing
    from transformers import Qwen2Config, Qwen2ForCausalLM

    device = plumbing.init_distributed("auto")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).to(device)
    teacher = Qwen2ForCausalLM(cfg).to(device).requires_grad_(False).eval() if mode in ("bdkd", "sinkhorn") else None
    P = 16  # prompt positions; the rest are completion tokens
    ids = torch.randint(vocab, (batch, positions), device=device)
    ones = torch.ones(batch, positions, device=device)
    rollout = common.Rollout(ids[:, :P], ones[:, :P].long(), ids[:, P:], ones[:, P:],
                             torch.full((batch,), positions - P, device=device), [""] * batch,
                             torch.ones(batch, dtype=torch.bool, device=device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**30
    else:
        before = current_rss_gib()
    t0 = time.perf_counter()
    if mode == "naive":
        sys.path.insert(0, TESTS)
        from reference import naive_token_logprobs
        with plumbing.autocast(device):
            logp = naive_token_logprobs(model, rollout)
        loss = (logp * rollout.mask).sum()
    else:
        states = common.completion_states(model, rollout)
        loss = (common.token_logprobs(model, rollout, 1.0, chunk, states=states) * rollout.mask).sum()
        if teacher is not None:
            with torch.no_grad():
                teacher_states = common.completion_states(teacher, rollout)
        if mode == "bdkd":
            import bdkd
            kls = common.paired_logits(common.full_kl, states, teacher_states, chunk)  # (N,) x 4
            loss = loss + bdkd.balanced_divergence(*kls, bdkd.Args().bdkd_kappa)[0].sum()
        elif mode == "sinkhorn":
            import sinkd
            args = sinkd.Args(logprob_chunk=chunk)
            loss = loss + sinkd.sinkhorn_term(states, teacher_states, rollout.mask, args)[0].sum()
    loss.backward()
    seconds = time.perf_counter() - t0
    added = peak_memory_gib() - before
    return dict(mode=mode, positions=f"{batch} x {positions}", vocab=vocab, chunk=chunk if mode != "naive" else None,
                added_peak_gib=round(added, 2), seconds=round(seconds, 1))


UPDATE_VARIANTS = {  # name: what changes from grpo.py's update at its GPU defaults (micro-batch 8, chunk 1024)
    "default": {},
    "default again": {},  # the same update timed twice: the spread between two runs of one version
    "no entropy": dict(entropy=False),
    "chunk 4096": dict(chunk=4096),
    "micro-batch 16": dict(micro_batch=16),
    "micro-batch 32": dict(micro_batch=32),
    "head in tf32": dict(head="tf32"),
    "head in bf16": dict(head="bf16"),
    "no reference": dict(beta=0.0),
}


def profile_update(model_path: str, batch: int = 64, prompt_tokens: int = 150, new_tokens: int = 512,
                   micro_batch: int = 8, beta: float = 0.04, chunk: int = 1024, top: int = 15, variants=()) -> dict:
    """One update of grpo.py's shape (its reference pass, then forward and backward of the chunked log-probs
    with entropy and a k3 penalty over micro-batches, the gradient clip, fused AdamW) on `batch` rollouts of
    random tokens, under torch.profiler after one warm-up update: the top kernels (on a CPU, operators) by
    their own time, and how busy the device was over the update's wall time. Prints the table; returns the
    figures. `variants`: names of UPDATE_VARIANTS, each timed after a warm-up of its own, one JSON line each
    (what a change would gain, before it is made)."""
    import common
    import plumbing
    from torch.profiler import ProfilerActivity, profile

    device = plumbing.init_distributed("auto")
    cuda = device.type == "cuda"
    model, _ = common.load_model(model_path, device)
    ref = common.load_model(model_path, device, frozen=True)[0] if beta else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    ids = torch.randint(0, model.get_output_embeddings().weight.shape[0], (batch, prompt_tokens + new_tokens), device=device)
    ones = torch.ones_like(ids)
    rollout = common.Rollout(ids[:, :prompt_tokens], ones[:, :prompt_tokens], ids[:, prompt_tokens:],
                             ones[:, prompt_tokens:].float(), torch.full((batch,), new_tokens, device=device), [""] * batch,
                             torch.ones(batch, dtype=torch.bool, device=device))
    lm_head = common._lm_head

    def head(kind):
        def bf16_head(h, w, temperature, vocab):  # bf16 operands, fp32 accumulation, fp32 logits
            logits = (h.bfloat16() @ w.bfloat16().T).float()
            return (logits[:, :vocab] if vocab is not None else logits) / temperature
        torch.backends.cuda.matmul.allow_tf32 = kind == "tf32"
        common._lm_head = bf16_head if kind == "bf16" else lm_head

    def update(micro_batch=micro_batch, chunk=chunk, entropy=True, beta=beta):
        batches = common.micro_batches(batch, micro_batch)
        with torch.no_grad():
            refs = [common.token_logprobs(ref, rollout.select(i), 1.0, chunk) for i in batches] if beta else None
        optimizer.zero_grad(set_to_none=True)
        for j, i in enumerate(batches):
            mb = rollout.select(i)
            logp = common.token_logprobs(model, mb, 1.0, chunk, with_entropy=entropy)
            logp = logp[0] if entropy else logp
            per_token = -logp + (beta * common.kl_k3(refs[j] - logp) if beta else 0)
            ((per_token * mb.mask).sum() / (batch * new_tokens)).backward()
        plumbing.reduce_and_clip_grads(model, 1.0)
        optimizer.step()

    for name in variants:
        v = dict(UPDATE_VARIANTS[name])
        head(v.pop("head", "fp32"))
        try:
            update(**v)  # its own warm-up: the allocator, cuBLAS's heuristics for new shapes
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            with plumbing.Timer() as t:
                update(**v)
            print(json.dumps(dict(variant=name, update_s=round(t.seconds, 3),
                                  trained_tok_s=round(batch * new_tokens / t.seconds),
                                  peak_mem_gib=round(peak_memory_gib(), 2))), flush=True)
        except Exception as e:  # an out-of-memory variant must not cost the others
            print(json.dumps(dict(variant=name, failed=f"{type(e).__name__}: {str(e)[:300]}")), flush=True)
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache() if cuda else None
    head("fp32")
    update()  # warm-up: the allocator, cuBLAS's heuristics
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        with plumbing.Timer() as t:
            update()
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(events.table(sort_by=key, row_limit=top))
    busy = sum(getattr(e, key) for e in events if not cuda or e.device_type.name == "CUDA") / 1e6  # seconds
    res = dict(update_s=round(t.seconds, 3), trained_tok_s=round(batch * new_tokens / t.seconds),
               device_busy_frac=round(busy / t.seconds, 3) if cuda else None)
    print(json.dumps(res))
    return res


def generation_check(model_path: str, data: str, prompts: int, group: int, new_tokens: int):
    """Each --generation mode on one model in one process, as grpo.py holds it (fp32 master weights, bf16
    autocast on CUDA): a warm-up call (compilation, graph capture), then a timed call of `prompts` x `group`
    completions of up to `new_tokens`; then greedy completions of the same shape (nothing compiles again),
    every mode's against generate's, row by row. One JSON line a mode, printed as it comes."""
    import common
    import plumbing
    import tasks

    device = plumbing.init_distributed("auto")
    model, tok = common.load_model(model_path, device)
    rows = tasks.load_data(data, "train")[:prompts]
    texts = [tasks.format_prompt(tok, r, instruction=tasks.prompt_instruction(data)) for r in rows]  # the toy: none
    greedy = {}
    for mode in ("generate", "static", "fastgen"):  # generate first: the others' greedy rows are compared with its
        model.generation = mode
        try:
            with plumbing.Timer() as first:
                common.sample(model, tok, texts, group, new_tokens if mode != "generate" else 16)  # nothing to compile
            with plumbing.Timer() as t:
                ro = common.sample(model, tok, texts, group, new_tokens)
            greedy[mode] = common.sample(model, tok, texts, group, new_tokens, greedy=True).completion_ids.cpu()
        except Exception as e:  # a mode that fails on this machine must not cost the others
            print(json.dumps(dict(mode=mode, failed=f"{type(e).__name__}: {str(e)[:400]}")), flush=True)
            continue
        tokens = int(ro.lengths.sum())
        same = None
        if "generate" in greedy and mode != "generate":  # the fraction of rows equal token for token
            g, ref = greedy[mode], greedy["generate"]
            same = float((g == ref).all(1).float().mean()) if g.shape == ref.shape else 0.0
        print(json.dumps(dict(mode=mode, rows=len(ro.lengths), tokens=tokens, seconds=round(t.seconds, 3),
                              tok_s=round(tokens / t.seconds), first_call_s=round(first.seconds, 1),
                              ms_per_token_step=round(1000 * t.seconds / int(ro.lengths.max()), 2),
                              greedy_rows_equal_to_generate=same, peak_mem_gib=round(peak_memory_gib(), 2))), flush=True)


def fastgen_check(model_path: str, data: str, prompts: int, group: int, new_tokens: int, ladder: str):
    """fastgen's switches (fastgen.Switches) on one model in one process, as grpo.py holds it, cumulatively: today's
    step, then the names of `ladder` switched on one by one. Per rung, after torch._dynamo.reset() and a new
    bf16 copy, cache and graphs: a first call of the full shape (compile and capture: its seconds), a timed
    sampled call (tokens a second; GPU ms a step by CUDA events over it), a short greedy call under
    torch.profiler (kernels a step, host microseconds a step: the CPU time of the ops, without the waits for
    the GPU), the graphs dynamo compiled, the peak memory, and the greedy rows equal to the rung before's.
    One JSON line a rung, printed as it comes."""
    import common
    import fastgen
    import plumbing
    import tasks
    from torch.profiler import ProfilerActivity, profile

    device = plumbing.init_distributed("auto")
    cuda = device.type == "cuda"
    model, tok = common.load_model(model_path, device, generation="fastgen")
    rows = tasks.load_data(data, "train")[:prompts]
    texts = [tasks.format_prompt(tok, r, instruction=tasks.prompt_instruction(data)) for r in rows]  # the toy: none
    names, before = [n for n in ladder.split(",") if n], None
    for i in range(len(names) + 1):
        on = names[:i]
        fastgen.SWITCHES = fastgen.Switches(**{n: True for n in on})
        label = "default" if not on else "+" + on[-1]
        torch._dynamo.reset()
        fastgen._COMPILED.clear()
        for net in (model, getattr(model, "_bf16_shadow", None)):  # a rung starts with no cache, graph or copy
            if net is not None:
                net.__dict__.pop("_fastgen_caches", None)
        model.__dict__.pop("_bf16_shadow", None)
        torch._dynamo.utils.counters.clear()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            with plumbing.Timer() as first:
                common.sample(model, tok, texts, group, new_tokens)
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2)) if cuda else (None, None)
            with plumbing.Timer() as t:
                start.record() if cuda else None
                ro = common.sample(model, tok, texts, group, new_tokens)
                end.record() if cuda else None
            steps = int(ro.lengths.max())
            gpu_ms = start.elapsed_time(end) / steps if cuda else None
            greedy = common.sample(model, tok, texts, group, new_tokens, greedy=True).completion_ids.cpu()
            short = min(new_tokens, 64)
            with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
                common.sample(model, tok, texts, group, short, greedy=True)
            events = prof.key_averages()
            waits = ("Synchronize", "_local_scalar_dense", "item", "is_nonzero")  # the host waiting, not working
            host_us = sum(e.self_cpu_time_total for e in events if not any(w in e.key for w in waits)) / short
            kernels = sum(e.count for e in events if e.device_type.name == "CUDA") / short if cuda else None
        except Exception as e:  # a rung that fails on this machine must not cost the others
            print(json.dumps(dict(mode=f"fastgen {label}", failed=f"{type(e).__name__}: {str(e)[:400]}")), flush=True)
            continue
        same = None
        if before is not None:
            same = float((greedy == before).all(1).float().mean()) if greedy.shape == before.shape else 0.0
        before, tokens = greedy, int(ro.lengths.sum())
        print(json.dumps(dict(mode=f"fastgen {label}", switches=",".join(on), rows=len(ro.lengths), tokens=tokens,
                              seconds=round(t.seconds, 3), tok_s=round(tokens / t.seconds),
                              first_call_s=round(first.seconds, 1),
                              ms_per_token_step=round(1000 * t.seconds / steps, 2),
                              gpu_ms_per_step=round(gpu_ms, 3) if gpu_ms is not None else None,
                              host_us_per_step=round(host_us), kernels_per_step=round(kernels, 1) if kernels else None,
                              graphs_compiled=int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
                              greedy_rows_equal_to_rung_before=same, peak_mem_gib=round(peak_memory_gib(), 2))), flush=True)


LOGPROB_MODES = ("naive", "chunked", "bdkd", "sinkhorn")


def logprob_memory(opts):
    """Each mode in a fresh process, so that one's peak does not hide the other's."""
    rows = []
    for mode in opts.modes:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--logprob-one", mode, "--batch", str(opts.batch),
                            "--positions", str(opts.positions), "--vocab", str(opts.vocab), "--hidden", str(opts.hidden),
                            "--chunk", str(opts.chunk)], capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(p.stderr[-2000:])
        rows.append(json.loads(p.stdout))
    return rows


CHECK_RUNS = {  # row: its models (Qwen2.5 sizes); a script row runs at the script's GPU defaults otherwise
    "generation": dict(model="0.5B"),  # every --generation mode, one process (bench.py --generation-check)
    "fastgen": dict(model="0.5B"),  # fastgen's switches, cumulatively (bench.py --fastgen-check)
    "update": dict(model="0.5B"),  # the update's variants and profile (bench.py --profile-update)
    "grpo": dict(model="0.5B"),
    "trl": dict(model="0.5B"),  # TRL's GRPOTrainer on grpo.py's row
    "grpo+static": dict(model="0.5B"),
    "grpo+fastgen": dict(model="0.5B"),
    "grpo+generate": dict(model="0.5B"),
    "cppo": dict(model="0.5B"),
    "kdrl": dict(model="0.5B", teacher="1.5B"),
    "opd_plus": dict(model="0.5B", teacher="1.5B"),
    "codistill": dict(small="0.5B", large="1.5B"),
    "dph_rl": dict(model="0.5B"),
    "grpo+lora": dict(model="0.5B"),
    "codistill+lora": dict(small="0.5B", large="1.5B"),
    "codistill+headline": dict(small="0.5B", large="1.5B"),  # the README's 24 GB command, at its own defaults, one step
}
VARIANTS = {"lora": ["--lora-rank", "16"], "static": ["--generation", "static"], "fastgen": ["--generation", "fastgen"],
            "generate": ["--generation", "generate"], "headline": ["--lora-rank", "16", "--gradient-checkpointing"]}
EXTRA = {"dph_rl": ["--presample-size", "16"]}  # its pre-sampling covers 16 questions, not the whole prompt file
CHECK_DEFAULT = "generation,fastgen,update,grpo,trl,codistill+headline,opd_plus,dph_rl,codistill,grpo+lora,kdrl,cppo"


def model_params(cfg: dict) -> int:
    """Parameters of a Qwen2 decoder with config fields `cfg`: embeddings (and an untied head), per layer
    q, k, v (with biases), o, gate, up, down and two norms, the final norm."""
    D, I, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * D // cfg["num_attention_heads"]
    layer = 2 * D * D + 2 * D * kv + D + 2 * kv + 3 * D * I + 2 * D
    return V * D * (1 if cfg["tie_word_embeddings"] else 2) + L * layer + D


def lora_params(cfg: dict, rank: int) -> int:
    """Parameters of rank-`rank` adapters on every linear layer of the decoder blocks (all-linear: q, k, v,
    o, gate, up, down; not the LM head): rank (in + out) each."""
    D, I, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * D // cfg["num_attention_heads"]
    return L * rank * (2 * (D + D) + 2 * (D + kv) + 3 * (D + I))


def trained_bytes(cfg: dict, lora_rank: int = 0) -> int:
    """What a trained model holds, as the memory table counts it: 16 bytes a trained parameter (fp32
    weight, gradient, two AdamW moments); with LoRA the model frozen in bf16 (2 bytes a parameter) and
    16 bytes an adapter parameter."""
    if not lora_rank:
        return 16 * model_params(cfg)
    return 2 * model_params(cfg) + 16 * lora_params(cfg, lora_rank)


def activation_bytes(cfg: dict, checkpointing: bool) -> float:
    """Bytes autograd keeps per token of a micro-batch for the trained model's backward: a Qwen2 layer under
    autocast keeps about 32 D + 8 I (bf16 matmul inputs and outputs, fp32 residual and norms), times the
    layers, plus a third for what the count misses; with gradient checkpointing each layer's fp32 input
    and one layer recomputed at a time. Under LoRA the same tensors are kept: each linear's input, for its
    adapter's gradient, as for the weight's in full fine-tuning."""
    D, I, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    layer = (32 * D + 8 * I) * 4 / 3
    return 4 * D * L + layer if checkpointing else L * layer


TABLE = [  # the README's commands: (command, trained sizes, frozen bf16 sizes (a reference, a teacher))
    ("grpo.py --model Qwen2.5-0.5B-Instruct", ["0.5B"], ["0.5B"]),
    ("grpo.py --model Qwen2.5-1.5B-Instruct --beta 0", ["1.5B"], []),
    ("cppo.py --model Qwen2.5-1.5B-Instruct", ["1.5B"], ["1.5B"]),
    ("kdrl.py --model Qwen2.5-0.5B-Instruct --teacher Qwen2.5-1.5B-Instruct", ["0.5B"], ["0.5B", "1.5B"]),
    ("opd_plus.py --model Qwen2.5-0.5B-Instruct --teacher Qwen2.5-1.5B-Instruct", ["0.5B"], ["1.5B"]),
    ("codistill.py --small Qwen2.5-0.5B --large Qwen2.5-1.5B", ["0.5B", "1.5B"], []),
    ("grpo.py --model Qwen2.5-7B-Instruct --beta 0", ["7B"], []),
]


def memory_table(tokens: int = 8 * 700, head_gib: float = 2.0, lora_rank: int = 16, card_gib: float = 21.0):
    """The README's memory table, full fine-tuning beside LoRA (rank `lora_rank`), each with and without
    gradient checkpointing: fixed bytes (trained_bytes, frozen models 2 bytes a parameter; under LoRA the
    reference is the trained model with its adapters off, no copy), plus the activations of the largest
    trained model's backward over `tokens` tokens a micro-batch (8 sequences of ~700: a ~190-token prompt,
    512 new), plus `head_gib` for the LM-head chunks of the log-prob pass, plus, under LoRA, the fp32 copy of
    that model's bf16 head the pass holds. A command fits a 24 GB card when its peak is under `card_gib`."""
    sys.path.insert(0, TESTS)
    from qwen_like import QWEN25_CONFIGS as C
    gib = lambda b: b / 2**30
    lines = ["| command (defaults) | fixed | peak | with `--gradient-checkpointing` | LoRA r16: fixed | LoRA peak | "
             "LoRA, checkpointing | fits 24 GB: full / LoRA |", "|---|---|---|---|---|---|---|---|"]
    for command, trained, frozen in TABLE:
        big = max(trained, key=lambda s: activation_bytes(C[s], False))
        cells, fits = [], []
        for rank in (0, lora_rank):
            refs = [s for s in frozen if not (rank and s in trained)]  # LoRA's reference: the adapters off
            fixed = sum(trained_bytes(C[s], rank) for s in trained) + sum(2 * model_params(C[s]) for s in refs)
            head = 4 * C[big]["vocab_size"] * C[big]["hidden_size"] if rank else 0
            peaks = [gib(fixed + head + tokens * activation_bytes(C[big], ckpt)) + head_gib for ckpt in (False, True)]
            cells += [f"{gib(fixed):.1f} GiB", *(f"~{p:.0f} GiB" for p in peaks)]
            fits.append("yes" if peaks[0] < card_gib else "checkpointing only" if peaks[1] < card_gib else "no")
        lines.append(f"| `{command}` | {' | '.join(cells)} | {' / '.join(fits)} |")
    return "\n".join(lines)


def check_inputs(opts, root: str, sizes: set):
    """Random-weight Qwen2.5 models of `sizes` (tests/qwen_like.py, shared with the real-shape test) and a
    .jsonl of questions of about --check-prompt-tokens tokens each."""
    sys.path.insert(0, TESTS)
    import random
    from qwen_like import _CORPUS, qwen_like_model, qwen_tokenizer

    cut = {} if not opts.check_hidden else dict(hidden_size=opts.check_hidden, intermediate_size=2 * opts.check_hidden,
                                                num_attention_heads=4, num_key_value_heads=2)
    models = {size: qwen_like_model(os.path.join(root, size), size, layers=opts.check_layers, instruct=True, **cut)
              for size in sorted(sizes)}
    tok, rng, words = qwen_tokenizer(instruct=True), random.Random(0), " ".join(_CORPUS).split()
    with open(os.path.join(root, "prompts.jsonl"), "w") as f:
        for i in range(4 * max(opts.check_prompts, 32) * opts.check_steps):
            ids = tok(" ".join(rng.choice(words) for _ in range(2 * opts.check_prompt_tokens))).input_ids
            f.write(json.dumps(dict(question=tok.decode(ids[:opts.check_prompt_tokens]), answer=str(i))) + "\n")
    return models, os.path.join(root, "prompts.jsonl")


def run_row(cmd: list, timeout: float):
    """(returncode, stdout, stderr) of a row's process; a row past its time limit is killed and says so."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return None, out, err + f"\n(stopped at its {timeout:.0f} s limit)"


def gpu_check(opts):
    """Each row in a fresh process, in the order of --check-scripts, each printed as it finishes: the generation
    modes side by side, the update's variants and profile, every script (and TRL); then one table."""
    t_start = time.perf_counter()
    say = lambda msg: print(msg, file=sys.stderr, flush=True)
    names = [n for n in opts.check_scripts.split(",") if n]
    unknown = [n for n in names if n not in CHECK_RUNS]
    if unknown:
        sys.exit(f"--check-scripts: unknown {', '.join(unknown)}; known: {', '.join(CHECK_RUNS)}")
    root = tempfile.mkdtemp(prefix="bench-gpu-check-")
    models, data = check_inputs(opts, root, {s for n in names for s in CHECK_RUNS[n].values()})
    say(f"models and prompts built in {time.perf_counter() - t_start:.0f} s")
    rows, generation, profile = [], opts.check_generation, None
    for name in names:
        script, _, variant = name.partition("+")
        sizes = CHECK_RUNS[name]
        elapsed = time.perf_counter() - t_start
        if opts.check_budget and elapsed > opts.check_budget:
            say(f"{name}: skipped, {elapsed:.0f} s of the --check-budget {opts.check_budget:.0f} s spent")
            rows.append(dict(script=name, models="", failed="skipped (--check-budget)"))
            continue
        model_flags = [x for k, v in sizes.items() for x in (f"--{k}", models[v])]
        limit = opts.check_timeout
        if opts.check_budget:  # no row runs past the budget (30 s at least, to say something)
            limit = max(30.0, min(opts.check_timeout, opts.check_budget - elapsed))
        say(f"{name} ... ({elapsed:.0f} s in)")
        t0 = time.perf_counter()
        if script == "generation":
            code, out, err = run_row([sys.executable, os.path.abspath(__file__), "--generation-check", models["0.5B"],
                                      "--check-data", data, *check_sizes(opts)], limit)
            modes = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            for m in modes:
                say(f"  {json.dumps(m)}")
            timed = [m for m in modes if "tok_s" in m]
            if generation == "auto" and timed:
                generation = max(timed, key=lambda m: m["tok_s"])["mode"]
                say(f"  the script rows generate with --generation {generation} (the fastest)")
            rows.extend(dict(script=f"generation: {m['mode']}", models="0.5B", **m) for m in modes)
            if code != 0:
                say(f"generation failed:\n{err[-3000:]}")
            continue
        if script == "fastgen":
            code, out, err = run_row([sys.executable, os.path.abspath(__file__), "--fastgen-check", models["0.5B"],
                                      "--check-data", data, "--fastgen-ladder", opts.fastgen_ladder, *check_sizes(opts)],
                                     limit)
            rungs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            for m in rungs:
                say(f"  {json.dumps(m)}")
            rows.extend(dict(script=f"generation: {m['mode']}", models="0.5B", **m) for m in rungs)
            if code != 0:
                say(f"fastgen failed:\n{err[-3000:]}")
            continue
        if script == "update":
            code, out, err = run_row([sys.executable, os.path.abspath(__file__), "--profile-update", models["0.5B"],
                                      "--update-variants", opts.update_variants or ",".join(UPDATE_VARIANTS),
                                      *check_sizes(opts)], limit)
            for line in out.splitlines():
                if line.startswith('{"variant"'):
                    say(f"  {line}")
            profile = out if code == 0 else f"the profile failed:\n{out[-2000:]}\n{err[-3000:]}"
            continue
        if script == "trl":
            try:
                import trl  # noqa: F401
            except ImportError:
                say("trl is not importable: no TRL row (pip install trl, or its wheel on an offline machine)")
                continue
        steps = opts.check_steps if variant != "headline" else 1
        flags = model_flags + ["--dataset", data, "--steps", str(steps), "--max-new-tokens", str(opts.check_new_tokens)]
        if variant != "headline":  # the headline command keeps its own questions and group size
            flags += ["--prompts-per-step", str(opts.check_prompts), "--group-size", str(opts.check_group)]
        flags += VARIANTS.get(variant, []) + EXTRA.get(script, [])
        if generation not in ("auto", "default") and script != "trl" and variant not in ("static", "fastgen", "generate"):
            flags += ["--generation", generation]
        which = ["--trl"] if script == "trl" else ["--script", script]
        warmup = min(opts.warmup, steps - 1)
        code, out, err = run_row([sys.executable, os.path.abspath(__file__), *which, "--warmup", str(warmup), "--", *flags],
                                 limit)
        label = f"{script}.py" + (f" {' '.join(VARIANTS[variant])}" if variant else "")
        row = dict(script="TRL GRPOTrainer" if script == "trl" else label,
                   models=" + ".join(f"{v}" for v in sizes.values()))
        if code != 0:  # one failure must not cost the other rows (a GPU lease is short)
            say(f"{name} failed after {time.perf_counter() - t0:.0f} s:\n{err[-3000:]}")
            rows.append(dict(row, failed="failed (its error is above)" if code is not None else "stopped at its time limit"))
            continue
        r = json.loads(out[out.rindex("{\n"):])  # the script's own last line comes before
        say(f"{name} done in {time.perf_counter() - t0:.0f} s: {json.dumps(r)}")
        row.update(step_s=r["step_s"], peak_gib=r["peak_mem_gib"], first_step_s=r.get("first_step_s"))
        if script != "trl":
            generated = r["completion_len"] * (r["questions"] or opts.check_prompts) * opts.check_group
            row.update(generate_s=r["generate_s"], update_s=r["update_s"], generated_tok_s=generated / r["generate_s"],
                       trained_tok_s=r["trained_tokens"] / r["update_s"])
        rows.append(row)
    shutil.rmtree(root, ignore_errors=True)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    cut = "" if not (opts.check_layers or opts.check_hidden) else \
        f", cut to {opts.check_layers or 'all'} layers, hidden {opts.check_hidden or 'real'}"
    print(f"{dev}; random-weight Qwen2.5{cut}; {opts.check_prompts} questions x {opts.check_group} completions of "
          f"up to {opts.check_new_tokens} tokens, prompts ~{opts.check_prompt_tokens} tokens; means of steps "
          f"{opts.warmup + 1}-{opts.check_steps}; peak memory: "
          f"{'max allocated' if torch.cuda.is_available() else 'resident set'}; "
          f"{time.perf_counter() - t_start:.0f} s in all\n")
    print("| script | models | step (s) | generate (s) | update (s) | generated tok/s | trained tok/s | peak memory (GiB) | "
          "first step (s): compile included |")
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda r, k, f: format(r[k], f) if r.get(k) is not None else "-"
    for r in rows:
        if r.get("failed"):
            print(f"| {r['script']} | {r['models']} | {r['failed']} | | | | | | |")
        elif r["script"].startswith("generation"):
            print(f"| {r['script']} | {r['models']} | - | {r['seconds']:.2f} | - | {r['tok_s']:,.0f} | - | "
                  f"{r['peak_mem_gib']:.1f} | "
                  f"{r['first_call_s']:.1f} |")
        else:
            print(f"| {r['script']} | {r['models']} | {r['step_s']:.2f} | {fmt(r, 'generate_s', '.2f')} | "
                  f"{fmt(r, 'update_s', '.2f')} | {fmt(r, 'generated_tok_s', ',.0f')} | {fmt(r, 'trained_tok_s', ',.0f')} | "
                  f"{r['peak_gib']:.1f} | {fmt(r, 'first_step_s', '.1f')} |")
    if profile is not None:
        n = opts.check_prompts * opts.check_group
        print(f"\none update of grpo.py's shape (0.5B, {n} completions), profiled:\n{profile}")
    return rows


def fastgen_ladder() -> list:
    import fastgen
    return fastgen.LADDER


def check_sizes(opts) -> list:
    return [x for k in ("prompts", "group", "new_tokens", "prompt_tokens") for x in (f"--check-{k.replace('_', '-')}",
                                                                                      str(getattr(opts, f"check_{k}")))]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--script", default="grpo",
                   choices=("grpo", "cppo", "kdrl", "sinkd", "opd_plus", "codistill", "bdkd", "dph_rl"))
    p.add_argument("--random-model", default=None, help="'H,L': a random-weight Qwen2 as --model")
    p.add_argument("--trl", action="store_true", help="time TRL's GRPOTrainer instead of grpo.py")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the means (default 2; --gpu-check: 1)")
    p.add_argument("--logprob-memory", action="store_true", help="peak memory of chunked vs naive log-probs")
    p.add_argument("--logprob-one", choices=LOGPROB_MODES, help=argparse.SUPPRESS)
    p.add_argument("--modes", nargs="+", choices=LOGPROB_MODES, default=["naive", "chunked"],
                   help="--logprob-memory: passes to measure, each in its own process")
    p.add_argument("--batch", type=int, default=8, help="--logprob-memory: sequences")
    p.add_argument("--positions", type=int, default=512, help="--logprob-memory: positions per sequence")
    p.add_argument("--vocab", type=int, default=151936, help="--logprob-memory: LM-head rows (Qwen2.5: 151,936)")
    p.add_argument("--hidden", type=int, default=128, help="--logprob-memory: hidden size of the random model")
    p.add_argument("--chunk", type=int, default=1024, help="--logprob-memory: positions per chunk (--logprob-chunk)")
    p.add_argument("--gpu-check", action="store_true", help="every script on random-weight Qwen2.5-0.5B/1.5B, offline")
    p.add_argument("--memory-table", action="store_true", help="the memory table (full fine-tuning and LoRA), counted")
    p.add_argument("--profile-update", metavar="MODEL", help="one grpo.py-shaped update of MODEL (a directory), profiled")
    p.add_argument("--check-scripts", default=CHECK_DEFAULT,
                   help=f"--gpu-check: rows, scripts[+variant], comma-separated (default: {CHECK_DEFAULT})")
    p.add_argument("--check-steps", type=int, default=2, help="--gpu-check: steps per script (the first --warmup left out)")
    p.add_argument("--check-prompts", type=int, default=8, help="--gpu-check: questions per step")
    p.add_argument("--check-group", type=int, default=8, help="--gpu-check: completions per question")
    p.add_argument("--check-new-tokens", type=int, default=512, help="--gpu-check: completion length limit")
    p.add_argument("--check-prompt-tokens", type=int, default=150, help="--gpu-check: tokens per question")
    p.add_argument("--check-generation", default="auto",
                   help="--gpu-check: --generation of the script rows: auto (the fastest the generation row measured), "
                        "default (each script's), or a mode")
    p.add_argument("--check-timeout", type=float, default=300, help="--gpu-check: seconds a row may take before it is stopped")
    p.add_argument("--check-budget", type=float, default=0,
                   help="--gpu-check: seconds for all rows; a row is not started past it, and none runs past it (0: no limit)")
    p.add_argument("--check-data", help=argparse.SUPPRESS)
    p.add_argument("--update-variants", default="",
                   help="--profile-update: names of UPDATE_VARIANTS to time first, comma-separated (--gpu-check: all)")
    p.add_argument("--generation-check", metavar="MODEL", help="every --generation mode on MODEL, timed, greedy compared")
    p.add_argument("--fastgen-check", metavar="MODEL", help="fastgen's switches on MODEL, one by one, timed, greedy compared")
    p.add_argument("--fastgen-ladder", default=",".join(fastgen_ladder()),
                   help="--fastgen-check (and its --gpu-check row): switches to add one by one, comma-separated")
    p.add_argument("--check-layers", type=int, default=None, help="--gpu-check: cut the models to this depth (CPU)")
    p.add_argument("--check-hidden", type=int, default=None, help="--gpu-check: this hidden size, not the real one (CPU)")
    argv = sys.argv[1:]
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    opts = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if opts.logprob_one:
        print(json.dumps(logprob_pass(opts.logprob_one, opts.batch, opts.positions, opts.vocab, opts.hidden, opts.chunk)))
        return
    if opts.gpu_check:
        opts.warmup = min(1 if opts.warmup is None else opts.warmup, opts.check_steps - 1)
        if any(r.get("failed") for r in gpu_check(opts)):
            sys.exit("--gpu-check: a script failed (its error is above)")
        return
    opts.warmup = 2 if opts.warmup is None else opts.warmup
    if opts.profile_update:
        profile_update(opts.profile_update, opts.check_prompts * opts.check_group, opts.check_prompt_tokens,
                       opts.check_new_tokens,
                       variants=[v for v in opts.update_variants.split(",") if v])
        return
    if opts.fastgen_check:
        fastgen_check(opts.fastgen_check, opts.check_data, opts.check_prompts, opts.check_group, opts.check_new_tokens,
                      opts.fastgen_ladder)
        return
    if opts.generation_check:
        generation_check(opts.generation_check, opts.check_data, opts.check_prompts, opts.check_group, opts.check_new_tokens)
        return
    if opts.memory_table:
        print(memory_table())
        return
    if opts.logprob_memory:
        dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
        for row in logprob_memory(opts):
            print(json.dumps(dict(device=dev, **row)))
        return
    model_dir = random_model(opts.random_model) if opts.random_model else None
    if model_dir:
        flags = ["--small" if opts.script in ("codistill", "bdkd") else "--model", model_dir, *flags]
    res = bench_trl(flags, opts.warmup) if opts.trl else bench_ours(opts.script, flags, opts.warmup)
    if model_dir:  # its weights: hundreds of MB in /tmp
        shutil.rmtree(model_dir, ignore_errors=True)
    if torch.distributed.is_initialized():  # under torchrun: the largest peak over ranks, printed once
        peak = torch.tensor(res["peak_mem_gib"], device="cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        res.update(peak_mem_gib=peak.item(), processes=torch.distributed.get_world_size())
        if torch.distributed.get_rank() != 0:
            return
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    which = "trl" if opts.trl else f"{opts.script}.py"
    print(json.dumps(dict(which=which, device=dev, flags=" ".join(flags), **res), indent=1))


if __name__ == "__main__":
    main()
