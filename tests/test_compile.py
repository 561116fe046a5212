"""Compiling into weights end to end on the tiny model: the real BootstrapFinetune, the judge
metric, the provider's training and the embedded engine over the new checkpoint."""

import json
from pathlib import Path

import dspy
from safetensors.torch import load_file

from misstep.lm import local_lm
from misstep.lm.checkpoint import adapter_problem, checkpoint_problem
from misstep.lm.provider import LocalProvider
from misstep.lm.training import TrainSettings
from misstep.metrics.injector import inject_many
from misstep.metrics.judge_metric import JudgeMetric, OracleMetric, Thresholds
from misstep.optimize.compile import (
    compile_program,
    compiled_or_resumed,
    load_compiled,
    save_compiled,
    training_examples,
    warm_up,
)
from misstep.optimize.demos import ground_truth_demos
from misstep.programs import SelfCorrector
from misstep.programs.answer_format import AnswerAdapter


def _locate_raw(program, chain) -> str:
    with dspy.context(adapter=AnswerAdapter(constrained=False)):  # the raw text is kept where it does not parse
        located, _ = program.find_error(question=chain.question, steps=chain.steps)
    return located.raw


def test_compile_trains_new_weights_through_bootstrap_finetune_and_loads_back(
    tmp_path, tiny_model_dir, gsm8k_train, gsm8k_test
):
    settings = TrainSettings(method="full", epochs=3.0, learning_rate=5e-3, batch_size=4, max_length=768)
    provider = LocalProvider(tiny_model_dir, tmp_path / "checkpoints", settings, show_progress=False)
    base = local_lm(tiny_model_dir, max_tokens=24, cache=False, provider=provider)
    truth = ground_truth_demos(gsm8k_train[:20], k=4)
    pairs = [(good, bad) for good, bad, _ in inject_many(gsm8k_train[20:], seed=0)[:4]]

    result = compile_program(
        SelfCorrector(),
        training_examples(pairs),
        lm=base,
        metric=JudgeMetric(base, Thresholds()),
        provider=provider,
        run_dir=tmp_path / "run",
        extra_examples=truth,
        num_threads=4,
    )

    bootstrap = result.report["bootstrap"]
    assert bootstrap["traced"] == 4  # every example ran through the program and the metric
    assert bootstrap["kept_traces"] == 0  # a random model's recoveries never parse: the judge keeps none
    assert bootstrap["extra_records"] == 8  # 4 worked examples for each of locate and recover
    decisions = (tmp_path / "run" / "metric_decisions.jsonl").read_text().splitlines()
    assert len(decisions) == 4 and all("oracle_location_ok" in json.loads(d) for d in decisions)

    log = [json.loads(line) for line in (result.model_dir / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and log[-1]["loss"] < log[0]["loss"]  # 8 records, batch 4, 3 epochs
    new, old = load_file(result.model_dir / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert any(not (new[k] == old[k]).all() for k in old)
    compiled_lm = result.program.predictors()[0].lm
    assert compiled_lm.model != base.model and all(p.lm is compiled_lm for p in result.program.predictors())
    assert all(p.demos == [] for p in result.program.predictors())

    # Saved as JSON plus the weights' folder, loaded back: the same answers from the same weights.
    save_compiled(result.program, result.model_dir, tmp_path / "program.json")
    assert json.loads((tmp_path / "program.json").read_text())["model_dir"] == str(result.model_dir)
    loaded = load_compiled(tmp_path / "program.json", max_tokens=24, cache=False)
    assert loaded.predictors()[0].lm.model == compiled_lm.model  # the name carries the weights' hash
    assert loaded.predictors()[0].lm.engine.model_dir == result.model_dir
    chain = inject_many(gsm8k_test, seed=1)[0][1]
    assert _locate_raw(loaded, chain) == _locate_raw(result.program, chain)


def test_warm_up_trains_on_ground_truth_alone_and_compiles_on_from_it(tmp_path, tiny_model_dir, gsm8k_train):
    settings = TrainSettings(
        method="lora", epochs=1.0, learning_rate=5e-3, batch_size=4, max_length=768, lora_rank=4, lora_alpha=8
    )
    provider = LocalProvider(tiny_model_dir, tmp_path / "checkpoints", settings, show_progress=False)
    base = local_lm(tiny_model_dir, max_tokens=16, cache=False, provider=provider)
    truth = ground_truth_demos(gsm8k_train, k=2)

    warmed = warm_up(SelfCorrector(), truth, lm=base, provider=provider, run_dir=tmp_path / "warm")
    assert warmed.report["warm_up"]["ground_truth_records"] == 4
    assert json.loads((warmed.model_dir / "train_summary.json").read_text())["base_model"] == str(tiny_model_dir)

    pairs = [(good, bad) for good, bad, _ in inject_many(gsm8k_train[5:], seed=0)[:2]]
    warm_lm = warmed.program.predictors()[0].lm
    again = compile_program(
        warmed.program,
        training_examples(pairs),
        lm=warm_lm,
        metric=OracleMetric(),
        provider=provider,
        run_dir=tmp_path / "run",
        extra_examples=truth,
        num_threads=2,
    )
    # The second compile starts from the warmed weights, not from the base model's.
    assert again.report["training"]["base_model"] == str(warmed.model_dir)
    assert again.report["metric"]["metric"] == "oracle" and again.report["metric"]["judged"] == 2
    assert again.model_dir != warmed.model_dir


def test_a_checkpoint_cut_short_or_without_its_summary_is_trained_again_never_loaded_half(
    tmp_path, tiny_model_dir, gsm8k_train
):
    settings = TrainSettings(method="lora", epochs=1.0, batch_size=4, max_length=768, lora_rank=4, lora_alpha=8)
    provider = LocalProvider(tiny_model_dir, tmp_path / "checkpoints", settings, show_progress=False)
    truth = ground_truth_demos(gsm8k_train, k=1)
    trainings = []

    def step():
        trainings.append(1)
        base = local_lm(tiny_model_dir, max_tokens=16, cache=False, provider=provider)
        return warm_up(SelfCorrector(), truth, lm=base, provider=provider, run_dir=tmp_path / "warm")

    compiled_or_resumed(tmp_path / "warm", step, provider=provider)
    saved = json.loads((tmp_path / "warm" / "program.json").read_text())
    weights = Path(saved["model_dir"])
    summary = json.loads((weights / "train_summary.json").read_text())
    recorded = summary["weights"]["model.safetensors"]
    assert recorded["bytes"] == (weights / "model.safetensors").stat().st_size and len(recorded["sha256"]) == 64
    assert checkpoint_problem(weights) is None

    compiled_or_resumed(tmp_path / "warm", step, provider=provider)  # whole: read back, not trained
    assert len(trainings) == 1

    with (weights / "model.safetensors").open("r+b") as handle:  # the fault: a save cut short
        handle.truncate(recorded["bytes"] // 2)
    assert "cut short" in checkpoint_problem(weights)
    # Its records and settings are beside it: resumed, and made again from them when first asked,
    # never loaded half.
    program, resumed = compiled_or_resumed(tmp_path / "warm", step, provider=provider)
    assert resumed and len(trainings) == 1 and "cut short" in checkpoint_problem(weights)
    program.predictors()[0].lm("Hello")
    assert checkpoint_problem(weights) is None and len(trainings) == 1
    assert "cut short" in json.loads((weights / "train_replayed.json").read_text())["because"]

    (weights / "train_data.jsonl").unlink()  # the fault: without its records it cannot be made again
    with (weights / "model.safetensors").open("r+b") as handle:
        handle.truncate(recorded["bytes"] // 2)
    del summary["weights"]  # a summary from before digests were kept: the format's own lengths tell
    (weights / "train_summary.json").write_text(json.dumps(summary))
    assert "cut short" in checkpoint_problem(weights)
    program, resumed = compiled_or_resumed(tmp_path / "warm", step, provider=provider)
    assert not resumed and len(trainings) == 2  # the step itself is done again
    redone = Path(json.loads((tmp_path / "warm" / "program.json").read_text())["model_dir"])
    assert checkpoint_problem(redone) is None  # trained again, in the folder its data and settings name

    (redone / "train_summary.json").unlink()  # the fault: killed between the weights and the summary
    assert "no train_summary.json" in checkpoint_problem(redone)
    compiled_or_resumed(tmp_path / "warm", step, provider=provider)
    assert len(trainings) == 3


def test_weights_that_were_not_carried_are_made_again_from_their_records_only_when_asked_and_come_out_the_same(
    tmp_path, tiny_model_dir, gsm8k_train
):
    # A run's files committed without its weights (they are too large to carry between machines):
    # resuming makes each checkpoint again from the records and settings kept beside it, and the
    # ones it started from first, but only once a model is asked something or trained on from.
    settings = TrainSettings(method="full", epochs=1.0, batch_size=4, max_length=768)
    provider = LocalProvider(tiny_model_dir, tmp_path / "checkpoints", settings, show_progress=False)
    truth = ground_truth_demos(gsm8k_train, k=1)
    trainings = []

    def step(folder, start):
        def compile_step():
            trainings.append(folder)
            lm = provider.lm(start, max_tokens=8, cache=False)
            return warm_up(SelfCorrector(), truth, lm=lm, provider=provider, run_dir=tmp_path / folder)

        return compiled_or_resumed(tmp_path / folder, compile_step, provider=provider)

    first, _ = step("first", tiny_model_dir)
    first_dir = Path(json.loads((tmp_path / "first" / "program.json").read_text())["model_dir"])
    second, _ = step("second", first_dir)  # trained on from the first's weights
    second_dir = Path(json.loads((tmp_path / "second" / "program.json").read_text())["model_dir"])
    assert json.loads((second_dir / "train_summary.json").read_text())["base_model"] == str(first_dir)
    before = {d: load_file(d / "model.safetensors") for d in (first_dir, second_dir)}
    evidence = {d: {n: (d / n).read_bytes() for n in ("train_summary.json", "train_log.jsonl")} for d in before}
    answer = second.predictors()[0].lm("Hello", max_tokens=8, cache=False)
    for d in (first_dir, second_dir):
        (d / "model.safetensors").unlink()  # carried without them; their summaries and records came along

    first, resumed_first = step("first", tiny_model_dir)
    second, resumed_second = step("second", first_dir)
    assert resumed_first and resumed_second and len(trainings) == 2  # no step done again
    assert not (first_dir / "model.safetensors").exists()  # nothing asked yet: nothing made

    # Asked: made, and first the weights it starts from.
    assert second.predictors()[0].lm("Hello", max_tokens=8, cache=False) == answer
    for d in (first_dir, second_dir):
        replayed = json.loads((d / "train_replayed.json").read_text())
        assert "missing" in replayed["because"] and checkpoint_problem(d) is None
        again = load_file(d / "model.safetensors")
        assert replayed["same_weights"] == all(before[d][name].equal(again[name]) for name in again)
        assert replayed["same_weights"], "training here is deterministic: the same files give the same weights"
        for name, first_time in evidence[d].items():  # the first training's wall time and losses are kept
            assert (d / f"first_{name}").read_bytes() == first_time
    assert len(trainings) == 2

    (first_dir / "train_summary.json").write_text("{")  # a summary cut short: nothing to make it again from
    (first_dir / "model.safetensors").unlink()
    assert not provider.replayable(first_dir)
    step("first", tiny_model_dir)
    assert trainings[-1] == "first"  # the step itself is done again


def test_lora_weights_that_were_not_carried_are_merged_again_from_their_adapters_without_training(
    tmp_path, tiny_model_dir, gsm8k_train
):
    # A LoRA training keeps its adapter (a few MB, carried where the weights are not): the weights
    # come back by merging it into the ones it started from, made whole first, and come out the same.
    settings = TrainSettings(method="lora", lora_rank=4, epochs=1.0, batch_size=4, max_length=768, learning_rate=1e-2)
    provider = LocalProvider(tiny_model_dir, tmp_path / "checkpoints", settings, show_progress=False)
    truth = ground_truth_demos(gsm8k_train, k=1)

    def step(folder, start):
        lm = provider.lm(start, max_tokens=8, cache=False)
        return compiled_or_resumed(
            tmp_path / folder,
            lambda: warm_up(SelfCorrector(), truth, lm=lm, provider=provider, run_dir=tmp_path / folder),
            provider=provider,
        )

    step("first", tiny_model_dir)
    first_dir = Path(json.loads((tmp_path / "first" / "program.json").read_text())["model_dir"])
    second, _ = step("second", first_dir)
    second_dir = Path(json.loads((tmp_path / "second" / "program.json").read_text())["model_dir"])
    before = {d: load_file(d / "model.safetensors") for d in (first_dir, second_dir)}
    logs = {d: (d / "train_log.jsonl").read_text() for d in before}
    for d in before:
        assert (d / "adapter" / "adapter_model.safetensors").stat().st_size < (d / "model.safetensors").stat().st_size
        (d / "model.safetensors").unlink()

    second, resumed = step("second", first_dir)
    assert resumed and not (first_dir / "model.safetensors").exists()
    second.predictors()[0].lm("Hello", max_tokens=8, cache=False)  # asked: both made, the first one first
    for d in before:
        replayed = json.loads((d / "train_replayed.json").read_text())
        assert replayed["how"] == "merged its adapter" and replayed["same_weights"]
        again = load_file(d / "model.safetensors")
        assert all(before[d][name].equal(again[name]) for name in again)
        assert checkpoint_problem(d) is None and (d / "train_log.jsonl").read_text() == logs[d]  # not trained again

    # An adapter that is not what its summary records is not merged: the training is done again.
    (second_dir / "model.safetensors").unlink()
    (second_dir / "train_replayed.json").unlink()
    (second_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    assert "adapter_model.safetensors" in adapter_problem(second_dir)
    provider.ensure_weights(second_dir)
    assert json.loads((second_dir / "train_replayed.json").read_text())["how"] == "trained on its records"
    assert adapter_problem(second_dir) is None and checkpoint_problem(second_dir) is None
