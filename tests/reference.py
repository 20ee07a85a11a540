"""Reference implementations that the chunked passes of common.py are tested (and bench.py measured) against."""

import torch


def naive_token_logprobs(model, rollout, temperature: float = 1.0):
    """log pi(o_t | q, o_<t) of every completion token from one full log_softmax over the vocabulary:
    (B, T, V) logits at once, what common.token_logprobs avoids."""
    ids, attn = rollout.input_ids(), rollout.attention_mask()
    T = rollout.completion_ids.shape[1]
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).logits[:, -T - 1:-1].float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
