"""A decode loop for sampling at the GPU's speed: `--generation fastgen`.

model.generate grows its KV cache token by token and runs a few dozen small kernels per layer per
token, each launched from Python: at batch 64 on a 0.5B model the GPU idles most of a step. This
loop keeps a preallocated KV cache (transformers' StaticCache), runs the prompt once in eager mode,
then repeats one decode step whose shapes never change, so that on CUDA it can be compiled with CUDA
graphs (torch.compile, mode "reduce-overhead": the whole step replays as one graph); it keeps the
stop bookkeeping on the GPU and asks the host whether every row has stopped only every CHECK_EVERY
tokens. On a CPU it runs the same steps eagerly and looks every token.

A captured graph reads its tensors at fixed addresses, so the cache and the step's inputs (_Buffers)
are made once per batch size and reset before each call (new ones would make the graph record again),
at a length that only grows; on CUDA the batch is padded to a multiple of BATCH_BUCKET rows. Training,
evaluation and pass@k then share one cache and one graph.

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

Switches (below) change how the step runs, not what it computes; each is off until a GPU's
measurement (bench.py --fastgen-check, docs/gpu.md) says it pays.
"""

import copy
import dataclasses
import functools
import inspect
import sys

import torch

CHECK_EVERY = 32  # decode steps between the host's looks at "has every row stopped?"
BUCKET = 64  # --generation static on CUDA: prompts left-padded to a multiple of this, so that few shapes compile
BATCH_BUCKET = 16  # fastgen on CUDA: rows padded to a multiple of this (one graph for 52 and 64 rows)
CACHE_GROWS_BY = 256  # the cache's length is a multiple of this: a longer prompt grows it rarely
MAX_STOP_TOKENS = 16  # the stop tokens sit in a buffer of this size (a graph reads it at its address)
WARMUP_STEPS = 2  # capture: real steps of a shape before its graph is recorded (compilation, cuBLAS's choices)
CAPTURE_DEVICES = ("cuda",)  # where the capture switch records graphs (tests add "cpu", with a stand-in _Graph)
COMPILE_DEVICES = ("cuda",)  # where compile=True compiles (a test adds "cpu", to count layerwise's graphs)
LAYERWISE_MODELS = ("llama", "qwen2")  # the model types whose decoder layer fastgen's own (_layer) computes


@dataclasses.dataclass(frozen=True)
class Switches:
    """How the decode step runs. Every switch computes the same tokens (tests/test_fastgen.py); they differ in
    the bytes a step moves, the kernels it launches and the host's work between two steps."""
    grouped: bool = False  # decode attention: each KV head read once by the query heads it serves, no repeat_kv copy
    kv_bucket: int = 64  # grouped: attention reads the filled slots rounded up to a multiple of this, not the cache
    bf16_head: bool = False  # the bf16 copy gets its own bf16 LM head: a tied fp32 head is cast by autocast every step
    sample_in_step: bool = False  # the Gumbel draw and the stop bookkeeping inside the compiled step
    capture: bool = False  # CUDA: the step recorded by hand as one CUDA graph and replayed: no guards, no graph trees
    fused: bool = False  # the bf16 copy computes q/k/v and gate/up as one matmul each
    layerwise: bool = False  # decode runs fastgen's own decoder layer (llama, qwen2), compiled once for all layers

    @classmethod
    def parse(cls, names: str) -> "Switches":
        """'grouped,bf16_head,...' (names of the boolean fields, comma-separated) as Switches."""
        known = [f.name for f in dataclasses.fields(cls) if f.type in (bool, "bool")]
        wanted = [n for n in names.split(",") if n]
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise ValueError(f"unknown fastgen switch {', '.join(unknown)}; known: {', '.join(known)}")
        return cls(**{n: True for n in wanted})


SWITCHES = Switches()  # what --generation fastgen runs (bench.py sets others to compare them)
LADDER = ["grouped", "bf16_head", "sample_in_step", "capture", "fused", "layerwise"]  # bench.py adds them one by one


def prompt_bucket(how: str, device: torch.device):
    """The multiple that common.sample pads prompts to: BUCKET for --generation static on CUDA (transformers
    compiles its decode step for each cache length), else None (fastgen's graph is the same for any prompt)."""
    return BUCKET if how == "static" and device.type == "cuda" else None


def _shadow(model, switches: Switches = SWITCHES):
    """The model generation runs under bf16 autocast: for a model whose weights are fp32, a copy whose linear
    layers hold bf16 weights and biases, the values autocast would cast them to at every step (three bytes read
    per byte used), refreshed in place from the model now (the optimizer has stepped since the last call).
    Embeddings and norms stay fp32 and a tied head stays the embedding (with `bf16_head`, a bf16 copy of it),
    so the numbers are autocast's on the model itself; a peft model (bf16 base, fp32 adapters) or a bf16 one
    is used as it is. Made again when the switches that shape it change."""
    p = next(model.parameters())
    if p.dtype != torch.float32 or hasattr(model, "peft_config"):
        return model
    key = (switches.bf16_head, switches.fused)
    shadow = getattr(model, "_bf16_shadow", None)
    if shadow is None or shadow._fastgen_key != key:
        model.__dict__.pop("_bf16_shadow", None)  # the old copy (and its caches and graphs) goes, not into the new one
        shadow = _make_shadow(model, *key)
        object.__setattr__(model, "_bf16_shadow", shadow)  # not a submodule: no parameters of the model
    with torch.no_grad():
        for copy_to, source in shadow._fastgen_sources:
            copy_to.copy_(source)
    return shadow


def _make_shadow(model, bf16_head: bool, fused: bool):
    """The bf16 copy, and the (its tensor, the model's tensor) pairs that refresh it."""
    skip = {id(v): None for k, v in model.__dict__.items() if k == "_fastgen_caches"}  # the model's own caches
    shadow = copy.deepcopy(model, memo=skip).eval().requires_grad_(False)
    shadow.__dict__.pop("_fastgen_caches", None)
    tied = {id(m.weight) for m in shadow.modules() if isinstance(m, torch.nn.Embedding)}
    for m in shadow.modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in tied:
            m.to(torch.bfloat16)
    names = dict(model.named_parameters())
    sources = [(s, names[n]) for n, s in shadow.named_parameters()]
    head = shadow.get_output_embeddings()
    if bf16_head and id(head.weight) in tied:  # untied in the copy alone: the embedding lookup keeps fp32 rows
        head.weight = torch.nn.Parameter(head.weight.detach().to(torch.bfloat16), requires_grad=False)
        sources.append((head.weight, model.get_output_embeddings().weight))
    if fused:
        sources = _fuse(shadow, sources)
    shadow._fastgen_key, shadow._fastgen_sources = (bf16_head, fused), sources
    return shadow


def _fuse(shadow, sources):
    """Each attention's q/k/v and each MLP's gate/up projections as one Linear (rows stacked): one matmul, one
    read of the layer's input. The refresh pairs of the parts then point at row slices of the fused weights."""
    parts = {}  # id(a part's parameter) -> the fused parameter's rows that replace it
    for layer in shadow.model.layers:
        for owner, names, wrap in ((layer, "self_attn", _FusedAttention), (layer, "mlp", _FusedMLP)):
            module = getattr(owner, names)
            fused = wrap(module)
            for part, rows in fused.parts:
                parts[id(part)] = rows
            setattr(owner, names, fused)
    return [(parts.get(id(s), s), source) for s, source in sources]


def _stack(*linears):
    """One Linear whose output is the linears' outputs side by side, and (a part's parameter, its rows) pairs."""
    out = torch.nn.Linear(linears[0].in_features, sum(m.out_features for m in linears), bias=linears[0].bias is not None,
                          dtype=linears[0].weight.dtype, device=linears[0].weight.device).requires_grad_(False)
    parts, start = [], 0
    for m in linears:
        rows = slice(start, start + m.out_features)
        parts += [(m.weight, out.weight[rows])] + ([(m.bias, out.bias[rows])] if m.bias is not None else [])
        start += m.out_features
    with torch.no_grad():
        for part, rows in parts:
            rows.copy_(part)
    return out, parts


class _FusedMLP(torch.nn.Module):
    """The gated MLP (Llama's, Qwen2's): down(act(gate(x)) * up(x)) with gate and up as one matmul."""

    def __init__(self, mlp):
        super().__init__()
        self.gate_up, self.parts = _stack(mlp.gate_proj, mlp.up_proj)
        self.down_proj, self.act_fn = mlp.down_proj, mlp.act_fn

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, -1)
        return self.down_proj(self.act_fn(gate) * up)


class _FusedAttention(torch.nn.Module):
    """The model's attention (Llama's, Qwen2's) with q, k and v as one matmul; the rest is its own code: its
    rotary embedding, the cache's update, the attention function its config names, its o_proj."""

    def __init__(self, attn):
        super().__init__()
        self.qkv, self.parts = _stack(attn.q_proj, attn.k_proj, attn.v_proj)
        self.sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
        del attn.q_proj, attn.k_proj, attn.v_proj
        self.inner = attn  # o_proj, layer_idx, head_dim, scaling, ... (its forward is not called)
        self.code = sys.modules[type(attn).__module__]  # the model file's apply_rotary_pos_emb, eager_attention_forward

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, past_key_values=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        a, cache = self.inner, cache if cache is not None else past_key_values
        shape = (*hidden_states.shape[:-1], -1, a.head_dim)
        q, k, v = (x.view(shape).transpose(1, 2) for x in self.qkv(hidden_states).split(self.sizes, -1))  # (B, h, S, d)
        q, k = self.code.apply_rotary_pos_emb(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, a.layer_idx)
        how = a.config._attn_implementation
        attention = self.code.eager_attention_forward if how == "eager" else ALL_ATTENTION_FUNCTIONS[how]
        out, weights = attention(a, q, k, v, attention_mask, dropout=0.0, scaling=a.scaling,
                                 sliding_window=getattr(a, "sliding_window", None), **kwargs)
        return a.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def _grouped_attention(module, query, key, value, attention_mask, scaling, **kwargs):
    """Decode attention on the static cache: the G query heads that share a KV head read it together (no copy
    of K and V per query head, as repeat_kv makes), over the first n slots, n the mask's length (the filled
    ones, bucketed). The G heads go where a longer query would: one SDPA call over the KV heads, with its fp32
    sums. attention_mask: (B, 1, 1, n) bool."""
    B, H, S, D = query.shape  # S = 1: one new token a row
    kv_heads, n = key.shape[1], attention_mask.shape[-1]
    q = query.reshape(B, kv_heads, H // kv_heads * S, D)  # (B, K, G, D): heads k*G..k*G+G-1 read KV head k
    out = torch.nn.functional.scaled_dot_product_attention(q, key[:, :, :n], value[:, :, :n], attn_mask=attention_mask,
                                                           scale=scaling)  # (B, K, G, D)
    return out.reshape(B, H, S, D).transpose(1, 2), None  # (B, S, H, D), as transformers' attention functions


GROUPED = "fastgen_grouped"  # its name among transformers' attention functions


def _register_grouped():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(GROUPED, _grouped_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED, sdpa_mask)  # not used: the decode step passes its own 4D mask


def _cache_kwarg(model) -> str:
    """The name of the forward's cache argument: `cache` in recent transformers, `past_key_values` before.
    A peft model's forward passes **kwargs on to the model it wraps: that one's signature decides."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


@dataclasses.dataclass
class _Buffers:
    """The decode step's inputs and outputs, at fixed addresses (a graph reads and writes them there)."""
    token: torch.Tensor  # (B,) the token each row feeds next
    position: torch.Tensor  # (B,) its position id (left padding shifts them)
    cache_position: torch.Tensor  # (1,) the cache slot its key lands in
    mask: torch.Tensor  # (B, L) 1 where a slot is written and attended to
    done: torch.Tensor  # (B,) rows that have stopped
    tokens: torch.Tensor  # (B, L) the completions so far
    t: torch.Tensor  # (1,) the next column of tokens
    eos: torch.Tensor  # (MAX_STOP_TOKENS,) the stop tokens, -1 after them


def _cache(net, batch: int, length: int, mask_dtype, device):
    """(cache, its length, _Buffers, graphs): the model's StaticCache for `batch` rows, reset, at least `length`
    positions long, with the step's buffers and the graphs recorded on them, made again only for a new batch
    size or a longer length, so that a compiled step finds its tensors where it recorded them."""
    from transformers import StaticCache

    caches = getattr(net, "_fastgen_caches", None)
    if caches is None:
        caches = {}
        object.__setattr__(net, "_fastgen_caches", caches)  # not a submodule: no state_dict entry
    if batch not in caches or caches[batch][0] < length:
        caches.pop(batch, None)  # its memory, before the longer one takes its own
        length = -(-length // CACHE_GROWS_BY) * CACHE_GROWS_BY
        new = lambda dtype, *shape: torch.zeros(*shape, dtype=dtype, device=device)
        buffers = _Buffers(new(torch.long, batch), new(torch.long, batch), new(torch.long, 1), new(mask_dtype, batch, length),
                           new(torch.bool, batch), new(torch.long, batch, length), new(torch.long, 1),
                           new(torch.long, MAX_STOP_TOKENS))
        for t in dataclasses.astuple(buffers):
            torch._dynamo.mark_static_address(t)  # mutated by a compiled step: kept in place, not copied, by its graph
        caches[batch] = length, StaticCache(config=net.config, max_cache_len=length), buffers, {}
    length, cache, buffers, graphs = caches[batch]
    cache.reset()  # keys and values zeroed, the write position back to 0
    return cache, length, buffers, graphs


def _written(cache) -> int:
    """Positions the cache holds. The layers write each forward's keys at their own running count, not at the
    `cache_position` a forward is given (transformers 5.17-5.25's StaticLayer): generate checks the two agree."""
    return int(cache.get_seq_length())


def _forward(net, cache_kw, cache, s: _Buffers, n):
    """One token per row through the model, its next-token logits (B, V) in fp32. It reads the buffers `s`,
    whose shapes and addresses stay from step to step: what a CUDA graph needs. n: with grouped attention, the
    slots it reads (a (B, 1, 1, n) mask goes in, which transformers passes on as it is); None: the model's own
    attention over the whole cache, with the (B, L) padding mask."""
    mask = s.mask if n is None else s.mask[:, None, None, :n].bool()
    out = net(input_ids=s.token[:, None], attention_mask=mask, position_ids=s.position[:, None],
              cache_position=s.cache_position, use_cache=True, logits_to_keep=1, **{cache_kw: cache})
    return out.logits[:, -1].float()


def _decoder(net):
    """The decoder (embed_tokens, rotary_emb, layers, norm) and the LM head of a model, or of the one a peft model
    wraps (its layers hold the adapters)."""
    base = net.get_base_model() if hasattr(net, "get_base_model") else net
    return base.model, base.get_output_embeddings()


def _layer(layer, x, cos, sin, keys, values, slot, mask):
    """One decoder layer (llama's, qwen2's) on one new token a row, x (B, 1, D) -> (B, 1, D), its key and value
    written into the static cache at `slot`. The layer is known only by its arguments (its modules, whose weights
    dynamo takes as inputs, and its cache's tensors): one compiled copy serves every layer (switch layerwise).
    Its own modules do the work (norms, projections with their adapters, MLP); the rotary embedding is the model
    file's; attention is _grouped_attention over the first n slots, n the mask's length."""
    h = layer.input_layernorm(x)  # (B, 1, D)
    if isinstance(layer.self_attn, _FusedAttention):
        a = layer.self_attn.inner  # head_dim, scaling, o_proj
        q, k, v = layer.self_attn.qkv(h).split(layer.self_attn.sizes, -1)
    else:
        a = layer.self_attn
        q, k, v = a.q_proj(h), a.k_proj(h), a.v_proj(h)  # (B, 1, heads * d) each
    q, k, v = (t.view(*x.shape[:2], -1, a.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, heads, 1, d)
    q, k = sys.modules[type(a).__module__].apply_rotary_pos_emb(q, k, cos, sin)
    keys.index_copy_(2, slot, k)  # (B, K, L, d): the new key at its slot, in place
    values.index_copy_(2, slot, v)
    out, _ = _grouped_attention(a, q, keys, values, mask, a.scaling)  # (B, 1, H, d)
    x = x + a.o_proj(out.reshape(*x.shape[:2], -1))  # (B, 1, D)
    return x + layer.mlp(layer.post_attention_layernorm(x))


def _forward_layerwise(net, cache_kw, cache, s: _Buffers, n, layer=_layer):
    """_forward by fastgen's own layer: `layer` (_layer, or it compiled) called once per decoder layer."""
    decoder, head = _decoder(net)
    x = decoder.embed_tokens(s.token[:, None])  # (B, 1, D)
    cos, sin = decoder.rotary_emb(x, s.position[:, None])  # (B, 1, d) each
    mask = s.mask[:, None, None, :n].bool()  # (B, 1, 1, n)
    torch._dynamo.mark_dynamic(mask, 3)  # compiled, the layer takes any n: one graph, not one per n and then another
    for module, cached in zip(decoder.layers, cache.layers):
        x = layer(module, x, cos, sin, cached.keys, cached.values, s.cache_position, mask)
    return head(decoder.norm(x))[:, -1].float()  # (B, V)


def _advance(s: _Buffers, logits, temperature: float, greedy: bool, pad_id: int):
    """After a forward: each row's next token from its logits (B, V), recorded, the stopped rows' kept at pad,
    and the buffers moved on to the next forward's position."""
    token = torch.where(s.done, pad_id, pick(logits, temperature, greedy))  # (B,) a stopped row writes pad
    s.token.copy_(token)
    s.tokens.index_copy_(1, s.t, token[:, None])
    s.done |= torch.isin(token, s.eos)
    s.t += 1
    s.position += 1
    s.cache_position += 1
    s.mask.index_fill_(1, s.cache_position, 1)  # generate's: every row attends to its new position


def _step(net, cache_kw, cache, s, n, temperature, greedy, pad_id, forward=_forward):
    """A forward and _advance: a whole decode step, sampling included (switch sample_in_step)."""
    _advance(s, forward(net, cache_kw, cache, s, n), temperature, greedy, pad_id)


_COMPILED = {}


def _compiled(fn, mode: str):
    """fn compiled once per process: "reduce-overhead" with CUDA graphs (each new shape is captured once),
    "default" for a step that is captured by hand (or a layer)."""
    if (fn, mode) not in _COMPILED:
        _COMPILED[fn, mode] = torch.compile(fn, mode=mode)
    return _COMPILED[fn, mode]


class _Graph:
    """fn recorded once as a CUDA graph (it runs nothing then) and replayed: one launch a step, no Python of the
    model's, no guard checks. It reads and writes the tensors it recorded: the buffers, the cache, the weights;
    what fn returned (the logits) is rewritten in place by each replay."""

    def __init__(self, fn):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn()

    def replay(self):
        self.graph.replay()
        return self.out


def _run_captured(graphs: dict, key, fn, device):
    """One decode step by fn, captured by hand: its first WARMUP_STEPS steps of each key (each shape) run it for
    real (compilation and lazy initialisation happen outside the capture), then a _Graph of it replays."""
    seen = graphs.get(key, 0)
    if isinstance(seen, int) and seen < WARMUP_STEPS:
        graphs[key] = seen + 1
        if device.type != "cuda":
            return fn()
        stream = torch.cuda.Stream()  # warm-ups on a side stream, as torch.cuda.graph asks
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = fn()
        torch.cuda.current_stream().wait_stream(stream)
        return out
    if isinstance(seen, int):
        graphs[key] = _Graph(fn)
    return graphs[key].replay()


def _check_layerwise(config):
    """The switch layerwise computes llama's and qwen2's decoder layer, with full attention in every layer."""
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if config.model_type not in LAYERWISE_MODELS or kinds != {"full_attention"}:
        raise ValueError(f"fastgen's layerwise switch computes {', '.join(LAYERWISE_MODELS)} layers with full attention, not "
                         f"{config.model_type} with {', '.join(sorted(kinds))}: leave it off for this model")


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
             greedy: bool = False, compile: bool = False, batch_bucket: int = 0, shadow: bool = False,
             switches: Switches = None):
    """Completions (B, T) of left-padded prompts (B, P): T is the longest completion (its stop token
    included), padded with `pad_id` after each row's stop, as model.generate returns them. `compile`:
    the decode step compiled with CUDA graphs (CUDA only), the batch padded to a multiple of `batch_bucket`
    (default: BATCH_BUCKET when compiled, else none). `shadow`: run a bf16 copy of an fp32 model's linear layers
    (the caller's autocast is bf16). `switches`: how the step runs (default SWITCHES)."""
    sw = switches or SWITCHES
    if len(eos) > MAX_STOP_TOKENS:
        raise ValueError(f"fastgen takes at most {MAX_STOP_TOKENS} stop tokens, not {len(eos)}")
    device, rows = prompt_ids.device, prompt_ids.shape[0]
    batch_bucket = batch_bucket or (BATCH_BUCKET if compile else 1)
    if -rows % batch_bucket:  # copies of the last row, dropped at the end: one graph for every size
        extra = -rows % batch_bucket
        prompt_ids = torch.cat([prompt_ids, prompt_ids[-1:].expand(extra, -1)])
        prompt_mask = torch.cat([prompt_mask, prompt_mask[-1:].expand(extra, -1)])
    B, P = prompt_ids.shape
    net = _shadow(model, sw) if shadow else model
    cache_kw = _cache_kwarg(net)
    cache, L, s, graphs = _cache(net, B, P + max_new_tokens, prompt_mask.dtype, device)
    s.mask.zero_()[:, :P] = prompt_mask  # 0 where nothing is written
    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)  # (B, P) left padding shifts positions
    out = net(input_ids=prompt_ids, attention_mask=s.mask[:, :P], position_ids=positions, use_cache=True,
              cache_position=torch.arange(P, device=device), logits_to_keep=1, **{cache_kw: cache})  # the prompt, eager
    s.tokens.fill_(pad_id)
    s.done.copy_(torch.arange(B, device=device) >= rows)  # the padding rows count as stopped
    s.eos.fill_(-1)[:len(eos)] = torch.tensor(eos, dtype=torch.long)
    s.position.copy_(positions[:, -1])
    s.cache_position.fill_(P - 1)  # _advance moves both on to the first decode step's
    s.t.zero_()
    _advance(s, out.logits[:, -1].float(), temperature, greedy, pad_id)  # the first token, from the prompt's logits
    compiled = compile and device.type in COMPILE_DEVICES
    if sw.layerwise:  # one decoder layer compiled, for every layer; the few ops around it are captured or run eagerly
        _check_layerwise(net.config)
        forward = functools.partial(_forward_layerwise, layer=_compiled(_layer, "default") if compiled else _layer)
        fn = functools.partial(_step, forward=forward) if sw.sample_in_step else forward
    else:
        fn = _step if sw.sample_in_step else _forward
        if compiled:
            fn = _compiled(fn, "default" if sw.capture else "reduce-overhead")
    every = CHECK_EVERY if device.type == "cuda" else 1  # a CPU's look costs nothing
    grouped = sw.grouped or sw.layerwise  # layerwise's attention is grouped attention
    forwards = 0
    try:
        if sw.grouped:
            _register_grouped()
            implementation, net.config._attn_implementation = net.config._attn_implementation, GROUPED
        for t in range(1, max_new_tokens):  # token t: the forward of token t - 1, then the draw
            if (t - 1) % every == every - 1 and bool(s.done.all()):
                break
            n = min(L, -(-(P + t) // sw.kv_bucket) * sw.kv_bucket) if grouped else None  # slots read: P + t filled
            args = (net, cache_kw, cache, s, n) + ((temperature, greedy, pad_id) if sw.sample_in_step else ())
            step = lambda: fn(*args)
            key = (n, temperature, greedy, sw)  # a graph per number of slots read: its shapes are fixed
            captured = sw.capture and device.type in CAPTURE_DEVICES
            logits = _run_captured(graphs, key, step, device) if captured else step()
            if not sw.sample_in_step:
                _advance(s, logits, temperature, greedy, pad_id)
            forwards += 1
    finally:
        if sw.grouped:
            net.config._attn_implementation = implementation
    if _written(cache) != P + (0 if sw.layerwise else forwards):  # layerwise writes at its slots, not the layers' count
        raise RuntimeError(f"fastgen: the KV cache holds {_written(cache)} positions after a prompt of {P} and {forwards} "
                           "decode steps; this transformers version's StaticCache writes elsewhere: use --generation generate")
    tokens = s.tokens[:rows, :max_new_tokens]
    is_eos = torch.isin(tokens, s.eos)  # (rows, N)
    lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, max_new_tokens)  # (rows,)
    return tokens[:, :int(lengths.max())].clone()  # (rows, T), not a view of the buffer the next call overwrites
