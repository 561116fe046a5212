"""Held-out splits as committed item lists, so every run, round, arm and model is measured on
the same items.

A split file is JSONL, one item a line: `{"item_id", "split", "error_type", "chain"}`, where
`chain` is a `Chain` record with its first-error label (`mistake_index`, null for a valid
chain). GSM8K items are valid test solutions corrupted by the deterministic injector (exact
labels), plus a share of the valid solutions themselves, so "no mistake" is a class a model
can get wrong; BIG-Bench Mistake items are the human-labelled traces as they are.
`misstep splits` builds them from the full data sets (`../shared/data`); the built files live
in `data/splits/` and are read from there by evaluations.

The committed files are the data of record, not a cache: every result in docs/ is measured on
them, so a change to the injector does not rebuild them. Today's `misstep splits` draws a
different GSM8K set from the one committed (the injector now reads '.5' as one half, which
changes which steps take which errors); every committed label is still the first error the
oracle finds against its source chain (`scripts/verify_splits.py`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from misstep.data.records import Chain
from misstep.data.tables import DataFileError, read_jsonl

SPLITS = ("test", "validation")


def split_path(set_name: str, split: str, folder: Path | None = None) -> Path:
    """Where a split's file lies: `folder`/<set>-<split>.jsonl, by default the committed splits
    shipped with the package."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    folder = Path(folder) if folder is not None else Path(str(files("misstep.data") / "splits"))
    return folder / f"{set_name}-{split}.jsonl"


@dataclass(frozen=True)
class SplitItem:
    """One held-out item: a labelled chain, its stable id, and how its label was made."""

    item_id: str
    split: str
    chain: Chain
    error_type: str | None = None  # the injected error type; None for a valid chain or a human-labelled trace

    def to_dict(self) -> dict:
        return {
            "item_id": self.item_id,
            "split": self.split,
            "error_type": self.error_type,
            "chain": self.chain.to_dict(),
        }


def item_id(chain: Chain) -> str:
    """'<source id>#<label>': the source line and what is asked of it ('none' for no mistake)."""
    return f"{chain.source_id}#{'none' if chain.mistake_index is None else chain.mistake_index}"


def normalize_question(text: str) -> str:
    """The form in which questions are compared for leakage: case and spacing do not hide a copy."""
    return " ".join(text.lower().split())


def without_heldout(chains: list[Chain], heldout: list[Chain]) -> list[Chain]:
    """`chains` less every chain whose question (normalised) is one of `heldout`'s: what a job may
    train on, draw seeds or demos from."""
    held = {normalize_question(c.question) for c in heldout}
    return [c for c in chains if normalize_question(c.question) not in held]


def shuffled(chains: list[Chain], seed: int) -> list[Chain]:
    """A seeded permutation, the same on every machine."""
    order = list(chains)
    random.Random(seed).shuffle(order)
    return order


def gsm8k_items(pairs: list[tuple[Chain, Chain, str]], valid: list[Chain], split: str) -> list[SplitItem]:
    """Items from (valid, injected, error type) triples and from valid chains kept as they are."""
    items = [SplitItem(item_id(bad), split, bad, error_type) for _, bad, error_type in pairs]
    items += [SplitItem(item_id(chain), split, chain) for chain in valid]
    return sorted(items, key=lambda item: item.item_id)


def bbm_items(chains: list[Chain], split: str) -> list[SplitItem]:
    return [SplitItem(item_id(chain), split, chain) for chain in chains]


def save_split(path: Path, items: list[SplitItem]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item.to_dict(), ensure_ascii=False) + "\n" for item in items), encoding="utf-8")


def save_splits(built: dict[str, dict[str, list[SplitItem]]], folder: Path) -> None:
    """Every set's splits as FOLDER/<set>-<split>.jsonl (`built`: set name -> split name -> items)."""
    for name, splits in built.items():
        for split, items in splits.items():
            save_split(folder / f"{name}-{split}.jsonl", items)


def load_split(path: Path | str) -> list[SplitItem]:
    """A split file, checked line by line: a bad line names the file, the line and the field."""
    path = Path(path)
    if not path.exists():
        raise DataFileError(path, None, None, "file does not exist (build it with `misstep splits`)")
    items, seen = [], set()
    for number, record in read_jsonl(path):
        for field in ("item_id", "split", "chain"):
            if field not in record:
                raise DataFileError(path, number, field, "missing")
        try:
            chain = Chain.from_dict(record["chain"])
        except TypeError as exc:
            raise DataFileError(path, number, "chain", str(exc)) from None
        if record["item_id"] in seen:
            raise DataFileError(path, number, "item_id", f"{record['item_id']!r} appears twice")
        seen.add(record["item_id"])
        items.append(SplitItem(record["item_id"], record["split"], chain, record.get("error_type")))
    return items
