"""common.py: the math against closed forms and autograd, parsing, masks, loading, logging."""

import dataclasses
import json
import math
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import common
import grading
import plumbing
import rundir
import tasks
from reference import naive_token_logprobs


# ---------------------------------------------------------------- answers and rewards

@pytest.mark.parametrize("completion, gold", [
    ("She pays 3 * 4 = 12 dollars.\n#### 12", "12"),
    ("So the total is \\boxed{1,000}.", "1000"),
    ("The answer is $1000.00", "1,000"),
    ("\\boxed{1000.0}", "$1000"),
    ("We get \\boxed{\\frac{1}{2}} at the end", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
    ("Thus x = \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("there are 5 apples and 7 pears, so 12", "12"),
    ("57+68=125", "125"),
    ("-3 is it", "-3"),
])
def test_correct_answers(completion, gold):
    assert grading.is_correct(completion, gold)


@pytest.mark.parametrize("completion, gold", [
    ("#### 13", "12"),
    ("\\boxed{12} but then 13", "13"),    # the boxed answer wins over later numbers
    ("no number here", "4"),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}"),
    ("", "0"),
])
def test_wrong_answers(completion, gold):
    assert not grading.is_correct(completion, gold)


def test_gold_answers_of_real_formats():
    gsm8k = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether she sold 48+24 = <<48+24=72>>72.\n#### 1,072"
    assert grading.gold_answer(gsm8k) == "1,072"
    math_solution = "So $f(2) = \\boxed{\\frac{a^{2}}{b}}$. Earlier we had \\boxed{3}? No: final \\boxed{\\frac{a^{2}}{b}}."
    assert grading.last_boxed(math_solution) == "\\frac{a^{2}}{b}"
    assert grading.last_boxed("\\boxed{unclosed") is None
    assert grading.extract_answer("x \\fbox{7}") == "7"


def test_rewards_and_format_bonus():
    s = tasks.rewards_for(["\\boxed{4}", "4", "#### 5", "nothing"], ["4", "4", "4", "4"], format_coef=0.25)
    assert s.reward.tolist() == [1.25, 1.0, 0.25, 0.0]
    assert s.correct.tolist() == [True, True, False, False] and s.grade_errors == 0


# ---------------------------------------------------------------- masks

def test_completion_mask_includes_first_eos_and_nothing_after():
    eos = 1
    ids = torch.tensor([[5, 6, 1, 0, 0],     # EOS at 2 -> length 3
                        [1, 1, 1, 1, 1],     # EOS first -> length 1 (pad == eos)
                        [5, 6, 7, 8, 9],     # never ends -> all 5
                        [5, 1, 7, 1, 9],     # only the first EOS counts
                        [5, 6, 7, 8, 1]])    # EOS on the last allowed position: full length, not truncated
    mask, lengths, truncated = common.completion_mask(ids, [eos])
    assert lengths.tolist() == [3, 1, 5, 2, 5]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True, False, False]  # truncated = no EOS, not mask[:, -1] == 1
    mask2, lengths2, truncated2 = common.completion_mask(ids, [9, 1])  # any of several EOS ids
    assert lengths2.tolist() == [3, 1, 5, 2, 5] and not truncated2.any()


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert common.masked_mean(x, m).item() == pytest.approx(2.0)
    assert common.masked_mean(x, m, 1).tolist() == [1.5, 3.0]


# ---------------------------------------------------------------- chunked log-probs

def toy_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tasks.toy_path("toy-small"))


def tiny_model(vocab=40, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).eval()


def random_rollout(vocab=40, B=5, P=6, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0  # left padding
    prompt_mask[3, :4] = 0
    completion_ids = torch.randint(3, vocab, (B, T), generator=g)
    lengths = torch.tensor([T, 3, 1, 5, T])
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    return common.Rollout(prompt_ids, prompt_mask, completion_ids, mask, lengths, [""] * B, torch.zeros(B, dtype=torch.bool))


@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_equal_naive_values_and_gradients(chunk, temperature):
    model, ro = tiny_model(), random_rollout()
    naive = naive_token_logprobs(model, ro, temperature)  # (B, T)
    chunked, ent = common.token_logprobs(model, ro, temperature, chunk_size=chunk, with_entropy=True)
    torch.testing.assert_close(chunked, naive, atol=1e-5, rtol=1e-5)
    # gradients through the checkpointed chunks equal the naive ones
    w = torch.randn(naive.shape)
    g_naive = torch.autograd.grad((naive * w * ro.mask).sum(), list(model.parameters()))
    g_chunk = torch.autograd.grad((chunked * w * ro.mask).sum(), list(model.parameters()))
    for a, b in zip(g_naive, g_chunk):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # entropy of softmax(z / T) at each position
    with torch.no_grad():
        ids, attn = ro.input_ids(), ro.attention_mask()
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -ro.completion_ids.shape[1] - 1:-1]
        logp_all = torch.log_softmax(logits / temperature, -1)
        torch.testing.assert_close(ent, -(logp_all.exp() * logp_all).sum(-1), atol=1e-5, rtol=1e-5)


def test_chunked_logprobs_vocab_slice_and_no_grad():
    model, ro = tiny_model(vocab=48), random_rollout(vocab=40)
    with torch.no_grad():
        sliced = common.token_logprobs(model, ro, vocab_size=40)
        ids, attn = ro.input_ids(), ro.attention_mask()
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -8:-1, :40]
        expected = torch.log_softmax(logits, -1).gather(-1, ro.completion_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(sliced, expected, atol=1e-5, rtol=1e-5)
    assert not sliced.requires_grad


@pytest.mark.parametrize("rows, P, T", [([1, 2], 6, 3),  # row 2 uses every prompt column
                                          ([1, 3], 4, 5),  # left padding of 2 and 4 columns: 2 in common
                                          ([3], 2, 5)])
def test_rollout_select_trims_padding_columns(rows, P, T):
    ro = random_rollout()
    sub = ro.select(torch.tensor(rows))
    assert sub.prompt_ids.shape == sub.prompt_mask.shape == (len(rows), P)
    assert sub.completion_ids.shape == sub.mask.shape == (len(rows), T)
    assert sub.prompt_mask.sum() == ro.prompt_mask[rows].sum() and sub.mask.sum() == ro.mask[rows].sum()
    model = tiny_model()
    with torch.no_grad():
        full = common.token_logprobs(model, ro)
        part = common.token_logprobs(model, sub)
    torch.testing.assert_close(part * sub.mask, full[rows, :T] * sub.mask, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- KL estimators

def categorical(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True)
    log_q = torch.log_softmax(torch.randn(n, generator=g, dtype=torch.float64), 0)
    return theta, log_q


def expected_surrogate_grad(theta, per_sample_loss):
    """sum_y p(y) grad loss(y): the expectation of the gradient of a per-token loss evaluated on
    tokens sampled from p, the sampling distribution itself not differentiated."""
    log_p = torch.log_softmax(theta, 0)
    p = log_p.exp().detach()
    return torch.autograd.grad((p * per_sample_loss(log_p)).sum(), theta)[0]


def test_kl_estimators_values():
    theta, log_q = categorical()
    log_p = torch.log_softmax(theta, 0).detach()
    p = log_p.exp()
    kl_pq = (p * (log_p - log_q)).sum()
    r = log_q - log_p
    assert (p * common.kl_k1(r)).sum().item() == pytest.approx(kl_pq.item())
    assert (p * common.kl_k3(r)).sum().item() == pytest.approx(kl_pq.item())
    assert (p * common.kl_k2(r)).sum().item() != pytest.approx(kl_pq.item(), rel=1e-3)  # biased
    assert (common.kl_k3(r) >= 0).all()


def test_kl_estimators_expected_gradients():
    theta, log_q = categorical(seed=3)
    def kl(direction):
        log_p = torch.log_softmax(theta, 0)
        return ((log_p.exp() * (log_p - log_q)).sum() if direction == "p||q"
                else (log_q.exp() * (log_q - log_p)).sum())
    grad_rkl = torch.autograd.grad(kl("p||q"), theta)[0]
    grad_fkl = torch.autograd.grad(kl("q||p"), theta)[0]
    g1 = expected_surrogate_grad(theta, lambda lp: common.kl_k1(log_q - lp))
    g2 = expected_surrogate_grad(theta, lambda lp: common.kl_k2(log_q - lp))
    g3 = expected_surrogate_grad(theta, lambda lp: common.kl_k3(log_q - lp))
    torch.testing.assert_close(g1, torch.zeros_like(g1))          # k1: zero in expectation
    torch.testing.assert_close(g2, grad_rkl)                      # k2: the reverse-KL gradient
    torch.testing.assert_close(g3, grad_fkl)                      # k3: the forward-KL gradient
    assert not torch.allclose(g3, grad_rkl, atol=1e-3)


# ---------------------------------------------------------------- f-divergences

@pytest.mark.parametrize("name", common.DIVERGENCES)
def test_f_prime_matches_autograd_and_f_of_one_is_zero(name):
    f, fp = common.f_divergence(name, alpha=0.3)
    u = torch.tensor([0.05, 0.3, 0.9, 1.7, 4.0, 11.0], dtype=torch.float64, requires_grad=True)
    auto = torch.autograd.grad(f(u).sum(), u)[0]
    torch.testing.assert_close(fp(u.detach()), auto)
    assert f(torch.tensor([1.0], dtype=torch.float64)).abs().item() < 1e-12


@pytest.mark.parametrize("name", common.DIVERGENCES)
def test_f_divergence_of_categoricals(name):
    """sum_v p(v) f(q(v)/p(v)) is >= 0, 0 iff p == q, and matches the closed forms."""
    theta, log_q = categorical(seed=5)
    p, q = torch.softmax(theta.detach(), 0), log_q.exp()
    f, _ = common.f_divergence(name, alpha=0.3)
    d = (p * f(q / p)).sum().item()
    assert d > 0 and (p * f(p / p)).sum().abs().item() < 1e-12
    closed = dict(rkl=(p * (p / q).log()).sum(), fkl=(q * (q / p).log()).sum(),
                  tv=0.5 * (p - q).abs().sum(),
                  jsd=0.5 * ((q * (2 * q / (p + q)).log()).sum() + (p * (2 * p / (p + q)).log()).sum()))
    if name in closed:
        assert d == pytest.approx(closed[name].item())


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_limits_rejected(alpha, capsys):
    with pytest.raises(SystemExit) as e:
        common.f_divergence("alpha", alpha=alpha)
    assert e.value.code == 2 and "--alpha must not be 0 or 1" in capsys.readouterr().err
    f, _ = common.f_divergence("alpha", alpha=alpha + 1e-3)  # close to the limit is fine and finite
    assert torch.isfinite(f(torch.tensor([0.5, 2.0], dtype=torch.float64))).all()


# ---------------------------------------------------------------- models, data, sampling

def test_model_names():
    assert common.resolve_model_name("Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert common.resolve_model_name("Qwen2.5-1.5B-Instruct") == "Qwen/Qwen2.5-1.5B-Instruct"
    assert common.resolve_model_name("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert common.resolve_model_name("toy-small") == "toy-small"


def test_load_model_from_local_directory(tmp_path):
    model = tiny_model(vocab=len(toy_tokenizer()))
    model.save_pretrained(tmp_path)
    toy_tokenizer().save_pretrained(tmp_path)
    loaded, tok = common.load_model(str(tmp_path), torch.device("cpu"))
    for a, b in zip(model.parameters(), loaded.parameters()):
        torch.testing.assert_close(a, b)
    assert tok.padding_side == "left" and tok.decode(tok("12+3").input_ids) == "12+3"


def test_unknown_model_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        common.load_model("no-such-org/no-such-model", torch.device("cpu"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model 'no-such-org/no-such-model' is not a local directory, not a toy model")
    assert "\n" not in err
    assert "unreachable" in err


def test_jsonl_dataset(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(dict(question="1+1?", answer="It is 2.\n#### 2")) + "\n\n"
                    + json.dumps(dict(question="2+2?", answer="4")) + "\n")
    rows = tasks.load_data(str(path), "train")
    assert rows == [dict(question="1+1?", answer="2"), dict(question="2+2?", answer="4")]
    with pytest.raises(SystemExit):
        tasks.load_data(str(tmp_path / "missing.jsonl"), "train")
    with pytest.raises(SystemExit):
        tasks.load_data("imagenet", "train")


def test_toy_data_splits_are_disjoint():
    train, ev = tasks.load_data("toy", "train"), tasks.load_data("toy", "eval")
    assert len(ev) == tasks.TOY_EVAL_PAIRS and len(train) + len(ev) == 10_000
    assert not {r["question"] for r in train} & {r["question"] for r in ev}
    assert all(int(r["answer"]) == sum(map(int, r["question"].split("+"))) for r in ev)


def test_toy_hard_data_and_its_wrong_answers():
    train, ev = tasks.load_data("toy-hard", "train"), tasks.load_data("toy-hard", "eval")
    assert len(ev) == tasks.TOY_EVAL_PAIRS and len(train) == tasks.TOY_HARD_TRAIN
    assert not {r["question"] for r in train} & {r["question"] for r in ev}
    pairs = [tuple(map(int, r["question"].split("+"))) for r in train + ev]
    assert all(int(r["answer"]) == a + b >= 1000 for r, (a, b) in zip(train + ev, pairs))
    assert all(r["question"][3] == "+" and len(r["question"]) == 7 for r in ev)  # fixed width: "065+967"
    from toy import build  # the recipe's wrong answers
    assert build.toy_hard_answer(456, 789) == 1245
    assert build.toy_hard_answer(456, 789, (0, 1, 2)) == 135  # every carry dropped: digit-wise sums mod 10
    assert build.toy_hard_answer(456, 789, (0,)) == 1235  # the units carry dropped (the tens lose 1)
    assert build.toy_hard_answer(402, 817, (0,)) == 1219  # no units carry: right
    tok = toy_tokenizer()
    assert tasks.format_prompt(tok, ev[0], instruction="") == ev[0]["question"] + "="


def test_toy_hard_regime_is_sparse_for_small_and_imperfect_for_large():
    """At step 0: toy-hard-small is right in 2-10% of its samples and most groups of 8 hold no
    right answer; toy-hard-large's greedy accuracy is 0.5-0.8 (a good teacher, not a perfect one)."""
    rows = tasks.load_data("toy-hard", "eval")
    small, tok = common.load_model("toy-hard-small", torch.device("cpu"))
    large, _ = common.load_model("toy-hard-large", torch.device("cpu"))
    torch.manual_seed(0)
    m, _ = common.evaluate(small, tok, rows, 8, pass_n=8, pass_k="1,8", batch_size=256, instruction="")
    assert 0.02 <= m["eval/pass@1"] <= 0.10 and 1 - m["eval/pass@8"] > 0.5, m  # pass@8 = groups with a reward
    assert 0.5 <= common.evaluate(large, tok, rows, 8, instruction="")[0]["eval/accuracy"] <= 0.8


def test_prompt_format():
    tok = toy_tokenizer()
    assert tasks.format_prompt(tok, "12+3", instruction="") == "12+3="
    tok.chat_template = None
    boxed = tasks.prompt_instruction("gsm8k")
    assert tasks.format_prompt(tok, "What is 2+2?", instruction=boxed).startswith("Question: What is 2+2?\nPlease reason")


def test_sampling_ignores_generation_config(tmp_path):
    """A hostile generation_config (top_k=1, repetition penalty, min_p) must not change what is
    sampled: first-token frequencies match softmax(logits / T)."""
    tok = toy_tokenizer()
    model = tiny_model(vocab=len(tok), seed=1)
    model.generation_config.top_k = 1
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.min_p = 0.5
    model.generation_config.do_sample = False
    torch.manual_seed(0)
    n, T = 4000, 0.8
    ro = common.sample(model, tok, ["12+3="], n, max_new_tokens=1, temperature=T)
    with torch.no_grad():
        enc = tok(["12+3="], return_tensors="pt")
        probs = torch.softmax(model(**enc).logits[0, -1] / T, -1)
    freq = torch.bincount(ro.completion_ids[:, 0], minlength=len(probs)).float() / n
    assert (freq - probs).abs().max().item() < 0.03
    assert (ro.completion_ids[:, 0] != ro.completion_ids[0, 0]).any()  # not greedy


def test_sampling_rollout_layout():
    tok = toy_tokenizer()
    model = tiny_model(vocab=len(tok), seed=2)
    ro = common.sample(model, tok, ["1+2=", "33+44="], 3, max_new_tokens=5)
    assert ro.completion_ids.shape[0] == 6 and ro.prompt_ids.shape[0] == 6
    assert torch.equal(ro.prompt_ids[0], ro.prompt_ids[2]) and not torch.equal(ro.prompt_ids[2], ro.prompt_ids[3])
    mask, lengths, truncated = common.completion_mask(ro.completion_ids, [tok.eos_token_id])
    assert torch.equal(mask, ro.mask) and torch.equal(lengths, ro.lengths) and torch.equal(truncated, ro.truncated)
    assert (ro.completion_ids[ro.mask == 0] == tok.pad_token_id).all()


# ---------------------------------------------------------------- pass@k

@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_pass_at_k_equals_brute_force_enumeration(n):
    """The fraction of all k-subsets of n samples (c of them correct) that hold a correct one."""
    import itertools
    for c in range(n + 1):
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = sum(any(i < c for i in s) for s in subsets) / len(subsets)
            assert common.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_is_unbiased():
    """E over c ~ Binomial(n, p) of the estimate is 1 - (1 - p)^k, the chance that k fresh samples hold a correct one."""
    import math
    n, p = 7, 0.23
    for k in (1, 3, 7):
        expected = sum(math.comb(n, c) * p ** c * (1 - p) ** (n - c) * common.pass_at_k(n, c, k) for c in range(n + 1))
        assert expected == pytest.approx(1 - (1 - p) ** k, abs=1e-12)


def test_evaluate_counts_each_questions_samples(monkeypatch):
    """evaluate() with a sampler that answers question i right c_i = i mod (n + 1) times out of n
    (and greedily right for even i): pass@k is the mean of the estimator over questions, across
    generate calls that split the questions unevenly."""
    n, ks = 4, [1, 2, 4]
    rows = [dict(question=f"q{i}", answer=str(1000 + i)) for i in range(11)]

    def fake_sample(model, tok, prompts, group_size, max_new_tokens, temperature=1.0, greedy=False):
        texts = []
        for p in prompts:
            i = int(p[1:].split("=")[0])
            right = [i % 2 == 0] if greedy else [j < i % (n + 1) for j in range(group_size)]
            texts += [str(1000 + i) if r else "7" for r in right]
        return common.Rollout(None, None, None, None, None, texts, torch.tensor([t == "7" for t in texts]))

    monkeypatch.setattr(common, "sample", fake_sample)
    tok = toy_tokenizer()
    model = torch.nn.Linear(1, 1)
    m, _ = common.evaluate(model, tok, rows, 8, pass_n=n, pass_k="1,2,4", batch_size=12, instruction="")  # 3 questions a call
    assert m["eval/accuracy"] == pytest.approx(6 / 11)
    for k in ks:
        assert m[f"eval/pass@{k}"] == pytest.approx(sum(common.pass_at_k(n, i % (n + 1), k) for i in range(11)) / 11)
    assert m["eval/pass@4"] == pytest.approx(sum(i % 5 > 0 for i in range(11)) / 11)  # pass@n: any right
    assert m["time/eval"] >= m["time/eval_pass_at_k"] > 0
    off, none = common.evaluate(model, tok, rows, 8, instruction="")
    assert set(off) == {"eval/accuracy", "eval/grade_errors", "time/eval"} and none == []
    # the greedy answers to the first 7 questions, 3 a call: in question order, graded as the accuracy is
    _, shown = common.evaluate(model, tok, rows, 8, batch_size=3, samples=7, instruction="")
    expected = [(i, f"q{i}", str(1000 + i), *[str(1000 + i) if i % 2 == 0 else "7"] * 2, i % 2 == 0) for i in range(7)]
    assert [(r["index"], r["question"], r["gold"], r["completion"], r["answer"], r["correct"]) for r in shown] == expected
    assert [r["truncated"] for r in shown] == [i % 2 == 1 for i in range(7)]  # the fake cuts its wrong answers


def slow_grading(monkeypatch, slow: str):
    """Grading as it is, except that a completion `slow` runs out of time (grading.GradingError)."""
    def is_correct(completion, gold):
        if completion == slow:
            raise grading.GradingError("grading took more than 1.0 s of CPU time")
        return grading.is_correct(completion, gold)
    monkeypatch.setattr(tasks, "is_correct", is_correct)


def test_evaluate_counts_the_answers_whose_grading_ran_out_of_time(monkeypatch):
    """eval/grade_errors: every greedy and sampled answer whose check timed out (each scored wrong)."""
    n = 4
    rows = [dict(question=f"q{i}", answer=str(1000 + i)) for i in range(11)]

    def fake_sample(model, tok, prompts, group_size, max_new_tokens, temperature=1.0, greedy=False):
        i = [int(p[1:].split("=")[0]) for p in prompts]  # question i: right, or the slow answer when i % 3 == 0
        texts = ["slow" if q % 3 == 0 else str(1000 + q) for q in i for _ in range(group_size)]
        return common.Rollout(None, None, None, None, None, texts, None)

    monkeypatch.setattr(common, "sample", fake_sample)
    slow_grading(monkeypatch, "slow")
    model, tok = torch.nn.Linear(1, 1), toy_tokenizer()
    m, _ = common.evaluate(model, tok, rows, 8, pass_n=n, pass_k="1,4", batch_size=8, instruction="")
    assert m["eval/grade_errors"] == 4 * (1 + n)  # questions 0, 3, 6, 9: the greedy answer and the n sampled
    assert m["eval/accuracy"] == m["eval/pass@4"] == pytest.approx(7 / 11)  # scored wrong
    assert common.evaluate(model, tok, rows[1:3], 8, instruction="")[0]["eval/grade_errors"] == 0


def text_rollout(tok, texts: list, eos: bool = True):
    """A Rollout of `texts` as Qwen's tokenizer writes them (then EOS), without prompts."""
    ids = [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id] * eos for t in texts]
    T = max(map(len, ids))
    completion_ids = torch.tensor([i + [tok.pad_token_id] * (T - len(i)) for i in ids])  # (B, T)
    lengths = torch.tensor([len(i) for i in ids])  # (B,)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()  # (B, T)
    texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
    return common.Rollout(None, None, completion_ids, mask, lengths, texts, torch.tensor([not eos] * len(texts)))


def test_the_answer_s_tokens_are_those_that_write_it_and_end_it():
    from qwen_like import qwen_tokenizer
    tok = qwen_tokenizer(instruct=True)
    texts = ["First, 3 + 4 = 7. Then 7 * 2 = 14.\nThe answer is \\boxed{14}.", "So the answer is 14.",
             "The answer is $\\frac{3}{4}$.", "I do not know.", "14"]
    ro = text_rollout(tok, texts)
    mask = tasks.answer_mask(tok, ro)
    written = [tok.convert_ids_to_tokens(ro.completion_ids[r][mask[r].bool()].tolist()) for r in range(len(texts))]
    assert written == [["14", "}"], ["Ġ1", "4", "."], ["Ġ$\\", "frac", "{", "3", "}{", "4", "}$."],
                       tok.convert_ids_to_tokens(ro.completion_ids[3, :ro.lengths[3]].tolist()),  # no answer: all
                       ["14", "<|im_end|>"]]  # the answer, then EOS
    cut = text_rollout(tok, texts[-1:], eos=False)  # truncated: nothing after the answer
    assert tasks.answer_mask(tok, cut).tolist() == cut.mask.tolist() == [[1.0]]


def test_ece_takes_the_final_answer_s_confidence_not_the_whole_completion_s(monkeypatch):
    """After reasoning, the completion's probability is ~0 whatever the model believes: ECE would be the
    accuracy. Each token here has probability 0.9: the answer '14' and its '}' have 0.81."""
    from qwen_like import qwen_tokenizer
    tok = qwen_tokenizer(instruct=True)
    text = "First, 3 + 4 = 7. Then 7 * 2 = 14.\nThe answer is \\boxed{14}."
    monkeypatch.setattr(common, "sample", lambda model, tok, prompts, *a, **k: text_rollout(tok, [text] * len(prompts)))
    monkeypatch.setattr(common, "token_logprobs", lambda model, ro: torch.full(ro.mask.shape, math.log(0.9)))
    model = torch.nn.Linear(1, 1)
    m, _ = common.evaluate(model, tok, [dict(question="q", answer="14")], 8, ece_bins=10, instruction="")
    assert m["eval/accuracy"] == 1 and m["eval/ece"] == pytest.approx(1 - 0.9 ** 2)
    m, _ = common.evaluate(model, tok, [dict(question="q", answer="15")], 8, ece_bins=10, instruction="")
    assert m["eval/accuracy"] == 0 and m["eval/ece"] == pytest.approx(0.9 ** 2)


@pytest.mark.parametrize("name", ["toy-small", "toy-hard-small"])
def test_ece_on_the_toy_is_the_whole_completion_s_as_it_was(name, monkeypatch):
    """On the toy the completion is the answer and its EOS: the answer's tokens are every token, so eval/ece
    is, bit for bit, that of the whole completion's probability (its figure before it was the answer's)."""
    model, tok = common.load_model(name, torch.device("cpu"))
    rows = tasks.load_data(tasks.TOY_MODELS[name], "eval")
    ro = common.sample(model, tok, [tasks.format_prompt(tok, r, instruction="") for r in rows], 1, 8, greedy=True)
    assert len(set(ro.texts)) > 50 and torch.equal(tasks.answer_mask(tok, ro), ro.mask)
    m, _ = common.evaluate(model, tok, rows, 8, batch_size=128, ece_bins=10, instruction="")
    monkeypatch.setattr(tasks, "answer_mask", lambda tok, ro: ro.mask)  # every token: the completion's probability
    assert 0 < m["eval/ece"] < 1
    assert common.evaluate(model, tok, rows, 8, batch_size=128, ece_bins=10, instruction="")[0]["eval/ece"] == m["eval/ece"]


def test_answers_grades_no_padding_row(monkeypatch):
    """Rank 1 of 2 answers question 1 and a padding row (row 0's question, so that every rank makes as many
    calls): the padding is neither counted right nor counted as a grading error."""
    rows = [dict(question=f"q{i}", answer=str(1000 + i)) for i in range(3)]

    def fake_sample(model, tok, prompts, group_size, max_new_tokens, temperature=1.0, greedy=False):
        return common.Rollout(None, None, None, None, None, ["slow" if p == "q0=" else "1001" for p in prompts], None)

    monkeypatch.setattr(common, "sample", fake_sample)
    monkeypatch.setattr(common.plumbing, "world_size", lambda: 2)
    monkeypatch.setattr(common.plumbing, "rank", lambda: 1)
    slow_grading(monkeypatch, "slow")
    [(part, ro, correct, errors)] = common.answers(None, toy_tokenizer(), rows, 1, 8, 4, instruction="")
    assert part == [1, -1] and ro.texts == ["1001", "slow"]
    assert correct.tolist() == [[True], [False]] and errors == 0


# ---------------------------------------------------------------- arguments, logging

@pytest.mark.parametrize("script", ["grpo", "cppo", "kdrl", "sinkd", "opd_plus", "codistill", "bdkd", "dph_rl", "evaluate"])
def test_help_says_each_default_once(script, monkeypatch):
    """A field whose help says its default in words ('; default: --dataset's own') gets no '(default: None)'."""
    import argparse
    import importlib
    helps, add = {}, argparse.ArgumentParser.add_argument

    def spy(self, *flags, **kwargs):
        helps[flags[0]] = kwargs.get("help")
        return add(self, *flags, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "add_argument", spy)
    module = importlib.import_module(script)
    common.parse_args(module.Args, [])
    assert len(helps) == len(dataclasses.fields(module.Args)) + 1  # and -h
    for flag, text in helps.items():
        assert flag == "-h" or text.count("default:") == 1, (flag, text)
    assert "default: --dataset's own" in helps["--instruction"] or "default: each benchmark's own" in helps["--instruction"]


def test_parse_args_defaults_follow_the_model():
    import grpo
    toy = common.parse_args(grpo.Args, [])
    assert toy.model == "toy-small" and toy.dataset == "toy" and toy.max_new_tokens == 8
    real = common.parse_args(grpo.Args, ["--model", "Qwen2.5-0.5B-Instruct"])
    assert real.dataset == "gsm8k" and real.max_new_tokens == 512 and real.lr == 1e-6
    assert toy.pass_n == 16 and real.pass_n == 0  # pass@k: on for the toy, off where it costs GPU hours
    hard = common.parse_args(grpo.Args, ["--model", "toy-hard-small"])
    assert hard.dataset == "toy-hard" and hard.max_new_tokens == 8  # a toy model brings its own dataset
    assert common.parse_args(grpo.Args, ["--model", "toy-hard-small", "--dataset", "toy"]).dataset == "toy"
    given = common.parse_args(grpo.Args, ["--max-new-tokens", "5", "--no-resume", "--loss-type", "dapo"])
    assert given.max_new_tokens == 5 and given.dataset == "toy" and given.loss_type == "dapo"


def test_logger_drops_lines_after_resume_step(tmp_path):
    args = dataclasses.make_dataclass("Args", [("out", str), ("resume", bool), ("report_to", str), ("wandb_project", str)])(
        str(tmp_path), False, "none", "")
    log = rundir.Run(args, "test")
    for s in range(6):
        log.log(s, {"train/reward": s})
    log.close()
    args.resume = True
    os.makedirs(tmp_path / "checkpoint")
    torch.save(dict(step=3, optimizers={}, sampler={}, rng=[dict(torch=torch.get_rng_state(), np=np.random.get_state(),
                                                                  py=random.getstate(), cuda=None)]),
               tmp_path / "checkpoint" / "state.pt")
    log = rundir.Run(args, "test")
    assert log.resume({}, {}, SimpleNamespace(load_state_dict=lambda s: None)) == 3
    log.log(4, {"train/reward": 40})
    log.close()
    steps = [json.loads(l)["step"] for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
    assert steps == [0, 1, 2, 3, 4]


def test_shared_vocab_slices_a_larger_partner_and_refuses_a_smaller_one(capsys):
    """A partner padded to more LM-head rows (Qwen2.5 7B: 152,064 vs 151,936) can score every
    sampled id: the sampler's rows are returned. One with fewer rows is refused in one line."""
    device = torch.device("cpu")
    small, tok = common.load_model("toy-small", device)
    padded, padded_tok = common.load_model("toy-large", device)
    padded.resize_token_embeddings(len(tok) + 17)
    assert common.shared_vocab(small, tok, padded, padded_tok, "toy-small", "padded") == len(tok)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        common.shared_vocab(padded, padded_tok, small, tok, "padded", "toy-small")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"'toy-small' has fewer LM-head rows than 'padded' ({len(tok)} < {len(tok) + 17})" in err[0]


def test_cpu_threads_are_the_cores_other_work_leaves_free_and_one_line_says_so(monkeypatch, capsys):
    """--threads 0 on a CPU: one thread per core that the load average leaves free (torch's one per core made a
    first step 9x slower on a 2-core CPU with one core busy); $OMP_NUM_THREADS and --threads win."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    before = torch.get_num_threads()
    try:
        line = "torch threads: 1 (2 cores, {} busy with other work by the load average); --threads N sets them\n"
        for load, threads, said in ((1.2, 1, line.format(1)), (0.3, 2, ""), (7.0, 1, line.format(2))):
            monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
            plumbing.init_distributed("cpu", 0)
            assert torch.get_num_threads() == threads and capsys.readouterr().err == said, load
        plumbing.init_distributed("cpu", 3)
        assert torch.get_num_threads() == 3 and capsys.readouterr().err == ""
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        plumbing.init_distributed("cpu", 0)
        assert torch.get_num_threads() == 1 and capsys.readouterr().err == ""
    finally:
        torch.set_num_threads(before)
