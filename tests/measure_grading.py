"""Measure grading.is_correct on the full public sets (not a test: pytest does not collect it).

Needs local copies (no download here), each a .jsonl of rows as the hub holds them (the fields
tasks.BENCHMARKS names), or as github.com/QwenLM/Qwen2.5-Math keeps them in evaluation/data/
(<benchmark>/test.jsonl; its Minerva rows hold the reference solution, whose last \\boxed{} is the gold):
  --math500       HuggingFaceH4/MATH-500 (problem, solution, answer); prm800k's math_splits/test.jsonl
  --minerva       Qwen2.5-Math's minerva_math/test.jsonl (problem, solution)
  --olympiadbench Qwen2.5-Math's olympiadbench/test.jsonl (question, final_answer, solution: proofs)
  --amc23 --aime24 --aime25   (question or problem, answer; AIME 2024 with AoPS solutions)
  --gsm8k         grade_school_math/data/test.jsonl and, with --gsm8k-solutions,
                  example_model_solutions.jsonl of github.com/openai/grade-school-math (4 models'
                  solutions with is_correct labels)
  --labelled      real completions of Minerva and OlympiadBench questions (10 models) with the verdicts
                  of Qwen2.5-Math's grader: data/mix_data/<benchmark>/test.jsonl of
                  github.com/tangzhy/RealCritic (gt, reasoning, previous_score); that grader accepts
                  answers within 1e-4 relative and x100 or /100 of the gold, so each disagreement is
                  to be read (docs/evaluate.md reads them)

  python tests/measure_grading.py --math500 math500.jsonl --minerva minerva_math.jsonl \
      --olympiadbench olympiadbench.jsonl --amc23 amc23.jsonl --aime24 aime24.jsonl \
      --aime25 aime25.jsonl --gsm8k test.jsonl --gsm8k-solutions example_model_solutions.jsonl \
      --labelled minerva_math/test.jsonl olympiadbench/test.jsonl

Prints, for each benchmark: its reference solutions graded correct against their own golds (where
the rows have solutions that state an answer); acceptance of equivalent rewrites of the golds and
rejection of wrong ones, by kind (rules below, applied to every gold they fit); for GSM8K, model
solutions against their labels; the labelled completions' verdicts that differ; the time to grade
256 completions.
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
import grading  # noqa: E402
import tasks  # noqa: E402

FRAC = re.compile(r"^(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}$")
FRAC_BARE = re.compile(r"^(-?)\\frac ?(\d)(\d)$")
INT = re.compile(r"^-?\d+$")
DECIMAL = re.compile(r"^-?\d*\.\d+$")
UNIT = re.compile(r"^(.*\d)\s*\\(?:text|mbox)\{\s*([a-z ]+)\}(\^2|\^3)?$")
CHOICE = re.compile(r"^\\text\{\(([A-E])\)\}$")
E_NOTATION = re.compile(r"^(-?\d+(?:\.\d+)?)e(-?\d+)$")  # Minerva: 4.5e33, 1e-5
PY_RATIO = re.compile(r"^(-?)(\d+)\./(\d+)$")  # Minerva: -3./2
DEGREE = re.compile(r"\^\{?\\circ\}?")
TUPLES = re.compile(r"^\(([^()]*)\)(?:,\s*\(([^()]*)\))+$")  # OlympiadBench: (1,8,19), (2,7,13), (4,5,7)
INTERVAL = re.compile(r"^([(\[])(.+),(.+)([)\]])$")
FUNCTION = re.compile(r"^f\(x\)\s*=\s*(.+)$")


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


def plain(x: fractions.Fraction) -> str:
    """A terminating fraction as a plain decimal: 1/100000 -> 0.00001."""
    k = next(k for k in range(400) if (x * 10 ** k).denominator == 1)
    digits = str(abs(int(x * 10 ** k))).rjust(k + 1, "0")
    return ("-" if x < 0 else "") + (f"{digits[:-k]}.{digits[-k:]}" if k else digits)


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
        if re.match(r"^0\d", g):
            out.append(("leading zeros dropped", box(str(n))))
    if INT.match(g) or DECIMAL.match(g):
        out += [("a percent sign", box(f"{g}\\%")), ("units in \\mathrm{~cm}", box(f"{g} \\mathrm{{~cm}}")),
                ("answer: a sum then its result", f"Answer: {plain(fractions.Fraction(g) - 1)} + 1 = {g}")]
    m = E_NOTATION.match(g)
    if m:
        a, e = m.groups()
        out += [("a \\times 10^{e} for e-notation", box(f"{a} \\times 10^{{{int(e)}}}")),
                ("a \\cdot 10^{e} in a sentence", f"The answer is ${a} \\cdot 10^{{{int(e)}}}$.")]
        if abs(int(e)) <= 6:
            out.append(("decimal for e-notation", box(plain(fractions.Fraction(a) * fractions.Fraction(10) ** int(e)))))
    m = PY_RATIO.match(g)
    if m:
        sign, a, b = m.groups()
        out += [("\\frac{-a}{b} for -a./b", box(f"\\frac{{{sign}{a}}}{{{b}}}")),
                ("-\\frac{a}{b} for -a./b", box(f"{sign}\\frac{{{a}}}{{{b}}}"))]
    if re.fullmatch(r"-?\d{1,3}(\{,\}\d{3})+", g):
        out.append(("no thousands separator", box(g.replace("{,}", ""))))
    m = UNIT.match(g)
    if m:
        out.append(("units dropped", box(m.group(1))))
    if DEGREE.search(g) and "," not in g:
        out.append(("degrees dropped", box(DEGREE.sub("", g))))
    m = CHOICE.match(g)
    if m:
        out += [("C for \\text{(C)}", box(m.group(1))), ("(C) for \\text{(C)}", box(f"({m.group(1)})"))]
    parts = [DEGREE.sub("", p).strip() for p in g.split(",")]
    if (len(parts) >= 2 and not grading.THOUSANDS.fullmatch(g) and not re.search(r"[()\[\]{}]", DEGREE.sub("", g))
            and all(re.fullmatch(r"-?\d+", p) for p in parts)):
        out.append(("list in another order", box(", ".join(reversed(parts)))))
        if DEGREE.search(g):
            out.append(("list with degree signs", box(", ".join(f"{p}^\\circ" for p in parts))))
    if TUPLES.match(g):
        tuples = re.findall(r"\([^()]*\)", g)
        out.append(("tuples in another order", box(", ".join(reversed(tuples)))))
    m = INTERVAL.match(g)
    if m and not TUPLES.match(g) and "(" + m.group(2) + "," + m.group(3) + ")" != g.replace(" ", ""):
        out.append(("interval with \\left \\right", box(f"\\left{m.group(1)} {m.group(2)}, {m.group(3)} \\right{m.group(4)}")))
    m = FUNCTION.match(g)
    if m and "," not in g:
        out.append(("the right side of f(x) = ...", box(m.group(1))))
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
    if (INT.match(g) or DECIMAL.match(g)) and fractions.Fraction(g) != 0:
        out += [("a percent as a fraction (0.625 for 62.5)", box(plain(fractions.Fraction(g) / 100))),
                ("answer: the sum, not its result", f"Answer: {g} + 1 = {plain(fractions.Fraction(g) + 1)}"),
                ("answer: an equation without a result", f"Final Answer: {g} * 1 =")]
    parts = [DEGREE.sub("", p).strip() for p in g.split(",")]
    if (len(parts) >= 2 and len(set(parts)) == len(parts) and not grading.THOUSANDS.fullmatch(g)
            and all(re.fullmatch(r"-?\d+", p) for p in parts)):  # a list is a set: 16,3,1 is 16,3,1,1
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
    if re.sub(r"\\sqrt\{?(\d+)\}?", r"\1", g) != g:
        out.append(("root dropped", box(re.sub(r"\\sqrt\{?(\d+)\}?", r"\1", g))))
    m = E_NOTATION.match(g)
    if m:
        a, e = m.groups()
        out += [("e-notation, exponent off by one", box(f"{a} \\times 10^{{{int(e) + 1}}}")),
                ("e-notation, the exponent alone",
                 box(f"10^{{{int(e)}}}" if fractions.Fraction(a) != 1 else f"2 \\times 10^{{{e}}}"))]
    m = PY_RATIO.match(g)
    if m and m.group(2) != m.group(3):
        sign, a, b = m.groups()
        out.append(("-a./b inverted", box(f"{sign}\\frac{{{b}}}{{{a}}}")))
    if TUPLES.match(g):
        tuples = re.findall(r"\([^()]*\)", g)
        out += [("a tuple missing", box(", ".join(tuples[:-1]))), ("one tuple", box(tuples[0]))]
    m = INTERVAL.match(g)
    if m and not TUPLES.match(g) and "\\infty" not in g:  # an infinite end is open, whatever the bracket
        flip = {"(": "[", "[": "(", ")": "]", "]": ")"}
        out.append(("interval, an end open for closed", box(f"{flip[m.group(1)]}{m.group(2)},{m.group(3)}{m.group(4)}")))
    m = FUNCTION.match(g)
    if m and "," not in g:
        out.append(("another function", box(f"f(x) = {m.group(1)} + 1")))
    if grading.tidy_answer(other) != grading.tidy_answer(g):
        out.append(("another problem's answer", box(other)))
    out.append(("empty box", "\\boxed{}"))
    return out


def rate(counter):
    return ", ".join(f"{k}: {ok}/{n}" for k, (ok, n) in sorted(counter.items()))


def read(name, path):
    """[(question, gold, reference solution or None)] of a benchmark's file: the gold from the field that
    tasks.BENCHMARKS names (a Minerva row of Qwen2.5-Math's copy: its solution's last \\boxed{}), read
    as the loader reads it; the solution where it is one text (OlympiadBench's are lists of proofs)."""
    b = tasks.BENCHMARKS[name]
    out = []
    for line in open(path):
        r = json.loads(line)
        gold = tasks.benchmark_gold(r[b.answer]) if b.answer in r else grading.last_boxed(r["solution"])
        solution = r.get("solution") if isinstance(r.get("solution"), str) else None
        out.append((r.get(b.question) or r.get("problem") or r.get("question"), gold, solution))
    return out


def step_time(golds, rng, when):
    """A step's grading: 256 completions (an equivalent and a wrong rewrite for 128 problems),
    one rewards_for call, math-verify's caches empty (imported before: a run pays that once)."""
    grading.is_correct("\\boxed{x}", "y")
    picks = [(rng.choice(make)[1], g) for g in rng.sample(golds, 128)
             for make in (equivalent(g), wrong(g, rng.choice(golds)))]
    grading._parsed.cache_clear()
    t, cpu = time.perf_counter(), time.process_time()
    s = tasks.rewards_for([c for c, _ in picks], [g for _, g in picks])
    print(f"rewards_for on 256 MATH-500 completions, {when}: {time.perf_counter() - t:.2f} s "
          f"({time.process_time() - cpu:.2f} s CPU), "
          f"accuracy {s.correct.float().mean():.2f}, grade_errors {s.grade_errors}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [n for n in tasks.BENCHMARKS if n != "gsm8k"]
    for name in names + ["gsm8k"]:
        ap.add_argument(f"--{name}", help=f"a local copy of {name}'s rows (.jsonl)")
    ap.add_argument("--gsm8k-solutions")
    ap.add_argument("--labelled", nargs="*", default=[], help="real completions with verdicts: RealCritic's "
                    "data/mix_data/<benchmark>/test.jsonl (github.com/tangzhy/RealCritic: gt, reasoning, previous_score)")
    ap.add_argument("--show", type=int, default=5, help="failures to print per set")
    a = ap.parse_args()
    rng = random.Random(0)
    times, errors = [], [0]
    if a.math500:
        step_time([g for _, g, _ in read("math500", a.math500)], rng, "cold (a fresh process)")

    def grade(c, g):
        t = time.process_time()
        try:
            v = grading.is_correct(c, g)
        except grading.GradingError:
            v, errors[0] = None, errors[0] + 1
        times.append(time.process_time() - t)
        return v

    for name in names:
        if not getattr(a, name):
            continue
        rows = read(name, getattr(a, name))
        refs = [(g, s) for _, g, s in rows if s is not None]
        missed = [(g, s) for g, s in refs if not grade(s, g)]
        print(f"{name} reference solutions graded correct: " + (f"{len(refs) - len(missed)}/{len(refs)}" if refs else
              "none to grade (its rows hold no solution that states an answer)"))
        for g, s in missed[:a.show]:
            print("   missed:", repr(g), "from", repr(grading.extract_answer(s)))
        golds = [g for _, g, _ in rows]
        for what, make, want in (("equivalent rewrites accepted", lambda g, o: equivalent(g), True),
                                 ("wrong rewrites rejected", lambda g, o: wrong(g, o), False)):
            by_kind, fails = collections.defaultdict(lambda: [0, 0]), []
            for g in golds:
                for kind, c in make(g, rng.choice(golds)):
                    ok = grade(c, g) == want
                    by_kind[kind][0] += ok
                    by_kind[kind][1] += 1
                    if not ok:
                        fails.append((kind, g, c))
            n = sum(v[1] for v in by_kind.values())
            print(f"{name} {what}: {n - len(fails)}/{n} = {(n - len(fails)) / n:.2%}")
            print("   by kind:", rate(by_kind))
            for f in fails[:a.show]:
                print("   failed:", f)
    if a.gsm8k:
        rows = [json.loads(line) for line in open(a.gsm8k)]
        bad = [r for r in rows if not grade(r["answer"], grading.gold_answer(r["answer"]))]
        print(f"gsm8k reference solutions graded correct: {len(rows) - len(bad)}/{len(rows)}")
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
        print(f"gsm8k model solutions agreeing with their labels: {agree}/{n}")
        for f in fails[:a.show]:
            print("   disagreed:", f)
    for path in a.labelled:  # the verdicts of Qwen2.5-Math's grader (1e-4 relative tolerance, percent x100 too)
        rows = [json.loads(line) for line in open(path)]
        differ = [(r["previous_score"][0], r["gt"], grading.extract_answer(r["reasoning"])) for r in rows
                  if grade(r["reasoning"], r["gt"]) != r["previous_score"][0]]
        print(f"{path}: {len(rows) - len(differ)}/{len(rows)} verdicts as labelled "
              f"({sum(r['previous_score'][0] for r in rows)} labelled right)")
        for label, gold, answer in differ[:a.show]:
            print(f"   labelled {'right' if label else 'wrong'}:", repr(gold), "answer", repr(answer))
    if times:
        print(f"grading errors (time limit): {errors[0]}")
        print(f"CPU time per check over {len(times)} checks: median {statistics.median(times) * 1e3:.2f} ms, "
              f"p99 {sorted(times)[int(len(times) * 0.99)] * 1e3:.1f} ms, max {max(times) * 1e3:.0f} ms")
    if a.math500:
        step_time([g for _, g, _ in read("math500", a.math500)], rng, "warm (after the checks above)")


if __name__ == "__main__":
    main()
