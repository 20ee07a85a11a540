"""Forking for a quick experiment (docs/forking.md): a .jsonl row keeps every field, --reward plugs in a TRL reward
function in every script and evaluate.py, the two worked examples (examples/gspo.py, the countdown task) run, and the
toy tokenizer refuses a prompt it cannot encode."""

import importlib
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import common
import tasks
from conftest import ROOT, SCRIPTS, assert_user_error, read_metrics, read_samples, run_main, run_script
from qwen_like import qwen_tokenizer

sys.path.insert(0, os.path.join(ROOT, "examples"))
from countdown_reward import countdown_reward  # noqa: E402

QUICK = ["--steps", "2", "--eval-every", "100", "--pass-n", "0"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sums_file(tmp_path, n=24):
    """Toy sums as a .jsonl file with fields of their own: a list, a number and a string."""
    return write_jsonl(tmp_path / "sums.jsonl", [dict(question=f"{a:02d}+{b:02d}", answer=str(a + b), terms=[a, b],
                                                      carry=int(a % 10 + b % 10 >= 10), source="hand")
                                                 for a, b in tasks.toy_problems("eval")[:n]])


# The reward files of these tests: each call written to calls.jsonl beside the file, what the test recomputes from
RECORDING = '''
import json, os


def record(completions, prompts, values, **columns):
    with open(os.path.join(os.path.dirname(__file__), "calls.jsonl"), "a") as f:
        f.write(json.dumps(dict(completions=completions, prompts=prompts, values=values, columns=columns)) + "\\n")
    return values
'''
UNITS = RECORDING + '''

def units(completions, prompts, answer, carry, **kwargs):
    """1.5 for the right tens digit, 0.5 for a wrong one, None (a grading error) for a carrying sum's empty answer."""
    values = [None if not c and k else 1.5 if c[-2:-1] == a[-2:-1] else 0.5 for c, a, k in zip(completions, answer, carry)]
    return record(completions, prompts, values, answer=answer, carry=carry, **kwargs)
'''
GRADER = '''
import grading


def same(completions, answer, **kwargs):
    """The grader's own verdict, as a reward function."""
    return [float(grading.is_correct(c, a)) for c, a in zip(completions, answer)]
'''


def units_value(completion, answer, carry):
    return 0.0 if not completion and carry else 1.5 if completion[-2:-1] == answer[-2:-1] else 0.5


def reward_file(tmp_path, text, name="reward.py"):
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def calls(tmp_path):
    with open(tmp_path / "calls.jsonl") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------- 1. rows keep every field


def test_a_jsonl_row_keeps_every_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [dict(question="1+2", answer="The sum. #### 3", numbers=[1, 2], target=3,
                                                   meta=dict(level=1)),
                                              dict(prompt="2+2=", answer=4, id="b")])
    assert tasks.load_data(path, "train") == [
        dict(question="1+2", answer="3", numbers=[1, 2], target=3, meta=dict(level=1)),  # the answer cut as before
        dict(prompt="2+2=", question="2+2=", answer="4", id="b")]


# ---------------------------------------------------------------- 2. --reward


def test_without_reward_the_grader_scores_rows_as_it_scores_golds():
    completions, golds = ["\\boxed{4}", "4", "#### 5", "nothing"], ["4", "4", "4", "4"]
    by_gold = tasks.rewards_for(completions, golds, format_coef=0.25)
    by_row = tasks.rewards_for(completions, [dict(question="2+2", answer="4", extra=[1])], 0.25, None, ["p"])  # 4 each
    assert by_row.reward.tolist() == by_gold.reward.tolist() == [1.25, 1.0, 0.25, 0.0]
    assert by_row.correct.tolist() == by_gold.correct.tolist() == [True, True, False, False]


def test_a_reward_function_gets_trl_s_arguments_and_its_verdicts_count():
    seen = []

    def fn(completions, prompts, answer, numbers, **kwargs):
        seen.append(dict(completions=completions, prompts=prompts, answer=answer, numbers=numbers, **kwargs))
        return [2.0, None, 1.0, 0.5, float("nan"), 0]

    rows = [dict(question="q1", answer="a1", numbers=[1]), dict(question="q2", answer="a2", numbers=[2], prompt="P2")]
    s = tasks.rewards_for(list("abcdef"), rows, 0.5, fn, ["p1", "p2"])  # 3 completions a row
    assert seen == [dict(completions=list("abcdef"), prompts=["p1"] * 3 + ["p2"] * 3, answer=["a1"] * 3 + ["a2"] * 3,
                         numbers=[[1]] * 3 + [[2]] * 3, question=["q1"] * 3 + ["q2"] * 3)]  # 'prompt' is `prompts`
    assert s.reward.tolist() == [2.0, 0.0, 1.0, 0.5, 0.0, 0.0]  # no answer in \boxed{}: no bonus
    assert s.correct.tolist() == [True, False, True, False, False, False] and s.grade_errors == 2  # None and NaN


def test_without_reward_a_run_is_the_grader_s_and_with_the_grader_as_reward_the_same(tmp_path):
    """--reward unset changes nothing: config.json says '', and the grader written as a reward function gives the
    same run, number for number."""
    run_main("grpo.py", *QUICK, "--eval-size", 16, "--out", tmp_path / "a")
    same = reward_file(tmp_path, GRADER) + ":same"
    run_main("grpo.py", *QUICK, "--eval-size", 16, "--reward", same, "--out", tmp_path / "b")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
    assert strip(read_metrics(tmp_path / "a")) == strip(read_metrics(tmp_path / "b"))
    assert read_samples(tmp_path / "a") == read_samples(tmp_path / "b")
    assert json.load(open(tmp_path / "a" / "config.json"))["reward"] == ""


def test_reward_gives_train_reward_the_verdicts_and_eval_accuracy(tmp_path):
    data, fn = sums_file(tmp_path), reward_file(tmp_path, UNITS) + ":units"
    run_main("grpo.py", *QUICK, "--dataset", data, "--eval-dataset", data, "--instruction", "", "--eval-size", 24,
             "--log-samples", 24, "--prompts-per-step", 4, "--reward", fn, "--out", tmp_path / "o")
    got = calls(tmp_path)
    probes, evals = got[:2], [c for c in got[2:] if len(c["completions"]) == 24]
    trains = [c for c in got if len(c["completions"]) == 32]
    assert len(probes[0]["completions"]) == 1 and len(evals) == 2 and len(trains) == 2
    for c in got:  # every field of the rows arrives, the prompt as the model saw it
        assert set(c["columns"]) == {"answer", "carry", "question", "terms", "source"}
        assert all(p == q + "=" for p, q in zip(c["prompts"], c["columns"]["question"])) or c in probes
    metrics = read_metrics(tmp_path / "o")
    train = [m for m in metrics if "train/reward" in m]
    for m, c in zip(train, trains):
        values = [0.0 if v is None else v for v in c["values"]]
        assert m["train/reward"] == pytest.approx(sum(values) / 32)
        assert m["train/grade_errors"] == c["values"].count(None)
    accuracy = [m["eval/accuracy"] for m in metrics if "eval/accuracy" in m]
    assert accuracy == [pytest.approx(sum(v is not None and v >= 1 for v in c["values"]) / 24) for c in evals]
    assert 0 < accuracy[0] < 1
    for r in read_samples(tmp_path / "o"):  # the samples' verdicts: reward >= 1
        row = next(q for q in tasks.load_data(data, "eval") if q["question"] == r["question"])
        assert r["correct"] == (units_value(r["completion"], r["gold"], row["carry"]) >= 1), r
        if r["kind"] == "train":
            assert r["reward"] == units_value(r["completion"], r["gold"], row["carry"])


def test_evaluate_py_scores_with_the_reward(tmp_path):
    data, fn = sums_file(tmp_path), reward_file(tmp_path, UNITS) + ":units"
    out = run_main("evaluate.py", "--benchmarks", data, "--instruction", "", "--pass-n", 4, "--reward", fn,
                   "--out", tmp_path / "e.json")
    results = json.load(open(tmp_path / "e.json"))["results"][data]
    samples = [json.loads(line) for line in open(tmp_path / "e.samples.jsonl")]
    rows = {r["question"]: r for r in tasks.load_data(data, "eval")}
    ok = lambda s, q: s["correct"] == (units_value(s["completion"], q["gold"], rows[q["question"]]["carry"]) >= 1)
    assert all(ok(q["greedy"], q) and all(ok(s, q) for s in q["samples"]) for q in samples)
    assert results["greedy_accuracy"] == pytest.approx(sum(q["greedy"]["correct"] for q in samples) / 24)
    assert 0 < results["greedy_accuracy"] < 1 and f"| {data} | 24 | {results['greedy_accuracy']:.3f} |" in out


@pytest.mark.parametrize("script", [*SCRIPTS, "evaluate"])
def test_every_script_takes_reward_and_refuses_a_missing_one_in_one_line(script, tmp_path):
    assert "reward" in {f.name for f in importlib.import_module(script).Args.__dataclass_fields__.values()}
    assert_user_error(f"{script}.py", "--reward", tmp_path / "nowhere.py:f", "--out", tmp_path / "o",
                      message=f"--reward {tmp_path / 'nowhere.py:f'}: there is no file '{tmp_path / 'nowhere.py'}'")


@pytest.mark.parametrize("text,spec,message", [
    (GRADER, ":nothing", "has no function 'nothing'"),
    (GRADER, "", "name a function as FILE.py:NAME or module:NAME"),
    ("import no_such_module\n", ":f", "raised ModuleNotFoundError: No module named 'no_such_module'"),
    ("def f(completions, **kw):\n    raise KeyError('numbers')\n", ":f", ":f: KeyError: 'numbers'"),
    ("def f(completions, numbers, **kw):\n    return [1.0]\n", ":f", "missing 1 required positional argument: 'numbers'"),
    ("def f(completions, **kw):\n    return [1.0, 0.0]\n", ":f", "ValueError: it returned 2 values for 1 completions"),
    ("def f(completions, **kw):\n    return ['yes']\n", ":f", "ValueError: could not convert string to float: 'yes'"),
])
def test_a_reward_that_cannot_be_called_is_one_line_before_training(tmp_path, text, spec, message):
    path = reward_file(tmp_path, text)
    assert_user_error("grpo.py", "--reward", path + spec, "--out", tmp_path / "o", message=message)
    assert not (tmp_path / "o").exists()


def test_a_module_reward_and_a_missing_module(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    reward_file(tmp_path, GRADER, "my_rewards.py")
    run_main("grpo.py", "--steps", 1, "--eval-size", 4, "--pass-n", 0, "--reward", "my_rewards:same", "--out", tmp_path / "o")
    assert [m["step"] for m in read_metrics(tmp_path / "o") if "train/reward" in m] == [1]
    assert_user_error("grpo.py", "--reward", "no_such_rewards:f", "--out", tmp_path / "p",
                      message="importing 'no_such_rewards' raised ModuleNotFoundError")


@pytest.mark.parametrize("body", ["raise RuntimeError('batch too big')", "raise RuntimeError()", "return [1.0]"])
def test_a_call_that_fails_in_a_run_is_a_grading_error_not_a_crash(tmp_path, capsys, body):
    """A call of one completion (the check) succeeds, a batch's fails: its completions score 0, counted in
    train/grade_errors, with one warning line for the run."""
    fn = reward_file(tmp_path, f"def f(completions, **kw):\n    if len(completions) > 1:\n        {body}\n"
                               "    return [1.0] * len(completions)\n") + ":f"
    run_main("grpo.py", *QUICK, "--eval-size", 4, "--reward", fn, "--out", tmp_path / "o")
    train = [m for m in read_metrics(tmp_path / "o") if "train/reward" in m]
    assert [(m["train/reward"], m["train/grade_errors"]) for m in train] == [(0.0, 64), (0.0, 64)]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: --reward")]
    assert len(warnings) == 1 and warnings[0].endswith("its completions score 0 and count as grading errors"), warnings


# ---------------------------------------------------------------- 3. the countdown task


def test_countdown_reward():
    assert countdown_reward(
        ["<think>8 * 7</think> <answer>(3 + 5) * 7</answer>", "(3+5)*7", "3*5*7", "7*8", "<answer>7 * 7 + 7</answer>",
         "<answer>(7 - 5) / 3 * 84</answer>", "", "import os", "3**5", "56", "<answer>(3+5)*7</answer> 9"],
        [[3, 5, 7]] * 5 + [[3, 5, 7, 84]] + [[3, 5, 7]] * 4 + [[3, 5, 7]], [56] * 5 + [56] + [56] * 5) == [
        1.0, 1.0, 0.0, 0.0, 0.0,  # 3*5*7 = 105; 8 is not given; 7 thrice
        1.0, 0.0, 0.0, 0.0, 0.0, 1.0]  # division; nothing; not arithmetic; a power; a number not given


@pytest.mark.parametrize("toy", [False, True])
def test_countdown_data_has_a_solution_for_every_question(tmp_path, toy):
    subprocess.run([sys.executable, os.path.join(ROOT, "examples", "countdown_data.py"), "--train", "200", "--eval", "20",
                    "--out", tmp_path / "c", *(["--toy"] if toy else [])], check=True, capture_output=True)
    rows = tasks.load_data(str(tmp_path / "c-train.jsonl"), "train")
    assert len(rows) == 200 and len(tasks.load_data(str(tmp_path / "c-eval.jsonl"), "eval")) == 20
    solutions = countdown_reward([r["answer"] for r in rows], [r["numbers"] for r in rows], [r["target"] for r in rows])
    assert solutions == [1.0] * 200
    if toy:  # what the toy tokenizer can encode
        tasks.check_encodable(common.load_model("toy-small", "cpu")[1], [r["prompt"] for r in rows])


def test_countdown_runs_end_to_end_with_reward(tmp_path):
    """The worked example of docs/forking.md, through the real command lines: the data maker, grpo.py with --reward on
    the toy model (its prompts: digits, + and =), evaluate.py with the same reward."""
    subprocess.run([sys.executable, "examples/countdown_data.py", "--toy", "--train", "64", "--eval", "16", "--out",
                    tmp_path / "toy-countdown"], cwd=ROOT, check=True, capture_output=True)
    train, held_out = (str(tmp_path / f"toy-countdown-{s}.jsonl") for s in ("train", "eval"))
    spec = "examples/countdown_reward.py:countdown_reward"
    run_script("grpo.py", "--dataset", train, "--eval-dataset", held_out, "--reward", spec, *QUICK, "--eval-every", 1,
               "--out", tmp_path / "run")
    rows = {r["question"]: r for r in tasks.load_data(held_out, "eval") + tasks.load_data(train, "train")}
    samples = read_samples(tmp_path / "run")
    assert {r["kind"] for r in samples} == {"eval", "train"}
    for r in samples:
        q = rows[r["question"]]
        value = countdown_reward([r["completion"]], [q["numbers"]], [q["target"]])[0]
        assert r["correct"] == (value >= 1) and r.get("reward", value) == value
    assert [m["train/grade_errors"] for m in read_metrics(tmp_path / "run") if "train/reward" in m] == [0, 0]
    out = run_script("evaluate.py", "--model", tmp_path / "run" / "final", "--benchmarks", held_out, "--reward", spec,
                     "--max-new-tokens", 8, "--out", tmp_path / "e.json").stdout
    assert f"| {held_out} | 16 |" in out


# ---------------------------------------------------------------- 3. GSPO


def gspo():
    return importlib.import_module("examples.gspo")


def test_gspo_s_gradient_is_grpo_s_at_one_iteration(models_and_rollout):
    """--num-iterations 1: old = the current log-probs detached, each sequence ratio 1 in value; the gradient of
    mean_t(l_t - l_old_t) is GRPO's per-sequence token mean (--beta 0, --loss-type grpo)."""
    import grpo
    small, _, _, ro = models_and_rollout
    adv = torch.linspace(-1.5, 1.5, len(ro.texts))  # (B,)
    grads = []
    for loss_of in (lambda lp: grpo.compute_loss(lp, lp.detach(), None, adv, ro.mask, types.SimpleNamespace(
                        epsilon=0.2, epsilon_high=0.2, loss_type="grpo", beta=0.0), 24, ro.mask.sum())[0],
                    lambda lp: gspo().compute_loss(lp, lp.detach(), adv, ro.mask, types.SimpleNamespace(
                        epsilon=3e-4, epsilon_high=4e-4), 24)[0]):
        small.zero_grad()
        loss_of(common.token_logprobs(small, ro)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in small.parameters()]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-8)


def test_gspo_clips_the_sequence_ratio():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])  # (3, 3)
    old = torch.zeros(3, 3)
    logp = torch.tensor([[1e-3, 1e-3, 5.0], [1e-5, 1e-5, 1e-5], [-1e-3, -1e-3, -1e-3]], requires_grad=True)  # (3, 3)
    adv = torch.tensor([1.0, 1.0, -1.0])  # s = e^1e-3 above 1 + 4e-4: clipped; e^1e-5 inside; e^-1e-3 below, A < 0
    loss, s = gspo().compute_loss(logp, old, adv, mask, types.SimpleNamespace(epsilon=3e-4, epsilon_high=4e-4), 3)
    loss.backward()
    assert s["clipped"].tolist() == [[1.0] * 3, [0.0] * 3, [1.0] * 3]  # per sequence, the padding position too
    assert (logp.grad[0] == 0).all() and (logp.grad[2] == 0).all() and (logp.grad[1] != 0).all()
    assert loss.item() == pytest.approx(-(1 + 4e-4 + torch.e ** 1e-5 - (1 - 3e-4)) / 3, rel=1e-6)


def test_gspo_runs_from_its_command_line_and_its_first_step_is_grpo_s(tmp_path):
    flags = [*QUICK, "--eval-size", 16]
    p = subprocess.run([sys.executable, "-m", "examples.gspo", *map(str, flags), "--out", tmp_path / "gspo"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    run_main("grpo.py", *flags, "--beta", 0, "--out", tmp_path / "grpo")
    first = [next(m for m in read_metrics(tmp_path / run) if m["step"] == 1) for run in ("gspo", "grpo")]
    for key in ("train/reward", "train/loss", "train/grad_norm", "train/clip_frac"):
        assert first[0][key] == pytest.approx(first[1][key], rel=1e-5, abs=1e-7), key
    assert "train/kl" not in first[0] and first[0]["train/grad_norm"] > 0


def test_forking_page_shows_today_s_diff():
    diff = subprocess.run(["diff", "grpo.py", "examples/gspo.py"], cwd=ROOT, capture_output=True, text=True).stdout
    page = open(os.path.join(ROOT, "docs", "forking.md")).read()
    assert f"```diff\n$ diff grpo.py examples/gspo.py\n{diff}```" in page


# ---------------------------------------------------------------- 4. the toy tokenizer


def test_the_toy_tokenizer_refuses_a_prompt_it_cannot_encode(tmp_path):
    data = write_jsonl(tmp_path / "words.jsonl", [dict(prompt="Use 9, 9 and 7 to make 62", answer="62")] * 4)
    assert_user_error("grpo.py", "--dataset", data, "--out", tmp_path / "o",
                      message="cannot encode ' ,Uadekmnost' of the prompt 'Use 9, 9 and 7 to make 62='")
    assert_user_error("grpo.py", "--instruction", "Add.", "--out", tmp_path / "p", message="cannot encode '\\n.Ad'")


def test_a_real_tokenizer_encodes_any_prompt():
    prompt = "Ünïcödé — 数学 \t\n $\\frac{1}{2}$ <answer>(1 + 2) / 3</answer>"
    tasks.check_encodable(qwen_tokenizer(instruct=True), [prompt])  # no error
