"""results.py: which rows --only selects, where a trial run writes by default, a smoke run through its
command line, and the figures it draws (one style per method in every panel)."""

import json
import os
import subprocess
import sys

import pytest

import results
from conftest import ROOT


def test_every_row_is_selectable_by_name_or_word():
    names = [r[0] for r in results.ROWS]
    assert [r[0] for r in results.select_rows(["GRPO no KL, DAPO clip"])] == ["GRPO no KL, DAPO clip"]  # a comma inside
    assert [r[0] for r in results.select_rows(["grpo-no-kl-dapo-clip"])] == ["GRPO no KL, DAPO clip"]
    assert [r[0] for r in results.select_rows(["kdrl,grpo"])] == ["GRPO", "KDRL"]  # words joined by commas, in ROWS order
    assert len({results.slug(n) for n in names}) == len(names)  # one word per row, none shared
    for name in names:
        assert [r[0] for r in results.select_rows([results.slug(name)])] == [name]
    with pytest.raises(SystemExit) as e:
        results.select_rows(["grpo", "nope"])
    assert "--only nope matches no row; rows: grpo, " in str(e.value)


def test_a_trial_run_does_not_overwrite_the_shipped_tables():
    opts = results.parser().parse_args([])
    assert opts.out == os.path.join("runs", "results") and opts.eval_every == 20
    text = " ".join(results.parser().format_help().split())  # the help wraps its lines
    for default in ("(default: 1 2 3)", "(default: 2)", "(default: runs/results)"):
        assert default in text, default
    assert "python results.py --regime toy --seeds 1 --steps 2 --eval-size 20 --only grpo" in text  # the smoke run


def test_smoke_run_writes_the_table_and_the_figure(tmp_path):
    pytest.importorskip("matplotlib")
    p = subprocess.run([sys.executable, "results.py", "--regime", "toy", "--seeds", "1", "--steps", "2", "--eval-size", "20",
                        "--eval-every", "1", "--only", "codistill", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    md = (tmp_path / "results.md").read_text()
    for row in ("| CoDistill small |", "| CoDistill large |"):  # one run, two models: two rows
        assert row in md, row
    assert (tmp_path / "curves-toy.png").stat().st_size > 10_000


def test_a_method_has_one_style_in_every_panel():
    pytest.importorskip("matplotlib")
    order = results.labels()
    assert len(order) == len(set(order)) and "CoDistill BD-KD large" in order and "KDRL SinKD" in order
    styles = [results.style(label, order) for label in order]
    assert len({(tuple(s["color"]), s["marker"], s["mfc"]) for s in styles}) == len(order)  # every method told apart
    assert results.style("GRPO", order) == results.style("GRPO", list(order))  # the order fixes it, not the panel
    assert results.style("GRPO large", order)["ls"] == "--" and results.style("GRPO", order)["ls"] == "-"


def write_metrics(path, rows):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_plot_without_matplotlib_fails_and_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    write_metrics(tmp_path / "run", [{"step": 0, "eval/accuracy": 0.3}, {"step": 5, "eval/accuracy": 0.5}])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(sys, "argv", ["results.py", "--plot", str(tmp_path / "run"), "--png", str(tmp_path / "p.png")])
    with pytest.raises(SystemExit) as e:
        results.main()
    assert e.value.code == 1 and "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_plotting_a_metric_a_run_logs_under_a_prefix_names_the_prefixed_keys(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_metrics(tmp_path / "codistill", [{"step": 0, "small/eval/accuracy": 0.3, "large/eval/accuracy": 0.6}])
    with pytest.raises(SystemExit) as e:
        results.plot_runs([str(tmp_path / "codistill")], ["eval/accuracy"], "step", str(tmp_path / "p.png"))
    assert str(e.value) == "error: no run logged eval/accuracy: nothing to plot"
    err = capsys.readouterr().err
    assert "no eval/accuracy logged (it logged large/eval/accuracy, small/eval/accuracy: name those in --metrics)" in err
    results.plot_runs([str(tmp_path / "codistill")], ["eval/accuracy", "small/eval/accuracy"], "step", str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 5_000  # the metric it has is drawn, the one it lacks left out


def test_mean_seeds_draws_the_mean_of_the_runs_that_differ_only_by_their_seed(tmp_path):
    write_metrics(tmp_path / "grpo-s1", [{"step": 0, "eval/accuracy": 0.2}, {"step": 1, "time/step": 10.0},
                                         {"step": 2, "time/step": 30.0, "eval/accuracy": 0.6}])
    write_metrics(tmp_path / "grpo-s2", [{"step": 0, "eval/accuracy": 0.4},
                                         {"step": 1, "time/step": 20.0, "eval/accuracy": 0.9},
                                         {"step": 2, "time/step": 50.0, "eval/accuracy": 0.8}])
    write_metrics(tmp_path / "kdrl-s1", [{"step": 0, "eval/accuracy": 0.1},
                                         {"step": 2, "time/step": 5.0, "eval/accuracy": 0.3}])
    dirs = [str(tmp_path / d) for d in ("grpo-s1", "grpo-s2", "kdrl-s1")]
    lines = results.run_curves(dirs, ["eval/accuracy"], "step", True)["eval/accuracy"]
    by_step = {label: (xs, ys) for label, xs, ys in lines}
    grpo, kdrl = os.path.normpath(tmp_path / "grpo"), os.path.normpath(tmp_path / "kdrl")
    assert set(by_step) == {f"{grpo} (2 seeds)", f"{kdrl} (1 seed)"}
    xs, ys = by_step[f"{grpo} (2 seeds)"]
    assert xs == [0, 2] and ys == pytest.approx([0.3, 0.7])  # step 1: seed 2 alone logged it, left out
    (_, xs, ys), _ = results.run_curves(dirs, ["eval/accuracy"], "time", True)["eval/accuracy"]
    assert xs == pytest.approx([0.0, 55.0]) and ys == pytest.approx([0.3, 0.7])  # the seeds' mean time: (40 + 70) / 2
    lines = results.run_curves(dirs, ["eval/accuracy"], "step")["eval/accuracy"]  # without it: a line per run
    assert [label for label, *_ in lines] == [os.path.normpath(d) for d in dirs] and lines[1][2] == [0.4, 0.9, 0.8]
