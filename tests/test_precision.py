"""Precision and memory of the GPU path, checked on CPU: bf16 autocast is forced on for the CPU
(plumbing.BF16_DEVICES), which takes the same branches as CUDA does."""

import json
import os

import pytest
import torch
from safetensors import safe_open

import common
import plumbing
import rundir
import tasks
from conftest import bf16_published_toy, read_metrics, run_main
from qwen_like import QWEN_VOCAB_ROWS, qwen_like_model

CPU = torch.device("cpu")


@pytest.fixture
def bf16_on_cpu(monkeypatch):
    monkeypatch.setattr(plumbing, "BF16_DEVICES", ("cuda", "cpu"))


def real_head_model(seed=0):
    """A random Qwen2 with Qwen2.5's 151,936-row tied head (narrow and one layer deep), its head scaled
    so that logits spread as a trained model's do (std ~4: bf16 rounds them by up to ~0.03)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=QWEN_VOCAB_ROWS, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 0.5)
    return model


def rollout(B=3, P=5, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0
    return common.Rollout(torch.randint(QWEN_VOCAB_ROWS, (B, P), generator=g), prompt_mask,
                          torch.randint(QWEN_VOCAB_ROWS, (B, T), generator=g), torch.ones(B, T),
                          torch.full((B,), T), [""] * B, torch.zeros(B, dtype=torch.bool))


def test_logprobs_under_bf16_autocast_have_an_fp32_lm_head(monkeypatch):
    """Under autocast the decoder's matmuls are bf16, but the LM head and the log-softmax are fp32:
    the log-probs equal an fp32 head applied to the autocast hidden states (to 1e-5), and the fp32
    model's to 5e-3 (the decoder's own bf16 error: 7e-4 here; a bf16 head was off by 0.13)."""
    model, ro = real_head_model(), rollout()
    fp32 = common.token_logprobs(model, ro)  # (B, T) no autocast on CPU
    monkeypatch.setattr(plumbing, "BF16_DEVICES", ("cuda", "cpu"))
    logp = common.token_logprobs(model, ro, chunk_size=7)  # (B, T) chunks across rows
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ids, attn = ro.input_ids(), ro.attention_mask()
        h = common.last_hidden_state(model, ids, attn, (attn.cumsum(1) - 1).clamp(min=0))[:, -7:-1]
    assert h.dtype == torch.float32  # the residual stream of fp32 weights stays fp32 under autocast
    logits = h.float() @ model.get_output_embeddings().weight.T  # (B, T, V) fp32
    head_fp32 = torch.log_softmax(logits, -1).gather(-1, ro.completion_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(logp, head_fp32, atol=1e-5, rtol=0)
    assert (logp - fp32).abs().max() < 5e-3
    logp.sum().backward()  # the checkpointed fp32 chunks backpropagate into the fp32 master weights
    assert model.get_output_embeddings().weight.grad.dtype == torch.float32


def tf32(x):
    """x as TF32 tensor cores read an fp32 operand: 10 of its 23 mantissa bits, rounded to nearest."""
    return ((x.contiguous().view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


def test_a_tf32_head_moves_log_probs_a_tenth_as_far_as_bf16_logits():
    """On CUDA the head's fp32 matmul runs on TF32 tensor cores (plumbing.init_distributed: 35% off an H200
    update): its operands keep 10 mantissa bits, its sums and logits stay fp32. Emulated here against a
    float64 head at logits of std 4: the log-probs move by 0.002 on average (0.009 at most); bf16 logits
    moved them by 0.05 (0.14)."""
    model, ro = real_head_model(), rollout(B=4, T=32)
    with torch.no_grad():
        h, w = common.completion_states(model, ro)  # (N, D), (V, D)
    y = ro.completion_ids.reshape(-1)
    logp = lambda logits: torch.log_softmax(logits.double(), -1).gather(-1, y[:, None]).squeeze(-1)  # (N,)
    exact = logp(h.double() @ w.double().T)
    err_tf32 = (logp(tf32(h) @ tf32(w).T) - exact).abs()
    err_bf16 = (logp(h.bfloat16() @ w.bfloat16().T) - exact).abs()
    assert (tf32(h) != h).any() and err_tf32.mean() < 5e-3 and err_tf32.max() < 2e-2
    assert err_tf32.max() < err_bf16.max() / 10 and err_tf32.mean() < err_bf16.mean() / 10


def test_kv_cache_keys_are_bf16_under_autocast(bf16_on_cpu):
    """RoPE's cos/sin come in the embeddings' dtype (fp32 master weights) and would promote the
    rotated keys, and the whole KV cache's keys, to fp32."""
    model, tok = common.load_model("toy-small", CPU)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad(), plumbing.autocast(CPU):
        cache = model(input_ids=ids, use_cache=True).past_key_values
    for layer in cache.layers:
        assert layer.keys.dtype == layer.values.dtype == torch.bfloat16
    ro = common.sample(model, tok, ["12+34"], 2, 4)  # generation under autocast with the hooked RoPE
    assert ro.completion_ids.shape[0] == 2


def test_frozen_models_are_read_in_bf16_where_compute_is_bf16(bf16_on_cpu, monkeypatch):
    """A frozen model is read from disk in bf16 (never a full fp32 copy first); a trained one in fp32."""
    from transformers import AutoModelForCausalLM
    real, asked = AutoModelForCausalLM.from_pretrained, []

    def spy(*a, **kw):
        asked.append(kw.get("dtype"))
        return real(*a, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    frozen, _ = common.load_model("toy-large", CPU, frozen=True)
    trained, _ = common.load_model("toy-small", CPU)
    assert asked == [torch.bfloat16, torch.float32]
    assert {p.dtype for p in frozen.parameters()} == {torch.bfloat16} and not any(p.requires_grad for p in frozen.parameters())
    assert {p.dtype for p in trained.parameters()} == {torch.float32}


def dtypes(path):
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_final_model_keeps_the_training_and_is_in_its_published_dtype_when_that_loses_nothing(tmp_path):
    """A model published in bf16 trains in fp32. Rounded to bf16, an update of 1e-5 (an RL step at lr 1e-5) leaves
    most entries where they were, so final/ keeps the fp32 weights (its config says fp32), exactly; a model that
    bf16 holds exactly (untrained) is saved in bf16, half the size. The checkpoint keeps the fp32 master weights
    that resume needs and records the published dtype."""
    src = qwen_like_model(str(tmp_path / "src"), "0.5B", layers=1, hidden_size=64, intermediate_size=128,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
    model, tok = common.load_model(src, CPU)
    assert {p.dtype for p in model.parameters()} == {torch.float32} and model.published_dtype == torch.bfloat16
    rundir.save_pretrained(model, tok, str(tmp_path / "untrained"), published=True)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-5 * torch.randn_like(p))  # a trained model: no longer bf16 values
    unmoved = sum((p.to(torch.bfloat16).float() == b).sum().item() for p, b in zip(model.parameters(), before))
    assert unmoved > 0.8 * sum(b.numel() for b in before)  # what bf16 would keep of the update: under a fifth
    rundir.save_pretrained(model, tok, str(tmp_path / "final"), published=True)
    rundir.save_pretrained(model, tok, str(tmp_path / "ckpt"))
    untrained, final, ckpt = tmp_path / "untrained", tmp_path / "final", tmp_path / "ckpt"
    assert dtypes(untrained) == {"BF16"} and dtypes(final) == dtypes(ckpt) == {"F32"}
    configs = [json.load(open(d / "config.json"))["dtype"] for d in (untrained, final, ckpt)]
    assert configs == ["bfloat16", "float32", "bfloat16"]
    assert os.path.getsize(untrained / "model.safetensors") < 0.55 * os.path.getsize(final / "model.safetensors")
    for d in (final, ckpt):  # exact: the trained weights
        for a, b in zip(model.parameters(), common.load_model(str(d), CPU)[0].parameters()):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert common.load_model(str(ckpt), CPU)[0].published_dtype == torch.bfloat16  # a resume saves its final/ alike
    toy, toy_tok = common.load_model("toy-small", CPU)  # published in fp32: saved in fp32
    rundir.save_pretrained(toy, toy_tok, str(tmp_path / "toy" / "final"), published=True)
    assert dtypes(tmp_path / "toy" / "final") == {"F32"}


def test_a_run_of_a_bf16_published_model_saves_what_it_trained(tmp_path):
    """grpo.py on toy-small published in bf16, at a real lr (1e-5): final/, as loaded from disk, is the run's fp32
    policy (the checkpoint's) and answers the held-out questions as the run's last evaluation did."""
    base, out = bf16_published_toy(tmp_path / "bf16"), tmp_path / "run"
    run_main("grpo.py", "--model", base, "--dataset", "toy", "--steps", 2, "--lr", "1e-5", "--max-new-tokens", 8,
             "--prompts-per-step", 8, "--micro-batch-size", 64, "--eval-size", 100, "--eval-every", 2, "--pass-n", 0,
             "--save-every", 2, "--out", out)
    final, tok = common.load_model(str(out / "final"), CPU)
    trained, _ = common.load_model(str(out / "checkpoint" / "policy"), CPU)
    moved = 0
    for (name, a), b, w in zip(final.named_parameters(), trained.parameters(), common.load_model(base, CPU)[0].parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
        moved += (a != w).sum().item()
    assert moved > 0.5 * sum(p.numel() for p in final.parameters())  # (the run did train)
    last = [r["eval/accuracy"] for r in read_metrics(out) if "eval/accuracy" in r][-1]
    assert common.evaluate(final, tok, tasks.load_data("toy", "eval")[:100], 8, instruction="")[0]["eval/accuracy"] == last
