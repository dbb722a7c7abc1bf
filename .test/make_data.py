"""Write the tiny CI datasets of the .test profile (seeded; rerun to regenerate byte-identical files).

Two datasets in the S3-Rec format with a sequential signal a model can learn: each user walks a
random cycle through a few item "chains", so the next item is mostly predictable.
"""
import json
import random
from pathlib import Path

HERE = Path(__file__).parent


def write(name: str, n_users: int, n_items: int, seed: int) -> None:
    rng = random.Random(seed)
    lines = []
    for user in range(1, n_users + 1):
        length = rng.randint(4, 14)
        item = rng.randint(1, n_items)
        items = []
        for _ in range(length):
            items.append(item)
            item = item % n_items + 1 if rng.random() < 0.8 else rng.randint(1, n_items)
        lines.append(" ".join(map(str, [user, *items])))
    (HERE / "data").mkdir(exist_ok=True)
    (HERE / "data" / f"{name}.txt").write_text("\n".join(lines) + "\n")


def write_instructions(n: int, seed: int) -> None:
    """A few Alpaca-format records (instruction, input, output) of simple arithmetic, for stage 2."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        records.append({"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": str(a + b)})
    (HERE / "data" / "instructions.json").write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    write("TinyA", n_users=60, n_items=150, seed=1)
    write("TinyB", n_users=40, n_items=120, seed=2)
    write_instructions(12, seed=3)
