"""torchapprox: quantization-aware training for PyTorch (this package needs torch only)."""

from .qat import attach, detach, enable_statistics, quantized_layers, set_bitwidth, statistics
from .quantizers import ApproxQuantizer, MinMaxQuant

__all__ = [
    "ApproxQuantizer",
    "MinMaxQuant",
    "attach",
    "detach",
    "enable_statistics",
    "quantized_layers",
    "set_bitwidth",
    "statistics",
]
__version__ = "0.1.0"
