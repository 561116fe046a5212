"""The generation-verification gap's set: balanced between recoveries the oracle accepts and rejects,
walking further through its chains while either side is short."""

from misstep.lm import local_lm
from misstep.optimize.verification import balanced_set, build_set, found_enough
from misstep.programs import SelfCorrector


def _records(verdicts: str) -> list[dict]:
    """One record a character: a accepted, r rejected, u unparsed."""
    return [{"key": f"chain-{n}", "parsed": v != "u", "recovery_ok": v == "a"} for n, v in enumerate(verdicts)]


def test_the_set_takes_accepted_recoveries_up_to_half_then_rejected_ones_in_order():
    records = _records("rrarurrraarrrrra")
    chosen = balanced_set(records, size=8)
    assert [r["key"] for r in chosen] == [
        "chain-2",
        "chain-8",
        "chain-9",
        "chain-15",
        "chain-0",
        "chain-1",
        "chain-3",
        "chain-5",
    ]
    few = balanced_set(_records("aaaaaarr"), size=8)  # accepted beyond half give way to rejected ones
    assert [r["recovery_ok"] for r in few] == [True] * 4 + [False] * 2


def test_enough_means_a_quarter_of_the_set_on_each_side():
    assert not found_enough(_records("rrrrrrrrra"), size=8)  # one accepted, two needed
    assert found_enough(_records("rrrrrrrraa"), size=8)
    assert not found_enough(_records("aaaaauuu"), size=8)  # unparsed are neither


def test_a_student_that_never_recovers_walks_every_chain(tmp_path, tiny_engine, gsm8k_train):
    """A random-weight model recovers nothing, so no chunk finds the accepted quarter: every chain is
    recovered twice, and the set is the rejected ones up to its size."""
    student = SelfCorrector()
    student.set_lm(local_lm(engine=tiny_engine, max_tokens=48, cache=False))
    chains = gsm8k_train[:5]
    path = tmp_path / "verification.jsonl"
    chosen = build_set(chains, student, path, size=4, temperature=0.7, seed=0, num_threads=4)
    made = path.read_text().splitlines()
    assert len(made) == 2 * 5  # 4, then 8, then all 10: no chunk had an accepted recovery
    assert len(chosen) == 4 and not any(r["recovery_ok"] for r in chosen)
    again = build_set(chains, student, path, size=4, temperature=0.7, seed=0, num_threads=4)
    assert again == chosen and len(path.read_text().splitlines()) == 10  # resumed: nothing made twice
    # The set is made once: a rerun with another size still scores the rounds on the same recoveries.
    assert build_set(chains, student, path, size=8, temperature=0.7, seed=0, num_threads=4) == chosen


def test_the_set_is_cut_in_the_walks_order_not_the_order_the_threads_finished(tmp_path, tiny_engine, gsm8k_train):
    """The file keeps recoveries as threads finish; reversed, the set cut from it is the same."""
    student = SelfCorrector()
    student.set_lm(local_lm(engine=tiny_engine, max_tokens=48, cache=False))
    path = tmp_path / "verification.jsonl"
    chosen = build_set(gsm8k_train[:5], student, path, size=4, temperature=0.7, seed=0, num_threads=4)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(reversed(lines)) + "\n")
    path.with_name("verification-set.json").unlink()  # made again from the reversed file
    again = build_set(gsm8k_train[:5], student, path, size=4, temperature=0.7, seed=0, num_threads=4)
    assert [r["key"] for r in again] == [r["key"] for r in chosen]
