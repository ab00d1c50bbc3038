"""Quantizers: the contract (ApproxQuantizer, QParams and the one rounding op), the registry
of families, the min/max family, and the custom ops they run."""

from . import ops  # noqa: F401 - registers the torchapprox::* custom ops
from .approx_quantizer import ApproxQuantizer
from .qparams import QParams, levels, quantize_dequantize
from .registry import build_quantizer, quantizer_class, register_quantizer, registered_quantizers
from .minmax_quantizer import MinMaxQuant  # noqa: E402 - registers the "minmax" family
from .lsq import LSQQuant  # noqa: E402 - registers the "lsq" family

__all__ = ["ApproxQuantizer", "LSQQuant", "MinMaxQuant", "QParams", "build_quantizer", "levels", "quantize_dequantize",
           "quantizer_class", "register_quantizer", "registered_quantizers"]
