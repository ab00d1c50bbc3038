"""Approximate 8x8-bit multipliers: a catalogue, error metrics, and integer-exact kernels.

A :class:`Multiplier` holds an int32 table [256, 256] (row = input operand, column = weight
operand; ``domain.py``) with its error metrics (``metrics.py``). Generators build the
published designs (``generators.py``). The functional API computes linear layers and
convolutions of integer levels with every product taken from the table, exactly
(``functional.py``, ``conv.py``), on three paths: an exact GEMM decomposition, the C++/plain-torch
table op ``torchapprox::approx_matmul`` (``ops.py``) and the plain-torch reference.
"""

from . import ops  # noqa: F401 - registers the torchapprox::approx_matmul* custom ops
from .decomposition import Decomposition
from .conv import approx_conv_levels
from .functional import AUTO_MAX_RANK, approx_linear_levels, approx_matmul_int, select_path
from .generators import broken_array, by_name, drum, exact, mitchell, truncated
from .multiplier import Multiplier

__all__ = [
    "AUTO_MAX_RANK",
    "Decomposition",
    "Multiplier",
    "approx_conv_levels",
    "approx_linear_levels",
    "approx_matmul_int",
    "broken_array",
    "by_name",
    "drum",
    "exact",
    "mitchell",
    "select_path",
    "truncated",
]
