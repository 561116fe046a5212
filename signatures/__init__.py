"""The six stage signatures, and error types as stage-1 subclasses with a registry."""

from misstep.signatures.error_types import (
    DEFAULT_ERROR_TYPES,
    ERROR_TYPES,
    ArithmeticSlip,
    MisreadQuantity,
    SkippedStep,
    WrongOperand,
    WrongOperation,
    error_type_name,
    get_error_type,
    register_error_type,
)
from misstep.signatures.stages import (
    CurateScenario,
    DescribeMistake,
    JudgeRecovery,
    LocateFirstError,
    RecoverFromError,
    WriteMistakenChain,
)

__all__ = [
    "DEFAULT_ERROR_TYPES",
    "ERROR_TYPES",
    "ArithmeticSlip",
    "CurateScenario",
    "DescribeMistake",
    "JudgeRecovery",
    "LocateFirstError",
    "MisreadQuantity",
    "RecoverFromError",
    "SkippedStep",
    "WriteMistakenChain",
    "WrongOperand",
    "WrongOperation",
    "error_type_name",
    "get_error_type",
    "register_error_type",
]
