"""Lightning glue: the QAT callback and its bitwidth schedules."""

from .qat import QuantizationAwareTraining
from .schedules import ConstantBitwidth, CosineBitwidth, LinearBitwidth, StepBitwidth

__all__ = [
    "ConstantBitwidth",
    "CosineBitwidth",
    "LinearBitwidth",
    "QuantizationAwareTraining",
    "StepBitwidth",
]
