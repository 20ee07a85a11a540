"""bdkd.py (BD-KD in CoDistill-GRPO) and the full-vocabulary pieces of common.py it uses:
full_kl against closed forms, the balanced loss and its gradient against the analytic one, the
direction of the balance, paired_logits in chunks against the unchunked distributions of two real
toy models, the ECE of common.evaluate; end to end through the CLI."""

import math
from types import SimpleNamespace

import pytest
import torch

import bdkd
import common
import grading
import tasks
from conftest import assert_user_error, check_samples, read_metrics, run_script


def two_categoricals(seed=0, n=5, V=7, scale_s=1.0, scale_t=1.0):
    g = torch.Generator().manual_seed(seed)
    z_s = (scale_s * torch.randn(n, V, generator=g, dtype=torch.float64)).requires_grad_(True)
    z_t = scale_t * torch.randn(n, V, generator=g, dtype=torch.float64)
    return z_s, z_t


# ---------------------------------------------------------------- full_kl: closed forms

def test_full_kl_is_the_two_kls_and_entropies():
    z_s, z_t = two_categoricals()
    kl_st, kl_ts, h_s, h_t = common.full_kl(z_s, z_t)
    p, q = torch.softmax(z_s, -1).detach(), torch.softmax(z_t, -1)
    kl_st, kl_ts, h_s, h_t = (x.detach() for x in (kl_st, kl_ts, h_s, h_t))
    for i in range(len(p)):  # written out, position by position
        assert kl_st[i].item() == pytest.approx(sum(p[i, v] * math.log(p[i, v] / q[i, v]) for v in range(7)).item(), rel=1e-12)
        assert kl_ts[i].item() == pytest.approx(sum(q[i, v] * math.log(q[i, v] / p[i, v]) for v in range(7)).item(), rel=1e-12)
        assert h_s[i].item() == pytest.approx(-sum(p[i, v] * math.log(p[i, v]) for v in range(7)).item(), rel=1e-12)
        assert h_t[i].item() == pytest.approx(-sum(q[i, v] * math.log(q[i, v]) for v in range(7)).item(), rel=1e-12)
    assert (kl_st > 0).all() and not torch.allclose(kl_st, kl_ts)  # asymmetric: the two directions differ
    (g,) = torch.autograd.grad(common.full_kl(z_s, z_t)[1].sum(), z_s)
    torch.testing.assert_close(g, p - q)  # d KL(q||p) / dz_s = p - q: no gradient reaches the teacher


@pytest.mark.parametrize("kappa", [0.0, 1.0, 5.0])
def test_balanced_loss_and_gradient_against_closed_forms(kappa):
    """L = w KL(p||q) + (1 - w) KL(q||p), w = sigmoid(kappa (H(p) - H(q))) held fixed:
    dL/dz = w p (log p - log q - KL(p||q)) + (1 - w) (p - q)."""
    z_s, z_t = two_categoricals(seed=1)
    kl_st, kl_ts, h_s, h_t = common.full_kl(z_s, z_t)
    loss, w = bdkd.balanced_divergence(kl_st, kl_ts, h_s, h_t, kappa)
    p, q = torch.softmax(z_s, -1).detach(), torch.softmax(z_t, -1)
    w_closed = torch.sigmoid(kappa * (h_s - h_t)).detach()
    torch.testing.assert_close(w, w_closed)
    torch.testing.assert_close(loss, w_closed * kl_st + (1 - w_closed) * kl_ts)
    (grad,) = torch.autograd.grad(loss.sum(), z_s)
    rkl = (p * (p.log() - q.log())).sum(-1, keepdim=True)
    closed = w_closed[:, None] * p * (p.log() - q.log() - rkl) + (1 - w_closed[:, None]) * (p - q)
    torch.testing.assert_close(grad, closed, rtol=1e-10, atol=1e-12)
    if kappa == 0:
        assert torch.equal(w, torch.full_like(w, 0.5))  # no balance: the symmetric (Jeffreys) half-sum


def test_the_balance_leans_to_reverse_kl_where_the_student_is_less_sure():
    """Student flat (higher entropy than the teacher): w > 1/2, the loss leans to reverse KL
    (mode-seeking: sharpens). Student peaked (lower entropy): w < 1/2, forward KL (mass-covering:
    softens). A larger kappa pushes w further the same way; its limit is the sign of the gap."""
    flat_s, peaked_t = two_categoricals(seed=2, scale_s=0.2, scale_t=4.0)
    peaked_s, flat_t = two_categoricals(seed=2, scale_s=4.0, scale_t=0.2)
    for z_s, z_t, above in ((flat_s, peaked_t, True), (peaked_s, flat_t, False)):
        kl_st, kl_ts, h_s, h_t = common.full_kl(z_s, z_t)
        assert ((h_s > h_t) == above).all()
        ws = [bdkd.balanced_divergence(kl_st, kl_ts, h_s, h_t, k)[1] for k in (1.0, 5.0, 1e4)]
        for w_lo, w_hi in zip(ws, ws[1:]):
            assert ((w_hi > w_lo) if above else (w_hi < w_lo)).all()
        assert ((ws[0] > 0.5) if above else (ws[0] < 0.5)).all()
        torch.testing.assert_close(ws[-1], torch.full_like(ws[-1], 1.0 if above else 0.0))
        loss = bdkd.balanced_divergence(kl_st, kl_ts, h_s, h_t, 5.0)[0]
        closer_to = kl_st if above else kl_ts
        farther = kl_ts if above else kl_st
        assert ((loss - closer_to).abs() < (loss - farther).abs()).all()


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_kd_term_is_aggregated_like_the_grpo_term(loss_type):
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(3, 4, generator=g, dtype=torch.float64) - 0.1
    adv = torch.tensor([1.5, -0.7, 0.4], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float64)
    kd = torch.rand(3, 4, generator=g, dtype=torch.float64)
    args = SimpleNamespace(loss_type=loss_type, epsilon=0.2, epsilon_high=0.2, max_new_tokens=4)
    base, _ = bdkd.compute_loss(logp, logp, adv, mask, args, 3, mask.sum())
    loss, _ = bdkd.compute_loss(logp, logp, adv, mask, args, 3, mask.sum(), None, kd)
    km = kd * mask
    extra = dict(grpo=(km.sum(1) / mask.sum(1)).sum() / 3, bnpo=km.sum() / mask.sum(),
                 dr_grpo=km.sum() / 12, dapo=km.sum() / mask.sum())[loss_type]
    assert loss.item() == pytest.approx(base.item() + extra.item(), rel=1e-12)


# ---------------------------------------------------------------- the chunked pass on two real models

def full_logits(model, rollout):
    ids, attn = rollout.input_ids(), rollout.attention_mask()
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    T = rollout.completion_ids.shape[1]
    return model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -T - 1:-1]  # (B, T, V)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_paired_logits_in_chunks_equal_the_full_distributions(models_and_rollout, chunk):
    small, large, _, ro = models_and_rollout
    small.zero_grad(set_to_none=True)
    states = common.completion_states(small, ro)
    with torch.no_grad():
        large_states = common.completion_states(large, ro)
    outs = common.paired_logits(common.full_kl, states, large_states, chunk, temperature=0.7)
    assert all(o.shape == (ro.mask.numel(),) for o in outs)
    assert not any(o.requires_grad for o in outs[3:]) and outs[0].requires_grad
    with torch.no_grad():
        z_l = full_logits(large, ro).reshape(-1, 15) / 0.7
    z_s = full_logits(small, ro).reshape(-1, 15) / 0.7
    ref = common.full_kl(z_s, z_l)
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    m = ro.mask.reshape(-1)
    g_chunk = torch.autograd.grad((outs[0] * m).sum() + (outs[1] * m).sum(), list(small.parameters()))
    g_ref = torch.autograd.grad((ref[0] * m).sum() + (ref[1] * m).sum(), list(small.parameters()))
    for a, b in zip(g_chunk, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-5)  # fp32, summed in another order
    assert all(p.grad is None for p in large.parameters())


def test_evaluate_ece_is_the_binned_confidence_gap(models_and_rollout):
    small, _, tok, _ = models_and_rollout
    rows = tasks.load_data("toy", "eval")[:50]
    m, _ = common.evaluate(small, tok, rows, 8, batch_size=16, ece_bins=10, instruction="")
    acc, ece = m["eval/accuracy"], m["eval/ece"]
    assert acc == common.evaluate(small, tok, rows, 8, batch_size=16, instruction="")[0]["eval/accuracy"]
    with torch.no_grad():
        ro = common.sample(small, tok, [tasks.format_prompt(tok, r, instruction="") for r in rows], 1, 8, greedy=True)
        conf = torch.exp((common.token_logprobs(small, ro) * ro.mask).sum(1)).tolist()
    right = [grading.is_correct(t, r["answer"]) for t, r in zip(ro.texts, rows)]
    bins = {}
    for c, r in zip(conf, right):
        bins.setdefault(min(int(c * 10), 9), []).append(c - r)
    expected = sum(abs(sum(v)) for v in bins.values()) / len(rows)
    assert len(bins) > 2 and 0 < expected < 1
    assert ece == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- command line

def test_bdkd_end_to_end(tmp_path):
    out = tmp_path / "run"
    run_script("bdkd.py", "--steps", 3, "--eval-size", 30, "--eval-every", 2,
             "--prompts-per-step", 4, "--micro-batch-size", 12, "--logprob-chunk", 5, "--large-rollouts", 0, "--out", out)
    rows = read_metrics(out)
    evals = [r for r in rows if "small/eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2, 3]
    for r in evals:
        assert 0 <= r["small/eval/ece"] <= 1 and 0 <= r["large/eval/ece"] <= 1
    train = [r for r in rows if "train/reward" in r]
    assert len(train) == 3
    for r in train:
        for key in ("small/bdkd_weight", "small/bdkd_kl_model_partner", "small/bdkd_kl_partner_model",
                    "large/bdkd_kl_model_partner", "large/bdkd_kl_partner_model", "small/loss", "large/loss"):
            assert math.isfinite(r[key]), key
        assert 0 < r["small/bdkd_weight"] < 1 and r["small/bdkd_kl_model_partner"] > 0
        assert "small/kd_reward" not in r  # BD-KD is a loss: no KD reward
    samples = check_samples(out, [0, 2, 3], 4, 8, columns=("kd_kl", "large_advantage"),
                            advantages=(("reward", "advantage"), ("reward", "large_advantage")))
    assert {r["model"] for r in samples if r["kind"] == "eval"} == {"small", "large"}  # both models' answers
    assert all(r["kd_kl"] != 0 for r in samples if r["kind"] == "train")


def test_bdkd_user_errors_are_one_line(tmp_path):
    assert_user_error("bdkd.py", "--out", tmp_path / "o", "--bdkd-kappa", -1,
                      message="--large-kd-coef and --bdkd-kappa must be non-negative")
