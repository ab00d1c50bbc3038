"""Build and load the C++ table-matmul kernels (``csrc/approx_matmul_cpu.cpp``), once per torch installation.

The same scheme as ``torchapprox.quantizers.cpu_extension``, whose builder this module uses:
the library is keyed on a hash of this source, the flags, Python and the torch installation;
builders hold an ``flock`` (dropped by the OS however the holder dies) for at most
``TORCHAPPROX_BUILD_TIMEOUT`` seconds; each build runs in a scratch folder and the library is
moved into place with one atomic rename. ``TORCHAPPROX_COMPILE=0`` turns the kernels off; a
failed build warns once and the plain torch implementation (``reference.py``) serves the ops,
with the same values. It is a separate library from the quantizer kernels, so either builds
and loads without the other.
"""

from __future__ import annotations

from pathlib import Path

from ..quantizers import cpu_extension as _builder

SOURCE = Path(__file__).with_name("csrc") / "approx_matmul_cpu.cpp"
NAME_PREFIX = "torchapprox_mult_cpu"

_state = "untried"  # "untried" | "loaded" | "unavailable"


def kernels_loaded() -> bool:
    """Load the kernels on first use; True when they serve the ops' CPU calls."""
    global _state
    _state = _builder.load_once(_state, SOURCE, NAME_PREFIX, "C++ approximate-multiplier kernels", "much slower",
                                seconds=30)
    return _state == "loaded"


def library_name() -> str:
    return f"{NAME_PREFIX}_{_builder.build_key(SOURCE)}"
