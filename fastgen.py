"""A decode loop for sampling at the GPU's speed: `--generation fastgen`.

model.generate grows its KV cache token by token and runs a few dozen small kernels per layer per
token, each launched from Python: at batch 64 on a 0.5B model the GPU idles most of a step. This
loop preallocates the cache (transformers' StaticCache, sized to the prompt plus --max-new-tokens),
runs the prompt once in eager mode, then repeats one decode step whose shapes never change, so that
on CUDA it can be compiled with CUDA graphs (torch.compile, mode "reduce-overhead": the whole step
replays as one graph); it keeps the stop bookkeeping on the GPU and asks the host whether every row
has stopped only every CHECK_EVERY tokens. On a CPU it runs the same steps eagerly and looks every token.

It samples what model.generate samples: the next token is drawn from softmax(logits / T), with the
logits in fp32, by the Gumbel-max trick (argmax of logits / T + Gumbel noise, which picks token v
with probability softmax(logits / T)_v); greedy takes the argmax. A row stops at its first stop
token; later positions hold the pad token, as generate's output does. tests/test_fastgen.py checks
the greedy completions against model.generate's on ragged left-padded prompts with rows that stop
early, and the sampled tokens against a reference sampler given the same noise and against the
softmax by their frequencies.

On CUDA the decode step reads a bf16 copy of the trained model's fp32 weights (autocast would cast
them at every step: three bytes read per byte used), refreshed in place before each call, since a
captured graph reads its weights at fixed addresses. Not run on a GPU yet: README, "The GPU check".
"""

import inspect

import torch

CHECK_EVERY = 32  # decode steps between the host's looks at "has every row stopped?"
BUCKET = 64  # on CUDA prompts are left-padded to a multiple of this, so that few shapes are compiled


def _shadow(model):
    """The model generation runs: on CUDA, a bf16 copy of a model whose weights are fp32 (refreshed in
    place from them now: the optimizer has stepped since the last call); the model itself otherwise."""
    p = next(model.parameters())
    if p.device.type != "cuda" or p.dtype != torch.float32 or hasattr(model, "peft_config"):
        return model
    shadow = getattr(model, "_bf16_shadow", None)
    if shadow is None:
        import copy
        shadow = copy.deepcopy(model).to(torch.bfloat16).eval().requires_grad_(False)
        object.__setattr__(model, "_bf16_shadow", shadow)  # not a submodule: no parameters of the model
    with torch.no_grad():
        for s, w in zip(shadow.parameters(), model.parameters()):
            s.copy_(w)
    return shadow


def _cache_kwarg(model) -> str:
    """The name of the forward's cache argument: `cache` in recent transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _decode_step(model, cache_kw, cache, token, attention_mask, position, cache_position):
    """One token per row through the model, its next-token logits (B, V) in fp32. Every argument keeps its
    shape and address from step to step: what a CUDA graph needs."""
    out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position[:, None],
                cache_position=cache_position, use_cache=True, logits_to_keep=1, **{cache_kw: cache})
    return out.logits[:, -1].float()


_COMPILED = []


def _compiled():
    """_decode_step compiled once per process, with CUDA graphs (each new shape is captured once)."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(_decode_step, mode="reduce-overhead"))
    return _COMPILED[0]


def pick(logits, temperature: float, greedy: bool, noise=None):
    """The next token of each row from its fp32 logits (B, V): the argmax when greedy, else a draw from
    softmax(logits / T) by Gumbel-max, with `noise` (B, V) standard Gumbel draws when given."""
    if greedy:
        return logits.argmax(-1)  # (B,)
    if noise is None:
        u = torch.rand_like(logits).clamp_(min=torch.finfo(logits.dtype).tiny)  # (B, V) in (0, 1)
        noise = -torch.log(-torch.log(u))  # (B, V) Gumbel(0, 1)
    return (logits / temperature + noise).argmax(-1)  # (B,)


@torch.no_grad()
def generate(model, prompt_ids, prompt_mask, max_new_tokens: int, eos: list, pad_id: int, temperature: float = 1.0,
             greedy: bool = False, compile: bool = False):
    """Completions (B, T) of left-padded prompts (B, P): T is the longest completion (its stop token
    included), padded with `pad_id` after each row's stop, as model.generate returns them. `compile`:
    the decode step compiled with CUDA graphs (CUDA only)."""
    from transformers import StaticCache

    device = prompt_ids.device
    if compile and -prompt_ids.shape[1] % BUCKET:  # a bucketed length: the compiled shapes repeat
        extra = -prompt_ids.shape[1] % BUCKET
        prompt_ids = torch.nn.functional.pad(prompt_ids, (extra, 0), value=pad_id)
        prompt_mask = torch.nn.functional.pad(prompt_mask, (extra, 0), value=0)
    B, P = prompt_ids.shape
    net = _shadow(model)
    cache_kw = _cache_kwarg(net)
    cache = StaticCache(config=net.config, max_cache_len=P + max_new_tokens)
    attention_mask = torch.zeros(B, P + max_new_tokens, dtype=prompt_mask.dtype, device=device)  # (B, P + N)
    attention_mask[:, :P] = prompt_mask
    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)  # (B, P) left padding shifts positions
    out = net(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
              cache_position=torch.arange(P, device=device), logits_to_keep=1, **{cache_kw: cache})  # the prompt, eager
    logits = out.logits[:, -1].float()  # (B, V)
    step = _compiled() if compile and device.type == "cuda" else _decode_step
    eos = torch.tensor(eos, device=device)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=prompt_ids.dtype, device=device)  # (B, N)
    done = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
    position = positions[:, -1].clone()  # (B,)
    cache_position = torch.tensor([P], device=device)  # (1,)
    every = CHECK_EVERY if device.type == "cuda" else 1  # a CPU's look costs nothing
    for t in range(max_new_tokens):
        token = torch.where(done, pad_id, pick(logits, temperature, greedy))  # (B,) a stopped row writes pad
        tokens[:, t] = token
        done |= torch.isin(token, eos)
        if t == max_new_tokens - 1 or (t % every == every - 1 and bool(done.all())):
            break
        attention_mask[:, P + t] = 1  # generate's: every row attends to its new position
        position += 1
        cache_position.fill_(P + t)  # in place: a graph reads it at its address
        logits = step(net, cache_kw, cache, token, attention_mask, position, cache_position)
    is_eos = torch.isin(tokens, eos)  # (B, N)
    lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, max_new_tokens)  # (B,)
    return tokens[:, :int(lengths.max())]  # (B, T)
