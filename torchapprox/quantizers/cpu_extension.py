"""Build and load the fused CPU kernels (``csrc/minmax_cpu.cpp``), once per machine.

The first call that needs them compiles the C++ source with the compiler torch uses for
its own extensions (about 25 s; a line on stderr says so) into torch's extension cache
(``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``); later processes load the
built library in a fraction of a second. The build is keyed on a hash of the source, the
flags, and the torch and Python versions, so an upgrade of either builds afresh.

``TORCHAPPROX_COMPILE=0`` turns this off. If the build fails (no C++ compiler, a platform
the flags do not suit), a warning says so once and the plain torch ops are used instead:
slower, with the same numbers.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "minmax_cpu.cpp"
# -fopenmp: at::parallel_for runs on torch's own OpenMP threads; -fopenmp-simd: the
# `omp simd` loops vectorize; no FMA contraction, which would change the rounding.
CFLAGS = ["-O3", "-fopenmp", "-fopenmp-simd", "-ffp-contract=off"]
LDFLAGS = ["-fopenmp"]

_ops = None  # torch.ops.torchapprox once loaded
_state = "untried"  # "untried" | "loaded" | "unavailable"


def compile_disabled() -> bool:
    """True when ``TORCHAPPROX_COMPILE`` is 0/false/no/off: plain torch ops only."""
    return os.environ.get("TORCHAPPROX_COMPILE", "1").strip().lower() in ("0", "false", "no", "off")


def fused_ops():
    """``torch.ops.torchapprox`` with the fused kernels, or None where they cannot be had."""
    global _ops, _state
    if _state == "untried":
        _state = "unavailable"
        if not compile_disabled():
            _ops = _build_and_load()
            _state = "loaded" if _ops is not None else "unavailable"
    return _ops


def _build_and_load():
    try:
        from torch.utils.cpp_extension import get_default_build_root, load

        source = SOURCE.read_bytes()
        key = hashlib.sha256(
            b"\0".join([source, " ".join(CFLAGS + LDFLAGS).encode(), torch.__version__.encode(),
                        sys.version.encode()])
        ).hexdigest()[:16]
        name = f"torchapprox_cpu_{key}"
        build_dir = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name
        if not (build_dir / f"{name}.so").exists():
            print(f"torchapprox: building the fused CPU kernels, once per machine (about 25 s), in {build_dir}",
                  file=sys.stderr, flush=True)
        build_dir.mkdir(parents=True, exist_ok=True)
        load(name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
             build_directory=str(build_dir), is_python_module=False, verbose=False)
        return torch.ops.torchapprox
    except Exception as error:  # noqa: BLE001 - any build or load failure means: use torch ops
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        warnings.warn(
            f"torchapprox: the fused CPU kernels could not be built or loaded ({type(error).__name__}: "
            f"{first_line}); using plain torch ops instead (same numbers, slower). "
            "Set TORCHAPPROX_COMPILE=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
