"""Plumbing: what a reader of the scripts may skip.

Nothing here changes what a script computes. It lets the same script run in one CPU process, on
one GPU and on several under torchrun: the process group and FSDP2, mixed precision, the offline
check, the run's directory (config.json, metrics.jsonl, checkpoints, the final model), Ctrl-C and
NaN stops, timing. In one CPU process every distributed helper is a pass-through and autocast off.
Under torchrun each rank samples its share of a step, normalises its loss by the step's global
counts, and the gradients are summed over ranks before clipping: the one-process update of the
whole batch (README, "Several GPUs"). With --fsdp every forward is a collective.
"""

import atexit
import contextlib
import dataclasses
import json
import os
import random
import shlex
import shutil
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist


def die(msg: str):
    """A mistake the user can fix: one clear line and exit code 2, no traceback."""
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
# Several processes


def world_size() -> int:
    """The number of processes: torchrun's WORLD_SIZE until the process group exists (the argument checks)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def init_distributed(name: str = "auto", threads: int = 0) -> torch.device:
    """The device of this process and its CPU threads (0: torch's default, one per core). Under torchrun it
    also joins the process group: NCCL with one GPU per process (LOCAL_RANK) on CUDA, gloo on CPU."""
    if threads > 0:
        torch.set_num_threads(threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        die(f"--device {name} asked for, but no CUDA device is visible")
    if world_size() == 1 or dist.is_initialized():
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
# bf16. The LM head and log-softmax of the log-prob pass run in fp32 all the same (common.py).

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


def check_offline(hub_models: list, dataset: str, dataset_repos: tuple):
    """When the hub cannot be reached: every hub model must be in the local Hugging Face cache and the
    dataset's hub repos in the datasets cache, or one line names all that is missing and how to get it
    (the hub client would retry for a minute, then name only the first); HF_HUB_OFFLINE=1 is set for
    the rest of the run. With the hub reachable, nothing is checked: what is missing downloads."""
    if (not hub_models and not dataset_repos) or hub_reachable():
        return
    os.environ["HF_HUB_OFFLINE"] = "1"  # read by huggingface_hub and datasets when they are imported
    from huggingface_hub import constants, try_to_load_from_cache
    constants.HF_HUB_OFFLINE = True  # in case they were imported already
    models = [m for m in hub_models if not isinstance(try_to_load_from_cache(m, "config.json"), str)]
    datasets_cache = os.environ.get("HF_DATASETS_CACHE", os.path.join(constants.HF_HOME, "datasets"))
    data = any(not os.path.isdir(os.path.join(datasets_cache, r.replace("/", "___"))) for r in dataset_repos)
    if models or data:
        missing = [f"model '{m}'" for m in models] + ([f"dataset {dataset} ({', '.join(dataset_repos)})"] if data else [])
        get = [f"`hf download {m}`" for m in models] + (["one run of this command for the dataset"] if data else [])
        die(f"not in the local cache (the hub is unreachable: HF_HUB_OFFLINE=1 or no network; HF_HOME={constants.HF_HOME}): "
            f"{', '.join(missing)}. Where the hub is reachable, {'; '.join(get)}; then run here with HF_HUB_OFFLINE=1 "
            f"and the same HF_HOME. Or pass a local directory written by save_pretrained as the model, a .jsonl "
            f"file (question/answer) as --dataset, or the toy world (toy-small, toy-large, --dataset toy)")


# ----------------------------------------------------------------------------------------------
# The run's output directory: config.json, metrics.jsonl, checkpoint/, final/; Ctrl-C and NaN stops


def exit_on_interrupt():
    """Ctrl-C (SIGINT) stops the script with one line instead of a traceback (a script's __main__ asks);
    a Run, once made, takes the signal over to name its checkpoint and the command that resumes it."""
    signal.signal(signal.SIGINT, _interrupted_before_the_run)


def _interrupted_before_the_run(signum, frame):
    if rank() == 0:
        print("\ninterrupted before the run started; nothing was written", file=sys.stderr, flush=True)
    os._exit(130)


class Run:
    """One run's directory, DIR = --out (default runs/<script>-<time>), and what is written there (rank 0
    writes); a directory that holds another run is refused unless --resume. It knows what the messages
    of Ctrl-C and of a NaN stop need: the last step logged and the last checkpoint."""

    def __init__(self, args, script: str):
        name = os.path.basename(script).removesuffix(".py")  # the script's __file__ or name
        out = args.out or os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        if dist.is_initialized():
            box = [out]
            dist.broadcast_object_list(box, src=0)
            out = box[0]
        args.out = self.out = out  # config.json holds the resolved path
        self.step = self.checkpoint = self.f = None
        self.saving, self.interrupted, self.resuming, self.firsts = False, False, args.resume, {}
        if signal.getsignal(signal.SIGINT) is _interrupted_before_the_run:  # the script asked for one line
            signal.signal(signal.SIGINT, self._on_interrupt)
        if rank() != 0:
            return
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

    def checkpoint_dir(self, name: str) -> str:
        """Where the checkpoint keeps the model `name` (a save_pretrained directory, loadable as a model)."""
        return os.path.join(self.out, "checkpoint", name)

    # metrics.jsonl

    def log(self, step: int, metrics: dict):
        """One line of metrics.jsonl, appended and flushed (rank 0)."""
        self.step = step
        if rank() != 0:
            return
        if self.f is None:
            self.f = open(os.path.join(self.out, "metrics.jsonl"), "a")
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

    # checkpoints and the final model

    def save_checkpoint(self, step: int, models: dict, optimizers: dict, sampler):
        """DIR/checkpoint: each model of `models` (name: (model, tokenizer)), the optimizer states (keyed by
        parameter name: data-parallel and FSDP runs read each other's), every rank's RNG states, the
        sampler, the step; written to a temporary directory first, so a kill mid-save keeps the last one.
        Every rank calls it (FSDP gathers shards)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        rng = dict(torch=torch.get_rng_state(), np=np.random.get_state(), py=random.getstate(),
                   cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        rngs = [rng]
        if dist.is_initialized():
            rngs = [None] * world_size() if rank() == 0 else None
            dist.gather_object(rng, rngs, dst=0)
        tmp, final = os.path.join(self.out, "checkpoint.tmp"), os.path.join(self.out, "checkpoint")
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
        self.saving = True  # Ctrl-C waits for the swap: there is always one whole checkpoint
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self.saving, self.checkpoint = False, step
        if self.interrupted:
            self._exit_interrupted()

    def resume(self, models: dict, optimizers: dict, sampler) -> int:
        """Restore optimizer, sampler and RNG states from DIR/checkpoint, drop the metric lines after its
        step (no step is lost or repeated) and return it; the script loaded the models (name: model)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = torch.load(os.path.join(self.out, "checkpoint", "state.pt"), weights_only=False, mmap=True)
        if len(state["rng"]) != world_size():
            die(f"the checkpoint in '{self.out}' was written by {len(state['rng'])} processes: resume with as many "
                f"(now {world_size()})")
        for k, o in optimizers.items():
            set_optimizer_state_dict(models[k], o, state["optimizers"][k], options=StateDictOptions(full_state_dict=True))
        sampler.load_state_dict(state["sampler"])
        self.checkpoint = step = state["step"]
        rng = state["rng"][rank()]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["np"])
        random.setstate(rng["py"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        path = os.path.join(self.out, "metrics.jsonl")
        if rank() == 0 and os.path.exists(path):
            with open(path) as f:
                keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
            with open(path, "w") as f:
                f.writelines(keep)
            self.firsts = {k: v for line in reversed(keep) for k, v in json.loads(line).items()}  # the first of each
        return step

    def once(self, name: str, what: str, settings: dict, make):
        """make(), computed once per run and kept in DIR/<name>.pt with the `settings` (flag: value) it was
        made with; --resume reads it back (the checkpoint's models did not make it), with the same settings."""
        path = os.path.join(self.out, name + ".pt")
        if self.resuming:
            if not os.path.exists(path):
                die(f"--resume: no {what} in '{path}'; the checkpoint's policy is not the one that made it")
            saved = torch.load(path, weights_only=False)
            changed = [k for k in settings if saved["settings"].get(k) != settings[k]]
            if changed:
                die(f"--resume: '{path}' was made with other {'/'.join(changed)}: resume with the same")
            return saved["value"]
        value = make()
        if rank() == 0:
            torch.save(dict(settings=settings, value=value), path + ".tmp")
            os.replace(path + ".tmp", path)
        return value

    def save_final(self, models: dict):
        """DIR/final (one model, name "") or DIR/final/<name>, in the dtype each was published in (every rank calls it)."""
        for name, (model, tok) in models.items():
            save_pretrained(model, tok, os.path.join(self.out, "final", name) if name else os.path.join(self.out, "final"),
                            published=True)

    # stops

    def check_finite(self, loss: torch.Tensor, step: int):
        """Stop every rank on a NaN or inf loss (the step's loss summed over ranks)."""
        loss = all_sum(loss.detach())
        if not torch.isfinite(loss):
            die(f"loss is {loss.item()} at step {step}; stopping. The last checkpoint is in '{self.out}/checkpoint'")

    def _on_interrupt(self, signum, frame):
        if self.saving:
            self.interrupted = True
        else:
            self._exit_interrupted()

    def _exit_interrupted(self):
        """One line: where the last checkpoint is and the command that resumes it."""
        if rank() == 0:
            at = "" if self.step is None else f" after step {self.step}"
            if self.checkpoint is None:
                msg = (f"interrupted{at}, before the first checkpoint (--save-every): nothing to resume; "
                       f"'{self.out}' holds this run's metrics, so start again with another --out")
            else:
                argv = [a for prev, a in zip(sys.argv, sys.argv[1:])  # the same command, then --out DIR --resume
                        if prev != "--out" and a not in ("--out", "--resume", "--no-resume") and not a.startswith("--out=")]
                launcher = ["python"] if world_size() == 1 else ["torchrun", f"--nproc_per_node={world_size()}"]
                cmd = shlex.join(launcher + [sys.argv[0], *argv, "--out", self.out, "--resume"])
                msg = (f"interrupted{at}; the last checkpoint (step {self.checkpoint}) is in '{self.out}/checkpoint'. "
                       f"Resume with: {cmd}")
            print("\n" + msg, file=sys.stderr, flush=True)  # after the progress bar's line
        os._exit(130)


def save_pretrained(model, tok, path: str, published: bool = False):
    """`save_pretrained` of a model and its tokenizer. `published`: the weights in the dtype the model
    was published in (bf16 for Qwen2.5), else as they are (a checkpoint's fp32 master weights); the
    config records the published dtype either way. Every rank calls it: FSDP gathers the shards."""
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
