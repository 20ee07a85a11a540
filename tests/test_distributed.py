"""torchrun: two CPU processes (gloo) make the same update as one process on the same global batch,
data parallel and with --fsdp.

The completions are made independent of the process that samples them (tests/dist_equivalence.py),
so any difference comes from the distributed plumbing: the sharding of questions, the global loss
normalisation, the gradient reduction, FSDP's gathering and reduce-scattering, rank-0 writing."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, read_metrics

HARNESS = os.path.join(ROOT, "tests", "dist_equivalence.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run(cmd, out, flags):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([*cmd, *flags, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """A random Qwen2 with its own LM head (Qwen2.5 7B is untied; the toys, like 0.5B-3B, are tied)."""
    import common
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    path = str(tmp_path_factory.mktemp("untied"))
    config = Qwen2Config.from_pretrained(common.toy_path("toy-small"))
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(common.toy_path("toy-small")).save_pretrained(path)
    return path


KEYS = ("train/reward", "train/reward_std", "train/tokens", "train/loss", "train/grad_norm", "small/loss", "small/grad_norm",
        "large/loss", "large/grad_norm", "small/kd_kl", "dph/divergence", "eval/accuracy", "small/eval/accuracy",
        "large/eval/accuracy", "eval/pass@1", "eval/pass@16", "small/eval/pass@4", "large/eval/pass@16")
CASES = {  # script[:variant]: its flags, {final model directory: where it started}
    "grpo": (["--loss-type", "dapo", "--beta", "0.04", "--lr", "3e-4"], {"final": "toy-small"}),
    # the std of the whole step's rewards, not of each rank's half
    "grpo:batch-std": (["--scale-rewards", "batch", "--beta", "0", "--lr", "3e-4"], {"final": "toy-small"}),
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


@pytest.mark.parametrize("case, mode", [("grpo", "dp"), ("grpo:batch-std", "dp"), ("codistill", "dp"), ("grpo", "fsdp"),
                                        ("cppo", "fsdp"), ("kdrl", "fsdp"), ("opd_plus", "fsdp"), ("codistill", "fsdp"),
                                        ("dph_rl", "fsdp")])
def test_torchrun_update_equals_the_single_process_update(tmp_path, untied, case, mode):
    import common
    flags, finals = CASES[case]
    flags = [HARNESS, case.split(":")[0], "--steps", "2", "--prompts-per-step", "4", "--eval-size", "21", "--eval-every", "100",
             "--save-every", "100", *[untied if f == "UNTIED" else f for f in flags]]
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable], one, flags)
    run(TORCHRUN, two, flags + (["--fsdp"] if mode == "fsdp" else []))
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
        start = untied if start == "UNTIED" else common.toy_path(start)
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


def test_fsdp_resumes_a_data_parallel_checkpoint(tmp_path):
    """Optimizer states are saved by parameter name: a data-parallel checkpoint resumes under --fsdp
    and continues as an --fsdp run from the start does."""
    flags = [os.path.join(ROOT, "grpo.py"), "--prompts-per-step", "4", "--eval-size", "21", "--eval-every", "100",
             "--save-every", "1", "--loss-type", "dapo", "--lr", "3e-4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(TORCHRUN, straight, flags + ["--steps", "3", "--fsdp"])
    run(TORCHRUN, resumed, flags + ["--steps", "2"])
    run(TORCHRUN, resumed, flags + ["--steps", "3", "--fsdp", "--resume"])
    a, b = ([r for r in read_metrics(out) if r["step"] == 3 and "train/loss" in r] for out in (straight, resumed))
    assert len(a) == len(b) == 1
    for key in ("train/reward", "train/loss", "train/grad_norm", "train/tokens"):
        assert a[0][key] == pytest.approx(b[0][key], rel=1e-4, abs=1e-6), key
    torch.testing.assert_close(weights(straight / "final"), weights(resumed / "final"), rtol=1e-4, atol=1e-5)
