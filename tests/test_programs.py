import dspy

from misstep.data import STAGES
from misstep.metrics.injector import inject
from misstep.optimize.demos import attach_demos, ground_truth_demos
from misstep.programs import Judge, ScenarioWriter, SelfCorrectionCycle, SelfCorrector, run_stage
from misstep.programs.answer_format import AnswerAdapter


def _with(lm):
    return dspy.context(lm=lm, adapter=AnswerAdapter(constrained=False))


def test_unparsable_output_is_recorded_with_its_raw_text(tiny_lm, gsm8k_test):
    chain = gsm8k_test[0]
    with _with(tiny_lm):
        written = ScenarioWriter("wrong_operation")(question=chain.question, steps=chain.steps)
    assert written.describe.ok is False
    assert written.describe.error == "unparsable output"
    assert written.describe.raw  # what the model actually wrote is kept
    assert written.invalid_steps == ()


def test_self_corrector_locates_and_recovers_from_a_given_step(tiny_lm, gsm8k_test):
    chain = inject(gsm8k_test[1], "arithmetic_slip", seed=0)
    corrector = SelfCorrector()
    with _with(tiny_lm):
        located = corrector(question=chain.question, steps=chain.steps)
        recovered = corrector(question=chain.question, steps=chain.steps, error_index=chain.mistake_index)
    assert located.locate is not None and located.recover is None
    assert recovered.locate is None and recovered.recover is not None  # locating was skipped


def test_step_numbers_become_indices():
    assert SelfCorrector.to_index({"has_mistake": True, "first_error_step": 2}, 3) == 1
    assert SelfCorrector.to_index({"has_mistake": True, "first_error_step": 9}, 3) == -1
    assert SelfCorrector.to_index({"has_mistake": False, "first_error_step": 2}, 3) is None


def test_judge_runs_both_stages_or_records_why_not(tiny_lm, gsm8k_test):
    chain = gsm8k_test[0]
    with _with(tiny_lm):
        judged = Judge()(
            question=chain.question,
            valid_steps=chain.steps,
            invalid_steps=chain.steps,
            recovered_steps=chain.steps,
            final_answer="18",
            first_error=0,
        )
    assert judged.judge.ok is False and judged.curate is None


def test_full_cycle_fills_a_scenario_record_for_all_six_stages(tiny_lm, gsm8k_test, gsm8k_train):
    cycle = attach_demos(SelfCorrectionCycle("arithmetic_slip"), ground_truth_demos(gsm8k_train, k=1))
    assert all(len(p.demos) == 1 for _, p in cycle.named_predictors())
    with _with(tiny_lm):
        scenario = cycle(gsm8k_test[0])
    assert set(scenario.stages) == set(STAGES)
    assert scenario.error_type == "arithmetic_slip"
    record = scenario.to_dict()
    assert record["stages"]["describe"]["ok"] is False
    assert all(record["stages"][s]["error"].startswith("skipped") for s in STAGES[1:])


def test_a_failing_lm_fails_the_stage_not_the_run():
    class BrokenEngine:  # the injected fault: the engine dies mid-request
        def complete(self, request):
            raise ConnectionError("engine went away")

        def stream(self, request):
            raise ConnectionError("engine went away")

        def close(self):
            pass

    lm = dspy.LM("local/broken", engine=BrokenEngine(), num_retries=0, cache=False)
    with _with(lm):
        result = run_stage(dspy.Predict("question -> answer"), question="hi")
    assert result.ok is False and "engine went away" in result.error
