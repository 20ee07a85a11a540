import contextlib
import gc
import importlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: one thread here and in every script run

# The training scripts, grpo.py first: the one list the tests read (a fork adds its script here, docs/forking.md).
SCRIPTS = ("grpo", "cppo", "kdrl", "sinkd", "opd_plus", "codistill", "bdkd", "dph_rl")


def run_script(script, *args, expect_ok=True, timeout=600):
    """Run a script through its real command line; return the CompletedProcess."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    if expect_ok and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def run_main(script, *args) -> str:
    """Run a script's main() in this process on this command line (its argv parsing included); return
    what it printed. What `python script args` runs, without the ~3 s of a fresh interpreter's imports:
    every script still has one end-to-end test through run_script, the real entry point."""
    module = importlib.import_module(os.path.basename(script).removesuffix(".py"))
    argv, out = sys.argv, io.StringIO()
    sys.argv = [script, *map(str, args)]
    try:
        with contextlib.redirect_stdout(out):
            module.main()
    finally:
        sys.argv = argv
        gc.collect()  # this run's models, before the next run loads its own
    return out.getvalue()


def assert_user_error(script, *args, message):
    """The script refuses these arguments with exit code 2 and one line 'error: ...<message>...' on
    stderr; a traceback would be another exception here (run_main). Returns the line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        run_main(script, *args)
    lines = err.getvalue().strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err.getvalue()
    return lines[0]


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_samples(out):
    with open(os.path.join(out, "samples.jsonl")) as f:
        return [json.loads(line) for line in f]


def group_advantages(rewards):
    """GRPO's advantages of one group, computed here: (r - mean) / (unbiased std + 1e-4)."""
    mean = sum(rewards) / len(rewards)
    std = (sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1)) ** 0.5
    return [(r - mean) / (std + 1e-4) for r in rewards]


def check_samples(out, eval_steps, n, group_size, columns=(), advantages=(("reward", "advantage"),), dataset="toy"):
    """DIR/samples.jsonl as every script writes it: at each evaluation the greedy answers to the first `n` held-out
    questions, in order and the same each time (each model's, where a script has two), and after step 0 one group
    of `group_size` rollouts with their reward, advantage and the script's `columns`, in which each (reward column,
    advantage column) of `advantages` is GRPO's group advantage; every row graded as grading.is_correct grades it.
    Returns the rows."""
    import grading
    import tasks
    rows = read_samples(out)
    for r in rows:
        assert r["answer"] == grading.extract_answer(r["completion"]), r
        assert r["correct"] == grading.is_correct(r["completion"], r["gold"]), r
    held_out = [(i, q["question"], q["answer"]) for i, q in enumerate(tasks.load_data(dataset, "eval")[:n])]
    models = list(dict.fromkeys(r.get("model") for r in rows if r["kind"] == "eval"))
    for step in eval_steps:
        for model in models:
            asked = [(r["index"], r["question"], r["gold"]) for r in rows
                     if r["kind"] == "eval" and r["step"] == step and r.get("model") == model]
            assert asked == held_out, (step, model)
        group = [r for r in rows if r["kind"] == "train" and r["step"] == step]
        assert len(group) == (group_size if step else 0) and len({r["question"] for r in group}) <= 1, (step, group)
        for r in group:
            assert set(r) == {"step", "kind", "question", "gold", "completion", "answer", "correct", "reward", "advantage",
                              *columns}, r
            assert r["reward"] == float(r["correct"])  # no --format-coef
        for reward, advantage in advantages if group else ():
            assert [r[advantage] for r in group] == pytest.approx(group_advantages([r[reward] for r in group]), abs=1e-5)
    assert sorted({r["step"] for r in rows}) == sorted(eval_steps)
    return rows


def bf16_published_toy(path) -> str:
    """toy-small saved in bf16 (config.dtype too): a model published in bf16, as Qwen2.5 is, that trains on the toy."""
    import torch
    import common
    model, tok = common.load_model("toy-small", torch.device("cpu"))
    model.to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture
def other_tokenizer(tmp_path):
    """A copy of toy-small whose tokenizer has one token more: a partner that must be refused."""
    import tasks
    from transformers import AutoTokenizer
    path = tmp_path / "toy-small-other-tokenizer"
    shutil.copytree(tasks.toy_path("toy-small"), path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_tokens(["x"])
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models_and_rollout():
    """toy-small and toy-large, their tokenizer, and a rollout of toy-small: 3 questions x 4 (12 rows)."""
    import torch
    import common
    import tasks
    device = torch.device("cpu")
    small, tok = common.load_model("toy-small", device)
    large, _ = common.load_model("toy-large", device)
    torch.manual_seed(0)
    prompts = [tasks.format_prompt(tok, q, instruction="") for q in ("12+34", "57+68", "99+01")]
    return small, large, tok, common.sample(small, tok, prompts, 4, 8)
