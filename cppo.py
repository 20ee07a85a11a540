"""CPPO: Accelerating the Training of Group Relative Policy Optimization-Based Reasoning Models
(arXiv 2503.22342, official code lzhxmu/CPPO).

grpo.py plus, before any forward pass, completion pruning (each group of G trains only its k = floor(G (1 - P))
completions with the largest |A_i|; P = --prune-rate) and dynamic allocation (ceil(budget / k) questions a step,
so that it still trains on budget = prompts_per_step x G). With P = 0 this is grpo.py. More: docs/cppo.md.

Deviations from the paper:
1. Defaults follow CPPO's runs (G 16, mu 2, beta 0.04, lr 1e-6, P 0.875); the loss is the paper's
   per-sequence mean (--loss-type grpo), the official code's is bnpo.
2. --prune-scope batch takes one top-k over the local batch (the official code; default: per question).
3. The surplus of ceil(budget / k) questions, up to k - 1 completions, is dropped too (lowest |A|).
4. Generation runs in this process (the paper: vLLM on its own GPU): the step gains less than the update.

CPU (toy world, minutes):  python cppo.py
GPU:                       python cppo.py --model Qwen2.5-1.5B-Instruct --dataset gsm8k
"""

import math
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import common
import plumbing
import rundir
import tasks
from common import arg


@dataclass
class Args:
    model: str = arg("toy-small", "policy to train: hub id, bare name (Qwen2.5-0.5B), local directory or toy model")
    dataset: str = arg("gsm8k", "training questions: gsm8k, math, toy, toy-hard or a .jsonl file", toy="toy")
    eval_dataset: str = arg(None, "held-out questions: as --dataset, or a benchmark (default: --dataset's eval split)")
    steps: int = arg(500, "training steps (one batch of rollouts each)", toy=200)
    prompts_per_step: int = arg(16, "questions sampled per step", toy=8)
    group_size: int = arg(16, "completions per question (G)", toy=8)
    max_new_tokens: int = arg(512, "completion length limit", toy=8)
    lr: float = arg(1e-6, "AdamW learning rate", toy=2e-5)
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")
    temperature: float = arg(1.0, "sampling temperature (log-probs use the same)")
    format_coef: float = arg(0.0, "reward bonus for an answer in \\boxed{} or after ####")
    instruction: str = arg(None, "text on a new line after each question ('' for none; default: --dataset's own)")
    system_prompt: str = arg(None, "system message of the chat template (default: the template's own)")
    reward: str = arg("", "reward function FILE.py:NAME or module:NAME, called as TRL calls one (default: the grader)")
    seed: int = arg(1, "random seed")
    out: str = arg("", "output directory (default: runs/<script>-<time>)")
    report_to: str = arg("none", "also send the metrics to: none, tensorboard, wandb, or tensorboard,wandb")
    wandb_project: str = arg("", "W&B project of --report-to wandb (default: the script's name)")
    eval_every: int = arg(50, "evaluate every N steps (also at step 0 and after the last step)")
    eval_size: int = arg(500, "held-out questions for greedy pass@1")
    pass_n: int = arg(0, "answers sampled per held-out question for eval/pass@k (0: off)", toy=16)
    pass_k: str = arg("1,4,16", "the k of eval/pass@k, comma-separated, each at most --pass-n")
    log_samples: int = arg(4, "held-out questions whose greedy answers go to samples.jsonl (0: off)")
    save_every: int = arg(50, "checkpoint every N steps and after the last (0: never)")
    save_minutes: float = arg(5.0, "also checkpoint after N minutes without one: Ctrl-C keeps a slow run (0: by steps only)")
    resume: bool = arg(False, "continue the run in --out from its checkpoint")
    device: str = arg("auto", "cuda, cpu, or auto")
    threads: int = arg(0, "CPU threads for torch (0: one per core that other work leaves free)", toy=1)
    micro_batch_size: int = arg(8, "completions per forward/backward (gradient accumulation)", toy=64)
    gradient_checkpointing: bool = arg(False, "recompute activations in backward to save memory")
    lora_rank: int = arg(0, "LoRA rank of every trained model (0: full fine-tuning)")
    lora_alpha: float = arg(32.0, "LoRA alpha: the adapters' update is scaled by alpha / rank")
    lora_target: str = arg("all-linear", "modules with LoRA adapters: all-linear or names, comma-separated")
    logprob_chunk: int = arg(1024, "positions per chunk of the LM head in the log-prob pass")
    generation: str = arg("auto", "sampler: auto (fastgen on CUDA, else generate), generate, static or fastgen",
                          choices=("auto", "generate", "static", "fastgen"))
    fsdp: bool = arg(False, "torchrun: shard weights, gradients and optimizer states over the processes (FSDP2)")
    # Algorithm-specific arguments
    scale_rewards: str = arg("group", "divide centred rewards by the group std, the batch std, or nothing",
                             choices=("group", "batch", "none"))
    loss_type: str = arg("grpo", "token aggregation of the loss", choices=("grpo", "bnpo", "dr_grpo", "dapo"))
    num_iterations: int = arg(2, "updates per batch of rollouts (mu); >1 computes old log-probs once", toy=1)
    beta: float = arg(0.04, "coefficient of the k3 penalty to the initial policy (0: no reference model)")
    epsilon: float = arg(0.2, "lower clip range: ratio >= 1 - epsilon")
    epsilon_high: float = arg(0.2, "upper clip range: ratio <= 1 + epsilon_high (DAPO: 0.28)")
    prune_rate: float = arg(0.875, "fraction P of each group pruned before any forward: keeps floor(G (1 - P))", toy=0.5)
    prune_scope: str = arg("group", "top-k per question (paper) or over the whole batch (official code)",
                           choices=("group", "batch"))
    prune_metric: str = arg("smallest", "which |A| are dropped: smallest (CPPO), largest or random (controls)",
                            choices=("smallest", "largest", "random"))
    dynamic_allocation: bool = arg(True, "sample more questions, so that a step trains on prompts-per-step x G completions")


# ALGO LOGIC


def compute_advantages(rewards, group_size: int, scale: str):
    """A_i = (r_i - mean_group r) / (std r + 1e-4), std unbiased, over the group or the batch. The
    batch is the whole step's: under torchrun the std is taken over every rank's rewards, as one
    process would (groups never straddle ranks)."""
    r = rewards.view(-1, group_size)  # (N, G)
    centred = r - r.mean(1, keepdim=True)  # (N, G)
    if scale == "group":
        centred = centred / (r.std(1, keepdim=True) + 1e-4)  # (N, G)
    elif scale == "batch":
        centred = centred / (plumbing.std_over_ranks(rewards) + 1e-4)  # (N, G)
    return centred.reshape(-1)  # (B,)


def kept_per_group(group_size: int, prune_rate: float) -> int:
    """k = floor(G (1 - P)); rounded first so that G = 10, P = 0.9 keeps 1, not 0.99999."""
    return math.floor(round(group_size * (1 - prune_rate), 6))


def select_completions(advantages, group_size: int, k: int, budget: int, scope: str, metric: str, generator=None):
    """CPPO completion pruning (arXiv 2503.22342): the sorted rows to train on. Keep-score |A_i| (CPPO drops
    the smallest |A|), -|A_i| or a uniform draw (controls); the k best of each group ('group') or the N k
    best of the batch ('batch'), then the `budget` best of those. Ties keep the earlier row."""
    abs_adv = advantages.abs()  # (B,)
    score = (abs_adv if metric == "smallest" else -abs_adv if metric == "largest"
             else torch.rand(abs_adv.shape, generator=generator).to(abs_adv.device))  # (B,) keep-score
    N = len(score) // group_size
    if scope == "group":
        order = torch.sort(score.view(N, group_size), dim=1, descending=True, stable=True).indices  # (N, G)
        kept = (order[:, :k] + group_size * torch.arange(N, device=score.device)[:, None]).reshape(-1)  # (N k,)
    else:
        kept = torch.sort(score, descending=True, stable=True).indices[:N * k]  # (N k,)
    kept = torch.sort(kept).values  # (N k,) batch order, so that ties below keep the earlier row
    kept = kept[torch.sort(score[kept], descending=True, stable=True).indices[:budget]]  # (budget,)
    return torch.sort(kept).values  # (budget,)


def compute_loss(logp, old_logp, ref_logp, advantages, mask, args, n_seqs: int, n_tokens):
    """GRPO objective (arXiv 2402.03300, eq. 3), as a loss to minimise, per token:
        L_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta * k3_t,
        rho_t = exp(l_t - l_old_t),  k3_t = exp(l_ref_t - l_t) - (l_ref_t - l_t) - 1,
    aggregated by --loss-type. `n_seqs` and `n_tokens` are the whole step's (all micro-batches),
    so that the summed micro-batch losses equal the full-batch loss.
    CPPO (arXiv 2503.22342) optimises it over the kept completions only: n_seqs and n_tokens count
    kept rows (the average is over the k per question, not over G)."""
    ratio = torch.exp(logp - old_logp)  # (b, T)
    A = advantages[:, None]  # (b, 1)
    clipped_ratio = torch.clamp(ratio, 1 - args.epsilon, 1 + args.epsilon_high)  # (b, T)
    per_token = -torch.min(ratio * A, clipped_ratio * A)  # (b, T)
    kl_policy_ref_k3 = None
    if ref_logp is not None:
        kl_policy_ref_k3 = common.kl_k3(ref_logp - logp)  # (b, T) estimates KL(pi_theta||pi_ref)
        per_token = per_token + args.beta * kl_policy_ref_k3  # (b, T)
    if args.loss_type == "grpo":  # mean over each sequence, then over sequences
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    elif args.loss_type == "bnpo":  # token mean of this micro-batch, micro-batches averaged
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1) * (len(mask) / n_seqs)
    elif args.loss_type == "dr_grpo":  # constant normaliser: no length bias
        loss = (per_token * mask).sum() / (n_seqs * args.max_new_tokens)
    else:  # dapo: token mean over the whole step
        loss = (per_token * mask).sum() / n_tokens
    is_clipped = ((ratio < 1 - args.epsilon) & (A < 0)) | ((ratio > 1 + args.epsilon_high) & (A > 0))  # (b, T)
    return loss, dict(kl=kl_policy_ref_k3, clipped=is_clipped.float())


def main():
    args = common.parse_args(Args)
    plumbing.check_args(args, num_iterations=1)
    if args.prune_rate < 0:  # CPPO:
        plumbing.die(f"--prune-rate must be in [0, 1) (got {args.prune_rate})")
    if kept_per_group(args.group_size, args.prune_rate) < 1:  # CPPO:
        plumbing.die(f"--prune-rate {args.prune_rate} keeps no completion of a group of {args.group_size} "
                     f"(floor(G (1 - P)) < 1): use at most 1 - 1/G = {1 - 1 / args.group_size:g}")
    common.check_available([args.model], args.dataset, args.eval_dataset)  # offline: names all that is missing
    sampler = tasks.PromptSampler(tasks.load_data(args.dataset, "train"), args.seed)
    eval_rows = tasks.load_data(args.eval_dataset, "eval")[:args.eval_size]
    reward = tasks.load_reward(args.reward, sampler.rows, eval_rows)  # --reward's function, tried on a row (None: the grader)
    device = plumbing.init_distributed(args.device, args.threads)  # one process, or one rank of torchrun
    run = rundir.Run(args, __file__)  # DIR (--out): config.json, metrics.jsonl, checkpoints; what Ctrl-C says
    G = args.group_size
    k = kept_per_group(G, args.prune_rate)  # CPPO: completions kept per question
    # CPPO: completions trained per step (per rank)
    budget = args.prompts_per_step // plumbing.world_size() * (G if args.dynamic_allocation else k)
    n_questions = math.ceil(budget / k)  # CPPO: questions sampled per step (per rank)

    start_from = run.checkpoint_dir("policy") if args.resume else args.model
    model, tok = common.load_model(start_from, device, args.gradient_checkpointing, fsdp=args.fsdp,
                                   lora=common.lora_config(args), generation=args.generation)  # LoRA: fp32 adapters
    ref = common.reference(model, args.model, device, args) if args.beta > 0 else None  # LoRA: the adapters off
    plumbing.seed_everything(args.seed + plumbing.rank())  # after loading; ranks sample different completions
    trained = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters alone
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay, fused=True)  # fused: one kernel a step
    start = run.resume(dict(policy=model), dict(policy=optimizer), sampler) if args.resume else 0

    def evaluate(step):
        metrics, samples = common.evaluate(model, tok, eval_rows, args.max_new_tokens, args.pass_n, args.pass_k,
                                           samples=args.log_samples, instruction=args.instruction,
                                           system_prompt=args.system_prompt, reward=reward)
        run.log(step, metrics)
        run.log_samples(step, "eval", samples)  # DIR/samples.jsonl, and the first on the console
        return metrics["eval/accuracy"]

    # resumed: the accuracy at step 0 and the latest, as logged
    acc0, acc = [evaluate(0)] * 2 if start == 0 else (run.first("eval/accuracy"), run.last("eval/accuracy"))
    bar = tqdm(range(start + 1, args.steps + 1), initial=start, total=args.steps, dynamic_ncols=True,
               disable=plumbing.rank() != 0)
    for step in bar:
        t_step = time.perf_counter()
        # 1. sample
        with plumbing.Timer() as t_gen:
            rows = plumbing.shard(sampler.next(n_questions * plumbing.world_size()))  # this rank's questions
            prompts = [tasks.format_prompt(tok, r, instruction=args.instruction, system_prompt=args.system_prompt)
                       for r in rows]
            rollout = common.sample(model, tok, prompts, G, args.max_new_tokens, args.temperature)
        # 2. score
        scores = tasks.rewards_for(rollout.texts, rows, args.format_coef, reward, prompts)  # each row G times
        rewards = scores.reward.to(device)  # (B,)
        # 3. ALGO LOGIC
        advantages = compute_advantages(rewards, G, args.scale_rewards)  # (B,)
        kept = select_completions(advantages, G, k, budget, args.prune_scope, args.prune_metric)  # (budget,)
        sampled, sampled_adv, abs_adv = rollout, advantages, advantages.abs()  # (B,) the whole sample, for logging
        rollout, advantages = rollout.select(kept), advantages[kept]  # (budget, T), (budget,) the only rows trained on

        # 4. update
        with plumbing.Timer() as t_upd:
            batches = common.micro_batches(len(advantages), args.micro_batch_size)
            n_tokens = rollout.mask.sum()
            n_seqs_all, n_tokens_all = len(advantages) * plumbing.world_size(), plumbing.all_sum(n_tokens)  # the step's
            with torch.no_grad():
                old = ([common.token_logprobs(model, rollout.select(i), args.temperature, args.logprob_chunk)
                        for i in batches] if args.num_iterations > 1 else None)
                refs = ([common.token_logprobs(ref, rollout.select(i), args.temperature, args.logprob_chunk)
                         for i in batches] if ref is not None else None)
            model.train()
            sums = dict(loss=0.0, kl=0.0, clipped=0.0, entropy=0.0)
            for _ in range(args.num_iterations):
                optimizer.zero_grad(set_to_none=True)
                for j, idx in enumerate(batches):
                    mb = rollout.select(idx)
                    logp, entropy = common.token_logprobs(model, mb, args.temperature, args.logprob_chunk,
                                                          with_entropy=True)  # (b, T)
                    old_logp = old[j] if old is not None else logp.detach()  # (b, T)
                    loss, s = compute_loss(logp, old_logp, refs[j] if refs else None, advantages[idx],
                                           mb.mask, args, n_seqs_all, n_tokens_all)
                    loss.backward()
                    sums["loss"] += loss.detach()
                    sums["clipped"] += (s["clipped"] * mb.mask).sum()
                    sums["entropy"] += (entropy * mb.mask).sum()
                    if s["kl"] is not None:
                        sums["kl"] += (s["kl"].detach() * mb.mask).sum()
                grad_norm = plumbing.reduce_and_clip_grads(model, args.max_grad_norm)  # summed over ranks first
                run.check_finite(sums["loss"], step)
                optimizer.step()

        # 5. log, evaluate, save
        per_token = n_tokens * args.num_iterations
        zero_std = (rewards.view(-1, G).std(1) == 0).float().mean()
        metrics = {
            "train/reward": rewards.mean(), "train/reward_std": plumbing.std_over_ranks(rewards),
            "train/grade_errors": scores.grade_errors,
            "train/loss": plumbing.all_sum(sums["loss"]) / args.num_iterations, "train/clip_frac": sums["clipped"] / per_token,
            "train/zero_std_frac": zero_std, "train/completion_len": sampled.lengths.float().mean(),  # every sampled one
            "train/truncated_frac": sampled.truncated.float().mean(),
            "train/entropy": sums["entropy"] / per_token, "train/grad_norm": grad_norm, "train/tokens": n_tokens_all,
            "time/generate": t_gen.seconds, "time/update": t_upd.seconds,
            "cppo/questions": len(rows) * plumbing.world_size(), "cppo/kept_frac": len(kept) / len(rewards),  # CPPO:
            "cppo/reward_kept": rewards[kept].mean(), "cppo/abs_adv_kept": abs_adv[kept].mean(),  # CPPO:
        }
        if len(kept) < len(rewards):  # CPPO: absent when nothing is pruned (P = 0)
            dropped = torch.ones_like(abs_adv, dtype=torch.bool).index_fill(0, kept, False)  # (B,)
            metrics["cppo/abs_adv_dropped"] = abs_adv[dropped].mean()
        if ref is not None:
            metrics["train/kl"] = sums["kl"] / per_token
        metrics["time/step"] = time.perf_counter() - t_step
        metrics = plumbing.mean_over_ranks(metrics)
        run.log(step, metrics)
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(step)
            run.log_samples(step, "train", tasks.sample_rows(  # the step's first group
                rows[0], sampled.texts[:G], scores.correct[:G], reward=rewards[:G], advantage=sampled_adv[:G],
                kept=torch.isin(torch.arange(G, device=device), kept)))  # CPPO: trained on, or pruned
        if run.checkpoint_due(step, args):  # every --save-every steps or --save-minutes, and the last; 0: none
            run.save_checkpoint(step, dict(policy=(model, tok)), dict(policy=optimizer), sampler)
        bar.set_postfix(reward=f"{metrics['train/reward']:.3f}", acc=f"{acc:.3f}")

    run.save_final({"": (model, tok)})
    run.close()
    if plumbing.rank() == 0:
        print(f"eval/accuracy: {acc0:.3f} -> {acc:.3f}  ({run.out})")


if __name__ == "__main__":
    rundir.exit_on_interrupt()  # Ctrl-C: one line with the last checkpoint and how to resume
    main()
