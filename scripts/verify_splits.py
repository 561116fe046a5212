"""Re-confirm every committed GSM8K split label with today's oracle, against the valid chain
each item was made from:

    .venv/bin/python scripts/verify_splits.py ../shared/data/gsm8k/test.jsonl

Prints, per split, the items whose label is not the first error the oracle finds; exits 1 if
there is any.
"""

from __future__ import annotations

import sys

from misstep.data.loaders import load_chains
from misstep.data.splits import load_split, split_path
from misstep.metrics.oracle import first_error


def unconfirmed(source: str) -> dict[str, list[str]]:
    valid = {chain.source_id: chain for chain in load_chains(source)}
    found = {}
    for split in ("test", "validation"):
        found[split] = [
            item.item_id
            for item in load_split(split_path("gsm8k", split))
            if first_error(
                item.chain.steps,
                valid[item.chain.source_id].steps if item.chain.mistake_index is not None else None,
            )
            != item.chain.mistake_index
        ]
    return found


if __name__ == "__main__":
    found = unconfirmed(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/gsm8k/test.jsonl")
    for split, items in found.items():
        print(f"{split}: {len(items)} labels the oracle does not confirm {items[:10]}")
    sys.exit(1 if any(found.values()) else 0)
