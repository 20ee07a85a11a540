"""The countdown game's reward (TinyZero): 1 when the completion's expression reaches the target using only the
given numbers, each at most once; else 0. A TRL reward function, for any script's --reward:

    python grpo.py --dataset countdown-train.jsonl --reward examples/countdown_reward.py:countdown_reward

Each .jsonl row (examples/countdown_data.py) carries its `numbers` and `target`: they arrive as columns.
"""

import ast
import operator
import re
from collections import Counter

OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def expression(completion: str) -> str:
    """The last <answer>...</answer> of the completion, else its last line (the toy writes the bare expression)."""
    tagged = re.findall(r"<answer>(.*?)</answer>", completion, re.DOTALL)
    return (tagged[-1] if tagged else completion.strip().splitlines()[-1] if completion.strip() else "").strip()


def value(node):
    """The value of +, -, *, / over integers, parsed (never eval): anything else raises ValueError."""
    if isinstance(node, ast.Expression):
        return value(node.body)
    if isinstance(node, ast.BinOp) and type(node.op) in OPS:
        return OPS[type(node.op)](value(node.left), value(node.right))
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    raise ValueError(f"not +, -, *, / over integers: {ast.dump(node)[:60]}")


def countdown_reward(completions, numbers, target, **kwargs):
    """One float a completion: 1.0 when its expression equals `target` and uses only `numbers`, each at most once."""
    rewards = []
    for completion, given, goal in zip(completions, numbers, target):
        expr = expression(completion)
        used = Counter(int(n) for n in re.findall(r"\d+", expr))
        if not expr or not re.fullmatch(r"[\d+\-*/()\s]+", expr) or used - Counter(given):
            rewards.append(0.0)
            continue
        try:
            rewards.append(float(abs(value(ast.parse(expr, mode="eval")) - goal) < 1e-9))
        except (ValueError, SyntaxError, ZeroDivisionError, RecursionError):
            rewards.append(0.0)
    return rewards
