"""CoDistill-GRPO: a small and a large model trained together by GRPO (arXiv 2605.08873).

Two models learn at the same time and no trained oracle is needed. The small model S generates
G completions per question, which the large model L scores in its own forward; L samples only
n = --large-rollouts of its own (default 2, against GRPO's G).
- S is updated by GRPO on a reward with an on-policy KD term: r~_i = r_i - alpha * k1_i, where
  k1_i = mean_t sg(l_S - l_L) estimates the per-token reverse KL(pi_S||pi_L) of completion i.
- L is updated by GRPO on S's rollouts, advantages from r only, each token weighted by the
  importance weight pi_L/pi_S,old (S sampled the token, L learns from it), truncated at C.
Trained on S's rollouts alone (n = 0), a pretrained L collapsed when S's rewards were sparse: hence
n = 2 (docs/codistill.md, "The large model's own rollouts"). Most of L's generation time is saved.

RECONSTRUCTED: there is no official code and the method text could not be read; the recipe is
rebuilt from the abstract and secondary sources. Ours (docs/codistill.md): the KD reward's form and
the defaults of --kd-coef and --is-cap; how the importance weight meets the clipped surrogate (L's
own PPO ratio clipped, the behaviour mismatch pi_L,old/pi_S,old a detached weight truncated at C);
--large-rollouts (L may also sample n completions of its own). Deviations, besides grpo.py's:
1. No reference model and no KL penalty (the reported recipe uses none).
2. The reported reward adds 0.25 per closing tag of a <think>/<answer> format; our prompts ask
   for \\boxed{} (or `####`), and --format-coef is that format's bonus (default 0).
3. The two tokenizers must be identical; L's logits are sliced to S's vocabulary rows.

CPU (toy world, minutes):  python codistill.py          (small toy-small, large toy-large)
GPU:                       python codistill.py --small Qwen2.5-0.5B --large Qwen2.5-1.5B
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
    small: str = arg("toy-small", "the small model, the only one that generates: hub id, bare name, directory or toy model")
    large: str = arg("toy-large", "the large model, same tokenizer as --small")
    dataset: str = arg("math", "training questions: gsm8k, math, toy, toy-hard or a .jsonl file", toy="toy")
    eval_dataset: str = arg(None, "held-out questions: as --dataset, or a benchmark (default: --dataset's eval split)")
    steps: int = arg(500, "training steps (one batch of rollouts each)", toy=200)
    prompts_per_step: int = arg(32, "questions sampled per step", toy=8)
    group_size: int = arg(8, "completions per question (G), sampled by the small model")
    max_new_tokens: int = arg(512, "completion length limit", toy=8)
    small_lr: float = arg(1e-6, "AdamW learning rate of the small model", toy=2e-5)
    large_lr: float = arg(1e-6, "AdamW learning rate of the large model", toy=2e-5)
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping norm (each model's own)")
    temperature: float = arg(1.0, "sampling temperature (log-probs of both models use the same)")
    format_coef: float = arg(0.0, "reward bonus for an answer in \\boxed{} or after ####")
    instruction: str = arg(None, "text on a new line after each question ('' for none; default: --dataset's own)")
    system_prompt: str = arg(None, "system message of the chat template (default: the template's own)")
    reward: str = arg("", "reward function FILE.py:NAME or module:NAME, called as TRL calls one (default: the grader)")
    seed: int = arg(1, "random seed")
    out: str = arg("", "output directory (default: runs/<script>-<time>)")
    report_to: str = arg("none", "also send the metrics to: none, tensorboard, wandb, or tensorboard,wandb")
    wandb_project: str = arg("", "W&B project of --report-to wandb (default: the script's name)")
    eval_every: int = arg(50, "evaluate both models every N steps (also at step 0 and after the last step)")
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
    loss_type: str = arg("grpo", "token aggregation of both losses", choices=("grpo", "bnpo", "dr_grpo", "dapo"))
    num_iterations: int = arg(1, "updates per batch of rollouts (mu), for each model")
    epsilon: float = arg(0.2, "lower clip range of each model's own ratio: ratio >= 1 - epsilon")
    epsilon_high: float = arg(0.2, "upper clip range: ratio <= 1 + epsilon_high (DAPO: 0.28)")
    kd_coef: float = arg(0.1, "alpha: the small model's reward is r - alpha * its per-token KL(small||large)", toy=0.5)
    is_cap: float = arg(2.0, "C: the large model's importance weights pi_L/pi_S,old truncated at C")
    allow_smaller_large: bool = arg(False, "train a --large model smaller than --small (refused without it: likely swapped)")
    large_rollouts: int = arg(2, "completions per question the large model samples too (0: none; docs/codistill.md)")

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


def kd_rewards(rewards, kl_small_large_k1, kd_coef: float):
    """The small model's reward r~_i = r_i - alpha * k1_i, k1_i = mean_t sg(l_S - l_L): an on-policy
    KD reward (reconstructed). The large model's advantages never see it."""
    return rewards - kd_coef * kl_small_large_k1  # (B,)


def large_advantages(rewards, own_rewards, group_size: int, scale: str):
    """The large model's advantages from the task reward only: over the G small-model completions
    of each question, and its own n (--large-rollouts) when it sampled any."""
    if own_rewards is None:
        return compute_advantages(rewards, group_size, scale), None
    N = len(rewards) // group_size
    both = torch.cat([rewards.view(N, -1), own_rewards.view(N, -1)], 1)  # (N, G + n)
    A = compute_advantages(both.reshape(-1), both.shape[1], scale).view(N, -1)  # (N, G + n)
    return A[:, :group_size].reshape(-1), A[:, group_size:].reshape(-1)  # (B,), (N n,)


def importance_weights(large_old_logp, small_old_logp, is_cap: float):
    """w_t = min(pi_L,old(o_t) / pi_S,old(o_t), C), detached: S sampled o_t, L learns from it.
    The log-ratio is capped before exp, so padding positions cannot overflow."""
    log_w = (large_old_logp - small_old_logp).detach()  # (b, T)
    return torch.exp(log_w.clamp(max=math.log(is_cap)))  # (b, T)


def compute_loss(logp, old_logp, advantages, mask, args, n_seqs: int, n_tokens, is_weight=None):
    """GRPO objective (arXiv 2402.03300, eq. 3) of either model, as a loss to minimise, per token:
        L_t = -w_t min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A),  rho_t = exp(l_t - l_old_t),
    w_t = 1 for the small model (on-policy) and for the large model's own samples; on the small
    model's samples the large model's w_t = min(pi_L,old / pi_S,old, C) (arXiv 2605.08873,
    reconstructed: see the docstring). Aggregated by --loss-type over the whole step."""
    ratio = torch.exp(logp - old_logp)  # (b, T)
    A = advantages[:, None]  # (b, 1)
    clipped_ratio = torch.clamp(ratio, 1 - args.epsilon, 1 + args.epsilon_high)  # (b, T)
    per_token = -torch.min(ratio * A, clipped_ratio * A)  # (b, T)
    if is_weight is not None:
        per_token = is_weight * per_token  # (b, T)
    if args.loss_type == "grpo":  # mean over each sequence, then over sequences
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    elif args.loss_type == "bnpo":  # token mean of this micro-batch, micro-batches averaged
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1) * (len(mask) / n_seqs)
    elif args.loss_type == "dr_grpo":  # constant normaliser: no length bias
        loss = (per_token * mask).sum() / (n_seqs * args.max_new_tokens)
    else:  # dapo: token mean over the whole step
        loss = (per_token * mask).sum() / n_tokens
    is_clipped = ((ratio < 1 - args.epsilon) & (A < 0)) | ((ratio > 1 + args.epsilon_high) & (A > 0))  # (b, T)
    return loss, dict(clipped=is_clipped.float())


def update(model, optimizer, pieces, args, vocab: int, step: int, run):
    """--num-iterations epochs of one model's GRPO update over micro-batches `pieces`, each
    (rollout, advantages (b,), old log-probs or None, behaviour log-probs or None). Old log-probs
    None: this epoch-0 forward's own, detached (pi_old = pi_theta before the step; no extra pass).
    Behaviour log-probs given: the tokens were sampled by the small model, so they are scored on
    the shared vocabulary rows and importance-weighted. Returns the epoch-0 log-probs (the model
    before its step) and the step's statistics. Under torchrun the loss is normalised by the
    step's counts over all ranks and the gradients are summed over ranks."""
    n_tokens = sum(p[0].mask.sum() for p in pieces)  # this rank's
    n_seqs_all = sum(len(p[1]) for p in pieces) * plumbing.world_size()
    n_tokens_all = plumbing.all_sum(n_tokens)
    model.train()
    first = [None] * len(pieces)
    sums = dict(loss=0.0, clipped=0.0, entropy=0.0, is_weight=0.0, is_capped=0.0, is_tokens=0.0)
    for epoch in range(args.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        for j, (mb, adv, old, behaviour) in enumerate(pieces):
            logp, entropy = common.token_logprobs(model, mb, args.temperature, args.logprob_chunk,
                                                  vocab if behaviour is not None else None, with_entropy=True)  # (b, T)
            if epoch == 0:
                first[j] = logp.detach()  # (b, T)
            old_logp = old if old is not None else first[j]  # (b, T)
            w = importance_weights(old_logp, behaviour, args.is_cap) if behaviour is not None else None  # (b, T)
            loss, s = compute_loss(logp, old_logp, adv, mb.mask, args, n_seqs_all, n_tokens_all, w)
            loss.backward()
            sums["loss"] += loss.detach()
            sums["clipped"] += (s["clipped"] * mb.mask).sum()
            sums["entropy"] += (entropy * mb.mask).sum()
            if w is not None:
                sums["is_weight"] += (w * mb.mask).sum()
                sums["is_capped"] += ((old_logp - behaviour >= math.log(args.is_cap)) * mb.mask).sum()
                sums["is_tokens"] += mb.mask.sum()
        grad_norm = plumbing.reduce_and_clip_grads(model, args.max_grad_norm)  # summed over ranks first
        run.check_finite(sums["loss"], step)
        optimizer.step()
    per_token = n_tokens * args.num_iterations
    stats = {"loss": plumbing.all_sum(sums["loss"]) / args.num_iterations, "clip_frac": sums["clipped"] / per_token,
             "entropy": sums["entropy"] / per_token, "grad_norm": grad_norm}
    if sums["is_tokens"]:
        stats["is_weight"] = sums["is_weight"] / sums["is_tokens"]
        stats["is_capped_frac"] = sums["is_capped"] / sums["is_tokens"]
    return first, stats


def main():
    args = common.parse_args(Args)
    plumbing.check_args(args, num_iterations=1)
    if args.kd_coef < 0 or args.is_cap <= 0 or args.large_rollouts < 0:
        plumbing.die(f"--kd-coef must be non-negative, --is-cap positive and --large-rollouts non-negative "
                     f"(got {args.kd_coef}, {args.is_cap}, {args.large_rollouts})")
    common.check_available([args.small, args.large], args.dataset, args.eval_dataset)  # offline: names all that is missing
    sampler = tasks.PromptSampler(tasks.load_data(args.dataset, "train"), args.seed)
    eval_rows = tasks.load_data(args.eval_dataset, "eval")[:args.eval_size]
    reward = tasks.load_reward(args.reward, sampler.rows, eval_rows)  # --reward's function, tried on a row (None: the grader)
    device = plumbing.init_distributed(args.device, args.threads)  # one process, or one rank of torchrun
    run = rundir.Run(args, __file__)  # DIR (--out): config.json, metrics.jsonl, checkpoints; what Ctrl-C says
    G, n = args.group_size, args.large_rollouts

    small, tok = common.load_model(run.checkpoint_dir("small") if args.resume else args.small, device,
                                   args.gradient_checkpointing, fsdp=args.fsdp, lora=common.lora_config(args),
                                   generation=args.generation)
    large, large_tok = common.load_model(run.checkpoint_dir("large") if args.resume else args.large, device,
                                         args.gradient_checkpointing, fsdp=args.fsdp, lora=common.lora_config(args),
                                         generation=args.generation)
    vocab = common.shared_vocab(small, tok, large, large_tok, args.small, args.large)  # the rows S samples from
    common.warn_if_smaller(large, small, args.large, args.small, "--large model",
                           refuse="" if args.allow_smaller_large else "--allow-smaller-large")
    plumbing.seed_everything(args.seed + plumbing.rank())  # after loading; ranks sample different completions
    trained = {name: [p for p in m.parameters() if p.requires_grad]  # LoRA: the adapters
               for name, m in (("small", small), ("large", large))}
    optimizers = dict(small=torch.optim.AdamW(trained["small"], lr=args.small_lr, weight_decay=args.weight_decay, fused=True),
                      large=torch.optim.AdamW(trained["large"], lr=args.large_lr, weight_decay=args.weight_decay, fused=True))
    start = run.resume(dict(small=small, large=large), optimizers, sampler) if args.resume else 0

    def evaluate(step):
        evals = {name: common.evaluate(m, tok, eval_rows, args.max_new_tokens, args.pass_n, args.pass_k, ece_bins=10,
                                       samples=args.log_samples, instruction=args.instruction,
                                       system_prompt=args.system_prompt, reward=reward)
                 for name, m in (("small", small), ("large", large))}
        run.log(step, {f"{name}/{k}": v for name, (metrics, _) in evals.items() for k, v in metrics.items()})
        run.log_samples(step, "eval", [dict(model=name, **s) for name, (_, samples) in evals.items() for s in samples])
        return {name: metrics["eval/accuracy"] for name, (metrics, _) in evals.items()}

    acc0, acc = [evaluate(0)] * 2 if start == 0 else [{k: seen(f"{k}/eval/accuracy") for k in ("small", "large")}
                                                      for seen in (run.first, run.last)]  # resumed: step 0's, the latest
    bar = tqdm(range(start + 1, args.steps + 1), initial=start, total=args.steps, dynamic_ncols=True,
               disable=plumbing.rank() != 0)
    for step in bar:
        t_step = time.perf_counter()
        # 1. sample: only the small model generates (the large one too with --large-rollouts n)
        with plumbing.Timer() as t_gen:
            rows = plumbing.shard(sampler.next(args.prompts_per_step))  # this rank's questions
            prompts = [tasks.format_prompt(tok, r, instruction=args.instruction, system_prompt=args.system_prompt)
                       for r in rows]
            rollout = common.sample(small, tok, prompts, G, args.max_new_tokens, args.temperature)
            own = common.sample(large, tok, prompts, n, args.max_new_tokens, args.temperature) if n else None
        # 2. score
        scores = tasks.rewards_for(rollout.texts, rows, args.format_coef, reward, prompts)  # each row G times
        rewards = scores.reward.to(device)  # (B,)
        own_scores = tasks.rewards_for(own.texts, rows, args.format_coef, reward, prompts) if n else None
        own_rewards = own_scores.reward.to(device) if n else None  # (N n,)
        # 3. ALGO LOGIC (large): advantages from the task reward only
        adv_large, adv_own = large_advantages(rewards, own_rewards, G, args.scale_rewards)  # (B,), (N n,)

        # 4. update: the large model first; its log-probs before its step score the small model's tokens
        batches = common.micro_batches(len(rewards), args.micro_batch_size)
        mbs = [rollout.select(i) for i in batches]
        with plumbing.Timer() as t_large:
            with torch.no_grad():  # pi_S,old: the behaviour policy of every sampled token
                small_old = [common.token_logprobs(small, mb, args.temperature, args.logprob_chunk) for mb in mbs]
            pieces = [(mb, adv_large[i], None, small_old[j]) for j, (i, mb) in enumerate(zip(batches, mbs))]
            if n:
                pieces += [(own.select(i), adv_own[i], None, None)
                           for i in common.micro_batches(len(own_rewards), args.micro_batch_size)]
            large_logp, large_stats = update(large, optimizers["large"], pieces, args, vocab, step, run)
        with plumbing.Timer() as t_small:
            # ALGO LOGIC (small): the on-policy KD reward, then GRPO on its own samples
            kl_small_large_k1 = torch.cat([common.masked_mean(small_old[j] - large_logp[j], mb.mask, 1)
                                           for j, mb in enumerate(mbs)])  # (B,) KL(pi_S||pi_L) per token
            small_rewards = kd_rewards(rewards, kl_small_large_k1, args.kd_coef)  # (B,)
            adv_small = compute_advantages(small_rewards, G, args.scale_rewards)  # (B,)
            pieces = [(mb, adv_small[i], small_old[j], None) for j, (i, mb) in enumerate(zip(batches, mbs))]
            _, small_stats = update(small, optimizers["small"], pieces, args, vocab, step, run)

        # 5. log, evaluate, save
        zero_std = (rewards.view(-1, G).std(1) == 0).float().mean()
        metrics = {
            "train/reward": rewards.mean(), "train/reward_std": plumbing.std_over_ranks(rewards),
            "train/zero_std_frac": zero_std,
            "train/grade_errors": scores.grade_errors + (own_scores.grade_errors if n else 0),
            "train/completion_len": rollout.lengths.float().mean(),
            "train/tokens": plumbing.all_sum(2 * rollout.mask.sum() + (own.mask.sum() if n else 0)),  # S's (both), L's own
            "small/kd_kl": kl_small_large_k1.mean(), "small/kd_reward": small_rewards.mean(),
            **{f"small/{k}": v for k, v in small_stats.items()}, **{f"large/{k}": v for k, v in large_stats.items()},
            "time/generate": t_gen.seconds, "time/update": t_large.seconds + t_small.seconds,
            "time/update_large": t_large.seconds, "time/update_small": t_small.seconds,
        }
        if n:
            metrics["large/reward"] = own_rewards.mean()
        metrics["time/step"] = time.perf_counter() - t_step
        metrics = plumbing.mean_over_ranks(metrics)
        run.log(step, metrics)
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(step)
            run.log_samples(step, "train", tasks.sample_rows(  # the step's first group
                rows[0], rollout.texts[:G], scores.correct[:G], reward=rewards[:G], advantage=adv_small[:G],
                kd_kl=kl_small_large_k1[:G], kd_reward=small_rewards[:G], large_advantage=adv_large[:G]))  # CoDistill
        if run.checkpoint_due(step, args):  # every --save-every steps or --save-minutes, and the last; 0: none
            run.save_checkpoint(step, dict(small=(small, tok), large=(large, large_tok)), optimizers, sampler)
        bar.set_postfix(reward=f"{metrics['train/reward']:.3f}", small=f"{acc['small']:.3f}", large=f"{acc['large']:.3f}")

    run.save_final(dict(small=(small, tok), large=(large, large_tok)))
    run.close()
    if plumbing.rank() == 0:
        print(f"small eval/accuracy: {acc0['small']:.3f} -> {acc['small']:.3f}; "
              f"large eval/accuracy: {acc0['large']:.3f} -> {acc['large']:.3f}  ({run.out})")


if __name__ == "__main__":
    rundir.exit_on_interrupt()  # Ctrl-C: one line with the last checkpoint and how to resume
    main()
