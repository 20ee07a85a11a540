"""results.py: which rows --only selects, where a trial run writes by default, a smoke run through its
command line, and the figures it draws (one style per method in every panel)."""

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
