"""The run's directory, a second part of the plumbing that a reader of the scripts may skip.

`Run` is DIR = --out and what a run writes there: config.json, metrics.jsonl (line by line),
samples.jsonl (what the model wrote: Run.log_samples), checkpoint/ (what --resume needs: every model,
optimizer, sampler and RNG state), final/ (the trained models, in fp32 unless their published dtype
loses nothing), and what a stage computed once (Run.once). It also knows what Ctrl-C and a NaN stop
must say: the last step logged and the last checkpoint. `Trackers` sends the same numbers and samples
to --report-to.
"""

import dataclasses
import importlib.util
import json
import math
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import plumbing



def exit_on_interrupt():
    """Ctrl-C (SIGINT) stops the script with one line instead of a traceback (a script's __main__ asks);
    a Run, once made, takes the signal over to name its checkpoint and the command that resumes it."""
    signal.signal(signal.SIGINT, _interrupted_before_the_run)


def _interrupted_before_the_run(signum, frame):
    if plumbing.rank() == 0:
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
        self.step = self.checkpoint = self.f = self.samples_f = None
        self.samples_on = getattr(args, "log_samples", 0) > 0  # --log-samples 0: no samples.jsonl
        self.saving, self.interrupted, self.resuming, self.firsts, self.lasts = False, False, args.resume, {}, {}
        self.saved_at, self.save_seconds = time.monotonic(), 0.0  # the last checkpoint's end (or the start), its cost
        self.trackers = Trackers(args.report_to, args.wandb_project or name, out)  # a missing package: one line now
        if signal.getsignal(signal.SIGINT) is _interrupted_before_the_run:  # the script asked for one line
            signal.signal(signal.SIGINT, self._on_interrupt)
        if plumbing.rank() != 0:
            return
        checkpoint, finished = (os.path.exists(os.path.join(out, d)) for d in ("checkpoint", "final"))
        if args.resume and not os.path.exists(os.path.join(out, "checkpoint", "state.pt")):
            plumbing.die(f"--resume: '{out}' does not exist: --out names the run to continue" if not os.path.isdir(out) else
                         f"--resume: no checkpoint in '{out}/checkpoint' to resume from" + (
                             "" if checkpoint or finished else ": the run stopped before its first one, so run the same "
                                                               "command without --resume to start it again"))
        if (checkpoint or finished) and not args.resume:
            plumbing.die(f"'{out}' already holds a run: pass --resume to continue it, or choose another --out")
        config = os.path.join(out, "config.json")
        old = json.load(open(config)) if args.resume and os.path.isfile(config) else {}
        changed = [k for k in ("model", "small", "large", "lora_rank", "lora_target")
                   if k in old and old[k] != getattr(args, k)]
        if changed:  # the checkpoint's models would not load as these
            plumbing.die(f"--resume: '{out}' was made with " + ", ".join(f"--{k.replace('_', '-')} {old[k]}" for k in changed)
                         + ": resume with the same")
        try:  # a run stopped before its first checkpoint left only metrics: it starts again, in their place
            os.makedirs(out, exist_ok=True)
            for name in ("metrics.jsonl", "samples.jsonl"):
                if os.path.exists(os.path.join(out, name)) and not args.resume:
                    os.remove(os.path.join(out, name))
            with open(os.path.join(out, "config.json"), "w") as f:
                json.dump(dataclasses.asdict(args), f, indent=2)
            self.trackers.open(dataclasses.asdict(args), args.resume)  # W&B's login fails here, before any loading
        except OSError as e:
            plumbing.die(f"cannot write the output directory '{out}' ({e.strerror}): choose another --out")

    def checkpoint_dir(self, name: str) -> str:
        """Where the checkpoint keeps the model `name` (a save_pretrained directory, loadable as a model)."""
        return os.path.join(self.out, "checkpoint", name)

    # metrics.jsonl

    def log(self, step: int, metrics: dict):
        """One line of metrics.jsonl, appended and flushed, and the same numbers to each --report-to tracker (rank 0)."""
        self.step = step
        if plumbing.rank() != 0:
            return
        if self.f is None:
            self.f = open(os.path.join(self.out, "metrics.jsonl"), "a")
        row = {"step": step}
        row.update({k: (float(v) if isinstance(v, (torch.Tensor, np.floating)) else v) for k, v in metrics.items()})
        for k, v in row.items():
            self.firsts.setdefault(k, v)
        self.lasts.update(row)
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        self.trackers.log(step, metrics=row)

    def first(self, key: str) -> float:
        """The first value logged under `key` in this run, resumed lines included (nan if none)."""
        return self.firsts.get(key, float("nan"))

    def last(self, key: str) -> float:
        """The latest value logged under `key` in this run, resumed lines included (nan if none)."""
        return self.lasts.get(key, float("nan"))

    # samples.jsonl

    def log_samples(self, step: int, kind: str, rows: list):
        """What the model wrote (tasks.sample_rows): lines of DIR/samples.jsonl, {"step", "kind", **row}, appended and
        flushed, and one table per (step, kind) to each --report-to tracker (rank 0); the first "eval" row also on the
        console above the progress bar, in one line cut to the terminal's width. `kind`: "eval" (the held-out
        questions' greedy answers), "train" (a group of the step's rollouts) or a script's own. --log-samples 0: none."""
        if plumbing.rank() != 0 or not self.samples_on or not rows:
            return
        rows = [{"step": step, "kind": kind, **{k: plain(v) for k, v in r.items()}} for r in rows]
        if self.samples_f is None:
            self.samples_f = open(os.path.join(self.out, "samples.jsonl"), "a")
        self.samples_f.writelines(json.dumps(r) + "\n" for r in rows)
        self.samples_f.flush()
        self.trackers.table(step, f"samples/{kind}", rows)
        if kind == "eval":
            tqdm.write(sample_line(rows[0], shutil.get_terminal_size().columns))

    def close(self):
        for f in (self.f, self.samples_f):
            if f is not None:
                f.close()
        self.trackers.close()

    # checkpoints and the final model

    def checkpoint_due(self, step: int, args) -> bool:
        """Whether to checkpoint after `step`: every --save-every steps, after the last, and once --save-minutes have
        passed since the last checkpoint (or the start), at least 20 times as long as it took (saving then takes at
        most 5% of the run): a slow run's Ctrl-C keeps that much. --save-every 0: never. Rank 0's clock decides."""
        if not args.save_every:
            return False
        late = args.save_minutes > 0 and time.monotonic() - self.saved_at >= max(60 * args.save_minutes,
                                                                                   20 * self.save_seconds)
        late = plumbing.all_gather(late)[0] if args.save_minutes > 0 else False  # the ranks save together
        return step % args.save_every == 0 or step == args.steps or late

    def save_checkpoint(self, step: int, models: dict, optimizers: dict, sampler):
        """DIR/checkpoint: each model of `models` (name: (model, tokenizer)), the optimizer states (keyed by
        parameter name: data-parallel and FSDP runs read each other's), every rank's RNG states, the
        sampler, the step; written to a temporary directory first, so a kill mid-save keeps the last one.
        Every rank calls it (FSDP gathers shards)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        t0 = time.monotonic()
        rng = dict(torch=torch.get_rng_state(), np=np.random.get_state(), py=random.getstate(),
                   cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        rngs = [rng]
        if dist.is_initialized():
            rngs = [None] * plumbing.world_size() if plumbing.rank() == 0 else None
            dist.gather_object(rng, rngs, dst=0)
        tmp, final = os.path.join(self.out, "checkpoint.tmp"), os.path.join(self.out, "checkpoint")
        if plumbing.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        for name, (model, tok) in models.items():
            save_pretrained(model, tok, os.path.join(tmp, name))  # also reshards: the optimizers' parameters
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optimizer_states = {k: get_optimizer_state_dict(models[k][0], o, options=full) for k, o in optimizers.items()}
        if plumbing.rank() != 0:
            return
        state = dict(step=step, optimizers=optimizer_states, sampler=sampler.state_dict(), rng=rngs)
        torch.save(state, os.path.join(tmp, "state.pt"))
        self.saving = True  # Ctrl-C waits for the swap: there is always one whole checkpoint
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self.saving, self.checkpoint = False, step
        self.saved_at, self.save_seconds = time.monotonic(), time.monotonic() - t0
        if self.interrupted:
            self._exit_interrupted()

    def resume(self, models: dict, optimizers: dict, sampler) -> int:
        """Restore optimizer, sampler and RNG states from DIR/checkpoint, drop the metric and sample lines after
        its step (no step is lost or repeated) and return it; the script loaded the models (name: model)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = torch.load(os.path.join(self.out, "checkpoint", "state.pt"), weights_only=False, mmap=True)
        if len(state["rng"]) != plumbing.world_size():
            plumbing.die(f"the checkpoint in '{self.out}' was written by {len(state['rng'])} processes: resume with as many "
                         f"(now {plumbing.world_size()})")
        for k, o in optimizers.items():
            set_optimizer_state_dict(models[k], o, state["optimizers"][k], options=StateDictOptions(full_state_dict=True))
        sampler.load_state_dict(state["sampler"])
        self.checkpoint = step = state["step"]
        rng = state["rng"][plumbing.rank()]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["np"])
        random.setstate(rng["py"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if plumbing.rank() == 0:
            print(f"resuming '{self.out}' after step {step}, its checkpoint's", file=sys.stderr, flush=True)
            rows, samples = self._drop_after("metrics.jsonl", step), self._drop_after("samples.jsonl", step)
            self.trackers.sent = ({(r["step"], k) for r in rows for k in r}  # before the interruption too
                                  | {(r["step"], f"samples/{r['kind']}") for r in samples})
            rows = [r for r in rows if r["step"] <= step]
            self.firsts = {k: v for r in reversed(rows) for k, v in r.items()}
            self.lasts = {k: v for r in rows for k, v in r.items()}
        return step

    def _drop_after(self, name: str, step: int) -> list:
        """Drop the lines of DIR/<name> (JSON lines) after `step`; return every line's row, as read before."""
        path = os.path.join(self.out, name)
        if not os.path.exists(path):
            return []
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        rows = [json.loads(line) for line in lines]
        with open(path, "w") as f:
            f.writelines(line for line, r in zip(lines, rows) if r["step"] <= step)
        return rows

    def once(self, name: str, what: str, settings: dict, make):
        """make(), computed once per run and kept in DIR/<name>.pt with the `settings` (flag: value) it was
        made with; --resume reads it back (the checkpoint's models did not make it), with the same settings."""
        path = os.path.join(self.out, name + ".pt")
        if self.resuming:
            if not os.path.exists(path):
                plumbing.die(f"--resume: no {what} in '{path}'; the checkpoint's policy is not the one that made it")
            saved = torch.load(path, weights_only=False)
            changed = [k for k in settings if saved["settings"].get(k) != settings[k]]
            if changed:
                plumbing.die(f"--resume: '{path}' was made with other {'/'.join(changed)}: resume with the same")
            return saved["value"]
        value = make()
        if plumbing.rank() == 0:
            torch.save(dict(settings=settings, value=value), path + ".tmp")
            os.replace(path + ".tmp", path)
        return value

    def save_final(self, models: dict):
        """DIR/final (one model, name "") or DIR/final/<name>: in the dtype each was published in when that
        loses nothing, else in fp32 (save_pretrained; every rank calls it). A LoRA model is saved merged in fp32,
        loadable without peft, with its adapter (exact, fp32) in final/.../adapter. The model is spent after."""
        for name, (model, tok) in models.items():
            path = os.path.join(self.out, "final", name) if name else os.path.join(self.out, "final")
            if hasattr(model, "merge_and_unload"):  # peft
                save_pretrained(model, tok, os.path.join(path, "adapter"))
                if plumbing.rank() != 0:  # no FSDP with LoRA: rank 0 holds the whole model and writes it
                    continue
                # W + (alpha / r) B A in fp32, on the host: merged into a bf16 base (CUDA) most of it rounds away
                model = model.to("cpu", torch.float32).merge_and_unload()
            save_pretrained(model, tok, path, published=True)

    # stops

    def check_finite(self, loss: torch.Tensor, step: int):
        """Stop every rank on a NaN or inf loss (the step's loss summed over ranks)."""
        loss = plumbing.all_sum(loss.detach())
        if not torch.isfinite(loss):
            plumbing.die(f"loss is {loss.item()} at step {step}; stopping. The last checkpoint is in '{self.out}/checkpoint'")

    def _on_interrupt(self, signum, frame):
        if self.saving:
            self.interrupted = True
        else:
            self._exit_interrupted()

    def _exit_interrupted(self):
        """One line: where the last checkpoint is and the command that resumes it (or, before the first one, the
        command that starts the run again in its directory: without --out each command makes a new one)."""
        if plumbing.rank() == 0:
            at = "" if self.step is None else f" after step {self.step}"
            argv = [a for prev, a in zip(sys.argv, sys.argv[1:])  # the same command, then --out DIR (--resume)
                    if prev != "--out" and a not in ("--out", "--resume", "--no-resume") and not a.startswith("--out=")]
            n = plumbing.world_size()
            launcher = ["python"] if n == 1 else ["torchrun", f"--nproc_per_node={n}"]
            cmd = shlex.join(launcher + [sys.argv[0], *argv, "--out", self.out] + ["--resume"] * (self.checkpoint is not None))
            if self.checkpoint is None:
                msg = (f"interrupted{at}, before the first checkpoint (--save-every, --save-minutes): nothing to resume; "
                       f"to start the run again in '{self.out}': {cmd}")
            else:
                msg = (f"interrupted{at}; the last checkpoint (step {self.checkpoint}) is in '{self.out}/checkpoint'. "
                       f"Resume with: {cmd}")
            print("\n" + msg, file=sys.stderr, flush=True)  # after the progress bar's line
        os._exit(130)


class Trackers:
    """--report-to: none, tensorboard, wandb, or tensorboard,wandb. Every number of metrics.jsonl goes to each,
    at its step: TensorBoard event files in DIR/tensorboard, a W&B run named after DIR in the --wandb-project
    (WANDB_MODE=offline is W&B's own), with config.json's arguments as its config; samples.jsonl's rows as
    tables (`table`). A resumed run continues the same curves (the same W&B run) and never sends a (step,
    key) it sent before."""

    PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to name: the package it needs

    def __init__(self, spec: str, project: str, out: str):
        self.names = [n.strip() for n in spec.split(",") if n.strip() not in ("", "none")]
        bad = [n for n in self.names if n not in self.PACKAGES]
        if bad:
            plumbing.die(f"--report-to {spec}: unknown {', '.join(bad)}; use none, tensorboard, wandb or tensorboard,wandb")
        for n in self.names:
            if importlib.util.find_spec(self.PACKAGES[n]) is None:
                plumbing.die(f"--report-to {n} needs the {n} package, which is not installed: pip install {n}")
        self.project, self.out, self.sent, self.writer, self.wandb = project, out, set(), None, None

    def log(self, step: int, metrics: dict):
        new = {k: v for k, v in metrics.items() if k != "step" and (step, k) not in self.sent}
        if self.writer is not None:
            for k, v in new.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()  # what a hard kill leaves is what metrics.jsonl holds
        if self.wandb is not None and new:
            self.wandb.log(new, step=step)

    def table(self, step: int, key: str, rows: list):
        """`rows` (dicts) as one table under `key` at `step`: TensorBoard text (a markdown table) and a W&B Table."""
        if (step, key) in self.sent:
            return
        columns = list(dict.fromkeys(k for r in rows for k in r))
        if self.writer is not None:
            self.writer.add_text(key, markdown_table(columns, rows), step)
            self.writer.flush()
        if self.wandb is not None:
            import wandb
            data = [[r.get(c) for c in columns] for r in rows]
            self.wandb.log({key: wandb.Table(columns=columns, data=data, allow_mixed_types=True)}, step=step)

    def open(self, config: dict, resuming: bool):
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(self.out, "tensorboard"))
            if not resuming:
                self.writer.add_text("config", "    " + json.dumps(config, indent=2).replace("\n", "\n    "))
        if "wandb" in self.names:
            import wandb
            id_path = os.path.join(self.out, "wandb-id")  # the same W&B run when resumed
            run_id = open(id_path).read().strip() if os.path.exists(id_path) else secrets.token_hex(4)
            with open(id_path, "w") as f:
                f.write(run_id)
            try:
                self.wandb = wandb.init(project=self.project, name=os.path.basename(os.path.normpath(self.out)), id=run_id,
                                        dir=self.out, resume="allow", config=None if resuming else config)
            except Exception as e:  # no login, no network: W&B's own error, in one line
                plumbing.die(f"--report-to wandb: {type(e).__name__}: {str(e).splitlines()[0][:200]} (log in with "
                             "`wandb login` or WANDB_API_KEY, or run with WANDB_MODE=offline)")

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def plain(v):
    """A value as JSON holds it: a tensor's or numpy number's Python value; nan and inf as None."""
    if isinstance(v, (torch.Tensor, np.generic)):
        v = v.item()
    return None if isinstance(v, float) and not math.isfinite(v) else v


def sample_line(row: dict, width: int) -> str:
    """One row of samples.jsonl on one line of `width` characters: the verdict first (a completion can be long)."""
    who = f" {row['model']}" if "model" in row else ""  # codistill: small or large
    text = " ".join(f"step {row['step']}{who} sample: {'right' if row['correct'] else 'wrong'}, answer {row['answer']}, gold "
                    f"{row['gold']} | {row['question']} | {row['completion']}".split())
    return text if len(text) <= width else text[:max(width - 4, 0)] + " ..."


def markdown_table(columns: list, rows: list) -> str:
    """A markdown table whose cells show their text as it is (markdown's characters escaped, newlines as <br>)."""
    cell = lambda v: re.sub(r"([\\`*_{}\[\]()>#+\-.!|])", r"\\\1", "" if v is None else str(v)).replace("\n", "<br>")
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
                     + ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows])


def save_pretrained(model, tok, path: str, published: bool = False):
    """`save_pretrained` of a model and its tokenizer. `published`: the weights in the dtype the model was
    published in (bf16 for Qwen2.5) if they are all exact in it (an untrained model), else as they are: a
    trained model's fp32 weights, since bf16 would round away most of an update of RL's size (docs/precision.md);
    the config then says fp32. Not `published` (a checkpoint): as they are (fp32 master weights), the config
    recording the published dtype. Every rank calls it: FSDP gathers the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    plumbing.reshard(model)  # FSDP: the model holds its shards again (the root stays gathered after a forward)
    dtype = getattr(model, "published_dtype", None) or next(model.parameters()).dtype
    cast = published and dtype != next(model.parameters()).dtype
    state = None
    if plumbing.is_sharded(model):
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif cast and plumbing.rank() == 0:
        state = model.state_dict()
    if state is not None:
        first = {}  # the copies of a tied weight are separate tensors: keep its first name only
        for name, p in model.named_parameters(remove_duplicate=False):
            if first.setdefault(id(p), name) != name:
                state.pop(name, None)
    if plumbing.rank() == 0:
        if cast and not all(torch.equal(v.to(dtype).to(v.dtype), v) for v in state.values()):
            dtype, cast = next(model.parameters()).dtype, False  # the cast would lose part of the training
        if cast:
            state = {k: v.to("cpu", dtype) for k, v in state.items()}  # one tensor at a time to the host
        model.save_pretrained(path, state_dict=state)
        model.config.dtype = dtype  # save_pretrained wrote the dtype of the weights in memory
        model.config.save_pretrained(path)
        tok.save_pretrained(path)
