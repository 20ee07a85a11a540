"""Plumbing: what a reader of the scripts may skip.

Nothing here changes what a script computes. The mistakes a command line can make (`check_args`,
one line each), and what lets the same script run in one CPU process, on one GPU and on several
under torchrun: the process group and FSDP2, mixed precision, the offline check, timing (the run's
directory, checkpoints and Ctrl-C are rundir.py's). In one CPU process every distributed helper is
a pass-through and autocast is off.
Under torchrun each rank samples its share of a step, normalises its loss by the step's global
counts, and the gradients are summed over ranks before clipping: the one-process update of the
whole batch (docs/distributed.md). With --fsdp every forward is a collective.
"""

import atexit
import contextlib
import functools
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist


_failed = False  # this process is ending on an error: it leaves the process group without waiting for the others


def die(msg: str):
    """A mistake the user can fix: one clear line and exit code 2, no traceback."""
    global _failed
    _failed = True
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


# ----------------------------------------------------------------------------------------------
# The arguments' mistakes


def check_args(args, **least):
    """The mistakes every script can make, each as one line; `least` adds the script's own lower bounds
    (name=bound: num_iterations=1 says --num-iterations must be at least 1)."""
    if args.group_size < 2:
        die(f"--group-size must be at least 2 (got {args.group_size}): "
            "group-relative advantages need two completions to compare")
    bounds = dict(steps=0, eval_size=0, pass_n=0, log_samples=0, threads=0, save_every=0, save_minutes=0,
                  prompts_per_step=1, max_new_tokens=1, micro_batch_size=1)
    for name, bound in {**bounds, **least}.items():
        if getattr(args, name) < bound:
            die(f"--{name.replace('_', '-')} must be {'non-negative' if bound == 0 else f'at least {bound}'} "
                f"(got {getattr(args, name)})")
    parse_pass_k(args.pass_k, args.pass_n)
    if args.temperature <= 0:
        die(f"--temperature must be positive for on-policy sampling (got {args.temperature})")
    if args.lora_rank < 0 or (args.lora_rank and args.lora_alpha <= 0):
        die(f"--lora-rank must be non-negative and --lora-alpha positive (got {args.lora_rank}, {args.lora_alpha})")
    if args.lora_rank and args.fsdp and world_size() > 1:
        die("--lora-rank with --fsdp is not supported: LoRA keeps a model on one GPU, so run data parallel "
            "(torchrun without --fsdp)")
    for flag in [f for f in ("model", "teacher", "small", "large") if hasattr(args, f)]:  # an adapter is not a model
        if os.path.isfile(os.path.join(getattr(args, flag), "adapter_config.json")):
            die(f"--{flag} {getattr(args, flag)} is a LoRA adapter, not a model: to train from its policy, pass the "
                "merged model (a run's final/.../adapter/: the directory above); to go on with its run, --resume")
    if args.prompts_per_step % world_size():  # torchrun: every rank takes whole questions
        die(f"--prompts-per-step ({args.prompts_per_step}) must be a multiple of the number of processes "
            f"({world_size()})")


def parse_pass_k(spec, pass_n: int = 0) -> list:
    """The k of --pass-k ("1,4,16") as ints; a list of ints as it is. `pass_n` > 0 (--pass-n, the answers sampled
    per question): at least one k, each between 1 and pass_n."""
    try:
        ks = [int(k) for k in (spec.split(",") if isinstance(spec, str) else spec) if str(k).strip()]
    except ValueError:
        die(f"--pass-k must be comma-separated integers like 1,4,16 (got '{spec}')")
    if pass_n > 0 and (not ks or not all(1 <= k <= pass_n for k in ks)):
        die(f"--pass-k {spec}: each k must be between 1 and --pass-n ({pass_n}), the answers sampled per question")
    return ks


# ----------------------------------------------------------------------------------------------
# Several processes


def world_size() -> int:
    """The number of processes: torchrun's WORLD_SIZE until the process group exists (the argument checks)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def free_cores() -> tuple:
    """(the cores this process may run on, how many of them other work keeps busy: the 1-minute load average)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores, min(cores, round(os.getloadavg()[0])) if hasattr(os, "getloadavg") else 0


def init_distributed(name: str = "auto", threads: int = 0) -> torch.device:
    """The device of this process and its CPU threads: `threads`, else on a CPU (without $OMP_NUM_THREADS) one per
    core that other work leaves free, shared by the processes of this machine, said in one line when fewer than the
    cores (torch's default, a thread per core, made a first step 9x slower on a 2-core CPU with one core busy). Under
    torchrun it also joins the process group: NCCL with one GPU per process (LOCAL_RANK) on CUDA, gloo on CPU."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if threads == 0 and device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        (cores, busy), local = free_cores(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, (cores - busy) // local)
        if threads * local < cores and rank() == 0 and int(os.environ.get("RANK", "0")) == 0:
            print(f"torch threads: {threads}{' a process' * (local > 1)} ({cores} cores, {busy} busy with other work by "
                  "the load average); --threads N sets them", file=sys.stderr, flush=True)
    if threads > 0:
        torch.set_num_threads(threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        die(f"--device {name} asked for, but no CUDA device is visible")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # fp32 matmuls (the LM head) on TF32 tensor cores: below
    if world_size() == 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    sys.excepthook = functools.partial(_failing, sys.excepthook)
    atexit.register(_leave)
    return device


def _failing(excepthook, *exc):
    global _failed
    _failed = True
    excepthook(*exc)


def _leave():
    """At exit: every rank waits for the others, then leaves the group. A gloo rank that left while another
    still finished its part (rank 0 writing the results) could abort (SIGABRT, "terminate called without an
    active exception"). A rank that failed leaves at once: torchrun stops the others."""
    if not _failed:
        dist.barrier()
    dist.destroy_process_group()


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


def all_gather(obj) -> list:
    """Every rank's `obj`, in rank order ([obj] in one process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def std_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The unbiased std of every rank's x taken together (x.std() in one process): the mean, then the
    squared deviations from it."""
    n = all_sum(torch.tensor(float(x.numel()), device=x.device, dtype=x.dtype))
    mean = all_sum(x.sum()) / n
    return (all_sum(((x - mean) ** 2).sum()) / (n - 1)).sqrt()


def mean_over_ranks(metrics: dict) -> dict:
    """Each logged number averaged over ranks (ranks hold equal shares of the step)."""
    if not dist.is_initialized():
        return metrics
    keys = list(metrics)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    x = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(x)
    return dict(zip(keys, (x / world_size()).tolist()))


def apply_fsdp(model, device: torch.device):
    """FSDP2 over all ranks: one unit per decoder layer, the rest (embeddings, final norm, LM head) in
    the root unit. The model comes on the CPU and fully_shard moves one unit at a time to `device`,
    keeping this rank's shard: the whole model never sits on one GPU. On CUDA the gathered weights
    are bf16 and gradients are reduced in fp32. A plain move to `device` in one process."""
    if world_size() == 1:
        return model.to(device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if uses_bf16(device)
          else MixedPrecisionPolicy())
    for layer in model.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    model = fully_shard(model, mesh=mesh, mp_policy=mp)
    model._is_fsdp_managed_module = True  # transformers' mark: generate() keeps the ranks in step (synced_gpus)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def reshard(model):
    """FSDP: free every gathered unit (the root stays gathered after a forward), so that the model holds
    its shards again, as its optimizer does."""
    from torch.distributed.fsdp import FSDPModule
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextlib.contextmanager
def generating(model):
    """The context of `model.generate`: autocast, and under FSDP every layer kept gathered for the whole
    batch (all-gathered once per batch rather than once per new token)."""
    device = next(model.parameters()).device
    layers = model.get_decoder().layers if is_sharded(model) else []
    for layer in layers:
        layer.set_reshard_after_forward(False, recurse=False)
    try:
        with autocast(device):
            yield
    finally:
        for layer in layers:
            layer.set_reshard_after_forward(True, recurse=False)
        if layers:
            reshard(model)


def reduce_and_clip_grads(model, max_norm: float, bucket_numel: int = 2**25) -> torch.Tensor:
    """Sum the gradients over ranks (each rank's loss is already its share of the global mean), clip
    them to `max_norm` and return their norm before clipping. FSDP has reduce-scattered them in
    backward as a mean over ranks: times N makes it the sum. Data parallel: one all-reduce in flat
    buckets per optimizer step (DDP's wrapper would overlap the last backward with it, but needs
    no_sync() on every other micro-batch and unwrapping for generate and save_pretrained)."""
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


# ----------------------------------------------------------------------------------------------
# Precision. On CUDA the trained weights (and AdamW states) stay fp32 and matmuls run in bf16
# (autocast): pure bf16 weights would round updates of lr 1e-6 away. Frozen models are read in
# bf16. The LM head and log-softmax of the log-prob pass run in fp32 all the same (common.py),
# the head's matmul on TF32 tensor cores (10-bit mantissa products, fp32 sums and logits): on an
# H200 the fp32 head was 54% of an update's GPU time, and TF32 took the update from 1.97 s to 1.28 s.

BF16_DEVICES = ("cuda",)  # where matmuls run in bf16 and frozen models are stored in bf16 (tests add "cpu")


def uses_bf16(device: torch.device) -> bool:
    return device.type in BF16_DEVICES


def autocast(device: torch.device):
    if uses_bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def rope_in_autocast_dtype(model):
    """Under autocast, the rotary embedding's cos and sin in the autocast dtype: in fp32 (the master
    weights' dtype) q * cos would make the KV cache hold fp32 keys beside bf16 values, 1.5x its size."""
    def hook(module, args, out):
        device = out[0].device.type
        if not torch.is_autocast_enabled(device):
            return out
        return tuple(o.to(torch.get_autocast_dtype(device)) for o in out)

    rope = getattr(model.get_decoder(), "rotary_emb", None)
    if rope is not None:
        rope.register_forward_hook(hook)


# ----------------------------------------------------------------------------------------------
# Offline


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


def offline_unless_reachable() -> bool:
    """Whether the hub can be reached; when not, HF_HUB_OFFLINE=1 is set for the run, so that the hub clients
    read their caches at once (they would retry for a minute, then fail)."""
    if hub_reachable():
        return True
    os.environ["HF_HUB_OFFLINE"] = "1"  # read by huggingface_hub and datasets when they are imported
    from huggingface_hub import constants
    constants.HF_HUB_OFFLINE = True  # in case they were imported already
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True
    return False


# The bare model names known here (resolved by common.resolve_model_name), for a typo's "did you mean".
KNOWN_MODELS = (*(f"Qwen2.5-{s}{v}" for s in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B") for v in ("", "-Instruct")),
                *(f"Qwen2.5-Math-{s}{v}" for s in ("1.5B", "7B") for v in ("", "-Instruct")),
                *(f"Qwen2-{s}{v}" for s in ("0.5B", "1.5B", "7B") for v in ("", "-Instruct")),
                *(f"Qwen3-{s}" for s in ("0.6B", "1.7B", "4B", "8B", "14B", "32B")),
                *(f"SmolLM2-{s}{v}" for s in ("135M", "360M", "1.7B") for v in ("", "-Instruct")))


def did_you_mean(name: str) -> str:
    """The known model name that a `name` known nowhere is a typo of ('Qwen2.5-05B-Instruct': 'Qwen2.5-0.5B-Instruct',
    an organisation kept), or ''."""
    import difflib
    org, bare = name.rpartition("/")[0::2]
    lower = {k.lower(): k for k in KNOWN_MODELS}
    close = difflib.get_close_matches(bare.lower(), lower, n=1, cutoff=0.9) if bare not in KNOWN_MODELS else []
    return f"{org}/" * bool(org) + lower[close[0]] if close else ""


def check_offline(hub_models: dict, datasets: dict, dataset_repos: dict, toy_models=()):
    """When the hub cannot be reached, every hub model ({hub id: how to get it in a few words, or ''}) must be in the
    local Hugging Face cache and each dataset's repos ({flag: name}, `dataset_repos` {name: repos}) in the
    datasets cache, or one line names all that is missing and how to get it (the hub client would retry for a
    minute, then name the first), or a missing model's few words; HF_HUB_OFFLINE=1 is then set for the run."""
    repos = {}  # how the user named each dataset ('The default --dataset math'): its hub repos
    for flag, name in datasets.items():
        if name in dataset_repos and dataset_repos[name] not in repos.values():  # a dataset named twice: once
            given = any(a == flag or a.startswith(flag + "=") for a in sys.argv[1:])
            repos[f"{'' if given else 'The default '}{flag} {name}"] = dataset_repos[name]
    if (not hub_models and not repos) or offline_unless_reachable():
        return
    from huggingface_hub import constants, try_to_load_from_cache
    models = [m for m in hub_models if not isinstance(try_to_load_from_cache(m, "config.json"), str)]
    for m in models:  # a typo, or a model built here: one short line
        if hub_models[m]:
            die(f"model '{m}' is not in the local Hugging Face cache, and the hub is unreachable: {hub_models[m]}")
    datasets_cache = os.environ.get("HF_DATASETS_CACHE", os.path.join(constants.HF_HOME, "datasets"))
    data = [f"{said} ({', '.join(rs)})" for said, rs in repos.items()
            if any(not os.path.isdir(os.path.join(datasets_cache, r.replace("/", "___"))) for r in rs)]
    if not models and not data:
        return
    names, toys, is_are = " and ".join(f"'{m}'" for m in models), ", ".join(toy_models), "is" if len(data) == 1 else "are"
    where = (f"the local Hugging Face cache (HF_HOME={constants.HF_HOME}), and the hub is unreachable "
             "(HF_HUB_OFFLINE=1 or no network).")
    said = ([f"model {names} is not a local directory, not a toy model ({toys}) and not in {where}" if len(models) == 1 else
             f"models {names} are not local directories, not toy models ({toys}) and not in {where}"] if models else
            [f"{' and '.join(data)} {is_are} not in {where}"])
    said += [f"{' and '.join(data)} {is_are} not in the datasets cache either."] if models and data else []
    get = [f"`hf download {m}`" for m in models] + (["run this command once there for the dataset"] if data else [])
    die(f"{' '.join(said)} To get {'it' if len(get) == 1 else 'them'}: where the hub is reachable, {' and '.join(get)}; then "
        "run here with HF_HUB_OFFLINE=1 and the same HF_HOME. Or pass a local directory written by save_pretrained as the "
        "model, a .jsonl file (question/answer) as --dataset, or the toy world (toy-small, toy-large, --dataset toy)")
