"""torchrun: two CPU processes (gloo) make the same update as one process on the same global batch.

The completions are made independent of the process that samples them (tests/dist_equivalence.py),
so any difference comes from the data-parallel plumbing: the sharding of questions, the global
loss normalisation, the gradient reduction, rank-0 writing."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, read_metrics

HARNESS = os.path.join(ROOT, "tests", "dist_equivalence.py")


def run(cmd, out, flags):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([*cmd, HARNESS, *flags, "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


KEYS = ("train/reward", "train/tokens", "train/loss", "train/grad_norm", "small/loss", "small/grad_norm",
        "large/loss", "large/grad_norm", "small/kd_kl", "eval/accuracy", "small/eval/accuracy", "large/eval/accuracy")


@pytest.mark.parametrize("script, flags, finals", [
    ("grpo", ["--loss-type", "dapo", "--beta", "0.04", "--lr", "3e-4"], {"final": "toy-small"}),
    ("codistill", ["--loss-type", "grpo", "--small-lr", "3e-4", "--large-lr", "3e-4", "--large-rollouts", "2"],
     {"final/small": "toy-small", "final/large": "toy-large"}),
], ids=["grpo", "codistill"])
def test_torchrun_update_equals_the_single_process_update(tmp_path, script, flags, finals):
    import common
    flags = [script, "--steps", "2", "--prompts-per-step", "4", "--eval-size", "20", "--eval-every", "100",
             "--save-every", "100", *flags]
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable], one, flags)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], two, flags)
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 2]  # rank 0 alone wrote
    compared = 0
    for ra, rb in zip(a, b):
        for key in KEYS:
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), key
                compared += 1
    assert compared >= 10
    for final, start in finals.items():
        w0, wa, wb = weights(common.toy_path(start)), weights(one / final), weights(two / final)
        assert max((wa[k] - w0[k]).abs().max() for k in wa) > 1e-4  # the update moved the weights ...
        for k in wa:  # ... the same way in both runs
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
