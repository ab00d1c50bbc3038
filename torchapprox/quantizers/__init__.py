"""Quantizers: the abstract interface, its implementations and the custom ops they run."""

from . import ops  # noqa: F401 - registers the torchapprox::* custom ops
from .approx_quantizer import ApproxQuantizer
from .minmax_quantizer import MinMaxQuant

__all__ = ["ApproxQuantizer", "MinMaxQuant"]
