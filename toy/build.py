"""How the shipped toy models were made: the recipe, and a command that rebuilds them and compares.

    python -m toy.build                     # rebuild every toy model in a temporary directory, compare
    python -m toy.build toy-small           # one of them
    python -m toy.build --write             # rebuild and replace the shipped models (then refresh the README)

From the repository's root, as a module, so that it imports common.py like the scripts do.

The scripts never run this: they load toy/<name>/ like any local model directory, so every machine
starts from the same weights. A rebuild is deterministic on one machine (fixed seeds), but the
floating-point order of another CPU makes the warm-start diverge (the models that ship here reach
0.314 and 0.964; another 2-core x86 machine built 0.308 and 0.992 from the same recipe). The verdict
says whether the rebuild is bit-identical, and if not, how far the weights and greedy accuracies are.
Exit code 0: identical; 1: different.

The task: "a+b" with a, b in 0..99 at a fixed width ("05+68=073", then EOS; a fixed layout lets a
2-layer model learn addition in seconds); tasks.toy_problems holds the train/eval split. The
warm-start is a short supervised phase on answers that are wrong in a systematic, human way: the
carry is dropped ("57+68=15") with probability `drop_carry`. toy-small is taught with the carry
dropped more often than not, so its greedy answer to most carrying sums is wrong while the right
one is sampled often: exactly the situation RL fixes. toy-large (6x the parameters) is taught with
the carry mostly kept, so it is a clearly better teacher. Both share one character-level tokenizer.

The hard regime (toy-hard-small, toy-hard-large; tasks.toy_hard_problems) is "a+b" with a, b in
0..999 and a + b >= 1000 ("417+817=1234"), with the same tokenizer. toy-hard-small is taught with
every carry dropped 90% of the time ("417+817=0224"), so it samples the right answer rarely (about
8% of its samples; most groups of 8 get no reward); toy-hard-large with the units carry dropped 70%
of the time ("456+789=1235"), so it is right greedily exactly where the units do not carry (0.56)
and samples the right answer often. At hidden size 64 the student did not learn three-digit sums
in 2000 steps: hence 96.

Another regime adds its recipes here, its dataset to tasks.load_data, its names to
tasks.TOY_MODELS, and its directories under toy/.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

if __name__ == "__main__" and not __package__:  # `python toy/build.py`: common.py is not on the path
    sys.exit("run it from the repository's root as a module: python -m toy.build " + " ".join(sys.argv[1:]))

import common  # noqa: E402
import plumbing  # noqa: E402
import tasks  # noqa: E402

TOY_CHARS = "0123456789+="
RECIPES = {
    # name:      model shape                                 warm-start data and schedule
    "toy-small": dict(hidden=64, layers=2, heads=4, ffn=256, drop_carry=0.65, steps=600, lr=3e-3, batch=256, seed=1),
    "toy-large": dict(hidden=128, layers=3, heads=4, ffn=512, drop_carry=0.15, steps=600, lr=2e-3, batch=256, seed=2),
    # toy-hard: `drop` lists the columns (units = 0) whose carry the wrong answer drops
    "toy-hard-small": dict(hidden=96, layers=2, heads=4, ffn=384, drop_carry=0.90, drop=(0, 1, 2), steps=1500, lr=3e-3,
                           batch=256, seed=1),
    "toy-hard-large": dict(hidden=128, layers=3, heads=4, ffn=512, drop_carry=0.70, drop=(0,), steps=1000, lr=2e-3,
                           batch=256, seed=2),
}


def toy_answer(a: int, b: int, drop_carry: bool = False) -> int:
    """a + b, or the digit-wise sum with every carry dropped (57 + 68 -> 15)."""
    if not drop_carry:
        return a + b
    return int("".join(str((int(x) + int(y)) % 10) for x, y in zip(f"{a:02d}", f"{b:02d}")))


def toy_hard_answer(a: int, b: int, drop: tuple = ()) -> int:
    """a + b column by column (units = column 0), the carry out of each column in `drop` dropped."""
    total, carry = 0, 0
    for i in range(3):
        s = a // 10 ** i % 10 + b // 10 ** i % 10 + carry
        total += s % 10 * 10 ** i
        carry = 0 if i in drop else s // 10
    return total + carry * 1000


def toy_tokenizer():
    """One token per character of TOY_CHARS, plus <pad>, <eos>, <unk>; the chat format is the
    question, then "=" as the generation prompt."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(TOY_CHARS)})
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    t.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}={% endif %}")
    return tok


def build(name: str, path: str, steps=None, log_every: int = 100):
    """Build and warm-start a toy model, then save it like any hub model (save_pretrained)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    r = dict(RECIPES[name], **({} if steps is None else dict(steps=steps)))
    t0 = time.time()
    tok = toy_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=r["hidden"], intermediate_size=r["ffn"],
                      num_hidden_layers=r["layers"], num_attention_heads=r["heads"],
                      num_key_value_heads=r["heads"], max_position_embeddings=64, tie_word_embeddings=True,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    g = torch.Generator().manual_seed(r["seed"])
    torch.manual_seed(r["seed"])  # the initial weights
    model = Qwen2ForCausalLM(cfg)
    # every training pair twice, "a+b=" + answer + <eos>, with the right and the carry-dropped
    # answer; labels (loss) on the answer and EOS only
    ids, labels = [], []
    dataset = tasks.TOY_MODELS[name]  # toy-hard: "417+817=" + "1234", the wrong answer drops the carries of r["drop"]
    for drop in (False, True):
        rows = []
        for a, b in (tasks.toy_hard_problems("train") if dataset == "toy-hard" else tasks.toy_problems("train")):
            question, answer = ((f"{a:03d}+{b:03d}", f"{toy_hard_answer(a, b, r['drop'] if drop else ()):04d}")
                                if dataset == "toy-hard" else (f"{a:02d}+{b:02d}", f"{toy_answer(a, b, drop):03d}"))
            prompt = tok(tasks.format_prompt(tok, question, instruction="")).input_ids
            rows.append((prompt, tok(answer).input_ids + [tok.eos_token_id]))
        L = len(rows[0][0]) + len(rows[0][1])  # fixed width: 10 tokens each (toy-hard: 13)
        ids.append(torch.tensor([p + c + [tok.pad_token_id] * (L - len(p) - len(c)) for p, c in rows]))
        labels.append(torch.tensor([[-100] * len(p) + c + [-100] * (L - len(p) - len(c)) for p, c in rows]))
    n = len(ids[0])
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=r["steps"], pct_start=0.1)
    model.train()
    for step in range(1, r["steps"] + 1):
        idx = torch.randint(n, (r["batch"],), generator=g)  # (b,)
        drop = (torch.rand(r["batch"], generator=g) < r["drop_carry"])[:, None]  # (b, 1)
        x = torch.where(drop, ids[1][idx], ids[0][idx])  # (b, L)
        y = torch.where(drop, labels[1][idx], labels[0][idx])  # (b, L)
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == r["steps"]:
            print(f"  {name}: step {step}/{r['steps']}, loss {loss.item():.4f}, {time.time() - t0:.0f}s",
                  flush=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)


def compare(shipped: str, rebuilt: str, dataset: str = "toy"):
    """(identical, max |weight difference|, shipped accuracy, rebuilt accuracy)."""
    from safetensors.torch import load_file

    a, b = (load_file(os.path.join(p, "model.safetensors")) for p in (shipped, rebuilt))
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return False, float("inf"), accuracy(shipped, dataset), accuracy(rebuilt, dataset)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    return diff == 0, diff, accuracy(shipped, dataset), accuracy(rebuilt, dataset)


def accuracy(path: str, dataset: str = "toy") -> float:
    model, tok = common.load_model(path, torch.device("cpu"))
    return common.evaluate(model, tok, tasks.load_data(dataset, "eval"), 8, instruction="")[0]["eval/accuracy"]


def main():
    p = argparse.ArgumentParser(description="Rebuild the shipped toy models by their recipe and compare.")
    p.add_argument("names", nargs="*", default=list(RECIPES), help=f"which models (default: {' '.join(RECIPES)})")
    p.add_argument("--write", action="store_true", help="replace the shipped models with the rebuilt ones")
    p.add_argument("--steps", type=int, default=None,
                   help="warm-start steps instead of the recipe's (a quick check of this tool; the result differs)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    args = p.parse_args()
    for name in args.names:
        if name not in RECIPES:
            plumbing.die(f"unknown toy model '{name}': use one of {', '.join(RECIPES)}")
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    same = True
    for name in args.names:
        shipped = os.path.join(tasks.TOY_DIR, name)
        with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
            print(f"building {name} in {tmp} ({RECIPES[name]})", flush=True)
            t0 = time.time()
            build(name, tmp, args.steps)
            print(f"built {name} in {time.time() - t0:.0f}s", flush=True)
            if os.path.exists(os.path.join(shipped, "model.safetensors")):
                identical, diff, acc_shipped, acc_rebuilt = compare(shipped, tmp, tasks.TOY_MODELS[name])
                verdict = "IDENTICAL to" if identical else "DIFFERENT from"
                print(f"{name}: rebuilt weights are {verdict} the shipped ones (max |difference| {diff:.3g}); "
                      f"greedy accuracy shipped {acc_shipped:.3f}, rebuilt {acc_rebuilt:.3f}", flush=True)
                same = same and identical
            if args.write:
                shutil.rmtree(shipped, ignore_errors=True)
                shutil.copytree(tmp, shipped)
                print(f"wrote {shipped}", flush=True)
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
