"""--lora-rank: only the adapters learn, the reference is the model with its adapters off (equal to the
base loaded on its own), checkpoints hold the adapters alone and resume exactly, final/ is merged (the base
plus the adapters' update, in fp32 also over a bf16 base) and loads without peft, an adapter is refused as a
model, lr defaults are 10x, every script runs with it, and the memory count the README's table uses is the
bytes the parameters, gradients and AdamW states take."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import bench
import common
import plumbing
import tasks
from conftest import ROOT, SCRIPTS, assert_user_error, bf16_published_toy, read_metrics, run_main
from qwen_like import QWEN25_CONFIGS, qwen_like_model

pytest.importorskip("peft")
CPU = torch.device("cpu")
QUICK = ["--eval-size", "50", "--eval-every", "100", "--pass-n", "0"]


def lora_args(rank=4, **kw):
    import grpo
    return common.parse_args(grpo.Args, ["--lora-rank", str(rank), *[x for k, v in kw.items() for x in (f"--{k}", str(v))]])


def assert_final_is_the_base_plus_the_adapters_update(final, base_dir):
    """final/ is the base's W + (alpha / r) B A on every adapted weight (in fp32) and the base's W elsewhere,
    exactly as the adapter beside it says, and every lora_B has moved off its zero start."""
    from safetensors.torch import load_file
    base = {k: w.float() for k, w in load_file(os.path.join(base_dir, "model.safetensors")).items()}
    merged = load_file(os.path.join(final, "model.safetensors"))
    adapter = load_file(os.path.join(final, "adapter", "adapter_model.safetensors"))
    config = json.load(open(os.path.join(final, "adapter", "adapter_config.json")))
    scale, updates = config["lora_alpha"] / config["r"], {}
    for k, a in adapter.items():
        if ".lora_A." in k:
            b = adapter[k.replace(".lora_A.", ".lora_B.")]
            assert b.abs().max() > 0, f"{k}: lora_B never moved"
            updates[k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")] = (b @ a) * scale  # peft's order
    assert updates and set(updates) <= set(base) and set(merged) == set(base)
    assert {w.dtype for w in merged.values()} == {torch.float32}
    for k, w in base.items():
        if k in updates:
            ulp = torch.finfo(torch.float32).eps * w.abs().max().item()
            assert (merged[k] - w).abs().max() > 1000 * ulp, k  # a real update, not rounding
            torch.testing.assert_close(merged[k], w + updates[k], rtol=0, atol=4 * ulp)
        else:
            assert torch.equal(merged[k], w), k


def rollout_of(model, tok):
    torch.manual_seed(0)
    prompts = [tasks.format_prompt(tok, q, instruction="") for q in ("12+34", "57+68", "99+01")]
    return common.sample(model, tok, prompts, 4, 8)


def test_only_the_adapters_learn_and_adapters_off_is_the_base_model():
    model, tok = common.load_model("toy-small", CPU, lora=common.lora_config(lora_args(4)))
    base, _ = common.load_model("toy-small", CPU)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained) and all(p.dtype == torch.float32 for p in trained.values())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ro = rollout_of(model, tok)
    opt = torch.optim.AdamW(list(trained.values()), lr=1e-2)
    for _ in range(3):  # a few steps of a loss that moves every adapter
        opt.zero_grad()
        (-(common.token_logprobs(model, ro) * ro.mask).sum()).backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(trained) and any("lora_B" in n for n in changed)  # B moved off its zero start
    with torch.no_grad():
        off = common.token_logprobs(common.reference(model, "toy-small", CPU, lora_args(4)), ro)
        on, alone = common.token_logprobs(model, ro), common.token_logprobs(base, ro)
    torch.testing.assert_close(off, alone, rtol=0, atol=1e-6)  # adapters off: the base, loaded on its own
    assert (on - alone).abs().max() > 1e-3  # and the trained adapters do change the policy


def test_lora_learning_rates_are_ten_times_and_a_given_one_wins(tmp_path):
    import codistill
    import grpo
    assert common.parse_args(grpo.Args, []).lr == 2e-5 and lora_args(8).lr == 2e-4  # the toy's
    assert lora_args(8, lr="3e-3").lr == 3e-3
    assert common.parse_args(grpo.Args, ["--model", str(tmp_path), "--lora-rank", "16"]).lr == 1e-5  # the paper's 1e-6
    c = common.parse_args(codistill.Args, ["--lora-rank", "4"])
    assert (c.small_lr, c.large_lr) == (2e-4, 2e-4)


def test_checkpoint_holds_the_adapters_and_resume_is_exact(tmp_path):
    flags = ["--lora-rank", "4", *QUICK, "--save-every", "2"]
    run_main("grpo.py", "--steps", 4, "--out", tmp_path / "full", *flags)
    run_main("grpo.py", "--steps", 2, "--out", tmp_path / "part", *flags)
    ckpt = tmp_path / "part" / "checkpoint"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(ckpt / "policy"))
    assert not (ckpt / "policy" / "model.safetensors").exists()  # no base weights
    state = torch.load(ckpt / "state.pt", weights_only=False)
    names = list(state["optimizers"]["policy"]["state"])
    assert names and all("lora_" in n for n in names)  # AdamW states of the adapters alone
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    full_size = 16 * sum(p.numel() for p in common.load_model("toy-small", CPU)[0].parameters())
    assert size < 0.5 * full_size  # (a 0.5B checkpoint: 7.4 GiB full, megabytes under LoRA)
    run_main("grpo.py", "--steps", 4, "--out", tmp_path / "part", *flags, "--resume")
    train = lambda out: [{k: v for k, v in r.items() if not k.startswith("time/")}  # noqa: E731
                         for r in read_metrics(out) if "train/loss" in r]
    assert train(tmp_path / "full") == train(tmp_path / "part") and len(train(tmp_path / "full")) == 4  # exact
    last_eval = lambda out: [r["eval/accuracy"] for r in read_metrics(out) if "eval/accuracy" in r][-1]
    assert last_eval(tmp_path / "full") == last_eval(tmp_path / "part")
    assert_user_error("grpo.py", "--steps", 5, "--out", tmp_path / "part", *QUICK, "--resume",
                      message="was made with --lora-rank 4: resume with the same")


def test_final_is_merged_loads_without_peft_and_the_adapter_is_beside_it(tmp_path):
    out = tmp_path / "run"
    assert "eval/accuracy" in run_main("grpo.py", "--steps", 3, "--lora-rank", "4", "--lr", "3e-3", *QUICK, "--out", out)
    code = ("import sys; sys.modules['peft'] = None\n"  # no peft: the import fails
            "import torch; from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out / 'final')!r})\n"
            "ids = torch.tensor([[3, 4, 10, 5, 6, 11]])\n"
            "print(repr(m(ids).logits[0, -1].tolist()))\n")
    q = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert q.returncode == 0, q.stderr[-2000:]
    merged = torch.tensor(eval(q.stdout.strip().splitlines()[-1]))
    import peft
    base, _ = common.load_model("toy-small", CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft's own use of a deprecated transformers name
        adapted = peft.PeftModel.from_pretrained(base, str(out / "final" / "adapter"))
    with torch.no_grad():
        logits = adapted(torch.tensor([[3, 4, 10, 5, 6, 11]])).logits[0, -1]
        torch.testing.assert_close(merged, logits, rtol=1e-4, atol=1e-5)  # the merge is the adapted model
        plain = common.load_model("toy-small", CPU)[0](torch.tensor([[3, 4, 10, 5, 6, 11]])).logits[0, -1]
        assert (logits - plain).abs().max() > 1e-4  # (peft wrapped `base` in place: a fresh copy for the base)
    assert_final_is_the_base_plus_the_adapters_update(out / "final", tasks.toy_path("toy-small"))


def test_a_bf16_base_is_merged_in_fp32(monkeypatch, tmp_path):
    """On CUDA the base is bf16: merged there, an update of LoRA's size at a real lr (1e-5) would mostly round
    away. final/ holds W + (alpha / r) B A in fp32 (the base's bf16 values are exact in it)."""
    monkeypatch.setattr(plumbing, "BF16_DEVICES", ("cuda", "cpu"))  # the base in bf16, as on CUDA
    base = bf16_published_toy(tmp_path / "bf16")
    run_main("grpo.py", "--model", base, "--dataset", "toy", "--steps", 2, "--lora-rank", "4", "--max-new-tokens", 8,
             "--prompts-per-step", 8, "--micro-batch-size", 64, *QUICK, "--out", tmp_path / "run")  # lr: LoRA's 1e-5
    assert_final_is_the_base_plus_the_adapters_update(tmp_path / "run" / "final", base)
    assert json.load(open(tmp_path / "run" / "final" / "config.json"))["dtype"] == "float32"


def test_an_adapter_is_refused_as_a_model_in_one_line(tmp_path):
    """Started from without --resume, an adapter directory would train its base + it, with --lora-* unused and a
    reference (the adapters off) that is the bare base, not the initial policy: it is refused, naming the merged
    model (final/, beside final/adapter/), whose reference is the policy it holds. A teacher likewise."""
    model, tok = common.load_model("toy-small", CPU, lora=common.lora_config(lora_args(4)))
    adapter = tmp_path / "final" / "adapter"
    model.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    for script, flags in (("grpo.py", ["--model", adapter, "--lora-rank", "8"]), ("grpo.py", ["--model", adapter]),
                          ("kdrl.py", ["--teacher", adapter]), ("codistill.py", ["--large", adapter, "--lora-rank", "4"])):
        quick = ["--dataset", "toy", "--steps", 1, "--max-new-tokens", 8, "--eval-size", 8, "--pass-n", 0]  # it trained before
        line = assert_user_error(script, *flags, *quick, "--out", tmp_path / "o", message=" is a LoRA adapter, not a model: ")
        assert f"--{flags[0].lstrip('-')} {adapter} " in line and "the merged model" in line and "--resume" in line
    assert not (tmp_path / "o").exists()  # refused before anything is written


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_trains_adapters(script, tmp_path):
    flags = ["--presample-size", "16"] if script == "dph_rl" else []
    run_main(f"{script}.py", "--steps", 1, "--lora-rank", "2", "--eval-size", "8", "--pass-n", "0", "--out", tmp_path, *flags)
    finals = dict(small="toy-small", large="toy-large") if script in ("codistill", "bdkd") else {"": "toy-small"}
    for f, base in finals.items():
        assert_final_is_the_base_plus_the_adapters_update(tmp_path / "final" / f, tasks.toy_path(base))


def test_lora_with_fsdp_is_refused_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets: checked before the process group exists
    assert_user_error("grpo.py", "--lora-rank", "4", "--fsdp", "--out", tmp_path / "o",
                      message="--lora-rank with --fsdp is not supported")


def test_the_memory_count_is_the_bytes_parameters_gradients_and_adamw_states_take(monkeypatch, tmp_path):
    """Real Qwen2.5-0.5B shapes (151,936-row head, hidden 896), cut to 2 layers: what bench.trained_bytes
    counts (full: 16 bytes a parameter; LoRA: 2 a bf16 base parameter, 16 an adapter one) is what the
    parameters, their gradients and AdamW's states hold after a step. The README's table applies the same
    count at full depth."""
    monkeypatch.setattr(plumbing, "BF16_DEVICES", ("cuda", "cpu"))  # the base in bf16, as on CUDA
    path = qwen_like_model(str(tmp_path / "m"), "0.5B", layers=2)
    cfg = dict(QWEN25_CONFIGS["0.5B"], num_hidden_layers=2)
    for rank in (0, 16):
        args = lora_args(rank) if rank else None
        model, _ = common.load_model(path, CPU, lora=common.lora_config(args) if rank else None)
        trained = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trained, lr=1e-3)
        ids = torch.randint(0, 1000, (1, 6))
        model(input_ids=ids).logits[:, -1].float().logsumexp(-1).sum().backward()
        opt.step()
        held = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied weight once
        held += sum(p.grad.numel() * p.grad.element_size() for p in trained)
        held += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.ndim > 0)
        assert held == bench.trained_bytes(cfg, rank), rank
        adapters = bench.lora_params(cfg, rank) if rank else 0
        assert sum(p.numel() for p in model.parameters()) == bench.model_params(cfg) + adapters
        del model, opt


def test_lora_on_the_toy_learns(tmp_path):
    """The toy's recommended LoRA (README) lifts toy-small well above its 0.314 within 60 steps."""
    run_main("grpo.py", "--steps", 60, "--lora-rank", "8", "--eval-size", "200", "--eval-every", "60", "--pass-n", "0",
             "--out", tmp_path)
    accs = [r["eval/accuracy"] for r in read_metrics(tmp_path) if "eval/accuracy" in r]
    assert accs[0] < 0.4 and accs[-1] > 0.7, accs


def test_the_readme_table_puts_the_headline_command_on_a_24_gb_card_with_lora():
    rows = {line.split("`")[1]: line for line in bench.memory_table().splitlines() if line.startswith("| `")}
    headline = rows["codistill.py --small Qwen2.5-0.5B --large Qwen2.5-1.5B"]
    assert headline.endswith("| no / checkpointing only |")  # full fine-tuning: never; LoRA + checkpointing: yes
    assert "| 30.4 GiB |" in headline and "| 4.2 GiB |" in headline  # fixed: full, then LoRA
