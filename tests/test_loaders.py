import json

import pytest

from misstep.data import (
    DataFileError,
    Fields,
    LoadReport,
    detect_format,
    load_big_bench_mistake,
    load_chains,
    load_gsm8k,
    sample_path,
)
from misstep.data.records import format_steps, parse_steps


def test_gsm8k_sample_splits_steps_and_final_answer():
    chains = load_gsm8k(sample_path("gsm8k/test.jsonl"))
    assert len(chains) == 40
    first = chains[0]
    assert first.question.startswith("Janet’s ducks lay 16 eggs")
    assert first.steps == (
        "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.",
        "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer’s market.",
    )
    assert first.answer == first.reference_answer == "18"
    assert first.source_id == "gsm8k/test.jsonl:1"
    assert first.is_valid


def test_big_bench_mistake_keeps_label_target_and_answer():
    chains = load_big_bench_mistake(sample_path("big-bench-mistake/multistep_arithmetic.jsonl"))
    first = chains[0]
    assert first.task == "multistep_arithmetic"
    assert first.mistake_index == 3
    assert first.answer == "1244" and first.reference_answer == "-2116"
    assert len(first.steps) == 5
    assert any(c.mistake_index is None for c in load_chains(sample_path("big-bench-mistake/word_sorting.jsonl")))


def test_a_trace_that_reached_no_answer_loads(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"input": "x", "steps": ["a"], "answer": None, "target": "(A)", "mistake_index": 0}))
    [chain] = load_big_bench_mistake(path)
    assert chain.answer is None and chain.reference_answer == "(A)"


def test_format_detection():
    assert detect_format(sample_path("gsm8k/train.jsonl")) == "gsm8k"
    assert detect_format(sample_path("big-bench-mistake/logical_deduction.jsonl")) == "big-bench-mistake"


def test_steps_round_trip_through_the_numbered_format():
    steps = ("Add 2 and 3 to get 5.", "Double it: 5 * 2 = 10.")
    assert parse_steps(format_steps(steps)) == steps
    assert parse_steps("1. first\n\n2) second\nStep 3: third") == ("first", "second", "third")


def _write(tmp_path, lines):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD_GSM8K = json.dumps({"question": "q?", "answer": "1+1=<<1+1=2>>2\n#### 2"})


@pytest.mark.parametrize(
    "bad_line, field, problem",
    [
        ('{"question": "q?", "answer": ', None, "not valid JSON"),
        ('{"question": "q?"}', "answer", "missing"),
        ('{"question": 7, "answer": "x\\n#### 1"}', "question", "expected str, got int"),
        ("[1, 2]", None, "expected a JSON object"),
    ],
)
def test_malformed_gsm8k_names_file_line_and_field(tmp_path, bad_line, field, problem):
    path = _write(tmp_path, [GOOD_GSM8K, bad_line])
    with pytest.raises(DataFileError) as error:
        load_gsm8k(path)
    assert error.value.path == path and error.value.line == 2 and error.value.field == field
    assert str(error.value).startswith(f"{path}:2: ")
    assert problem in str(error.value)


@pytest.mark.parametrize(
    "record, field",
    [
        ({"input": "x", "steps": ["a", 3], "answer": "1", "target": "1", "mistake_index": 0}, "steps[1]"),
        ({"input": "x", "steps": ["a"], "answer": "1", "target": "1", "mistake_index": 4}, "mistake_index"),
        ({"input": "x", "steps": ["a"], "answer": "1", "target": "1", "mistake_index": True}, "mistake_index"),
        ({"input": "x", "steps": ["a"], "answer": "1", "mistake_index": None}, "target"),
    ],
)
def test_malformed_big_bench_mistake_names_the_field(tmp_path, record, field):
    path = _write(tmp_path, [json.dumps(record)])
    with pytest.raises(DataFileError) as error:
        load_big_bench_mistake(path)
    assert error.value.line == 1 and error.value.field == field


def test_unknown_format_and_missing_file_are_clear(tmp_path):
    with pytest.raises(DataFileError, match="unknown format"):
        load_chains(_write(tmp_path, ['{"text": "hello"}']))
    with pytest.raises(DataFileError, match="does not exist"):
        load_chains(tmp_path / "nope.jsonl")


def test_binary_and_non_utf8_files_are_named_with_their_line(tmp_path):
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(b'{"question": "q?", "answer": "1\\n#### 1"}\n{"question": "caf\xe9?", "answer": "1\\n#### 1"}\n')
    with pytest.raises(DataFileError, match=rf"^{latin}:2: is not UTF-8 text \(byte 0xe9 at column 18\)"):
        load_chains(latin)
    binary = tmp_path / "data.jsonl"
    binary.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}\xff\xfe")
    with pytest.raises(DataFileError, match=rf"^{binary}:1: holds binary data"):
        load_chains(binary)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}\xff\xfe")
    with pytest.raises(DataFileError, match=rf"^{weights}: unknown kind of file; readable: .jsonl, .json, .csv"):
        load_chains(weights)
    for name in ("bad.csv", "bad.parquet", "bad.json"):
        broken = tmp_path / name
        broken.write_bytes(b"\xff\xfe\x00garbage")
        with pytest.raises(DataFileError, match=rf"^{broken}: cannot be read as"):
            load_chains(broken)


def test_solutions_without_a_final_answer_are_skipped_and_counted_and_a_file_of_them_is_refused(tmp_path):
    path = _write(tmp_path, [GOOD_GSM8K, '{"question": "q?", "answer": "no final answer"}', GOOD_GSM8K])
    report = LoadReport()
    assert len(load_chains(path, report=report)) == 2
    assert report.to_dict() == {"loaded": 2, "skipped": {"no final answer": 1}, "example_line": {"no final answer": 2}}
    only_bad = _write(tmp_path, ['{"question": "q?", "answer": "4"}'] * 2)
    with pytest.raises(
        DataFileError, match=r":1: field 'answer': nothing usable: 2 with no final answer \(e.g. line 1\)"
    ):
        load_chains(only_bad)


def _content(chains):
    return [(c.question, c.steps, c.answer, c.reference_answer, c.mistake_index, c.task) for c in chains]


def test_every_accepted_format_loads_the_same_chains_as_the_jsonl(tmp_path):
    import datasets

    source = sample_path("gsm8k/test.jsonl")
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    table = datasets.Dataset.from_list(rows)
    (tmp_path / "set.json").write_text(json.dumps(rows))
    table.to_csv(tmp_path / "set.csv")
    table.to_parquet(tmp_path / "set.parquet")
    table.save_to_disk(tmp_path / "set")
    expected = _content(load_chains(source))
    for path in ("set.json", "set.csv", "set.parquet", "set"):
        assert _content(load_chains(tmp_path / path)) == expected, path
    assert load_chains(tmp_path / "set.csv")[0].source_id.endswith("set.csv:2")  # its line: the header is line 1


def test_other_field_names_and_a_first_error_labelled_set(tmp_path):
    import datasets

    renamed = tmp_path / "renamed.csv"
    datasets.Dataset.from_list([{"problem": "What is 2+3?", "solution": "2+3=5\n#### 5"}]).to_csv(renamed)
    (chain,) = load_chains(renamed, fields=Fields(question="problem", answer="solution"))
    assert (chain.question, chain.steps, chain.answer) == ("What is 2+3?", ("2+3=5",), "5")

    labelled = tmp_path / "labelled.parquet"
    datasets.Dataset.from_list(
        [
            {"q": "q1", "trace": "a\nb\nc", "first_wrong": "2", "final": "7"},
            {"q": "q2", "trace": "a\nb", "first_wrong": "none", "final": "1,000"},
        ]
    ).to_parquet(labelled)
    fields = Fields(question="q", answer="final", steps="trace", label="first_wrong", label_base=1, no_mistake="none")
    first, second = load_chains(labelled, fields=fields)
    assert (first.steps, first.mistake_index, first.answer) == (("a", "b", "c"), 1, "7")
    assert (second.mistake_index, second.answer) == (None, "1000")
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps([{"q": "q1", "trace": ["a", "b", "c"], "first_wrong": 5}]))
    with pytest.raises(DataFileError, match=r"outside.json:1: field 'first_wrong': 5 is not one of the 3 steps"):
        load_chains(outside, fields=fields)
    with pytest.raises(ValueError, match="both its steps field and its label field"):
        Fields(steps="trace")
