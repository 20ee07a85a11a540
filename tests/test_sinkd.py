"""sinkd.py (SinKD): the Sinkhorn plan's marginals, the exact optimal transport
of a 3x3 problem as eps -> 0, the top-k support with its remainder bucket, gradients against
finite differences, the chunked term on real toy models; end to end through the CLI."""

import itertools
from types import SimpleNamespace

import pytest
import torch

import common
import sinkd
import tasks
from conftest import assert_user_error, check_samples, read_metrics, run_script


def test_plan_marginals():
    g = torch.Generator().manual_seed(0)
    K = torch.exp(-torch.rand(5, 5, generator=g, dtype=torch.float64) / 0.1)
    P = sinkd.sinkhorn_plan(K, 20)
    torch.testing.assert_close(P.sum(0), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-12)  # columns: exact
    torch.testing.assert_close(P.sum(1), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-6)  # rows: converged
    assert (sinkd.sinkhorn_plan(K, 1).sum(1) - 1).abs().max() > 1e-3  # ... which one iteration is not
    assert (P > 0).all()


def test_transport_is_the_exact_optimal_transport_as_eps_goes_to_0():
    """3 student and 3 teacher distributions over 4 tokens: with P's marginals 1 (SinKD's), the
    exact transport is an assignment (Birkhoff), min over the 6 permutations of sum_i W_i,s(i)."""
    g = torch.Generator().manual_seed(1)
    z_s, z_t = 2 * torch.randn(3, 4, generator=g, dtype=torch.float64), 2 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    p, q = torch.softmax(z_s, -1), torch.softmax(z_t, -1)
    W = torch.tensor([[float((p[i] - q[j]).abs().sum()) for j in range(3)] for i in range(3)], dtype=torch.float64)
    costs = sorted(sum(W[i, s[i]] for i in range(3)).item() for s in itertools.permutations(range(3)))
    assert costs[1] - costs[0] > 0.05  # a unique optimum, clearly apart from the next assignment
    gaps = []
    for eps in (0.1, 0.03, 0.01):  # smaller eps needs ever more iterations for the rows to converge
        row_cost, coverage = sinkd.sinkhorn_chunk(z_s, z_t, topk=4, eps=eps, iters=20000)
        gaps.append(row_cost.sum().item() - costs[0])
        torch.testing.assert_close(coverage, torch.ones(3, dtype=torch.float64))
    assert gaps[0] > gaps[1] > gaps[2] >= 0 and gaps[2] < 1e-4  # the entropic cost falls to the exact one


def test_topk_support_and_remainder_bucket():
    """k < V: the k tokens with the most teacher mass over the chunk's positions, the rest merged
    into one bucket; coverage is the teacher mass on the k; k >= V is the untruncated transport,
    and truncation only lowers each L1 cost."""
    g = torch.Generator().manual_seed(2)
    z_s, z_t = torch.randn(4, 9, generator=g, dtype=torch.float64), 2 * torch.randn(4, 9, generator=g, dtype=torch.float64)
    q = torch.softmax(z_t, -1)
    top = q.sum(0).topk(3).indices
    _, coverage = sinkd.sinkhorn_chunk(z_s, z_t, topk=3, eps=0.1, iters=20)
    torch.testing.assert_close(coverage, q[:, top].sum(1))
    assert (coverage < 1).all()
    full, cov_full = sinkd.sinkhorn_chunk(z_s, z_t, topk=9, eps=0.1, iters=20)
    torch.testing.assert_close(full, sinkd.sinkhorn_chunk(z_s, z_t, topk=10 ** 6, eps=0.1, iters=20)[0])
    torch.testing.assert_close(cov_full, torch.ones(4, dtype=torch.float64))
    p = torch.softmax(z_s, -1)

    def merged(x):
        return torch.cat([x[:, top], 1 - x[:, top].sum(1, keepdim=True)], 1)
    W_full, W_trunc = torch.cdist(p, q, p=1), torch.cdist(merged(p), merged(q), p=1)
    assert (W_trunc <= W_full + 1e-12).all() and (W_trunc < W_full - 1e-3).any()
    # the truncated cost is the transport under the merged cost, written out
    P = sinkd.sinkhorn_plan(torch.exp(-W_trunc / 0.1), 20)
    torch.testing.assert_close(sinkd.sinkhorn_chunk(z_s, z_t, topk=3, eps=0.1, iters=20)[0], (P * W_trunc).sum(1))


def test_gradient_flows_through_plan_and_cost():
    g = torch.Generator().manual_seed(3)
    z_s = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(4, 6, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: sinkd.sinkhorn_chunk(z, z_t, 3, 0.1, 20)[0], (z_s,))
    # through P as well as W: the gradient differs from the one with the plan held fixed
    def fixed_plan(z):
        p, q = torch.softmax(z, -1), torch.softmax(z_t, -1)
        W = torch.cdist(p, q, p=1)
        return (sinkd.sinkhorn_plan(torch.exp(-W / 0.1), 20).detach() * W).sum()
    (a,) = torch.autograd.grad(sinkd.sinkhorn_chunk(z_s, z_t, 6, 0.1, 20)[0].sum(), z_s)
    (b,) = torch.autograd.grad(fixed_plan(z_s), z_s)
    assert (a - b).abs().max() > 1e-4


# ---------------------------------------------------------------- the chunked term on real models

def test_sinkhorn_term_on_toy_models():
    device = torch.device("cpu")
    student, tok = common.load_model("toy-small", device)
    teacher = common.load_model("toy-large", device, frozen=True)[0]
    torch.manual_seed(0)
    prompts = [tasks.format_prompt(tok, q, instruction="") for q in ("12+34", "57+68", "99+01")]
    ro = common.sample(student, tok, prompts, 4, 8)  # 12 rows
    kd_mask = ro.mask * torch.tensor([1.0, 0, 1, 1] * 3)[:, None]  # some rows off KD
    args = SimpleNamespace(sinkhorn_topk=5, sinkhorn_eps=0.1, sinkhorn_iters=20, sinkhorn_temperature=2.0,
                           logprob_chunk=10 ** 6)
    states = common.completion_states(student, ro)
    with torch.no_grad():
        teacher_states = common.completion_states(teacher, ro)
    cost, coverage = sinkd.sinkhorn_term(states, teacher_states, kd_mask, args)
    assert cost.shape == kd_mask.shape and (cost[kd_mask == 0] == 0).all() and (cost[kd_mask > 0] > 0).all()
    assert ((coverage[kd_mask > 0] > 0) & (coverage[kd_mask > 0] < 1)).all()  # 5 of 15 tokens kept
    # one chunk holding every KD position: sinkhorn_chunk on the full logits of those positions
    T = ro.completion_ids.shape[1]
    ids, attn = ro.input_ids(), ro.attention_mask()
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    keep = kd_mask.reshape(-1) > 0
    z_s = student(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -T - 1:-1].reshape(-1, 15)[keep]
    with torch.no_grad():
        z_t = teacher(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -T - 1:-1].reshape(-1, 15)[keep]
    ref, ref_cov = sinkd.sinkhorn_chunk(z_s / 2.0, z_t / 2.0, 5, 0.1, 20)
    torch.testing.assert_close(cost.reshape(-1)[keep], ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(coverage.reshape(-1)[keep], ref_cov, rtol=1e-5, atol=1e-6)
    g1 = torch.autograd.grad(cost.sum(), list(student.parameters()))
    g2 = torch.autograd.grad(ref.sum(), list(student.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-5)
    # smaller chunks: each chunk is its own transport batch, so the cost changes but stays per position
    args.logprob_chunk = 7
    chunked, _ = sinkd.sinkhorn_term(states, teacher_states, kd_mask, args)
    assert (chunked[kd_mask == 0] == 0).all() and not torch.allclose(chunked, cost)


def test_compute_loss_uses_the_sinkhorn_cost_on_kd_tokens():
    g = torch.Generator().manual_seed(4)
    logp = -torch.rand(3, 4, generator=g, dtype=torch.float64) - 0.1
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float64)
    kd_mask = mask * torch.tensor([1.0, 0.0, 1.0])[:, None]
    cost = torch.rand(3, 4, generator=g, dtype=torch.float64)
    args = SimpleNamespace(loss_type="bnpo", beta=0.0, epsilon=0.2, epsilon_high=0.2, max_new_tokens=4, kd_estimator="k2")
    adv = torch.tensor([1.5, -0.7, 0.4], dtype=torch.float64)
    base, _ = sinkd.compute_loss(logp, logp, None, adv, mask, args, 3, mask.sum(), cost, kd_mask, 0.0)
    loss, s = sinkd.compute_loss(logp, logp, None, adv, mask, args, 3, mask.sum(), cost, kd_mask, 0.3)
    assert loss.item() == pytest.approx(base.item() + 0.3 * (cost * kd_mask).sum().item() / mask.sum().item(), rel=1e-12)
    assert "kd_kl" not in s and torch.equal(s["kd"], cost * kd_mask)


# ---------------------------------------------------------------- command line

def test_sinkd_end_to_end(tmp_path):
    out = tmp_path / "run"
    run_script("sinkd.py", "--steps", 3, "--eval-size", 30, "--eval-every", 2,
             "--prompts-per-step", 4, "--micro-batch-size", 12, "--logprob-chunk", 20, "--sinkhorn-topk", 6,
             "--kd-mask", "response", "--out", out)
    rows = read_metrics(out)
    train = [r for r in rows if "train/reward" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 2, 3]
    for r in train:
        assert r["kd/term"] > 0 and 0 < r["kd/sinkhorn_coverage"] < 1 and "kd/kl" not in r
        assert r["train/loss"] == r["train/loss"] and r["train/grad_norm"] < 1e6  # finite
    for r in check_samples(out, [0, 2, 3], 4, 8, columns=("kd_term",)):  # the transport cost of each completion
        if r["kind"] == "train":  # --kd-mask response: none where the answer is right
            assert (r["kd_term"] is None) if r["correct"] else r["kd_term"] > 0, r


def test_sinkhorn_user_errors_are_one_line(tmp_path):
    assert_user_error("sinkd.py", "--out", tmp_path / "o", "--sinkhorn-eps", 0,
                      message="--sinkhorn-temperature and --sinkhorn-eps must be positive")
