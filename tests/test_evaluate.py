"""The papers' benchmarks (tasks.BENCHMARKS) and evaluate.py.

tests/data/benchmarks/ holds a few real rows of each benchmark in the format of the hub copy that
tasks.BENCHMARKS names (where they come from: its README.md); $BENCHMARK_DIR points the loader there."""

import json
import os

import pytest

import tasks
from conftest import ROOT

FIXTURES = os.path.join(ROOT, "tests", "data", "benchmarks")


@pytest.fixture
def fixtures(monkeypatch):
    monkeypatch.setenv(tasks.BENCHMARK_DIR, FIXTURES)


def fixture_rows(name):
    with open(os.path.join(FIXTURES, f"{name}.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_every_benchmark_has_fixture_rows_with_its_fields():
    for name, b in tasks.BENCHMARKS.items():
        rows = fixture_rows(name)
        assert len(rows) >= 4, name
        assert all(isinstance(r[b.question], str) and r[b.answer] not in ("", None, []) for r in rows), name


def test_benchmarks_load_with_their_golds_as_text(fixtures):
    """Each row's gold as the grader needs it: OlympiadBench's list without its $...$, AMC's 27.0 as 27,
    AIME's 025 as written, GSM8K's solution cut after ####."""
    got = {name: tasks.load_data(name, "eval") for name in tasks.BENCHMARKS}
    for name, b in tasks.BENCHMARKS.items():
        assert [r["question"] for r in got[name]] == [r[b.question] for r in fixture_rows(name)]
    golds = {name: [r["answer"] for r in rows] for name, rows in got.items()}
    assert golds["olympiadbench"][:3] == ["(1,8,19), (2,7,13), (4,5,7)", "f(x)=2 x", "90^{\\circ},60^{\\circ}"]
    assert golds["amc23"] == ["27", "36", "45", "3159"]
    assert golds["aime24"][:2] == ["204", "025"]
    assert golds["minerva"][:4] == ["1.6", "4.5e33", "1e-5", "-3./2"]
    assert golds["gsm8k"][:2] == ["18", "3"]
    assert tasks.load_data("math", "eval") == got["math500"]  # MATH's eval split is MATH-500


def test_each_benchmark_gold_is_graded_right_when_boxed_and_wrong_when_off_by_one(fixtures):
    for name in tasks.BENCHMARKS:
        for r in tasks.load_data(name, "eval"):
            assert tasks.is_correct(f"So the answer is $\\boxed{{{r['answer']}}}$.", r["answer"]), (name, r["answer"])
            assert not tasks.is_correct("\\boxed{3158}", r["answer"]), (name, r["answer"])


def test_benchmarks_read_the_hub_copy_named(monkeypatch):
    import datasets
    calls = []

    def fake(path, name=None, split=None):
        calls.append((path, name, split))
        b = next(b for b in tasks.BENCHMARKS.values() if b.repo == path)
        return [{b.question: "q?", b.answer: ["$5$", "$7$"] if b.answer == "final_answer" else "5"}]

    monkeypatch.delenv(tasks.BENCHMARK_DIR, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake)
    for name, b in tasks.BENCHMARKS.items():
        assert tasks.load_data(name, "eval") == [dict(question="q?", answer="5, 7" if name == "olympiadbench" else "5")]
    assert calls == [(b.repo, b.config, b.split) for b in tasks.BENCHMARKS.values()]


def test_a_benchmark_is_not_a_training_set(capsys):
    with pytest.raises(SystemExit) as e:
        tasks.load_data("aime24", "train")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and err.startswith("error: 'aime24' is a benchmark, for evaluation only")


def test_offline_a_benchmark_not_in_the_cache_fails_in_one_line_naming_it(monkeypatch, tmp_path, capsys):
    import datasets
    import huggingface_hub
    monkeypatch.delenv(tasks.BENCHMARK_DIR, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))  # nothing cached
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SystemExit) as e:
        tasks.load_data("aime25", "eval")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err, err
    assert err.startswith("error: cannot load benchmark 'aime25' (math-ai/aime25, split test;"), err
    assert "load_dataset('math-ai/aime25', 'default', split='test')" in err and "$BENCHMARK_DIR/aime25.jsonl" in err
