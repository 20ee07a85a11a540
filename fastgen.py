"""A decode loop for sampling at the GPU's speed: `--generation fastgen`.

model.generate grows its KV cache token by token and runs a few dozen small kernels per layer per
token, each launched from Python: at batch 64 on a 0.5B model the GPU idles most of a step. This
loop keeps a preallocated KV cache (transformers' StaticCache), runs the prompt once in eager mode,
then repeats one decode step whose shapes never change, so that on CUDA it can be compiled with CUDA
graphs (torch.compile, mode "reduce-overhead": the whole step replays as one graph); it keeps the
stop bookkeeping on the GPU and asks the host whether every row has stopped only every CHECK_EVERY
tokens. On a CPU it runs the same steps eagerly and looks every token.

A captured graph reads its tensors at fixed addresses, so the cache is made once per batch size and
reset before each call (a new one would make the graph record again), at a length that only grows;
on CUDA the batch is padded to a multiple of BATCH_BUCKET rows. Training, evaluation and pass@k
then share one cache and one graph.

It samples what model.generate samples: the next token is drawn from softmax(logits / T), with the
logits in fp32, by the Gumbel-max trick (argmax of logits / T + Gumbel noise, which picks token v
with probability softmax(logits / T)_v); greedy takes the argmax. A row stops at its first stop
token; later positions hold the pad token, as generate's output does. tests/test_fastgen.py checks
the greedy completions against model.generate's on ragged left-padded prompts with rows that stop
early, and the sampled tokens against a reference sampler given the same noise and against the
softmax by their frequencies.

Under bf16 autocast (CUDA) the loop runs a copy of an fp32 model whose linear layers hold the bf16
weights autocast would cast them to at every step, refreshed in place before each call: the same
numbers, a third of the bytes read.
"""

import inspect

import torch

CHECK_EVERY = 32  # decode steps between the host's looks at "has every row stopped?"
BUCKET = 64  # --generation static on CUDA: prompts left-padded to a multiple of this, so that few shapes compile
BATCH_BUCKET = 16  # fastgen on CUDA: rows padded to a multiple of this (one graph for 52 and 64 rows)
CACHE_GROWS_BY = 256  # the cache's length is a multiple of this: a longer prompt grows it rarely


def prompt_bucket(how: str, device: torch.device):
    """The multiple that common.sample pads prompts to: BUCKET for --generation static on CUDA (transformers
    compiles its decode step for each cache length), else None (fastgen's graph is the same for any prompt)."""
    return BUCKET if how == "static" and device.type == "cuda" else None


def _shadow(model):
    """The model generation runs under bf16 autocast: for a model whose weights are fp32, a copy whose linear
    layers hold bf16 weights and biases, the values autocast would cast them to at every step (three bytes read
    per byte used), refreshed in place from the model now (the optimizer has stepped since the last call).
    Embeddings and norms stay fp32 and a tied head stays the embedding, so the numbers are autocast's on the
    model itself; a peft model (bf16 base, fp32 adapters) or a bf16 one is used as it is."""
    p = next(model.parameters())
    if p.dtype != torch.float32 or hasattr(model, "peft_config"):
        return model
    shadow = getattr(model, "_bf16_shadow", None)
    if shadow is None:
        import copy
        shadow = copy.deepcopy(model).eval().requires_grad_(False)
        tied = {id(m.weight) for m in shadow.modules() if isinstance(m, torch.nn.Embedding)}
        for m in shadow.modules():
            if isinstance(m, torch.nn.Linear) and id(m.weight) not in tied:
                m.to(torch.bfloat16)
        object.__setattr__(model, "_bf16_shadow", shadow)  # not a submodule: no parameters of the model
    with torch.no_grad():
        for s, w in zip(shadow.parameters(), model.parameters()):
            s.copy_(w)
    return shadow


def _cache_kwarg(model) -> str:
    """The name of the forward's cache argument: `cache` in recent transformers, `past_key_values` before.
    A peft model's forward passes **kwargs on to the model it wraps: that one's signature decides."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _cache(net, batch: int, length: int):
    """(cache, its length): the model's StaticCache for `batch` rows, reset, at least `length` positions long,
    made again only for a new batch size or a longer length, so that a compiled step finds its tensors where
    it recorded them."""
    from transformers import StaticCache

    caches = getattr(net, "_fastgen_caches", None)
    if caches is None:
        caches = {}
        object.__setattr__(net, "_fastgen_caches", caches)  # not a submodule: no state_dict entry
    if batch not in caches or caches[batch][0] < length:
        caches.pop(batch, None)  # its memory, before the longer one takes its own
        length = -(-length // CACHE_GROWS_BY) * CACHE_GROWS_BY
        caches[batch] = length, StaticCache(config=net.config, max_cache_len=length)
    length, cache = caches[batch]
    cache.reset()  # keys and values zeroed, the write position back to 0
    return cache, length


def _written(cache) -> int:
    """Positions the cache holds. The layers write each forward's keys at their own running count, not at the
    `cache_position` a forward is given (transformers 5.17-5.25's StaticLayer): generate checks the two agree."""
    return int(cache.get_seq_length())


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
             greedy: bool = False, compile: bool = False, batch_bucket: int = 0, shadow: bool = False):
    """Completions (B, T) of left-padded prompts (B, P): T is the longest completion (its stop token
    included), padded with `pad_id` after each row's stop, as model.generate returns them. `compile`:
    the decode step compiled with CUDA graphs (CUDA only), the batch padded to a multiple of `batch_bucket`
    (default: BATCH_BUCKET when compiled, else none). `shadow`: run a bf16 copy of an fp32 model's linear layers
    (the caller's autocast is bf16)."""
    device, rows = prompt_ids.device, prompt_ids.shape[0]
    batch_bucket = batch_bucket or (BATCH_BUCKET if compile else 1)
    if -rows % batch_bucket:  # copies of the last row, dropped at the end: one graph for every size
        extra = -rows % batch_bucket
        prompt_ids = torch.cat([prompt_ids, prompt_ids[-1:].expand(extra, -1)])
        prompt_mask = torch.cat([prompt_mask, prompt_mask[-1:].expand(extra, -1)])
    B, P = prompt_ids.shape
    net = _shadow(model) if shadow else model
    cache_kw = _cache_kwarg(net)
    cache, L = _cache(net, B, P + max_new_tokens)
    attention_mask = torch.zeros(B, L, dtype=prompt_mask.dtype, device=device)  # (B, L) 0 where nothing is written
    attention_mask[:, :P] = prompt_mask
    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)  # (B, P) left padding shifts positions
    out = net(input_ids=prompt_ids, attention_mask=attention_mask[:, :P], position_ids=positions, use_cache=True,
              cache_position=torch.arange(P, device=device), logits_to_keep=1, **{cache_kw: cache})  # the prompt, eager
    logits = out.logits[:, -1].float()  # (B, V)
    step = _compiled() if compile and device.type == "cuda" else _decode_step
    eos = torch.tensor(eos, device=device)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=prompt_ids.dtype, device=device)  # (B, N)
    done = torch.arange(B, device=device) >= rows  # (B,) the padding rows count as stopped
    position = positions[:, -1].clone()  # (B,)
    cache_position = torch.tensor([P], device=device)  # (1,) where this step's key lands: the cache's count
    every = CHECK_EVERY if device.type == "cuda" else 1  # a CPU's look costs nothing
    forwards = 0
    for t in range(max_new_tokens):
        token = torch.where(done, pad_id, pick(logits, temperature, greedy))  # (B,) a stopped row writes pad
        tokens[:, t] = token
        done |= torch.isin(token, eos)
        if t == max_new_tokens - 1 or (t % every == every - 1 and bool(done.all())):
            break
        attention_mask[:, P + t] = 1  # generate's: every row attends to its new position
        position += 1
        cache_position.fill_(P + t)  # in place: the compiled step reads it at its address
        logits = step(net, cache_kw, cache, token, attention_mask, position, cache_position)
        forwards += 1
    if _written(cache) != P + forwards:  # the layers' own count went elsewhere: keys would sit at the wrong slots
        raise RuntimeError(f"fastgen: the KV cache holds {_written(cache)} positions after a prompt of {P} and {forwards} "
                           "decode steps; this transformers version's StaticCache writes elsewhere: use --generation generate")
    tokens = tokens[:rows]
    is_eos = torch.isin(tokens, eos)  # (rows, N)
    lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, max_new_tokens)  # (rows,)
    return tokens[:, :int(lengths.max())]  # (rows, T)
