"""The full cycle: all six stages over one valid chain, into one scenario record."""

from __future__ import annotations

import dspy

from misstep.data.records import Chain, Scenario, StageResult
from misstep.programs.judge import Judge
from misstep.programs.scenario_writer import ScenarioWriter
from misstep.programs.self_corrector import SelfCorrector
from misstep.signatures import DescribeMistake


class SelfCorrectionCycle(dspy.Module):
    """Write a mistaken chain (1-2), find and recover from its first error (3-4), judge and curate (5-6)."""

    def __init__(
        self,
        error_type: str | type[DescribeMistake] = "arithmetic_slip",
        writer: ScenarioWriter | None = None,
        corrector: SelfCorrector | None = None,
        judge: Judge | None = None,
    ):
        super().__init__()
        self.writer = writer or ScenarioWriter(error_type)
        self.corrector = corrector or SelfCorrector()
        self.judge = judge or Judge()

    def forward(self, chain: Chain) -> Scenario:
        if not chain.is_valid:
            raise ValueError(
                f"{chain.source_id}: the cycle starts from a valid chain, this one has a "
                f"mistake at step {chain.mistake_index}"
            )
        scenario = Scenario(chain=chain, error_type=self.writer.error_type)
        written = self.writer(question=chain.question, steps=chain.steps)
        scenario.stages["describe"] = written.describe
        scenario.stages["corrupt"] = written.corrupt or StageResult.skipped("no mistake was described")
        scenario.invalid_steps = tuple(written.invalid_steps)
        if not scenario.invalid_steps:
            for stage in ("locate", "recover", "judge", "curate"):
                scenario.stages[stage] = StageResult.skipped("no invalid chain was written")
            return scenario
        return self.correct(scenario)

    def correct(self, scenario: Scenario) -> Scenario:
        """Stages 3-6 on a scenario whose invalid chain is written (stages 1-2 done): the rest of
        `forward`, and how a candidate samples them again on the same written chain."""
        chain = scenario.chain
        corrected = self.corrector(question=chain.question, steps=scenario.invalid_steps)
        scenario.stages["locate"] = corrected.locate
        scenario.stages["recover"] = corrected.recover or StageResult.skipped("no error was located")
        scenario.recovered_steps = tuple(corrected.recovered_steps)
        if corrected.recover is None or not corrected.recover.ok:
            for stage in ("judge", "curate"):
                scenario.stages[stage] = StageResult.skipped("no recovery to judge")
            return scenario

        judged = self.judge(
            question=chain.question,
            valid_steps=chain.steps,
            invalid_steps=scenario.invalid_steps,
            recovered_steps=scenario.recovered_steps,
            final_answer=corrected.final_answer,
            first_error=corrected.first_error,
            mistake_description=scenario.output("describe", "mistake_description", ""),
        )
        scenario.stages["judge"] = judged.judge
        scenario.stages["curate"] = judged.curate or StageResult.skipped("the judge's verdict could not be read")
        return scenario
