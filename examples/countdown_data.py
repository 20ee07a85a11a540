"""The countdown game's data (TinyZero): reach a target with the given numbers, each at most once.

    python examples/countdown_data.py                 # countdown-train.jsonl, countdown-eval.jsonl
    python examples/countdown_data.py --toy --out toy-countdown   # prompts a toy model's tokenizer can encode

Each line: the prompt (the user message, verbatim), a solution as the answer, and the `numbers` and `target`
that examples/countdown_reward.py reads as columns. Every target is reached by a random expression over some
of the numbers (the answer), so every question has a solution. --toy: the digits, + and = alone ("3+17+8=25",
a sum of some of the numbers), since the toy tokenizer knows no other character.
"""

import argparse
import json
import random

PROMPT = ("Using the numbers {numbers}, create an equation that equals {target}. You can use basic arithmetic "
          "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. "
          "And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.")


def question(rng: random.Random, toy: bool) -> dict:
    """One row: 3 or 4 numbers in 1..99 (toy: 1..20), and the target of an expression over 2 or more of them."""
    while True:
        numbers = [rng.randint(1, 20 if toy else 99) for _ in range(rng.choice((3, 4)))]
        used = rng.sample(numbers, rng.randint(2, len(numbers)))
        expr = str(used[0])
        for n in used[1:]:
            op = "+" if toy else rng.choice("+-*")
            expr = f"{expr}{op}{n}" if toy else f"({expr}) * {n}" if op == "*" and " " in expr else f"{expr} {op} {n}"
        target = eval(expr)  # our own expression of digits and + - * ( )
        if 1 <= target <= (99 if toy else 999):
            break
    prompt = f"{'+'.join(map(str, numbers))}={target}" if toy else PROMPT.format(numbers=numbers, target=target)
    return dict(prompt=prompt, answer=expr, numbers=numbers, target=target)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="countdown", help="file prefix: <out>-train.jsonl, <out>-eval.jsonl")
    p.add_argument("--train", type=int, default=2000, help="training questions")
    p.add_argument("--eval", type=int, default=200, help="held-out questions")
    p.add_argument("--toy", action="store_true", help="prompts of digits, + and = (a toy model's)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    args = p.parse_args()
    rng = random.Random(args.seed)
    for split, n in (("train", args.train), ("eval", args.eval)):
        with open(f"{args.out}-{split}.jsonl", "w") as f:
            f.writelines(json.dumps(question(rng, args.toy)) + "\n" for _ in range(n))
        print(f"{args.out}-{split}.jsonl: {n} questions")


if __name__ == "__main__":
    main()
