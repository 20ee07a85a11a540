"""--report-to: TensorBoard's event files and W&B's offline run hold exactly metrics.jsonl's numbers and
samples.jsonl's rows, a resumed run sends no (step, key) twice, a missing package is one line; and
results.py --plot draws any runs."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import rundir
from conftest import ROOT, assert_user_error, read_metrics, read_samples, run_main

QUICK = ["--eval-size", "20", "--eval-every", "2", "--save-every", "2"]


def interrupted_and_resumed(out, *flags):
    """A run stopped after step 4 whose last checkpoint is step 2 (the steps after a checkpoint were sent
    already), then resumed to step 4, which does steps 3 and 4 again. Returns every (step, key) that metrics.jsonl
    held at some point, with the value first written, and every (step, samples/<kind>) table of rows that
    samples.jsonl held, as a header and its rows: what the trackers must hold, once each."""
    sent, tables = {}, {}
    for session, (steps, resume) in enumerate(((2, []), (4, ["--resume"]), (4, ["--resume"]))):
        if session == 2:  # the interruption: the checkpoint of step 2 is the last one
            shutil.rmtree(out / "checkpoint")
            shutil.copytree(out.parent / "checkpoint-2", out / "checkpoint")
        run_main("grpo.py", "--steps", steps, "--out", out, "--log-samples", 3, *QUICK, *flags, *resume)
        for r in read_metrics(out):
            for k, v in r.items():
                if k != "step":
                    sent.setdefault((r["step"], k), v)
        now = {}
        for r in read_samples(out):
            now.setdefault((r["step"], f"samples/{r['kind']}"), []).append(r)
        for key, rows in now.items():  # as first written
            tables.setdefault(key, [list(rows[0])] + [list(r.values()) for r in rows])
        if session == 0:
            shutil.copytree(out / "checkpoint", out.parent / "checkpoint-2")
    assert [r["step"] for r in read_metrics(out) if "train/reward" in r] == [1, 2, 3, 4]
    # samples.jsonl: appended, step 4's rows (after the checkpoint) written again by the resume, not added
    assert [(r["step"], r["kind"]) for r in read_samples(out)] == [(0, "eval")] * 3 + [(2, "eval")] * 3 + \
        [(2, "train")] * 8 + [(4, "eval")] * 3 + [(4, "train")] * 8
    assert set(tables) == {(0, "samples/eval"), *((s, f"samples/{k}") for s in (2, 4) for k in ("eval", "train"))}
    return sent, tables


def markdown_rows(text):
    """The rows of rundir.markdown_table's table, each cell's text as it was (header included)."""
    unescape = lambda cell: re.sub(r"\\(.)", r"\1", cell.replace("<br>", "\n"))
    lines = text.split("\n")
    assert lines[1] == "|" + " --- |" * (lines[0].count(" | ") + 1)
    return [[unescape(c) for c in line[2:-2].split(" | ")] for line in lines[:1] + lines[2:]]


def test_tensorboard_holds_metrics_jsonl_and_a_resume_writes_no_step_twice(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    expected, tables = interrupted_and_resumed(tmp_path / "run", "--report-to", "tensorboard")
    got, texts, files = {}, {}, sorted(os.listdir(tmp_path / "run" / "tensorboard"))
    assert len(files) == 3  # one event file per session
    for i, name in enumerate(files):
        acc = EventAccumulator(str(tmp_path / "run" / "tensorboard" / name), purge_orphaned_data=False)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                assert (e.step, tag) not in got, (e.step, tag)  # no step written twice
                got[(e.step, tag)] = e.value
        assert ("config/text_summary" in acc.Tags()["tensors"]) == (i == 0)  # config.json's arguments, once
        for tag in acc.Tags()["tensors"]:
            for e in acc.Tensors(tag) if tag.startswith("samples/") else ():
                key = (e.step, tag.removesuffix("/text_summary"))
                assert key not in texts, key  # no step written twice
                texts[key] = markdown_rows(e.tensor_proto.string_val[0].decode())
    assert set(got) == set(expected)
    for key, v in expected.items():
        assert got[key] == pytest.approx(v, rel=1e-7, abs=0), key  # event files keep float32: 6e-8 of the value
    assert set(texts) == set(tables)
    for key, (header, *rows) in tables.items():  # samples.jsonl's rows, every cell's text as it is
        assert texts[key] == [header] + [["" if v is None else str(v) for v in r] for r in rows], key


def wandb_records(path):
    """The records of a W&B .wandb file: LevelDB's log format (32 KiB blocks of 7-byte-headed chunks) after
    a 7-byte ':W&B' header, each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or kind == 0:  # the end of a block: padding
            pos += left
            continue
        buf = (b"" if kind in (1, 2) else buf) + data[pos + 7:pos + 7 + length]  # FULL, FIRST: a new record
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST: a record is whole
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record


def test_wandb_offline_holds_metrics_jsonl_in_one_run_across_a_resume(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    expected, tables = interrupted_and_resumed(tmp_path / "run", "--report-to", "wandb", "--wandb-project", "tests")
    got, got_tables, ids, config = {}, {}, set(), None
    for d in sorted(os.listdir(tmp_path / "run" / "wandb")):
        if not d.startswith("offline-run-"):
            continue
        (f,) = [f for f in os.listdir(tmp_path / "run" / "wandb" / d) if f.endswith(".wandb")]
        for r in wandb_records(tmp_path / "run" / "wandb" / d / f):
            if r.WhichOneof("record_type") == "run":
                ids.add(r.run.run_id)
                assert r.run.project == "tests" and r.run.display_name == "run"
                config = config or {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.run.config.update}
            if r.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                step = items.pop("_step")
                for k, v in items.items():
                    if k.startswith("samples/") and k.endswith("/path"):  # a wandb.Table, in the run's files
                        table = json.load(open(tmp_path / "run" / "wandb" / d / "files" / v))
                        assert (step, k[:-5]) not in got_tables, (step, k)  # no step sent twice
                        got_tables[(step, k[:-5])] = [table["columns"]] + table["data"]
                    elif not k.startswith("_") and not k.startswith("samples/"):
                        assert (step, k) not in got, (step, k)  # no step sent twice
                        got[(step, k)] = v
    assert len(ids) == 1  # three sessions, one W&B run
    assert config["out"] == str(tmp_path / "run") and config["report_to"] == "wandb"
    assert got == pytest.approx(expected, rel=1e-9)
    assert got_tables == tables  # samples.jsonl's rows, a table per (step, kind)


def test_a_tracker_that_is_not_installed_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(rundir.Trackers.PACKAGES, "wandb", "no_such_package_here")
    assert_user_error("grpo.py", "--report-to", "tensorboard,wandb", "--out", tmp_path / "o",
                      message="--report-to wandb needs the wandb package, which is not installed: pip install wandb")
    assert_user_error("grpo.py", "--report-to", "mlflow", "--out", tmp_path / "p",
                      message="--report-to mlflow: unknown mlflow; use none, tensorboard, wandb or tensorboard,wandb")


def test_plot_draws_any_runs(tmp_path, monkeypatch):
    """--plot draws one panel per metric and one line per run, each line the run's logged values against its step
    or its summed step times (read back from the figure that is saved), with the runs in the legend."""
    pytest.importorskip("matplotlib")
    import matplotlib.figure
    import results
    for name, lr in (("a", "2e-5"), ("b", "3e-4")):
        run_main("grpo.py", "--steps", 3, "--lr", lr, "--out", tmp_path / name, *QUICK)
    png = tmp_path / "plot.png"
    p = subprocess.run([sys.executable, "results.py", "--plot", str(tmp_path / "a"), str(tmp_path / "b"), "--metrics",
                        "eval/accuracy", "train/reward", "train/kl", "--x", "time", "--png", str(png)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and f"wrote {png}" in p.stdout, p.stderr
    assert png.stat().st_size > 10_000
    saved, savefig = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **kw: (saved.append(fig), savefig(fig, *a, **kw)))
    metrics, runs = ["eval/accuracy", "train/reward", "train/kl"], [str(tmp_path / "a"), str(tmp_path / "b")]
    for x in ("step", "time"):
        assert results.plot_runs(runs, metrics, x, str(tmp_path / f"{x}.png"))
        fig = saved.pop()
        panels = [ax for ax in fig.axes if ax.get_title()]
        assert [ax.get_title() for ax in panels] == metrics
        for ax, m in zip(panels, metrics):
            assert ax.get_xlabel() == ("step" if x == "step" else "training time (s, generation + update)")
            assert [line.get_label() for line in ax.get_lines()] == runs
            for line, run in zip(ax.get_lines(), runs):
                rows, t, at = read_metrics(run), 0.0, {}
                for r in rows:
                    t += r.get("time/step", 0.0)
                    at[r["step"]] = t
                want = [(r["step"] if x == "step" else at[r["step"]], r[m]) for r in rows if m in r]
                assert len(want) == 3  # evaluations at steps 0, 2, 3; train/... at 1, 2, 3
                assert list(zip(line.get_xdata(), line.get_ydata())) == want, (x, m, run)
        assert [t.get_text() for t in fig.legends[0].get_texts()] == runs
    assert results.plot_runs(runs[:1], ["eval/accuracy"], "step", str(tmp_path / "one.png"))
    assert [len(ax.get_lines()) for ax in saved.pop().axes if ax.get_title()] == [1]
    bad = subprocess.run([sys.executable, "results.py", "--plot", str(tmp_path / "nothing")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "no metrics.jsonl in" in bad.stderr
