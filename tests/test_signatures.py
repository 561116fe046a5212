import pytest

from misstep.programs import ScenarioWriter
from misstep.signatures import (
    ERROR_TYPES,
    ArithmeticSlip,
    DescribeMistake,
    LocateFirstError,
    get_error_type,
    register_error_type,
)


def test_the_five_built_in_error_types_are_stage_one_signatures():
    assert {"arithmetic_slip", "wrong_operand", "wrong_operation", "skipped_step", "misread_quantity"} <= set(
        ERROR_TYPES
    )
    for name, signature in ERROR_TYPES.items():
        assert issubclass(signature, DescribeMistake)
        assert list(signature.output_fields) == ["mistake_step", "mistake_description"]
        assert signature.instructions != DescribeMistake.instructions, name


def test_typed_fields():
    assert LocateFirstError.output_fields["has_mistake"].annotation is bool
    assert LocateFirstError.output_fields["first_error_step"].annotation is int


def test_lookup_by_name_or_class_and_clear_errors():
    assert get_error_type("arithmetic_slip") is ArithmeticSlip
    assert get_error_type(ArithmeticSlip) is ArithmeticSlip
    with pytest.raises(KeyError, match="registered: arithmetic_slip"):
        get_error_type("typo")
    with pytest.raises(TypeError, match="must subclass DescribeMistake"):
        register_error_type("bad")(LocateFirstError)
    with pytest.raises(ValueError, match="already registered"):
        register_error_type("arithmetic_slip")(type("Other", (DescribeMistake,), {"__doc__": "x"}))


def test_a_users_own_error_type_needs_no_library_change():
    class UnitConfusion(DescribeMistake):
        """Describe a mistake where the solver mixes up units (minutes for hours)."""

    writer = ScenarioWriter(UnitConfusion)  # passed as a class, unregistered
    assert writer.describe.signature.instructions.startswith("Describe a mistake where the solver mixes up units")
    assert writer.error_type == "UnitConfusion"

    register_error_type("unit_confusion_test")(UnitConfusion)
    try:
        assert ScenarioWriter("unit_confusion_test").error_type == "unit_confusion_test"
    finally:
        del ERROR_TYPES["unit_confusion_test"]
