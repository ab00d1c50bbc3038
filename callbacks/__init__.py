"""Lightning glue: the QAT callback, its companions and the bitwidth schedules."""

from .approximate import ApproximateProducts, AssignMultipliers
from .bn_reestimation import BatchNormReestimation
from .checkpoint import restore_quantized
from .lr_rewarm import LearningRateRewarm
from .mixed_precision import MixedPrecision
from .qat import QuantizationAwareTraining
from .schedules import ConstantBitwidth, CosineBitwidth, LinearBitwidth, StepBitwidth

__all__ = [
    "ApproximateProducts",
    "AssignMultipliers",
    "BatchNormReestimation",
    "ConstantBitwidth",
    "CosineBitwidth",
    "LearningRateRewarm",
    "LinearBitwidth",
    "MixedPrecision",
    "QuantizationAwareTraining",
    "StepBitwidth",
    "restore_quantized",
]
