"""opd_plus.py: the OPD vs OPD+ bias proved exactly on a categorical policy, the advantage table,
clipping, the reward term, the loss; end to end through its CLI for every divergence."""

import math
from types import SimpleNamespace

import pytest
import torch

import common
import opd_plus
from conftest import assert_user_error, check_samples, read_metrics, run_main, run_script

DIVERGENCES = [("rkl", 0.5), ("fkl", 0.5), ("jsd", 0.5), ("tv", 0.5), ("alpha", 0.5), ("alpha", 2.0),
               ("alpha", -1.0)]


def loss_args(divergence="rkl", estimator="opd+", alpha=0.5, loss_type="dapo", reward_coef=0.0, clip=6.0,
              max_new_tokens=4):
    return SimpleNamespace(divergence=divergence, estimator=estimator, alpha=alpha, loss_type=loss_type,
                           reward_coef=reward_coef, log_ratio_clip=clip, max_new_tokens=max_new_tokens)


# ---------------------------------------------------------------- the advantage table (docs/opd_plus.md)

def closed_forms(u, a):
    """(f(u), w_f(u)) written out by hand for each divergence: w_f = -f + u f'."""
    return dict(
        rkl=(-torch.log(u), torch.log(u) - 1),
        fkl=(u * torch.log(u), u),
        jsd=(0.5 * (u * torch.log(u) - (1 + u) * torch.log((1 + u) / 2)), 0.5 * torch.log((1 + u) / 2)),
        tv=(0.5 * (u - 1).abs(), 0.5 * torch.sign(u - 1)),
        alpha=((u ** (1 - a) - (1 - a) * u - a) / (a * (a - 1)), (u ** (1 - a) - 1) / (1 - a)),
    )


@pytest.mark.parametrize("divergence, alpha", DIVERGENCES)
def test_advantage_table_closed_form(divergence, alpha):
    u = torch.tensor([0.01, 0.2, 0.7, 1.0, 1.3, 4.0, 90.0], dtype=torch.float64)
    f, w = closed_forms(u, alpha)[divergence]
    opd = opd_plus.token_advantages(torch.log(u), divergence, "opd", alpha)
    plus = opd_plus.token_advantages(torch.log(u), divergence, "opd+", alpha)
    torch.testing.assert_close(opd, -f, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(plus, w, rtol=1e-10, atol=1e-10)
    if divergence == "rkl":  # OPD+ is OPD shifted by the constant -1
        torch.testing.assert_close(plus, opd - 1, rtol=0, atol=1e-12)
    else:  # elsewhere the two differ by more than a constant
        assert (plus - opd).std() > 1e-2


# ---------------------------------------------------------------- the bias, exactly

def categorical(seed, V=7):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(V, generator=g, dtype=torch.float64).requires_grad_(True)
    q = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64) * 1.5, 0)
    return theta, q


def expected_surrogate_gradient(theta, q, divergence, estimator, alpha):
    """sum_y p(y) grad[-sg(A(y)) log p_theta(y)] computed by compute_loss itself: one 'completion'
    of one token per vocabulary entry y, each weighted by p(y) through the mask, dr_grpo with
    n_seqs = max_new_tokens = 1 so that the normaliser is 1 and the loss is exactly that sum."""
    logp = torch.log_softmax(theta, 0)  # (V,)
    V = len(theta)
    args = loss_args(divergence, estimator, alpha, loss_type="dr_grpo", max_new_tokens=1)
    assert (torch.log(q) - logp).abs().max() < args.log_ratio_clip  # the clip does not bind here
    loss, _ = opd_plus.compute_loss(logp.view(V, 1), torch.log(q).view(V, 1), torch.zeros(V),
                                    logp.exp().detach().view(V, 1), args, n_seqs=1, n_tokens=None)
    (g,) = torch.autograd.grad(loss, theta)
    return g


def true_gradient(theta, q, divergence, alpha):
    """grad_theta D_f(q||p_theta) = grad sum_v p_theta(v) f(q(v)/p_theta(v)), by autograd."""
    f, _ = common.f_divergence(divergence, alpha)
    p = torch.softmax(theta, 0)
    (g,) = torch.autograd.grad((p * f(q / p)).sum(), theta)
    return g


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("divergence, alpha", DIVERGENCES)
def test_opd_plus_expected_gradient_is_the_divergence_gradient(divergence, alpha, seed):
    theta, q = categorical(seed)
    exact = true_gradient(theta, q, divergence, alpha)
    plus = expected_surrogate_gradient(theta, q, divergence, "opd+", alpha)
    assert exact.norm() > 1e-2
    torch.testing.assert_close(plus, exact, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("divergence, alpha", DIVERGENCES)
def test_plain_opd_misses_the_u_f_prime_term(divergence, alpha, seed):
    """E[-(-f(u)) grad l] = grad D_f + E_p[u f'(u) grad l] = grad D_f + sum_y q(y) f'(u(y)) grad l(y)."""
    theta, q = categorical(seed)
    exact = true_gradient(theta, q, divergence, alpha)
    opd = expected_surrogate_gradient(theta, q, divergence, "opd", alpha)
    _, f_prime = common.f_divergence(divergence, alpha)
    logp = torch.log_softmax(theta, 0)
    (missing,) = torch.autograd.grad((q * f_prime(q / logp.exp()).detach() * logp).sum(), theta)
    torch.testing.assert_close(opd, exact + missing, rtol=1e-9, atol=1e-12)
    if divergence == "rkl":  # f' = -1/u: the missing term is -sum p grad log p = 0, OPD is already exact
        torch.testing.assert_close(missing, torch.zeros_like(missing), rtol=0, atol=1e-12)
        torch.testing.assert_close(opd, exact, rtol=1e-9, atol=1e-12)
    else:  # the bias is real and not small
        assert (opd - exact).norm() > 0.05 * exact.norm()


def test_rkl_constant_shift_has_zero_expected_gradient():
    """OPD+ for rkl is OPD's advantage minus 1; that -1 alone contributes sum_y p(y) grad log p(y) = 0."""
    theta, q = categorical(5)
    logp = torch.log_softmax(theta, 0)
    (g,) = torch.autograd.grad((logp.exp().detach() * logp).sum(), theta)
    torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-12)
    torch.testing.assert_close(expected_surrogate_gradient(theta, q, "rkl", "opd", 0.5),
                               expected_surrogate_gradient(theta, q, "rkl", "opd+", 0.5), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- the loss

def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(3, 4, generator=g, dtype=torch.float64) * 2 - 0.05
    teacher = -torch.rand(3, 4, generator=g, dtype=torch.float64) * 2 - 0.05
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float64)
    return logp, teacher, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_is_the_stop_gradient_surrogate(loss_type):
    """The gradient w.r.t. the student's log-probs is -A_t times the aggregation weight: no gradient
    flows through u (the advantage is a constant), the reward term is c (r_i - mean_g r)."""
    logp, teacher, mask = batch()
    logp = logp.clone().requires_grad_(True)
    seq = torch.tensor([0.5, -0.25, -0.25], dtype=torch.float64)
    args = loss_args("jsd", "opd+", loss_type=loss_type, reward_coef=0.3)
    loss, stats = opd_plus.compute_loss(logp, teacher, seq, mask, args, n_seqs=3, n_tokens=mask.sum())
    (g,) = torch.autograd.grad(loss, logp)
    A = opd_plus.token_advantages(teacher - logp.detach(), "jsd", "opd+") + 0.3 * seq[:, None]
    weight = dict(grpo=mask / mask.sum(1, keepdim=True) / 3, bnpo=mask / mask.sum(),
                  dr_grpo=mask / (3 * 4), dapo=mask / mask.sum())[loss_type]
    torch.testing.assert_close(g, -A * weight, rtol=1e-10, atol=1e-12)
    assert loss.item() == pytest.approx(float((-A * logp.detach() * weight).sum()), rel=1e-10)
    torch.testing.assert_close(stats["advantage"], A)
    f, _ = common.f_divergence("jsd")
    torch.testing.assert_close(stats["divergence"], f(torch.exp(teacher - logp.detach())))
    torch.testing.assert_close(stats["kl"], common.kl_k3(teacher - logp.detach()))


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_sum_to_the_full_batch_loss(loss_type):
    logp, teacher, mask = batch(seed=1)
    seq = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    args = loss_args("fkl", "opd+", loss_type=loss_type, reward_coef=0.5)
    full, _ = opd_plus.compute_loss(logp, teacher, seq, mask, args, 3, mask.sum())
    parts = sum(opd_plus.compute_loss(logp[i], teacher[i], seq[i], mask[i], args, 3, mask.sum())[0]
                for i in (torch.tensor([0]), torch.tensor([1, 2])))
    assert parts.item() == pytest.approx(full.item(), rel=1e-10)


def test_log_ratio_is_clipped_before_f():
    logp = torch.zeros(1, 4, dtype=torch.float64)
    teacher = torch.tensor([[10.0, -10.0, 3.0, -6.0]], dtype=torch.float64)  # log u
    mask = torch.ones(1, 4, dtype=torch.float64)
    _, s = opd_plus.compute_loss(logp, teacher, torch.zeros(1), mask, loss_args("fkl", clip=6.0), 1, 4)
    torch.testing.assert_close(s["advantage"], torch.tensor([[math.exp(6), math.exp(-6), math.exp(3), math.exp(-6)]],
                                                            dtype=torch.float64))  # fkl: A = u
    assert s["clipped"].tolist() == [[1.0, 1.0, 0.0, 0.0]]  # exactly at the bound is not clipped
    _, s = opd_plus.compute_loss(logp, teacher, torch.zeros(1), mask, loss_args("rkl", "opd", clip=2.0), 1, 4)
    torch.testing.assert_close(s["advantage"], torch.tensor([[2.0, -2.0, 2.0, -2.0]], dtype=torch.float64))
    assert s["clipped"].tolist() == [[1.0, 1.0, 1.0, 1.0]]
    assert torch.isfinite(s["divergence"]).all()


def test_reward_advantages_are_group_centred_not_scaled():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4
    a = opd_plus.reward_advantages(r, 4)
    torch.testing.assert_close(a, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


# ---------------------------------------------------------------- end to end

KEYS = ("train/reward", "train/loss", "train/kl", "train/entropy", "train/grad_norm", "train/completion_len",
        "train/zero_std_frac", "opd/divergence", "opd/adv_mean", "opd/adv_std", "opd/log_u_clip_frac",
        "time/step", "time/generate", "time/update")


# What each run's logged means must satisfy (token means over the step; A = the advantage):
CHECKS = dict(
    # plain OPD, no reward term: A = -f(u) on every token, so mean A = -mean f(u) exactly
    rkl=lambda r: r["opd/adv_mean"] == pytest.approx(-r["opd/divergence"], rel=1e-5, abs=1e-6),
    jsd=lambda r: r["opd/adv_mean"] == pytest.approx(-r["opd/divergence"], rel=1e-5, abs=1e-6),
    # OPD+ forward KL: A = u = q/p, whose expectation under the student is sum_y q(y) = 1
    fkl=lambda r: abs(r["opd/adv_mean"] - 1) < 0.25,
    # OPD+ tv: A = sign(u - 1) / 2 + 0.5 (r_i - mean_g r), r in {0, 1}, G = 8: every A is a
    # multiple of 1/16 (plain OPD's -|u - 1| / 2 is not), and so is the step's token sum of A
    tv=lambda r: abs(16 * r["opd/adv_mean"] * r["train/tokens"] - round(16 * r["opd/adv_mean"] * r["train/tokens"])) < 1e-3,
    # OPD+ alpha = 2: A = 1 - 1/u and f(u) = (u + 1/u - 2) / 2, so mean u = 2 mean f + 1 + mean A,
    # whose expectation under the student is 1, as for fkl
    alpha=lambda r: abs(2 * r["opd/divergence"] + r["opd/adv_mean"]) < 0.25,
)


@pytest.mark.parametrize("flags", [
    ["--divergence", "rkl", "--estimator", "opd"],
    ["--divergence", "fkl"],
    ["--divergence", "jsd", "--estimator", "opd", "--loss-type", "grpo"],
    ["--divergence", "tv", "--reward-coef", "0.5"],
    ["--divergence", "alpha", "--alpha", "2.0", "--micro-batch-size", 24],
], ids=["rkl", "fkl", "jsd", "tv", "alpha"])
def test_end_to_end_each_divergence(tmp_path, flags):
    out = tmp_path / "run"
    cmd = ("opd_plus.py", "--steps", 3, "--eval-size", 20, "--eval-every", 2, "--prompts-per-step", 4, "--out", out, *flags)
    stdout = run_script(*cmd).stdout if flags[1] == "rkl" else run_main(*cmd)  # one through the real entry point
    assert "eval/accuracy:" in stdout
    rows = read_metrics(out)
    train = [r for r in rows if "train/reward" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["step"] for r in evals] == [0, 2, 3]
    for r in train:
        for key in KEYS:
            assert key in r and math.isfinite(r[key]), key
        assert CHECKS[flags[1]](r), r
    assert 0 <= evals[0]["eval/accuracy"] <= 1
    assert (out / "final" / "config.json").exists() and (out / "checkpoint" / "state.pt").exists()
    # each completion's token means of A_t and of log u = log q - log p_theta; plain OPD rkl: A_t = -f(u) = log u
    group = [r for r in check_samples(out, [0, 2, 3], 4, 8, columns=("log_ratio",), advantages=()) if r["kind"] == "train"]
    if flags[1] == "rkl":
        assert [r["advantage"] for r in group] == pytest.approx([r["log_ratio"] for r in group], abs=1e-5)
        assert len({r["log_ratio"] for r in group}) > 2 and any(r["log_ratio"] != 0 for r in group)


def test_resume_continues_at_its_step_and_matches_an_uninterrupted_run(tmp_path):
    """In-process (two runs of main) to keep the suite fast; the same contract as grpo.py's."""
    common_args = ["--eval-size", "20", "--eval-every", "100", "--save-every", "2", "--prompts-per-step", "4",
                   "--divergence", "fkl"]
    full, part = tmp_path / "full", tmp_path / "part"
    for argv in (["--steps", "3", "--out", full], ["--steps", "2", "--out", part],
                 ["--steps", "3", "--out", part, "--resume"]):
        run_main("opd_plus.py", *argv, *common_args)
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b if "train/reward" in r] == [1, 2, 3]
    ra = [(r["train/reward"], r["opd/divergence"]) for r in a if "train/reward" in r]
    rb = [(r["train/reward"], r["opd/divergence"]) for r in b if "train/reward" in r]
    assert ra == rb
    assert a[-1]["eval/accuracy"] == b[-1]["eval/accuracy"]


@pytest.mark.parametrize("flags, message", [
    (["--teacher", "OTHER"], "have different tokenizers"),
    (["--group-size", "1"], "--group-size must be at least 2"),
    (["--divergence", "alpha", "--alpha", "1"], "--alpha must not be 0 or 1"),
    (["--divergence", "alpha", "--alpha", "0"], "--alpha must not be 0 or 1"),
    (["--log-ratio-clip", "0"], "--log-ratio-clip must be positive"),
])
def test_user_errors_are_one_line(tmp_path, other_tokenizer, flags, message):
    flags = [other_tokenizer if f == "OTHER" else f for f in flags]
    assert_user_error("opd_plus.py", "--steps", 1, "--eval-size", 4, "--out", tmp_path / "o", "--dataset", "toy", *flags,
                      message=message)
