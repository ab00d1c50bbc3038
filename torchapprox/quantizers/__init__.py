"""Quantizers: the abstract interface and its implementations."""

from .approx_quantizer import ApproxQuantizer
from .minmax_quantizer import MinMaxQuant

__all__ = ["ApproxQuantizer", "MinMaxQuant"]
