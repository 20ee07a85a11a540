"""KDRL: Post-Training Reasoning LLMs via Unified Knowledge Distillation and Reinforcement
Learning (arXiv 2506.02208).

grpo.py plus a frozen teacher. On the same on-policy rollouts of the student pi_theta, the GRPO
loss gets a second per-token term, beta_t times an estimate of the reverse KL(pi_theta || pi_T)
to the teacher: one update both follows the reward and pulls the student towards the teacher
where the student actually goes (on-policy KD).

RECONSTRUCTED: there is no official code and the method text could not be read; the objective is
rebuilt from the abstract and the reported settings. Ours (docs/kdrl.md): the estimators
(--kd-estimator: k2, whose expected gradient is the reverse-KL one, by default), the annealing
schedule (--kd-anneal) and the reward-guided masking rules (--kd-mask).

Deviations (besides grpo.py's, which apply here too):
1. The KD term joins the GRPO term in one per-token loss before aggregation (--loss-type).
2. With --num-iterations > 1 the KD term is weighted by the detached ratio pi_theta/pi_old.
3. grpo.py's k3 penalty to the initial policy (--beta) is kept; whether the paper kept one is unknown.
4. Toy defaults of --kd-coef, --kd-coef-min, --kd-anneal-rate (1.0, 0.2, 0.01) are far larger than
   the reported ones, so that the KD gradient is as large as the GRPO one on the toy.

CPU (toy world, minutes):  python kdrl.py            (student toy-small, teacher toy-large)
GPU:                       python kdrl.py --model Qwen2.5-0.5B-Instruct --teacher Qwen2.5-1.5B-Instruct
Annealed (as reported):    add --kd-anneal --kd-coef 5e-3 (--kd-coef-min 1e-3 --kd-anneal-rate 5e-5)
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
    loss_type: str = arg("grpo", "token aggregation of the loss", choices=("grpo", "bnpo", "dr_grpo", "dapo"))
    num_iterations: int = arg(1, "updates per batch of rollouts (mu); >1 computes old log-probs once")
    beta: float = arg(0.04, "coefficient of the k3 penalty to the initial policy (0: no reference model)")
    epsilon: float = arg(0.2, "lower clip range: ratio >= 1 - epsilon")
    epsilon_high: float = arg(0.2, "upper clip range: ratio <= 1 + epsilon_high (DAPO: 0.28)")
    teacher: str = arg("toy-large", "frozen teacher, same tokenizer as --model")
    kd_estimator: str = arg("k2", "estimator of KL(student||teacher) per sampled token (k2's gradient: the reverse KL's)",
                            choices=("k1", "k2", "k3"))
    kd_coef: float = arg(2e-3, "coefficient beta of the KD term (beta_0 with --kd-anneal)", toy=1.0)
    kd_anneal: bool = arg(False, "anneal: beta_t = max(kd_coef - kd_anneal_rate * t, kd_coef_min)")
    kd_coef_min: float = arg(1e-3, "floor of the annealed KD coefficient", toy=0.2)
    kd_anneal_rate: float = arg(5e-5, "decrease of the KD coefficient per step when annealing", toy=0.01)
    kd_mask: str = arg("none", "reward-guided KD: none, response (skip right completions), group (prompts with none right)",
                       choices=("none", "response", "group"))


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


def kd_coefficient(t: int, args) -> float:
    """beta_t: --kd-coef, or with --kd-anneal max(beta_0 - delta * t, beta_min), t = training steps
    (batches of rollouts) taken, not optimizer steps."""
    if not args.kd_anneal:
        return args.kd_coef
    return max(args.kd_coef - args.kd_anneal_rate * t, args.kd_coef_min)


def kd_rows(correct, group_size: int, mode: str):
    """(B,) 1 for the completions that get the KD term (reward-guided KD), from `correct` (B,) bool:
    the grader's verdict (tasks.Scores.correct), so that a format bonus never counts as correct."""
    if mode == "response":  # the teacher is not needed where the answer is already right
        keep = ~correct  # (B,)
    elif mode == "group":  # only where RL has no signal: no correct completion in the group
        keep = ~correct.view(-1, group_size).any(1, keepdim=True).expand(-1, group_size).reshape(-1)  # (B,)
    else:
        keep = torch.ones_like(correct)  # (B,)
    return keep.float()


@torch.no_grad()
def teacher_logprobs(teacher, rollout, idx, kd_row, args, vocab_size=None):
    """(b, T) teacher log-probs l_T of micro-batch `idx`, as the policy pass will see it. Only its
    rows with kd_row = 1 go through the teacher; the others stay 0 (they are masked from KD)."""
    mb = rollout.select(idx)
    out = torch.zeros_like(mb.mask)  # (b, T)
    keep = (kd_row[idx] > 0).cpu()  # (b,)
    if plumbing.is_sharded(teacher) and not keep.any():  # FSDP: a forward is collective, every rank joins it
        keep[0] = True  # (its log-probs are masked from KD all the same)
    if keep.any():
        lp = common.token_logprobs(teacher, rollout.select(idx[keep]), args.temperature, args.logprob_chunk,
                                   vocab_size)  # (k, T_k), T_k <= T
        out[keep.to(out.device), :lp.shape[1]] = lp
    return out


def kd_term(logp, teacher_logp, kd_mask, estimator: str):
    """Per-token estimate of the reverse KL(pi_theta||pi_T) on the sampled tokens, with
    R = sg(l_T) - l_theta (Schulman 2020; common.KL_ESTIMATORS): k1 = -R, k2 = R^2 / 2,
    k3 = e^R - R - 1. As losses on tokens sampled from pi_theta their expected gradients are 0,
    grad KL(pi_theta||pi_T) and grad KL(pi_T||pi_theta). 0 where kd_mask is 0. Returns the
    estimate and R."""
    log_ratio = torch.where(kd_mask > 0, teacher_logp.detach() - logp, 0.0)  # (b, T) R; 0 keeps e^R finite off KD
    return common.KL_ESTIMATORS[estimator](log_ratio), log_ratio  # (b, T), (b, T)


def compute_loss(logp, old_logp, ref_logp, advantages, mask, args, n_seqs: int, n_tokens,
                 teacher_logp, kd_mask, kd_coef: float):
    """KDRL objective (arXiv 2506.02208; reconstructed): J = J_GRPO - beta_t KL(pi_theta||pi_T),
    as a loss to minimise, per token:
        L_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta * k3_t + beta_t * sg(rho_t) kd_t M^KD_t,
        rho_t = exp(l_t - l_old_t),  k3_t = exp(l_ref_t - l_t) - (l_ref_t - l_t) - 1,
        kd_t = k(sg(l_T_t) - l_t) with k = --kd-estimator (see kd_term), M^KD = kd_mask,
    aggregated by --loss-type (both terms alike). sg(rho_t) reweights pi_old's tokens to pi_theta
    (1 in value with --num-iterations 1). `n_seqs` and `n_tokens` are the whole step's
    (all micro-batches), so that the summed micro-batch losses equal the full-batch loss."""
    ratio = torch.exp(logp - old_logp)  # (b, T)
    A = advantages[:, None]  # (b, 1)
    clipped_ratio = torch.clamp(ratio, 1 - args.epsilon, 1 + args.epsilon_high)  # (b, T)
    per_token = -torch.min(ratio * A, clipped_ratio * A)  # (b, T)
    kl_policy_ref_k3 = None
    if ref_logp is not None:
        kl_policy_ref_k3 = common.kl_k3(ref_logp - logp)  # (b, T) estimates KL(pi_theta||pi_ref)
        per_token = per_token + args.beta * kl_policy_ref_k3  # (b, T)
    # (b, T) each: KL(pi_theta||pi_T) (0 off KD), log pi_T - log pi_theta
    kl_student_teacher, log_ratio_teacher_student = kd_term(logp, teacher_logp, kd_mask, args.kd_estimator)
    per_token = per_token + kd_coef * ratio.detach() * kl_student_teacher  # (b, T) sg(rho): samples of pi_old
    if args.loss_type == "grpo":  # mean over each sequence, then over sequences
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    elif args.loss_type == "bnpo":  # token mean of this micro-batch, micro-batches averaged
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1) * (len(mask) / n_seqs)
    elif args.loss_type == "dr_grpo":  # constant normaliser: no length bias
        loss = (per_token * mask).sum() / (n_seqs * args.max_new_tokens)
    else:  # dapo: token mean over the whole step
        loss = (per_token * mask).sum() / n_tokens
    is_clipped = ((ratio < 1 - args.epsilon) & (A < 0)) | ((ratio > 1 + args.epsilon_high) & (A > 0))  # (b, T)
    return loss, dict(kl=kl_policy_ref_k3, clipped=is_clipped.float(), kd=kl_student_teacher,
                      kd_kl=common.kl_k3(log_ratio_teacher_student.detach()))  # k3: the unbiased KL value


def main():
    args = common.parse_args(Args)
    plumbing.check_args(args, num_iterations=1)
    if min(args.kd_coef, args.kd_coef_min, args.kd_anneal_rate) < 0:
        plumbing.die("--kd-coef, --kd-coef-min and --kd-anneal-rate must be non-negative")
    if args.kd_anneal and args.kd_coef_min > args.kd_coef:
        plumbing.die(f"--kd-coef-min ({args.kd_coef_min}) must not exceed --kd-coef ({args.kd_coef}) when annealing")
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
    ref = common.reference(model, args.model, device, args) if args.beta > 0 else None  # LoRA: the adapters off
    teacher, teacher_tok = common.load_model(args.teacher, device, frozen=True, fsdp=args.fsdp)  # KDRL
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
        advantages = compute_advantages(rewards, G, args.scale_rewards)  # (B,)
        kd_row = kd_rows(scores.correct.to(device), G, args.kd_mask)  # (B,) KDRL
        kd_coef = kd_coefficient(step - 1, args)

        # 4. update
        with plumbing.Timer() as t_upd:
            batches = common.micro_batches(len(advantages), args.micro_batch_size)
            n_tokens = rollout.mask.sum()
            n_seqs_all, n_tokens_all = len(advantages) * plumbing.world_size(), plumbing.all_sum(n_tokens)  # the step's
            n_kd_tokens = (rollout.mask * kd_row[:, None]).sum()  # KDRL
            with torch.no_grad():
                old = ([common.token_logprobs(model, rollout.select(i), args.temperature, args.logprob_chunk)
                        for i in batches] if args.num_iterations > 1 else None)
                refs = ([common.token_logprobs(ref, rollout.select(i), args.temperature, args.logprob_chunk)
                         for i in batches] if ref is not None else None)
            teachers = [teacher_logprobs(teacher, rollout, i, kd_row, args, vocab) for i in batches]  # KDRL
            model.train()
            sums = dict(loss=0.0, kl=0.0, clipped=0.0, entropy=0.0, kd=0.0, kd_kl=0.0)
            kd_seq = torch.zeros(len(advantages), device=device)  # KDRL: each completion's KD term per token, for samples
            for _ in range(args.num_iterations):
                optimizer.zero_grad(set_to_none=True)
                for j, idx in enumerate(batches):
                    mb = rollout.select(idx)
                    logp, entropy = common.token_logprobs(model, mb, args.temperature, args.logprob_chunk,
                                                          with_entropy=True)  # (b, T)
                    old_logp = old[j] if old is not None else logp.detach()  # (b, T)
                    kd_mask = mb.mask * kd_row[idx][:, None]  # (b, T) KDRL
                    loss, s = compute_loss(logp, old_logp, refs[j] if refs else None, advantages[idx],
                                           mb.mask, args, n_seqs_all, n_tokens_all, teachers[j], kd_mask, kd_coef)
                    loss.backward()
                    sums["loss"] += loss.detach()
                    sums["clipped"] += (s["clipped"] * mb.mask).sum()
                    sums["entropy"] += (entropy * mb.mask).sum()
                    sums["kd"] += (s["kd"].detach() * kd_mask).sum()
                    kd_seq[idx] = common.masked_mean(s["kd"].detach(), kd_mask, 1)  # KDRL
                    sums["kd_kl"] += (s["kd_kl"] * kd_mask).sum()
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
            "train/zero_std_frac": zero_std, "train/completion_len": rollout.lengths.float().mean(),
            "train/truncated_frac": rollout.truncated.float().mean(),
            "train/entropy": sums["entropy"] / per_token, "train/grad_norm": grad_norm, "train/tokens": n_tokens_all,
            "time/generate": t_gen.seconds, "time/update": t_upd.seconds,
        }
        if ref is not None:
            metrics["train/kl"] = sums["kl"] / per_token
        n_kd = (n_kd_tokens * args.num_iterations).clamp(min=1)  # KDRL
        metrics["kd/term"] = sums["kd"] / n_kd  # the --kd-estimator's value (k2: not a KL estimate)
        metrics["kd/kl"] = sums["kd_kl"] / n_kd  # k3: unbiased estimate of KL(student||teacher)
        metrics["kd/coef"] = kd_coef
        metrics["kd/masked_frac"] = 1 - n_kd_tokens / n_tokens
        metrics["time/step"] = time.perf_counter() - t_step
        metrics = plumbing.mean_over_ranks(metrics)
        run.log(step, metrics)
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(step)
            run.log_samples(step, "train", tasks.sample_rows(  # the step's first group
                rows[0], rollout.texts[:G], scores.correct[:G], reward=rewards[:G], advantage=advantages[:G],
                kd_term=torch.where(kd_row[:G] > 0, kd_seq[:G], torch.nan)))  # KDRL: null where --kd-mask skips it
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
