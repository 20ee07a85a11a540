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
import fractions
import functools
import json
import logging
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
import threading
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
    title = " ".join((sys.modules["__main__"].__doc__ or "").strip().split("\n\n")[0].split())  # the first paragraph
    p = argparse.ArgumentParser(description=title,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(cls):
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        toy = "" if meta.get("toy") is None else f"; toy models: {meta['toy']}"
        help = meta.get("help", "")
        if "(default:" not in help:  # a field may say its default in words
            help += f" (default: {f.default}{toy})"
        help = help.replace("%", "%%")
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
        if "dataset" not in given and hasattr(args, "dataset"):  # the first model's own: toy or toy-hard
            args.dataset = TOY_MODELS[names[0]]
    return args


def check_common_args(args):
    """The mistakes every script can make, each as one line."""
    if args.group_size < 2:
        die(f"--group-size must be at least 2 (got {args.group_size}): "
            "group-relative advantages need two completions to compare")
    for name, least in (("steps", 0), ("eval_size", 0), ("pass_n", 0), ("threads", 0), ("prompts_per_step", 1), ("max_new_tokens", 1),
                        ("micro_batch_size", 1)):
        if getattr(args, name) < least:
            die(f"--{name.replace('_', '-')} must be {'non-negative' if least == 0 else 'positive'} "
                f"(got {getattr(args, name)})")
    ks = parse_pass_k(args.pass_k)
    if args.pass_n > 0 and (not ks or not all(1 <= k <= args.pass_n for k in ks)):
        die(f"--pass-k {args.pass_k}: each k must be between 1 and --pass-n ({args.pass_n}), the answers sampled "
            "per question")
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


def init_distributed(name: str = "auto", threads: int = 0) -> torch.device:
    """The device of this process, and its CPU threads (`threads` > 0; 0 keeps torch's default, one
    per core). Under torchrun (WORLD_SIZE > 1) it also joins the process group: NCCL with one GPU
    per process (LOCAL_RANK) on CUDA, gloo on CPU."""
    if threads > 0:
        torch.set_num_threads(threads)
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


def std_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The unbiased std of the elements of every rank's x taken together (x.std() in one process):
    two passes over ranks, the mean first, then the squared deviations from it."""
    n = all_sum(torch.tensor(float(x.numel()), device=x.device, dtype=x.dtype))
    mean = all_sum(x.sum()) / n
    return (all_sum(((x - mean) ** 2).sum()) / (n - 1)).sqrt()


def apply_fsdp(model, device: torch.device):
    """FSDP2 over all ranks: one unit per decoder layer, the rest (embeddings, final norm, LM head:
    one tensor when tied, as in Qwen2.5 0.5B-3B) in the root unit. The model comes on the CPU:
    fully_shard moves one unit at a time to `device` and keeps this rank's shard, so the whole model
    never sits on one GPU. On CUDA the gathered weights are bf16 (what autocast would make of them)
    and gradients are reduced in fp32. A no-op in one process."""
    if world_size() == 1:
        return model.to(device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if uses_bf16(device)
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


BF16_DEVICES = ("cuda",)  # where matmuls run in bf16 and frozen models are stored in bf16 (tests add "cpu")


def uses_bf16(device: torch.device) -> bool:
    return device.type in BF16_DEVICES


def autocast(device: torch.device):
    """Mixed precision on CUDA: trained weights (and AdamW states) stay fp32, matmuls run in bf16.
    Pure bf16 weights would round updates of lr 1e-6 away. The LM head and log-softmax of the
    log-prob pass run in fp32 all the same (`_chunk_logprobs`)."""
    if uses_bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def rope_in_autocast_dtype(module, args, out):
    """Forward hook of the rotary embedding: under autocast, cos and sin in the autocast dtype. They
    come in the embeddings' dtype (fp32 master weights), and q * cos would promote the rotated keys
    to fp32: the KV cache would hold fp32 keys beside bf16 values, 1.5x the bf16 cache."""
    device = out[0].device.type
    if not torch.is_autocast_enabled(device):
        return out
    return tuple(o.to(torch.get_autocast_dtype(device)) for o in out)


# ----------------------------------------------------------------------------------------------
# Models and tokenizers

TOY_MODELS = {"toy-small": "toy", "toy-large": "toy", "toy-hard-small": "toy-hard", "toy-hard-large": "toy-hard"}  # name: its dataset


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
    Trained models keep fp32 master weights; `frozen` ones are `freeze`d and, on CUDA, read in bf16
    (never a full fp32 copy); compute runs under `autocast`. `fsdp`: sharded over the ranks
    (`apply_fsdp`) before the whole model reaches the device; build the optimizer after this, on
    the sharded parameters. `model.published_dtype` is the dtype of the weights as published (the
    config's), which the final model is saved in."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per run: ours
    path = toy_path(name) if is_toy(name) else resolve_model_name(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        published = AutoConfig.from_pretrained(path).dtype or torch.float32  # from_pretrained overwrites it
        dtype = torch.bfloat16 if frozen and uses_bf16(device) else torch.float32
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        hub = "" if os.path.isdir(path) else (
            "; the hub is unreachable from here" if not hub_reachable() else "")
        die(f"cannot load model '{name}': not a toy model ({', '.join(TOY_MODELS)}), a local "
            f"directory written by save_pretrained, or a hub id that loads{hub} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    tok.padding_side = "left"  # batched generation appends after the prompt
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.published_dtype = getattr(torch, published) if isinstance(published, str) else published
    rope = getattr(model.get_decoder(), "rotary_emb", None)
    if rope is not None:
        rope.register_forward_hook(rope_in_autocast_dtype)  # bf16 keys in the KV cache
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))
    if frozen:
        freeze(model)
    return (apply_fsdp(model, device) if fsdp else model.to(device)), tok


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no", "off"):
        return False
    import socket
    from urllib.parse import urlparse
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def end_of_turn_id(tok) -> Optional[int]:
    """The token the chat template writes right after an assistant message, when it is an added
    token (Qwen: <|im_end|>, Llama 3: <|eot_id|>); None without a template or such a token."""
    if not getattr(tok, "chat_template", None):
        return None
    mark = "ANSWER-END-MARK"
    try:
        text = tok.apply_chat_template([dict(role="user", content="Q"), dict(role="assistant", content=mark)],
                                       tokenize=False)
    except Exception:  # a template may refuse this conversation: then it names no end of turn
        return None
    after = text.split(mark, 1)[1] if isinstance(text, str) and mark in text else ""
    ids = tok(after, add_special_tokens=False).input_ids if after else []
    return ids[0] if ids and ids[0] in tok.get_added_vocab().values() else None


HUB_DATASETS = {"gsm8k": ("openai/gsm8k",), "math": ("DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500")}  # load_data reads these


def check_available(models: list, dataset: str):
    """Before anything is loaded: when the hub cannot be reached, every model must be a toy, a local
    directory or in the local Hugging Face cache, and a gsm8k/math dataset in the datasets cache;
    otherwise one line names all that is missing and how to get it (the hub client would retry
    for a minute, then name only the first). Offline, HF_HUB_OFFLINE=1 is set for the rest of the
    run, so that cached files load without a request. With the hub reachable, nothing is checked:
    whatever is missing is downloaded as usual."""
    hub_models = [resolve_model_name(m) for m in models if not (is_toy(m) or os.path.isdir(m))]
    if not hub_models and dataset not in HUB_DATASETS:
        return
    if hub_reachable():
        return
    os.environ["HF_HUB_OFFLINE"] = "1"  # read by huggingface_hub and datasets when they are imported
    from huggingface_hub import constants, try_to_load_from_cache
    constants.HF_HUB_OFFLINE = True  # in case they were imported already
    models = [m for m in hub_models if not isinstance(try_to_load_from_cache(m, "config.json"), str)]
    datasets_cache = os.environ.get("HF_DATASETS_CACHE", os.path.join(constants.HF_HOME, "datasets"))
    repos = HUB_DATASETS.get(dataset, ())
    data = any(not os.path.isdir(os.path.join(datasets_cache, r.replace("/", "___"))) for r in repos)
    if models or data:
        missing = [f"model '{m}'" for m in models] + ([f"dataset {dataset} ({', '.join(repos)})"] if data else [])
        get = [f"`hf download {m}`" for m in models] + (["one run of this command for the dataset"] if data else [])
        die(f"not in the local cache (the hub is unreachable: HF_HUB_OFFLINE=1 or no network; HF_HOME={constants.HF_HOME}): "
            f"{', '.join(missing)}. Where the hub is reachable, {'; '.join(get)}; then run here with HF_HUB_OFFLINE=1 "
            f"and the same HF_HOME. Or pass a local directory written by save_pretrained as the model, a .jsonl "
            f"file (question/answer) as --dataset, or the toy world (toy-small, toy-large, --dataset toy)")


def eos_ids(model, tok) -> list:
    """Every id that ends a completion: the tokenizer's EOS, the generation_config's and the chat
    template's end of turn. Prompts use the chat template, so a base model (whose EOS is
    <|endoftext|> only) that closes its turn with <|im_end|> must stop there too, not write and
    answer a question of its own."""
    ids = {tok.eos_token_id, end_of_turn_id(tok)}
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


def warn_if_smaller(teacher, student, teacher_name: str, student_name: str, role: str = "teacher"):
    """A teacher with fewer parameters than its student runs (a weak teacher is a legitimate
    experiment), with one warning line, since swapped flags are the likelier cause."""
    n_teacher, n_student = (sum(p.numel() for p in m.parameters()) for m in (teacher, student))
    if n_teacher < n_student:
        print(f"warning: the {role} '{teacher_name}' has fewer parameters than '{student_name}' "
              f"({n_teacher / 1e6:.2f}M < {n_student / 1e6:.2f}M); were the two swapped?", file=sys.stderr, flush=True)


def freeze(model):
    """A frozen model (teacher, reference): eval mode, no grads (`load_model` reads it in bf16 on CUDA)."""
    model.eval()
    model.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------
# The toy world: tiny Qwen2-architecture models on addition, shipped in toy/<name>/.
#
# toy (toy-small, toy-large): "a+b" with a, b in 0..99, answered at a fixed width ("05+68=073",
# then EOS). toy-hard (toy-hard-small, toy-hard-large): "a+b" with a, b in 0..999 and a + b >= 1000
# ("417+817=1234"), where the small model is rarely right. Held out: 500 fixed questions each. The
# models are loaded like any local directory, so every machine starts from the same weights;
# toy/build.py is the recipe that made them (and rebuilds and compares).

TOY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy")
TOY_EVAL_PAIRS = 500


def toy_problems(split: str):
    """All (a, b) pairs, 0..99 each: 500 fixed ones are the eval split, the rest train."""
    pairs = [(a, b) for a in range(100) for b in range(100)]
    random.Random(1234).shuffle(pairs)
    return pairs[:TOY_EVAL_PAIRS] if split == "eval" else pairs[TOY_EVAL_PAIRS:]


TOY_HARD_TRAIN = 50_000


def toy_hard_problems(split: str):
    """(a, b) pairs, 0..999 each, whose sum reaches 1000 (the last column carries), drawn once with a
    fixed seed: 500 for eval, the next TOY_HARD_TRAIN for training."""
    rng, seen, pairs = random.Random(4321), set(), []
    while len(pairs) < TOY_EVAL_PAIRS + TOY_HARD_TRAIN:
        ab = (rng.randrange(1000), rng.randrange(1000))
        if ab not in seen and sum(ab) >= 1000:
            seen.add(ab)
            pairs.append(ab)
    return pairs[:TOY_EVAL_PAIRS] if split == "eval" else pairs[TOY_EVAL_PAIRS:]


def toy_path(name: str) -> str:
    path = os.path.join(TOY_DIR, name)
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        die(f"the toy model '{name}' is missing from {path}: it ships with the repository (restore it with "
            f"`git checkout -- toy/`, or rebuild it with `python toy/build.py {name} --write`)")
    return path


# ----------------------------------------------------------------------------------------------
# Data and prompts

DATASETS = ("gsm8k", "math", "toy", "toy-hard")
BOXED_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def load_data(name: str, split: str) -> list:
    """[{question, answer}] for split 'train' or 'eval'. gsm8k: openai/gsm8k main (train/test);
    math: MATH train (the lighteval copy, config default) and MATH-500 for eval; toy; or a .jsonl
    path with question/answer fields (a GSM8K-style '... #### n' answer is cut to n). Rows whose
    gold answer is empty (a MATH solution without \\boxed{}) are dropped: any answer would match
    nothing, and an empty one must never earn the reward."""
    if name == "toy":
        return [dict(question=f"{a:02d}+{b:02d}", answer=str(a + b)) for a, b in toy_problems(split)]
    if name == "toy-hard":
        return [dict(question=f"{a:03d}+{b:03d}", answer=str(a + b)) for a, b in toy_hard_problems(split)]
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
                    q, a = r["question"], r["answer"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    die(f"{name}:{n}: each line must be a JSON object with 'question' and 'answer'")
                if not isinstance(q, str) or not isinstance(a, (str, int, float)) or isinstance(a, bool):
                    die(f"{name}:{n}: 'question' must be a string and 'answer' a string or a number, "
                        f"not {type(q).__name__} and {type(a).__name__}")
                gold = gold_answer(str(a))
                if gold.count("{") != gold.count("}"):
                    die(f"{name}:{n}: the gold answer {gold[:60]!r} cannot be parsed: its braces are unbalanced")
                rows.append(dict(question=q, answer=gold))
        if not rows:
            die(f"dataset file '{name}' holds no rows")
        return drop_empty_golds(rows, name)
    if name not in DATASETS:
        die(f"unknown dataset '{name}': use one of {', '.join(DATASETS)} or a path to a .jsonl file "
            "with 'question' and 'answer' fields")
    from datasets import load_dataset
    try:
        if name == "gsm8k":
            ds = load_dataset(HUB_DATASETS["gsm8k"][0], "main", split="train" if split == "train" else "test")
            rows = [dict(question=r["question"], answer=gold_answer(r["answer"])) for r in ds]
        elif split == "train":
            ds = load_dataset(HUB_DATASETS["math"][0], "default", split="train")
            rows = [dict(question=r["problem"], answer=last_boxed(r["solution"]) or "") for r in ds]
        else:
            ds = load_dataset(HUB_DATASETS["math"][1], "default", split="test")
            rows = [dict(question=r["problem"], answer=r["answer"]) for r in ds]
    except Exception as e:  # datasets raises many types when offline
        die(f"cannot load dataset '{name}' ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            "offline, use --dataset toy or a local .jsonl file")
    return drop_empty_golds(rows, f"{name} {split}")


def drop_empty_golds(rows: list, name: str) -> list:
    kept = [r for r in rows if r["answer"].strip()]
    if len(kept) < len(rows) and rank() == 0:
        print(f"{name}: dropped {len(rows) - len(kept)} of {len(rows)} rows whose gold answer is empty",
              file=sys.stderr)
    if not kept:
        die(f"dataset '{name}' has no row with a gold answer")
    return kept


def prompt_instruction(dataset: str) -> str:
    """What the prompt asks for, so the reward can parse it: a \\boxed{} answer for real data;
    the toy's answer is the bare number after '='."""
    return "" if dataset in ("toy", "toy-hard") else BOXED_INSTRUCTION


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
#
# Graded as the benchmarks grade: the final answer of a completion (last \boxed{}, else after
# ####, else the answer sentence's number) is compared with the gold by an exact match of the
# tidied text, as exact rationals when both are plain numbers or fractions (never through floats:
# '35625' is not '.35625'), and otherwise by math-verify (the grader of TRL and open-r1), with
# the normalisation that reads \frac43, \sqrt2 and units. One CPU-time limit covers each check.

GRADE_TIMEOUT_S = 1.0  # a check taking more CPU seconds than this scores 0 and counts in train/grade_errors
logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout is disabled" warning: the limit is ours


class GradingError(Exception):
    """A completion could not be graded (time limit): scored as wrong and counted."""


class _Deadline(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in sympy or math-verify
    swallows it."""


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


NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")  # 1,072  $18.50  14/3  .5
ANSWER_PHRASE = re.compile(r"answer\s*(?:is\b|:|=)", re.IGNORECASE)
INLINE_MATH = re.compile(r"\s*(?:\$([^$]*\\[^$]*)\$|\\\((.*?)\\\))")  # $...$ holding LaTeX, or \(...\)
THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
DECIMAL = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
RATIO = re.compile(r"(-?)(?:\\frac\{(\d+)\}\{(\d+)\}|\\frac(\d)(\d)|(\d+)/(\d+))")  # \frac{a}{b}  \frac43  a/b


def gold_answer(text: str) -> str:
    """A GSM8K-style solution ('... #### 72') gives the text after ####; anything else as it is."""
    return text.split("####")[-1].strip() if "####" in text else text.strip()


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a completion: the last \\boxed{}; else the first number after the last
    ####, when that line has one (a line without one is a markdown heading); else what follows
    the last 'answer is' / 'answer:' (LaTeX in $...$, or its first number: words or a second
    number after it are no answer); else the last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    text = text.replace("{,}", ",")
    if "####" in text:
        nums = NUMBER.findall(text.split("####")[-1].split("\n")[0])
        if nums:
            return nums[0]
    phrase = list(ANSWER_PHRASE.finditer(text))
    if phrase:
        tail = text[phrase[-1].end():]
        m = INLINE_MATH.match(tail)
        if m:
            return m.group(1) if m.group(1) is not None else m.group(2)
        nums = NUMBER.findall(tail)
        if nums:
            return nums[0]
    nums = NUMBER.findall(text)
    return nums[-1] if nums else None


def tidy_answer(s: str) -> str:
    """What an answer's text means, for the exact match: '$1{,}000.$' and '\\$1,000' become
    '1000'; \\dfrac and \\tfrac are \\frac; \\left, \\right, LaTeX spacing and spaces go."""
    s = s.strip().replace("{,}", ",").replace("\\$", "").replace("$", "")
    for a, b in (("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", ""), ("\\left", ""), ("\\right", ""),
                 ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), (" ", "")):
        s = s.replace(a, b)
    s = s.rstrip(".,")
    return s.replace(",", "") if THOUSANDS.fullmatch(s) else s


def _rational(s: str) -> Optional[fractions.Fraction]:
    """The exact value of a tidied plain number or fraction of integers; None for anything else."""
    if DECIMAL.fullmatch(s):
        return fractions.Fraction(s)
    m = RATIO.fullmatch(s)
    if m is None:
        return None
    a, b = [int(x) for x in m.groups()[1:] if x is not None]
    return fractions.Fraction(-a if m.group(1) else a, b) if b else None


@functools.lru_cache(maxsize=1 << 14)
def _parsed(answer: str):
    """math-verify's reading of one answer (cached: a group's golds repeat, and so do answers).
    Its own timeouts are off (whole seconds, main thread only, and silent): is_correct times."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    return parse("\\boxed{" + answer + "}", [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
                 parsing_timeout=None)


@contextlib.contextmanager
def _time_limit(seconds: float):
    """A signal after `seconds` of the process's CPU time (not wall time: a busy machine must not
    turn right answers into timeouts). Python runs signal handlers only in a process's main thread
    (each torchrun rank is one): in any other thread the check runs without a limit rather than
    failing, as math-verify's own signal.alarm timeouts would."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return
    armed = [True]

    def on_alarm(signum, frame):
        if armed:
            raise _Deadline

    old = signal.signal(signal.SIGVTALRM, on_alarm)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        armed.clear()
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, old)


def is_correct(completion: str, gold: str) -> bool:
    """Whether the completion's final answer equals the gold; an empty gold or answer never does.
    Raises GradingError when the check takes more than GRADE_TIMEOUT_S of CPU time."""
    pred = extract_answer(completion)
    if pred is None:
        return False
    p, g = tidy_answer(pred), tidy_answer(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    p_num, g_num = _rational(p), _rational(g)
    if p_num is not None and g_num is not None:  # exact: '.35625' is not '35625', 2**53 + 1 is not 2**53
        return p_num == g_num
    from math_verify import verify
    try:
        with _time_limit(GRADE_TIMEOUT_S):
            return verify(_parsed(gold.strip()), _parsed(pred.strip()), timeout_seconds=None)
    except _Deadline:
        raise GradingError(f"grading took more than {GRADE_TIMEOUT_S} s of CPU time") from None


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
    up to and including its first EOS. A completion with no EOS was cut by the length limit
    (truncated); one whose EOS is its max_new_tokens-th token was not."""
    prompt_ids: torch.Tensor      # (B, P)
    prompt_mask: torch.Tensor     # (B, P)
    completion_ids: torch.Tensor  # (B, T)
    mask: torch.Tensor            # (B, T) float
    lengths: torch.Tensor         # (B,) tokens in each completion, EOS included
    texts: list                   # B decoded completions
    truncated: torch.Tensor       # (B,) bool: no EOS

    def input_ids(self):
        return torch.cat([self.prompt_ids, self.completion_ids], 1)  # (B, P+T)

    def attention_mask(self):
        return torch.cat([self.prompt_mask, self.mask.long()], 1)  # (B, P+T)

    def select(self, idx: torch.Tensor) -> "Rollout":
        """The rows `idx`, with the padding columns that no kept row uses trimmed: the prompts' common
        left padding (one long prompt in the step would otherwise widen every micro-batch) and the
        completions' right padding. Positions come from the attention mask, so log-probs are unchanged."""
        il = idx.tolist()
        pm = self.prompt_mask[idx]  # (b, P)
        used = pm.any(0)  # (P,)
        S = int(used.int().argmax()) if used.any() else pm.shape[1]  # first prompt column a kept row uses
        T = int(self.lengths[idx].max()) if len(il) else 0
        return Rollout(self.prompt_ids[idx, S:], pm[:, S:], self.completion_ids[idx, :T],
                       self.mask[idx, :T], self.lengths[idx], [self.texts[i] for i in il], self.truncated[idx])

    def to(self, device) -> "Rollout":
        return Rollout(self.prompt_ids.to(device), self.prompt_mask.to(device), self.completion_ids.to(device),
                       self.mask.to(device), self.lengths.to(device), list(self.texts), self.truncated.to(device))


def cat_rollouts(parts: list, pad_id: int) -> Rollout:
    """One rollout from several: prompts left-padded, completions right-padded to the widest."""
    P = max(r.prompt_ids.shape[1] for r in parts)
    T = max(r.completion_ids.shape[1] for r in parts)
    left = lambda x, n, v: F.pad(x, (n - x.shape[1], 0), value=v)
    right = lambda x, n, v: F.pad(x, (0, n - x.shape[1]), value=v)
    return Rollout(torch.cat([left(r.prompt_ids, P, pad_id) for r in parts]),
                   torch.cat([left(r.prompt_mask, P, 0) for r in parts]),
                   torch.cat([right(r.completion_ids, T, pad_id) for r in parts]),
                   torch.cat([right(r.mask, T, 0) for r in parts]),
                   torch.cat([r.lengths for r in parts]), [t for r in parts for t in r.texts],
                   torch.cat([r.truncated for r in parts]))


def completion_mask(completion_ids: torch.Tensor, eos: list):
    """(B, T) mask and (B,) lengths from the position of the first EOS (included), and (B,) truncated:
    the rows with no EOS."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos, device=completion_ids.device))  # (B, T)
    T = completion_ids.shape[1]
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(is_eos[:, 0], T, dtype=torch.long))
    lengths = torch.clamp(first + 1, max=T)  # (B,)
    mask = (torch.arange(T, device=completion_ids.device)[None] < lengths[:, None]).float()  # (B, T)
    return mask, lengths, ~is_eos.any(1)


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
    mask, lengths, truncated = completion_mask(completion_ids, eos)
    completion_ids = completion_ids.masked_fill(mask == 0, tok.pad_token_id)
    texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
    model.train(was_training)
    return Rollout(prompt_ids, prompt_mask, completion_ids, mask, lengths, texts, truncated)


# ----------------------------------------------------------------------------------------------
# Per-token log-probs of the sampled tokens


def _lm_head(h, w, temperature: float, vocab: Optional[int]):
    with torch.autocast(h.device.type, enabled=False):  # fp32 under autocast too: bf16 logits are off by up to 2^-9 of their size
        logits = h.float() @ w.T  # (n, V) w is fp32 (completion_states)
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
    w = model.get_output_embeddings().weight.float()  # (V, D) fp32 LM head: a bf16 one (frozen, FSDP-gathered) is copied
    return h[:, -T - 1:-1].reshape(B * T, -1), w  # (B*T, D), (V, D)


def token_logprobs(model, rollout: Rollout, temperature: float = 1.0, chunk_size: int = 1024,
                   vocab_size: Optional[int] = None, with_entropy: bool = False, states=None):
    """log pi(o_t | q, o_<t) of each completion token at the sampling temperature, (B, T).

    The full (B, T, V) logits are never held: the LM head runs on `chunk_size` positions at a
    time and gives z_y - logsumexp(z) (151,936 fp32 logits are 0.6 MB a position). With grad,
    each chunk is recomputed in backward (activation checkpointing), so training keeps only the
    hidden states. `vocab_size` slices the logits (a 7B Qwen has 152,064 rows, a 0.5B 151,936).
    The LM head and log-softmax run in fp32 under autocast too: the head of a bf16 model (frozen,
    or gathered by FSDP) is copied to fp32 for the call (V x D x 4 bytes: 0.5 GiB for 0.5B).
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
# or teacher); Schulman, "Approximating KL divergence" (2020); derivations in docs/derivations.md §2:
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


# f-divergences D_f(q||p) = E_{y~p}[f(u)], u = q(y)/p(y) (docs/derivations.md §4): (f, f').
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


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, arXiv 2107.03374):
    1 - C(n-c, k) / C(n, k), the chance that k of the n drawn without replacement hold a correct one."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def parse_pass_k(spec) -> list:
    """The k of --pass-k ("1,4,16") as ints; a list of ints as it is."""
    if not isinstance(spec, str):
        return [int(k) for k in spec]
    try:
        return [int(k) for k in spec.split(",") if k.strip()]
    except ValueError:
        die(f"--pass-k must be comma-separated integers like 1,4,16 (got '{spec}')")


@torch.no_grad()
def evaluate(model, tok, rows: list, dataset: str, max_new_tokens: int, pass_n: int = 0, pass_k="1,4,16",
             batch_size: int = 64, ece_bins: int = 0) -> dict:
    """The held-out metrics of `rows`: eval/accuracy (greedy pass@1) and time/eval (seconds).
    `pass_n` > 0: eval/pass@k for each k of `pass_k`, from `pass_n` answers per question sampled at
    temperature 1 (pass_n times the greedy generation; time/eval_pass_at_k is its cost).
    `ece_bins` > 0: eval/ece, the expected calibration error of the greedy answer's confidence over
    that many equal-width bins, sum_b |sum_{i in b} (c_i - 1[correct_i])| / N, with c_i the
    probability (T = 1) of the whole greedy completion: on the toy that is the answer's digits and
    EOS; after a reasoning chain it is not an answer confidence (the chain's probability is tiny
    whatever the answer). A generate call holds at most `batch_size` answers. Under torchrun each
    rank answers its share and the counts are summed."""
    if not rows:
        return {"eval/accuracy": float("nan")}
    ks = parse_pass_k(pass_k) if pass_n > 0 else []
    mine = rows[rank()::world_size()]
    per_rank = -(-len(rows) // world_size())
    mine += [None] * (per_rank - len(mine))  # FSDP: every rank makes as many generate calls (None: not counted)
    prompts = [format_prompt(tok, (r or rows[0])["question"], dataset) for r in mine]
    golds = [(r or rows[0])["answer"] for r in mine]
    device = next(model.parameters()).device
    sums = torch.zeros(1 + len(ks), dtype=torch.float64)  # correct greedy answers, then pass@k summed over questions
    gap = torch.zeros(max(ece_bins, 1), dtype=torch.float64, device=device)  # (bins,) sum of c - correct
    with Timer() as t_greedy:
        for s in range(0, len(mine), batch_size):
            part = mine[s:s + batch_size]
            ro = sample(model, tok, prompts[s:s + batch_size], 1, max_new_tokens, greedy=True)
            graded = rewards_for(ro.texts, golds[s:s + batch_size]).correct  # grading errors score 0
            right = [r is not None and ok for ok, r in zip(graded.tolist(), part)]
            sums[0] += sum(right)
            if ece_bins:
                conf = torch.exp((token_logprobs(model, ro) * ro.mask).sum(1)).double()  # (b,)
                counted = torch.tensor([r is not None for r in part], device=device)  # (b,)
                b = (conf * ece_bins).long().clamp(max=ece_bins - 1)  # (b,)
                gap.index_add_(0, b[counted], (conf - torch.tensor(right, device=device, dtype=torch.float64))[counted])
    # the RNG is forked, so that training continues as it would without pass@k (and resumes the same)
    with Timer() as t_pass, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        step = max(1, batch_size // max(pass_n, 1))  # questions per generate call
        for s in range(0, len(mine) if ks else 0, step):
            ro = sample(model, tok, prompts[s:s + step], pass_n, max_new_tokens, temperature=1.0)
            graded = rewards_for(ro.texts, [g for g in golds[s:s + step] for _ in range(pass_n)]).correct
            for i, r in enumerate(mine[s:s + step]):
                if r is not None:
                    c = int(graded[i * pass_n:(i + 1) * pass_n].sum())
                    sums[1:] += torch.tensor([pass_at_k(pass_n, c, k) for k in ks], dtype=torch.float64)
    sums = all_sum(sums.to(device)).cpu() / len(rows)
    metrics = {"eval/accuracy": sums[0].item(), **{f"eval/pass@{k}": v.item() for k, v in zip(ks, sums[1:])}}
    if ece_bins:
        metrics["eval/ece"] = float(all_sum(gap).abs().sum()) / len(rows)
    metrics["time/eval"] = t_greedy.seconds + t_pass.seconds
    if ks:
        metrics["time/eval_pass_at_k"] = t_pass.seconds
    return metrics


# ----------------------------------------------------------------------------------------------
# Output directory, metrics, checkpoints


def prepare_out(args, script: str) -> str:
    """DIR for this run, written into args.out (config.json holds the resolved path). Refuse a
    directory that holds another run unless --resume. Rank 0 decides and writes; the other ranks
    get its answer."""
    out = args.out or os.path.join("runs", f"{script}-{time.strftime('%Y%m%d-%H%M%S')}")
    if dist.is_initialized():
        box = [out]
        dist.broadcast_object_list(box, src=0)
        out = box[0]
    args.out = _run["out"] = out
    if rank() != 0:
        return out
    occupied = os.path.exists(os.path.join(out, "metrics.jsonl")) or os.path.exists(os.path.join(out, "checkpoint"))
    if args.resume and not os.path.exists(os.path.join(out, "checkpoint", "state.pt")):
        die(f"--resume: no checkpoint in '{out}/checkpoint' to resume from")
    if occupied and not args.resume:
        die(f"'{out}' already holds a run: pass --resume to continue it, or choose another --out")
    try:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(args), f, indent=2)
    except OSError as e:
        die(f"cannot write the output directory '{out}' ({e.strerror}): choose another --out")
    return out


class Logger:
    """metrics.jsonl, appended and flushed line by line. On resume at step s, lines after s (from
    steps after the last checkpoint) are dropped, so no step is lost or repeated; the kept lines
    count for `first`. Only rank 0 writes."""

    def __init__(self, out: str, resume_step: Optional[int] = None):
        self.f, self.firsts = None, {}
        if rank() != 0:
            return
        self.path = os.path.join(out, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                keep = [l for l in f if l.strip() and json.loads(l)["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(keep)
            for line in keep:
                for k, v in json.loads(line).items():
                    self.firsts.setdefault(k, v)
        self.f = open(self.path, "a")

    def log(self, step: int, metrics: dict):
        _run["step"] = step
        if self.f is None:
            return
        row = {"step": step}
        row.update({k: (float(v) if isinstance(v, (torch.Tensor, np.floating)) else v) for k, v in metrics.items()})
        for k, v in row.items():
            self.firsts.setdefault(k, v)
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def first(self, key: str) -> float:
        """The first value logged under `key` in this run, resumed lines included (nan if none)."""
        return self.firsts.get(key, float("nan"))

    def close(self):
        if self.f is not None:
            self.f.close()


def save_pretrained(model, tok, path: str, published: bool = False):
    """`save_pretrained` of a model and its tokenizer, loadable by `load_model`. `published`: the
    weights in the dtype the model was published in (bf16 for Qwen2.5: half the size of fp32);
    otherwise as they are (a checkpoint keeps the fp32 master weights that resume needs). The
    config records the published dtype either way. Every rank calls it: FSDP first gathers the
    shards (on CPU, rank 0's copy only); rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model)  # FSDP: the model holds its shards again (the root stays gathered after a forward)
    dtype = getattr(model, "published_dtype", None) or next(model.parameters()).dtype
    cast = published and dtype != next(model.parameters()).dtype
    state = None
    if is_sharded(model):
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif cast and rank() == 0:
        state = model.state_dict()
    if state is not None:
        first = {}  # the copies of a tied weight are separate tensors: keep its first name only
        for name, p in model.named_parameters(remove_duplicate=False):
            if first.setdefault(id(p), name) != name:
                state.pop(name, None)
    if rank() == 0:
        if cast:
            state = {k: v.to("cpu", dtype) for k, v in state.items()}  # one tensor at a time to the host
        model.save_pretrained(path, state_dict=state)
        model.config.dtype = dtype  # save_pretrained wrote the dtype of the weights in memory
        model.config.save_pretrained(path)
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
    _run["saving"] = True  # Ctrl-C waits for the swap: there is always one whole checkpoint
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _run.update(saving=False, checkpoint=step)
    if _run["interrupted"]:
        _exit_interrupted()


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
    _run["checkpoint"] = state["step"]
    rng = state["rng"][rank()]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["np"])
    random.setstate(rng["py"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["step"]


def save_final(out: str, models: dict):
    """DIR/final (one model) or DIR/final/<name>, in the dtype each model was published in. Every
    rank calls it; rank 0 writes."""
    for name, (model, tok) in models.items():
        save_pretrained(model, tok, os.path.join(out, "final", name) if name else os.path.join(out, "final"),
                        published=True)


# Ctrl-C: one line saying where the last checkpoint is and the command that resumes it

_run = dict(out=None, step=None, checkpoint=None, saving=False, interrupted=False)


def exit_on_interrupt():
    """Make Ctrl-C (SIGINT) stop the script with one line instead of a traceback. Checkpoints are
    written whole (a temporary directory, then a rename that Ctrl-C waits for), so the last one is
    at most --save-every steps old."""

    def handler(signum, frame):
        if _run["saving"]:
            _run["interrupted"] = True
        else:
            _exit_interrupted()

    signal.signal(signal.SIGINT, handler)


def _exit_interrupted():
    if rank() == 0:
        out, step, ckpt = _run["out"], _run["step"], _run["checkpoint"]
        at = "" if step is None else f" after step {step}"
        if out is None:
            msg = "interrupted before the run started; nothing was written"
        elif ckpt is None:
            msg = (f"interrupted{at}, before the first checkpoint (--save-every): nothing to resume; "
                   f"'{out}' holds this run's metrics, so start again with another --out")
        else:
            argv, i = [], 1  # the same command, then --out DIR --resume
            while i < len(sys.argv):
                a = sys.argv[i]
                i += 2 if a == "--out" else 1
                if a != "--out" and not a.startswith("--out=") and a not in ("--resume", "--no-resume"):
                    argv.append(a)
            launcher = ["python"] if world_size() == 1 else ["torchrun", f"--nproc_per_node={world_size()}"]
            cmd = shlex.join(launcher + [sys.argv[0], *argv, "--out", out, "--resume"])
            msg = f"interrupted{at}; the last checkpoint (step {ckpt}) is in '{out}/checkpoint'. Resume with: {cmd}"
        print("\n" + msg, file=sys.stderr, flush=True)  # after the progress bar's line
    os._exit(130)


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
