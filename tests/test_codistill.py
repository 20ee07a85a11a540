"""codistill.py: importance weights and their cap, the KD reward reaching the small model's
advantages only, no gradient between the two models, the update on real toy models; end to end
through its CLI, with resume and with the large model's own rollouts."""

import math
from types import SimpleNamespace

import pytest
import torch

import codistill
import common
import rundir
from conftest import assert_user_error, check_samples, read_metrics, read_samples, run_main, run_script


def loss_args(loss_type="grpo", eps=0.2, eps_high=0.2, max_new_tokens=4, is_cap=2.0, num_iterations=1):
    return SimpleNamespace(loss_type=loss_type, epsilon=eps, epsilon_high=eps_high, max_new_tokens=max_new_tokens,
                           is_cap=is_cap, num_iterations=num_iterations, temperature=1.0, logprob_chunk=7,
                           max_grad_norm=1e9)


# ---------------------------------------------------------------- importance weights

def test_importance_weights_are_the_ratio_truncated_at_the_cap():
    large = torch.log(torch.tensor([[0.5, 0.9, 0.1, 0.3]], dtype=torch.float64))
    small = torch.log(torch.tensor([[0.5, 0.3, 0.4, 0.1]], dtype=torch.float64))
    w = codistill.importance_weights(large, small, is_cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, 0.25, 2.0]], dtype=torch.float64))  # 3 -> 2, 3 -> 2
    w = codistill.importance_weights(large, small, is_cap=5.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 3.0, 0.25, 3.0]], dtype=torch.float64))
    # padding positions can hold any log-probs: the weight stays finite
    assert torch.isfinite(codistill.importance_weights(torch.tensor([[0.0]]), torch.tensor([[-1e4]]), 2.0)).all()
    # detached: no gradient flows through the weight
    large.requires_grad_(True)
    assert not codistill.importance_weights(large, small, 2.0).requires_grad


def test_weighted_loss_gradient_is_truncated_weight_times_advantage():
    """At mu = 1 (old = sg(logp)) the large model's gradient w.r.t. its log-probs is
    -min(pi_L/pi_S, C) * A / (tokens of the sequence * sequences) for loss type grpo."""
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(3, 4, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    small = -torch.rand(3, 4, generator=g, dtype=torch.float64) * 3
    adv = torch.tensor([1.2, -0.4, 0.3], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float64)
    w = codistill.importance_weights(logp, small, 2.0)
    loss, _ = codistill.compute_loss(logp, logp.detach(), adv, mask, loss_args(), 3, mask.sum(), w)
    (grad,) = torch.autograd.grad(loss, logp)
    expected = -torch.exp(logp.detach() - small).clamp(max=2.0) * adv[:, None] * mask / mask.sum(1, keepdim=True) / 3
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)
    assert (torch.exp(logp.detach() - small) > 2).any() and (torch.exp(logp.detach() - small) < 1).any()


# ---------------------------------------------------------------- rewards and advantages

def test_kd_reward_reaches_the_small_models_advantages_only():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # G = 4: mixed, all correct
    kl = torch.tensor([0.1, 0.9, 0.3, 0.2, 0.5, 0.1, 0.4, 0.2])
    torch.testing.assert_close(codistill.kd_rewards(rewards, kl, 0.5), rewards - 0.5 * kl)
    adv_large, _ = codistill.large_advantages(rewards, None, 4, "group")
    torch.testing.assert_close(adv_large, codistill.compute_advantages(rewards, 4, "group"))  # r only
    torch.testing.assert_close(adv_large[4:], torch.zeros(4))  # all-correct group: no signal for L
    adv_small = codistill.compute_advantages(codistill.kd_rewards(rewards, kl, 0.5), 4, "group")
    assert (adv_small[4:].abs() > 0.5).all()  # ... but S gets one: the completions L finds likelier win
    assert adv_small[5] > adv_small[7] > adv_small[6] > adv_small[4]  # ordered by -KL
    torch.testing.assert_close(codistill.compute_advantages(codistill.kd_rewards(rewards, kl, 0.0), 4, "group"),
                               adv_large)  # alpha = 0: both models see the same advantages


def test_large_rollouts_join_the_large_models_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])  # N = 2 questions, G = 3
    own = torch.tensor([1.0, 1.0, 0.0, 0.0])  # n = 2 each
    adv_small_rows, adv_own = codistill.large_advantages(rewards, own, 3, "group")
    both = codistill.compute_advantages(torch.tensor([1.0, 0, 0, 1, 1, 0, 1, 1, 0, 0]), 5, "group").view(2, 5)
    torch.testing.assert_close(adv_small_rows, both[:, :3].reshape(-1))
    torch.testing.assert_close(adv_own, both[:, 3:].reshape(-1))


# ---------------------------------------------------------------- the two models, for real

def test_no_gradient_crosses_between_the_models(models_and_rollout):
    """One step as main() runs it: the large model's update (IS-weighted, on S's samples), then
    the small model's from the KD reward built with the large model's log-probs. The large step
    leaves S untouched (no grad), the small step leaves L's weights and grads untouched."""
    small, large, _, rollout = models_and_rollout
    args = loss_args()
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1])
    batches = common.micro_batches(12, 5)
    small_opt = torch.optim.SGD(small.parameters(), lr=0.1)
    large_opt = torch.optim.SGD(large.parameters(), lr=0.1)
    with torch.no_grad():
        small_old = [common.token_logprobs(small, rollout.select(i)) for i in batches]
    s0 = [p.detach().clone() for p in small.parameters()]
    adv_large, _ = codistill.large_advantages(rewards, None, 4, "group")
    pieces = [(rollout.select(i), adv_large[i], None, small_old[j]) for j, i in enumerate(batches)]
    vocab = small.get_output_embeddings().weight.shape[0]
    run = SimpleNamespace(out="unused")  # what update needs of a Run: its NaN stop
    run.check_finite = lambda loss, step: rundir.Run.check_finite(run, loss, step)
    large_logp, stats = codistill.update(large, large_opt, pieces, args, vocab, 1, run)
    assert all(p.grad is None for p in small.parameters())
    assert all(torch.equal(a, b) for a, b in zip(s0, small.parameters()))
    assert all(not lp.requires_grad for lp in large_logp)
    # the logged weight is the masked mean of min(pi_L/pi_S,old, C) over the step's tokens
    w = torch.cat([(codistill.importance_weights(large_logp[j], small_old[j], 2.0) * rollout.select(i).mask).sum()[None]
                   for j, i in enumerate(batches)]).sum() / rollout.mask.sum()
    assert float(stats["is_weight"]) == pytest.approx(float(w), rel=1e-5)
    assert 0 < float(stats["is_capped_frac"]) < 1

    l_params = [p.detach().clone() for p in large.parameters()]
    l_grads = [p.grad.clone() for p in large.parameters()]
    kl = torch.cat([common.masked_mean(small_old[j] - large_logp[j], rollout.select(i).mask, 1)
                    for j, i in enumerate(batches)])  # (B,)
    adv_small = codistill.compute_advantages(codistill.kd_rewards(rewards, kl, 0.5), 4, "group")
    pieces = [(rollout.select(i), adv_small[i], small_old[j], None) for j, i in enumerate(batches)]
    codistill.update(small, small_opt, pieces, args, vocab, 1, run)
    assert all(torch.equal(a, b) for a, b in zip(l_params, large.parameters()))
    assert all(torch.equal(a, b.grad) for a, b in zip(l_grads, large.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(s0, small.parameters()))  # S did learn


# ---------------------------------------------------------------- command line

KEYS = ("train/reward", "train/completion_len", "train/zero_std_frac", "small/kd_kl", "small/kd_reward", "small/loss",
        "small/clip_frac", "small/entropy", "small/grad_norm", "large/loss", "large/clip_frac", "large/entropy",
        "large/grad_norm", "large/is_weight", "large/is_capped_frac", "time/step", "time/generate", "time/update",
        "time/update_large", "time/update_small")


def test_codistill_end_to_end_with_resume(tmp_path):
    common_flags = ["--eval-size", 20, "--eval-every", 100, "--save-every", 2, "--prompts-per-step", 4,
                    "--large-rollouts", 0]  # S's rollouts alone: L's advantages over S's G (n > 0: below)
    full, part = tmp_path / "full", tmp_path / "part"
    p = run_script("codistill.py", "--steps", 3, "--out", full, *common_flags)
    assert "small eval/accuracy:" in p.stdout and "large eval/accuracy:" in p.stdout
    run_main("codistill.py", "--steps", 2, "--out", part, *common_flags)
    run_main("codistill.py", "--steps", 3, "--out", part, "--resume", *common_flags)
    a, b = read_metrics(full), read_metrics(part)
    train = [r for r in a if "train/reward" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["step"] for r in b if "train/reward" in r] == [1, 2, 3]
    assert [r["step"] for r in a if "small/eval/accuracy" in r] == [0, 3]
    for r in (r for r in a if "small/eval/accuracy" in r):  # pass@k of both models, on by default for the toy
        for name in ("small", "large"):
            assert 0 < r[f"{name}/eval/pass@1"] <= r[f"{name}/eval/pass@16"] <= 1 and r[f"{name}/time/eval"] > 0
    for r in train:
        for key in KEYS:
            assert key in r and math.isfinite(r[key]), key
        assert r["small/kd_kl"] > 0  # a k1 mean: single tokens can be negative
        # capped tokens weigh C = 2 and the others more than 0; the mean of min(pi_L/pi_S, C) over
        # S's tokens estimates a number <= sum_y pi_L(y) = 1 (docs/codistill.md)
        assert 2 * r["large/is_capped_frac"] < r["large/is_weight"] < 1.1 and r["large/is_capped_frac"] > 0
    keys = ("train/reward", "small/kd_kl", "large/is_weight")
    assert [[r[k] for k in keys] for r in train] == [[r[k] for k in keys] for r in b if "train/reward" in r]
    untimed = lambda r: {k: v for k, v in r.items() if "time/" not in k}
    assert untimed(a[-1]) == untimed(b[-1])  # the final evaluation of both models, pass@k included
    # samples: both models' answers; the small model's KD reward r - alpha k1 and advantages, the large model's from r
    sa = check_samples(full, [0, 3], 4, 8, columns=("kd_kl", "kd_reward", "large_advantage"),
                       advantages=(("kd_reward", "advantage"), ("reward", "large_advantage")))
    assert {r.get("model") for r in sa if r["kind"] == "eval"} == {"small", "large"}
    for r in (r for r in sa if r["kind"] == "train"):
        assert r["kd_reward"] == pytest.approx(r["reward"] - 0.5 * r["kd_kl"], abs=1e-6) and r["kd_kl"] != 0
    assert [r for r in read_samples(part) if r["step"] == 3] == [r for r in sa if r["step"] == 3]
    from transformers import AutoModelForCausalLM
    for name in ("small", "large"):
        AutoModelForCausalLM.from_pretrained(full / "final" / name)


def test_large_rollouts_end_to_end(tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = []
    real = common.sample
    def sample(m, tok, prompts, g, *a, **k):
        calls.append((len(prompts), g, k.get("greedy", False)))
        return real(m, tok, prompts, g, *a, **k)
    monkeypatch.setattr(common, "sample", sample)
    run_main("codistill.py", "--steps", 2, "--eval-size", 10, "--prompts-per-step", 3, "--large-rollouts", 2,
             "--num-iterations", 2, "--micro-batch-size", 5, "--out", out)
    assert calls.count((3, 8, False)) == 2 and calls.count((3, 2, False)) == 2  # S: G = 8, L: n = 2, each step
    train = [r for r in read_metrics(out) if "train/reward" in r]
    assert all(0 <= r["large/reward"] <= 1 for r in train)


@pytest.mark.parametrize("flags, message", [
    (["--is-cap", 0], "--is-cap positive"),
    (["--kd-coef", -0.1], "--kd-coef must be non-negative"),
    (["--large-rollouts", -1], "--large-rollouts non-negative"),
    (["--group-size", 1], "--group-size must be at least 2"),
])
def test_user_errors_are_one_line(tmp_path, flags, message):
    assert_user_error("codistill.py", "--out", tmp_path / "o", *flags, message=message)


def test_mismatched_tokenizers_are_refused(tmp_path, other_tokenizer):
    assert_user_error("codistill.py", "--large", other_tokenizer, "--dataset", "toy", "--steps", 1, "--out", tmp_path / "o",
                      message=f"'toy-small' and '{other_tokenizer}' have different tokenizers")
