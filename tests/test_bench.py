"""bench.py --gpu-check, tiny on CPU: the same code path the GPU run takes (random-weight Qwen2.5
configs with the real 151,936-row vocabulary, built locally; each row in its own process)."""

import json
import re
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_runs_tiny_on_cpu():
    # cppo.py refuses G 4 at its default prune rate (it would keep no completion): its row says it failed,
    # the other rows are still measured, and the exit code reports the failure
    p = subprocess.run([sys.executable, "bench.py", "--gpu-check",
                        "--check-scripts", "generation,update,grpo,trl,cppo,codistill",
                        "--update-variants", "default,no entropy", "--check-layers", "1", "--check-hidden", "64",
                        "--check-steps", "2", "--check-prompts", "1", "--check-group", "4", "--check-new-tokens", "4",
                        "--check-prompt-tokens", "20"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 1 and "--gpu-check: a script failed" in p.stderr, p.stderr[-3000:]
    assert "| cppo.py | 0.5B | failed (its error is above) |" in p.stdout and "--prune-rate 0.875 keeps no" in p.stderr
    assert "cut to 1 layers, hidden 64; 1 questions x 4 completions of up to 4 tokens" in p.stdout
    # the generation modes, one process: each timed, and greedy rows equal to generate's (fp32 on a CPU: exact)
    modes = {m["mode"]: m for m in map(json.loads, re.findall(r'^  (\{"mode".*\})$', p.stderr, re.M))}
    assert set(modes) == {"generate", "static", "fastgen"}
    assert all(m["tokens"] == 16 and m["tok_s"] > 0 for m in modes.values())
    assert modes["static"]["greedy_rows_equal_to_generate"] == modes["fastgen"]["greedy_rows_equal_to_generate"] == 1.0
    fastest = max(modes.values(), key=lambda m: m["tok_s"])["mode"]
    assert f"the script rows generate with --generation {fastest}" in p.stderr
    variants = [json.loads(v) for v in re.findall(r'^  (\{"variant".*\})$', p.stderr, re.M)]
    assert [v["variant"] for v in variants] == ["default", "no entropy"] and all(v["update_s"] > 0 for v in variants)
    rows = {}
    for line in p.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and re.match(r"^[\d.,-]+$", cells[2]):
            rows[cells[0]] = cells
    try:
        import trl  # noqa: F401
        assert set(rows) == {"generation: generate", "generation: static", "generation: fastgen", "grpo.py", "codistill.py",
                             "TRL GRPOTrainer"}
    except ImportError:
        assert "trl is not importable" in p.stderr
    assert rows["codistill.py"][1] == "0.5B + 1.5B"
    for script in ("grpo.py", "codistill.py"):
        assert f"--generation {fastest}" in p.stderr.split(f"{script.removesuffix('.py')} done")[1].split("\n")[0]
        step, gen, upd, gen_tps, train_tps, peak, first = (float(c.replace(",", "")) for c in rows[script][2:])
        assert 0 < gen < step and 0 < upd < step and gen + upd <= step * 1.01 + 0.01  # the table rounds each to 0.01 s
        assert gen_tps > 0 and train_tps > 0 and peak > 0 and first > 0
    # the profile of one update comes last: the operators by their own time (kernels on a GPU), and the rates
    profile = p.stdout.split("profiled:")[1]
    assert "aten::mm" in profile and "Self CPU" in profile and '"trained_tok_s"' in profile, profile


def test_a_row_past_the_budget_is_skipped_and_said():
    p = subprocess.run([sys.executable, "bench.py", "--gpu-check", "--check-scripts", "grpo,codistill",
                        "--check-budget", "0.001", "--check-layers", "1", "--check-hidden", "64", "--check-steps", "2",
                        "--check-prompts", "1",
                        "--check-group", "2", "--check-new-tokens", "2", "--check-prompt-tokens", "10"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "| grpo | | skipped (--check-budget) |" in p.stdout.replace("|  |", "| |"), p.stdout
    assert "codistill: skipped" in p.stderr and p.returncode == 1


def test_fastgen_check_prints_a_row_a_rung_each_agreeing_with_the_one_before():
    import fastgen
    import tasks
    p = subprocess.run([sys.executable, "bench.py", "--fastgen-check", tasks.toy_path("toy-small"), "--check-data", "toy",
                        "--check-prompts", "2", "--check-group", "2", "--check-new-tokens", "6"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rungs = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert [r["mode"] for r in rungs] == ["fastgen default"] + [f"fastgen +{n}" for n in fastgen.LADDER]
    assert rungs[-1]["switches"] == ",".join(fastgen.LADDER)
    assert all(r["tok_s"] > 0 and r["host_us_per_step"] > 0 and r["first_call_s"] >= 0 for r in rungs)
    assert [r["greedy_rows_equal_to_rung_before"] for r in rungs] == [None] + [1.0] * len(fastgen.LADDER)
