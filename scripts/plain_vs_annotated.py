"""The injector on GSM8K chains read two ways: with their calculator annotations, and with the
annotations stripped (their steps then plain arithmetic, read from `expr = result`).

    .venv/bin/python scripts/plain_vs_annotated.py ../shared/data/gsm8k/test.jsonl docs/results/plain_vs_annotated.json

For every valid chain (the oracle finds no mistake in it), every error type and every step
where the type applies in either form, the chain is injected in both forms with the same
error type, step and seed. Counted: chains loaded and valid, labels made per error type in
each form, labels made in one form only, and, where both forms are labelled, how many labels
and how many final answers differ.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

from misstep.data import load_chains
from misstep.metrics.injector import INJECTABLE_TYPES, InjectionError, applicable_steps, inject
from misstep.metrics.oracle import ANNOTATION, first_error


def _injected(chain, error_type: str, step: int, steps: set[int]):
    if step not in steps:
        return None
    try:
        return inject(chain, error_type, step=step, seed=0)
    except InjectionError:
        return None


def compare(path: Path) -> dict:
    chains = load_chains(path)
    valid = [c for c in chains if first_error(c.steps) is None]
    out = {"file": str(path), "chains": len(chains), "valid": len(valid), "by_error_type": {}}
    chains_labelled = {"annotated": set(), "plain": set()}
    for error_type in INJECTABLE_TYPES:
        counts = Counter()
        for chain in valid:
            plain = replace(chain, steps=tuple(ANNOTATION.sub("", s) for s in chain.steps))
            annotated_steps, plain_steps = (
                set(applicable_steps(chain, error_type)),
                set(applicable_steps(plain, error_type)),
            )
            for step in sorted(annotated_steps | plain_steps):
                a = _injected(chain, error_type, step, annotated_steps)
                p = _injected(plain, error_type, step, plain_steps)
                counts["annotated"] += a is not None
                counts["plain"] += p is not None
                if a is not None:
                    chains_labelled["annotated"].add(chain.source_id)
                if p is not None:
                    chains_labelled["plain"].add(chain.source_id)
                if a is not None and p is not None:
                    counts["both"] += 1
                    counts["label_differs"] += a.mistake_index != p.mistake_index
                    counts["answer_differs"] += a.answer != p.answer
                else:
                    counts["annotated_only" if a is not None else "plain_only" if p is not None else "neither"] += 1
        out["by_error_type"][error_type] = dict(counts)
    out["chains_labelled"] = {form: len(ids) for form, ids in chains_labelled.items()}
    out["chains_labelled_in_one_form_only"] = {
        "annotated": len(chains_labelled["annotated"] - chains_labelled["plain"]),
        "plain": len(chains_labelled["plain"] - chains_labelled["annotated"]),
    }
    return out


if __name__ == "__main__":
    result = compare(Path(sys.argv[1]))
    Path(sys.argv[2]).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
