"""DPH-RL: Diversity-Preserving Hybrid RL (arXiv 2509.07430; official code github.com/seamoke/DPH-RL).

grpo.py plus a mass-covering divergence to the initial policy pi_ref, as rehearsal on its own
answers. Before training pi_ref answers every training question k times; questions it solves k of k
times form D_pef, whose correct completions are stored with pi_ref's log-probs; the rest, D_exp, are
trained by GRPO with no KL term. The loss adds eta * mean_t f(pi_theta / pi_ref) over stored D_pef
tokens, the generator form of D_f(pi_theta || pi_ref) (--divergence forward, js or alpha). No
reference model is held. The paper's title, the sources of the defaults, the derivation: docs/dph_rl.md.

Deviations from the paper:
1. One script runs both stages (officially separate runs) and keeps the k pre-sampled completions.
2. --pef-threshold generalises "k of k"; --presample-size takes a seeded subset of the questions.
3. L_pef is a token mean over the step's --pef-batch stored completions (officially per micro-batch).
4. The forward term is unclamped (verl's clamps log u to +-20 and the value to 10).

CPU (toy world, minutes):  python dph_rl.py
GPU:                       python dph_rl.py --model Qwen2.5-0.5B-Instruct --dataset gsm8k --divergence js --eta 0.1
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
    loss_type: str = arg("dapo", "token aggregation of the D_exp loss (official: token mean, dapo)",
                         choices=("grpo", "bnpo", "dr_grpo", "dapo"))
    num_iterations: int = arg(1, "updates per batch of rollouts (mu); >1 computes old log-probs once")
    epsilon: float = arg(0.2, "lower clip range: ratio >= 1 - epsilon")
    epsilon_high: float = arg(0.28, "upper clip range: ratio <= 1 + epsilon_high (official: 0.28, DAPO's)")
    divergence: str = arg("forward", "f of the D_pef term: forward (u - 1 - log u), js (2 JS generator), alpha",
                          choices=("forward", "js", "alpha"))
    eta: float = arg(0.01, "coefficient of the D_pef divergence term (official: forward 0.01-0.05, js 0.05-0.2)")
    alpha: float = arg(0.2, "alpha of --divergence alpha, in (0, 1)")
    presample_k: int = arg(8, "completions per question the initial policy samples before training (k)")
    pef_threshold: int = arg(0, "a question solved at least this many of k times goes to D_pef (0: k of k)")
    pef_batch: int = arg(16, "stored D_pef completions in each step's divergence term", toy=8)
    presample_size: int = arg(0, "training questions pre-sampled and trained on, a seeded subset (0: all)", toy=2000)


# ALGO LOGIC


def split_pef(n_correct, threshold: int):
    """(N,) bool: the question goes to D_pef (solved at least `threshold` of k times), else D_exp."""
    return n_correct >= threshold  # (N,)


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


def compute_loss(logp, old_logp, advantages, mask, args, n_seqs: int, n_tokens):
    """GRPO objective (arXiv 2402.03300, eq. 3), as a loss to minimise, per token:
        L_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A),  rho_t = exp(l_t - l_old_t) (D_exp; no KL: DPH-RL),
    aggregated by --loss-type. `n_seqs` and `n_tokens` are the whole step's (all micro-batches),
    so that the summed micro-batch losses equal the full-batch loss."""
    ratio = torch.exp(logp - old_logp)  # (b, T)
    A = advantages[:, None]  # (b, 1)
    clipped_ratio = torch.clamp(ratio, 1 - args.epsilon, 1 + args.epsilon_high)  # (b, T)
    per_token = -torch.min(ratio * A, clipped_ratio * A)  # (b, T)
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


def pef_loss(logp, ref_logp, mask, args, n_tokens):
    """DPH-RL rehearsal term (arXiv 2509.07430) on stored completions y ~ pi_ref of D_pef:
        eta * sum_t f(u_t) / n_tokens,  u_t = exp(l_t - l_ref_t),  n_tokens: the whole step's D_pef tokens,
    an unbiased estimate of eta * D_f(pi_theta || pi_ref) and of its gradient (pi_ref sampled y: no score term)."""
    f_u = common.f_of_log_u(args.divergence, logp - ref_logp, args.alpha)  # (b, T)
    return args.eta * (f_u * mask).sum() / n_tokens, f_u


@torch.no_grad()
def presample(model, tok, rows: list, args, reward=None):
    """The pre-sampling stage: the initial policy answers each question of `rows` k times. Returns (n_correct
    (N,), store, ref_logp (M, T)): how often each question was solved, and the correct completions of the D_pef
    questions with their per-token log-probs under this policy, in question order (None, None if none)."""
    k, threshold, b = args.presample_k, args.pef_threshold or args.presample_k, args.prompts_per_step // plumbing.world_size()
    counts, kept = [], []  # this rank's (question, times solved) and (question, its kept rows, their log-probs)
    calls = common.answers(model, tok, rows, k, args.max_new_tokens, b, args.temperature, instruction=args.instruction,
                           system_prompt=args.system_prompt, reward=reward)  # b questions each
    for part, ro, right, _ in tqdm(calls, "pre-sampling", -(-len(rows) // args.prompts_per_step), disable=plumbing.rank() > 0):
        lp = torch.zeros(ro.mask.shape, device=ro.mask.device)  # (b*k, T) every row, so that FSDP ranks run as many passes
        for idx in common.micro_batches(len(ro.texts), args.micro_batch_size):
            mb_logp = common.token_logprobs(model, ro.select(idx), args.temperature, args.logprob_chunk)  # (b', T')
            lp[idx, :mb_logp.shape[1]] = mb_logp
        for j, i in enumerate(part):
            counts += [(i, int(right[j].sum()))] if i >= 0 else []
            if i >= 0 and split_pef(right[j].sum(), threshold):
                keep = j * k + right[j].nonzero().squeeze(1)  # (m,)
                kept.append((i, ro.select(keep).to("cpu"), lp[keep, :int(ro.lengths[keep].max())].cpu()))
    every = plumbing.all_gather((counts, kept))  # every rank's
    n_correct = torch.tensor([n for _, n in sorted(c for g in every for c in g[0])])  # (N,)
    kept = sorted((x for g in every for x in g[1]), key=lambda x: x[0])  # in question order
    if not kept:
        return n_correct, None, None
    store = common.Rollout.cat([ro for _, ro, _ in kept], tok.pad_token_id)
    T = store.mask.shape[1]
    return n_correct, store, torch.cat([torch.nn.functional.pad(lp, (0, T - lp.shape[1])) for _, _, lp in kept])


def main():
    args = common.parse_args(Args)
    plumbing.check_args(args, num_iterations=1, eta=0, presample_k=1, pef_batch=0, presample_size=0)
    if not 0 <= args.pef_threshold <= args.presample_k:
        plumbing.die(f"--pef-threshold must be between 1 and --presample-k ({args.presample_k}), or 0 for k "
                     f"(got {args.pef_threshold})")
    if args.divergence == "alpha" and not 0 < args.alpha < 1:
        plumbing.die(f"--alpha must be in (0, 1) (got {args.alpha})")
    if args.pef_batch % plumbing.world_size():
        plumbing.die(f"--pef-batch must be a multiple of the number of processes (got {args.pef_batch})")
    common.check_available([args.model], args.dataset, args.eval_dataset)  # offline: names all that is missing
    train_rows = tasks.load_data(args.dataset, "train")
    if args.presample_size:  # DPH-RL: a seeded subset of the train split
        pick = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(args.seed))[:args.presample_size]
        train_rows = [train_rows[i] for i in sorted(pick.tolist())]
    eval_rows = tasks.load_data(args.eval_dataset, "eval")[:args.eval_size]
    reward = tasks.load_reward(args.reward, train_rows, eval_rows)  # --reward's function, tried on a row (None: the grader)
    device = plumbing.init_distributed(args.device, args.threads)  # one process, or one rank of torchrun
    run = rundir.Run(args, __file__)  # DIR (--out): config.json, metrics.jsonl, checkpoints; what Ctrl-C says
    G = args.group_size

    start_from = run.checkpoint_dir("policy") if args.resume else args.model
    model, tok = common.load_model(start_from, device, args.gradient_checkpointing, fsdp=args.fsdp,
                                   lora=common.lora_config(args), generation=args.generation)  # LoRA: fp32 adapters
    plumbing.seed_everything(args.seed + plumbing.rank())  # after loading; ranks sample different completions
    trained = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters alone
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay, fused=True)  # fused: one kernel a step
    # DPH-RL: the pre-sampling stage, once, by the initial policy; --resume reads it back
    threshold = args.pef_threshold or args.presample_k
    settings = {f"--{k.replace('_', '-')}": getattr(args, k) for k in ("model", "dataset", "presample_k", "temperature",
                                                                      "max_new_tokens", "instruction", "system_prompt")}
    settings.update({"--pef-threshold": threshold, "--presample-size/--seed": [r["question"] for r in train_rows]})
    settings.update({"--reward": args.reward} if args.reward else {})  # what "correct" meant
    n_correct, store, ref_logp = run.once("presample", "pre-sampling stage", settings,
                                          lambda: presample(model, tok, train_rows, args, reward))
    is_pef = split_pef(n_correct, threshold)  # (N,)
    exp_rows = [r for r, p in zip(train_rows, is_pef.tolist()) if not p]
    if not exp_rows:
        plumbing.die(f"every pre-sampled question was solved at least {threshold} of {args.presample_k} times: D_exp is empty")
    store, ref_logp = (store.to(device), ref_logp.to(device)) if store is not None else (None, None)
    n_pef = len(store.texts) if store is not None else 0
    # the question of each stored completion: a D_pef question's correct ones, in question order (for samples)
    pef_rows = [r for r, n, p in zip(train_rows, n_correct.tolist(), is_pef.tolist()) if p for _ in range(n)]
    if plumbing.rank() == 0:
        print(f"pre-sampling: {len(train_rows)} questions x {args.presample_k}: {int(is_pef.sum())} solved at least "
              f"{threshold} times (D_pef, {n_pef} completions kept), {len(exp_rows)} to explore (D_exp)")
    sampler = tasks.PromptSampler(exp_rows, args.seed)
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
        # DPH-RL: this step's stored D_pef completions, a draw seeded by the step (nothing is sampled)
        draw = (torch.randperm(n_pef, generator=torch.Generator().manual_seed(args.seed * 1_000_003 + step))
                .repeat(-(-args.pef_batch // n_pef))[:args.pef_batch] if n_pef and args.eta > 0 else torch.arange(0))
        pef_idx = torch.tensor(plumbing.shard(draw.tolist()), dtype=torch.long)  # this rank's share
        pef = store.select(pef_idx) if len(pef_idx) else None
        pef_ref_logp = ref_logp[pef_idx.to(device)] if pef is not None else None  # (P, T) stored at pre-sampling

        # 4. update
        with plumbing.Timer() as t_upd:
            batches = common.micro_batches(len(advantages), args.micro_batch_size)
            pef_batches = common.micro_batches(len(pef_idx), args.micro_batch_size)
            n_tokens = rollout.mask.sum()
            n_seqs_all, n_tokens_all = len(advantages) * plumbing.world_size(), plumbing.all_sum(n_tokens)  # the step's
            n_pef_tokens_all = plumbing.all_sum(pef.mask.sum() if pef is not None else torch.zeros((), device=device))
            with torch.no_grad():
                old = ([common.token_logprobs(model, rollout.select(i), args.temperature, args.logprob_chunk)
                        for i in batches] if args.num_iterations > 1 else None)
            model.train()
            sums = dict(loss=0.0, clipped=0.0, entropy=0.0, divergence=0.0)
            pef_f_u = torch.zeros(len(pef_idx), device=device)  # DPH-RL: each stored completion's mean f(u), for samples
            for _ in range(args.num_iterations):
                optimizer.zero_grad(set_to_none=True)
                for j, idx in enumerate(batches):
                    mb = rollout.select(idx)
                    logp, entropy = common.token_logprobs(model, mb, args.temperature, args.logprob_chunk,
                                                          with_entropy=True)  # (b, T)
                    old_logp = old[j] if old is not None else logp.detach()  # (b, T)
                    loss, s = compute_loss(logp, old_logp, advantages[idx], mb.mask, args, n_seqs_all, n_tokens_all)
                    loss.backward()
                    sums["loss"] += loss.detach()
                    sums["clipped"] += (s["clipped"] * mb.mask).sum()
                    sums["entropy"] += (entropy * mb.mask).sum()
                for idx in pef_batches:  # DPH-RL: eta * D_f(pi_theta || pi_ref) on the stored completions
                    mb = pef.select(idx)
                    logp = common.token_logprobs(model, mb, args.temperature, args.logprob_chunk)  # (b, T)
                    loss, f_u = pef_loss(logp, pef_ref_logp[idx, :mb.mask.shape[1]], mb.mask, args, n_pef_tokens_all)
                    loss.backward()
                    sums["loss"] += loss.detach()
                    sums["divergence"] += (f_u.detach() * mb.mask).sum()
                    pef_f_u[idx] = common.masked_mean(f_u.detach(), mb.mask, 1)
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
        if pef is not None:  # token mean of f(u) on this step's D_pef completions: the divergence estimate
            metrics["dph/divergence"] = plumbing.all_sum(sums["divergence"]) / (n_pef_tokens_all * args.num_iterations)
        metrics["dph/pef_tokens"] = n_pef_tokens_all
        metrics["time/step"] = time.perf_counter() - t_step
        metrics = plumbing.mean_over_ranks(metrics)
        run.log(step, metrics)
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(step)
            run.log_samples(step, "train", tasks.sample_rows(  # the step's first group
                rows[0], rollout.texts[:G], scores.correct[:G], reward=rewards[:G], advantage=advantages[:G]))
            run.log_samples(step, "pef", [r for i, j in enumerate(pef_idx.tolist())  # DPH-RL: the step's stored answers
                                          for r in tasks.sample_rows(pef_rows[j], pef.texts[i:i + 1], [True],
                                                                     f_u=pef_f_u[i:i + 1])])
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
