"""OPD+: on-policy distillation with the exact f-divergence gradient (arXiv 2606.01039).

The student p_theta samples G completions per question and the frozen teacher q scores the same
tokens. With u_t = q(y_t|.) / p_theta(y_t|.), the student minimises a Monte-Carlo estimate of
D_f(q||p_theta) = E_{y~p_theta}[f(u)] with the surrogate -sg(A_t) * l_theta_t. Plain OPD (Thinking
Machines' on-policy distillation) uses A_t = -f(u_t), whose expected gradient misses a term; OPD+
uses A_t = -f(u_t) + u_t f'(u_t), the exact one (--estimator; --divergence picks f).

RECONSTRUCTED: no official code; the method is rebuilt from secondary sources and checked
numerically (tests/test_opd_plus.py: on a categorical policy the expected OPD+ gradient is exactly
grad D_f, plain OPD's is not). The derivation and the table of advantages: docs/opd_plus.md.

Deviations from the paper:
1. Per-token advantages, no return-to-go: each position's divergence given its prefix is exact.
2. log u is clipped to +-6 (--log-ratio-clip) before f: biased where it binds, but bounded.
3. One update per batch, no PPO ratio or clipping; sampled at T = 1 (the teacher scored at T = 1).
4. --loss-type dapo by default (every token weighs the same, as in the per-token objective).
5. --reward-coef c > 0 adds c (r_i - mean_group r) to every token's advantage (not z-scored).

CPU (toy world, minutes):  python opd_plus.py --divergence fkl
GPU:                       python opd_plus.py --model Qwen2.5-0.5B-Instruct --teacher Qwen2.5-1.5B-Instruct --dataset gsm8k
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
    teacher: str = arg("toy-large", "frozen teacher that scores the student's tokens, same tokenizer as --model")
    divergence: str = arg("rkl", "f of D_f(teacher||student): reverse KL, forward KL, JSD, total variation, alpha",
                          choices=common.DIVERGENCES)
    alpha: float = arg(0.5, "alpha of --divergence alpha (not 0 or 1)")
    estimator: str = arg("opd+", "per-token advantage: opd = -f(u) (biased), opd+ = -f(u) + u f'(u) (exact)",
                         choices=("opd", "opd+"))
    log_ratio_clip: float = arg(6.0, "clip log u = l_teacher - l_student to +-this before f")
    reward_coef: float = arg(0.0, "weight of the group-centred reward added to every token's advantage")
    loss_type: str = arg("dapo", "token aggregation of the loss", choices=("grpo", "bnpo", "dr_grpo", "dapo"))


# ALGO LOGIC


def reward_advantages(rewards, group_size: int):
    """r_i - mean_group r: GRPO's centring without the std division (no z-scoring)."""
    r = rewards.view(-1, group_size)  # (N, G)
    centred = r - r.mean(1, keepdim=True)  # (N, G)
    return centred.reshape(-1)  # (B,)


def token_advantages(log_u, divergence: str, estimator: str, alpha: float = 0.5):
    """Per-token advantage for D_f(q||p_theta), u = q(y)/p_theta(y) = exp(log_u) (arXiv 2606.01039):
        opd:  A = -f(u)                  E[-A grad l] = grad D_f + E_p[u f'(u) grad l]  (biased)
        opd+: A = w_f(u) = -f(u) + u f'(u)   E[-A grad l] = grad D_f                   (exact)
    since grad sum_v p f(q/p) = sum_v p (f(u) - u f'(u)) grad log p."""
    f, f_prime = common.f_divergence(divergence, alpha)
    u = torch.exp(log_u)  # (B, T)
    if estimator == "opd":
        return -f(u)  # (B, T)
    return -f(u) + u * f_prime(u)  # (B, T)


def compute_loss(logp, teacher_logp, seq_advantages, mask, args, n_seqs: int, n_tokens):
    """OPD+ objective (arXiv 2606.01039), as a loss to minimise, per token:
        L_t = -sg(A_t) * l_theta_t,  A_t = w_f(u_t) (opd+) or -f(u_t) (opd) + c (r_i - mean_g r),
        u_t = exp(clip(l_teacher_t - l_theta_t, -C, C)),
    aggregated by --loss-type. `n_seqs` and `n_tokens` are the whole step's (all micro-batches),
    so that the summed micro-batch losses equal the full-batch loss."""
    log_u_teacher_student = teacher_logp - logp.detach()  # (b, T) log q - log p_theta
    log_u = log_u_teacher_student.clamp(-args.log_ratio_clip, args.log_ratio_clip)  # (b, T)
    A = token_advantages(log_u, args.divergence, args.estimator, args.alpha)  # (b, T)
    A = A + args.reward_coef * seq_advantages[:, None]  # (b, T)
    per_token = -A * logp  # (b, T) A holds no grad: sg(A)
    if args.loss_type == "grpo":  # mean over each sequence, then over sequences
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    elif args.loss_type == "bnpo":  # token mean of this micro-batch, micro-batches averaged
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1) * (len(mask) / n_seqs)
    elif args.loss_type == "dr_grpo":  # constant normaliser: no length bias
        loss = (per_token * mask).sum() / (n_seqs * args.max_new_tokens)
    else:  # dapo: token mean over the whole step
        loss = (per_token * mask).sum() / n_tokens
    f, _ = common.f_divergence(args.divergence, args.alpha)
    divergence_f = f(torch.exp(log_u))  # (b, T) one-sample estimate of D_f(q||p_theta)
    kl_student_teacher_k3 = common.kl_k3(log_u_teacher_student)  # (b, T) estimates KL(p_theta||q)
    is_clipped = log_u_teacher_student.abs() > args.log_ratio_clip  # (b, T)
    return loss, dict(advantage=A, divergence=divergence_f, kl=kl_student_teacher_k3, clipped=is_clipped.float())


def main():
    args = common.parse_args(Args)
    plumbing.check_args(args)
    if args.log_ratio_clip <= 0:
        plumbing.die(f"--log-ratio-clip must be positive (got {args.log_ratio_clip})")
    common.f_divergence(args.divergence, args.alpha)  # refuses --alpha 0 or 1 before any loading
    common.check_available([args.model, args.teacher], args.dataset, args.eval_dataset)  # offline: names all that is missing
    sampler = tasks.PromptSampler(tasks.load_data(args.dataset, "train"), args.seed)
    eval_rows = tasks.load_data(args.eval_dataset, "eval")[:args.eval_size]
    reward = tasks.load_reward(args.reward, sampler.rows, eval_rows)  # --reward's function, tried on a row (None: the grader)
    device = plumbing.init_distributed(args.device, args.threads)  # one process, or one rank of torchrun
    run = rundir.Run(args, __file__)  # DIR (--out): config.json, metrics.jsonl, checkpoints; what Ctrl-C says
    G = args.group_size

    start_from = run.checkpoint_dir("policy") if args.resume else args.model
    model, tok = common.load_model(start_from, device, args.gradient_checkpointing, fsdp=args.fsdp,
                                   lora=common.lora_config(args), generation=args.generation)  # LoRA: fp32 adapters
    teacher, teacher_tok = common.load_model(args.teacher, device, frozen=True, fsdp=args.fsdp)
    vocab = common.shared_vocab(model, tok, teacher, teacher_tok, args.model, args.teacher)  # the student's rows
    common.warn_if_smaller(teacher, model, args.teacher, args.model)
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
        advantages = reward_advantages(rewards, G)  # (B,)

        # 4. update
        with plumbing.Timer() as t_upd:
            batches = common.micro_batches(len(advantages), args.micro_batch_size)
            n_tokens = rollout.mask.sum()
            n_seqs_all, n_tokens_all = len(advantages) * plumbing.world_size(), plumbing.all_sum(n_tokens)  # the step's
            with torch.no_grad():  # OPD+: the teacher scores the student's tokens (q at T = 1)
                teacher_logps = [common.token_logprobs(teacher, rollout.select(i), 1.0, args.logprob_chunk, vocab)
                                 for i in batches]
            model.train()
            sums = dict(loss=0.0, kl=0.0, clipped=0.0, entropy=0.0, divergence=0.0, adv=0.0, adv_sq=0.0)
            seq_adv, seq_log_u = torch.zeros(2, len(advantages), device=device)  # OPD+: each completion's, for samples
            optimizer.zero_grad(set_to_none=True)
            for j, idx in enumerate(batches):
                mb = rollout.select(idx)
                logp, entropy = common.token_logprobs(model, mb, args.temperature, args.logprob_chunk,
                                                      with_entropy=True)  # (b, T)
                loss, s = compute_loss(logp, teacher_logps[j], advantages[idx], mb.mask, args, n_seqs_all, n_tokens_all)
                loss.backward()
                sums["loss"] += loss.detach()
                sums["clipped"] += (s["clipped"] * mb.mask).sum()
                sums["entropy"] += (entropy * mb.mask).sum()
                sums["kl"] += (s["kl"] * mb.mask).sum()
                sums["divergence"] += (s["divergence"] * mb.mask).sum()
                sums["adv"] += (s["advantage"] * mb.mask).sum()
                sums["adv_sq"] += (s["advantage"] ** 2 * mb.mask).sum()
                seq_adv[idx] = common.masked_mean(s["advantage"], mb.mask, 1)  # OPD+: token means of A_t, log q - log p
                seq_log_u[idx] = common.masked_mean(teacher_logps[j] - logp.detach(), mb.mask, 1)
            grad_norm = plumbing.reduce_and_clip_grads(model, args.max_grad_norm)  # summed over ranks first
            run.check_finite(sums["loss"], step)
            optimizer.step()

        # 5. log, evaluate, save
        per_token = n_tokens
        zero_std = (rewards.view(-1, G).std(1) == 0).float().mean()
        adv_mean = sums["adv"] / per_token
        metrics = {
            "train/reward": rewards.mean(), "train/reward_std": plumbing.std_over_ranks(rewards),
            "train/grade_errors": scores.grade_errors,
            "train/loss": plumbing.all_sum(sums["loss"]), "train/kl": sums["kl"] / per_token,
            "train/zero_std_frac": zero_std, "train/completion_len": rollout.lengths.float().mean(),
            "train/truncated_frac": rollout.truncated.float().mean(),
            "train/entropy": sums["entropy"] / per_token, "train/grad_norm": grad_norm, "train/tokens": n_tokens_all,
            "opd/divergence": sums["divergence"] / per_token, "opd/adv_mean": adv_mean,
            "opd/adv_std": (sums["adv_sq"] / per_token - adv_mean ** 2).clamp(min=0).sqrt(),
            "opd/log_u_clip_frac": sums["clipped"] / per_token,
            "time/generate": t_gen.seconds, "time/update": t_upd.seconds,
        }
        metrics["time/step"] = time.perf_counter() - t_step
        metrics = plumbing.mean_over_ranks(metrics)
        run.log(step, metrics)
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(step)
            run.log_samples(step, "train", tasks.sample_rows(  # the step's first group
                rows[0], rollout.texts[:G], scores.correct[:G], reward=rewards[:G], advantage=seq_adv[:G],
                log_ratio=seq_log_u[:G]))  # OPD+: the teacher's log-ratio, unclipped
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
