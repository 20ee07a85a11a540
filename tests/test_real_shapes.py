"""Every script, two steps through its real command line (its argument parsing and main(), in this
process: conftest.run_main), on random-weight models with the real Qwen2.5 shapes: the 0.5B and
1.5B configs (full 151,936-row vocabulary, real hidden, head and MLP sizes, tied heads) cut to one
decoder layer, and an untied head with the 7B's 152,064 rows (on the 0.5B's hidden size, 896 instead
of 3,584, so that the test fits a CPU's memory). The tokenizer has Qwen2.5's added tokens at their
real ids and its chat template (tests/qwen_like.py)."""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from conftest import read_metrics, run_main
from qwen_like import qwen_like_model


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):  # 1.4 GB of models, removed after the module
    root = tmp_path_factory.mktemp("qwen")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(dict(question=q, answer=a)) + "\n" for q, a in [
        ("Natalia sold clips to 48 of her friends in April, and then she sold half as many in May. "
         "How many clips did she sell altogether?", "72"),
        ("What is 3 + 4?", "#### 7"), ("What is $\\frac{14}{2}$?", "7"), ("Compute 25% of 800.", "200")]))
    yield dict(
        data=str(data),
        base_05=qwen_like_model(str(root / "0.5B"), "0.5B", layers=1),
        instruct_15=qwen_like_model(str(root / "1.5B-Instruct"), "1.5B", layers=1, instruct=True),
        untied=qwen_like_model(str(root / "untied"), "0.5B", layers=1, instruct=True, tie_word_embeddings=False,
                               vocab_size=152_064),
    )
    shutil.rmtree(root)


# One micro-batch, one log-prob chunk (the defaults) and one update per step (cppo's default is two): each
# more is another pass over the 136M-parameter embedding or head; micro-batches, chunks and --num-iterations 2
# are tested on the toy models. Two new tokens are a prefill and a step with the KV cache.
SMALL = ["--steps", "2", "--prompts-per-step", "1", "--group-size", "2", "--max-new-tokens", "2", "--eval-size", "1"]
CASES = {  # script: (model flags, other flags, final directories)
    "grpo": (dict(model="base_05"), ["--beta", "0.04"], ["final"]),
    "cppo": (dict(model="base_05"), ["--beta", "0", "--prune-rate", "0.5", "--num-iterations", "1"], ["final"]),
    "kdrl": (dict(model="base_05", teacher="untied"), ["--beta", "0"], ["final"]),  # 151,936 rows vs 152,064
    "opd_plus": (dict(model="base_05", teacher="instruct_15"), [], ["final"]),
    "codistill": (dict(small="base_05", large="untied"), ["--large-rollouts", "1"], ["final/small", "final/large"]),
    "dph_rl": (dict(model="base_05"), ["--presample-k", "2"], ["final"]),
}


@pytest.mark.parametrize("script", list(CASES))
def test_script_runs_at_real_qwen_shapes(qwen, tmp_path, script):
    models, flags, finals = CASES[script]
    model_flags = [x for k, v in models.items() for x in (f"--{k}", qwen[v])]
    out = tmp_path / "run"
    run_main(f"{script}.py", *model_flags, "--dataset", qwen["data"], *SMALL, *flags, "--out", out)
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "time/step" in r] == [1, 2]
    for final in finals:  # the trained weights: in bf16, as published, only if that loses nothing; the checkpoint's fp32
        ckpt = out / "checkpoint" / {"final": "policy", "final/small": "small", "final/large": "large"}[final]
        with safe_open(os.path.join(out / final, "model.safetensors"), "pt") as f, \
                safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as g:
            (dtype,) = {f.get_slice(k).get_dtype() for k in f.keys()}
            assert {g.get_slice(k).get_dtype() for k in g.keys()} == {"F32"} and set(f.keys()) == set(g.keys())
            assert all(torch.equal(f.get_tensor(k).float(), g.get_tensor(k)) for k in f.keys())
        assert json.load(open(out / final / "config.json"))["dtype"] == {"BF16": "bfloat16", "F32": "float32"}[dtype]
    shutil.rmtree(out)  # 2-5 GB of checkpoint, that pytest would keep for three sessions (kept if a check fails)
