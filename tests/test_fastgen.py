"""fastgen.py, the decode loop of --generation fastgen: on CPU (no compile, no CUDA graphs) its greedy
completions are model.generate's token for token, on ragged left-padded prompts with rows that stop
early, on the toy models and on the random-weight Qwen2.5 shapes; its draws are softmax(logits / T)'s:
the same tokens as a reference sampler given the same noise, and the softmax's frequencies."""

import math

import pytest
import torch

import common
import fastgen
import plumbing
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
        prompts = [tasks.format_prompt(tok, q, instruction="") for q in ("05+68", "417+817", "9+1", "57+68", "999+999")]
        lengths = compare_greedy(model, tok, prompts, 8, tasks.eos_ids(model, tok))
        assert lengths.min() < 8  # they stop by themselves


def test_greedy_completions_are_generates_on_qwen_shapes_with_rows_that_stop_early(tmp_path):
    """The real 151,936-row head and Qwen's tokenizer, two narrow layers: a random model almost never samples
    its EOS, so the stop tokens are taken from its own greedy completions, which makes rows stop at
    different steps (one early, one later, the others not at all)."""
    path = qwen_like_model(str(tmp_path / "m"), "0.5B", layers=2, hidden_size=64, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, instruct=True,
                           initializer_range=0.3)  # not one token over and over
    model, tok = common.load_model(path, CPU)
    questions = ("What is 2 + 3?", "A longer question, with more words in it?", "Hi", "Sums: 17 + 25 = ?")
    prompts = [tasks.format_prompt(tok, q, instruction=tasks.BOXED_INSTRUCTION) for q in questions]
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
        assert acc == common.evaluate(model, tok, questions, 8, instruction="")[0]["eval/accuracy"], model_dir


def test_lora_with_fastgen_is_generates_and_passes_the_cache_by_its_current_name(recwarn):
    """peft's forward takes **kwargs: the cache goes under the name the wrapped model's forward takes (a deprecated
    name would warn, and a later transformers could drop it and decode with no cache at all)."""
    import grpo
    args = common.parse_args(grpo.Args, ["--lora-rank", "4"])
    model, tok = common.load_model("toy-small", CPU, lora=common.lora_config(args), generation="fastgen")
    with torch.no_grad():  # adapters that change the greedy answers, so that they are on the path compared
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    base_name = fastgen._cache_kwarg(model.get_base_model())
    assert fastgen._cache_kwarg(model) == base_name
    prompts = [tasks.format_prompt(tok, q, instruction="") for q in ("05+68", "9+1", "57+68", "99+01")]
    eos = tasks.eos_ids(model, tok)
    compare_greedy(model, tok, prompts, 8, eos)
    ro = common.sample(model, tok, prompts, 2, 8, greedy=True)  # through common.sample, as the scripts call it
    assert ro.completion_ids.shape[0] == 8
    assert not [w for w in recwarn if "deprecated" in str(w.message)], [str(w.message) for w in recwarn]


def test_the_cache_is_made_once_per_batch_size_and_reused(tmp_path):
    model, tok = common.load_model("toy-small", CPU)
    eos = tasks.eos_ids(model, tok)

    def run(questions, n=8):
        enc = tok([tasks.format_prompt(tok, q, instruction="") for q in questions], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        return fastgen.generate(model, enc.input_ids, enc.attention_mask, n, eos, tok.pad_token_id, greedy=True,
                                batch_bucket=4)

    run(["05+68", "9+1", "57+68"])  # 3 rows, bucketed to 4
    (length, cache, *_), = model._fastgen_caches.values()
    keys = cache.layers[0].keys
    assert list(model._fastgen_caches) == [4] and length % fastgen.CACHE_GROWS_BY == 0
    run(["417+817", "1+1", "99+99", "12+34"])  # 4 rows, another prompt length: the same cache, its tensors in place
    assert model._fastgen_caches[4][1] is cache and cache.layers[0].keys.data_ptr() == keys.data_ptr()
    run(["1+2"] * 5)  # 5 rows: bucketed to 8, a second cache
    assert sorted(model._fastgen_caches) == [4, 8] and model._fastgen_caches[4][1] is cache
    run(["1+2"] * 3, n=fastgen.CACHE_GROWS_BY + 8)  # longer than the cache: it grows, made again once
    assert model._fastgen_caches[4][0] == 2 * fastgen.CACHE_GROWS_BY and model._fastgen_caches[4][1] is not cache


def test_keys_land_at_the_slots_the_mask_opens():
    """The layers write each forward's keys at their own running count; fastgen's attention mask and
    cache_position say where it should be. After P prompt positions and n decode steps the first P + n slots
    hold keys and the rest are as reset (zero): if a transformers release moved the write, this fails."""
    model, tok = common.load_model("toy-small", CPU)
    enc = tok([tasks.format_prompt(tok, q, instruction="") for q in ("05+68", "9+1")], return_tensors="pt", padding=True,
              add_special_tokens=False)
    P, n = enc.input_ids.shape[1], 6
    fastgen.generate(model, enc.input_ids, enc.attention_mask, n + 1, [], tok.pad_token_id, greedy=True)  # no stop token
    (_, cache, *_), = model._fastgen_caches.values()
    assert fastgen._written(cache) == P + n
    for layer in cache.layers:
        written = layer.keys.abs().sum((0, 1, 3)) != 0  # (L,) slots holding a key
        assert written[:P + n].all() and not written[P + n:].any()


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_sampled_completions_are_a_cacheless_samplers_given_the_same_noise(temperature):
    """End to end at T != 1: fastgen's tokens equal those of a loop that recomputes the whole sequence every step
    (no cache) and draws with the same uniform noise in the same order, on ragged prompts with rows that stop."""
    model, tok = common.load_model("toy-hard-small", CPU)  # its answers to these stop at different steps, or not at all
    prompts = [tasks.format_prompt(tok, q, instruction="") for q in ("05+68", "9+1", "57+68", "417+817", "999+999", "1+1")]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    eos, N = tasks.eos_ids(model, tok), 8
    torch.manual_seed(3)
    fast = fastgen.generate(model, enc.input_ids, enc.attention_mask, N, eos, tok.pad_token_id, temperature)
    torch.manual_seed(3)
    ids, mask, done, out = enc.input_ids, enc.attention_mask, torch.zeros(6, dtype=torch.bool), []
    with torch.no_grad():
        for t in range(N):
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
            token = torch.where(done, tok.pad_token_id, fastgen.pick(logits, temperature, greedy=False))
            out.append(token)
            done |= torch.isin(token, torch.tensor(eos))
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones(6, 1, dtype=mask.dtype)], 1)
    reference = torch.stack(out, 1)[:, :fast.shape[1]]
    assert torch.equal(fast, reference)
    _, lengths, truncated = common.completion_mask(fast, eos)
    assert len(set(lengths.tolist())) > 1 and truncated.any() and not truncated.all()  # ragged stops, and no stop


def test_a_padded_batch_gives_each_row_what_it_gets_alone():
    model, tok = common.load_model("toy-small", CPU)
    prompts = [tasks.format_prompt(tok, q, instruction="") for q in ("05+68", "9+1", "57+68")]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    eos = tasks.eos_ids(model, tok)
    plain = fastgen.generate(model, enc.input_ids, enc.attention_mask, 8, eos, tok.pad_token_id, greedy=True)
    padded = fastgen.generate(model, enc.input_ids, enc.attention_mask, 8, eos, tok.pad_token_id, greedy=True,
                              batch_bucket=16)
    assert padded.shape[0] == 3 and torch.equal(plain, padded)


def test_static_generation_with_bucketed_prompts_gives_the_same_completions(monkeypatch):
    """--generation static pads prompts to a multiple of fastgen.BUCKET on CUDA: the extra left padding must not
    change a greedy completion (run here on a CPU by asking for the bucket)."""
    model, tok = common.load_model("toy-small", CPU, generation="static")
    prompts = [tasks.format_prompt(tok, q, instruction="") for q in ("05+68", "9+1", "417+817")]
    plain = common.sample(model, tok, prompts, 1, 8, greedy=True)
    seen = []
    monkeypatch.setattr(fastgen, "prompt_bucket", lambda how, device: seen.append(how) or fastgen.BUCKET)
    bucketed = common.sample(model, tok, prompts, 1, 8, greedy=True)
    assert seen == ["static"] and bucketed.prompt_ids.shape[1] == fastgen.BUCKET > plain.prompt_ids.shape[1]
    assert torch.equal(plain.completion_ids, bucketed.completion_ids) and plain.texts == bucketed.texts


def test_under_bf16_autocast_the_shadow_computes_what_autocast_computes_on_the_model(monkeypatch):
    """On CUDA fastgen runs a copy whose linear layers hold bf16 weights (bf16 autocast forced on here, as on
    CUDA): its greedy completions equal model.generate's under the same autocast, before and after the
    weights move (the copy is refreshed in place), while embeddings, norms and the tied head stay fp32."""
    monkeypatch.setattr(plumbing, "BF16_DEVICES", ("cuda", "cpu"))
    model, tok = common.load_model("toy-hard-small", CPU, generation="fastgen")
    prompts = [tasks.format_prompt(tok, q, instruction="") for q in ("05+68", "9+1", "57+68", "417+817", "999+999", "1+1")]

    def both():
        torch.manual_seed(0)
        fast = common.sample(model, tok, prompts, 1, 8, greedy=True)
        model.generation = "generate"
        slow = common.sample(model, tok, prompts, 1, 8, greedy=True)
        model.generation = "fastgen"
        assert torch.equal(fast.completion_ids, slow.completion_ids) and fast.texts == slow.texts
        return fast.texts

    before = both()
    shadow = model._bf16_shadow
    assert shadow.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert shadow.model.norm.weight.dtype == torch.float32 and shadow.model.embed_tokens.weight.dtype == torch.float32
    assert shadow.lm_head.weight is shadow.model.embed_tokens.weight  # tied, as in the model
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(-1.5)  # an "optimizer step" that changes the answers
    assert both() != before and model._bf16_shadow is shadow
