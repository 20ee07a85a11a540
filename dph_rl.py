"""DPH-RL: Diversity-Preserving Hybrid RL (arXiv 2509.07430, "The Choice of Divergence: A Neglected
Key to Mitigating Diversity Collapse in Reinforcement Learning with Verifiable Reward"; official
code: github.com/seamoke/DPH-RL, a verl fork).

grpo.py plus a mass-covering divergence to the initial policy, applied as rehearsal on its own
answers. Before training, the initial policy pi_ref answers every training question k times
(--presample-k). Questions it solves k of k times form D_pef ("near-perfect"): their correct
completions are kept with the log-prob of every token under pi_ref. The rest form D_exp
("exploration") and are trained by GRPO with no KL term (DAPO clip by default). The loss is
    L = L_GRPO(D_exp) + eta * L_pef,  L_pef = token mean over stored D_pef completions of f(u_t),
    u_t = pi_theta(y_t | .) / pi_ref(y_t | .) = exp(l_t - l_ref_t), l_ref_t read from the cache,
the generator form of D_f(pi_theta || pi_ref) = E_{y ~ pi_ref}[f(pi_theta(y) / pi_ref(y))]. The
samples come from pi_ref, which does not depend on theta, so the pathwise gradient of this sample
mean is unbiased for grad D_f (no score-function term), and no reference model is held during
training: only its stored log-probs. --divergence (official verl/trainer/ppo/core_algos.py and
verl/workers/actor/dp_actor.py, `sft_loss_mode`):
    forward: f(u) = u - 1 - log u          E_ref = KL(pi_ref || pi_theta) (k3 with the roles swapped)
    js:      f(u) = u log u - (u + 1) log((u + 1) / 2)     E_ref = 2 JS(pi_theta, pi_ref) ("js_low_var")
    alpha:   f(u) = (u^(1-a) - (1-a) u - a) / (a (a - 1)), a = --alpha (official alpha_coeff 0.2)
Defaults from the official code: forward with eta 0.01 (verl/trainer/config/ppo_trainer.yaml:
sft_loss_mode forward, sft_loss_coeff 0.01); the README's eta ranges are forward 0.01-0.05, js
0.05-0.2, alpha 0.01-0.05; scripts/llama/*.sh: lr 1e-6, clip_ratio_high 0.28, token-mean loss,
use_kl_loss False, rollout.n 16.

The pre-sampling stage is written to DIR/presample.pt and read back by --resume (the checkpoint's
policy is no longer the initial one, so it must never sample the stage again).

Deviations from the paper and the official code:
1. One script runs both stages. Officially they are separate runs (scripts/llama/
   offline_sampling.sh samples the train set; data/sql/process_data/exact_correct_id.py splits it;
   scripts/llama/get_correct_data_tensor.sh samples each D_pef question once more, n = 1, and keeps
   the correct answers with their log-probs). Here the k pre-sampled completions themselves are
   kept: every correct completion of a D_pef question, with its log-probs from the same pass.
2. --pef-threshold generalises "k of k" (the paper's k = 8; the released split script uses 4 of 4):
   with a threshold below k only the correct completions of D_pef questions are kept.
3. Official training concatenates a chunk of 256 stored completions to each step's rollouts (128
   questions x 16) and verl splits the result into its own optimizer mini-batches, so the
   L_pef term is stepped partly on its own; here each step draws --pef-batch stored completions
   (a draw seeded by the step, without replacement within a step) and one optimizer step takes
   the sum L_GRPO + eta L_pef, each a token mean over the whole step (all micro-batches and ranks).
4. The official forward term goes through verl's k3 (`low_var_kl`), which clamps log u to +-20
   and the value to 10 (no gradient beyond); here f is unclamped.
5. --presample-size caps the questions pre-sampled (and then trained on): a seeded subset of the
   train split; 0 (the default for real models) takes the whole split, as the paper does.
6. The reverse-KL and "js" (JS written through the mixture, with an online reference) variants of
   the official code are not offered: grpo.py --beta is the reverse-KL baseline.

CPU (toy world, minutes):  python dph_rl.py
GPU:                       python dph_rl.py --model Qwen2.5-0.5B-Instruct --dataset gsm8k --divergence js --eta 0.1
"""

import math
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import common
from common import arg


@dataclass
class Args:
    model: str = arg("toy-small", "policy to train: hub id, bare Qwen name (Qwen2.5-0.5B-Instruct), local directory, or a toy model (toy-small, toy-large, toy-hard-small, toy-hard-large)")
    dataset: str = arg("gsm8k", "gsm8k, math, toy, toy-hard, or a .jsonl path with question/answer fields; a toy model defaults to its own (toy or toy-hard)", toy="toy")
    steps: int = arg(500, "training steps (one batch of rollouts each)", toy=200)
    prompts_per_step: int = arg(16, "questions sampled per step", toy=8)
    group_size: int = arg(8, "completions per question (G)")
    max_new_tokens: int = arg(512, "completion length limit", toy=8)
    lr: float = arg(1e-6, "AdamW learning rate", toy=2e-5)
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")
    temperature: float = arg(1.0, "sampling temperature (log-probs use the same)")
    format_coef: float = arg(0.0, "reward bonus for giving the answer in \\boxed{} or after ####")
    seed: int = arg(1, "random seed")
    out: str = arg("", "output directory (default: runs/<script>-<time>)")
    eval_every: int = arg(50, "evaluate every N steps (also at step 0 and after the last step)")
    eval_size: int = arg(500, "held-out questions for greedy pass@1")
    pass_n: int = arg(0, "answers sampled at temperature 1 per held-out question for eval/pass@k (0: off; evaluation then costs about n times more)", toy=16)
    pass_k: str = arg("1,4,16", "the k of eval/pass@k, comma-separated, each at most --pass-n")
    save_every: int = arg(50, "checkpoint every N steps")
    resume: bool = arg(False, "continue the run in --out from its checkpoint")
    device: str = arg("auto", "cuda, cpu, or auto")
    threads: int = arg(0, "CPU threads for torch (0: torch's default, one per core)", toy=1)
    micro_batch_size: int = arg(8, "completions per forward/backward (gradient accumulation)", toy=64)
    gradient_checkpointing: bool = arg(False, "recompute activations in backward to save memory")
    logprob_chunk: int = arg(1024, "positions per chunk of the LM head in the log-prob pass")
    fsdp: bool = arg(False, "torchrun: shard parameters, gradients and AdamW states over the processes (FSDP2), for models that do not fit one GPU; no effect in one process")
    # Algorithm-specific arguments
    scale_rewards: str = arg("group", "divide centred rewards by the group std, the batch std, or nothing", choices=("group", "batch", "none"))
    loss_type: str = arg("dapo", "token aggregation of the D_exp loss (official: token-mean, i.e. dapo)", choices=("grpo", "bnpo", "dr_grpo", "dapo"))
    num_iterations: int = arg(1, "updates per batch of rollouts (mu); >1 computes old log-probs once")
    epsilon: float = arg(0.2, "lower clip range: ratio >= 1 - epsilon")
    epsilon_high: float = arg(0.28, "upper clip range: ratio <= 1 + epsilon_high (official: 0.28, DAPO's)")
    divergence: str = arg("forward", "f of the D_pef term: forward (u - 1 - log u), js (2 JS generator), alpha", choices=("forward", "js", "alpha"))
    eta: float = arg(0.01, "coefficient of the D_pef divergence term (official ranges: forward 0.01-0.05, js 0.05-0.2, alpha 0.01-0.05)")
    alpha: float = arg(0.2, "alpha of --divergence alpha, in (0, 1)")
    presample_k: int = arg(8, "completions the initial policy samples per training question before training (k)")
    pef_threshold: int = arg(0, "a question solved at least this many of k times goes to D_pef (0: k, the paper's k of k)")
    pef_batch: int = arg(16, "stored D_pef completions in each step's divergence term", toy=8)
    presample_size: int = arg(0, "training questions pre-sampled and trained on, a seeded subset (0: the whole train split)", toy=2000)


# ALGO LOGIC: the pre-sampling split, advantages and loss


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
        centred = centred / (common.std_over_ranks(rewards) + 1e-4)  # (N, G)
    return centred.reshape(-1)  # (B,)


def generator(name: str, log_u, alpha: float = 0.2):
    """f(u) of D_f(pi_theta || pi_ref) = E_{pi_ref}[f(u)], u = pi_theta / pi_ref, from log u (arXiv
    2509.07430; official core_algos.py). Each f is convex with f(1) = 0."""
    u = torch.exp(log_u)  # (b, T)
    if name == "forward":  # E_ref = KL(pi_ref || pi_theta)
        return u - 1 - log_u  # (b, T)
    if name == "js":  # E_ref = 2 JS; log((1 + u) / 2) = softplus(log u) - log 2, finite for any u
        return u * log_u - (u + 1) * (torch.nn.functional.softplus(log_u) - math.log(2))  # (b, T)
    a = alpha  # alpha-divergence
    return (torch.exp((1 - a) * log_u) - (1 - a) * u - a) / (a * (a - 1))  # (b, T)


def compute_loss(logp, old_logp, advantages, mask, args, n_seqs: int, n_tokens):
    """GRPO objective on D_exp (arXiv 2402.03300, eq. 3) with no KL term, as in DPH-RL, per token:
        L_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A),  rho_t = exp(l_t - l_old_t),
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
    """DPH-RL rehearsal term (arXiv 2509.07430), on stored completions y ~ pi_ref of D_pef:
        eta * sum_t f(u_t) / n_tokens,  u_t = exp(l_t - l_ref_t),
    the generator form of eta * D_f(pi_theta || pi_ref); `n_tokens` is the whole step's D_pef
    token count. The gradient flows through l_t only: pi_ref sampled y and is fixed."""
    f_u = generator(args.divergence, logp - ref_logp, args.alpha)  # (b, T)
    return args.eta * (f_u * mask).sum() / n_tokens, f_u


@torch.no_grad()
def presample(model, tok, rows: list, args):
    """The pre-sampling stage: the initial policy answers each question of `rows` k times, in steps
    of --prompts-per-step questions shared over the ranks as training shares them. Returns
    (n_correct (N,), store, ref_logp (M, T)): how often each question was solved, and the correct
    completions of the D_pef questions with their per-token log-probs under this policy, in question
    order, on every rank."""
    k, device = args.presample_k, next(model.parameters()).device
    threshold = args.pef_threshold or k
    order = list(range(len(rows)))
    order += [-1] * (-len(order) % args.prompts_per_step)  # -1: padding, so that ranks take equal shares
    counts, parts, logps, owners = [], [], [], []
    for s in tqdm(range(0, len(order), args.prompts_per_step), desc="pre-sampling", dynamic_ncols=True,
                  disable=common.rank() != 0):
        mine = common.shard(order[s:s + args.prompts_per_step])  # this rank's question indices
        qs = [rows[max(i, 0)] for i in mine]
        ro = common.sample(model, tok, [common.format_prompt(tok, r["question"], args.dataset) for r in qs], k,
                           args.max_new_tokens, args.temperature)
        correct = common.rewards_for(ro.texts, [r["answer"] for r in qs for _ in range(k)]).correct.to(device)  # (b*k,)
        n_correct = correct.view(-1, k).sum(1)  # (b,)
        lp = torch.zeros(ro.mask.shape, device=device)  # (b*k, T) every row, so that FSDP ranks run as many passes
        for idx in common.micro_batches(len(correct), args.micro_batch_size):
            part = common.token_logprobs(model, ro.select(idx), args.temperature, args.logprob_chunk)  # (b', T')
            lp[idx, :part.shape[1]] = part
        real = torch.tensor([i >= 0 for i in mine], device=device)  # (b,) not padding
        keep = ((split_pef(n_correct, threshold) & real).repeat_interleave(k) & correct).nonzero().squeeze(1)  # (m,)
        kept = ro.select(keep.cpu())
        counts += [(i, c) for i, c in zip(mine, n_correct.tolist()) if i >= 0]
        parts.append(kept.to("cpu"))
        logps.append(lp[keep, :kept.mask.shape[1]].cpu())
        owners += [mine[i // k] for i in keep.tolist()]
    local = (counts, parts, logps, owners)
    gathered = [local]
    if common.world_size() > 1:
        gathered = [None] * common.world_size()
        torch.distributed.all_gather_object(gathered, local)
    counts = dict(c for g in gathered for c in g[0])
    n_correct = torch.tensor([counts[i] for i in range(len(rows))])  # (N,)
    parts = [p for g in gathered for p in g[1] if len(p.texts)]
    if not parts:
        return n_correct, None, None
    owners = torch.tensor([o for g in gathered for o in g[3]])  # (M,)
    T = max(p.completion_ids.shape[1] for p in parts)
    ref_logp = torch.cat([torch.nn.functional.pad(lp, (0, T - lp.shape[1])) for g in gathered for lp in g[2]
                          if len(lp)])  # (M, T)
    by_question = torch.argsort(owners, stable=True)  # (M,) the same order in one process as under torchrun
    store = common.cat_rollouts(parts, tok.pad_token_id).select(by_question)
    return n_correct, store, ref_logp[by_question, :store.mask.shape[1]]


def main():
    args = common.parse_args(Args)
    common.check_common_args(args)
    if args.num_iterations < 1:
        common.die(f"--num-iterations must be at least 1 (got {args.num_iterations})")
    if args.eta < 0:
        common.die(f"--eta must be non-negative (got {args.eta})")
    if args.presample_k < 1:
        common.die(f"--presample-k must be at least 1 (got {args.presample_k})")
    if not 0 <= args.pef_threshold <= args.presample_k:
        common.die(f"--pef-threshold must be between 1 and --presample-k ({args.presample_k}), or 0 for k "
                   f"(got {args.pef_threshold})")
    if args.divergence == "alpha" and not 0 < args.alpha < 1:
        common.die(f"--alpha must be in (0, 1) (got {args.alpha})")
    if args.pef_batch < 0 or args.pef_batch % int(os.environ.get("WORLD_SIZE", "1")):
        common.die(f"--pef-batch must be a non-negative multiple of the number of processes (got {args.pef_batch})")
    if args.presample_size < 0:
        common.die(f"--presample-size must be non-negative (got {args.presample_size})")
    common.check_available([args.model], args.dataset)  # offline: one line naming all that is missing
    train_rows = common.load_data(args.dataset, "train")
    if args.presample_size:  # DPH-RL: a seeded subset of the train split
        pick = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(args.seed))[:args.presample_size]
        train_rows = [train_rows[i] for i in sorted(pick.tolist())]
    eval_rows = common.load_data(args.dataset, "eval")[:args.eval_size]
    device = common.init_distributed(args.device, args.threads)  # one process, or one rank of torchrun
    out = common.prepare_out(args, "dph_rl")
    G = args.group_size

    start_from = os.path.join(out, "checkpoint", "policy") if args.resume else args.model
    model, tok = common.load_model(start_from, device, args.gradient_checkpointing, fsdp=args.fsdp)
    common.seed_everything(args.seed + common.rank())  # after loading; ranks sample different completions
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)  # fused: one kernel a step
    # DPH-RL: the pre-sampling stage, once, by the initial policy; --resume reads it back
    cache = os.path.join(out, "presample.pt")
    stage = dict(model=args.model, dataset=args.dataset, rows=[r["question"] for r in train_rows], k=args.presample_k,
                 threshold=args.pef_threshold or args.presample_k, temperature=args.temperature,
                 max_new_tokens=args.max_new_tokens)
    if args.resume:
        if not os.path.exists(cache):
            common.die(f"--resume: no pre-sampling stage in '{cache}'; the checkpoint's policy is not the initial one")
        pre = torch.load(cache, weights_only=False)
        if pre["stage"] != stage:
            common.die(f"--resume: '{cache}' was made with other --model/--dataset/--presample-*/--pef-threshold/"
                       "--temperature/--max-new-tokens settings: resume with the same")
    else:
        n_correct, store, ref_logp = presample(model, tok, train_rows, args)
        pre = dict(stage=stage, n_correct=n_correct, store=store, ref_logp=ref_logp)
        if common.rank() == 0:
            torch.save(pre, cache + ".tmp")
            os.replace(cache + ".tmp", cache)
    is_pef = split_pef(pre["n_correct"], stage["threshold"])  # (N,)
    exp_rows = [r for r, p in zip(train_rows, is_pef.tolist()) if not p]
    if not exp_rows:
        common.die(f"every pre-sampled question was solved at least {stage['threshold']} of {args.presample_k} times: "
                   "nothing is left to explore (D_exp is empty)")
    store = pre["store"].to(device) if pre["store"] is not None else None
    ref_logp = pre["ref_logp"].to(device) if store is not None else None
    n_pef = len(store.texts) if store is not None else 0
    if common.rank() == 0:
        print(f"pre-sampling: {len(train_rows)} questions x {args.presample_k}: {int(is_pef.sum())} solved at least "
              f"{stage['threshold']} times (D_pef, {n_pef} completions kept), {len(exp_rows)} to explore (D_exp)")
    sampler = common.PromptSampler(exp_rows, args.seed)
    start = common.load_checkpoint(out, dict(policy=model), dict(policy=optimizer), sampler) if args.resume else 0
    logger = common.Logger(out, resume_step=start if args.resume else None)

    def evaluate(step):
        metrics = common.evaluate(model, tok, eval_rows, args.dataset, args.max_new_tokens, args.pass_n, args.pass_k)
        logger.log(step, metrics)
        return metrics["eval/accuracy"]

    acc0 = acc = evaluate(0) if start == 0 else logger.first("eval/accuracy")  # resumed: step 0's
    bar = tqdm(range(start + 1, args.steps + 1), initial=start, total=args.steps, dynamic_ncols=True,
               disable=common.rank() != 0)
    for step in bar:
        t_step = time.perf_counter()
        # 1. sample
        with common.Timer() as t_gen:
            rows = common.shard(sampler.next(args.prompts_per_step))  # this rank's questions
            prompts = [common.format_prompt(tok, r["question"], args.dataset) for r in rows]
            rollout = common.sample(model, tok, prompts, G, args.max_new_tokens, args.temperature)
        # 2. score
        golds = [r["answer"] for r in rows for _ in range(G)]
        scores = common.rewards_for(rollout.texts, golds, args.format_coef)
        rewards = scores.reward.to(device)  # (B,)
        # 3. ALGO LOGIC
        advantages = compute_advantages(rewards, G, args.scale_rewards)  # (B,)
        # DPH-RL: this step's stored D_pef completions, a draw seeded by the step (nothing is sampled)
        draw = (torch.randperm(n_pef, generator=torch.Generator().manual_seed(args.seed * 1_000_003 + step))
                .repeat(-(-args.pef_batch // n_pef))[:args.pef_batch] if n_pef and args.eta > 0 else torch.arange(0))
        pef_idx = torch.tensor(common.shard(draw.tolist()), dtype=torch.long)  # this rank's share
        pef = store.select(pef_idx) if len(pef_idx) else None
        pef_ref_logp = ref_logp[pef_idx.to(device)] if pef is not None else None  # (P, T) stored at pre-sampling

        # 4. update
        with common.Timer() as t_upd:
            batches = common.micro_batches(len(rewards), args.micro_batch_size)
            pef_batches = common.micro_batches(len(pef_idx), args.micro_batch_size)
            n_tokens = rollout.mask.sum()
            n_seqs_all, n_tokens_all = len(rewards) * common.world_size(), common.all_sum(n_tokens)  # the step's
            n_pef_tokens_all = common.all_sum(pef.mask.sum() if pef is not None else torch.zeros((), device=device))
            with torch.no_grad():
                old = ([common.token_logprobs(model, rollout.select(i), args.temperature, args.logprob_chunk)
                        for i in batches] if args.num_iterations > 1 else None)
            model.train()
            sums = dict(loss=0.0, clipped=0.0, entropy=0.0, divergence=0.0)
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
                grad_norm = common.reduce_and_clip_grads(model, args.max_grad_norm)  # summed over ranks first
                common.check_finite(sums["loss"], step, out)
                optimizer.step()

        # 5. log, evaluate, save
        per_token = n_tokens * args.num_iterations
        zero_std = (rewards.view(-1, G).std(1) == 0).float().mean()
        metrics = {
            "train/reward": rewards.mean(), "train/reward_std": common.std_over_ranks(rewards), "train/grade_errors": scores.grade_errors,
            "train/loss": common.all_sum(sums["loss"]) / args.num_iterations, "train/clip_frac": sums["clipped"] / per_token,
            "train/zero_std_frac": zero_std, "train/completion_len": rollout.lengths.float().mean(),
            "train/truncated_frac": rollout.truncated.float().mean(),
            "train/entropy": sums["entropy"] / per_token, "train/grad_norm": grad_norm, "train/tokens": n_tokens_all,
            "time/generate": t_gen.seconds, "time/update": t_upd.seconds,
        }
        if pef is not None:  # token mean of f(u) on this step's D_pef completions: the divergence estimate
            metrics["dph/divergence"] = common.all_sum(sums["divergence"]) / (n_pef_tokens_all * args.num_iterations)
        metrics["dph/pef_tokens"] = n_pef_tokens_all
        metrics["time/step"] = time.perf_counter() - t_step
        metrics = common.mean_over_ranks(metrics)
        logger.log(step, metrics)
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(step)
        if step % args.save_every == 0 or step == args.steps:
            common.save_checkpoint(out, step, dict(policy=(model, tok)), dict(policy=optimizer), sampler)
        bar.set_postfix(reward=f"{metrics['train/reward']:.3f}", acc=f"{acc:.3f}")

    common.save_final(out, {"": (model, tok)})
    logger.close()
    if common.rank() == 0:
        print(f"eval/accuracy: {acc0:.3f} -> {acc:.3f}  ({out})")


if __name__ == "__main__":
    common.exit_on_interrupt()  # Ctrl-C: one line with the last checkpoint and how to resume
    main()
