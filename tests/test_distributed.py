"""torchrun: two CPU processes (gloo) make the same update as one process on the same global batch,
data parallel and with --fsdp; and a data-parallel checkpoint resumes under --fsdp.

The completions are made independent of the process that samples them (tests/dist_equivalence.py),
so any difference comes from the distributed plumbing: the sharding of questions, the global loss
normalisation, the gradient reduction, FSDP's gathering and reduce-scattering, rank-0 writing.

Starting a process (imports, the process group) costs far more than these two-step toy runs, so
the `runs` fixture makes them all at once: every single-process reference, one after the other, in
one process, and every two-process run in one torchrun launch beside it; each test reads its
runs' outputs."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, read_metrics, read_samples

HARNESS = os.path.join(ROOT, "tests", "dist_equivalence.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def launch(cmd, cases, log):
    """Make the runs `cases` in order with the harness (tests/dist_equivalence.py) under `cmd`;
    return {name: None, or why it failed}. A launch that dies in a run (torchrun stops every rank
    when one fails) starts again after that run."""
    errors, todo, n = {}, list(cases), 0
    while todo:
        path = log / f"cases-{n}.json"
        path.write_text(json.dumps(todo))
        p = subprocess.run([*cmd, HARNESS, str(path)], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                           capture_output=True, text=True, timeout=600)
        n += 1
        for i, c in enumerate(todo):
            failed = sorted(log.glob(c["name"] + ".error-rank*.txt"))
            if failed or (log / (c["name"] + ".ok")).exists():
                errors[c["name"]] = "".join(f.read_text() for f in failed) or None
            elif p.returncode != 0:  # the run it died in (no Python exception: killed, or a crash)
                errors[c["name"]] = f"exit code {p.returncode}\n" + p.stderr[-3000:]
                todo = todo[i + 1:]
                break
            else:
                raise AssertionError(f"{c['name']}: the harness exited 0 without making it\n{p.stderr[-3000:]}")
        else:
            todo = []
    return errors


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """A random Qwen2 with its own LM head (Qwen2.5 7B is untied; the toys, like 0.5B-3B, are tied)."""
    import tasks
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    path = str(tmp_path_factory.mktemp("untied"))
    config = Qwen2Config.from_pretrained(tasks.toy_path("toy-small"))
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tasks.toy_path("toy-small")).save_pretrained(path)
    return path


KEYS = ("train/reward", "train/reward_std", "train/tokens", "train/loss", "train/grad_norm", "small/loss", "small/grad_norm",
        "large/loss", "large/grad_norm", "small/kd_kl", "dph/divergence", "eval/accuracy", "small/eval/accuracy",
        "large/eval/accuracy", "eval/pass@1", "eval/pass@16", "small/eval/pass@4", "large/eval/pass@16")
CASES = {  # script[:variant]: its flags, {final model directory: where it started}
    "grpo": (["--loss-type", "dapo", "--beta", "0.04", "--lr", "3e-4"], {"final": "toy-small"}),
    # the std of the whole step's rewards, not of each rank's half
    "grpo:batch-std": (["--scale-rewards", "batch", "--beta", "0", "--lr", "3e-4"], {"final": "toy-small"}),
    # LoRA: the adapters' gradients summed over ranks, the reference the adapters off; final/ merged
    "grpo:lora": (["--lora-rank", "4", "--beta", "0.04", "--lr", "3e-3", "--loss-type", "dapo"], {"final": "toy-small"}),
    "cppo": (["--beta", "0.04", "--lr", "3e-4"], {"final": "toy-small"}),
    # one group per micro-batch, KD only on groups with no correct answer: some micro-batches need no teacher pass
    "kdrl": (["--kd-mask", "group", "--micro-batch-size", "8", "--lr", "3e-4"], {"final": "toy-small"}),
    "opd_plus": (["--lr", "3e-4"], {"final": "toy-small"}),
    # 16 questions pre-sampled 4 times in 4 steps of 4 (2 per rank); 2 of 4 right puts some in D_pef
    "dph_rl": (["--lr", "3e-4", "--presample-size", "16", "--presample-k", "4", "--pef-threshold", "2",
                "--pef-batch", "4", "--eta", "0.5"], {"final": "toy-small"}),
    "codistill": (["--loss-type", "grpo", "--small-lr", "3e-4", "--large-lr", "3e-4", "--large-rollouts", "2",
                   "--large", "UNTIED", "--dataset", "toy", "--max-new-tokens", "8", "--kd-coef", "0.5"],  # micro-batches of 8
                  {"final/small": "toy-small", "final/large": "UNTIED"}),
}


PAIRS = [("grpo", "dp"), ("grpo:batch-std", "dp"), ("grpo:lora", "dp"), ("codistill", "dp"), ("grpo", "fsdp"),
         ("cppo", "fsdp"), ("kdrl", "fsdp"), ("opd_plus", "fsdp"), ("codistill", "fsdp"), ("dph_rl", "fsdp")]
RESUME = ["--prompts-per-step", "4", "--eval-size", "21", "--eval-every", "100", "--save-every", "1", "--loss-type", "dapo",
          "--lr", "3e-4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, untied):
    """Every run of this file: ROOT/one/<case> in one process (--fsdp does nothing there, so a case's
    data-parallel and --fsdp runs share it, as before), ROOT/two/<case>-<mode> under torchrun and,
    in the same launch, the resume test's three runs of grpo.py itself (its own sampling). Returns
    ROOT and {run: None, or why it failed}."""
    root = tmp_path_factory.mktemp("dist")

    def case(name, script, out, flags, patched=True):
        return dict(name=name, script=script, patched=patched, argv=["--out", str(root / out), *flags])

    def flags(c):
        return ["--steps", "2", "--prompts-per-step", "4", "--eval-size", "21", "--eval-every", "100", "--save-every", "100",
                *[untied if f == "UNTIED" else f for f in CASES[c][0]]]

    one = [case(f"one-{c}", c.split(":")[0], f"one/{c}", flags(c)) for c in dict.fromkeys(c for c, _ in PAIRS)]
    two = [case(f"two-{c}-{m}", c.split(":")[0], f"two/{c}-{m}", flags(c) + (["--fsdp"] if m == "fsdp" else []))
           for c, m in PAIRS]
    two += [case("straight", "grpo", "straight", RESUME + ["--steps", "3", "--fsdp"], patched=False),
            case("resumed-dp", "grpo", "resumed", RESUME + ["--steps", "2"], patched=False),
            case("resumed", "grpo", "resumed", RESUME + ["--steps", "3", "--fsdp", "--resume"], patched=False)]
    for log in ("log-one", "log-two"):
        (root / log).mkdir()
    with ThreadPoolExecutor(2) as pool:  # side by side: much of a start is waiting, not computing
        a = pool.submit(launch, [sys.executable], one, root / "log-one")
        b = pool.submit(launch, TORCHRUN, two, root / "log-two")
        return root, {**a.result(), **b.result()}


def succeeded(errors, *names):
    for name in names:
        if errors[name] is not None:
            pytest.fail(f"{name} failed:\n{errors[name]}", pytrace=False)


@pytest.mark.parametrize("case, mode", PAIRS)
def test_torchrun_update_equals_the_single_process_update(runs, untied, case, mode):
    import tasks
    root, errors = runs
    succeeded(errors, f"one-{case}", f"two-{case}-{mode}")
    finals = CASES[case][1]
    one, two = root / "one" / case, root / "two" / f"{case}-{mode}"
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 2]  # rank 0 alone wrote
    compared = 0
    for ra, rb in zip(a, b):
        for key in KEYS:
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), key
                compared += 1
    assert compared >= 8
    for final, start in finals.items():
        start = untied if start == "UNTIED" else tasks.toy_path(start)
        w0, wa, wb = weights(start), weights(one / final), weights(two / final)
        assert sorted(wa) == sorted(wb) == sorted(w0)  # FSDP saves a tied weight once, as save_pretrained does
        assert max((wa[k] - w0[k]).abs().max() for k in wa) > 1e-4  # the update moved the weights ...
        for k in wa:  # ... the same way in both runs
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    for r in range(2):  # every model (trained and frozen) is whole on each rank, or half of it with --fsdp
        with open(two / f"params-rank{r}.json") as f:
            for m in json.load(f):
                if mode == "fsdp":
                    assert m["sharded"] and m["local"] <= 0.55 * m["total"], m
                else:
                    assert not m["sharded"] and m["local"] == m["total"], m


def test_fsdp_resumes_a_data_parallel_checkpoint(runs):
    """Optimizer states are saved by parameter name: a data-parallel checkpoint resumes under --fsdp
    and continues as an --fsdp run from the start does."""
    root, errors = runs
    succeeded(errors, "straight", "resumed-dp", "resumed")
    straight, resumed = root / "straight", root / "resumed"
    a, b = ([r for r in read_metrics(out) if r["step"] == 3 and "train/loss" in r] for out in (straight, resumed))
    assert len(a) == len(b) == 1
    for key in ("train/reward", "train/loss", "train/grad_norm", "train/tokens"):
        assert a[0][key] == pytest.approx(b[0][key], rel=1e-4, abs=1e-6), key
    torch.testing.assert_close(weights(straight / "final"), weights(resumed / "final"), rtol=1e-4, atol=1e-5)


def test_torchrun_writes_each_sample_once(runs):
    """samples.jsonl under torchrun: rank 0 writes every rank's greedy answers (rank r answers questions r, r + 2,
    ...) in question order and its own first group, once each: one process's rows, the same completions."""
    root, errors = runs
    succeeded(errors, "one-grpo", "two-grpo-dp", "two-grpo-fsdp", "straight", "resumed-dp", "resumed")
    one = read_samples(root / "one" / "grpo")
    layout = [(0, "eval", i) for i in range(4)] + [(2, "eval", i) for i in range(4)] + [(2, "train", None)] * 8
    assert [(r["step"], r["kind"], r.get("index")) for r in one] == layout  # --log-samples 4 by default
    for mode in ("dp", "fsdp"):
        assert read_samples(root / "two" / f"grpo-{mode}") == one, mode
    # a data-parallel run resumed under --fsdp appends step 3 to its rows; step 3 as an --fsdp run from the start
    resumed, straight = read_samples(root / "resumed"), read_samples(root / "straight")
    steps = [(r["step"], r["kind"]) for r in resumed]
    assert steps == [(0, "eval")] * 4 + [(2, "eval")] * 4 + [(2, "train")] * 8 + [(3, "eval")] * 4 + [(3, "train")] * 8
    what = lambda rows: [(r["kind"], r["question"], r["completion"], r["correct"]) for r in rows if r["step"] == 3]
    assert what(resumed) == what(straight)


def test_ranks_leave_together_and_a_failed_rank_at_once():
    """At exit every rank waits for the others before it leaves the process group (a gloo rank that left while
    rank 0 still wrote its files could abort); a rank that failed leaves at once, so the launch ends with its
    error instead of hanging where the other waits in a collective."""
    code = ("import os, sys, time; sys.path.insert(0, os.getcwd()); import plumbing\n"
            "plumbing.init_distributed('cpu', 1)\n"
            "assert plumbing.all_gather(plumbing.rank()) == [0, 1]\n"
            "if 'FAIL' in os.environ:\n"
            "    if plumbing.rank() == 1:\n"
            "        raise RuntimeError('rank 1 failed')\n"
            "    plumbing.all_gather(None)  # waits for rank 1\n"
            "elif plumbing.rank() == 0:\n"
            "    time.sleep(2)  # rank 1 is at the exit long before\n"
            "    os.write(1, b'rank 0 wrote\\n')\n")
    for fail in (False, True):
        env = dict(os.environ, OMP_NUM_THREADS="1", **({"FAIL": "1"} if fail else {}))
        p = subprocess.run([*TORCHRUN, "--no-python", sys.executable, "-c", code], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        if fail:
            assert p.returncode != 0 and "RuntimeError: rank 1 failed" in p.stderr, p.stderr[-2000:]
        else:
            assert p.returncode == 0 and p.stdout.count("rank 0 wrote") == 1, p.stderr[-2000:]
