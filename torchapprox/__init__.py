"""torchapprox: quantization-aware training for PyTorch (this package needs torch only)."""

from .calibration import calibrate
from .coverage import coverage, coverage_summary
from .export import export_onnx
from .layers import register_layer
from .qat import (attach, detach, enable_statistics, load_quantizer_state, quantized_layers, quantizer_state,
                  set_bitwidth, statistics)
from .quantizers import ApproxQuantizer, MinMaxQuant

__all__ = [
    "ApproxQuantizer",
    "MinMaxQuant",
    "attach",
    "calibrate",
    "coverage",
    "coverage_summary",
    "detach",
    "enable_statistics",
    "export_onnx",
    "load_quantizer_state",
    "quantized_layers",
    "quantizer_state",
    "register_layer",
    "set_bitwidth",
    "statistics",
]
__version__ = "0.2.0"
