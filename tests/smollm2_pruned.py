"""A real pair, built offline: SmolLM2-135M-Instruct and a depth-pruned copy of it as the small model.

    python tests/smollm2_pruned.py     # build it if it is not there yet; print its directory (stdout: the path alone)

The large model is tests/smollm2.py's SmolLM2-135M-Instruct (30 decoder layers). The small one is the same
model with its PRUNE least influential layers removed (27 layers), by Block Influence (ShortGPT, arXiv
2403.03853): BI_i = 1 - E_t cos(x_i,t, x_i+1,t), the mean cosine similarity between decoder layer i's input
and output hidden states at every position of a few fixed texts (TEXTS); the layers whose output is most like
their input change the residual stream least and go first. Everything else is the large model's: the
embeddings, the kept layers' weights, the final norm and the tokenizer (so the two share every token id).

Why 3 layers: the pruned model must write fluent text and keep a little of the arithmetic, so that its rewards
are sparse but not zero (the student that CoDistill, KDRL and OPD+ are about). Measured with evaluate.py on the
28 held-out one-digit sums, 24 tokens (docs/smollm2.md): the full model answers 0.214 greedy; this student 0.036
greedy, 0.018 of its sampled answers right, pass@8 0.143; 24 layers answered none greedy and no method lifted
it in 8 steps; dropping the last 6 or more layers instead (no influence score) leaves gibberish.

DROPPED holds the layers the rule picks (fp32, CPU) on the large model built from the GGUF, and every build
drops those, so every machine has the same student; a large model from elsewhere (the hub's bf16 weights) may
score the layers a little differently, which provenance.json then records beside them. The directory is
$SMOLLM2_PRUNED_DIR, else SmolLM2-135M-Instruct-BI27 beside the large model's; `provenance.json` says what
was dropped, by which rule, with every layer's score.
"""

import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import smollm2  # noqa: E402

PRUNE = 3
DROPPED = [17, 14, 3]  # what the rule picks on the GGUF-built large model, most redundant first
NAME = f"SmolLM2-135M-Instruct-BI{30 - PRUNE}"
TEXTS = [  # a few fixed texts: the scores are means over every position of all of them
    "The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the clocks were striking.",
    "To make a cup of tea, boil the water, warm the pot, add one spoon of tea for each person and let it stand.",
    "What is 7 + 5? To find the sum, we add 7 and 5: 7 + 5 = 12. The answer is 12.",
    "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide into sugar.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
]


def model_dir() -> str:
    return os.environ.get("SMOLLM2_PRUNED_DIR") or os.path.join(os.path.dirname(smollm2.model_dir()), NAME)


def block_influence(model, tok) -> list:
    """BI_i = 1 - mean cos(input_i, output_i) of every decoder layer, over every position of TEXTS."""
    import torch
    layers = model.model.layers
    sims = [[] for _ in layers]

    def hook(i):
        def record(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            sims[i].append(torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).flatten())
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for text in TEXTS:
                model(**tok(text, return_tensors="pt"))
    finally:
        for h in handles:
            h.remove()
    return [1 - torch.cat(s).mean().item() for s in sims]


def prune(model, drop: list):
    """Remove decoder layers `drop` in place: the kept ones renumbered, the config's count and layer types with them."""
    import torch
    keep = [i for i in range(len(model.model.layers)) if i not in set(drop)]
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in keep)
    for new, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new  # the KV cache is indexed by it
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return keep


def write(path: str, large: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(large)
    model = AutoModelForCausalLM.from_pretrained(large, dtype=torch.float32).eval()
    scores = block_influence(model, tok)
    picked = sorted(range(len(scores)), key=lambda i: scores[i])[:PRUNE]
    if picked != DROPPED:  # e.g. the hub's bf16 weights in place of the GGUF's: the same layers go all the same
        print(f"smollm2_pruned: Block Influence picks layers {picked} on {large}; dropping {DROPPED} as everywhere else",
              file=sys.stderr, flush=True)
    drop = DROPPED
    keep = prune(model, drop)
    model.to(torch.bfloat16)  # as the large model is stored
    model.config.dtype = torch.bfloat16
    model.save_pretrained(path)
    tok.save_pretrained(path)
    with open(os.path.join(large, "provenance.json")) as f:
        parent = json.load(f)
    import transformers
    with open(os.path.join(path, "provenance.json"), "w") as f:
        json.dump(dict(model=NAME, large=smollm2.MODEL_ID, large_source=parent.get("source"),
                       rule="Block Influence (ShortGPT, arXiv 2403.03853): drop the layers with the smallest "
                            "1 - mean cos(layer input, layer output) over the fixed texts of tests/smollm2_pruned.py",
                       dropped=drop, picked_here=picked, kept=keep, layers=len(keep),
                       block_influence={i: round(s, 6) for i, s in enumerate(scores)},
                       built_by="tests/smollm2_pruned.py", transformers=transformers.__version__,
                       built=time.strftime("%Y-%m-%d %H:%M:%S")), f, indent=2)


def build() -> str:
    """The pruned model's directory, built first (and the large model before it) if it is not there."""
    path = model_dir()
    if smollm2.is_built(path):
        return path
    large = smollm2.build()
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with smollm2.locked(path):
        if smollm2.is_built(path):
            return path
        if os.path.exists(path):
            raise SystemExit(f"smollm2_pruned: {path} exists but holds no built model (no provenance.json): remove it")
        tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".building-", dir=parent)
        try:
            t0 = time.time()
            write(tmp, large)
            os.chmod(tmp, 0o755)
            os.rename(tmp, path)
            print(f"smollm2_pruned: built {path} in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


if __name__ == "__main__":
    if sys.argv[1:]:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        sys.exit(2)
    print(build())
