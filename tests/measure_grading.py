"""Measure tasks.is_correct on the full public sets (not a test: pytest does not collect it).

Needs local copies (no download here):
  MATH-500   prm800k/math_splits/test.jsonl of github.com/openai/prm800k (problem, solution, answer)
  GSM8K      grade_school_math/data/test.jsonl and example_model_solutions.jsonl of
             github.com/openai/grade-school-math (the latter: 4 models' solutions with is_correct labels)

  python tests/measure_grading.py --math500 test.jsonl --gsm8k test.jsonl \
      --gsm8k-solutions example_model_solutions.jsonl

Prints: MATH-500 reference solutions graded correct; acceptance of equivalent rewrites and
rejection of wrong ones, by kind (rules below, applied to every gold they fit); GSM8K reference
solutions and model solutions against their labels; the time to grade 256 completions.
"""

import argparse
import collections
import fractions
import json
import os
import random
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tasks  # noqa: E402

FRAC = re.compile(r"^(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}$")
FRAC_BARE = re.compile(r"^(-?)\\frac ?(\d)(\d)$")
INT = re.compile(r"^-?\d+$")
UNIT = re.compile(r"^(.*\d)\s*\\(?:text|mbox)\{\s*([a-z ]+)\}(\^2|\^3)?$")
CHOICE = re.compile(r"^\\text\{\(([A-E])\)\}$")


def box(ans, say="So the final answer is"):
    return f"{say} $\\boxed{{{ans}}}$."


def terminating_decimal(num, den):
    d = den
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d != 1:
        return None
    s = f"{num / den:.6f}".rstrip("0").rstrip(".")
    return s if fractions.Fraction(s) == fractions.Fraction(num, den) else None


def equivalent(gold):
    """(kind, completion) pairs whose answer equals `gold`."""
    g = gold.strip()
    out = [("boxed as given", box(g)), ("dfrac, spaces", box(g.replace("\\frac", "\\dfrac").replace(",", ", ")))]
    m = FRAC.match(g)
    if m:
        sign, a, b = m.groups()
        out += [("a/b for \\frac{a}{b}", box(f"{sign}{a}/{b}")), ("a/b in a sentence", f"The answer is {sign}{a}/{b}.")]
        if len(a) == 1 and len(b) == 1:
            out.append(("\\frac ab without braces", box(f"{sign}\\frac{a}{b}")))
        dec = terminating_decimal(int(a), int(b))
        if dec:
            out.append(("decimal for a fraction", box(sign + dec)))
    m = FRAC_BARE.match(g)
    if m:
        sign, a, b = m.groups()
        out.append(("braces for a bare gold", box(f"{sign}\\frac{{{a}}}{{{b}}}")))
    if re.search(r"\\sqrt\{\d\}", g):  # one digit: TeX reads \sqrt 13 as \sqrt{1}3
        out.append(("\\sqrt 5 for \\sqrt{5}", box(re.sub(r"\\sqrt\{(\d)\}", r"\\sqrt \1", g))))
    if re.search(r"\\sqrt\d", g):
        out.append(("braces for a bare \\sqrt", box(re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", g))))
    if INT.match(g):
        n = int(g)
        out += [("units after the number", box(f"{g} \\text{{ inches}}")), ("x = n", box(f"x = {g}")),
                ("answer sentence then a remark", f"The answer is {g} (that is, {abs(n) + 3} less 3).")]
        if abs(n) >= 1000:
            out += [("thousands separator {,}", box(f"{n:,}".replace(",", "{,}"))),
                    ("thousands separator ,", box(f"{n:,}"))]
    if re.fullmatch(r"-?\d{1,3}(\{,\}\d{3})+", g):
        out.append(("no thousands separator", box(g.replace("{,}", ""))))
    m = UNIT.match(g)
    if m:
        out.append(("units dropped", box(m.group(1))))
    m = CHOICE.match(g)
    if m:
        out += [("C for \\text{(C)}", box(m.group(1))), ("(C) for \\text{(C)}", box(f"({m.group(1)})"))]
    parts = [p.strip() for p in g.split(",")]
    if (len(parts) >= 2 and not tasks.THOUSANDS.fullmatch(g) and not re.search(r"[()\[\]{}]", g)
            and all(re.fullmatch(r"-?\d+", p) for p in parts)):
        out.append(("list in another order", box(", ".join(reversed(parts)))))
    return out


def wrong(gold, other):
    """(kind, completion) pairs whose answer differs from `gold` (`other`: another problem's gold)."""
    g = gold.strip()
    out = []
    if INT.match(g):
        n = int(g)
        out += [("n + 1", box(str(n + 1))), ("10 n", box(str(10 * n))) if n else ("n + 2", box(str(n + 2))),
                ("a later number in the box's sentence", f"The answer is {n + 1} (that is, {g} plus 1).")]
        if n:
            out.append(("-n", box(str(-n))))
        if abs(n) >= 1000:
            out.append(("another number with {,}", box(f"{n + 10:,}".replace(",", "{,}"))))
    parts = [p.strip() for p in g.split(",")]
    if len(parts) >= 2 and not tasks.THOUSANDS.fullmatch(g) and all(re.fullmatch(r"-?\d+", p) for p in parts):
        out += [("list digits run together", box("".join(parts))), ("list missing one", box(", ".join(parts[:-1])))]
    if re.fullmatch(r"-?\d*\.\d+", g):
        out.append(("decimal point dropped", box(g.replace(".", ""))))
    if "_" in g and re.fullmatch(r"[0-9A-F]+_\{?\d+\}?", g):
        out.append(("base subscript glued", box(g.replace("_", "").replace("{", "").replace("}", ""))))
    m = FRAC.match(g)
    if m:
        sign, a, b = m.groups()
        if a != b:
            out.append(("fraction inverted", box(f"{sign}\\frac{{{b}}}{{{a}}}")))
    if "\\sqrt" in g:
        out.append(("root dropped", box(re.sub(r"\\sqrt\{?(\d+)\}?", r"\1", g))))
    if tasks.tidy_answer(other) != tasks.tidy_answer(g):
        out.append(("another problem's answer", box(other)))
    out.append(("empty box", "\\boxed{}"))
    return out


def rate(counter):
    return ", ".join(f"{k}: {ok}/{n}" for k, (ok, n) in sorted(counter.items()))


def step_time(rows, rng, when):
    """A step's grading: 256 completions (an equivalent and a wrong rewrite for 128 problems),
    one rewards_for call, math-verify's caches empty (imported before: a run pays that once)."""
    tasks.is_correct("\\boxed{x}", "y")
    picks = [(rng.choice(make)[1], r["answer"]) for r in rng.sample(rows, 128)
             for make in (equivalent(r["answer"]), wrong(r["answer"], rng.choice(rows)["answer"]))]
    tasks._parsed.cache_clear()
    t, cpu = time.perf_counter(), time.process_time()
    s = tasks.rewards_for([c for c, _ in picks], [g for _, g in picks])
    print(f"rewards_for on 256 MATH-500 completions, {when}: {time.perf_counter() - t:.2f} s "
          f"({time.process_time() - cpu:.2f} s CPU), "
          f"accuracy {s.correct.float().mean():.2f}, grade_errors {s.grade_errors}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--math500")
    ap.add_argument("--gsm8k")
    ap.add_argument("--gsm8k-solutions")
    ap.add_argument("--show", type=int, default=5, help="failures to print per set")
    a = ap.parse_args()
    rng = random.Random(0)
    times, errors = [], [0]
    if a.math500:
        step_time([json.loads(line) for line in open(a.math500)], rng, "cold (a fresh process)")

    def grade(c, g):
        t = time.process_time()
        try:
            v = tasks.is_correct(c, g)
        except tasks.GradingError:
            v, errors[0] = None, errors[0] + 1
        times.append(time.process_time() - t)
        return v

    if a.math500:
        rows = [json.loads(line) for line in open(a.math500)]
        ref = [r for r in rows if not grade(r["solution"], r["answer"])]
        print(f"MATH-500 reference solutions graded correct: {len(rows) - len(ref)}/{len(rows)}")
        for r in ref[:a.show]:
            print("   missed:", repr(r["answer"]), "from", repr(tasks.extract_answer(r["solution"])))
        for name, make, want in (("equivalent rewrites accepted", lambda r, o: equivalent(r["answer"]), True),
                                 ("wrong rewrites rejected", lambda r, o: wrong(r["answer"], o["answer"]), False)):
            by_kind, fails = collections.defaultdict(lambda: [0, 0]), []
            for r in rows:
                for kind, c in make(r, rng.choice(rows)):
                    ok = grade(c, r["answer"]) == want
                    by_kind[kind][0] += ok
                    by_kind[kind][1] += 1
                    if not ok:
                        fails.append((kind, r["answer"], c))
            n = sum(v[1] for v in by_kind.values())
            print(f"MATH-500 {name}: {n - len(fails)}/{n} = {(n - len(fails)) / n:.2%}")
            print("   by kind:", rate(by_kind))
            for f in fails[:a.show]:
                print("   failed:", f)
    if a.gsm8k:
        rows = [json.loads(line) for line in open(a.gsm8k)]
        bad = [r for r in rows if not grade(r["answer"], tasks.gold_answer(r["answer"]))]
        print(f"GSM8K reference solutions graded correct: {len(rows) - len(bad)}/{len(rows)}")
    if a.gsm8k_solutions:
        agree, n, fails = 0, 0, []
        for line in open(a.gsm8k_solutions):
            r = json.loads(line)
            gold = r["ground_truth"].split("A:")[-1].strip()  # this file ends its solutions with 'A: n'
            for key, v in r.items():
                if isinstance(v, dict) and "is_correct" in v:
                    ok = grade(v["solution"], gold) == v["is_correct"]
                    agree += ok
                    n += 1
                    if not ok:
                        fails.append((gold, v["is_correct"], v["solution"][-120:]))
        print(f"GSM8K model solutions agreeing with their labels: {agree}/{n}")
        for f in fails[:a.show]:
            print("   disagreed:", f)
    if times:
        print(f"grading errors (time limit): {errors[0]}")
        print(f"CPU time per check over {len(times)} checks: median {statistics.median(times) * 1e3:.2f} ms, "
              f"p99 {sorted(times)[int(len(times) * 0.99)] * 1e3:.1f} ms, max {max(times) * 1e3:.0f} ms")
    if a.math500:
        step_time([json.loads(line) for line in open(a.math500)], rng, "warm (after the checks above)")


if __name__ == "__main__":
    main()
