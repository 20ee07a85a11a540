"""grpo.py: advantages and every loss type against closed forms; end to end through its CLI."""

import math
from types import SimpleNamespace

import pytest
import torch

import common
import grpo
from conftest import assert_user_error, check_samples, read_metrics, read_samples, run_main, run_script


def test_advantages_closed_form():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4
    a = grpo.compute_advantages(r, 4, "group")
    std = torch.tensor([1.0, 0, 0, 1]).std()  # unbiased: sqrt(1/3)
    torch.testing.assert_close(a[:4], (torch.tensor([1.0, 0, 0, 1]) - 0.5) / (std + 1e-4))
    torch.testing.assert_close(a[4:], torch.zeros(4))  # zero-std group: no signal, no NaN
    b = grpo.compute_advantages(r, 4, "batch")
    torch.testing.assert_close(b[:4], (torch.tensor([1.0, 0, 0, 1]) - 0.5) / (r.std() + 1e-4))
    n = grpo.compute_advantages(r, 4, "none")
    torch.testing.assert_close(n[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def loss_args(loss_type, beta=0.0, eps=0.2, eps_high=0.28, max_new_tokens=4):
    return SimpleNamespace(loss_type=loss_type, beta=beta, epsilon=eps, epsilon_high=eps_high,
                           max_new_tokens=max_new_tokens)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(3, 4, generator=g, dtype=torch.float64) - 0.1
    old = logp + 0.3 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    ref = logp + 0.2 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.5, -0.7, 0.4], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float64)
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_types_closed_form(loss_type):
    logp, old, ref, adv, mask = batch()
    args = loss_args(loss_type, beta=0.04)
    loss, stats = grpo.compute_loss(logp, old, ref, adv, mask, args, n_seqs=3, n_tokens=mask.sum())
    # the same per-token loss written out element by element
    per = torch.zeros(3, 4, dtype=torch.float64)
    for i in range(3):
        for t in range(4):
            rho = float(torch.exp(logp[i, t] - old[i, t]))
            A = float(adv[i])
            clip = min(max(rho, 1 - 0.2), 1 + 0.28)
            d = float(ref[i, t] - logp[i, t])
            per[i, t] = -min(rho * A, clip * A) + 0.04 * (math.exp(d) - d - 1)
    expected = dict(grpo=sum((per[i] * mask[i]).sum() / mask[i].sum() for i in range(3)) / 3,
                    bnpo=(per * mask).sum() / mask.sum(),
                    dr_grpo=(per * mask).sum() / (3 * 4),
                    dapo=(per * mask).sum() / mask.sum())[loss_type]
    assert loss.item() == pytest.approx(float(expected), rel=1e-10)
    d = ref - logp
    torch.testing.assert_close(stats["kl"] * mask, (torch.exp(d) - d - 1) * mask, rtol=1e-12, atol=0)  # k3 of KL(pi||ref)


def test_bnpo_is_a_token_mean_per_micro_batch():
    """bnpo over micro-batches: each micro-batch's own token mean, weighted by its share b / B of
    the sequences; not the whole batch's token mean (dapo), since the micro-batches here hold 4
    and 2 + 1 tokens."""
    logp, old, ref, adv, mask = batch(seed=3)

    def token_sum(i):  # the masked per-token loss summed over rows i (dr_grpo with normaliser 1)
        return grpo.compute_loss(logp[i], old[i], ref[i], adv[i], mask[i], loss_args("dr_grpo", 0.04, max_new_tokens=1),
                                 1, 1)[0]

    parts = [torch.tensor([0]), torch.tensor([1, 2])]
    got = sum(grpo.compute_loss(logp[i], old[i], ref[i], adv[i], mask[i], loss_args("bnpo", 0.04), 3, mask.sum())[0]
              for i in parts)
    expected = sum(token_sum(i) / mask[i].sum() * len(i) / 3 for i in parts)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    batch_mean = token_sum(torch.arange(3)) / mask.sum()
    assert abs(got.item() - batch_mean.item()) > 1e-3  # the case is one where the two differ


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_sum_to_the_full_batch_loss(loss_type):
    logp, old, ref, adv, mask = batch(seed=1)
    args = loss_args(loss_type, beta=0.04)
    full, _ = grpo.compute_loss(logp, old, ref, adv, mask, args, 3, mask.sum())
    parts = sum(grpo.compute_loss(logp[i], old[i], ref[i], adv[i], mask[i], args, 3, mask.sum())[0]
                for i in (torch.tensor([0]), torch.tensor([1, 2])))
    assert parts.item() == pytest.approx(full.item(), rel=1e-10)


def test_on_policy_gradient_is_advantage_times_score():
    """With mu = 1 (old = sg(logp)) the ratio is 1 and the gradient of the grpo loss is
    -sum_i A_i / (|o_i| B) * sum_t grad logp_it."""
    logp, _, _, adv, mask = batch(seed=2)
    logp = logp.clone().requires_grad_(True)
    loss, stats = grpo.compute_loss(logp, logp.detach(), None, adv, mask, loss_args("grpo"), 3, mask.sum())
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(g, -(adv[:, None] * mask / mask.sum(1, keepdim=True)) / 3)
    assert stats["clipped"].sum() == 0 and stats["kl"] is None


def test_clipping_stops_the_gradient_outside_the_trust_region():
    logp = torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0, 0.05]], dtype=torch.float64)  # ratios e^1 (clipped) and e^-0.05
    loss, stats = grpo.compute_loss(logp, old, None, torch.tensor([1.0], dtype=torch.float64),
                                    torch.ones(1, 2, dtype=torch.float64), loss_args("bnpo"), 1, 2)
    (g,) = torch.autograd.grad(loss, logp)
    assert g[0, 0].item() == 0 and g[0, 1].item() < 0
    assert stats["clipped"].tolist() == [[1.0, 0.0]]


# ---------------------------------------------------------------- end to end

@pytest.mark.parametrize("script", ["grpo", "cppo", "kdrl", "opd_plus"])
def test_truncated_frac_counts_completions_without_eos(script, monkeypatch, tmp_path):
    """A completion is truncated when it has no EOS. With --max-new-tokens 4 the toy's answers
    (3 digits, then EOS) mostly end on the last allowed position: those are not truncated."""
    real_sample, rollouts = common.sample, []

    def sample(model, tok, *a, **kw):
        ro = real_sample(model, tok, *a, **kw)
        if not kw.get("greedy"):
            last = ro.completion_ids.gather(1, (ro.lengths - 1)[:, None])[:, 0]  # (B,) the last kept token
            rollouts.append((last != tok.eos_token_id, ro.lengths))
        return ro

    monkeypatch.setattr(common, "sample", sample)
    run_main(f"{script}.py", "--steps", 2, "--eval-size", 4, "--eval-every", 100, "--prompts-per-step", 4,
             "--max-new-tokens", 4, "--pass-n", 0, "--out", tmp_path / "o")  # --pass-n 0: no pass@k samples
    train = [r for r in read_metrics(tmp_path / "o") if "train/reward" in r]
    assert len(train) == len(rollouts) == 2
    for r, (no_eos, lengths) in zip(train, rollouts):
        assert ((lengths == 4) & ~no_eos).any()  # the case that matters: EOS on the 4th token
        assert r["train/truncated_frac"] == pytest.approx(no_eos.float().mean().item(), abs=1e-6)

def test_grpo_end_to_end(tmp_path):
    out = tmp_path / "run"
    p = run_script("grpo.py", "--steps", 3, "--eval-size", 40, "--eval-every", 2, "--out", out,
                   "--micro-batch-size", 24, "--num-iterations", 2, "--loss-type", "dapo")
    assert "eval/accuracy:" in p.stdout
    rows = read_metrics(out)
    train = [r for r in rows if "train/reward" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["step"] for r in evals] == [0, 2, 3]
    for key in ("train/loss", "train/kl", "train/clip_frac", "train/zero_std_frac", "train/entropy",
                "train/grad_norm", "train/completion_len", "time/step", "time/generate", "time/update"):
        assert key in train[0], key
    assert 0 <= evals[0]["eval/accuracy"] <= 1
    for r in evals:  # pass@k is on by default for the toy: n = 16, k = 1, 4, 16
        assert 0 < r["eval/pass@1"] <= r["eval/pass@4"] <= r["eval/pass@16"] <= 1
        assert r["eval/pass@1"] < r["eval/pass@16"]  # toy-small is often wrong: more tries help
        assert r["time/eval"] > r["time/eval_pass_at_k"] > 0
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out / "final")
    assert (out / "config.json").exists() and (out / "checkpoint" / "state.pt").exists()
    check_samples(out, [0, 2, 3], 4, 8)  # --log-samples 4 by default; the toy's G = 8
    printed = [line for line in p.stdout.splitlines() if " sample: " in line]  # one per evaluation, above the bar
    assert [line.split(" sample: ")[0] for line in printed] == ["step 0", "step 2", "step 3"], p.stdout


def test_resume_continues_at_its_step_and_matches_an_uninterrupted_run(tmp_path):
    common_args = ["--eval-size", 20, "--eval-every", 100, "--save-every", 2, "--prompts-per-step", 4]
    full, part = tmp_path / "full", tmp_path / "part"
    run_main("grpo.py", "--steps", 4, "--out", full, *common_args)
    run_main("grpo.py", "--steps", 2, "--out", part, *common_args)
    with open(part / "metrics.jsonl", "a") as f:  # a step logged after the last checkpoint
        f.write('{"step": 3, "train/reward": -1}\n')
    with open(part / "samples.jsonl", "a") as f:  # and its samples
        f.write('{"step": 3, "kind": "eval", "index": 0, "question": "1+1", "gold": "2", "completion": "3"}\n')
    run_main("grpo.py", "--steps", 4, "--out", part, "--resume", *common_args)
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b if "train/reward" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in b if "eval/accuracy" in r] == [0, 2, 4]
    ra = [r["train/reward"] for r in a if "train/reward" in r]
    rb = [r["train/reward"] for r in b if "train/reward" in r]
    assert ra == rb  # same RNG, data order and weights after the resume
    assert a[-1]["eval/accuracy"] == b[-1]["eval/accuracy"]
    # samples.jsonl: appended, the step after the checkpoint dropped, no step twice; step 4 as the uninterrupted run's
    sa, sb = read_samples(full), read_samples(part)
    assert [(r["step"], r["kind"]) for r in sb] == [(0, "eval")] * 4 + [(2, "eval")] * 4 + [(2, "train")] * 8 + \
        [(4, "eval")] * 4 + [(4, "train")] * 8
    assert [r for r in sa if r["step"] == 4] == [r for r in sb if r["step"] == 4]


@pytest.mark.parametrize("flags, message", [
    (["--group-size", 1], "--group-size must be at least 2"),
    (["--steps", -1], "--steps must be non-negative"),
    (["--model", "no-such-model-anywhere", "--dataset", "toy"], "model 'no-such-model-anywhere'"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--dataset", "missing.jsonl"], "dataset file 'missing.jsonl' does not exist"),
    (["--num-iterations", 0], "--num-iterations must be at least 1"),
    (["--pass-n", 8], "--pass-k 1,4,16: each k must be between 1 and --pass-n (8)"),
    (["--pass-k", "1,four"], "--pass-k must be comma-separated integers"),
])
def test_user_errors_are_one_line(tmp_path, flags, message):
    assert_user_error("grpo.py", "--out", tmp_path / "o", *flags, message=message)


def test_occupied_out_needs_resume(tmp_path):
    run_main("grpo.py", "--steps", 0, "--eval-size", 4, "--pass-n", 0, "--out", tmp_path / "o")
    assert_user_error("grpo.py", "--steps", 1, "--out", tmp_path / "o", message="already holds a run")


def test_nan_loss_stops_with_the_step(tmp_path, monkeypatch, capsys):
    real = grpo.compute_loss
    monkeypatch.setattr(grpo, "compute_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1]))
    with pytest.raises(SystemExit) as e:  # the progress bar shares stderr: not assert_user_error's one line
        run_main("grpo.py", "--steps", 3, "--eval-size", 4, "--out", tmp_path / "o", "--prompts-per-step", 2)
    assert e.value.code == 2
    assert "loss is nan at step 1" in capsys.readouterr().err
