"""What a reader of grpo.py needs besides grpo.py: no algorithm logic lives here.

Arguments (one @dataclass per script); model loading (LoRA too); batched sampling into a `Rollout`;
the chunked log-prob pass (and two models' full distributions at the same positions); KL estimators
and divergences; evaluation (greedy accuracy, pass@k, ECE, the answers to a few questions). The loop,
the advantages, the loss and what is logged stay in each script. Questions, prompts and rewards are in
tasks.py; what a reader may skip in plumbing.py (torchrun, FSDP, precision) and rundir.py (outputs, checkpoints).

Conventions. A rollout holds B = prompts x G rows, group g being rows g*G .. g*G+G-1. Every per-token
tensor is (B, T) over the T completion positions; `mask` is 1 up to and including the first EOS and 0
after, built from lengths (never from `ids == pad_id`). Helpers never change their inputs in place.
"""

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import fastgen
import plumbing
import tasks

# ----------------------------------------------------------------------------------------------
# Arguments: one @dataclass per script, its fields are the command line.


def arg(default, help: str, toy=None, choices=None):
    """A dataclass field whose help text is its --help line; `toy` is its default for toy models."""
    return dataclasses.field(default=default, metadata=dict(help=help, toy=toy, choices=choices))


MODEL_FIELDS = ("model", "teacher", "small", "large")
LR_FIELDS = ("lr", "small_lr", "large_lr")
HUB_ORGS = {"Qwen": "Qwen", "SmolLM": "HuggingFaceTB"}  # a bare name's family (Qwen2.5-0.5B, SmolLM2-135M): its hub org
LORA_LR_SCALE = 10  # LoRA's best lr is about 10x full fine-tuning's ("LoRA Without Regret", Schulman et al. 2025)


def parse_args(cls, argv=None):
    """Build argparse from the dataclass. Defaults follow the model: when every model named is a
    toy model, fields with a `toy` default take it, unless the flag was given; with --lora-rank the
    learning rates not given are LORA_LR_SCALE times their full fine-tuning defaults."""
    title = " ".join((sys.modules["__main__"].__doc__ or "").strip().split("\n\n")[0].split())  # the first paragraph
    p = argparse.ArgumentParser(description=title, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(cls):
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        toy = ("" if meta.get("toy") is None else f"; toy models: {meta['toy']}") + (
            f"; x{LORA_LR_SCALE} with --lora-rank" if f.name in LR_FIELDS else "")
        help = meta.get("help", "")
        if "default:" not in help:  # a field may say its default in words ("...; default: --dataset's own")
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
    if names and all(tasks.is_toy(n) for n in names):
        for f in dataclasses.fields(cls):
            if f.metadata.get("toy") is not None and f.name not in given:
                setattr(args, f.name, f.metadata["toy"])
        if "dataset" not in given and hasattr(args, "dataset"):  # the first model's own: toy or toy-hard
            args.dataset = tasks.TOY_MODELS[names[0]]
    if hasattr(args, "eval_dataset"):  # defaults that follow --dataset, written to config.json as they are
        args.instruction = tasks.prompt_instruction(args.dataset) if args.instruction is None else args.instruction
        args.eval_dataset = args.eval_dataset or args.dataset
    for name in LR_FIELDS if getattr(args, "lora_rank", 0) > 0 else ():
        if hasattr(args, name) and name not in given:
            setattr(args, name, float(f"{getattr(args, name) * LORA_LR_SCALE:.6g}"))
    return args


# ----------------------------------------------------------------------------------------------
# Models and tokenizers


BUILT_MODEL = "SmolLM2-135M-Instruct"  # the bare name of the model that `python tests/smollm2.py` builds offline


def built_model_dir() -> str:
    """Where `python tests/smollm2.py` builds BUILT_MODEL: $SMOLLM2_DIR, else ($XDG_CACHE_HOME or ~/.cache)/smollm2-tests/."""
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "smollm2-tests")
    return os.environ.get("SMOLLM2_DIR") or os.path.join(cache, BUILT_MODEL)


def resolve_model_name(name: str) -> str:
    """toy name and local directory as they are; the bare BUILT_MODEL its built directory once built (the README's
    build step); a bare Qwen or SmolLM name gets its hub organisation."""
    if tasks.is_toy(name) or os.path.isdir(name) or "/" in name:
        return name
    if name == BUILT_MODEL and os.path.isfile(os.path.join(built_model_dir(), "provenance.json")):
        return built_model_dir()
    return next((f"{org}/{name}" for family, org in HUB_ORGS.items() if re.match(rf"^{family}\d", name)), name)


def check_available(models: list, dataset: str, eval_dataset: Optional[str] = None):
    """Offline, before anything loads: each model and dataset the run needs is local or cached, or one line says so."""
    hub = {resolve_model_name(m): ("build it with `python tests/smollm2.py` (offline)" if m == BUILT_MODEL else
                                   f"did you mean {plumbing.did_you_mean(m)}?" if plumbing.did_you_mean(m) else "")
           for m in models if not (tasks.is_toy(m) or os.path.isdir(resolve_model_name(m)))}
    plumbing.check_offline(hub, {"--dataset": dataset, "--eval-dataset": eval_dataset}, tasks.HUB_DATASETS, tasks.TOY_MODELS)


def load_model(name: str, device: torch.device, gradient_checkpointing: bool = False, frozen: bool = False,
               fsdp: bool = False, lora=None, generation: str = "auto"):
    """(model, tokenizer) from a toy name, a local `save_pretrained` directory or a hub id. Trained models
    keep fp32 master weights; `frozen` ones are in eval mode with no grads and, on CUDA, read in bf16.
    `lora` (`lora_config`): frozen so too, and trained through fp32 adapters (peft); a checkpoint's
    adapter directory loads onto the base it names. `fsdp`: sharded before the whole model reaches the
    device (build the optimizer after). `generation`: how `sample` generates with it (--generation).
    `model.published_dtype`: the dtype the final model is saved in."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per run: ours
    path = tasks.toy_path(name) if tasks.is_toy(name) else resolve_model_name(name)
    adapter = os.path.join(path, "adapter_config.json")  # a LoRA run's checkpoint: its adapters, on its base
    base = json.load(open(adapter))["base_model_name_or_path"] if lora and os.path.isfile(adapter) else path
    try:
        tok = AutoTokenizer.from_pretrained(path)
        published = AutoConfig.from_pretrained(base).dtype or torch.float32  # from_pretrained overwrites it
        dtype = torch.bfloat16 if (frozen or lora) and plumbing.uses_bf16(device) else torch.float32
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    except (OSError, ValueError) as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        if os.path.isdir(path):
            plumbing.die(f"cannot load model '{name}': the directory holds no model that loads ({why})")
        hub = "not on the hub" if plumbing.hub_reachable() else "the hub is unreachable from here"
        typo = plumbing.did_you_mean(name)  # a typo's likely fix: one short line
        plumbing.die(f"model '{name}' is not a local directory or cached, and {hub}: did you mean {typo}?" if typo else
                     f"model '{name}' is not a local directory, not a toy model ({', '.join(tasks.TOY_MODELS)}), not in "
                     f"the local Hugging Face cache, and {hub} ({why}); a hub id looks like Qwen/Qwen2.5-0.5B-Instruct "
                     f"(or Qwen2.5-0.5B-Instruct)")
    tok.padding_side = "left"  # batched generation appends after the prompt
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.published_dtype = getattr(torch, published) if isinstance(published, str) else published
    plumbing.rope_in_autocast_dtype(model)  # bf16 keys in the KV cache
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))
    if frozen:
        model.eval()
    if frozen or lora:
        model.requires_grad_(False)
    if lora:
        import peft
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):  # A's init: --seed's, not the loader's draws
            warnings.simplefilter("ignore", FutureWarning)  # peft's own use of a deprecated transformers name
            torch.manual_seed(lora.init_seed)
            model = (peft.PeftModel.from_pretrained(model, path, is_trainable=True) if base != path
                     else peft.get_peft_model(model, lora))  # fp32 adapters (peft's autocast_adapter_dtype)
        model.published_dtype = model.get_base_model().published_dtype
    model.generation = generation if generation != "auto" else "fastgen" if torch.device(device).type == "cuda" else "generate"
    return (plumbing.apply_fsdp(model, device) if fsdp else model.to(device)), tok


def lora_config(args):
    """The adapters of --lora-rank, --lora-alpha, --lora-target (a peft.LoraConfig), or None: full fine-tuning."""
    if not args.lora_rank:
        return None
    from peft import LoraConfig
    target = args.lora_target if args.lora_target == "all-linear" else [t.strip() for t in args.lora_target.split(",")]
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, target_modules=target, lora_dropout=0.0, bias="none")
    config.init_seed = args.seed  # the adapters start alike in every run of a command (B = 0, A drawn)
    return config


class AdaptersOff:
    """A LoRA model with its adapters off: its base, the initial policy, scored without a second copy."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)

    def __getattr__(self, name):  # get_decoder, get_output_embeddings: the model's own
        return getattr(self.model, name)


def reference(model, name: str, device: torch.device, args):
    """The initial policy, frozen (a KL penalty's reference): LoRA's adapters off, else a frozen copy of `name`."""
    return AdaptersOff(model) if args.lora_rank else load_model(name, device, frozen=True, fsdp=args.fsdp)[0]  # bf16 on CUDA


def shared_vocab(model, tok, other, other_tok, name: str, other_name: str) -> int:
    """The LM-head rows that `model` samples from, once `other` is known to score every one of them: the same
    tokenizer, and at least as many rows (Qwen2.5 7B and up pad to 152,064 rows, 0.5B-3B to 151,936;
    `other`'s extra rows are sliced off its logits)."""
    va, vb = tok.get_vocab(), other_tok.get_vocab()
    if any(va[t] != vb[t] for t in set(va) & set(vb)) or (set(va) ^ set(vb)):
        plumbing.die(f"'{name}' and '{other_name}' have different tokenizers ({len(va)} vs {len(vb)} tokens); "
                     "the per-token log-prob ratios need the same token ids")
    rows, other_rows = (m.get_output_embeddings().weight.shape[0] for m in (model, other))
    if other_rows < rows:
        plumbing.die(f"'{other_name}' has fewer LM-head rows than '{name}' ({other_rows} < {rows}): it cannot score "
                     f"every id that '{name}' can sample")
    return rows


def warn_if_smaller(teacher, student, teacher_name: str, student_name: str, role: str = "teacher", refuse: str = ""):
    """A teacher with fewer parameters than its student runs (a weak teacher is a legitimate
    experiment), with one warning line, since swapped flags are the likelier cause. `refuse`: a flag
    without which such a pair is refused in one line instead (codistill: the small model generates)."""
    n_teacher, n_student = (sum(p.numel() for name, p in m.named_parameters() if "lora_" not in name)  # the adapter's
                            for m in (teacher, student))  # are not the model's: a LoRA student of its own teacher
    if n_teacher < n_student:
        msg = (f"the {role} '{teacher_name}' has fewer parameters than '{student_name}' "
               f"({n_teacher / 1e6:.2f}M < {n_student / 1e6:.2f}M); were the two swapped?")
        if refuse:
            plumbing.die(f"{msg} Pass {refuse} to train them as given")
        print(f"warning: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Sampling


@dataclass
class Rollout:
    """B = prompts x G rows. Prompts are left-padded; the completion mask covers each completion up to
    and including its first EOS; a completion with no EOS was cut by the length limit (truncated)."""
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
        """The rows `idx`, without the padding columns no kept row uses (one long prompt would otherwise widen
        every micro-batch); positions come from the attention mask, so log-probs are unchanged."""
        il = idx.tolist()
        pm = self.prompt_mask[idx]  # (b, P)
        used = pm.any(0)  # (P,)
        S = int(used.int().argmax()) if used.any() else pm.shape[1]  # first prompt column a kept row uses
        T = int(self.lengths[idx].max()) if len(il) else 0
        return Rollout(self.prompt_ids[idx, S:], pm[:, S:], self.completion_ids[idx, :T],
                       self.mask[idx, :T], self.lengths[idx], [self.texts[i] for i in il], self.truncated[idx])

    @staticmethod
    def cat(parts: list, pad_id: int) -> "Rollout":
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

    def to(self, device) -> "Rollout":
        return Rollout(self.prompt_ids.to(device), self.prompt_mask.to(device), self.completion_ids.to(device),
                       self.mask.to(device), self.lengths.to(device), list(self.texts), self.truncated.to(device))


def completion_mask(completion_ids: torch.Tensor, eos: list):
    """(B, T) mask and (B,) lengths from the first EOS (included), and (B,) truncated: the rows with none."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos, device=completion_ids.device))  # (B, T)
    T = completion_ids.shape[1]
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(is_eos[:, 0], T, dtype=torch.long))
    lengths = torch.clamp(first + 1, max=T)  # (B,)
    mask = (torch.arange(T, device=completion_ids.device)[None] < lengths[:, None]).float()  # (B, T)
    return mask, lengths, ~is_eos.any(1)


@torch.no_grad()
def sample(model, tok, prompts: list, group_size: int, max_new_tokens: int, temperature: float = 1.0,
           greedy: bool = False) -> Rollout:
    """Batched generation with the KV cache: each prompt `group_size` times, rows of a group adjacent. Every
    sampling setting is passed explicitly (T, top_p = 1, top_k = 0, no repetition penalty, ...), so a model's
    generation_config cannot change the distribution: the samples are from softmax(logits / T), as on-policy
    estimators assume. The model's `generation` (load_model) picks model.generate, on a static cache or not,
    or fastgen.py's loop; under FSDP, model.generate."""
    from transformers import GenerationConfig

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    how = "generate" if plumbing.is_sharded(model) else getattr(model, "generation", "generate")
    tasks.check_encodable(tok, prompts)  # the toy's tokenizer would drop a letter silently
    bucket = fastgen.prompt_bucket(how, device)  # static on CUDA: prompts padded so that few shapes compile
    enc = tok(prompts, return_tensors="pt", padding=True, pad_to_multiple_of=bucket, add_special_tokens=False).to(device)
    prompt_ids = enc.input_ids.repeat_interleave(group_size, 0)  # (B, P)
    prompt_mask = enc.attention_mask.repeat_interleave(group_size, 0)  # (B, P)
    eos = tasks.eos_ids(model, tok)
    # greedy ignores the sampling knobs; 50 is the top_k that transformers does not warn about then
    knobs = dict(temperature=1.0 if greedy else temperature, top_p=1.0, top_k=50 if greedy else 0, min_p=None,
                 typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
    gen = GenerationConfig(
        do_sample=not greedy, **knobs, repetition_penalty=1.0, no_repeat_ngram_size=0,
        max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=eos, pad_token_id=tok.pad_token_id,
        num_beams=1, use_cache=True, cache_implementation="static" if how == "static" else None)
    with plumbing.generating(model):  # autocast; FSDP: each layer gathered once for the batch, ranks in step
        if how == "fastgen":
            completion_ids = fastgen.generate(model, prompt_ids, prompt_mask, max_new_tokens, eos, tok.pad_token_id,
                                              temperature, greedy, compile=device.type == "cuda",
                                              shadow=plumbing.uses_bf16(device))  # (B, T)
        else:
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen)
            completion_ids = out[:, prompt_ids.shape[1]:]  # (B, T)
    mask, lengths, truncated = completion_mask(completion_ids, eos)
    completion_ids = completion_ids.masked_fill(mask == 0, tok.pad_token_id)
    texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
    model.train(was_training)
    return Rollout(prompt_ids, prompt_mask, completion_ids, mask, lengths, texts, truncated)


# ----------------------------------------------------------------------------------------------
# Per-token log-probs of the sampled tokens


def _lm_head(h, w, temperature: float, vocab: Optional[int]):
    with torch.autocast(h.device.type, enabled=False):  # fp32 under autocast too: bf16 logits are off by up to 2^-9
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
    """fn(*chunk of each tensor in `rows`, *consts) -> tuple of per-row tensors (or None), `chunk_size` rows at
    a time under autocast, concatenated. With grad each chunk is recomputed in backward: only the inputs are
    kept, never a chunk's (n, V) logits. The one chunk loop of the log-prob and full-vocabulary passes."""
    n, outs = len(rows[0]), []
    with plumbing.autocast(rows[0].device):
        for s in range(0, max(n, 1), chunk_size):  # no rows: one empty chunk, outputs of length 0
            args = (*(r[s:s + chunk_size] for r in rows), *consts)
            if torch.is_grad_enabled() and any(torch.is_tensor(a) and a.requires_grad for a in args):
                outs.append(checkpoint(fn, *args, use_reentrant=False))
            else:
                outs.append(fn(*args))
    return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*outs))


def last_hidden_state(model, ids, attn, pos) -> torch.Tensor:
    """The decoder's output (B, S, D), taken by a hook in the model's own forward (FSDP's hooks gather the
    parameters there), with logits at no position and no KV cache."""
    out = []
    hook = model.get_decoder().register_forward_hook(lambda module, args, o: out.append(o.last_hidden_state))
    try:
        model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False,
              logits_to_keep=torch.zeros(0, dtype=torch.long, device=ids.device))
    finally:
        hook.remove()
    return out[0]


def completion_states(model, rollout: Rollout):
    """(h, w): the decoder's state before each completion token, (B*T, D) row-major over (B, T), and the LM
    head (V, D) read after the forward: what the chunked passes turn into logits a chunk at a time."""
    ids, attn = rollout.input_ids(), rollout.attention_mask()  # (B, P+T)
    B, T = rollout.completion_ids.shape
    pos = (attn.cumsum(1) - 1).clamp(min=0)  # (B, P+T) left padding shifts positions
    with plumbing.autocast(ids.device):
        h = last_hidden_state(model, ids, attn, pos)  # (B, P+T, D)
    w = model.get_output_embeddings().weight.float()  # (V, D) fp32 LM head: a bf16 one (frozen, FSDP-gathered) is copied
    return h[:, -T - 1:-1].reshape(B * T, -1), w  # (B*T, D), (V, D)


def token_logprobs(model, rollout: Rollout, temperature: float = 1.0, chunk_size: int = 1024,
                   vocab_size: Optional[int] = None, with_entropy: bool = False, states=None):
    """log pi(o_t | q, o_<t) of each completion token at the sampling temperature, (B, T). The full (B, T, V)
    logits are never held: the LM head runs on `chunk_size` positions at a time (151,936 fp32 logits are
    0.6 MB a position), each chunk recomputed in backward, so training keeps only the hidden states. The
    head and log-softmax run in fp32 under autocast too (a bf16 head is copied: 0.5 GiB for 0.5B).
    `vocab_size` slices the logits (7B Qwen: 152,064 rows, 0.5B: 151,936). `states`: the caller's
    `completion_states` of this model and rollout (a full-vocabulary term on the same forward)."""
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
    """fn(logits (n, V), other_logits (n, V)) -> (n,) tensors, for two models' full distributions at the same
    positions (`completion_states` of each), `chunk_size` at a time, the other under no_grad: (N,) each."""
    (h, w), (h_other, w_other) = states, other_states
    return map_chunks(_paired_chunk, (h, h_other), chunk_size, w, w_other, temperature, vocab_size, fn)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)  # dim None: over every element


def micro_batches(n: int, size: int):
    """Index tensors that split n rows into micro-batches of at most `size`."""
    return [torch.arange(s, min(s + size, n)) for s in range(0, n, size)]


# ----------------------------------------------------------------------------------------------
# Divergences
#
# KL estimators on tokens sampled from p = pi_theta, with log_ratio = log q - log p (q: reference
# or teacher); Schulman, "Approximating KL divergence" (2020); derivations in docs/grpo.md:
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
    """Exact (KL(p||q), KL(q||p), H(p), H(q)) of p = softmax(logits), q = softmax(other_logits), (n,) each: a
    `fn` of `paired_logits`, the gradient through p only."""
    logp, logq = torch.log_softmax(logits, -1), torch.log_softmax(other_logits, -1).detach()  # (n, V)
    p, q = logp.exp(), logq.exp()  # (n, V)
    ent_p, ent_q = -(p * logp).sum(-1), -(q * logq).sum(-1)  # (n,)
    kl_p_q = -ent_p - (p * logq).sum(-1)  # (n,) sum_v p (log p - log q)
    kl_q_p = -ent_q - (q * logp).sum(-1)  # (n,) sum_v q (log q - log p)
    return kl_p_q, kl_q_p, ent_p, ent_q


# f-divergences D_f(q||p) = E_{y~p}[f(u)], u = q(y)/p(y) (docs/opd_plus.md): (f, f').
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
            plumbing.die("--alpha must not be 0 or 1 (those limits are fkl and rkl)")
        a = alpha
        return (lambda u: (u ** (1 - a) - (1 - a) * u - a) / (a * (a - 1))), (lambda u: (1 - u ** (-a)) / a)
    plumbing.die(f"unknown divergence '{name}': use one of {', '.join(DIVERGENCES)}")


def f_of_log_u(name: str, log_u, alpha: float = 0.2):
    """f(u) from log u, finite for any u, for D_f(p||q) = E_{y~q}[f(u)], u = p(y)/q(y), in the forms of
    DPH-RL's code (arXiv 2509.07430): forward u - 1 - log u (E_q = KL(q||p), k3 with the roles swapped),
    js u log u - (u + 1) log((u + 1) / 2) (E_q = 2 JS(p, q)), alpha as f_divergence's. Convex, f(1) = 0."""
    u = torch.exp(log_u)
    if name == "forward":
        return u - 1 - log_u
    if name == "js":  # log((1 + u) / 2) = softplus(log u) - log 2
        return u * log_u - (u + 1) * (F.softplus(log_u) - math.log(2))
    a = alpha
    return (torch.exp((1 - a) * log_u) - (1 - a) * u - a) / (a * (a - 1))


# ----------------------------------------------------------------------------------------------
# Evaluation


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, arXiv 2107.03374):
    1 - C(n-c, k) / C(n, k), the chance that k of the n drawn without replacement hold a correct one."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def answers(model, tok, rows: list, n: int, max_new_tokens: int, batch_size: int, temperature: float = 1.0,
            greedy: bool = False, *, instruction: str, system_prompt: Optional[str] = None, reward=None):
    """This rank's share of `rows` (every world_size-th), each answered n times (tasks.format_prompt's prompts),
    `batch_size` questions a call: yields (indices into rows, Rollout, correct (b, n) bool, grade errors), graded
    by the grader or by `reward`'s function (--reward: correct when the reward is at least 1). Every rank makes as
    many calls (FSDP: they are collective): a short share is padded with index -1 (row 0's), which is not graded
    (correct False, no grade errors) and which the caller does not count."""
    mine = list(range(len(rows)))[plumbing.rank()::plumbing.world_size()]
    mine += [-1] * (-(-len(rows) // plumbing.world_size()) - len(mine))
    for s in range(0, len(mine), batch_size):
        part = mine[s:s + batch_size]
        qs = [rows[max(i, 0)] for i in part]
        prompts = [tasks.format_prompt(tok, r, instruction=instruction, system_prompt=system_prompt) for r in qs]
        ro = sample(model, tok, prompts, n, max_new_tokens, temperature=temperature, greedy=greedy)
        real = [j for j, i in enumerate(part) if i >= 0]
        scores = tasks.rewards_for([ro.texts[j * n + k] for j in real for k in range(n)], [qs[j] for j in real],
                                   reward=reward, prompts=[prompts[j] for j in real])
        correct = torch.zeros(len(part), n, dtype=torch.bool)  # (b, n)
        correct[real] = scores.correct.view(-1, n)
        yield part, ro, correct, scores.grade_errors


@torch.no_grad()
def evaluate(model, tok, rows: list, max_new_tokens: int, pass_n: int = 0, pass_k="1,4,16", batch_size: int = 64,
             ece_bins: int = 0, samples: int = 0, *, instruction: str, system_prompt: Optional[str] = None,
             reward=None) -> tuple:
    """(metrics, samples) of `rows`. Metrics: eval/accuracy (greedy pass@1) and time/eval (seconds). `pass_n` > 0:
    eval/pass@k for each k of `pass_k`, from `pass_n` answers a question sampled at T = 1 (time/eval_pass_at_k
    its cost). `ece_bins` > 0: eval/ece, the expected calibration error of the greedy answer's confidence c_i,
    the probability (T = 1) of its final answer's tokens given what precedes them (tasks.answer_mask), over equal-width
    bins: sum_b |sum_{i in b} (c_i - 1[correct_i])| / N. eval/grade_errors: the answers, greedy and sampled,
    whose grading ran out of time (scored wrong). Samples: the greedy answers to the first `samples` rows
    (tasks.sample_rows, with their `index`), every rank's. Under torchrun each rank answers its share. `reward`:
    --reward's function grades the answers (`answers`)."""
    if not rows:
        return {"eval/accuracy": float("nan")}, []
    ks = plumbing.parse_pass_k(pass_k) if pass_n > 0 else []
    prompting = dict(instruction=instruction, system_prompt=system_prompt, reward=reward)
    device = next(model.parameters()).device
    sums = torch.zeros(2 + len(ks), dtype=torch.float64)  # correct greedy answers, pass@k summed over questions, errors
    shown = []  # (index, completion, correct, truncated) of this rank's first `samples` rows
    gap = torch.zeros(max(ece_bins, 1), dtype=torch.float64, device=device)  # (bins,) sum of c - correct
    with plumbing.Timer() as t_greedy:
        for part, ro, correct, errors in answers(model, tok, rows, 1, max_new_tokens, batch_size, greedy=True,
                                                 **prompting):
            counted = torch.tensor([i >= 0 for i in part], device=device)  # (b,) not padding
            right = correct[:, 0].to(device) & counted  # (b,) grading errors score 0
            sums[0] += right.sum().item()
            sums[-1] += errors
            shown += [(i, ro.texts[j], bool(correct[j, 0]), bool(ro.truncated[j])) for j, i in enumerate(part)
                      if 0 <= i < samples]
            if ece_bins:
                conf = torch.exp((token_logprobs(model, ro) * tasks.answer_mask(tok, ro)).sum(1)).double()  # (b,)
                b = (conf * ece_bins).long().clamp(max=ece_bins - 1)  # (b,)
                gap.index_add_(0, b[counted], (conf - right.double())[counted])
    # the RNG is forked, so that training continues as it would without pass@k (and resumes the same)
    with plumbing.Timer() as t_pass, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for part, _, correct, errors in (answers(model, tok, rows, pass_n, max_new_tokens, max(1, batch_size // pass_n),
                                                 **prompting) if ks else []):
            sums[-1] += errors
            for i, c in zip(part, correct.sum(1).tolist()):
                if i >= 0:
                    sums[1:-1] += torch.tensor([pass_at_k(pass_n, c, k) for k in ks], dtype=torch.float64)
    sums = plumbing.all_sum(sums.to(device)).cpu()
    metrics = {"eval/accuracy": sums[0].item() / len(rows),
               **{f"eval/pass@{k}": v.item() / len(rows) for k, v in zip(ks, sums[1:-1])}, "eval/grade_errors": int(sums[-1])}
    if ece_bins:
        metrics["eval/ece"] = float(plumbing.all_sum(gap).abs().sum()) / len(rows)
    metrics["time/eval"] = t_greedy.seconds + t_pass.seconds
    if ks:
        metrics["time/eval_pass_at_k"] = t_pass.seconds
    shown = sorted(x for got in plumbing.all_gather(shown) for x in got) if samples else []  # in index order
    return metrics, [dict(index=i, **tasks.sample_rows(rows[i], [t], [c], truncated=[cut])[0]) for i, t, c, cut in shown]
