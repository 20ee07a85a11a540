"""Run scripts' main() with completions that depend only on the question, the step and the
weights, not on which process samples them or next to what: then one process and torchrun see
the same batch, and their updates can be compared (tests/test_distributed.py). After each run it
writes DIR/params-rank<r>.json: the parameters each loaded model holds on this rank (its shard
under FSDP).

    python tests/dist_equivalence.py grpo --out DIR [flags]
    torchrun --standalone --nproc_per_node 2 tests/dist_equivalence.py grpo --out DIR [flags]
    python tests/dist_equivalence.py LOG/cases.json   # or under torchrun: several runs, one process

LOG/cases.json lists runs, {"name": ..., "script": "grpo", "argv": ["--out", DIR, ...], "patched":
true}, made in order in this process (its start, the imports and the process group cost far more
than a toy run); "patched": false runs the script's own sampling and evaluation. A run that
finishes writes LOG/<name>.ok; one that fails writes LOG/<name>.error-rank<r>.txt, and then in
one process the next run starts, while under torchrun the process exits (the other rank may be
waiting in a collective) and tests/test_distributed.py launches again from the run after it.
"""

import importlib
import json
import os
import sys
import traceback
import zlib

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import plumbing  # noqa: E402

real_sample = common.sample
real_load = common.load_model
real_evaluate = common.evaluate
calls, loaded, evaluations, evaluating = [0], [], [0], [0]


def sample_per_question(model, tok, prompts, group_size, max_new_tokens, temperature=1.0, greedy=False):
    if greedy:
        return real_sample(model, tok, prompts, group_size, max_new_tokens, temperature, greedy=True)
    if not evaluating[0]:  # evaluation's pass@k samples: keyed by the evaluation, not by the call
        calls[0] += 1
    parts = []
    for p in prompts:
        torch.manual_seed(zlib.crc32(p.encode()) + 1_000_003 * calls[0] + 7_000_003 * evaluating[0])
        parts.append(real_sample(model, tok, [p], group_size, max_new_tokens, temperature))
    return common.Rollout.cat(parts, tok.pad_token_id)


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


def run_case(script, argv, patched=True):
    """One run of script.main() with the command line argv, as a fresh process would make it:
    the counters that key the sampling start again at 0."""
    calls[0] = evaluations[0] = evaluating[0] = 0
    loaded.clear()
    common.load_model = load_and_record
    common.sample, common.evaluate = (sample_per_question, evaluate_numbered) if patched else (real_sample, real_evaluate)
    sys.argv = [script + ".py", *argv]
    importlib.import_module(script).main()
    out = argv[argv.index("--out") + 1]
    with open(os.path.join(out, f"params-rank{plumbing.rank()}.json"), "w") as f:
        json.dump([dict(sharded=plumbing.is_sharded(m), total=sum(p.numel() for p in m.parameters()),
                        local=sum(local_numel(p) for p in m.parameters())) for m in loaded], f)
    loaded.clear()
    if dist.is_initialized():
        dist.barrier()  # every rank (rank 0: its writing) is done with this run before the next starts


if __name__ == "__main__":
    log = None
    if sys.argv[1].endswith(".json"):
        log = os.path.dirname(os.path.abspath(sys.argv[1]))
        with open(sys.argv[1]) as f:
            cases = json.load(f)
    else:
        cases = [dict(name=sys.argv[1], script=sys.argv[1], argv=sys.argv[2:])]
    failed = False
    for case in cases:
        try:
            run_case(case["script"], case["argv"], case.get("patched", True))
            if log and plumbing.rank() == 0:
                open(os.path.join(log, case["name"] + ".ok"), "w").close()
        except (Exception, SystemExit):  # SystemExit: plumbing.die, a mistake in the flags
            traceback.print_exc()
            if log:
                with open(os.path.join(log, f"{case['name']}.error-rank{os.environ.get('RANK', 0)}.txt"), "w") as f:
                    f.write(traceback.format_exc())
            sys.stdout.flush()
            sys.stderr.flush()
            failed = True
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                os._exit(1)  # torchrun stops the other ranks
    sys.exit(1 if failed else 0)
