"""kdrl.py: the KD estimators' expected gradients through compute_loss, reward-guided masking,
the teacher pass on KD rows only, annealing, tokenizer refusal; end to end through its CLI."""

from types import SimpleNamespace

import pytest
import torch

import common
import tasks
import grpo
import kdrl
from conftest import assert_user_error, check_samples, read_metrics, run_main, run_script


def loss_args(loss_type="bnpo", estimator="k2", beta=0.0, max_new_tokens=4):
    return SimpleNamespace(loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=0.28,
                           max_new_tokens=max_new_tokens, kd_estimator=estimator)


# ---------------------------------------------------------------- estimators, exactly

@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_expected_kd_gradient_through_compute_loss(estimator):
    """On a categorical pi_theta = softmax(theta) over 6 tokens and a fixed teacher q, the exact
    expectation sum_y p(y) grad loss(y) (p not differentiated) of compute_loss with A = 0 is
    grad KL(p||q) for k2 only; k1's is 0 and k3's is grad KL(q||p), the forward KL."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    log_q = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    log_p = torch.log_softmax(theta, 0)
    one = torch.ones(1, 1, dtype=torch.float64)
    expected = torch.zeros(6, dtype=torch.float64)
    for y in range(6):
        logp = log_p[y].view(1, 1)
        loss, _ = kdrl.compute_loss(logp, logp.detach(), None, torch.zeros(1, dtype=torch.float64), one,
                                    loss_args(estimator=estimator), 1, 1, log_q[y].view(1, 1), one, 1.0)
        (grad,) = torch.autograd.grad(loss, theta, retain_graph=True)
        expected += log_p[y].exp().detach() * grad
    p, q = log_p.exp(), log_q.exp()
    (reverse,) = torch.autograd.grad((p * (log_p - log_q)).sum(), theta, retain_graph=True)
    (forward,) = torch.autograd.grad((q * (log_q - log_p)).sum(), theta)
    assert reverse.abs().max() > 0.05 and (reverse - forward).abs().max() > 0.05  # the cases differ
    if estimator == "k2":
        torch.testing.assert_close(expected, reverse, rtol=1e-10, atol=1e-12)
    else:
        assert not torch.allclose(expected, reverse, atol=1e-3)
        torch.testing.assert_close(expected, torch.zeros(6, dtype=torch.float64) if estimator == "k1" else forward,
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kd_gradient_on_old_policy_samples_is_importance_weighted(estimator):
    """--num-iterations > 1: the tokens come from pi_old != pi_theta. The exact expectation under
    pi_old of compute_loss's gradient (old log-probs given, A = 0) is still 0, grad KL(p||q) and
    grad KL(q||p) for k1, k2 and k3: the KD term carries the detached ratio pi_theta / pi_old."""
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    log_old = torch.log_softmax(theta.detach() + 0.8 * torch.randn(6, generator=g, dtype=torch.float64), 0)
    log_q = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    log_p = torch.log_softmax(theta, 0)
    one = torch.ones(1, 1, dtype=torch.float64)
    expected = torch.zeros(6, dtype=torch.float64)
    for y in range(6):
        loss, _ = kdrl.compute_loss(log_p[y].view(1, 1), log_old[y].view(1, 1), None, torch.zeros(1, dtype=torch.float64),
                                    one, loss_args(estimator=estimator), 1, 1, log_q[y].view(1, 1), one, 1.0)
        (grad,) = torch.autograd.grad(loss, theta, retain_graph=True)
        expected += log_old[y].exp() * grad  # y ~ pi_old
    p, q = log_p.exp(), log_q.exp()
    (reverse,) = torch.autograd.grad((p * (log_p - log_q)).sum(), theta, retain_graph=True)
    (forward,) = torch.autograd.grad((q * (log_q - log_p)).sum(), theta)
    assert (log_p.detach() - log_old).abs().max() > 0.3  # pi_old is far from pi_theta
    target = dict(k1=torch.zeros(6, dtype=torch.float64), k2=reverse, k3=forward)[estimator]
    torch.testing.assert_close(expected, target, rtol=1e-10, atol=1e-12)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(3, 4, generator=g, dtype=torch.float64) - 0.1
    ref = logp + 0.2 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    teacher = logp + 0.5 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.5, -0.7, 0.4], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float64)
    return logp, ref, teacher, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_kd_term_is_aggregated_like_the_grpo_term(loss_type):
    """compute_loss = grpo's loss + the same --loss-type aggregation of beta_t * k2 * M^KD."""
    logp, ref, teacher, adv, mask = batch()
    kd_mask = mask * torch.tensor([1.0, 0.0, 1.0])[:, None]  # row 1 masked from KD
    args = loss_args(loss_type, beta=0.04)
    base, _ = grpo.compute_loss(logp, logp, ref, adv, mask, args, 3, mask.sum())
    off, _ = kdrl.compute_loss(logp, logp, ref, adv, mask, args, 3, mask.sum(), teacher, kd_mask, 0.0)
    loss, stats = kdrl.compute_loss(logp, logp, ref, adv, mask, args, 3, mask.sum(), teacher, kd_mask, 0.3)
    assert off.item() == pytest.approx(base.item(), rel=1e-12)
    kd = 0.3 * 0.5 * (teacher - logp) ** 2 * kd_mask
    extra = dict(grpo=(kd.sum(1) / mask.sum(1)).sum() / 3, bnpo=kd.sum() / mask.sum(),
                 dr_grpo=kd.sum() / (3 * 4), dapo=kd.sum() / mask.sum())[loss_type]
    assert loss.item() == pytest.approx(base.item() + extra.item(), rel=1e-10)
    torch.testing.assert_close(stats["kd"] * kd_mask, kd / 0.3)


# ---------------------------------------------------------------- masking and the teacher pass

# G = 4: mixed group; no correct completion; no correct completion (rewards 1.0 from a format
# bonus of --format-coef 1 would not make them correct); all correct
CORRECT = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool)


@pytest.mark.parametrize("mode, rows", [
    ("none", [1] * 16),
    ("response", [0, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]),
    ("group", [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]),
])
def test_masking_removes_exactly_the_intended_tokens(mode, rows):
    kd_row = kdrl.kd_rows(CORRECT, 4, mode)
    assert kd_row.tolist() == rows
    # through the loss: with A = 0 the gradient is the KD term's, nonzero exactly on KD tokens
    g = torch.Generator().manual_seed(1)
    mask = (torch.arange(5)[None] < torch.randint(1, 6, (16,), generator=g)[:, None]).double()  # (16, 5)
    logp = (-torch.rand(16, 5, generator=g, dtype=torch.float64) - 0.1).requires_grad_(True)
    teacher = logp.detach() - 0.5 - torch.rand(16, 5, generator=g, dtype=torch.float64)  # R != 0 everywhere
    kd_mask = mask * kd_row.double()[:, None]
    loss, _ = kdrl.compute_loss(logp, logp.detach(), None, torch.zeros(16, dtype=torch.float64), mask,
                                loss_args("bnpo"), 16, mask.sum(), teacher, kd_mask, 1.0)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.equal(grad != 0, (mask * torch.tensor(rows, dtype=torch.float64)[:, None]) > 0)


def test_teacher_runs_only_on_kd_rows(monkeypatch):
    device = torch.device("cpu")
    student, tok = common.load_model("toy-small", device)
    teacher = common.load_model("toy-large", device, frozen=True)[0]
    torch.manual_seed(0)
    prompts = [tasks.format_prompt(tok, q, instruction="") for q in ("12+34", "57+68", "99+01", "40+45")]
    rollout = common.sample(student, tok, prompts, 4, 8)  # 16 rows
    kd_row = torch.tensor([1, 0, 0, 1, 0, 1, 1, 0] + [0] * 8, dtype=torch.float)  # 2nd micro-batch: no KD
    full = common.token_logprobs(teacher, rollout)
    seen, real = [], common.token_logprobs
    monkeypatch.setattr(common, "token_logprobs", lambda m, ro, *a, **k: seen.append(ro.texts) or real(m, ro, *a, **k))
    args = SimpleNamespace(temperature=1.0, logprob_chunk=5)
    outs = [kdrl.teacher_logprobs(teacher, rollout, idx, kd_row, args) for idx in common.micro_batches(16, 8)]
    assert seen == [[rollout.texts[i] for i in (0, 3, 5, 6)]]  # one call, the KD rows only
    for idx, out in zip(common.micro_batches(16, 8), outs):
        mb = rollout.select(idx)
        assert out.shape == mb.mask.shape
        keep = kd_row[idx][:, None] * mb.mask
        torch.testing.assert_close(out * keep, full[idx, :out.shape[1]] * keep, rtol=1e-5, atol=1e-5)
        assert (out[kd_row[idx] == 0] == 0).all()


def test_kd_mask_follows_correctness_not_a_format_bonus(monkeypatch, tmp_path):
    """Through main(): every completion gets a format bonus of 1 (as --format-coef 1 with every
    answer in the asked-for form), so every reward is >= 1; --kd-mask response must still keep KD
    on exactly the wrong completions' tokens."""
    real_rewards, real_sample, seen = tasks.rewards_for, common.sample, []

    def rewards_for(completions, rows, format_coef=0.0, reward=None, prompts=None):
        s = real_rewards(completions, rows, format_coef, reward, prompts)
        if seen and "correct" not in seen[-1]:  # a training batch: evaluation grades through rewards_for too
            seen[-1]["correct"] = s.correct
        return tasks.Scores(s.reward + 1.0, s.correct, s.grade_errors)

    def sample(*a, **kw):
        ro = real_sample(*a, **kw)
        if not kw.get("greedy"):
            seen.append(dict(rollout=ro))
        return ro

    monkeypatch.setattr(tasks, "rewards_for", rewards_for)
    monkeypatch.setattr(common, "sample", sample)
    run_main("kdrl.py", "--steps", 2, "--eval-size", 4, "--eval-every", 100, "--prompts-per-step", 4, "--kd-mask", "response",
             "--pass-n", 0, "--out", tmp_path / "o")  # --pass-n 0: no pass@k samples
    train = [r for r in read_metrics(tmp_path / "o") if "train/reward" in r]
    assert len(train) == len(seen) == 2
    for r, s in zip(train, seen):
        assert r["train/reward"] >= 1  # the rewards alone would call every completion correct
        lengths, correct = s["rollout"].lengths.float(), s["correct"]
        assert 0 < correct.float().mean() < 1
        assert r["kd/masked_frac"] == pytest.approx((lengths * correct).sum().item() / lengths.sum().item(), abs=1e-6)


# ---------------------------------------------------------------- annealing

def test_annealing_follows_its_schedule():
    a = SimpleNamespace(kd_anneal=True, kd_coef=5e-3, kd_coef_min=1e-3, kd_anneal_rate=5e-5)
    for t in (0, 1, 10, 40, 79, 80, 81, 500):
        assert kdrl.kd_coefficient(t, a) == pytest.approx(max(5e-3 - 5e-5 * t, 1e-3), rel=1e-12)
    assert kdrl.kd_coefficient(40, a) == pytest.approx(3e-3)
    assert kdrl.kd_coefficient(80, a) == pytest.approx(1e-3) and kdrl.kd_coefficient(10 ** 6, a) == 1e-3
    a.kd_anneal = False
    assert {kdrl.kd_coefficient(t, a) for t in (0, 80, 10 ** 6)} == {5e-3}


# ---------------------------------------------------------------- command line

@pytest.mark.parametrize("flags, message", [
    (["--kd-anneal", "--kd-coef", 0.1, "--kd-coef-min", 0.2], "--kd-coef-min (0.2) must not exceed --kd-coef (0.1)"),
    (["--kd-coef", -1], "must be non-negative"),
])
def test_user_errors_are_one_line(tmp_path, flags, message):
    assert_user_error("kdrl.py", "--out", tmp_path / "o", *flags, message=message)


def test_mismatched_tokenizers_are_refused(tmp_path, other_tokenizer):
    assert_user_error("kdrl.py", "--teacher", other_tokenizer, "--dataset", "toy", "--steps", 1, "--out", tmp_path / "o",
                      message=f"'toy-small' and '{other_tokenizer}' have different tokenizers")


def test_kdrl_end_to_end(tmp_path):
    out = tmp_path / "run"
    p = run_script("kdrl.py", "--model", "toy-small", "--teacher", "toy-large", "--steps", 3, "--eval-size", 40,
                   "--eval-every", 2, "--out", out, "--micro-batch-size", 24, "--num-iterations", 2,
                   "--kd-mask", "response", "--kd-anneal", "--kd-coef", 0.5, "--kd-coef-min", 0.1,
                   "--kd-anneal-rate", 0.3)
    assert "eval/accuracy:" in p.stdout
    rows = read_metrics(out)
    train = [r for r in rows if "train/reward" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 2, 3]
    for key in ("train/reward", "train/loss", "train/kl", "train/clip_frac", "train/zero_std_frac",
                "train/entropy", "train/grad_norm", "train/completion_len", "time/step", "time/generate",
                "time/update", "kd/kl", "kd/term", "kd/coef", "kd/masked_frac"):
        assert key in train[0], key
    # t counts training steps, not optimizer steps: with --num-iterations 2 the latter (t = 0, 2, 4)
    # would give 0.5, 0.1, 0.1
    assert [r["kd/coef"] for r in train] == pytest.approx([0.5, 0.2, 0.1])  # t = 0, 1, then the floor
    for r in train:
        assert r["kd/kl"] > 0 and r["kd/term"] > 0 and 0 < r["kd/masked_frac"] < 1
        if r["train/completion_len"] == 4.0:  # equal lengths: masked tokens = correct completions
            assert r["kd/masked_frac"] == pytest.approx(r["train/reward"], abs=1e-6)
    for r in check_samples(out, [0, 2, 3], 4, 8, columns=("kd_term",)):  # the KD term of each completion, per token
        if r["kind"] == "train":  # --kd-mask response: none where the answer is right
            assert (r["kd_term"] is None) if r["correct"] else r["kd_term"] > 0, r
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out / "final")
