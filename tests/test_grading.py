"""grading.is_correct on real answers, the time limit, and where a completion ends.

The golds are public: MATH-500 answers (the test split of github.com/openai/prm800k) and GSM8K
test answers (github.com/openai/grade-school-math); each is paired with completions of every kind
that a grader gets wrong when it compares strings or floats. Agreement on the full sets is
measured by tests/measure_grading.py (see the README)."""

import os
import subprocess
import sys
import threading

import pytest
import torch

import common
import grading
import tasks
from conftest import ROOT

STEPS = "#### Step 1: Eggs left\n16 - 3 - 4 = 9\n#### Step 2: Money\n9 * 2 = 18\nThe answer is 18."

# gold, completion, verdict, kind
CASES = [
    # MATH-500: correct answers written another way
    ("\\frac{14}{3}", "So $x = \\boxed{14/3}$.", True, "a/b for \\frac{a}{b}"),
    ("\\frac{14}{3}", "The answer is 14/3.", True, "a/b in the answer sentence"),
    ("\\frac{3}{2}", "\\boxed{1.5}", True, "decimal for a fraction"),
    ("\\frac{3}{2}", "\\boxed{\\frac32}", True, "\\frac32 for \\frac{3}{2}"),
    ("\\frac{3}{2}", "\\boxed{\\dfrac{3}{2}}", True, "dfrac"),
    ("\\frac43", "\\boxed{\\frac{4}{3}}", True, "gold without braces"),
    ("\\frac 59", "\\boxed{\\frac{5}{9}}", True, "gold without braces"),
    ("\\frac9{19}", "\\boxed{\\frac{9}{19}}", True, "gold without braces"),
    ("11\\sqrt2", "\\boxed{11\\sqrt{2}}", True, "gold without braces"),
    ("\\sqrt{5}", "\\boxed{\\sqrt 5}", True, "\\sqrt 5 for \\sqrt{5}"),
    ("42", "\\boxed{42 \\text{ inches}}", True, "units after the number"),
    ("864 \\mbox{ inches}^2", "\\boxed{864}", True, "units dropped"),
    ("\\frac{270}7\\text{ degrees}", "\\boxed{\\frac{270}{7}}", True, "units dropped"),
    ("5.4 \\text{ cents}", "\\boxed{5.4}", True, "units dropped"),
    ("90^\\circ", "\\boxed{90}", True, "degrees dropped"),
    ("5", "\\boxed{x = 5}", True, "x = 5 for 5"),
    ("\\text{(C)}", "\\boxed{C}", True, "C for \\text{(C)}"),
    ("\\text{(C)}", "\\boxed{(C)}", True, "(C) for \\text{(C)}"),
    ("\\text{Evelyn}", "\\boxed{Evelyn}", True, "a name without \\text"),
    ("\\$32,\\!348", "\\boxed{32348}", True, "no thousands separator"),
    ("\\$18.90", "The total is \\boxed{\\$18.9}.", True, "dollars, trailing zero"),
    ("3, 5, 7", "\\boxed{7, 3, 5}", True, "a list in another order"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\frac{\\pi}{2})}", True, "\\left( \\right) dropped"),
    ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
     "\\boxed{\\begin{pmatrix} -\\frac{1}{3} \\\\ \\frac{2}{3} \\\\ \\frac{5}{3} \\end{pmatrix}}", True, "a vector"),
    (".0000672", "\\boxed{6.72 \\times 10^{-5}}", True, "scientific notation"),
    # MATH train writes thousands with {,}
    ("10{,}000", "\\boxed{10000}", True, "no thousands separator"),
    ("2{,}220", "\\boxed{2,220}", True, "thousands separator ,"),
    # MATH-500: wrong answers that strings or floats accept
    ("3, 5, 7", "\\boxed{357}", False, "list digits run together"),
    ("3, 5, 7", "\\boxed{3, 5}", False, "a list missing one"),
    (".35625", "\\boxed{35625}", False, "decimal point dropped"),
    ("52_8", "\\boxed{528}", False, "base subscript glued (float('52_8') == 528)"),
    ("9007199254740993", "\\boxed{9007199254740992}", False, "integers past 2**53"),
    ("3.21", "\\boxed{3.2100001}", False, "a decimal past math-verify's 6 places"),
    ("\\frac{14}{3}", "\\boxed{4.67}", False, "a rounded decimal"),
    ("\\frac{14}{3}", "\\boxed{\\frac{3}{14}}", False, "fraction inverted"),
    ("11\\sqrt2", "\\boxed{22}", False, "root dropped"),
    ("\\text{(C)}", "\\boxed{D}", False, "another choice"),
    ("\\text{Evelyn}", "\\boxed{\\text{Navin}}", False, "another name"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(\\frac{\\pi}{2}, 3)}", False, "a pair in another order"),
    ("5", "\\boxed{x = 6}", False, "x = 6 for 5"),
    ("10{,}000", "\\boxed{2{,}220}", False, "another number with {,}"),
    ("", "\\boxed{}", False, "empty gold, empty box"),
    ("", "\\boxed{5}", False, "empty gold"),
    ("5", "\\boxed{}", False, "empty box"),
    ("5", "I do not know.", False, "no answer"),
    # GSM8K: the final answer where a model writes it
    ("18", "She makes 9 * 2 = $18 every day.\n#### 18", True, "after ####"),
    ("18", "The answer is 18 (that is, 2 times the first amount).", True, "a number after the answer"),
    ("18", "She earns \\boxed{18 \\text{ dollars}}.", True, "units in the box"),
    ("18", "9 * 2 = 18\n#### 18 dollars", True, "units after ####"),
    ("18", "9 eggs at $2 each.\n\n#### Final answer\nShe makes $18 every day.", True, "a markdown heading"),
    ("18", "#### Final answer\n\nThe answer is $18.00.", True, "a markdown heading, dollars"),
    ("70000", "The profit is 200,000 - 130,000 = $70,000.\n#### 70,000", True, "thousands separator"),
    ("18", "She makes 13 * 2 = $<<13*2=26>>26\nA: 26", False, "a real wrong model solution"),
    ("18", "The answer is 17 (that is, 18 minus 1).", False, "the gold after a wrong answer"),
    ("18", "#### 17 dollars\nor 18?", False, "a number after the #### line"),
    # The papers' other benchmarks (tasks.BENCHMARKS): golds from their public copies, answers as models write them
    ("1e-5", "\\boxed{0.00001}", True, "Minerva's e-notation: a decimal"),
    ("3e-5", "\\boxed{3 \\times 10^{-5}}", True, "Minerva's e-notation: a \\times 10^{b}"),
    ("4.5e33", "The luminosity is \\boxed{4.5 \\times 10^{33} \\, \\text{erg/s}}", True, "e-notation, units after it"),
    ("3.3e-10", "so $r_0 = 3.3 \\cdot 10^{-10}$ m. The answer is $3.3e-10$.", True, "e-notation in the answer"),
    ("\\frac{1}{m} t", "\\boxed{\\frac{t}{m}}", True, "a variable t after a fraction, not a unit"),
    ("\\frac{1}{\\sqrt{2}}c", "\\boxed{\\frac{c}{\\sqrt{2}}}", True, "a variable c, not a unit"),
    ("12.5", "\\boxed{12.5\\%}", True, "a percent sign"),
    ("-3./2", "\\boxed{\\frac{-3}{2}}", True, "Minerva's -3./2"),
    ("\\frac{-3}{2}", "the slope is $\\boxed{-3./2}$.", True, "-3./2 for \\frac{-3}{2}"),
    ("np.arcsin(10/13)", "\\boxed{\\arcsin\\left(\\frac{1}{1.3}\\right)}", True, "Minerva's numpy gold"),
    ("E_{1},E_{2}", "\\boxed{E_1, E_2}", True, "subscripts without braces"),
    ("B,E,G", "\\boxed{\\text{B, E, G}}", True, "a list in \\text{}"),
    ("45,135", "\\boxed{45^\\circ, 135^\\circ}", True, "a list of degrees for MATH's '45,135'"),
    ("(1,8,19), (2,7,13), (4,5,7)", "\\boxed{(4,5,7), (1,8,19), (2,7,13)}", True, "tuples in another order"),
    ("(2,32),(8,18)", "\\boxed{(2, 32) \\text{ and } (8, 18)}", True, "tuples joined by 'and'"),
    ("[\\frac{1}{2}, 8]", "\\boxed{\\left[0.5, 8\\right]}", True, "an interval"),
    ("f(x)=2 x", "\\boxed{2x}", True, "the right side of f(x) ="),
    ("025", "\\boxed{25}", True, "AIME's leading zero"),
    ("204", "$\\frac{9}{3} + 0.4 = 3.4$ hours, or $\\framebox{204}$ minutes\n-sepehr2010", True,
     "\\framebox, then a signature"),
    ("12", "Answer: 7 + 5 = 12", True, "an equation's result after the answer phrase"),
    ("12", "The answer is $7 + 5 = 12$", True, "an equation in $...$ after the answer phrase"),
    ("62.5", "\\boxed{0.625}", False, "a percent as a fraction"),
    ("0.01", "The answer is $1$.", False, "a fraction as a percent"),
    ("3e-5", "\\boxed{3 \\times 10^{-6}}", False, "another power of ten"),
    ("1e-5", "\\boxed{0.0001}", False, "e-notation: a decimal ten times too large"),
    ("4.5e33", "\\boxed{4.5}", False, "e-notation: the mantissa alone"),
    ("\\frac{1}{m} t", "\\boxed{\\frac{1}{m}}", False, "a variable dropped (math-verify's units take t)"),
    ("2t", "\\boxed{2}", False, "a variable dropped (math-verify's units take t)"),
    ("5", "\\boxed{5 \\text{ m}}", True, "a unit in \\text{} after the number"),
    ("98721", "\\boxed{98730}", False, "within 1e-4 of the gold"),
    ("\\frac{2016}{2017^{2}}", "\\boxed{\\frac{1}{2018}}", False, "within 1e-6 of the gold"),
    ("\\frac{600}{7}", "\\boxed{85.71}", False, "a rounded decimal for a fraction"),
    ("45, 135", "\\boxed{45135}", False, "a list read as one number"),
    ("(1,8,19), (2,7,13), (4,5,7)", "\\boxed{(1,8,19), (2,7,13)}", False, "a tuple missing"),
    ("f(x)=x,f(x)=2-x", "\\boxed{f(x) = x}", False, "one of two functions"),
    ("-1,2,-2", "\\boxed{-1, \\sqrt{2}, -\\sqrt{2}}", False, "a list with other numbers"),
    ("[\\frac{1}{2}, 8]", "\\boxed{(\\frac{1}{2}, 8]}", False, "an interval open at a closed end"),
    ("7", "Answer: 7 + 5 = 12", False, "the first number of the answer's equation"),
    ("122", "Final Answer: 122 * 4 =", False, "an equation without its result"),
    ("4", "Final Answer: 122 * 4 =", False, "an equation without its result, its last number"),
    # Answer sentences as small and base models write them before they learn to box
    ("\\frac{3}{4}", "The answer is: $\\frac{3}{4}$", True, "LaTeX in $...$ after 'answer is:'"),
    ("\\frac{3}{4}", "**Answer:** $\\frac{3}{4}$", True, "LaTeX after a bold 'Answer:'"),
    ("\\frac{3}{4}", "The answer is $$\\frac{3}{4}$$.", True, "LaTeX in $$...$$"),
    ("\\frac{3}{4}", "The answer is:\n\\[\n\\frac{3}{4}\n\\]", True, "LaTeX in \\[...\\] on its own lines"),
    ("(2, 3)", "The answer is $(2, 3)$.", True, "a pair in $...$"),
    ("2x + 3", "The answer is $y = 2x + 3$.", True, "an equation in $...$: its right side"),
    ("-\\frac{1}{2}", "The answer is -\\frac{1}{2}.", True, "LaTeX without $...$, its sign kept"),
    ("2\\sqrt{3}", "The answer is 2\\sqrt{3}.", True, "a number times a root, without $...$"),
    ("7", "Let me verify the answer is right: 2 + 3 = 5. So the total is 7.", True, "'answer is' and a word"),
    ("18", "The answer is $18, not $20.", True, "two dollar amounts are not $...$"),
    ("3", "The answer is: $\\frac{3}{4}$", False, "a fraction's numerator"),
    ("3", "The answer is $$\\frac{3}{4}$$.", False, "a fraction's numerator, $$...$$"),
    ("2", "The answer is $(2, 3)$.", False, "a pair's first number"),
    ("2", "The answer is $y = 2x + 3$.", False, "a line's slope"),
    ("\\frac{1}{2}", "The answer is -\\frac{1}{2}.", False, "a fraction's sign lost"),
    ("2", "Let me verify the answer is right: 2 + 3 = 5. So the total is 7.", False, "a number after 'answer is' and a word"),
    # GSM8K's '#### 18' against markdown headings that number their steps
    ("18", STEPS, True, "numbered markdown headings, then the answer sentence"),
    ("18", STEPS.replace("Step 1:", "1.").replace("Step 2:", "2."), True, "markdown headings numbered '1.'"),
    ("18", STEPS.replace("The answer is 18.", "#### 18"), True, "markdown headings, then GSM8K's #### 18"),
    ("2", STEPS, False, "the last heading's number"),
    ("2", STEPS.replace("Step 1:", "1.").replace("Step 2:", "2."), False, "the last heading's number, '2.'"),
    # Units after \\pi
    ("36\\pi", "\\boxed{36\\pi \\text{ cm}^3}", True, "units after \\pi"),
    ("8\\pi", "\\boxed{8\\pi \\text{ square units}}", True, "words for units after \\pi"),
    ("36\\pi \\text{ cm}^3", "\\boxed{36\\pi}", True, "a gold with units after \\pi"),
    ("36\\pi", "\\boxed{36 \\text{ cm}^3}", False, "\\pi dropped with the units"),
    ("8\\pi", "\\boxed{8\\pi^2 \\text{ square units}}", False, "units after \\pi squared"),
]


@pytest.mark.parametrize("gold, completion, verdict, kind", CASES, ids=[f"{i}:{c[3]}" for i, c in enumerate(CASES)])
def test_real_answers(gold, completion, verdict, kind):
    assert grading.is_correct(completion, gold) is verdict


def test_every_kind_has_right_and_wrong_cases():
    right = sum(v for _, _, v, _ in CASES)
    assert right >= 30 and len(CASES) - right >= 20


def test_grading_in_another_thread_has_no_time_limit_and_the_same_verdicts():
    """Signals reach only the main thread: in a worker the checks run unlimited, never raising."""
    got = {}

    def work():
        got["v"] = [grading.is_correct(c, g) for g, c, _, _ in CASES]
        got["s"] = tasks.rewards_for([c for _, c, _, _ in CASES], [g for g, _, _, _ in CASES])

    grading._parsed.cache_clear()
    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert got["v"] == [v for _, _, v, _ in CASES]
    assert got["s"].grade_errors == 0 and got["s"].correct.tolist() == got["v"]


def test_a_check_over_the_time_limit_scores_zero_and_is_counted(monkeypatch):
    import signal
    monkeypatch.setattr(grading, "GRADE_TIMEOUT_S", 1e-4)  # CPU seconds: any math-verify check takes longer
    grading._parsed.cache_clear()
    pair = ("\\boxed{(x+1)^9 - 3x^7}", "x^9 + 9x^8 + 33x^7 + 84x^6 + 126x^5 + 126x^4 + 84x^3 + 36x^2 + 9x + 1")
    with pytest.raises(grading.GradingError):
        grading.is_correct(*pair)
    assert signal.getitimer(signal.ITIMER_VIRTUAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGVTALRM) in (signal.SIG_DFL, None)  # put back as it was
    s = tasks.rewards_for([pair[0], "\\boxed{4}", "\\boxed{5}"], [pair[1], "4", "4"], format_coef=0.5)
    assert s.grade_errors == 1
    assert s.correct.tolist() == [False, True, False] and s.reward.tolist() == [0.5, 1.5, 0.5]
    monkeypatch.setattr(grading, "GRADE_TIMEOUT_S", 5.0)
    assert grading.is_correct(*pair) is True  # the same check in time: a verdict ((x+1)^9 - 3x^7 expands to it)


def test_a_tower_of_powers_is_a_grading_error_not_a_hang():
    s = tasks.rewards_for(["\\boxed{9^{9^{9^{9}}}}", "\\boxed{5}"], ["5", "5"])
    assert s.grade_errors == 1 and s.correct.tolist() == [False, True]


def test_time_limit_under_torchrun():
    """Each torchrun rank is a process whose main thread grades: the limit applies on every rank."""
    code = ("import os, sys; sys.path.insert(0, os.getcwd()); import grading, tasks\n"
            "ok = tasks.rewards_for(['\\\\boxed{14/3}', '\\\\boxed{357}'], ['\\\\frac{14}{3}', '3, 5, 7'])\n"
            "grading.GRADE_TIMEOUT_S = 1e-4; grading._parsed.cache_clear()\n"
            "late = tasks.rewards_for(['\\\\boxed{(x+1)^9}'], ['x^9 + 9x^8 + 36x^7'])\n"
            "line = f\"rank {os.environ['RANK']} {ok.correct.tolist()} {ok.grade_errors} {late.grade_errors}\\n\"\n"
            "os.write(1, line.encode())\n")  # one write: both ranks' lines share the pipe, print() could interleave them
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "--no-python", sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    lines = sorted(line for line in p.stdout.splitlines() if line.startswith("rank"))
    assert lines == ["rank 0 [True, False] 0 1", "rank 1 [True, False] 0 1"], p.stdout


# ---------------------------------------------------------------- where a completion ends

def bigram_qwen(tok, chain):
    """A random-shaped Qwen2 (151,936-row head, hidden 16, one layer) that writes `chain`: its
    layer adds nothing (o_proj = down_proj = 0), so the next token depends on the current one
    alone, and each token's embedding is a basis vector that the head maps to its successor."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from qwen_like import QWEN_VOCAB_ROWS
    config = Qwen2Config(vocab_size=QWEN_VOCAB_ROWS, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for i, (a, b) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[a, i] = 1.0
            model.lm_head.weight[b, i] = 30.0
    model.generation_config.eos_token_id = None  # what a base checkpoint's config may say: nothing else
    return model


@pytest.mark.parametrize("instruct", [False, True])
def test_generation_stops_at_the_end_of_the_assistant_turn(instruct):
    """A base Qwen's EOS is <|endoftext|>; prompts use the chat template, whose turn ends with
    <|im_end|>. A model that closes its turn and then writes a new one must be cut there: the
    answer graded is the first turn's, not the one it gives to its own question."""
    from qwen_like import qwen_tokenizer
    tok = qwen_tokenizer(instruct=instruct)
    im_end, im_start = tok.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    assert tasks.eos_ids(None, tok) == sorted({tok.eos_token_id, im_end})
    prompt = tasks.format_prompt(tok, "What is 3 + 4?", instruction=tasks.BOXED_INSTRUCTION)
    ids = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    seven, nine, user = ids("7"), ids("9"), ids("user")
    assert len(seven) == len(nine) == 1 and ids(prompt)[-1] not in seven + nine + user
    # "7<|im_end|><|im_start|>user9999..." (the last token repeats itself)
    chain = [ids(prompt)[-1], *seven, im_end, im_start, *user, *nine, *nine]
    assert len(set(chain[:-1])) == len(chain) - 1
    model = bigram_qwen(tok, chain)
    ro = common.sample(model, tok, [prompt], group_size=2, max_new_tokens=12, greedy=True)
    assert ro.completion_ids[:, :2].tolist() == [[seven[0], im_end]] * 2  # written, then cut
    assert ro.lengths.tolist() == [2, 2] and ro.mask.tolist() == [[1.0, 1.0]] * 2
    assert ro.texts == ["7", "7"]
    assert tasks.rewards_for(ro.texts, ["7", "7"]).correct.tolist() == [True, True]
    mask, lengths, truncated = common.completion_mask(ro.completion_ids, tasks.eos_ids(model, tok))
    assert lengths.tolist() == [2, 2] and truncated.tolist() == [False, False]


def test_end_of_turn_comes_from_the_template():
    from qwen_like import qwen_tokenizer
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tasks.toy_path("toy-small"))  # its template writes nothing after a message
    assert tasks.end_of_turn_id(tok) is None and tasks.eos_ids(None, tok) == [tok.eos_token_id]
    tok = qwen_tokenizer()
    tok.chat_template = tok.chat_template.replace("<|im_end|>", "<|endoftext|>")  # another template, another token
    assert tasks.end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|endoftext|>")
    tok.chat_template = None
    assert tasks.end_of_turn_id(tok) is None


# ---------------------------------------------------------------- golds at load

def test_jsonl_golds(tmp_path, capsys):
    import json
    path = tmp_path / "d.jsonl"
    rows = [dict(question="1+1?", answer="It is 2.\n#### 2"), dict(question="Prove it.", answer=""),
            dict(question="2+2?", answer=4), dict(question="Show it.", answer="Done.\n#### ")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    want = [dict(question="1+1?", answer="2"), dict(question="2+2?", answer="4")]
    assert tasks.load_data(str(path), "train") == want
    err = capsys.readouterr().err.strip()
    assert err == f"{path}: dropped 2 of 4 rows whose gold answer is empty"
    for bad, message in ((dict(question="q", answer=None), ":2: 'question' must be a string and 'answer' a string"),
                         (dict(question="q", answer="\\frac{1}{2"),
                          ":2: the gold answer '\\\\frac{1}{2' cannot be parsed")):
        path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(SystemExit) as e:
            tasks.load_data(str(path), "train")
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err and err.startswith(f"error: {path}{message}"), err


def test_hub_datasets_name_their_config_and_drop_empty_golds(monkeypatch, capsys):
    """MATH train golds come from the solution's last \\boxed{}: a solution without one is dropped."""
    import datasets
    calls = []

    def fake(path, name=None, split=None):
        calls.append((path, name, split))
        if path == "openai/gsm8k":
            return [dict(question="q", answer="a\n#### 72")]
        if path == "HuggingFaceH4/MATH-500":
            return [dict(problem="p", answer="\\frac43")]
        return [dict(problem="p1", solution="so $\\boxed{\\frac{1}{2}}$"), dict(problem="p2", solution="No box.")]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert tasks.load_data("math", "train") == [dict(question="p1", answer="\\frac{1}{2}")]
    assert capsys.readouterr().err.strip() == "math train: dropped 1 of 2 rows whose gold answer is empty"
    assert tasks.load_data("math", "eval") == [dict(question="p", answer="\\frac43")]
    assert tasks.load_data("gsm8k", "eval") == [dict(question="q", answer="72")]
    assert calls == [("DigitalLearningGmbH/MATH-lighteval", "default", "train"),
                     ("HuggingFaceH4/MATH-500", "default", "test"), ("openai/gsm8k", "main", "test")]
