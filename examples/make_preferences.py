"""Generate the small preference dataset the example and the tests use (no downloads).

    python examples/make_preferences.py > examples/data/preferences.jsonl

Deterministic: arithmetic questions whose chosen answer is right and polite, and whose
rejected answer is wrong and curt, so a model trained online must learn a real preference.
"""

from __future__ import annotations

import json
import random
import sys

OPENERS = ["Q:", "Question:", "Quick one:", "Please help:"]
CLOSERS = [" Hope that helps.", " Happy to help.", " Glad to help!", ""]


def make(n: int = 200, seed: int = 7) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        op = rng.choice(["+", "-", "*"])
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        wrong = value + rng.choice([-3, -2, -1, 1, 2, 3, 10])
        rows.append(
            {
                "prompt": f"{rng.choice(OPENERS)} what is {a} {op} {b}?",
                "chosen": f" {a} {op} {b} = {value}.{rng.choice(CLOSERS)}",
                "rejected": f" {wrong}. Figure it out yourself.",
            }
        )
    return rows


if __name__ == "__main__":
    for row in make():
        sys.stdout.write(json.dumps(row) + "\n")
