"""GSPO: Group Sequence Policy Optimization (Qwen, arXiv 2507.18071), a fork of grpo.py (docs/forking.md).

GRPO's advantages, with the ratio and the clipping of the sequence instead of each token: the
ratio of a completion is its length-normalised likelihood ratio exp(mean_t(log pi_theta - log pi_old)),
clipped per sequence to [1 - 3e-4, 1 + 4e-4] (the paper's ranges: a sequence ratio moves far less
than a token's), with no KL penalty. With --num-iterations 1 the ratio is 1 in value and the gradient
is GRPO's (--beta 0, --loss-type grpo); the clipping acts from the second update of a batch on.

CPU (toy world, minutes):  python -m examples.gspo --num-iterations 2
"""

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
    group_size: int = arg(8, "completions per question (G)")
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
    num_iterations: int = arg(1, "updates per batch of rollouts (mu); >1 computes old log-probs once")
    epsilon: float = arg(3e-4, "lower clip range of the sequence ratio: s >= 1 - epsilon")
    epsilon_high: float = arg(4e-4, "upper clip range of the sequence ratio: s <= 1 + epsilon_high")


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


def compute_loss(logp, old_logp, advantages, mask, args, n_seqs: int):
    """GSPO objective (arXiv 2507.18071, eq. 5-7), as a loss to minimise, per sequence:
        L_i = -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i),
        s_i = exp(mean_t (l_t - l_old_t)),
    summed over the micro-batch and divided by the step's `n_seqs` (all micro-batches)."""
    ratio = torch.exp(common.masked_mean(logp - old_logp, mask, 1))  # (b,) the geometric mean of the token ratios
    clipped_ratio = torch.clamp(ratio, 1 - args.epsilon, 1 + args.epsilon_high)  # (b,)
    loss = -torch.min(ratio * advantages, clipped_ratio * advantages).sum() / n_seqs
    is_clipped = ((ratio < 1 - args.epsilon) & (advantages < 0)) | ((ratio > 1 + args.epsilon_high) & (advantages > 0))
    return loss, dict(clipped=is_clipped.float()[:, None].expand_as(mask))  # (b, T): each token of a clipped sequence


def main():
    args = common.parse_args(Args)
    plumbing.check_args(args, num_iterations=1)
    common.check_available([args.model], args.dataset, args.eval_dataset)  # offline: names all that is missing
    sampler = tasks.PromptSampler(tasks.load_data(args.dataset, "train"), args.seed)
    eval_rows = tasks.load_data(args.eval_dataset, "eval")[:args.eval_size]
    reward = tasks.load_reward(args.reward, sampler.rows, eval_rows)  # --reward's function, tried on a row (None: the grader)
    device = plumbing.init_distributed(args.device, args.threads)  # one process, or one rank of torchrun
    run = rundir.Run(args, __file__)  # DIR (--out): config.json, metrics.jsonl, checkpoints; what Ctrl-C says
    G = args.group_size

    start_from = run.checkpoint_dir("policy") if args.resume else args.model
    model, tok = common.load_model(start_from, device, args.gradient_checkpointing, fsdp=args.fsdp,
                                   lora=common.lora_config(args), generation=args.generation)  # LoRA: fp32 adapters
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
            rows = plumbing.shard(sampler.next(args.prompts_per_step))  # this rank's questions
            prompts = [tasks.format_prompt(tok, r, instruction=args.instruction, system_prompt=args.system_prompt)
                       for r in rows]
            rollout = common.sample(model, tok, prompts, G, args.max_new_tokens, args.temperature)
        # 2. score
        scores = tasks.rewards_for(rollout.texts, rows, args.format_coef, reward, prompts)  # each row G times
        rewards = scores.reward.to(device)  # (B,)
        # 3. ALGO LOGIC
        advantages = compute_advantages(rewards, G, args.scale_rewards)  # (B,)

        # 4. update
        with plumbing.Timer() as t_upd:
            batches = common.micro_batches(len(advantages), args.micro_batch_size)
            n_tokens = rollout.mask.sum()
            n_seqs_all, n_tokens_all = len(advantages) * plumbing.world_size(), plumbing.all_sum(n_tokens)  # the step's
            with torch.no_grad():
                old = ([common.token_logprobs(model, rollout.select(i), args.temperature, args.logprob_chunk)
                        for i in batches] if args.num_iterations > 1 else None)
            model.train()
            sums = dict(loss=0.0, clipped=0.0, entropy=0.0)
            for _ in range(args.num_iterations):
                optimizer.zero_grad(set_to_none=True)
                for j, idx in enumerate(batches):
                    mb = rollout.select(idx)
                    logp, entropy = common.token_logprobs(model, mb, args.temperature, args.logprob_chunk,
                                                          with_entropy=True)  # (b, T)
                    old_logp = old[j] if old is not None else logp.detach()  # (b, T)
                    loss, s = compute_loss(logp, old_logp, advantages[idx], mb.mask, args, n_seqs_all)
                    loss.backward()
                    sums["loss"] += loss.detach()
                    sums["clipped"] += (s["clipped"] * mb.mask).sum()
                    sums["entropy"] += (entropy * mb.mask).sum()
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
            "train/zero_std_frac": zero_std, "train/completion_len": rollout.lengths.float().mean(),
            "train/truncated_frac": rollout.truncated.float().mean(),
            "train/entropy": sums["entropy"] / per_token, "train/grad_norm": grad_norm, "train/tokens": n_tokens_all,
            "time/generate": t_gen.seconds, "time/update": t_upd.seconds,
        }
        metrics["time/step"] = time.perf_counter() - t_step
        metrics = plumbing.mean_over_ranks(metrics)
        run.log(step, metrics)
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(step)
            run.log_samples(step, "train", tasks.sample_rows(  # the step's first group
                rows[0], rollout.texts[:G], scores.correct[:G], reward=rewards[:G], advantage=advantages[:G]))
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
