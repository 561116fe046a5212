"""Fine-tuning and the provider on the tiny model: real training steps on ground-truth chat data."""

import json
import re
import subprocess
import sys
import time
from dataclasses import replace

import dspy
import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

from misstep.lm import local_lm
from misstep.lm.launch import train
from misstep.lm.provider import LocalProvider
from misstep.lm.training import TrainSettings, tokenize_chat, train_chat
from misstep.metrics.injector import inject_many
from misstep.optimize.compile import NothingToTrainOn, RobustBootstrapFinetune, training_examples
from misstep.optimize.demos import ground_truth_chat_data, ground_truth_demos
from misstep.programs import SelfCorrector


@pytest.fixture(scope="module")
def chat_records(gsm8k_train):
    return ground_truth_chat_data(SelfCorrector(), ground_truth_demos(gsm8k_train, k=4))


def test_only_the_answer_carries_loss(tiny_model_dir, chat_records):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, labels, _ = tokenize_chat(tokenizer, chat_records[0]["messages"], max_length=4096)
    answer = [t for t in labels if t != -100]
    assert tokenizer.decode(answer).startswith("[[ ## has_mistake ## ]]")
    assert answer[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # so the model learns to stop
    assert labels[: len(labels) - len(answer)] == [-100] * (len(labels) - len(answer))
    limit = 2 * len(answer) + 10
    short_ids, short_labels, _ = tokenize_chat(tokenizer, chat_records[0]["messages"], max_length=limit)
    assert (
        len(short_ids) == limit and [t for t in short_labels if t != -100] == answer
    )  # the prompt is cut, not the answer


def test_records_longer_than_max_length_are_counted_and_warned_of(tmp_path, tiny_model_dir, chat_records, caplog):
    """A record over max_length loses the head of its prompt (its instructions, its first fields):
    the training summary says how many did, and the log warns, rather than cutting in silence."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = chat_records[:4]
    lengths = sorted(len(tokenize_chat(tokenizer, r["messages"], 10**9)[0]) for r in records)
    limit = lengths[1]  # the two or three longer records are cut
    settings = TrainSettings(method="full", epochs=1.0, batch_size=4, max_length=limit)
    with caplog.at_level("WARNING", logger="misstep.lm.training"):
        summary = train_chat(tiny_model_dir, records, tmp_path / "out", settings, show_progress=False)
    expected = sum(n > limit for n in lengths)
    assert expected >= 2 and summary["records_cut"] == expected and summary["longest_record_tokens"] == lengths[-1]
    assert f"{expected} of 4 training records are longer than max_length={limit}" in caplog.text
    whole = train_chat(
        tiny_model_dir, records, tmp_path / "whole", TrainSettings(method="full", max_length=4096), show_progress=False
    )
    assert whole["records_cut"] == 0


def test_field_weighting_gives_each_value_the_weight_of_all_markers(tiny_model_dir, chat_records):
    """A stage-3 answer is markers, a bool and a step number: with "fields" each value weighs a
    third of the record, where "tokens" gives the step number one share among dozens."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    answer_pattern = re.compile(r"has_mistake ## \]\]\n(True|False)\n\n\[\[ ## first_error_step ## \]\]\n(\d)\n")
    messages, found = next(
        (r["messages"], found) for r in chat_records if (found := answer_pattern.search(r["messages"][-1]["content"]))
    )
    ids, labels, weights = tokenize_chat(tokenizer, messages, 4096, weighting="fields")
    _, plain_labels, plain = tokenize_chat(tokenizer, messages, 4096)
    assert labels == plain_labels and set(plain) == {0.0, 1.0}
    assert [w for w, t in zip(weights, labels) if t == -100] == [0.0] * labels.count(-100)
    answer = [(tokenizer.decode([t]), w) for t, w in zip(labels, weights) if t != -100]
    values = {text: w for text, w in answer if text in found.groups()}
    assert values == pytest.approx({found[1]: 1 / 3, found[2]: 1 / 3})
    assert sum(w for _, w in answer) == pytest.approx(1.0)
    markers = [w for text, w in answer if text not in found.groups()]
    assert len(markers) > 20 and markers == pytest.approx([1 / 3 / len(markers)] * len(markers))


@pytest.mark.parametrize("weighting", ["tokens", "fields"])
def test_a_record_of_weight_two_counts_as_the_record_twice(tiny_model_dir, chat_records, weighting):
    import torch
    from transformers import AutoModelForCausalLM

    from misstep.lm.training import AnswerLoss, _collate, record_row

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    settings = TrainSettings(max_length=512, loss_weighting=weighting)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)

    def loss(records):
        rows = [record_row(tokenizer, r, i, settings) for i, r in enumerate(records)]
        return AnswerLoss(model)(**_collate(rows, tokenizer.pad_token_id))

    with torch.no_grad():
        # The two records the untrained model finds most unlike, so that weighing them differently shows.
        first, second = (chat_records[i] for i in sorted(range(6), key=lambda i: loss([chat_records[i]]))[::5])
        assert loss([second]) - loss([first]) > 1e-3
        torch.testing.assert_close(loss([{**first, "weight": 2}, second]), loss([first, first, second]))
        assert loss([first, second]) - loss([first, first, second]) > 1e-4
    with pytest.raises(ValueError, match="training record 1: 'weight' must be a positive number"):
        record_row(tokenizer, {**second, "weight": 0}, 1, settings)


def test_stage_balance_gives_every_stage_the_same_share_of_the_loss(tiny_model_dir, chat_records, tmp_path):
    """Over all the records, the balanced loss is the mean of the stages' own mean losses, however
    many records and answer tokens each stage has; the plain loss is not (on a model trained on
    one stage a little, so that the stages' losses differ)."""
    import torch
    from transformers import AutoModelForCausalLM

    from misstep.lm.training import AnswerLoss, _collate, balanced_rows, record_row, stage_of

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    settings = TrainSettings(max_length=512)
    stages = [stage_of(r) for r in chat_records]
    # Stages of unequal size: the first stage's records five times, so they would dominate a plain mean.
    first = stages[0]
    records = chat_records + [r for r in chat_records if stage_of(r) == first] * 4
    stages = [stage_of(r) for r in records]
    assert len(set(stages)) == 2  # locate and recover
    rows = [record_row(tokenizer, r, i, settings) for i, r in enumerate(records)]
    balanced, row_weight = balanced_rows(rows, stages)
    totals = {s: sum(sum(w) for (_, _, w), t in zip(balanced, stages) if t == s) for s in set(stages)}
    assert list(totals.values()) == pytest.approx([next(iter(totals.values()))] * len(totals))
    assert row_weight * len(rows) == pytest.approx(sum(totals.values()))
    trained = tmp_path / "one-stage"
    one_stage = TrainSettings(method="full", learning_rate=1e-2, epochs=3, max_length=512, batch_size=2)
    train_chat(tiny_model_dir, [r for r in records if stage_of(r) == first], trained, one_stage, show_progress=False)
    model = AutoModelForCausalLM.from_pretrained(trained, dtype=torch.float32)
    with torch.no_grad():
        per_stage = [
            AnswerLoss(model)(**_collate([r for r, t in zip(rows, stages) if t == s], tokenizer.pad_token_id))
            for s in totals
        ]
        whole = AnswerLoss(model)(**_collate(balanced, tokenizer.pad_token_id, row_weight))
        plain = AnswerLoss(model)(**_collate(rows, tokenizer.pad_token_id))
    assert abs(per_stage[0] - per_stage[1]) > 1.0
    torch.testing.assert_close(whole, torch.stack(per_stage).mean())
    assert abs(plain - whole) > 0.1


def test_stage_balance_is_part_of_what_a_resume_must_match(chat_records):
    from misstep.lm.training import data_key

    plain = data_key(chat_records, TrainSettings())
    assert data_key(chat_records, TrainSettings(stage_balance=False)) == plain  # older resume points still match
    assert data_key(chat_records, TrainSettings(stage_balance=True)) != plain


@pytest.mark.parametrize("method,checkpointing", [("full", False), ("lora", False), ("full", True)])
def test_onednn_products_give_mkls_loss_and_gradients(tiny_model_dir, chat_records, method, checkpointing):
    """Every linear layer (LoRA's too) runs forward and backward through oneDNN, recomputation under
    gradient checkpointing included, and only rounding changes."""
    import torch
    from transformers import AutoModelForCausalLM

    from misstep.lm.kernels import OneDNNTrainingLinear, train_linears_through_onednn
    from misstep.lm.training import AnswerLoss, _collate

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = _collate([tokenize_chat(tokenizer, r["messages"], 256) for r in chat_records[:3]], tokenizer.pad_token_id)
    assert batch["weights"].sum() == (batch["labels"] != -100).sum()  # "tokens": a plain mean
    results = []
    for onednn in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(
                    r=4,
                    lora_alpha=8,
                    lora_dropout=0.0,
                    target_modules="all-linear",
                    task_type="CAUSAL_LM",
                    init_lora_weights=False,
                ),
            )
        model.train()
        linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
        if onednn:
            assert train_linears_through_onednn(model) == linears
            assert all(type(m) is OneDNNTrainingLinear for m in model.modules() if isinstance(m, torch.nn.Linear))
        loss = AnswerLoss(model)(**batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (plain_loss, plain_grads), (loss, grads) = results
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == plain_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("method,weighting", [("full", "tokens"), ("lora", "tokens"), ("full", "fields")])
def test_a_shared_prefix_run_once_gives_the_same_loss_and_gradients(tiny_model_dir, gsm8k_train, method, weighting):
    """Records of one stage begin with the same adapter instructions: running them once for the
    whole batch changes rounding only, for every parameter (the prefix's too)."""
    import torch
    from transformers import AutoModelForCausalLM

    from misstep.lm.training import AnswerLoss, _collate, shared_prefix_length
    from misstep.optimize.control import control_chains, training_records

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = training_records(control_chains(gsm8k_train, 4), cue=False, loss="stage3")
    batch = _collate(
        [tokenize_chat(tokenizer, r["messages"], 1024, weighting) for r in records], tokenizer.pad_token_id
    )
    shared = shared_prefix_length(batch)
    assert shared > 100 and (batch["labels"][:, : shared + 1] == -100).all()
    results = []
    for share in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        if method == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(
                    r=4,
                    lora_alpha=8,
                    lora_dropout=0.0,
                    target_modules="all-linear",
                    task_type="CAUSAL_LM",
                    init_lora_weights=False,
                ),
            )
        model.train()
        loss = AnswerLoss(model, share_prefix=share)(**batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (plain_loss, plain_grads), (loss, grads) = results
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_provider_trains_a_new_checkpoint_with_a_new_name(tmp_path, tiny_model_dir, tiny_engine, chat_records, method):
    settings = TrainSettings(
        method=method, epochs=1.0, learning_rate=5e-3, batch_size=4, max_length=512, lora_rank=4, lora_alpha=8
    )
    provider = LocalProvider(tiny_model_dir, tmp_path / "checkpoints", settings, show_progress=False)
    base_lm = local_lm(engine=tiny_engine, max_tokens=8, cache=True, provider=provider)
    prompt = "Which step is wrong?"
    before = base_lm(prompt)[0]

    job = base_lm.finetune(chat_records, "chat")
    compiled_lm = job.result()
    assert isinstance(compiled_lm, dspy.LM), compiled_lm
    folder = provider.folder_of(compiled_lm.model)
    assert compiled_lm.model != base_lm.model

    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and log[-1]["loss"] < log[0]["loss"]  # 8 records, batch 4: two steps
    assert json.loads((folder / "train_summary.json").read_text())["onednn"]  # on CPU, through oneDNN
    assert len((folder / "train_data.jsonl").read_text().splitlines()) == len(chat_records)
    new, old = load_file(folder / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert set(new) == set(old)  # LoRA is merged: a plain folder any engine loads
    assert any(not (new[k] == old[k]).all() for k in old)

    # DSPy's cache ignores where a model runs: the compiled LM must not get the base model's cached answer.
    fresh = provider.lm_for(compiled_lm)
    engine = fresh.engine
    try:
        assert engine.model_dir == folder
        assert fresh(prompt)[0] is not None
        assert engine.stats.requests == 1  # answered by the new weights, not by the cache
    finally:
        engine.close()
    assert base_lm(prompt)[0] == before


def test_data_parallel_training_under_torchrun_is_configuration_only(tmp_path, tiny_model_dir, chat_records):
    """Two processes over gloo on this CPU, as on GPUs over NCCL: each trains on its half of every batch."""
    launcher = f"{sys.executable} -m torch.distributed.run --standalone --nproc-per-node 2"
    # A bound, so that a stuck process fails the test with the launch log instead of holding CI.
    settings = TrainSettings(
        method="full",
        learning_rate=5e-3,
        batch_size=2,
        max_length=512,
        launcher=launcher,
        launch_timeout_s=300,
        collective_timeout_s=120,
    )
    provider = LocalProvider(tiny_model_dir, tmp_path / "checkpoints", settings, show_progress=False)
    compiled_lm = local_lm(tiny_model_dir, provider=provider).finetune(chat_records, "chat").result()
    assert isinstance(compiled_lm, dspy.LM), compiled_lm
    folder = provider.folder_of(compiled_lm.model)
    summary = json.loads((folder / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["settings"]["launcher"] == launcher
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and log[-1]["loss"] < log[0]["loss"]  # 8 records, 2 per process x 2 processes: two steps
    # The two processes' halves together are every record once: no row trained twice, none missed.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert sum(row["tokens"] for row in log) == sum(
        len(tokenize_chat(tokenizer, r["messages"], 512)[0]) for r in chat_records
    )
    new, old = load_file(folder / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert any(not (new[k] == old[k]).all() for k in old)
    assert "rank" not in " ".join(p.name for p in folder.iterdir())  # one folder of weights, from rank 0


def test_a_failing_launcher_names_its_log(tmp_path, tiny_model_dir, chat_records):
    settings = TrainSettings(
        launcher=f"{sys.executable} -m torch.distributed.run --standalone --nproc-per-node 1 --no-such-flag"
    )
    with pytest.raises(RuntimeError, match="launch.log"):
        train(tiny_model_dir, chat_records, tmp_path / "out", settings, show_progress=False)


def test_a_launch_past_its_time_limit_is_killed_and_names_its_log(tmp_path, tiny_model_dir, chat_records):
    # The injected fault: a "launcher" whose process starts a child and never finishes.
    launcher = (
        f'{sys.executable} -c \'import subprocess, sys, time; print("stuck", flush=True); '
        f'subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]); time.sleep(600)\''
    )
    settings = TrainSettings(launcher=launcher, launch_timeout_s=3)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)launch_timeout_s=3 s.*launch\.log.*stuck"):
        train(tiny_model_dir, chat_records, tmp_path / "out", settings, show_progress=False)
    assert time.monotonic() - started < 60
    # Its child went with it: no process of that session is left.
    left = subprocess.run(["pgrep", "-f", "time.sleep\\(600\\)"], capture_output=True, text=True).stdout.split()
    assert not left, left


def test_failed_examples_are_dropped_and_counted_not_fatal(tiny_lm, gsm8k_train):
    class Flaky(SelfCorrector):  # the injected fault: the program raises on some examples
        def forward(self, question, steps, error_index=None):
            if "Natalia" in question:
                raise RuntimeError("injected failure")
            return super().forward(question, steps, error_index)

    trainset = training_examples([(good, bad) for good, bad, _ in inject_many(gsm8k_train, seed=0)[:4]])
    student = Flaky()
    student.set_lm(tiny_lm)
    optimizer = RobustBootstrapFinetune(metric=lambda example, prediction, trace=None: True, num_threads=2)
    with (
        dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)),
        pytest.raises(NothingToTrainOn, match="no predictor call to train on"),
    ):
        optimizer.compile(student, trainset)
    assert optimizer.report["examples"] == 4
    assert optimizer.report["dropped_failed"] == 1  # the Natalia example
    assert optimizer.report["kept_traces"] == 3  # a random model's answers never parse: nothing in their traces


def test_a_killed_training_resumes_where_it_stopped_and_ends_with_the_same_weights(
    tmp_path, tiny_model_dir, chat_records
):
    """kill -9 mid-training, then the same call again: it continues from its last resume point
    (not from step 1) and the weights equal those of a training never interrupted."""
    records = chat_records * 3
    settings = TrainSettings(
        method="full", epochs=2.0, learning_rate=1e-3, batch_size=2, max_length=512, resume_every_s=1e-9
    )  # a resume point after every step
    whole = train_chat(tiny_model_dir, records, tmp_path / "whole", settings, show_progress=False)

    out = tmp_path / "killed"
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "settings.json").write_text(json.dumps(settings.__dict__))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "misstep.lm.launch",
            str(tiny_model_dir),
            str(tmp_path / "records.jsonl"),
            str(out),
            "--settings",
            str(tmp_path / "settings.json"),
        ]
    )
    deadline = time.time() + 300
    while not (out / "resume.pt").exists() or len((out / "train_log.jsonl").read_text().splitlines()) < 3:
        assert process.poll() is None and time.time() < deadline, "the training ended before it could be killed"
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert not (out / "train_summary.json").exists()

    resumed = train_chat(tiny_model_dir, records, out, settings, show_progress=False)
    assert resumed["resumed_at_step"] and resumed["resumed_at_step"] >= 2
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, whole["steps"] + 1))
    assert not (out / "resume.pt").exists()  # finished: nothing left to resume
    expected, got = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert (expected[name] == got[name]).all(), name

    # A resume point made for other records is not used: the training starts afresh.
    (out / "train_summary.json").unlink()
    fresh = train_chat(tiny_model_dir, records[:4], out, settings, show_progress=False)
    assert fresh["resumed_at_step"] is None


def test_a_resume_point_is_keyed_by_what_the_settings_mean():
    from misstep.lm.training import data_key

    records = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    plain = TrainSettings(method="full")
    assert data_key(records, plain) == data_key(records, TrainSettings(method="full", lora_alpha=32))
    assert data_key(records, plain) != data_key(records, TrainSettings(method="full", loss_weighting="fields"))
    assert data_key(records, plain) != data_key(records, TrainSettings(method="full", lora_rank=8))
    assert data_key(records, plain) == data_key(records, TrainSettings(method="full", resume_every_s=5))


def test_a_lora_resume_point_holds_the_adapter_alone_and_restores_it(tiny_model_dir):
    """Small enough to carry between machines (scripts/carry_run.py): the frozen weights are not in it."""
    import torch

    from misstep.lm.training import _load_trained, _optimizer, _trainable_model, _TrainState

    settings = TrainSettings(method="lora", lora_rank=2)
    _, model = _trainable_model(tiny_model_dir, settings, torch.device("cpu"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule = _optimizer(trainable, settings, total_steps=4)
    with torch.no_grad():
        for p in trainable:
            p.add_(1.0)
    point = _TrainState(started=0.0).saved(model, optimizer, schedule)["model"]
    assert point and all("lora_" in name for name in point)
    assert sum(t.numel() for t in point.values()) == sum(p.numel() for p in trainable)

    _, fresh = _trainable_model(tiny_model_dir, settings, torch.device("cpu"))
    _load_trained(fresh, point)
    assert all(torch.equal(fresh.get_parameter(name), tensor) for name, tensor in point.items())
    missing = dict(list(point.items())[1:])
    with pytest.raises(ValueError, match="missing"):
        _load_trained(fresh, missing)


def test_gradient_checkpointing_trains_the_same_weights(tiny_model_dir, chat_records, tmp_path):
    """Checkpointing is a memory setting, not a training one: a resume point ignores it (a run may turn
    it on to fit longer records and keep its checkpoints), which holds only if it trains the same."""
    import torch

    from misstep.lm.training import data_key

    settings = TrainSettings(method="full", learning_rate=1e-3, batch_size=2, resume_every_s=None)
    records = chat_records[:4]
    assert data_key(records, settings) == data_key(records, replace(settings, gradient_checkpointing=True))
    base = load_file(tiny_model_dir / "model.safetensors")
    weights = {}
    for checkpointing in (False, True):
        out = tmp_path / f"checkpointing-{checkpointing}"
        train_chat(
            tiny_model_dir,
            records,
            out,
            replace(settings, gradient_checkpointing=checkpointing),
            show_progress=False,
        )
        weights[checkpointing] = load_file(out / "model.safetensors")
    assert any(not torch.equal(weights[False][name], base[name]) for name in base)  # it did train
    for name in weights[False]:
        torch.testing.assert_close(weights[True][name], weights[False][name], rtol=1e-4, atol=1e-6, msg=name)


# The injected fault: a launcher (one process, torchrun's environment) whose worker the kernel
# kills with SIGKILL, as the OOM killer does, once it has a resume point; reported the way
# torchrun reports it. Started again (the marker file exists), it lets the worker finish.
OOM_LAUNCHER = """
import os, signal, socket, subprocess, sys, time
from pathlib import Path
marker, command = Path(sys.argv[1]), sys.argv[2:]
output_dir = Path(command[command.index("misstep.lm.launch") + 3])
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
       "MASTER_PORT": str(port)}
worker = subprocess.Popen([sys.executable, *command], env=env)  # as torchrun runs "-m module ..."
if marker.exists():
    sys.exit(worker.wait())
marker.touch()
log = output_dir / "train_log.jsonl"
while not (output_dir / "resume.pt").exists() or len(log.read_text().splitlines()) < 2:
    if worker.poll() is not None:
        sys.exit("the worker ended before it could be killed")
    time.sleep(0.05)
os.kill(worker.pid, signal.SIGKILL)
worker.wait()
print("exitcode  : -9 (pid: %d)" % worker.pid)
print("error_file: <N/A>  traceback : Signal 9 (SIGKILL) received by PID %d" % worker.pid)
print("Signals.SIGKILL")
sys.exit(1)
"""


def test_a_launched_worker_killed_for_memory_is_reported_with_its_peak_and_the_rerun_resumes(
    tmp_path, tiny_model_dir, chat_records
):
    from misstep.lm.launch import TrainingKilled

    script = tmp_path / "oom_launcher.py"
    script.write_text(OOM_LAUNCHER)
    settings = TrainSettings(
        method="full",
        epochs=2.0,
        learning_rate=1e-3,
        batch_size=2,
        max_length=512,
        resume_every_s=1e-9,  # a resume point after every step
        launcher=f"{sys.executable} {script} {tmp_path / 'killed-once'}",
        launch_timeout_s=300,
        collective_timeout_s=120,
    )
    records, out = chat_records * 2, tmp_path / "out"
    with pytest.raises(TrainingKilled) as killed:
        train(tiny_model_dir, records, out, settings, show_progress=False)
    message = " ".join(str(killed.value).split())
    peak = float(re.search(r"reached ([\d.]+) GiB", message).group(1))
    assert peak > 0.1 and "out-of-memory" in message and "launch.log" in message  # a worker holds torch: >100 MB
    assert "--batch-size (now 2" in message and "--gradient-checkpointing (now off)" in message
    assert (out / "resume.pt").exists() and not (out / "train_summary.json").exists()

    summary = train(tiny_model_dir, records, out, settings, show_progress=False)  # the rerun
    assert summary["resumed_at_step"] and summary["resumed_at_step"] >= 1  # not from the start
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, summary["steps"] + 1))
    assert not (out / "resume.pt").exists()
