"""torchapprox: quantization-aware training for PyTorch (this package needs torch only)."""

from .approximation import assigned_multipliers, set_multiplier
from .assignment import Assignment, assign_bitwidths
from .batchnorm_fold import freeze_batchnorm
from .calibration import calibrate
from .coverage import coverage, coverage_summary
from .export import export_onnx
from .layers import register_layer
from .multiplier_assignment import assign_multipliers, multiplier_sensitivity
from .qat import (attach, detach, float_state_dict, load_quantizer_state, quantization_state, quantized_layers, quantizer_state,
                  restore_quantization, set_bitwidth, synchronize_quantizers)
from .quantizers import ApproxQuantizer, LSQQuant, MinMaxQuant, QParams, register_quantizer
from .precision import precision_summary
from .sensitivity import Sensitivity, rank_correlation, sensitivity
from .spec import QuantSpec
from .statistics import collect_statistics, enable_statistics, statistics

__all__ = [
    "ApproxQuantizer",
    "Assignment",
    "LSQQuant",
    "MinMaxQuant",
    "QParams",
    "QuantSpec",
    "Sensitivity",
    "assign_bitwidths",
    "assign_multipliers",
    "attach",
    "assigned_multipliers",
    "calibrate",
    "collect_statistics",
    "coverage",
    "coverage_summary",
    "detach",
    "enable_statistics",
    "export_onnx",
    "float_state_dict",
    "freeze_batchnorm",
    "load_quantizer_state",
    "multiplier_sensitivity",
    "quantization_state",
    "precision_summary",
    "quantized_layers",
    "quantizer_state",
    "rank_correlation",
    "register_layer",
    "register_quantizer",
    "restore_quantization",
    "sensitivity",
    "set_bitwidth",
    "set_multiplier",
    "statistics",
    "synchronize_quantizers",
]
__version__ = "0.3.0"
