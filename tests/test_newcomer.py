"""What a newcomer meets first: the shipped toy world, the same numbers on every run, and every way
out of a run (offline, Ctrl-C, a bad --out, --help) in one line."""

import dataclasses
import glob
import importlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

import common
import plumbing
import rundir
import tasks
from conftest import ROOT, SCRIPTS, assert_user_error, read_metrics, run_main, run_script

QUICK = ["--steps", "2", "--eval-size", "16", "--eval-every", "100"]


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


# ---------------------------------------------------------------- the shipped toy world

def test_shipped_toy_models_give_the_readme_start_accuracies():
    """The README's toy table is what the shipped weights give: no build, no machine dependence."""
    for name, dataset in tasks.TOY_MODELS.items():
        model, tok = common.load_model(name, torch.device("cpu"))
        acc = common.evaluate(model, tok, tasks.load_data(dataset, "eval"), 8, instruction="")[0]["eval/accuracy"]
        assert f"| {name} | {acc:.3f} |" in readme(), (name, acc)


def test_build_recipe_makes_the_shipped_tokenizer():
    from toy import build
    from transformers import AutoTokenizer
    shipped = AutoTokenizer.from_pretrained(tasks.toy_path("toy-small"))
    assert build.toy_tokenizer().get_vocab() == shipped.get_vocab()
    assert build.toy_answer(57, 68, drop_carry=True) == 15 and build.toy_answer(57, 68) == 125
    assert sorted(build.RECIPES) == sorted(tasks.TOY_MODELS)


def test_build_tool_reports_progress_and_a_verdict(monkeypatch, capsys):
    """A short rebuild (3 warm-start steps instead of 600) differs from the shipped model: the tool
    shows its progress, says so, exits 1 and leaves the shipped model alone (its main(), in this process)."""
    from toy import build
    shipped = os.path.join(tasks.TOY_DIR, "toy-small", "model.safetensors")
    before = os.stat(shipped).st_mtime_ns
    monkeypatch.setattr(sys, "argv", ["toy/build.py", "toy-small", "--steps", "3"])
    with pytest.raises(SystemExit) as e:
        build.main()
    out = capsys.readouterr().out
    assert e.value.code == 1, out
    assert "toy-small: step 3/3, loss" in out
    assert re.search(r"toy-small: rebuilt weights are DIFFERENT from the shipped ones .*greedy accuracy shipped "
                     r"\d\.\d{3}, rebuilt \d\.\d{3}", out), out
    assert os.stat(shipped).st_mtime_ns == before


# ---------------------------------------------------------------- the same command, the same numbers

def no_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_two_runs_of_the_same_command_give_identical_metrics(tmp_path):
    run_script("grpo.py", *QUICK, "--out", tmp_path / "a")
    run_main("grpo.py", *QUICK, "--out", tmp_path / "b")  # this process has run other things before: no matter
    assert no_times(read_metrics(tmp_path / "a")) == no_times(read_metrics(tmp_path / "b"))


def test_seeding_does_not_depend_on_what_loading_draws(monkeypatch, tmp_path):
    """Loading used to build the toy models on first use, drawing from torch's global generator
    after the seed: the first run followed another path. Whatever loading draws, the run is the same."""
    real_load = common.load_model

    def run(out, draw):
        def load_model(*a, **kw):
            torch.rand(draw)  # what a build (or any loader) might consume
            return real_load(*a, **kw)
        monkeypatch.setattr(common, "load_model", load_model)
        run_main("grpo.py", *QUICK, "--out", tmp_path / out)
        return no_times(read_metrics(tmp_path / out))

    assert run("plain", 0) == run("drawn", 1000)


# ---------------------------------------------------------------- threads

def test_toy_models_default_to_one_thread_and_others_to_torchs_default(tmp_path):
    import grpo
    assert common.parse_args(grpo.Args, []).threads == 1
    assert common.parse_args(grpo.Args, ["--model", str(tmp_path)]).threads == 0
    assert common.parse_args(grpo.Args, ["--threads", "3"]).threads == 3
    before = torch.get_num_threads()
    try:
        plumbing.init_distributed("cpu", threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- offline

def offline_env(tmp_path):
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE="",
                HF_HUB_CACHE="", HUGGINGFACE_HUB_CACHE="")


def test_offline_headline_command_names_everything_missing_in_one_line_fast(tmp_path):
    env = {k: v for k, v in offline_env(tmp_path).items() if v != ""}
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "codistill.py"), "--small", "Qwen2.5-0.5B",
                        "--large", "Qwen2.5-1.5B", "--out", str(tmp_path / "run")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    lines = p.stderr.strip().splitlines()
    # first what the names are not, then how to get them; the dataset the user did not name is called the default
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith(
        "error: models 'Qwen/Qwen2.5-0.5B' and 'Qwen/Qwen2.5-1.5B' are not local directories, not toy models"), p.stderr
    for what in ("not in the local Hugging Face cache", "the hub is unreachable",
                 "The default --dataset math (DigitalLearningGmbH/MATH-lighteval, HuggingFaceH4/MATH-500)",
                 "`hf download Qwen/Qwen2.5-0.5B`", "`hf download Qwen/Qwen2.5-1.5B`", "HF_HUB_OFFLINE=1", "local directory"):
        assert what in lines[0], what
    assert not os.path.exists(tmp_path / "run")  # checked before anything is written
    # no "Retrying" lines above (one line in all); CPU seconds, not wall time, which a busy machine stretches
    assert cpu < 5, cpu


def test_offline_cached_model_and_dataset_count_as_available(tmp_path):
    """A model in the hub cache (a snapshot with config.json) and a dataset in the datasets cache pass
    the check; the same names absent fail it."""
    hf = tmp_path / "hf"
    repo = hf / "hub" / "models--Qwen--Qwen2.5-0.5B"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text("{}")
    (hf / "datasets" / "openai___gsm8k").mkdir(parents=True)
    env = {k: v for k, v in offline_env(tmp_path).items() if v != ""}
    code = "import common; common.check_available({}, {!r}); print('available')"
    ok = subprocess.run([sys.executable, "-c", code.format(["Qwen2.5-0.5B", "toy-small"], "gsm8k")], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.strip() == "available", ok.stderr
    bad = subprocess.run([sys.executable, "-c", code.format(["Qwen2.5-0.5B", "Qwen2.5-7B"], "math")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "model 'Qwen/Qwen2.5-7B' is not a local directory" in bad.stderr
    said = "--dataset math (DigitalLearningGmbH/MATH-lighteval, HuggingFaceH4/MATH-500) is not in the datasets cache"
    assert said in bad.stderr, bad.stderr
    assert "Qwen2.5-0.5B" not in bad.stderr  # the cached one is not named


# ---------------------------------------------------------------- Ctrl-C, --out, --resume

def test_ctrl_c_exits_in_one_line_and_the_printed_command_resumes(tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "grpo.py"), "--steps", "100000", "--save-every", "2",
                          "--eval-size", "16", "--eval-every", "100000", "--out", str(out)],
                         cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for a checkpoint and a step after it
        time.sleep(0.2)
        if os.path.exists(out / "checkpoint") and os.path.exists(out / "metrics.jsonl"):
            if max(r["step"] for r in read_metrics(out)) >= 3:
                break
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    lines = [l for l in re.split(r"[\r\n]", err) if l.strip() and not re.search(r"\d+/\d+ \[", l)]  # not the bar
    assert len(lines) == 1 and lines[0].startswith("interrupted after step"), err
    last = max(r["step"] for r in read_metrics(out))
    ckpt = int(re.search(r"the last checkpoint \(step (\d+)\)", lines[0]).group(1))
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=False)["step"] == ckpt
    assert last - 2 <= ckpt <= last  # no older than --save-every steps
    cmd = lines[0].split("Resume with: ")[1].split()
    assert cmd[:2] == ["python", os.path.join(ROOT, "grpo.py")] and cmd[-3:] == ["--out", str(out), "--resume"]
    stdout = run_main(*cmd[1:], "--steps", ckpt + 1)  # the printed command, shortened
    steps = [m["step"] for m in read_metrics(out) if "train/reward" in m]
    assert steps == list(range(1, ckpt + 2))
    acc0 = read_metrics(out)[0]["eval/accuracy"]
    assert stdout.strip().splitlines()[-1].startswith(f"eval/accuracy: {acc0:.3f} -> ")  # not nan


def test_ctrl_c_before_the_first_checkpoint_and_the_three_messages_agree(tmp_path):
    """Interrupted before any checkpoint: the message prints the command that starts again (with --out); --resume says
    there is nothing to resume and to drop it; the same command then runs in the same --out, in place
    of the interrupted run's metrics."""
    out = tmp_path / "run"
    flags = ["--save-every", "100000", "--eval-size", "16", "--eval-every", "100000", "--out", str(out)]
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "grpo.py"), "--steps", "100000", *flags],
                         cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(out / "metrics.jsonl") and
                                          max(r["step"] for r in read_metrics(out)) >= 2):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and not os.path.exists(out / "checkpoint"), err
    lines = [l for l in re.split(r"[\r\n]", err) if l.strip() and not re.search(r"\d+/\d+ \[", l)]
    assert len(lines) == 1 and "before the first checkpoint" in lines[0], err
    cmd = lines[0].split(f"to start the run again in '{out}': ")[1].split()
    assert cmd == ["python", os.path.join(ROOT, "grpo.py"), "--steps", "100000", *flags]  # --out DIR last, no --resume
    assert_user_error("grpo.py", "--steps", 2, *flags, "--resume",
                      message="the run stopped before its first one, so run the same command without --resume")
    run_main("grpo.py", "--steps", 2, *flags)  # the same command, the same --out
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2, 2]  # this run's lines only: eval 0, steps 1-2, eval 2
    assert_user_error("grpo.py", "--steps", 2, *flags, message="already holds a run: pass --resume")  # now it has a checkpoint


def test_ctrl_c_before_the_first_checkpoint_without_out_names_the_directory_in_the_command(tmp_path):
    """Without --out each command makes a new directory: the line's command names the interrupted one's (the same
    command would start in another)."""
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "grpo.py"), "--steps", "100000", "--save-every", "100000",
                          "--eval-size", "16", "--eval-every", "100000"],
                         cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not glob.glob(str(tmp_path / "runs" / "grpo-*" / "metrics.jsonl")):
        time.sleep(0.2)
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    [out] = glob.glob(str(tmp_path / "runs" / "grpo-*"))
    lines = [l for l in re.split(r"[\r\n]", err) if l.strip() and not re.search(r"\d+/\d+ \[", l)]
    assert p.returncode == 130 and len(lines) == 1, err
    run = os.path.relpath(out, tmp_path)
    assert lines[0].endswith(f"to start the run again in '{run}': python {os.path.join(ROOT, 'grpo.py')} --steps 100000 "
                             f"--save-every 100000 --eval-size 16 --eval-every 100000 --out {run}"), lines[0]


def test_a_slow_run_checkpoints_every_save_minutes_too(tmp_path, monkeypatch):
    """--save-minutes: a checkpoint once that long has passed without one (and 20 times the last one's cost), besides
    --save-every's and the last step's; Ctrl-C then keeps a run whose steps are slow."""
    saved = []
    save = rundir.Run.save_checkpoint
    monkeypatch.setattr(rundir.Run, "save_checkpoint", lambda self, step, *a: saved.append(step) or save(self, step, *a))
    quick = ["--steps", 4, "--save-every", 100000, "--eval-size", 8, "--pass-n", 0]
    run_main("grpo.py", *quick, "--save-minutes", 1e-9, "--out", tmp_path / "a")
    run_main("grpo.py", *quick, "--save-minutes", 0, "--out", tmp_path / "b")
    run_main("grpo.py", *quick, "--out", tmp_path / "c")  # the default, 5 minutes: the toy never waits that long
    timed = saved[:-2]  # the first after step 1; the next ones 20 times the last one's cost later
    assert timed[0] == 1 and timed[-1] == 4 and timed == sorted(set(timed)) and saved[-2:] == [4, 4], saved
    run = object.__new__(rundir.Run)
    args = types.SimpleNamespace(save_every=50, save_minutes=1, steps=100)
    for ago, cost, due in ((59, 0, False), (61, 0, True), (61, 3, True), (61, 4, False), (81, 4, True)):
        run.saved_at, run.save_seconds = time.monotonic() - ago, cost
        assert run.checkpoint_due(7, args) == due, (ago, cost)
    never = types.SimpleNamespace(**{**vars(args), "save_every": 0})
    assert run.checkpoint_due(50, args) and not run.checkpoint_due(50, never)


def test_resume_of_a_directory_that_does_not_exist_says_so(tmp_path):
    assert_user_error("grpo.py", "--steps", 2, "--out", tmp_path / "nowhere", "--resume",
                      message=f"--resume: '{tmp_path / 'nowhere'}' does not exist: --out names the run to continue")


def test_resumed_progress_bar_shows_the_latest_evaluation(tmp_path, capsys):
    out, flags = tmp_path / "run", ["--eval-size", "40", "--eval-every", "2", "--save-every", "2", "--lr", "3e-4"]
    run_main("grpo.py", "--steps", 2, "--out", out, *flags)
    evals = [r["eval/accuracy"] for r in read_metrics(out) if "eval/accuracy" in r]
    assert len(evals) == 2 and f"{evals[0]:.3f}" != f"{evals[1]:.3f}"  # step 0's and step 2's tell apart
    capsys.readouterr()
    run_main("grpo.py", "--steps", 4, "--out", out, *flags[:2], "--eval-every", "100", "--save-every", "100", "--resume")
    err = capsys.readouterr().err  # the bar
    assert f"resuming '{out}' after step 2, its checkpoint's" in err.splitlines()  # where it resumed
    bars = re.findall(r"acc=(\d\.\d{3})", err)  # after step 3 (no evaluation), then after step 4's (the last)
    assert bars and bars[0] == f"{evals[1]:.3f}", err  # step 3's bar: the step-2 evaluation, not step 0's


def test_a_mistyped_model_says_first_what_it_is_not(tmp_path):
    line = assert_user_error("grpo.py", "--model", "does-not-exist", "--dataset", "toy", "--out", tmp_path / "o",
                             message="error: model 'does-not-exist' is not a local directory, not a toy model (toy-small, ")
    assert "and not in the local Hugging Face cache" in line and "To get it: where the hub is reachable, `hf download" in line
    assert "gsm8k" not in line  # --dataset toy: no dataset the user did not ask for
    assert_user_error("grpo.py", "--model", "does-not-exist", "--out", tmp_path / "o",
                      message="The default --dataset gsm8k (openai/gsm8k) is not in the datasets cache either")
    (tmp_path / "empty").mkdir()
    assert_user_error("grpo.py", "--model", tmp_path / "empty", "--dataset", "toy", "--out", tmp_path / "o",
                      message=f"cannot load model '{tmp_path / 'empty'}': the directory holds no model that loads")


def test_unwritable_out_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    assert_user_error("grpo.py", "--out", tmp_path / "file" / "run", message="cannot write the output directory")


def test_config_json_holds_the_resolved_out(monkeypatch, tmp_path):
    import grpo
    monkeypatch.chdir(tmp_path)
    args = common.parse_args(grpo.Args, [])
    out = rundir.Run(args, "grpo").out
    assert re.fullmatch(r"runs/grpo-\d{8}-\d{6}", out) and args.out == out
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["out"] == out


# ---------------------------------------------------------------- --help and warnings

@pytest.mark.parametrize("script", SCRIPTS)
def test_help_has_the_whole_title_and_one_default_each(monkeypatch, capsys, script):
    module = importlib.import_module(script)
    monkeypatch.setitem(sys.modules, "__main__", module)
    with pytest.raises(SystemExit):
        common.parse_args(module.Args, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    title = " ".join(module.__doc__.strip().split("\n\n")[0].split())
    assert title.endswith(")") or title.endswith(".")  # a whole first paragraph
    assert title in text
    assert "(default: )" not in text and text.count("(default: runs/<script>-<time>)") == 1
    threads = "CPU threads for torch (0: one per core that other work leaves free) (default: 0; toy models: 1)"
    assert f"--threads THREADS {threads}" in text
    fields = [f.name.replace("_", "-") for f in dataclasses.fields(module.Args)]
    assert all(text.count(f"--{f}") >= 1 for f in fields)


def test_teacher_smaller_than_student_warns_in_one_line(tmp_path, capsys):
    run_main("kdrl.py", "--teacher", "toy-small", "--model", "toy-large", "--steps", "0", "--eval-size", "0",
             "--out", tmp_path / "swapped")
    err = capsys.readouterr().err
    warnings = [l for l in err.splitlines() if l.startswith("warning:")]
    assert warnings == ["warning: the teacher 'toy-small' has fewer parameters than 'toy-large' "
                        "(0.13M < 0.79M); were the two swapped?"], err


def test_codistill_refuses_a_smaller_large_model_unless_told(tmp_path):
    """Swapped --small and --large would train for minutes before anyone read a warning: refused in one
    line that names the flag to go on; with the flag the pair trains."""
    for script in ("codistill.py", "bdkd.py"):
        assert_user_error(script, "--small", "toy-large", "--large", "toy-small", "--out", tmp_path / script,
                          message="has fewer parameters than 'toy-large' (0.13M < 0.79M); were the two swapped? "
                                  "Pass --allow-smaller-large to train them as given")
    run_main("codistill.py", "--small", "toy-large", "--large", "toy-small", "--allow-smaller-large", "--steps", 1,
             "--eval-size", 4, "--out", tmp_path / "codistill.py")  # the refused run wrote nothing in its way
    assert [r["step"] for r in read_metrics(tmp_path / "codistill.py") if "train/reward" in r] == [1]


def test_teacher_larger_than_student_does_not_warn(capsys):
    small, _ = common.load_model("toy-small", torch.device("cpu"))
    large, _ = common.load_model("toy-large", torch.device("cpu"))
    common.warn_if_smaller(large, small, "toy-large", "toy-small")
    assert capsys.readouterr().err == ""
    common.warn_if_smaller(small, large, "toy-small", "toy-large", role="--large model")
    assert capsys.readouterr().err.startswith("warning: the --large model 'toy-small' has fewer parameters")


def test_a_lora_student_of_its_own_model_does_not_warn(capsys):
    """The adapter's parameters are not the model's: the same model as the teacher of its LoRA student
    is no smaller (the count with them warned on every run of kdrl.py or opd_plus.py with --lora-rank)."""
    student, _ = common.load_model("toy-small", torch.device("cpu"), lora=common.lora_config(
        types.SimpleNamespace(lora_rank=8, lora_alpha=16, lora_target="all-linear", seed=0)))
    teacher, _ = common.load_model("toy-small", torch.device("cpu"))
    assert sum(p.numel() for p in student.parameters()) > sum(p.numel() for p in teacher.parameters())
    common.warn_if_smaller(teacher, student, "toy-small", "toy-small")
    assert capsys.readouterr().err == ""
