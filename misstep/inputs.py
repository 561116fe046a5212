"""What the commands read before they run: data files, held-out splits, the model, the run directory.

Each failure is a `Refused` whose message names the file (or the option) at fault; the commands'
error boundary (`misstep.options.refusing`) prints it and exits with status 2, before anything
of the run is written.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from misstep.data import DataFileError, Fields, LoadReport, load_chains, sample_path
from misstep.data.records import Chain
from misstep.data.runfiles import write_json_atomic
from misstep.data.splits import load_split, split_path, without_heldout
from misstep.lm import ModelNotFoundError, local_lm, resolve_model
from misstep.lm.serving import vllm_available
from misstep.optimize.config import RunConfig
from misstep.optimize.demos import ground_truth_demos
from misstep.optimize.jobs import labelled_chains
from misstep.shown import console

TRAIN_SAMPLE = "gsm8k/train.jsonl"
TEST_SAMPLE = "gsm8k/test.jsonl"
LABELLED_SAMPLES = tuple(
    f"big-bench-mistake/{task}.jsonl" for task in ("logical_deduction", "multistep_arithmetic", "word_sorting")
) + (TEST_SAMPLE,)


class Refused(Exception):
    """A command cannot run as asked; the message says why and names the file or option."""


def chains_of(path: Path | None, default: str = TRAIN_SAMPLE, *, fields: Fields | None = None, reports=None):
    """The chains of a data file (default: the shipped sample `default`); a user's file has its
    records' fields named by `fields`. `reports` (a dict, if given) learns what the file gave and
    what it could not."""
    path = path or sample_path(default)
    report = LoadReport()
    try:
        chains = load_chains(path, report=report, fields=fields)
    except (DataFileError, ValueError) as exc:
        raise Refused(str(exc)) from None
    if reports is not None:
        reports[str(path)] = report
    return chains


def labelled(paths: list[Path] | None, fields: Fields | None, limit: int | None, seed: int):
    """The labelled chains of `paths` (default: the shipped samples; GSM8K labelled by the injector),
    at most `limit` a file, and what each file gave and could not (`LoadReport`s by path)."""
    paths = paths or [sample_path(name) for name in LABELLED_SAMPLES]
    reports: dict[str, LoadReport] = {}
    chains = []
    for path in paths:
        loaded = chains_of(path, fields=fields, reports=reports)
        chains += labelled_chains(loaded, limit, seed, report=reports[str(path)])
    if not chains:
        why = "; ".join(f"{p}: {r.why_nothing()}" for p, r in reports.items())
        raise Refused(f"no labelled chains in the data: {why}")
    return chains, reports


def user_fields(config: RunConfig, given: object) -> Fields | None:
    """The field names of --data files the user gave; the shipped samples are GSM8K's own."""
    return config.data if given else None


def split_chains(folder: Path | None, set_name: str, split: str, limit: int | None = None) -> list[Chain]:
    """The labelled chains of one committed held-out split (its first `limit` items)."""
    return [item.chain for item in split_items(split_path(set_name, split, folder))][:limit]


def split_items(path: Path):
    try:
        return load_split(path)
    except DataFileError as exc:
        raise Refused(str(exc)) from None


def write_data_report(reports: dict[str, LoadReport], run_dir: Path) -> None:
    """RUN_DIR/data_report.json, and a line for each file that had records it could not use."""
    write_json_atomic(run_dir / "data_report.json", {path: r.to_dict() for path, r in reports.items()})
    for path, report in reports.items():
        if report.skipped:
            skipped = ", ".join(
                f"{n} {reason} (e.g. line {report.example_line[reason]})" for reason, n in report.skipped.items()
            )
            console.print(f"{path}: used {report.loaded}; skipped {skipped}")


def run_dir_for(run_dir: Path | None, job: str) -> Path:
    """The run directory asked for, or a new one named by the job and the time."""
    return run_dir or Path("runs") / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"


def demos_for(k: int, demo_data: Path | None, seed: int, exclude: set[str], heldout=()):
    """`k` ground-truth demos per stage from `demo_data` (default: the train sample), none of them
    a held-out question or a chain whose source id is in `exclude`."""
    if not k:
        return {}
    chains = [c for c in without_heldout(chains_of(demo_data), list(heldout)) if c.source_id not in exclude]
    return ground_truth_demos(chains, k=k, seed=seed)


def model_dir(model: str) -> Path:
    """The local folder of a registered model's weights (converted on first use), or the folder given."""
    logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)  # one "truncated" warning per answer drowns the bar
    try:
        return resolve_model(model)
    except ModelNotFoundError as exc:
        raise Refused(str(exc)) from None


def student_lm(config: RunConfig, temperature: float):
    """The configured model on the embedded engine (each stage sets its own answer budget)."""
    return local_lm(
        model_dir(config.model), engine_settings=config.engine, temperature=temperature, seed=config.loop.seed
    )


def check_serving(config: RunConfig) -> None:
    """Refuse --engine vllm where no Python at hand can import vLLM (before the run writes anything)."""
    if config.serving == "vllm" and not vllm_available(config.vllm.python):
        raise Refused(
            f"--engine vllm: {config.vllm.python} cannot import vllm; install it with `bash scripts/install.sh "
            "--vllm` or point --vllm-python at a Python that has it"
        )
