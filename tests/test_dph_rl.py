"""dph_rl.py: each divergence's generator form gives the exact gradient of D_f(pi_theta || pi_ref) in
expectation over pi_ref (proved by enumeration on a categorical); the D_pef split; the cached
pre-sampling stage and --resume; one-line errors; end to end through its CLI."""

import math
from types import SimpleNamespace

import pytest
import torch

import common
import dph_rl
from conftest import assert_user_error, check_samples, read_metrics, run_main, run_script
from reference import naive_token_logprobs

DIVERGENCES = [("forward", 0.2), ("js", 0.2), ("alpha", 0.2), ("alpha", 0.7)]


def loss_args(divergence="forward", alpha=0.2, eta=1.0):
    return SimpleNamespace(divergence=divergence, alpha=alpha, eta=eta)


# ---------------------------------------------------------------- the generator forms

def test_generators_are_the_official_forms_and_vanish_at_one():
    u = torch.tensor([0.01, 0.3, 1.0, 2.5, 40.0], dtype=torch.float64)
    lu = torch.log(u)
    torch.testing.assert_close(common.f_of_log_u("forward", lu), u - 1 - lu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(common.f_of_log_u("js", lu), u * lu - (u + 1) * torch.log((u + 1) / 2),
                               rtol=1e-12, atol=1e-12)
    a = 0.2
    torch.testing.assert_close(common.f_of_log_u("alpha", lu, a), (u ** (1 - a) - (1 - a) * u - a) / (a * (a - 1)),
                               rtol=1e-12, atol=1e-12)
    # the same f as common's divergences, where one exists: js is twice the half-form JSD, alpha is alpha
    torch.testing.assert_close(common.f_of_log_u("js", lu), 2 * common.f_divergence("jsd")[0](u), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(common.f_of_log_u("alpha", lu, 0.7), common.f_divergence("alpha", 0.7)[0](u),
                               rtol=1e-12, atol=1e-12)
    for name, al in DIVERGENCES:
        f = common.f_of_log_u(name, lu, al)
        assert f[2].abs() < 1e-12 and (f[[0, 1, 3, 4]] > 0).all()  # f(1) = 0, f > 0 elsewhere


def categorical(seed, V=7):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(V, generator=g, dtype=torch.float64).requires_grad_(True)
    ref = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64) * 1.5, 0)
    return theta, ref


def closed_form_divergence(name, p, r, alpha):
    """D_f(p || r) written without the generator: forward KL(r || p); 2 JS through the mixture; Amari's alpha."""
    if name == "forward":
        return (r * torch.log(r / p)).sum()
    if name == "js":
        m = (p + r) / 2
        return (p * torch.log(p / m)).sum() + (r * torch.log(r / m)).sum()
    return ((p ** (1 - alpha) * r ** alpha).sum() - 1) / (alpha * (alpha - 1))


def expected_loss(theta, ref, name, alpha, sampler):
    """E_{y ~ sampler}[pef_loss] by enumeration, computed by pef_loss itself: one one-token 'completion'
    per vocabulary entry y, weighted through the mask by sampler(y); n_tokens = 1, eta = 1."""
    logp = torch.log_softmax(theta, 0)  # (V,)
    V = len(theta)
    loss, _ = dph_rl.pef_loss(logp.view(V, 1), torch.log(ref).view(V, 1), sampler.detach().view(V, 1),
                              loss_args(name, alpha), n_tokens=1)
    return loss


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name, alpha", DIVERGENCES)
def test_generator_form_gradient_over_reference_samples_is_exact(name, alpha, seed):
    """pi_ref does not depend on theta: E_{y ~ pi_ref}[grad f(u(y))] = grad D_f(pi_theta || pi_ref), exactly."""
    theta, ref = categorical(seed)
    loss = expected_loss(theta, ref, name, alpha, ref)
    p = torch.softmax(theta, 0)
    exact = closed_form_divergence(name, p, ref, alpha)
    assert loss.item() == pytest.approx(exact.item(), rel=1e-10)  # the value is unbiased too
    (g,) = torch.autograd.grad(loss, theta)
    (g_exact,) = torch.autograd.grad(closed_form_divergence(name, torch.softmax(theta, 0), ref, alpha), theta)
    assert g_exact.norm() > 1e-2
    torch.testing.assert_close(g, g_exact, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name, alpha", DIVERGENCES)
def test_the_same_form_on_policy_samples_is_biased(name, alpha):
    """Why the stored reference completions matter: the pathwise gradient over samples of pi_theta
    (what on-policy rollouts would give) misses the score-function term and is not grad D_f."""
    theta, ref = categorical(3)
    loss = expected_loss(theta, ref, name, alpha, torch.softmax(theta, 0))
    (g,) = torch.autograd.grad(loss, theta)
    (g_exact,) = torch.autograd.grad(closed_form_divergence(name, torch.softmax(theta, 0), ref, alpha), theta)
    assert (g - g_exact).norm() > 0.05 * g_exact.norm()


@pytest.mark.parametrize("name, alpha", DIVERGENCES)
def test_pef_loss_gradient_and_token_mean(name, alpha):
    """d/dl [eta f(e^(l - l_ref)) / n] = eta u f'(u) / n on unmasked tokens, 0 on masked ones."""
    g = torch.Generator().manual_seed(4)
    logp = (-torch.rand(3, 4, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    ref = -torch.rand(3, 4, generator=g, dtype=torch.float64) * 2
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float64)
    loss, f_u = dph_rl.pef_loss(logp, ref, mask, loss_args(name, alpha, eta=0.3), n_tokens=mask.sum())
    (grad,) = torch.autograd.grad(loss, logp)
    u = torch.exp(logp.detach() - ref)
    u_f_prime = dict(forward=u - 1, js=u * torch.log(2 * u / (u + 1)), alpha=(u - u ** (1 - alpha)) / alpha)[name]
    torch.testing.assert_close(grad, 0.3 * u_f_prime * mask / mask.sum(), rtol=1e-10, atol=1e-12)
    assert loss.item() == pytest.approx(0.3 * float((f_u.detach() * mask).sum() / mask.sum()), rel=1e-12)
    parts = sum(dph_rl.pef_loss(logp[i], ref[i], mask[i], loss_args(name, alpha, eta=0.3), mask.sum())[0]
                for i in (torch.tensor([0]), torch.tensor([1, 2])))
    assert parts.item() == pytest.approx(loss.item(), rel=1e-12)  # micro-batches sum to the step's loss


def test_grpo_part_has_no_kl_term():
    logp = torch.tensor([[-0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    args = SimpleNamespace(loss_type="dapo", epsilon=0.2, epsilon_high=0.28, max_new_tokens=2)
    loss, _ = dph_rl.compute_loss(logp, logp.detach(), torch.tensor([0.0], dtype=torch.float64),
                                  torch.ones(1, 2, dtype=torch.float64), args, 1, 2)
    (g,) = torch.autograd.grad(loss, logp)
    assert loss.item() == 0 and g.abs().max() == 0  # A = 0: nothing pulls the policy anywhere


# ---------------------------------------------------------------- the D_pef split

def test_split_threshold():
    n = torch.tensor([8, 7, 0, 8, 1])
    assert dph_rl.split_pef(n, 8).tolist() == [True, False, False, True, False]
    assert dph_rl.split_pef(n, 7).tolist() == [True, True, False, True, False]


def scripted_sample(solved: dict):
    """A stand-in for common.sample: question q's first solved[q] completions answer right, the rest
    wrong (the right answer plus 1), each as the toy's tokens, then EOS."""
    def sample(model, tok, prompts, group_size, max_new_tokens, temperature=1.0, greedy=False):
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        texts = []
        for p in prompts:
            a, b = map(int, p.rstrip("=").split("+"))
            texts += [f"{a + b + (j >= solved[(a, b)]):03d}" for j in range(group_size)]
        ids = torch.tensor([tok(t).input_ids + [tok.eos_token_id] for t in texts])  # (B, 4)
        mask, lengths, truncated = common.completion_mask(ids, [tok.eos_token_id])
        return common.Rollout(enc.input_ids.repeat_interleave(group_size, 0),
                              enc.attention_mask.repeat_interleave(group_size, 0), ids, mask, lengths, texts, truncated)
    return sample


def test_presample_k_of_k_goes_to_pef_and_k_minus_one_to_exp(monkeypatch):
    k = 4
    solved = {(12, 34): k, (55, 66): k - 1, (7, 8): 0, (40, 50): k}
    rows = [dict(question=f"{a:02d}+{b:02d}", answer=str(a + b)) for a, b in solved]
    monkeypatch.setattr(common, "sample", scripted_sample(solved))
    model, tok = common.load_model("toy-small", torch.device("cpu"))
    args = SimpleNamespace(presample_k=k, pef_threshold=0, prompts_per_step=3, instruction="", system_prompt=None,
                           max_new_tokens=8, temperature=1.0, micro_batch_size=5, logprob_chunk=1024)
    n_correct, store, ref_logp = dph_rl.presample(model, tok, rows, args)
    assert n_correct.tolist() == [k, k - 1, 0, k]
    assert dph_rl.split_pef(n_correct, k).tolist() == [True, False, False, True]
    assert store.texts == ["046"] * k + ["090"] * k  # every completion of the k-of-k questions, in question order
    assert ref_logp.shape == store.mask.shape == (2 * k, 4)
    # the stored log-probs are the initial policy's on exactly these tokens
    torch.testing.assert_close(ref_logp, naive_token_logprobs(model, store) * store.mask, rtol=1e-5, atol=1e-5)
    # a lower threshold keeps only the correct completions of the k-1-of-k question
    args.pef_threshold = k - 1
    n_correct, store, _ = dph_rl.presample(model, tok, rows, args)
    assert store.texts == ["046"] * k + ["121"] * (k - 1) + ["090"] * k


# ---------------------------------------------------------------- end to end

BASE = ["--eval-size", 20, "--prompts-per-step", 4, "--presample-size", 32, "--presample-k", 4, "--pef-batch", 4]


@pytest.mark.parametrize("flags", [[], ["--divergence", "js", "--eta", "0.1", "--micro-batch-size", 3],
                                   ["--divergence", "alpha", "--num-iterations", 2, "--loss-type", "grpo"]],
                         ids=["forward", "js", "alpha"])
def test_end_to_end_each_divergence(tmp_path, flags):
    out = tmp_path / "run"
    cmd = ("dph_rl.py", "--steps", 3, "--eval-every", 2, "--out", out, *BASE, *flags)
    stdout = run_main(*cmd) if flags else run_script(*cmd).stdout  # the defaults through the real entry point
    assert "eval/accuracy:" in stdout and "pre-sampling: 32 questions x 4:" in stdout
    rows = read_metrics(out)
    train = [r for r in rows if "train/reward" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 2, 3]
    for r in train:
        for key in ("train/loss", "train/clip_frac", "train/entropy", "train/grad_norm", "dph/divergence",
                    "dph/pef_tokens", "time/step"):
            assert key in r and math.isfinite(r[key]), key
        assert r["dph/divergence"] >= 0 and r["dph/pef_tokens"] > 0 and "train/kl" not in r
    assert train[0]["dph/divergence"] < 1e-6  # step 1 starts at pi_theta = pi_ref: u = 1
    assert (out / "presample.pt").exists() and (out / "final" / "config.json").exists()
    # samples: a D_exp group, and the step's stored D_pef answers (each right, as graded) with their mean f(u)
    pef = [r for r in check_samples(out, [0, 2, 3], 4, 8) if r["kind"] == "pef"]
    assert [r["step"] for r in pef] == [2] * 4 + [3] * 4 and all(r["correct"] and r["f_u"] >= 0 for r in pef)
    assert len({r["question"] for r in pef}) > 1


def test_resume_reads_the_stage_back_and_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    calls = []
    real = dph_rl.presample
    monkeypatch.setattr(dph_rl, "presample", lambda *a, **k: calls.append(1) or real(*a, **k))
    flags = [*BASE, "--eval-every", 100, "--save-every", 2]
    full, part = tmp_path / "full", tmp_path / "part"
    run_main("dph_rl.py", "--steps", 3, "--out", full, *flags)
    run_main("dph_rl.py", "--steps", 2, "--out", part, *flags)
    assert len(calls) == 2
    run_main("dph_rl.py", "--steps", 3, "--out", part, "--resume", *flags)
    assert len(calls) == 2  # the resumed run did not sample the stage again
    a, b = read_metrics(full), read_metrics(part)
    key = lambda r: (r["train/reward"], r["dph/divergence"], r["train/grad_norm"])
    assert [key(r) for r in a if "train/reward" in r] == [key(r) for r in b if "train/reward" in r]
    assert max(r["dph/divergence"] for r in b if "train/reward" in r) > 0  # the step-3 term saw a moved policy
    assert a[-1]["eval/accuracy"] == b[-1]["eval/accuracy"]


@pytest.mark.parametrize("flags, message", [
    (["--eta", "-0.1"], "--eta must be non-negative"),
    (["--presample-k", "4", "--pef-threshold", "5"], "--pef-threshold must be between 1 and --presample-k (4)"),
    (["--divergence", "alpha", "--alpha", "1.5"], "--alpha must be in (0, 1)"),
    (["--presample-k", "0"], "--presample-k must be at least 1"),
    (["--group-size", "1"], "--group-size must be at least 2"),
])
def test_user_errors_are_one_line(tmp_path, flags, message):
    assert_user_error("dph_rl.py", "--steps", 1, "--out", tmp_path / "o", *flags, message=message)


def test_resume_without_the_stage_is_one_line(tmp_path):
    out = tmp_path / "o"
    run_main("dph_rl.py", "--steps", 1, "--out", out, *BASE, "--eval-size", 4)
    (out / "presample.pt").unlink()
    assert_user_error("dph_rl.py", "--steps", 2, "--out", out, "--resume", *BASE, message="no pre-sampling stage")
