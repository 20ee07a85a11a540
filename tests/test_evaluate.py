"""The papers' benchmarks (tasks.BENCHMARKS) and evaluate.py.

tests/data/benchmarks/ holds a few real rows of each benchmark in the format of the hub copy that
tasks.BENCHMARKS names (where they come from: its README.md); $BENCHMARK_DIR points the loader there."""

import json
import os

import pytest

import grading
import tasks
from conftest import ROOT

FIXTURES = os.path.join(ROOT, "tests", "data", "benchmarks")


@pytest.fixture
def fixtures(monkeypatch):
    monkeypatch.setenv(tasks.BENCHMARK_DIR, FIXTURES)


def fixture_rows(name):
    with open(os.path.join(FIXTURES, f"{name}.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_every_benchmark_has_fixture_rows_with_its_fields():
    for name, b in tasks.BENCHMARKS.items():
        rows = fixture_rows(name)
        assert len(rows) >= 4, name
        assert all(isinstance(r[b.question], str) and r[b.answer] not in ("", None, []) for r in rows), name


def test_benchmarks_load_with_their_golds_as_text(fixtures):
    """Each row's gold as the grader needs it: OlympiadBench's list without its $...$, AMC's 27.0 as 27,
    AIME's 025 as written, GSM8K's solution cut after ####."""
    got = {name: tasks.load_data(name, "eval") for name in tasks.BENCHMARKS}
    for name, b in tasks.BENCHMARKS.items():
        assert [r["question"] for r in got[name]] == [r[b.question] for r in fixture_rows(name)]
    golds = {name: [r["answer"] for r in rows] for name, rows in got.items()}
    assert golds["olympiadbench"][:3] == ["(1,8,19), (2,7,13), (4,5,7)", "f(x)=2 x", "90^{\\circ},60^{\\circ}"]
    assert golds["amc23"] == ["27", "36", "45", "3159"]
    assert golds["aime24"][:2] == ["204", "025"]
    assert golds["minerva"][:4] == ["1.6", "4.5e33", "1e-5", "-3./2"]
    assert golds["gsm8k"][:2] == ["18", "3"]
    assert tasks.load_data("math", "eval") == got["math500"]  # MATH's eval split is MATH-500


def test_each_benchmark_gold_is_graded_right_when_boxed_and_wrong_when_off_by_one(fixtures):
    for name in tasks.BENCHMARKS:
        for r in tasks.load_data(name, "eval"):
            assert grading.is_correct(f"So the answer is $\\boxed{{{r['answer']}}}$.", r["answer"]), (name, r["answer"])
            assert not grading.is_correct("\\boxed{3158}", r["answer"]), (name, r["answer"])


def test_benchmarks_read_the_hub_copy_named(monkeypatch):
    import datasets
    calls = []

    def fake(path, name=None, split=None):
        calls.append((path, name, split))
        b = next(b for b in tasks.BENCHMARKS.values() if b.repo == path)
        return [{b.question: "q?", b.answer: ["$5$", "$7$"] if b.answer == "final_answer" else "5"}]

    monkeypatch.delenv(tasks.BENCHMARK_DIR, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake)
    for name, b in tasks.BENCHMARKS.items():
        assert tasks.load_data(name, "eval") == [dict(question="q?", answer="5, 7" if name == "olympiadbench" else "5")]
    assert calls == [(b.repo, b.config, b.split) for b in tasks.BENCHMARKS.values()]


def test_a_local_copy_in_another_format_is_one_line(monkeypatch, tmp_path, capsys):
    (tmp_path / "minerva.jsonl").write_text(json.dumps(dict(problem="q?", solution="\\boxed{5}")) + "\n")
    monkeypatch.setenv(tasks.BENCHMARK_DIR, str(tmp_path))
    with pytest.raises(SystemExit) as e:
        tasks.load_data("minerva", "eval")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == "error: benchmark 'minerva': a row without the field 'question' (its rows have " \
                                       "'question' and 'answer')"


def test_a_benchmark_is_not_a_training_set(capsys):
    with pytest.raises(SystemExit) as e:
        tasks.load_data("aime24", "train")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and err.startswith("error: 'aime24' is a benchmark, for evaluation only")


def test_offline_a_benchmark_not_in_the_cache_fails_in_one_line_naming_it(monkeypatch, tmp_path, capsys):
    import datasets
    import huggingface_hub
    monkeypatch.delenv(tasks.BENCHMARK_DIR, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))  # nothing cached
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SystemExit) as e:
        tasks.load_data("aime25", "eval")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err, err
    assert err.startswith("error: cannot load benchmark 'aime25' (math-ai/aime25, split test;"), err
    assert "load_dataset('math-ai/aime25', 'default', split='test')" in err and "$BENCHMARK_DIR/aime25.jsonl" in err


# ---------------------------------------------------------------- evaluate.py

def direct_greedy(model, tok, rows, dataset, max_new_tokens):
    """Right greedy answers counted with model.generate, one question at a time (no batch, no padding,
    no process split), graded by grading.is_correct: what evaluate.py's table must say."""
    import torch
    right = 0
    for r in rows:
        prompt = tasks.format_prompt(tok, r, instruction=tasks.prompt_instruction(dataset))
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=tasks.eos_ids(model, tok), pad_token_id=tok.pad_token_id)
        right += grading.is_correct(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), r["answer"])
    return right


def pass_at_k_by_counting(verdicts, k):
    """The chance that k of the n answers, drawn without replacement, hold a right one: every k-subset counted."""
    import itertools
    subsets = list(itertools.combinations(verdicts, k))
    return sum(any(s) for s in subsets) / len(subsets)


def read_samples(out):
    with open(str(out).removesuffix(".json") + ".samples.jsonl") as f:
        return [json.loads(line) for line in f]


def test_toy_table_equals_a_direct_count_and_pass_at_k_the_unbiased_estimator(tmp_path):
    import torch
    import common
    from conftest import run_main
    out = tmp_path / "toy.json"
    printed = run_main("evaluate.py", "--model", "toy-small", "--benchmarks", "toy", "--limit", "40", "--pass-n", "4",
                       "--pass-k", "1,2,4", "--batch-size", "16", "--out", out)
    result = json.load(open(out))["results"]["toy"]
    rows = tasks.load_data("toy", "eval")[:40]
    model, tok = common.load_model("toy-small", torch.device("cpu"))
    right = direct_greedy(model, tok, rows, "toy", max_new_tokens=8)
    assert 0 < right < 40 and result["questions"] == 40 and result["greedy_accuracy"] == right / 40
    samples = read_samples(out)
    assert [(s["question"], s["gold"]) for s in samples] == [(r["question"], r["answer"]) for r in rows]
    for s in samples:
        for a in [s["greedy"], *s["samples"]]:
            assert a["correct"] == grading.is_correct(a["completion"], s["gold"])
            assert a["answer"] == grading.extract_answer(a["completion"])
    verdicts = [[a["correct"] for a in s["samples"]] for s in samples]
    assert all(len(v) == 4 for v in verdicts)
    assert result["mean_accuracy@4"] == pytest.approx(sum(map(sum, verdicts)) / 160, abs=1e-12)
    for k in (1, 2, 4):
        assert result[f"pass@{k}"] == pytest.approx(sum(pass_at_k_by_counting(v, k) for v in verdicts) / 40, abs=1e-12)
    assert result["pass@1"] < result["pass@2"] < result["pass@4"]
    assert (f"| toy | 40 | {result['greedy_accuracy']:.3f} | {result['mean_accuracy@4']:.3f} | {result['pass@1']:.3f} | "
            f"{result['pass@2']:.3f} | {result['pass@4']:.3f} |") in printed


def test_answers_whose_grading_ran_out_of_time_are_counted_in_the_table_and_json(tmp_path, monkeypatch):
    """A check that times out scores 0: evaluate.py counts such answers per benchmark ('grade errors')."""
    from conftest import run_main
    rows = tasks.load_data("toy", "eval")[:12]
    slow = {r["answer"] for r in rows[:3]}

    def is_correct(completion, gold):
        if gold in slow:
            raise grading.GradingError("grading took more than 1.0 s of CPU time")
        return grading.is_correct(completion, gold)

    monkeypatch.setattr(tasks, "is_correct", is_correct)
    out = tmp_path / "toy.json"
    printed = run_main("evaluate.py", "--model", "toy-small", "--benchmarks", "toy", "--limit", "12", "--pass-n", "2",
                       "--batch-size", "4", "--out", out)
    result = json.load(open(out))["results"]["toy"]
    timed_out = [s for s in read_samples(out) if s["gold"] in slow]
    assert len(timed_out) >= 3 and result["grade_errors"] == 3 * len(timed_out)  # the greedy answer and 2 sampled
    assert not any(a["correct"] for s in timed_out for a in [s["greedy"], *s["samples"]])
    assert "| benchmark | questions | greedy | mean@2 | pass@2 | grade errors |" in printed
    assert f"| toy | 12 | {result['greedy_accuracy']:.3f} | {result['mean_accuracy@2']:.3f} | " \
           f"{result['pass@2']:.3f} | {result['grade_errors']} |" in printed


@pytest.fixture(scope="module")
def answers_27(tmp_path_factory):
    """A random-shaped Qwen2 with Qwen's tokenizer that answers every question '\\boxed{27}' (then <|im_end|>):
    right on the AMC 2023 row whose gold is 27.0, wrong on every other real row."""
    from qwen_like import qwen_tokenizer
    from test_grading import bigram_qwen
    tok = qwen_tokenizer(instruct=True)
    ids = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    prompt = tasks.format_prompt(tok, "Q", instruction=tasks.prompt_instruction("amc23"))
    chain = [ids(prompt)[-1], *ids("\\boxed{27}"), tok.convert_tokens_to_ids("<|im_end|>")]
    assert len(set(chain)) == len(chain)
    path = tmp_path_factory.mktemp("answers-27")
    bigram_qwen(tok, chain).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_real_rows_of_every_benchmark_table_equals_a_direct_count(fixtures, answers_27, tmp_path):
    import torch
    import common
    from conftest import run_main
    out = tmp_path / "suite.json"
    printed = run_main("evaluate.py", "--model", answers_27, "--pass-n", "2", "--max-new-tokens", "12", "--out", out)
    results = json.load(open(out))["results"]
    assert list(results) == [*tasks.BENCHMARKS, "average"]
    model, tok = common.load_model(answers_27, torch.device("cpu"))
    counted = {name: direct_greedy(model, tok, tasks.load_data(name, "eval"), name, 12) for name in tasks.BENCHMARKS}
    assert counted == {name: int(name == "amc23") for name in tasks.BENCHMARKS}
    for name in tasks.BENCHMARKS:
        r = results[name]
        assert r["questions"] == len(fixture_rows(name)) and r["greedy_accuracy"] == counted[name] / r["questions"]
        assert r["mean_accuracy@2"] == r["pass@2"] == r["greedy_accuracy"]  # it writes the same answer at T = 1
    assert results["average"]["greedy_accuracy"] == pytest.approx(0.25 / 7)
    answers = [a for s in read_samples(out) for a in [s["greedy"], *s["samples"]]]
    assert all(a["completion"] == "\\boxed{27}" and not a["truncated"] for a in answers)
    assert "| amc23 | 4 | 0.250 | 0.250 | 0.250 |" in printed and "| average |  | 0.036 | 0.036 | 0.036 |" in printed


def trained_toy(lora: bool):
    """toy-small as a run holds it after training on CUDA (plumbing.BF16_DEVICES must hold "cpu"): full fine-tuning,
    fp32 weights moved by an update of RL's size (std 5e-5); LoRA, a bf16 base and fp32 adapters whose B moved so."""
    import torch
    import common
    from test_lora import lora_args
    model, tok = common.load_model("toy-small", torch.device("cpu"), lora=common.lora_config(lora_args(4)) if lora else None)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or not lora:
                p.add_(torch.randn_like(p), alpha=5e-5)
    return model.eval(), tok


@pytest.mark.parametrize("lora", [False, True])
def test_a_runs_final_model_is_scored_as_the_run_scored_it(monkeypatch, tmp_path, lora):
    """On CUDA (BF16_DEVICES with "cpu": the same branches) a run scores its policy as fp32 weights under bf16
    autocast, a LoRA run as its bf16 base with fp32 adapters, unmerged. final/ (fp32) and final/adapter read back by
    evaluate.load give the same logits to the last bit; read frozen in bf16 (or merged into a bf16 base), 6% of the
    update was left."""
    import torch
    import evaluate
    import plumbing
    import rundir
    monkeypatch.setattr(plumbing, "BF16_DEVICES", ("cuda", "cpu"))
    cpu, x = torch.device("cpu"), torch.tensor([[3, 4, 10, 5, 6, 11]])
    model, tok = trained_toy(lora)
    with torch.no_grad(), plumbing.autocast(cpu):
        want = model(x).logits
    run = object.__new__(rundir.Run)
    run.out = str(tmp_path)
    run.save_final({"": (model, tok)})
    for path in [tmp_path / "final"] + [tmp_path / "final" / "adapter"] * lora:
        got, _ = evaluate.load(str(path), cpu, "generate")
        assert not any(p.requires_grad for p in got.parameters()) and not got.training and got.generation == "generate"
        with torch.no_grad(), plumbing.autocast(cpu):
            assert torch.equal(got(x).logits, want), path
def test_under_torchrun_the_processes_share_the_questions_and_rank_0_writes_the_same_table(tmp_path):
    """Two processes (gloo) answer every other question; the greedy figures and completions gathered on rank 0
    equal one process's (the sampled ones differ: each process draws its own)."""
    import subprocess
    import sys
    from conftest import run_main
    args = ["--model", "toy-small", "--benchmarks", "toy", "--limit", "21", "--pass-n", "2", "--batch-size", "4"]
    run_main("evaluate.py", *args, "--out", tmp_path / "one.json")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "evaluate.py"), *args, "--out", str(tmp_path / "two.json")], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("| toy | 21 |") == 1  # rank 0 alone prints
    one, two = (json.load(open(tmp_path / f))["results"]["toy"] for f in ("one.json", "two.json"))
    assert one["greedy_accuracy"] == two["greedy_accuracy"] and one["questions"] == two["questions"] == 21
    greedy = lambda out: [(s["index"], s["greedy"]) for s in read_samples(out)]  # noqa: E731
    assert greedy(tmp_path / "one.json") == greedy(tmp_path / "two.json")
    assert all(len(s["samples"]) == 2 for s in read_samples(tmp_path / "two.json"))


@pytest.mark.parametrize("args, message", [
    (["--pass-n", "4", "--pass-k", "1,8"], "--pass-k 1,8: each k must be between 1 and --pass-n (4)"),
    (["--temperature", "0"], "--temperature be positive (got 'toy', 0.0)"),
    (["--out", os.path.join(ROOT, "README.md", "x.json")], "cannot write the results to '"),
    (["--benchmarks", "mmlu"], "unknown dataset 'mmlu' (benchmarks, for evaluation: math500, minerva,"),
    (["--limit", "-1"], "--limit must be at least 0 (got -1)"),
])
def test_user_errors_are_one_line(args, message):
    from conftest import assert_user_error
    assert_user_error("evaluate.py", "--model", "toy-small", "--benchmarks", "toy", *args, message=message)


def test_out_a_new_directory_gets_the_results_in_it(tmp_path):
    """--out newdir/ (or an existing directory): created before the evaluation, the table and the completions
    written in it under the default's names (it failed at the end, on newdir/.samples.jsonl)."""
    from conftest import run_main
    for out in (tmp_path / "new" / "dir", tmp_path / "new"):
        printed = run_main("evaluate.py", "--model", "toy-small", "--limit", "4", "--pass-n", "0", "--out", f"{out}/")
        [table] = [p for p in os.listdir(out) if p.endswith(".json")]
        assert table.startswith("evaluate-") and os.path.isfile(out / table.replace(".json", ".samples.jsonl"))
        assert json.load(open(out / table))["results"]["toy"]["questions"] == 4 and str(out / table) in printed
    assert sorted(os.listdir(tmp_path / "new")) == ["dir", table, table.replace(".json", ".samples.jsonl")]


def test_a_runs_final_model_is_asked_as_the_run_asked_unless_a_flag_says_otherwise(tmp_path, monkeypatch):
    """--model DIR/final (or its adapter, its checkpoint) takes --max-new-tokens, --instruction and --system-prompt from
    the run's config.json, and says so in one line: the run's own evaluation is then the table's number (with
    evaluate.py's 4096 tokens it was another). A flag given wins."""
    from conftest import read_metrics, run_main
    run = tmp_path / "run"
    run_main("grpo.py", "--steps", 0, "--max-new-tokens", 2, "--eval-size", 40, "--pass-n", 0, "--out", run)
    [row] = read_metrics(run)
    flags = ["--benchmarks", "toy", "--limit", "40", "--pass-n", "0"]
    printed = run_main("evaluate.py", "--model", run / "final", *flags, "--out", tmp_path / "a.json")
    line = f"as the run in '{run}' asked (its config.json): --max-new-tokens 2 --instruction ''"
    assert line in printed.splitlines() and json.load(open(tmp_path / "a.json"))["args"]["max_new_tokens"] == 2
    assert f"| toy | 40 | {row['eval/accuracy']:.3f} |" in printed  # 2 tokens: every answer cut before its EOS
    printed = run_main("evaluate.py", "--model", run / "final", *flags, "--max-new-tokens", 8, "--out", tmp_path / "b.json")
    assert f"as the run in '{run}' asked (its config.json): --instruction ''" in printed.splitlines()
    assert json.load(open(tmp_path / "b.json"))["results"]["toy"]["greedy_accuracy"] > row["eval/accuracy"]
    config = json.load(open(run / "config.json"))
    json.dump(dict(config, system_prompt="1+1=2", instruction="+"), open(run / "config.json", "w"))
    monkeypatch.setattr(tasks, "check_encodable", lambda tok, prompts: None)  # the toy's refuses the instruction's newline
    printed = run_main("evaluate.py", "--model", run / "final", *flags, "--out", tmp_path / "c.json")
    assert f"as the run in '{run}' asked (its config.json): --max-new-tokens 2 --instruction + --system-prompt 1+1=2" \
        in printed
    said = json.load(open(tmp_path / "c.json"))["args"]
    assert (said["max_new_tokens"], said["instruction"], said["system_prompt"]) == (2, "+", "1+1=2")
    printed = run_main("evaluate.py", "--model", "toy-small", *flags, "--out", tmp_path / "d.json")  # not a run's: no line
    assert "as the run" not in printed and json.load(open(tmp_path / "d.json"))["args"]["max_new_tokens"] == 8


def test_offline_a_missing_benchmark_stops_evaluate_in_one_line_naming_it(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub
    from conftest import assert_user_error
    monkeypatch.delenv(tasks.BENCHMARK_DIR, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    line = assert_user_error("evaluate.py", "--model", "toy-small", "--benchmarks", "toy,minerva", "--out", tmp_path / "x",
                             message="cannot load benchmark 'minerva' (math-ai/minervamath, split test;")
    assert "load_dataset('math-ai/minervamath', 'default', split='test')" in line and not (tmp_path / "x").exists()


def test_help_has_the_title_and_one_default_each(monkeypatch, capsys):
    import dataclasses
    import sys
    import common
    import evaluate
    monkeypatch.setitem(sys.modules, "__main__", evaluate)
    with pytest.raises(SystemExit):
        common.parse_args(evaluate.Args, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert " ".join(evaluate.__doc__.strip().split("\n\n")[0].split()) in text
    for f in dataclasses.fields(evaluate.Args):
        flag = f"--{f.name.replace('_', '-')}"
        assert text.count(flag) >= 1 and "(default: )" not in text, flag
    assert "(default: 0; toy models: 16)" in text
    assert "(default: the papers' seven, math500, minerva, olympiadbench, amc23, aime24, aime25, gsm8k)" in text
