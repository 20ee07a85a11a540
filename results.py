"""Results: every algorithm on each toy regime with the same budget, three seeds, a table and a figure per regime.

    python results.py --out results            # the README's tables and figures: both regimes, three seeds
    python results.py --regime toy-hard --seeds 1 --only grpo kdrl      # into runs/results (the default --out)
    python results.py --regime toy --seeds 1 --steps 2 --eval-size 20 --only grpo   # a 10-second smoke run
    python results.py --plot runs/a runs/b --metrics eval/accuracy train/reward   # any runs, one panel a metric
    python results.py --samples runs/a runs/b --question 3   # what the models answered to one question, step by step

The regimes: toy (toy-small / toy-large on 2-digit sums: the student starts at about 0.3 and every
method lifts it) and toy-hard (toy-hard-small / toy-hard-large on three-digit sums that reach 1000:
the student is rarely right, so most groups get no reward, and the teacher is good but imperfect).
Each run goes through the script's real command line in a subprocess, one CPU thread each,
--jobs at a time, with the toy defaults (200 steps, 8 questions x 8 completions, 8 new tokens,
pass@k from 16 samples) and an evaluation every --eval-every steps for the curves. Writes
OUT/results.md (a table per regime), OUT/curves-<regime>.png (one panel per family of methods, eval
accuracy vs step and vs training time, one colour and marker per method in every panel; needs
matplotlib, optional, used by this script alone) and OUT/<regime>/runs/<row>-s<seed>/ (each run's
metrics.jsonl). --plot draws any runs' metrics with the same code. Not a test.

Columns: final greedy eval accuracy (mean +- std over seeds); final sampled pass@1 and pass@16;
training time (the sum of the logged step times: generation + update, no evaluation or loading)
and its generation / update split; the training time at which the eval accuracy first reached the
regime's target; the process's peak resident memory; completion tokens trained on per second of
training time; the mean gradient norm (before clipping); and the paper's reported claim.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.abspath(__file__))

# (row, script, flags, what the paper reports for it); {small} and {large} are the regime's models
ROWS = [
    ("GRPO", "grpo.py", [], "baseline (DeepSeekMath 2402.03300)"),
    ("CPPO P=0.5", "cppo.py", ["--prune-rate", "0.5"], "k = 8 of 16: 77.7% vs GRPO 77.1%, 1.81x faster (GSM8K, 1.5B)"),
    ("CPPO P=0.875", "cppo.py", ["--prune-rate", "0.875"], "k = 2 of 16: 80.4% vs 77.1%, 4.89x faster"),
    ("CPPO P=0.875 no allocation", "cppo.py", ["--prune-rate", "0.875", "--no-dynamic-allocation"],
     "(pruning alone: 8 questions a step, 1 completion each trained)"),
    ("KDRL", "kdrl.py", [], "56.8 vs GRPO 54.6 and on-policy KD 56.1 (avg.)"),
    ("KDRL annealed", "kdrl.py", ["--kd-anneal"], "57.2, the best"),
    ("OPD rkl", "opd_plus.py", ["--divergence", "rkl", "--estimator", "opd"], "on-policy KD: 48.96 (OPD+ 48.99)"),
    ("OPD fkl", "opd_plus.py", ["--divergence", "fkl", "--estimator", "opd"], "collapses"),
    ("OPD jsd", "opd_plus.py", ["--divergence", "jsd", "--estimator", "opd"], "collapses"),
    ("OPD+ fkl", "opd_plus.py", ["--divergence", "fkl", "--estimator", "opd+"], "trains: 46.39"),
    ("OPD+ jsd", "opd_plus.py", ["--divergence", "jsd", "--estimator", "opd+"], "trains: 48.85"),
    ("CoDistill", "codistill.py", ["--large-rollouts", "0"], ""),  # the large on the small's rollouts alone
    ("GRPO no KL, DAPO clip", "grpo.py", ["--beta", "0", "--loss-type", "dapo", "--epsilon-high", "0.28"],
     "(DPH-RL's baseline: the same loss on every question)"),
    ("DPH-RL forward", "dph_rl.py", [], "Pass@16 kept near base where GRPO falls (SQL, Llama-3.1-8B)"),
    ("DPH-RL js", "dph_rl.py", ["--divergence", "js", "--eta", "0.1"], "Bird Pass@16: base 75.0, GRPO 67.7, DPH-JS 72.4"),
    ("CoDistill BD-KD", "bdkd.py", ["--large-rollouts", "0"],
     "BD-KD (online KD, CIFAR/ImageNet CNNs): the student's accuracy and calibration (ECE) both improve"),
    ("KDRL SinKD", "sinkd.py", [], "SinKD (BERT on GLUE, T0, GPT-Neo): beats KL, RKL and JS KD"),
    ("GRPO large", "grpo.py", ["--model", "{large}"], "the baseline of CoDistill's large model"),
    ("GRPO G=16", "grpo.py", ["--group-size", "16"], "(CPPO's setting: G = 16)"),
    ("CPPO G=16 P=0.875", "cppo.py", ["--group-size", "16", "--prune-rate", "0.875"],
     "k = 2 of 16: 4.89x faster (vLLM on its own GPU)"),
]
# CPPO's speed settings (its claim is about time) run on the toy regime only: on toy-hard they
# would cost a quarter of the run and repeat what the toy regime shows
TOY_ONLY = {"CPPO P=0.5", "CPPO P=0.875 no allocation", "GRPO G=16", "CPPO G=16 P=0.875"}
CODISTILL_CLAIMS = {"small": "+6.0 over GRPO (Minerva, 1.5B)", "large": "nearly GRPO's accuracy, ~18% less time (7B)"}
MODEL_FLAGS = {  # each script's models in a regime (a row's own --model comes later and wins)
    "grpo.py": ["--model", "{small}"], "cppo.py": ["--model", "{small}"],
    "kdrl.py": ["--model", "{small}", "--teacher", "{large}"], "sinkd.py": ["--model", "{small}", "--teacher", "{large}"],
    "opd_plus.py": ["--model", "{small}", "--teacher", "{large}"],
    "codistill.py": ["--small", "{small}", "--large", "{large}"],
    "bdkd.py": ["--small", "{small}", "--large", "{large}"], "dph_rl.py": ["--model", "{small}"],
}
# regime: its models, its dataset, the accuracy whose time-to-reach the table reports
REGIMES = {
    "toy": dict(small="toy-small", large="toy-large", dataset="toy", target=0.8),
    "toy-hard": dict(small="toy-hard-small", large="toy-hard-large", dataset="toy-hard", target=0.5),
}
# one panel per family of methods: the rows (table labels) each panel draws
FAMILIES = {
    "GRPO vs CPPO": ["GRPO", "CPPO P=0.5", "CPPO P=0.875", "CPPO P=0.875 no allocation", "GRPO G=16", "CPPO G=16 P=0.875"],
    "GRPO vs KDRL (OPD rkl: on-policy KD alone)": ["GRPO", "OPD rkl", "KDRL", "KDRL annealed", "KDRL SinKD"],
    "OPD vs OPD+": ["OPD rkl", "OPD fkl", "OPD jsd", "OPD+ fkl", "OPD+ jsd"],
    "CoDistill vs GRPO on each model": ["GRPO", "CoDistill small", "CoDistill BD-KD small", "GRPO large",
                                        "CoDistill large", "CoDistill BD-KD large"],
    "GRPO vs DPH-RL": ["GRPO", "GRPO no KL, DAPO clip", "DPH-RL forward", "DPH-RL js"],
}


def run_one(script, flags, out, eval_every):
    """Run one script to completion; return (wall seconds, peak RSS GiB) or raise with its log."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    log = open(out + ".log", "w")
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *flags, "--out", out,
                          "--eval-every", str(eval_every)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if p.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(flags)} failed; see {out}.log")
    return time.perf_counter() - t0, usage.ru_maxrss / 2**20  # KiB on Linux


def read_run(out, prefix=""):
    """The numbers of one run; `prefix` picks codistill's small/ or large/ metrics."""
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    train = [r for r in rows if "time/step" in r]
    key = f"{prefix}eval/accuracy"
    elapsed, t = {0: 0.0}, 0.0
    for r in train:
        t += r["time/step"]
        elapsed[r["step"]] = t
    curve = [(r["step"], elapsed[r["step"]], r[key]) for r in rows if key in r]
    last = [r for r in rows if key in r][-1]
    grad_key = f"{prefix}grad_norm" if prefix else "train/grad_norm"
    ece = [r[f"{prefix}eval/ece"] for r in rows if f"{prefix}eval/ece" in r]  # codistill logs it
    return dict(acc=curve[-1][2], curve=curve, train_s=t, ece=ece[-1] if ece else None,
                pass1=last.get(f"{prefix}eval/pass@1"), pass16=last.get(f"{prefix}eval/pass@16"),
                gen_s=sum(r["time/generate"] for r in train), upd_s=sum(r["time/update"] for r in train),
                tok_s=sum(r["train/tokens"] for r in train) / max(t, 1e-9),
                grad=statistics.mean(r[grad_key] for r in train) if train else float("nan"))


def mean_std(xs, fmt="{:.3f}"):
    if None in xs:
        return "-"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} ± {fmt.format(statistics.stdev(xs))}"


def table(results, target):
    lines = [f"| algorithm | eval accuracy | pass@1 / pass@16 | train time (s) | generate / update (s) | "
             f"time to {target} (s) | peak memory (GiB) | trained tokens/s | grad norm | paper reports |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs, claim in results:
        reached = [next((t for _, t, a in r["curve"] if a >= target), None) for r in runs]
        hit = [t for t in reached if t is not None]
        to_target = (mean_std(hit, "{:.1f}") + ("" if len(hit) == len(runs) else f" ({len(hit)}/{len(runs)} seeds)")
                     if hit else f"never (0/{len(runs)})")
        if all(r["curve"][0][2] >= target for r in runs):
            to_target = "(starts above)"
        lines.append(
            f"| {name} | {mean_std([r['acc'] for r in runs])} | "
            f"{mean_std([r['pass1'] for r in runs])} / {mean_std([r['pass16'] for r in runs])} | "
            f"{mean_std([r['train_s'] for r in runs], '{:.1f}')} | "
            f"{statistics.mean(r['gen_s'] for r in runs):.1f} / {statistics.mean(r['upd_s'] for r in runs):.1f} | "
            f"{to_target} | {statistics.mean(r['rss'] for r in runs):.2f} | "
            f"{statistics.mean(r['tok_s'] for r in runs):.0f} | {statistics.mean(r['grad'] for r in runs):.2f} | {claim} |")
    return "\n".join(lines)


def labels():
    """Every label a figure can draw, in the order of ROWS (codistill.py and bdkd.py rows as a small and
    a large line): the order fixes each one's style."""
    return [f"{name} {size}" if script in ("codistill.py", "bdkd.py") else name
            for name, script, _, _ in ROWS
            for size in (("small", "large") if script in ("codistill.py", "bdkd.py") else ("",))]


def style(label, order):
    """The same colour and marker for a label in every panel of every figure (its place in `order`);
    dashed for the large model; every other marker hollow, so that lines drawn over each other still show."""
    import matplotlib.pyplot as plt
    colours = [plt.cm.tab10(i) for i in range(10)] + [plt.cm.tab20b(i) for i in (0, 4, 8, 12, 16)] + \
              [plt.cm.Dark2(i) for i in range(8)]  # 23 hues that read apart, the strongest first
    i = order.index(label) if label in order else len(order)
    return dict(color=colours[i % len(colours)], marker="osD^vP*Xh<>p"[i % 12], ls="--" if label.endswith(" large") else "-",
                mfc="none" if i % 2 else None, ms=5, alpha=0.9)


def draw(panels, path, title, ncols, order=()):
    """One figure: `panels` [(title, xlabel, ylabel, [(label, xs, ys)])] in rows of `ncols`, each label drawn
    alike in every panel (`style`), lines of a panel thinner the later they come (an earlier line shows
    beneath a later one it coincides with), and one legend below that covers every label. The README's
    figures and `--plot` both draw through it. False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    order = list(order) + sorted({l for *_, lines in panels for l, _, _ in lines} - set(order))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows + 1.2), squeeze=False)
    handles = {}
    for ax, (name, xlabel, ylabel, lines) in zip(axes.flat, panels):
        for j, (label, xs, ys) in enumerate(lines):
            (handles[label],) = ax.plot(xs, ys, label=label, lw=2.6 - 1.4 * j / max(len(lines) - 1, 1), **style(label, order))
        ax.set_title(name, fontsize=10)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    shown = [l for l in order if l in handles]
    per_row = max(1, min(len(shown), 6, int(fig.get_figwidth() / (0.6 + 0.07 * max(map(len, shown))))))  # inches a label takes
    fig.legend([handles[l] for l in shown], shown, loc="lower center", ncol=per_row, fontsize=9, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.035 * (-(-len(shown) // per_row)) + 0.02, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot(results, path, title):
    """One column per family of methods: mean eval accuracy vs step (top) and vs training time (bottom)."""
    by = {name: runs for name, runs, _ in results}
    families = {f: [n for n in names if n in by] for f, names in FAMILIES.items()}
    families = {f: names for f, names in families.items() if names}
    n = len(results[0][1])
    ylabel = f"greedy eval accuracy (mean of {n} seed{'s' if n > 1 else ''})"
    mean = lambda runs, j, k: statistics.mean(r["curve"][j][k] for r in runs)
    lines = {name: ([s for s, _, _ in runs[0]["curve"]], [mean(runs, j, 1) for j in range(len(runs[0]["curve"]))],
                    [mean(runs, j, 2) for j in range(len(runs[0]["curve"]))]) for name, runs in by.items()}
    panels = [(f, "step", ylabel, [(n, lines[n][0], lines[n][2]) for n in names]) for f, names in families.items()]
    panels += [(f, "training time (s, generation + update)", ylabel, [(n, lines[n][1], lines[n][2]) for n in names])
               for f, names in families.items()]
    return draw(panels, path, title, len(families), labels())


def run_curves(dirs, metrics, x, mean_seeds=False):
    """{metric: [(label, xs, ys)]} of runs' metrics.jsonl, x the step or the training time (the logged time/step
    summed); a metric a run did not log is left out (one line on stderr). `mean_seeds`: runs whose directories
    differ only by a final -s<N> (runs/grpo-s1, runs/grpo-s2) are one line, their mean at the points every one of
    them logged (by time: the mean time there), labelled with the name less -s<N> and the number of seeds."""
    panels = {m: {} for m in metrics}  # metric -> label -> [(x, y) of each run]
    for d in dirs:
        rows = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
        elapsed, t = {0: 0.0}, 0.0
        for r in rows:
            t += r.get("time/step", 0.0)
            elapsed[r["step"]] = t
        label = os.path.normpath(d)
        if mean_seeds:
            label = re.sub(r"-s\d+$", "", label)
        for m in metrics:
            pts = {r["step"]: (r["step"] if x == "step" else elapsed[r["step"]], r[m]) for r in rows if m in r}
            if pts:
                panels[m].setdefault(label, []).append(pts)
            else:
                alike = sorted({k for r in rows for k in r if k.endswith("/" + m)})  # codistill: small/eval/accuracy
                print(f"{d}: no {m} logged" + (f" (it logged {', '.join(alike)}: name those in --metrics)" if alike else ""),
                      file=sys.stderr)
    curves = {}
    for m, runs in panels.items():
        for label, seeds in runs.items():
            steps = sorted(set.intersection(*(set(pts) for pts in seeds)))
            mean = lambda s, i: statistics.mean(pts[s][i] for pts in seeds)
            name = label if not mean_seeds else f"{label} ({len(seeds)} seed{'s' * (len(seeds) > 1)})"
            curves.setdefault(m, []).append((name, [mean(s, 0) for s in steps], [mean(s, 1) for s in steps]))
    return curves


def plot_runs(dirs, metrics, x, path, mean_seeds=False):
    """`--plot`: any runs' metrics.jsonl, one panel per metric, one line per run (`run_curves`: with
    `mean_seeds`, one per run less its seed)."""
    drawn = run_curves(dirs, metrics, x, mean_seeds)
    if not drawn:
        sys.exit(f"error: no run logged {', '.join(metrics)}: nothing to plot")
    xlabel = "step" if x == "step" else "training time (s, generation + update)"
    title = f"{len(dirs)} run{'s' * (len(dirs) > 1)}" + (", the mean of each one's seeds" if mean_seeds else "")
    return draw([(m, xlabel, m, lines) for m, lines in drawn.items()], path, title, len(drawn))


def read_samples(run):
    """The rows of a run's samples.jsonl (what the model wrote at each evaluation)."""
    path = os.path.join(run, "samples.jsonl")
    if not os.path.isfile(path):
        sys.exit(f"error: no samples.jsonl in {run} (a run writes it unless --log-samples 0)")
    return [json.loads(line) for line in open(path) if line.strip()]


def show_samples(runs, question="0"):
    """`--samples`: the lines that show one held-out question's greedy answers at every evaluation, the runs
    (codistill.py and bdkd.py: each model) side by side under each step; '[cut]' ends a completion that hit
    --max-new-tokens (its row's `truncated`). `question`: its index among the logged
    questions (0: the first held-out question), or its text or any part of it."""
    evals = {run: [r for r in read_samples(run) if r["kind"] == "eval"] for run in runs}
    rows = [r for rs in evals.values() for r in rs]
    if question.isdigit():
        texts = [r["question"] for r in rows if r["index"] == int(question)][:1]
        logged = sorted({r["index"] for r in rows})
        if not texts:
            sys.exit(f"error: --question {question}: the runs logged questions {', '.join(map(str, logged)) or 'none'}")
    else:
        texts = sorted({r["question"] for r in rows if question in r["question"]}, key=lambda t: (t != question, t))
        if not texts:
            sys.exit(f"error: --question '{question}' is in none of the logged questions: "
                     + "; ".join(f"{i}: {t}" for i, t in sorted({(r["index"], r["question"]) for r in rows})))
        if len(texts) > 1 and question not in texts:
            sys.exit(f"error: --question '{question}' is in {len(texts)} of the logged questions: give more of it, "
                     "or its index")
    mine = [r for r in rows if r["question"] == texts[0]]
    out = [f"question {mine[0]['index']}: {texts[0]}", f"gold: {mine[0]['gold']}"]
    columns = [(f"{run} {m}" if m else run, [r for r in rs if r["question"] == texts[0] and r.get("model") == m])
               for run, rs in evals.items() for m in dict.fromkeys(r.get("model") for r in rs)]
    width = max(len(label) for label, _ in columns)
    for step in sorted({r["step"] for r in mine}):
        out.append(f"step {step}")
        for label, rs in columns:
            r = next((r for r in rs if r["step"] == step), None)
            out.append(f"  {label:<{width}}  " + ("-" if r is None else f"{'right' if r['correct'] else 'wrong'}  answer "
                                                  f"{r['answer']}: {' '.join(r['completion'].split())}"
                                                  + (" [cut]" if r.get("truncated") else "")))
    return out


def slug(name):
    """A row's name as one word for --only: 'GRPO no KL, DAPO clip' is grpo-no-kl-dapo-clip."""
    return "-".join("".join(c if c.isalnum() or c in ".+" else " " for c in name.lower()).split())


def select_rows(only):
    """The rows --only names: each value a row's name, its word (`slug`), or words joined by commas."""
    if only is None:
        return list(ROWS)
    known = lambda w: any(w in (r[0], slug(r[0])) for r in ROWS)
    wanted = {x for w in only for x in ([w] if known(w) else w.split(","))}
    unknown = sorted(w for w in wanted if not known(w))
    if unknown:
        sys.exit(f"error: --only {', '.join(unknown)} matches no row; rows: {', '.join(slug(r[0]) for r in ROWS)} "
                 "(or their names, quoted)")
    return [r for r in ROWS if r[0] in wanted or slug(r[0]) in wanted]


def parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="a 10-second smoke run of one row (the toy regime, one seed, 2 steps):\n"
               "  python results.py --regime toy --seeds 1 --steps 2 --eval-size 20 --only grpo\n"
               "every row once, in a few minutes: python results.py --seeds 1 --steps 2 --eval-size 20\n"
               "plot any runs: python results.py --plot runs/a runs/b --metrics eval/accuracy train/reward\n"
               "what two runs answered to one question: python results.py --samples runs/a runs/b --question 3\n\n"
               "rows (--only takes the name or the word):\n" + "\n".join(f"  {slug(r[0]):28} {r[0]}" for r in ROWS))
    p.add_argument("--regime", nargs="+", default=list(REGIMES), choices=list(REGIMES), help="toy regimes (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds of every row (default: 1 2 3)")
    p.add_argument("--only", nargs="+", default=None,
                   help="rows to run, by name (quoted) or by word, see below (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one CPU thread each (default: 2)")
    p.add_argument("--eval-every", type=int, default=20, help="evaluation interval of each run, for the curves; each "
                   "evaluation samples pass@k (default: 20)")
    p.add_argument("--steps", type=int, default=None, help="training steps of every run (default: the toy default, 200)")
    p.add_argument("--eval-size", type=int, default=None, help="held-out questions of every evaluation (default: all 500)")
    p.add_argument("--out", default=os.path.join("runs", "results"), help="where the tables, figures and runs go; "
                   "`--out results` replaces the ones the README shows (default: runs/results)")
    p.add_argument("--plot", nargs="+", metavar="RUN", help="instead: one figure of these runs' metrics.jsonl")
    p.add_argument("--metrics", nargs="+", default=["eval/accuracy", "train/reward"], help="--plot: one panel each "
                   "(default: eval/accuracy train/reward)")
    p.add_argument("--x", choices=("step", "time"), default="step", help="--plot: by step or by training time (default: step)")
    p.add_argument("--mean-seeds", action="store_true", help="--plot: one line for the runs whose names differ only by "
                   "a final -s<N> (runs/grpo-s1 runs/grpo-s2), their mean")
    p.add_argument("--png", default="plot.png", help="--plot: the figure's file (default: plot.png)")
    p.add_argument("--samples", nargs="+", metavar="RUN", help="instead: one question's greedy answers at each evaluation of "
                   "these runs (their samples.jsonl), side by side")
    p.add_argument("--question", default="0", help="--samples: the question, by its index among the logged ones or by "
                   "(part of) its text (default: 0, the first held-out question)")
    return p


def main():
    opts = parser().parse_args()
    if opts.samples:
        print("\n".join(show_samples(opts.samples, opts.question)))
        return
    if opts.plot:
        missing = [d for d in opts.plot if not os.path.isfile(os.path.join(d, "metrics.jsonl"))]
        if missing:
            sys.exit(f"error: no metrics.jsonl in {', '.join(missing)}")
        if not plot_runs(opts.plot, opts.metrics, opts.x, opts.png, opts.mean_seeds):
            sys.exit(1)  # no matplotlib: draw said so
        print(f"wrote {opts.png}")
        return
    rows = select_rows(opts.only)

    sys.path.insert(0, ROOT)
    import tasks
    for regime in opts.regime:  # every toy model there, before the parallel runs (one clear line if not)
        for size in ("small", "large"):
            tasks.toy_path(REGIMES[regime][size])
    jobs = [(regime, name, script, flags, seed) for regime in opts.regime for name, script, flags, _ in rows
            for seed in opts.seeds if regime == "toy" or name not in TOY_ONLY]
    t0 = time.time()

    def work(job):
        regime, name, script, flags, seed = job
        r = REGIMES[regime]
        out = os.path.join(opts.out, regime, "runs", f"{name.replace(' ', '_').replace('=', '')}-s{seed}")
        shutil.rmtree(out, ignore_errors=True)
        extra = (["--steps", str(opts.steps)] if opts.steps else []) + (
            ["--eval-size", str(opts.eval_size)] if opts.eval_size else [])
        flags = [f.format(**r) for f in [*MODEL_FLAGS[script], "--dataset", "{dataset}", *flags]]
        wall, rss = run_one(script, [*flags, *extra, "--seed", str(seed)], out, opts.eval_every)
        print(f"[{time.time() - t0:6.0f}s] {regime}: {name} seed {seed}: {wall:.0f}s", flush=True)
        return job, out, rss

    with ThreadPoolExecutor(opts.jobs) as pool:
        done = list(pool.map(work, jobs))

    machine = f"{os.cpu_count()} CPU cores, one thread per run, {opts.jobs} runs at a time"
    command = f"python results.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}"
    md = [f"{len(opts.seeds)} seeds ({' '.join(map(str, opts.seeds))}), {machine}; made by `{command}` "
          f"in {(time.time() - t0) / 60:.0f} min."]
    figures = []
    for regime in opts.regime:
        results = []
        for name, script, flags, claim in rows:
            mine = [(out, rss) for (g, n, *_), out, rss in done if g == regime and n == name]
            if not mine:  # a toy-only row
                continue
            own = name == "CoDistill"  # the other codistill rows carry their own claim, for the small model
            for prefix, label, c in ((("small/", f"{name} small", CODISTILL_CLAIMS["small"] if own else claim),
                                      ("large/", f"{name} large", CODISTILL_CLAIMS["large"] if own else ""))
                                     if script in ("codistill.py", "bdkd.py") else (("", name, claim),)):
                runs = [dict(read_run(out, prefix), rss=rss) for out, rss in mine]
                results.append((label, runs, c))
        by = {name: runs for name, runs, _ in results}
        r = REGIMES[regime]
        notes = []
        if {"CoDistill small", "GRPO", "GRPO large"} <= set(by):
            mean = lambda runs, k: statistics.mean(x[k] for x in runs)
            separate = mean(by["GRPO"], "train_s") + mean(by["GRPO large"], "train_s")
            together = mean(by["CoDistill small"], "train_s")
            notes.append(f"CoDistill trains both models in {together:.1f} s of training time; GRPO on {r['small']} plus "
                         f"GRPO on {r['large']} take {separate:.1f} s ({100 * (1 - together / separate):+.0f}% saved); the "
                         f"large model's generation that CoDistill skips is {mean(by['GRPO large'], 'gen_s'):.1f} s.")
        eces = [(name, [x["ece"] for x in runs]) for name, runs, _ in results if runs[0]["ece"] is not None]
        if eces:
            notes.append("Expected calibration error of the greedy answer's confidence at the last evaluation (10 bins; "
                         "lower is better): " + "; ".join(f"{n} {mean_std(e)}" for n, e in eces) + ".")
        md += ["", f"### Regime {regime}: {r['small']} and {r['large']} on --dataset {r['dataset']}", "",
               table(results, r["target"]), "", *notes]
        png = os.path.join(opts.out, f"curves-{regime}.png")
        os.makedirs(opts.out, exist_ok=True)
        if plot(results, png, f"{regime}: {r['small']} / {r['large']}"):
            figures.append(png)
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nwrote {os.path.join(opts.out, 'results.md')}" + "".join(f" and {f}" for f in figures))


if __name__ == "__main__":
    main()
