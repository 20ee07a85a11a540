"""cppo.py: which completions pruning keeps, that pruned rows never reach a forward, that dynamic
allocation keeps the trained budget fixed, and the command line end to end."""

from collections import Counter

import pytest
import torch

import common
import cppo
from conftest import assert_user_error, check_samples, read_metrics, read_samples, run_main, run_script


def test_kept_per_group_is_floor_without_float_error():
    assert cppo.kept_per_group(16, 0.875) == 2
    assert cppo.kept_per_group(16, 0.5) == 8
    assert cppo.kept_per_group(16, 0.9) == 1  # 1.6
    assert cppo.kept_per_group(10, 0.9) == 1  # 10 * (1 - 0.9) = 0.99999... in floating point
    assert cppo.kept_per_group(10, 0.7) == 3
    assert cppo.kept_per_group(16, 0.95) == 0
    assert cppo.kept_per_group(8, 0.0) == 8


def test_group_scope_keeps_exactly_the_top_k_abs_advantages_of_each_group():
    adv = torch.tensor([0.1, -2.0, 0.5, 1.0,   # group 0: |A| order 1, 3, 2, 0
                        0.0, 0.0, 0.0, 0.0,    # group 1: all tied (zero-std group)
                        -0.3, 0.3, 0.9, -0.3])  # group 2: 2 first, then a tie 0/1/3
    kept = cppo.select_completions(adv, 4, k=2, budget=6, scope="group", metric="smallest")
    assert kept.tolist() == [1, 3, 4, 5, 8, 10]  # ties keep the earlier rows
    kept = cppo.select_completions(adv, 4, k=3, budget=9, scope="group", metric="smallest")
    assert kept.tolist() == [1, 2, 3, 4, 5, 6, 8, 9, 10]


def test_group_scope_matches_brute_force_on_random_advantages():
    g = torch.Generator().manual_seed(0)
    G, N, k = 16, 5, 2
    adv = torch.randn(N * G, generator=g)
    kept = cppo.select_completions(adv, G, k, N * k, "group", "smallest")
    for q in range(N):
        rows = [i for i in kept.tolist() if q * G <= i < (q + 1) * G]
        best = sorted(range(q * G, (q + 1) * G), key=lambda i: -abs(adv[i].item()))[:k]
        assert sorted(rows) == sorted(best)


def test_batch_scope_keeps_the_top_abs_advantages_of_the_whole_batch():
    adv = torch.tensor([0.1, -2.0, 0.5, 1.0,
                        0.0, 0.0, 0.0, 0.0,
                        -0.3, 0.3, 0.9, -0.3])
    kept = cppo.select_completions(adv, 4, k=2, budget=6, scope="batch", metric="smallest")
    assert kept.tolist() == [1, 2, 3, 8, 9, 10]  # |A| 2, 1, .9, .5, then the first two of the .3 tie
    # the zero-std group loses all its completions, unlike in group scope
    assert not set(kept.tolist()) & {4, 5, 6, 7}


def test_batch_scope_keeps_n_times_floor_not_the_official_codes_count(monkeypatch, tmp_path):
    """G 10, P 0.75: k = floor(2.5) = 2 a question, so 2 questions keep 4 in either scope; the
    official code's batch top-k would keep B - int(B P) = 20 - 15 = 5 (cppo.py's docstring, 2)."""
    adv = torch.randn(20, generator=torch.Generator().manual_seed(0))
    k = cppo.kept_per_group(10, 0.75)
    assert k == 2 and len(cppo.select_completions(adv, 10, k, 2 * k, "batch", "smallest")) == 4
    seen, rows = run_in_process(monkeypatch, tmp_path, "--steps", 1, "--group-size", 10, "--prune-rate", 0.75,
                                "--prompts-per-step", 2, "--prune-scope", "batch", "--no-dynamic-allocation")
    assert (seen["sampled_rows"], seen["loss_rows"]) == (20, 4)


def test_largest_drops_the_largest_and_random_keeps_k_per_group():
    adv = torch.tensor([0.1, -2.0, 0.5, 1.0, -0.3, 0.3, 0.9, -0.7])
    kept = cppo.select_completions(adv, 4, 2, 4, "group", "largest")
    assert kept.tolist() == [0, 2, 4, 5]  # the smallest |A| of each group survive
    draws = set()
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        kept = cppo.select_completions(adv, 4, 2, 4, "group", "random", generator=g)
        assert ((kept < 4).sum(), (kept >= 4).sum()) == (2, 2)
        again = cppo.select_completions(adv, 4, 2, 4, "group", "random", generator=torch.Generator().manual_seed(seed))
        assert torch.equal(kept, again)  # reproducible given the generator
        draws.add(tuple(kept.tolist()))
    assert len(draws) > 5  # and not a fixed choice


def test_surplus_over_the_budget_drops_the_lowest_abs_advantages_later_rows_first():
    # k = 3 kept in each of 3 groups is 9 > budget 8: one more goes, the lowest |A| among the kept;
    # that is 0.4, at rows 2, 4 and 6: the latest, row 6, goes
    adv = torch.tensor([2.0, 1.0, 0.4, 0.0, 0.4, 0.5, 0.4, 0.0, 3.0, 1.0, 0.6, 0.0])
    kept = cppo.select_completions(adv, 4, k=3, budget=8, scope="group", metric="smallest")
    assert kept.tolist() == [0, 1, 2, 4, 5, 8, 9, 10]


# ---------------------------------------------------------------- the update sees only kept rows

def run_in_process(monkeypatch, tmp_path, *flags):
    """Run cppo.main() here; record the rows (token ids under the attention mask) every decoder
    forward sees outside sampling and evaluation (old, reference and policy passes), the rows
    pruning keeps, and the advantages each loss call gets."""
    real_load, real_sample, real_loss = common.load_model, common.sample, cppo.compute_loss
    real_select = cppo.select_completions
    seen = dict(generating=False, forward_rows=[], kept_rows=[], loss_rows=0, sampled_rows=0, rollout=None)

    def rows_of(ids, attn):
        return [tuple(i[a == 1].tolist()) for i, a in zip(ids, attn)]

    def load_model(*a, **kw):
        model, tok = real_load(*a, **kw)

        def count(module, args, kwargs):
            if not seen["generating"]:
                seen["forward_rows"] += rows_of(kwargs["input_ids"], kwargs["attention_mask"])
        model.get_decoder().register_forward_pre_hook(count, with_kwargs=True)
        return model, tok

    def sample(*a, **kw):
        seen["generating"] = True
        try:
            ro = real_sample(*a, **kw)
        finally:
            seen["generating"] = False
        if not kw.get("greedy"):
            seen["sampled_rows"] += ro.completion_ids.shape[0]
            seen["rollout"] = ro
        return ro

    def select_completions(*a, **kw):
        kept = real_select(*a, **kw)
        ro = seen["rollout"]
        seen["kept_rows"] += [r for i, r in enumerate(rows_of(ro.input_ids(), ro.attention_mask())) if i in kept]
        return kept

    def compute_loss(logp, old_logp, ref_logp, advantages, mask, args, n_seqs, n_tokens):
        seen["loss_rows"] += len(advantages)
        assert logp.shape[0] == len(advantages) == mask.shape[0]
        return real_loss(logp, old_logp, ref_logp, advantages, mask, args, n_seqs, n_tokens)

    monkeypatch.setattr(common, "load_model", load_model)
    monkeypatch.setattr(common, "sample", sample)
    monkeypatch.setattr(cppo, "compute_loss", compute_loss)
    monkeypatch.setattr(cppo, "select_completions", select_completions)
    run_main("cppo.py", "--out", tmp_path / "o", "--eval-size", 4, "--eval-every", 100, "--pass-n", 0,  # no pass@k: every
             *flags)                                                                                # sample is training's
    return seen, read_metrics(tmp_path / "o")


def test_pruned_rows_never_reach_a_forward_and_the_budget_is_fixed(monkeypatch, tmp_path):
    # G 4, P 0.5: k 2; budget 3 x 4 = 12 trained rows, from ceil(12 / 2) = 6 questions (24 sampled)
    steps, mu = 2, 2
    seen, rows = run_in_process(monkeypatch, tmp_path, "--steps", steps, "--group-size", 4, "--prune-rate", 0.5,
                                "--prompts-per-step", 3, "--num-iterations", mu, "--beta", 0.04,
                                "--micro-batch-size", 5)
    assert seen["sampled_rows"] == steps * 24
    assert seen["loss_rows"] == steps * mu * 12
    # policy passes (mu), one old pass (mu > 1), one reference pass (beta > 0): each on exactly
    # the kept rows, and nothing else ever reaches the decoder
    assert len(seen["kept_rows"]) == steps * 12
    assert Counter(seen["forward_rows"]) == Counter(seen["kept_rows"] * (mu + 1 + 1))
    train = [r for r in rows if "train/reward" in r]
    assert [r["cppo/questions"] for r in train] == [6, 6]
    assert [r["cppo/kept_frac"] for r in train] == [0.5, 0.5]


def test_allocation_off_samples_prompts_per_step_and_keeps_k_each(monkeypatch, tmp_path):
    seen, rows = run_in_process(monkeypatch, tmp_path, "--steps", 1, "--group-size", 8, "--prune-rate", 0.625,
                                "--prompts-per-step", 1, "--no-dynamic-allocation")
    assert (seen["sampled_rows"], seen["loss_rows"]) == (8, 3)  # 1 question, k = 3 of 8 kept
    group = [r for r in read_samples(tmp_path / "o") if r["kind"] == "train"]  # samples.jsonl shows which
    assert len(group) == 8 and sum(r["kept"] for r in group) == 3
    assert min(abs(r["advantage"]) for r in group if r["kept"]) >= max(abs(r["advantage"]) for r in group if not r["kept"])


def test_allocation_trims_the_surplus_to_the_budget(monkeypatch, tmp_path):
    # k = 3, budget 8: ceil(8 / 3) = 3 questions, 9 kept, 8 trained
    seen, rows = run_in_process(monkeypatch, tmp_path, "--steps", 1, "--group-size", 8, "--prune-rate", 0.625,
                                "--prompts-per-step", 1, "--num-iterations", 1)
    assert (seen["sampled_rows"], seen["loss_rows"]) == (24, 8)
    train = [r for r in rows if "train/reward" in r][0]
    assert train["cppo/questions"] == 3 and train["cppo/kept_frac"] == pytest.approx(8 / 24)


# ---------------------------------------------------------------- command line

def test_cppo_end_to_end(tmp_path):
    out = tmp_path / "run"
    p = run_script("cppo.py", "--steps", 2, "--eval-size", 40, "--eval-every", 1, "--out", out,
                   "--group-size", 16, "--prune-rate", 0.875, "--prompts-per-step", 2, "--prune-scope", "batch")
    assert "eval/accuracy:" in p.stdout
    rows = read_metrics(out)
    train = [r for r in rows if "train/reward" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 1, 2]
    for key in ("train/loss", "train/kl", "train/clip_frac", "train/zero_std_frac", "train/entropy",
                "train/grad_norm", "train/completion_len", "time/step", "time/generate", "time/update",
                "cppo/kept_frac", "cppo/abs_adv_kept", "cppo/abs_adv_dropped", "cppo/questions",
                "cppo/reward_kept"):
        assert key in train[0], key
    assert train[0]["cppo/questions"] == 16 and train[0]["cppo/kept_frac"] == 0.125  # 32 of 256
    assert train[0]["cppo/abs_adv_kept"] >= train[0]["cppo/abs_adv_dropped"]  # CPPO drops the smallest
    check_samples(out, [0, 1, 2], 4, 16, columns=("kept",))  # every sampled completion, pruned ones too


def test_prune_rate_zero_is_grpo(tmp_path):
    """P = 0 keeps every completion: the same run as grpo.py, step for step."""
    flags = ["--steps", 2, "--eval-size", 20, "--eval-every", 100, "--prompts-per-step", 3, "--group-size", 4,
             "--num-iterations", 2]
    run_main("grpo.py", "--out", tmp_path / "g", *flags)
    run_main("cppo.py", "--out", tmp_path / "c", "--prune-rate", 0, *flags)
    g, c = read_metrics(tmp_path / "g"), read_metrics(tmp_path / "c")
    for key in ("train/reward", "train/loss", "train/kl", "train/grad_norm"):
        assert [r[key] for r in g if key in r] == pytest.approx([r[key] for r in c if key in r], rel=1e-5), key
    assert all("cppo/abs_adv_dropped" not in r for r in c)
    sg, sc = read_samples(tmp_path / "g"), read_samples(tmp_path / "c")  # the same samples, every completion kept
    assert sg == [{k: v for k, v in r.items() if k != "kept"} for r in sc]
    assert all(r["kept"] for r in sc if r["kind"] == "train")


@pytest.mark.parametrize("flags, message", [
    (["--group-size", 16, "--prune-rate", 0.95], "--prune-rate 0.95 keeps no completion of a group of 16"),
    (["--group-size", 8, "--prune-rate", 1.0], "--prune-rate 1.0 keeps no completion of a group of 8"),
    (["--prune-rate", -0.1], "--prune-rate must be in [0, 1)"),
])
def test_prune_rate_that_keeps_nothing_is_a_one_line_error(tmp_path, flags, message):
    assert_user_error("cppo.py", "--out", tmp_path / "o", *flags, message=message)
