"""DSPy modules: the scenario writer (1-2), the self-corrector (3-4), the judge (5-6) and the full cycle."""

from misstep.programs.cycle import SelfCorrectionCycle
from misstep.programs.judge import Judge
from misstep.programs.scenario_writer import ScenarioWriter
from misstep.programs.self_corrector import SelfCorrector
from misstep.programs.stage import run_stage

__all__ = ["Judge", "ScenarioWriter", "SelfCorrectionCycle", "SelfCorrector", "run_stage"]
