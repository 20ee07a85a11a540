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


def compare_greedy(model, tok, prompts, max_new_tokens, eos, switches=None):
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert len(set(enc.attention_mask.sum(1).tolist())) > 1  # ragged: the rows carry different left padding
    model.generation_config.eos_token_id = eos  # model.generate's stop tokens, as common.sample sets them
    reference = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=False,
                               max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                               top_k=None, top_p=None, temperature=None)[:, enc.input_ids.shape[1]:]
    fast = fastgen.generate(model, enc.input_ids, enc.attention_mask, max_new_tokens, eos, tok.pad_token_id, greedy=True,
                            switches=switches)
    mask, lengths, _ = common.completion_mask(reference, eos)
    assert torch.equal(fast, reference.masked_fill(mask == 0, tok.pad_token_id))  # token for token, padded alike
    return lengths


def nonzero_adapters(model, std=0.3):
    """LoRA's B matrices start at zero; drawn here (the same seed for each), the adapters change the completions,
    so that they are on the path compared."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, std, generator=torch.Generator().manual_seed(0))


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
    nonzero_adapters(model)
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


# ---------------------------------------------------------------- the switches (fastgen.Switches)
# Each changes how a step runs, not what it computes: with every rung of fastgen.LADDER switched on in turn, as
# bench.py --fastgen-check measures them, the greedy completions stay model.generate's and the draws the
# reference sampler's. kv_bucket 4 makes grouped attention read a growing number of slots within one call.

def ladder(kv_bucket=4):
    """(name, Switches): today's step, then each switch of fastgen.LADDER added to the ones before."""
    rungs = [("default", fastgen.Switches())]
    for i in range(len(fastgen.LADDER)):
        on = {n: True for n in fastgen.LADDER[:i + 1]}
        rungs.append(("+" + fastgen.LADDER[i], fastgen.Switches(kv_bucket=kv_bucket, **on)))
    return rungs


class CPUGraph:
    """fastgen._Graph's stand-in on a CPU: it records nothing and replays fn, after checking that every tensor a
    real CUDA graph would have recorded (the buffers, the cache's keys and values) is where it was at capture."""
    made = []

    def __init__(self, fn):
        self.fn, self.where = fn, self.addresses()
        CPUGraph.made.append(self)

    @staticmethod
    def addresses():
        return [t.data_ptr() for model in CPUGraph.models for caches in CPUGraph.caches_of(model)
                for _, cache, buffers, _ in caches.values()
                for t in [*vars(buffers).values(), *(x for layer in cache.layers for x in (layer.keys, layer.values))]]

    @staticmethod
    def caches_of(model):
        nets = [model, getattr(model, "_bf16_shadow", None)]
        return [net._fastgen_caches for net in nets if net is not None and hasattr(net, "_fastgen_caches")]

    def replay(self):
        assert self.addresses() == self.where, "a tensor the graph recorded moved"
        return self.fn()


@pytest.fixture
def cpu_capture(monkeypatch):
    """The capture switch on a CPU, with CPUGraph recording; CPUGraph.models: the models whose caches it checks."""
    monkeypatch.setattr(fastgen, "CAPTURE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(fastgen, "_Graph", CPUGraph)
    CPUGraph.made, CPUGraph.models = [], []
    return CPUGraph


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = qwen_like_model(str(tmp_path_factory.mktemp("qwen") / "m"), "0.5B", layers=2, hidden_size=64,
                           intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, instruct=True,
                           initializer_range=0.3)  # 2 query heads a KV head: the grouping is on the path compared
    return common.load_model(path, CPU)


@pytest.mark.parametrize("name,switches", ladder())
def test_every_rung_of_the_ladder_gives_generates_greedy_completions_on_qwen_shapes(name, switches, qwen, cpu_capture):
    model, tok = qwen
    cpu_capture.models = [model]
    questions = ("What is 2 + 3?", "A longer question, with more words in it?", "Hi", "Sums: 17 + 25 = ?")
    prompts = [tasks.format_prompt(tok, q, instruction=tasks.BOXED_INSTRUCTION) for q in questions]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    free = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=False, max_new_tokens=12,
                          eos_token_id=None, pad_token_id=tok.pad_token_id)[:, enc.input_ids.shape[1]:]
    eos = sorted({int(free[0, 2]), int(free[1, 7])})  # rows that stop early, at different steps
    lengths = compare_greedy(model, tok, prompts, 12, eos, switches)
    assert lengths[0] <= 3 and lengths.max() > lengths.min()
    if switches.capture:  # graphs recorded after the warm-ups, one per number of slots read, and replayed
        assert len(cpu_capture.made) >= 2


def test_every_switch_on_the_toy_models_and_with_lora(cpu_capture):
    import grpo
    everything = ladder()[-1][1]
    for name in ("toy-small", "toy-hard-small"):
        model, tok = common.load_model(name, CPU)
        cpu_capture.models = [model]
        prompts = [tasks.format_prompt(tok, q, instruction="") for q in ("05+68", "417+817", "9+1", "57+68", "999+999")]
        assert compare_greedy(model, tok, prompts, 8, tasks.eos_ids(model, tok), everything).min() < 8
    args = common.parse_args(grpo.Args, ["--lora-rank", "4"])
    model, tok = common.load_model("toy-small", CPU, lora=common.lora_config(args), generation="fastgen")
    nonzero_adapters(model)
    cpu_capture.models = [model]
    prompts = [tasks.format_prompt(tok, q, instruction="") for q in ("05+68", "9+1", "57+68", "99+01")]
    compare_greedy(model, tok, prompts, 8, tasks.eos_ids(model, tok), everything)


def test_grouped_attention_is_the_repeated_heads_attention_over_the_filled_slots_alone():
    """Against transformers' eager attention with K and V repeated per query head, over the first n slots: the
    same output; slots from n on hold NaN, which would spread to the output if they were read."""
    from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

    class Module:
        num_key_value_groups, training = 3, False

    g = torch.Generator().manual_seed(0)
    B, H, K, D, L, n = 3, 6, 2, 8, 16, 10
    q, k, v = torch.randn(B, H, 1, D, generator=g), torch.randn(B, K, L, D, generator=g), torch.randn(B, K, L, D, generator=g)
    mask = torch.rand(B, 1, 1, n, generator=g) > 0.3
    mask[:, ..., -1] = True  # the new token's slot is always open
    reference, _ = eager_attention_forward(Module(), q, k[:, :, :n], v[:, :, :n],
                                           torch.zeros(B, 1, 1, n).masked_fill(~mask, float("-inf")), scaling=D ** -0.5)
    k[:, :, n:], v[:, :, n:] = float("nan"), float("nan")
    out, _ = fastgen._grouped_attention(Module(), q, k, v, mask, scaling=D ** -0.5)
    assert out.shape == reference.shape == (B, 1, H, D)
    assert torch.allclose(out, reference, atol=1e-6)


@pytest.mark.parametrize("layerwise", [False, True])
def test_a_bf16_head_and_fused_projections_in_the_copy_compute_what_autocast_computes(layerwise, monkeypatch):
    """Under bf16 autocast: the copy's untied bf16 head and its q/k/v and gate/up, each one matmul, give
    model.generate's greedy completions under the same autocast, before and after the model's weights move
    (the embedding, which the head is, and a k and a gate projection: the copy is refreshed through them);
    and so does fastgen's own layer on that copy."""
    monkeypatch.setattr(plumbing, "BF16_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(fastgen, "SWITCHES", fastgen.Switches(bf16_head=True, fused=True, layerwise=layerwise, kv_bucket=4))
    model, tok = common.load_model("toy-hard-small", CPU, generation="fastgen")
    prompts = [tasks.format_prompt(tok, q, instruction="") for q in ("05+68", "9+1", "57+68", "417+817", "999+999", "1+1")]

    def both():
        fast = common.sample(model, tok, prompts, 1, 8, greedy=True)
        model.generation = "generate"
        slow = common.sample(model, tok, prompts, 1, 8, greedy=True)
        model.generation = "fastgen"
        assert torch.equal(fast.completion_ids, slow.completion_ids) and fast.texts == slow.texts
        return fast.texts

    before = both()
    shadow = model._bf16_shadow
    head, embedding = shadow.lm_head.weight, shadow.model.embed_tokens.weight
    assert head.dtype == torch.bfloat16 and embedding.dtype == torch.float32 and head is not embedding
    layer = shadow.model.layers[0]
    assert isinstance(layer.mlp, fastgen._FusedMLP) and isinstance(layer.self_attn, fastgen._FusedAttention)
    assert not hasattr(layer.self_attn.inner, "q_proj")  # one copy of the weights, the fused one
    with torch.no_grad():  # "optimizer steps" that change the answers, each through a different refreshed tensor
        model.model.embed_tokens.weight.mul_(-1.3)
        model.model.layers[0].self_attn.k_proj.weight.mul_(2.0)
        model.model.layers[0].mlp.gate_proj.weight.mul_(1.5)  # (-1.5 makes a near tie that bf16 breaks either way)
    assert both() != before and model._bf16_shadow is shadow
    monkeypatch.setattr(fastgen, "SWITCHES", fastgen.Switches())  # other switches: a copy of their own
    both()
    new = model._bf16_shadow
    assert new is not shadow and new.lm_head.weight is new.model.embed_tokens.weight


@pytest.mark.parametrize("switches", [fastgen.Switches(sample_in_step=True),
                                      fastgen.Switches(grouped=True, kv_bucket=4, sample_in_step=True, capture=True),
                                      fastgen.Switches(kv_bucket=4, sample_in_step=True, capture=True, layerwise=True)])
def test_draws_inside_the_step_are_the_cacheless_samplers_given_the_same_noise(switches, cpu_capture, monkeypatch):
    monkeypatch.setattr(fastgen, "SWITCHES", switches)
    test_sampled_completions_are_a_cacheless_samplers_given_the_same_noise(0.7)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_the_steps_bookkeeping_draws_from_the_softmax_and_keeps_stopped_rows_at_pad(temperature):
    """fastgen._advance, what the step runs after its forward (inside it with sample_in_step): 200,000 rows of
    the same logits draw tokens at softmax(logits / T)'s frequencies; a stopped row writes pad and stays stopped,
    a row that draws a stop token stops; the positions move on by one."""
    torch.manual_seed(0)
    n, pad, stop = 200_000, 5, 3
    logits = torch.tensor([2.0, 0.5, -1.0, 1.2, 0.0, -3.0])  # a small vocabulary; token 5 (pad) is rare
    zeros = lambda *shape, dtype=torch.long: torch.zeros(*shape, dtype=dtype)
    s = fastgen._Buffers(zeros(n), zeros(n), torch.tensor([7]), zeros(n, 10), zeros(n, dtype=torch.bool), zeros(n, 10),
                         torch.tensor([2]), torch.tensor([stop] + [-1] * (fastgen.MAX_STOP_TOKENS - 1)))
    s.done[:1000] = True  # rows stopped before
    fastgen._advance(s, logits.expand(n, -1).contiguous(), temperature, greedy=False, pad_id=pad)
    assert (s.tokens[:1000, 2] == pad).all() and s.done[:1000].all()
    draws = s.tokens[1000:, 2]
    assert torch.equal(s.done[1000:], draws == stop) and torch.equal(s.token, s.tokens[:, 2])
    assert (s.position == 1).all() and int(s.cache_position) == 8 and int(s.t) == 3 and (s.mask[:, 8] == 1).all()
    freq = torch.bincount(draws, minlength=6).double() / len(draws)
    p = torch.softmax(logits.double() / temperature, -1)
    chi2 = float((len(draws) * (freq - p) ** 2 / p).sum())
    assert chi2 < 25, (chi2, freq, p)  # 5 degrees of freedom: p < 0.0002 by chance


def test_unknown_switches_are_named():
    assert fastgen.Switches.parse("grouped,capture") == fastgen.Switches(grouped=True, capture=True)
    with pytest.raises(ValueError, match="unknown fastgen switch grouped_attention; known: grouped, bf16_head"):
        fastgen.Switches.parse("grouped_attention")


@pytest.mark.smollm
def test_every_rung_on_smollm2_with_and_without_lora(cpu_capture):
    """SmolLM2-135M-Instruct (real weights; llama, 9 query heads on 3 KV heads, tied head): each rung's greedy
    completions are model.generate's, on ragged prompts where some rows end their turn early; then with LoRA."""
    import smollm2
    import grpo
    path = smollm2.build()
    prompts_of = lambda tok: [tasks.format_prompt(tok, q, instruction="") for q in
                              ("What is 1 + 3?", "What is 8 + 8? Think about it carefully before you answer.", "Hi")]
    model, tok = common.load_model(path, CPU)
    cpu_capture.models = [model]
    for name, switches in ladder(kv_bucket=8):
        lengths = compare_greedy(model, tok, prompts_of(tok), 16, tasks.eos_ids(model, tok), switches)
        assert lengths.min() < 16 and lengths.max() == 16, name
    args = common.parse_args(grpo.Args, ["--lora-rank", "4"])
    model, tok = common.load_model(path, CPU, lora=common.lora_config(args), generation="fastgen")
    nonzero_adapters(model, std=0.02)
    cpu_capture.models = [model]
    compare_greedy(model, tok, prompts_of(tok), 16, tasks.eos_ids(model, tok), ladder(kv_bucket=8)[-1][1])


@pytest.mark.parametrize("lora", [False, True])
def test_layerwise_compiles_one_layer_whatever_the_depth(lora, monkeypatch, tmp_path):
    """Switch layerwise: dynamo traces fastgen's decoder layer once, at any number of slots read, and every layer
    runs that one graph (its weights and cache are its inputs, not constants it is specialised on): the graphs
    and the ops traced are the same for a 2-layer and a 4-layer model, and the greedy completions model.generate's;
    with LoRA's adapters too. Compiled with aot_eager (dynamo and AOTAutograd, no C++ compiler) on a CPU; on CUDA
    inductor compiles it."""
    import grpo
    adapters = lambda: common.lora_config(common.parse_args(grpo.Args, ["--lora-rank", "4"])) if lora else None
    compiled = {}
    monkeypatch.setattr(fastgen, "COMPILE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(fastgen, "_compiled", lambda fn, mode: compiled.setdefault(fn, torch.compile(fn, backend="aot_eager")))
    traced = []
    for layers in (2, 4):
        torch._dynamo.reset()
        compiled.clear()
        path = qwen_like_model(str(tmp_path / f"m{layers}"), "0.5B", layers=layers, hidden_size=64,
                               intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, instruct=True,
                               initializer_range=0.3)
        model, tok = common.load_model(path, CPU, lora=adapters())  # a config each: peft writes the layers it found into it
        nonzero_adapters(model)  # no-op without LoRA
        prompts = [tasks.format_prompt(tok, q, instruction="") for q in ("What is 2 + 3?", "A longer question, with words?")]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        reference = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=False,
                                   max_new_tokens=20, eos_token_id=None, pad_token_id=tok.pad_token_id)
        torch._dynamo.utils.counters.clear()
        fast = fastgen.generate(model, enc.input_ids, enc.attention_mask, 20, [-1], tok.pad_token_id, greedy=True,
                                compile=True, batch_bucket=1, switches=fastgen.Switches(layerwise=True, kv_bucket=8))
        assert torch.equal(fast, reference[:, enc.input_ids.shape[1]:])
        stats = torch._dynamo.utils.counters["stats"]
        traced.append((stats["unique_graphs"], stats["calls_captured"]))
    assert traced[0] == traced[1] and traced[0][0] == 1, traced  # 20 tokens read 3 numbers of slots: still one graph
