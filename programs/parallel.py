"""Run a function over many items on threads, with a progress bar, yielding results as they finish.

DSPy modules are thread-safe and the embedded engine batches requests that arrive
together, so the number of threads is the batch size the engine gets to fill.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TypeVar

import dspy
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from misstep.data.runfiles import JsonlLog
from misstep.programs.answer_format import AnswerAdapter

Item = TypeVar("Item")
Result = TypeVar("Result")


def progress_bar(**kwargs) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        **kwargs,
    )


def map_threads(
    function: Callable[[Item], Result],
    items: Iterable[Item],
    *,
    lm: dspy.LM,
    adapter: dspy.Adapter | None = None,
    num_threads: int = 8,
    description: str = "working",
    show_progress: bool = True,
) -> Iterator[tuple[Item, Result]]:
    """(item, function(item)) in completion order, each call under `lm` and `adapter` (default: the
    stages' answers constrained to their format).

    They are passed explicitly because DSPy's `dspy.context` is per thread: a worker
    thread would not see the caller's.
    """
    items = list(items)
    adapter = adapter or AnswerAdapter()

    def call(item: Item) -> Result:
        with dspy.context(lm=lm, adapter=adapter):
            return function(item)

    with progress_bar(disable=not show_progress) as progress, ThreadPoolExecutor(num_threads) as pool:
        task = progress.add_task(description, total=len(items))
        futures = {pool.submit(call, item): item for item in items}
        for future in as_completed(futures):
            progress.advance(task)
            yield futures[future], future.result()


def map_logged(
    function: Callable[[Item], dict],
    items: Iterable[Item],
    path: Path,
    key_of: Callable[[Item], str],
    *,
    key: str = "key",
    **threads,
) -> list[dict]:
    """`map_threads` whose results are records appended to the JSONL file `path` as they finish; a
    rerun skips the items whose `key_of(item)` is already a record's `key` field. The records of
    `items`, in the order of `items`: the file holds them in the order the threads finished, which
    differs from run to run, and what is made of the records (a set cut short, training data)
    must not. `threads`: map_threads' keywords (lm, adapter, ...)."""
    items = list(items)
    with JsonlLog(path) as log:
        done = {record[key] for record in log.records}
        todo = [item for item in items if key_of(item) not in done]
        for _, record in map_threads(function, todo, **threads):
            log.append(record)
        by_key = {record[key]: record for record in log.records}
    return [by_key[k] for k in dict.fromkeys(key_of(item) for item in items)]
