"""The real pair: SmolLM2-135M-Instruct and its depth-pruned copy (tests/smollm2_pruned.py), `pytest -m smollm`."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT

pytestmark = pytest.mark.smollm
PROMPT = "Write one sentence about the sea."


@pytest.fixture(scope="module")
def pair():
    import smollm2_pruned
    return smollm2_pruned.build(), smollm2_pruned.smollm2.build()


@pytest.fixture(scope="module")
def small(pair):
    return AutoModelForCausalLM.from_pretrained(pair[0], dtype=torch.float32).eval()


def test_the_command_line_prints_the_directory_and_provenance_names_the_rule_and_layers(pair):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "smollm2_pruned.py")], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0 and p.stdout == pair[0] + "\n", p.stderr
    prov = json.load(open(os.path.join(pair[0], "provenance.json")))
    import smollm2_pruned
    assert prov["dropped"] == smollm2_pruned.DROPPED == [17, 14, 3] and prov["layers"] == 27
    assert prov["kept"] == [i for i in range(30) if i not in (17, 14, 3)] and "Block Influence" in prov["rule"]


def test_the_rule_picks_the_dropped_layers_on_the_large_model(pair):
    """The student is what the rule says: the 3 smallest Block Influence scores of the built large model."""
    import smollm2_pruned
    tok = AutoTokenizer.from_pretrained(pair[1])
    large = AutoModelForCausalLM.from_pretrained(pair[1], dtype=torch.float32).eval()
    scores = smollm2_pruned.block_influence(large, tok)
    assert len(scores) == 30 and all(0 < s < 2 for s in scores)  # 1 - cos: in [0, 2]
    assert sorted(range(30), key=lambda i: scores[i])[:3] == [17, 14, 3]


def test_it_loads_with_plain_transformers_with_27_layers_and_the_large_models_weights_and_tokenizer(pair, small):
    config = AutoConfig.from_pretrained(pair[0])
    assert config.num_hidden_layers == 27 == len(small.model.layers)
    assert len(getattr(config, "layer_types", None) or [0] * 27) == 27
    large = AutoModelForCausalLM.from_pretrained(pair[1], dtype=torch.float32)
    kept = [i for i in range(30) if i not in (17, 14, 3)]
    for new, old in enumerate(kept):  # the kept layers are the large model's, in order
        a, b = small.model.layers[new].mlp.down_proj.weight, large.model.layers[old].mlp.down_proj.weight
        assert torch.equal(a, b), (new, old)
    assert torch.equal(small.model.embed_tokens.weight, large.model.embed_tokens.weight)
    t_small, t_large = AutoTokenizer.from_pretrained(pair[0]), AutoTokenizer.from_pretrained(pair[1])
    assert t_small.get_vocab() == t_large.get_vocab() and t_small.chat_template == t_large.chat_template
    assert t_small.eos_token == t_large.eos_token == "<|im_end|>"


def test_its_greedy_text_is_fluent_and_the_kv_cache_is_indexed_by_the_kept_layers(pair, small):
    """Generation with the KV cache equals argmax over full forwards (it would not if a kept attention kept its old
    layer_idx), and the text is not degenerate: mostly distinct words, no word repeated as a loop."""
    tok = AutoTokenizer.from_pretrained(pair[0])
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = small.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
        seq = ids
        for _ in range(len(out)):  # no cache: every step a full forward
            seq = torch.cat([seq, small(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(seq[0, ids.shape[1]:], out)
    words = tok.decode(out, skip_special_tokens=True).split()
    assert len(words) >= 8 and len(set(words)) >= 0.6 * len(words), words
