"""A tokenizer with Qwen2.5's special tokens, their ids and its chat template, built locally.

No hub here: the real tokenizer cannot be downloaded. What the code under test depends on is
reproduced exactly: the 22 added tokens at ids 151,643-151,664 (`<|endoftext|>`, `<|im_start|>`,
`<|im_end|>`, ...), a byte-level BPE below them (151,643 entries; a small one trained on a few
lines of text, padded with tokens no merge produces), the Qwen2.5 chat template, and the two
end-of-sequence conventions: base models end text with `<|endoftext|>`, Instruct models end a
turn with `<|im_end|>`. Models with the real 151,936-row head can sample any id, as real ones can.
"""

import functools
import json

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

QWEN_BPE_SIZE = 151_643
QWEN_VOCAB_ROWS = 151_936  # LM-head rows of Qwen2.5 0.5B-3B (7B and up: 152,064)
QWEN_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
              "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
              "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
              "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
QWEN_SPECIAL = [t for t in QWEN_ADDED if not t.endswith("tool_call>")]  # the two tool tags are plain added tokens

# Qwen2.5's chat template (the same in the base and Instruct checkpoints)
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

_CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? The answer is 72.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Let $x$ be a real number such that $x^2 + 2x + 1 = 0$. Then $x = -1$, so the answer is $\\boxed{-1}$.",
    "The fraction \\frac{14}{3} is about 4.667; \\sqrt{5} and \\pi are irrational. #### 18",
    "Therefore the total cost is $1,000.00 dollars, 25% more than last year's 800 dollars.",
]


@functools.lru_cache(maxsize=None)
def _qwen_backend() -> Tokenizer:
    """The tokenizers-level part, built once per process: PreTrainedTokenizerFast works on a copy."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_CORPUS * 4, trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    vocab = bpe.get_vocab()
    for i in range(QWEN_BPE_SIZE):  # pad to Qwen's size with tokens no merge produces: the added ones get their ids
        if len(vocab) == QWEN_BPE_SIZE:
            break
        vocab.setdefault(f"Ġ~{i}", len(vocab))
    merges = json.loads(bpe.to_str())["model"]["merges"]
    full = Tokenizer(models.BPE(vocab, [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]))
    full.pre_tokenizer, full.decoder = bpe.pre_tokenizer, bpe.decoder
    full.add_tokens([AddedToken(t, special=t in QWEN_SPECIAL, normalized=False) for t in QWEN_ADDED])
    return full


def qwen_tokenizer(instruct: bool = False) -> PreTrainedTokenizerFast:
    """Qwen2.5's added tokens at their real ids and its chat template over a small byte-level BPE.
    EOS is `<|im_end|>` for Instruct and `<|endoftext|>` for base models, as in their hub configs."""
    tok = PreTrainedTokenizerFast(tokenizer_object=_qwen_backend(),
                                  eos_token="<|im_end|>" if instruct else "<|endoftext|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=[t for t in QWEN_SPECIAL if t != "<|endoftext|>"])
    tok.chat_template = QWEN25_CHAT_TEMPLATE
    return tok



# The real Qwen2.5 configs (the hub's config.json values that shape memory and numerics); the
# weights are random. `layers` cuts the depth; everything else is the published model's.
QWEN25_CONFIGS = {
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151_936, tie_word_embeddings=True),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151_936, tie_word_embeddings=True),
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152_064, tie_word_embeddings=False),
}


def qwen_like_model(path: str, size: str = "0.5B", layers=None, instruct: bool = False, seed: int = 0, **overrides) -> str:
    """A random-weight Qwen2.5-`size` (cut to `layers` decoder layers) with `qwen_tokenizer`, written
    by save_pretrained in bf16, as the hub publishes it; `overrides` change config fields (e.g.
    tie_word_embeddings=False). Returns `path`."""
    import numpy as np
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tok = qwen_tokenizer(instruct)
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    cfg = dict(QWEN25_CONFIGS[size], max_position_embeddings=32_768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
               hidden_act="silu", bos_token_id=151_643, eos_token_id=eos, pad_token_id=None, dtype="bfloat16")
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    cfg.update(overrides)
    config = Qwen2Config(**cfg)
    with torch.device("meta"):  # then filled here: transformers' own init takes seconds per 100M parameters
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty made new tensors
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # weights of std initializer_range (0.02), zero biases, unit norms
            if p.ndim == 2:  # uniform over -127..127 (std 73.6), scaled: a third of torch.randn's time
                levels = torch.from_numpy(rng.integers(-127, 128, p.shape, dtype=np.int8))
                p.copy_(levels).mul_(config.initializer_range / 73.6)
            else:
                p.fill_(1.0 if "norm" in name else 0.0)
    model.generation_config = GenerationConfig(bos_token_id=151_643, eos_token_id=[151_645, 151_643] if instruct
                                               else 151_643, pad_token_id=151_643)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
