"""What the model wrote: the console's sample line at each evaluation, --log-samples 0, and results.py
--samples, which reads samples.jsonl back. The rows themselves (graded as grading.is_correct grades, the same
questions at every evaluation, each script's columns) are checked on every script's end-to-end run
(conftest.check_samples); a resume in tests/test_grpo.py and tests/test_tracking.py, torchrun in
tests/test_distributed.py, evaluate's rows in tests/test_common.py."""

import os
import sys

import pytest

import results
from conftest import check_samples, read_samples, run_main

FLAGS = ["--steps", 2, "--eval-every", 1, "--eval-size", 8, "--prompts-per-step", 2, "--pass-n", 0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """grpo.py and kdrl.py, 2 steps, evaluated at steps 0, 1, 2 with 3 samples each, on a 30-column terminal:
    {script: (its DIR, what it printed)}."""
    root = tmp_path_factory.mktemp("samples")
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "30"  # shutil.get_terminal_size reads it first
    try:
        return {s: (root / s, run_main(f"{s}.py", "--out", root / s, "--log-samples", 3, *FLAGS)) for s in ("grpo", "kdrl")}
    finally:
        os.environ.pop("COLUMNS") if columns is None else os.environ.update(COLUMNS=columns)


def test_the_console_shows_the_first_question_at_each_evaluation_cut_to_the_terminal(runs):
    out, printed = runs["grpo"]
    first = [r for r in check_samples(out, [0, 1, 2], 3, 8) if r["kind"] == "eval" and r["index"] == 0]
    lines = [line for line in printed.splitlines() if " sample: " in line]
    assert len(lines) == len(first) == 3
    for line, r in zip(lines, first):
        full = (f"step {r['step']} sample: {'right' if r['correct'] else 'wrong'}, answer {r['answer']}, gold {r['gold']} | "
                f"{r['question']} | {r['completion']}")
        assert len(full) > 30 and len(line) == 30 and line == full[:26] + " ...", (line, full)


def test_log_samples_0_writes_and_prints_none(tmp_path):
    printed = run_main("grpo.py", "--out", tmp_path / "o", "--log-samples", 0, *FLAGS)
    assert not (tmp_path / "o" / "samples.jsonl").exists() and " sample: " not in printed
    assert "eval/accuracy: " in printed


def expected(runs, index):
    """The lines results.py --samples prints for question `index` of these runs, from their samples.jsonl."""
    rows = {run: [r for r in read_samples(run) if r.get("index") == index] for run in runs}
    first = rows[runs[0]][0]
    lines = [f"question {index}: {first['question']}", f"gold: {first['gold']}"]
    width = max(len(str(run)) for run in runs)
    for step in (0, 1, 2):
        lines.append(f"step {step}")
        for run in runs:
            (r,) = [r for r in rows[run] if r["step"] == step]
            assert r["question"] == first["question"]
            verdict = "right" if r["correct"] else "wrong"
            lines.append(f"  {str(run):<{width}}  {verdict}  answer {r['answer']}: {r['completion']}"
                         + " [cut]" * r["truncated"])
    return lines


def test_results_samples_marks_a_completion_cut_at_max_new_tokens(runs, tmp_path):
    """toy-small writes three digits and EOS: at --max-new-tokens 3 every answer is cut, and says so; at 8
    (the `runs`) none is."""
    import results
    run_main("grpo.py", "--out", tmp_path / "o", "--log-samples", 3, *FLAGS, "--max-new-tokens", 3)
    for out, cut in ((tmp_path / "o", True), (runs["grpo"][0], False)):
        rows = [r for r in read_samples(out) if r["kind"] == "eval"]
        assert len(rows) == 9 and all(r["truncated"] is cut and len(r["completion"]) == 3 for r in rows)
        shown = results.show_samples([str(out)], "1")
        assert shown == expected([out], 1)
        assert [line.endswith(" [cut]") for line in shown if line.startswith("  ")] == [cut] * 3


def test_results_samples_prints_one_question_across_steps_and_runs(runs, monkeypatch, capsys):
    grpo, kdrl = str(runs["grpo"][0]), str(runs["kdrl"][0])
    monkeypatch.setattr(sys, "argv", ["results.py", "--samples", grpo, kdrl])  # the first question by default
    results.main()
    assert capsys.readouterr().out.splitlines() == expected([grpo, kdrl], 0)
    assert results.show_samples([kdrl], "2") == expected([kdrl], 2)
    text = [r["question"] for r in read_samples(grpo) if r.get("index") == 1][0]
    assert results.show_samples([grpo, kdrl], text) == expected([grpo, kdrl], 1)  # by its text
    assert results.show_samples([grpo], text[:-1]) == expected([grpo], 1)  # or a part only it holds


@pytest.mark.parametrize("question, message", [
    ("3", "--question 3: the runs logged questions 0, 1, 2"),
    ("no such question", "--question 'no such question' is in none of the logged questions: 0: "),
    ("+", "--question '+' is in 3 of the logged questions: give more of it, or its index"),
])
def test_results_samples_names_what_it_cannot_find(runs, question, message):
    with pytest.raises(SystemExit) as e:
        results.show_samples([str(runs["grpo"][0])], question)
    assert message in str(e.value)


def test_results_samples_needs_samples_jsonl(tmp_path):
    with pytest.raises(SystemExit) as e:
        results.show_samples([str(tmp_path)], "0")
    assert f"no samples.jsonl in {tmp_path}" in str(e.value)
