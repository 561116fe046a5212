"""Chain records, loaders for GSM8K and BIG-Bench Mistake, and the samples shipped for tests."""

from misstep.data.loaders import (
    Fields,
    LoadReport,
    detect_format,
    load_big_bench_mistake,
    load_chains,
    load_gsm8k,
    sample_path,
)
from misstep.data.records import STAGES, Chain, Scenario, StageResult, format_steps, parse_steps
from misstep.data.tables import DataFileError

__all__ = [
    "STAGES",
    "Chain",
    "DataFileError",
    "Fields",
    "LoadReport",
    "Scenario",
    "StageResult",
    "detect_format",
    "format_steps",
    "load_big_bench_mistake",
    "load_chains",
    "load_gsm8k",
    "parse_steps",
    "sample_path",
]
