"""Error types are stage-1 signatures: each subclass of `DescribeMistake` asks for one kind
of mistake. The registry makes them selectable by name (`--error-type`); a user's own
subclass works from Python by passing the class itself, or by registering it.

    @register_error_type("unit_confusion")
    class UnitConfusion(DescribeMistake):
        \"\"\"Describe a mistake where the solver mixes up units (minutes for hours, cents for dollars).\"\"\"
"""

from collections.abc import Callable

from misstep.signatures.stages import DescribeMistake

ERROR_TYPES: dict[str, type[DescribeMistake]] = {}


def register_error_type(name: str) -> Callable[[type[DescribeMistake]], type[DescribeMistake]]:
    """Class decorator: make a `DescribeMistake` subclass selectable as `name`."""

    def register(signature: type[DescribeMistake]) -> type[DescribeMistake]:
        if not (isinstance(signature, type) and issubclass(signature, DescribeMistake)):
            raise TypeError(f"error type {name!r} must subclass DescribeMistake, got {signature!r}")
        if name in ERROR_TYPES and ERROR_TYPES[name] is not signature:
            raise ValueError(f"error type {name!r} is already registered to {ERROR_TYPES[name].__name__}")
        ERROR_TYPES[name] = signature
        signature.error_type = name
        return signature

    return register


def get_error_type(error_type: str | type[DescribeMistake]) -> type[DescribeMistake]:
    """A registered error type by name, or a `DescribeMistake` subclass passed as it is."""
    if isinstance(error_type, type) and issubclass(error_type, DescribeMistake):
        return error_type
    if error_type not in ERROR_TYPES:
        raise KeyError(f"unknown error type {error_type!r}; registered: {', '.join(sorted(ERROR_TYPES))}")
    return ERROR_TYPES[error_type]


def error_type_name(signature: type[DescribeMistake]) -> str:
    return getattr(signature, "error_type", None) or signature.__name__


@register_error_type("arithmetic_slip")
class ArithmeticSlip(DescribeMistake):
    """Read a correct step-by-step solution and describe an arithmetic slip a solver could make in one
    step: the right numbers and operation, but a wrong result (e.g. 17 + 25 = 32)."""


@register_error_type("wrong_operand")
class WrongOperand(DescribeMistake):
    """Read a correct step-by-step solution and describe a mistake where one step uses the wrong number
    copied from an earlier step or the question, instead of the number it needs."""


@register_error_type("wrong_operation")
class WrongOperation(DescribeMistake):
    """Read a correct step-by-step solution and describe a mistake where one step applies the wrong
    operation (adds instead of subtracting, multiplies instead of dividing)."""


@register_error_type("skipped_step")
class SkippedStep(DescribeMistake):
    """Read a correct step-by-step solution and describe a mistake where the solver skips a needed step
    and carries on with the value from before it."""


@register_error_type("misread_quantity")
class MisreadQuantity(DescribeMistake):
    """Read a correct step-by-step solution and describe a mistake where the solver misreads a quantity
    given in the question (a wrong number, or the wrong one of two numbers)."""


# The error types a run uses unless told otherwise: the built-in ones, in this order (the order
# in which the injector and the loop take them in turn).
DEFAULT_ERROR_TYPES: tuple[str, ...] = tuple(sorted(ERROR_TYPES))
