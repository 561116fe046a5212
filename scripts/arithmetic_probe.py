"""Does the base model know the arithmetic a located error hinges on?

Locating the first error of a chain of sums means telling `7 + 8 = 15` from `7 + 8 = 16`. This asks
the model's own distribution, with no training and no prompt: for each of `--n` random problems
of a kind, is the line with the true result more probable than the same line with a result off by
1 or 2 (the same number of digits, so the two lines have as many tokens)? Chance is one half; a
model that knows the facts is near 1. The kinds follow the ladder's operations and number sizes
(`misstep.data.procedural.LADDER`).

    .venv/bin/python scripts/arithmetic_probe.py --out docs/results/arithmetic_probe.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from misstep.lm.models import resolve_model  # noqa: E402
from misstep.metrics.stats import wilson_interval  # noqa: E402

# (name, operation, largest operand)
KINDS = (
    ("addition up to 20", "+", 20),
    ("subtraction up to 20", "-", 20),
    ("addition up to 100", "+", 100),
    ("subtraction up to 100", "-", 100),
    ("multiplication up to 12", "*", 12),
)
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def problem(rng: random.Random, operation: str, largest: int) -> tuple[str, str]:
    """A true line and the same line with a wrong result of as many digits."""
    while True:
        a, b = rng.randint(1, largest), rng.randint(1, largest)
        if operation == "-" and b > a:
            a, b = b, a
        right = OPERATIONS[operation](a, b)
        wrong = right + rng.choice((-2, -1, 1, 2))
        if wrong >= 0 and len(str(wrong)) == len(str(right)):
            return f"{a} {operation} {b} = {right}", f"{a} {operation} {b} = {wrong}"


@torch.no_grad()
def log_probability(model, tokenizer, lines: list[str]) -> list[float]:
    """Each line's summed token log-probability (its first token given)."""
    batch = tokenizer(lines, return_tensors="pt", padding=True)
    logits = model(**batch).logits.log_softmax(-1)
    taken = logits[:, :-1].gather(2, batch.input_ids[:, 1:, None])[..., 0]
    return (taken * batch.attention_mask[:, 1:]).sum(1).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=300, help="problems of each kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    model_dir = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tokenizer.padding_side = "right"  # every line's tokens at the positions they have alone
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    rng = random.Random(args.seed)
    rows = []
    for name, operation, largest in KINDS:
        pairs = [problem(rng, operation, largest) for _ in range(args.n)]
        true_lines = log_probability(model, tokenizer, [t for t, _ in pairs])
        false_lines = log_probability(model, tokenizer, [f for _, f in pairs])
        k = sum(t > f for t, f in zip(true_lines, false_lines))
        low, high = wilson_interval(k, args.n)
        rows.append({"kind": name, "n": args.n, "true_preferred": k, "share": k / args.n, "low": low, "high": high})
        print(f"{name}: the true result preferred in {k}/{args.n} ({k / args.n:.2f} [{low:.2f}, {high:.2f}])")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "seed": args.seed, "kinds": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
