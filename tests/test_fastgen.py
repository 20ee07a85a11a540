"""fastgen.py, the decode loop of --generation fastgen: on CPU (no compile, no CUDA graphs) its greedy
completions are model.generate's token for token, on ragged left-padded prompts with rows that stop
early, on the toy models and on the random-weight Qwen2.5 shapes; its draws are softmax(logits / T)'s:
the same tokens as a reference sampler given the same noise, and the softmax's frequencies."""

import math

import pytest
import torch

import common
import fastgen
import tasks
from conftest import read_metrics, run_main
from qwen_like import qwen_like_model

CPU = torch.device("cpu")


def compare_greedy(model, tok, prompts, max_new_tokens, eos):
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert len(set(enc.attention_mask.sum(1).tolist())) > 1  # ragged: the rows carry different left padding
    model.generation_config.eos_token_id = eos  # model.generate's stop tokens, as common.sample sets them
    reference = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=False,
                               max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                               top_k=None, top_p=None, temperature=None)[:, enc.input_ids.shape[1]:]
    fast = fastgen.generate(model, enc.input_ids, enc.attention_mask, max_new_tokens, eos, tok.pad_token_id, greedy=True)
    mask, lengths, _ = common.completion_mask(reference, eos)
    assert torch.equal(fast, reference.masked_fill(mask == 0, tok.pad_token_id))  # token for token, padded alike
    return lengths


def test_greedy_completions_are_generates_on_the_toy_models():
    for name in ("toy-small", "toy-large", "toy-hard-small"):
        model, tok = common.load_model(name, CPU)
        prompts = [tasks.format_prompt(tok, q, "toy") for q in ("05+68", "417+817", "9+1", "57+68", "999+999")]
        lengths = compare_greedy(model, tok, prompts, 8, tasks.eos_ids(model, tok))
        assert lengths.min() < 8  # they stop by themselves


def test_greedy_completions_are_generates_on_qwen_shapes_with_rows_that_stop_early(tmp_path):
    """The real 151,936-row head and Qwen's tokenizer, two narrow layers: a random model almost never samples
    its EOS, so the stop tokens are taken from its own greedy completions, which makes rows stop at
    different steps (one early, one later, the others not at all)."""
    path = qwen_like_model(str(tmp_path / "m"), "0.5B", layers=2, hidden_size=64, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, instruct=True, initializer_range=0.3)  # not one token over and over
    model, tok = common.load_model(path, CPU)
    prompts = [tasks.format_prompt(tok, q, "gsm8k") for q in ("What is 2 + 3?", "A longer question, with more words in it?",
                                                                "Hi", "Sums: 17 + 25 = ?")]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    free = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=False, max_new_tokens=12,
                          eos_token_id=None, pad_token_id=tok.pad_token_id)[:, enc.input_ids.shape[1]:]
    eos = sorted({int(free[0, 2]), int(free[1, 7])})  # row 0 stops by step 3, row 1 by step 8 (if not sooner)
    lengths = compare_greedy(model, tok, prompts, 12, eos)
    assert lengths[0] <= 3 and lengths.max() > lengths.min()


def test_a_draw_is_the_reference_samplers_given_the_same_noise():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3  # (B, V)
    u = torch.rand(6, 50, generator=g)
    noise = -torch.log(-torch.log(u))  # Gumbel(0, 1)
    for T in (1.0, 0.7, 1.5):
        reference = (torch.log_softmax(logits / T, -1) + noise).argmax(-1)  # Gumbel-max over log softmax(z / T)
        assert torch.equal(fastgen.pick(logits, T, greedy=False, noise=noise), reference)
    assert torch.equal(fastgen.pick(logits, 1.0, greedy=True), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_draws_follow_softmax_of_the_logits_over_the_temperature(temperature):
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 0.5, -1.0, 1.2, 0.0, -3.0])  # a small vocabulary
    n = 200_000
    draws = fastgen.pick(logits.expand(n, -1).contiguous(), temperature, greedy=False)
    freq = torch.bincount(draws, minlength=6).double() / n
    p = torch.softmax(logits.double() / temperature, -1)
    chi2 = float((n * (freq - p) ** 2 / p).sum())
    assert chi2 < 25, (chi2, freq, p)  # 5 degrees of freedom: p < 0.0002 by chance
    assert (freq - p).abs().max() < 5 * math.sqrt(0.25 / n)


@pytest.mark.parametrize("generation", ["fastgen", "static"])
def test_a_run_with_each_generation_trains(generation, tmp_path):
    run_main("grpo.py", "--steps", 2, "--generation", generation, "--eval-size", 30, "--pass-n", 4, "--pass-k", "1,4",
             "--out", tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows if "train/reward" in r] == [1, 2]
    for r in rows[1:-1]:  # toy-small answers '=', the sum's 2 or 3 digits and EOS; an EOS missed would make 8 tokens
        assert 3 <= r["train/completion_len"] <= 5 and r["train/truncated_frac"] < 0.1, r
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    questions = tasks.load_data("toy", "eval")[:30]
    for model_dir, acc in (("toy-small", evals[0]), (str(tmp_path / "final"), evals[-1])):  # before and after training
        model, tok = common.load_model(model_dir, CPU)  # generation="generate": model.generate's greedy answers
        assert acc == common.evaluate(model, tok, questions, "toy", 8)["eval/accuracy"], model_dir
