"""DSPy's internals that misstep relies on still look as recorded (misstep.optimize.dspy_internals)."""

from misstep.optimize import dspy_internals


def test_every_dspy_internal_used_has_its_recorded_signature():
    assert dspy_internals.USED.keys() == dspy_internals.RECORDED.keys()
    assert dspy_internals.changed() == {}, "DSPy changed these internals (name: signature now); adapt compile.py"


def test_a_changed_signature_is_reported_by_name(monkeypatch):
    name = "dspy.teleprompt.bootstrap_finetune.prepare_teacher"
    monkeypatch.setitem(dspy_internals.USED, name, lambda student: student)
    assert dspy_internals.changed() == {name: "(student)"}
