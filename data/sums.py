"""Sums as .jsonl datasets for a real model on a CPU: how the shipped files were made, and a check.

    python data/sums.py            # write the four files below (the same bytes every time)
    python data/sums.py --check    # compare the shipped files with a fresh build: exit 0 if identical

Each line is {"question": "What is 3 + 4?", "answer": "7"}, for any script's --dataset and
--eval-dataset (the questions get --instruction appended, like any .jsonl's):

    sums-1digit-train.jsonl, sums-1digit-eval.jsonl   a + b with a, b in 1..9: the 81 sums
    sums-2digit-train.jsonl, sums-2digit-eval.jsonl   a + b with a, b in 10..99: 1,000 to train, 100 held out

Held out means a sum asked in neither order: the split is over unordered pairs {a, b}, so when 3 + 4
is an evaluation question, neither 3 + 4 nor 4 + 3 is a training one. One digit: the 45 pairs are
shuffled (seed 1); the first 15 are held out, asked in both orders (28 questions, as two of them are
doubles like 2 + 2), and the other 30 train (53 questions); together the 81 sums. Two digits: the
4,095 pairs are shuffled (seed 2) and each is asked in one order, drawn; the first 100 are held out
and the next 1,000 train.
"""

import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def row(a: int, b: int) -> dict:
    return dict(question=f"What is {a} + {b}?", answer=str(a + b))


def one_digit() -> tuple:
    """(train, eval) rows: the 81 sums of 1..9, split by unordered pair (30 pairs train, 15 held out)."""
    pairs = [(a, b) for a in range(1, 10) for b in range(a, 10)]  # 45 unordered pairs
    random.Random(1).shuffle(pairs)
    both = lambda ps: [row(x, y) for a, b in ps for x, y in sorted({(a, b), (b, a)})]
    return both(pairs[15:]), both(pairs[:15])


def two_digit(n_eval: int = 100, n_train: int = 1000) -> tuple:
    """(train, eval) rows of sums of 10..99: unordered pairs shuffled (seed 2), each asked in one order (drawn),
    the first `n_eval` held out, the next `n_train` to train."""
    rng = random.Random(2)
    pairs = [(a, b) for a in range(10, 100) for b in range(a, 100)]
    rng.shuffle(pairs)
    rows = [row(a, b) if rng.random() < 0.5 else row(b, a) for a, b in pairs[:n_eval + n_train]]
    return rows[n_eval:], rows[:n_eval]


def files() -> dict:
    """{file name: its text}, for every shipped file."""
    text = lambda rows: "".join(json.dumps(r) + "\n" for r in rows)
    (t1, e1), (t2, e2) = one_digit(), two_digit()
    return {"sums-1digit-train.jsonl": text(t1), "sums-1digit-eval.jsonl": text(e1),
            "sums-2digit-train.jsonl": text(t2), "sums-2digit-eval.jsonl": text(e2)}


def main(argv: list) -> int:
    if argv not in ([], ["--check"]):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    different = []
    for name, text in files().items():
        path = os.path.join(HERE, name)
        if argv:
            if not os.path.isfile(path) or open(path).read() != text:
                different.append(name)
        else:
            with open(path, "w") as f:
                f.write(text)
            print(f"{path}: {text.count(chr(10))} questions")
    if argv:
        print("identical" if not different else f"different: {', '.join(different)}")
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
