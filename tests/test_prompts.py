"""The prompt is the user's: --instruction, --system-prompt, a .jsonl row's 'prompt', --eval-dataset; the
shipped sums (data/sums.py); model names and a typo's one line."""

import importlib.util
import json
import os
import shutil

import pytest

import common
import plumbing
import tasks
from conftest import ROOT, SCRIPTS, assert_user_error, run_main
from qwen_like import qwen_tokenizer


def toy_tok():
    return common.load_model("toy-small", "cpu")[1]


# ---------------------------------------------------------------- format_prompt


def test_instruction_and_system_prompt_reach_a_chat_template():
    tok = qwen_tokenizer(instruct=True)
    default = tasks.format_prompt(tok, "What is 3 + 4?", instruction=tasks.BOXED_INSTRUCTION)
    assert default == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                       "<|im_start|>user\nWhat is 3 + 4?\nPlease reason step by step, and put your final answer within "
                       "\\boxed{}.<|im_end|>\n<|im_start|>assistant\n")  # today's prompt, unchanged
    mine = tasks.format_prompt(tok, "What is 3 + 4?", instruction="Answer with a number.", system_prompt="Be brief.")
    assert mine == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 3 + 4?\nAnswer with a number."
                    "<|im_end|>\n<|im_start|>assistant\n")
    assert tasks.format_prompt(tok, "Q", instruction="").count("Q<|im_end|>") == 1  # no instruction: the question alone
    empty = tasks.format_prompt(tok, "Q", instruction="", system_prompt="")
    assert empty.startswith("<|im_start|>system\n<|im_end|>\n") and "You are Qwen" not in empty  # '' is a system prompt


def test_instruction_and_system_prompt_reach_the_toy_and_the_plain_format():
    tok = toy_tok()
    assert tasks.format_prompt(tok, "12+3", instruction="") == "12+3="
    assert tasks.format_prompt(tok, "12+3", instruction="I", system_prompt="S") == "S12+3\nI="  # the toy's template: contents
    tok.chat_template = None
    assert tasks.format_prompt(tok, "12+3", instruction="I", system_prompt="S") == "S\nQuestion: 12+3\nI\nAnswer:"
    assert tasks.format_prompt(tok, "12+3", instruction="") == "Question: 12+3\nAnswer:"


def test_a_jsonl_prompt_is_the_user_message_verbatim(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(dict(question="What is 3 + 4?", answer=7, prompt="3 + 4 = ? Reply in \\boxed{}.")) + "\n"
                    + json.dumps(dict(prompt="Add 1 and 1.", answer="2")) + "\n"
                    + json.dumps(dict(question="What is 5 + 5?", answer="10")) + "\n")
    rows = tasks.load_data(str(path), "train")
    assert rows == [dict(question="What is 3 + 4?", answer="7", prompt="3 + 4 = ? Reply in \\boxed{}."),
                    dict(question="Add 1 and 1.", answer="2", prompt="Add 1 and 1."),
                    dict(question="What is 5 + 5?", answer="10")]
    tok = qwen_tokenizer(instruct=True)
    prompts = [tasks.format_prompt(tok, r, instruction="INSTR", system_prompt="SYS") for r in rows]
    assert prompts[0].endswith("<|im_start|>user\n3 + 4 = ? Reply in \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    assert prompts[1].endswith("<|im_start|>user\nAdd 1 and 1.<|im_end|>\n<|im_start|>assistant\n")
    assert prompts[2].endswith("<|im_start|>user\nWhat is 5 + 5?\nINSTR<|im_end|>\n<|im_start|>assistant\n")
    assert all(p.startswith("<|im_start|>system\nSYS<|im_end|>") for p in prompts)
    path.write_text(json.dumps(dict(question="q", answer="1", prompt=3)) + "\n")
    with pytest.raises(SystemExit):
        tasks.load_data(str(path), "train")


def test_an_old_style_call_fails_loudly():
    """format_prompt(tok, question, dataset), the old signature, must not take the dataset's name for an instruction."""
    with pytest.raises(TypeError):
        tasks.format_prompt(toy_tok(), "12+3", "toy")


# ---------------------------------------------------------------- every script, through its command line


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("script", SCRIPTS)
def test_instruction_system_prompt_and_eval_dataset_reach_every_script(script, tmp_path, monkeypatch):
    """Training prompts come from --dataset's rows, evaluation prompts (greedy) from --eval-dataset's, each with
    --system-prompt and --instruction (a row's 'prompt' verbatim); config.json records them."""
    train = write_jsonl(tmp_path / "train.jsonl", [dict(question="11+22", answer="33"), dict(question="40+2", answer="42")])
    held = write_jsonl(tmp_path / "eval.jsonl", [dict(question="5+6", answer="11"), dict(prompt="7+8", answer="15")])
    seen = {True: set(), False: set()}  # greedy (evaluation) and sampled prompts
    real = common.sample

    def sample(model, tok, prompts, *args, greedy=False, **kwargs):
        seen[greedy].update(prompts)
        return real(model, tok, prompts, *args, greedy=greedy, **kwargs)

    monkeypatch.setattr(common, "sample", sample)
    monkeypatch.setattr(tasks, "check_encodable", lambda tok, prompts: None)  # the toy's would refuse S, I and the newline
    out = tmp_path / "run"
    run_main(f"{script}.py", "--dataset", train, "--eval-dataset", held, "--instruction", "I", "--system-prompt", "S",
             "--steps", 1, "--prompts-per-step", 2, "--group-size", 2, "--eval-size", 2, "--pass-n", 0,
             "--save-every", 0, "--out", out)
    assert seen[True] == {"S5+6\nI=", "S7+8="}  # the eval file's rows, the second one's prompt verbatim
    trained = {"S11+22\nI=", "S40+2\nI="}
    assert seen[False] - {"S5+6\nI=", "S7+8="} == trained  # (dph_rl pre-samples the training questions too)
    config = json.load(open(out / "config.json"))
    assert (config["instruction"], config["system_prompt"], config["eval_dataset"]) == ("I", "S", held)


def test_defaults_follow_the_dataset():
    import grpo
    toy = common.parse_args(grpo.Args, [])
    assert (toy.instruction, toy.system_prompt, toy.eval_dataset) == ("", None, "toy")
    real = common.parse_args(grpo.Args, ["--model", "Qwen2.5-0.5B", "--dataset", "x.jsonl"])
    assert (real.instruction, real.system_prompt, real.eval_dataset) == (tasks.BOXED_INSTRUCTION, None, "x.jsonl")
    assert common.parse_args(grpo.Args, ["--model", "Qwen2.5-0.5B", "--instruction", ""]).instruction == ""
    assert common.parse_args(grpo.Args, ["--model", "Qwen2.5-0.5B"]).eval_dataset == "gsm8k"


def test_help_says_the_same_in_every_script():
    fields = {}
    for name in SCRIPTS:
        module = importlib.import_module(name)
        f = {x.name: x for x in module.Args.__dataclass_fields__.values()}
        names = list(f)
        assert names[names.index("dataset") + 1] == "eval_dataset", name
        assert names[names.index("format_coef") + 1:names.index("format_coef") + 3] == ["instruction", "system_prompt"], name
        fields[name] = [(f[n].default, f[n].metadata["help"]) for n in ("eval_dataset", "instruction", "system_prompt",
                                                                        "reward")]
    assert all(v == fields["grpo"] for v in fields.values())


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No model in the hub cache, no dataset in the datasets cache (the offline check's view)."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    return tmp_path / "datasets"


def test_the_offline_check_covers_the_eval_dataset(tmp_path, monkeypatch, empty_caches):
    line = assert_user_error("grpo.py", "--dataset", "toy", "--eval-dataset", "gsm8k", "--out", tmp_path / "o",
                             message="--eval-dataset gsm8k (openai/gsm8k) is not in the local Hugging Face cache")
    assert line.startswith("error: --eval-dataset gsm8k (openai/gsm8k) is not in"), line  # toy needs nothing: not named
    (empty_caches / "openai___gsm8k").mkdir(parents=True)  # "cached": the check passes (loading would fail later)
    monkeypatch.setattr(tasks, "load_data", lambda name, split: (_ for _ in ()).throw(RuntimeError(f"checked {name}")))
    with pytest.raises(RuntimeError, match="checked toy"):
        run_main("grpo.py", "--dataset", "toy", "--eval-dataset", "gsm8k", "--out", tmp_path / "o")
    line = assert_user_error("grpo.py", "--model", "Qwen2.5-7B", "--dataset", "math", "--eval-dataset", "gsm8k",
                             "--out", tmp_path / "o", message="'Qwen/Qwen2.5-7B'")  # both named once, models first
    assert "--dataset math (DigitalLearningGmbH/MATH-lighteval, HuggingFaceH4/MATH-500) is not in the datasets cache" in line
    assert "--eval-dataset" not in line  # gsm8k is cached


# ---------------------------------------------------------------- the shipped sums


def sums_module():
    spec = importlib.util.spec_from_file_location("sums", os.path.join(ROOT, "data", "sums.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_sums_are_what_the_generator_makes_and_hold_out_their_questions(capsys):
    sums = sums_module()
    assert sums.main(["--check"]) == 0, capsys.readouterr().out
    pair = lambda r: frozenset(int(x) for x in r["question"].removeprefix("What is ").removesuffix("?").split(" + "))
    for digits, n_train, n_eval in (("1digit", 53, 28), ("2digit", 1000, 100)):
        train = tasks.load_data(os.path.join(ROOT, "data", f"sums-{digits}-train.jsonl"), "train")
        held = tasks.load_data(os.path.join(ROOT, "data", f"sums-{digits}-eval.jsonl"), "eval")
        assert (len(train), len(held)) == (n_train, n_eval)
        assert not {pair(r) for r in train} & {pair(r) for r in held}, digits  # in neither order
        assert len({r["question"] for r in train + held}) == n_train + n_eval
        assert all(int(r["answer"]) == sum(pair(r)) * (1 if len(pair(r)) == 2 else 2) for r in train + held)
    one = {r["question"] for d in ("train", "eval")
           for r in tasks.load_data(os.path.join(ROOT, "data", f"sums-1digit-{d}.jsonl"), d)}
    assert one == {f"What is {a} + {b}?" for a in range(1, 10) for b in range(1, 10)}


# ---------------------------------------------------------------- model names


def test_bare_smollm2_and_qwen_names_get_their_organisation(monkeypatch, tmp_path):
    monkeypatch.setenv("SMOLLM2_DIR", str(tmp_path / "not-built"))
    for size in ("135M", "360M", "1.7B"):
        for kind in ("", "-Instruct"):
            assert common.resolve_model_name(f"SmolLM2-{size}{kind}") == f"HuggingFaceTB/SmolLM2-{size}{kind}"
    assert common.resolve_model_name("Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert common.resolve_model_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert common.resolve_model_name("my-org/SmolLM2-135M") == "my-org/SmolLM2-135M"
    assert common.resolve_model_name("SmolLM") == "SmolLM"  # not a family's name: as it is


def fake_built_smollm2(path):
    """toy-small where `python tests/smollm2.py` builds SmolLM2-135M-Instruct (provenance.json marks a finished build)."""
    shutil.copytree(tasks.toy_path("toy-small"), path)
    (path / "provenance.json").write_text("{}")
    return path


def test_the_readme_smollm2_command_works_after_the_build_step_offline(monkeypatch, tmp_path, empty_caches):
    """After `python tests/smollm2.py`, the bare SmolLM2-135M-Instruct is the directory it built ($SMOLLM2_DIR, else
    $XDG_CACHE_HOME/smollm2-tests/...), on a machine whose hub cache is empty and the hub unreachable."""
    import smollm2
    monkeypatch.delenv("SMOLLM2_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    built = fake_built_smollm2(tmp_path / "xdg" / "smollm2-tests" / "SmolLM2-135M-Instruct")
    assert common.resolve_model_name("SmolLM2-135M-Instruct") == str(built) == importlib.reload(smollm2).model_dir()
    monkeypatch.setenv("SMOLLM2_DIR", str(tmp_path / "here"))
    built = fake_built_smollm2(tmp_path / "here")
    assert common.resolve_model_name("SmolLM2-135M-Instruct") == str(built) == smollm2.model_dir()
    assert common.resolve_model_name("SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"  # not built here
    run_main("grpo.py", "--model", "SmolLM2-135M-Instruct", "--dataset", "toy", "--instruction", "", "--steps", 1,
             "--prompts-per-step", 8, "--max-new-tokens", 8, "--eval-size", 8, "--out", tmp_path / "run")
    assert os.path.isfile(tmp_path / "run" / "final" / "model.safetensors")


def test_the_smollm2_name_not_built_is_one_short_line_naming_the_build_step(monkeypatch, tmp_path, empty_caches):
    monkeypatch.setenv("SMOLLM2_DIR", str(tmp_path / "not-built"))
    line = assert_user_error("grpo.py", "--model", "SmolLM2-135M-Instruct", "--dataset", "toy", "--out", tmp_path / "o",
                             message="build it with `python tests/smollm2.py`")
    assert len(line) < 200 and not (tmp_path / "o").exists(), line  # it was 602 characters, with no build step


def test_did_you_mean():
    assert plumbing.did_you_mean("Qwen2.5-05B-Instruct") == "Qwen2.5-0.5B-Instruct"
    assert plumbing.did_you_mean("Qwen/Qwen2.5-05B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert plumbing.did_you_mean("smollm2-135m-instruct") == "SmolLM2-135M-Instruct"
    assert plumbing.did_you_mean("SmolLM2-135-Instruct") == "SmolLM2-135M-Instruct"
    for fine in ("Qwen2.5-0.5B-Instruct", "SmolLM2-1.7B", "does-not-exist", "meta-llama/Llama-3.2-1B", "Qwen3-0.6B-Base"):
        assert plumbing.did_you_mean(fine) == "", fine


def test_a_typo_gets_one_short_line_with_the_fix(tmp_path, capsys, empty_caches):
    line = assert_user_error("grpo.py", "--model", "Qwen2.5-05B-Instruct", "--dataset", "toy", "--out", tmp_path / "o",
                             message="did you mean Qwen2.5-0.5B-Instruct?")
    assert len(line) < 160, line
    with pytest.raises(SystemExit):  # past the offline check (the hub reachable, or no check): load_model says it too
        common.load_model("SmolLM2-135-Instruct", "cpu")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("did you mean SmolLM2-135M-Instruct?") and len(lines[0]) < 160, lines
    assert_user_error("grpo.py", "--model", "Qwen2.5-7B", "--dataset", "toy", "--out", tmp_path / "o",  # known: no guess
                      message="`hf download Qwen/Qwen2.5-7B`")
