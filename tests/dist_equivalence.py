"""Run a script's main() with completions that depend only on the question, the step and the
weights, not on which process samples them or next to what: then one process and torchrun see
the same batch, and their updates can be compared (tests/test_distributed.py). It also writes
DIR/params-rank<r>.json: the parameters each loaded model holds on this rank (its shard under FSDP).

    python tests/dist_equivalence.py grpo --out DIR [flags]
    torchrun --standalone --nproc_per_node 2 tests/dist_equivalence.py grpo --out DIR [flags]
"""

import importlib
import json
import os
import sys
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

real_sample = common.sample
real_load = common.load_model
calls, loaded, evaluations, evaluating = [0], [], [0], [0]
real_evaluate = common.evaluate


def sample_per_question(model, tok, prompts, group_size, max_new_tokens, temperature=1.0, greedy=False):
    if greedy:
        return real_sample(model, tok, prompts, group_size, max_new_tokens, temperature, greedy=True)
    if not evaluating[0]:  # evaluation's pass@k samples: keyed by the evaluation, not by the call
        calls[0] += 1
    parts = []
    for p in prompts:
        torch.manual_seed(zlib.crc32(p.encode()) + 1_000_003 * calls[0] + 7_000_003 * evaluating[0])
        parts.append(real_sample(model, tok, [p], group_size, max_new_tokens, temperature))
    return common.cat_rollouts(parts, tok.pad_token_id)


def evaluate_numbered(*args, **kwargs):
    """common.evaluate, its sampling numbered by the evaluation: ranks make fewer calls than one process."""
    evaluations[0] += 1
    evaluating[0] = evaluations[0]
    try:
        return real_evaluate(*args, **kwargs)
    finally:
        evaluating[0] = 0


def load_and_record(*args, **kwargs):
    model, tok = real_load(*args, **kwargs)
    loaded.append(model)
    return model, tok


def local_numel(p):
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


if __name__ == "__main__":
    common.sample, common.load_model, common.evaluate = sample_per_question, load_and_record, evaluate_numbered
    script = importlib.import_module(sys.argv[1])
    sys.argv = [sys.argv[1] + ".py", *sys.argv[2:]]
    script.main()
    out = sys.argv[sys.argv.index("--out") + 1]
    with open(os.path.join(out, f"params-rank{common.rank()}.json"), "w") as f:
        json.dump([dict(sharded=common.is_sharded(m), total=sum(p.numel() for p in m.parameters()),
                        local=sum(local_numel(p) for p in m.parameters())) for m in loaded], f)
