"""Plumbing shared by every script: no algorithm logic lives here.

Arguments, seeding, device; model and tokenizer loading (hub id, bare Qwen name, local
directory, or a toy model); data, prompts and rewards; batched sampling; chunked log-probs of
sampled tokens; divergence math; greedy evaluation; logging; checkpoints. The training loop,
the advantages, the loss and what is logged stay in each script, so that a diff between two
scripts shows the algorithm and nothing else.

Conventions. A rollout holds B = prompts x G rows, group g being rows g*G .. g*G+G-1. Every
per-token tensor is (B, T) over the T completion positions; `mask` is 1 up to and including
the first EOS and 0 after, built from lengths (never from `ids == pad_id`). Helpers never
change their inputs in place.
"""

import argparse
import atexit
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def die(msg: str):
    """A mistake the user can fix: one clear line and exit code 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# ----------------------------------------------------------------------------------------------
# Arguments: one @dataclass per script, its fields are the command line.


def arg(default, help: str, toy=None, choices=None):
    """A dataclass field whose help text is its --help line; `toy` is its default for toy models."""
    return dataclasses.field(default=default, metadata=dict(help=help, toy=toy, choices=choices))


MODEL_FIELDS = ("model", "teacher", "small", "large")


def parse_args(cls, argv=None):
    """Build argparse from the dataclass. Defaults follow the model: when every model named is a
    toy model, fields with a `toy` default take it, unless the flag was given."""
    p = argparse.ArgumentParser(description=(sys.modules["__main__"].__doc__ or "").split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(cls):
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        toy = "" if meta.get("toy") is None else f"; toy models: {meta['toy']}"
        help = f"{meta.get('help', '')} (default: {f.default}{toy})".replace("%", "%%")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            if typ not in (int, float, str):
                typ = str
            p.add_argument(flag, type=typ, choices=meta.get("choices"), help=help)
    given = vars(p.parse_args(argv))
    args = cls(**given)
    names = [getattr(args, n) for n in MODEL_FIELDS if hasattr(args, n)]
    if names and all(is_toy(n) for n in names):
        for f in dataclasses.fields(cls):
            if f.metadata.get("toy") is not None and f.name not in given:
                setattr(args, f.name, f.metadata["toy"])
    return args


def check_common_args(args):
    """The mistakes every script can make, each as one line."""
    if args.group_size < 2:
        die(f"--group-size must be at least 2 (got {args.group_size}): "
            "group-relative advantages need two completions to compare")
    for name, least in (("steps", 0), ("eval_size", 0), ("prompts_per_step", 1), ("max_new_tokens", 1),
                        ("micro_batch_size", 1)):
        if getattr(args, name) < least:
            die(f"--{name.replace('_', '-')} must be {'non-negative' if least == 0 else 'positive'} "
                f"(got {getattr(args, name)})")
    if args.temperature <= 0:
        die(f"--temperature must be positive for on-policy sampling (got {args.temperature})")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun: every rank takes whole questions
    if args.prompts_per_step % world:
        die(f"--prompts-per-step ({args.prompts_per_step}) must be a multiple of the number of processes ({world})")


# ----------------------------------------------------------------------------------------------
# Seeding, device, dtype


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        die(f"--device {name} asked for, but no CUDA device is visible")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------
# Several processes (torchrun). With one process every helper here is a no-op.
#
# Each rank samples its own share of the step's questions (whole groups: a group never straddles
# ranks), normalises its loss by the step's GLOBAL sequence and token counts, and the gradients
# are summed over ranks before clipping, so the update is the single-process update of the whole
# batch. Only rank 0 writes (metrics, evaluation, checkpoints, final model).
#
# Two ways to hold the models. Data parallel (default): every rank holds whole models and the
# gradients are all-reduced once per optimizer step. --fsdp (FSDP2, for models that do not fit
# one GPU): each rank holds 1/N of every parameter, gradient and AdamW state; a decoder layer is
# gathered just before it runs and freed after; the root unit (embeddings, final norm, LM head)
# stays gathered between a forward and its backward. Every forward is then a collective: all
# ranks must run the same number of them.


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def init_distributed(name: str = "auto") -> torch.device:
    """The device of this process. Under torchrun (WORLD_SIZE > 1) it also joins the process group:
    NCCL with one GPU per process (LOCAL_RANK) on CUDA, gloo on CPU."""
    device = get_device(name)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(dist.destroy_process_group)
    return device


def shard(rows: list) -> list:
    """This rank's contiguous share of the step's questions (every rank drew the same list)."""
    n = len(rows) // world_size()
    return rows[rank() * n:(rank() + 1) * n]


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a tensor (a new one; the input is left as it is)."""
    x = x.clone()
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def apply_fsdp(model):
    """FSDP2 over all ranks: one unit per decoder layer, the rest (embeddings, final norm, LM head:
    one tensor when tied, as in Qwen2.5 0.5B-3B) in the root unit. On CUDA the gathered weights are
    bf16 (what autocast would make of them) and gradients are reduced in fp32. A no-op in one process."""
    if world_size() == 1:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world_size(),))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda"
          else MixedPrecisionPolicy())
    for layer in model.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    return fully_shard(model, mesh=mesh, mp_policy=mp)


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def reduce_and_clip_grads(model, max_norm: float, bucket_numel: int = 2**25) -> torch.Tensor:
    """Sum the gradients over ranks (each rank's loss is already its share of the global mean),
    clip them to `max_norm` and return their norm before clipping. FSDP has reduce-scattered them
    in backward, as a mean over ranks: times N makes it the sum. Data parallel: one all-reduce
    here, in flat buckets, once per optimizer step. (DDP's wrapper would overlap the last backward
    with it, but needs no_sync() on every other micro-batch and unwrapping for generate and
    save_pretrained.)"""
    reshard(model)  # FSDP: the model holds the sharded parameters (and their gradients) that the optimizer steps
    params = [p for p in model.parameters() if p.requires_grad]
    if is_sharded(model):
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_mul_(grads, float(world_size()))
    elif dist.is_initialized():
        for p in params:
            if p.grad is None:  # a parameter no token reached on this rank still joins the sum
                p.grad = torch.zeros_like(p)
        bucket, numel = [], 0
        for i, p in enumerate(params):
            bucket.append(p.grad)
            numel += p.grad.numel()
            if numel >= bucket_numel or i == len(params) - 1:
                flat = torch.cat([g.reshape(-1) for g in bucket])
                dist.all_reduce(flat)
                for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                    g.copy_(part.view_as(g))
                bucket, numel = [], 0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor


@contextlib.contextmanager
def gathered(model):
    """FSDP: keep every layer gathered while the model generates, so that each is all-gathered
    once per batch rather than once per new token; freed after. A no-op otherwise."""
    if not is_sharded(model):
        yield
        return
    layers = model.get_decoder().layers
    for layer in layers:
        layer.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_reshard_after_forward(True, recurse=False)
        reshard(model)


def reshard(model):
    """FSDP: free every gathered unit (the root stays gathered after a forward, for its backward),
    so that the model holds its own shards again, as its optimizer does."""
    from torch.distributed.fsdp import FSDPModule
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def mean_over_ranks(metrics: dict) -> dict:
    """Each logged number averaged over ranks (ranks hold equal shares of the step)."""
    if not dist.is_initialized():
        return metrics
    keys = list(metrics)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    x = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(x)
    return dict(zip(keys, (x / world_size()).tolist()))


def autocast(device: torch.device):
    """Mixed precision on CUDA: trained weights (and AdamW states) stay fp32, matmuls run in bf16.
    Pure bf16 weights would round updates of lr 1e-6 away. The log-prob math is fp32 everywhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# Models and tokenizers

TOY_MODELS = ("toy-small", "toy-large")


def is_toy(name: str) -> bool:
    return name in TOY_MODELS


def resolve_model_name(name: str) -> str:
    """toy name and local directory as they are; a bare Qwen name gets its hub organisation."""
    if is_toy(name) or os.path.isdir(name):
        return name
    if "/" not in name and re.match(r"^Qwen\d", name):
        return "Qwen/" + name
    return name


def load_model(name: str, device: torch.device, gradient_checkpointing: bool = False, frozen: bool = False,
               fsdp: bool = False):
    """(model, tokenizer) from a toy name, a local `save_pretrained` directory or a hub id.
    Weights in fp32 (trained models keep fp32 master weights; `frozen` ones are `freeze`d, bf16 on
    CUDA); compute runs under `autocast`. `fsdp`: sharded over the ranks (`apply_fsdp`); build the
    optimizer after this, on the sharded parameters."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per run: ours
    path = toy_path(name) if is_toy(name) else resolve_model_name(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        hub = "" if os.path.isdir(path) else (
            "; the hub is unreachable from here" if not hub_reachable() else "")
        die(f"cannot load model '{name}': not a toy model ({', '.join(TOY_MODELS)}), a local "
            f"directory written by save_pretrained, or a hub id that loads{hub} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    tok.padding_side = "left"  # batched generation appends after the prompt
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))
    model = model.to(device)
    if frozen:
        freeze(model)
    return (apply_fsdp(model) if fsdp else model), tok


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    import socket
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def eos_ids(model, tok) -> list:
    """Every id that ends a completion: the tokenizer's EOS and the generation_config's (Qwen
    Instruct ends turns with <|im_end|>, base models with <|endoftext|>)."""
    ids = {tok.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return sorted(i for i in ids if i is not None)


def check_same_tokenizer(tok_a, tok_b, name_a: str, name_b: str):
    """Distillation compares log-probs of the same token ids: refuse pairs whose vocabularies differ."""
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    shared = set(va) & set(vb)
    if any(va[t] != vb[t] for t in shared) or (set(va) ^ set(vb)):
        die(f"'{name_a}' and '{name_b}' have different tokenizers ({len(va)} vs {len(vb)} tokens); "
            "the per-token log-prob ratios need the same token ids")


def shared_vocab(model, tok, other, other_tok, name: str, other_name: str) -> int:
    """The LM-head rows that `model` samples from, once `other` is known to score every one of them:
    identical tokenizers, and at least as many rows in `other` (Qwen2.5 7B and up pad to 152,064
    rows, 0.5B to 3B to 151,936; `other`'s extra rows are sliced off its logits)."""
    check_same_tokenizer(tok, other_tok, name, other_name)
    rows, other_rows = (m.get_output_embeddings().weight.shape[0] for m in (model, other))
    if other_rows < rows:
        die(f"'{other_name}' has fewer LM-head rows than '{name}' ({other_rows} < {rows}): it cannot score "
            f"every id that '{name}' can sample")
    return rows


def freeze(model):
    """A frozen model (teacher, reference): eval mode, no grads, bf16 weights on CUDA."""
    model.eval()
    model.requires_grad_(False)
    if next(model.parameters()).is_cuda:
        model.to(torch.bfloat16)
    return model


# ----------------------------------------------------------------------------------------------
# The toy world: tiny Qwen2-architecture models on 2-digit addition, built locally.
#
# Task: "a+b" with a, b in 0..99, written at a fixed width ("05+68=073", then EOS; a fixed
# layout lets a 2-layer model learn addition in seconds). Held out: a fixed set of 500 pairs. Warm-start: a short supervised phase on answers that are wrong in a
# systematic, human way: the carry is dropped ("57+68=15") with probability `drop_carry`.
# toy-small is warm-started on data where the carry is dropped more often than not, so its
# greedy answer to most carrying sums is wrong while the right one is sampled often: exactly the
# situation RL fixes. toy-large (6x the parameters) is taught with the carry mostly kept, so it
# is a clearly better teacher. Both share one character-level tokenizer. Built once (2-3 minutes
# for both on 2 CPU cores) and cached under $TOY_CACHE (default ~/.cache/rl-reasoning-toy).

TOY_CHARS = "0123456789+="
TOY_RECIPES = {
    # name:      model shape                                 warm-start data and schedule
    "toy-small": dict(hidden=64, layers=2, heads=4, ffn=256, drop_carry=0.65, steps=600, lr=3e-3, batch=256, seed=1),
    "toy-large": dict(hidden=128, layers=3, heads=4, ffn=512, drop_carry=0.15, steps=600, lr=2e-3, batch=256, seed=2),
}
TOY_VERSION = "v1"  # bump when the recipe changes: the cache is keyed by it
TOY_EVAL_PAIRS = 500


def toy_problems(split: str):
    """All (a, b) pairs, 0..99 each: 500 fixed ones are the eval split, the rest train."""
    pairs = [(a, b) for a in range(100) for b in range(100)]
    random.Random(1234).shuffle(pairs)
    return pairs[:TOY_EVAL_PAIRS] if split == "eval" else pairs[TOY_EVAL_PAIRS:]


def toy_answer(a: int, b: int, drop_carry: bool = False) -> int:
    if not drop_carry:
        return a + b
    return int("".join(str((int(x) + int(y)) % 10) for x, y in zip(f"{a:02d}", f"{b:02d}")))


def toy_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(TOY_CHARS)})
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    t.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    # the toy's chat format: the question, then "=" as the generation prompt
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}={% endif %}")
    return tok


def toy_path(name: str) -> str:
    root = os.environ.get("TOY_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rl-reasoning-toy"))
    path = os.path.join(root, TOY_VERSION, name)
    if not os.path.exists(os.path.join(path, "config.json")):
        build_toy(name, path)
    return path


def build_toy(name: str, path: str):
    """Build and warm-start a toy model, then save it like any hub model (save_pretrained)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    r = TOY_RECIPES[name]
    print(f"building {name} (once; cached in {path}) ...", file=sys.stderr, flush=True)
    t0 = time.time()
    tok = toy_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=r["hidden"], intermediate_size=r["ffn"],
                      num_hidden_layers=r["layers"], num_attention_heads=r["heads"],
                      num_key_value_heads=r["heads"], max_position_embeddings=64, tie_word_embeddings=True,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    g = torch.Generator().manual_seed(r["seed"])
    torch.manual_seed(r["seed"])
    model = Qwen2ForCausalLM(cfg)
    # every training pair twice, "a+b=" + answer + <eos>, with the right and the carry-dropped
    # answer; labels (loss) on the answer and EOS only
    ids, labels = [], []
    for drop in (False, True):
        rows = []
        for a, b in toy_problems("train"):
            prompt = tok(format_prompt(tok, f"{a:02d}+{b:02d}", "toy")).input_ids
            rows.append((prompt, tok(f"{toy_answer(a, b, drop):03d}").input_ids + [tok.eos_token_id]))
        L = len(rows[0][0]) + len(rows[0][1])  # fixed width: 10 tokens each
        ids.append(torch.tensor([p + c + [tok.pad_token_id] * (L - len(p) - len(c)) for p, c in rows]))
        labels.append(torch.tensor([[-100] * len(p) + c + [-100] * (L - len(p) - len(c)) for p, c in rows]))
    n = len(ids[0])
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=r["steps"], pct_start=0.1)
    model.train()
    for _ in range(r["steps"]):
        idx = torch.randint(n, (r["batch"],), generator=g)  # (b,)
        drop = (torch.rand(r["batch"], generator=g) < r["drop_carry"])[:, None]  # (b, 1)
        x = torch.where(drop, ids[1][idx], ids[0][idx])  # (b, L)
        y = torch.where(drop, labels[1][idx], labels[0][idx])  # (b, L)
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    tmp = path + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.replace(tmp, path)
    print(f"built {name} in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Data and prompts

DATASETS = ("gsm8k", "math", "toy")
BOXED_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def load_data(name: str, split: str) -> list:
    """[{question, answer}] for split 'train' or 'eval'. gsm8k: openai/gsm8k main (train/test);
    math: MATH train (the lighteval copy) and MATH-500 for eval; toy; or a .jsonl path with
    question/answer fields (a GSM8K-style '... #### n' answer is cut to n)."""
    if name == "toy":
        return [dict(question=f"{a:02d}+{b:02d}", answer=str(a + b)) for a, b in toy_problems(split)]
    if name.endswith(".jsonl") or os.path.exists(name):
        if not os.path.isfile(name):
            die(f"dataset file '{name}' does not exist")
        rows = []
        with open(name) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    rows.append(dict(question=str(r["question"]), answer=gold_answer(str(r["answer"]))))
                except (json.JSONDecodeError, KeyError, TypeError):
                    die(f"{name}:{n}: each line must be a JSON object with 'question' and 'answer'")
        if not rows:
            die(f"dataset file '{name}' holds no rows")
        return rows
    if name not in DATASETS:
        die(f"unknown dataset '{name}': use one of {', '.join(DATASETS)} or a path to a .jsonl file "
            "with 'question' and 'answer' fields")
    from datasets import load_dataset
    try:
        if name == "gsm8k":
            ds = load_dataset("openai/gsm8k", "main", split="train" if split == "train" else "test")
            return [dict(question=r["question"], answer=gold_answer(r["answer"])) for r in ds]
        if split == "train":
            ds = load_dataset("DigitalLearningGmbH/MATH-lighteval", split="train")
            return [dict(question=r["problem"], answer=last_boxed(r["solution"]) or "") for r in ds]
        ds = load_dataset("HuggingFaceH4/MATH-500", split="test")
        return [dict(question=r["problem"], answer=r["answer"]) for r in ds]
    except Exception as e:  # datasets raises many types when offline
        die(f"cannot load dataset '{name}' ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            "offline, use --dataset toy or a local .jsonl file")


def prompt_instruction(dataset: str) -> str:
    """What the prompt asks for, so the reward can parse it: a \\boxed{} answer for real data;
    the toy's answer is the bare number after '='."""
    return "" if dataset == "toy" else BOXED_INSTRUCTION


def format_prompt(tok, question: str, dataset: str) -> str:
    """The tokenizer's chat template when it has one (Qwen base and Instruct both do; so does the
    toy's), otherwise a plain 'Question: ... Answer:' template."""
    content = question + prompt_instruction(dataset)
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template([dict(role="user", content=content)], tokenize=False,
                                       add_generation_prompt=True)
    return f"Question: {content}\nAnswer:"


class PromptSampler:
    """Questions without replacement, reshuffled each epoch, from a seeded generator (resumable)."""

    def __init__(self, rows: list, seed: int):
        self.rows, self.rng, self.order = rows, random.Random(seed), []

    def next(self, n: int) -> list:
        out = []
        while len(out) < n:
            if not self.order:
                self.order = list(range(len(self.rows)))
                self.rng.shuffle(self.order)
            out.append(self.rows[self.order.pop()])
        return out

    def state_dict(self):
        return dict(rng=self.rng.getstate(), order=list(self.order))

    def load_state_dict(self, s):
        self.rng.setstate(s["rng"])
        self.order = list(s["order"])


# ----------------------------------------------------------------------------------------------
# Answers and rewards


def last_boxed(text: str) -> Optional[str]:
    """Contents of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    j = text.find("{", i)
    if j < 0:
        return None
    depth = 0
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j + 1:k]
    return None


NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def gold_answer(text: str) -> str:
    """A GSM8K-style solution ('... #### 72') gives the text after ####; anything else as it is."""
    return text.split("####")[-1].strip() if "####" in text else text.strip()


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a completion: the last \\boxed{}, else the text after the last ####,
    else the last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        return text.split("####")[-1].strip().split("\n")[0].strip()
    nums = NUMBER.findall(text)
    return nums[-1] if nums else None


def normalize_answer(s: str) -> str:
    """'$1,000.00', '1000', '1000.0' and '\\$1000' all become '1000'; LaTeX wrappers are dropped."""
    s = s.strip().strip(".").replace("\\!", "").replace("\\,", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("dfrac", "frac").replace("tfrac", "frac")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\%", "").replace("%", "")
    s = s.replace(" ", "")
    num = s.replace(",", "")
    try:
        x = float(num)
        return str(int(x)) if x == int(x) else repr(x)
    except (ValueError, OverflowError):
        return s


def is_correct(completion: str, gold: str) -> bool:
    pred = extract_answer(completion)
    return pred is not None and normalize_answer(pred) == normalize_answer(gold)


class Scores(NamedTuple):
    """What grading a batch of completions gives the training loop."""
    reward: torch.Tensor   # (B,) float: correctness plus the format bonus
    correct: torch.Tensor  # (B,) bool: the final answer is right (the bonus alone never counts)
    grade_errors: int      # completions whose grading failed (scored as wrong)


def rewards_for(completions: list, golds: list, format_coef: float = 0.0) -> Scores:
    """Reward 1 for a correct final answer, plus `format_coef` when the answer is given in the
    asked-for form (\\boxed{} or ####). A completion whose grading raises scores 0 and is counted."""
    correct, errors = [], 0
    for c, g in zip(completions, golds):
        try:
            correct.append(is_correct(c, g))
        except Exception:  # a strange completion must never stop a run
            correct.append(False)
            errors += 1
    fmt = [float(last_boxed(c) is not None or "####" in c) for c in completions]
    correct = torch.tensor(correct, dtype=torch.bool)
    return Scores(correct.float() + format_coef * torch.tensor(fmt), correct, errors)


# ----------------------------------------------------------------------------------------------
# Sampling


@dataclass
class Rollout:
    """B = prompts x G rows. Prompts are left-padded; the completion mask covers each completion
    up to and including its first EOS."""
    prompt_ids: torch.Tensor      # (B, P)
    prompt_mask: torch.Tensor     # (B, P)
    completion_ids: torch.Tensor  # (B, T)
    mask: torch.Tensor            # (B, T) float
    lengths: torch.Tensor         # (B,) tokens in each completion, EOS included
    texts: list                   # B decoded completions

    def input_ids(self):
        return torch.cat([self.prompt_ids, self.completion_ids], 1)  # (B, P+T)

    def attention_mask(self):
        return torch.cat([self.prompt_mask, self.mask.long()], 1)  # (B, P+T)

    def select(self, idx: torch.Tensor) -> "Rollout":
        """The rows `idx`, padding columns that no kept row uses are trimmed."""
        il = idx.tolist()
        T = int(self.lengths[idx].max()) if len(il) else 0
        return Rollout(self.prompt_ids[idx], self.prompt_mask[idx], self.completion_ids[idx, :T],
                       self.mask[idx, :T], self.lengths[idx], [self.texts[i] for i in il])


def completion_mask(completion_ids: torch.Tensor, eos: list):
    """(B, T) mask and (B,) lengths from the position of the first EOS (included)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos, device=completion_ids.device))  # (B, T)
    T = completion_ids.shape[1]
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(is_eos[:, 0], T, dtype=torch.long))
    lengths = torch.clamp(first + 1, max=T)  # (B,)
    mask = (torch.arange(T, device=completion_ids.device)[None] < lengths[:, None]).float()  # (B, T)
    return mask, lengths


@torch.no_grad()
def sample(model, tok, prompts: list, group_size: int, max_new_tokens: int, temperature: float = 1.0,
           greedy: bool = False) -> Rollout:
    """Batched generation with the KV cache: each prompt `group_size` times, rows of a group
    adjacent. Every sampling setting is passed explicitly (T, top_p = 1, top_k = 0, no repetition
    penalty, ...), so a model's generation_config cannot change the distribution silently: the
    samples are from softmax(logits / T), as on-policy estimators assume."""
    from transformers import GenerationConfig

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    prompt_ids = enc.input_ids.repeat_interleave(group_size, 0)  # (B, P)
    prompt_mask = enc.attention_mask.repeat_interleave(group_size, 0)  # (B, P)
    eos = eos_ids(model, tok)
    # greedy ignores the sampling knobs; 50 is the top_k that transformers does not warn about then
    knobs = dict(temperature=1.0 if greedy else temperature, top_p=1.0, top_k=50 if greedy else 0, min_p=None,
                 typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
    gen = GenerationConfig(
        do_sample=not greedy, **knobs, repetition_penalty=1.0, no_repeat_ngram_size=0,
        max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=eos, pad_token_id=tok.pad_token_id,
        num_beams=1, use_cache=True)
    with autocast(device), gathered(model):  # FSDP: ranks step together until the last one is done
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen,
                             synced_gpus=is_sharded(model))
    completion_ids = out[:, prompt_ids.shape[1]:]  # (B, T)
    mask, lengths = completion_mask(completion_ids, eos)
    completion_ids = completion_ids.masked_fill(mask == 0, tok.pad_token_id)
    texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
    model.train(was_training)
    return Rollout(prompt_ids, prompt_mask, completion_ids, mask, lengths, texts)


# ----------------------------------------------------------------------------------------------
# Per-token log-probs of the sampled tokens


def _lm_head(h, w, temperature: float, vocab: Optional[int]):
    logits = (h @ w.T).float()  # (n, V)
    if vocab is not None:
        logits = logits[:, :vocab]
    if temperature != 1.0:  # a (n, V) copy: skipped at T = 1, the on-policy default
        logits = logits / temperature
    return logits


def _chunk_logprobs(h, y, w, temperature: float, vocab: Optional[int], with_entropy: bool):
    logits = _lm_head(h, w, temperature, vocab)  # (n, V)
    lse = torch.logsumexp(logits, -1)  # (n,)
    logp = logits.gather(-1, y[:, None]).squeeze(-1) - lse  # (n,)
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        p = torch.softmax(logits, -1)
        ent = lse - (p * logits).sum(-1)  # (n,)
    return logp, ent


def map_chunks(fn, rows: tuple, chunk_size: int, *consts):
    """fn(*chunk of each tensor in `rows`, *consts) -> tuple of per-row tensors (or None), run on
    `chunk_size` rows at a time under `autocast` and concatenated. With grad, each chunk is
    recomputed in backward (activation checkpointing): only the inputs are kept, never the (n, V)
    logits a chunk makes. The one chunk loop of the log-prob and full-vocabulary passes."""
    n, outs = len(rows[0]), []
    with autocast(rows[0].device):
        for s in range(0, max(n, 1), chunk_size):  # no rows: one empty chunk, outputs of length 0
            args = (*(r[s:s + chunk_size] for r in rows), *consts)
            if torch.is_grad_enabled() and any(torch.is_tensor(a) and a.requires_grad for a in args):
                outs.append(checkpoint(fn, *args, use_reentrant=False))
            else:
                outs.append(fn(*args))
    return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*outs))


def last_hidden_state(model, ids, attn, pos) -> torch.Tensor:
    """The decoder's output (B, S, D), taken by a hook during the model's own forward, so that the
    model's hooks run (FSDP gathers parameters in them), with logits at no position and no KV cache."""
    out = []
    hook = model.get_decoder().register_forward_hook(lambda module, args, o: out.append(o.last_hidden_state))
    try:
        model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False,
              logits_to_keep=torch.zeros(0, dtype=torch.long, device=ids.device))
    finally:
        hook.remove()
    return out[0]


def completion_states(model, rollout: Rollout):
    """(h, w): the decoder's state before each completion token, (B*T, D) row-major over (B, T), and
    the LM head (V, D), read after the forward (FSDP has gathered it). One forward, no logits: what
    the chunked passes (`token_logprobs`, `paired_logits`) turn into logits a chunk at a time."""
    ids, attn = rollout.input_ids(), rollout.attention_mask()  # (B, P+T)
    B, T = rollout.completion_ids.shape
    pos = (attn.cumsum(1) - 1).clamp(min=0)  # (B, P+T) left padding shifts positions
    with autocast(ids.device):
        h = last_hidden_state(model, ids, attn, pos)  # (B, P+T, D)
    return h[:, -T - 1:-1].reshape(B * T, -1), model.get_output_embeddings().weight  # (B*T, D), (V, D)


def token_logprobs(model, rollout: Rollout, temperature: float = 1.0, chunk_size: int = 1024,
                   vocab_size: Optional[int] = None, with_entropy: bool = False, states=None):
    """log pi(o_t | q, o_<t) of each completion token at the sampling temperature, (B, T).

    The full (B, T, V) logits are never held: the LM head runs on `chunk_size` positions at a
    time and gives z_y - logsumexp(z) (151,936 fp32 logits are 0.6 MB a position). With grad,
    each chunk is recomputed in backward (activation checkpointing), so training keeps only the
    hidden states. `vocab_size` slices the logits (a 7B Qwen has 152,064 rows, a 0.5B 151,936).
    `states`: this model's `completion_states(model, rollout)` when the caller has them already
    (a full-vocabulary term on the same forward), else the forward runs here."""
    B, T = rollout.completion_ids.shape
    h, w = completion_states(model, rollout) if states is None else states  # (B*T, D), (V, D)
    y = rollout.completion_ids.reshape(B * T)  # (B*T,)
    logp, ent = map_chunks(_chunk_logprobs, (h, y), chunk_size, w, temperature, vocab_size, with_entropy)
    return (logp.view(B, T), ent.view(B, T)) if with_entropy else logp.view(B, T)


def _paired_chunk(h, h_other, w, w_other, temperature: float, vocab: Optional[int], fn):
    logits = _lm_head(h, w, temperature, vocab)  # (n, V)
    with torch.no_grad():  # the other model is frozen here (a teacher, or the partner of the moment)
        other = _lm_head(h_other, w_other, temperature, vocab)  # (n, V)
    return fn(logits, other)


def paired_logits(fn, states, other_states, chunk_size: int, temperature: float = 1.0,
                  vocab_size: Optional[int] = None):
    """fn(logits (n, V), other_logits (n, V)) -> tuple of (n,) tensors, for two models' full
    distributions at the same positions (`completion_states` of each, rows selected alike), with
    the memory of the log-prob pass: `chunk_size` positions at a time, the other model under
    no_grad. Returns fn's outputs concatenated over the N positions, (N,) each."""
    (h, w), (h_other, w_other) = states, other_states
    return map_chunks(_paired_chunk, (h, h_other), chunk_size, w, w_other, temperature, vocab_size, fn)


def naive_token_logprobs(model, rollout: Rollout, temperature: float = 1.0):
    """The reference implementation the chunked one is tested against: full log_softmax."""
    ids, attn = rollout.input_ids(), rollout.attention_mask()
    T = rollout.completion_ids.shape[1]
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).logits[:, -T - 1:-1].float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, rollout.completion_ids[..., None]).squeeze(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def micro_batches(n: int, size: int):
    """Index tensors that split n rows into micro-batches of at most `size`."""
    return [torch.arange(s, min(s + size, n)) for s in range(0, n, size)]


# ----------------------------------------------------------------------------------------------
# Divergences
#
# KL estimators on tokens sampled from p = pi_theta, with log_ratio = log q - log p (q: reference
# or teacher); Schulman, "Approximating KL divergence" (2020):
#   k1 = -log_ratio             unbiased value of KL(p||q); as a loss its expected gradient is 0
#   k2 = log_ratio^2 / 2        biased value; as a loss its expected gradient is grad KL(p||q)
#   k3 = e^r - r - 1            unbiased value of KL(p||q), >= 0; as a loss its expected
#                               gradient is grad KL(q||p), the FORWARD KL


def kl_k1(log_ratio):
    return -log_ratio


def kl_k2(log_ratio):
    return 0.5 * log_ratio ** 2


def kl_k3(log_ratio):
    return torch.exp(log_ratio) - log_ratio - 1


KL_ESTIMATORS = dict(k1=kl_k1, k2=kl_k2, k3=kl_k3)


def full_kl(logits, other_logits):
    """Exact divergences between two full distributions p = softmax(logits) and q =
    softmax(other_logits), row by row: (KL(p||q), KL(q||p), H(p), H(q)), (n,) each. A `fn` of
    `paired_logits`: the gradient flows through p only."""
    logp, logq = torch.log_softmax(logits, -1), torch.log_softmax(other_logits, -1).detach()  # (n, V)
    p, q = logp.exp(), logq.exp()  # (n, V)
    ent_p, ent_q = -(p * logp).sum(-1), -(q * logq).sum(-1)  # (n,)
    kl_p_q = -ent_p - (p * logq).sum(-1)  # (n,) sum_v p (log p - log q)
    kl_q_p = -ent_q - (q * logp).sum(-1)  # (n,) sum_v q (log q - log p)
    return kl_p_q, kl_q_p, ent_p, ent_q

# f-divergences D_f(q||p) = E_{y~p}[f(u)], u = q(y)/p(y) (ALGORITHMS.md section 4): (f, f').
DIVERGENCES = ("rkl", "fkl", "jsd", "tv", "alpha")


def f_divergence(name: str, alpha: float = 0.5):
    """(f, f_prime) of the named divergence, both elementwise on a tensor u > 0."""
    if name == "rkl":  # KL(p||q)
        return (lambda u: -torch.log(u)), (lambda u: -1.0 / u)
    if name == "fkl":  # KL(q||p)
        return (lambda u: u * torch.log(u)), (lambda u: torch.log(u) + 1.0)
    if name == "jsd":  # half form: JSD(q, p) with weights 1/2
        return ((lambda u: 0.5 * (u * torch.log(u) - (1 + u) * torch.log((1 + u) / 2))),
                (lambda u: 0.5 * (torch.log(u) - torch.log((1 + u) / 2))))
    if name == "tv":
        return (lambda u: 0.5 * (u - 1).abs()), (lambda u: 0.5 * torch.sign(u - 1))
    if name == "alpha":
        if alpha in (0.0, 1.0):
            die("--alpha must not be 0 or 1 (those limits are fkl and rkl)")
        a = alpha
        return ((lambda u: (u ** (1 - a) - (1 - a) * u - a) / (a * (a - 1))),
                (lambda u: (1 - u ** (-a)) / a))
    die(f"unknown divergence '{name}': use one of {', '.join(DIVERGENCES)}")


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, tok, rows: list, dataset: str, max_new_tokens: int, batch_size: int = 64, ece_bins: int = 0):
    """Greedy pass@1: the fraction of `rows` whose greedy completion has the gold answer. Under
    torchrun each rank answers its share and the counts are summed. `ece_bins` > 0: (accuracy, ECE),
    the expected calibration error of the greedy answer's confidence over that many equal-width
    bins, sum_b |sum_{i in b} (c_i - 1[correct_i])| / N, with c_i the probability (T = 1) of the
    whole greedy completion: on the toy that is the answer's digits and EOS; after a reasoning
    chain it is not an answer confidence (the chain's probability is tiny whatever the answer)."""
    if not rows:
        return (float("nan"), float("nan")) if ece_bins else float("nan")
    mine = rows[rank()::world_size()]
    per_rank = -(-len(rows) // world_size())
    mine += [None] * (per_rank - len(mine))  # FSDP: every rank makes as many generate calls (None: not counted)
    device = next(model.parameters()).device
    correct, gap = 0, torch.zeros(max(ece_bins, 1), dtype=torch.float64, device=device)  # (bins,) sum of c - correct
    for s in range(0, len(mine), batch_size):
        part = mine[s:s + batch_size]
        ro = sample(model, tok, [format_prompt(tok, (r or rows[0])["question"], dataset) for r in part], 1,
                    max_new_tokens, greedy=True)
        right = [r is not None and is_correct(t, r["answer"]) for t, r in zip(ro.texts, part)]
        correct += sum(right)
        if ece_bins:
            conf = torch.exp((token_logprobs(model, ro) * ro.mask).sum(1)).double()  # (b,)
            counted = torch.tensor([r is not None for r in part], device=device)  # (b,)
            b = (conf * ece_bins).long().clamp(max=ece_bins - 1)  # (b,)
            gap.index_add_(0, b[counted], (conf - torch.tensor(right, device=device, dtype=torch.float64))[counted])
    acc = float(all_sum(torch.tensor(float(correct), device=device))) / len(rows)
    return (acc, float(all_sum(gap).abs().sum()) / len(rows)) if ece_bins else acc


# ----------------------------------------------------------------------------------------------
# Output directory, metrics, checkpoints


def prepare_out(args, script: str) -> str:
    """DIR for this run. Refuse a directory that holds another run unless --resume. Rank 0 decides
    and writes; the other ranks get its answer."""
    out = args.out or os.path.join("runs", f"{script}-{time.strftime('%Y%m%d-%H%M%S')}")
    if dist.is_initialized():
        box = [out]
        dist.broadcast_object_list(box, src=0)
        if rank() != 0:
            return box[0]
    occupied = os.path.exists(os.path.join(out, "metrics.jsonl")) or os.path.exists(os.path.join(out, "checkpoint"))
    if args.resume and not os.path.exists(os.path.join(out, "checkpoint", "state.pt")):
        die(f"--resume: no checkpoint in '{out}/checkpoint' to resume from")
    if occupied and not args.resume:
        die(f"'{out}' already holds a run: pass --resume to continue it, or choose another --out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(args), f, indent=2)
    return out


class Logger:
    """metrics.jsonl, appended and flushed line by line. On resume at step s, lines after s (from
    steps after the last checkpoint) are dropped, so no step is lost or repeated. Only rank 0 writes."""

    def __init__(self, out: str, resume_step: Optional[int] = None):
        self.f = None
        if rank() != 0:
            return
        self.path = os.path.join(out, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                keep = [l for l in f if l.strip() and json.loads(l)["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(keep)
        self.f = open(self.path, "a")

    def log(self, step: int, metrics: dict):
        if self.f is None:
            return
        row = {"step": step}
        row.update({k: (float(v) if isinstance(v, (torch.Tensor, np.floating)) else v) for k, v in metrics.items()})
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def close(self):
        if self.f is not None:
            self.f.close()


def save_pretrained(model, tok, path: str):
    """`save_pretrained` of a model and its tokenizer, loadable by `load_model`. Every rank calls it:
    FSDP first gathers the shards (on CPU, rank 0's copy only); rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model)  # FSDP: the model holds its shards again (the root stays gathered after a forward)
    state = None
    if is_sharded(model):
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        first = {}  # the gathered copies of a tied weight are separate tensors: keep its first name only
        for name, p in model.named_parameters(remove_duplicate=False):
            if first.setdefault(id(p), name) != name:
                state.pop(name, None)
    if rank() == 0:
        model.save_pretrained(path, state_dict=state)
        tok.save_pretrained(path)


def save_checkpoint(out: str, step: int, models: dict, optimizers: dict, sampler: PromptSampler):
    """DIR/checkpoint: each model (save_pretrained), optimizer states (keyed by parameter name, so
    that data-parallel and FSDP runs read each other's), every rank's RNG states, the step. Written
    to a temporary directory first, so a kill mid-save keeps the previous checkpoint. Every rank
    calls it (FSDP gathers shards, RNG states are gathered); rank 0 writes. The keys of
    `optimizers` are keys of `models` (name: (model, tokenizer))."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    rng = dict(torch=torch.get_rng_state(), np=np.random.get_state(), py=random.getstate(),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    rngs = [rng]
    if dist.is_initialized():
        rngs = [None] * world_size() if rank() == 0 else None
        dist.gather_object(rng, rngs, dst=0)
    tmp, final = os.path.join(out, "checkpoint.tmp"), os.path.join(out, "checkpoint")
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    for name, (model, tok) in models.items():
        save_pretrained(model, tok, os.path.join(tmp, name))  # also reshards: the optimizers' parameters
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optimizer_states = {k: get_optimizer_state_dict(models[k][0], o, options=full) for k, o in optimizers.items()}
    if rank() != 0:
        return
    state = dict(step=step, optimizers=optimizer_states, sampler=sampler.state_dict(), rng=rngs)
    torch.save(state, os.path.join(tmp, "state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def load_checkpoint(out: str, models: dict, optimizers: dict, sampler: PromptSampler) -> int:
    """Restore optimizer, sampler and RNG states; return the step the checkpoint was taken at.
    (The models are loaded from DIR/checkpoint/<name> by the script; `models`: name: model.)"""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(os.path.join(out, "checkpoint", "state.pt"), weights_only=False, mmap=True)
    if len(state["rng"]) != world_size():
        die(f"the checkpoint in '{out}' was written by {len(state['rng'])} processes: resume with as many "
            f"(now {world_size()})")
    for k, o in optimizers.items():
        set_optimizer_state_dict(models[k], o, state["optimizers"][k], options=StateDictOptions(full_state_dict=True))
    sampler.load_state_dict(state["sampler"])
    rng = state["rng"][rank()]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["np"])
    random.setstate(rng["py"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["step"]


def save_final(out: str, models: dict):
    """DIR/final (one model) or DIR/final/<name>. Every rank calls it; rank 0 writes."""
    for name, (model, tok) in models.items():
        save_pretrained(model, tok, os.path.join(out, "final", name) if name else os.path.join(out, "final"))


def check_finite(loss: torch.Tensor, step: int, out: str):
    """Stop every rank on a NaN or inf loss (the step's loss summed over ranks)."""
    loss = all_sum(loss.detach())
    if not torch.isfinite(loss):
        die(f"loss is {loss.item()} at step {step}; stopping. The last checkpoint is in '{out}/checkpoint'")


class Timer:
    """Wall time of a block, synchronising CUDA so that GPU work is counted where it happens."""

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
